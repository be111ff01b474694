//! `trellisd dev`: a whole mesh with zero configuration. Without
//! `TRELLIS_DATABASE_URL` / `TRELLIS_REDIS_URL` it starts private PostgreSQL
//! and Redis servers from the installed binaries, with data under
//! `.trellis/` that survives restarts, migrates, serves every service on one
//! port, and stops the private servers after the mesh has drained.

use std::sync::Arc;

use trellis_core::Config;
use trellis_store::devserver::{PgOptions, PrivatePostgres, PrivateRedis};
use trellis_store::{Store, migrate};

/// The private servers `dev` started, stopped when dropped.
#[derive(Debug, Default)]
pub struct DevServers {
    pub postgres: Option<PrivatePostgres>,
    pub redis: Option<PrivateRedis>,
}

/// Fills in database and Redis URLs by starting private servers where none
/// is configured, then migrates the database.
pub async fn prepare(config: &mut Config) -> anyhow::Result<DevServers> {
    let mut servers = DevServers::default();
    let data = config.dev.data_dir.clone();
    if config.database.url.is_none() {
        tracing::info!(
            "no database.url: starting a private PostgreSQL under {}",
            data.display()
        );
        let pg = PrivatePostgres::start(PgOptions {
            data_dir: data.join("pg"),
            durable: true,
            port: None,
        })
        .await?;
        pg.ensure_database("trellis").await?;
        config.database.url = Some(pg.url("trellis"));
        servers.postgres = Some(pg);
        // The private database's signing keys are sealed with a secret kept
        // beside it (a database of your own needs a secret of your own).
        if config.secrets.signing_key_secret.is_none() {
            config.secrets.signing_key_secret = Some(dev_secret(&data.join("signing-key-secret"))?);
        }
    }
    if config.redis.url.is_none() {
        tracing::info!(
            "no redis.url: starting a private Redis under {}",
            data.display()
        );
        let redis = PrivateRedis::start(&data.join("redis"), None).await?;
        config.redis.url = Some(redis.url());
        servers.redis = Some(redis);
    }
    let url = config.database.url.as_deref().unwrap_or_default();
    let applied = migrate::run(url).await?;
    if !applied.is_empty() {
        tracing::info!(?applied, "migrations applied");
    }
    Ok(servers)
}

/// The secret in `file`, created (random, 0600) on the first start.
fn dev_secret(file: &std::path::Path) -> anyhow::Result<String> {
    if let Ok(s) = std::fs::read_to_string(file)
        && s.trim().len() >= 32
    {
        return Ok(s.trim().to_string());
    }
    let secret = trellis_auth::tokens::secret("sks_")?;
    write_private(file, &format!("{secret}\n"))?;
    Ok(secret)
}

/// Writes `text` to `file` (and its directory), readable by the owner only.
fn write_private(file: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(file)?
        .write_all(text.as_bytes())?;
    Ok(())
}

/// Creates the first administrator if there is none, and says how to log
/// in as it (the password is also kept in `<data_dir>/admin.txt`, 0600).
async fn seed(config: &Config, store: &Store) -> anyhow::Result<String> {
    let file = config.dev.data_dir.join("admin.txt");
    match trellis_auth::seed::ensure_admin(&config.auth, store).await? {
        Some((user, password)) => {
            write_private(&file, &format!("username: {user}\npassword: {password}\n"))?;
            Ok(format!(
                "Admin:      {user} / {password} (created now; also in {})",
                file.display()
            ))
        }
        None => Ok(format!(
            "Admin:      see {} (created on the first start)",
            file.display()
        )),
    }
}

/// The first administrator's id (the owner of seeded documents).
async fn first_admin(store: &Store) -> anyhow::Result<Option<uuid::Uuid>> {
    use diesel::prelude::*;
    use diesel_async::RunQueryDsl;
    use trellis_store::schema::user_roles;
    let mut conn = store.pg().await?;
    Ok(user_roles::table
        .filter(user_roles::role.eq("admin"))
        .order(user_roles::granted_at.asc())
        .select(user_roles::user_id)
        .first(&mut conn)
        .await
        .optional()?)
}

/// What [`seed_documents`] did.
#[derive(Debug)]
pub struct Seeded {
    /// Documents indexed: the candidate profiles plus the help articles.
    pub documents: usize,
    /// The administrator's (username, password) when it was created now to
    /// own the documents (a fresh database has none).
    pub admin: Option<(String, String)>,
}

/// Indexes `candidates` synthetic candidate profiles (collection
/// `candidates`) and the help articles (`help`) as shared documents of the
/// first administrator, creating that administrator as `dev` does when
/// there is none. Idempotent: seeding again replaces the same documents.
pub async fn seed_documents(
    config: &Config,
    store: &Store,
    candidates: usize,
) -> anyhow::Result<Seeded> {
    let admin = match first_admin(store).await? {
        Some(_) => None,
        None => trellis_auth::seed::ensure_admin(&config.auth, store).await?,
    };
    let owner = first_admin(store)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no administrator to own the seeded documents"))?;
    let mut docs = trellis_search::seed::candidates(candidates);
    docs.extend(trellis_search::seed::help_articles());
    let documents =
        trellis_search::seed::index_all(store, &config.search.language, owner, docs).await?;
    Ok(Seeded { documents, admin })
}

/// Seeds the demo corpus unless documents exist already.
async fn seed_demo_documents(config: &Config, store: &Store) -> anyhow::Result<String> {
    use diesel::prelude::*;
    use diesel_async::RunQueryDsl;
    use trellis_store::schema::search_documents;
    let existing: i64 = {
        let mut conn = store.pg().await?;
        search_documents::table
            .count()
            .get_result(&mut conn)
            .await?
    };
    if existing > 0 {
        return Ok(format!("Search:     {existing} documents indexed"));
    }
    let n = seed_documents(config, store, 300).await?.documents;
    Ok(format!(
        "Search:     seeded {n} demo documents (collections candidates, help)"
    ))
}

/// With no LLM provider configured, `dev` routes the model alias `local`
/// to an Ollama server on its default port, so that generation works out
/// of the box wherever one runs (and fails with a clear UNAVAILABLE where
/// none does). Returns the line the banner prints about it.
pub fn default_llm(config: &mut Config) -> String {
    if !config.llm.providers.is_empty() || !config.llm.models.is_empty() {
        let aliases: Vec<&str> = config.llm.models.keys().map(String::as_str).collect();
        return format!("LLM models: {}", aliases.join(", "));
    }
    config.llm.providers.insert(
        "ollama".into(),
        trellis_core::config::ProviderConfig {
            base_url: "http://127.0.0.1:11434/v1".into(),
            ..Default::default()
        },
    );
    config.llm.models.insert(
        "local".into(),
        trellis_core::config::ModelConfig {
            routes: vec!["ollama:llama3.2".into()],
            ..Default::default()
        },
    );
    "LLM:        model \"local\" = llama3.2 on Ollama at 127.0.0.1:11434 (none configured; see README, LLM providers)".into()
}

/// Runs the dev mesh until SIGTERM/SIGINT.
pub async fn run(mut config: Config) -> anyhow::Result<()> {
    let servers = prepare(&mut config).await?;
    let llm = default_llm(&mut config);
    let config = Arc::new(config);
    let store = Store::from_config(&config)?;
    let admin = seed(&config, &store).await?;
    let docs = seed_demo_documents(&config, &store).await?;
    let listener = crate::bind(&config).await?;
    let mesh = crate::start(
        config.clone(),
        store,
        listener,
        trellis_mesh::shutdown_signal(),
    )
    .await?;
    let addr = mesh.local_addr();
    println!(
        "\nTrellis dev mesh is up on {addr} (gRPC, gRPC-web, reflection, health; metrics at http://{addr}/metrics)\n\
         PostgreSQL: {}\nRedis:      {}\n{admin}\n{llm}\n{docs}\n\n\
         Try:\n  grpcurl -plaintext {addr} list\n  grpcurl -plaintext {addr} trellis.system.v1.SystemService/GetInfo\n  \
         grpcurl -plaintext -d '{{\"service\":\"\"}}' {addr} grpc.health.v1.Health/Check\n  \
         grpcurl -plaintext -d '{{\"email\":\"ada@example.com\",\"username\":\"ada\",\"password\":\"Str0ng!pass\"}}' {addr} trellis.auth.v1.AuthService/Register\n  \
         TOKEN=$(grpcurl -plaintext -d '{{\"login\":\"ada\",\"password\":\"Str0ng!pass\"}}' {addr} trellis.auth.v1.AuthService/Login | jq -r .tokens.accessToken)\n  \
         grpcurl -plaintext -H \"authorization: Bearer $TOKEN\" {addr} trellis.auth.v1.AuthService/WhoAmI\n  \
         grpcurl -plaintext -H \"authorization: Bearer $TOKEN\" -d '{{\"query\":\"senior rust engineer\"}}' {addr} trellis.search.v1.SearchService/Search\n\n\
         Or the CLI: cargo run -p trellis -- --server http://{addr} register --email ada@example.com --username ada\n\n\
         Stop with Ctrl-C.\n",
        trellis_core::config::redact_url(config.database.url.as_deref().unwrap_or_default()),
        trellis_core::config::redact_url(config.redis.url.as_deref().unwrap_or_default()),
    );
    let result = mesh.wait().await;
    drop(servers);
    result
}
