//! trellisd as a library: the assembly of a server process from
//! configuration, shared by the binary, the test harness and the
//! benchmarks. The binary only parses flags and calls into here.

pub mod dev;

use std::sync::Arc;

use tokio::net::TcpListener;
use trellis_auth::{Revocations, TokenVerifier};
use trellis_core::page::PageTokens;
use trellis_core::{Config, ServiceName};
use trellis_mesh::{MeshBuilder, MeshClients, Needs, RunningMesh};
use trellis_store::Store;

/// Everything a service constructor may need from the process it runs in.
#[derive(Debug, Clone)]
pub struct Deps {
    pub config: Arc<Config>,
    pub store: Store,
    pub clients: MeshClients,
    /// Verifies every call's credentials (keys from AuthService, over the mesh).
    pub verifier: Arc<TokenVerifier>,
    /// This process's view of revoked tokens and sessions.
    pub revocations: Arc<Revocations>,
    /// Seals page tokens for every list RPC.
    pub pages: PageTokens,
    /// Seals the signing keys at rest (`secrets.signing_key_secret`).
    pub seal: Option<Arc<trellis_auth::keys::KeySeal>>,
}

/// Builds and starts a server for `config` on `listener`: the enabled
/// services, mesh clients for the others, and everything every server has.
pub async fn start(
    config: Arc<Config>,
    store: Store,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<RunningMesh> {
    let enabled = config.services.resolve_enabled()?;
    // Services mounted here call each other over an in-process link.
    let (link, in_process) = trellis_mesh::local::link();
    let clients = MeshClients::new(&config.services, link, &enabled)?;
    let revocations = Revocations::new(store.clone(), config.auth.access_token_ttl);
    let listener_task = store.has_redis().then(|| revocations.spawn_listener());
    let verifier = Arc::new(TokenVerifier::new(
        &config.auth.issuer,
        &config.auth.audience,
        clients.clone(),
        revocations.clone(),
    ));
    let seal = config.secrets.signing_key_secret.as_deref().map(|s| {
        Arc::new(trellis_auth::keys::KeySeal::new(
            s,
            &config.secrets.previous_signing_key_secrets,
        ))
    });
    if enabled.contains(&ServiceName::Auth) && store.has_pg() {
        prepare_signing_keys(&store, seal.as_deref()).await?;
    }
    let deps = Deps {
        seal,
        config: config.clone(),
        store: store.clone(),
        clients,
        verifier: verifier.clone(),
        revocations,
        pages: match &config.secrets.page_token_key {
            Some(k) => PageTokens::new(k.as_bytes()),
            None => PageTokens::random(),
        },
    };
    let store_for_mail = store.clone();
    let builder = MeshBuilder::new(config.clone(), store, enabled.clone())
        .authenticator(verifier)
        .in_process(in_process);
    let (builder, tasks) = mount(builder, &enabled, &deps)?;
    // Mail queued by AuthService is delivered from here.
    let outbox = if enabled.contains(&ServiceName::Auth) && store_for_mail.has_pg() {
        let mailer = trellis_auth::mail::mailer(&config.mail)?;
        Some(trellis_auth::mail::spawn_outbox(
            store_for_mail,
            mailer,
            config.mail.poll_interval,
        ))
    } else {
        None
    };
    let mesh = builder.start(listener, shutdown).await?;
    let mut mesh = mesh.on_stop(listener_task).on_stop(outbox);
    for t in tasks.background {
        mesh = mesh.on_stop(Some(t));
    }
    for t in tasks.finishing {
        mesh = mesh.finishing(t);
    }
    Ok(mesh)
}

/// Seals signing keys stored unencrypted (with a secret) and refuses to
/// start when a stored key does not open. A database that is down only
/// defers this: keys are opened when first used, and sealed at a later start.
async fn prepare_signing_keys(
    store: &Store,
    seal: Option<&trellis_auth::keys::KeySeal>,
) -> anyhow::Result<()> {
    use trellis_auth::keys::{PrepareError, prepare};
    if seal.is_none() {
        tracing::warn!(
            "secrets.signing_key_secret is not set: the auth service's private signing keys \
             are stored unencrypted in PostgreSQL"
        );
    }
    match prepare(store, seal).await {
        Ok(p) => {
            if p.sealed_now > 0 {
                tracing::info!(
                    sealed = p.sealed_now,
                    keys = p.keys,
                    "signing keys stored unencrypted or under a previous secret were sealed"
                );
            }
            Ok(())
        }
        Err(PrepareError::Seal(e)) => Err(anyhow::anyhow!(e)),
        Err(PrepareError::Store(e)) => {
            tracing::warn!(error = %e, "signing keys not checked at startup");
            Ok(())
        }
    }
}

/// Tasks the services started: stopped with the server (`background`) or
/// awaited after it stops so that what they hold is written (`finishing`).
#[derive(Debug, Default)]
struct Tasks {
    background: Vec<tokio::task::JoinHandle<()>>,
    finishing: Vec<tokio::task::JoinHandle<()>>,
}

/// Mounts each enabled service on the builder. SystemService, health and
/// reflection are mounted by the mesh itself.
fn mount(
    mut builder: MeshBuilder,
    enabled: &[ServiceName],
    deps: &Deps,
) -> anyhow::Result<(MeshBuilder, Tasks)> {
    let cfg = &deps.config;
    let mut tasks = Tasks::default();
    // One pool of hashing threads for the process, shared by AuthService
    // (register, login, password changes) and UserService (CreateUser).
    let hasher = if enabled
        .iter()
        .any(|n| matches!(n, ServiceName::Auth | ServiceName::User))
    {
        Some(trellis_auth::PasswordHasher::new(
            cfg.auth.argon2,
            cfg.auth.hash_concurrency,
        )?)
    } else {
        None
    };
    let hasher = || anyhow::Context::context(hasher.clone(), "password hasher");
    for name in enabled {
        builder = match name {
            ServiceName::System => builder,
            ServiceName::Auth => {
                if deps.store.has_pg() && !cfg.auth.housekeeping_interval.is_zero() {
                    tasks.background.push(trellis_auth::housekeeping::spawn(
                        deps.store.clone(),
                        cfg.auth.housekeeping_interval,
                        cfg.auth.expired_retention,
                    ));
                }
                builder.add_service(
                    trellis_auth::service(
                        &cfg.auth,
                        cfg.server.max_message_bytes,
                        deps.store.clone(),
                        hasher()?,
                        deps.verifier.clone(),
                        deps.revocations.clone(),
                        deps.pages.clone(),
                        deps.seal.clone(),
                    )?,
                    Needs::STORE,
                )
            }
            ServiceName::User => builder.add_service(
                trellis_user::service(
                    cfg.server.max_message_bytes,
                    deps.store.clone(),
                    hasher()?,
                    deps.revocations.clone(),
                    deps.pages.clone(),
                )?,
                Needs::STORE,
            ),
            ServiceName::Llm => {
                let built = trellis_llm::service(
                    &cfg.llm,
                    cfg.server.max_message_bytes,
                    deps.store.clone(),
                    deps.clients.clone(),
                )?;
                tasks.finishing.push(built.usage_writer);
                builder
                    .collectors(built.collectors)
                    .add_service(built.server, Needs::STORE)
            }
            ServiceName::Search => {
                if deps.store.has_pg() && !cfg.search.history_retention.is_zero() {
                    tasks
                        .background
                        .push(trellis_search::history::spawn_pruning(
                            deps.store.clone(),
                            cfg.search.history_retention,
                            std::time::Duration::from_secs(3600),
                        ));
                }
                builder.add_service(
                    trellis_search::service(
                        &cfg.search,
                        cfg.server.max_message_bytes,
                        deps.store.clone(),
                        deps.pages.clone(),
                    )?,
                    Needs::STORE,
                )
            }
            ServiceName::Chat => {
                let built = trellis_chat::service(
                    &cfg.chat,
                    &cfg.llm,
                    cfg.server.max_message_bytes,
                    cfg.server.drain_timeout,
                    deps.store.clone(),
                    deps.clients.clone(),
                    deps.pages.clone(),
                    deps.verifier.clone(),
                );
                tasks.background.extend(built.background);
                tasks.finishing.push(built.finishing);
                builder
                    .collectors(built.collectors)
                    .on_drain(built.drain)
                    .add_service(built.server, Needs::STORE)
            }
        };
    }
    Ok((builder, tasks))
}

/// Binds the configured listen address, naming it in the error.
pub async fn bind(config: &Config) -> anyhow::Result<TcpListener> {
    let addr = config.server.listen;
    TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {addr}: {e} (set server.listen, TRELLIS_SERVER__LISTEN or --listen)"
        )
    })
}
