//! Authentication: the credential of a call — `authorization: Bearer …`, or
//! for browsers the `trellis_access` session cookie — is verified once here,
//! and the outcome is left for the handler as a request extension. Public
//! RPCs (Login, health, …) ignore it; the others call
//! [`crate::authenticated`], which returns the [`Principal`] or
//! UNAUTHENTICATED. Verification is local (signature, claims, the
//! revocation set) — no round trip per call.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::{HeaderMap, Request, Response};
use tower::{Layer, Service};

use crate::context::Principal;

/// The cookie carrying the access token for browsers.
pub const ACCESS_COOKIE: &str = "trellis_access";

/// Turns a credential into a principal. Implemented by the auth crate's
/// token verifier; the mesh only knows this trait.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate<'a>(
        &'a self,
        credential: &'a str,
    ) -> BoxFuture<'a, Result<Arc<Principal>, tonic::Status>>;
}

/// What the layer found, stored in the request extensions when a
/// credential was presented.
#[derive(Debug, Clone)]
pub enum Authn {
    Verified(Arc<Principal>),
    Rejected(tonic::Status),
}

/// The bearer credential of a request, if any.
pub fn credential(headers: &HeaderMap) -> Option<String> {
    match headers.get(http::header::AUTHORIZATION) {
        Some(v) => bearer(v).map(str::to_string),
        None => cookie(headers, ACCESS_COOKIE),
    }
}

/// The token of an `authorization: Bearer …` value.
fn bearer(value: &http::HeaderValue) -> Option<&str> {
    let v = value.to_str().ok()?.trim();
    (v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ")).then(|| v[7..].trim())
}

/// A call's credential, held by the layer's future: the header value
/// itself (a reference-counted clone, not a copy of the token) or the
/// cookie's value.
enum Presented {
    Header(http::HeaderValue),
    Cookie(String),
}

impl Presented {
    fn of(headers: &HeaderMap) -> Option<Presented> {
        match headers.get(http::header::AUTHORIZATION) {
            Some(v) => bearer(v).is_some().then(|| Presented::Header(v.clone())),
            None => cookie(headers, ACCESS_COOKIE).map(Presented::Cookie),
        }
    }

    fn token(&self) -> &str {
        match self {
            Presented::Header(v) => bearer(v).unwrap_or_default(),
            Presented::Cookie(c) => c,
        }
    }
}

/// The value of cookie `name`.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty())
}

#[derive(Clone)]
pub struct AuthnLayer {
    authenticator: Arc<dyn Authenticator>,
}

impl std::fmt::Debug for AuthnLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthnLayer")
    }
}

impl AuthnLayer {
    pub fn new(authenticator: Arc<dyn Authenticator>) -> Self {
        Self { authenticator }
    }
}

impl<S> Layer<S> for AuthnLayer {
    type Service = AuthnService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthnService {
            inner,
            authenticator: self.authenticator.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthnService<S> {
    inner: S,
    authenticator: Arc<dyn Authenticator>,
}

impl<S> std::fmt::Debug for AuthnService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthnService")
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AuthnService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let Some(presented) = Presented::of(req.headers()) else {
            return Box::pin(self.inner.call(req));
        };
        // The ready inner service is used for this call; a clone takes its
        // place for the next one (tower's usual pattern).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let authenticator = self.authenticator.clone();
        Box::pin(async move {
            let outcome = match authenticator.authenticate(presented.token()).await {
                Ok(p) => Authn::Verified(p),
                Err(status) => Authn::Rejected(status),
            };
            req.extensions_mut().insert(outcome);
            inner.call(req).await
        })
    }
}
