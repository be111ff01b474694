//! PostgreSQL through diesel-async on a bb8 pool.
//!
//! Connections are not tested on every checkout (that would be a round
//! trip per call); instead the health probe dials a fresh connection, and
//! when it sees the database come back it revalidates the idle pooled
//! connections, so those broken by the outage are dropped before a request
//! can get one. A connection that breaks outside an outage fails its one
//! call and is discarded (diesel-async reports it broken).

use std::time::Duration;

use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::pooled_connection::bb8::{Pool, PooledConnection};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use crate::StoreError;

pub type PgPool = Pool<AsyncPgConnection>;
pub type PgConn<'a> = PooledConnection<'a, AsyncPgConnection>;

/// A lazy pool: connections are opened on demand, never at construction.
pub fn pool(url: &str, size: u32, acquire_timeout: Duration) -> PgPool {
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(url);
    Pool::builder()
        .max_size(size)
        .min_idle(Some(0))
        .connection_timeout(acquire_timeout)
        .test_on_check_out(false)
        // Most recently used first: a quiet service keeps reusing one warm
        // connection (and its server process) instead of cycling through
        // all of them; the surplus idles out.
        .queue_strategy(::bb8::QueueStrategy::Lifo)
        .build_unchecked(manager)
}

/// `SELECT 1` over a new connection (not a pooled one, which may be stale).
pub async fn ping_fresh(url: &str) -> Result<(), StoreError> {
    let mut conn = AsyncPgConnection::establish(url)
        .await
        .map_err(|_| StoreError::Unavailable("database"))?;
    diesel::sql_query("SELECT 1").execute(&mut conn).await?;
    Ok(())
}

/// Checks every idle pooled connection once; broken ones are discarded by
/// the pool when they are returned.
pub async fn revalidate(pool: &PgPool) {
    for c in crate::idle_connections(pool).await.iter_mut() {
        let _ = diesel::sql_query("SELECT 1").execute(&mut **c).await;
    }
}

/// A raw-SQL query (`sql_query(…).into_boxed()`) whose prepared statement
/// diesel may cache, by its text and bind types, on each connection.
///
/// diesel never caches `sql_query` statements, because their text could be
/// anything; a query whose text is built only from fixed fragments and
/// numbered placeholders — never from values — comes in a small, fixed set
/// of shapes, and re-planning it on every call costs more than the query
/// itself (full-text search: the parse and plan of a CTE with
/// `websearch_to_tsquery`, ranking and `ts_headline`). Wrap only such
/// queries: every distinct text stays prepared on every connection.
#[derive(Debug, Clone)]
pub struct Cacheable<Q>(pub Q);

impl<Q> diesel::query_builder::QueryFragment<diesel::pg::Pg> for Cacheable<Q>
where
    Q: diesel::query_builder::QueryFragment<diesel::pg::Pg>,
{
    fn walk_ast<'b>(
        &'b self,
        pass: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
    ) -> diesel::QueryResult<()> {
        self.0.walk_ast(pass)
    }

    fn is_safe_to_cache_prepared(&self, _backend: &diesel::pg::Pg) -> diesel::QueryResult<bool> {
        Ok(true)
    }
}

impl<Q> diesel::query_builder::QueryId for Cacheable<Q> {
    type QueryId = ();
    // Keyed by its SQL text, not by type: one type, many texts.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: diesel::query_builder::Query> diesel::query_builder::Query for Cacheable<Q> {
    type SqlType = Q::SqlType;
}
