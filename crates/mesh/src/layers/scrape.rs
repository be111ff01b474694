//! `GET /metrics` for Prometheus, answered before the gRPC-web translator
//! (which refuses plain HTTP/1.1 requests) and before the gRPC layers.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use tonic::body::Body;
use tower::{Layer, Service};

use super::metrics::Metrics;

pub const PATH: &str = "/metrics";

#[derive(Clone, Debug)]
pub struct ScrapeLayer {
    metrics: Arc<Metrics>,
}

impl ScrapeLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for ScrapeLayer {
    type Service = Scrape<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Scrape {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Scrape<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, ReqBody> Service<Request<ReqBody>> for Scrape<S>
where
    S: Service<Request<ReqBody>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        if req.method() == Method::GET && req.uri().path() == PATH {
            let text = self.metrics.render();
            let resp = Response::builder()
                .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
                .body(Body::new(Full::new(Bytes::from(text))))
                .expect("static response parts");
            return Box::pin(async move { Ok(resp) });
        }
        Box::pin(self.inner.call(req))
    }
}
