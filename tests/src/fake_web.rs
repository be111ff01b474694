//! A fake web search provider speaking the Tavily search API
//! (`POST /search` → `{"results":[{"title","url","content","score"}]}`),
//! answering scripted results, an error status, or nothing for a while.

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
}

#[derive(Debug)]
struct Shared {
    script: Mutex<WebScript>,
    hits: AtomicUsize,
    last_body: Mutex<Option<serde_json::Value>>,
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
}

async fn handle(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    shared.hits.fetch_add(1, Ordering::SeqCst);
    *shared.last_body.lock().expect("lock") = serde_json::from_slice(&body).ok();
    let script = shared.script.lock().expect("lock").clone();
    match script {
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
