//! The report's notes: what the table's numbers rest on — the data stack
//! and where it ran, the argon2 parameters, the single-hash time and login
//! latency, the probe's idle and loaded p99, the GetUser and ListUsers
//! figures and how their fixtures were seeded. One line per topic, only for
//! the scenarios that ran.

use trellis_core::config::Argon2Config;

use crate::report::ScenarioResult;
use crate::run::{Ctx, USER_SERVER_CONNECTIONS};
use crate::scenario::{LIST_PAGE_SIZE, PROBE_RPS};
use crate::seed::SeedFacts;
use crate::servers::Servers;

/// A scenario's load run again, unrecorded, while another was measured.
#[derive(Debug, Clone)]
pub struct Flood {
    pub load: &'static str,
    pub during: &'static str,
    pub rps: f64,
    pub errors: u64,
}

fn ms(us: f64) -> String {
    format!("{:.1} ms", us / 1000.0)
}

fn faults(per_call: Option<f64>) -> String {
    per_call.map_or("?".to_string(), |v| format!("{v:.0}"))
}

fn ratio(a: f64, b: f64) -> String {
    format!("{:.2}×", a / b)
}

pub fn notes(
    ctx: &Ctx<'_>,
    results: &[ScenarioResult],
    floods: &[Flood],
    facts: Option<&SeedFacts>,
    running: &Servers,
    argon2: Argon2Config,
) -> Vec<String> {
    let get = |name: &str| results.iter().find(|r| r.scenario == name);
    let mut notes = Vec::new();
    if let Some(stack) = &running.stack {
        notes.push(format!(
            "Data stack: private PostgreSQL {} and Redis started by the bench in a throw-away \
             temporary directory, durability off (fsync, synchronous_commit, full_page_writes), \
             database migrated before trellisd starts; trellisd runs `serve --services all` on \
             them, with `TRELLIS_AUTH__LOGIN_PER_IP_PER_MINUTE` and \
             `TRELLIS_AUTH__REGISTER_PER_IP_PER_MINUTE` raised to 100000000 (every call comes \
             from 127.0.0.1; the lockout never triggers, passwords are right). Placement: {} — \
             on the servers' CPU, so a server and the database share one core.",
            stack.pg_version(),
            stack.placement()
        ));
    }
    if get("argon2-raw").is_some() || get("login").is_some() {
        let quick = if ctx.args.quick {
            format!(
                " **--quick lowers m to {} KiB** so that a debug build hashes fast (t and p \
                 unchanged): these login numbers are not OWASP-parameter numbers.",
                argon2.memory_kib
            )
        } else {
            String::new()
        };
        notes.push(format!(
            "argon2id parameters: m={} KiB, t={}, p={} — OWASP's, trellisd's `auth.argon2` \
             defaults, given to trellisd explicitly (`TRELLIS_AUTH__ARGON2__*`) and used by \
             argon2-raw.{quick}",
            argon2.memory_kib, argon2.iterations, argon2.parallelism
        ));
    }
    if let Some(raw) = get("argon2-raw") {
        notes.push(format!(
            "Single hash: {} (argon2-raw p50; p99 {}), {:.1} hashes/s on {}. trellisd is pinned \
             to one CPU, and `auth.hash_concurrency` 0 means one hashing thread per CPU it may \
             use, so the raw reference hashes on one thread pinned to that same CPU, at the \
             nice value of trellisd's hashing threads, with the servers idle.",
            ms(raw.p50_us),
            ms(raw.p99_us),
            raw.rps,
            raw.load
        ));
    }
    if let Some(login) = get("login") {
        let serial = facts
            .map(|f| f.serial_logins.clone())
            .filter(|v| !v.is_empty())
            .map(|mut v| {
                v.sort();
                format!(
                    " One login at a time, nothing else running: p50 {:.1} ms over {} logins \
                     (hash, account lookup, session, refresh-token and audit rows, token \
                     signing).",
                    v[v.len() / 2].as_secs_f64() * 1000.0,
                    v.len()
                )
            })
            .unwrap_or_default();
        let vs_raw = get("argon2-raw")
            .map(|raw| format!(" = {} the raw hash rate", ratio(login.rps, raw.rps)))
            .unwrap_or_default();
        let cost = match (get("argon2-raw"), login.server_cpu_us_per_call) {
            (Some(raw), Some(cpu)) => format!(
                " trellisd CPU per login {} vs {} per raw hash; minor page faults per login {} \
                 vs {} per raw hash (memory mapped fresh — {} KiB of argon2 blocks is {} pages).",
                ms(cpu),
                raw.server_cpu_us_per_call.map_or("?".to_string(), ms),
                faults(login.server_minor_faults_per_call),
                faults(raw.server_minor_faults_per_call),
                argon2.memory_kib,
                argon2.memory_kib / 4
            ),
            _ => String::new(),
        };
        notes.push(format!(
            "Login: {:.1} logins/s with {} ({} per CPU of this {}-CPU machine){vs_raw}. Login \
             latency under that load: p50 {}, p99 {} — the tasks queue for the one hashing \
             slot, so p50 ≈ tasks × hash time.{serial}{cost}",
            login.rps,
            login.load,
            login.concurrency / ctx.cpus.max(1),
            ctx.cpus,
            ms(login.p50_us),
            ms(login.p99_us),
        ));
    }
    if let (Some(idle), Some(busy)) = (get("noop-probe-idle"), get("noop-probe-login")) {
        let flood = floods
            .iter()
            .find(|f| f.during == busy.scenario)
            .map(|f| {
                format!(
                    " The {} load ran again for it, unrecorded: {:.1}/s, {} errors.",
                    f.load, f.rps, f.errors
                )
            })
            .unwrap_or_default();
        notes.push(format!(
            "mesh-noop probe at a fixed {PROBE_RPS} req/s: p99 {:.0} µs idle, {:.0} µs while \
             logins saturate the server's CPU ({}; target ≤ 2×); p50 {:.0} µs → {:.0} µs.{flood}",
            idle.p99_us,
            busy.p99_us,
            ratio(busy.p99_us, idle.p99_us),
            idle.p50_us,
            busy.p50_us
        ));
    }
    if let (Some(raw), Some(mesh)) = (get("user-get-raw"), get("user-get")) {
        // PostgreSQL's CPU per call, in µs.
        let db = |r: &ScenarioResult| {
            r.db_cpu_percent
                .filter(|_| r.rps > 0.0)
                .map_or("?".to_string(), |p| {
                    format!("{:.0} µs", p / 100.0 * 1e6 / r.rps)
                })
        };
        let cpu = |r: &ScenarioResult| {
            r.server_cpu_us_per_call
                .map_or("?".to_string(), |v| format!("{v:.0} µs"))
        };
        notes.push(format!(
            "GetUser: trellisd {:.0} req/s, p50 {:.0} µs vs the raw tokio-postgres handler {:.0} \
             req/s, p50 {:.0} µs ({} req/s). Both run the same query (the profile row by id with \
             its roles as an array) on the same PostgreSQL, each call on a connection of its own: trellisd \
             through diesel-async and its bb8 pool (16), the raw handler through a pool of \
             {USER_SERVER_CONNECTIONS} tokio-postgres connections, the statement prepared once. \
             Per call: server CPU {} vs {}, PostgreSQL CPU {} vs {} (trellisd vs raw; the two \
             share one CPU, so their sum sets the rate).",
            mesh.rps,
            mesh.p50_us,
            raw.rps,
            raw.p50_us,
            ratio(mesh.rps, raw.rps),
            cpu(mesh),
            cpu(raw),
            db(mesh),
            db(raw)
        ));
    }
    if let (Some(first), Some(deep), Some(f)) =
        (get("user-list-page1"), get("user-list-deep"), facts)
    {
        let secs = |d: Option<std::time::Duration>| {
            d.map_or("?".to_string(), |d| format!("{:.1} s", d.as_secs_f64()))
        };
        let page = f.deep_page.unwrap_or(0);
        notes.push(format!(
            "ListUsers: users table of {} rows ({} bulk-inserted by one INSERT … SELECT \
             generate_series, granted member, then VACUUM ANALYZE: {}); page {page} reached \
             once by walking {} page tokens from page 1 ({}); page_size {LIST_PAGE_SIZE}, \
             order_by create_time desc, total_size counted on every page. p50 page 1 {}, page \
             {page} {} ({}); p99 {} and {}. One client task each: latency without queueing.",
            f.list_rows.unwrap_or(0),
            f.list_users.unwrap_or(0),
            secs(f.bulk_insert),
            page.saturating_sub(1),
            secs(f.page_walk),
            ms(first.p50_us),
            ms(deep.p50_us),
            ratio(deep.p50_us, first.p50_us),
            ms(first.p99_us),
            ms(deep.p99_us),
        ));
    }
    if let Some(av) = get("auth-verify") {
        let vs = |name: &str| {
            get(name)
                .map(|r| format!("{} {name}", ratio(av.rps, r.rps)))
                .unwrap_or_default()
        };
        notes.push(format!(
            "auth-verify: {:.0} req/s with a bearer token verified on every call = {} and {} \
             req/s.",
            av.rps,
            vs("baseline"),
            vs("mesh-noop")
        ));
    }
    notes
}
