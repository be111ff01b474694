//! Redis through bb8-redis. Redis holds only rebuildable state (counters,
//! revocations, caches, live-stream fan-out), under the configured key prefix.
//!
//! Like the PostgreSQL pool, connections are not tested on checkout (a
//! `PING` before every command would double the round trips of every
//! pooled call: lockout checks, refresh grace lookups, revocation
//! publishes, the LLM answer cache; the quota script and chat's fan-out use
//! the shared multiplexed connection, [`crate::Store::redis_shared`]). Instead a pooled
//! connection remembers when a command on it failed with a broken-link
//! error and the pool discards it on return ([`Tracked`]), and when the
//! health probe sees Redis come back after an outage it revalidates the
//! idle connections, so those the outage broke are gone before a request
//! can get one. Idle connections are handed out most recently used first,
//! so a quiet service keeps reusing one warm connection.

use std::time::Duration;

use bb8_redis::RedisConnectionManager;
use bb8_redis::bb8::{ManageConnection, Pool, PooledConnection, QueueStrategy};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use crate::StoreError;

pub type RedisPool = Pool<Manager>;
pub type RedisConn<'a> = PooledConnection<'a, Manager>;

/// bb8-redis's manager, handing out [`Tracked`] connections.
#[derive(Debug, Clone)]
pub struct Manager(RedisConnectionManager);

/// A pooled Redis connection that notes when a command on it failed
/// because the link is gone (I/O error, dropped or unrecoverable
/// connection); the pool then discards it instead of handing it out again.
/// Commands go through it unchanged (it is a [`ConnectionLike`]).
pub struct Tracked {
    conn: MultiplexedConnection,
    broken: bool,
}

impl std::fmt::Debug for Tracked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracked")
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl Tracked {
    fn note<T>(&mut self, r: &RedisResult<T>) {
        if let Err(e) = r
            && (e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error())
        {
            self.broken = true;
        }
    }
}

impl ConnectionLike for Tracked {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let r = self.conn.req_packed_command(cmd).await;
            self.note(&r);
            r
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let r = self.conn.req_packed_commands(cmd, offset, count).await;
            self.note(&r);
            r
        })
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}

impl ManageConnection for Manager {
    type Connection = Tracked;
    type Error = RedisError;

    async fn connect(&self) -> Result<Tracked, RedisError> {
        Ok(Tracked {
            conn: self.0.connect().await?,
            broken: false,
        })
    }

    async fn is_valid(&self, conn: &mut Tracked) -> Result<(), RedisError> {
        let r = self.0.is_valid(&mut conn.conn).await;
        conn.note(&r);
        r
    }

    fn has_broken(&self, conn: &mut Tracked) -> bool {
        conn.broken
    }
}

/// A lazy pool: connections are opened on demand, never at construction.
pub fn pool(url: &str, size: u32, acquire_timeout: Duration) -> Result<RedisPool, StoreError> {
    let manager = Manager(RedisConnectionManager::new(url)?);
    Ok(Pool::builder()
        .max_size(size)
        .min_idle(Some(0))
        .connection_timeout(acquire_timeout)
        .test_on_check_out(false)
        .queue_strategy(QueueStrategy::Lifo)
        .build_unchecked(manager))
}

/// `PING`s every idle pooled connection once; those that fail are
/// discarded by the pool when they are returned.
pub async fn revalidate(pool: &RedisPool) {
    for c in crate::idle_connections(pool).await.iter_mut() {
        let _: RedisResult<String> = ::redis::cmd("PING").query_async(&mut **c).await;
    }
}

/// `PING` on a pooled connection.
pub async fn ping(pool: &RedisPool) -> Result<(), StoreError> {
    let mut conn = pool
        .get()
        .await
        .map_err(|_| StoreError::Unavailable("redis"))?;
    let _: String = ::redis::cmd("PING").query_async(&mut *conn).await?;
    Ok(())
}

/// Deletes every key of this install containing `needle` (SCAN, not KEYS,
/// so Redis keeps serving meanwhile); returns how many went. For rare
/// administrative acts such as erasing a user's counters, not per request.
pub async fn delete_containing(store: &crate::Store, needle: &str) -> Result<usize, StoreError> {
    // Glob metacharacters in the needle would widen the match.
    let escaped: String = needle
        .chars()
        .flat_map(|c| match c {
            '*' | '?' | '[' | ']' | '\\' => vec!['\\', c],
            c => vec![c],
        })
        .collect();
    let pattern = store.key(&format!("*{escaped}*"));
    let mut conn = store.redis().await?;
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = ::redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut *conn)
            .await?;
        if !keys.is_empty() {
            let n: usize = ::redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut *conn)
                .await?;
            deleted += n;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}
