//! Search history and analytics: every search is one `search_history` row
//! (written off the request path), listed and cleared by its user; the
//! popular and zero-result queries over a window for administrators.
//! Entries older than `search.history_retention` are deleted hourly
//! ([`spawn_pruning`]).

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Text, Timestamptz};
use diesel_async::RunQueryDsl;
use serde::{Deserialize, Serialize};
use trellis_proto::search::v1 as pb;
use trellis_store::Store;
use trellis_store::schema::search_history as h;
use uuid::Uuid;

use crate::documents::ts;
use crate::error::SearchError;

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = h)]
pub struct Entry {
    pub id: Uuid,
    pub user_id: Uuid,
    pub query: String,
    pub filters: serde_json::Value,
    pub result_count: i64,
    pub latency_ms: i32,
    pub created_at: DateTime<Utc>,
}

/// Records `entry` in the background; a failure is logged, the search
/// already answered.
pub fn record(store: &Store, entry: Entry) {
    let store = store.clone();
    tokio::spawn(async move {
        let result: Result<(), SearchError> = async {
            let mut conn = store.pg().await?;
            diesel::insert_into(h::table)
                .values(&entry)
                .execute(&mut conn)
                .await?;
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not record a search in the history");
        }
    });
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryCursor {
    pub micros: i64,
    pub id: Uuid,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = h)]
struct Row {
    id: Uuid,
    query: String,
    filters: serde_json::Value,
    result_count: i64,
    latency_ms: i32,
    created_at: DateTime<Utc>,
}

/// One page of `user`'s history, newest first.
pub async fn list(
    store: &Store,
    user: Uuid,
    size: usize,
    after: Option<HistoryCursor>,
) -> Result<(Vec<pb::SearchHistoryEntry>, Option<HistoryCursor>), SearchError> {
    let mut conn = store.pg().await?;
    let mut q = h::table.filter(h::user_id.eq(user)).into_boxed();
    if let Some(c) = &after {
        let t = DateTime::from_timestamp_micros(c.micros).unwrap_or_default();
        q = q.filter(
            h::created_at
                .lt(t)
                .or(h::created_at.eq(t).and(h::id.lt(c.id))),
        );
    }
    let rows: Vec<Row> = q
        .order((h::created_at.desc(), h::id.desc()))
        .limit(size as i64 + 1)
        .select(Row::as_select())
        .load(&mut conn)
        .await?;
    let more = rows.len() > size;
    let rows: Vec<Row> = rows.into_iter().take(size).collect();
    let next = match rows.last() {
        Some(last) if more => Some(HistoryCursor {
            micros: last.created_at.timestamp_micros(),
            id: last.id,
        }),
        _ => None,
    };
    Ok((
        rows.into_iter()
            .map(|r| pb::SearchHistoryEntry {
                id: r.id.to_string(),
                query: r.query,
                filters: r.filters.to_string(),
                result_count: r.result_count,
                latency: Some(prost_types::Duration {
                    seconds: i64::from(r.latency_ms / 1000),
                    nanos: (r.latency_ms % 1000) * 1_000_000,
                }),
                create_time: Some(ts(r.created_at)),
            })
            .collect(),
        next,
    ))
}

/// Deletes `user`'s history; returns how many entries went.
pub async fn clear(store: &Store, user: Uuid) -> Result<i64, SearchError> {
    let mut conn = store.pg().await?;
    let n = diesel::delete(h::table.filter(h::user_id.eq(user)))
        .execute(&mut conn)
        .await?;
    Ok(n as i64)
}

/// Rows one pruning statement deletes at most.
const PRUNE_BATCH: i64 = 1000;

/// Deletes the entries made before `before`, [`PRUNE_BATCH`] at a time
/// (each its own statement, found through `search_history_time`, so no
/// long transaction); returns how many went. Replicas pruning at once only
/// share the work: a row one deleted the other skips.
pub async fn prune(store: &Store, before: DateTime<Utc>) -> Result<usize, SearchError> {
    let mut conn = store.pg().await?;
    let mut total = 0;
    loop {
        let n = diesel::sql_query(
            "DELETE FROM search_history WHERE id IN \
             (SELECT id FROM search_history WHERE created_at < $1 LIMIT $2)",
        )
        .bind::<Timestamptz, _>(before)
        .bind::<BigInt, _>(PRUNE_BATCH)
        .execute(&mut conn)
        .await?;
        total += n;
        if (n as i64) < PRUNE_BATCH {
            return Ok(total);
        }
    }
}

/// Prunes the history older than `retention` every `every` (the first
/// round one `every` after the start) until aborted.
pub fn spawn_pruning(
    store: Store,
    retention: std::time::Duration,
    every: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    trellis_store::retention::spawn(store, every, retention, async |store, before| match prune(
        &store, before,
    )
    .await
    {
        Ok(0) => {}
        Ok(n) => tracing::info!(entries = n, "search history past its retention deleted"),
        Err(e) => tracing::warn!(error = %e, "pruning search history failed; next round retries"),
    })
}

#[derive(QueryableByName)]
struct Counted {
    #[diesel(sql_type = Text)]
    query: String,
    #[diesel(sql_type = BigInt)]
    count: i64,
}

/// The most run queries in `[start, end)`, and the most run of those that
/// found nothing; queries are compared lower-cased with whitespace collapsed.
pub async fn popular(
    store: &Store,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    limit: i32,
) -> Result<(Vec<pb::QueryCount>, Vec<pb::QueryCount>), SearchError> {
    let mut conn = store.pg().await?;
    let sql = |zero: bool| {
        format!(
            "SELECT lower(regexp_replace(btrim(query), '\\s+', ' ', 'g')) AS query, count(*) AS count \
             FROM search_history WHERE created_at >= $1 AND created_at < $2 AND btrim(query) <> '' {} \
             GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT $3",
            if zero { "AND result_count = 0" } else { "" }
        )
    };
    let mut out = Vec::new();
    for zero in [false, true] {
        let rows: Vec<Counted> = diesel::sql_query(sql(zero))
            .bind::<Timestamptz, _>(start)
            .bind::<Timestamptz, _>(end)
            .bind::<Integer, _>(limit)
            .load(&mut conn)
            .await?;
        out.push(
            rows.into_iter()
                .map(|r| pb::QueryCount {
                    query: r.query,
                    count: r.count,
                })
                .collect::<Vec<_>>(),
        );
    }
    let zero = out.pop().unwrap_or_default();
    let top = out.pop().unwrap_or_default();
    Ok((top, zero))
}
