//! Prometheus metrics for every gRPC call: requests by service, method and
//! status code, a latency histogram, and calls in flight (streams included,
//! until their last message). The code is read from the trailers, or from
//! the headers of a trailers-only error, so streaming calls are counted with
//! the status they really ended with. Methods of services this server does
//! not mount are folded into `unknown` so a scanner cannot blow up cardinality.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tonic::Code;
use tower::{Layer, Service};
use trellis_store::Store;

/// One server's metrics, in their own registry (so in-process test meshes
/// do not see each other's counts).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    in_flight: IntGaugeVec,
    pools: IntGaugeVec,
    store: Store,
    known_services: HashSet<String>,
    /// Per-method handles, resolved once instead of on every call.
    methods: RwLock<HashMap<String, Arc<MethodHandles>>>,
}

/// One method's metric handles.
struct MethodHandles {
    service: String,
    method: String,
    in_flight: IntGauge,
    latency: Histogram,
    /// Request counters by status code, created on first use.
    codes: [OnceLock<IntCounter>; 17],
}

impl std::fmt::Debug for MethodHandles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.service, self.method)
    }
}

impl Metrics {
    pub fn new(store: Store, known_services: impl IntoIterator<Item = String>) -> Arc<Metrics> {
        let registry =
            Registry::new_custom(Some("trellis".into()), None).expect("static registry options");
        let requests = IntCounterVec::new(
            Opts::new(
                "grpc_requests_total",
                "gRPC calls finished, by service, method and status code",
            ),
            &["service", "method", "code"],
        )
        .expect("static metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "grpc_request_duration_seconds",
                "gRPC call duration until the last message",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ]),
            &["service", "method"],
        )
        .expect("static metric");
        let in_flight = IntGaugeVec::new(
            Opts::new("grpc_in_flight", "gRPC calls in flight, streams included"),
            &["service", "method"],
        )
        .expect("static metric");
        let pools = IntGaugeVec::new(
            Opts::new(
                "pool_connections",
                "Connections by pool (database, redis: idle, in_use; database_multiplexed: open)",
            ),
            &["pool", "state"],
        )
        .expect("static metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(in_flight.clone()),
            Box::new(pools.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Arc::new(Metrics {
            registry,
            requests,
            latency,
            in_flight,
            pools,
            store,
            known_services: known_services.into_iter().collect(),
            methods: RwLock::new(HashMap::new()),
        })
    }

    /// Adds another component's metrics to this registry.
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) -> prometheus::Result<()> {
        self.registry.register(c)
    }

    /// The Prometheus text exposition of everything, pool gauges read now.
    pub fn render(&self) -> String {
        if let Some(p) = self.store.pg_pool() {
            let s = p.state();
            self.pools
                .with_label_values(&["database", "idle"])
                .set(s.idle_connections.into());
            self.pools
                .with_label_values(&["database", "in_use"])
                .set((s.connections - s.idle_connections).into());
            self.pools
                .with_label_values(&["database_multiplexed", "open"])
                .set(self.store.pg_shared_open() as i64);
        }
        if let Some(p) = self.store.redis_pool() {
            let s = p.state();
            self.pools
                .with_label_values(&["redis", "idle"])
                .set(s.idle_connections.into());
            self.pools
                .with_label_values(&["redis", "in_use"])
                .set((s.connections - s.idle_connections).into());
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// The handles for a call's path; paths of services not mounted here
    /// share one `unknown` entry so scanners cannot inflate cardinality.
    fn handles(&self, path: &str) -> Arc<MethodHandles> {
        if let Some(h) = self.methods.read().ok().and_then(|m| m.get(path).cloned()) {
            return h;
        }
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let (service, method, key) = match (parts.next(), parts.next()) {
            (Some(svc), Some(method))
                if self.known_services.contains(svc) && !method.contains('/') =>
            {
                (svc.to_string(), method.to_string(), path.to_string())
            }
            _ => (
                "unknown".to_string(),
                "unknown".to_string(),
                "unknown".to_string(),
            ),
        };
        let mut map = match self.methods.write() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(key)
            .or_insert_with(|| {
                Arc::new(MethodHandles {
                    in_flight: self.in_flight.with_label_values(&[&service, &method]),
                    latency: self.latency.with_label_values(&[&service, &method]),
                    codes: std::array::from_fn(|_| OnceLock::new()),
                    service,
                    method,
                })
            })
            .clone()
    }
}

pub use trellis_core::error::code_name;

fn status_in(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
}

/// Records one call exactly once: when its status is known, or as
/// CANCELLED when it is dropped before finishing (client went away).
struct Recorder {
    metrics: Arc<Metrics>,
    handles: Arc<MethodHandles>,
    started: Instant,
    done: bool,
}

impl Recorder {
    fn new(metrics: Arc<Metrics>, handles: Arc<MethodHandles>) -> Recorder {
        handles.in_flight.inc();
        Recorder {
            metrics,
            handles,
            started: Instant::now(),
            done: false,
        }
    }

    fn finish(&mut self, code: Code) {
        if self.done {
            return;
        }
        self.done = true;
        let h = &self.handles;
        let slot = (code as usize).min(h.codes.len() - 1);
        h.codes[slot]
            .get_or_init(|| {
                self.metrics.requests.with_label_values(&[
                    h.service.as_str(),
                    h.method.as_str(),
                    code_name(code),
                ])
            })
            .inc();
        h.latency.observe(self.started.elapsed().as_secs_f64());
        h.in_flight.dec();
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

#[derive(Clone, Debug)]
pub struct MetricsLayer {
    metrics: Arc<Metrics>,
}

impl MetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for MetricsService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body,
{
    type Response = Response<MetricsBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let is_grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let recorder = is_grpc.then(|| {
            let handles = self.metrics.handles(req.uri().path());
            Recorder::new(self.metrics.clone(), handles)
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut recorder = recorder;
            match fut.await {
                Ok(resp) => {
                    if let (Some(r), Some(code)) = (recorder.as_mut(), status_in(resp.headers())) {
                        r.finish(code);
                    }
                    Ok(resp.map(|body| MetricsBody {
                        inner: body,
                        recorder,
                    }))
                }
                Err(e) => {
                    if let Some(r) = recorder.as_mut() {
                        r.finish(Code::Internal);
                    }
                    Err(e)
                }
            }
        })
    }
}

pin_project! {
    /// A response body that reports the call's status when its trailers pass.
    pub struct MetricsBody<B> {
        #[pin]
        inner: B,
        recorder: Option<Recorder>,
    }
}

impl<B: Body> Body for MetricsBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Some(rec) = this.recorder.as_mut() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(code) = frame.trailers_ref().and_then(status_in) {
                        rec.finish(code);
                    }
                }
                Poll::Ready(Some(Err(_))) => rec.finish(Code::Internal),
                // A body that ends without trailers broke the protocol.
                Poll::Ready(None) => rec.finish(Code::Unknown),
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
