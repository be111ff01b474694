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
//!
//! For the LLM gateway's profile it also reads what the two did over a
//! window: Redis's own command counts, PostgreSQL's committed transactions
//! and `llm_usage` rows.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
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

    /// The Redis server's pid: the bench's child named `redis-server`.
    pub fn redis_pid(&self) -> Option<u32> {
        let me = std::process::id();
        servers::processes()
            .into_iter()
            .find(|p| p.ppid == me && p.comm.starts_with("redis-server"))
            .map(|p| p.pid)
    }

    /// PostgreSQL's count of the bench database's committed transactions
    /// and of `llm_usage` rows (`pg_stat_database`, `count(*)`).
    pub async fn pg_activity(&self) -> Option<(i64, i64)> {
        let (client, connection) =
            tokio_postgres::connect(&self.database_url, tokio_postgres::NoTls)
                .await
                .ok()?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        // Backends publish their counts at most once a second, so this
        // lags the truth by about that much.
        let row = client
            .query_one(
                "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()), \
                 (SELECT count(*) FROM llm_usage)",
                &[],
            )
            .await
            .ok()?;
        Some((row.try_get(0).ok()?, row.try_get(1).ok()?))
    }

    /// Redis's own count of the commands it ran, by command (`INFO
    /// commandstats`, commands run inside scripts included): calls and
    /// microseconds spent.
    pub async fn redis_commands(&self) -> Option<BTreeMap<String, (u64, u64)>> {
        let addr = self
            .redis_url
            .strip_prefix("redis://")?
            .trim_end_matches('/');
        let reply = tokio::time::timeout(Duration::from_secs(2), async {
            let mut s = TcpStream::connect(addr).await.ok()?;
            s.write_all(b"INFO commandstats\r\n").await.ok()?;
            // A bulk string: `$<len>\r\n<len bytes>\r\n`.
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
                let header_end = buf.windows(2).position(|w| w == b"\r\n")?;
                let len: usize = std::str::from_utf8(buf.get(1..header_end)?)
                    .ok()?
                    .parse()
                    .ok()?;
                if buf.len() >= header_end + 2 + len {
                    return String::from_utf8(buf[header_end + 2..header_end + 2 + len].to_vec())
                        .ok();
                }
            }
        })
        .await
        .ok()??;
        Some(parse_commandstats(&reply))
    }

    /// Where the servers run, for the report: e.g. `postgres CPU 0,
    /// redis-server CPU 0`.
    pub fn placement(&self) -> String {
        let redis = self.redis_pid();
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

/// `cmdstat_<name>:calls=<n>,usec=<µs>,…` lines as name → (calls, µs).
fn parse_commandstats(info: &str) -> BTreeMap<String, (u64, u64)> {
    info.lines()
        .filter_map(|line| {
            let (name, fields) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |key: &str| {
                fields
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse::<u64>().ok())
            };
            Some((name.to_string(), (field("calls")?, field("usec")?)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_commandstats() {
        let info = "# Commandstats\r\n\
                    cmdstat_evalsha:calls=12,usec=340,usec_per_call=28.33,rejected_calls=0,failed_calls=0\r\n\
                    cmdstat_ping:calls=3,usec=1,usec_per_call=0.33,rejected_calls=0,failed_calls=0\r\n";
        let stats = parse_commandstats(info);
        assert_eq!(stats.get("evalsha"), Some(&(12, 340)));
        assert_eq!(stats.get("ping"), Some(&(3, 1)));
        assert_eq!(stats.len(), 2);
    }
}
