//! From what a scenario measured to its [`ScenarioResult`]: CPU use over
//! the window, percentiles, ratios to its reference (and to the scenario it
//! is also compared to), whether its target is met — and the sanity checks
//! every run must pass, whatever the speed.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::load::Outcome;
use crate::report::{RateStep, RssReport, ScenarioResult};
use crate::scenario::Scenario;
use crate::servers::SchedStat;

/// CPU use over a measured window, in % of one CPU.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub server_cpu: Option<f64>,
    pub server_wait: Option<f64>,
    pub client_cpu: Option<f64>,
    pub client_wait: Option<f64>,
    /// Every PostgreSQL process together.
    pub db_cpu: Option<f64>,
    /// CPU time stolen by the hypervisor, all CPUs together.
    pub steal: Option<f64>,
    /// Server CPU time over the window, in µs.
    pub server_cpu_us: Option<f64>,
    /// Server minor page faults over the window.
    pub server_minor_faults: Option<u64>,
    /// The upstream behind the server (the fake LLM provider behind
    /// trellisd).
    pub upstream_cpu: Option<f64>,
    /// Upstream CPU time over the window, in µs.
    pub upstream_cpu_us: Option<f64>,
    /// The Redis server.
    pub redis_cpu: Option<f64>,
    /// Redis CPU time over the window, in µs.
    pub redis_cpu_us: Option<f64>,
}

/// Scheduler accounts taken at the start and the end of a window.
pub type Span = (Option<SchedStat>, Option<SchedStat>);

impl Usage {
    pub fn between(
        wall: Duration,
        server: Span,
        client: Span,
        db: Span,
        steal: (Option<Duration>, Option<Duration>),
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
            db_cpu: pct(db.0.map(|s| s.on_cpu), db.1.map(|s| s.on_cpu)),
            steal: pct(steal.0, steal.1),
            server_cpu_us: server
                .0
                .zip(server.1)
                .map(|(a, b)| b.on_cpu.saturating_sub(a.on_cpu).as_secs_f64() * 1e6),
            server_minor_faults: server
                .0
                .zip(server.1)
                .map(|(a, b)| b.minor_faults.saturating_sub(a.minor_faults)),
            ..Usage::default()
        }
    }

    /// The same, with the upstream's and Redis's CPU over the window.
    pub fn with_upstream_and_redis(mut self, wall: Duration, upstream: Span, redis: Span) -> Usage {
        let wall = wall.as_secs_f64();
        let used = |span: Span| {
            span.0
                .zip(span.1)
                .map(|(a, b)| b.on_cpu.saturating_sub(a.on_cpu).as_secs_f64())
        };
        self.upstream_cpu = used(upstream).map(|s| s / wall * 100.0);
        self.upstream_cpu_us = used(upstream).map(|s| s * 1e6);
        self.redis_cpu = used(redis).map(|s| s / wall * 100.0);
        self.redis_cpu_us = used(redis).map(|s| s * 1e6);
        self
    }
}

/// What a scenario measured besides its window's outcome and CPU use.
#[derive(Debug, Clone, Default)]
pub struct Extras {
    /// A rate ladder's steps, in order.
    pub steps: Vec<RateStep>,
    /// A rate ladder's highest offered rate held.
    pub held_rps: Option<f64>,
    /// Commands Redis ran over the window, by command.
    pub redis_commands: BTreeMap<String, u64>,
    /// Means of the server's own timings over the window, µs, by name.
    pub server_means_us: BTreeMap<String, f64>,
    /// PostgreSQL transactions committed and `llm_usage` rows written
    /// over the window.
    pub pg_activity: Option<(i64, i64)>,
    /// Idle streams held, and trellisd's RSS with them.
    pub idle: Option<crate::idle::IdleFacts>,
}

/// How a scenario was run, for its result.
#[derive(Debug, Clone)]
pub struct Shape {
    pub server: String,
    pub protocol: String,
    /// `concurrency`, `rate` or `threads`.
    pub mode: &'static str,
    pub concurrency: usize,
    pub rate: Option<f64>,
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// e.g. `32 tasks`, `200 req/s (8 tasks)`, `1 thread`.
    pub load: String,
    pub response_bytes: Option<usize>,
    /// Whether the server has its CPU to itself by design (no database
    /// work, no hashing threads, nothing run alongside), so that its time
    /// waiting for the CPU is noise.
    pub server_alone: bool,
}

/// The result of scenario `s`; `earlier` holds the results it compares
/// itself to.
pub fn result(
    s: &Scenario,
    shape: Shape,
    o: &Outcome,
    usage: Usage,
    extras: Extras,
    earlier: &[ScenarioResult],
) -> ScenarioResult {
    let us = |q: f64| o.latency.value_at_quantile(q) as f64 / 1000.0;
    let rps = o.ok as f64 / shape.duration.as_secs_f64();
    let (p50_us, p99_us) = (us(0.50), us(0.99));
    let find = |name: &str| earlier.iter().find(|r| r.scenario == name);
    let reference = s.target.and_then(|t| find(t.reference));
    let rps_ratio = reference.map(|r| rps / r.rps);
    let p50_ratio = reference.map(|r| p50_us / r.p50_us);
    let p99_ratio = reference.map(|r| p99_us / r.p99_us);
    let max_overhead = s.target.and_then(|t| t.max_p99_overhead_us);
    let max_p50_overhead = s.target.and_then(|t| t.max_p50_overhead_us);
    let (p50_overhead_us, p99_overhead_us) = match (reference, max_overhead.or(max_p50_overhead)) {
        (Some(r), Some(_)) => (Some(p50_us - r.p50_us), Some(p99_us - r.p99_us)),
        _ => (None, None),
    };
    let reference_rate = reference.and_then(|r| r.rate);
    let held_ratio = extras.held_rps.zip(reference_rate).map(|(h, r)| h / r);
    let met = match (s.target, rps_ratio, p50_ratio, p99_ratio) {
        (None, ..) => true,
        (Some(t), Some(rps), Some(p50), Some(p99)) => {
            t.met(rps, p50, p99)
                && t.met_absolute(
                    (
                        p50_overhead_us.unwrap_or(f64::INFINITY),
                        p99_overhead_us.unwrap_or(f64::INFINITY),
                    ),
                    o.error_total(),
                    extras.held_rps,
                    reference_rate,
                )
        }
        (Some(_), ..) => false,
    };
    // Held to an absolute bound instead of a reference.
    let rss = extras.idle.as_ref().map(RssReport::of);
    let met = met && rss.as_ref().is_none_or(|r| r.met && o.error_total() == 0);
    let also = s.also_vs.and_then(find);
    let requests = o.ok + o.error_total();
    let per_call = |v: Option<f64>| v.filter(|_| requests > 0).map(|v| v / requests as f64);
    ScenarioResult {
        scenario: s.name.to_string(),
        about: s.about.to_string(),
        server: shape.server,
        protocol: shape.protocol,
        mode: shape.mode.to_string(),
        concurrency: shape.concurrency,
        rate: shape.rate,
        connections: shape.connections,
        load: shape.load,
        warmup_s: shape.warmup.as_secs_f64(),
        duration_s: shape.duration.as_secs_f64(),
        requests,
        rps,
        p50_us,
        p90_us: us(0.90),
        p99_us,
        max_us: o.latency.max() as f64 / 1000.0,
        mean_us: o.latency.mean() / 1000.0,
        errors: o.errors.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        reference: s.target.map(|t| t.reference.to_string()),
        rps_ratio,
        p50_ratio,
        p99_ratio,
        also_vs: also.map(|r| r.scenario.clone()),
        also_rps_ratio: also.map(|r| rps / r.rps),
        also_p99_ratio: also.map(|r| p99_us / r.p99_us),
        target: match (&rss, s.target) {
            (Some(r), _) => r.target_text(),
            (None, Some(t)) => t.text(reference_rate),
            (None, None) if s.also_vs.is_some() => "— (reported)".to_string(),
            (None, None) => "— (reference)".to_string(),
        },
        target_rps_ratio: s.target.and_then(|t| t.min_rps_ratio),
        // An overhead bound as the p50 ratio it amounts to in this run.
        target_p50_ratio: s.target.and_then(|t| t.max_p50_ratio).or_else(|| {
            max_p50_overhead
                .zip(reference)
                .filter(|(_, r)| r.p50_us > 0.0)
                .map(|(max, r)| (r.p50_us + max) / r.p50_us)
        }),
        // An overhead bound as the p99 ratio it amounts to in this run.
        target_p99_ratio: s.target.and_then(|t| t.max_p99_ratio).or_else(|| {
            max_overhead
                .zip(reference)
                .filter(|(_, r)| r.p99_us > 0.0)
                .map(|(max, r)| (r.p99_us + max) / r.p99_us)
        }),
        met,
        server_cpu_percent: usage.server_cpu,
        server_wait_percent: usage.server_wait,
        server_cpu_us_per_call: usage
            .server_cpu_us
            .filter(|_| requests > 0)
            .map(|us| us / requests as f64),
        server_minor_faults_per_call: usage
            .server_minor_faults
            .filter(|_| requests > 0)
            .map(|n| n as f64 / requests as f64),
        db_cpu_percent: usage.db_cpu,
        steal_percent: usage.steal,
        client_cpu_percent: usage.client_cpu,
        client_wait_percent: usage.client_wait,
        response_bytes: shape.response_bytes,
        server_alone: shape.server_alone,
        p50_overhead_us,
        p99_overhead_us,
        target_p99_overhead_us: max_overhead,
        target_p50_overhead_us: max_p50_overhead,
        held_rps: extras.held_rps,
        held_ratio,
        steps: extras.steps,
        upstream_cpu_percent: usage.upstream_cpu,
        upstream_cpu_us_per_call: per_call(usage.upstream_cpu_us),
        redis_cpu_percent: usage.redis_cpu,
        redis_cpu_us_per_call: per_call(usage.redis_cpu_us),
        server_means_us: extras.server_means_us,
        pg_transactions_per_call: extras
            .pg_activity
            .and_then(|(x, _)| per_call(Some(x as f64))),
        usage_rows_per_call: extras
            .pg_activity
            .and_then(|(_, rows)| per_call(Some(rows as f64))),
        rss,
        redis_commands_per_call: if requests > 0 {
            extras
                .redis_commands
                .iter()
                .map(|(k, v)| (k.clone(), *v as f64 / requests as f64))
                .collect()
        } else {
            BTreeMap::new()
        },
    }
}

/// What makes a run unusable, whatever the speed: a scenario missing, no
/// calls, errors, percentiles out of order.
pub fn sanity(scenarios: &[&Scenario], results: &[ScenarioResult]) -> Vec<String> {
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
