//! Revocations that every replica sees within a second, without a Redis
//! round trip per request: each process keeps the live revocations in memory
//! (expiring with the tokens they concern) and learns new ones over Redis
//! pub/sub. A sorted set keeps them for replicas that start, or reconnect,
//! later: they subscribe first, then load the set, so nothing falls between.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use moka::sync::Cache;
use trellis_store::Store;
use uuid::Uuid;

use crate::error::AuthError;

/// One revocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    /// One access token, by `jti`.
    Token(String),
    /// Every token of a session (refresh-token family).
    Session(Uuid),
    /// Every token of a user with a token version below this one.
    UserBefore(Uuid, i32),
    /// One API key, by id. Verifiers cache keys briefly; this reaches them
    /// before their cache entry would expire.
    ApiKey(Uuid),
}

impl Revocation {
    fn encode(&self) -> String {
        match self {
            Revocation::Token(jti) => format!("jti:{jti}"),
            Revocation::Session(sid) => format!("sid:{sid}"),
            Revocation::UserBefore(uid, ver) => format!("ver:{uid}:{ver}"),
            Revocation::ApiKey(id) => format!("key:{id}"),
        }
    }

    fn decode(s: &str) -> Option<Revocation> {
        let (kind, rest) = s.split_once(':')?;
        match kind {
            "jti" => Some(Revocation::Token(rest.to_string())),
            "sid" => Uuid::parse_str(rest).ok().map(Revocation::Session),
            "key" => Uuid::parse_str(rest).ok().map(Revocation::ApiKey),
            "ver" => {
                let (uid, ver) = rest.split_once(':')?;
                Some(Revocation::UserBefore(
                    Uuid::parse_str(uid).ok()?,
                    ver.parse().ok()?,
                ))
            }
            _ => None,
        }
    }
}

/// A moka cache hashing with foldhash (randomly seeded per cache): these
/// are looked up on every authenticated call, where SipHash showed in the
/// profile.
pub type FastCache<K, V> = Cache<K, V, foldhash::fast::RandomState>;

fn fast_cache<K, V>(ttl: Duration) -> FastCache<K, V>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    Cache::builder()
        .time_to_live(ttl)
        .build_with_hasher(Default::default())
}

/// The in-memory revocation set of one process.
pub struct Revocations {
    store: Store,
    lifetime: Duration,
    tokens: FastCache<String, ()>,
    sessions: FastCache<Uuid, ()>,
    versions: FastCache<Uuid, i32>,
    api_keys: FastCache<Uuid, ()>,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations").finish_non_exhaustive()
    }
}

impl Revocations {
    /// `lifetime`: how long a revocation matters (the access-token lifetime;
    /// a session revocation also blocks refresh, which is checked in the
    /// database, so it need not outlive the access tokens either).
    pub fn new(store: Store, lifetime: Duration) -> Arc<Revocations> {
        let keep = lifetime + Duration::from_secs(60);
        Arc::new(Revocations {
            store,
            lifetime: keep,
            tokens: fast_cache(keep),
            sessions: fast_cache(keep),
            versions: fast_cache(keep),
            api_keys: fast_cache(keep),
        })
    }

    fn channel(&self) -> String {
        self.store.key("auth:revocations")
    }

    /// Whether a token with these claims is revoked.
    pub fn is_revoked(&self, jti: &str, session: Uuid, user: Uuid, version: i32) -> bool {
        self.tokens.contains_key(jti)
            || self.sessions.contains_key(&session)
            || self.versions.get(&user).is_some_and(|min| version < min)
    }

    /// Whether the API key `id` was revoked recently enough that a cached
    /// verification of it may still be around.
    pub fn is_api_key_revoked(&self, id: Uuid) -> bool {
        self.api_keys.contains_key(&id)
    }

    /// The lowest token version still valid for `user`, when a
    /// [`Revocation::UserBefore`] for them is live. Verifiers holding a
    /// credential that carries no version (an API key) compare it before and
    /// after to learn that the account's access was cut meanwhile.
    pub fn user_version_floor(&self, user: Uuid) -> Option<i32> {
        self.versions.get(&user)
    }

    fn apply(&self, r: &Revocation) {
        match r {
            Revocation::Token(jti) => self.tokens.insert(jti.clone(), ()),
            Revocation::Session(sid) => self.sessions.insert(*sid, ()),
            Revocation::UserBefore(uid, ver) => {
                let keep = self.versions.get(uid).map_or(*ver, |v| v.max(*ver));
                self.versions.insert(*uid, keep);
            }
            Revocation::ApiKey(id) => self.api_keys.insert(*id, ()),
        }
    }

    /// Applies `r` here at once and tells every other replica.
    pub async fn publish(&self, r: Revocation) -> Result<(), AuthError> {
        self.apply(&r);
        let member = r.encode();
        let until = chrono::Utc::now().timestamp() + self.lifetime.as_secs() as i64;
        let key = self.channel();
        let mut conn = self.store.redis().await?;
        redis::pipe()
            .zadd(&key, &member, until)
            .ignore()
            .zrembyscore(&key, "-inf", chrono::Utc::now().timestamp())
            .ignore()
            .publish(&key, &member)
            .ignore()
            .query_async::<()>(&mut *conn)
            .await?;
        Ok(())
    }

    /// Follows revocations published anywhere, reconnecting after errors.
    pub fn spawn_listener(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(me) = this.upgrade() else { return };
                if let Err(e) = me.listen().await {
                    tracing::warn!(error = %e, "revocation feed interrupted; reconnecting");
                }
                drop(me);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    }

    async fn listen(&self) -> Result<(), AuthError> {
        let key = self.channel();
        let mut pubsub = self.store.redis_client()?.get_async_pubsub().await?;
        pubsub.subscribe(&key).await?;
        {
            let mut conn = self.store.redis().await?;
            let live: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(&key)
                .arg(chrono::Utc::now().timestamp())
                .arg("+inf")
                .query_async(&mut *conn)
                .await?;
            for m in live.iter().filter_map(|m| Revocation::decode(m)) {
                self.apply(&m);
            }
        }
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            if let Some(r) = msg
                .get_payload::<String>()
                .ok()
                .as_deref()
                .and_then(Revocation::decode)
            {
                self.apply(&r);
            }
        }
        Err(AuthError::Internal("revocation subscription closed".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_round_trip() {
        let uid = Uuid::now_v7();
        for r in [
            Revocation::Token("abc".into()),
            Revocation::Session(uid),
            Revocation::UserBefore(uid, 3),
            Revocation::ApiKey(uid),
        ] {
            assert_eq!(Revocation::decode(&r.encode()), Some(r));
        }
        assert_eq!(Revocation::decode("nope"), None);
        assert_eq!(Revocation::decode("ver:x:1"), None);
        assert_eq!(Revocation::decode("key:x"), None);
    }
}
