//! Password hashing with argon2id on a small pool of dedicated threads:
//! `hash_concurrency` threads (one per core by default) run at a lowered
//! scheduling priority (nice 10), and further hashes queue. A login flood
//! therefore costs the flooders time, while the async workers that serve
//! every other call keep the CPU when they need it. Unknown accounts are
//! checked against a dummy hash so that their answer takes as long as a
//! wrong password's.
//!
//! Each hashing thread keeps its argon2 working memory (`memory_kib`) and
//! reuses it: allocating 19 MiB afresh per hash cost ~4,900 page faults,
//! a third more CPU than the hash itself. Hashes with other parameters
//! (older accounts) are verified with a fresh allocation.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use argon2::password_hash::{
    Output, ParamsString, PasswordHash, PasswordHasher as _, PasswordVerifier, SaltString,
    rand_core::OsRng,
};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use tokio::sync::oneshot;
use trellis_core::config::Argon2Config;

use crate::error::AuthError;

/// A hashing thread's argon2 instance and its reusable working memory.
pub struct Worker {
    argon: Argon2<'static>,
    blocks: Vec<Block>,
}

const OUTPUT_LEN: usize = 32;

impl Worker {
    fn new(argon: Argon2<'static>) -> Worker {
        let blocks = vec![Block::default(); argon.params().block_count()];
        Worker { argon, blocks }
    }

    /// A PHC-format argon2id hash of `password`, in this worker's memory.
    fn hash(&mut self, password: &[u8]) -> Result<String, argon2::password_hash::Error> {
        let salt = SaltString::generate(&mut OsRng);
        let mut salt_buf = [0u8; 64];
        let salt_bytes = salt.as_salt().decode_b64(&mut salt_buf)?;
        let (argon, blocks) = (&self.argon, &mut self.blocks);
        let output = Output::init_with(OUTPUT_LEN, |out| {
            argon
                .hash_password_into_with_memory(password, salt_bytes, out, &mut blocks[..])
                .map_err(|_| argon2::password_hash::Error::Password)
        })?;
        Ok(PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(self.argon.params())?,
            salt: Some(salt.as_salt()),
            hash: Some(output),
        }
        .to_string())
    }

    /// Whether `password` matches the PHC string `hash`.
    fn verify(&mut self, password: &[u8], hash: &str) -> bool {
        let Ok(parsed) = PasswordHash::new(hash) else {
            return false;
        };
        let ours = self.argon.params();
        let same_params = parsed.algorithm == Algorithm::Argon2id.ident()
            && parsed.version == Some(Version::V0x13.into())
            && Params::try_from(&parsed).is_ok_and(|p| {
                p.m_cost() == ours.m_cost()
                    && p.t_cost() == ours.t_cost()
                    && p.p_cost() == ours.p_cost()
                    && p.keyid().is_empty()
                    && p.data().is_empty()
            });
        let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
            return false;
        };
        if !same_params || expected.len() != OUTPUT_LEN {
            return self.argon.verify_password(password, &parsed).is_ok();
        }
        let mut salt_buf = [0u8; 64];
        let Ok(salt_bytes) = salt.decode_b64(&mut salt_buf) else {
            return false;
        };
        let (argon, blocks) = (&self.argon, &mut self.blocks);
        // Output compares in constant time.
        Output::init_with(OUTPUT_LEN, |out| {
            argon
                .hash_password_into_with_memory(password, salt_bytes, out, &mut blocks[..])
                .map_err(|_| argon2::password_hash::Error::Password)
        })
        .is_ok_and(|computed| computed == expected)
    }
}

type Job = Box<dyn FnOnce(&mut Worker) + Send>;

/// Hashes waiting per hashing thread before further ones are refused
/// (RESOURCE_EXHAUSTED with a retry hint) rather than queued: with OWASP
/// parameters this bounds the wait to roughly two seconds, and the memory
/// a flood can pin to a few kilobytes per queued request.
const QUEUE_PER_THREAD: usize = 64;
/// Retry hint given when the queue is full.
const BUSY_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Nice value of hashing threads: they yield to the request workers.
const HASH_NICE: i32 = 10;

#[derive(Clone)]
pub struct PasswordHasher {
    /// Dropping the last clone closes the queue and ends the threads.
    jobs: mpsc::SyncSender<Job>,
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
        Self::with_queue(cfg, concurrency, QUEUE_PER_THREAD)
    }

    /// [`Self::new`] with `per_thread` queued hashes per thread.
    fn with_queue(
        cfg: Argon2Config,
        concurrency: usize,
        per_thread: usize,
    ) -> Result<PasswordHasher, AuthError> {
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
        let (jobs, queue) = mpsc::sync_channel::<Job>(threads * per_thread);
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads {
            let queue = queue.clone();
            let argon = argon.clone();
            std::thread::Builder::new()
                .name(format!("trellis-hash-{i}"))
                .spawn(move || {
                    lower_priority();
                    let mut worker = Worker::new(argon);
                    loop {
                        let job = match queue.lock() {
                            Ok(q) => q.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(&mut worker),
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
        f: impl FnOnce(&mut Worker) -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .try_send(Box::new(move |worker| {
                let _ = tx.send(f(worker));
            }))
            .map_err(|e| match e {
                mpsc::TrySendError::Full(_) => AuthError::Busy(BUSY_RETRY),
                mpsc::TrySendError::Disconnected(_) => {
                    AuthError::Internal("hash pool closed".into())
                }
            })?;
        rx.await
            .map_err(|_| AuthError::Internal("hash job lost".into()))
    }

    /// A PHC-format argon2id hash of `password`.
    pub async fn hash(&self, password: String) -> Result<String, AuthError> {
        self.blocking(move |worker| worker.hash(password.as_bytes()))
            .await?
            .map_err(|e| AuthError::Internal(format!("argon2: {e}")))
    }

    /// Whether `password` matches `hash`; with no hash (unknown account) the
    /// dummy is checked, taking the same time, and the answer is false.
    pub async fn verify(&self, password: String, hash: Option<String>) -> Result<bool, AuthError> {
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.dummy.to_string());
        let ok = self
            .blocking(move |worker| worker.verify(password.as_bytes(), &hash))
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
        assert!(
            !h.verify("wrong".into(), Some(hash.clone()))
                .await
                .expect("verify")
        );
        // The reused-memory hash is a standard PHC string any argon2 verifies.
        let parsed = PasswordHash::new(&hash).expect("phc");
        let standard = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(64, 1, 1, None).expect("params"),
        );
        assert!(standard.verify_password(b"S3cret!pw", &parsed).is_ok());
        // A hash made with other parameters still verifies.
        let other = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(128, 2, 1, None).expect("params"),
        )
        .hash_password(b"0ld!Passw0rd", &SaltString::generate(&mut OsRng))
        .expect("hash")
        .to_string();
        assert!(
            h.verify("0ld!Passw0rd".into(), Some(other.clone()))
                .await
                .expect("verify")
        );
        assert!(!h.verify("nope".into(), Some(other)).await.expect("verify"));
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

    #[tokio::test]
    async fn a_full_queue_refuses_with_a_retry_hint() {
        let h = PasswordHasher::with_queue(cheap(), 1, 2).expect("hasher");
        // Hold the only thread, then fill the queue of two.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = oneshot::channel();
        let holder = {
            let h = h.clone();
            tokio::spawn(async move {
                h.blocking(move |_| {
                    let _ = started_tx.send(());
                    let _ = held.recv();
                })
                .await
            })
        };
        started.await.expect("worker busy");
        let queued: Vec<_> = (0..2)
            .map(|_| {
                let h = h.clone();
                tokio::spawn(async move { h.hash("Qu3ued!pw".into()).await })
            })
            .collect();
        // Let both reach the queue.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let refused = h.hash("0ne!more".into()).await.expect_err("queue full");
        assert!(
            matches!(refused, AuthError::Busy(d) if d == BUSY_RETRY),
            "{refused:?}"
        );
        let status = tonic::Status::from(refused);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        release.send(()).expect("release");
        holder.await.expect("join").expect("held job");
        for q in queued {
            q.await.expect("join").expect("queued hashes complete");
        }
        h.hash("Aft3r!wards".into()).await.expect("room again");
    }
}
