//! Password hashing with argon2id on a bounded set of blocking threads: at
//! most `hash_concurrency` hashes run at once and further logins queue, so a
//! login flood costs the flooders time but cannot take the runtime's worker
//! threads from other calls. Unknown accounts are checked against a dummy
//! hash so that their answer takes as long as a wrong password's.

use std::sync::Arc;

use argon2::password_hash::{
    PasswordHash, PasswordHasher as _, PasswordVerifier, SaltString, rand_core::OsRng,
};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::Semaphore;
use trellis_core::config::Argon2Config;

use crate::error::AuthError;

#[derive(Clone)]
pub struct PasswordHasher {
    argon: Arc<Argon2<'static>>,
    permits: Arc<Semaphore>,
    dummy: Arc<str>,
}

impl std::fmt::Debug for PasswordHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordHasher").finish_non_exhaustive()
    }
}

impl PasswordHasher {
    pub fn new(cfg: Argon2Config, concurrency: usize) -> Result<PasswordHasher, AuthError> {
        let params = Params::new(cfg.memory_kib, cfg.iterations, cfg.parallelism, None)
            .map_err(|e| AuthError::Internal(format!("argon2 parameters: {e}")))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let concurrency = if concurrency == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        } else {
            concurrency
        };
        let salt = SaltString::generate(&mut OsRng);
        let dummy = argon
            .hash_password(b"not a real password", &salt)
            .map_err(|e| AuthError::Internal(format!("argon2: {e}")))?
            .to_string();
        Ok(PasswordHasher {
            argon: Arc::new(argon),
            permits: Arc::new(Semaphore::new(concurrency)),
            dummy: dummy.into(),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Argon2<'static>) -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| AuthError::Internal("hasher closed".into()))?;
        let argon = self.argon.clone();
        tokio::task::spawn_blocking(move || f(&argon))
            .await
            .map_err(|e| AuthError::Internal(format!("hash task: {e}")))
    }

    /// A PHC-format argon2id hash of `password`.
    pub async fn hash(&self, password: String) -> Result<String, AuthError> {
        self.blocking(move |argon| {
            let salt = SaltString::generate(&mut OsRng);
            argon
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
        })
        .await?
        .map_err(|e| AuthError::Internal(format!("argon2: {e}")))
    }

    /// Whether `password` matches `hash`; with no hash (unknown account) the
    /// dummy is checked, taking the same time, and the answer is false.
    pub async fn verify(&self, password: String, hash: Option<String>) -> Result<bool, AuthError> {
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.dummy.to_string());
        let ok = self
            .blocking(move |argon| {
                PasswordHash::new(&hash)
                    .map(|parsed| argon.verify_password(password.as_bytes(), &parsed).is_ok())
                    .unwrap_or(false)
            })
            .await?;
        Ok(known && ok)
    }
}
