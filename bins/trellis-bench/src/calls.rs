//! Making one call: the RPCs the bench knows and the two ways it sends
//! them — native gRPC through the generated tonic clients over HTTP/2, and
//! gRPC-web over an HTTP/1.1 keep-alive connection (hyper), one connection
//! per client task.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use bytes::{BufMut, Bytes, BytesMut};
use http::header::{ACCEPT, CONTENT_TYPE, HOST};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::net::TcpStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use trellis_proto::system::v1::system_service_client::SystemServiceClient;
use trellis_proto::system::v1::{GetInfoRequest, GetInfoResponse};

/// How a scenario talks to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC over HTTP/2 through the generated tonic client; client tasks
    /// share the run's HTTP/2 connection(s).
    Grpc,
    /// gRPC-web (`application/grpc-web+proto`) over HTTP/1.1 keep-alive, one
    /// connection per client task.
    GrpcWeb,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::GrpcWeb => "grpc-web",
        }
    }
}

/// An RPC the bench can make. A new one needs an arm in each `match` below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    /// `trellis.system.v1.SystemService/GetInfo`: no I/O, the mesh's no-op.
    SystemGetInfo,
}

impl Rpc {
    /// The HTTP path, `/package.Service/Method`.
    pub fn path(self) -> &'static str {
        match self {
            Rpc::SystemGetInfo => "/trellis.system.v1.SystemService/GetInfo",
        }
    }

    /// The request message, encoded.
    fn request(self) -> Bytes {
        match self {
            Rpc::SystemGetInfo => GetInfoRequest {}.encode_to_vec().into(),
        }
    }

    /// Checks that `message` decodes as this RPC's response.
    fn check_response(self, message: &[u8]) -> Result<(), Code> {
        let decoded = match self {
            Rpc::SystemGetInfo => GetInfoResponse::decode(message).map(drop),
        };
        decoded.map_err(|_| Code::Internal)
    }

    /// Makes the call with a generated tonic client.
    async fn call_grpc(self, channel: &Channel) -> Result<(), Code> {
        let result = match self {
            Rpc::SystemGetInfo => SystemServiceClient::new(channel.clone())
                .get_info(GetInfoRequest {})
                .await
                .map(drop),
        };
        result.map_err(|s| s.code())
    }
}

/// Opens the HTTP/2 channel the native gRPC tasks share (it connects now,
/// so a server that is not there fails here rather than in the first call).
pub async fn grpc_channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))
}

/// One client task's means of calling: a clone of a shared HTTP/2 channel,
/// or its own HTTP/1.1 connection.
pub enum Caller {
    Grpc(Channel),
    GrpcWeb(WebConn),
}

impl Caller {
    /// Makes one call; `Err` is the gRPC status code it failed with
    /// (transport failures count as UNAVAILABLE, as tonic reports them).
    pub async fn call(&mut self, rpc: Rpc) -> Result<(), Code> {
        match self {
            Caller::Grpc(channel) => rpc.call_grpc(channel).await,
            Caller::GrpcWeb(conn) => conn.call(rpc).await,
        }
    }
}

/// A gRPC-web client on one HTTP/1.1 keep-alive connection, reconnecting
/// when the server closes it.
pub struct WebConn {
    addr: SocketAddr,
    host: HeaderValue,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl WebConn {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<WebConn> {
        let sender = Self::handshake(addr)
            .await
            .with_context(|| format!("connecting to {addr} (HTTP/1.1)"))?;
        Ok(WebConn {
            addr,
            host: HeaderValue::from_str(&addr.to_string())?,
            sender: Some(sender),
        })
    }

    async fn handshake(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // Drives the connection; ends when the sender is dropped or the
        // server closes it.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn call(&mut self, rpc: Rpc) -> Result<(), Code> {
        let usable = match &mut self.sender {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !usable {
            self.sender = None;
            self.sender = Some(
                Self::handshake(self.addr)
                    .await
                    .map_err(|_| Code::Unavailable)?,
            );
        }
        let sender = self.sender.as_mut().ok_or(Code::Unavailable)?;
        let req = Request::post(rpc.path())
            .header(HOST, self.host.clone())
            .header(CONTENT_TYPE, "application/grpc-web+proto")
            .header(ACCEPT, "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .body(Full::new(frame(&rpc.request())))
            .map_err(|_| Code::Internal)?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|_| Code::Unavailable)?;
        if resp.status() != StatusCode::OK {
            return Err(code_for_http(resp.status()));
        }
        // A trailers-only response (an error before any message) carries the
        // status in the headers.
        if let Some(value) = resp.headers().get("grpc-status") {
            let code = parse_status(value)?;
            if code != Code::Ok {
                return Err(code);
            }
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|_| Code::Unavailable)?
            .to_bytes();
        read_grpc_web_body(&body, rpc)
    }
}

/// A gRPC(-web) length-prefixed message frame: flag 0, big-endian length,
/// the message.
fn frame(message: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(5 + message.len());
    buf.put_u8(0);
    buf.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    buf.put_slice(message);
    buf.freeze()
}

fn parse_status(value: &HeaderValue) -> Result<Code, Code> {
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
        .map(Code::from_i32)
        .ok_or(Code::Internal)
}

/// The gRPC code for an HTTP status other than 200, per the gRPC
/// HTTP-to-gRPC status mapping.
fn code_for_http(status: StatusCode) -> Code {
    match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502..=504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// Checks a gRPC-web response body: exactly one data frame holding a
/// valid response, then a trailer frame with `grpc-status: 0`.
fn read_grpc_web_body(body: &[u8], rpc: Rpc) -> Result<(), Code> {
    let mut rest = body;
    let mut messages = 0;
    let mut status = None;
    while !rest.is_empty() {
        if rest.len() < 5 {
            return Err(Code::Internal);
        }
        let flags = rest[0];
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let payload = rest.get(5..5 + len).ok_or(Code::Internal)?;
        rest = &rest[5 + len..];
        if flags & 0x80 != 0 {
            status = Some(trailer_status(payload)?);
        } else if flags & 0x01 != 0 || status.is_some() {
            // Compressed (not asked for) or data after the trailers.
            return Err(Code::Internal);
        } else {
            rpc.check_response(payload)?;
            messages += 1;
        }
    }
    match status {
        Some(Code::Ok) if messages == 1 => Ok(()),
        Some(Code::Ok) | None => Err(Code::Internal),
        Some(code) => Err(code),
    }
}

/// The `grpc-status` in a gRPC-web trailer frame (`name: value` lines).
fn trailer_status(block: &[u8]) -> Result<Code, Code> {
    let text = std::str::from_utf8(block).map_err(|_| Code::Internal)?;
    text.split("\r\n")
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("grpc-status"))
        .and_then(|(_, value)| value.trim().parse::<i32>().ok())
        .map(Code::from_i32)
        .ok_or(Code::Internal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response() -> Vec<u8> {
        GetInfoResponse {
            version: "0.1.0".into(),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn trailer(text: &str) -> Vec<u8> {
        let mut f = vec![0x80];
        f.extend_from_slice(&(text.len() as u32).to_be_bytes());
        f.extend_from_slice(text.as_bytes());
        f
    }

    #[test]
    fn frames_messages() {
        assert_eq!(&frame(&[])[..], &[0, 0, 0, 0, 0]);
        assert_eq!(&frame(&[7, 8])[..], &[0, 0, 0, 0, 2, 7, 8]);
    }

    #[test]
    fn reads_a_good_body() {
        let mut body = frame(&response()).to_vec();
        body.extend(trailer("grpc-status:0\r\ngrpc-message:\r\n"));
        assert_eq!(read_grpc_web_body(&body, Rpc::SystemGetInfo), Ok(()));
        let mut spaced = frame(&response()).to_vec();
        spaced.extend(trailer("Grpc-Status: 0\r\n"));
        assert_eq!(read_grpc_web_body(&spaced, Rpc::SystemGetInfo), Ok(()));
    }

    #[test]
    fn rejects_bad_bodies() {
        let rpc = Rpc::SystemGetInfo;
        let no_trailer = frame(&response()).to_vec();
        assert_eq!(read_grpc_web_body(&no_trailer, rpc), Err(Code::Internal));
        let only_trailer = trailer("grpc-status:0\r\n");
        assert_eq!(read_grpc_web_body(&only_trailer, rpc), Err(Code::Internal));
        let failed = trailer("grpc-status:14\r\ngrpc-message:overloaded\r\n");
        assert_eq!(read_grpc_web_body(&failed, rpc), Err(Code::Unavailable));
        let mut truncated = frame(&response()).to_vec();
        truncated.truncate(truncated.len() - 1);
        assert_eq!(read_grpc_web_body(&truncated, rpc), Err(Code::Internal));
        let mut garbage = frame(&[0xff, 0xff]).to_vec();
        garbage.extend(trailer("grpc-status:0\r\n"));
        assert_eq!(read_grpc_web_body(&garbage, rpc), Err(Code::Internal));
    }
}
