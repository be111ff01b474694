//! The response cache: a deterministic request (temperature 0, `cache`
//! asked for) is keyed by a SHA-256 of everything that shapes the answer,
//! and its answer kept in Redis for `llm.cache_ttl`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use trellis_store::Store;

use crate::prompt::Turn;

/// What is kept per cached answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Cached {
    pub text: String,
    pub finish_reason: String,
    pub provider: String,
    pub upstream_model: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// The cache key of a request: the model alias, the completion budget and
/// the assembled turns.
pub fn key(store: &Store, model: &str, max_tokens: u32, turns: &[Turn]) -> String {
    let mut h = Sha256::new();
    h.update(model.as_bytes());
    h.update([0]);
    h.update(max_tokens.to_be_bytes());
    for t in turns {
        h.update(t.role.as_bytes());
        h.update([0]);
        h.update((t.content.len() as u64).to_be_bytes());
        h.update(t.content.as_bytes());
    }
    let digest = h.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    store.key(&format!("llm:cache:{hex}"))
}

/// The cached answer under `key`, if any. A Redis failure is a miss.
pub async fn get(store: &Store, key: &str) -> Option<Cached> {
    let mut conn = store.redis().await.ok()?;
    let raw: Option<String> = redis::cmd("GET")
        .arg(key)
        .query_async(&mut *conn)
        .await
        .ok()?;
    raw.and_then(|r| serde_json::from_str(&r).ok())
}

/// Keeps `value` under `key` for `ttl`; failures are logged, not raised.
pub async fn put(store: &Store, key: &str, value: &Cached, ttl: Duration) {
    let Ok(json) = serde_json::to_string(value) else {
        return;
    };
    let result: Result<(), String> = async {
        let mut conn = store.redis().await.map_err(|e| e.to_string())?;
        redis::cmd("SET")
            .arg(key)
            .arg(json)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .query_async::<()>(&mut *conn)
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "could not cache an answer");
    }
}
