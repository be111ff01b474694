//! Fixed-window rate limits in Redis, shared by every replica: a counter
//! per key and window, created with the window as its lifetime.

use std::time::Duration;

use crate::{Store, StoreError};

/// Counts one hit on `key` (under the store's prefix). `Ok(None)` while
/// within `limit` hits per `window`; `Ok(Some(retry_after))` beyond it.
pub async fn hit(
    store: &Store,
    key: &str,
    limit: u32,
    window: Duration,
) -> Result<Option<Duration>, StoreError> {
    let key = store.key(&format!("rl:{key}"));
    let mut conn = store.redis().await?;
    let (count, ttl): (u64, i64) = ::redis::pipe()
        .incr(&key, 1)
        .pttl(&key)
        .query_async(&mut *conn)
        .await?;
    if ttl < 0 {
        // First hit of the window (or a key that lost its expiry).
        let _: () = ::redis::cmd("PEXPIRE")
            .arg(&key)
            .arg(window.as_millis() as u64)
            .query_async(&mut *conn)
            .await?;
    }
    if count > u64::from(limit) {
        let left = if ttl > 0 {
            Duration::from_millis(ttl as u64)
        } else {
            window
        };
        return Ok(Some(left));
    }
    Ok(None)
}
