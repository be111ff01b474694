//! The request path, outermost first: CORS and gRPC-web translation (edge
//! concerns), request id, tracing span, metrics, load shedding, deadline.
//! Authentication and rate limiting join here as their services land. One
//! middleware per file.

pub mod authn;
pub mod client_ip;
pub mod cors;
pub mod deadline;
pub mod decode_errors;
pub mod metrics;
pub mod request_id;
pub mod scrape;
pub mod shed;
pub mod trace;
