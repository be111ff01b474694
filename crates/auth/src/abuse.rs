//! Per-client-IP rate limits on the calls attackers hammer (Login, Register,
//! RequestPasswordReset), counted in Redis so every replica shares them,
//! and the lockout of logins that name no account. Per-account lockout
//! lives with Login (service.rs); for a login naming no account the same
//! answers are given from Redis — UNAUTHENTICATED for the first
//! `lockout_threshold` failures in `lockout_window`, then RESOURCE_EXHAUSTED
//! for `lockout_base` — so that a lockout does not tell an attacker which
//! accounts exist. (Real lockouts double on repeat; these do not, which
//! only shows after a full lock period per probe.) Redis being down skips
//! the emulation rather than answering differently.

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

impl AuthSvc {
    /// Redis keys of a login string that names no account.
    fn ghost_keys(&self, login: &str) -> (String, String) {
        let id = URL_SAFE_NO_PAD.encode(crate::tokens::digest(&login.to_lowercase()));
        (
            format!("auth:ghost:fail:{id}"),
            format!("auth:ghost:lock:{id}"),
        )
    }

    /// How long a login naming no account is still "locked", if it is.
    pub(crate) async fn ghost_locked(&self, login: &str) -> Option<Duration> {
        let (_, lock) = self.ghost_keys(login);
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
    /// would be at the threshold.
    pub(crate) async fn ghost_failed(&self, login: &str) {
        let (fail, lock) = self.ghost_keys(login);
        let threshold = self.cfg.lockout_threshold.saturating_sub(1);
        let r = async {
            if ratelimit::hit(&self.store, &fail, threshold, self.cfg.lockout_window)
                .await?
                .is_some()
            {
                let mut conn = self.store.redis().await?;
                let _: () = ::redis::pipe()
                    .cmd("SET")
                    .arg(self.store.key(&lock))
                    .arg(1)
                    .arg("PX")
                    .arg(self.cfg.lockout_base.as_millis() as u64)
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
