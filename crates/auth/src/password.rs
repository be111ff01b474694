//! Password hashing with argon2id on a small pool of dedicated threads:
//! `hash_concurrency` threads (one per core by default) run at a lowered
//! scheduling priority (nice 10), and further hashes queue. A login flood
//! therefore costs the flooders time, while the async workers that serve
//! every other call keep the CPU when they need it. Unknown accounts are
//! checked against a dummy hash so that their answer takes as long as a
//! wrong password's.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use argon2::password_hash::{
    PasswordHash, PasswordHasher as _, PasswordVerifier, SaltString, rand_core::OsRng,
};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::oneshot;
use trellis_core::config::Argon2Config;

use crate::error::AuthError;

type Job = Box<dyn FnOnce(&Argon2<'static>) + Send>;

/// Nice value of hashing threads: they yield to the request workers.
const HASH_NICE: i32 = 10;

#[derive(Clone)]
pub struct PasswordHasher {
    /// Dropping the last clone closes the queue and ends the threads.
    jobs: mpsc::Sender<Job>,
    dummy: Arc<str>,
}

impl std::fmt::Debug for PasswordHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordHasher").finish_non_exhaustive()
    }
}

/// Lowers the calling thread's scheduling priority (Linux: per thread).
#[allow(unsafe_code)]
fn lower_priority() {
    // SAFETY: setpriority(2) with PRIO_PROCESS and who = 0 only changes the
    // calling thread's nice value on Linux; it touches no memory of ours.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, HASH_NICE) };
    if rc != 0 {
        tracing::debug!("could not lower the hashing threads' priority");
    }
}

impl PasswordHasher {
    pub fn new(cfg: Argon2Config, concurrency: usize) -> Result<PasswordHasher, AuthError> {
        let params = Params::new(cfg.memory_kib, cfg.iterations, cfg.parallelism, None)
            .map_err(|e| AuthError::Internal(format!("argon2 parameters: {e}")))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let threads = if concurrency == 0 {
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
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads {
            let queue = queue.clone();
            let argon = argon.clone();
            std::thread::Builder::new()
                .name(format!("trellis-hash-{i}"))
                .spawn(move || {
                    lower_priority();
                    loop {
                        let job = match queue.lock() {
                            Ok(q) => q.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(&argon),
                            Err(_) => return,
                        }
                    }
                })
                .map_err(|e| AuthError::Internal(format!("hash thread: {e}")))?;
        }
        Ok(PasswordHasher {
            jobs,
            dummy: dummy.into(),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Argon2<'static>) -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move |argon| {
                let _ = tx.send(f(argon));
            }))
            .map_err(|_| AuthError::Internal("hash pool closed".into()))?;
        rx.await
            .map_err(|_| AuthError::Internal("hash job lost".into()))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> Argon2Config {
        Argon2Config {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        }
    }

    #[tokio::test]
    async fn hashes_verify_and_run_at_low_priority() {
        let h = PasswordHasher::new(cheap(), 2).expect("hasher");
        let hash = h.hash("S3cret!pw".into()).await.expect("hash");
        assert!(
            h.verify("S3cret!pw".into(), Some(hash.clone()))
                .await
                .expect("verify")
        );
        assert!(!h.verify("wrong".into(), Some(hash)).await.expect("verify"));
        assert!(
            !h.verify("anything".into(), None)
                .await
                .expect("unknown account is never a match")
        );
        // Field 19 of /proc/thread-self/stat is the thread's nice value.
        let stat = h
            .blocking(|_| std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default())
            .await
            .expect("job");
        let after_name = stat.rsplit(')').next().unwrap_or("");
        let nice: i32 = after_name
            .split_whitespace()
            .nth(16)
            .and_then(|v| v.parse().ok())
            .expect("nice field");
        assert_eq!(nice, HASH_NICE);
    }
}
