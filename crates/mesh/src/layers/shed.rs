//! Load shedding: at most `limit` calls are handled at once; a call beyond
//! that is refused at once with UNAVAILABLE (which clients retry with
//! back-off) instead of queueing until everything times out. A streaming
//! call counts until its response starts, so long-lived streams do not
//! starve unary calls.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::sync::Semaphore;
use tower::{Layer, Service};

#[derive(Clone, Debug)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
}

impl ShedLayer {
    pub fn new(limit: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit)),
        }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Shed {
            inner,
            permits: self.permits.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Shed<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Shed<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            let resp = tonic::Status::unavailable("server is overloaded, retry later").into_http();
            return Box::pin(async move { Ok(resp) });
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await;
            drop(permit);
            resp
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic::body::Body;
    use tower::{ServiceExt, service_fn};

    use super::*;

    #[tokio::test]
    async fn sheds_calls_beyond_the_limit() {
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        let inner = service_fn(move |_req: Request<Body>| {
            let mut rx = release_rx.clone();
            async move {
                let _ = rx.wait_for(|go| *go).await;
                Ok::<_, std::convert::Infallible>(Response::new(Body::default()))
            }
        });
        let svc = ShedLayer::new(1).layer(inner);
        let held = tokio::spawn(svc.clone().oneshot(Request::new(Body::default())));
        tokio::time::sleep(Duration::from_millis(50)).await;

        let shed = svc
            .clone()
            .oneshot(Request::new(Body::default()))
            .await
            .expect("response");
        assert_eq!(
            shed.headers()["grpc-status"],
            "14",
            "UNAVAILABLE while the only slot is taken"
        );

        release_tx.send(true).expect("release");
        let first = held.await.expect("join").expect("response");
        assert!(
            first.headers().get("grpc-status").is_none(),
            "the admitted call ran"
        );
        let after = svc
            .oneshot(Request::new(Body::default()))
            .await
            .expect("response");
        assert!(
            after.headers().get("grpc-status").is_none(),
            "the slot was given back"
        );
    }
}
