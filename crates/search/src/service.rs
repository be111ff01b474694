//! `trellis.search.v1.SearchService`: validation at the edge, permissions,
//! and the RPCs over documents, queries, web search and history.

use std::collections::BTreeMap;
use std::time::Instant;

use chrono::{DateTime, Utc};
use tonic::{Request, Response, Status};
use trellis_core::config::SearchConfig;
use trellis_core::error::FieldViolations;
use trellis_core::page::PageTokens;
use trellis_mesh::authenticated;
use trellis_proto::search::v1 as pb;
use trellis_proto::search::v1::search_service_server::{SearchService, SearchServiceServer};
use trellis_store::Store;
use uuid::Uuid;

use crate::documents::{self, valid_collection};
use crate::error::SearchError;
use crate::history::{self, HistoryCursor};
use crate::query::{self, Cursor, Query, Viewer};
use crate::web::{self, WebSearch};

pub const DOCS_READ: &str = "search:documents:read";
pub const DOCS_WRITE: &str = "search:documents:write";
/// Administrators: see every document.
pub const DOCS_READ_ALL: &str = "search:documents:read_all";
/// Administrators: delete any document.
pub const DOCS_WRITE_ALL: &str = "search:documents:write_all";
pub const QUERY: &str = "search:query:run";
pub const HISTORY_READ: &str = "search:history:read";
pub const HISTORY_WRITE: &str = "search:history:write";
pub const ANALYTICS: &str = "search:analytics:read";

const DEFAULT_PAGE: usize = 10;

#[derive(Clone, Debug)]
pub struct SearchSvc {
    store: Store,
    pages: PageTokens,
    config: SearchConfig,
    web: Option<WebSearch>,
}

/// The generated server around a [`SearchSvc`], with message limits applied.
pub fn service(
    config: &SearchConfig,
    max_message_bytes: usize,
    store: Store,
    pages: PageTokens,
) -> Result<SearchServiceServer<SearchSvc>, SearchError> {
    let web = match &config.web {
        Some(w) => Some(WebSearch::new(w).map_err(|e| {
            SearchError::field("search.web", format!("cannot build the web client: {e}"))
        })?),
        None => None,
    };
    Ok(SearchServiceServer::new(SearchSvc {
        store,
        pages,
        config: config.clone(),
        web,
    })
    .max_decoding_message_size(max_message_bytes)
    .max_encoding_message_size(max_message_bytes))
}

fn parse_id(field: &str, raw: &str, v: &mut FieldViolations) -> Option<Uuid> {
    match Uuid::parse_str(raw.trim()) {
        Ok(id) => Some(id),
        Err(_) => {
            v.add(field, "must be a document id (UUID)");
            None
        }
    }
}

fn time(
    field: &str,
    t: &Option<prost_types::Timestamp>,
    v: &mut FieldViolations,
) -> Option<DateTime<Utc>> {
    let t = t.as_ref()?;
    let parsed = u32::try_from(t.nanos)
        .ok()
        .and_then(|n| DateTime::from_timestamp(t.seconds, n));
    if parsed.is_none() {
        v.add(field, "is not a valid timestamp");
    }
    parsed
}

fn millis(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

impl SearchSvc {
    /// A validated query from a request.
    fn query(&self, r: &pb::SearchRequest) -> Result<Query, SearchError> {
        let mut v = FieldViolations::new();
        let text = r.query.trim();
        if text.chars().count() > self.config.max_query_chars {
            v.add(
                "query",
                format!("at most {} characters", self.config.max_query_chars),
            );
        } else if !trellis_core::text::is_clean_text(text) {
            v.add("query", "must not contain control characters");
        }
        if r.collections.len() > 32 {
            v.add("collections", "at most 32 collections");
        }
        for (i, c) in r.collections.iter().enumerate() {
            if !valid_collection(c) {
                v.add(
                    format!("collections[{i}]"),
                    "1-64 characters of a-z, 0-9, _ and -",
                );
            }
        }
        // Filters are bound as parameters, but PostgreSQL still refuses
        // some text (NUL) outright: the same rules as for indexing.
        if r.tags.len() > documents::MAX_TAGS {
            v.add("tags", format!("at most {} tags", documents::MAX_TAGS));
        }
        for (i, t) in r.tags.iter().enumerate() {
            if !documents::valid_tag(t.trim()) {
                v.add(format!("tags[{i}]"), documents::TAG_RULE);
            }
        }
        if r.attributes.len() > documents::MAX_ATTRIBUTES {
            v.add(
                "attributes",
                format!("at most {} attributes", documents::MAX_ATTRIBUTES),
            );
        }
        let mut bad_attributes: Vec<String> = r
            .attributes
            .iter()
            .filter(|(k, val)| !documents::valid_attribute(k, val))
            .map(|(k, _)| format!("attributes[{}]", documents::key_label(k)))
            .collect();
        bad_attributes.sort();
        for f in bad_attributes {
            v.add(f, documents::ATTRIBUTE_RULE);
        }
        let updated_after = time("updated_after", &r.updated_after, &mut v);
        let updated_before = time("updated_before", &r.updated_before, &mut v);
        if let (Some(a), Some(b)) = (updated_after, updated_before)
            && a >= b
        {
            v.add("updated_after", "must be before updated_before");
        }
        let page_size = match r.page_size {
            n if n < 0 => {
                v.add("page_size", "must not be negative");
                DEFAULT_PAGE
            }
            0 => DEFAULT_PAGE,
            n => (n as usize).min(trellis_core::page::MAX_PAGE_SIZE),
        };
        let recency = match pb::SearchOrder::try_from(r.order_by) {
            Ok(pb::SearchOrder::Recency) => true,
            Ok(_) => false,
            Err(_) => {
                v.add("order_by", "unknown order");
                false
            }
        };
        if !v.is_empty() {
            return Err(SearchError::Invalid(v));
        }
        let mut collections = r.collections.clone();
        collections.sort();
        collections.dedup();
        let mut tags: Vec<String> = r.tags.iter().map(|t| t.trim().to_string()).collect();
        tags.sort();
        tags.dedup();
        Ok(Query {
            text: text
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect(),
            collections,
            tags,
            attributes: r
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
            updated_after,
            updated_before,
            // Without words there is no relevance: newest first.
            recency: recency || text.is_empty(),
            page_size,
        })
    }
}

#[tonic::async_trait]
impl SearchService for SearchSvc {
    async fn index_documents(
        &self,
        req: Request<pb::IndexDocumentsRequest>,
    ) -> Result<Response<pb::IndexDocumentsResponse>, Status> {
        let p = authenticated(&req)?;
        p.require(DOCS_WRITE)?;
        let docs = documents::validate(req.into_inner().documents)?;
        let results =
            documents::upsert(&self.store, &self.config.language, p.user_id, docs).await?;
        Ok(Response::new(pb::IndexDocumentsResponse { results }))
    }

    async fn get_document(
        &self,
        req: Request<pb::GetDocumentRequest>,
    ) -> Result<Response<pb::GetDocumentResponse>, Status> {
        let p = authenticated(&req)?;
        p.require(DOCS_READ)?;
        let mut v = FieldViolations::new();
        let id = parse_id("id", &req.get_ref().id, &mut v);
        v.check()?;
        let id = id.ok_or_else(|| Status::invalid_argument("id"))?;
        let document = documents::get(&self.store, id, p.user_id, p.can(DOCS_READ_ALL)).await?;
        Ok(Response::new(pb::GetDocumentResponse {
            document: Some(document),
        }))
    }

    async fn delete_documents(
        &self,
        req: Request<pb::DeleteDocumentsRequest>,
    ) -> Result<Response<pb::DeleteDocumentsResponse>, Status> {
        let p = authenticated(&req)?;
        p.require(DOCS_WRITE)?;
        let r = req.into_inner();
        let mut v = FieldViolations::new();
        if r.ids.is_empty() || r.ids.len() > documents::MAX_BATCH {
            v.add("ids", format!("1 to {} ids", documents::MAX_BATCH));
        }
        let ids: Vec<Uuid> = r
            .ids
            .iter()
            .enumerate()
            .filter_map(|(i, raw)| parse_id(&format!("ids[{i}]"), raw, &mut v))
            .collect();
        v.check()?;
        let n = documents::delete(&self.store, &ids, p.user_id, p.can(DOCS_WRITE_ALL)).await?;
        Ok(Response::new(pb::DeleteDocumentsResponse {
            deleted_count: n as i32,
        }))
    }

    async fn list_collections(
        &self,
        req: Request<pb::ListCollectionsRequest>,
    ) -> Result<Response<pb::ListCollectionsResponse>, Status> {
        let p = authenticated(&req)?;
        p.require(DOCS_READ)?;
        let collections =
            documents::collections(&self.store, p.user_id, p.can(DOCS_READ_ALL)).await?;
        Ok(Response::new(pb::ListCollectionsResponse { collections }))
    }

    async fn search(
        &self,
        req: Request<pb::SearchRequest>,
    ) -> Result<Response<pb::SearchResponse>, Status> {
        let t0 = Instant::now();
        let p = authenticated(&req)?;
        p.require(QUERY)?;
        let r = req.into_inner();
        let q = self.query(&r)?;
        let fingerprint = q.fingerprint(p.user_id);
        let cursor: Option<Cursor> = self.pages.open(&r.page_token, &fingerprint)?;
        let first_page = cursor.is_none();
        let viewer = Viewer {
            id: p.user_id,
            all: p.can(DOCS_READ_ALL),
        };
        let mut warnings = Vec::new();
        let want_web = r.include_web && first_page && !q.text.is_empty();
        if r.include_web && self.web.is_none() {
            warnings.push("web search is not configured (search.web)".to_string());
        }
        let local = query::run(&self.store, &self.config.language, &q, viewer, cursor);
        let (page, web) = match (&self.web, want_web) {
            (Some(w), true) => {
                let (page, web) = tokio::join!(local, w.search(&q.text));
                (page?, Some(web))
            }
            _ => (local.await?, None),
        };
        let next_page_token = page
            .next
            .as_ref()
            .map(|c| self.pages.seal(&fingerprint, c))
            .unwrap_or_default();
        let mut hits = page.hits;
        match web {
            Some(Ok(web_hits)) => hits = web::fuse(hits, web_hits),
            Some(Err(w)) => warnings.push(format!("{w}; showing local results only")),
            None => {}
        }
        let took = t0.elapsed();
        if first_page {
            history::record(
                &self.store,
                history::Entry {
                    id: Uuid::now_v7(),
                    user_id: p.user_id,
                    query: q.text.clone(),
                    filters: q.filters_json(),
                    // Exact matches: a query rescued by the typo fallback
                    // still found nothing as typed, which is what the
                    // zero-result analytics are for.
                    result_count: if page.fuzzy { 0 } else { page.total },
                    latency_ms: took.as_millis().min(i32::MAX as u128) as i32,
                    created_at: Utc::now(),
                },
            );
        }
        Ok(Response::new(pb::SearchResponse {
            hits,
            estimated_total_size: page.total,
            next_page_token,
            did_you_mean: page.did_you_mean,
            took: Some(millis(took)),
            warnings,
            fuzzy: page.fuzzy,
        }))
    }

    async fn list_search_history(
        &self,
        req: Request<pb::ListSearchHistoryRequest>,
    ) -> Result<Response<pb::ListSearchHistoryResponse>, Status> {
        let p = authenticated(&req)?;
        p.require(HISTORY_READ)?;
        let r = req.into_inner();
        let mut v = FieldViolations::new();
        let size = trellis_core::page::page_size(&mut v, r.page_size);
        v.check()?;
        let fingerprint = format!("search-history:{}", p.user_id);
        let cursor: Option<HistoryCursor> = self.pages.open(&r.page_token, &fingerprint)?;
        let (entries, next) = history::list(&self.store, p.user_id, size, cursor).await?;
        Ok(Response::new(pb::ListSearchHistoryResponse {
            entries,
            next_page_token: next
                .map(|c| self.pages.seal(&fingerprint, &c))
                .unwrap_or_default(),
        }))
    }

    async fn clear_search_history(
        &self,
        req: Request<pb::ClearSearchHistoryRequest>,
    ) -> Result<Response<pb::ClearSearchHistoryResponse>, Status> {
        let p = authenticated(&req)?;
        p.require(HISTORY_WRITE)?;
        let deleted_count = history::clear(&self.store, p.user_id).await?;
        Ok(Response::new(pb::ClearSearchHistoryResponse {
            deleted_count,
        }))
    }

    async fn get_popular_queries(
        &self,
        req: Request<pb::GetPopularQueriesRequest>,
    ) -> Result<Response<pb::GetPopularQueriesResponse>, Status> {
        let p = authenticated(&req)?;
        p.require(ANALYTICS)?;
        let r = req.into_inner();
        let mut v = FieldViolations::new();
        let now = Utc::now();
        let end = time("end_time", &r.end_time, &mut v).unwrap_or(now);
        let start =
            time("start_time", &r.start_time, &mut v).unwrap_or(end - chrono::Duration::days(7));
        if start >= end {
            v.add("start_time", "must be before end_time");
        }
        let limit = match r.limit {
            n if n < 0 => {
                v.add("limit", "must not be negative");
                10
            }
            0 => 10,
            n => n.min(100),
        };
        v.check()?;
        let (top_queries, zero_result_queries) =
            history::popular(&self.store, start, end, limit).await?;
        Ok(Response::new(pb::GetPopularQueriesResponse {
            top_queries,
            zero_result_queries,
        }))
    }
}
