//! Private PostgreSQL and Redis servers, started from the locally installed
//! binaries, for `trellisd dev` (data kept under `.trellis/`) and for the test
//! harness (throw-away data, durability off for speed).
//!
//! PostgreSQL refuses to run as root, so as root the server runs as the
//! `postgres` user. Children are put in their own process group (a Ctrl-C in
//! the terminal reaches trellisd, which drains and then stops them in order)
//! and are told to exit if trellisd dies, so nothing is left running.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User};

const PG_HINT: &str = "install the Debian package `postgresql` (apt-get install postgresql) \
     or point Trellis at a server with TRELLIS_DATABASE_URL";
const REDIS_HINT: &str = "install the Debian package `redis-server` (apt-get install redis-server) \
     or point Trellis at a server with TRELLIS_REDIS_URL";

/// Where the PostgreSQL server binaries are.
#[derive(Debug, Clone)]
pub struct PgBinaries {
    pub initdb: PathBuf,
    pub postgres: PathBuf,
}

/// Finds `initdb` and `postgres`: the newest `/usr/lib/postgresql/*/bin`
/// first (Debian keeps them off PATH), then PATH.
pub fn find_postgres() -> anyhow::Result<PgBinaries> {
    let mut dirs: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.reverse();
    dirs.extend(path_dirs());
    for dir in dirs {
        let (initdb, postgres) = (dir.join("initdb"), dir.join("postgres"));
        if is_executable(&initdb) && is_executable(&postgres) {
            return Ok(PgBinaries { initdb, postgres });
        }
    }
    bail!("PostgreSQL server binaries (initdb, postgres) not found: {PG_HINT}")
}

/// Finds `redis-server` on PATH (or in /usr/bin, /usr/sbin).
pub fn find_redis() -> anyhow::Result<PathBuf> {
    let mut dirs = path_dirs();
    dirs.extend([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")]);
    dirs.into_iter()
        .map(|d| d.join("redis-server"))
        .find(|p| is_executable(p))
        .ok_or_else(|| anyhow!("redis-server not found: {REDIS_HINT}"))
}

fn path_dirs() -> Vec<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default()
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A free TCP port on 127.0.0.1 (free now; the server binds it next).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Spawns children from one thread that lives as long as the process: the
/// parent-death signal fires when the *thread* that forked exits, and test
/// or runtime worker threads come and go.
fn spawn(mut cmd: Command) -> anyhow::Result<Child> {
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("trellis-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawner thread");
        Mutex::new(tx)
    });
    cmd.process_group(0);
    set_parent_death_signal(&mut cmd);
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.lock()
        .map_err(|_| anyhow!("spawner poisoned"))?
        .send((cmd, reply_tx))
        .map_err(|_| anyhow!("spawner thread is gone"))?;
    Ok(reply_rx.recv()??)
}

#[allow(unsafe_code)]
fn set_parent_death_signal(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only makes
    // the prctl(2) system call, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
        });
    }
}

/// Stops a child with `signal`, escalating to SIGKILL after `grace`.
fn stop_child(child: &mut Child, signal: Signal, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = kill(Pid::from_raw(child.id() as i32), signal);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn log_tail(path: &Path) -> String {
    let mut out = String::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(2000)));
        let _ = f.read_to_string(&mut out);
    }
    out.trim().to_string()
}

/// How to run a private PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Cluster directory; created with `initdb` when empty, reused otherwise.
    pub data_dir: PathBuf,
    /// Off for tests: no fsync, no synchronous commit.
    pub durable: bool,
    /// Listen here instead of on a free port (e.g. to restart a server
    /// where its clients expect it).
    pub port: Option<u16>,
}

/// A PostgreSQL server owned by this process.
#[derive(Debug)]
pub struct PrivatePostgres {
    child: Mutex<Option<Child>>,
    pub port: u16,
    pub data_dir: PathBuf,
    pub log_file: PathBuf,
}

impl PrivatePostgres {
    /// Initialises (if needed) and starts a cluster on a free port, waiting
    /// until it accepts connections.
    pub async fn start(opts: PgOptions) -> anyhow::Result<PrivatePostgres> {
        let bins = find_postgres()?;
        let run_as = run_as_user()?;
        let data_dir = reachable_data_dir(&opts.data_dir, run_as.as_ref())?;
        let log_file = data_dir.with_extension("log");
        if !data_dir.join("PG_VERSION").exists() {
            init_cluster(&bins, &data_dir, &log_file, run_as.as_ref(), opts.durable)?;
        }
        let port = match opts.port {
            Some(p) => p,
            None => free_port()?,
        };
        let mut cmd = Command::new(&bins.postgres);
        cmd.arg("-D")
            .arg(&data_dir)
            .args(["-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "unix_socket_directories="])
            .args(["-c", "max_connections=400"]);
        if !opts.durable {
            cmd.args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]);
        }
        let log =
            File::create(&log_file).with_context(|| format!("creating {}", log_file.display()))?;
        cmd.stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .current_dir("/");
        if let Some(user) = &run_as {
            cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        let child = spawn(cmd).context("starting postgres")?;
        let pg = PrivatePostgres {
            child: Mutex::new(Some(child)),
            port,
            data_dir,
            log_file,
        };
        pg.wait_ready().await?;
        Ok(pg)
    }

    /// Connection URL for database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        use diesel_async::{AsyncConnection, AsyncPgConnection};
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.lock().map_err(|_| anyhow!("poisoned"))?.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "postgres exited ({status}) during start-up; its log ({}):\n{}",
                    self.log_file.display(),
                    log_tail(&self.log_file)
                );
            }
            if AsyncPgConnection::establish(&self.url("postgres"))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "postgres did not accept connections within 60s; log:\n{}",
                    log_tail(&self.log_file)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates database `name` when it does not exist yet.
    pub async fn ensure_database(&self, name: &str) -> anyhow::Result<()> {
        use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
        let mut conn = AsyncPgConnection::establish(&self.url("postgres")).await?;
        #[derive(diesel::QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let found: Count =
            diesel::sql_query("SELECT count(*) AS n FROM pg_database WHERE datname = $1")
                .bind::<diesel::sql_types::Text, _>(name)
                .get_result(&mut conn)
                .await?;
        if found.n == 0 {
            diesel::sql_query(format!("CREATE DATABASE \"{}\"", name.replace('"', "")))
                .execute(&mut conn)
                .await?;
        }
        Ok(())
    }

    /// Fast shutdown (SIGINT), then wait.
    pub fn stop(&self) {
        if let Ok(mut guard) = self.child.lock()
            && let Some(mut child) = guard.take()
        {
            stop_child(&mut child, Signal::SIGINT, Duration::from_secs(15));
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run_as_user() -> anyhow::Result<Option<User>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    match User::from_name("postgres")? {
        Some(u) => Ok(Some(u)),
        None => bail!(
            "running as root, and PostgreSQL refuses to run as root, but there is no `postgres` user: {PG_HINT}"
        ),
    }
}

/// The data directory to use: `wanted` when the server's user can reach it,
/// otherwise (e.g. a checkout under /root) a directory under /var/tmp named
/// after `wanted`, so that it is still the same one on the next run.
fn reachable_data_dir(wanted: &Path, user: Option<&User>) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(wanted.parent().unwrap_or(Path::new("."))).ok();
    let abs = std::path::absolute(wanted)?;
    let Some(user) = user else {
        return Ok(abs);
    };
    let parent = abs.parent().unwrap_or(Path::new("/"));
    let dir = if can_traverse(parent, user) {
        abs
    } else {
        let tag = abs
            .to_string_lossy()
            .bytes()
            .fold(0xcbf29ce484222325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
            });
        let alt = PathBuf::from(format!("/var/tmp/trellis-{tag:016x}/pg"));
        tracing::info!(wanted = %abs.display(), using = %alt.display(),
            "the postgres user cannot reach the data directory; using another");
        alt
    };
    fs::create_dir_all(&dir)?;
    if let Some(p) = dir.parent() {
        // The server's user must be able to traverse the parent it writes logs beside.
        let mode = fs::metadata(p)?.permissions().mode();
        if !can_traverse(p, user) {
            fs::set_permissions(p, fs::Permissions::from_mode(mode | 0o711))?;
        }
    }
    nix::unistd::chown(&dir, Some(user.uid), Some(user.gid))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
    Ok(dir)
}

/// Whether `user` can reach `dir` (search permission on it and every ancestor).
fn can_traverse(dir: &Path, user: &User) -> bool {
    dir.ancestors().all(|d| match fs::metadata(d) {
        Ok(m) => {
            let mode = m.permissions().mode();
            if m.uid() == user.uid.as_raw() {
                mode & 0o100 != 0
            } else if m.gid() == user.gid.as_raw() {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            }
        }
        Err(_) => false,
    })
}

fn init_cluster(
    bins: &PgBinaries,
    data_dir: &Path,
    log_file: &Path,
    run_as: Option<&User>,
    durable: bool,
) -> anyhow::Result<()> {
    let log = File::create(log_file)?;
    let mut cmd = Command::new(&bins.initdb);
    cmd.arg("-D")
        .arg(data_dir)
        .args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        ])
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .current_dir("/");
    if !durable {
        cmd.arg("--no-sync");
    }
    if let Some(user) = run_as {
        cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    let status = spawn(cmd)?.wait()?;
    if !status.success() {
        bail!(
            "initdb failed ({status}); its log ({}):\n{}",
            log_file.display(),
            log_tail(log_file)
        );
    }
    Ok(())
}

/// A Redis server owned by this process.
#[derive(Debug)]
pub struct PrivateRedis {
    child: Mutex<Option<Child>>,
    pub port: u16,
    dir: PathBuf,
}

impl PrivateRedis {
    /// Starts redis-server on `port` (a free one when `None`), keeping its
    /// working files in `dir`, and waits until it answers PING.
    pub async fn start(dir: &Path, port: Option<u16>) -> anyhow::Result<PrivateRedis> {
        let bin = find_redis()?;
        fs::create_dir_all(dir)?;
        let port = match port {
            Some(p) => p,
            None => free_port()?,
        };
        let log_file = dir.join("redis.log");
        let log = File::create(&log_file)?;
        let mut cmd = Command::new(bin);
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null());
        let child = spawn(cmd).context("starting redis-server")?;
        let redis = PrivateRedis {
            child: Mutex::new(Some(child)),
            port,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if redis.ping().await.is_ok() {
                return Ok(redis);
            }
            if let Some(child) = redis
                .child
                .lock()
                .map_err(|_| anyhow!("poisoned"))?
                .as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "redis-server exited ({status}) during start-up; log:\n{}",
                    log_tail(&log_file)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "redis-server did not answer within 20s; log:\n{}",
                    log_tail(&log_file)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn ping(&self) -> anyhow::Result<()> {
        let client = ::redis::Client::open(self.url())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let _: String = ::redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Where it keeps its files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn stop(&self) {
        if let Ok(mut guard) = self.child.lock()
            && let Some(mut child) = guard.take()
        {
            // A frozen server would take SIGTERM only once resumed.
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
            stop_child(&mut child, Signal::SIGTERM, Duration::from_secs(5));
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing is
    /// answered, as from a Redis that hangs; [`PrivateRedis::thaw`] resumes it.
    pub fn freeze(&self) {
        self.signal(Signal::SIGSTOP);
    }

    /// Resumes a frozen server (SIGCONT).
    pub fn thaw(&self) {
        self.signal(Signal::SIGCONT);
    }

    fn signal(&self, signal: Signal) {
        if let Ok(guard) = self.child.lock()
            && let Some(child) = guard.as_ref()
        {
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}
