//! Making one call: the requests the bench sends and the two ways it sends
//! them — native gRPC through the generated tonic clients over HTTP/2, and
//! gRPC-web over an HTTP/1.1 keep-alive connection (hyper), one connection
//! per client task. A [`Call`] is one concrete request (with the bearer
//! token it presents, if any) that a client task repeats; the scenario
//! table names its kind ([`Rpc`]) and the seeding step fills it in.
//! Besides gRPC and gRPC-web, the LLM and chat references post OpenAI
//! chat-completions requests to the fake upstream over HTTP/1.1 and read
//! the SSE answer to its end, and the search references run trellisd's SQL
//! straight on PostgreSQL ([`crate::sql`]).
//!
//! A call ends with its latency's end point: by default when the call has
//! been read to its end; the time-to-first-token scenarios stop the clock
//! at the first token (and still read and check the rest). Calls that must
//! differ from one another (a fresh chat session per turn, a mix of search
//! queries, new documents per batch) draw from a [`Rotation`] shared by the
//! scenario's tasks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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

use crate::fakellm::{self, Script};
use crate::sql::{SqlBatch, SqlConn, SqlSearch};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tonic::Code;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use trellis_proto::auth::v1::auth_service_client::AuthServiceClient;
use trellis_proto::auth::v1::{LoginRequest, LoginResponse};
use trellis_proto::chat::v1::chat_event::Event as ChatEv;
use trellis_proto::chat::v1::chat_service_client::ChatServiceClient;
use trellis_proto::chat::v1::{ChatEvent, MessageStatus, SendMessageRequest};
use trellis_proto::llm::v1::generate_stream_response::Event;
use trellis_proto::llm::v1::llm_service_client::LlmServiceClient;
use trellis_proto::llm::v1::{GenerateStreamRequest, GenerateStreamResponse};
use trellis_proto::search::v1::search_service_client::SearchServiceClient;
use trellis_proto::search::v1::{
    DocumentInput, IndexDocumentsRequest, SearchRequest, SearchResponse,
};
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
    /// SQL straight on PostgreSQL (tokio-postgres), one connection per
    /// client task: the search references.
    Sql,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::GrpcWeb => "grpc-web",
            Protocol::OpenAi => "openai-sse (HTTP/1.1)",
            Protocol::Sql => "postgres (tokio-postgres)",
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
    /// The fake upstream called directly with the body chat sends it for a
    /// first turn; timed to the first content chunk.
    ChatUpstreamFirstToken,
    /// The fake upstream's paced relay script called directly with the
    /// body chat sends it; timed to the end.
    ChatUpstreamRelay,
    /// `ChatService/SendMessage`, the first turn of a fresh session; timed
    /// to the first delta.
    ChatFirstToken,
    /// `ChatService/SendMessage` of the relay model, read to Completed.
    ChatRelay,
    /// trellisd's search SQL run directly (page, then count), rotating
    /// over the query mix.
    SearchSql,
    /// The same, each statement prepared on every call as trellisd's
    /// diesel does.
    SearchSqlUnprepared,
    /// `SearchService/Search`, rotating over the query mix.
    Search,
    /// trellisd's upsert of a batch run directly.
    IndexSql,
    /// `SearchService/IndexDocuments` of a batch of new documents.
    IndexDocuments,
}

/// Items the client tasks of a scenario take in turn (one counter for all
/// of them).
#[derive(Debug, Clone)]
pub struct Rotation<T> {
    items: Arc<[T]>,
    next: Arc<AtomicUsize>,
}

impl<T> Rotation<T> {
    pub fn new(items: Vec<T>) -> Rotation<T> {
        assert!(!items.is_empty(), "a rotation needs items");
        Rotation {
            items: items.into(),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The next item, and how many were taken before it.
    pub fn take(&self) -> (usize, &T) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        (n, &self.items[n % self.items.len()])
    }
}

/// A chat-completions request to the fake upstream and what its answer
/// must be.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub body: Bytes,
    pub script: Script,
    /// Stop the clock at the first content chunk.
    pub first_token: bool,
}

impl Upstream {
    /// The request of the LLM scenarios ([`fakellm::direct_request`]).
    pub fn llm_direct() -> Upstream {
        Upstream {
            body: fakellm::direct_request(),
            script: Script::SHORT,
            first_token: false,
        }
    }
}

/// Chat turns: each in the next session of the pool, so every turn is a
/// session's first (until the pool wraps).
#[derive(Debug, Clone)]
pub struct ChatTurns {
    pub sessions: Rotation<String>,
    /// The model override of each turn (none: the session's).
    pub model: Option<String>,
    pub script: Script,
    /// Stop the clock at the first delta.
    pub first_token: bool,
}

/// IndexDocuments batches: the template documents under external ids
/// fresh to each call.
#[derive(Debug, Clone)]
pub struct IndexBatches {
    pub template: Arc<[DocumentInput]>,
    pub calls: Rotation<()>,
    /// Prefix of the external ids, unique to the scenario.
    pub prefix: &'static str,
}

impl IndexBatches {
    /// The next batch.
    pub fn next(&self) -> Vec<DocumentInput> {
        let (n, ()) = self.calls.take();
        self.template
            .iter()
            .enumerate()
            .map(|(i, d)| DocumentInput {
                external_id: format!("{}-{n}-{i}", self.prefix),
                ..d.clone()
            })
            .collect()
    }
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
    ChatCompletions(Upstream),
    /// A chat turn (SendMessage).
    ChatSend(ChatTurns),
    /// Search queries, in turn.
    Search(Rotation<SearchRequest>),
    /// The same queries as trellisd's SQL, straight on PostgreSQL.
    SearchSql(Rotation<SqlSearch>),
    /// IndexDocuments batches.
    Index(IndexBatches),
    /// The same batches as trellisd's upsert, straight on PostgreSQL.
    IndexSql(SqlBatch),
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
            Req::ChatSend(_) => "/trellis.chat.v1.ChatService/SendMessage",
            Req::Search(_) => "/trellis.search.v1.SearchService/Search",
            Req::Index(_) => "/trellis.search.v1.SearchService/IndexDocuments",
            Req::SearchSql(_) | Req::IndexSql(_) => "(sql)",
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
            Req::ChatCompletions(u) => u.body.clone(),
            // Not offered over gRPC-web: the calls vary, and only the
            // native client makes them ([`Call::call_grpc`]).
            Req::ChatSend(_)
            | Req::Search(_)
            | Req::Index(_)
            | Req::SearchSql(_)
            | Req::IndexSql(_) => Bytes::new(),
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
            // Streams, checked as a whole ([`check_stream`], [`fakellm::check_sse`]),
            // and calls only the native client or the SQL caller makes.
            Req::GenerateStream(_)
            | Req::ChatCompletions(_)
            | Req::ChatSend(_)
            | Req::Search(_)
            | Req::Index(_)
            | Req::SearchSql(_)
            | Req::IndexSql(_) => Err(Code::Unimplemented),
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

/// A chat turn's events must be: Accepted first, deltas carrying the
/// script's whole text in order, then one Completed (COMPLETED, `stop`) as
/// the last event. A Failed event counts with its code; anything else is
/// DATA_LOSS.
pub fn check_chat(events: &[ChatEvent], script: Script) -> Result<(), Code> {
    let mut text = String::new();
    let mut completed = false;
    for (i, e) in events.iter().enumerate() {
        match &e.event {
            Some(ChatEv::Accepted(_)) if i == 0 => {}
            Some(ChatEv::Delta(d)) if d.offset as usize == text.len() => text.push_str(&d.text),
            Some(ChatEv::Citations(_)) => {}
            Some(ChatEv::Completed(c))
                if i + 1 == events.len()
                    && c.status == MessageStatus::Completed as i32
                    && c.finish_reason == "stop" =>
            {
                completed = true;
            }
            Some(ChatEv::Failed(f)) => return Err(Code::from_i32(f.code)),
            _ => return Err(Code::DataLoss),
        }
    }
    if completed && text == script.text() {
        Ok(())
    } else {
        Err(Code::DataLoss)
    }
}

/// A search measured must find documents by their words (not the fuzzy
/// fallback).
fn check_search(r: &SearchResponse) -> Result<(), Code> {
    if r.hits.is_empty() || r.fuzzy || r.estimated_total_size < r.hits.len() as i64 {
        Err(Code::Internal)
    } else {
        Ok(())
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

    /// Makes the call with a generated tonic client; `Some(t)`: the
    /// latency ends at `t` (the first token).
    async fn call_grpc(&self, channel: &Channel) -> Result<Option<Instant>, Code> {
        let result = match &self.req {
            Req::GetInfo(m) => SystemServiceClient::new(channel.clone())
                .get_info(self.request(*m))
                .await
                .map(drop),
            Req::Login(m) => match AuthServiceClient::new(channel.clone())
                .login(self.request(m.clone()))
                .await
            {
                Ok(r) => return check_login(r.get_ref()).map(|()| None),
                Err(e) => Err(e),
            },
            Req::GetUser(m) => match UserServiceClient::new(channel.clone())
                .get_user(self.request(m.clone()))
                .await
            {
                Ok(r) => return check_user(r.get_ref()).map(|()| None),
                Err(e) => Err(e),
            },
            Req::ListUsers(m) => match UserServiceClient::new(channel.clone())
                .list_users(self.request(m.clone()))
                .await
            {
                Ok(r) => return check_list(r.get_ref()).map(|()| None),
                Err(e) => Err(e),
            },
            Req::Search(queries) => match SearchServiceClient::new(channel.clone())
                .search(self.request(queries.take().1.clone()))
                .await
            {
                Ok(r) => return check_search(r.get_ref()).map(|()| None),
                Err(e) => Err(e),
            },
            Req::Index(batches) => {
                let documents = batches.next();
                let n = documents.len();
                match SearchServiceClient::new(channel.clone())
                    .index_documents(self.request(IndexDocumentsRequest { documents }))
                    .await
                {
                    Ok(r) if r.get_ref().results.len() == n => return Ok(None),
                    Ok(_) => return Err(Code::DataLoss),
                    Err(e) => Err(e),
                }
            }
            Req::ChatSend(turns) => return self.chat_turn(channel, turns).await,
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
                return check_stream(&events).map(|()| None);
            }
            // Not gRPC calls: a bench bug if it gets here.
            Req::ChatCompletions(_) | Req::SearchSql(_) | Req::IndexSql(_) => {
                return Err(Code::Unimplemented);
            }
        };
        result.map(|()| None).map_err(|s| s.code())
    }

    /// One chat turn through SendMessage, read to its last event.
    async fn chat_turn(
        &self,
        channel: &Channel,
        turns: &ChatTurns,
    ) -> Result<Option<Instant>, Code> {
        let (_, session) = turns.sessions.take();
        let send = trellis_proto::chat::v1::Send {
            session_id: session.clone(),
            content: fakellm::PROMPT.to_string(),
            model: turns.model.clone(),
            ..Default::default()
        };
        let mut stream = ChatServiceClient::new(channel.clone())
            .send_message(self.request(SendMessageRequest { send: Some(send) }))
            .await
            .map_err(|s| s.code())?
            .into_inner();
        let mut events = Vec::with_capacity(turns.script.chunks + 2);
        let mut first = None;
        while let Some(m) = stream.message().await.map_err(|s| s.code())? {
            let e = m.event.ok_or(Code::DataLoss)?;
            if first.is_none() && matches!(e.event, Some(ChatEv::Delta(_))) {
                first = Some(Instant::now());
            }
            events.push(e);
        }
        check_chat(&events, turns.script)?;
        Ok(if turns.first_token { first } else { None })
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
/// upstream), or its own PostgreSQL connection.
pub enum Caller {
    Grpc(Channel),
    GrpcWeb(Http1Conn),
    OpenAi(Http1Conn),
    Sql(SqlConn),
}

impl Caller {
    /// Makes one call; `Err` is the gRPC status code it failed with
    /// (transport failures count as UNAVAILABLE, as tonic reports them);
    /// `Ok(Some(t))`: the call's latency ends at `t` (its first token),
    /// `Ok(None)`: when it returned.
    pub async fn call(&mut self, call: &Call) -> Result<Option<Instant>, Code> {
        match self {
            Caller::Grpc(channel) => call.call_grpc(channel).await,
            Caller::GrpcWeb(conn) => conn.call(call).await.map(|()| None),
            Caller::OpenAi(conn) => conn.chat(call).await,
            Caller::Sql(conn) => match &call.req {
                Req::SearchSql(queries) => conn.search(queries.take().1).await.map(|()| None),
                Req::IndexSql(batch) => conn.index(batch).await.map(|()| None),
                _ => Err(Code::Unimplemented),
            },
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
    /// end ([`fakellm::check_sse_of`]); `Some(t)` when the request asks
    /// for the first token's time `t` (the first content chunk).
    pub async fn chat(&mut self, call: &Call) -> Result<Option<Instant>, Code> {
        let Req::ChatCompletions(up) = &call.req else {
            return Err(Code::Unimplemented);
        };
        let req = Request::post(fakellm::PATH)
            .header(HOST, self.host.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "text/event-stream")
            .body(Full::new(up.body.clone()))
            .map_err(|_| Code::Internal)?;
        let resp = self.send(req).await?;
        if resp.status() != StatusCode::OK {
            return Err(code_for_http(resp.status()));
        }
        let sse = resp
            .headers()
            .get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        if !sse {
            return Err(Code::Internal);
        }
        let mut body = resp.into_body();
        let mut all = BytesMut::new();
        let mut first = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| Code::Unavailable)?;
            if let Ok(data) = frame.into_data() {
                all.extend_from_slice(&data);
                // The fake sends each event as its own body chunk.
                if first.is_none() && contains(&data, b"\"delta\":{\"content\"") {
                    first = Some(Instant::now());
                }
            }
        }
        fakellm::check_sse_of(&all, up.script)?;
        Ok(if up.first_token { first } else { None })
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

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
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

    fn delta(offset: i64, text: &str) -> ChatEvent {
        ChatEvent {
            event: Some(ChatEv::Delta(trellis_proto::chat::v1::Delta {
                text: text.into(),
                offset,
                ..Default::default()
            })),
        }
    }

    fn turn(script: Script) -> Vec<ChatEvent> {
        let mut events = vec![ChatEvent {
            event: Some(ChatEv::Accepted(Default::default())),
        }];
        // Deltas may carry several tokens at once.
        let text = script.text();
        let (a, b) = text.split_at(text.len() / 2);
        events.push(delta(0, a));
        events.push(delta(a.len() as i64, b));
        events.push(ChatEvent {
            event: Some(ChatEv::Completed(trellis_proto::chat::v1::Completed {
                status: MessageStatus::Completed as i32,
                finish_reason: "stop".into(),
                ..Default::default()
            })),
        });
        events
    }

    #[test]
    fn checks_chat_turns() {
        let script = Script::SHORT;
        assert_eq!(check_chat(&turn(script), script), Ok(()));
        let mut no_end = turn(script);
        no_end.pop();
        assert_eq!(check_chat(&no_end, script), Err(Code::DataLoss));
        let mut gap = turn(script);
        gap[2] = delta(999, "x");
        assert_eq!(
            check_chat(&gap, script),
            Err(Code::DataLoss),
            "offsets in order"
        );
        let mut short = turn(script);
        short.remove(2);
        assert_eq!(
            check_chat(&short, script),
            Err(Code::DataLoss),
            "text whole"
        );
        let mut failed = turn(script);
        failed[3] = ChatEvent {
            event: Some(ChatEv::Failed(trellis_proto::chat::v1::Failed {
                code: Code::ResourceExhausted as i32,
                ..Default::default()
            })),
        };
        assert_eq!(check_chat(&failed, script), Err(Code::ResourceExhausted));
        let long = Script {
            chunks: 200,
            interval: None,
        };
        assert_eq!(check_chat(&turn(script), long), Err(Code::DataLoss));
        assert_eq!(check_chat(&turn(long), long), Ok(()));
    }

    #[test]
    fn rotations_are_shared_by_clones() {
        let r = Rotation::new(vec!["a", "b"]);
        let c = r.clone();
        assert_eq!(r.take(), (0, &"a"));
        assert_eq!(c.take(), (1, &"b"));
        assert_eq!(r.take(), (2, &"a"));
        let batches = IndexBatches {
            template: vec![DocumentInput::default(); 2].into(),
            calls: Rotation::new(vec![()]),
            prefix: "t",
        };
        let ids = |b: Vec<DocumentInput>| b.into_iter().map(|d| d.external_id).collect::<Vec<_>>();
        assert_eq!(ids(batches.next()), ["t-0-0", "t-0-1"]);
        assert_eq!(ids(batches.clone().next()), ["t-1-0", "t-1-1"]);
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
