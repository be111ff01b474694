//! One bench run: start what the selected scenarios need (the data stack,
//! the fake LLM upstream, trellisd, the reference servers), then measure
//! each scenario in table order — a probe together with its partner's load,
//! run again unrecorded over the same window; a rate ladder step by step;
//! idle streams opened and held ([`crate::idle`]) — and gather the notes the
//! report closes with.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use futures::future::{BoxFuture, FutureExt as _, join_all};
use prost::Message as _;
use tokio::time::{Instant, sleep_until};
use trellis_core::config::Argon2Config;

use crate::calls::{self, Call, Caller, Protocol, Req, Rpc};
use crate::fakellm;
use crate::load::{self, Mode, Outcome, Plan};
use crate::measure::{self, Extras, Shape, Usage};
use crate::report::{RateStep, ScenarioResult};
use crate::scenario::{self, HELD_SHARE, Load, Scenario, Work};
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
    pub llm: LlmLoad,
    pub chat: ChatLoad,
}

/// The chat scenarios' loads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChatLoad {
    /// The fake upstream's paced script for chat-relay.
    pub relay: fakellm::Script,
    /// Concurrent streams (client tasks) of the relay scenarios.
    pub relay_streams: usize,
    /// Sessions created for the chat scenarios' turns, one a turn.
    pub sessions: i32,
    /// Messages of the chat member's earlier conversations, in sessions
    /// the turns do not use: the table the turns query is not empty.
    pub history: i32,
}

/// The LLM scenarios' loads.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmLoad {
    /// The fixed rate of `llm-direct` and `llm-gateway`, requests/s.
    pub rate: f64,
    /// The rates of `llm-max-rate`'s ladder, in order.
    pub steps: Vec<f64>,
    /// Each ladder step's warm-up and measured window.
    pub step_warmup: Duration,
    pub step_duration: Duration,
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

    // The fake LLM upstream before trellisd, which is configured with its
    // address.
    let mut llm_env = Vec::new();
    if scenarios.iter().any(|s| s.needs_fake_llm()) {
        let mut p = servers::start_fake_llm(server_cpu, ctx.chat.relay)?;
        p.wait_ready(READY_TIMEOUT).await?;
        llm_env = fakellm::trellisd_env(p.addr);
        running.running.insert(ServerKind::FakeLlm, p);
    }

    // trellisd first: the baseline server reports the same service lists, so
    // both answer GetInfo with a payload of the same size.
    let mut services = vec![trellis_proto::system::v1::SERVICE_NAME.to_string()];
    let mut enabled = vec!["system".to_string()];
    let mut sizes = BTreeMap::new();
    if let Some(path) = trellisd {
        let mut p = servers::start_trellisd(path, server_cpu, &ctx.args.out, stack, &llm_env)?;
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
    for (kind, connections) in [
        (ServerKind::UserRaw, Some(USER_SERVER_CONNECTIONS)),
        (ServerKind::UserRawMux, None),
    ] {
        if uses(kind) {
            let stack = stack.context("the user server needs the data stack")?;
            let mut p = servers::start_user_server(server_cpu, &stack.database_url, connections)?;
            p.wait_ready(READY_TIMEOUT).await?;
            running.running.insert(kind, p);
        }
    }
    let payload = sizes
        .iter()
        .map(|(k, n)| format!("{} answers GetInfo with {n} bytes", k.as_str()))
        .collect::<Vec<_>>()
        .join("; ");

    let mut fixture = match (stack, running.running.get(&ServerKind::Trellisd)) {
        (Some(stack), Some(t)) => {
            let mut f = Fixture::new(
                t.addr,
                &stack.database_url,
                list_size(ctx.args.quick),
                if ctx.args.quick { 5 } else { 20 },
            )
            .await?;
            f.fake_llm = running.running.get(&ServerKind::FakeLlm).map(|p| p.addr);
            f.chat = ctx.chat;
            f.seeder = trellisd.map(|path| crate::seed::Seeder {
                trellisd: path.to_path_buf(),
                env: stack.trellisd_env(),
                database_url: stack.database_url.clone(),
                docs: if ctx.args.quick { 3_000 } else { 100_000 },
            });
            Some(f)
        }
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
        if let Some(f) = fixture.as_mut() {
            let took = f
                .settle()
                .await
                .with_context(|| format!("{}: settling the database", s.name))?;
            f.facts.settles.push(took);
        }
        // Starts once every task of the group is ready to go.
        let start = Instant::now() + Duration::from_millis(20);
        let jobs: Vec<BoxFuture<'_, anyhow::Result<Measured>>> = prepared
            .into_iter()
            .map(|p| execute(p, start, running.stack.as_ref()).boxed())
            .collect();
        for (g, done) in group.iter().zip(join_all(jobs).await) {
            let Measured {
                shape,
                outcome,
                usage,
                extras,
            } = done.with_context(|| format!("{}: running", g.name))?;
            if g.name != s.name {
                floods.push(notes::Flood {
                    load: g.name,
                    during: s.name,
                    rps: outcome.ok as f64 / shape.duration.as_secs_f64(),
                    errors: outcome.error_total(),
                });
                continue;
            }
            let r = measure::result(g, shape, &outcome, usage, extras, &results);
            eprintln!(
                "trellis-bench: {:<22} {:>9.0} req/s  p50 {:>9.1} µs  p99 {:>9.1} µs  max {:>9.1} µs  errors {}",
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
        /// None: PostgreSQL itself (its CPU is the database's).
        server: Option<&'a ServerProcess>,
        callers: Vec<Caller>,
        calls: Vec<Call>,
        /// The fake LLM upstream behind trellisd, whose CPU is measured too.
        upstream: Option<&'a ServerProcess>,
        /// A rate ladder's rates (empty: one window at `plan`'s rate).
        steps: Vec<f64>,
        /// Whether to profile the gateway over the window: the commands
        /// Redis runs, trellisd's own timings.
        profile: bool,
    },
    Argon2 {
        plan: Plan,
        shape: Shape,
        params: Argon2Config,
        threads: usize,
        nice: i32,
        cpus: Option<Vec<usize>>,
    },
    Idle {
        shape: Shape,
        server: &'a ServerProcess,
        bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
        sessions: calls::Rotation<String>,
        streams: usize,
        call_timeout: Duration,
    },
}

/// The plan a scenario's load makes of the run's (a ladder's: its first
/// step).
pub fn plan_of(load: Load, base: Plan, cpus: usize, llm: &LlmLoad, chat: &ChatLoad) -> Plan {
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
        Load::LlmRate { tasks } => Plan {
            mode: Mode::Rate(llm.rate),
            tasks: tasks.max(1),
            ..base
        },
        Load::LlmSteps { tasks } => Plan {
            mode: Mode::Rate(llm.steps.first().copied().unwrap_or(llm.rate)),
            tasks: tasks.max(1),
            warmup: llm.step_warmup,
            duration: llm.step_duration,
            ..base
        },
        Load::RelayStreams => closed(chat.relay_streams),
    }
}

/// e.g. `ladder 1000, 1500, 2000 req/s (64 tasks), 1 s + 4 s a step`.
fn ladder_words(steps: &[f64], plan: &Plan) -> String {
    format!(
        "ladder {} req/s ({} tasks), {} s warm-up + {} s measured a step",
        steps
            .iter()
            .map(|r| format!("{r}"))
            .collect::<Vec<_>>()
            .join(", "),
        plan.tasks,
        plan.warmup.as_secs_f64(),
        plan.duration.as_secs_f64()
    )
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
            let plan = plan_of(load, ctx.plan, ctx.cpus, &ctx.llm, &ctx.chat);
            let process = match server {
                ServerKind::Postgres => None,
                kind => Some(running.get(kind)?),
            };
            let calls = match (rpc, fixture) {
                (Rpc::SystemGetInfo, _) => {
                    vec![Call::new(Req::GetInfo(Default::default())); plan.tasks]
                }
                (Rpc::ChatCompletions, _) => {
                    vec![
                        Call::new(Req::ChatCompletions(crate::calls::Upstream::llm_direct()));
                        plan.tasks
                    ]
                }
                (rpc, Some(f)) => f
                    .calls(rpc, plan.tasks)
                    .await
                    .with_context(|| format!("{}: seeding", s.name))?,
                (_, None) => anyhow::bail!("{}: needs the data stack and trellisd", s.name),
            };
            let connections = match protocol {
                Protocol::Grpc => ctx.args.connections.min(plan.tasks),
                Protocol::GrpcWeb | Protocol::OpenAi | Protocol::Sql => plan.tasks,
            };
            let upstream = if server == ServerKind::Trellisd && s.needs_fake_llm() {
                Some(running.get(ServerKind::FakeLlm)?)
            } else {
                None
            };
            let steps = match load {
                Load::LlmSteps { .. } => ctx.llm.steps.clone(),
                _ => Vec::new(),
            };
            if !steps.is_empty() && protocol != Protocol::Grpc {
                anyhow::bail!("{}: rate ladders run over native gRPC only", s.name);
            }
            let target = match (process, running.stack.as_ref()) {
                (Some(p), _) => Target::Addr(p.addr),
                (None, Some(stack)) => Target::Database(&stack.database_url),
                (None, None) => anyhow::bail!("{}: needs the data stack", s.name),
            };
            let callers = connect(protocol, target, plan.tasks, ctx.args.connections)
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
                load: if steps.is_empty() {
                    load_words(&plan)
                } else {
                    ladder_words(&steps, &plan)
                },
                response_bytes: matches!(rpc, Rpc::SystemGetInfo | Rpc::SystemGetInfoAuthed)
                    .then(|| sizes.get(&server).copied())
                    .flatten(),
                // The fake upstream alone on its CPU: trellisd, PostgreSQL
                // and Redis idle meanwhile.
                server_alone: matches!(
                    rpc,
                    Rpc::SystemGetInfo
                        | Rpc::SystemGetInfoAuthed
                        | Rpc::ChatCompletions
                        | Rpc::ChatUpstreamFirstToken
                        | Rpc::ChatUpstreamRelay
                ) && s.alongside.is_none()
                    && !partnered,
            };
            let profile = server == ServerKind::Trellisd
                && matches!(
                    rpc,
                    Rpc::GenerateStream | Rpc::ChatFirstToken | Rpc::ChatRelay
                )
                && steps.is_empty();
            Ok(Prepared::Rpc {
                plan,
                shape,
                server: process,
                callers,
                calls,
                upstream,
                steps,
                profile,
            })
        }
        Work::IdleStreams => {
            let server = running.get(ServerKind::Trellisd)?;
            let f = fixture.context("streams-idle needs the data stack and trellisd")?;
            let (bearer, sessions) = f
                .idle_setup()
                .await
                .with_context(|| format!("{}: seeding", s.name))?;
            let streams = ctx
                .args
                .idle_streams
                .unwrap_or(if ctx.args.quick { 200 } else { 10_000 })
                .max(1);
            let connections = streams.div_ceil(crate::idle::PER_CONNECTION);
            let shape = Shape {
                server: ServerKind::Trellisd.as_str().to_string(),
                protocol: Protocol::Grpc.as_str().to_string(),
                mode: "streams",
                concurrency: crate::idle::OPENING,
                rate: None,
                connections,
                warmup: Duration::ZERO,
                // Replaced by the time opening them took.
                duration: Duration::from_secs(1),
                load: format!(
                    "{streams} streams over {connections} HTTP/2 connection{}, opened {} at a time",
                    if connections == 1 { "" } else { "s" },
                    crate::idle::OPENING
                ),
                response_bytes: None,
                server_alone: false,
            };
            Ok(Prepared::Idle {
                shape,
                server,
                bearer,
                sessions,
                streams,
                call_timeout: ctx.plan.call_timeout,
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

/// What running a prepared scenario measured.
struct Measured {
    shape: Shape,
    outcome: Outcome,
    usage: Usage,
    extras: Extras,
}

/// Where a window's CPU use is read from.
struct Watch<'a> {
    server: Option<&'a ServerProcess>,
    upstream: Option<&'a ServerProcess>,
    stack: Option<&'a Stack>,
    redis_pid: Option<u32>,
    profile: bool,
}

/// What profiling a window found.
#[derive(Debug, Default)]
struct Profile {
    /// Commands Redis ran, by command.
    redis_commands: BTreeMap<String, u64>,
    /// Means of trellisd's own timings, µs, by name.
    server_means_us: BTreeMap<String, f64>,
    /// PostgreSQL transactions committed and `llm_usage` rows written.
    pg: Option<(i64, i64)>,
}

/// trellisd's histograms the gateway profile reads: name in the report,
/// metric, labels the series must carry.
const SERVER_TIMINGS: &[(&str, &str, &[&str])] = &[
    (
        "grpc_call",
        "trellis_grpc_request_duration_seconds",
        &["method=\"GenerateStream\""],
    ),
    (
        "upstream_call",
        "trellis_llm_upstream_duration_seconds",
        &["outcome=\"ok\""],
    ),
    (
        "upstream_first_token",
        "trellis_llm_time_to_first_token_seconds",
        &[],
    ),
    (
        "chat_first_token",
        "trellis_chat_time_to_first_token_seconds",
        &[],
    ),
];

/// The sum and count of a Prometheus histogram, over its series whose
/// labels contain each of `labels`.
fn histogram(text: &str, name: &str, labels: &[&str]) -> Option<(f64, f64)> {
    let (sum_name, count_name) = (format!("{name}_sum"), format!("{name}_count"));
    let (mut sum, mut count) = (None, None);
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, have) = series.split_once('{').unwrap_or((series, ""));
        if !labels.iter().all(|l| have.contains(l)) {
            continue;
        }
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        if metric == sum_name {
            *sum.get_or_insert(0.0) += v;
        } else if metric == count_name {
            *count.get_or_insert(0.0) += v;
        }
    }
    sum.zip(count)
}

/// trellisd's `/metrics` text.
async fn scrape(addr: std::net::SocketAddr) -> Option<String> {
    let mut conn = calls::Http1Conn::connect(addr).await.ok()?;
    let body = conn.get("/metrics").await.ok()?;
    String::from_utf8(body.to_vec()).ok()
}

/// The scheduler's accounts at one instant.
struct Snapshot {
    at: Instant,
    server: Option<servers::SchedStat>,
    client: Option<servers::SchedStat>,
    db: Option<servers::SchedStat>,
    steal: Option<Duration>,
    upstream: Option<servers::SchedStat>,
    redis: Option<servers::SchedStat>,
}

impl Watch<'_> {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            server: self.server.and_then(|s| s.sched_stat()),
            client: servers::sched_stat("self"),
            db: self.stack.and_then(|s| s.db_sched_stat()),
            steal: servers::steal(),
            upstream: self.upstream.and_then(|u| u.sched_stat()),
            redis: self
                .redis_pid
                .and_then(|pid| servers::sched_stat(&pid.to_string())),
        }
    }

    /// CPU use (and, when profiling, Redis's commands and trellisd's
    /// timings) over `from`..`end`.
    async fn over(&self, from: Instant, end: Instant) -> (Usage, Profile) {
        let probe = || async {
            if !self.profile {
                return (None, None, None);
            }
            let (redis, pg) = match self.stack {
                Some(stack) => (stack.redis_commands().await, stack.pg_activity().await),
                None => (None, None),
            };
            let metrics = match self.server {
                Some(s) => scrape(s.addr).await,
                None => None,
            };
            (redis, metrics, pg)
        };
        sleep_until(from).await;
        let a = self.snapshot();
        let (redis_before, metrics_before, pg_before) = probe().await;
        sleep_until(end).await;
        let b = self.snapshot();
        let (redis_after, metrics_after, pg_after) = probe().await;
        let wall = b.at - a.at;
        let usage = Usage::between(
            wall,
            (a.server, b.server),
            (a.client, b.client),
            (a.db, b.db),
            (a.steal, b.steal),
        )
        .with_upstream_and_redis(wall, (a.upstream, b.upstream), (a.redis, b.redis));
        let mut profile = Profile {
            pg: pg_before.zip(pg_after).map(|(a, b)| (b.0 - a.0, b.1 - a.1)),
            ..Profile::default()
        };
        if let (Some(before), Some(after)) = (redis_before, redis_after) {
            // Less the bench's own INFO.
            profile.redis_commands = after
                .into_iter()
                .filter(|(name, _)| name != "info")
                .filter_map(|(name, (calls, _))| {
                    let was = before.get(&name).map_or(0, |c| c.0);
                    (calls > was).then(|| (name, calls - was))
                })
                .collect();
        }
        if let (Some(before), Some(after)) = (metrics_before, metrics_after) {
            for (key, name, labels) in SERVER_TIMINGS {
                let (Some((s0, n0)), Some((s1, n1))) = (
                    histogram(&before, name, labels),
                    histogram(&after, name, labels),
                ) else {
                    continue;
                };
                if n1 > n0 {
                    profile
                        .server_means_us
                        .insert(key.to_string(), (s1 - s0) / (n1 - n0) * 1e6);
                }
            }
        }
        (usage, profile)
    }
}

/// Runs a prepared scenario from `start`, with the scheduler's account of
/// the server (and the upstream behind it), the bench, PostgreSQL and
/// Redis over its measured window.
async fn execute(
    p: Prepared<'_>,
    start: Instant,
    stack: Option<&Stack>,
) -> anyhow::Result<Measured> {
    match p {
        Prepared::Rpc {
            plan,
            shape,
            server,
            callers,
            calls,
            upstream,
            steps,
            profile,
        } => {
            let watch = Watch {
                server,
                upstream,
                stack,
                redis_pid: stack.and_then(|s| s.redis_pid()),
                profile,
            };
            if !steps.is_empty() {
                return ladder(plan, shape, start, callers, calls, &steps, &watch).await;
            }
            let (from, end) = plan.window(start);
            let (outcome, (usage, profile)) = tokio::join!(
                load::run(plan, start, callers, calls),
                watch.over(from, end)
            );
            Ok(Measured {
                shape,
                outcome,
                usage,
                extras: Extras {
                    redis_commands: profile.redis_commands,
                    server_means_us: profile.server_means_us,
                    pg_activity: profile.pg,
                    ..Extras::default()
                },
            })
        }
        Prepared::Idle {
            mut shape,
            server,
            bearer,
            sessions,
            streams,
            call_timeout,
        } => {
            sleep_until(start).await;
            let (outcome, facts) = crate::idle::run(
                server.addr,
                server.pid(),
                bearer,
                sessions,
                streams,
                call_timeout,
            )
            .await?;
            // Streams opened per second of opening.
            shape.duration = facts.opening.max(Duration::from_millis(1));
            Ok(Measured {
                shape,
                outcome,
                usage: Usage::default(),
                extras: Extras {
                    idle: Some(facts),
                    ..Extras::default()
                },
            })
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
            Ok(Measured {
                shape,
                outcome: run.outcome,
                usage,
                extras: Extras::default(),
            })
        }
    }
}

/// Calls sent in the window ÷ the time from the window's start until the
/// last of them ended (at least the window): below the offered rate when
/// calls queued up.
pub fn achieved_rps(o: &Outcome, from: Instant, duration: Duration) -> f64 {
    let calls = o.ok + o.error_total();
    let took = o
        .last_done
        .map_or(duration, |t| t.saturating_duration_since(from))
        .max(duration);
    calls as f64 / took.as_secs_f64()
}

/// Runs a rate ladder: each step a warm-up and a window at its rate, in
/// order, until a step is not held twice in a row (a failed step is run
/// once more: the machine is noisy). The result is the highest step held,
/// or the first step when none was.
async fn ladder(
    plan: Plan,
    mut shape: Shape,
    start: Instant,
    callers: Vec<Caller>,
    calls: Vec<Call>,
    steps: &[f64],
    watch: &Watch<'_>,
) -> anyhow::Result<Measured> {
    let channels = callers
        .iter()
        .map(|c| match c {
            Caller::Grpc(ch) => Ok(ch.clone()),
            _ => Err(anyhow::anyhow!("rate ladders run over native gRPC only")),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    drop(callers);
    let mut done: Vec<RateStep> = Vec::new();
    let mut best: Option<(f64, Outcome, Usage)> = None;
    let mut first: Option<(f64, Outcome, Usage)> = None;
    let mut at = start;
    let mut i = 0;
    let mut retried = false;
    while let Some(&rate) = steps.get(i) {
        let plan = Plan {
            mode: Mode::Rate(rate),
            ..plan
        };
        let (from, end) = plan.window(at);
        let callers = channels.iter().map(|c| Caller::Grpc(c.clone())).collect();
        let (outcome, (usage, _)) = tokio::join!(
            load::run(plan, at, callers, calls.clone()),
            watch.over(from, end)
        );
        let achieved = achieved_rps(&outcome, from, plan.duration);
        let held = outcome.error_total() == 0 && achieved >= HELD_SHARE * rate;
        let us = |q: f64| outcome.latency.value_at_quantile(q) as f64 / 1000.0;
        eprintln!(
            "trellis-bench:   step {rate:>6.0} req/s: achieved {achieved:>7.0}/s  p50 {:>9.1} µs  p99 {:>9.1} µs  errors {}  {}",
            us(0.5),
            us(0.99),
            outcome.error_total(),
            if held { "held" } else { "not held" }
        );
        done.push(RateStep {
            offered_rps: rate,
            achieved_rps: achieved,
            calls: outcome.ok + outcome.error_total(),
            errors: outcome
                .errors
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            p50_us: us(0.5),
            p99_us: us(0.99),
            max_us: outcome.latency.max() as f64 / 1000.0,
            held,
            server_cpu_percent: usage.server_cpu,
            upstream_cpu_percent: usage.upstream_cpu,
            redis_cpu_percent: usage.redis_cpu,
            db_cpu_percent: usage.db_cpu,
            client_cpu_percent: usage.client_cpu,
        });
        if held {
            best = Some((rate, outcome, usage));
            i += 1;
            retried = false;
        } else {
            if first.is_none() && best.is_none() {
                first = Some((rate, outcome, usage));
            }
            if retried {
                break;
            }
            retried = true;
        }
        // A breath between steps, so that one's backlog is not the next's.
        at = Instant::now() + Duration::from_millis(250);
    }
    let held_rps = best.as_ref().map(|b| b.0);
    let (rate, outcome, usage) = best.or(first).context("the ladder ran no step")?;
    shape.rate = Some(rate);
    shape.load = format!(
        "{}; {}",
        shape.load,
        match held_rps {
            Some(h) => format!("highest held {h} req/s"),
            None => "no step held".to_string(),
        }
    );
    Ok(Measured {
        shape,
        outcome,
        usage,
        extras: Extras {
            steps: done,
            held_rps,
            ..Extras::default()
        },
    })
}

/// What a scenario's callers connect to.
enum Target<'a> {
    Addr(std::net::SocketAddr),
    Database(&'a str),
}

/// One caller per client task: native gRPC tasks share `connections`
/// HTTP/2 channels round-robin; gRPC-web, OpenAI and SQL tasks get a
/// connection each.
async fn connect(
    protocol: Protocol,
    target: Target<'_>,
    tasks: usize,
    connections: usize,
) -> anyhow::Result<Vec<Caller>> {
    let addr = match (&target, protocol) {
        (Target::Database(url), Protocol::Sql) => {
            let mut callers = Vec::new();
            for _ in 0..tasks {
                callers.push(Caller::Sql(crate::sql::SqlConn::connect(url).await?));
            }
            return Ok(callers);
        }
        (Target::Addr(addr), _) => *addr,
        (Target::Database(_), _) => anyhow::bail!("{} needs a server address", protocol.as_str()),
    };
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
                callers.push(Caller::GrpcWeb(calls::Http1Conn::connect(addr).await?));
            }
            Ok(callers)
        }
        Protocol::OpenAi => {
            let mut callers = Vec::new();
            for _ in 0..tasks {
                callers.push(Caller::OpenAi(calls::Http1Conn::connect(addr).await?));
            }
            Ok(callers)
        }
        Protocol::Sql => anyhow::bail!("SQL callers connect to the database"),
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
        let chat = ChatLoad {
            relay: fakellm::Script::SHORT,
            relay_streams: 100,
            sessions: 10,
            history: 0,
        };
        assert_eq!(
            plan_of(
                Load::RelayStreams,
                base,
                2,
                &LlmLoad {
                    rate: 1.0,
                    steps: Vec::new(),
                    step_warmup: Duration::ZERO,
                    step_duration: Duration::ZERO,
                },
                &chat
            )
            .tasks,
            100
        );
        let llm = LlmLoad {
            rate: 1000.0,
            steps: vec![1500.0, 3000.0],
            step_warmup: Duration::from_secs(1),
            step_duration: Duration::from_secs(4),
        };
        assert_eq!(plan_of(Load::Run, base, 2, &llm, &chat).tasks, 32);
        assert_eq!(plan_of(Load::PerCpu(2), base, 2, &llm, &chat).tasks, 4);
        assert_eq!(plan_of(Load::Tasks(1), base, 2, &llm, &chat).tasks, 1);
        let probe = plan_of(
            Load::Rate {
                rps: 200.0,
                tasks: 8,
            },
            base,
            2,
            &llm,
            &chat,
        );
        assert_eq!((probe.mode, probe.tasks), (Mode::Rate(200.0), 8));
        assert_eq!(probe.duration, base.duration, "same window as the run");
        assert_eq!(load_words(&probe), "200 req/s (8 tasks)");
        assert_eq!(
            load_words(&plan_of(Load::Tasks(1), base, 2, &llm, &chat)),
            "1 task"
        );
        let fixed = plan_of(Load::LlmRate { tasks: 16 }, base, 2, &llm, &chat);
        assert_eq!((fixed.mode, fixed.tasks), (Mode::Rate(1000.0), 16));
        assert_eq!(fixed.duration, base.duration);
        let steps = plan_of(Load::LlmSteps { tasks: 64 }, base, 2, &llm, &chat);
        assert_eq!((steps.mode, steps.tasks), (Mode::Rate(1500.0), 64));
        assert_eq!(
            (steps.warmup, steps.duration),
            (Duration::from_secs(1), Duration::from_secs(4))
        );
        assert_eq!(
            ladder_words(&llm.steps, &steps),
            "ladder 1500, 3000 req/s (64 tasks), 1 s warm-up + 4 s measured a step"
        );
    }

    #[test]
    fn reads_histogram_means() {
        let text = "# HELP x\n\
            trellis_grpc_request_duration_seconds_bucket{method=\"GenerateStream\",service=\"s\",le=\"0.001\"} 3\n\
            trellis_grpc_request_duration_seconds_sum{method=\"GenerateStream\",service=\"s\"} 0.5\n\
            trellis_grpc_request_duration_seconds_count{method=\"GenerateStream\",service=\"s\"} 250\n\
            trellis_grpc_request_duration_seconds_sum{method=\"GetInfo\",service=\"t\"} 9\n\
            trellis_grpc_request_duration_seconds_count{method=\"GetInfo\",service=\"t\"} 9\n";
        assert_eq!(
            histogram(
                text,
                "trellis_grpc_request_duration_seconds",
                &["method=\"GenerateStream\""]
            ),
            Some((0.5, 250.0))
        );
        assert_eq!(
            histogram(text, "trellis_grpc_request_duration_seconds", &[]),
            Some((9.5, 259.0))
        );
        assert_eq!(histogram(text, "nope", &[]), None);
    }

    #[test]
    fn achieved_rate_counts_the_backlog() {
        let from = Instant::now();
        let window = Duration::from_secs(4);
        let mut o = Outcome::new();
        o.ok = 4000;
        o.last_done = Some(from + Duration::from_millis(4002));
        assert!((achieved_rps(&o, from, window) - 4000.0 / 4.002).abs() < 1e-6);
        o.last_done = Some(from + Duration::from_secs(8));
        assert!((achieved_rps(&o, from, window) - 500.0).abs() < 1e-6);
        o.last_done = Some(from + Duration::from_secs(1));
        assert!((achieved_rps(&o, from, window) - 1000.0).abs() < 1e-6);
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
