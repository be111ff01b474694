//! trellisd as a library: the assembly of a server process from
//! configuration, shared by the binary, the test harness and the
//! benchmarks. The binary only parses flags and calls into here.

pub mod dev;

use std::sync::Arc;

use tokio::net::TcpListener;
use trellis_core::{Config, ServiceName};
use trellis_mesh::{MeshBuilder, MeshClients, RunningMesh};
use trellis_store::Store;

/// Everything a service constructor may need from the process it runs in.
#[derive(Debug, Clone)]
pub struct Deps {
    pub config: Arc<Config>,
    pub store: Store,
    pub clients: MeshClients,
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
    let clients = MeshClients::new(&config.services, listener.local_addr()?, &enabled)?;
    let deps = Deps {
        config: config.clone(),
        store: store.clone(),
        clients,
    };
    let builder = MeshBuilder::new(config.clone(), store, enabled.clone());
    let builder = mount(builder, &enabled, &deps);
    builder.start(listener, shutdown).await
}

/// Mounts each enabled service on the builder. SystemService, health and
/// reflection are mounted by the mesh itself; auth, user, chat, llm and
/// search join here as they land (config validation refuses them until then).
fn mount(builder: MeshBuilder, _enabled: &[ServiceName], _deps: &Deps) -> MeshBuilder {
    builder
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
