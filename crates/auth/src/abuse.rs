//! Per-client-IP rate limits on the calls attackers hammer (Login, Register,
//! RequestPasswordReset), counted in Redis so every replica shares them.
//! Per-account lockout lives with Login (service.rs).

use std::time::Duration;

use trellis_store::ratelimit;

use crate::audit::Origin;
use crate::error::AuthError;
use crate::service::AuthSvc;

impl AuthSvc {
    /// RESOURCE_EXHAUSTED (with RetryInfo) once `origin`'s IP has made more
    /// than `per_minute` `what` calls in the current minute.
    pub(crate) async fn limit_ip(
        &self,
        origin: &Origin,
        what: &str,
        per_minute: u32,
    ) -> Result<(), AuthError> {
        if origin.ip.is_empty() {
            return Ok(());
        }
        let key = format!("auth:{what}:{}", origin.ip);
        match ratelimit::hit(&self.store, &key, per_minute, Duration::from_secs(60)).await? {
            None => Ok(()),
            Some(retry) => Err(AuthError::RateLimited(retry)),
        }
    }
}
