//! The data stack behind trellisd for the scenarios that need one: private
//! PostgreSQL and Redis (trellis-store's devserver module) in a throw-away
//! directory with durability off, the `trellis_bench` database created and
//! migrated before trellisd starts.
//!
//! Both servers are started from a thread pinned to the servers' CPU. The
//! devserver module forks every child from one long-lived spawner thread,
//! created by the first start; created from the pinned thread, it and so
//! PostgreSQL (with every backend it forks later) and Redis inherit the pin.
//! The report states the CPUs they actually ended up on.

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;

use anyhow::Context as _;
use tempfile::TempDir;
use trellis_core::config::Argon2Config;
use trellis_store::devserver::{PgOptions, PrivatePostgres, PrivateRedis};

use crate::servers::{self, SchedStat};

/// The database the bench creates, migrates and seeds.
const DATABASE: &str = "trellis_bench";

/// Running PostgreSQL and Redis; stopped (and their files removed) on drop.
pub struct Stack {
    pub database_url: String,
    pub redis_url: String,
    /// The argon2 parameters trellisd is given (and the raw reference uses).
    pub argon2: Argon2Config,
    /// Fields drop in order: the servers stop before their directory goes.
    pg: PrivatePostgres,
    _redis: PrivateRedis,
    _dir: TempDir,
}

impl Stack {
    /// Starts both servers (pinned to `cpu` when given), creates and
    /// migrates the database.
    pub async fn start(cpu: Option<usize>, argon2: Argon2Config) -> anyhow::Result<Stack> {
        let dir = tempfile::Builder::new()
            .prefix("trellis-bench-")
            .tempdir()
            .context("creating the stack's temporary directory")?;
        // As root, PostgreSQL runs as `postgres`, which must reach its data
        // directory inside this one.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))?;
        let base: PathBuf = dir.path().to_path_buf();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("bench-stack".into())
            .spawn(move || {
                let started = (|| {
                    if let Some(cpu) = cpu {
                        servers::pin_current_thread(cpu)?;
                    }
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async {
                        let pg = PrivatePostgres::start(PgOptions {
                            data_dir: base.join("pg"),
                            durable: false,
                            port: None,
                        })
                        .await
                        .context("starting PostgreSQL")?;
                        let redis = PrivateRedis::start(&base.join("redis"), None)
                            .await
                            .context("starting Redis")?;
                        anyhow::Ok((pg, redis))
                    })
                })();
                // The receiver is gone only when the bench is interrupted;
                // the servers are then dropped, so stopped, here.
                let _ = tx.send(started);
            })?;
        let (pg, redis) = rx.await.context("the stack thread died")??;
        pg.ensure_database(DATABASE).await?;
        let database_url = pg.url(DATABASE);
        trellis_store::migrate::run(&database_url)
            .await
            .context("migrating the bench database")?;
        Ok(Stack {
            database_url,
            redis_url: redis.url(),
            argon2,
            pg,
            _redis: redis,
            _dir: dir,
        })
    }

    /// The environment trellisd runs with on this stack.
    pub fn trellisd_env(&self) -> Vec<(&'static str, String)> {
        // The bench logs in and registers from one address far more often
        // than the per-IP defaults (30 and 10 a minute) allow.
        let unlimited = 100_000_000.to_string();
        vec![
            ("TRELLIS_DATABASE_URL", self.database_url.clone()),
            ("TRELLIS_REDIS_URL", self.redis_url.clone()),
            ("TRELLIS_AUTH__LOGIN_PER_IP_PER_MINUTE", unlimited.clone()),
            ("TRELLIS_AUTH__REGISTER_PER_IP_PER_MINUTE", unlimited),
            (
                "TRELLIS_AUTH__ARGON2__MEMORY_KIB",
                self.argon2.memory_kib.to_string(),
            ),
            (
                "TRELLIS_AUTH__ARGON2__ITERATIONS",
                self.argon2.iterations.to_string(),
            ),
            (
                "TRELLIS_AUTH__ARGON2__PARALLELISM",
                self.argon2.parallelism.to_string(),
            ),
        ]
    }

    /// The postmaster's pid, from `postmaster.pid`.
    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pg.data_dir.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// The cluster's major version, from `PG_VERSION`.
    pub fn pg_version(&self) -> String {
        std::fs::read_to_string(self.pg.data_dir.join("PG_VERSION"))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|_| "?".to_string())
    }

    /// CPU time of every PostgreSQL process: the postmaster, its backends
    /// and background workers.
    pub fn db_sched_stat(&self) -> Option<SchedStat> {
        servers::family_sched_stat(self.postmaster_pid()?)
    }

    /// Where the servers run, for the report: e.g. `postgres CPU 0,
    /// redis-server CPU 0`.
    pub fn placement(&self) -> String {
        let me = std::process::id();
        let redis = servers::processes()
            .into_iter()
            .find(|p| p.ppid == me && p.comm.starts_with("redis-server"))
            .map(|p| p.pid);
        let cpus = |pid: Option<u32>| match pid {
            Some(pid) => crate::cpu_list(&servers::cpus_of(pid)),
            None => "CPUs ?".to_string(),
        };
        format!(
            "postgres {}, redis-server {}",
            cpus(self.postmaster_pid()),
            cpus(redis)
        )
    }
}
