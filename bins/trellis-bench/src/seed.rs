//! Seeding: turning a scenario's [`Rpc`] into the concrete [`Call`]s its
//! client tasks repeat, creating what they need first — accounts through
//! the public RPCs (Register, Login), the admin role and bulk users through
//! direct SQL, as the end-to-end tests do. Everything is created once, on
//! first need; access tokens are fetched fresh for each scenario, so a long
//! run does not outlive them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio_postgres::NoTls;
use tonic::transport::Channel;
use trellis_proto::auth::v1::auth_service_client::AuthServiceClient;
use trellis_proto::auth::v1::{LoginRequest, RegisterRequest};
use trellis_proto::llm::v1::{GenerateParams, GenerateStreamRequest, Message, Role};
use trellis_proto::system::v1::GetInfoRequest;
use trellis_proto::user::v1::user_service_client::UserServiceClient;
use trellis_proto::user::v1::{GetUserRequest, ListUsersRequest};
use uuid::Uuid;

use crate::calls::{self, Call, Caller, ChatTurns, Req, Rotation, Rpc, Upstream};
use crate::fakellm::{self, Script};
use crate::run::ChatLoad;
use crate::scenario::LIST_PAGE_SIZE;
use crate::sql::{SearchSpec, SqlConn, SqlSearch};

/// Every seeded account's password (meets the registration policy).
const PASSWORD: &str = "Bench!pass1";
const ADMIN: &str = "benchadmin";
const TARGET: &str = "benchtarget";
/// The member the LLM scenarios generate as.
const LLM_USER: &str = "benchllm";
/// The member the chat scenarios converse as.
const CHAT_USER: &str = "benchchat";
/// The member the search scenarios search and index as.
const SEARCH_USER: &str = "benchsearch";
/// The text search configuration: trellisd's `search.language` default.
pub const SEARCH_LANGUAGE: &str = "english";
/// Hits per page of the search scenarios.
pub const SEARCH_PAGE_SIZE: usize = 10;
/// Documents per IndexDocuments call of the indexing scenarios.
pub const INDEX_BATCH: usize = 200;
/// The collection the indexing scenarios write to (not searched).
const INDEX_COLLECTION: &str = "bench-index";

/// The search scenarios' query mix, the same on both sides: words,
/// phrases, OR and exclusion, with collection, tag and attribute filters,
/// over the seeded candidate profiles.
pub fn search_mix() -> Vec<SearchSpec> {
    let spec =
        |text: &str, collections: &[&str], tags: &[&str], attrs: &[(&str, &str)]| SearchSpec {
            text: text.to_string(),
            collections: collections.iter().map(|c| c.to_string()).collect(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            page_size: SEARCH_PAGE_SIZE,
        };
    vec![
        spec("senior rust engineer", &["candidates"], &[], &[]),
        spec("python machine learning", &[], &["python"], &[]),
        spec(
            "\"backend engineer\" kubernetes",
            &[],
            &[],
            &[("location", "Berlin")],
        ),
        spec(
            "react OR typescript -junior",
            &["candidates"],
            &[],
            &[("seniority", "senior")],
        ),
        spec("security cryptography", &["candidates"], &["rust"], &[]),
    ]
}
const ORDER_BY: &str = "create_time desc";

/// How big the list fixture is.
#[derive(Debug, Clone, Copy)]
pub struct ListSize {
    /// Bulk-inserted users.
    pub users: i32,
    /// The deep page measured against page 1.
    pub deep_page: usize,
}

/// What was seeded, and how long it took, for the report.
#[derive(Debug, Clone, Default)]
pub struct SeedFacts {
    /// `users` rows once the bulk insert is done.
    pub list_rows: Option<i64>,
    pub list_users: Option<i32>,
    pub deep_page: Option<usize>,
    pub bulk_insert: Option<Duration>,
    pub page_walk: Option<Duration>,
    /// One login at a time with nothing else running: each call's time.
    pub serial_logins: Vec<Duration>,
    /// Chat sessions bulk-inserted for the chat turns, and how long it took.
    pub chat_sessions: Option<(usize, Duration)>,
    /// Messages of earlier conversations bulk-inserted beside them (in
    /// sessions of their own), and how long it took.
    pub chat_history: Option<(i32, Duration)>,
    /// Sizes of the request bodies captured from chat's upstream calls,
    /// by upstream model.
    pub captured_bytes: Vec<(&'static str, usize)>,
    /// The search corpus: documents, the time `trellisd seed` took (and
    /// its own report), then VACUUM ANALYZE.
    pub corpus: Option<(i64, Duration, String)>,
    /// Hits of each query of the mix on its first page (the same both
    /// ways) and its total.
    pub search_hits: Vec<(usize, i64)>,
    /// How long each settle before a scenario took ([`Fixture::settle`]).
    pub settles: Vec<Duration>,
}

/// How to run `trellisd seed` on the bench's stack.
#[derive(Debug, Clone)]
pub struct Seeder {
    pub trellisd: std::path::PathBuf,
    pub env: Vec<(&'static str, String)>,
    pub database_url: String,
    /// Documents to index.
    pub docs: usize,
}

/// The seeding state: a channel to trellisd and a database connection.
pub struct Fixture {
    channel: Channel,
    db: tokio_postgres::Client,
    list_size: ListSize,
    /// Logins timed one at a time before the login scenario.
    serial_logins: usize,
    admin_ready: bool,
    target: Option<String>,
    login_accounts: usize,
    deep_token: Option<String>,
    llm_user: bool,
    /// The fake LLM upstream (the chat references capture from it).
    pub fake_llm: Option<SocketAddr>,
    pub chat: ChatLoad,
    chat_user: Option<Uuid>,
    chat_sessions: Option<Rotation<String>>,
    pub seeder: Option<Seeder>,
    search_user: Option<Uuid>,
    index_template: Option<std::sync::Arc<[trellis_proto::search::v1::DocumentInput]>>,
    pub facts: SeedFacts,
}

impl Fixture {
    pub async fn new(
        trellisd: SocketAddr,
        database_url: &str,
        list_size: ListSize,
        serial_logins: usize,
    ) -> anyhow::Result<Fixture> {
        let channel = calls::grpc_channel(trellisd).await?;
        let (db, connection) = tokio_postgres::connect(database_url, NoTls)
            .await
            .context("connecting to the bench database")?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Fixture {
            channel,
            db,
            list_size,
            serial_logins,
            admin_ready: false,
            target: None,
            login_accounts: 0,
            deep_token: None,
            llm_user: false,
            fake_llm: None,
            chat: ChatLoad {
                relay: Script::SHORT,
                relay_streams: 1,
                sessions: 1,
                history: 0,
            },
            chat_user: None,
            chat_sessions: None,
            seeder: None,
            search_user: None,
            index_template: None,
            facts: SeedFacts::default(),
        })
    }

    /// Settles the database before a scenario is measured: `VACUUM
    /// ANALYZE` of every table, then `CHECKPOINT`, so the maintenance owed
    /// for what earlier scenarios wrote (10,000 chat turns, logins, usage
    /// rows) is done now instead of by autovacuum and the checkpointer in
    /// the middle of a later measurement, on the CPU the servers share.
    /// Returns how long it took.
    pub async fn settle(&self) -> anyhow::Result<Duration> {
        let t = Instant::now();
        self.db
            .batch_execute("VACUUM ANALYZE")
            .await
            .context("VACUUM ANALYZE")?;
        self.db
            .batch_execute("CHECKPOINT")
            .await
            .context("CHECKPOINT")?;
        Ok(t.elapsed())
    }

    /// The calls for `tasks` client tasks of a scenario calling `rpc`.
    pub async fn calls(&mut self, rpc: Rpc, tasks: usize) -> anyhow::Result<Vec<Call>> {
        let same = |call: Call| vec![call; tasks];
        Ok(match rpc {
            Rpc::SystemGetInfo => same(Call::new(Req::GetInfo(GetInfoRequest {}))),
            Rpc::SystemGetInfoAuthed => {
                self.target().await?;
                let token = self.login(TARGET).await?;
                same(Call::with_token(Req::GetInfo(GetInfoRequest {}), &token)?)
            }
            Rpc::Login => {
                self.login_accounts(tasks).await?;
                self.time_serial_logins().await?;
                (0..tasks)
                    .map(|k| {
                        Call::new(Req::Login(LoginRequest {
                            login: login_name(k),
                            password: PASSWORD.into(),
                            ..Default::default()
                        }))
                    })
                    .collect()
            }
            Rpc::GetUser => {
                let id = self.target().await?;
                let token = self.admin_token().await?;
                same(Call::with_token(
                    Req::GetUser(GetUserRequest { id }),
                    &token,
                )?)
            }
            Rpc::ListUsersFirst => {
                self.list_fixture().await?;
                let token = self.admin_token().await?;
                same(Call::with_token(Req::ListUsers(first_page()), &token)?)
            }
            Rpc::ListUsersDeep => {
                self.list_fixture().await?;
                let token = self.admin_token().await?;
                let page_token = self.deep_token.clone().context("no deep page token")?;
                let req = ListUsersRequest {
                    page_token,
                    ..first_page()
                };
                same(Call::with_token(Req::ListUsers(req), &token)?)
            }
            Rpc::ChatCompletions => same(Call::new(Req::ChatCompletions(
                crate::calls::Upstream::llm_direct(),
            ))),
            Rpc::GenerateStream => {
                // A registered member: the member role grants
                // llm:generate:*, and its quotas are the default limits,
                // which trellisd runs with lifted.
                if !self.llm_user {
                    self.register(LLM_USER).await?;
                    self.llm_user = true;
                }
                let token = self.login(LLM_USER).await?;
                same(Call::with_token(
                    Req::GenerateStream(generate_request()),
                    &token,
                )?)
            }
            Rpc::ChatFirstToken | Rpc::ChatRelay => {
                let turns = self.chat_turns(rpc == Rpc::ChatRelay).await?;
                let token = self.login(CHAT_USER).await?;
                same(Call::with_token(Req::ChatSend(turns), &token)?)
            }
            Rpc::ChatUpstreamFirstToken | Rpc::ChatUpstreamRelay => {
                let relay = rpc == Rpc::ChatUpstreamRelay;
                let body = self.capture(relay).await?;
                let script = if relay {
                    self.chat.relay
                } else {
                    Script::SHORT
                };
                same(Call::new(Req::ChatCompletions(Upstream {
                    body,
                    script,
                    first_token: !relay,
                })))
            }
            Rpc::Search => {
                self.search_corpus().await?;
                let token = self.login(SEARCH_USER).await?;
                let requests = search_mix().iter().map(search_request).collect();
                same(Call::with_token(
                    Req::Search(Rotation::new(requests)),
                    &token,
                )?)
            }
            Rpc::SearchSql | Rpc::SearchSqlUnprepared => {
                let viewer = self.search_corpus().await?;
                let queries = search_mix()
                    .iter()
                    .map(|q| SqlSearch {
                        prepare_each_time: rpc == Rpc::SearchSqlUnprepared,
                        ..SqlSearch::new(q, SEARCH_LANGUAGE, viewer)
                    })
                    .collect();
                same(Call::new(Req::SearchSql(Rotation::new(queries))))
            }
            Rpc::IndexDocuments => {
                let template = self.index_template().await?;
                let token = self.login(SEARCH_USER).await?;
                same(Call::with_token(
                    Req::Index(calls::IndexBatches {
                        template,
                        calls: Rotation::new(vec![()]),
                        prefix: "rpc",
                    }),
                    &token,
                )?)
            }
            Rpc::IndexSql => {
                let template = self.index_template().await?;
                let owner = self.search_corpus().await?;
                same(Call::new(Req::IndexSql(crate::sql::SqlBatch {
                    owner,
                    language: SEARCH_LANGUAGE.to_string(),
                    template,
                    calls: Rotation::new(vec![()]),
                    prefix: "sql",
                })))
            }
        })
    }

    /// The chat member and the pool of sessions the turns take in turn
    /// (once): bulk-inserted (as the users of the list fixture are), each
    /// of the default model alias.
    async fn chat_pool(&mut self) -> anyhow::Result<Rotation<String>> {
        if let Some(pool) = &self.chat_sessions {
            return Ok(pool.clone());
        }
        let user = match self.chat_user {
            Some(u) => u,
            None => {
                let u = self.register(CHAT_USER).await?;
                self.chat_user = Some(u);
                u
            }
        };
        let t0 = Instant::now();
        let ids: Vec<Uuid> = (0..self.chat.sessions.max(1))
            .map(|_| Uuid::now_v7())
            .collect();
        self.db
            .execute(
                "INSERT INTO chat_sessions (id, user_id, model, title)                  SELECT s.id, $1, $2, 'bench session' FROM unnest($3::uuid[]) AS s(id)",
                &[&user, &fakellm::ALIAS, &ids],
            )
            .await
            .context("bulk-inserting chat sessions")?;
        self.facts.chat_sessions = Some((ids.len(), t0.elapsed()));
        self.chat_history(user).await?;
        let pool = Rotation::new(ids.iter().map(Uuid::to_string).collect());
        self.chat_sessions = Some(pool.clone());
        Ok(pool)
    }

    /// The member's earlier conversations: `chat.history` completed
    /// messages, user and assistant in turn, 50 to a session of its own
    /// (none of the pool's), bulk-inserted. A deployment's message table
    /// is not empty; measured on an empty one, the turns' statements would
    /// run on plans made for a table of a few rows (PostgreSQL keeps a
    /// connection's generic plan until the table is analysed again, which
    /// autovacuum does not do within a 10 s window) and scan it whole.
    async fn chat_history(&mut self, user: Uuid) -> anyhow::Result<()> {
        const PER_SESSION: i32 = 50;
        let messages = self.chat.history.max(0);
        if messages == 0 {
            return Ok(());
        }
        let t0 = Instant::now();
        self.db
            .execute(
                "WITH s AS (\
                   INSERT INTO chat_sessions (id, user_id, model, title, last_activity_at) \
                   SELECT gen_random_uuid(), $1, $2, 'bench history', now() - interval '1 day' \
                   FROM generate_series(1, ($3::int + $4::int - 1) / $4::int) RETURNING id) \
                 INSERT INTO chat_messages (id, session_id, user_id, role, content, status, model, created_at) \
                 SELECT gen_random_uuid(), s.id, $1, \
                   CASE WHEN k % 2 = 0 THEN 'user' ELSE 'assistant' END, \
                   'message ' || k || ' of an earlier conversation about the quarterly plan', \
                   'completed', $2, now() - interval '1 day' + k * interval '1 second' \
                 FROM s, generate_series(0, $4::int - 1) AS k",
                &[&user, &fakellm::ALIAS, &messages, &PER_SESSION],
            )
            .await
            .context("bulk-inserting earlier chat messages")?;
        self.facts.chat_history = Some((messages, t0.elapsed()));
        Ok(())
    }

    /// The search corpus (once): an administrator to own it, `trellisd
    /// seed --docs N` (the project's own synthetic candidate profiles,
    /// indexed in batches through its upsert), VACUUM ANALYZE; the member
    /// who searches; and a check that trellisd's Search and the bench's
    /// copy of its SQL find the same hits, query by query. Returns the
    /// member's id.
    async fn search_corpus(&mut self) -> anyhow::Result<Uuid> {
        if let Some(id) = self.search_user {
            return Ok(id);
        }
        let seeder = self
            .seeder
            .clone()
            .context("the search scenarios need `trellisd seed`")?;
        // The first administrator owns the seeded documents.
        self.admin_token().await?;
        let t0 = Instant::now();
        let mut cmd = tokio::process::Command::new(&seeder.trellisd);
        cmd.arg("seed")
            .arg("--docs")
            .arg(seeder.docs.to_string())
            .stdin(std::process::Stdio::null());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TRELLIS_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("TRELLIS_TELEMETRY__LOG_FILTER", "warn");
        for (key, value) in &seeder.env {
            cmd.env(key, value);
        }
        let out = cmd.output().await.context("running trellisd seed")?;
        anyhow::ensure!(
            out.status.success(),
            "trellisd seed --docs {} failed ({}): {}",
            seeder.docs,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        // Its last line: `indexed N documents in S s (D documents/s)`.
        let said = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string();
        self.db
            .batch_execute("VACUUM ANALYZE search_documents")
            .await
            .context("VACUUM ANALYZE search_documents")?;
        let docs: i64 = self
            .db
            .query_one("SELECT count(*) FROM search_documents", &[])
            .await?
            .try_get(0)?;
        self.facts.corpus = Some((docs, t0.elapsed(), said));

        let viewer = self.register(SEARCH_USER).await?;
        let token = self.login(SEARCH_USER).await?;
        let mut search = trellis_proto::search::v1::search_service_client::SearchServiceClient::new(
            self.channel.clone(),
        );
        let mut sql = SqlConn::connect(&seeder.database_url).await?;
        for spec in search_mix() {
            let mut req = tonic::Request::new(search_request(&spec));
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse()?);
            let resp = search
                .search(req)
                .await
                .with_context(|| format!("searching {:?}", spec.text))?
                .into_inner();
            let mesh: Vec<String> = resp.hits.iter().map(|h| h.document_id.clone()).collect();
            let direct: Vec<String> = sql
                .search_ids(&SqlSearch::new(&spec, SEARCH_LANGUAGE, viewer))
                .await
                .map_err(|code| {
                    anyhow::anyhow!("the direct SQL of {:?} failed: {code:?}", spec.text)
                })?
                .iter()
                .map(Uuid::to_string)
                .collect();
            anyhow::ensure!(
                !resp.fuzzy && !mesh.is_empty() && mesh == direct,
                "query {:?}: trellisd's Search found {mesh:?}{}, the bench's copy of its SQL \
                 {direct:?}: update bins/trellis-bench/src/sql.rs from crates/search/src/query.rs",
                spec.text,
                if resp.fuzzy { " (fuzzy)" } else { "" }
            );
            self.facts
                .search_hits
                .push((mesh.len(), resp.estimated_total_size));
        }
        self.search_user = Some(viewer);
        Ok(viewer)
    }

    /// The documents every indexing batch carries (under fresh external
    /// ids): [`INDEX_BATCH`] candidate profiles of the search corpus,
    /// shared, in their own collection.
    async fn index_template(
        &mut self,
    ) -> anyhow::Result<std::sync::Arc<[trellis_proto::search::v1::DocumentInput]>> {
        if let Some(t) = &self.index_template {
            return Ok(t.clone());
        }
        self.search_corpus().await?;
        let rows = self
            .db
            .query(
                "SELECT title, body, tags, attributes::text FROM search_documents \
                 WHERE collection = 'candidates' ORDER BY external_id LIMIT $1",
                &[&(INDEX_BATCH as i64)],
            )
            .await
            .context("reading the indexing template")?;
        anyhow::ensure!(
            rows.len() == INDEX_BATCH,
            "the corpus has fewer than {INDEX_BATCH} candidate profiles"
        );
        let mut docs = Vec::with_capacity(rows.len());
        for r in rows {
            let attributes: String = r.try_get(3)?;
            docs.push(trellis_proto::search::v1::DocumentInput {
                external_id: String::new(),
                collection: INDEX_COLLECTION.to_string(),
                title: r.try_get(0)?,
                body: r.try_get(1)?,
                tags: r.try_get(2)?,
                attributes: serde_json::from_str(&attributes)?,
                visibility: trellis_proto::search::v1::Visibility::Shared as i32,
            });
        }
        let t: std::sync::Arc<[_]> = docs.into();
        self.index_template = Some(t.clone());
        Ok(t)
    }

    /// What streams-idle opens its streams with: the chat member's bearer
    /// token and the session pool.
    pub async fn idle_setup(
        &mut self,
    ) -> anyhow::Result<(
        tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
        Rotation<String>,
    )> {
        let sessions = self.chat_pool().await?;
        let token = self.login(CHAT_USER).await?;
        let bearer = format!("Bearer {token}")
            .parse()
            .context("the access token is not a valid header value")?;
        Ok((bearer, sessions))
    }

    /// Chat turns: the short script timed to the first token, or the
    /// relay model's paced script read to the end.
    async fn chat_turns(&mut self, relay: bool) -> anyhow::Result<ChatTurns> {
        Ok(ChatTurns {
            sessions: self.chat_pool().await?,
            model: relay.then(|| fakellm::RELAY_ALIAS.to_string()),
            script: if relay {
                self.chat.relay
            } else {
                Script::SHORT
            },
            first_token: !relay,
        })
    }

    /// The body trellisd's chat posts upstream for a first turn (of the
    /// relay model, or the default one): one turn made through
    /// SendMessage, then asked of the fake.
    async fn capture(&mut self, relay: bool) -> anyhow::Result<bytes::Bytes> {
        let fake = self
            .fake_llm
            .context("the chat references need the fake LLM upstream")?;
        let turns = self.chat_turns(relay).await?;
        let token = self.login(CHAT_USER).await?;
        let call = Call::with_token(Req::ChatSend(turns), &token)?;
        Caller::Grpc(self.channel.clone())
            .call(&call)
            .await
            .map_err(|code| anyhow::anyhow!("a chat turn to capture from failed: {code:?}"))?;
        let model = if relay {
            fakellm::RELAY_MODEL
        } else {
            fakellm::UPSTREAM_MODEL
        };
        let mut conn = calls::Http1Conn::connect(fake).await?;
        let body = conn
            .get(&format!("{}?model={model}", fakellm::LAST_REQUEST_PATH))
            .await
            .map_err(|code| {
                anyhow::anyhow!("the fake upstream kept no {model} request: {code:?}")
            })?;
        self.facts.captured_bytes.push((model, body.len()));
        Ok(body)
    }

    fn auth(&self) -> AuthServiceClient<Channel> {
        AuthServiceClient::new(self.channel.clone())
    }

    /// Registers `name` through AuthService.Register; returns its id.
    async fn register(&self, name: &str) -> anyhow::Result<Uuid> {
        let account = self
            .auth()
            .register(RegisterRequest {
                email: format!("{name}@example.com"),
                username: name.to_string(),
                password: PASSWORD.into(),
                display_name: format!("{name} Bench"),
            })
            .await
            .with_context(|| format!("registering {name}"))?
            .into_inner()
            .account
            .context("Register returned no account")?;
        Ok(Uuid::parse_str(&account.id)?)
    }

    /// A fresh access token for `name`.
    async fn login(&self, name: &str) -> anyhow::Result<String> {
        let tokens = self
            .auth()
            .login(LoginRequest {
                login: name.into(),
                password: PASSWORD.into(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("logging in as {name}"))?
            .into_inner()
            .tokens
            .context("Login returned no tokens")?;
        Ok(tokens.access_token)
    }

    /// An administrator's fresh access token (roles reach tokens when
    /// issued, so the role is granted before logging in).
    async fn admin_token(&mut self) -> anyhow::Result<String> {
        if !self.admin_ready {
            let id = self.register(ADMIN).await?;
            self.db
                .execute(
                    "INSERT INTO user_roles (user_id, role) VALUES ($1, 'admin')",
                    &[&id],
                )
                .await
                .context("granting admin")?;
            self.admin_ready = true;
        }
        self.login(ADMIN).await
    }

    /// The account GetUser reads: a member with every profile field set.
    async fn target(&mut self) -> anyhow::Result<String> {
        if let Some(id) = &self.target {
            return Ok(id.clone());
        }
        let id = self.register(TARGET).await?;
        self.db
            .execute(
                "UPDATE users SET first_name = 'Ada', last_name = 'Lovelace', \
                 phone = '+441234567890', date_of_birth = '1990-12-10', \
                 bio = 'Analyst of engines, writer of the first published program.', \
                 avatar_url = 'https://example.com/ada.png', locale = 'en-GB', \
                 time_zone = 'Europe/London' WHERE id = $1",
                &[&id],
            )
            .await
            .context("filling the target's profile")?;
        self.target = Some(id.to_string());
        Ok(id.to_string())
    }

    /// One account per login task.
    async fn login_accounts(&mut self, n: usize) -> anyhow::Result<()> {
        while self.login_accounts < n {
            self.register(&login_name(self.login_accounts)).await?;
            self.login_accounts += 1;
        }
        Ok(())
    }

    /// Times logins one at a time, nothing else running (once).
    async fn time_serial_logins(&mut self) -> anyhow::Result<()> {
        if !self.facts.serial_logins.is_empty() {
            return Ok(());
        }
        // The first login warms the connection and caches; not counted.
        self.login(&login_name(0)).await?;
        for _ in 0..self.serial_logins {
            let t0 = Instant::now();
            self.login(&login_name(0)).await?;
            self.facts.serial_logins.push(t0.elapsed());
        }
        Ok(())
    }

    /// The list fixture (once): bulk users, statistics, and the deep
    /// page's token, reached by walking the pages from the first.
    async fn list_fixture(&mut self) -> anyhow::Result<()> {
        if self.deep_token.is_some() {
            return Ok(());
        }
        let n = self.list_size.users;
        let t0 = Instant::now();
        // As tests/e2e/user_list.rs does: one statement, seven accounts per
        // creation second; each a member, as registered accounts are.
        self.db
            .execute(
                "INSERT INTO users (id, email, username, password_hash, display_name, \
                 first_name, last_name, created_at) \
                 SELECT gen_random_uuid(), 'bulk' || g || '@load.test', 'bulk' || g, 'not-a-hash', \
                 'Bulk User ' || g, 'Bulk', 'Last' || (g % 37), now() - make_interval(secs => g / 7) \
                 FROM generate_series(1, $1::int) AS g",
                &[&n],
            )
            .await
            .context("bulk-inserting users")?;
        self.db
            .execute(
                "INSERT INTO user_roles (user_id, role) \
                 SELECT id, 'member' FROM users WHERE email LIKE 'bulk%@load.test'",
                &[],
            )
            .await
            .context("granting the bulk users member")?;
        // One statement each: several in one string would run as a
        // transaction, which VACUUM refuses.
        for table in ["users", "user_roles"] {
            self.db
                .batch_execute(&format!("VACUUM ANALYZE {table}"))
                .await
                .with_context(|| format!("VACUUM ANALYZE {table}"))?;
        }
        self.facts.bulk_insert = Some(t0.elapsed());
        let rows: i64 = self
            .db
            .query_one("SELECT count(*) FROM users", &[])
            .await?
            .try_get(0)?;
        self.facts.list_rows = Some(rows);
        self.facts.list_users = Some(n);

        let token = self.admin_token().await?;
        let mut users = UserServiceClient::new(self.channel.clone());
        let deep = self.list_size.deep_page;
        let t0 = Instant::now();
        let mut req = first_page();
        for page in 1..deep {
            let mut call = tonic::Request::new(req.clone());
            call.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse()?);
            let resp = users
                .list_users(call)
                .await
                .with_context(|| format!("ListUsers page {page}"))?
                .into_inner();
            anyhow::ensure!(
                !resp.next_page_token.is_empty(),
                "the list ends at page {page}, before page {deep}"
            );
            req.page_token = resp.next_page_token;
        }
        self.facts.page_walk = Some(t0.elapsed());
        self.facts.deep_page = Some(deep);
        self.deep_token = Some(req.page_token);
        Ok(())
    }
}

fn login_name(k: usize) -> String {
    format!("benchlogin{k}")
}

fn first_page() -> ListUsersRequest {
    ListUsersRequest {
        page_size: LIST_PAGE_SIZE,
        order_by: ORDER_BY.into(),
        ..Default::default()
    }
}

/// The Search request of a query of the mix (a first page, relevance).
fn search_request(spec: &SearchSpec) -> trellis_proto::search::v1::SearchRequest {
    trellis_proto::search::v1::SearchRequest {
        query: spec.text.clone(),
        collections: spec.collections.clone(),
        tags: spec.tags.clone(),
        attributes: spec
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        page_size: spec.page_size as i32,
        ..Default::default()
    }
}

/// The GenerateStream request of the LLM scenarios: trellisd turns it into
/// exactly the body `llm-direct` posts ([`fakellm::direct_request`]).
pub fn generate_request() -> GenerateStreamRequest {
    GenerateStreamRequest {
        params: Some(GenerateParams {
            model: fakellm::ALIAS.to_string(),
            messages: vec![Message {
                role: Role::User as i32,
                content: fakellm::PROMPT.to_string(),
            }],
            max_tokens: fakellm::MAX_TOKENS as i32,
            ..Default::default()
        }),
    }
}
