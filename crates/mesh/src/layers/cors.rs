//! CORS for browsers (tower-http's `CorsLayer`), applied only to requests
//! that carry an `Origin` header. Backends and grpcurl never send one and
//! never read the headers, and adding them to every response costs header
//! encoding on the hot path.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::Either;
use http::{Request, Response};
use tower::{Layer, Service};
use tower_http::cors::{Cors, CorsLayer};

#[derive(Clone, Debug)]
pub struct BrowserCorsLayer {
    cors: Arc<CorsLayer>,
}

impl BrowserCorsLayer {
    pub fn new(cors: CorsLayer) -> Self {
        Self {
            cors: Arc::new(cors),
        }
    }
}

impl<S> Layer<S> for BrowserCorsLayer {
    type Service = BrowserCors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BrowserCors {
            cors: self.cors.clone(),
            inner,
        }
    }
}

/// Holds the inner stack once (the server clones the whole stack for every
/// request, so the CORS policy is shared, not copied); a browser request
/// wraps it in tower-http's `Cors` for itself.
#[derive(Clone, Debug)]
pub struct BrowserCors<S> {
    cors: Arc<CorsLayer>,
    inner: S,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for BrowserCors<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Either<S::Future, <Cors<S> as Service<Request<ReqBody>>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        if req.headers().contains_key(http::header::ORIGIN) {
            // The service polled ready goes into `Cors`; a clone stays.
            let clone = self.inner.clone();
            let ready = std::mem::replace(&mut self.inner, clone);
            Either::Right(self.cors.layer(ready).call(req))
        } else {
            Either::Left(self.inner.call(req))
        }
    }
}
