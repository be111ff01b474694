//! External web search through a provider speaking the Tavily search API
//! (`POST {url}/search`), and reciprocal rank fusion of its results with
//! local hits. Failures and timeouts never fail a search: they become a
//! warning on the response.

use std::time::Duration;

use serde::Deserialize;
use trellis_core::config::WebSearchConfig;
use trellis_proto::search::v1 as pb;

/// The RRF constant (Cormack et al.): damps the weight of top ranks.
const RRF_K: f64 = 60.0;

#[derive(Debug, Clone)]
pub struct WebSearch {
    config: WebSearchConfig,
    http: reqwest::Client,
}

#[derive(Debug, Deserialize)]
struct TavilyResponse {
    #[serde(default)]
    results: Vec<TavilyResult>,
}

#[derive(Debug, Deserialize)]
struct TavilyResult {
    #[serde(default)]
    title: String,
    #[serde(default)]
    url: String,
    #[serde(default)]
    content: String,
}

impl WebSearch {
    pub fn new(config: &WebSearchConfig) -> Result<WebSearch, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(3)))
            .build()?;
        Ok(WebSearch {
            config: config.clone(),
            http,
        })
    }

    /// Web results for `query`, best first.
    pub async fn search(&self, query: &str) -> Result<Vec<pb::SearchHit>, String> {
        let url = format!("{}/search", self.config.url.trim_end_matches('/'));
        let mut body = serde_json::json!({
            "query": query,
            "max_results": self.config.max_results,
            "search_depth": "basic",
        });
        let mut req = self.http.post(url);
        if let Some(key) = &self.config.api_key {
            req = req.bearer_auth(key);
            body["api_key"] = serde_json::json!(key);
        }
        let resp = req.json(&body).send().await.map_err(|e| {
            if e.is_timeout() {
                "web search timed out".to_string()
            } else {
                "web search unreachable".to_string()
            }
        })?;
        if !resp.status().is_success() {
            return Err(format!(
                "web search answered HTTP {}",
                resp.status().as_u16()
            ));
        }
        let parsed: TavilyResponse = resp
            .json()
            .await
            .map_err(|_| "web search sent an unreadable answer".to_string())?;
        Ok(parsed
            .results
            .into_iter()
            .take(self.config.max_results as usize)
            .map(|r| pb::SearchHit {
                document_id: String::new(),
                title: r.title,
                snippet: r.content.chars().take(400).collect(),
                score: 0.0,
                collection: String::new(),
                source: pb::HitSource::Web as i32,
                url: r.url,
                tags: Vec::new(),
                update_time: None,
                external_id: String::new(),
            })
            .collect())
    }
}

/// Merges ranked lists by reciprocal rank fusion: each hit scores
/// Σ 1 / (60 + rank) over the lists it appears in; the score replaces the
/// hits' own.
pub fn fuse(local: Vec<pb::SearchHit>, web: Vec<pb::SearchHit>) -> Vec<pb::SearchHit> {
    let mut all: Vec<pb::SearchHit> = Vec::with_capacity(local.len() + web.len());
    for list in [local, web] {
        for (rank, mut hit) in list.into_iter().enumerate() {
            hit.score = 1.0 / (RRF_K + rank as f64 + 1.0);
            all.push(hit);
        }
    }
    // Stable: at equal scores the local hit (listed first) stays first.
    all.sort_by(|a, b| b.score.total_cmp(&a.score));
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &str, source: pb::HitSource) -> pb::SearchHit {
        pb::SearchHit {
            title: name.into(),
            source: source as i32,
            ..Default::default()
        }
    }

    #[test]
    fn fusion_interleaves_by_rank() {
        let merged = fuse(
            vec![h("l1", pb::HitSource::Local), h("l2", pb::HitSource::Local)],
            vec![
                h("w1", pb::HitSource::Web),
                h("w2", pb::HitSource::Web),
                h("w3", pb::HitSource::Web),
            ],
        );
        let titles: Vec<&str> = merged.iter().map(|h| h.title.as_str()).collect();
        assert_eq!(titles, vec!["l1", "w1", "l2", "w2", "w3"]);
        assert!((merged[0].score - 1.0 / 61.0).abs() < 1e-12);
    }
}
