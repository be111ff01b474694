//! The report: one `<scenario>.json` per scenario, `summary.md` (a table,
//! how the machine was shared, notes on what was seeded and measured) and
//! `summary.svg` (each scenario's targeted ratio to its reference, and
//! p50/p99 latency), all written to the output directory.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::Serialize;

/// Waiting for a CPU longer than this (% of the window) marks a scenario's
/// numbers as disturbed by other processes.
const NOISY_WAIT_PERCENT: f64 = 5.0;

/// One scenario's results, as written to `<scenario>.json`.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub scenario: String,
    pub about: String,
    pub server: String,
    pub protocol: String,
    /// `concurrency` (closed loop), `rate` (open loop) or `threads`
    /// (argon2-raw).
    pub mode: String,
    /// Client tasks (in rate mode, the tasks sharing the schedule).
    pub concurrency: usize,
    /// Requests/s asked for, in rate mode.
    pub rate: Option<f64>,
    /// HTTP/2 connections shared by the tasks (native gRPC); gRPC-web uses
    /// one HTTP/1.1 connection per task.
    pub connections: usize,
    /// The load in words, e.g. `32 tasks`, `200 req/s (8 tasks)`.
    pub load: String,
    pub warmup_s: f64,
    pub duration_s: f64,
    /// Calls sent in the measured window.
    pub requests: u64,
    /// Successful calls per second of the measured window.
    pub rps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    /// Failed calls by gRPC code name.
    pub errors: BTreeMap<String, u64>,
    /// The scenario this one is compared against; none for a reference.
    pub reference: Option<String>,
    /// req/s ÷ the reference's req/s.
    pub rps_ratio: Option<f64>,
    /// p50 ÷ the reference's p50.
    pub p50_ratio: Option<f64>,
    /// p99 ÷ the reference's p99.
    pub p99_ratio: Option<f64>,
    /// Another scenario this one is also compared to (not held to).
    pub also_vs: Option<String>,
    pub also_rps_ratio: Option<f64>,
    pub also_p99_ratio: Option<f64>,
    pub target: String,
    /// The target's least req/s ratio and greatest p50 and p99 ratios.
    pub target_rps_ratio: Option<f64>,
    pub target_p50_ratio: Option<f64>,
    pub target_p99_ratio: Option<f64>,
    pub met: bool,
    /// CPU used by the server process during the measured window, in % of
    /// one CPU.
    pub server_cpu_percent: Option<f64>,
    /// Time the server's threads were runnable but waiting for a CPU (taken
    /// by another process), in % of the window: noise.
    pub server_wait_percent: Option<f64>,
    /// Server CPU time per call in the window, in µs: the cost of a call,
    /// whichever side limited the rate.
    pub server_cpu_us_per_call: Option<f64>,
    /// Minor page faults the server took per call in the window (memory
    /// mapped fresh: for argon2, its block array).
    pub server_minor_faults_per_call: Option<f64>,
    /// CPU used by every PostgreSQL process together, in % of one CPU
    /// (runs with the data stack).
    pub db_cpu_percent: Option<f64>,
    /// CPU used by the bench itself during the measured window, in % of one
    /// CPU; near 100% the bench, not the server, limited req/s.
    pub client_cpu_percent: Option<f64>,
    /// Time the bench's threads waited for a CPU, in % of the window.
    pub client_wait_percent: Option<f64>,
    /// CPU time the hypervisor gave to other guests while ours wanted it,
    /// all CPUs together, in % of one CPU over the window: noise.
    pub steal_percent: Option<f64>,
    /// Encoded size of the server's GetInfo response (GetInfo scenarios).
    pub response_bytes: Option<usize>,
    /// The server had its CPU to itself by design, so its wait for the CPU
    /// is noise (otherwise PostgreSQL, its own hashing threads or a
    /// scenario run alongside took turns with it).
    pub server_alone: bool,
    /// p50 minus the reference's p50, in µs (scenarios held to an
    /// absolute overhead).
    pub p50_overhead_us: Option<f64>,
    /// p99 minus the reference's p99, in µs (scenarios held to an
    /// absolute overhead).
    pub p99_overhead_us: Option<f64>,
    /// The target's greatest p99 overhead, in µs. `target_p99_ratio` then
    /// holds the p99 ratio it amounts to in this run.
    pub target_p99_overhead_us: Option<f64>,
    /// The target's greatest p50 overhead, in µs. `target_p50_ratio` then
    /// holds the p50 ratio it amounts to in this run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_p50_overhead_us: Option<f64>,
    /// A rate ladder's highest offered rate held (none held: null).
    pub held_rps: Option<f64>,
    /// `held_rps` ÷ the rate the reference ran at.
    pub held_ratio: Option<f64>,
    /// A rate ladder's steps, in the order run; the scenario's other
    /// figures are those of the highest step held (or, when none was, of
    /// the first).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<RateStep>,
    /// CPU used by the upstream behind the server (the fake LLM provider
    /// behind trellisd), in % of one CPU.
    pub upstream_cpu_percent: Option<f64>,
    /// The upstream's CPU time per call, in µs.
    pub upstream_cpu_us_per_call: Option<f64>,
    /// CPU used by Redis (runs with the data stack), in % of one CPU.
    pub redis_cpu_percent: Option<f64>,
    /// Redis CPU time per call, in µs.
    pub redis_cpu_us_per_call: Option<f64>,
    /// Commands Redis ran per call in the window, by command (its own
    /// `INFO commandstats`, script-internal commands included); measured
    /// for the LLM gateway scenarios.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub redis_commands_per_call: BTreeMap<String, f64>,
    /// Means over the window of trellisd's own timings, µs (from its
    /// `/metrics` histograms; LLM gateway scenario): `grpc_call` (the call
    /// until its last message), `upstream_call` (the provider call, from
    /// sending it until its stream ended), `upstream_first_token`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub server_means_us: BTreeMap<String, f64>,
    /// PostgreSQL transactions committed per call in the window (its
    /// statistics lag by about a second; LLM gateway scenario).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pg_transactions_per_call: Option<f64>,
    /// `llm_usage` rows written per call in the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage_rows_per_call: Option<f64>,
    /// Idle streams held and the server's memory with them (streams-idle:
    /// held to an absolute bound, not to a reference).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss: Option<RssReport>,
}

/// The server's resident memory with many idle streams.
#[derive(Debug, Clone, Serialize)]
pub struct RssReport {
    pub streams: usize,
    pub connections: usize,
    /// Resident set size before the first stream, with all of them open
    /// and idle, after closing them, MiB.
    pub before_mb: f64,
    pub with_mb: f64,
    pub after_close_mb: f64,
    /// RSS with half of the streams open, MiB.
    pub half_mb: f64,
    /// Growth per open stream, KiB: over all, and over the second half
    /// (the marginal cost, without the first turns' one-off growth).
    pub per_stream_kb: f64,
    pub marginal_kb: f64,
    /// The RSS with `target_streams` streams: measured, or (`projected`)
    /// the RSS measured + the marginal cost × the streams missing.
    pub at_target_mb: f64,
    pub target_streams: usize,
    pub projected: bool,
    pub limit_mb: f64,
    pub met: bool,
    /// Seconds to open them all (each with its turn).
    pub opening_s: f64,
}

impl RssReport {
    pub fn of(f: &crate::idle::IdleFacts) -> RssReport {
        let mb = |kb: u64| kb as f64 / 1024.0;
        let at_target_mb = f.rss_at_target_mb();
        RssReport {
            streams: f.streams,
            connections: f.connections,
            before_mb: mb(f.rss_before_kb),
            half_mb: mb(f.rss_half_kb),
            with_mb: mb(f.rss_with_kb),
            after_close_mb: mb(f.rss_after_kb),
            per_stream_kb: f.per_stream_kb(),
            marginal_kb: f.marginal_kb(),
            at_target_mb,
            target_streams: crate::idle::TARGET_STREAMS,
            projected: f.projected(),
            limit_mb: crate::idle::MAX_RSS_MB,
            met: f.rss_with_kb > 0 && at_target_mb <= crate::idle::MAX_RSS_MB,
            opening_s: f.opening.as_secs_f64(),
        }
    }

    pub fn target_text(&self) -> String {
        format!(
            "server RSS ≤ {:.0} MB with {} idle streams, 0 errors",
            self.limit_mb, self.target_streams
        )
    }

    /// e.g. `RSS 80 → 95 MB with 200 streams (+30.2 KB each at the margin); 10000 streams: 380 MB (projected)`.
    pub fn text(&self) -> String {
        format!(
            "RSS {:.0} → {:.0} MB with {} streams ({:+.1} KB each at the margin); {} streams: {:.0} MB{}",
            self.before_mb,
            self.with_mb,
            self.streams,
            self.marginal_kb,
            self.target_streams,
            self.at_target_mb,
            if self.projected { " (projected)" } else { "" }
        )
    }
}

/// One step of a rate ladder.
#[derive(Debug, Clone, Serialize)]
pub struct RateStep {
    /// Requests/s asked for.
    pub offered_rps: f64,
    /// Calls sent in the window ÷ the time from the window's start until
    /// the last of them ended.
    pub achieved_rps: f64,
    /// Calls sent in the measured window.
    pub calls: u64,
    pub errors: BTreeMap<String, u64>,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// No errors and `achieved_rps` ≥ the held share of `offered_rps`.
    pub held: bool,
    pub server_cpu_percent: Option<f64>,
    pub upstream_cpu_percent: Option<f64>,
    pub redis_cpu_percent: Option<f64>,
    pub db_cpu_percent: Option<f64>,
    pub client_cpu_percent: Option<f64>,
}

impl ScenarioResult {
    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// What the whole run shares: when, where, how.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub date: String,
    pub quick: bool,
    pub profile: &'static str,
    pub load: String,
    pub cores: String,
    pub machine: String,
    pub payload: String,
    /// Further lines for the report: what was seeded, argon2 parameters,
    /// login latency, …
    pub notes: Vec<String>,
}

/// Writes every output file into `dir`.
pub fn write_all(dir: &Path, info: &RunInfo, results: &[ScenarioResult]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for r in results {
        let json = serde_json::to_string_pretty(r)? + "\n";
        write_atomically(&dir.join(format!("{}.json", r.scenario)), json.as_bytes())?;
    }
    write_atomically(&dir.join("summary.md"), markdown(info, results).as_bytes())?;
    let svg = dir.join("summary.svg");
    let tmp = dir.join("summary.svg.tmp");
    chart(&tmp, info, results).with_context(|| format!("drawing {}", svg.display()))?;
    std::fs::rename(&tmp, &svg)?;
    Ok(())
}

/// Writes through a `.tmp` file, so a reader never sees half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", path.display()))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn us(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn ratio_text(r: &ScenarioResult) -> String {
    if let Some(rss) = &r.rss {
        return rss.text();
    }
    if !r.steps.is_empty() {
        return match (&r.reference, r.held_rps, r.held_ratio) {
            (Some(reference), Some(held), Some(x)) => {
                format!("highest rate held {held:.0} req/s = {x:.2}× {reference}'s rate")
            }
            (Some(reference), Some(held), None) => {
                format!("highest rate held {held:.0} req/s (vs {reference})")
            }
            _ => "no step held".to_string(),
        };
    }
    if let (Some(reference), Some(_), Some(p50), Some(p99), Some(rps)) = (
        &r.reference,
        r.target_p99_overhead_us.or(r.target_p50_overhead_us),
        r.p50_overhead_us,
        r.p99_overhead_us,
        r.rps_ratio,
    ) {
        return format!(
            "overhead {p50:+.0} µs p50, {p99:+.0} µs p99; {rps:.2}× req/s (vs {reference})"
        );
    }
    let (Some(reference), Some(rps), Some(p99)) = (&r.reference, r.rps_ratio, r.p99_ratio) else {
        // Reported against another scenario, not held to it.
        if let (Some(also), Some(rps), Some(p99)) = (&r.also_vs, r.also_rps_ratio, r.also_p99_ratio)
        {
            return format!("{rps:.2}× req/s, {p99:.2}× p99 (vs {also})");
        }
        return "—".to_string();
    };
    let mut text = format!("{rps:.2}× req/s, ");
    if let (Some(p50), Some(_)) = (r.p50_ratio, r.target_p50_ratio) {
        text.push_str(&format!("{p50:.2}× p50, "));
    }
    text.push_str(&format!("{p99:.2}× p99 (vs {reference})"));
    if let (Some(also), Some(rps), Some(p99)) = (&r.also_vs, r.also_rps_ratio, r.also_p99_ratio) {
        text.push_str(&format!("; {rps:.2}× req/s, {p99:.2}× p99 (vs {also})"));
    }
    text
}

/// `summary.md`.
pub fn markdown(info: &RunInfo, results: &[ScenarioResult]) -> String {
    let mut md = String::new();
    md.push_str(if info.quick {
        "# Trellis benchmark (quick smoke run — not a measurement)\n\n"
    } else {
        "# Trellis benchmark\n\n"
    });
    md.push_str(&format!(
        "{} · {} build · {}\n\n",
        info.date, info.profile, info.load
    ));
    md.push_str("| scenario | req/s | p50 (µs) | p99 (µs) | ratio vs reference | target | met |\n");
    md.push_str("|---|---:|---:|---:|---|---|---|\n");
    for r in results {
        let met = match (&r.reference, &r.rss) {
            (None, None) => "—",
            _ if r.met => "met",
            _ => "**not met**",
        };
        md.push_str(&format!(
            "| {} | {:.0} | {} | {} | {} | {} | {} |\n",
            r.scenario,
            r.rps,
            us(r.p50_us),
            us(r.p99_us),
            ratio_text(r),
            r.target,
            met
        ));
    }
    md.push('\n');
    md.push_str(&format!("**Cores:** {}\n\n", info.cores));
    md.push_str(&format!("**Machine:** {}\n\n", info.machine));
    md.push_str(&format!("**Payload:** {}\n\n", info.payload));
    if !info.notes.is_empty() {
        md.push_str("**Notes:**\n\n");
        for n in &info.notes {
            md.push_str(&format!("- {n}\n"));
        }
        md.push('\n');
    }
    let noisy: Vec<String> = results
        .iter()
        .filter_map(|r| {
            // A server sharing its CPU (with PostgreSQL, its own hashing
            // threads) waits by design; only the bench's wait tells of
            // noise then.
            let server_wait = if r.server_alone {
                r.server_wait_percent.unwrap_or(0.0)
            } else {
                0.0
            };
            let worst = server_wait
                .max(r.client_wait_percent.unwrap_or(0.0))
                .max(r.steal_percent.unwrap_or(0.0));
            (worst > NOISY_WAIT_PERCENT).then(|| format!("{} ({worst:.0}%)", r.scenario))
        })
        .collect();
    if !noisy.is_empty() {
        md.push_str(&format!(
            "**Noise:** other processes (or, as steal, other virtual machines) kept the \
             server or the bench off its CPU for more than {NOISY_WAIT_PERCENT}% of the \
             window in {}; compare those numbers with \
             care, or run again on a quieter machine. (Where PostgreSQL, hashing threads or \
             a concurrent scenario share the server's CPU, the server's wait is by design and \
             only the bench's counts.)\n\n",
            noisy.join(", ")
        ));
    }
    md.push_str(
        "| scenario | what | load | p90 (µs) | max (µs) | calls | errors | server CPU/call | server CPU (waited) | PostgreSQL CPU | bench CPU (waited) | steal |\n",
    );
    md.push_str("|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|\n");
    for r in results {
        let errors = if r.errors.is_empty() {
            "0".to_string()
        } else {
            r.errors
                .iter()
                .map(|(code, n)| format!("{code} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let pct = |cpu: Option<f64>, wait: Option<f64>| match (cpu, wait) {
            (Some(c), Some(w)) => format!("{c:.0}% ({w:.0}%)"),
            (None, None) => "—".to_string(),
            _ => "?".to_string(),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.scenario,
            r.about,
            r.load,
            us(r.p90_us),
            us(r.max_us),
            r.requests,
            errors,
            r.server_cpu_us_per_call
                .map_or("?".to_string(), |v| format!("{v:.1} µs")),
            pct(r.server_cpu_percent, r.server_wait_percent),
            r.db_cpu_percent
                .map_or("—".to_string(), |v| format!("{v:.0}%")),
            pct(r.client_cpu_percent, r.client_wait_percent),
            r.steal_percent
                .map_or("—".to_string(), |v| format!("{v:.1}%"))
        ));
    }
    md.push_str(
        "\nreq/s counts successful calls in the measured window (argon2-raw: hashes); \
         latencies are of successful calls (argon2-raw: of one hash). CPU is time on CPU \
         over the window in % of one CPU; \"waited\" is time runnable but kept off the \
         CPU by other processes and \"steal\" CPU time the hypervisor gave to other virtual \
         machines (both noise); for argon2-raw the \"server\" is the bench's \
         hashing threads. A bench CPU near 100% means the client, not the server, set the \
         pace: that req/s is a lower bound, and server CPU per call compares the servers' \
         cost. Server CPU excludes PostgreSQL, shown apart.\n",
    );
    md
}

/// The ratio a result's target is mainly about, its bound and its label
/// (`req/s`, `p50`, `p99`); a reference scenario is 1.0 with no bound.
fn headline(r: &ScenarioResult) -> (f64, Option<f64>, &'static str) {
    if let Some(rss) = &r.rss {
        return (rss.at_target_mb / rss.limit_mb, Some(1.0), "RSS limit");
    }
    if let (None, Some(_), Some(x)) = (&r.reference, &r.also_vs, r.also_rps_ratio) {
        return (x, None, "req/s");
    }
    if !r.steps.is_empty() && r.reference.is_some() {
        return (r.held_ratio.unwrap_or(0.0), Some(1.0), "rate held");
    }
    match (r.target_rps_ratio, r.target_p50_ratio, r.target_p99_ratio) {
        (Some(t), ..) => (r.rps_ratio.unwrap_or(0.0), Some(t), "req/s"),
        (None, Some(t), _) => (r.p50_ratio.unwrap_or(0.0), Some(t), "p50"),
        (None, None, Some(t)) => (r.p99_ratio.unwrap_or(0.0), Some(t), "p99"),
        (None, None, None) => (1.0, None, ""),
    }
}

/// `summary.svg`: each scenario's targeted ratio to its reference (a
/// reference scenario is 1.0; the target is a black tick) above p50/p99
/// latency on a log scale.
fn chart(path: &Path, info: &RunInfo, results: &[ScenarioResult]) -> anyhow::Result<()> {
    let n = results.len().max(1);
    let names: Vec<String> = results.iter().map(|r| r.scenario.clone()).collect();
    // x: scenario i spans [100·i, 100·i + 100]; its name labels the centre.
    let label = |x: &i32| -> String {
        if x.rem_euclid(100) == 50 {
            names.get((x / 100) as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    let centers: Vec<i32> = (0..n as i32).map(|i| i * 100 + 50).collect();
    let span = 0..n as i32 * 100;
    let width = (130 * n as u32 + 120).max(900);

    let root = SVGBackend::new(path, (width, 840)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "Trellis benchmark{} — {} · {} build",
        if info.quick { " (quick smoke run)" } else { "" },
        info.date,
        info.profile
    );
    let root = root.titled(&title, ("sans-serif", 20))?;
    let (upper, lower) = root.split_vertically(400);

    // The targeted ratio to each scenario's reference.
    let heads: Vec<(f64, Option<f64>, &str)> = results.iter().map(headline).collect();
    let top = heads
        .iter()
        .flat_map(|(v, t, _)| [*v, t.unwrap_or(0.0)])
        .fold(1.0f64, f64::max)
        * 1.2;
    let mut c = ChartBuilder::on(&upper)
        .caption(
            "targeted ratio to the reference (req/s: at least the tick; p50/p99: at most)",
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(span.clone().with_key_points(centers.clone()), 0f64..top)?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&label)
        .x_label_style(("sans-serif", 12))
        .light_line_style(TRANSPARENT)
        .y_desc("× reference")
        .draw()?;
    c.draw_series(results.iter().zip(&heads).enumerate().map(|(i, (r, h))| {
        let color = match (&r.reference, &r.rss) {
            (None, None) => RGBColor(150, 150, 150),
            _ if r.met => RGBColor(60, 150, 80),
            _ => RGBColor(200, 70, 60),
        };
        let x = i as i32 * 100;
        Rectangle::new([(x + 20, 0.0), (x + 80, h.0)], color.filled())
    }))?;
    c.draw_series(heads.iter().enumerate().filter_map(|(i, h)| {
        h.1.map(|t| {
            let x = i as i32 * 100;
            PathElement::new(vec![(x + 10, t), (x + 90, t)], BLACK.stroke_width(2))
        })
    }))?;
    c.draw_series(results.iter().zip(&heads).enumerate().map(|(i, (r, h))| {
        let text = match (&r.reference, &r.rss) {
            (_, Some(_)) => format!("{:.2}× the {}", h.0, h.2),
            (None, None) => match &r.also_vs {
                Some(also) => format!("{:.2}× {} {also}", h.0, h.2),
                None => "reference".to_string(),
            },
            (Some(reference), None) => format!("{:.2}× {} {reference}", h.0, h.2),
        };
        Text::new(
            text,
            (i as i32 * 100 + 50, h.0 + top * 0.02),
            TextStyle::from(("sans-serif", 11).into_font())
                .pos(Pos::new(HPos::Center, VPos::Bottom)),
        )
    }))?;

    // Latency, log scale: from tens of µs (no-op) to tens of ms (login).
    let top = results.iter().map(|r| r.p99_us).fold(10.0f64, f64::max) * 2.0;
    let bottom = results
        .iter()
        .map(|r| r.p50_us)
        .filter(|v| *v > 0.0)
        .fold(top, f64::min)
        .max(1.0)
        / 2.0;
    let mut c = ChartBuilder::on(&lower)
        .caption("latency (µs, log scale)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(span.with_key_points(centers), (bottom..top).log_scale())?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&label)
        .x_label_style(("sans-serif", 12))
        .light_line_style(TRANSPARENT)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("µs")
        .draw()?;
    let p50 = RGBColor(70, 120, 200);
    let p99 = RGBColor(240, 150, 40);
    c.draw_series(results.iter().enumerate().map(|(i, r)| {
        let x = i as i32 * 100;
        Rectangle::new(
            [(x + 12, bottom), (x + 48, r.p50_us.max(bottom))],
            p50.filled(),
        )
    }))?
    .label("p50")
    .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], p50.filled()));
    c.draw_series(results.iter().enumerate().map(|(i, r)| {
        let x = i as i32 * 100;
        Rectangle::new(
            [(x + 52, bottom), (x + 88, r.p99_us.max(bottom))],
            p99.filled(),
        )
    }))?
    .label("p99")
    .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], p99.filled()));
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()?;

    root.present()?;
    Ok(())
}
