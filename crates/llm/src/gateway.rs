//! The generation engine: routing over a model's providers (retries with
//! back-off and jitter, `Retry-After`, failover, circuit breakers) until a
//! first token arrives, then streaming the rest to the caller — and, however
//! the call ends, the accounting: usage row, quota charges, metrics, cache.
//!
//! Every generation runs in its own task that talks to the RPC through a
//! bounded channel. When the caller goes away the channel closes, the task
//! drops the upstream response (which closes its connection, so the
//! provider stops generating) and records what was produced.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::mpsc;
use tonic::{Code, Status};
use trellis_core::config::{LimitsConfig, LlmConfig, ModelConfig};
use trellis_proto::llm::v1 as pb;
use trellis_store::Store;
use uuid::Uuid;

use crate::breaker::Breaker;
use crate::cache::{self, Cached};
use crate::error::LlmError;
use crate::limits::{Estimate, Lease, Limiter};
use crate::metrics::LlmMetrics;
use crate::prompt::{self, Turn};
use crate::upstream::{Chunk, ChunkStream, Failure, Provider, WireUsage};
use crate::usage::{Recorder, UsageRow};

/// A validated generation request.
#[derive(Debug, Clone)]
pub struct Job {
    pub user: Uuid,
    pub request_id: String,
    pub alias: String,
    pub model: ModelConfig,
    pub turns: Arc<Vec<Turn>>,
    /// The prompt's tokens, when assembling it had to count them.
    pub prompt_tokens: Option<usize>,
    pub max_tokens: u32,
    pub temperature: Option<f32>,
    pub cache: bool,
    /// Retrieved documents the prompt was grounded in.
    pub citations: Vec<pb::Citation>,
    pub limits: LimitsConfig,
    /// Until the first token (the call's deadline).
    pub first_deadline: Instant,
    /// Until the last token: the client's own deadline, if it sent one.
    pub total_deadline: Option<Instant>,
    /// When the RPC arrived: the caller's time to first token and duration
    /// count from here (retrieval, retries and failover included).
    pub received: Instant,
}

impl Job {
    fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
            .unwrap_or_else(|| prompt::count_prompt(&self.turns))
    }
}

/// What the generation task tells the RPC.
#[derive(Debug)]
pub enum Event {
    Citations(Vec<pb::Citation>),
    Delta(String),
    Completed(pb::Completed),
    Failed(pb::Failed),
}

pub type EventSender = mpsc::Sender<Result<Event, Status>>;

/// The gateway of one server: providers, quotas, accounting.
pub struct Gateway {
    pub config: LlmConfig,
    pub store: Store,
    pub providers: HashMap<String, Arc<Provider>>,
    pub limiter: Limiter,
    pub recorder: Recorder,
    pub metrics: LlmMetrics,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("providers", &self.providers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// How a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Ok,
    Failed,
    Cancelled,
}

impl Ending {
    fn as_str(self) -> &'static str {
        match self {
            Ending::Ok => "ok",
            Ending::Failed => "failed",
            Ending::Cancelled => "cancelled",
        }
    }
}

/// What a stream has produced so far.
#[derive(Debug, Default)]
struct Acc {
    text: String,
    finish: Option<String>,
    usage: Option<WireUsage>,
    reported_model: Option<String>,
}

impl Acc {
    /// Takes in a chunk; returns the text it adds.
    fn absorb(&mut self, chunk: Chunk) -> Result<Option<String>, Failure> {
        if let Some(e) = chunk.error {
            let m = e
                .get("message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| e.to_string());
            return Err(Failure::Protocol(format!("upstream error in stream: {m}")));
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(u);
        }
        if let Some(m) = chunk.model.filter(|m| !m.is_empty()) {
            self.reported_model = Some(m);
        }
        let mut out = String::new();
        for choice in chunk.choices {
            if let Some(text) = choice.delta.and_then(|d| d.content) {
                out.push_str(&text);
            }
            if let Some(f) = choice.finish_reason.filter(|f| !f.is_empty()) {
                self.finish = Some(f);
            }
        }
        Ok((!out.is_empty()).then_some(out))
    }
}

/// A provider call that has produced its first token.
struct Started {
    provider: Arc<Provider>,
    upstream_model: String,
    stream: ChunkStream,
    acc: Acc,
    /// Text of the first chunk(s), not yet sent.
    first: Option<String>,
    /// When the winning attempt's request was sent.
    sent_at: Instant,
    /// When its first token arrived.
    first_at: Instant,
}

/// The provider and upstream model whose attempt is under way, if any (to
/// account a call cancelled before its first token).
#[derive(Debug, Default)]
struct InFlight(std::sync::Mutex<Option<(String, String)>>);

impl InFlight {
    fn set(&self, attempt: Option<(&str, &str)>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) =
            attempt.map(|(p, m)| (p.to_string(), m.to_string()));
    }
}

/// Ends a half-open probe that was dropped mid-flight.
struct ProbeGuard<'a> {
    breaker: &'a Breaker,
    armed: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.breaker.abandon_probe();
        }
    }
}

/// Largest delta [`coalesce`] builds.
const COALESCE_MAX: usize = 16 * 1024;
/// Most scheduling rounds [`gather`] waits for more chunks.
const GATHER_ROUNDS: usize = 64;

/// Appends to `text` the text of every chunk `stream` has ready now
/// (without waiting), up to [`COALESCE_MAX`]. Returns how the stream ended
/// if it did meanwhile: `Some(None)` cleanly, `Some(Some(f))` with a
/// failure; the text before the end is in `text` either way. `taken`
/// counts the chunks it consumed.
fn coalesce(
    stream: &mut ChunkStream,
    acc: &mut Acc,
    text: &mut String,
    taken: &mut usize,
) -> Option<Option<Failure>> {
    use futures::FutureExt as _;
    while text.len() < COALESCE_MAX {
        let next = stream.next().now_or_never()?;
        *taken += 1;
        match next {
            None => {
                return Some(acc.finish.is_none().then(|| {
                    Failure::Protocol("the stream ended without a finish reason".into())
                }));
            }
            Some(Err(e)) => return Some(Some(crate::upstream::classify(e))),
            Some(Ok(chunk)) => match acc.absorb(chunk) {
                Err(f) => return Some(Some(f)),
                Ok(Some(t)) => text.push_str(&t),
                Ok(None) => {}
            },
        }
    }
    None
}

/// [`coalesce`], letting the tasks that feed `stream` run in between: a
/// chunk crosses the upstream connection's task and the SSE parser's, one
/// at a time, so a burst that arrived in one read is only ready a chunk per
/// scheduling round. Gathers while rounds bring chunks (at most
/// [`GATHER_ROUNDS`], [`COALESCE_MAX`] bytes): a burst goes out as one
/// delta — one message and one write instead of one per token — while a
/// stream whose tokens come apart waits one round.
async fn gather(
    stream: &mut ChunkStream,
    acc: &mut Acc,
    text: &mut String,
) -> Option<Option<Failure>> {
    for round in 0..GATHER_ROUNDS {
        let mut taken = 0;
        if let Some(end) = coalesce(stream, acc, text, &mut taken) {
            return Some(end);
        }
        if (round > 0 && taken == 0) || text.len() >= COALESCE_MAX {
            break;
        }
        tokio::task::yield_now().await;
    }
    None
}

fn micros_cost(tokens: u64, price_per_million: u64) -> u64 {
    (tokens * price_per_million).div_ceil(1_000_000)
}

fn duration_pb(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// Full-jitter exponential back-off for attempt `n` (0-based).
fn backoff(base: Duration, cap: Duration, n: u32) -> Duration {
    let ceiling = base.saturating_mul(1u32 << n.min(16)).min(cap);
    let r = getrandom::u64().unwrap_or(0);
    Duration::from_nanos(r % (ceiling.as_nanos() as u64).max(1))
}

impl Gateway {
    /// Checks the caller's quotas and starts generating. The first message
    /// on the returned channel is a delta, a final event or the error that
    /// kept the generation from starting.
    pub async fn begin(
        self: &Arc<Self>,
        mut job: Job,
    ) -> Result<mpsc::Receiver<Result<Event, Status>>, LlmError> {
        let lease_for = self.lease_time(&job);
        // A limited budget reserves the call's worst case: its prompt and
        // every completion token it may ask for (counted once, kept for
        // the accounting).
        let estimate = if job.limits.tokens_per_day > 0 || job.limits.cost_micros_per_month > 0 {
            let prompt_tokens = match job.prompt_tokens {
                Some(n) => n,
                None => {
                    let turns = job.turns.clone();
                    prompt::off_workers(prompt::bytes(&turns), move || prompt::count_prompt(&turns))
                        .await
                }
            };
            job.prompt_tokens = Some(prompt_tokens);
            let prompt_tokens = prompt_tokens as u64;
            let completion = u64::from(job.max_tokens);
            Estimate {
                tokens: prompt_tokens + completion,
                cost_micros: micros_cost(prompt_tokens, job.model.prompt_price_per_million)
                    + micros_cost(completion, job.model.completion_price_per_million),
            }
        } else {
            Estimate::default()
        };
        let lease = self
            .limiter
            .acquire(job.user, &job.limits, lease_for, estimate)
            .await?;
        let (tx, rx) = mpsc::channel(32);
        let gw = self.clone();
        tokio::spawn(async move { gw.run(job, lease, tx).await });
        Ok(rx)
    }

    /// The longest a call of `job` may run (every attempt on every route,
    /// with the waits between retries): its lease must outlive it.
    fn lease_time(&self, job: &Job) -> Duration {
        let routes: Duration = job
            .model
            .parsed_routes(&job.alias)
            .filter_map(|(p, _)| self.providers.get(p))
            .map(|p| {
                let attempts = p.config.max_retries + 1;
                p.config.total_timeout * attempts + self.config.retry_max * p.config.max_retries
            })
            .sum();
        routes.max(Duration::from_secs(1)) + Duration::from_secs(5)
    }

    async fn run(self: Arc<Self>, job: Job, lease: Lease, tx: EventSender) {
        let t0 = job.received;
        let cache_key = job
            .cache
            .then(|| cache::key(&self.store, &job.alias, job.max_tokens, &job.turns));
        if let Some(key) = &cache_key
            && let Some(hit) = cache::get(&self.store, key).await
        {
            self.serve_cached(&job, &lease, hit, t0, &tx).await;
            return;
        }

        let in_flight = InFlight::default();
        let started = tokio::select! {
            biased;
            _ = tx.closed() => Err(None),
            r = self.start(&job, &in_flight) => r.map_err(Some),
        };
        let mut s = match started {
            Ok(s) => s,
            Err(Some(e)) => {
                let _ = tx.send(Err(e.into())).await;
                self.account(&job, &lease, Ending::Failed, None, 0, 0, false, None, t0)
                    .await;
                return;
            }
            Err(None) => {
                // Cancelled before the first token. A provider that had the
                // request may bill its prompt: record (and charge) that.
                let asked = in_flight.0.lock().unwrap_or_else(|p| p.into_inner()).take();
                let prompt_tokens = if asked.is_some() {
                    job.prompt_tokens() as u64
                } else {
                    0
                };
                self.account(
                    &job,
                    &lease,
                    Ending::Cancelled,
                    asked.as_ref().map(|(p, m)| (p.as_str(), m.as_str())),
                    prompt_tokens,
                    0,
                    true,
                    None,
                    t0,
                )
                .await;
                return;
            }
        };

        let mut ending = Ending::Ok;
        let mut failure: Option<Failure> = None;
        if !job.citations.is_empty()
            && tx
                .send(Ok(Event::Citations(job.citations.clone())))
                .await
                .is_err()
        {
            ending = Ending::Cancelled;
        }
        // The first delta goes out at once, with whatever else has arrived.
        let mut finished = None;
        if let Some(mut first) = s.first.take().filter(|_| ending == Ending::Ok) {
            finished = coalesce(&mut s.stream, &mut s.acc, &mut first, &mut 0);
            s.acc.text.push_str(&first);
            if tx.send(Ok(Event::Delta(first))).await.is_err() {
                ending = Ending::Cancelled;
            }
        }
        let ended = finished.is_some();
        if let Some(f) = finished {
            failure = f;
        }
        // The provider's total_timeout runs from its request (so it covers
        // the wait for the first token too); the caller's own deadline may
        // be shorter.
        let by_provider = s.sent_at + s.provider.config.total_timeout;
        let total_deadline = match job.total_deadline {
            Some(d) => d.min(by_provider),
            None => by_provider,
        };
        while ending == Ending::Ok && !ended {
            let next = tokio::select! {
                biased;
                _ = tx.closed() => {
                    ending = Ending::Cancelled;
                    break;
                }
                n = tokio::time::timeout_at(total_deadline.into(), s.stream.next()) => n,
            };
            match next {
                Err(_) => {
                    failure = Some(Failure::Deadline);
                    break;
                }
                Ok(None) => {
                    if s.acc.finish.is_none() {
                        failure = Some(Failure::Protocol(
                            "the stream ended without a finish reason".into(),
                        ));
                    }
                    break;
                }
                Ok(Some(Err(e))) => {
                    failure = Some(crate::upstream::classify(e));
                    break;
                }
                Ok(Some(Ok(chunk))) => match s.acc.absorb(chunk) {
                    Err(f) => {
                        failure = Some(f);
                        break;
                    }
                    Ok(text) => {
                        // Chunks that have already arrived go out as one
                        // delta: one message (and one write) instead of many.
                        let mut text = text.unwrap_or_default();
                        let end = gather(&mut s.stream, &mut s.acc, &mut text).await;
                        if !text.is_empty() {
                            s.acc.text.push_str(&text);
                            if tx.send(Ok(Event::Delta(text))).await.is_err() {
                                ending = Ending::Cancelled;
                            }
                        }
                        if let Some(f) = end {
                            failure = f;
                            break;
                        }
                    }
                },
            }
        }
        // Dropping the stream closes the upstream connection at once.
        drop(s.stream);
        if failure.is_some() {
            ending = Ending::Failed;
        }

        let (prompt_tokens, completion_tokens, estimated) = match s.acc.usage {
            Some(u) => (u.prompt_tokens as u64, u.completion_tokens as u64, false),
            None => (
                job.prompt_tokens() as u64,
                prompt::count_text(&s.acc.text) as u64,
                true,
            ),
        };
        let cost = micros_cost(prompt_tokens, job.model.prompt_price_per_million)
            + micros_cost(completion_tokens, job.model.completion_price_per_million);
        let usage = pb::Usage {
            prompt_tokens: prompt_tokens as i32,
            completion_tokens: completion_tokens as i32,
            estimated,
            cost_micros: cost as i64,
        };
        let provider = s.provider.name.clone();
        let upstream_model = s
            .acc
            .reported_model
            .clone()
            .unwrap_or(s.upstream_model.clone());
        let outcome = match (&failure, ending) {
            (Some(f), _) => f.reason(),
            (None, Ending::Cancelled) => "cancelled",
            _ => "ok",
        };
        self.metrics
            .upstream
            .with_label_values(&[provider.as_str(), outcome])
            .observe(s.sent_at.elapsed().as_secs_f64());
        match &failure {
            Some(f) => {
                tracing::warn!(provider = %provider, error = %f, "upstream stream failed after its first token");
                // The caller's own deadline running out is not the
                // provider's fault.
                let callers_deadline =
                    matches!(f, Failure::Deadline) && total_deadline < by_provider;
                if !callers_deadline {
                    s.provider.breaker.failure();
                }
                let code = if matches!(f, Failure::Deadline) {
                    Code::DeadlineExceeded
                } else {
                    Code::Unavailable
                };
                let _ = tx
                    .send(Ok(Event::Failed(pb::Failed {
                        code: code as i32,
                        message: format!("provider {provider} failed mid-stream: {f}"),
                        usage: Some(usage),
                    })))
                    .await;
            }
            None if ending == Ending::Ok => {
                let finish = s.acc.finish.clone().unwrap_or_else(|| "stop".into());
                let _ = tx
                    .send(Ok(Event::Completed(pb::Completed {
                        usage: Some(usage),
                        finish_reason: finish.clone(),
                        provider: provider.clone(),
                        upstream_model: upstream_model.clone(),
                        time_to_first_token: Some(duration_pb(s.first_at - t0)),
                        duration: Some(duration_pb(t0.elapsed())),
                        cached: false,
                    })))
                    .await;
                if let Some(key) = &cache_key {
                    let value = Cached {
                        text: std::mem::take(&mut s.acc.text),
                        finish_reason: finish,
                        provider: provider.clone(),
                        upstream_model: upstream_model.clone(),
                        prompt_tokens: prompt_tokens as u32,
                        completion_tokens: completion_tokens as u32,
                    };
                    cache::put(&self.store, key, &value, self.config.cache_ttl).await;
                }
            }
            None => {}
        }
        // The caller's next call is admitted only once this one's lease is
        // given back, though the stream ends before Redis confirms it.
        let settling = self.limiter.settling(job.user).await;
        drop(tx);
        self.metrics
            .tokens
            .with_label_values(&[provider.as_str(), "prompt"])
            .inc_by(prompt_tokens);
        self.metrics
            .tokens
            .with_label_values(&[provider.as_str(), "completion"])
            .inc_by(completion_tokens);
        self.metrics
            .cost
            .with_label_values(&[provider.as_str()])
            .inc_by(cost);
        self.account(
            &job,
            &lease,
            ending,
            Some((&provider, &upstream_model)),
            prompt_tokens,
            completion_tokens,
            estimated,
            Some(s.first_at - t0),
            t0,
        )
        .await;
        drop(settling);
    }

    /// Answers from the cache: one delta and a final event marked cached,
    /// billed nothing.
    async fn serve_cached(
        &self,
        job: &Job,
        lease: &Lease,
        hit: Cached,
        t0: Instant,
        tx: &EventSender,
    ) {
        let usage = pb::Usage {
            prompt_tokens: hit.prompt_tokens as i32,
            completion_tokens: hit.completion_tokens as i32,
            estimated: false,
            cost_micros: 0,
        };
        let mut ok = true;
        if !job.citations.is_empty() {
            ok = tx
                .send(Ok(Event::Citations(job.citations.clone())))
                .await
                .is_ok();
        }
        if ok && !hit.text.is_empty() {
            ok = tx.send(Ok(Event::Delta(hit.text.clone()))).await.is_ok();
        }
        if ok {
            let _ = tx
                .send(Ok(Event::Completed(pb::Completed {
                    usage: Some(usage),
                    finish_reason: hit.finish_reason.clone(),
                    provider: hit.provider.clone(),
                    upstream_model: hit.upstream_model.clone(),
                    time_to_first_token: Some(duration_pb(t0.elapsed())),
                    duration: Some(duration_pb(t0.elapsed())),
                    cached: true,
                })))
                .await;
        }
        let row = self.row(
            job,
            if ok { Ending::Ok } else { Ending::Cancelled },
            Some((&hit.provider, &hit.upstream_model)),
            0,
            0,
            false,
            None,
            t0,
            true,
        );
        self.recorder.record(row).await;
        if let Err(e) = self.limiter.settle(lease, 0, 0).await {
            tracing::warn!(error = %e, "could not release a stream lease");
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn row(
        &self,
        job: &Job,
        ending: Ending,
        served_by: Option<(&str, &str)>,
        prompt_tokens: u64,
        completion_tokens: u64,
        estimated: bool,
        ttft: Option<Duration>,
        t0: Instant,
        cached: bool,
    ) -> UsageRow {
        let cost = if cached {
            0
        } else {
            micros_cost(prompt_tokens, job.model.prompt_price_per_million)
                + micros_cost(completion_tokens, job.model.completion_price_per_million)
        };
        UsageRow {
            id: Uuid::now_v7(),
            user_id: job.user,
            model: job.alias.clone(),
            provider: served_by.map(|s| s.0.to_string()).unwrap_or_default(),
            upstream_model: served_by.map(|s| s.1.to_string()).unwrap_or_default(),
            prompt_tokens: prompt_tokens.min(i32::MAX as u64) as i32,
            completion_tokens: completion_tokens.min(i32::MAX as u64) as i32,
            estimated,
            cost_micros: cost as i64,
            ttft_ms: ttft.map(|d| d.as_millis().min(i32::MAX as u128) as i32),
            duration_ms: t0.elapsed().as_millis().min(i32::MAX as u128) as i32,
            status: ending.as_str().to_string(),
            cached,
            request_id: job.request_id.clone(),
            created_at: chrono::Utc::now(),
        }
    }

    /// Records the call, charges its tokens and cost to the caller's
    /// quotas and gives the stream lease back.
    #[allow(clippy::too_many_arguments)]
    async fn account(
        &self,
        job: &Job,
        lease: &Lease,
        ending: Ending,
        served_by: Option<(&str, &str)>,
        prompt_tokens: u64,
        completion_tokens: u64,
        estimated: bool,
        ttft: Option<Duration>,
        t0: Instant,
    ) {
        let row = self.row(
            job,
            ending,
            served_by,
            prompt_tokens,
            completion_tokens,
            estimated,
            ttft,
            t0,
            false,
        );
        let cost = row.cost_micros as u64;
        self.recorder.record(row).await;
        let tokens = prompt_tokens + completion_tokens;
        if let Err(e) = self.limiter.settle(lease, tokens, cost).await {
            tracing::warn!(error = %e, "could not charge quotas or release a stream lease");
        }
    }

    /// Tries the model's providers in order until one produces a first
    /// token.
    async fn start(&self, job: &Job, in_flight: &InFlight) -> Result<Started, LlmError> {
        let mut failures: Vec<String> = Vec::new();
        let mut skipped: Vec<&str> = Vec::new();
        let mut last: Option<Failure> = None;
        // When trying again may help: the soonest `Retry-After` of the
        // providers that refused, or the soonest end of an open breaker.
        let mut retry_hint: Option<Duration> = None;
        let mut hint = |d: Duration| {
            retry_hint = Some(retry_hint.map_or(d, |h: Duration| h.min(d)));
        };
        for (name, upstream_model) in job.model.parsed_routes(&job.alias) {
            let Some(provider) = self.providers.get(name) else {
                continue;
            };
            let Some(admit) = provider.breaker.admit() else {
                skipped.push(name);
                // Half-open: a probe is under way and decides soon.
                hint(
                    provider
                        .breaker
                        .retry_in()
                        .unwrap_or(Duration::from_secs(1)),
                );
                continue;
            };
            let mut guard = ProbeGuard {
                breaker: &provider.breaker,
                armed: admit.probe,
            };
            let retries = if admit.probe {
                0
            } else {
                provider.config.max_retries
            };
            let request = crate::upstream::ChatRequest {
                model: upstream_model.to_string(),
                messages: job.turns.clone(),
                max_tokens: Some(job.max_tokens),
                temperature: job.temperature,
                stream: true,
                stream_options: provider.stream_options(),
            };
            let mut attempt = 0;
            loop {
                in_flight.set(Some((name, upstream_model)));
                let sent_at = Instant::now();
                // `total_timeout` bounds the whole attempt, its wait for
                // the first token included.
                let provider_first = sent_at
                    + provider
                        .config
                        .first_token_timeout
                        .min(provider.config.total_timeout);
                let first_deadline = provider_first.min(job.first_deadline);
                let result = tokio::time::timeout_at(first_deadline.into(), async {
                    let mut stream = provider.open(&request).await?;
                    let mut acc = Acc::default();
                    loop {
                        match stream.next().await {
                            Some(Ok(chunk)) => {
                                let text = acc.absorb(chunk)?;
                                if text.is_some() || acc.finish.is_some() {
                                    return Ok((stream, acc, text));
                                }
                            }
                            Some(Err(e)) => return Err(crate::upstream::classify(e)),
                            None => {
                                return Err(Failure::Protocol(
                                    "the stream ended before any token".into(),
                                ));
                            }
                        }
                    }
                })
                .await;
                in_flight.set(None);
                let failure = match result {
                    Ok(Ok((stream, acc, first))) => {
                        let first_at = Instant::now();
                        // The metric is the provider's own (this attempt);
                        // the caller's TTFT counts from the RPC.
                        let ttft = first_at - sent_at;
                        provider.breaker.success();
                        guard.armed = false;
                        self.metrics
                            .ttft
                            .with_label_values(&[name])
                            .observe(ttft.as_secs_f64());
                        return Ok(Started {
                            provider: provider.clone(),
                            upstream_model: upstream_model.to_string(),
                            stream,
                            acc,
                            first,
                            sent_at,
                            first_at,
                        });
                    }
                    Ok(Err(f)) => f,
                    Err(_) if provider_first <= job.first_deadline => Failure::FirstTokenTimeout,
                    Err(_) => Failure::Deadline,
                };
                self.metrics
                    .upstream
                    .with_label_values(&[name, failure.reason()])
                    .observe(sent_at.elapsed().as_secs_f64());
                tracing::info!(provider = name, attempt, error = %failure, "upstream attempt failed");
                if failure.is_rejection() {
                    // The request itself is at fault, not the provider.
                    guard.armed = false;
                    if admit.probe {
                        provider.breaker.success();
                    }
                    return Err(LlmError::Rejected(format!(
                        "the provider refused the request: {failure}"
                    )));
                }
                if matches!(failure, Failure::Deadline) {
                    guard.armed = false;
                    if admit.probe {
                        provider.breaker.abandon_probe();
                    }
                    return Err(LlmError::Deadline(format!(
                        "no answer from model {} before the deadline",
                        job.alias
                    )));
                }
                // Retry here (with back-off, or as Retry-After says) while
                // allowed and time remains; otherwise fail over.
                let wait = match &failure {
                    Failure::Status {
                        retry_after: Some(ra),
                        ..
                    } => (*ra <= self.config.retry_max).then_some(*ra),
                    _ => Some(backoff(
                        self.config.retry_base,
                        self.config.retry_max,
                        attempt,
                    )),
                };
                let fits = |w: Duration| Instant::now() + w < job.first_deadline;
                if failure.retryable_here()
                    && attempt < retries
                    && let Some(w) = wait.filter(|w| fits(*w))
                {
                    attempt += 1;
                    tokio::time::sleep(w).await;
                    continue;
                }
                provider.breaker.failure();
                guard.armed = false;
                self.metrics
                    .failovers
                    .with_label_values(&[name, failure.reason()])
                    .inc();
                failures.push(format!("{name}: {failure}"));
                if let Failure::Status {
                    retry_after: Some(ra),
                    ..
                } = &failure
                {
                    hint(*ra);
                }
                last = Some(failure);
                break;
            }
        }
        // RetryInfo never asks for less than a second.
        let retry_hint = retry_hint.map(|h| h.max(Duration::from_secs(1)));
        if failures.is_empty() && !skipped.is_empty() {
            let retry_after = retry_hint.unwrap_or(self.config.breaker_cooldown);
            return Err(LlmError::UnavailableFor {
                message: format!(
                    "every provider of model {} is failing (circuit open: {}); retry in {}s",
                    job.alias,
                    skipped.join(", "),
                    retry_after.as_secs_f64().ceil() as u64
                ),
                retry_after,
            });
        }
        if matches!(last, Some(Failure::FirstTokenTimeout))
            && failures.len() == 1
            && skipped.is_empty()
        {
            return Err(LlmError::Deadline(format!(
                "model {}: {}",
                job.alias,
                failures.join("; ")
            )));
        }
        let mut msg = format!(
            "no provider could answer for model {}: {}",
            job.alias,
            failures.join("; ")
        );
        if !skipped.is_empty() {
            msg.push_str(&format!(" (circuit open: {})", skipped.join(", ")));
        }
        Err(match retry_hint {
            Some(retry_after) => LlmError::UnavailableFor {
                message: msg,
                retry_after,
            },
            None => LlmError::Unavailable(msg),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_rounds_up_to_a_micro_dollar() {
        assert_eq!(micros_cost(0, 1_000_000), 0);
        assert_eq!(micros_cost(1, 1), 1);
        assert_eq!(micros_cost(1_000_000, 150_000), 150_000);
        assert_eq!(micros_cost(1500, 2_500_000), 3750);
    }

    #[test]
    fn backoff_stays_under_its_ceiling() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(1);
        for n in 0..20 {
            let b = backoff(base, cap, n);
            assert!(b <= base.saturating_mul(1 << n.min(16)).min(cap));
        }
    }
}
