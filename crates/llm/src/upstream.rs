//! One OpenAI-compatible provider: an async-openai client whose HTTP goes
//! through our own transport (so a refused call keeps its status and
//! `Retry-After`, and async-openai's own retries stay out of the way), the
//! chat-completions wire types (lenient, so that OpenAI, OpenRouter, vLLM,
//! Ollama and llama.cpp all parse), and the classification of failures.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Once};
use std::task::{Context, Poll};
use std::time::Duration;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use futures::Stream;
use reqwest013 as reqwest;
use serde::{Deserialize, Serialize};
use trellis_core::config::ProviderConfig;

use crate::breaker::Breaker;
use crate::prompt::Turn;

/// The request body of `POST /chat/completions`.
#[derive(Debug, Clone, Serialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Arc<Vec<Turn>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    pub stream: bool,
    /// None for providers that do not take it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct StreamOptions {
    pub include_usage: bool,
}

/// One SSE chunk. Every field is optional: servers differ.
#[derive(Debug, Deserialize)]
pub struct Chunk {
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    #[serde(default)]
    pub usage: Option<WireUsage>,
    #[serde(default)]
    pub model: Option<String>,
    /// Some servers report a failure inside the stream.
    #[serde(default)]
    pub error: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChunkChoice {
    #[serde(default)]
    pub delta: Option<Delta>,
    #[serde(default)]
    pub finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Delta {
    #[serde(default)]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct WireUsage {
    #[serde(default)]
    pub prompt_tokens: u32,
    #[serde(default)]
    pub completion_tokens: u32,
}

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, OpenAIError>> + Send>>;

/// What went wrong with one attempt.
#[derive(Debug, Clone)]
pub enum Failure {
    /// Could not connect (refused, reset, DNS), or the connection broke
    /// before an answer.
    Connect(String),
    /// No connection within the provider's `connect_timeout` (a host that
    /// is down or unreachable drops the handshake rather than refusing it).
    ConnectTimeout,
    /// The upstream answered with an error status.
    Status {
        code: u16,
        retry_after: Option<Duration>,
        message: String,
    },
    /// No first token within the provider's first-token timeout.
    FirstTokenTimeout,
    /// The caller's deadline or the provider's total timeout ran out.
    Deadline,
    /// The upstream spoke something that is not chat-completions SSE.
    Protocol(String),
}

impl Failure {
    /// Whether the request itself was refused (no provider would take it).
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            Failure::Status {
                code: 400 | 413 | 422,
                ..
            }
        )
    }

    /// Whether the upstream refused `stream_options` itself (servers that
    /// predate it answer 400 naming the field).
    pub fn rejects_stream_options(&self) -> bool {
        matches!(self, Failure::Status { code: 400 | 422, message, .. } if message.contains("stream_options"))
    }

    /// Whether trying this provider again soon may help: an overloaded or
    /// failing server (429, 5xx) or a refused or broken connection (a
    /// restarting server). Timeouts already spent the caller's time and
    /// fail over at once.
    pub fn retryable_here(&self) -> bool {
        match self {
            Failure::Status { code, .. } => *code == 429 || *code >= 500,
            Failure::Connect(_) => true,
            _ => false,
        }
    }

    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::Connect(_) => "connect",
            Failure::ConnectTimeout => "connect_timeout",
            Failure::Status { code: 429, .. } => "rate_limited",
            Failure::Status { code, .. } if *code >= 500 => "server_error",
            Failure::Status { .. } => "refused",
            Failure::FirstTokenTimeout => "first_token_timeout",
            Failure::Deadline => "deadline",
            Failure::Protocol(_) => "protocol",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(m) => write!(f, "connection failed: {m}"),
            Failure::ConnectTimeout => f.write_str("no connection within the connect timeout"),
            Failure::Status { code, message, .. } => write!(f, "HTTP {code}: {message}"),
            Failure::FirstTokenTimeout => f.write_str("no first token in time"),
            Failure::Deadline => f.write_str("timed out"),
            Failure::Protocol(m) => write!(f, "malformed response: {m}"),
        }
    }
}

/// An error status from the transport, carried through async-openai.
#[derive(Debug)]
struct HttpFailure {
    code: u16,
    retry_after: Option<Duration>,
    message: String,
}

impl std::fmt::Display for HttpFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {}: {}", self.code, self.message)
    }
}

impl std::error::Error for HttpFailure {}

/// The tower service async-openai sends through: plain reqwest, and an
/// error status becomes an [`HttpFailure`] that keeps `Retry-After`.
#[derive(Clone)]
struct Transport {
    http: reqwest::Client,
}

impl tower::Service<HttpRequestFactory> for Transport {
    type Response = reqwest::Response;
    type Error = OpenAIError;
    type Future =
        Pin<Box<dyn Future<Output = Result<reqwest::Response, OpenAIError>> + Send + 'static>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, factory: HttpRequestFactory) -> Self::Future {
        let http = self.http.clone();
        Box::pin(async move {
            let mut request = factory.build().await?;
            // async-openai always sends a bearer header; without a key
            // (Ollama, vLLM) send none rather than an empty one.
            if request
                .headers()
                .get(reqwest::header::AUTHORIZATION)
                .is_some_and(|v| v.as_bytes().trim_ascii() == b"Bearer")
            {
                request.headers_mut().remove(reqwest::header::AUTHORIZATION);
            }
            let response = http.execute(request).await.map_err(OpenAIError::Reqwest)?;
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let body = response.text().await.unwrap_or_default();
            Err(OpenAIError::Boxed(Box::new(HttpFailure {
                code: status.as_u16(),
                retry_after,
                message: error_message(&body),
            })))
        })
    }
}

/// `Retry-After` as seconds (fractions too, as some model APIs send) or
/// as an HTTP date (a date in the past means now).
fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    v.parse::<u64>()
        .ok()
        .map(Duration::from_secs)
        .or_else(|| {
            v.parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e9)
                .map(Duration::from_secs_f64)
        })
        .or_else(|| {
            let at = httpdate::parse_http_date(v).ok()?;
            Some(
                at.duration_since(std::time::SystemTime::now())
                    .unwrap_or(Duration::ZERO),
            )
        })
}

/// The `error.message` of an OpenAI error body, else the body, shortened.
fn error_message(body: &str) -> String {
    let from_json = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        });
    let mut m = from_json.unwrap_or_else(|| body.trim().to_string());
    if m.len() > 300 {
        let mut cut = 300;
        while !m.is_char_boundary(cut) {
            cut -= 1;
        }
        m.truncate(cut);
        m.push('…');
    }
    m
}

/// async-openai's error as a [`Failure`].
pub fn classify(e: OpenAIError) -> Failure {
    match e {
        OpenAIError::Boxed(b) => match b.downcast::<HttpFailure>() {
            Ok(h) => Failure::Status {
                code: h.code,
                retry_after: h.retry_after,
                message: h.message,
            },
            Err(other) => Failure::Connect(other.to_string()),
        },
        // The only timeout our client sets is the connect timeout: a
        // provider that cannot be reached, to fail over from.
        OpenAIError::Reqwest(r) if r.is_timeout() => Failure::ConnectTimeout,
        OpenAIError::Reqwest(r) => Failure::Connect(without_url(&r)),
        OpenAIError::ApiError(a) => Failure::Status {
            code: a.status_code.as_u16(),
            retry_after: None,
            message: a.api_error.message,
        },
        OpenAIError::JSONDeserialize(e, _) => Failure::Protocol(e.to_string()),
        OpenAIError::StreamError(s) => Failure::Connect(s.to_string()),
        other => Failure::Protocol(other.to_string()),
    }
}

/// reqwest's message without the URL (which may carry credentials).
fn without_url(e: &reqwest::Error) -> String {
    let mut inner: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let mut last = None;
    while let Some(err) = inner {
        last = Some(err.to_string());
        inner = err.source();
    }
    last.unwrap_or_else(|| "request failed".to_string())
}

/// A configured provider.
pub struct Provider {
    pub name: String,
    pub config: ProviderConfig,
    pub breaker: Arc<Breaker>,
    client: Client<OpenAIConfig>,
    /// Set once the provider refused `stream_options`.
    no_stream_options: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("base_url", &self.config.base_url)
            .finish_non_exhaustive()
    }
}

static CRYPTO: Once = Once::new();

impl Provider {
    pub fn new(
        name: &str,
        config: &ProviderConfig,
        breaker: Arc<Breaker>,
    ) -> Result<Provider, reqwest::Error> {
        // reqwest is built without a TLS crypto provider of its own; ring
        // is the process default (another crate may have installed one).
        CRYPTO.call_once(|| {
            let _ = rustls::crypto::ring::default_provider().install_default();
        });
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()?;
        let mut oa = OpenAIConfig::new().with_api_base(config.base_url.trim_end_matches('/'));
        if let Some(key) = &config.api_key {
            oa = oa.with_api_key(key.clone());
        }
        let client = Client::with_config(oa).with_http_service(Transport { http });
        Ok(Provider {
            name: name.to_string(),
            config: config.clone(),
            breaker,
            client,
            no_stream_options: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The `stream_options` to send this provider.
    pub fn stream_options(&self) -> Option<StreamOptions> {
        (self.config.include_usage
            && !self
                .no_stream_options
                .load(std::sync::atomic::Ordering::Relaxed))
        .then_some(StreamOptions {
            include_usage: true,
        })
    }

    /// Sends `request` and returns its chunk stream once the response
    /// headers arrived. A provider that refuses `stream_options` is asked
    /// again at once without it, and not sent it again.
    pub async fn open(&self, request: &ChatRequest) -> Result<ChunkStream, Failure> {
        let mut request = std::borrow::Cow::Borrowed(request);
        if request.stream_options.is_some() && self.stream_options().is_none() {
            request.to_mut().stream_options = None;
        }
        let first = self
            .client
            .chat()
            .create_stream_byot::<&ChatRequest, Chunk>(&request)
            .await
            .map_err(classify);
        match first {
            Err(f) if request.stream_options.is_some() && f.rejects_stream_options() => {
                tracing::warn!(provider = %self.name, "the provider refuses stream_options: asking without (tokens will be estimated)");
                self.no_stream_options
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                request.to_mut().stream_options = None;
                self.client
                    .chat()
                    .create_stream_byot::<&ChatRequest, Chunk>(&request)
                    .await
                    .map_err(classify)
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO),
            "a date in the past: now"
        );
        let soon = std::time::SystemTime::now() + Duration::from_secs(30);
        let wait = parse_retry_after(&httpdate::fmt_http_date(soon)).expect("date");
        assert!(
            (Duration::from_secs(28)..=Duration::from_secs(30)).contains(&wait),
            "{wait:?}"
        );
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn error_messages_come_from_the_openai_shape() {
        assert_eq!(
            error_message(r#"{"error":{"message":"slow down","type":"rate_limit"}}"#),
            "slow down"
        );
        assert_eq!(error_message("  bad gateway \n"), "bad gateway");
        assert!(error_message(&"x".repeat(1000)).chars().count() <= 301);
    }

    #[test]
    fn chunks_parse_leniently() {
        let c: Chunk = serde_json::from_str(
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"}}]}"#,
        )
        .expect("chunk");
        assert_eq!(
            c.choices[0]
                .delta
                .as_ref()
                .and_then(|d| d.content.as_deref()),
            Some("Hi")
        );
        let u: Chunk = serde_json::from_str(
            r#"{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#,
        )
        .expect("usage chunk");
        assert_eq!(u.usage.map(|u| u.completion_tokens), Some(7));
    }

    #[test]
    fn classification() {
        let f = Failure::Status {
            code: 503,
            retry_after: None,
            message: String::new(),
        };
        assert!(f.retryable_here() && !f.is_rejection());
        let f = Failure::Status {
            code: 400,
            retry_after: None,
            message: String::new(),
        };
        assert!(!f.retryable_here() && f.is_rejection());
        assert!(!Failure::FirstTokenTimeout.retryable_here());
        assert!(!Failure::ConnectTimeout.retryable_here());
        assert!(!Failure::ConnectTimeout.is_rejection());
        assert!(Failure::Connect("refused".into()).retryable_here());
        assert_eq!(Failure::ConnectTimeout.reason(), "connect_timeout");
        let f = Failure::Status {
            code: 400,
            retry_after: None,
            message: "Unrecognized request argument supplied: stream_options".into(),
        };
        assert!(f.rejects_stream_options() && f.is_rejection());
        let f = Failure::Status {
            code: 400,
            retry_after: None,
            message: "max_tokens is too large".into(),
        };
        assert!(!f.rejects_stream_options());
    }
}
