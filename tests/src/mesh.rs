//! In-process meshes for tests: one server with every service, or several
//! servers each with a subset, wired together through the mesh clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Channel;
use trellis_core::config::Endpoint;
use trellis_core::{Config, ServiceName};
use trellis_mesh::{MeshClients, RunningMesh};
use trellis_proto::system::v1::system_service_client::SystemServiceClient;
use trellis_store::Store;

use crate::infra::infra;

/// How to set up a test server.
#[derive(Debug, Clone, Default)]
pub struct TestOptions {
    /// Services to enable (`None`: all).
    pub services: Option<Vec<ServiceName>>,
    /// Use this database instead of a fresh one (split topologies share one).
    pub database_url: Option<String>,
    /// Use this Redis instead of the run's (e.g. one a test stops).
    pub redis_url: Option<String>,
    /// Use this key prefix instead of a fresh one.
    pub key_prefix: Option<String>,
}

/// A running in-process server and what a test needs to talk to it.
#[derive(Debug)]
pub struct TestMesh {
    pub addr: SocketAddr,
    pub config: Arc<Config>,
    pub store: Store,
    pub clients: MeshClients,
    mesh: Option<RunningMesh>,
}

/// A configuration fit for tests: loopback on a free port, fast health
/// probes, small pools.
pub fn test_config(database_url: String, redis_url: String, key_prefix: String) -> Config {
    let mut c = Config::default();
    c.server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    c.server.health_check_interval = Duration::from_millis(200);
    c.server.drain_timeout = Duration::from_secs(5);
    c.database.url = Some(database_url);
    c.database.pool_size = 4;
    c.database.acquire_timeout = Duration::from_secs(1);
    c.redis.url = Some(redis_url);
    c.redis.pool_size = 4;
    c.redis.acquire_timeout = Duration::from_secs(1);
    c.redis.key_prefix = key_prefix;
    // Cheap hashing: the suite tests behaviour, the benchmarks measure cost.
    c.auth.argon2 = trellis_core::config::Argon2Config {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };
    c
}

impl TestMesh {
    /// Every service on one server, with its own database and key prefix.
    pub async fn start() -> TestMesh {
        Self::start_with(TestOptions::default(), |_| {}).await
    }

    /// A server set up by `options`, its configuration adjusted by `tweak`.
    pub async fn start_with(options: TestOptions, tweak: impl FnOnce(&mut Config)) -> TestMesh {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let config = Self::config_for(&options, tweak).await;
        Self::start_on(listener, config, std::future::pending()).await
    }

    async fn config_for(options: &TestOptions, tweak: impl FnOnce(&mut Config)) -> Config {
        let infra = infra().await;
        let db = match &options.database_url {
            Some(u) => u.clone(),
            None => infra.fresh_database().await,
        };
        let mut config = test_config(
            db,
            options
                .redis_url
                .clone()
                .unwrap_or_else(|| infra.redis_url.clone()),
            options
                .key_prefix
                .clone()
                .unwrap_or_else(|| infra.fresh_prefix()),
        );
        if let Some(services) = &options.services {
            config.services.enabled = services.iter().map(|s| s.to_string()).collect();
        }
        tweak(&mut config);
        config.validate().expect("test configuration is valid");
        config
    }

    /// Starts a server on an already bound listener, stopping when
    /// `shutdown` resolves (or on [`TestMesh::shutdown`]).
    pub async fn start_on(
        listener: TcpListener,
        config: Config,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> TestMesh {
        let addr = listener.local_addr().expect("local addr");
        let config = Arc::new(config);
        let store = Store::from_config(&config).expect("store");
        let enabled = config.services.resolve_enabled().expect("enabled services");
        let clients = MeshClients::new(&config.services, addr, &enabled).expect("clients");
        let mesh = trellisd::start(config.clone(), store.clone(), listener, shutdown)
            .await
            .expect("mesh starts");
        TestMesh {
            addr,
            config,
            store,
            clients,
            mesh: Some(mesh),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's Prometheus text (`GET /metrics`).
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.url()))
            .await
            .expect("scrape")
            .text()
            .await
            .expect("metrics text")
    }

    /// A fresh (not shared) connection to this server.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .expect("url")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn system(&self) -> SystemServiceClient<Channel> {
        SystemServiceClient::new(self.channel().await)
    }

    pub async fn health(&self) -> tonic_health::pb::health_client::HealthClient<Channel> {
        tonic_health::pb::health_client::HealthClient::new(self.channel().await)
    }

    /// Drains and stops the server.
    pub async fn shutdown(mut self) {
        if let Some(mesh) = self.mesh.take() {
            mesh.shutdown().await.expect("clean shutdown");
        }
    }

    /// Waits for the server to stop by itself (after its shutdown future).
    pub async fn wait(mut self) -> anyhow::Result<()> {
        match self.mesh.take() {
            Some(m) => m.wait().await,
            None => Ok(()),
        }
    }
}

impl Drop for TestMesh {
    fn drop(&mut self) {
        if let Some(mut mesh) = self.mesh.take() {
            mesh.begin_shutdown();
        }
    }
}

/// Several servers sharing one database and key prefix, server `i` serving
/// `groups[i]` and reaching every service it does not serve at the server
/// that does (the first one listed, when several do).
pub async fn split(groups: &[&[ServiceName]]) -> Vec<TestMesh> {
    split_with(groups, |_| {}).await
}

/// [`split`], each server's configuration adjusted by `tweak`.
pub async fn split_with(groups: &[&[ServiceName]], tweak: impl Fn(&mut Config)) -> Vec<TestMesh> {
    let infra = infra().await;
    let db = infra.fresh_database().await;
    let prefix = infra.fresh_prefix();
    let mut listeners = Vec::new();
    for _ in groups {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.expect("bind"));
    }
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr"))
        .collect();
    let mut meshes = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let options = TestOptions {
            services: Some(groups[i].to_vec()),
            database_url: Some(db.clone()),
            key_prefix: Some(prefix.clone()),
            ..Default::default()
        };
        let config = TestMesh::config_for(&options, |c| {
            for name in ServiceName::ALL {
                if groups[i].contains(&name) {
                    continue;
                }
                if let Some(j) = groups.iter().position(|g| g.contains(&name)) {
                    let ep = Some(Endpoint {
                        address: format!("http://{}", addrs[j]),
                    });
                    match name {
                        ServiceName::System => c.services.system = ep,
                        ServiceName::Auth => c.services.auth = ep,
                        ServiceName::User => c.services.user = ep,
                        ServiceName::Chat => c.services.chat = ep,
                        ServiceName::Llm => c.services.llm = ep,
                        ServiceName::Search => c.services.search = ep,
                    }
                }
            }
            tweak(c);
        })
        .await;
        meshes.push(TestMesh::start_on(listener, config, std::future::pending()).await);
    }
    meshes
}
