//! `trellis.llm.v1.LlmService`: request validation (wire types become a
//! [`Job`] before anything else happens), authorization, and the RPCs on
//! top of the [`Gateway`].

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::Stream;
use prometheus::core::Collector;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};
use trellis_core::config::LlmConfig;
use trellis_core::error::FieldViolations;
use trellis_mesh::{CallContext, Deadline, MeshClients, Principal, authenticated};
use trellis_proto::llm::v1 as pb;
use trellis_proto::llm::v1::llm_service_server::{LlmService, LlmServiceServer};
use trellis_store::Store;
use uuid::Uuid;

use crate::breaker::Breaker;
use crate::error::LlmError;
use crate::gateway::{Event, Gateway, Job};
use crate::limits::{self, Limiter};
use crate::metrics::LlmMetrics;
use crate::prompt::{self, Turn};
use crate::upstream::Provider;
use crate::usage::{self, Recorder};

/// Permission to generate (and to see models, limits and token counts).
pub const GENERATE: &str = "llm:generate:call";
/// Permission to read one's own usage.
pub const USAGE_OWN: &str = "llm:usage:read";
/// Permission to read anyone's usage.
pub const USAGE_ALL: &str = "llm:usage:read_all";

const MAX_MESSAGES: usize = 2000;

#[derive(Clone, Debug)]
pub struct LlmSvc {
    gw: Arc<Gateway>,
    /// For SearchService (retrieval), with the caller's identity.
    clients: MeshClients,
}

/// What [`service`] builds: the generated server, the metrics to register
/// and the usage writer (await it after the server stops, so that queued
/// usage rows are written).
pub struct Built {
    pub server: LlmServiceServer<LlmSvc>,
    pub collectors: Vec<Box<dyn Collector>>,
    pub usage_writer: JoinHandle<()>,
}

impl std::fmt::Debug for Built {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Built").finish_non_exhaustive()
    }
}

/// The LLM gateway for `config`, with message limits applied.
pub fn service(
    config: &LlmConfig,
    max_message_bytes: usize,
    store: Store,
    clients: MeshClients,
) -> Result<Built, LlmError> {
    // Building the tokenizer takes a while; not in the first call's time.
    std::thread::spawn(|| prompt::count_text("warm up"));
    let mut providers = HashMap::new();
    for (name, p) in &config.providers {
        let breaker = Arc::new(Breaker::new(
            config.breaker_failures,
            config.breaker_cooldown,
        ));
        let provider = Provider::new(name, p, breaker)
            .map_err(|e| LlmError::Setup(format!("provider {name}: {e}")))?;
        providers.insert(name.clone(), Arc::new(provider));
    }
    let metrics = LlmMetrics::new();
    let breakers = providers
        .iter()
        .map(|(name, p)| (name.clone(), p.breaker.clone()))
        .collect();
    let (recorder, usage_writer) = Recorder::spawn(store.clone());
    let gw = Arc::new(Gateway {
        config: config.clone(),
        limiter: Limiter::new(store.clone()),
        store,
        providers,
        recorder,
        metrics: metrics.clone(),
    });
    Ok(Built {
        server: LlmServiceServer::new(LlmSvc { gw, clients })
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes),
        collectors: metrics.collectors(breakers),
        usage_writer,
    })
}

fn role_of(r: i32) -> Option<&'static str> {
    match pb::Role::try_from(r).ok()? {
        pb::Role::System => Some("system"),
        pb::Role::User => Some("user"),
        pb::Role::Assistant => Some("assistant"),
        pb::Role::Unspecified => None,
    }
}

/// The client's own deadline (`grpc-timeout`), not the server default.
fn client_deadline<T>(req: &Request<T>) -> Option<Instant> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    trellis_mesh::layers::deadline::parse_grpc_timeout(v).map(|d| Instant::now() + d)
}

fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

fn from_ts(
    field: &str,
    t: &prost_types::Timestamp,
    v: &mut FieldViolations,
) -> Option<DateTime<Utc>> {
    let parsed = u32::try_from(t.nanos)
        .ok()
        .and_then(|n| DateTime::from_timestamp(t.seconds, n));
    if parsed.is_none() {
        v.add(field, "is not a valid timestamp");
    }
    parsed
}

/// The validated parts of `GenerateParams` that do not depend on the caller.
struct Checked {
    alias: String,
    model: trellis_core::config::ModelConfig,
    system: String,
    messages: Vec<Turn>,
    max_tokens: u32,
    temperature: Option<f32>,
    cache: bool,
    retrieval: Option<pb::RetrievalOptions>,
}

impl LlmSvc {
    fn check(&self, params: Option<pb::GenerateParams>) -> Result<Checked, LlmError> {
        let mut v = FieldViolations::new();
        let Some(p) = params else {
            return Err(LlmError::field("params", "is required"));
        };
        let alias = p.model.trim().to_string();
        let model = if alias.is_empty() {
            v.add("params.model", "is required (ListModels lists the aliases)");
            None
        } else {
            let m = self.gw.config.models.get(&alias).cloned();
            if m.is_none() {
                v.add(
                    "params.model",
                    format!("unknown model '{alias}' (ListModels lists the aliases)"),
                );
            }
            m
        };
        if p.messages.is_empty() {
            v.add("params.messages", "needs at least one message");
        } else if p.messages.len() > MAX_MESSAGES {
            v.add(
                "params.messages",
                format!("at most {MAX_MESSAGES} messages"),
            );
        }
        let mut messages = Vec::with_capacity(p.messages.len());
        for (i, m) in p.messages.into_iter().enumerate() {
            let Some(role) = role_of(m.role) else {
                v.add(
                    format!("params.messages[{i}].role"),
                    "must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT",
                );
                continue;
            };
            if m.content.trim().is_empty() {
                v.add(format!("params.messages[{i}].content"), "must not be empty");
            }
            messages.push(Turn {
                role,
                content: m.content,
            });
        }
        if !messages.is_empty() && !messages.iter().any(|t| t.role == "user") {
            v.add("params.messages", "needs at least one ROLE_USER message");
        }
        let mut max_tokens = 0;
        if p.max_tokens < 0 {
            v.add("params.max_tokens", "must not be negative");
        } else if let Some(m) = &model {
            max_tokens = if p.max_tokens == 0 {
                m.default_max_tokens
            } else {
                p.max_tokens as u32
            };
            if max_tokens >= m.context_window {
                v.add(
                    "params.max_tokens",
                    format!(
                        "must be below the model's context window of {} tokens",
                        m.context_window
                    ),
                );
            }
        }
        if let Some(t) = p.temperature
            && !(t.is_finite() && (0.0..=2.0).contains(&t))
        {
            v.add("params.temperature", "must be between 0 and 2");
        }
        if p.cache && p.temperature != Some(0.0) {
            v.add(
                "params.cache",
                "only deterministic requests are cached: set temperature to 0",
            );
        }
        if let Some(r) = &p.retrieval
            && !(1..=20).contains(&r.top_k)
        {
            v.add("params.retrieval.top_k", "must be between 1 and 20");
        }
        if !v.is_empty() {
            return Err(LlmError::Invalid(v));
        }
        let model = model.ok_or_else(|| LlmError::field("params.model", "is required"))?;
        Ok(Checked {
            alias,
            model,
            system: p.system_prompt,
            messages,
            max_tokens,
            temperature: p.temperature,
            cache: p.cache,
            retrieval: p.retrieval,
        })
    }

    /// A generation job for `principal` from a request; retrieval, when
    /// asked for, runs here (before any quota is taken).
    async fn job<T>(
        &self,
        req: &Request<T>,
        principal: &Principal,
        params: Option<pb::GenerateParams>,
    ) -> Result<Job, LlmError> {
        let received = Instant::now();
        let c = self.check(params)?;
        let citations = match &c.retrieval {
            Some(options) => {
                let latest_user = c
                    .messages
                    .iter()
                    .rev()
                    .find(|t| t.role == "user")
                    .map(|t| t.content.as_str())
                    .unwrap_or_default();
                crate::retrieval::retrieve(
                    &self.clients,
                    &CallContext::from_request(req),
                    options,
                    latest_user,
                )
                .await?
            }
            None => Vec::new(),
        };
        let system = crate::retrieval::ground(&c.system, &citations);
        let budget = (c.model.context_window - c.max_tokens) as usize;
        let bytes = system.len() + c.messages.iter().map(|m| m.content.len()).sum::<usize>();
        let (turns, dropped, counted) = prompt::off_workers(bytes, move || {
            prompt::assemble(&system, c.messages, budget)
        })
        .await
        .map_err(|e| {
                LlmError::field(
                    "params.messages",
                    format!(
                        "the system prompt, system messages and the latest user message need {} tokens; model {} leaves {} after max_tokens {}",
                        e.required, c.alias, e.budget, c.max_tokens
                    ),
                )
            })?;
        if dropped > 0 {
            tracing::debug!(
                dropped,
                "trimmed the oldest messages to fit the context window"
            );
        }
        let first_deadline = req
            .extensions()
            .get::<Deadline>()
            .map(|d| d.0)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(300));
        Ok(Job {
            user: principal.user_id,
            request_id: req
                .metadata()
                .get(trellis_mesh::layers::request_id::HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            alias: c.alias,
            limits: limits::effective(&self.gw.config, &principal.roles),
            model: c.model,
            turns: Arc::new(turns),
            prompt_tokens: counted,
            max_tokens: c.max_tokens,
            temperature: c.temperature,
            cache: c.cache,
            citations,
            first_deadline,
            total_deadline: client_deadline(req),
            received,
        })
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

fn wire(event: Event) -> pb::GenerateStreamResponse {
    use pb::generate_stream_response::Event as E;
    pb::GenerateStreamResponse {
        event: Some(match event {
            Event::Citations(c) => E::Citations(pb::Citations { citations: c }),
            Event::Delta(d) => E::Delta(d),
            Event::Completed(c) => E::Completed(c),
            Event::Failed(f) => E::Failed(f),
        }),
    }
}

#[tonic::async_trait]
impl LlmService for LlmSvc {
    async fn list_models(
        &self,
        req: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        authenticated(&req)?.require(GENERATE)?;
        let models = self
            .gw
            .config
            .models
            .iter()
            .map(|(alias, m)| pb::Model {
                alias: alias.clone(),
                context_window: m.context_window as i32,
                prompt_price_per_million: m.prompt_price_per_million as i64,
                completion_price_per_million: m.completion_price_per_million as i64,
                providers: m.parsed_routes(alias).map(|(p, _)| p.to_string()).collect(),
                default_max_tokens: m.default_max_tokens as i32,
            })
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let principal = authenticated(&req)?;
        principal.require(GENERATE)?;
        let job = self
            .job(&req, &principal, req.get_ref().params.clone())
            .await?;
        let mut rx = self.gw.begin(job).await?;
        let mut text = String::new();
        let mut citations = Vec::new();
        while let Some(event) = rx.recv().await {
            match event? {
                Event::Citations(c) => citations = c,
                Event::Delta(d) => text.push_str(&d),
                Event::Completed(c) => {
                    return Ok(Response::new(pb::GenerateResponse {
                        text,
                        usage: c.usage,
                        finish_reason: c.finish_reason,
                        provider: c.provider,
                        upstream_model: c.upstream_model,
                        citations,
                        time_to_first_token: c.time_to_first_token,
                        duration: c.duration,
                        cached: c.cached,
                    }));
                }
                Event::Failed(f) => {
                    return Err(Status::new(tonic::Code::from(f.code), f.message));
                }
            }
        }
        Err(Status::unavailable(
            "the generation ended without an answer",
        ))
    }

    type GenerateStreamStream = EventStream;

    async fn generate_stream(
        &self,
        req: Request<pb::GenerateStreamRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let principal = authenticated(&req)?;
        principal.require(GENERATE)?;
        let job = self
            .job(&req, &principal, req.get_ref().params.clone())
            .await?;
        let mut rx = self.gw.begin(job).await?;
        // Errors before the first token are the call's status, not an event.
        let first = match rx.recv().await {
            Some(Ok(e)) => e,
            Some(Err(status)) => return Err(status),
            None => {
                return Err(Status::unavailable(
                    "the generation ended without an answer",
                ));
            }
        };
        let rest = tokio_stream::wrappers::ReceiverStream::new(rx);
        let stream = futures::StreamExt::map(
            futures::StreamExt::chain(futures::stream::iter([Ok(first)]), rest),
            |r| r.map(wire),
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn count_tokens(
        &self,
        req: Request<pb::CountTokensRequest>,
    ) -> Result<Response<pb::CountTokensResponse>, Status> {
        authenticated(&req)?.require(GENERATE)?;
        let c = self.check(req.into_inner().params)?;
        let mut turns = Vec::with_capacity(c.messages.len() + 1);
        if !c.system.is_empty() {
            turns.push(Turn {
                role: "system",
                content: c.system,
            });
        }
        turns.extend(c.messages);
        let tokens =
            prompt::off_workers(prompt::bytes(&turns), move || prompt::count_prompt(&turns)).await;
        let fits = tokens + c.max_tokens as usize <= c.model.context_window as usize;
        Ok(Response::new(pb::CountTokensResponse {
            prompt_tokens: tokens.min(i32::MAX as usize) as i32,
            fits,
        }))
    }

    async fn get_usage(
        &self,
        req: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let principal = authenticated(&req)?;
        let r = req.into_inner();
        let mut v = FieldViolations::new();
        let now = Utc::now();
        let end = match &r.end_time {
            Some(t) => from_ts("end_time", t, &mut v),
            None => Some(now),
        };
        let start = match &r.start_time {
            Some(t) => from_ts("start_time", t, &mut v),
            None => end.map(|e| e - chrono::Duration::days(30)),
        };
        let user = match r.user_id.trim() {
            "" => Some(principal.user_id),
            "*" => None,
            raw => match Uuid::parse_str(raw) {
                Ok(u) => Some(u),
                Err(_) => {
                    v.add("user_id", "must be a user id (UUID), * or empty");
                    Some(principal.user_id)
                }
            },
        };
        if let (Some(s), Some(e)) = (start, end) {
            if s >= e {
                v.add("start_time", "must be before end_time");
            } else if e - s > chrono::Duration::days(400) {
                v.add("start_time", "the window may span at most 400 days");
            }
        }
        v.check()?;
        let (Some(start), Some(end)) = (start, end) else {
            return Err(Status::invalid_argument("invalid window"));
        };
        if user == Some(principal.user_id) {
            principal.require(USAGE_OWN)?;
        } else {
            principal.require(USAGE_ALL)?;
        }
        let buckets = usage::buckets(&self.gw.store, user, start, end)
            .await
            .map_err(Status::from)?;
        let mut total = pb::UsageBucket::default();
        let buckets = buckets
            .into_iter()
            .map(|b| {
                total.requests += b.requests;
                total.prompt_tokens += b.prompt_tokens;
                total.completion_tokens += b.completion_tokens;
                total.cost_micros += b.cost_micros;
                pb::UsageBucket {
                    day: b.day,
                    model: b.model,
                    requests: b.requests,
                    prompt_tokens: b.prompt_tokens,
                    completion_tokens: b.completion_tokens,
                    cost_micros: b.cost_micros,
                }
            })
            .collect();
        Ok(Response::new(pb::GetUsageResponse {
            buckets,
            total: Some(total),
        }))
    }

    async fn get_limits(
        &self,
        req: Request<pb::GetLimitsRequest>,
    ) -> Result<Response<pb::GetLimitsResponse>, Status> {
        let principal = authenticated(&req)?;
        principal.require(GENERATE)?;
        let limits = limits::effective(&self.gw.config, &principal.roles);
        let remaining = self
            .gw
            .limiter
            .remaining(principal.user_id, &limits)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::GetLimitsResponse {
            limits: remaining
                .into_iter()
                .map(|r| pb::Limit {
                    name: r.name.to_string(),
                    limit: r.limit as i64,
                    remaining: r.remaining as i64,
                    reset_time: r.reset.map(ts),
                })
                .collect(),
        }))
    }
}
