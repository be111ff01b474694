//! Making one call: the requests the bench sends and the two ways it sends
//! them — native gRPC through the generated tonic clients over HTTP/2, and
//! gRPC-web over an HTTP/1.1 keep-alive connection (hyper), one connection
//! per client task. A [`Call`] is one concrete request (with the bearer
//! token it presents, if any) that a client task repeats; the scenario
//! table names its kind ([`Rpc`]) and the seeding step fills it in.
//! Besides gRPC and gRPC-web, the LLM reference (`llm-direct`) posts
//! OpenAI chat-completions requests to the fake upstream over HTTP/1.1 and
//! reads the SSE answer to its end.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use bytes::{BufMut, Bytes, BytesMut};
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use prost::Message;

use crate::fakellm;
use tokio::net::TcpStream;
use tonic::Code;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use trellis_proto::auth::v1::auth_service_client::AuthServiceClient;
use trellis_proto::auth::v1::{LoginRequest, LoginResponse};
use trellis_proto::llm::v1::generate_stream_response::Event;
use trellis_proto::llm::v1::llm_service_client::LlmServiceClient;
use trellis_proto::llm::v1::{GenerateStreamRequest, GenerateStreamResponse};
use trellis_proto::system::v1::system_service_client::SystemServiceClient;
use trellis_proto::system::v1::{GetInfoRequest, GetInfoResponse};
use trellis_proto::user::v1::user_service_client::UserServiceClient;
use trellis_proto::user::v1::{
    GetUserRequest, GetUserResponse, ListUsersRequest, ListUsersResponse,
};

/// How a scenario talks to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC over HTTP/2 through the generated tonic client; client tasks
    /// share the run's HTTP/2 connection(s).
    Grpc,
    /// gRPC-web (`application/grpc-web+proto`) over HTTP/1.1 keep-alive, one
    /// connection per client task.
    GrpcWeb,
    /// OpenAI chat completions (JSON request, SSE answer) over HTTP/1.1
    /// keep-alive, one connection per client task: the direct call to the
    /// fake upstream.
    OpenAi,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::GrpcWeb => "grpc-web",
            Protocol::OpenAi => "openai-sse (HTTP/1.1)",
        }
    }
}

/// What a scenario calls, as its table entry names it; the seeding step
/// ([`crate::seed`]) turns it into [`Call`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    /// `SystemService/GetInfo` without credentials: the mesh's no-op.
    SystemGetInfo,
    /// `SystemService/GetInfo` with `authorization: Bearer <access token>`:
    /// the no-op plus token verification.
    SystemGetInfoAuthed,
    /// `AuthService/Login`, each client task as its own account.
    Login,
    /// `UserService/GetUser` of another account, with an admin's token.
    GetUser,
    /// `UserService/ListUsers`, first page (admin token).
    ListUsersFirst,
    /// `UserService/ListUsers`, a deep page reached through page tokens.
    ListUsersDeep,
    /// `POST /v1/chat/completions` (streamed) straight to the fake upstream.
    ChatCompletions,
    /// `LlmService/GenerateStream` of the model routed to the fake
    /// upstream, with a member's token; read to the end of the stream.
    GenerateStream,
}

/// A request message the bench can send.
#[derive(Debug, Clone)]
pub enum Req {
    GetInfo(GetInfoRequest),
    Login(LoginRequest),
    GetUser(GetUserRequest),
    ListUsers(ListUsersRequest),
    GenerateStream(GenerateStreamRequest),
    /// A chat-completions JSON body, posted to the fake upstream.
    ChatCompletions(Bytes),
}

impl Req {
    /// The HTTP path, `/package.Service/Method`.
    pub fn path(&self) -> &'static str {
        match self {
            Req::GetInfo(_) => "/trellis.system.v1.SystemService/GetInfo",
            Req::Login(_) => "/trellis.auth.v1.AuthService/Login",
            Req::GetUser(_) => "/trellis.user.v1.UserService/GetUser",
            Req::ListUsers(_) => "/trellis.user.v1.UserService/ListUsers",
            Req::GenerateStream(_) => "/trellis.llm.v1.LlmService/GenerateStream",
            Req::ChatCompletions(_) => fakellm::PATH,
        }
    }

    /// The request message, encoded.
    fn encode(&self) -> Bytes {
        match self {
            Req::GetInfo(m) => m.encode_to_vec().into(),
            Req::Login(m) => m.encode_to_vec().into(),
            Req::GetUser(m) => m.encode_to_vec().into(),
            Req::ListUsers(m) => m.encode_to_vec().into(),
            Req::GenerateStream(m) => m.encode_to_vec().into(),
            Req::ChatCompletions(body) => body.clone(),
        }
    }

    /// Checks that `message` decodes as this request's response.
    fn check_response(&self, message: &[u8]) -> Result<(), Code> {
        let bad = |_| Code::Internal;
        match self {
            Req::GetInfo(_) => GetInfoResponse::decode(message).map(drop).map_err(bad),
            Req::Login(_) => check_login(&LoginResponse::decode(message).map_err(bad)?),
            Req::GetUser(_) => check_user(&GetUserResponse::decode(message).map_err(bad)?),
            Req::ListUsers(_) => check_list(&ListUsersResponse::decode(message).map_err(bad)?),
            // Streams, checked as a whole ([`check_stream`], [`fakellm::check_sse`]).
            Req::GenerateStream(_) | Req::ChatCompletions(_) => Err(Code::Unimplemented),
        }
    }
}

/// A login must hand out an access token.
fn check_login(r: &LoginResponse) -> Result<(), Code> {
    match &r.tokens {
        Some(t) if !t.access_token.is_empty() => Ok(()),
        _ => Err(Code::Internal),
    }
}

/// GetUser must return the user.
fn check_user(r: &GetUserResponse) -> Result<(), Code> {
    match &r.user {
        Some(u) if !u.id.is_empty() => Ok(()),
        _ => Err(Code::Internal),
    }
}

/// The pages measured are full ones.
fn check_list(r: &ListUsersResponse) -> Result<(), Code> {
    if r.users.is_empty() {
        Err(Code::Internal)
    } else {
        Ok(())
    }
}

/// A GenerateStream must deliver the whole answer as deltas, then one
/// `Completed` (finish reason `stop`, the upstream's usage) as its last
/// event. A `Failed` event counts with its code; anything incomplete is
/// DATA_LOSS.
fn check_stream(events: &[GenerateStreamResponse]) -> Result<(), Code> {
    let mut text = String::new();
    let mut completed = None;
    for (i, e) in events.iter().enumerate() {
        match &e.event {
            Some(Event::Delta(d)) => text.push_str(d),
            Some(Event::Completed(c)) if i + 1 == events.len() => completed = Some(c),
            Some(Event::Failed(f)) => return Err(Code::from_i32(f.code)),
            Some(Event::Citations(_)) => {}
            Some(Event::Completed(_)) | None => return Err(Code::DataLoss),
        }
    }
    match completed {
        Some(c)
            if text == fakellm::expected_text()
                && c.finish_reason == "stop"
                && c.usage
                    .is_some_and(|u| u.completion_tokens == fakellm::CHUNKS as i32) =>
        {
            Ok(())
        }
        _ => Err(Code::DataLoss),
    }
}

/// One concrete call a client task repeats.
#[derive(Debug, Clone)]
pub struct Call {
    pub req: Req,
    /// `Bearer <token>`, sent as `authorization`.
    pub bearer: Option<MetadataValue<Ascii>>,
}

impl Call {
    pub fn new(req: Req) -> Call {
        Call { req, bearer: None }
    }

    /// The call presenting `token` as `authorization: Bearer <token>`.
    pub fn with_token(req: Req, token: &str) -> anyhow::Result<Call> {
        let bearer = format!("Bearer {token}")
            .parse()
            .context("the access token is not a valid header value")?;
        Ok(Call {
            req,
            bearer: Some(bearer),
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        if let Some(b) = &self.bearer {
            req.metadata_mut().insert("authorization", b.clone());
        }
        req
    }

    /// Makes the call with a generated tonic client.
    async fn call_grpc(&self, channel: &Channel) -> Result<(), Code> {
        let result = match &self.req {
            Req::GetInfo(m) => SystemServiceClient::new(channel.clone())
                .get_info(self.request(*m))
                .await
                .map(drop),
            Req::Login(m) => match AuthServiceClient::new(channel.clone())
                .login(self.request(m.clone()))
                .await
            {
                Ok(r) => return check_login(r.get_ref()),
                Err(e) => Err(e),
            },
            Req::GetUser(m) => match UserServiceClient::new(channel.clone())
                .get_user(self.request(m.clone()))
                .await
            {
                Ok(r) => return check_user(r.get_ref()),
                Err(e) => Err(e),
            },
            Req::ListUsers(m) => match UserServiceClient::new(channel.clone())
                .list_users(self.request(m.clone()))
                .await
            {
                Ok(r) => return check_list(r.get_ref()),
                Err(e) => Err(e),
            },
            Req::GenerateStream(m) => {
                let mut stream = LlmServiceClient::new(channel.clone())
                    .generate_stream(self.request(m.clone()))
                    .await
                    .map_err(|s| s.code())?
                    .into_inner();
                // To the end of the stream: its trailers carry the status.
                let mut events = Vec::with_capacity(fakellm::CHUNKS + 1);
                while let Some(e) = stream.message().await.map_err(|s| s.code())? {
                    events.push(e);
                }
                return check_stream(&events);
            }
            // Not a gRPC call: a bench bug if it gets here.
            Req::ChatCompletions(_) => return Err(Code::Unimplemented),
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
/// or its own HTTP/1.1 connection (gRPC-web, or OpenAI SSE to the fake
/// upstream).
pub enum Caller {
    Grpc(Channel),
    GrpcWeb(Http1Conn),
    OpenAi(Http1Conn),
}

impl Caller {
    /// Makes one call; `Err` is the gRPC status code it failed with
    /// (transport failures count as UNAVAILABLE, as tonic reports them).
    pub async fn call(&mut self, call: &Call) -> Result<(), Code> {
        match self {
            Caller::Grpc(channel) => call.call_grpc(channel).await,
            Caller::GrpcWeb(conn) => conn.call(call).await,
            Caller::OpenAi(conn) => conn.chat(call).await,
        }
    }
}

/// A client on one HTTP/1.1 keep-alive connection (gRPC-web, or OpenAI
/// chat completions), reconnecting when the server closes it.
pub struct Http1Conn {
    addr: SocketAddr,
    host: HeaderValue,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Http1Conn {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Http1Conn> {
        let sender = Self::handshake(addr)
            .await
            .with_context(|| format!("connecting to {addr} (HTTP/1.1)"))?;
        Ok(Http1Conn {
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

    /// Sends `req` on the connection (a new one if the server closed it);
    /// transport failures are UNAVAILABLE.
    async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<http::Response<Incoming>, Code> {
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
        sender
            .send_request(req)
            .await
            .map_err(|_| Code::Unavailable)
    }

    /// `GET path`, the whole body when the answer is 200.
    pub async fn get(&mut self, path: &str) -> Result<Bytes, Code> {
        let req = Request::get(path)
            .header(HOST, self.host.clone())
            .body(Full::new(Bytes::new()))
            .map_err(|_| Code::Internal)?;
        let resp = self.send(req).await?;
        if resp.status() != StatusCode::OK {
            return Err(code_for_http(resp.status()));
        }
        Ok(resp
            .into_body()
            .collect()
            .await
            .map_err(|_| Code::Unavailable)?
            .to_bytes())
    }

    /// Posts a chat-completions request and reads the SSE answer to its
    /// end ([`fakellm::check_sse`]).
    pub async fn chat(&mut self, call: &Call) -> Result<(), Code> {
        let Req::ChatCompletions(body) = &call.req else {
            return Err(Code::Unimplemented);
        };
        let req = Request::post(fakellm::PATH)
            .header(HOST, self.host.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "text/event-stream")
            .body(Full::new(body.clone()))
            .map_err(|_| Code::Internal)?;
        let resp = self.send(req).await?;
        if resp.status() != StatusCode::OK {
            return Err(code_for_http(resp.status()));
        }
        let sse = resp
            .headers()
            .get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|_| Code::Unavailable)?
            .to_bytes();
        if !sse {
            return Err(Code::Internal);
        }
        fakellm::check_sse(&body)
    }

    async fn call(&mut self, call: &Call) -> Result<(), Code> {
        let mut req = Request::post(call.req.path())
            .header(HOST, self.host.clone())
            .header(CONTENT_TYPE, "application/grpc-web+proto")
            .header(ACCEPT, "application/grpc-web+proto")
            .header("x-grpc-web", "1");
        if let Some(b) = &call.bearer {
            req = req.header(AUTHORIZATION, b.as_bytes());
        }
        let req = req
            .body(Full::new(frame(&call.req.encode())))
            .map_err(|_| Code::Internal)?;
        let resp = self.send(req).await?;
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
        read_grpc_web_body(&body, &call.req)
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
fn read_grpc_web_body(body: &[u8], req: &Req) -> Result<(), Code> {
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
            req.check_response(payload)?;
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
        let req = Req::GetInfo(GetInfoRequest {});
        assert_eq!(read_grpc_web_body(&body, &req), Ok(()));
        let mut spaced = frame(&response()).to_vec();
        spaced.extend(trailer("Grpc-Status: 0\r\n"));
        assert_eq!(read_grpc_web_body(&spaced, &req), Ok(()));
    }

    #[test]
    fn rejects_bad_bodies() {
        let rpc = &Req::GetInfo(GetInfoRequest {});
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
