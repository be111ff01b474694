//! PostgreSQL through diesel-async on a bb8 pool.
//!
//! Connections are not tested on every checkout (that would be a round
//! trip per call); instead the health probe dials a fresh connection, and
//! when it sees the database come back it revalidates the idle pooled
//! connections, so those broken by the outage are dropped before a request
//! can get one. A connection that breaks outside an outage fails its one
//! call and is discarded (diesel-async reports it broken).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// A few long-lived connections that hot point reads share instead of
/// checking out a pooled connection each: calls on one connection are
/// pipelined by tokio-postgres (every query queued since its last write
/// goes out in one write, and answers come back in order), so under load
/// one system call and one PostgreSQL read carry many lookups. Only single
/// statements that do not need a transaction of their own belong here —
/// the handle is a shared reference, so diesel cannot open one on it; a
/// slow statement would also hold up those pipelined behind it. A broken
/// connection is dropped by [`Multiplexed::discard`] and dialled again on
/// the next call.
pub struct Multiplexed {
    url: Arc<str>,
    connect_timeout: Duration,
    slots: Box<[Slot]>,
    next: AtomicUsize,
}

#[derive(Default)]
struct Slot {
    conn: std::sync::Mutex<Option<Arc<AsyncPgConnection>>>,
    /// Held while dialling, so that one caller dials and the others wait.
    dial: tokio::sync::Mutex<()>,
}

/// One of the [`Multiplexed`] connections, lent to a call.
#[derive(Clone)]
pub struct SharedPgConn {
    conn: Arc<AsyncPgConnection>,
    slot: usize,
}

impl std::ops::Deref for SharedPgConn {
    type Target = AsyncPgConnection;
    fn deref(&self) -> &AsyncPgConnection {
        &self.conn
    }
}

impl Multiplexed {
    /// `n` connections (at least one), none opened yet.
    pub fn new(url: &str, n: usize, connect_timeout: Duration) -> Multiplexed {
        Multiplexed {
            url: url.into(),
            connect_timeout,
            slots: (0..n.max(1)).map(|_| Slot::default()).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// The next connection in turn, dialled first if it is not open.
    pub async fn get(&self) -> Result<SharedPgConn, StoreError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        self.at(i).await
    }

    /// Drops `failed` and hands out its slot's connection, dialled afresh
    /// (unless another call already did).
    pub async fn redial(&self, failed: &SharedPgConn) -> Result<SharedPgConn, StoreError> {
        self.discard(failed);
        self.at(failed.slot).await
    }

    async fn at(&self, i: usize) -> Result<SharedPgConn, StoreError> {
        let slot = &self.slots[i];
        if let Some(conn) = slot.current() {
            return Ok(SharedPgConn { conn, slot: i });
        }
        let _dialling = slot.dial.lock().await;
        if let Some(conn) = slot.current() {
            return Ok(SharedPgConn { conn, slot: i });
        }
        let conn = tokio::time::timeout(
            self.connect_timeout,
            AsyncPgConnection::establish(&self.url),
        )
        .await
        .map_err(|_| StoreError::Unavailable("database"))?
        .map_err(|_| StoreError::Unavailable("database"))?;
        let conn = Arc::new(conn);
        if let Ok(mut held) = slot.conn.lock() {
            *held = Some(conn.clone());
        }
        Ok(SharedPgConn { conn, slot: i })
    }

    /// Forgets `conn` after it failed in a way that may mean it is broken
    /// (calls still holding it finish or fail on it; the next call dials).
    pub fn discard(&self, conn: &SharedPgConn) {
        if let Ok(mut held) = self.slots[conn.slot].conn.lock()
            && held.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn.conn))
        {
            *held = None;
        }
    }

    /// How many connections are open now.
    pub fn open(&self) -> usize {
        self.slots.iter().filter(|s| s.current().is_some()).count()
    }
}

impl Slot {
    fn current(&self) -> Option<Arc<AsyncPgConnection>> {
        self.conn.lock().ok().and_then(|c| c.clone())
    }
}

/// Whether a failed query's error says nothing about its connection (the
/// row was not there, or the server refused the statement with an SQL
/// error other than a shutdown), so that a shared connection is kept.
pub fn connection_intact(err: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error};
    match err {
        Error::NotFound => true,
        Error::DatabaseError(kind, _) => !matches!(
            kind,
            DatabaseErrorKind::UnableToSendCommand
                | DatabaseErrorKind::ClosedConnection
                | DatabaseErrorKind::Unknown
        ),
        Error::DeserializationError(_) | Error::SerializationError(_) => true,
        _ => false,
    }
}
