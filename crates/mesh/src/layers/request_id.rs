//! `x-request-id`: kept when the client sent a sane one, generated (UUIDv7)
//! otherwise, echoed on the response and available to handlers (and so to
//! outgoing mesh calls) as request metadata.

use http::{HeaderValue, Request};
use tower::ServiceBuilder;
use tower::layer::util::{Identity, Stack};
use tower::util::MapRequestLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};

pub const HEADER: &str = "x-request-id";

/// Longest client-supplied id we keep; longer ones are replaced.
const MAX_LEN: usize = 128;

#[derive(Clone, Copy, Debug, Default)]
pub struct MakeUuidV7;

impl MakeRequestId for MakeUuidV7 {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        // Encoded on the stack: no formatter, no intermediate String.
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let id = uuid::Uuid::now_v7().hyphenated().encode_lower(&mut buf);
        HeaderValue::from_str(id).ok().map(RequestId::new)
    }
}

/// Drops a client id that is too long or not printable ASCII, so logs and
/// forwarded metadata only ever carry sane ids.
fn drop_insane_id<B>(mut req: Request<B>) -> Request<B> {
    let insane = req.headers().get(HEADER).is_some_and(|v| {
        let b = v.as_bytes();
        b.is_empty() || b.len() > MAX_LEN || !b.iter().all(|c| c.is_ascii_graphic())
    });
    if insane {
        req.headers_mut().remove(HEADER);
    }
    req
}

pub type RequestIdLayer = Stack<
    PropagateRequestIdLayer,
    Stack<
        SetRequestIdLayer<MakeUuidV7>,
        Stack<
            MapRequestLayer<fn(Request<tonic::body::Body>) -> Request<tonic::body::Body>>,
            Identity,
        >,
    >,
>;

/// Sanitise, set if absent, then echo.
pub fn layer() -> RequestIdLayer {
    let header = http::HeaderName::from_static(HEADER);
    ServiceBuilder::new()
        .layer(MapRequestLayer::new(drop_insane_id as fn(_) -> _))
        .layer(SetRequestIdLayer::new(header.clone(), MakeUuidV7))
        .layer(PropagateRequestIdLayer::new(header))
        .into_inner()
}
