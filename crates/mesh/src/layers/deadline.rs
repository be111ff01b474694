//! Deadlines: every call gets one — the client's `grpc-timeout` or the
//! configured default, whichever is sooner. Handlers see it as a
//! [`Deadline`](crate::Deadline) request extension (mesh clients forward the
//! time remaining); a unary call still running at its deadline is answered
//! DEADLINE_EXCEEDED. A stream's deadline bounds the time to its first
//! response; after that the stream is the handler's to end.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::context::Deadline;

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H M S m u n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[derive(Clone, Copy, Debug)]
pub struct DeadlineLayer {
    default: Duration,
}

impl DeadlineLayer {
    pub fn new(default: Duration) -> Self {
        Self { default }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService {
            inner,
            default: self.default,
        }
    }
}

#[derive(Clone, Debug)]
pub struct DeadlineService<S> {
    inner: S,
    default: Duration,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for DeadlineService<S>
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

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let client = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let timeout = client.map_or(self.default, |c| c.min(self.default));
        let deadline = Instant::now() + timeout;
        req.extensions_mut().insert(Deadline(deadline.into_std()));
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, fut).await {
                Ok(resp) => resp,
                Err(_) => Ok(tonic::Status::deadline_exceeded("deadline exceeded").into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout() {
        assert_eq!(parse_grpc_timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("123456789S"), None, "more than 8 digits");
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("-1S"), None);
    }
}

#[cfg(test)]
mod layer_tests {
    use tonic::body::Body;
    use tower::{ServiceExt, service_fn};

    use super::*;

    fn slow(
        delay: Duration,
    ) -> impl Service<
        Request<Body>,
        Response = Response<Body>,
        Error = std::convert::Infallible,
        Future: Send + 'static,
    > + Clone {
        service_fn(move |req: Request<Body>| async move {
            assert!(
                req.extensions().get::<Deadline>().is_some(),
                "handlers see the deadline"
            );
            tokio::time::sleep(delay).await;
            Ok(Response::new(Body::default()))
        })
    }

    #[tokio::test]
    async fn default_timeout_answers_deadline_exceeded() {
        let svc = DeadlineLayer::new(Duration::from_millis(50)).layer(slow(Duration::from_secs(5)));
        let resp = svc
            .oneshot(Request::new(Body::default()))
            .await
            .expect("response");
        assert_eq!(resp.headers()["grpc-status"], "4");
    }

    #[tokio::test]
    async fn client_timeout_wins_when_shorter() {
        let svc = DeadlineLayer::new(Duration::from_secs(30)).layer(slow(Duration::from_secs(5)));
        let mut req = Request::new(Body::default());
        req.headers_mut()
            .insert("grpc-timeout", "50m".parse().expect("ascii"));
        let started = Instant::now();
        let resp = svc.oneshot(req).await.expect("response");
        assert_eq!(resp.headers()["grpc-status"], "4");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn fast_calls_pass() {
        let svc = DeadlineLayer::new(Duration::from_secs(1)).layer(slow(Duration::from_millis(1)));
        let resp = svc
            .oneshot(Request::new(Body::default()))
            .await
            .expect("response");
        assert!(resp.headers().get("grpc-status").is_none());
    }
}
