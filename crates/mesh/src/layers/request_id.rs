//! `x-request-id`: kept when the client sent a sane one, generated (UUIDv7)
//! otherwise, echoed on the response and available to handlers (and so to
//! outgoing mesh calls) as request metadata.
//!
//! The value is marked sensitive, which HPACK encodes as "never indexed":
//! an id is unique per call, so entering it in the connection's dynamic
//! table would only evict the entries that are reused (content-type,
//! grpc-status, …) and make every later lookup walk a chain of dead ids.

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
        let mut value = HeaderValue::from_str(id).ok()?;
        value.set_sensitive(true);
        Some(RequestId::new(value))
    }
}

/// Drops a client id that is too long or not printable ASCII, so logs and
/// forwarded metadata only ever carry sane ids; a sane one is marked
/// sensitive (never indexed) for its echo and its onward calls.
fn drop_insane_id<B>(mut req: Request<B>) -> Request<B> {
    if let Some(v) = req.headers_mut().get_mut(HEADER) {
        let b = v.as_bytes();
        if b.is_empty() || b.len() > MAX_LEN || !b.iter().all(|c| c.is_ascii_graphic()) {
            req.headers_mut().remove(HEADER);
        } else {
            v.set_sensitive(true);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_and_kept_ids_are_never_indexed_and_insane_ones_dropped() {
        let req = Request::new(());
        let made = MakeUuidV7.make_request_id(&req).expect("an id");
        assert!(made.header_value().is_sensitive());
        assert_eq!(made.header_value().len(), 36);

        let sane = Request::builder()
            .header(HEADER, "req-42")
            .body(())
            .expect("request");
        let kept = drop_insane_id(sane);
        let v = kept.headers().get(HEADER).expect("kept");
        assert_eq!(v, "req-42");
        assert!(v.is_sensitive());

        for insane in ["", "has space", &"x".repeat(MAX_LEN + 1)] {
            let req = Request::builder()
                .header(HEADER, insane)
                .body(())
                .expect("request");
            assert!(
                drop_insane_id(req).headers().get(HEADER).is_none(),
                "{insane:?}"
            );
        }
    }
}
