//! One `tracing` span per call, named by its gRPC path and carrying the
//! request id, so every log line a handler writes can be tied to its call.

use http::Request;
use tower_http::classify::{GrpcErrorsAsFailures, SharedClassifier};
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, MakeSpan, TraceLayer};
use tracing::{Level, Span};

#[derive(Clone, Copy, Debug, Default)]
pub struct RpcSpan;

impl<B> MakeSpan<B> for RpcSpan {
    fn make_span(&mut self, req: &Request<B>) -> Span {
        let request_id = req
            .headers()
            .get(super::request_id::HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        tracing::info_span!("rpc", path = %req.uri().path(), request_id = %request_id)
    }
}

pub type RpcTraceLayer = TraceLayer<
    SharedClassifier<GrpcErrorsAsFailures>,
    RpcSpan,
    (),
    DefaultOnResponse,
    (),
    (),
    DefaultOnFailure,
>;

pub fn layer() -> RpcTraceLayer {
    TraceLayer::new_for_grpc()
        .make_span_with(RpcSpan)
        .on_request(())
        .on_response(DefaultOnResponse::new().level(Level::DEBUG))
        .on_body_chunk(())
        .on_eos(())
        // Expected errors (bad input, not found) are not incidents; internal
        // causes are logged at error level where they happen.
        .on_failure(
            DefaultOnFailure::new()
                .level(Level::DEBUG)
                .latency_unit(tower_http::LatencyUnit::Micros),
        )
}
