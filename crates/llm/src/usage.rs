//! Usage accounting: every call becomes one `llm_usage` row. Rows are
//! queued and written in batches by one background task — it gathers rows
//! for up to `GATHER` after the first one, then writes them with one
//! prepared INSERT over column arrays — so accounting adds no database
//! round trip to a call and costs the database one statement per batch,
//! not per call. The gathering window is short (a few milliseconds) on
//! purpose: the database shares the machine with the gateway, and one
//! large batch every so often is a burst of database work that the calls
//! in flight at that moment wait behind (the p99 of trellis-bench's
//! llm-gateway); small frequent batches spread the same work out. Rows
//! that arrive while a batch is being written form the next one, so
//! batches still grow with the load. The task drains what is queued
//! before the process exits.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::sql_types::{BigInt, Text, Timestamptz};
use diesel_async::RunQueryDsl;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use trellis_store::Store;
use trellis_store::schema::llm_usage;
use uuid::Uuid;

use crate::error::LlmError;

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = llm_usage)]
pub struct UsageRow {
    pub id: Uuid,
    pub user_id: Uuid,
    pub model: String,
    pub provider: String,
    pub upstream_model: String,
    pub prompt_tokens: i32,
    pub completion_tokens: i32,
    pub estimated: bool,
    pub cost_micros: i64,
    pub ttft_ms: Option<i32>,
    pub duration_ms: i32,
    pub status: String,
    pub cached: bool,
    pub request_id: String,
    pub created_at: DateTime<Utc>,
}

const BATCH: usize = 500;
const QUEUE: usize = 20_000;
/// How long a batch gathers rows after its first one.
const GATHER: Duration = Duration::from_millis(5);

/// The sending half: cheap to clone, one per service.
#[derive(Debug, Clone)]
pub struct Recorder {
    tx: mpsc::Sender<UsageRow>,
}

impl Recorder {
    /// Starts the writer; it ends (after writing what is queued) when the
    /// last `Recorder` is dropped.
    pub fn spawn(store: Store) -> (Recorder, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(write_loop(store, rx));
        (Recorder { tx }, task)
    }

    pub async fn record(&self, row: UsageRow) {
        if self.tx.send(row).await.is_err() {
            tracing::error!("usage writer is gone; a usage row was lost");
        }
    }
}

async fn write_loop(store: Store, mut rx: mpsc::Receiver<UsageRow>) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let gather = tokio::time::sleep(GATHER);
        tokio::pin!(gather);
        while batch.len() < BATCH {
            let room = BATCH - batch.len();
            tokio::select! {
                n = rx.recv_many(&mut batch, room) => {
                    if n == 0 {
                        break;
                    }
                }
                _ = &mut gather => break,
            }
        }
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=8 {
            match insert(&store, &batch).await {
                Ok(()) => break,
                Err(e) if attempt == 8 => {
                    tracing::error!(error = %e, rows = batch.len(), "usage rows dropped after retries");
                }
                Err(e) => {
                    tracing::warn!(error = %e, rows = batch.len(), "writing usage rows failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        batch.clear();
    }
}

async fn insert(store: &Store, rows: &[UsageRow]) -> Result<(), LlmError> {
    let mut conn = store.pg().await?;
    InsertUsage::of(rows).execute(&mut conn).await?;
    Ok(())
}

/// One batch as one statement of fixed text whatever its size — the rows
/// travel as one array per column into `unnest` — with a static query id,
/// so diesel prepares it once per connection (found by type, its text not
/// even rebuilt) and PostgreSQL plans it once. Neither a multi-row VALUES
/// (text varies with the row count) nor `sql_query`/`sql` literals (never
/// cached) would be. A row whose user was purged meanwhile is skipped
/// (`EXISTS`) rather than sinking the batch; the foreign key still guards
/// against a purge racing the insert (the batch then fails, is retried,
/// and the row is skipped).
struct InsertUsage<'a> {
    id: Vec<Uuid>,
    user_id: Vec<Uuid>,
    model: Vec<&'a str>,
    provider: Vec<&'a str>,
    upstream_model: Vec<&'a str>,
    prompt_tokens: Vec<i32>,
    completion_tokens: Vec<i32>,
    estimated: Vec<bool>,
    cost_micros: Vec<i64>,
    ttft_ms: Vec<Option<i32>>,
    duration_ms: Vec<i32>,
    status: Vec<&'a str>,
    cached: Vec<bool>,
    request_id: Vec<&'a str>,
    created_at: Vec<DateTime<Utc>>,
}

impl<'a> InsertUsage<'a> {
    fn of(rows: &'a [UsageRow]) -> InsertUsage<'a> {
        fn col<'a, T>(rows: &'a [UsageRow], f: impl Fn(&'a UsageRow) -> T) -> Vec<T> {
            rows.iter().map(f).collect()
        }
        InsertUsage {
            id: col(rows, |r| r.id),
            user_id: col(rows, |r| r.user_id),
            model: col(rows, |r| r.model.as_str()),
            provider: col(rows, |r| r.provider.as_str()),
            upstream_model: col(rows, |r| r.upstream_model.as_str()),
            prompt_tokens: col(rows, |r| r.prompt_tokens),
            completion_tokens: col(rows, |r| r.completion_tokens),
            estimated: col(rows, |r| r.estimated),
            cost_micros: col(rows, |r| r.cost_micros),
            ttft_ms: col(rows, |r| r.ttft_ms),
            duration_ms: col(rows, |r| r.duration_ms),
            status: col(rows, |r| r.status.as_str()),
            cached: col(rows, |r| r.cached),
            request_id: col(rows, |r| r.request_id.as_str()),
            created_at: col(rows, |r| r.created_at),
        }
    }
}

/// The static query id of [`InsertUsage`].
struct InsertUsageId;

impl QueryId for InsertUsage<'_> {
    type QueryId = InsertUsageId;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl QueryFragment<Pg> for InsertUsage<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        use diesel::sql_types::{Array, Bool, Int4, Int8, Nullable, Uuid as SqlUuid};
        out.push_sql(
            "INSERT INTO llm_usage (id, user_id, model, provider, upstream_model, \
             prompt_tokens, completion_tokens, estimated, cost_micros, ttft_ms, duration_ms, \
             status, cached, request_id, created_at) SELECT t.* FROM unnest(",
        );
        out.push_bind_param::<Array<SqlUuid>, _>(&self.id)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<SqlUuid>, _>(&self.user_id)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.model)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.provider)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.upstream_model)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Int4>, _>(&self.prompt_tokens)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Int4>, _>(&self.completion_tokens)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Bool>, _>(&self.estimated)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Int8>, _>(&self.cost_micros)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Int4>>, _>(&self.ttft_ms)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Int4>, _>(&self.duration_ms)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.status)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Bool>, _>(&self.cached)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.request_id)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Timestamptz>, _>(&self.created_at)?;
        out.push_sql(
            ") AS t(id, user_id, model, provider, upstream_model, prompt_tokens, \
             completion_tokens, estimated, cost_micros, ttft_ms, duration_ms, status, cached, \
             request_id, created_at) WHERE EXISTS (SELECT 1 FROM users u WHERE u.id = t.user_id)",
        );
        Ok(())
    }
}

/// One day and model of usage.
#[derive(Debug, Clone, QueryableByName)]
pub struct Bucket {
    #[diesel(sql_type = Text)]
    pub day: String,
    #[diesel(sql_type = Text)]
    pub model: String,
    #[diesel(sql_type = BigInt)]
    pub requests: i64,
    #[diesel(sql_type = BigInt)]
    pub prompt_tokens: i64,
    #[diesel(sql_type = BigInt)]
    pub completion_tokens: i64,
    #[diesel(sql_type = BigInt)]
    pub cost_micros: i64,
}

/// Usage in `[start, end)` by UTC day and model, of one user or everyone.
pub async fn buckets(
    store: &Store,
    user: Option<Uuid>,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<Vec<Bucket>, LlmError> {
    let mut conn = store.pg().await?;
    let select = "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, model, \
                  count(*) AS requests, \
                  coalesce(sum(prompt_tokens), 0)::bigint AS prompt_tokens, \
                  coalesce(sum(completion_tokens), 0)::bigint AS completion_tokens, \
                  coalesce(sum(cost_micros), 0)::bigint AS cost_micros \
                  FROM llm_usage WHERE created_at >= $1 AND created_at < $2";
    let rows = match user {
        Some(u) => {
            diesel::sql_query(format!(
                "{select} AND user_id = $3 GROUP BY 1, 2 ORDER BY 1, 2"
            ))
            .bind::<Timestamptz, _>(start)
            .bind::<Timestamptz, _>(end)
            .bind::<diesel::sql_types::Uuid, _>(u)
            .load(&mut conn)
            .await?
        }
        None => {
            diesel::sql_query(format!("{select} GROUP BY 1, 2 ORDER BY 1, 2"))
                .bind::<Timestamptz, _>(start)
                .bind::<Timestamptz, _>(end)
                .load(&mut conn)
                .await?
        }
    };
    Ok(rows)
}
