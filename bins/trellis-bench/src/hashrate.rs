//! The `argon2-raw` reference: argon2id hashes computed by the bench itself
//! with the `argon2` crate and the parameters trellisd is given, on as many
//! threads as trellisd hashes on (its `trellis-hash-*` threads; without
//! them, one per CPU it may use), pinned to trellisd's CPUs and at its
//! hashing threads' nice value — so this is the most logins/s it could
//! reach. The servers are idle meanwhile. Each hash's time goes into the
//! histogram, so p50 is the single-hash time.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use argon2::{Algorithm, Argon2, Params, Version};
use trellis_core::config::Argon2Config;

use crate::load::{Outcome, Plan};
use crate::servers::{self, SchedStat};

/// What the hashing threads did in the measured window.
pub struct HashRun {
    pub outcome: Outcome,
    /// The threads' scheduler account over the window, summed.
    pub sched: SchedStat,
    /// The measured window's length.
    pub wall: Duration,
}

/// How trellisd hashes: the threads of one hashing pool and their nice
/// value.
#[derive(Debug, Clone, Copy)]
pub struct HashThreads {
    pub count: usize,
    pub nice: i32,
}

/// trellisd's (process `pid`) hashing threads, named `trellis-hash-<i>`.
/// Each service that hashes (auth; user for CreateUser) has its own pool
/// numbered from 0, and a login uses one: the pool size is the number of
/// distinct names.
pub fn hash_threads_of(pid: u32) -> Option<HashThreads> {
    let mut names = std::collections::BTreeSet::new();
    let mut nice = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("trellis-hash") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // After `pid (comm)`: state is field 3 of stat(5), nice field 19.
        nice = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(16)?.parse().ok())
            .unwrap_or(0);
        names.insert(comm.trim().to_string());
    }
    (!names.is_empty()).then_some(HashThreads {
        count: names.len(),
        nice,
    })
}

/// Sets the calling thread's nice value (Linux: per thread).
#[allow(unsafe_code)]
fn set_nice(nice: i32) -> anyhow::Result<()> {
    // SAFETY: setpriority(2) with PRIO_PROCESS and who = 0 changes only the
    // calling thread's nice value on Linux; it touches no memory of ours.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc != 0 {
        anyhow::bail!("setting nice {nice}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Hashes on `threads` threads, each pinned to `cpus` (when given) at nice
/// value `nice`, for the plan's warm-up and measured window.
pub async fn run(
    params: Argon2Config,
    threads: usize,
    nice: i32,
    cpus: Option<Vec<usize>>,
    plan: Plan,
) -> anyhow::Result<HashRun> {
    let argon = Argon2::new(
        Algorithm::Argon2id,
        Version::V0x13,
        Params::new(
            params.memory_kib,
            params.iterations,
            params.parallelism,
            Some(32),
        )
        .map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?,
    );
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let from = start + plan.warmup;
        let end = from + plan.duration;
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads.max(1))
                .map(|k| {
                    let argon = argon.clone();
                    let cpus = cpus.clone();
                    s.spawn(move || {
                        if let Some(cpus) = &cpus {
                            servers::pin_current_thread_to(cpus)?;
                        }
                        if nice != 0 {
                            set_nice(nice)?;
                        }
                        hash_loop(&argon, k, from, end)
                    })
                })
                .collect();
            let mut total = HashRun {
                outcome: Outcome::new(),
                sched: SchedStat::default(),
                wall: plan.duration,
            };
            for h in handles {
                let (outcome, sched) = h
                    .join()
                    .map_err(|_| anyhow::anyhow!("hashing thread panicked"))??;
                total.outcome.merge(outcome);
                total.sched.on_cpu += sched.on_cpu;
                total.sched.waiting += sched.waiting;
                total.sched.minor_faults += sched.minor_faults;
            }
            Ok(total)
        })
    })
    .await
    .context("hashing task")?
}

/// One thread's hashes until `end`; those started from `from` on are
/// recorded.
fn hash_loop(
    argon: &Argon2<'_>,
    k: usize,
    from: Instant,
    end: Instant,
) -> anyhow::Result<(Outcome, SchedStat)> {
    let mut out = Outcome::new();
    let mut salt = [0u8; 16];
    let mut hash = [0u8; 32];
    let mut before = None;
    let mut i = 0u64;
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        if t0 >= from && before.is_none() {
            before = Some(thread_sched_stat().unwrap_or_default());
        }
        // A new salt per hash, as every stored hash has its own.
        salt[..8].copy_from_slice(&i.to_le_bytes());
        salt[8..].copy_from_slice(&(k as u64).to_le_bytes());
        argon
            .hash_password_into(b"Bench!pass1 for argon2", &salt, &mut hash)
            .map_err(|e| anyhow::anyhow!("argon2: {e}"))?;
        i += 1;
        if t0 >= from {
            out.ok += 1;
            let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
            out.latency.saturating_record(ns.max(1));
        }
    }
    let after = thread_sched_stat().unwrap_or_default();
    let before = before.unwrap_or(after);
    Ok((
        out,
        SchedStat {
            on_cpu: after.on_cpu.saturating_sub(before.on_cpu),
            waiting: after.waiting.saturating_sub(before.waiting),
            minor_faults: after.minor_faults.saturating_sub(before.minor_faults),
        },
    ))
}

/// The calling thread's scheduler account.
fn thread_sched_stat() -> Option<SchedStat> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let mut f = stat.split_whitespace().map(|v| v.parse::<u64>().ok());
    Some(SchedStat {
        on_cpu: Duration::from_nanos(f.next()??),
        waiting: Duration::from_nanos(f.next()??),
        minor_faults: std::fs::read_to_string("/proc/thread-self/stat")
            .ok()
            .and_then(|s| servers::minor_faults(&s))
            .unwrap_or(0),
    })
}
