//! `trellisd`: parse flags, load configuration, set up telemetry, hand over
//! to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use figment::value::Value;
use trellis_core::config::Sources;
use trellis_core::{Config, telemetry};

/// mimalloc rather than glibc's malloc: a request's many short-lived
/// allocations (headers, protobuf buffers, rows) cost about half as much
/// (trellis-bench user-get; see README, Performance).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "trellisd", version, about = "The Trellis gRPC mesh server")]
struct Cli {
    /// Configuration file (default: ./trellis.toml when present).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Listen address, e.g. 127.0.0.1:50051 (server.listen).
    #[arg(long, global = true)]
    listen: Option<String>,
    /// Log filter directives, e.g. info,trellis_mesh=debug (telemetry.log_filter).
    #[arg(long, global = true)]
    log_filter: Option<String>,
    /// Log format: pretty or json (telemetry.log_format).
    #[arg(long, global = true)]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Every service on one port with zero configuration: starts private
    /// PostgreSQL and Redis when no URLs are configured, migrates, serves.
    Dev,
    /// Production: serve the given services, reaching the others at their
    /// configured addresses.
    Serve {
        /// Comma-separated service names, or `all` (services.enabled).
        #[arg(long)]
        services: Option<String>,
    },
    /// Apply pending database migrations to database.url and exit.
    Migrate,
    /// Migrate database.url and index synthetic sample documents into it
    /// (candidate profiles and help articles, shared, owned by the first
    /// administrator, who is created when there is none), e.g. a large
    /// corpus for benchmarks. Seeding again replaces the same documents.
    Seed {
        /// How many candidate profiles (the 8 help articles come on top).
        #[arg(long, default_value_t = 300)]
        docs: usize,
    },
}

fn load(cli: &Cli) -> Result<Config, trellis_core::ConfigError> {
    let mut overrides = Vec::new();
    let mut set = |key: &str, v: &Option<String>| {
        if let Some(v) = v {
            overrides.push((key.to_string(), Value::from(v.clone())));
        }
    };
    set("server.listen", &cli.listen);
    set("telemetry.log_filter", &cli.log_filter);
    set("telemetry.log_format", &cli.log_format);
    if let Command::Serve { services } = &cli.command {
        set("services.enabled", services);
    }
    Config::load(Sources {
        file: cli.config.clone(),
        overrides,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("trellisd: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(&config.telemetry);
    let result = match cli.command {
        Command::Dev => trellisd::dev::run(config).await,
        Command::Serve { .. } => serve(config).await,
        Command::Migrate => migrate(&config).await,
        Command::Seed { docs } => seed(&config, docs).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellisd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let store = trellis_store::Store::from_config(&config)?;
    let listener = trellisd::bind(&config).await?;
    let mesh = trellisd::start(config, store, listener, trellis_mesh::shutdown_signal()).await?;
    tracing::info!(addr = %mesh.local_addr(), "serving");
    mesh.wait().await
}

async fn seed(config: &Config, docs: usize) -> anyhow::Result<()> {
    migrate(config).await?;
    let store = trellis_store::Store::from_config(config)?;
    let t0 = std::time::Instant::now();
    let seeded = trellisd::dev::seed_documents(config, &store, docs).await?;
    let secs = t0.elapsed().as_secs_f64();
    if let Some((user, password)) = &seeded.admin {
        println!("created the administrator {user} / {password} (owner of the documents)");
    }
    let n = seeded.documents;
    println!(
        "indexed {n} documents in {secs:.1}s ({:.0} documents/s)",
        n as f64 / secs.max(1e-9)
    );
    Ok(())
}

async fn migrate(config: &Config) -> anyhow::Result<()> {
    let url = config
        .database
        .url
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("database.url is not set (TRELLIS_DATABASE_URL)"))?;
    let applied = trellis_store::migrate::run(url).await?;
    if applied.is_empty() {
        println!("database is up to date");
    } else {
        for v in applied {
            println!("applied {v}");
        }
    }
    Ok(())
}
