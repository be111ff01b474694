//! Per-client-IP rate limits on the calls attackers hammer (Login, Register,
//! RequestPasswordReset), counted in Redis so every replica shares them,
//! and the lockout of logins that name no account. Per-account lockout
//! lives with Login (service.rs); for a login naming no account the same
//! answers are given from Redis — UNAUTHENTICATED for the first
//! `lockout_threshold` failures in `lockout_window`, then RESOURCE_EXHAUSTED
//! for `lockout_base` — so that a lockout does not tell an attacker which
//! accounts exist. Like an account's, each further lock of the same login
//! lasts twice as long (up to a day); the count of a login naming no
//! account is forgotten `GHOST_MEMORY` after its last lock (an account's
//! only by a successful login). Redis being down skips the emulation rather
//! than answering differently.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use trellis_store::ratelimit;

use crate::audit::Origin;
use crate::error::AuthError;
use crate::service::AuthSvc;

impl AuthSvc {
    /// RESOURCE_EXHAUSTED (with RetryInfo) once `origin`'s IP has made more
    /// than `per_minute` `what` calls in the current minute (0: no limit).
    pub(crate) async fn limit_ip(
        &self,
        origin: &Origin,
        what: &str,
        per_minute: u32,
    ) -> Result<(), AuthError> {
        if origin.ip.is_empty() || per_minute == 0 {
            return Ok(());
        }
        let key = format!("auth:{what}:{}", origin.ip);
        match ratelimit::hit(&self.store, &key, per_minute, Duration::from_secs(60)).await? {
            None => Ok(()),
            Some(retry) => Err(AuthError::RateLimited(retry)),
        }
    }
}

/// How long the lock count of a login naming no account is kept after its
/// last lock.
const GHOST_MEMORY: Duration = Duration::from_secs(30 * 24 * 3600);

/// The longest lock, as for accounts.
const LONGEST_LOCK: Duration = Duration::from_secs(24 * 3600);

impl AuthSvc {
    /// Redis keys of a login string that names no account: its failures in
    /// the window, its current lock, and how many times it was locked.
    fn ghost_keys(&self, login: &str) -> (String, String, String) {
        let id = URL_SAFE_NO_PAD.encode(crate::tokens::digest(&login.to_lowercase()));
        (
            format!("auth:ghost:fail:{id}"),
            format!("auth:ghost:lock:{id}"),
            format!("auth:ghost:locks:{id}"),
        )
    }

    /// How long a login naming no account is still "locked", if it is.
    pub(crate) async fn ghost_locked(&self, login: &str) -> Option<Duration> {
        let (_, lock, _) = self.ghost_keys(login);
        let key = self.store.key(&lock);
        let ttl: Result<i64, _> = async {
            let mut conn = self.store.redis().await?;
            let ttl: i64 = ::redis::cmd("PTTL")
                .arg(&key)
                .query_async(&mut *conn)
                .await?;
            Ok::<_, trellis_store::StoreError>(ttl)
        }
        .await;
        match ttl {
            Ok(ms) if ms > 0 => Some(Duration::from_millis(ms as u64)),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read unknown-login lockouts");
                None
            }
        }
    }

    /// Counts a failed login naming no account, "locking" it as an account
    /// would be at the threshold: `lockout_base` the first time, doubling
    /// with every further lock.
    pub(crate) async fn ghost_failed(&self, login: &str) {
        let (fail, lock, locks) = self.ghost_keys(login);
        let threshold = self.cfg.lockout_threshold.saturating_sub(1);
        let r = async {
            if ratelimit::hit(&self.store, &fail, threshold, self.cfg.lockout_window)
                .await?
                .is_some()
            {
                let mut conn = self.store.redis().await?;
                let locks = self.store.key(&locks);
                let (locked,): (i64,) = ::redis::pipe()
                    .cmd("INCR")
                    .arg(&locks)
                    .cmd("PEXPIRE")
                    .arg(&locks)
                    .arg(GHOST_MEMORY.as_millis() as u64)
                    .ignore()
                    .query_async(&mut *conn)
                    .await?;
                let factor = 1u32 << (locked - 1).clamp(0, 10);
                let length = self
                    .cfg
                    .lockout_base
                    .saturating_mul(factor)
                    .min(LONGEST_LOCK);
                let _: () = ::redis::pipe()
                    .cmd("SET")
                    .arg(self.store.key(&lock))
                    .arg(1)
                    .arg("PX")
                    .arg((length.as_millis() as u64).max(1))
                    .ignore()
                    .del(self.store.key(&format!("rl:{fail}")))
                    .ignore()
                    .query_async(&mut *conn)
                    .await?;
            }
            Ok::<_, trellis_store::StoreError>(())
        }
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot count unknown-login failures");
        }
    }
}
