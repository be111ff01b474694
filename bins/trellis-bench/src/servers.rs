//! The servers under test as child processes: the bare tonic baseline (this
//! binary re-executed as `baseline-server`), the bare GetUser server
//! (`user-server`), the fake OpenAI-compatible upstream (`fake-llm`) and
//! `trellisd serve`. Finding and (under `cargo run`)
//! building trellisd, CPU pinning, readiness, CPU-time accounting, and
//! killing the children however the bench ends.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;
use tokio::time::Instant;
use trellis_proto::system::v1::GetInfoRequest;
use trellis_proto::system::v1::GetInfoResponse;
use trellis_proto::system::v1::system_service_client::SystemServiceClient;

use crate::calls::{self, Call, Req};
use crate::fakellm;
use crate::stack::Stack;

/// Which server a scenario runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ServerKind {
    /// This binary's `baseline-server`: tonic with no layers.
    Baseline,
    /// `trellisd serve`: the full mesh.
    Trellisd,
    /// This binary's `user-server`: GetUser straight on tokio-postgres,
    /// a connection per call from a pool.
    UserRaw,
    /// The same with `--multiplexed`: a few shared connections, queries
    /// pipelined (as trellisd's GetUser).
    UserRawMux,
    /// This binary's `fake-llm`: an OpenAI-compatible chat-completions
    /// upstream answering SSE at once.
    FakeLlm,
    /// The data stack's PostgreSQL itself, called with SQL by the bench
    /// (the search references): no process of the bench's own.
    Postgres,
}

impl ServerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerKind::Baseline => "baseline-server",
            ServerKind::Trellisd => "trellisd",
            ServerKind::UserRaw => "user-server",
            ServerKind::UserRawMux => "user-server-mux",
            ServerKind::FakeLlm => "fake-llm",
            ServerKind::Postgres => "postgres",
        }
    }
}

/// CPUs the calling thread may run on.
pub fn allowed_cpus() -> Vec<usize> {
    let Ok(set) = sched_getaffinity(Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect()
}

/// CPUs process (or thread) `pid` may run on.
pub fn cpus_of(pid: u32) -> Vec<usize> {
    let Ok(set) = sched_getaffinity(Pid::from_raw(pid as i32)) else {
        return Vec::new();
    };
    (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect()
}

/// Restricts the calling thread (and threads and processes it creates
/// from now on) to `cpu`.
pub fn pin_current_thread(cpu: usize) -> anyhow::Result<()> {
    pin_current_thread_to(&[cpu])
}

/// Restricts the calling thread (and threads and processes it creates
/// from now on) to `cpus`.
pub fn pin_current_thread_to(cpus: &[usize]) -> anyhow::Result<()> {
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu)?;
    }
    sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("pinning to CPUs {cpus:?}"))
}

/// A process as `/proc/PID/stat` describes it.
#[derive(Debug, Clone)]
pub struct ProcInfo {
    pub pid: u32,
    pub comm: String,
    pub ppid: u32,
}

/// Every process visible in `/proc`.
pub fn processes() -> Vec<ProcInfo> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
            let (head, rest) = stat.rsplit_once(')')?;
            let comm = head.split_once('(')?.1.to_string();
            let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
            Some(ProcInfo { pid, comm, ppid })
        })
        .collect()
}

/// [`SchedStat`] summed over process `root` and its children (PostgreSQL's
/// backends each start a session of their own, so a process group would
/// not hold them).
pub fn family_sched_stat(root: u32) -> Option<SchedStat> {
    let mut total = SchedStat::default();
    let mut any = false;
    for p in processes()
        .into_iter()
        .filter(|p| p.pid == root || p.ppid == root)
    {
        if let Some(s) = sched_stat(&p.pid.to_string()) {
            total.on_cpu += s.on_cpu;
            total.waiting += s.waiting;
            total.minor_faults += s.minor_faults;
            any = true;
        }
    }
    any.then_some(total)
}

/// The scheduler's account of a process, summed over its threads.
#[derive(Debug, Clone, Copy, Default)]
pub struct SchedStat {
    /// Time running on a CPU.
    pub on_cpu: Duration,
    /// Time runnable but waiting for a CPU (someone else had it).
    pub waiting: Duration,
    /// Minor page faults (memory mapped fresh, e.g. a large allocation
    /// touched for the first time).
    pub minor_faults: u64,
}

/// CPU time the hypervisor gave to others while this VM's CPUs wanted it
/// ("steal"), summed over every CPU, from `/proc/stat`. Zero on bare metal.
pub fn steal() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    // The first line sums every CPU: `cpu user nice system idle iowait irq
    // softirq steal …`, in USER_HZ ticks (100 a second on Linux).
    let ticks: u64 = stat
        .lines()
        .next()?
        .split_whitespace()
        .nth(8)?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// The minor page faults in a `/proc/…/stat` line (field 10).
pub fn minor_faults(stat: &str) -> Option<u64> {
    // After `pid (comm)`: state is field 3, minflt field 10.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(7)?
        .parse()
        .ok()
}

/// [`SchedStat`] of process `pid` ("self" for this one), from
/// `/proc/PID/task/*/schedstat`.
pub fn sched_stat(pid: &str) -> Option<SchedStat> {
    let mut total = SchedStat::default();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        // A thread that ended since the directory was listed (a blocking
        // pool thread, a test's thread) is skipped, not the whole reading.
        let Some(stat) = task
            .ok()
            .and_then(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        else {
            continue;
        };
        let mut fields = stat.split_whitespace().map(|f| f.parse::<u64>().ok());
        total.on_cpu += Duration::from_nanos(fields.next()??);
        total.waiting += Duration::from_nanos(fields.next()??);
    }
    // The process's own line counts every thread's faults.
    total.minor_faults = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| minor_faults(&s))
        .unwrap_or(0);
    Some(total)
}

/// The trellisd binary: `explicit`, or the one next to this executable.
/// Under `cargo run` it is built (or found up to date) first with the same
/// profile, so the bench never measures a stale server.
pub fn find_trellisd(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        if !path.is_file() {
            bail!("--trellisd {}: no such file", path.display());
        }
        return Ok(path);
    }
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .context("the bench executable has no directory")?;
    let path = dir.join("trellisd");
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_string(),
        Some(other) => other.to_string(),
        None => "dev".to_string(),
    };
    if let (Some(cargo), Some(manifest_dir)) = (
        std::env::var_os("CARGO"),
        std::env::var_os("CARGO_MANIFEST_DIR"),
    ) {
        eprintln!("trellis-bench: cargo build -p trellisd --profile {profile}");
        let status = Command::new(cargo)
            .args(["build", "-p", "trellisd", "--profile", &profile])
            .current_dir(manifest_dir)
            .status()
            .context("running cargo build -p trellisd")?;
        if !status.success() {
            bail!("cargo build -p trellisd --profile {profile} failed ({status})");
        }
    }
    if !path.is_file() {
        bail!(
            "{} not found: build it (cargo build -p trellisd --profile {profile}) or pass --trellisd PATH",
            path.display()
        );
    }
    Ok(path)
}

/// A running server process; killed when dropped (the bench returning,
/// failing or panicking).
pub struct ServerProcess {
    pub kind: ServerKind,
    pub addr: SocketAddr,
    pub command: String,
    child: Child,
    // Held open: the baseline server exits when it closes, so it does not
    // outlive a bench that was killed outright.
    _stdin: Option<ChildStdin>,
}

impl ServerProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn sched_stat(&self) -> Option<SchedStat> {
        sched_stat(&self.pid().to_string())
    }

    /// Polls GetInfo until it answers; fails if the process exits first or
    /// `within` passes. The user server does not serve GetInfo: its
    /// UNIMPLEMENTED answer means ready, and there is no info. The fake LLM
    /// upstream is ready when it answers a chat completion that passes the
    /// bench's check.
    pub async fn wait_ready(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<Option<GetInfoResponse>> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited before it was ready ({status}); its stderr is above",
                    self.command
                );
            }
            let kind = self.kind;
            let attempt = tokio::time::timeout(Duration::from_secs(2), async {
                if kind == ServerKind::FakeLlm {
                    let mut conn = calls::Http1Conn::connect(self.addr).await?;
                    let call =
                        Call::new(Req::ChatCompletions(crate::calls::Upstream::llm_direct()));
                    conn.chat(&call)
                        .await
                        .map_err(|code| anyhow::anyhow!("fake-llm answered {code:?}"))?;
                    return anyhow::Ok(None);
                }
                let channel = calls::grpc_channel(self.addr).await?;
                match SystemServiceClient::new(channel)
                    .get_info(GetInfoRequest {})
                    .await
                {
                    Ok(resp) => Ok(Some(resp.into_inner())),
                    Err(s)
                        if matches!(kind, ServerKind::UserRaw | ServerKind::UserRawMux)
                            && s.code() == tonic::Code::Unimplemented =>
                    {
                        Ok(None)
                    }
                    Err(s) => Err(s.into()),
                }
            })
            .await;
            match attempt {
                Ok(Ok(info)) => return Ok(info),
                _ if Instant::now() >= deadline => {
                    bail!("{} did not answer GetInfo within {within:?}", self.command)
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An unused loopback port. Another process could take it before the
/// server binds it; the server then fails to start and the bench says so.
fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Spawns `cmd` from a helper thread pinned to `cpu`: a child inherits the
/// affinity of the thread that starts it, so every thread of the server is
/// on `cpu` from its first instruction.
fn spawn_on(cmd: &mut Command, cpu: Option<usize>) -> anyhow::Result<Child> {
    let Some(cpu) = cpu else {
        return Ok(cmd.spawn()?);
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            pin_current_thread(cpu)?;
            anyhow::Ok(cmd.spawn()?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("spawning thread panicked"))?
    })
}

/// Starts the bare tonic server. `services` and `enabled` are what its
/// GetInfo reports, so its response is the same size as trellisd's.
pub fn start_baseline(
    cpu: Option<usize>,
    services: &[String],
    enabled: &[String],
) -> anyhow::Result<ServerProcess> {
    let addr = free_addr()?;
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(&exe);
    cmd.arg("baseline-server")
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--services")
        .arg(services.join(","))
        .arg("--enabled")
        .arg(enabled.join(","))
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    let mut child = spawn_on(&mut cmd, cpu).context("starting the baseline server")?;
    let stdin = child.stdin.take();
    Ok(ServerProcess {
        kind: ServerKind::Baseline,
        addr,
        command: format!("{} baseline-server --listen {addr}", exe.display()),
        child,
        _stdin: stdin,
    })
}

/// Starts the bare GetUser server on the database at `database_url`:
/// pooled (`connections`), or multiplexed when `connections` is None.
pub fn start_user_server(
    cpu: Option<usize>,
    database_url: &str,
    connections: Option<usize>,
) -> anyhow::Result<ServerProcess> {
    let addr = free_addr()?;
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(&exe);
    cmd.arg("user-server").arg("--listen").arg(addr.to_string());
    let (kind, how) = match connections {
        Some(n) => {
            cmd.arg("--connections").arg(n.to_string());
            (ServerKind::UserRaw, format!("--connections {n}"))
        }
        None => {
            cmd.arg("--multiplexed");
            (ServerKind::UserRawMux, "--multiplexed".to_string())
        }
    };
    cmd.env("TRELLIS_BENCH_DATABASE_URL", database_url)
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    let mut child = spawn_on(&mut cmd, cpu).context("starting the user server")?;
    let stdin = child.stdin.take();
    Ok(ServerProcess {
        kind,
        addr,
        command: format!("{} user-server --listen {addr} {how}", exe.display()),
        child,
        _stdin: stdin,
    })
}

/// Starts the fake OpenAI-compatible upstream; `relay` is its paced
/// script.
pub fn start_fake_llm(cpu: Option<usize>, relay: fakellm::Script) -> anyhow::Result<ServerProcess> {
    let addr = free_addr()?;
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(&exe);
    let interval = relay.interval.unwrap_or_default().as_micros().max(1);
    cmd.arg("fake-llm")
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--relay-chunks")
        .arg(relay.chunks.to_string())
        .arg("--relay-interval-us")
        .arg(interval.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    let mut child = spawn_on(&mut cmd, cpu).context("starting the fake LLM upstream")?;
    let stdin = child.stdin.take();
    Ok(ServerProcess {
        kind: ServerKind::FakeLlm,
        addr,
        command: format!("{} fake-llm --listen {addr}", exe.display()),
        child,
        _stdin: stdin,
    })
}

/// Starts `trellisd serve`. Without a `stack`: nothing but defaults — no
/// `TRELLIS_*` variables (so no PostgreSQL or Redis). With one: every
/// service (`--services all`) on the stack's database and Redis, the
/// stack's argon2 parameters, and the per-IP login and registration limits
/// lifted (the bench logs in from one address, far more than 30 times a
/// minute). `extra` is further environment (the LLM provider and model of
/// the fake upstream). Always warnings-only logging, and a working
/// directory without a `trellis.toml`.
pub fn start_trellisd(
    trellisd: &Path,
    cpu: Option<usize>,
    cwd: &Path,
    stack: Option<&Stack>,
    extra: &[(&'static str, String)],
) -> anyhow::Result<ServerProcess> {
    let addr = free_addr()?;
    let mut cmd = Command::new(trellisd);
    cmd.arg("serve")
        .arg("--listen")
        .arg(addr.to_string())
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TRELLIS_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("TRELLIS_TELEMETRY__LOG_FILTER", "warn");
    if let Some(stack) = stack {
        cmd.arg("--services").arg("all");
        for (key, value) in stack.trellisd_env() {
            cmd.env(key, value);
        }
    }
    for (key, value) in extra {
        cmd.env(key, value);
    }
    let child =
        spawn_on(&mut cmd, cpu).with_context(|| format!("starting {}", trellisd.display()))?;
    Ok(ServerProcess {
        kind: ServerKind::Trellisd,
        addr,
        command: format!("{} serve --listen {addr}", trellisd.display()),
        child,
        _stdin: None,
    })
}

/// The running servers, by kind, and the data stack behind them. Dropping
/// it kills them all, the servers first.
#[derive(Default)]
pub struct Servers {
    pub running: BTreeMap<ServerKind, ServerProcess>,
    pub stack: Option<Stack>,
}

impl Servers {
    pub fn get(&self, kind: ServerKind) -> anyhow::Result<&ServerProcess> {
        self.running
            .get(&kind)
            .with_context(|| format!("{} is not running", kind.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_minor_faults_past_an_awkward_comm() {
        let stat = "4242 (tokio (rt) 1) S 1 4242 4242 0 -1 4194560 9876 0 3 0 12 3 0 0 20 0 7";
        assert_eq!(minor_faults(stat), Some(9876));
        assert_eq!(minor_faults("garbage"), None);
    }

    #[test]
    fn this_process_is_visible() {
        let me = std::process::id();
        assert!(processes().iter().any(|p| p.pid == me));
        let own = sched_stat("self").expect("own schedstat");
        assert!(own.on_cpu > Duration::ZERO);
    }
}
