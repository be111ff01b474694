//! The report's notes: what the table's numbers rest on — the data stack
//! and where it ran, the argon2 parameters, the single-hash time and login
//! latency, the probe's idle and loaded p99, the GetUser and ListUsers
//! figures and how their fixtures were seeded, the LLM gateway's overhead
//! over the direct call, where it goes, and its rate ladder. One line per topic, only for
//! the scenarios that ran.

use trellis_core::config::Argon2Config;

use crate::fakellm;
use crate::report::ScenarioResult;
use crate::run::{Ctx, USER_SERVER_CONNECTIONS};
use crate::scenario::{
    CHAT_TTFT_P50_OVERHEAD_US, HELD_SHARE, LIST_PAGE_SIZE, LLM_P99_OVERHEAD_US, PROBE_RPS,
};
use crate::seed::SeedFacts;
use crate::servers::{self, ServerKind, Servers};

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
    if let Some(f) = facts
        && !f.settles.is_empty()
    {
        let mut ms: Vec<f64> = f.settles.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        notes.push(format!(
            "Settling: before each scenario (after its seeding) the bench runs `VACUUM ANALYZE` \
             and `CHECKPOINT` on the database, so the maintenance owed for earlier scenarios' \
             writes (10,000 chat turns, logins, usage rows) is not done by autovacuum or the \
             checkpointer during a later measurement, on the CPU the servers share; {} \
             settles, median {:.0} ms, longest {:.0} ms.",
            ms.len(),
            ms[ms.len() / 2],
            ms[ms.len() - 1]
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
    if let Some(mesh) = get("user-get") {
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
        let vs = |r: Option<&ScenarioResult>, how: &str| {
            r.map(|r| {
                format!(
                    "{how} {:.0} req/s, p50 {:.0} µs ({} req/s; per call server CPU {}, \
                     PostgreSQL CPU {})",
                    r.rps,
                    r.p50_us,
                    ratio(mesh.rps, r.rps),
                    cpu(r),
                    db(r)
                )
            })
        };
        let refs: Vec<String> = [
            vs(
                get("user-get-raw-mux"),
                "the raw tokio-postgres handler sharing its connections as trellisd does (the target's reference)",
            ),
            vs(
                get("user-get-raw"),
                &format!("the raw handler on a pool of {USER_SERVER_CONNECTIONS}, a connection per call"),
            ),
        ]
        .into_iter()
        .flatten()
        .collect();
        notes.push(format!(
            "GetUser: trellisd {:.0} req/s, p50 {:.0} µs, per call server CPU {}, PostgreSQL CPU {}; \
             {}. All run the same query (the profile row by id with its roles as an array, \
             prepared once per connection) on the same PostgreSQL: trellisd through diesel-async \
             on its multiplexed connections (`database.multiplexed_connections`, one per CPU it \
             may run on: the queries of concurrent calls are pipelined, so one write and one read \
             carry several), the raw handler with tokio-postgres directly. trellisd and its \
             reference share one CPU with PostgreSQL, so the sum of their CPU per call sets the rate.",
            mesh.rps,
            mesh.p50_us,
            cpu(mesh),
            db(mesh),
            if refs.is_empty() { "no reference in this run".to_string() } else { refs.join("; ") }
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
    if let (Some(direct), Some(gw)) = (get("llm-direct"), get("llm-gateway")) {
        notes.push(llm_overhead(direct, gw, running));
    }
    if let Some(max) = get("llm-max-rate") {
        notes.push(llm_ladder(max));
    }
    if let (Some(direct), Some(chat)) = (get("chat-ttft-direct"), get("chat-ttft")) {
        notes.push(chat_ttft(direct, chat, facts));
    }
    if let (Some(direct), Some(chat)) = (get("chat-relay-direct"), get("chat-relay")) {
        notes.push(chat_relay(ctx, direct, chat));
    }
    if let (Some(direct), Some(mesh), Some(f)) = (get("search-sql"), get("search"), facts) {
        notes.push(search(direct, mesh, get("search-sql-unprepared"), f));
    }
    if let (Some(direct), Some(mesh)) = (get("search-index-sql"), get("search-index")) {
        notes.push(search_index(direct, mesh));
    }
    if let Some(idle) = get("streams-idle")
        && let Some(rss) = &idle.rss
    {
        notes.push(streams_idle(idle, rss));
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

fn us_or(v: Option<f64>) -> String {
    v.map_or("?".to_string(), |v| format!("{v:.0} µs"))
}

/// PostgreSQL's CPU per call, in µs.
fn db_per_call(r: &ScenarioResult) -> String {
    r.db_cpu_percent
        .filter(|_| r.rps > 0.0)
        .map_or("?".to_string(), |p| {
            format!("{:.0} µs", p / 100.0 * 1e6 / r.rps)
        })
}

/// The LLM gateway's overhead over the direct call, and what the gateway
/// spends per call.
fn llm_overhead(direct: &ScenarioResult, gw: &ScenarioResult, running: &Servers) -> String {
    let fake_at = running
        .running
        .get(&ServerKind::FakeLlm)
        .map_or("?".to_string(), |p| {
            crate::cpu_list(&servers::cpus_of(p.pid()))
        });
    let (o50, o99) = (
        gw.p50_overhead_us.unwrap_or(f64::NAN),
        gw.p99_overhead_us.unwrap_or(f64::NAN),
    );
    let verdict = if gw.met { "met" } else { "**not met**" };
    let commands = if gw.redis_commands_per_call.is_empty() {
        String::new()
    } else {
        // Less what is not per call (health checks and the like).
        let mut list: Vec<_> = gw
            .redis_commands_per_call
            .iter()
            .filter(|(_, n)| **n >= 0.01)
            .collect();
        list.sort_by(|a, b| b.1.total_cmp(a.1).then(a.0.cmp(b.0)));
        let pings = gw
            .redis_commands_per_call
            .get("ping")
            .copied()
            .unwrap_or(0.0);
        format!(
            " Redis ran {:.1} commands per call ({}): the quota script (EVALSHA and the \
             commands it runs) before the upstream is called, the settlement (a pipeline) after \
             the stream{}.",
            list.iter().map(|(_, n)| **n).sum::<f64>(),
            list.iter()
                .map(|(c, n)| format!("{c} {n:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            if pings >= 0.5 {
                ", and a PING on each connection checkout"
            } else {
                ""
            }
        )
    };
    let m = |k: &str| gw.server_means_us.get(k).copied();
    let timings = match (
        m("grpc_call"),
        m("upstream_call"),
        m("upstream_first_token"),
    ) {
        (Some(call), Some(up), first) => format!(
            " trellisd's own timings (means over the window, from its /metrics): the call \
             {call:.0} µs until its last message (the bench saw a mean of {:.0} µs; the direct \
             call's mean {:.0} µs), of which the upstream call {up:.0} µs (first token after \
             {}) and, before and after it (authentication, the quota script, the last event), \
             {:.0} µs.",
            gw.mean_us,
            direct.mean_us,
            first.map_or("?".to_string(), |f| format!("{f:.0} µs")),
            call - up
        ),
        _ => String::new(),
    };
    format!(
        "LLM gateway overhead at {rate} req/s (open loop, {tasks} client tasks, latency from \
         sending to the end of the stream; the same fake upstream, same run): direct p50 {} / \
         p99 {}, through GenerateStream p50 {} / p99 {} — overhead {o50:+.0} µs at p50, \
         {o99:+.0} µs at p99 (target p99 ≤ +{:.0} ms with 0 errors: {verdict}; errors {} \
         direct, {} gateway). The fake upstream is `trellis-bench fake-llm`, a child process \
         pinned to {fake_at} like the other reference servers, answering each request at once \
         with {} content chunks of \"{}\", a stop chunk, a usage chunk and [DONE] as separate \
         HTTP/1.1 body chunks; during llm-gateway it shares that CPU with trellisd, PostgreSQL \
         and Redis, all busy. llm-direct posts the exact body trellisd sends upstream \
         (one keep-alive HTTP/1.1 connection per client task) and parses every event; \
         llm-gateway calls GenerateStream with a member's access token over one HTTP/2 \
         connection, model alias `{}` routed to provider `{}` (`{}`), every quota set to 0 = \
         unlimited (`TRELLIS_LLM__DEFAULT_LIMITS__*`), and checks 16 deltas then Completed. \
         Per call: trellisd CPU {}, fake upstream CPU {} behind trellisd vs {} called directly, \
         Redis CPU {}, PostgreSQL CPU {} (usage rows, written in batches{}).{timings}{commands}",
        ms(direct.p50_us),
        ms(direct.p99_us),
        ms(gw.p50_us),
        ms(gw.p99_us),
        LLM_P99_OVERHEAD_US / 1000.0,
        direct.error_total(),
        gw.error_total(),
        fakellm::CHUNKS,
        fakellm::PIECE,
        fakellm::ALIAS,
        fakellm::PROVIDER,
        fakellm::UPSTREAM_MODEL,
        us_or(gw.server_cpu_us_per_call),
        us_or(gw.upstream_cpu_us_per_call),
        us_or(direct.server_cpu_us_per_call),
        us_or(gw.redis_cpu_us_per_call),
        db_per_call(gw),
        match (gw.pg_transactions_per_call, gw.usage_rows_per_call) {
            (Some(x), Some(rows)) => format!(
                ": {x:.2} transactions and {rows:.2} llm_usage rows per call, so {:.1} rows a \
                 transaction",
                if x > 0.0 { rows / x } else { f64::NAN }
            ),
            _ => String::new(),
        },
        rate = gw.rate.unwrap_or(0.0),
        tasks = gw.concurrency,
    )
}

/// Chat's time to first token over the direct call's.
fn chat_ttft(direct: &ScenarioResult, chat: &ScenarioResult, facts: Option<&SeedFacts>) -> String {
    let verdict = if chat.met { "met" } else { "**not met**" };
    let captured = facts
        .and_then(|f| {
            f.captured_bytes
                .iter()
                .find(|(m, _)| *m == fakellm::UPSTREAM_MODEL)
        })
        .map_or(String::new(), |(_, n)| format!(" ({n} bytes)"));
    let sessions = facts
        .and_then(|f| f.chat_sessions)
        .map_or(String::new(), |(n, d)| {
            format!(
                " The {n} sessions the chat turns take in turn were bulk-inserted in one statement \
                 ({:.1} s), so every measured turn is its session's first: the same prompt, no \
                 history.",
                d.as_secs_f64()
            )
        });
    let history = facts
        .and_then(|f| f.chat_history)
        .map_or(String::new(), |(n, d)| {
            format!(
                " Beside them, {n} messages of the member's earlier conversations (50 to a \
                 session of their own) were bulk-inserted ({:.1} s) and analysed with the rest, \
                 so the turns query a table with statistics, as in a deployment.",
                d.as_secs_f64()
            )
        });
    let m = |k: &str| chat.server_means_us.get(k).copied();
    let inside = match (m("chat_first_token"), m("upstream_first_token")) {
        (Some(c), u) => format!(
            " trellisd's own means over the window (/metrics): chat's first token {c:.0} µs \
             after the turn was accepted (the user message and the STREAMING reply stored), the \
             gateway's upstream first token {}; the rest of the bench's {:.0} µs mean is \
             before acceptance (authentication, the session read, the turn's transaction) and \
             the relay of the delta.",
            u.map_or("?".to_string(), |u| format!("{u:.0} µs")),
            chat.mean_us
        ),
        _ => String::new(),
    };
    format!(
        "Chat time to first token at concurrency 1 (one client task, closed loop): the fake \
         upstream called directly p50 {} / p99 {}, through ChatService.SendMessage p50 {} / p99 \
         {} — overhead {:+.0} µs at p50, {:+.0} µs at p99 (target p50 ≤ +{:.1} ms with 0 errors: \
         {verdict}). The direct call posts the body trellisd's chat posted for a first turn, \
         captured from the fake{captured}, and stops the clock at the first content chunk; the \
         chat turn stops it at the first Delta event, having gone through authentication, the \
         session lookup, the turn's transaction, the user's preferences (UserService over the \
         mesh, cached), LlmService.GenerateStream over the mesh (the quota script in Redis) and \
         the fake upstream. Both read their answers to the end and check them. Per turn: \
         trellisd CPU {}, PostgreSQL CPU {}, Redis CPU {}.{sessions}{history}{inside}",
        us_or(Some(direct.p50_us)),
        us_or(Some(direct.p99_us)),
        us_or(Some(chat.p50_us)),
        us_or(Some(chat.p99_us)),
        chat.p50_overhead_us.unwrap_or(f64::NAN),
        chat.p99_overhead_us.unwrap_or(f64::NAN),
        CHAT_TTFT_P50_OVERHEAD_US / 1000.0,
        us_or(chat.server_cpu_us_per_call),
        db_per_call(chat),
        us_or(chat.redis_cpu_us_per_call),
    )
}

/// Chat's relay throughput over the direct upstream rate.
fn chat_relay(ctx: &Ctx<'_>, direct: &ScenarioResult, chat: &ScenarioResult) -> String {
    let script = ctx.chat.relay;
    let interval = script.interval.unwrap_or_default();
    let ideal = interval.as_secs_f64() * 1e6 * (script.chunks + 2) as f64;
    let tokens = |r: &ScenarioResult| r.rps * script.chunks as f64;
    let verdict = if chat.met { "met" } else { "**not met**" };
    format!(
        "Chat relay at {} concurrent streams (closed loop, one client task a stream; the chat \
         turns over one HTTP/2 connection, the direct calls on one HTTP/1.1 connection each): \
         the fake upstream streams {} tokens {} µs apart (a reply takes at least {} µs), so \
         the direct rate is the upstream's own pace: {:.1} replies/s = {:.0} tokens/s, a reply in \
         p50 {} / p99 {}. Through ChatService.SendMessage: {:.1} replies/s = {:.0} tokens/s \
         ({:.2}× direct; target ≥ 0.9×: {verdict}), a reply in p50 {} / p99 {}. Every token \
         crosses the gateway (SSE parsed, a GenerateStream message over the mesh), chat (a \
         local broadcast, a Redis PUBLISH, the client's stream) and is checked in order; the \
         reply is written every flush interval and finalised. CPU over the window: trellisd \
         {}, PostgreSQL {}, Redis {}, fake upstream {}, bench {} (% of one CPU; the first four \
         share the servers' CPU).",
        chat.concurrency,
        script.chunks,
        interval.as_micros(),
        ideal.round(),
        direct.rps,
        tokens(direct),
        us_or(Some(direct.p50_us)),
        us_or(Some(direct.p99_us)),
        chat.rps,
        tokens(chat),
        chat.rps / direct.rps,
        us_or(Some(chat.p50_us)),
        us_or(Some(chat.p99_us)),
        pct(chat.server_cpu_percent),
        pct(chat.db_cpu_percent),
        pct(chat.redis_cpu_percent),
        pct(chat.upstream_cpu_percent),
        pct(chat.client_cpu_percent),
    )
}

/// Search through the mesh over the same SQL run directly.
fn search(
    direct: &ScenarioResult,
    mesh: &ScenarioResult,
    unprepared: Option<&ScenarioResult>,
    f: &SeedFacts,
) -> String {
    let verdict = if mesh.met { "met" } else { "**not met**" };
    let unprepared = unprepared.map_or(String::new(), |u| {
        format!(
            " The same SQL with both statements prepared on every call, as diesel runs \
             trellisd's `sql_query` statements (it never caches them: a round trip more, \
             parsed and planned each time): p50 {} / p99 {} ({} p50 of search-sql), PostgreSQL \
             CPU {} per query — the part of search's gap that statement caching would close.",
            ms(u.p50_us),
            ms(u.p99_us),
            ratio(u.p50_us, direct.p50_us),
            db_per_call(u),
        )
    });
    let corpus = f.corpus.as_ref().map_or(String::new(), |(n, took, said)| {
        format!(
            " Corpus: {n} documents, from `trellisd seed` (the project's synthetic candidate \
             profiles and help articles, indexed through its batch upsert: \"{said}\") then \
             VACUUM ANALYZE, {:.1} s in all.",
            took.as_secs_f64()
        )
    });
    let queries = crate::seed::search_mix()
        .iter()
        .zip(&f.search_hits)
        .map(|(q, (hits, total))| {
            let mut filters = Vec::new();
            if !q.collections.is_empty() {
                filters.push(format!("collections {}", q.collections.join(",")));
            }
            if !q.tags.is_empty() {
                filters.push(format!("tags {}", q.tags.join(",")));
            }
            for (k, v) in &q.attributes {
                filters.push(format!("{k}={v}"));
            }
            format!(
                "`{}` ({}; {hits} hits of {total})",
                q.text,
                if filters.is_empty() {
                    "no filter".to_string()
                } else {
                    filters.join(", ")
                }
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "Search: through the mesh p50 {} / p99 {} vs the same SQL run directly p50 {} / p99 {} \
         ({} p50, {} p99; target ≤ 1.2× both: {verdict}), one client task each, the queries taken \
         in turn: {queries}; page size {}, a member's visibility (own or shared), language {}. \
         Before measuring, every query ran both ways and the hits had to be the same, in order \
         (the bench's statements are a copy of crates/search/src/query.rs). trellisd also writes \
         a search_history row per first page, after answering. Per query: PostgreSQL CPU {} \
         direct vs {} through trellisd, trellisd CPU {}.{unprepared}{corpus}",
        ms(mesh.p50_us),
        ms(mesh.p99_us),
        ms(direct.p50_us),
        ms(direct.p99_us),
        ratio(mesh.p50_us, direct.p50_us),
        ratio(mesh.p99_us, direct.p99_us),
        crate::seed::SEARCH_PAGE_SIZE,
        crate::seed::SEARCH_LANGUAGE,
        db_per_call(direct),
        db_per_call(mesh),
        us_or(mesh.server_cpu_us_per_call),
    )
}

/// Indexing throughput through the mesh and directly.
fn search_index(direct: &ScenarioResult, mesh: &ScenarioResult) -> String {
    let batch = crate::seed::INDEX_BATCH as f64;
    let per_doc = |r: &ScenarioResult| {
        r.db_cpu_percent
            .filter(|_| r.rps > 0.0)
            .map_or("?".to_string(), |p| {
                format!("{:.0} µs", p / 100.0 * 1e6 / (r.rps * batch))
            })
    };
    format!(
        "Indexing: IndexDocuments through the mesh {:.0} documents/s ({:.1} calls/s of {batch} \
         documents, {} client tasks; a call p50 {} / p99 {}) vs trellisd's upsert statement run \
         directly {:.0} documents/s (p50 {} / p99 {}): {} (reported, no target). Each call \
         indexes new documents (fresh external ids: inserts, not replacements) copied from the \
         corpus's candidate profiles into their own collection; PostgreSQL computes each \
         tsvector (english, title weight A, body B) and maintains the GIN indexes. PostgreSQL CPU \
         per document {} through trellisd vs {} directly; trellisd CPU per call {} (validation, \
         decoding 200 documents, binding the arrays).",
        mesh.rps * batch,
        mesh.rps,
        mesh.concurrency,
        ms(mesh.p50_us),
        ms(mesh.p99_us),
        direct.rps * batch,
        ms(direct.p50_us),
        ms(direct.p99_us),
        ratio(mesh.rps, direct.rps),
        per_doc(mesh),
        per_doc(direct),
        us_or(mesh.server_cpu_us_per_call),
    )
}

/// Idle Converse streams and trellisd's memory with them.
fn streams_idle(r: &ScenarioResult, rss: &crate::report::RssReport) -> String {
    let verdict = if r.met { "met" } else { "**not met**" };
    let at_target = if rss.projected {
        format!(
            "projected to {} streams (the RSS measured + {:.1} KB for each stream missing): {:.0} MB",
            rss.target_streams, rss.marginal_kb, rss.at_target_mb
        )
    } else {
        format!(
            "measured with {} streams: {:.0} MB",
            rss.streams, rss.at_target_mb
        )
    };
    format!(
        "streams-idle: {} Converse streams over {} HTTP/2 connections ({} streams each), opened \
         {} at a time in {:.1} s, each made live with one short turn (p50 {} / p99 {} to open \
         one, its turn included), then held open and idle, every one checked still open before \
         they were closed. trellisd's RSS (VmRSS): {:.1} MB before, {:.1} MB with half of them, \
         {:.1} MB with all of them ({:+.1} KB a stream over all, {:+.1} KB at the margin — the \
         second half, without the first turns' one-off growth), {:.1} MB a second after closing \
         them. Server RSS {at_target} (target ≤ {:.0} MB: {verdict}).",
        rss.streams,
        rss.connections,
        crate::idle::PER_CONNECTION,
        crate::idle::OPENING,
        rss.opening_s,
        ms(r.p50_us),
        ms(r.p99_us),
        rss.before_mb,
        rss.half_mb,
        rss.with_mb,
        rss.per_stream_kb,
        rss.marginal_kb,
        rss.after_close_mb,
        rss.limit_mb,
    )
}

fn pct(v: Option<f64>) -> String {
    v.map_or("?".to_string(), |v| format!("{v:.0}%"))
}

/// The rate ladder, step by step.
fn llm_ladder(max: &ScenarioResult) -> String {
    let steps = max
        .steps
        .iter()
        .map(|s| {
            let errors = if s.errors.is_empty() {
                String::new()
            } else {
                format!(
                    ", errors {}",
                    s.errors
                        .iter()
                        .map(|(c, n)| format!("{c} {n}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            };
            let pct = |v: Option<f64>| v.map_or("?".to_string(), |v| format!("{v:.0}%"));
            format!(
                "{:.0} → {} (achieved {:.0}/s, p50 {}, p99 {}, CPU trellisd {}, PostgreSQL {}, \
                 Redis {}, bench {}{errors})",
                s.offered_rps,
                if s.held { "held" } else { "not held" },
                s.achieved_rps,
                ms(s.p50_us),
                ms(s.p99_us),
                pct(s.server_cpu_percent),
                pct(s.db_cpu_percent),
                pct(s.redis_cpu_percent),
                pct(s.client_cpu_percent),
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    format!(
        "llm-max-rate: GenerateStream at rising fixed rates ({}, {} client tasks on one HTTP/2 \
         connection). A step is held when no call failed and the achieved rate — calls sent in \
         the window ÷ the time from the window's start until the last of them ended, so a \
         backlog counts — is at least {:.0}% of the offered one; a step not held is run once \
         more (the machine is noisy) and the ladder stops at its second miss. Highest rate \
         held: {}. Where PostgreSQL's CPU drops to about 0%, trellisd's one worker thread is \
         saturated and its usage writer falls behind (rows queue in memory, up to 20,000, and \
         are written between steps): those steps do not pay for accounting in their window. \
         Steps: {steps}.",
        max.load,
        max.concurrency,
        HELD_SHARE * 100.0,
        max.held_rps
            .map_or("none".to_string(), |h| format!("{h:.0} req/s")),
    )
}
