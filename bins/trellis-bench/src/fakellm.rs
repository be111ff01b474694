//! The fake OpenAI-compatible upstream of the LLM scenarios
//! (`trellis-bench fake-llm`, hidden), and what the bench needs to call it
//! directly: the request body and the check of the SSE answer.
//!
//! `POST /v1/chat/completions` answers `text/event-stream` at once, with
//! no artificial delay: [`CHUNKS`] content chunks of [`PIECE`], a chunk
//! with `finish_reason: "stop"`, a usage chunk when the request asks for
//! one (`stream_options.include_usage`), then `data: [DONE]`. Each event
//! is its own HTTP/1.1 body chunk (chunked transfer encoding), as real
//! providers stream them. `llm-direct` calls it straight from the bench;
//! `llm-gateway` reaches it through trellisd's LlmService, configured
//! with it as provider [`PROVIDER`] and model alias [`ALIAS`].
//!
//! The chat scenarios use a second script, chosen by the upstream model:
//! [`RELAY_MODEL`] answers `--relay-chunks` content chunks paced
//! `--relay-interval-us` apart (as a real provider streams), for the relay
//! throughput at many concurrent streams. `GET /v1/last-request?model=…`
//! returns the last request body posted for that model, so the chat
//! scenarios' direct references post exactly what trellisd's chat sent.
//!
//! Like the baseline server, it is this binary re-executed, pinned to the
//! servers' CPU, and exits when its standard input closes.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tonic::Code;

/// The chat-completions route.
pub const PATH: &str = "/v1/chat/completions";
/// `GET` with `?model=…`: the last body posted for that model.
pub const LAST_REQUEST_PATH: &str = "/v1/last-request";
/// Content chunks per answer.
pub const CHUNKS: usize = 16;
/// The text of each content chunk.
pub const PIECE: &str = "tok ";
/// Provider name trellisd is configured with.
pub const PROVIDER: &str = "fake";
/// Model name sent upstream (the fake echoes it).
pub const UPSTREAM_MODEL: &str = "fake-model";
/// The model alias callers of LlmService use.
pub const ALIAS: &str = "bench";
/// The one user message of every request.
pub const PROMPT: &str = "Say sixteen tokens.";
/// Completion tokens asked for (the fake always answers [`CHUNKS`]).
pub const MAX_TOKENS: u32 = CHUNKS as u32;
/// Upstream model of the paced, long script (chat relay).
pub const RELAY_MODEL: &str = "fake-relay";
/// The model alias routed to [`RELAY_MODEL`].
pub const RELAY_ALIAS: &str = "benchrelay";

/// What the fake answers a request with: `chunks` content chunks of
/// [`PIECE`], `interval` apart (none: all at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Script {
    pub chunks: usize,
    pub interval: Option<Duration>,
}

impl Script {
    /// The default answer: [`CHUNKS`] chunks at once.
    pub const SHORT: Script = Script {
        chunks: CHUNKS,
        interval: None,
    };

    /// The text a complete answer carries.
    pub fn text(&self) -> String {
        PIECE.repeat(self.chunks)
    }
}

/// Flags of `fake-llm`.
#[derive(clap::Args, Debug)]
pub struct FakeLlmArgs {
    /// Address to listen on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Content chunks of the relay script (model `fake-relay`).
    #[arg(long, default_value_t = 200)]
    pub relay_chunks: usize,
    /// Microseconds between the relay script's chunks.
    #[arg(long, default_value_t = 5000)]
    pub relay_interval_us: u64,
}

impl FakeLlmArgs {
    fn relay(&self) -> Script {
        Script {
            chunks: self.relay_chunks,
            interval: Some(Duration::from_micros(self.relay_interval_us.max(1))),
        }
    }
}

pub fn main(args: FakeLlmArgs) -> ExitCode {
    // Like the other reference servers: one worker per CPU the process may
    // use (one, when pinned).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fake-llm: {e}");
            return ExitCode::FAILURE;
        }
    };
    let relay = args.relay();
    match runtime.block_on(serve(args.listen, relay)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fake-llm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(listen: SocketAddr, relay: Script) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let stdin_closed = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::pin!(stdin_closed);
    loop {
        let accepted = tokio::select! {
            () = &mut stdin_closed => return Ok(()),
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            // Out of descriptors, a connection reset before accept: go on.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(
                    TokioIo::new(stream),
                    service_fn(move |req| handle(req, relay)),
                )
                .await;
        });
    }
}

/// A body of frames, one per SSE event.
type Frames = Pin<Box<dyn futures::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>;
type Body = StreamBody<Frames>;

/// The frames at once.
fn body(parts: Vec<Bytes>) -> Body {
    paced(parts, None)
}

/// The frames, `interval` apart when given (the first at once; the
/// schedule is kept, so a late tick does not stretch the answer).
fn paced(parts: Vec<Bytes>, interval: Option<Duration>) -> Body {
    let frames = parts.into_iter().map(|b| Ok(Frame::data(b)));
    let Some(every) = interval else {
        return StreamBody::new(Box::pin(futures::stream::iter(frames)));
    };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    StreamBody::new(Box::pin(futures::stream::unfold(
        (frames, ticks),
        |(mut frames, mut ticks)| async move {
            let frame = frames.next()?;
            ticks.tick().await;
            Some((frame, (frames, ticks)))
        },
    )))
}

/// The last request body posted for each model.
fn last_requests() -> &'static Mutex<BTreeMap<String, Bytes>> {
    static LAST: OnceLock<Mutex<BTreeMap<String, Bytes>>> = OnceLock::new();
    LAST.get_or_init(Default::default)
}

fn last_request(query: Option<&str>) -> Response<Body> {
    let model = query
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("model="))
        .unwrap_or_default();
    let found = last_requests()
        .lock()
        .ok()
        .and_then(|m| m.get(model).cloned());
    match found {
        Some(b) => Response::new(body(vec![b])),
        None => error(StatusCode::NOT_FOUND, "no request for that model yet"),
    }
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    let json = serde_json::json!({ "error": { "message": message, "type": "fake" } });
    let mut r = Response::new(body(vec![Bytes::from(json.to_string())]));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(req: Request<Incoming>, relay: Script) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == LAST_REQUEST_PATH && req.method() == Method::GET {
        return Ok(last_request(req.uri().query()));
    }
    if req.uri().path() != PATH {
        return Ok(error(StatusCode::NOT_FOUND, "unknown path"));
    }
    if req.method() != Method::POST {
        return Ok(error(StatusCode::METHOD_NOT_ALLOWED, "POST only"));
    }
    let Ok(raw) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return Ok(error(StatusCode::BAD_REQUEST, "unreadable body"));
    };
    let Ok(chat) = serde_json::from_slice::<ChatRequest>(&raw) else {
        return Ok(error(
            StatusCode::BAD_REQUEST,
            "not a chat-completions request",
        ));
    };
    if !chat.stream {
        return Ok(error(
            StatusCode::BAD_REQUEST,
            "only stream: true is served",
        ));
    }
    if let Ok(mut last) = last_requests().lock() {
        last.insert(chat.model.clone(), raw.clone());
    }
    let script = if chat.model == RELAY_MODEL {
        relay
    } else {
        Script::SHORT
    };
    let mut r = Response::new(paced(events(&chat, script.chunks), script.interval));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    Ok(r)
}

/// The request body of `POST /v1/chat/completions`, as far as the fake
/// reads it (and as the bench sends it; the gateway sends the same shape).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    #[serde(default)]
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The body `llm-direct` posts: what trellisd sends upstream for the
/// GenerateStream request `llm-gateway` makes.
pub fn direct_request() -> Bytes {
    let req = ChatRequest {
        model: UPSTREAM_MODEL.to_string(),
        messages: vec![ChatMessage {
            role: "user".to_string(),
            content: PROMPT.to_string(),
        }],
        max_tokens: Some(MAX_TOKENS),
        stream: true,
        stream_options: Some(StreamOptions {
            include_usage: true,
        }),
    };
    Bytes::from(serde_json::to_vec(&req).expect("a chat request serializes"))
}

/// The answer's events, each `data: …\n\n`: `chunks` content chunks.
fn events(chat: &ChatRequest, chunks: usize) -> Vec<Bytes> {
    // A JSON string literal, quotes included.
    let model = serde_json::to_string(&chat.model).unwrap_or_else(|_| "\"fake\"".to_string());
    let head = format!(
        "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":{model},"
    );
    let mut out = Vec::with_capacity(chunks + 3);
    for _ in 0..chunks {
        out.push(Bytes::from(format!(
            "{head}\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{PIECE}\"}},\"finish_reason\":null}}]}}\n\n"
        )));
    }
    out.push(Bytes::from(format!(
        "{head}\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\n"
    )));
    if chat.stream_options.is_some_and(|o| o.include_usage) {
        // Roughly four characters a token, plus the per-message overhead.
        let prompt: usize = chat
            .messages
            .iter()
            .map(|m| 4 + m.content.len().div_ceil(4))
            .sum::<usize>()
            + 3;
        out.push(Bytes::from(format!(
            "{head}\"choices\":[],\"usage\":{{\"prompt_tokens\":{prompt},\"completion_tokens\":{chunks},\"total_tokens\":{}}}}}\n\n",
            prompt + chunks
        )));
    }
    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    out
}

/// One SSE chunk, as far as the check reads it.
#[derive(Debug, Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Usage {
    #[serde(default)]
    completion_tokens: u32,
}

/// The text a complete default answer carries.
pub fn expected_text() -> String {
    Script::SHORT.text()
}

/// Checks a whole SSE answer as a client would read it: every event
/// parsed, `script`'s text complete, a finish reason, usage, then `[DONE]`
/// last. An incomplete or malformed stream is DATA_LOSS.
pub fn check_sse_of(body: &[u8], script: Script) -> Result<(), Code> {
    let bad = Err(Code::DataLoss);
    let Ok(text) = std::str::from_utf8(body) else {
        return bad;
    };
    let mut answer = String::new();
    let mut finish = None;
    let mut usage = None;
    let mut done = false;
    for event in text.split("\n\n").filter(|e| !e.trim().is_empty()) {
        if done {
            return bad;
        }
        for line in event.lines() {
            let Some(data) = line.strip_prefix("data:") else {
                continue;
            };
            let data = data.trim_start();
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let Ok(chunk) = serde_json::from_str::<Chunk>(data) else {
                return bad;
            };
            if let Some(u) = chunk.usage {
                usage = Some(u.completion_tokens);
            }
            for c in chunk.choices {
                if let Some(t) = c.delta.and_then(|d| d.content) {
                    answer.push_str(&t);
                }
                if let Some(f) = c.finish_reason {
                    finish = Some(f);
                }
            }
        }
    }
    if done
        && answer == script.text()
        && finish.as_deref() == Some("stop")
        && usage == Some(script.chunks as u32)
    {
        Ok(())
    } else {
        bad
    }
}

/// The environment that makes trellisd's LlmService route alias [`ALIAS`]
/// (and [`RELAY_ALIAS`]) to the fake at `addr`, with every quota of the
/// default limits lifted (the bench's member account is not listed in
/// `role_limits`).
pub fn trellisd_env(addr: SocketAddr) -> Vec<(&'static str, String)> {
    vec![
        (
            "TRELLIS_LLM__MODELS__BENCHRELAY__ROUTES",
            format!("[\"{PROVIDER}:{RELAY_MODEL}\"]"),
        ),
        (
            "TRELLIS_LLM__PROVIDERS__FAKE__BASE_URL",
            format!("http://{addr}/v1"),
        ),
        (
            "TRELLIS_LLM__MODELS__BENCH__ROUTES",
            format!("[\"{PROVIDER}:{UPSTREAM_MODEL}\"]"),
        ),
        (
            "TRELLIS_LLM__DEFAULT_LIMITS__REQUESTS_PER_MINUTE",
            "0".into(),
        ),
        ("TRELLIS_LLM__DEFAULT_LIMITS__TOKENS_PER_DAY", "0".into()),
        (
            "TRELLIS_LLM__DEFAULT_LIMITS__COST_MICROS_PER_MONTH",
            "0".into(),
        ),
        (
            "TRELLIS_LLM__DEFAULT_LIMITS__CONCURRENT_STREAMS",
            "0".into(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(include_usage: bool) -> ChatRequest {
        let mut r: ChatRequest = serde_json::from_slice(&direct_request()).expect("parses back");
        r.stream_options = Some(StreamOptions { include_usage });
        r
    }

    fn joined(parts: Vec<Bytes>) -> Vec<u8> {
        parts.iter().flat_map(|b| b.iter().copied()).collect()
    }

    #[test]
    fn the_direct_request_is_what_the_gateway_sends() {
        let v: serde_json::Value = serde_json::from_slice(&direct_request()).expect("json");
        assert_eq!(v["model"], UPSTREAM_MODEL);
        assert_eq!(v["messages"][0]["role"], "user");
        assert_eq!(v["messages"][0]["content"], PROMPT);
        assert_eq!(v["max_tokens"], MAX_TOKENS);
        assert_eq!(v["stream"], true);
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    #[test]
    fn answers_sixteen_chunks_stop_usage_done() {
        let parts = events(&request(true), CHUNKS);
        assert_eq!(parts.len(), CHUNKS + 3);
        let body = joined(parts);
        let text = std::str::from_utf8(&body).expect("utf-8");
        assert!(text.ends_with("data: [DONE]\n\n"));
        assert!(text.contains("\"model\":\"fake-model\""));
        assert!(text.contains("\"finish_reason\":\"stop\""));
        assert!(text.contains("\"completion_tokens\":16"));
        assert_eq!(check_sse_of(&body, Script::SHORT), Ok(()));
    }

    #[test]
    fn usage_only_when_asked() {
        let parts = events(&request(false), CHUNKS);
        assert_eq!(parts.len(), CHUNKS + 2);
        // The bench always asks, so a stream without usage fails its check.
        assert_eq!(
            check_sse_of(&joined(parts), Script::SHORT),
            Err(Code::DataLoss)
        );
    }

    #[test]
    fn incomplete_streams_fail_the_check() {
        let mut parts = events(&request(true), CHUNKS);
        parts.pop();
        assert_eq!(
            check_sse_of(&joined(parts), Script::SHORT),
            Err(Code::DataLoss),
            "no [DONE]"
        );
        let mut parts = events(&request(true), CHUNKS);
        parts.remove(3);
        assert_eq!(
            check_sse_of(&joined(parts), Script::SHORT),
            Err(Code::DataLoss),
            "a chunk lost"
        );
        let mut parts = events(&request(true), CHUNKS);
        parts.push(Bytes::from_static(b"data: {}\n\n"));
        assert_eq!(
            check_sse_of(&joined(parts), Script::SHORT),
            Err(Code::DataLoss),
            "after [DONE]"
        );
        assert_eq!(
            check_sse_of(b"data: {nope\n\n", Script::SHORT),
            Err(Code::DataLoss)
        );
    }

    #[test]
    fn relay_script_answers_its_own_length() {
        let relay = Script {
            chunks: 200,
            interval: Some(Duration::from_millis(5)),
        };
        let parts = events(&request(true), relay.chunks);
        assert_eq!(parts.len(), 203);
        let body = joined(parts);
        assert_eq!(check_sse_of(&body, relay), Ok(()));
        assert_eq!(check_sse_of(&body, Script::SHORT), Err(Code::DataLoss));
    }

    #[tokio::test]
    async fn paced_bodies_keep_their_schedule() {
        use http_body_util::BodyExt as _;
        let started = tokio::time::Instant::now();
        let parts = vec![Bytes::from_static(b"a"); 4];
        let body = paced(parts, Some(Duration::from_millis(5)))
            .collect()
            .await
            .expect("infallible")
            .to_bytes();
        assert_eq!(&body[..], b"aaaa");
        // The first at once, then three intervals (never sooner).
        assert!(started.elapsed() >= Duration::from_millis(15));
    }

    #[test]
    fn last_requests_are_kept_per_model() {
        last_requests()
            .lock()
            .expect("lock")
            .insert("m-test".into(), Bytes::from_static(b"{}"));
        assert_eq!(last_request(Some("model=m-test")).status(), StatusCode::OK);
        assert_eq!(
            last_request(Some("model=other")).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(last_request(None).status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn env_names_the_provider_and_alias() {
        let env = trellisd_env("127.0.0.1:9".parse().expect("addr"));
        assert!(env.contains(&(
            "TRELLIS_LLM__PROVIDERS__FAKE__BASE_URL",
            "http://127.0.0.1:9/v1".to_string()
        )));
        assert!(env.contains(&(
            "TRELLIS_LLM__MODELS__BENCH__ROUTES",
            "[\"fake:fake-model\"]".to_string()
        )));
        assert!(env.contains(&(
            "TRELLIS_LLM__MODELS__BENCHRELAY__ROUTES",
            "[\"fake:fake-relay\"]".to_string()
        )));
    }
}
