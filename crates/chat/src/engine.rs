//! Turns and their generation. A turn stores the user message and a
//! STREAMING reply, then a detached task generates the reply through
//! LlmService (a real mesh hop with the caller's identity): it publishes
//! every event locally and across replicas, writes the content as it grows
//! (every `chat.flush_interval`), and finalises the reply COMPLETED,
//! CANCELLED, FAILED or INTERRUPTED — whether or not anyone still listens.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch};
use tonic::Code;
use trellis_core::ServiceName;
use trellis_core::config::ChatConfig;
use trellis_mesh::{CallContext, MeshClients};
use trellis_proto::chat::v1 as pb;
use trellis_proto::llm::v1 as lpb;
use trellis_proto::llm::v1::llm_service_client::LlmServiceClient;
use trellis_store::Store;
use uuid::Uuid;

use crate::error::ChatError;
use crate::live::{Fanout, Hub, Live, Registry, Stop};
use crate::messages::{self, Ending, Inserted, MessageRow};
use crate::metrics::ChatMetrics;
use crate::prefs::Prefs;
use crate::sessions::{self, SessionRow};

/// What starting a turn produced.
#[derive(Debug)]
pub enum TurnStart {
    /// A new reply; `rx` was subscribed before it began.
    New {
        accepted: pb::Accepted,
        live: Arc<Live>,
        rx: broadcast::Receiver<pb::ChatEvent>,
    },
    /// The client message id was seen before: the original turn.
    Duplicate { accepted: pb::Accepted },
}

/// A turn as asked for.
#[derive(Debug, Clone, Default)]
pub struct TurnRequest {
    pub content: String,
    pub client_message_id: Option<String>,
    pub model: Option<String>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<i32>,
    /// Regenerate: answer this existing user message again.
    pub regenerate: Option<MessageRow>,
}

#[derive(Debug)]
pub struct Engine {
    pub cfg: ChatConfig,
    pub store: Store,
    pub clients: MeshClients,
    pub registry: Arc<Registry>,
    pub fanout: Fanout,
    /// This process's shared pub/sub connection (watchers, cancels).
    pub hub: Arc<Hub>,
    pub prefs: Prefs,
    pub metrics: ChatMetrics,
    pub shutting_down: watch::Receiver<bool>,
}

/// Everything the generation task needs.
struct Job {
    ctx: CallContext,
    user: Uuid,
    session: SessionRow,
    user_message: Uuid,
    reply: Uuid,
    client_message_id: String,
    model: String,
    /// The conversation to send, when the turn's insert fetched it.
    history: Option<Vec<lpb::Message>>,
    temperature: Option<f32>,
    max_tokens: Option<i32>,
}

fn duration_pb(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// Why a generation ended before its model did.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// Cancelled, or interrupted by shutdown.
    Stopped(Option<Stop>),
    /// The client's deadline passed.
    Deadline,
}

impl Cut {
    fn record(self, ending: &mut Ending, code: &mut Code) {
        match self {
            Cut::Stopped(Some(Stop::Cancel)) => ending.status = messages::CANCELLED,
            Cut::Stopped(_) => ending.status = messages::INTERRUPTED,
            Cut::Deadline => {
                ending.status = messages::FAILED;
                *code = Code::DeadlineExceeded;
                ending.error = "the request's deadline passed while the reply was generated; \
                                the partial reply is kept"
                    .into();
            }
        }
    }
}

/// Runs one phase of a generation unless a stop or the deadline comes first.
async fn unless_cut<F: Future>(
    stop: &mut watch::Receiver<Option<Stop>>,
    expired: std::pin::Pin<&mut impl Future<Output = ()>>,
    phase: F,
) -> Result<F::Output, Cut> {
    tokio::select! {
        biased;
        _ = stop.changed() => Err(Cut::Stopped(*stop.borrow())),
        _ = expired => Err(Cut::Deadline),
        out = phase => Ok(out),
    }
}

/// The RetryInfo delay a status carries, if any.
pub fn retry_delay(s: &tonic::Status) -> Option<prost_types::Duration> {
    use tonic_types::StatusExt;
    s.get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .map(duration_pb)
}

fn role_pb(role: &str) -> i32 {
    if role == "user" {
        lpb::Role::User as i32
    } else {
        lpb::Role::Assistant as i32
    }
}

fn expired() -> ChatError {
    ChatError::Precondition("the session has expired and is read-only; start a new one".into())
}

fn event(e: pb::chat_event::Event) -> pb::ChatEvent {
    pb::ChatEvent { event: Some(e) }
}

impl Engine {
    fn refuse_if_shutting_down(&self) -> Result<(), ChatError> {
        if *self.shutting_down.borrow() {
            return Err(ChatError::Upstream(tonic::Status::unavailable(
                "the server is shutting down; retry on another replica",
            )));
        }
        Ok(())
    }

    /// Starts a new turn in the caller's session `session_id`: the session
    /// read, the turn's insert and the history go to PostgreSQL in one
    /// round trip ([`messages::open_turn`]).
    pub async fn start_new(
        self: &Arc<Self>,
        ctx: CallContext,
        user: Uuid,
        session_id: Uuid,
        t: TurnRequest,
    ) -> Result<TurnStart, ChatError> {
        self.refuse_if_shutting_down()?;
        let conn = self.store.pg().await?;
        let opened = messages::open_turn(
            &conn,
            session_id,
            user,
            &t.content,
            t.client_message_id.as_deref(),
            t.model.as_deref(),
            self.cfg.retention,
            self.cfg.history_messages,
        )
        .await?;
        drop(conn);
        let session = opened.session.ok_or(ChatError::NotFound)?;
        let Some(inserted) = opened.inserted else {
            // The session is the caller's but too old to take a turn.
            return Err(expired());
        };
        let history = opened
            .history
            .into_iter()
            .map(|m| lpb::Message {
                role: role_pb(&m.role),
                content: m.content,
            })
            .collect();
        self.launch(ctx, user, session, t, inserted, Some(history))
    }

    /// Starts a turn in `session` for `user` (the session's owner): a
    /// regeneration of `t.regenerate`, or a new turn.
    pub async fn start(
        self: &Arc<Self>,
        ctx: CallContext,
        user: Uuid,
        session: SessionRow,
        t: TurnRequest,
    ) -> Result<TurnStart, ChatError> {
        self.refuse_if_shutting_down()?;
        if sessions::status(&self.cfg, session.last_activity_at) == pb::SessionStatus::Expired {
            return Err(expired());
        }
        let model = t.model.clone().unwrap_or_else(|| session.model.clone());
        let mut conn = self.store.pg().await?;
        let inserted = messages::insert_turn(
            &mut conn,
            session.id,
            user,
            &t.content,
            t.client_message_id.as_deref(),
            &model,
            t.regenerate.as_ref().map(|m| m.id),
        )
        .await?;
        drop(conn);
        self.launch(ctx, user, session, t, inserted, None)
    }

    /// Announces a stored turn and starts generating its reply; `history`
    /// is the context when the turn's insert fetched it already.
    fn launch(
        self: &Arc<Self>,
        ctx: CallContext,
        user: Uuid,
        session: SessionRow,
        t: TurnRequest,
        inserted: Inserted,
        history: Option<Vec<lpb::Message>>,
    ) -> Result<TurnStart, ChatError> {
        let model = t.model.clone().unwrap_or_else(|| session.model.clone());
        let cid = t.client_message_id.clone().unwrap_or_default();
        let (user_message, reply) = match inserted {
            Inserted::Duplicate { user, assistant } => {
                return Ok(TurnStart::Duplicate {
                    accepted: pb::Accepted {
                        session_id: session.id.to_string(),
                        user_message_id: user.to_string(),
                        assistant_message_id: assistant.map(|a| a.to_string()).unwrap_or_default(),
                        client_message_id: cid,
                        duplicate: true,
                    },
                });
            }
            Inserted::New { user, assistant } => (user, assistant),
        };
        let (live, rx) = self.registry.add(reply, self.cfg.stream_buffer * 4);
        let accepted = pb::Accepted {
            session_id: session.id.to_string(),
            user_message_id: user_message.to_string(),
            assistant_message_id: reply.to_string(),
            client_message_id: cid.clone(),
            duplicate: false,
        };
        let job = Job {
            // A deadline the client set bounds the reply; none otherwise
            // (replies outlive the request that started them).
            ctx,
            user,
            session,
            user_message,
            reply,
            client_message_id: cid,
            model,
            history,
            temperature: t.temperature,
            max_tokens: t.max_tokens,
        };
        let me = self.clone();
        let task_live = live.clone();
        self.metrics.generating.inc();
        let generating = self.metrics.generating.clone();
        tokio::spawn(async move {
            me.run(job, task_live).await;
            generating.dec();
        });
        Ok(TurnStart::New { accepted, live, rx })
    }

    /// Publishes `e` of reply `id` on every replica and here — here last:
    /// the task woken last runs next, so this replica's own listeners
    /// (the client's stream) go before the Redis publisher.
    async fn emit(&self, live: &Live, id: Uuid, e: pb::ChatEvent) {
        self.fanout.publish(id, &e).await;
        let _ = live.events.send(e);
    }

    async fn run(self: Arc<Self>, job: Job, live: Arc<Live>) {
        let t0 = Instant::now();
        let mut stop = live.stop.subscribe();
        // A stop asked for before this task subscribed still counts.
        if stop.borrow().is_some() {
            stop.mark_changed();
        }
        let mut ending = Ending {
            status: messages::FAILED,
            ..Default::default()
        };
        let mut code = Code::Unavailable;
        let mut retry: Option<prost_types::Duration> = None;
        let mut finish_reason = String::new();
        let mut ttft: Option<Duration> = None;
        let outcome = self
            .generate(
                &job,
                &live,
                &mut stop,
                &mut ending,
                &mut code,
                &mut retry,
                &mut finish_reason,
                &mut ttft,
            )
            .await;
        if let Err(e) = outcome {
            ending.status = messages::FAILED;
            let status: tonic::Status = e.into();
            code = status.code();
            retry = retry_delay(&status);
            ending.error = status.message().to_string();
        }
        ending.content = live.content();
        let duration = t0.elapsed();
        // What a replay of the finished reply needs.
        if ending.status == messages::CANCELLED {
            finish_reason = "cancelled".into();
        }
        ending.finish_reason = finish_reason.clone();
        ending.error_code = match ending.status {
            messages::COMPLETED | messages::CANCELLED => 0,
            _ => code as i32,
        };
        ending.time_to_first_token = ttft;
        ending.duration = Some(duration);
        if let Some(first) = ttft {
            self.metrics.ttft.observe(first.as_secs_f64());
            let after = duration.saturating_sub(first).as_secs_f64();
            if after > 0.0 && ending.completion_tokens > 0 {
                self.metrics
                    .tokens_per_second
                    .observe(f64::from(ending.completion_tokens) / after);
            }
        }
        // Stored first, then announced: a watcher that sees the final event
        // finds the final row.
        let mut stored = false;
        for attempt in 0..5 {
            match self.store.pg().await {
                Ok(mut conn) => match messages::finalize(&mut conn, job.reply, &ending).await {
                    Ok(true) => {
                        stored = true;
                        break;
                    }
                    Ok(false) => {
                        tracing::info!(reply = %job.reply, "the reply was deleted while it was generated");
                        stored = true;
                        break;
                    }
                    Err(e) => tracing::warn!(error = %e, attempt, "could not finalise a reply"),
                },
                Err(e) => tracing::warn!(error = %e, attempt, "could not finalise a reply"),
            }
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
        if !stored {
            tracing::error!(reply = %job.reply, "reply left STREAMING; the sweeper will mark it INTERRUPTED once its heartbeat stops");
        }
        let usage = pb::Usage {
            prompt_tokens: ending.prompt_tokens,
            completion_tokens: ending.completion_tokens,
            cost_micros: ending.cost_micros,
        };
        let last = match ending.status {
            messages::COMPLETED | messages::CANCELLED => {
                pb::chat_event::Event::Completed(pb::Completed {
                    message_id: job.reply.to_string(),
                    status: messages::status_pb(ending.status) as i32,
                    usage: Some(usage),
                    finish_reason,
                    time_to_first_token: ttft.map(duration_pb),
                    duration: Some(duration_pb(duration)),
                })
            }
            _ => pb::chat_event::Event::Failed(pb::Failed {
                message_id: job.reply.to_string(),
                client_message_id: job.client_message_id.clone(),
                code: code as i32,
                message: ending.error.clone(),
                status: messages::status_pb(ending.status) as i32,
                retry_delay: retry,
            }),
        };
        self.emit(&live, job.reply, event(last)).await;
        self.registry.remove(job.reply);
    }

    #[allow(clippy::too_many_arguments)]
    async fn generate(
        &self,
        job: &Job,
        live: &Live,
        stop: &mut watch::Receiver<Option<Stop>>,
        ending: &mut Ending,
        code: &mut Code,
        retry: &mut Option<prost_types::Duration>,
        finish_reason: &mut String,
        ttft: &mut Option<Duration>,
    ) -> Result<(), ChatError> {
        let t0 = Instant::now();
        // The conversation so far, the session's instructions and the
        // user's preferences.
        let history = match &job.history {
            Some(h) => h.clone(),
            None => {
                let mut conn = self.store.pg().await?;
                messages::history(
                    &mut conn,
                    job.session.id,
                    job.user_message,
                    self.cfg.history_messages,
                )
                .await?
                .ok_or(ChatError::NotFound)?
                .into_iter()
                .map(|m| lpb::Message {
                    role: role_pb(&m.role),
                    content: m.content,
                })
                .collect()
            }
        };
        // The client's deadline, if it set one, ends the reply FAILED with
        // DEADLINE_EXCEEDED (its content so far kept).
        let deadline = job.ctx.deadline;
        let expired = async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expired);
        let mut system = job.session.system_prompt.clone();
        // Bounded by chat.preferences_timeout; a cancel or shutdown does not
        // wait for it.
        let prefs =
            match unless_cut(stop, expired.as_mut(), self.prefs.line(&job.ctx, job.user)).await {
                Ok(line) => line,
                Err(cut) => {
                    cut.record(ending, code);
                    return Ok(());
                }
            };
        if let Some(line) = prefs {
            if !system.is_empty() {
                system.push_str("\n\n");
            }
            system.push_str(&line);
        }
        let params = lpb::GenerateParams {
            model: job.model.clone(),
            system_prompt: system,
            messages: history,
            max_tokens: job.max_tokens.unwrap_or(0),
            temperature: job.temperature,
            retrieval: job.session.retrieval.then(|| lpb::RetrievalOptions {
                top_k: 5,
                ..Default::default()
            }),
            cache: false,
        };
        let mut client = self
            .clients
            .client(ServiceName::Llm, &job.ctx, LlmServiceClient::new)
            .map_err(ChatError::Upstream)?;
        ending.provider.clear();
        let request = client.generate_stream(lpb::GenerateStreamRequest {
            params: Some(params),
        });
        let opened = match unless_cut(stop, expired.as_mut(), request).await {
            Ok(r) => r,
            Err(cut) => {
                cut.record(ending, code);
                return Ok(());
            }
        };
        let passed = || deadline.is_some_and(|d| Instant::now() >= d);
        let mut stream = match opened {
            Ok(r) => r.into_inner(),
            Err(_) if passed() => {
                Cut::Deadline.record(ending, code);
                return Ok(());
            }
            Err(s) => {
                *code = s.code();
                *retry = retry_delay(&s);
                ending.status = messages::FAILED;
                ending.error = s.message().to_string();
                return Ok(());
            }
        };
        let mut flush = tokio::time::interval(self.cfg.flush_interval);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut dirty = false;
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => {
                    Cut::Stopped(*stop.borrow()).record(ending, code);
                    break;
                }
                _ = &mut expired => {
                    Cut::Deadline.record(ending, code);
                    break;
                }
                _ = flush.tick(), if dirty => {
                    dirty = false;
                    let content = live.content();
                    match self.store.pg().await {
                        Ok(mut conn) => {
                            if let Err(e) = messages::flush(&mut conn, job.reply, &content).await {
                                tracing::warn!(error = %e, "could not store a reply's progress");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "could not store a reply's progress"),
                    }
                }
                msg = stream.message() => match msg {
                    Ok(Some(resp)) => match resp.event {
                        Some(lpb::generate_stream_response::Event::Citations(c)) => {
                            ending.citations = c
                                .citations
                                .into_iter()
                                .map(|c| pb::Citation {
                                    document_id: c.document_id,
                                    title: c.title,
                                    snippet: c.snippet,
                                })
                                .collect();
                            // Stored at once, so a watcher joining
                            // mid-reply gets them too.
                            match self.store.pg().await {
                                Ok(mut conn) => {
                                    if let Err(e) = messages::store_citations(&mut conn, job.reply, &ending.citations).await {
                                        tracing::warn!(error = %e, "could not store a reply's citations");
                                    }
                                }
                                Err(e) => tracing::warn!(error = %e, "could not store a reply's citations"),
                            }
                            self.emit(live, job.reply, event(pb::chat_event::Event::Citations(pb::Citations {
                                message_id: job.reply.to_string(),
                                citations: ending.citations.clone(),
                            })))
                            .await;
                        }
                        Some(lpb::generate_stream_response::Event::Delta(text)) => {
                            ttft.get_or_insert_with(|| t0.elapsed());
                            let offset = {
                                let mut c = live.content.lock().unwrap_or_else(|p| p.into_inner());
                                let offset = c.len();
                                c.push_str(&text);
                                offset
                            };
                            dirty = true;
                            self.emit(live, job.reply, event(pb::chat_event::Event::Delta(pb::Delta {
                                message_id: job.reply.to_string(),
                                text,
                                offset: offset as i64,
                            })))
                            .await;
                        }
                        Some(lpb::generate_stream_response::Event::Completed(c)) => {
                            ending.status = messages::COMPLETED;
                            ending.provider = c.provider;
                            *finish_reason = c.finish_reason;
                            if let Some(u) = c.usage {
                                ending.prompt_tokens = u.prompt_tokens;
                                ending.completion_tokens = u.completion_tokens;
                                ending.cost_micros = u.cost_micros;
                            }
                            break;
                        }
                        Some(lpb::generate_stream_response::Event::Failed(f)) => {
                            ending.status = messages::FAILED;
                            *code = Code::from(f.code);
                            ending.error = f.message;
                            if let Some(u) = f.usage {
                                ending.prompt_tokens = u.prompt_tokens;
                                ending.completion_tokens = u.completion_tokens;
                                ending.cost_micros = u.cost_micros;
                            }
                            break;
                        }
                        None => {}
                    },
                    Ok(None) => {
                        ending.status = messages::FAILED;
                        ending.error = "the model stream ended without a result".into();
                        break;
                    }
                    Err(_) if passed() => {
                        Cut::Deadline.record(ending, code);
                        break;
                    }
                    Err(s) => {
                        ending.status = messages::FAILED;
                        *code = s.code();
                        ending.error = s.message().to_string();
                        break;
                    }
                },
            }
        }
        // Dropping the stream cancels the call: the gateway stops the
        // provider at once.
        drop(stream);
        Ok(())
    }
}
