//! One bench run: start what the selected scenarios need (the data stack,
//! trellisd, the reference servers), then measure each scenario in table
//! order — a probe together with its partner's load, run again unrecorded
//! over the same window — and gather the notes the report closes with.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use futures::future::{BoxFuture, FutureExt as _, join_all};
use prost::Message as _;
use tokio::time::{Instant, sleep_until};
use trellis_core::config::Argon2Config;

use crate::calls::{self, Call, Caller, Protocol, Req, Rpc};
use crate::load::{self, Mode, Outcome, Plan};
use crate::measure::{self, Shape, Usage};
use crate::report::ScenarioResult;
use crate::scenario::{self, Load, Scenario, Work};
use crate::seed::{Fixture, ListSize};
use crate::servers::{self, ServerKind, ServerProcess, Servers};
use crate::stack::Stack;
use crate::{Pins, RunArgs, hashrate, notes};

/// How long a server may take to answer its first GetInfo.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections of the bare GetUser server: trellisd's default pool size.
pub const USER_SERVER_CONNECTIONS: usize = 16;

/// What a run produced besides the results.
pub struct Outputs {
    pub results: Vec<ScenarioResult>,
    /// A line on the GetInfo response sizes.
    pub payload: String,
    pub notes: Vec<String>,
    /// Loads run again, unrecorded, under probes.
    pub floods: Vec<notes::Flood>,
}

/// The run's settings.
pub struct Ctx<'a> {
    pub args: &'a RunArgs,
    pub plan: Plan,
    pub pins: Option<Pins>,
    /// CPUs of the machine (what `PerCpu` loads count).
    pub cpus: usize,
}

/// argon2 parameters for the run: OWASP's (trellisd's defaults); `--quick`
/// lowers the memory so that a debug build hashes fast, keeping t and p.
pub fn argon2_params(quick: bool) -> Argon2Config {
    let owasp = Argon2Config::default();
    if quick {
        Argon2Config {
            memory_kib: 1024,
            ..owasp
        }
    } else {
        owasp
    }
}

/// Starts the servers, runs every scenario in order.
pub async fn run(
    ctx: &Ctx<'_>,
    scenarios: &[&'static Scenario],
    trellisd: Option<&Path>,
    running: &mut Servers,
) -> anyhow::Result<Outputs> {
    let server_cpu = ctx.pins.map(|p| p.server);
    let argon2 = argon2_params(ctx.args.quick);
    if scenarios.iter().any(|s| s.needs_store()) {
        eprintln!("trellis-bench: starting PostgreSQL and Redis");
        running.stack = Some(Stack::start(server_cpu, argon2).await?);
    }
    let stack = running.stack.as_ref();

    // trellisd first: the baseline server reports the same service lists, so
    // both answer GetInfo with a payload of the same size.
    let mut services = vec![trellis_proto::system::v1::SERVICE_NAME.to_string()];
    let mut enabled = vec!["system".to_string()];
    let mut sizes = BTreeMap::new();
    if let Some(path) = trellisd {
        let mut p = servers::start_trellisd(path, server_cpu, &ctx.args.out, stack)?;
        let info = p
            .wait_ready(READY_TIMEOUT)
            .await?
            .context("trellisd answered GetInfo without info")?;
        sizes.insert(ServerKind::Trellisd, info.encoded_len());
        services = info.services;
        enabled = info.enabled_services;
        running.running.insert(ServerKind::Trellisd, p);
    }
    let uses = |kind| scenarios.iter().any(|s| s.server() == Some(kind));
    if uses(ServerKind::Baseline) {
        let mut p = servers::start_baseline(server_cpu, &services, &enabled)?;
        if let Some(info) = p.wait_ready(READY_TIMEOUT).await? {
            sizes.insert(ServerKind::Baseline, info.encoded_len());
        }
        running.running.insert(ServerKind::Baseline, p);
    }
    if uses(ServerKind::UserRaw) {
        let stack = stack.context("the user server needs the data stack")?;
        let mut p =
            servers::start_user_server(server_cpu, &stack.database_url, USER_SERVER_CONNECTIONS)?;
        p.wait_ready(READY_TIMEOUT).await?;
        running.running.insert(ServerKind::UserRaw, p);
    }
    let payload = sizes
        .iter()
        .map(|(k, n)| format!("{} answers GetInfo with {n} bytes", k.as_str()))
        .collect::<Vec<_>>()
        .join("; ");

    let mut fixture = match (stack, running.running.get(&ServerKind::Trellisd)) {
        (Some(stack), Some(t)) => Some(
            Fixture::new(
                t.addr,
                &stack.database_url,
                list_size(ctx.args.quick),
                if ctx.args.quick { 5 } else { 20 },
            )
            .await?,
        ),
        _ => None,
    };

    let mut results: Vec<ScenarioResult> = Vec::new();
    let mut floods = Vec::new();
    for s in scenarios {
        // A probe runs with its partner's load going again, unrecorded.
        let flood = s.alongside.and_then(scenario::by_name);
        let group: Vec<&'static Scenario> = flood.into_iter().chain([*s]).collect();
        let partnered = group.len() > 1;
        let mut prepared = Vec::new();
        for g in &group {
            prepared
                .push(prepare(ctx, g, partnered, running, fixture.as_mut(), &sizes, argon2).await?);
        }
        // Starts once every task of the group is ready to go.
        let start = Instant::now() + Duration::from_millis(20);
        let jobs: Vec<BoxFuture<'_, anyhow::Result<(Shape, Outcome, Usage)>>> = prepared
            .into_iter()
            .map(|p| execute(p, start, running.stack.as_ref()).boxed())
            .collect();
        for (g, done) in group.iter().zip(join_all(jobs).await) {
            let (shape, outcome, usage) = done.with_context(|| format!("{}: running", g.name))?;
            if g.name != s.name {
                floods.push(notes::Flood {
                    load: g.name,
                    during: s.name,
                    rps: outcome.ok as f64 / shape.duration.as_secs_f64(),
                    errors: outcome.error_total(),
                });
                continue;
            }
            let r = measure::result(g, shape, &outcome, usage, &results);
            eprintln!(
                "trellis-bench: {:<16} {:>9.0} req/s  p50 {:>9.1} µs  p99 {:>9.1} µs  max {:>9.1} µs  errors {}",
                r.scenario,
                r.rps,
                r.p50_us,
                r.p99_us,
                r.max_us,
                r.error_total()
            );
            results.push(r);
        }
    }
    let notes = notes::notes(
        ctx,
        &results,
        &floods,
        fixture.as_ref().map(|f| &f.facts),
        running,
        argon2,
    );
    Ok(Outputs {
        results,
        payload,
        notes,
        floods,
    })
}

/// The list fixture's size: 100,000 users and page 500; `--quick` 2,000
/// and page 50.
pub fn list_size(quick: bool) -> ListSize {
    if quick {
        ListSize {
            users: 2_000,
            deep_page: 50,
        }
    } else {
        ListSize {
            users: 100_000,
            deep_page: 500,
        }
    }
}

/// A scenario ready to start: its load, connected callers and seeded calls.
enum Prepared<'a> {
    Rpc {
        plan: Plan,
        shape: Shape,
        server: &'a ServerProcess,
        callers: Vec<Caller>,
        calls: Vec<Call>,
    },
    Argon2 {
        plan: Plan,
        shape: Shape,
        params: Argon2Config,
        threads: usize,
        nice: i32,
        cpus: Option<Vec<usize>>,
    },
}

/// The plan a scenario's load makes of the run's.
pub fn plan_of(load: Load, base: Plan, cpus: usize) -> Plan {
    let closed = |tasks: usize| Plan {
        mode: Mode::Concurrency,
        tasks: tasks.max(1),
        ..base
    };
    match load {
        Load::Run => base,
        Load::PerCpu(k) => closed(k * cpus.max(1)),
        Load::Tasks(n) => closed(n),
        Load::Rate { rps, tasks } => Plan {
            mode: Mode::Rate(rps),
            tasks: tasks.max(1),
            ..base
        },
    }
}

fn load_words(plan: &Plan) -> String {
    let tasks = |n: usize| format!("{n} task{}", if n == 1 { "" } else { "s" });
    match plan.mode {
        Mode::Concurrency => tasks(plan.tasks),
        Mode::Rate(r) => format!("{r} req/s ({})", tasks(plan.tasks)),
    }
}

async fn prepare<'a>(
    ctx: &Ctx<'_>,
    s: &'static Scenario,
    partnered: bool,
    running: &'a Servers,
    fixture: Option<&mut Fixture>,
    sizes: &BTreeMap<ServerKind, usize>,
    argon2: Argon2Config,
) -> anyhow::Result<Prepared<'a>> {
    match s.work {
        Work::Rpc {
            server,
            protocol,
            rpc,
            load,
        } => {
            let plan = plan_of(load, ctx.plan, ctx.cpus);
            let process = running.get(server)?;
            let calls = match (rpc, fixture) {
                (Rpc::SystemGetInfo, _) => {
                    vec![Call::new(Req::GetInfo(Default::default())); plan.tasks]
                }
                (rpc, Some(f)) => f
                    .calls(rpc, plan.tasks)
                    .await
                    .with_context(|| format!("{}: seeding", s.name))?,
                (_, None) => anyhow::bail!("{}: needs the data stack and trellisd", s.name),
            };
            let connections = match protocol {
                Protocol::Grpc => ctx.args.connections.min(plan.tasks),
                Protocol::GrpcWeb => plan.tasks,
            };
            let callers = connect(protocol, process.addr, plan.tasks, ctx.args.connections)
                .await
                .with_context(|| format!("{}: connecting", s.name))?;
            let shape = Shape {
                server: server.as_str().to_string(),
                protocol: protocol.as_str().to_string(),
                mode: match plan.mode {
                    Mode::Concurrency => "concurrency",
                    Mode::Rate(_) => "rate",
                },
                concurrency: plan.tasks,
                rate: match plan.mode {
                    Mode::Concurrency => None,
                    Mode::Rate(r) => Some(r),
                },
                connections,
                warmup: plan.warmup,
                duration: plan.duration,
                load: load_words(&plan),
                response_bytes: matches!(rpc, Rpc::SystemGetInfo | Rpc::SystemGetInfoAuthed)
                    .then(|| sizes.get(&server).copied())
                    .flatten(),
                server_alone: matches!(rpc, Rpc::SystemGetInfo | Rpc::SystemGetInfoAuthed)
                    && s.alongside.is_none()
                    && !partnered,
            };
            Ok(Prepared::Rpc {
                plan,
                shape,
                server: process,
                callers,
                calls,
            })
        }
        Work::Argon2 => {
            // Like trellisd: pinned to its CPUs, as many threads as it hashes
            // on (one per CPU it may use when it names none), its nice value.
            let trellisd = running.running.get(&ServerKind::Trellisd);
            let cpus = match trellisd {
                Some(p) => servers::cpus_of(p.pid()),
                None => match ctx.pins {
                    Some(p) => vec![p.server],
                    None => servers::allowed_cpus(),
                },
            };
            let like = trellisd.and_then(|p| hashrate::hash_threads_of(p.pid()));
            let threads = like.map_or(cpus.len(), |h| h.count).max(1);
            let nice = like.map_or(0, |h| h.nice);
            let plan = ctx.plan;
            let shape = Shape {
                server: "trellis-bench (argon2 crate, in process)".to_string(),
                protocol: "—".to_string(),
                mode: "threads",
                concurrency: threads,
                rate: None,
                connections: 0,
                warmup: plan.warmup,
                duration: plan.duration,
                load: format!(
                    "{threads} thread{} on {}, nice {nice}",
                    if threads == 1 { "" } else { "s" },
                    crate::cpu_list(&cpus)
                ),
                response_bytes: None,
                server_alone: !partnered,
            };
            Ok(Prepared::Argon2 {
                plan,
                shape,
                params: argon2,
                threads,
                nice,
                cpus: (!cpus.is_empty()).then_some(cpus),
            })
        }
    }
}

/// Runs a prepared scenario from `start`, with the scheduler's account of
/// the server, the bench and PostgreSQL over its measured window.
async fn execute(
    p: Prepared<'_>,
    start: Instant,
    stack: Option<&Stack>,
) -> anyhow::Result<(Shape, Outcome, Usage)> {
    match p {
        Prepared::Rpc {
            plan,
            shape,
            server,
            callers,
            calls,
        } => {
            let (from, end) = plan.window(start);
            let db = || stack.and_then(|s| s.db_sched_stat());
            let usage = async {
                sleep_until(from).await;
                let before = (
                    Instant::now(),
                    server.sched_stat(),
                    servers::sched_stat("self"),
                    db(),
                    servers::steal(),
                );
                sleep_until(end).await;
                let after = (
                    Instant::now(),
                    server.sched_stat(),
                    servers::sched_stat("self"),
                    db(),
                    servers::steal(),
                );
                Usage::between(
                    after.0 - before.0,
                    (before.1, after.1),
                    (before.2, after.2),
                    (before.3, after.3),
                    (before.4, after.4),
                )
            };
            let (outcome, usage) = tokio::join!(load::run(plan, start, callers, calls), usage);
            Ok((shape, outcome, usage))
        }
        Prepared::Argon2 {
            plan,
            shape,
            params,
            threads,
            nice,
            cpus,
        } => {
            sleep_until(start).await;
            let steal_from = servers::steal();
            let run = hashrate::run(params, threads, nice, cpus, plan).await?;
            let wall = run.wall.as_secs_f64();
            // Over warm-up and window, scaled to the window's length.
            let steal = steal_from.zip(servers::steal()).map(|(a, b)| {
                b.saturating_sub(a).as_secs_f64() / (plan.warmup + plan.duration).as_secs_f64()
                    * 100.0
            });
            let usage = Usage {
                server_cpu: Some(run.sched.on_cpu.as_secs_f64() / wall * 100.0),
                server_wait: Some(run.sched.waiting.as_secs_f64() / wall * 100.0),
                server_cpu_us: Some(run.sched.on_cpu.as_secs_f64() * 1e6),
                server_minor_faults: Some(run.sched.minor_faults),
                steal,
                ..Usage::default()
            };
            Ok((shape, run.outcome, usage))
        }
    }
}

/// One caller per client task: native gRPC tasks share `connections`
/// HTTP/2 channels round-robin; gRPC-web tasks get a connection each.
async fn connect(
    protocol: Protocol,
    addr: std::net::SocketAddr,
    tasks: usize,
    connections: usize,
) -> anyhow::Result<Vec<Caller>> {
    match protocol {
        Protocol::Grpc => {
            let mut channels = Vec::new();
            for _ in 0..connections.min(tasks) {
                channels.push(calls::grpc_channel(addr).await?);
            }
            Ok(channels
                .iter()
                .cycle()
                .take(tasks)
                .map(|c| Caller::Grpc(c.clone()))
                .collect())
        }
        Protocol::GrpcWeb => {
            let mut callers = Vec::new();
            for _ in 0..tasks {
                callers.push(Caller::GrpcWeb(calls::WebConn::connect(addr).await?));
            }
            Ok(callers)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_make_plans() {
        let base = Plan {
            mode: Mode::Concurrency,
            tasks: 32,
            warmup: Duration::from_secs(2),
            duration: Duration::from_secs(10),
            call_timeout: Duration::from_secs(10),
        };
        assert_eq!(plan_of(Load::Run, base, 2).tasks, 32);
        assert_eq!(plan_of(Load::PerCpu(2), base, 2).tasks, 4);
        assert_eq!(plan_of(Load::Tasks(1), base, 2).tasks, 1);
        let probe = plan_of(
            Load::Rate {
                rps: 200.0,
                tasks: 8,
            },
            base,
            2,
        );
        assert_eq!((probe.mode, probe.tasks), (Mode::Rate(200.0), 8));
        assert_eq!(probe.duration, base.duration, "same window as the run");
        assert_eq!(load_words(&probe), "200 req/s (8 tasks)");
        assert_eq!(load_words(&plan_of(Load::Tasks(1), base, 2)), "1 task");
    }

    #[test]
    fn quick_lowers_only_argon2_memory() {
        let (full, quick) = (argon2_params(false), argon2_params(true));
        assert_eq!(
            (full.memory_kib, full.iterations, full.parallelism),
            (19456, 2, 1)
        );
        assert!(quick.memory_kib < full.memory_kib);
        assert_eq!((quick.iterations, quick.parallelism), (2, 1));
    }
}
