//! CORS for browsers (tower-http's `CorsLayer`), applied only to requests
//! that carry an `Origin` header. Backends and grpcurl never send one and
//! never read the headers, and adding them to every response costs header
//! encoding on the hot path.

use std::task::{Context, Poll};

use futures::future::Either;
use http::{Request, Response};
use tower::{Layer, Service};
use tower_http::cors::{Cors, CorsLayer};

#[derive(Clone, Debug)]
pub struct BrowserCorsLayer {
    cors: CorsLayer,
}

impl BrowserCorsLayer {
    pub fn new(cors: CorsLayer) -> Self {
        Self { cors }
    }
}

impl<S: Clone> Layer<S> for BrowserCorsLayer {
    type Service = BrowserCors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BrowserCors {
            cors: self.cors.layer(inner.clone()),
            plain: inner,
        }
    }
}

#[derive(Clone, Debug)]
pub struct BrowserCors<S> {
    cors: Cors<S>,
    plain: S,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for BrowserCors<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Either<S::Future, <Cors<S> as Service<Request<ReqBody>>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self.plain.poll_ready(cx) {
            Poll::Ready(Ok(())) => self.cors.poll_ready(cx),
            other => other,
        }
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        if req.headers().contains_key(http::header::ORIGIN) {
            Either::Right(self.cors.call(req))
        } else {
            Either::Left(self.plain.call(req))
        }
    }
}
