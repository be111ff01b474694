//! The scenarios: what each one measures (calls on which server, over which
//! protocol, at what load — or the raw argon2 rate), and the target it is
//! held to relative to another scenario.
//!
//! Adding a scenario is one entry in [`SCENARIOS`]. A scenario that calls a
//! new RPC also needs a variant of [`Rpc`](crate::calls::Rpc) and its
//! seeding in [`crate::seed`]; one against a new kind of server a variant of
//! [`ServerKind`](crate::servers::ServerKind). The table is run in order, so
//! a reference must come before the scenarios that compare themselves to
//! it; a scenario run `alongside` another is listed after it.

use crate::calls::{Protocol, Rpc};
use crate::servers::ServerKind;

/// One measured thing: a call path under load, or the raw argon2 rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scenario {
    /// Short name: `--scenario` value and file name in the output directory.
    pub name: &'static str,
    /// One line for the report.
    pub about: &'static str,
    pub work: Work,
    /// What it is held to; `None` for a reference scenario.
    pub target: Option<Target>,
    /// Another scenario whose req/s and p99 this one's are also compared
    /// to in the report (not held to).
    pub also_vs: Option<&'static str>,
    /// Runs while this other scenario's load runs again, unrecorded, over
    /// the same window (a probe during a flood); the other's own result is
    /// measured alone, so the probe does not take from it. Selecting either
    /// selects both.
    pub alongside: Option<&'static str>,
}

/// What a scenario measures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Work {
    /// Calls `rpc` on `server` over `protocol` with `load`.
    Rpc {
        server: ServerKind,
        protocol: Protocol,
        rpc: Rpc,
        load: Load,
    },
    /// argon2id hashes computed by the bench itself with the `argon2`
    /// crate and trellisd's parameters, on as many threads as trellisd
    /// hashes on, pinned to the same CPUs: the ceiling for logins/s.
    Argon2,
    /// Converse streams opened on trellisd, each made live with one short
    /// turn, then held idle together while trellisd's RSS is read
    /// ([`crate::idle`]); held to an absolute RSS bound, not a reference.
    IdleStreams,
}

/// How a scenario's client tasks pace their calls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// The run's `--concurrency` / `--rate`.
    Run,
    /// Closed loop, this many tasks per CPU of the machine.
    PerCpu(usize),
    /// Closed loop, this many tasks.
    Tasks(usize),
    /// Open loop: this many requests/s over `tasks` tasks.
    Rate { rps: f64, tasks: usize },
    /// Open loop at the run's LLM rate (`--llm-rate`) over `tasks` tasks.
    LlmRate { tasks: usize },
    /// Open loop at each rate of the run's LLM ladder (`--llm-steps`) in
    /// turn, a short window each, over `tasks` tasks; the result is the
    /// highest step held (see [`HELD_SHARE`]).
    LlmSteps { tasks: usize },
    /// Closed loop, one task per concurrent stream of the chat relay
    /// (100; --quick fewer).
    RelayStreams,
}

/// A scenario's goal, as ratios to its reference scenario's results.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target {
    /// Name of the scenario compared against (run first, in the same run).
    pub reference: &'static str,
    /// Requests/s must be at least this fraction of the reference's.
    pub min_rps_ratio: Option<f64>,
    /// p50 latency must be at most this multiple of the reference's.
    pub max_p50_ratio: Option<f64>,
    /// p99 latency must be at most this multiple of the reference's.
    pub max_p99_ratio: Option<f64>,
    /// p50 latency may exceed the reference's by at most this many µs
    /// (an absolute overhead), with no call failing.
    pub max_p50_overhead_us: Option<f64>,
    /// p99 latency may exceed the reference's by at most this many µs
    /// (an absolute overhead), with no call failing.
    pub max_p99_overhead_us: Option<f64>,
    /// A rate ladder's highest step held must be at least the rate the
    /// reference was run at.
    pub holds_reference_rate: bool,
}

impl Target {
    /// A target against `reference` with no bound yet.
    const fn of(reference: &'static str) -> Target {
        Target {
            reference,
            min_rps_ratio: None,
            max_p50_ratio: None,
            max_p99_ratio: None,
            max_p50_overhead_us: None,
            max_p99_overhead_us: None,
            holds_reference_rate: false,
        }
    }

    const fn rps(reference: &'static str, min: f64) -> Target {
        Target {
            min_rps_ratio: Some(min),
            ..Target::of(reference)
        }
    }
}

/// The fixed rate of the mesh-noop latency probes, requests/s.
pub const PROBE_RPS: f64 = 200.0;
/// Client tasks sharing a probe's schedule.
pub const PROBE_TASKS: usize = 8;
/// ListUsers page size of the list scenarios.
pub const LIST_PAGE_SIZE: i32 = 20;
/// Client tasks sharing the LLM scenarios' fixed rate.
pub const LLM_TASKS: usize = 16;
/// Client tasks sharing the LLM ladder's rates.
pub const LLM_STEP_TASKS: usize = 64;
/// A ladder step is held when no call failed and the achieved rate is at
/// least this share of the offered one.
pub const HELD_SHARE: f64 = 0.95;
/// The LLM gateway's target: p99 at most this much above the direct call's.
pub const LLM_P99_OVERHEAD_US: f64 = 1000.0;
/// Client tasks of the indexing scenarios.
pub const INDEX_TASKS: usize = 4;
/// Chat's time-to-first-token target: p50 at most this much above the
/// direct call's.
pub const CHAT_TTFT_P50_OVERHEAD_US: f64 = 500.0;

const fn rpc(server: ServerKind, rpc: Rpc, load: Load) -> Work {
    Work::Rpc {
        server,
        protocol: Protocol::Grpc,
        rpc,
        load,
    }
}

const PROBE: Load = Load::Rate {
    rps: PROBE_RPS,
    tasks: PROBE_TASKS,
};

const LLM: Load = Load::LlmRate { tasks: LLM_TASKS };

/// Every scenario, in run order (references before what is held to them).
pub const SCENARIOS: &[Scenario] = &[
    // First: it measures a freshly started trellisd's memory, before the
    // other scenarios' load leaves the allocator holding what it used.
    Scenario {
        name: "streams-idle",
        about: "10,000 (--quick: 200) ChatService.Converse streams, 100 per HTTP/2 connection, each opened and \
                made live with one short turn (Send → Accepted, deltas, Completed), then all held open and \
                idle together; trellisd's RSS before, with them, and after closing them. Latencies: each \
                stream's opening, its turn included",
        work: Work::IdleStreams,
        target: None,
        also_vs: None,
        alongside: None,
    },
    Scenario {
        name: "baseline",
        about: "bare tonic server (no layers), same SystemService.GetInfo handler, native gRPC",
        work: rpc(ServerKind::Baseline, Rpc::SystemGetInfo, Load::Run),
        target: None,
        also_vs: None,
        alongside: None,
    },
    Scenario {
        name: "mesh-noop",
        about: "trellisd SystemService.GetInfo through the full layer stack, no credentials, native gRPC",
        work: rpc(ServerKind::Trellisd, Rpc::SystemGetInfo, Load::Run),
        target: Some(Target {
            max_p99_ratio: Some(1.3),
            ..Target::rps("baseline", 0.85)
        }),
        also_vs: None,
        alongside: None,
    },
    Scenario {
        name: "grpc-web",
        about: "trellisd SystemService.GetInfo over gRPC-web on HTTP/1.1 (one keep-alive connection per task)",
        work: Work::Rpc {
            server: ServerKind::Trellisd,
            protocol: Protocol::GrpcWeb,
            rpc: Rpc::SystemGetInfo,
            load: Load::Run,
        },
        target: Some(Target::rps("mesh-noop", 0.95)),
        also_vs: None,
        alongside: None,
    },
    Scenario {
        name: "auth-verify",
        about: "trellisd SystemService.GetInfo with `authorization: Bearer <access token>`: the no-op plus the \
                authentication layer's token verification (signature, claims, revocation set, verified-token cache)",
        work: rpc(ServerKind::Trellisd, Rpc::SystemGetInfoAuthed, Load::Run),
        target: Some(Target::rps("baseline", 0.8)),
        also_vs: Some("mesh-noop"),
        alongside: None,
    },
    Scenario {
        name: "noop-probe-idle",
        about: "mesh-noop latency probe at a fixed 200 req/s (open loop), nothing else running",
        work: rpc(ServerKind::Trellisd, Rpc::SystemGetInfo, PROBE),
        target: None,
        also_vs: None,
        alongside: None,
    },
    Scenario {
        name: "argon2-raw",
        about: "raw argon2id hashes/s in the bench process (argon2 crate, trellisd's parameters) on as \
                many threads as trellisd hashes on, pinned like them, at their nice value; p50 is the \
                single-hash time",
        work: Work::Argon2,
        target: None,
        also_vs: None,
        alongside: None,
    },
    Scenario {
        name: "login",
        about: "AuthService.Login, logins/s at 2 client tasks per CPU, each task its own account (right password)",
        work: rpc(ServerKind::Trellisd, Rpc::Login, Load::PerCpu(2)),
        target: Some(Target::rps("argon2-raw", 0.9)),
        also_vs: None,
        alongside: None,
    },
    Scenario {
        name: "noop-probe-login",
        about: "the mesh-noop probe (200 req/s, open loop) while login's load runs again (unrecorded) \
                and saturates the server's CPU",
        work: rpc(ServerKind::Trellisd, Rpc::SystemGetInfo, PROBE),
        target: Some(Target {
            max_p99_ratio: Some(2.0),
            ..Target::of("noop-probe-idle")
        }),
        also_vs: None,
        alongside: Some("login"),
    },
    Scenario {
        name: "user-get-raw",
        about: "bare tonic UserService.GetUser running trellisd's query (profile row and roles in one \
                SELECT) with tokio-postgres, a pool of 16 connections: no auth, no layers",
        work: rpc(ServerKind::UserRaw, Rpc::GetUser, Load::Run),
        target: None,
        also_vs: None,
        alongside: None,
    },
    Scenario {
        name: "user-get-raw-mux",
        about: "the same bare handler sharing its connections as trellisd's GetUser does: one per \
                CPU it may run on (at most 8), every call's query pipelined on them by tokio-postgres",
        work: rpc(ServerKind::UserRawMux, Rpc::GetUser, Load::Run),
        target: None,
        also_vs: None,
        alongside: None,
    },
    Scenario {
        name: "user-get",
        about: "trellisd UserService.GetUser of another account with an admin's access token",
        work: rpc(ServerKind::Trellisd, Rpc::GetUser, Load::Run),
        target: Some(Target::rps("user-get-raw-mux", 0.9)),
        also_vs: Some("user-get-raw"),
        alongside: None,
    },
    Scenario {
        name: "user-list-page1",
        about: "trellisd UserService.ListUsers page 1 (page_size 20, create_time desc) of the bulk-loaded \
                users table, one client task",
        work: rpc(ServerKind::Trellisd, Rpc::ListUsersFirst, Load::Tasks(1)),
        target: None,
        also_vs: None,
        alongside: None,
    },
    Scenario {
        name: "user-list-deep",
        about: "the same list's deep page (500; --quick: 50) with the page token reached by walking the \
                pages once, one client task",
        work: rpc(ServerKind::Trellisd, Rpc::ListUsersDeep, Load::Tasks(1)),
        target: Some(Target {
            max_p50_ratio: Some(1.5),
            ..Target::of("user-list-page1")
        }),
        also_vs: None,
        alongside: None,
    },
    Scenario {
        name: "llm-direct",
        about: "the fake OpenAI-compatible upstream called straight from the bench: POST /v1/chat/completions \
                (stream, usage asked for), the SSE answer (16 content chunks, stop, usage, [DONE]; no delays) \
                read and parsed to its end, one HTTP/1.1 keep-alive connection per task",
        work: Work::Rpc {
            server: ServerKind::FakeLlm,
            protocol: Protocol::OpenAi,
            rpc: Rpc::ChatCompletions,
            load: LLM,
        },
        target: None,
        also_vs: None,
        alongside: None,
    },
    Scenario {
        name: "llm-gateway",
        about: "trellisd LlmService.GenerateStream of a model alias routed to that same fake upstream, with a \
                member's access token (quotas unlimited, still checked and charged in Redis), read to the end \
                of the stream (16 deltas, then Completed)",
        work: rpc(ServerKind::Trellisd, Rpc::GenerateStream, LLM),
        target: Some(Target {
            max_p99_overhead_us: Some(LLM_P99_OVERHEAD_US),
            ..Target::of("llm-direct")
        }),
        also_vs: None,
        alongside: None,
    },
    Scenario {
        name: "llm-max-rate",
        about: "llm-gateway's call at rising fixed rates, a short window each; the result is the highest step \
                held: no call failed and ≥ 95% of the offered rate achieved (calls sent in the window over the \
                time until the last of them ended)",
        work: rpc(
            ServerKind::Trellisd,
            Rpc::GenerateStream,
            Load::LlmSteps {
                tasks: LLM_STEP_TASKS,
            },
        ),
        target: Some(Target {
            holds_reference_rate: true,
            ..Target::of("llm-gateway")
        }),
        also_vs: None,
        alongside: None,
    },
    Scenario {
        name: "chat-ttft-direct",
        about: "the fake upstream called straight from the bench with the exact body trellisd's chat sends it \
                for a session's first turn (captured from the fake), one client task: latency from sending \
                until the first content chunk arrives (the answer is then read and checked to its end)",
        work: Work::Rpc {
            server: ServerKind::FakeLlm,
            protocol: Protocol::OpenAi,
            rpc: Rpc::ChatUpstreamFirstToken,
            load: Load::Tasks(1),
        },
        target: None,
        also_vs: None,
        alongside: None,
    },
    Scenario {
        name: "chat-ttft",
        about: "trellisd ChatService.SendMessage, the first turn of a fresh session, with a member's token, one \
                client task: latency from sending until the first Delta event (then read to Completed), \
                through chat → LlmService.GenerateStream over the mesh → the same fake upstream",
        work: rpc(ServerKind::Trellisd, Rpc::ChatFirstToken, Load::Tasks(1)),
        target: Some(Target {
            max_p50_overhead_us: Some(CHAT_TTFT_P50_OVERHEAD_US),
            ..Target::of("chat-ttft-direct")
        }),
        also_vs: None,
        alongside: None,
    },
    Scenario {
        name: "chat-relay-direct",
        about: "the fake upstream's paced script (200 tokens 5 ms apart; --quick 50, 10 ms) called straight \
                from the bench at 100 concurrent streams (--quick 20), one HTTP/1.1 connection each, with the \
                body trellisd's chat sends it; full replies/s, each read and checked to its end",
        work: Work::Rpc {
            server: ServerKind::FakeLlm,
            protocol: Protocol::OpenAi,
            rpc: Rpc::ChatUpstreamRelay,
            load: Load::RelayStreams,
        },
        target: None,
        also_vs: None,
        alongside: None,
    },
    Scenario {
        name: "chat-relay",
        about: "trellisd ChatService.SendMessage of the model routed to that paced script, at as many concurrent \
                streams over one HTTP/2 connection, each turn a fresh session's first: full replies/s, every \
                delta relayed through chat and checked",
        work: rpc(ServerKind::Trellisd, Rpc::ChatRelay, Load::RelayStreams),
        target: Some(Target::rps("chat-relay-direct", 0.9)),
        also_vs: None,
        alongside: None,
    },
    Scenario {
        name: "search-sql",
        about: "trellisd's own search SQL (the page of hits with ts_headline snippets, then the capped count) \
                run by the bench straight on PostgreSQL with tokio-postgres, statements prepared once, over \
                the 100,000-document corpus (--quick 3,000), one client task taking the 5-query mix in turn",
        work: Work::Rpc {
            server: ServerKind::Postgres,
            protocol: Protocol::Sql,
            rpc: Rpc::SearchSql,
            load: Load::Tasks(1),
        },
        target: None,
        also_vs: None,
        alongside: None,
    },
    Scenario {
        name: "search-sql-unprepared",
        about: "search-sql with each statement prepared on every call (a round trip more, parsed and planned \
                each time), as trellisd's diesel runs its `sql_query` statements, which it never caches: \
                the share of search's time that is statement preparation (reported)",
        work: Work::Rpc {
            server: ServerKind::Postgres,
            protocol: Protocol::Sql,
            rpc: Rpc::SearchSqlUnprepared,
            load: Load::Tasks(1),
        },
        target: None,
        also_vs: Some("search-sql"),
        alongside: None,
    },
    Scenario {
        name: "search",
        about: "trellisd SearchService.Search of the same queries with a member's token, one client task: \
                the same statements, plus authentication, validation, the sealed page token and the \
                history row (written after the answer)",
        work: rpc(ServerKind::Trellisd, Rpc::Search, Load::Tasks(1)),
        target: Some(Target {
            max_p50_ratio: Some(1.2),
            max_p99_ratio: Some(1.2),
            ..Target::of("search-sql")
        }),
        also_vs: None,
        alongside: None,
    },
    Scenario {
        name: "search-index-sql",
        about: "trellisd's own IndexDocuments upsert (one INSERT … SELECT FROM unnest … ON CONFLICT DO UPDATE \
                per batch, tsvector computed by PostgreSQL) run by the bench straight on PostgreSQL, batches \
                of 200 new candidate profiles, 4 client tasks",
        work: Work::Rpc {
            server: ServerKind::Postgres,
            protocol: Protocol::Sql,
            rpc: Rpc::IndexSql,
            load: Load::Tasks(INDEX_TASKS),
        },
        target: None,
        also_vs: None,
        alongside: None,
    },
    Scenario {
        name: "search-index",
        about: "trellisd SearchService.IndexDocuments of the same batches (200 documents a call) with a member's \
                token, 4 client tasks: documents/s = req/s × 200, reported against the direct upsert",
        work: rpc(
            ServerKind::Trellisd,
            Rpc::IndexDocuments,
            Load::Tasks(INDEX_TASKS),
        ),
        target: None,
        also_vs: Some("search-index-sql"),
        alongside: None,
    },
];

impl Scenario {
    /// The server this scenario calls, if any.
    pub fn server(&self) -> Option<ServerKind> {
        match self.work {
            Work::Rpc { server, .. } => Some(server),
            Work::IdleStreams => Some(ServerKind::Trellisd),
            Work::Argon2 => None,
        }
    }

    /// Whether it needs trellisd with PostgreSQL and Redis behind it.
    pub fn needs_store(&self) -> bool {
        match self.work {
            // The chat references post the body trellisd's chat sends,
            // captured from a turn; the SQL references need the database.
            Work::Rpc { server, rpc, .. } => {
                matches!(server, ServerKind::UserRaw | ServerKind::UserRawMux)
                    || !matches!(rpc, Rpc::SystemGetInfo | Rpc::ChatCompletions)
            }
            Work::IdleStreams => true,
            Work::Argon2 => false,
        }
    }

    /// Whether it needs the fake LLM upstream (called directly, or through
    /// trellisd).
    pub fn needs_fake_llm(&self) -> bool {
        matches!(
            self.work,
            Work::IdleStreams
                | Work::Rpc {
                    rpc: Rpc::ChatCompletions
                        | Rpc::GenerateStream
                        | Rpc::ChatUpstreamFirstToken
                        | Rpc::ChatUpstreamRelay
                        | Rpc::ChatFirstToken
                        | Rpc::ChatRelay,
                    ..
                }
        )
    }
}

/// Looks a scenario up by name.
pub fn by_name(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// The scenarios to run for the names asked for (all when none), with the
/// references they compare against added, in table order.
pub fn select(names: &[String]) -> anyhow::Result<Vec<&'static Scenario>> {
    if names.is_empty() {
        return Ok(SCENARIOS.iter().collect());
    }
    let mut wanted: Vec<&'static str> = Vec::new();
    for name in names {
        let mut next = Some(by_name(name).ok_or_else(|| {
            anyhow::anyhow!(
                "unknown scenario '{name}' (known: {})",
                SCENARIOS
                    .iter()
                    .map(|s| s.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?);
        // A scenario's reference (and its reference's) runs too, so every
        // ratio in the report is measured in the same run.
        while let Some(s) = next {
            if !wanted.contains(&s.name) {
                wanted.push(s.name);
            }
            next = s.target.and_then(|t| by_name(t.reference));
        }
    }
    // Scenarios run alongside each other come together, with their
    // references; repeat until nothing is added.
    loop {
        let before = wanted.len();
        for s in SCENARIOS {
            let partner = s.alongside.is_some_and(|a| wanted.contains(&a))
                || (s.alongside.is_some() && wanted.contains(&s.name));
            if !partner {
                continue;
            }
            let mut add = vec![s.name];
            add.extend(s.alongside);
            add.extend(s.target.map(|t| t.reference));
            for name in add {
                if let Some(found) = by_name(name)
                    && !wanted.contains(&found.name)
                {
                    wanted.push(found.name);
                }
            }
        }
        // References (and scenarios compared to) of anything added.
        for s in SCENARIOS {
            if !wanted.contains(&s.name) {
                continue;
            }
            for name in s.target.map(|t| t.reference).into_iter().chain(s.also_vs) {
                if !wanted.contains(&name) {
                    wanted.push(name);
                }
            }
        }
        if wanted.len() == before {
            break;
        }
    }
    Ok(SCENARIOS
        .iter()
        .filter(|s| wanted.contains(&s.name))
        .collect())
}

impl Target {
    /// The target as the report states it; `reference_rate` is the rate
    /// the reference ran at (for a ladder's target).
    pub fn text(&self, reference_rate: Option<f64>) -> String {
        let r = self.reference;
        let mut parts = Vec::new();
        if let Some(min) = self.min_rps_ratio {
            parts.push(format!("≥ {min}× {r} req/s"));
        }
        if let Some(max) = self.max_p50_ratio {
            parts.push(format!("p50 ≤ {max}× {r} p50"));
        }
        if let Some(max) = self.max_p99_ratio {
            parts.push(format!("p99 ≤ {max}× {r} p99"));
        }
        let amount = |max: f64| {
            if max >= 1000.0 {
                format!("{} ms", max / 1000.0)
            } else {
                format!("{max} µs")
            }
        };
        if let Some(max) = self.max_p50_overhead_us {
            parts.push(format!("p50 ≤ {r} p50 + {}, 0 errors", amount(max)));
        }
        if let Some(max) = self.max_p99_overhead_us {
            parts.push(format!(
                "p99 ≤ {r} p99 + {} at the same rate, 0 errors",
                amount(max)
            ));
        }
        if self.holds_reference_rate {
            let rate = reference_rate.map_or(String::new(), |v| format!(" ({v} req/s)"));
            parts.push(format!(
                "holds ≥ {r}'s rate{rate} with 0 errors and ≥ {:.0}% achieved",
                HELD_SHARE * 100.0
            ));
        }
        parts.join(" and ")
    }

    /// Whether results with these ratios to the reference (req/s, p50,
    /// p99) meet the target's ratio bounds.
    pub fn met(&self, rps_ratio: f64, p50_ratio: f64, p99_ratio: f64) -> bool {
        self.min_rps_ratio.is_none_or(|min| rps_ratio >= min)
            && self.max_p50_ratio.is_none_or(|max| p50_ratio <= max)
            && self.max_p99_ratio.is_none_or(|max| p99_ratio <= max)
    }

    /// Whether p50 and p99 overheads (`overhead_us`, µs above the
    /// reference's), with `errors` failed calls, and a ladder's highest
    /// rate held (`held` against the reference's rate `reference_rate`)
    /// meet the target's other bounds.
    pub fn met_absolute(
        &self,
        overhead_us: (f64, f64),
        errors: u64,
        held: Option<f64>,
        reference_rate: Option<f64>,
    ) -> bool {
        let overhead_ok = self
            .max_p50_overhead_us
            .is_none_or(|max| overhead_us.0 <= max && errors == 0)
            && self
                .max_p99_overhead_us
                .is_none_or(|max| overhead_us.1 <= max && errors == 0);
        let held_ok = !self.holds_reference_rate
            || matches!((held, reference_rate), (Some(h), Some(r)) if h >= r);
        overhead_ok && held_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_references_run_first() {
        for (i, s) in SCENARIOS.iter().enumerate() {
            assert_eq!(
                SCENARIOS.iter().filter(|o| o.name == s.name).count(),
                1,
                "{} is listed once",
                s.name
            );
            if let Some(t) = s.target {
                let r = SCENARIOS
                    .iter()
                    .position(|o| o.name == t.reference)
                    .expect("reference exists");
                assert!(
                    r < i,
                    "{}'s reference {} runs before it",
                    s.name,
                    t.reference
                );
            }
        }
    }

    #[test]
    fn selecting_a_scenario_brings_its_references() {
        let names: Vec<_> = select(&["grpc-web".to_string()])
            .expect("known")
            .iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["baseline", "mesh-noop", "grpc-web"]);
        assert!(select(&["nope".to_string()]).is_err());
    }

    #[test]
    fn selecting_a_scenario_brings_what_runs_alongside() {
        let names = |n: &str| -> Vec<&str> {
            select(&[n.to_string()])
                .expect("known")
                .iter()
                .map(|s| s.name)
                .collect()
        };
        assert_eq!(
            names("login"),
            ["noop-probe-idle", "argon2-raw", "login", "noop-probe-login"]
        );
        assert_eq!(names("noop-probe-login"), names("login"));
        assert_eq!(
            names("user-list-deep"),
            ["user-list-page1", "user-list-deep"]
        );
    }

    #[test]
    fn alongside_partners_exist_and_run_before() {
        for (i, s) in SCENARIOS.iter().enumerate() {
            if let Some(a) = s.alongside {
                let p = SCENARIOS
                    .iter()
                    .position(|o| o.name == a)
                    .expect("partner exists");
                assert!(p < i, "{} runs alongside {a}, listed before it", s.name);
                assert!(SCENARIOS[p].alongside.is_none(), "no chains");
            }
        }
    }

    #[test]
    fn targets() {
        let t = Target {
            max_p99_ratio: Some(1.3),
            ..Target::rps("baseline", 0.85)
        };
        assert!(t.met(0.9, 9.0, 1.2));
        assert!(!t.met(0.8, 1.0, 1.2));
        assert!(!t.met(0.9, 1.0, 1.4));
        assert_eq!(
            t.text(None),
            "≥ 0.85× baseline req/s and p99 ≤ 1.3× baseline p99"
        );
        let p50 = Target {
            max_p50_ratio: Some(1.5),
            ..Target::of("page1")
        };
        assert!(p50.met(0.1, 1.4, 9.0));
        assert!(!p50.met(9.0, 1.6, 1.0));
        assert_eq!(p50.text(None), "p50 ≤ 1.5× page1 p50");
        assert!(
            p50.met_absolute((1e9, 1e9), 5, None, None),
            "no absolute bounds"
        );
    }

    #[test]
    fn llm_targets() {
        let gw = by_name("llm-gateway")
            .and_then(|s| s.target)
            .expect("target");
        assert_eq!(
            gw.text(None),
            "p99 ≤ llm-direct p99 + 1 ms at the same rate, 0 errors"
        );
        assert!(gw.met_absolute((5000.0, 999.0), 0, None, None));
        assert!(!gw.met_absolute((0.0, 1001.0), 0, None, None));
        assert!(
            !gw.met_absolute((0.0, 10.0), 1, None, None),
            "errors miss it"
        );
        let max = by_name("llm-max-rate")
            .and_then(|s| s.target)
            .expect("target");
        assert_eq!(
            max.text(Some(1000.0)),
            "holds ≥ llm-gateway's rate (1000 req/s) with 0 errors and ≥ 95% achieved"
        );
        let zero = (0.0, 0.0);
        assert!(max.met_absolute(zero, 0, Some(3000.0), Some(1000.0)));
        assert!(max.met_absolute(zero, 0, Some(1000.0), Some(1000.0)));
        assert!(!max.met_absolute(zero, 0, None, Some(1000.0)), "none held");
        assert!(!max.met_absolute(zero, 0, Some(500.0), Some(1000.0)));
    }

    #[test]
    fn chat_ttft_target() {
        let t = by_name("chat-ttft").and_then(|s| s.target).expect("target");
        assert_eq!(
            t.text(None),
            "p50 ≤ chat-ttft-direct p50 + 500 µs, 0 errors"
        );
        assert!(t.met_absolute((499.0, 1e9), 0, None, None));
        assert!(!t.met_absolute((501.0, 0.0), 0, None, None));
        assert!(!t.met_absolute((1.0, 0.0), 2, None, None), "errors miss it");
        let names: Vec<_> = select(&["chat-ttft".to_string()])
            .expect("known")
            .iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["chat-ttft-direct", "chat-ttft"]);
        let direct = by_name("chat-ttft-direct").expect("known");
        assert!(direct.needs_fake_llm() && direct.needs_store());
    }

    #[test]
    fn chat_and_search_scenarios_select_what_they_compare_to() {
        let names = |n: &str| -> Vec<&str> {
            select(&[n.to_string()])
                .expect("known")
                .iter()
                .map(|s| s.name)
                .collect()
        };
        assert_eq!(names("chat-relay"), ["chat-relay-direct", "chat-relay"]);
        assert_eq!(names("streams-idle"), ["streams-idle"]);
        assert_eq!(names("search"), ["search-sql", "search"]);
        assert_eq!(
            names("search-sql-unprepared"),
            ["search-sql", "search-sql-unprepared"]
        );
        assert_eq!(names("search-index"), ["search-index-sql", "search-index"]);
        let relay = by_name("chat-relay")
            .and_then(|s| s.target)
            .expect("target");
        assert_eq!(relay.text(None), "≥ 0.9× chat-relay-direct req/s");
        let search = by_name("search").and_then(|s| s.target).expect("target");
        assert!(search.met(0.1, 1.19, 1.19));
        assert!(!search.met(9.0, 1.21, 1.0));
        assert!(!search.met(9.0, 1.0, 1.21));
        for s in ["streams-idle", "search-sql", "search-index-sql"] {
            assert!(by_name(s).expect("known").needs_store(), "{s}");
        }
        assert!(by_name("streams-idle").expect("known").needs_fake_llm());
        assert!(!by_name("search").expect("known").needs_fake_llm());
    }

    #[test]
    fn llm_scenarios_select_their_references() {
        let names: Vec<_> = select(&["llm-max-rate".to_string()])
            .expect("known")
            .iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["llm-direct", "llm-gateway", "llm-max-rate"]);
        let direct = by_name("llm-direct").expect("known");
        assert!(direct.needs_fake_llm() && !direct.needs_store());
        let gw = by_name("llm-gateway").expect("known");
        assert!(gw.needs_fake_llm() && gw.needs_store());
        assert!(!by_name("mesh-noop").expect("known").needs_fake_llm());
    }
}
