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
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text, Timestamptz};
use diesel_async::RunQueryDsl;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use trellis_store::Store;
use trellis_store::pg::Cacheable;
use uuid::Uuid;

use crate::error::LlmError;

/// One call's usage, as its `llm_usage` row.
#[derive(Debug, Clone)]
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

/// One batch as one statement of fixed text whatever its size — the rows
/// travel as one array per column into `unnest` — so, wrapped in
/// [`Cacheable`], it is prepared once per connection and planned once
/// (a multi-row VALUES would change text with the row count). A row whose
/// user was purged meanwhile is skipped (`EXISTS`) rather than sinking the
/// batch; the foreign key still guards against a purge racing the insert
/// (the batch then fails, is retried, and the row is skipped).
const INSERT: &str = "INSERT INTO llm_usage (id, user_id, model, provider, upstream_model, \
     prompt_tokens, completion_tokens, estimated, cost_micros, ttft_ms, duration_ms, status, \
     cached, request_id, created_at) \
     SELECT t.* FROM unnest($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
     AS t(id, user_id, model, provider, upstream_model, prompt_tokens, completion_tokens, \
     estimated, cost_micros, ttft_ms, duration_ms, status, cached, request_id, created_at) \
     WHERE EXISTS (SELECT 1 FROM users u WHERE u.id = t.user_id)";

async fn insert(store: &Store, rows: &[UsageRow]) -> Result<(), LlmError> {
    use diesel::sql_types::{Array, Bool, Int4, Int8, Nullable, Uuid as SqlUuid};
    fn col<'a, T>(rows: &'a [UsageRow], f: impl Fn(&'a UsageRow) -> T) -> Vec<T> {
        rows.iter().map(f).collect()
    }
    let mut conn = store.pg().await?;
    Cacheable(
        diesel::sql_query(INSERT)
            .bind::<Array<SqlUuid>, _>(col(rows, |r| r.id))
            .bind::<Array<SqlUuid>, _>(col(rows, |r| r.user_id))
            .bind::<Array<Text>, _>(col(rows, |r| r.model.as_str()))
            .bind::<Array<Text>, _>(col(rows, |r| r.provider.as_str()))
            .bind::<Array<Text>, _>(col(rows, |r| r.upstream_model.as_str()))
            .bind::<Array<Int4>, _>(col(rows, |r| r.prompt_tokens))
            .bind::<Array<Int4>, _>(col(rows, |r| r.completion_tokens))
            .bind::<Array<Bool>, _>(col(rows, |r| r.estimated))
            .bind::<Array<Int8>, _>(col(rows, |r| r.cost_micros))
            .bind::<Array<Nullable<Int4>>, _>(col(rows, |r| r.ttft_ms))
            .bind::<Array<Int4>, _>(col(rows, |r| r.duration_ms))
            .bind::<Array<Text>, _>(col(rows, |r| r.status.as_str()))
            .bind::<Array<Bool>, _>(col(rows, |r| r.cached))
            .bind::<Array<Text>, _>(col(rows, |r| r.request_id.as_str()))
            .bind::<Array<Timestamptz>, _>(col(rows, |r| r.created_at)),
    )
    .execute(&mut conn)
    .await?;
    Ok(())
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
