//! Redis through bb8-redis. Redis holds only rebuildable state (counters,
//! revocations, caches, live-stream fan-out), under the configured key prefix.

use std::time::Duration;

use bb8_redis::RedisConnectionManager;
use bb8_redis::bb8::{Pool, PooledConnection};

use crate::StoreError;

pub type RedisPool = Pool<RedisConnectionManager>;
pub type RedisConn<'a> = PooledConnection<'a, RedisConnectionManager>;

/// A lazy pool: connections are opened on demand, never at construction.
pub fn pool(url: &str, size: u32, acquire_timeout: Duration) -> Result<RedisPool, StoreError> {
    let manager = RedisConnectionManager::new(url)?;
    Ok(Pool::builder()
        .max_size(size)
        .min_idle(Some(0))
        .connection_timeout(acquire_timeout)
        .test_on_check_out(true)
        .build_unchecked(manager))
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
