//! Undecodable requests are bad input: tonic answers a request message it
//! cannot decode (invalid UTF-8 in a string field, a truncated varint, a
//! bad length prefix) with INTERNAL, as gRPC's status-code table says, but
//! to a caller INTERNAL means "the server broke". This layer turns those
//! trailers-only answers into INVALID_ARGUMENT with a
//! `google.rpc.BadRequest` field violation naming the field prost could not
//! decode (`user.first_name`), so clients see whose fault it was. Handler
//! errors are untouched: they never carry these messages.

use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderMap, Request, Response};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tower::{Layer, Service};

/// The prefix of every prost decode error.
const PROST: &str = "failed to decode Protobuf message: ";
/// tonic's own framing errors while reading a request.
const FRAMING: [&str; 2] = [
    "protocol error: received message with",
    "Unexpected EOF decoding",
];

#[derive(Clone, Copy, Debug, Default)]
pub struct DecodeErrorsLayer;

impl<S> Layer<S> for DecodeErrorsLayer {
    type Service = DecodeErrors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DecodeErrors { inner }
    }
}

#[derive(Clone, Debug)]
pub struct DecodeErrors<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for DecodeErrors<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            if resp
                .headers()
                .get("grpc-status")
                .is_some_and(|v| v.as_bytes() == b"13")
            {
                rewrite(resp.headers_mut());
            }
            Ok(resp)
        })
    }
}

/// Replaces a decode failure's INTERNAL in `headers` by INVALID_ARGUMENT.
fn rewrite(headers: &mut HeaderMap) {
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    let Some(better) = as_bad_input(status.message()) else {
        return;
    };
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        headers.remove(name);
    }
    if better.add_header(headers).is_err() {
        // Cannot happen for the ASCII we build; fall back to the bare code.
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
    }
}

/// The INVALID_ARGUMENT for a decode error message, `None` for any other.
fn as_bad_input(message: &str) -> Option<Status> {
    if let Some(rest) = message.strip_prefix(PROST) {
        // "Inner.field: Outer.field: description": the innermost field
        // comes first; the path reads outermost first.
        let mut fields = Vec::new();
        let mut description = rest;
        while let Some((head, tail)) = description.split_once(": ") {
            match head.split_once('.') {
                Some((msg, field))
                    if !msg.is_empty()
                        && !field.is_empty()
                        && !head.contains(' ')
                        && msg.chars().all(|c| c.is_alphanumeric() || c == '_') =>
                {
                    fields.push(field);
                    description = tail;
                }
                _ => break,
            }
        }
        fields.reverse();
        let path = fields.join(".");
        let text = format!("the request message cannot be decoded: {description}");
        let details = if path.is_empty() {
            ErrorDetails::new()
        } else {
            ErrorDetails::with_bad_request_violation(path, description)
        };
        return Some(Status::with_error_details(
            Code::InvalidArgument,
            text,
            details,
        ));
    }
    if FRAMING.iter().any(|p| message.starts_with(p)) {
        return Some(Status::invalid_argument(format!(
            "the request message cannot be decoded: {message}"
        )));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prost_errors_become_field_violations() {
        let s = as_bad_input(
            "failed to decode Protobuf message: User.first_name: UpdateMeRequest.user: invalid string value: data is not UTF-8 encoded",
        )
        .expect("recognised");
        assert_eq!(s.code(), Code::InvalidArgument);
        let v = s
            .get_details_bad_request()
            .expect("bad request")
            .field_violations;
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].field, "user.first_name");
        assert_eq!(
            v[0].description,
            "invalid string value: data is not UTF-8 encoded"
        );

        let s = as_bad_input("failed to decode Protobuf message: invalid varint").expect("ok");
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.get_details_bad_request().is_none());
        assert!(s.message().ends_with("invalid varint"));
    }

    #[test]
    fn handler_errors_are_left_alone() {
        assert!(as_bad_input("internal error").is_none());
        assert!(as_bad_input("database unavailable").is_none());
        let s = as_bad_input("Unexpected EOF decoding stream.").expect("framing");
        assert_eq!(s.code(), Code::InvalidArgument);
    }
}
