//! trellis-store: the only place that knows how to reach PostgreSQL and
//! Redis — pools, embedded migrations, dependency health probes — and how to
//! start private servers for `trellisd dev` and the test harness.

pub mod accounts;
pub mod audit;
pub mod devserver;
pub mod migrate;
pub mod pg;
pub mod ratelimit;
pub mod redis;
pub mod retention;
pub mod schema;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use trellis_core::Config;

pub use pg::{PgConn, PgPool};
pub use redis::{RedisConn, RedisPool};

/// Why a store call failed. Converts into the status the error model asks
/// for: a down dependency is UNAVAILABLE, anything else is INTERNAL (logged,
/// not sent).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} is unavailable")]
    Unavailable(&'static str),
    #[error("not configured: {0}")]
    NotConfigured(&'static str),
    #[error("database error: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("redis error: {0}")]
    Redis(#[from] ::redis::RedisError),
}

impl From<StoreError> for tonic::Status {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(dep) => trellis_core::error::unavailable(dep),
            StoreError::Redis(e) if redis_unreachable(&e) => {
                tracing::warn!(error = %e, "redis is out of reach");
                trellis_core::error::unavailable("redis")
            }
            StoreError::Query(e) if text_not_storable(&e) => {
                tonic::Status::invalid_argument("text must not contain NUL characters (U+0000)")
            }
            StoreError::Query(e) if database_unreachable(&e) => {
                tracing::warn!(error = %e, "the database is out of reach");
                trellis_core::error::unavailable("database")
            }
            other => trellis_core::error::internal(&other),
        }
    }
}

/// Whether a Redis error says Redis is out of reach — no connection, a
/// connection lost, no answer in time, or a server that cannot serve yet
/// (loading, no master) — rather than that the command was wrong: the
/// caller gets UNAVAILABLE (worth retrying), not INTERNAL.
pub fn redis_unreachable(e: &::redis::RedisError) -> bool {
    use ::redis::{ErrorKind, ServerErrorKind};
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
            )
        )
}

/// Whether PostgreSQL refused a statement because a text value in it holds
/// NUL, which `text` cannot store: the caller's input, so INVALID_ARGUMENT.
/// Services check their fields first ([`trellis_core::text`]) and name
/// them; this is the net under a field that was missed.
fn text_not_storable(e: &diesel::result::Error) -> bool {
    matches!(e, diesel::result::Error::DatabaseError(_, info)
        if info.message().starts_with("invalid byte sequence for encoding"))
}

/// Whether a database error says PostgreSQL is out of reach (the
/// connection closed or could not carry the statement) rather than that
/// the statement failed: UNAVAILABLE, not INTERNAL.
pub fn database_unreachable(e: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error};
    matches!(
        e,
        Error::DatabaseError(
            DatabaseErrorKind::UnableToSendCommand | DatabaseErrorKind::ClosedConnection,
            _
        ) | Error::BrokenTransactionManager
    )
}

/// Last known reachability of each dependency, kept fresh by the mesh's
/// health probe so that calls needing a down dependency fail fast instead of
/// waiting out the pool's acquire timeout.
#[derive(Debug)]
pub struct DepState {
    up: AtomicBool,
    /// Probes in a row that ran out of time.
    slow: AtomicU32,
    name: &'static str,
}

/// What one probe of a dependency found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Up,
    /// Refused or failed: down, now.
    Down,
    /// No answer in time: a busy machine as often as an outage, so only
    /// [`SLOW_PROBES_DOWN`] of these in a row count as down.
    Slow,
}

/// Timed-out probes in a row after which a dependency counts as down.
pub const SLOW_PROBES_DOWN: u32 = 3;

impl DepState {
    fn new(name: &'static str) -> Self {
        Self {
            up: AtomicBool::new(true),
            slow: AtomicU32::new(0),
            name,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Records a probe result; returns true when the state changed.
    pub fn set(&self, up: bool) -> bool {
        self.up.swap(up, Ordering::Relaxed) != up
    }

    /// Records what a probe found and returns the state it leaves.
    pub fn record(&self, probe: Probe) -> bool {
        let up = match probe {
            Probe::Up => true,
            Probe::Down => false,
            Probe::Slow => {
                let slow = self.slow.fetch_add(1, Ordering::Relaxed) + 1;
                if slow < SLOW_PROBES_DOWN {
                    return self.is_up();
                }
                false
            }
        };
        if probe != Probe::Slow {
            self.slow.store(0, Ordering::Relaxed);
        }
        self.set(up);
        up
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// Both pools plus their health, shared by every service in a process.
#[derive(Clone)]
pub struct Store {
    pg: Option<PgPool>,
    redis: Option<RedisPool>,
    pub pg_state: Arc<DepState>,
    pub redis_state: Arc<DepState>,
    key_prefix: Arc<str>,
    redis_url: Option<Arc<str>>,
    pg_url: Option<Arc<str>>,
    /// One multiplexed connection for hot paths (see [`Store::redis_shared`]).
    shared: Arc<tokio::sync::Mutex<Option<::redis::aio::MultiplexedConnection>>>,
    /// Pipelined connections for hot point reads (see [`Store::pg_shared`]).
    pg_shared: Option<Arc<pg::Multiplexed>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("pg", &self.pg.as_ref().map(|p| p.state()))
            .field("redis", &self.redis.as_ref().map(|p| p.state()))
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

impl Store {
    /// Builds lazy pools from config: nothing connects until first use, so a
    /// server can start while a dependency is down and recover when it
    /// returns. A dependency without a URL is simply absent.
    pub fn from_config(config: &Config) -> Result<Store, StoreError> {
        let pg = config.database.url.as_deref().map(|url| {
            pg::pool(
                url,
                config.database.pool_size,
                config.database.acquire_timeout,
            )
        });
        let redis = match config.redis.url.as_deref() {
            Some(url) => Some(redis::pool(
                url,
                config.redis.pool_size,
                config.redis.acquire_timeout,
            )?),
            None => None,
        };
        Ok(Store {
            pg,
            redis,
            pg_state: Arc::new(DepState::new("database")),
            redis_state: Arc::new(DepState::new("redis")),
            key_prefix: config.redis.key_prefix.as_str().into(),
            redis_url: config.redis.url.as_deref().map(Into::into),
            pg_url: config.database.url.as_deref().map(Into::into),
            shared: Arc::new(tokio::sync::Mutex::new(None)),
            pg_shared: config.database.url.as_deref().map(|url| {
                Arc::new(pg::Multiplexed::new(
                    url,
                    config.database.multiplexed_connections as usize,
                    config.database.acquire_timeout,
                ))
            }),
        })
    }

    pub fn has_pg(&self) -> bool {
        self.pg.is_some()
    }

    pub fn has_redis(&self) -> bool {
        self.redis.is_some()
    }

    pub fn pg_pool(&self) -> Option<&PgPool> {
        self.pg.as_ref()
    }

    pub fn redis_pool(&self) -> Option<&RedisPool> {
        self.redis.as_ref()
    }

    /// A client for what pools cannot do (pub/sub subscriptions).
    pub fn redis_client(&self) -> Result<::redis::Client, StoreError> {
        let url = self
            .redis_url
            .as_deref()
            .ok_or(StoreError::NotConfigured("redis.url"))?;
        Ok(::redis::Client::open(url)?)
    }

    /// A pooled PostgreSQL connection, or UNAVAILABLE at once when the last
    /// probe found the database down.
    pub async fn pg(&self) -> Result<PgConn<'_>, StoreError> {
        let pool = self
            .pg
            .as_ref()
            .ok_or(StoreError::NotConfigured("database.url"))?;
        if !self.pg_state.is_up() {
            return Err(StoreError::Unavailable("database"));
        }
        pool.get()
            .await
            .map_err(|_| StoreError::Unavailable("database"))
    }

    /// One of the process's multiplexed PostgreSQL connections
    /// (`database.multiplexed_connections`, taken in turn) for a hot read of
    /// a single statement: no pool checkout, and concurrent calls' queries
    /// share its writes and reads. Never for a transaction (the handle only
    /// lends `&AsyncPgConnection`). After a failure for which
    /// [`pg::connection_intact`] is false, call [`Store::pg_shared_failed`].
    /// UNAVAILABLE at once while the last probe found the database down.
    pub async fn pg_shared(&self) -> Result<pg::SharedPgConn, StoreError> {
        let shared = self
            .pg_shared
            .as_ref()
            .ok_or(StoreError::NotConfigured("database.url"))?;
        if !self.pg_state.is_up() {
            return Err(StoreError::Unavailable("database"));
        }
        shared.get().await
    }

    /// Reports a failed query on `conn`: unless the error leaves the
    /// connection intact, it is dropped and the next call dials anew.
    pub fn pg_shared_failed(&self, conn: &pg::SharedPgConn, err: &diesel::result::Error) {
        if let Some(shared) = &self.pg_shared
            && !pg::connection_intact(err)
        {
            shared.discard(conn);
        }
    }

    /// After `failed` broke: drops it and dials its replacement, for a
    /// read worth one more try (an idempotent statement).
    pub async fn pg_shared_redial(
        &self,
        failed: &pg::SharedPgConn,
    ) -> Result<pg::SharedPgConn, StoreError> {
        let shared = self
            .pg_shared
            .as_ref()
            .ok_or(StoreError::NotConfigured("database.url"))?;
        shared.redial(failed).await
    }

    /// How many multiplexed PostgreSQL connections are open.
    pub fn pg_shared_open(&self) -> usize {
        self.pg_shared.as_ref().map_or(0, |s| s.open())
    }

    /// A pooled Redis connection, or UNAVAILABLE at once when the last probe
    /// found Redis down.
    pub async fn redis(&self) -> Result<RedisConn<'_>, StoreError> {
        let pool = self
            .redis
            .as_ref()
            .ok_or(StoreError::NotConfigured("redis.url"))?;
        if !self.redis_state.is_up() {
            return Err(StoreError::Unavailable("redis"));
        }
        pool.get()
            .await
            .map_err(|_| StoreError::Unavailable("redis"))
    }

    /// The process's shared multiplexed Redis connection: commands from
    /// every caller are pipelined on it, with no pool checkout and no PING
    /// per use — for per-request paths (quotas, event fan-out). Dialled on
    /// first use; after an I/O error call [`Store::redis_shared_reset`] and
    /// the next use dials again. UNAVAILABLE at once while the last probe
    /// found Redis down.
    pub async fn redis_shared(&self) -> Result<::redis::aio::MultiplexedConnection, StoreError> {
        if !self.redis_state.is_up() {
            return Err(StoreError::Unavailable("redis"));
        }
        let mut guard = self.shared.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let conn = tokio::time::timeout(
            Duration::from_secs(2),
            self.redis_client()?.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| StoreError::Unavailable("redis"))?
        .map_err(|_| StoreError::Unavailable("redis"))?;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    /// Drops the shared connection after an error, so that the next use
    /// dials a fresh one.
    pub async fn redis_shared_reset(&self) {
        *self.shared.lock().await = None;
    }

    /// A Redis key under this install's prefix.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}{}", self.key_prefix, suffix)
    }

    /// Probes every configured dependency once (bounded by `timeout`) and
    /// records the result. Returns (database up, redis up); an absent
    /// dependency counts as up.
    pub async fn probe(&self, timeout: Duration) -> (bool, bool) {
        fn probe<E>(r: Result<Result<(), E>, tokio::time::error::Elapsed>) -> Probe {
            match r {
                Ok(Ok(())) => Probe::Up,
                Ok(Err(_)) => Probe::Down,
                Err(_) => Probe::Slow,
            }
        }
        let pg_up = match (&self.pg, &self.pg_url) {
            (Some(pool), Some(url)) => {
                let found = probe(tokio::time::timeout(timeout, pg::ping_fresh(url)).await);
                if found == Probe::Up && !self.pg_state.is_up() {
                    // Back from an outage: drop pooled connections it broke.
                    pg::revalidate(pool).await;
                }
                self.pg_state.record(found)
            }
            _ => true,
        };
        let redis_up = match &self.redis {
            Some(pool) => {
                let found = probe(tokio::time::timeout(timeout, redis::ping(pool)).await);
                if found == Probe::Up && !self.redis_state.is_up() {
                    // Back from an outage: drop pooled connections it broke.
                    redis::revalidate(pool).await;
                }
                self.redis_state.record(found)
            }
            None => true,
        };
        (pg_up, redis_up)
    }
}

/// Checks out every connection idle in `pool` right now (fewer if calls
/// take some meanwhile), for a revalidation after an outage: each is tried
/// once by the caller, and those that fail are discarded by the pool when
/// they are returned.
async fn idle_connections<M: ::bb8::ManageConnection>(
    pool: &::bb8::Pool<M>,
) -> Vec<::bb8::PooledConnection<'_, M>> {
    let idle = pool.state().idle_connections;
    let mut held = Vec::new();
    for _ in 0..idle {
        match pool.get().await {
            Ok(c) => held.push(c),
            Err(_) => break,
        }
    }
    held
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_slow_probes_in_a_row_count_as_down() {
        let s = DepState::new("database");
        for _ in 1..SLOW_PROBES_DOWN {
            assert!(s.record(Probe::Slow), "a busy machine is not an outage");
        }
        assert!(s.record(Probe::Up));
        for _ in 1..SLOW_PROBES_DOWN {
            assert!(s.record(Probe::Slow), "an answer in between starts over");
        }
        assert!(!s.record(Probe::Slow), "then it is down");
        assert!(!s.is_up());
        assert!(s.record(Probe::Up), "and up again at the first answer");
        assert!(!s.record(Probe::Down), "a refusal is down at once");
    }

    #[test]
    fn an_unreachable_dependency_is_unavailable_and_a_bad_statement_internal() {
        use std::io;
        let code = |e: StoreError| tonic::Status::from(e).code();
        for kind in [
            io::ErrorKind::TimedOut,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::ConnectionRefused,
        ] {
            let e = ::redis::RedisError::from(io::Error::new(kind, "x"));
            assert!(redis_unreachable(&e), "{kind:?}");
            assert_eq!(code(StoreError::Redis(e)), tonic::Code::Unavailable);
        }
        let loading = ::redis::RedisError::from((
            ::redis::ErrorKind::Server(::redis::ServerErrorKind::BusyLoading),
            "loading",
        ));
        assert_eq!(code(StoreError::Redis(loading)), tonic::Code::Unavailable);
        let wrong = ::redis::RedisError::from((::redis::ErrorKind::UnexpectedReturnType, "type"));
        assert!(!redis_unreachable(&wrong));
        assert_eq!(code(StoreError::Redis(wrong)), tonic::Code::Internal);

        use diesel::result::{DatabaseErrorKind, Error};
        let closed = Error::DatabaseError(
            DatabaseErrorKind::ClosedConnection,
            Box::new("server closed the connection".to_string()),
        );
        assert_eq!(code(StoreError::Query(closed)), tonic::Code::Unavailable);
        let bad = Error::DatabaseError(
            DatabaseErrorKind::CheckViolation,
            Box::new("violates check".to_string()),
        );
        assert_eq!(code(StoreError::Query(bad)), tonic::Code::Internal);
        assert_eq!(
            code(StoreError::Query(Error::NotFound)),
            tonic::Code::Internal
        );
        let nul = Error::DatabaseError(
            DatabaseErrorKind::Unknown,
            Box::new("invalid byte sequence for encoding \"UTF8\": 0x00".to_string()),
        );
        assert_eq!(code(StoreError::Query(nul)), tonic::Code::InvalidArgument);
    }
}
