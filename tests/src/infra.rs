//! PostgreSQL and Redis for the whole run, and a fresh database per test.

use std::sync::atomic::{AtomicU32, Ordering};

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use tokio::sync::OnceCell;
use trellis_store::devserver::{PgOptions, PrivatePostgres, PrivateRedis};

/// The run's servers. Private ones live until the test process exits.
#[derive(Debug)]
pub struct Infra {
    /// URL of a maintenance database on the server (for CREATE DATABASE).
    admin_url: String,
    /// Name of the migrated template every test database is cloned from.
    template: String,
    pub redis_url: String,
    _pg: Option<PrivatePostgres>,
    _redis: Option<PrivateRedis>,
    _dir: Option<tempfile::TempDir>,
}

static INFRA: OnceCell<Infra> = OnceCell::const_new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// The run's infrastructure, started on first use.
pub async fn infra() -> &'static Infra {
    INFRA
        .get_or_init(|| async {
            match Infra::start().await {
                Ok(i) => i,
                Err(e) => panic!("test infrastructure failed to start: {e:#}"),
            }
        })
        .await
}

/// The database name part of a postgres URL replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[after_scheme..].find('/') {
        Some(slash) => &base[..after_scheme + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

impl Infra {
    async fn start() -> anyhow::Result<Infra> {
        // The subscriber is opt-in: `TRELLIS_TEST_LOG=debug cargo test`.
        if let Ok(filter) = std::env::var("TRELLIS_TEST_LOG") {
            trellis_core::telemetry::init(&trellis_core::config::TelemetryConfig {
                log_filter: filter,
                ..Default::default()
            });
        }
        let needs_dir = std::env::var("TRELLIS_TEST_DATABASE_URL").is_err()
            || std::env::var("TRELLIS_TEST_REDIS_URL").is_err();
        remove_stale_dirs();
        let dir = if needs_dir {
            Some(
                tempfile::Builder::new()
                    .prefix(&format!("trellis-test-{}-", std::process::id()))
                    .tempdir()?,
            )
        } else {
            None
        };
        let (admin_url, pg) = match std::env::var("TRELLIS_TEST_DATABASE_URL") {
            Ok(url) => (url, None),
            Err(_) => {
                let base = dir
                    .as_ref()
                    .map(|d| d.path().to_path_buf())
                    .unwrap_or_default();
                let pg = PrivatePostgres::start(PgOptions {
                    data_dir: base.join("pg"),
                    durable: false,
                    port: None,
                })
                .await?;
                (pg.url("postgres"), Some(pg))
            }
        };
        let (redis_url, redis) = match std::env::var("TRELLIS_TEST_REDIS_URL") {
            Ok(url) => (url, None),
            Err(_) => {
                let base = dir
                    .as_ref()
                    .map(|d| d.path().to_path_buf())
                    .unwrap_or_default();
                let r = PrivateRedis::start(&base.join("redis"), None).await?;
                (r.url(), Some(r))
            }
        };
        let pid = std::process::id();
        let template = format!("trellis_tpl_{pid}");
        let mut admin = AsyncPgConnection::establish(&admin_url).await?;
        drop_stale_databases(&mut admin).await?;
        diesel::sql_query(format!("DROP DATABASE IF EXISTS {template}"))
            .execute(&mut admin)
            .await?;
        diesel::sql_query(format!("CREATE DATABASE {template}"))
            .execute(&mut admin)
            .await?;
        trellis_store::migrate::run(&with_database(&admin_url, &template)).await?;
        Ok(Infra {
            admin_url,
            template,
            redis_url,
            _pg: pg,
            _redis: redis,
            _dir: dir,
        })
    }

    /// A new database cloned from the migrated template; returns its URL.
    pub async fn fresh_database(&self) -> String {
        let name = format!(
            "trellis_test_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = AsyncPgConnection::establish(&self.admin_url)
            .await
            .expect("admin connection");
        // CREATE DATABASE … TEMPLATE needs the template to have no other
        // sessions; clones run one at a time per server, so retry briefly.
        let mut attempts = 0;
        loop {
            let r = diesel::sql_query(format!("CREATE DATABASE {name} TEMPLATE {}", self.template))
                .execute(&mut admin)
                .await;
            match r {
                Ok(_) => break,
                Err(e) if attempts < 50 => {
                    attempts += 1;
                    tracing::debug!(error = %e, "template busy, retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot create test database: {e}"),
            }
        }
        with_database(&self.admin_url, &name)
    }

    /// A unique Redis key prefix for one test.
    pub fn fresh_prefix(&self) -> String {
        format!("test:{}:", uuid::Uuid::now_v7().simple())
    }
}

/// Private servers die with the test process, but their data directories
/// outlive it (statics are never dropped): remove those of finished runs.
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("trellis-test-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Drops databases left behind by test runs whose process is gone.
async fn drop_stale_databases(admin: &mut AsyncPgConnection) -> anyhow::Result<()> {
    #[derive(diesel::QueryableByName)]
    struct Db {
        #[diesel(sql_type = diesel::sql_types::Text)]
        datname: String,
    }
    let dbs: Vec<Db> = diesel::sql_query(
        "SELECT datname FROM pg_database WHERE datname LIKE 'trellis\\_test\\_%' OR datname LIKE 'trellis\\_tpl\\_%'",
    )
    .load(admin)
    .await?;
    for db in dbs {
        let pid = db
            .datname
            .trim_start_matches("trellis_test_")
            .trim_start_matches("trellis_tpl_")
            .split('_')
            .next()
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = diesel::sql_query(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                db.datname
            ))
            .execute(admin)
            .await;
        }
    }
    Ok(())
}
