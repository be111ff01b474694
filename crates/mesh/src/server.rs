//! Server assembly: one builder that mounts any subset of Trellis services on
//! one port, plus what every server has — SystemService, `grpc.health.v1`,
//! reflection v1 and v1alpha, `GET /metrics` — behind the request-path
//! layers, speaking gRPC over HTTP/2 and gRPC-web over HTTP/1.1.
//!
//! Shutdown drains: health turns NOT_SERVING, the listener closes, in-flight
//! calls run to completion for up to `server.drain_timeout`, then whatever
//! is left is cut.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tower::{Service, ServiceBuilder};
use tower_http::cors::{AllowOrigin, CorsLayer};
use trellis_core::{Config, ServiceName};
use trellis_store::Store;

use crate::health::{HealthMap, watch_dependencies};
use crate::layers::authn::{Authenticator, AuthnLayer};
use crate::layers::cors::BrowserCorsLayer;
use crate::layers::deadline::DeadlineLayer;
use crate::layers::decode_errors::DecodeErrorsLayer;
use crate::layers::metrics::{Metrics, MetricsLayer};
use crate::layers::scrape::ScrapeLayer;
use crate::layers::shed::ShedLayer;
use crate::layers::{client_ip, request_id, trace};
use crate::local::{Conn, LocalIncoming};
use crate::system::System;

/// What a service needs to serve; its health follows these dependencies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    pub database: bool,
    pub redis: bool,
}

impl Needs {
    pub const NOTHING: Needs = Needs {
        database: false,
        redis: false,
    };
    pub const STORE: Needs = Needs {
        database: true,
        redis: true,
    };
}

/// Collects services, then starts the server.
pub struct MeshBuilder {
    config: Arc<Config>,
    store: Store,
    enabled: Vec<ServiceName>,
    routes: RoutesBuilder,
    services: Vec<(String, Needs)>,
    authenticator: Option<Arc<dyn Authenticator>>,
    collectors: Vec<Box<dyn prometheus::core::Collector>>,
    drain_hooks: Vec<watch::Sender<bool>>,
    in_process: Option<LocalIncoming>,
}

impl std::fmt::Debug for MeshBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshBuilder")
            .field("services", &self.services)
            .finish()
    }
}

impl MeshBuilder {
    /// `enabled` are the Trellis services this process serves (reported by
    /// SystemService); mount each with [`add_service`](Self::add_service).
    pub fn new(config: Arc<Config>, store: Store, enabled: Vec<ServiceName>) -> MeshBuilder {
        MeshBuilder {
            config,
            store,
            enabled,
            routes: RoutesBuilder::default(),
            services: Vec::new(),
            authenticator: None,
            collectors: Vec::new(),
            drain_hooks: Vec::new(),
            in_process: None,
        }
    }

    /// Also accepts connections from this process's mesh clients over an
    /// in-process link ([`crate::local`]), beside the listener's.
    pub fn in_process(mut self, incoming: LocalIncoming) -> MeshBuilder {
        self.in_process = Some(incoming);
        self
    }

    /// Verifies the credentials of every call (see `layers::authn`).
    pub fn authenticator(mut self, authenticator: Arc<dyn Authenticator>) -> MeshBuilder {
        self.authenticator = Some(authenticator);
        self
    }

    /// Adds a service's own metrics to this server's registry (`/metrics`).
    pub fn collectors(mut self, c: Vec<Box<dyn prometheus::core::Collector>>) -> MeshBuilder {
        self.collectors.extend(c);
        self
    }

    /// Set to `true` when draining starts (after health turns NOT_SERVING),
    /// so that services can end long-lived work (e.g. streams) cleanly.
    pub fn on_drain(mut self, hook: watch::Sender<bool>) -> MeshBuilder {
        self.drain_hooks.push(hook);
        self
    }

    /// Mounts a generated tonic server. Its health follows `needs`.
    pub fn add_service<S>(mut self, svc: S, needs: Needs) -> MeshBuilder
    where
        S: Service<http::Request<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.services.push((S::NAME.to_string(), needs));
        self.routes.add_service(svc);
        self
    }

    /// Serves on `listener` until `shutdown` resolves or
    /// [`RunningMesh::shutdown`] is called.
    pub async fn start(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<RunningMesh> {
        let MeshBuilder {
            config,
            store,
            enabled,
            mut routes,
            mut services,
            authenticator,
            collectors,
            drain_hooks,
            in_process,
        } = self;
        let server_cfg = &config.server;
        let max = server_cfg.max_message_bytes;
        let addr = listener.local_addr()?;

        // Everything every server mounts.
        let system_name = trellis_proto::system::v1::SERVICE_NAME.to_string();
        services.insert(0, (system_name, Needs::NOTHING));
        let service_names: Vec<String> = services.iter().map(|(n, _)| n.clone()).collect();
        routes.add_service(
            System::new(
                service_names.clone(),
                enabled.iter().map(|s| s.to_string()).collect(),
            )
            .into_server(max),
        );

        let (reporter, health_server) = tonic_health::server::health_reporter();
        let health = HealthMap {
            reporter,
            services: services.clone(),
        };
        // Until the first probe answers, assume the best: start-up should not
        // flap, and a down dependency is reported within one interval.
        health.apply(true, true).await;
        routes.add_service(
            health_server
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        );

        let health_name = "grpc.health.v1.Health".to_string();
        let reflection_names = [
            "grpc.reflection.v1.ServerReflection".to_string(),
            "grpc.reflection.v1alpha.ServerReflection".to_string(),
        ];
        let mut listed = service_names.clone();
        listed.push(health_name.clone());
        listed.extend(reflection_names.iter().cloned());
        let reflection = || {
            let mut b = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(trellis_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                // google.rpc.BadRequest, QuotaFailure, RetryInfo …: the
                // error details our statuses carry, so grpcurl and other
                // reflection clients print them decoded.
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET);
            for n in &listed {
                b = b.with_service_name(n.clone());
            }
            b
        };
        routes.add_service(
            reflection()
                .register_encoded_file_descriptor_set(
                    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                )
                .build_v1()?
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        );
        routes.add_service(
            reflection()
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .build_v1alpha()?
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        );

        let metrics = Metrics::new(store.clone(), listed.iter().cloned().chain([health_name]));
        for c in collectors {
            metrics.register(c)?;
        }
        let routes = routes.routes().prepare();

        let layers = ServiceBuilder::new()
            .layer(BrowserCorsLayer::new(cors(
                &server_cfg.cors_allowed_origins,
            )))
            .layer(ScrapeLayer::new(metrics.clone()))
            .layer(tonic_web::GrpcWebLayer::new())
            .layer(client_ip::layer(server_cfg.trusted_proxy_nets()))
            .layer(request_id::layer())
            .layer(trace::layer())
            .layer(MetricsLayer::new(metrics.clone()))
            .layer(DecodeErrorsLayer)
            .layer(ShedLayer::new(server_cfg.concurrency_limit))
            .layer(DeadlineLayer::new(server_cfg.default_timeout))
            .option_layer(authenticator.map(AuthnLayer::new))
            .into_inner();

        let health_task = tokio::spawn(watch_dependencies(
            health.clone(),
            store.clone(),
            server_cfg.health_check_interval,
        ));

        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (drain_tx, mut drain_rx) = watch::channel(false);
        let drain_health = health.clone();
        let signal = async move {
            tokio::select! {
                _ = shutdown => {}
                _ = stop_rx => {}
            }
            tracing::info!("shutting down: draining in-flight calls");
            drain_health.all_not_serving().await;
            for hook in &drain_hooks {
                hook.send_replace(true);
            }
            let _ = drain_tx.send(true);
        };

        let server = Server::builder()
            .accept_http1(true)
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .layer(layers)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming(listener, in_process), signal);

        let drain_timeout = server_cfg.drain_timeout;
        let task = tokio::spawn(async move {
            tokio::pin!(server);
            let drain_deadline = async {
                if drain_rx.wait_for(|started| *started).await.is_err() {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(drain_timeout).await;
            };
            let result = tokio::select! {
                r = &mut server => r.map_err(anyhow::Error::from),
                _ = drain_deadline => {
                    tracing::warn!(?drain_timeout, "drain deadline passed with calls in flight; cutting them");
                    Ok(())
                }
            };
            health_task.abort();
            tracing::info!("server stopped");
            result
        });

        Ok(RunningMesh {
            addr,
            stop: Some(stop_tx),
            task,
            metrics,
            health,
            background: Vec::new(),
            finishing: Vec::new(),
            drain_timeout: config.server.drain_timeout,
        })
    }
}

/// The listener's connections and, when there is a link, the in-process
/// ones. Dropped when shutdown starts: the listener closes and dialling
/// the link fails from then on.
fn incoming(
    listener: TcpListener,
    in_process: Option<LocalIncoming>,
) -> impl futures::Stream<Item = std::io::Result<Conn>> + Send {
    use futures::StreamExt;
    let tcp = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map(|c| c.map(Conn::Tcp));
    let local = match in_process {
        Some(l) => tokio_stream::wrappers::UnboundedReceiverStream::new(l.rx)
            .map(|c| Ok(Conn::Local(c)))
            .left_stream(),
        None => futures::stream::empty().right_stream(),
    };
    futures::stream::select(tcp, local)
}

/// CORS rules. Listed origins may send credentials (the session cookie;
/// the response names the caller's origin, as browsers require); `*` allows
/// any origin without credentials, because browsers refuse credentials
/// for a wildcard and a page on any site should not ride on a user's
/// session.
fn cors(origins: &[String]) -> CorsLayer {
    let any = origins.iter().any(|o| o == "*");
    let allow = if any {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    let h = HeaderName::from_static;
    CorsLayer::new()
        .allow_origin(allow)
        .allow_credentials(!any)
        .allow_methods([Method::POST, Method::GET, Method::OPTIONS])
        .allow_headers([
            h("content-type"),
            h("x-grpc-web"),
            h("x-user-agent"),
            h("grpc-timeout"),
            h("authorization"),
            h("x-request-id"),
        ])
        .expose_headers([
            h("grpc-status"),
            h("grpc-message"),
            h("grpc-status-details-bin"),
            h("x-request-id"),
        ])
        .max_age(Duration::from_secs(24 * 3600))
}

/// A running server.
#[derive(Debug)]
pub struct RunningMesh {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
    metrics: Arc<Metrics>,
    health: HealthMap,
    background: Vec<JoinHandle<()>>,
    /// Tasks that finish by themselves once the server has stopped (e.g.
    /// writers draining a queue); awaited, up to the drain timeout.
    finishing: Vec<JoinHandle<()>>,
    drain_timeout: std::time::Duration,
}

impl RunningMesh {
    /// Ties a background task (e.g. a subscription) to this server: it is
    /// stopped when the server stops.
    pub fn on_stop(mut self, task: Option<JoinHandle<()>>) -> RunningMesh {
        self.background.extend(task);
        self
    }

    /// Ties a task that ends by itself after the server stops (a queue
    /// writer whose senders live in the services): awaited on stop, up to
    /// the drain timeout, so that its queue is not lost.
    pub fn finishing(mut self, task: JoinHandle<()>) -> RunningMesh {
        self.finishing.push(task);
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn health(&self) -> &HealthMap {
        &self.health
    }

    /// Starts draining without waiting for it to finish.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Waits until the server has stopped (after a shutdown signal).
    pub async fn wait(self) -> anyhow::Result<()> {
        let result = self.task.await;
        for t in &self.background {
            t.abort();
        }
        for t in self.finishing {
            if tokio::time::timeout(self.drain_timeout, t).await.is_err() {
                tracing::warn!("a background writer did not finish within the drain timeout");
            }
        }
        result?
    }

    /// Drains and stops.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.begin_shutdown();
        self.wait().await
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when the future is first polled, so no signal is missed.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                }
            }
            _ => {
                tracing::error!("cannot install signal handlers; stop with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
    }
}
