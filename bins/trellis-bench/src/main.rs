//! `trellis-bench`: the side-by-side load generator and performance report.
//!
//! It starts the servers under test as child processes — a bare tonic
//! server (this binary's hidden `baseline-server`) and `trellisd serve` —
//! pins them to one CPU and itself to another, drives each scenario through
//! the generated tonic clients (or gRPC-web over HTTP/1.1), and writes
//! `<scenario>.json`, `summary.md` and `summary.svg` to `--out`
//! (`bench-results/`). Each scenario is held to a target relative to a
//! reference scenario from the same run.
//!
//! `--quick` is a few-second smoke run for CI, on any build: it checks that
//! every scenario ran cleanly (calls made, no errors, percentiles in order),
//! not how fast. Full runs make the same checks; missed targets are
//! reported, not failed.

mod baseline;
mod calls;
mod load;
mod report;
mod scenario;
mod servers;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use prost::Message;
use tokio::time::{Instant, sleep_until};

use crate::calls::{Caller, Protocol, WebConn};
use crate::load::{Mode, Outcome, Plan};
use crate::report::{RunInfo, ScenarioResult};
use crate::scenario::Scenario;
use crate::servers::{SchedStat, ServerKind, Servers};

#[derive(Parser, Debug)]
#[command(
    name = "trellis-bench",
    version,
    about = "Load generator and performance report: trellisd against a bare tonic baseline",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The bare tonic reference server (started by the bench itself).
    #[command(hide = true)]
    BaselineServer(baseline::BaselineArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Smoke run of a few seconds for CI: short, light, checks sanity only.
    #[arg(long)]
    quick: bool,
    /// Scenarios to run, comma-separated (default: all); the references
    /// they are compared against run too.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "NAME",
        value_parser = clap::builder::PossibleValuesParser::new(scenario::SCENARIOS.iter().map(|s| s.name)),
    )]
    scenario: Vec<String>,
    /// Measured seconds per scenario [default: 10; --quick: 1.5].
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Warm-up seconds per scenario, not recorded [default: 2; --quick: 0.5].
    #[arg(long, value_name = "SECS")]
    warmup: Option<f64>,
    /// Client tasks [default: 32; --quick: 4].
    #[arg(long, short = 'c', value_name = "N")]
    concurrency: Option<usize>,
    /// Fixed-rate (open-loop) mode: this many requests/s in total, spread
    /// over the client tasks, latency counted from each request's intended
    /// send time. Without it, each task calls in a closed loop.
    #[arg(long, value_name = "RPS")]
    rate: Option<f64>,
    /// HTTP/2 connections the native gRPC tasks share (gRPC-web always uses
    /// one HTTP/1.1 connection per task).
    #[arg(long, default_value_t = 1, value_name = "N")]
    connections: usize,
    /// Output directory.
    #[arg(long, default_value = "bench-results", value_name = "DIR")]
    out: PathBuf,
    /// The trellisd binary [default: next to this executable; under
    /// `cargo run` it is built first].
    #[arg(long, value_name = "PATH")]
    trellisd: Option<PathBuf>,
    /// Do not pin servers and bench to separate CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Seconds before an unanswered call counts as DEADLINE_EXCEEDED.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    call_timeout: f64,
}

/// How long a server may take to answer its first GetInfo.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::BaselineServer(args)) = cli.command {
        return baseline::main(args);
    }
    match bench(cli.run) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("trellis-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn secs(name: &str, v: f64, min: f64) -> anyhow::Result<Duration> {
    if !v.is_finite() || v < min {
        bail!("--{name} must be a number of seconds ≥ {min}");
    }
    Ok(Duration::from_secs_f64(v))
}

fn plan_for(args: &RunArgs) -> anyhow::Result<Plan> {
    let (duration, warmup, tasks) = if args.quick {
        (1.5, 0.5, 4)
    } else {
        (10.0, 2.0, 32)
    };
    let tasks = args.concurrency.unwrap_or(tasks);
    if tasks == 0 || args.connections == 0 {
        bail!("--concurrency and --connections must be at least 1");
    }
    let mode = match args.rate {
        Some(r) if r.is_finite() && r > 0.0 => Mode::Rate(r),
        Some(_) => bail!("--rate must be a positive number of requests/s"),
        None => Mode::Concurrency,
    };
    Ok(Plan {
        mode,
        tasks,
        warmup: secs("warmup", args.warmup.unwrap_or(warmup), 0.0)?,
        duration: secs("duration", args.duration.unwrap_or(duration), 0.1)?,
        call_timeout: secs("call-timeout", args.call_timeout, 0.001)?,
    })
}

/// Runs the bench; `Ok(false)` when a scenario's output is not sane.
fn bench(args: RunArgs) -> anyhow::Result<bool> {
    let plan = plan_for(&args)?;
    let scenarios = scenario::select(&args.scenario)?;
    let trellisd = if scenarios.iter().any(|s| s.server == ServerKind::Trellisd) {
        Some(servers::find_trellisd(args.trellisd.clone())?)
    } else {
        None
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;

    let cpus = servers::allowed_cpus();
    let machine = machine_text(&cpus);
    let pins = match cpus.as_slice() {
        [server, client, ..] if !args.no_pin => Some(Pins {
            server: *server,
            client: *client,
        }),
        _ => None,
    };
    // Before the runtime exists, so all of its threads inherit the pin.
    if let Some(p) = pins {
        servers::pin_current_thread(p.client)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;

    let mut running = Servers::default();
    let result = runtime.block_on(async {
        tokio::select! {
            r = run(&args, plan, &scenarios, trellisd.as_deref(), pins, &mut running) => r,
            () = interrupted() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    let pinned_to = running
        .running
        .values()
        .map(|p| {
            format!(
                "{} {}",
                p.kind.as_str(),
                cpu_list(&servers::cpus_of(p.pid()))
            )
        })
        .collect::<Vec<_>>();
    drop(running);
    let (results, payload) = result?;

    let cores = match pins {
        Some(p) => format!(
            "the servers are pinned to CPU {} (trellisd and the baseline server share it, \
             each idle while the other is measured), the bench client to CPU {} \
             (checked: {}, bench {}).",
            p.server,
            p.client,
            pinned_to.join(", "),
            cpu_list(&servers::allowed_cpus())
        ),
        None => format!(
            "not pinned ({}): servers and bench client share CPUs {}.",
            if args.no_pin {
                "--no-pin"
            } else {
                "fewer than 2 CPUs available"
            },
            cpu_list(&cpus)
        ),
    };
    let info = RunInfo {
        date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        quick: args.quick,
        profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        load: load_text(&plan, args.connections),
        cores,
        machine,
        payload,
    };
    report::write_all(&args.out, &info, &results)?;
    println!("{}", report::markdown(&info, &results));

    let problems = sanity(&scenarios, &results);
    for p in &problems {
        eprintln!("trellis-bench: FAILED: {p}");
    }
    eprintln!(
        "trellis-bench: results in {}/ (summary.md, summary.svg, <scenario>.json)",
        args.out.display()
    );
    if problems.is_empty() && args.quick {
        eprintln!(
            "trellis-bench: quick: OK ({} scenarios ran cleanly)",
            results.len()
        );
    }
    Ok(problems.is_empty())
}

#[derive(Debug, Clone, Copy)]
struct Pins {
    server: usize,
    client: usize,
}

/// Resolves on SIGINT or SIGTERM, so the children are killed on the way out.
async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Starts the servers, runs every scenario in order, and returns the
/// results and a line on the response payloads.
async fn run(
    args: &RunArgs,
    plan: Plan,
    scenarios: &[&'static Scenario],
    trellisd: Option<&Path>,
    pins: Option<Pins>,
    running: &mut Servers,
) -> anyhow::Result<(Vec<ScenarioResult>, String)> {
    let server_cpu = pins.map(|p| p.server);
    // trellisd first: the baseline server reports the same service lists, so
    // both answer GetInfo with a payload of the same size.
    let mut services = vec![trellis_proto::system::v1::SERVICE_NAME.to_string()];
    let mut enabled = vec!["system".to_string()];
    let mut sizes = BTreeMap::new();
    if let Some(path) = trellisd {
        let mut p = servers::start_trellisd(path, server_cpu, &args.out)?;
        let info = p.wait_ready(READY_TIMEOUT).await?;
        sizes.insert(ServerKind::Trellisd, info.encoded_len());
        services = info.services;
        enabled = info.enabled_services;
        running.running.insert(ServerKind::Trellisd, p);
    }
    if scenarios.iter().any(|s| s.server == ServerKind::Baseline) {
        let mut p = servers::start_baseline(server_cpu, &services, &enabled)?;
        let info = p.wait_ready(READY_TIMEOUT).await?;
        sizes.insert(ServerKind::Baseline, info.encoded_len());
        running.running.insert(ServerKind::Baseline, p);
    }
    let payload = sizes
        .iter()
        .map(|(k, n)| format!("{} answers GetInfo with {n} bytes", k.as_str()))
        .collect::<Vec<_>>()
        .join("; ");

    let mut results: Vec<ScenarioResult> = Vec::new();
    for s in scenarios {
        let server = running.get(s.server)?;
        let callers = connect(s.protocol, server.addr, plan.tasks, args.connections)
            .await
            .with_context(|| format!("{}: connecting", s.name))?;
        // Starts once every task is ready to go.
        let start = Instant::now() + Duration::from_millis(20);
        let (from, end) = plan.window(start);
        // The scheduler's account of both processes over the measured window.
        let usage = async {
            sleep_until(from).await;
            let before = (
                Instant::now(),
                server.sched_stat(),
                servers::sched_stat("self"),
            );
            sleep_until(end).await;
            let after = (
                Instant::now(),
                server.sched_stat(),
                servers::sched_stat("self"),
            );
            Usage::between(after.0 - before.0, (before.1, after.1), (before.2, after.2))
        };
        let (outcome, usage) = tokio::join!(load::run(plan, start, callers, s.rpc), usage);
        let r = result(
            s,
            &plan,
            args.connections,
            &outcome,
            &results,
            usage,
            sizes.get(&s.server).copied().unwrap_or(0),
        );
        eprintln!(
            "trellis-bench: {:<10} {:>9.0} req/s  p50 {:>8.1} µs  p99 {:>8.1} µs  max {:>9.1} µs  errors {}",
            r.scenario,
            r.rps,
            r.p50_us,
            r.p99_us,
            r.max_us,
            r.error_total()
        );
        results.push(r);
    }
    Ok((results, payload))
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
            for _ in 0..connections {
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
                callers.push(Caller::GrpcWeb(WebConn::connect(addr).await?));
            }
            Ok(callers)
        }
    }
}

/// CPU use over a measured window, in % of one CPU.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    server_cpu: Option<f64>,
    server_wait: Option<f64>,
    client_cpu: Option<f64>,
    client_wait: Option<f64>,
    /// Server CPU time over the window, in µs.
    server_cpu_us: Option<f64>,
}

impl Usage {
    fn between(
        wall: Duration,
        server: (Option<SchedStat>, Option<SchedStat>),
        client: (Option<SchedStat>, Option<SchedStat>),
    ) -> Usage {
        let wall = wall.as_secs_f64();
        let pct = |a: Option<Duration>, b: Option<Duration>| {
            Some(b?.saturating_sub(a?).as_secs_f64() / wall * 100.0)
        };
        Usage {
            server_cpu: pct(server.0.map(|s| s.on_cpu), server.1.map(|s| s.on_cpu)),
            server_wait: pct(server.0.map(|s| s.waiting), server.1.map(|s| s.waiting)),
            client_cpu: pct(client.0.map(|s| s.on_cpu), client.1.map(|s| s.on_cpu)),
            client_wait: pct(client.0.map(|s| s.waiting), client.1.map(|s| s.waiting)),
            server_cpu_us: server
                .0
                .zip(server.1)
                .map(|(a, b)| b.on_cpu.saturating_sub(a.on_cpu).as_secs_f64() * 1e6),
        }
    }
}

fn result(
    s: &Scenario,
    plan: &Plan,
    connections: usize,
    o: &Outcome,
    earlier: &[ScenarioResult],
    usage: Usage,
    response_bytes: usize,
) -> ScenarioResult {
    let us = |q: f64| o.latency.value_at_quantile(q) as f64 / 1000.0;
    let rps = o.ok as f64 / plan.duration.as_secs_f64();
    let p99_us = us(0.99);
    let reference = s
        .target
        .and_then(|t| earlier.iter().find(|r| r.scenario == t.reference));
    let rps_ratio = reference.map(|r| rps / r.rps);
    let p99_ratio = reference.map(|r| p99_us / r.p99_us);
    let met = match (s.target, rps_ratio, p99_ratio) {
        (None, ..) => true,
        (Some(t), Some(rps), Some(p99)) => t.met(rps, p99),
        (Some(_), ..) => false,
    };
    ScenarioResult {
        scenario: s.name.to_string(),
        about: s.about.to_string(),
        server: s.server.as_str().to_string(),
        protocol: s.protocol.as_str().to_string(),
        mode: match plan.mode {
            Mode::Concurrency => "concurrency",
            Mode::Rate(_) => "rate",
        }
        .to_string(),
        concurrency: plan.tasks,
        rate: match plan.mode {
            Mode::Concurrency => None,
            Mode::Rate(r) => Some(r),
        },
        connections: match s.protocol {
            Protocol::Grpc => connections.min(plan.tasks),
            Protocol::GrpcWeb => plan.tasks,
        },
        warmup_s: plan.warmup.as_secs_f64(),
        duration_s: plan.duration.as_secs_f64(),
        requests: o.ok + o.error_total(),
        rps,
        p50_us: us(0.50),
        p90_us: us(0.90),
        p99_us,
        max_us: o.latency.max() as f64 / 1000.0,
        mean_us: o.latency.mean() / 1000.0,
        errors: o.errors.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        reference: s.target.map(|t| t.reference.to_string()),
        rps_ratio,
        p99_ratio,
        target: s
            .target
            .map_or_else(|| "— (reference)".to_string(), |t| t.text()),
        target_rps_ratio: s.target.map(|t| t.min_rps_ratio),
        target_p99_ratio: s.target.and_then(|t| t.max_p99_ratio),
        met,
        server_cpu_percent: usage.server_cpu,
        server_wait_percent: usage.server_wait,
        server_cpu_us_per_call: usage
            .server_cpu_us
            .filter(|_| o.ok > 0)
            .map(|us| us / (o.ok + o.error_total()) as f64),
        client_cpu_percent: usage.client_cpu,
        client_wait_percent: usage.client_wait,
        response_bytes,
    }
}

/// What makes a run unusable, whatever the speed: a scenario missing, no
/// calls, errors, percentiles out of order.
fn sanity(scenarios: &[&Scenario], results: &[ScenarioResult]) -> Vec<String> {
    let mut problems = Vec::new();
    for s in scenarios {
        let Some(r) = results.iter().find(|r| r.scenario == s.name) else {
            problems.push(format!("{}: did not run", s.name));
            continue;
        };
        if r.requests == 0 || r.rps <= 0.0 || !r.rps.is_finite() {
            problems.push(format!("{}: no successful calls", r.scenario));
        }
        if r.error_total() > 0 {
            problems.push(format!("{}: errors {:?}", r.scenario, r.errors));
        }
        let ordered = [r.p50_us, r.p90_us, r.p99_us, r.max_us];
        if ordered[0] <= 0.0 || ordered.windows(2).any(|w| w[0] > w[1]) {
            problems.push(format!(
                "{}: percentiles out of order (p50 {}, p90 {}, p99 {}, max {})",
                r.scenario, r.p50_us, r.p90_us, r.p99_us, r.max_us
            ));
        }
    }
    problems
}

fn load_text(plan: &Plan, connections: usize) -> String {
    let how = match plan.mode {
        Mode::Concurrency => format!("fixed concurrency, {} client tasks", plan.tasks),
        Mode::Rate(r) => format!(
            "fixed rate, {r} req/s over {} client tasks (open loop, latency from the intended send time)",
            plan.tasks
        ),
    };
    format!(
        "{how}; native gRPC over {} shared HTTP/2 connection{}, gRPC-web over one HTTP/1.1 \
         connection per task · {} s warm-up + {} s measured per scenario",
        connections.min(plan.tasks),
        if connections.min(plan.tasks) == 1 {
            ""
        } else {
            "s"
        },
        plan.warmup.as_secs_f64(),
        plan.duration.as_secs_f64()
    )
}

fn cpu_list(cpus: &[usize]) -> String {
    format!(
        "CPU{} {}",
        if cpus.len() == 1 { "" } else { "s" },
        cpus.iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(",")
    )
}

fn machine_text(cpus: &[usize]) -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".to_string());
    format!(
        "nproc {} ({}), {model}, Linux {kernel} {}; load average before the run {load}",
        cpus.len(),
        cpu_list(cpus),
        std::env::consts::ARCH
    )
}
