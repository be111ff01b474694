//! `trellis-bench`: the side-by-side load generator and performance report.
//!
//! It starts the servers under test as child processes — a bare tonic
//! server (this binary's hidden `baseline-server`), a bare GetUser server on
//! tokio-postgres (hidden `user-server`), a fake OpenAI-compatible LLM
//! upstream (hidden `fake-llm`) and `trellisd serve` — and, for the
//! scenarios that need data, private PostgreSQL and Redis. It pins the
//! servers (and the database) to one CPU and itself to another, seeds what
//! each scenario needs, drives the scenarios through the generated tonic
//! clients (or gRPC-web over HTTP/1.1) or hashes with argon2 in process, and
//! writes `<scenario>.json`, `summary.md` and `summary.svg` to `--out`
//! (`bench-results/`). Each scenario is held to a target relative to a
//! reference scenario from the same run.
//!
//! Besides bare servers, references are the same work done directly:
//! chat-completions posted to the fake upstream (with the body trellisd's
//! chat sent it), trellisd's search SQL run by the bench on PostgreSQL.
//!
//! `--quick` is a smoke run for CI, on any build: it runs every scenario,
//! small (short windows, 2,000 users, 3,000 documents, 20 relay streams,
//! 200 idle streams, argon2 memory lowered) and checks that
//! each ran cleanly (calls made, no errors, percentiles in order), not how
//! fast. Full runs make the same checks; missed targets are reported, not
//! failed.

mod baseline;
mod calls;
mod fakellm;
mod hashrate;
mod idle;
mod load;
mod measure;
mod notes;
mod report;
mod run;
mod scenario;
mod seed;
mod servers;
mod sql;
mod stack;
mod userserver;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

use crate::load::{Mode, Plan};
use crate::report::RunInfo;
use crate::servers::{ServerKind, Servers};

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
    /// The bare GetUser reference server (started by the bench itself).
    #[command(hide = true)]
    UserServer(userserver::UserServerArgs),
    /// The fake OpenAI-compatible LLM upstream (started by the bench itself).
    #[command(hide = true)]
    FakeLlm(fakellm::FakeLlmArgs),
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Smoke run for CI: every scenario, short and small (argon2 memory
    /// lowered), checks sanity only.
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
    /// Client tasks of the throughput scenarios [default: 32; --quick: 4].
    /// login (2 per CPU), the probes and the list scenarios have fixed loads.
    #[arg(long, short = 'c', value_name = "N")]
    concurrency: Option<usize>,
    /// Fixed-rate (open-loop) mode for the throughput scenarios: this many
    /// requests/s in total, spread over the client tasks, latency counted
    /// from each request's intended send time. Without it, each task calls
    /// in a closed loop.
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
    /// Fixed rate of llm-direct and llm-gateway, requests/s [default:
    /// 1000; --quick: 100].
    #[arg(long, value_name = "RPS")]
    llm_rate: Option<f64>,
    /// llm-max-rate's ladder of rates, requests/s, comma-separated, run in
    /// order, 1 s warm-up + 4 s measured each (--quick: 0.5 + 1) [default:
    /// 1000,1500,2000,2500,3000,4000,5000,6000,8000; --quick: 100,200].
    #[arg(long, value_delimiter = ',', value_name = "RPS,…")]
    llm_steps: Vec<f64>,
    /// Converse streams streams-idle holds open at once [default: 10000;
    /// --quick: 200].
    #[arg(long, value_name = "N")]
    idle_streams: Option<usize>,
}

/// Lifts this process's open-file limit to its hard limit: streams-idle
/// holds many connections, and the servers started after this inherit it.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::BaselineServer(args)) => return baseline::main(args),
        Some(Command::UserServer(args)) => return userserver::main(args),
        Some(Command::FakeLlm(args)) => return fakellm::main(args),
        None => {}
    }
    raise_fd_limit();
    match bench(cli.run) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("trellis-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn secs(name: &str, v: f64, min: f64) -> anyhow::Result<std::time::Duration> {
    if !v.is_finite() || v < min {
        bail!("--{name} must be a number of seconds ≥ {min}");
    }
    Ok(std::time::Duration::from_secs_f64(v))
}

/// The LLM scenarios' rate and ladder.
fn llm_for(args: &RunArgs) -> anyhow::Result<run::LlmLoad> {
    let rate = args
        .llm_rate
        .unwrap_or(if args.quick { 100.0 } else { 1000.0 });
    if !rate.is_finite() || rate <= 0.0 {
        bail!("--llm-rate must be a positive number of requests/s");
    }
    let steps = if args.llm_steps.is_empty() {
        if args.quick {
            vec![100.0, 200.0]
        } else {
            vec![
                1000.0, 1500.0, 2000.0, 2500.0, 3000.0, 4000.0, 5000.0, 6000.0, 8000.0,
            ]
        }
    } else {
        args.llm_steps.clone()
    };
    if steps.iter().any(|r| !r.is_finite() || *r <= 0.0) {
        bail!("--llm-steps must be positive numbers of requests/s");
    }
    let (warmup, duration) = if args.quick { (0.5, 1.0) } else { (1.0, 4.0) };
    Ok(run::LlmLoad {
        rate,
        steps,
        step_warmup: std::time::Duration::from_secs_f64(warmup),
        step_duration: std::time::Duration::from_secs_f64(duration),
    })
}

/// The chat scenarios' loads: chat-relay's 100 streams (--quick: 20) of
/// 200 tokens paced 5 ms apart (--quick: 50, 10 ms apart), and the pool of
/// sessions every turn takes a fresh one from, beside 100,000 messages
/// (--quick: 5,000) of the member's earlier conversations.
fn chat_for(args: &RunArgs) -> run::ChatLoad {
    let (chunks, interval_ms, streams, sessions, history) = if args.quick {
        (50, 10, 20, 3_000, 5_000)
    } else {
        (200, 5, 100, 30_000, 100_000)
    };
    run::ChatLoad {
        relay: fakellm::Script {
            chunks,
            interval: Some(std::time::Duration::from_millis(interval_ms)),
        },
        relay_streams: streams,
        sessions,
        history,
    }
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
    let llm = llm_for(&args)?;
    let scenarios = scenario::select(&args.scenario)?;
    let trellisd = if scenarios
        .iter()
        .any(|s| s.server() == Some(ServerKind::Trellisd) || s.needs_store())
    {
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
    let ctx = run::Ctx {
        args: &args,
        plan,
        pins,
        cpus: cpus.len(),
        llm,
        chat: chat_for(&args),
    };
    let result = runtime.block_on(async {
        tokio::select! {
            r = run::run(&ctx, &scenarios, trellisd.as_deref(), &mut running) => r,
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
    let stack_at = running.stack.as_ref().map(|s| s.placement());
    let fake_llm = running.running.contains_key(&ServerKind::FakeLlm);
    drop(running);
    let outputs = result?;

    let cores = match pins {
        Some(p) => format!(
            "the servers are pinned to CPU {} (trellisd and the reference servers share it, \
             each idle while another is measured{}{}), the bench client to CPU {} \
             (checked: {}{}, bench {}).",
            p.server,
            if fake_llm {
                " — except the fake LLM upstream, which answers trellisd's upstream calls \
                 during llm-gateway, llm-max-rate, the chat scenarios and streams-idle"
            } else {
                ""
            },
            if stack_at.is_some() {
                "; PostgreSQL and Redis are pinned there too, and argon2-raw hashes there"
            } else {
                ""
            },
            p.client,
            pinned_to.join(", "),
            stack_at.map(|s| format!(", {s}")).unwrap_or_default(),
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
        payload: outputs.payload,
        notes: outputs.notes,
    };
    let results = &outputs.results;
    report::write_all(&args.out, &info, results)?;
    println!("{}", report::markdown(&info, results));

    let mut problems = measure::sanity(&scenarios, results);
    for f in &outputs.floods {
        if f.errors > 0 || f.rps <= 0.0 {
            problems.push(format!(
                "{}: the {} load under it failed ({:.1}/s, {} errors)",
                f.during, f.load, f.rps, f.errors
            ));
        }
    }
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

/// The CPUs servers and bench are pinned to.
#[derive(Debug, Clone, Copy)]
pub struct Pins {
    pub server: usize,
    pub client: usize,
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

fn load_text(plan: &Plan, connections: usize) -> String {
    let how = match plan.mode {
        Mode::Concurrency => format!("fixed concurrency, {} client tasks", plan.tasks),
        Mode::Rate(r) => format!(
            "fixed rate, {r} req/s over {} client tasks (open loop, latency from the intended send time)",
            plan.tasks
        ),
    };
    format!(
        "throughput scenarios: {how}; native gRPC over {} shared HTTP/2 connection{}, gRPC-web \
         over one HTTP/1.1 connection per task · {} s warm-up + {} s measured per scenario \
         (each scenario's own load is in the second table)",
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

/// `CPU 0` / `CPUs 0,1`.
pub fn cpu_list(cpus: &[usize]) -> String {
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
