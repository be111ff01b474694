//! The load generator: client tasks calling in a closed loop (fixed
//! concurrency) or on a fixed schedule (fixed rate, open loop), a warm-up
//! that is not recorded, then a measured window whose latencies go into an
//! HDR histogram and whose failures are counted by gRPC code.
//!
//! In fixed-rate mode each of the `tasks` tasks owns an evenly spaced share
//! of the schedule (as wrk2 does). When a task is still waiting for an
//! earlier answer at a request's intended send time, that request's latency
//! is counted from the intended time, so a stalled server shows up in the
//! percentiles instead of silently lowering the send rate (coordinated
//! omission). When the task is idle it sleeps until the intended time and
//! counts from when it actually sends: tokio's millisecond timer wakes up
//! to ~1 ms late, and that slack is the bench's, not the server's.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::{Instant, sleep_until};
use tonic::Code;
use trellis_mesh::layers::metrics::code_name;

use crate::calls::{Call, Caller};

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Each task sends its next request as soon as the previous one is
    /// answered (closed loop).
    Concurrency,
    /// This many requests/s in total, on a fixed schedule (open loop).
    Rate(f64),
}

/// One scenario's load: how, by how many tasks, for how long.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub mode: Mode,
    pub tasks: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// A call not answered within this is counted as DEADLINE_EXCEEDED.
    pub call_timeout: Duration,
}

impl Plan {
    /// The measured window of a run starting at `start`: requests sent in
    /// it are counted.
    pub fn window(&self, start: Instant) -> (Instant, Instant) {
        let from = start + self.warmup;
        (from, from + self.duration)
    }
}

/// What one run measured.
pub struct Outcome {
    /// Calls sent in the measured window that succeeded.
    pub ok: u64,
    /// Calls sent in the measured window that failed, by code name.
    pub errors: BTreeMap<&'static str, u64>,
    /// Latency of the successful calls, in nanoseconds.
    pub latency: Histogram<u64>,
    /// When the last call sent in the measured window ended: past the
    /// window's end by more than a latency, the calls queued up (a fixed
    /// rate the server could not keep up with).
    pub last_done: Option<Instant>,
}

impl Outcome {
    pub fn new() -> Outcome {
        Outcome {
            ok: 0,
            errors: BTreeMap::new(),
            // 1 ns to 5 minutes at 3 significant digits.
            latency: Histogram::new_with_bounds(1, 300_000_000_000, 3)
                .expect("static histogram bounds"),
            last_done: None,
        }
    }

    pub fn merge(&mut self, other: Outcome) {
        self.ok += other.ok;
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        self.latency
            .add(other.latency)
            .expect("histograms with the same bounds merge");
        self.last_done = self.last_done.max(other.last_done);
    }

    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Runs `plan` with one task per caller, task `k` repeating `calls[k]`,
/// starting at `start` (callers are connected beforehand, so connection
/// set-up is not measured).
pub async fn run(plan: Plan, start: Instant, callers: Vec<Caller>, calls: Vec<Call>) -> Outcome {
    let tasks = callers.len();
    let handles: Vec<_> = callers
        .into_iter()
        .zip(calls)
        .enumerate()
        .map(|(k, (caller, call))| tokio::spawn(task(plan, start, k, tasks, caller, call)))
        .collect();
    let mut total = Outcome::new();
    for h in handles {
        match h.await {
            Ok(outcome) => total.merge(outcome),
            // A panicking task is a bench bug; count its share as lost.
            Err(_) => *total.errors.entry("BENCH_TASK_PANICKED").or_default() += 1,
        }
    }
    total
}

async fn task(
    plan: Plan,
    start: Instant,
    k: usize,
    tasks: usize,
    mut caller: Caller,
    call: Call,
) -> Outcome {
    let (from, end) = plan.window(start);
    let mut out = Outcome::new();
    sleep_until(start).await;
    for i in 0u64.. {
        let sent = match plan.mode {
            Mode::Concurrency => Instant::now(),
            Mode::Rate(rps) => {
                let slot = k as f64 + i as f64 * tasks as f64;
                let intended = start + Duration::from_secs_f64(slot / rps);
                if intended >= end {
                    break;
                }
                if Instant::now() < intended {
                    sleep_until(intended).await;
                    Instant::now()
                } else {
                    intended
                }
            }
        };
        if sent >= end {
            break;
        }
        let result = tokio::time::timeout(plan.call_timeout, caller.call(&call))
            .await
            .unwrap_or(Err(Code::DeadlineExceeded));
        if sent < from {
            continue;
        }
        out.last_done = Some(Instant::now());
        match result {
            Ok(until) => {
                out.ok += 1;
                // The call's own end point (its first token), else now.
                let until = until.unwrap_or_else(Instant::now);
                let ns = u64::try_from(until.saturating_duration_since(sent).as_nanos())
                    .unwrap_or(u64::MAX);
                out.latency.saturating_record(ns.max(1));
            }
            Err(code) => *out.errors.entry(code_name(code)).or_default() += 1,
        }
    }
    out
}
