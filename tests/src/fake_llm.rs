//! A fake OpenAI-compatible provider: a real HTTP server in the test
//! process answering `POST /v1/chat/completions` with chat-completions SSE,
//! scripted per test — normal, failing, rate-limited, slow, cut mid-stream,
//! malformed. It records every request and notices when a client goes away
//! before a stream is finished.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use futures::StreamExt;

/// What the fake answers to one request.
#[derive(Debug, Clone)]
pub enum Script {
    /// A normal stream: `pieces` as deltas, then a finish reason, then (if
    /// `usage` and the request asked for it) a usage chunk, then `[DONE]`.
    Stream {
        pieces: Vec<String>,
        usage: Option<(u32, u32)>,
        first_delay: Duration,
        gap: Duration,
    },
    /// An error status with an OpenAI error body.
    Status {
        code: u16,
        retry_after: Option<String>,
    },
    /// Sends `pieces`, then breaks the connection.
    Cut { pieces: Vec<String> },
    /// A chunk that is not JSON.
    Malformed,
    /// Headers, then only SSE keep-alive comments, forever.
    Hang,
    /// Sends `pieces`, then a chunk that is not JSON, then `[DONE]`.
    MalformedAfter { pieces: Vec<String> },
    /// Sends `pieces`, then an in-stream `{"error": {...}}` object with
    /// `message` (as OpenRouter and vLLM report failures mid-stream), then
    /// `[DONE]`.
    ErrorAfter {
        pieces: Vec<String>,
        message: String,
    },
    /// An older server: 400 to a request with `stream_options`, else a
    /// normal stream of `pieces` without a usage report.
    RejectsStreamOptions { pieces: Vec<String> },
    /// A normal stream answering [`echo_reply`] of the request's last user
    /// message, three characters per delta, `gap` apart: replies differ per
    /// question, so mixed-up or reordered replies show.
    Echo { gap: Duration },
}

/// What [`Script::Echo`] answers to `question`.
pub fn echo_reply(question: &str) -> String {
    format!("echo: {}", question.chars().rev().collect::<String>())
}

impl Script {
    /// A quick normal stream reporting `usage`.
    pub fn ok(pieces: &[&str], usage: Option<(u32, u32)>) -> Script {
        Script::Stream {
            pieces: pieces.iter().map(|s| s.to_string()).collect(),
            usage,
            first_delay: Duration::ZERO,
            gap: Duration::ZERO,
        }
    }

    /// A slow stream: `n` pieces `gap` apart.
    pub fn slow(n: usize, gap: Duration) -> Script {
        Script::Stream {
            pieces: (0..n).map(|i| format!("t{i} ")).collect(),
            usage: Some((10, n as u32)),
            first_delay: Duration::ZERO,
            gap,
        }
    }

    /// [`Script::Echo`] without pauses.
    pub fn echo() -> Script {
        Script::Echo {
            gap: Duration::ZERO,
        }
    }

    pub fn status(code: u16) -> Script {
        Script::Status {
            code,
            retry_after: None,
        }
    }
}

/// A request the fake received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub body: serde_json::Value,
    pub authorization: Option<String>,
    pub at: Instant,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<VecDeque<Script>>,
    fallback: Mutex<Script>,
    seen: Mutex<Vec<Seen>>,
    /// Streams whose client left before the stream ended.
    abandoned: AtomicUsize,
}

/// A running fake provider.
#[derive(Debug)]
pub struct FakeLlm {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeLlm {
    /// Starts a fake answering `fallback` whenever its queue is empty.
    pub async fn start(fallback: Script) -> FakeLlm {
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            fallback: Mutex::new(fallback),
            seen: Mutex::new(Vec::new()),
            abandoned: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(handle))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake llm");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeLlm { addr, shared, task }
    }

    /// The base URL to configure as a provider.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Answers the next requests with `scripts`, in order.
    pub fn push(&self, scripts: impl IntoIterator<Item = Script>) {
        self.shared.queue.lock().expect("lock").extend(scripts);
    }

    pub fn set_fallback(&self, s: Script) {
        *self.shared.fallback.lock().expect("lock") = s;
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().expect("lock").clone()
    }

    pub fn hits(&self) -> usize {
        self.shared.seen.lock().expect("lock").len()
    }

    pub fn abandoned(&self) -> usize {
        self.shared.abandoned.load(Ordering::SeqCst)
    }
}

/// Counts a stream as abandoned when dropped before its end.
struct Watch {
    shared: Arc<Shared>,
    done: bool,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.done {
            self.shared.abandoned.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn chunk(model: &str, content: Option<&str>, finish: Option<&str>) -> String {
    let delta = match content {
        Some(c) => serde_json::json!({ "content": c }),
        None => serde_json::json!({}),
    };
    let v = serde_json::json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
    });
    format!("data: {v}\n\n")
}

async fn handle(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    shared.seen.lock().expect("lock").push(Seen {
        body: body.clone(),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        at: Instant::now(),
    });
    let script = shared
        .queue
        .lock()
        .expect("lock")
        .pop_front()
        .unwrap_or_else(|| shared.fallback.lock().expect("lock").clone());
    let script = match script {
        Script::RejectsStreamOptions { .. } if body.get("stream_options").is_some() => {
            let e = serde_json::json!({"error": {
                "message": "Unrecognized request argument supplied: stream_options",
                "type": "invalid_request_error",
            }});
            return Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .header("content-type", "application/json")
                .body(Body::from(e.to_string()))
                .expect("response");
        }
        Script::RejectsStreamOptions { pieces } => Script::Stream {
            pieces,
            usage: None,
            first_delay: Duration::ZERO,
            gap: Duration::ZERO,
        },
        other => other,
    };
    let model = body["model"].as_str().unwrap_or("fake").to_string();
    let wants_usage = body["stream_options"]["include_usage"].as_bool() == Some(true);
    let sse = |stream: futures::stream::BoxStream<'static, Result<Bytes, std::io::Error>>| {
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(stream))
            .expect("response")
    };
    let script = match script {
        Script::Echo { gap } => {
            let question = body["messages"]
                .as_array()
                .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
                .and_then(|m| m["content"].as_str())
                .unwrap_or_default();
            let reply: Vec<char> = echo_reply(question).chars().collect();
            Script::Stream {
                pieces: reply.chunks(3).map(|c| c.iter().collect()).collect(),
                usage: Some((question.len() as u32, reply.len() as u32)),
                first_delay: Duration::ZERO,
                gap,
            }
        }
        other => other,
    };
    match script {
        Script::Status { code, retry_after } => {
            let mut r = Response::builder().status(StatusCode::from_u16(code).expect("status"));
            if let Some(ra) = retry_after {
                r = r.header("retry-after", ra);
            }
            r.header("content-type", "application/json")
                .body(Body::from(
                    serde_json::json!({"error": {"message": format!("scripted {code}"), "type": "fake"}})
                        .to_string(),
                ))
                .expect("response")
        }
        Script::Stream {
            pieces,
            usage,
            first_delay,
            gap,
        } => {
            let mut events: Vec<String> = pieces
                .iter()
                .map(|p| chunk(&model, Some(p), None))
                .collect();
            events.push(chunk(&model, None, Some("stop")));
            if let (Some((p, c)), true) = (usage, wants_usage) {
                let u = serde_json::json!({
                    "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
                    "model": model, "choices": [],
                    "usage": { "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c },
                });
                events.push(format!("data: {u}\n\n"));
            }
            events.push("data: [DONE]\n\n".to_string());
            let n = events.len();
            let watch = Arc::new(Mutex::new(Watch {
                shared: shared.clone(),
                done: false,
            }));
            let stream =
                futures::stream::iter(events.into_iter().enumerate()).then(move |(i, e)| {
                    let watch = watch.clone();
                    async move {
                        let wait = if i == 0 { first_delay } else { gap };
                        if !wait.is_zero() {
                            tokio::time::sleep(wait).await;
                        }
                        if i + 1 == n {
                            watch.lock().expect("lock").done = true;
                        }
                        Ok::<_, std::io::Error>(Bytes::from(e))
                    }
                });
            sse(stream.boxed())
        }
        Script::Cut { pieces } => {
            let mut items: Vec<Result<Bytes, std::io::Error>> = pieces
                .iter()
                .map(|p| Ok(Bytes::from(chunk(&model, Some(p), None))))
                .collect();
            items.push(Err(std::io::Error::other("scripted cut")));
            let stream = futures::stream::iter(items).then(|item| async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                item
            });
            sse(stream.boxed())
        }
        Script::Malformed => {
            let items: Vec<Result<Bytes, std::io::Error>> = vec![
                Ok(Bytes::from("data: {this is not json\n\n")),
                Ok(Bytes::from("data: [DONE]\n\n")),
            ];
            sse(futures::stream::iter(items).boxed())
        }
        Script::Echo { .. } => unreachable!("echo is a stream, resolved above"),
        Script::MalformedAfter { pieces } => {
            let mut items: Vec<Result<Bytes, std::io::Error>> = pieces
                .iter()
                .map(|p| Ok(Bytes::from(chunk(&model, Some(p), None))))
                .collect();
            items.push(Ok(Bytes::from("data: {\"choices\": [oops\n\n")));
            items.push(Ok(Bytes::from("data: [DONE]\n\n")));
            sse(futures::stream::iter(items).boxed())
        }
        Script::ErrorAfter { pieces, message } => {
            let mut items: Vec<Result<Bytes, std::io::Error>> = pieces
                .iter()
                .map(|p| Ok(Bytes::from(chunk(&model, Some(p), None))))
                .collect();
            let e = serde_json::json!({"error": {"message": message, "code": 502}});
            items.push(Ok(Bytes::from(format!("data: {e}\n\n"))));
            items.push(Ok(Bytes::from("data: [DONE]\n\n")));
            sse(futures::stream::iter(items).boxed())
        }
        Script::RejectsStreamOptions { .. } => unreachable!("rewritten above"),
        Script::Hang => {
            let watch = Watch {
                shared: shared.clone(),
                done: false,
            };
            let stream = futures::stream::unfold(watch, |w| async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Some((Ok::<_, std::io::Error>(Bytes::from(": keep-alive\n\n")), w))
            });
            sse(stream.boxed())
        }
    }
}

/// A provider address that never completes a TCP handshake, as a host that
/// is down or firewalled behaves: a listener whose accept queue is full and
/// never drained, so the kernel drops every further SYN and a client's
/// connect hangs until its own connect timeout. Loopback only.
#[derive(Debug)]
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: tokio::net::TcpListener,
    _held: Vec<tokio::net::TcpStream>,
}

impl Blackhole {
    pub async fn start() -> Blackhole {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind blackhole");
        let listener = socket.listen(1).expect("listen");
        let addr = listener.local_addr().expect("addr");
        // Fill the accept queue: once full, a connect no longer completes.
        let mut held = Vec::new();
        loop {
            match tokio::time::timeout(
                Duration::from_millis(200),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                Ok(Ok(s)) => held.push(s),
                Ok(Err(e)) => panic!("blackhole connect: {e}"),
                Err(_) => break,
            }
            assert!(held.len() < 64, "the accept queue never filled up");
        }
        Blackhole {
            addr,
            _listener: listener,
            _held: held,
        }
    }

    /// The base URL to configure as a provider.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

/// A base URL on a loopback port nobody listens on: connections are
/// refused at once.
pub async fn refused_base_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}/v1")
}
