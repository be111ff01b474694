//! Usage accounting: every call becomes one `llm_usage` row. Rows are
//! queued and written in batches by one background task — it gathers rows
//! for up to `GATHER` after the first one, then writes them with one
//! multi-row INSERT — so accounting adds no database round trip to a call
//! and costs the database one statement per batch, not per call. The task
//! drains what is queued before the process exits.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
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
const GATHER: Duration = Duration::from_millis(50);

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
    // A row whose user was purged meanwhile must not sink the batch.
    let existing: Vec<Uuid> = trellis_store::schema::users::table
        .filter(trellis_store::schema::users::id.eq_any(rows.iter().map(|r| r.user_id)))
        .select(trellis_store::schema::users::id)
        .load(&mut conn)
        .await?;
    let rows: Vec<&UsageRow> = rows
        .iter()
        .filter(|r| existing.contains(&r.user_id))
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    diesel::insert_into(llm_usage::table)
        .values(rows.into_iter().cloned().collect::<Vec<_>>())
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
