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
