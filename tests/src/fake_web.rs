//! A fake web search provider speaking the Tavily search API
//! (`POST /search` → `{"results":[{"title","url","content","score"}]}`),
//! answering scripted results, an error status, a raw (malformed) body or
//! nothing for a while; optionally insisting on an API key.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;

/// How the fake answers.
#[derive(Debug, Clone)]
pub enum WebScript {
    /// These (title, url, content) results.
    Results(Vec<(String, String, String)>),
    Status(u16),
    /// Answers only after this long.
    Slow(Duration),
    /// 200 with this body as it is (e.g. something that is not JSON).
    Raw(String),
}

#[derive(Debug)]
struct Shared {
    script: Mutex<WebScript>,
    hits: AtomicUsize,
    last_body: Mutex<Option<serde_json::Value>>,
    /// The `Authorization` header of the last request.
    last_authorization: Mutex<Option<String>>,
    /// When set, requests without this key (as `Bearer` or `api_key`) get 401.
    required_key: Mutex<Option<String>>,
}

#[derive(Debug)]
pub struct FakeWeb {
    pub addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeWeb {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeWeb {
    pub async fn start(script: WebScript) -> FakeWeb {
        let shared = Arc::new(Shared {
            script: Mutex::new(script),
            hits: AtomicUsize::new(0),
            last_body: Mutex::new(None),
            last_authorization: Mutex::new(None),
            required_key: Mutex::new(None),
        });
        let app = Router::new()
            .route("/search", post(handle))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake web");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeWeb { addr, shared, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, s: WebScript) {
        *self.shared.script.lock().expect("lock") = s;
    }

    pub fn hits(&self) -> usize {
        self.shared.hits.load(Ordering::SeqCst)
    }

    pub fn last_body(&self) -> Option<serde_json::Value> {
        self.shared.last_body.lock().expect("lock").clone()
    }

    /// The `Authorization` header the last request carried.
    pub fn last_authorization(&self) -> Option<String> {
        self.shared.last_authorization.lock().expect("lock").clone()
    }

    /// Answers 401, as Tavily does, unless a request carries `key` both as
    /// `Authorization: Bearer` and as the body's `api_key`.
    pub fn require_key(&self, key: &str) {
        *self.shared.required_key.lock().expect("lock") = Some(key.to_string());
    }
}

/// Whether a request carries the required key (when one is required).
fn authorized(shared: &Shared, body: Option<&serde_json::Value>) -> bool {
    let Some(key) = shared.required_key.lock().expect("lock").clone() else {
        return true;
    };
    let header = shared.last_authorization.lock().expect("lock").clone();
    header.as_deref() == Some(format!("Bearer {key}").as_str())
        && body.and_then(|b| b["api_key"].as_str()) == Some(key.as_str())
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    shared.hits.fetch_add(1, Ordering::SeqCst);
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    *shared.last_body.lock().expect("lock") = parsed.clone();
    *shared.last_authorization.lock().expect("lock") = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    if !authorized(&shared, parsed.as_ref()) {
        return (
            StatusCode::UNAUTHORIZED,
            "{\"detail\":{\"error\":\"Unauthorized\"}}",
        )
            .into_response();
    }
    let script = shared.script.lock().expect("lock").clone();
    match script {
        WebScript::Raw(body) => {
            (StatusCode::OK, [("content-type", "application/json")], body).into_response()
        }
        WebScript::Status(code) => StatusCode::from_u16(code).expect("status").into_response(),
        WebScript::Slow(d) => {
            tokio::time::sleep(d).await;
            (StatusCode::OK, "{\"results\":[]}").into_response()
        }
        WebScript::Results(rs) => {
            let results: Vec<serde_json::Value> = rs
                .iter()
                .enumerate()
                .map(|(i, (t, u, c))| {
                    serde_json::json!({"title": t, "url": u, "content": c, "score": 1.0 - i as f64 * 0.1})
                })
                .collect();
            (
                StatusCode::OK,
                [("content-type", "application/json")],
                serde_json::json!({ "query": "", "results": results }).to_string(),
            )
                .into_response()
        }
    }
}
