//! `trellis.chat.v1.ChatService`: validation at the edge, ownership (another
//! user's session or message is NOT_FOUND), and the streams — Converse
//! (many turns, bidirectional), its browser twin SendMessage, Regenerate
//! and Watch — on top of the [`Engine`].

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::AsciiMetadataValue;
use tonic::{Request, Response, Status, Streaming};
use trellis_core::config::{ChatConfig, LlmConfig};
use trellis_core::error::FieldViolations;
use trellis_core::page::PageTokens;
use trellis_core::text;
use trellis_mesh::{Authenticator, CallContext, MeshClients, Principal, authenticated};
use trellis_proto::chat::v1 as pb;
use trellis_proto::chat::v1::chat_event::Event as Ev;
use trellis_proto::chat::v1::chat_service_server::{ChatService, ChatServiceServer};
use trellis_store::Store;
use uuid::Uuid;

use crate::engine::{Engine, TurnRequest, TurnStart};
use crate::error::ChatError;
use crate::live::{Fanout, Hub, Live, Registry, Stop};
use crate::messages::{self, MessageRow};
use crate::metrics::{ChatMetrics, StreamGuard};
use crate::prefs::Prefs;
use crate::sessions::{self, NewSession};

/// The violations of [`text::is_single_line`] and [`text::is_clean_text`].
const SINGLE_LINE: &str = "must not contain control characters";
const CLEAN_TEXT: &str = "must not contain control characters other than tabs and line breaks";

pub const SESSIONS: &str = "chat:sessions:write";
pub const READ: &str = "chat:sessions:read";
pub const SEND: &str = "chat:messages:send";

/// Verifies the credentials a Converse stream acts with, on every action.
#[derive(Clone)]
struct Verifier(Arc<dyn Authenticator>);

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier")
    }
}

#[derive(Clone, Debug)]
pub struct ChatSvc {
    engine: Arc<Engine>,
    verifier: Verifier,
    pages: PageTokens,
    /// Known model aliases (empty when the gateway's models are unknown here).
    models: BTreeSet<String>,
    default_model: String,
}

/// What [`service`] builds: the server, its metrics, tasks to stop with
/// the server, the drain hook, and a task that ends once every reply in
/// progress here is finalised (await it after the server stops).
pub struct Built {
    pub server: ChatServiceServer<ChatSvc>,
    pub collectors: Vec<Box<dyn prometheus::core::Collector>>,
    pub background: Vec<JoinHandle<()>>,
    pub drain: watch::Sender<bool>,
    pub finishing: JoinHandle<()>,
}

impl std::fmt::Debug for Built {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Built").finish_non_exhaustive()
    }
}

#[allow(clippy::too_many_arguments)]
pub fn service(
    cfg: &ChatConfig,
    llm: &LlmConfig,
    max_message_bytes: usize,
    drain_timeout: Duration,
    store: Store,
    clients: MeshClients,
    pages: PageTokens,
    authenticator: Arc<dyn Authenticator>,
) -> Built {
    let registry = Arc::new(Registry::default());
    let fanout = Fanout::new(store.clone());
    let hub = Hub::new(fanout.clone(), registry.clone(), cfg.stream_buffer);
    let metrics = ChatMetrics::new();
    let (drain, shutting_down) = watch::channel(false);
    let engine = Arc::new(Engine {
        cfg: cfg.clone(),
        store: store.clone(),
        clients: clients.clone(),
        registry: registry.clone(),
        fanout: fanout.clone(),
        hub: hub.clone(),
        prefs: Prefs::new(clients, cfg.preferences_ttl, cfg.preferences_timeout),
        metrics: metrics.clone(),
        shutting_down: shutting_down.clone(),
    });
    let mut background = Vec::new();
    if store.has_redis() {
        background.push(hub.spawn());
    }
    // Replies generating here are marked alive every quarter of
    // `stale_after`, whatever phase they are in (waiting for a first token
    // writes nothing else).
    let heartbeat = {
        let engine = engine.clone();
        let every = cfg.stale_after / 4;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let ids = engine.registry.ids();
                if ids.is_empty() {
                    continue;
                }
                let beat = match engine.store.pg().await {
                    Ok(mut conn) => messages::heartbeat(&mut conn, &ids).await,
                    Err(e) => Err(e.into()),
                };
                if let Err(e) = beat {
                    tracing::warn!(error = %e, "could not mark replies in progress alive");
                }
            }
        })
    };
    background.push(heartbeat);
    // Replies whose replica is gone (no heartbeat for `stale_after`) become
    // INTERRUPTED, on whichever replica notices first.
    let sweeper = {
        let engine = engine.clone();
        let stale = cfg.stale_after;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval((stale / 2).min(Duration::from_secs(30)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let cutoff =
                    chrono::Utc::now() - chrono::Duration::from_std(stale).unwrap_or_default();
                let swept = match engine.store.pg().await {
                    Ok(mut conn) => messages::sweep_stale(&mut conn, cutoff)
                        .await
                        .unwrap_or_default(),
                    Err(_) => Vec::new(),
                };
                for id in swept {
                    // Still generating here (the heartbeat could not be
                    // written): its own finalisation corrects the row.
                    if engine.registry.get(id).is_some() {
                        continue;
                    }
                    let e = pb::ChatEvent {
                        event: Some(Ev::Failed(pb::Failed {
                            message_id: id.to_string(),
                            code: tonic::Code::Unavailable as i32,
                            message: "the server generating this reply stopped".into(),
                            status: pb::MessageStatus::Interrupted as i32,
                            ..Default::default()
                        })),
                    };
                    engine.fanout.publish(id, &e).await;
                }
            }
        })
    };
    background.push(sweeper);
    // Draining: every reply in progress here ends INTERRUPTED; the task
    // ends once they are all stored (the server awaits it after stopping).
    let finishing = {
        let registry = registry.clone();
        let mut on_drain = shutting_down.clone();
        tokio::spawn(async move {
            if on_drain.wait_for(|d| *d).await.is_err() {
                return;
            }
            registry.stop_all(Stop::Interrupt);
            let deadline = tokio::time::Instant::now() + drain_timeout;
            while !registry.is_empty() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let models: BTreeSet<String> = llm.models.keys().cloned().collect();
    let default_model = if cfg.default_model.is_empty() {
        models.iter().next().cloned().unwrap_or_default()
    } else {
        cfg.default_model.clone()
    };
    Built {
        server: ChatServiceServer::new(ChatSvc {
            engine,
            verifier: Verifier(authenticator),
            pages,
            models,
            default_model,
        })
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes),
        collectors: metrics.collectors(),
        background,
        drain,
        finishing,
    }
}

/// The call's context for the generations it starts: the caller's request
/// id and credentials, and the deadline the client set itself
/// (`grpc-timeout`). The server's default timeout does not bound
/// generations: they outlive disconnects.
fn turn_context<T>(req: &Request<T>) -> CallContext {
    let client_deadline = req
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(trellis_mesh::layers::deadline::parse_grpc_timeout)
        .map(|d| std::time::Instant::now() + d);
    CallContext {
        deadline: client_deadline,
        ..CallContext::from_request(req)
    }
}

fn parse_id(field: &str, raw: &str) -> Result<Uuid, ChatError> {
    Uuid::parse_str(raw.trim()).map_err(|_| ChatError::field(field, "must be an id (UUID)"))
}

fn failed(client_message_id: &str, status: &Status) -> pb::ChatEvent {
    pb::ChatEvent {
        event: Some(Ev::Failed(pb::Failed {
            message_id: String::new(),
            client_message_id: client_message_id.to_string(),
            code: status.code() as i32,
            message: status.message().to_string(),
            status: pb::MessageStatus::Unspecified as i32,
            retry_delay: crate::engine::retry_delay(status),
        })),
    }
}

fn is_final(e: &pb::ChatEvent) -> bool {
    matches!(e.event, Some(Ev::Completed(_)) | Some(Ev::Failed(_)))
}

/// The final event of a stored reply, as it was sent live.
fn final_of(r: &MessageRow) -> Option<pb::ChatEvent> {
    let usage = Some(pb::Usage {
        prompt_tokens: r.prompt_tokens,
        completion_tokens: r.completion_tokens,
        cost_micros: r.cost_micros,
    });
    let status = messages::status_pb(&r.status);
    let duration = |m: Option<i64>| {
        m.map(|m| prost_types::Duration {
            seconds: m.div_euclid(1_000_000),
            nanos: (m.rem_euclid(1_000_000) * 1000) as i32,
        })
    };
    Some(pb::ChatEvent {
        event: Some(match r.status.as_str() {
            messages::STREAMING => return None,
            messages::COMPLETED | messages::CANCELLED => Ev::Completed(pb::Completed {
                message_id: r.id.to_string(),
                status: status as i32,
                usage,
                finish_reason: r.finish_reason.clone(),
                time_to_first_token: duration(r.time_to_first_token_micros),
                duration: duration(r.duration_micros),
            }),
            _ => Ev::Failed(pb::Failed {
                message_id: r.id.to_string(),
                client_message_id: String::new(),
                code: if r.error_code == 0 {
                    tonic::Code::Unavailable as i32
                } else {
                    r.error_code
                },
                message: r.error.clone(),
                status: status as i32,
                retry_delay: None,
            }),
        }),
    })
}

fn delta(id: Uuid, offset: usize, text: &str) -> pb::ChatEvent {
    pb::ChatEvent {
        event: Some(Ev::Delta(pb::Delta {
            message_id: id.to_string(),
            text: text.to_string(),
            offset: offset as i64,
        })),
    }
}

/// A stream's outbound events. Boxed one by one: tokio's channel allocates
/// its first block of 32 slots when it is created, and 32 inline events
/// (a `Status` alone is ~180 bytes) would cost every idle stream ~6 KB.
struct Out<T>(mpsc::Sender<Box<Result<T, Status>>>);

impl<T> Clone for Out<T> {
    fn clone(&self) -> Self {
        Out(self.0.clone())
    }
}

impl<T> Out<T> {
    /// Queues `item`, waiting while the queue is full; `Err` once the
    /// client has gone.
    async fn send(&self, item: Result<T, Status>) -> Result<(), ()> {
        self.0.send(Box::new(item)).await.map_err(|_| ())
    }

    /// Resolves once the client has gone.
    async fn closed(&self) {
        self.0.closed().await
    }
}

/// A bounded outbound queue and the response stream it feeds.
fn out_channel<T: Send + 'static>(buffer: usize) -> (Out<T>, EventStream<T>) {
    let (tx, rx) = mpsc::channel(buffer);
    (
        Out(tx),
        Box::pin(futures::StreamExt::map(ReceiverStream::new(rx), |b| *b)),
    )
}

/// The credentials a Converse stream acts with: those it was opened with
/// until an `authenticate` replaces them. Re-verified before every action,
/// so an expired or revoked token stops acting (the stream stays open).
#[derive(Debug)]
struct StreamAuth {
    principal: Arc<Principal>,
    /// The raw credential, for re-verification.
    credential: Option<String>,
    /// Forwarded on the mesh calls of the turns this stream starts.
    ctx: CallContext,
}

const REAUTHENTICATE: &str = "send `authenticate` with a fresh access token on this stream";

/// The replies a Converse stream is relaying, each by its own task.
#[derive(Default)]
struct Relays {
    tasks: tokio::task::JoinSet<Uuid>,
    ids: std::collections::HashSet<Uuid>,
}

impl Relays {
    fn spawn(&mut self, id: Uuid, relay: impl Future<Output = ()> + Send + 'static) {
        self.ids.insert(id);
        self.tasks.spawn(async move {
            relay.await;
            id
        });
    }

    fn contains(&self, id: &Uuid) -> bool {
        self.ids.contains(id)
    }

    /// Forgets the relays that have ended.
    fn reap(&mut self) {
        while let Some(done) = self.tasks.try_join_next() {
            if let Ok(id) = done {
                self.ids.remove(&id);
            }
        }
    }

    /// Waits for every relay to end.
    async fn finish(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Relays a reply's local events to one client stream. A reader too slow
/// for the event buffer is caught up from the content so far instead, so
/// memory stays bounded and other streams never wait for it. Ends after the
/// final event, or when the client is gone (the reply goes on).
async fn forward<T>(
    mut rx: broadcast::Receiver<pb::ChatEvent>,
    live: Arc<Live>,
    id: Uuid,
    out: Out<T>,
    wrap: fn(pb::ChatEvent) -> T,
) {
    let mut sent = 0usize;
    loop {
        let ev = match rx.recv().await {
            Ok(ev) => ev,
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let content = live.content();
                if content.len() > sent {
                    let text = content.get(sent..).unwrap_or_default().to_string();
                    let e = delta(id, sent, &text);
                    sent = content.len();
                    if out.send(Ok(wrap(e))).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let ev = match &ev.event {
            Some(Ev::Delta(d)) => {
                let (offset, end) = (d.offset as usize, d.offset as usize + d.text.len());
                if end <= sent {
                    continue;
                }
                let skip = sent.saturating_sub(offset);
                let text = d.text.get(skip..).unwrap_or_default();
                let e = delta(id, offset + skip, text);
                sent = end;
                e
            }
            _ => ev,
        };
        let last = is_final(&ev);
        if out.send(Ok(wrap(ev))).await.is_err() || last {
            return;
        }
    }
}

impl ChatSvc {
    fn cfg(&self) -> &ChatConfig {
        &self.engine.cfg
    }

    fn check_model(&self, field: &str, model: &str, v: &mut FieldViolations) {
        if model.is_empty() || model.len() > 64 {
            v.add(field, "a model alias of 1-64 characters");
        } else if !self.models.is_empty() && !self.models.contains(model) {
            v.add(
                field,
                format!("unknown model '{model}' (LlmService.ListModels lists them)"),
            );
        }
    }

    /// A validated turn for `p` from a `Send`.
    async fn turn(
        &self,
        ctx: &CallContext,
        p: &Principal,
        s: pb::Send,
    ) -> Result<TurnStart, ChatError> {
        let mut v = FieldViolations::new();
        let session_id = Uuid::parse_str(s.session_id.trim()).ok();
        if session_id.is_none() {
            v.add("session_id", "must be an id (UUID)");
        }
        let chars = s.content.chars().count();
        if s.content.trim().is_empty() {
            v.add("content", "must not be empty");
        } else if chars > self.cfg().max_message_chars {
            v.add(
                "content",
                format!("at most {} characters", self.cfg().max_message_chars),
            );
        } else if !text::is_clean_text(&s.content) {
            v.add("content", CLEAN_TEXT);
        }
        if s.client_message_id.len() > 128 {
            v.add("client_message_id", "at most 128 characters");
        } else if !text::is_single_line(&s.client_message_id) {
            v.add("client_message_id", SINGLE_LINE);
        }
        if let Some(m) = &s.model {
            self.check_model("model", m, &mut v);
        }
        if let Some(t) = s.temperature
            && !(t.is_finite() && (0.0..=2.0).contains(&t))
        {
            v.add("temperature", "must be between 0 and 2");
        }
        if s.max_tokens.is_some_and(|m| m < 0) {
            v.add("max_tokens", "must not be negative");
        }
        if !v.is_empty() {
            return Err(ChatError::Invalid(v));
        }
        let session_id = session_id.ok_or(ChatError::NotFound)?;
        let cid = s.client_message_id.trim();
        self.engine
            .start_new(
                ctx.clone(),
                p.user_id,
                session_id,
                TurnRequest {
                    content: s.content,
                    client_message_id: (!cid.is_empty()).then(|| cid.to_string()),
                    model: s.model,
                    temperature: s.temperature,
                    max_tokens: s.max_tokens,
                    regenerate: None,
                },
            )
            .await
    }

    /// Checks that the stream's credentials still hold (not expired, not
    /// revoked), refreshing the principal (its permissions may change).
    async fn reverify(&self, a: &mut StreamAuth) -> Result<(), Status> {
        let Some(credential) = &a.credential else {
            return Err(Status::unauthenticated(format!(
                "the stream has no credentials to act with; {REAUTHENTICATE}"
            )));
        };
        match self.verifier.0.authenticate(credential).await {
            Ok(p) if p.user_id == a.principal.user_id => {
                a.principal = p;
                Ok(())
            }
            Ok(_) => Err(Status::unauthenticated(format!(
                "the stream's credentials changed hands; {REAUTHENTICATE}"
            ))),
            Err(s) => Err(Status::unauthenticated(format!(
                "the stream's credentials are no longer valid ({}); {REAUTHENTICATE}",
                s.message()
            ))),
        }
    }

    /// Replaces the stream's credentials with `token`, which must be the
    /// same user's.
    async fn reauthenticate(
        &self,
        a: &mut StreamAuth,
        token: &str,
    ) -> Result<pb::Authenticated, Status> {
        let token = token.trim();
        let token = token
            .strip_prefix("Bearer ")
            .or_else(|| token.strip_prefix("bearer "))
            .unwrap_or(token)
            .trim();
        let header = AsciiMetadataValue::try_from(format!("Bearer {token}")).ok();
        let (true, Some(header)) = (!token.is_empty(), header) else {
            return Err(ChatError::field(
                "authenticate.access_token",
                "an access token is required",
            )
            .into());
        };
        let p = self
            .verifier
            .0
            .authenticate(token)
            .await
            .map_err(|s| Status::unauthenticated(s.message().to_string()))?;
        if p.user_id != a.principal.user_id {
            return Err(Status::permission_denied(
                "the token belongs to another user; a Converse stream keeps the user who opened it",
            ));
        }
        p.require(SEND)?;
        let expire_time = p
            .expires_at
            .map(|seconds| prost_types::Timestamp { seconds, nanos: 0 });
        a.principal = p;
        a.credential = Some(token.to_string());
        a.ctx.authorization = Some(header);
        Ok(pb::Authenticated { expire_time })
    }

    async fn cancel(&self, p: &Principal, raw: &str) -> Result<bool, ChatError> {
        let id = parse_id("message_id", raw)?;
        let row = {
            let mut conn = self.engine.store.pg().await?;
            messages::owned(&mut conn, id, p.user_id).await?
        };
        if row.status != messages::STREAMING {
            return Ok(false);
        }
        if !self.engine.registry.stop(id, Stop::Cancel) {
            self.engine.fanout.publish_cancel(id).await?;
        }
        Ok(true)
    }

    /// Sends what the stored reply has beyond byte `sent`, then its final
    /// event if it is finished. Ok(true) when the reply is finished (or the
    /// client gone): nothing more to follow.
    async fn catch_up<T>(
        &self,
        id: Uuid,
        sent: &mut usize,
        out: &Out<T>,
        wrap: fn(pb::ChatEvent) -> T,
    ) -> Result<bool, ChatError> {
        let row = {
            let mut conn = self.engine.store.pg().await?;
            messages::by_id(&mut conn, id)
                .await?
                .ok_or(ChatError::NotFound)?
        };
        if let Some(text) = row.content.get(*sent..).filter(|t| !t.is_empty()) {
            if out.send(Ok(wrap(delta(id, *sent, text)))).await.is_err() {
                return Ok(true);
            }
            *sent = row.content.len();
        }
        match final_of(&row) {
            Some(last) => {
                let _ = out.send(Ok(wrap(last))).await;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Streams reply `id` from byte `offset`: what is stored, then live
    /// events from any replica, until the final event.
    async fn watch_into<T: Send + 'static>(
        &self,
        id: Uuid,
        offset: usize,
        out: Out<T>,
        wrap: fn(pb::ChatEvent) -> T,
    ) -> Result<(), ChatError> {
        // Subscribe first, then read: nothing can fall between.
        let mut sub = self.engine.hub.subscribe(id).await?;
        let row = {
            let mut conn = self.engine.store.pg().await?;
            messages::by_id(&mut conn, id)
                .await?
                .ok_or(ChatError::NotFound)?
        };
        // In the order they were sent live: citations, content, the end.
        let citations = messages::citations_of(&row.citations);
        let mut cited = !citations.is_empty();
        if cited {
            let e = pb::ChatEvent {
                event: Some(Ev::Citations(pb::Citations {
                    message_id: id.to_string(),
                    citations,
                })),
            };
            if out.send(Ok(wrap(e))).await.is_err() {
                return Ok(());
            }
        }
        let mut sent = offset;
        if row.content.len() > sent
            && let Some(text) = row.content.get(sent..)
        {
            if out.send(Ok(wrap(delta(id, sent, text)))).await.is_err() {
                return Ok(());
            }
            sent = row.content.len();
        }
        if let Some(last) = final_of(&row) {
            let _ = out.send(Ok(wrap(last))).await;
            return Ok(());
        }
        loop {
            let next = tokio::select! {
                e = sub.recv() => e,
                _ = out.closed() => return Ok(()),
                // A reply whose final event was lost (its replica died) is
                // found final in the database.
                _ = tokio::time::sleep(Duration::from_secs(5)) => {
                    if self.catch_up(id, &mut sent, &out, wrap).await? {
                        return Ok(());
                    }
                    continue;
                }
            };
            let ev = match next {
                Ok(ev) => ev,
                // This watcher fell behind the live feed (its events were
                // dropped, not buffered): continue from the stored content.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    if self.catch_up(id, &mut sent, &out, wrap).await? {
                        return Ok(());
                    }
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(ChatError::Upstream(Status::unavailable(
                        "the live feed was interrupted; watch again with the offset received",
                    )));
                }
            };
            let ev = match &ev.event {
                // Already replayed from the row.
                Some(Ev::Citations(_)) if cited => continue,
                Some(Ev::Citations(_)) => {
                    cited = true;
                    ev
                }
                Some(Ev::Delta(d)) => {
                    let (start, end) = (d.offset as usize, d.offset as usize + d.text.len());
                    if end <= sent {
                        continue;
                    }
                    if start > sent {
                        // Published before we subscribed (or while we
                        // lagged) but not yet stored when we read: wait for
                        // the next flush.
                        let mut caught = false;
                        for _ in 0..40 {
                            let mut conn = self.engine.store.pg().await?;
                            if let Some(r) = messages::by_id(&mut conn, id).await?
                                && r.content.len() >= start
                            {
                                if let Some(text) = r.content.get(sent..start) {
                                    if out.send(Ok(wrap(delta(id, sent, text)))).await.is_err() {
                                        return Ok(());
                                    }
                                    sent = start;
                                    caught = true;
                                }
                                break;
                            }
                            drop(conn);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        if !caught {
                            return Err(ChatError::Upstream(Status::unavailable(
                                "could not catch up with the reply; watch again",
                            )));
                        }
                    }
                    let skip = sent.saturating_sub(start);
                    let text = d.text.get(skip..).unwrap_or_default();
                    let e = delta(id, start + skip, text);
                    sent = end;
                    e
                }
                _ => ev,
            };
            let last = is_final(&ev);
            if out.send(Ok(wrap(ev))).await.is_err() || last {
                return Ok(());
            }
        }
    }

    /// One client message of a Converse stream; every outcome is an event
    /// on the stream, which goes on.
    async fn converse_action(
        &self,
        action: Option<pb::converse_request::Action>,
        auth: &mut StreamAuth,
        tx: &Out<pb::ConverseResponse>,
        relays: &mut Relays,
    ) {
        use pb::converse_request::Action;
        let say = |e: pb::ChatEvent| async move {
            let _ = tx.send(Ok(wrap_converse(e))).await;
        };
        match action {
            Some(Action::Send(s)) => {
                let cid = s.client_message_id.clone();
                if let Err(st) = self.reverify(auth).await {
                    return say(failed(&cid, &st)).await;
                }
                if let Err(st) = auth.principal.require(SEND) {
                    return say(failed(&cid, &st)).await;
                }
                match self.turn(&auth.ctx, &auth.principal, s).await {
                    Ok(TurnStart::New {
                        accepted,
                        live,
                        rx: events,
                    }) => {
                        let id =
                            Uuid::parse_str(&accepted.assistant_message_id).unwrap_or_default();
                        say(pb::ChatEvent {
                            event: Some(Ev::Accepted(accepted)),
                        })
                        .await;
                        relays.spawn(id, forward(events, live, id, tx.clone(), wrap_converse));
                    }
                    Ok(TurnStart::Duplicate { accepted }) => {
                        let id = Uuid::parse_str(&accepted.assistant_message_id).ok();
                        say(pb::ChatEvent {
                            event: Some(Ev::Accepted(accepted)),
                        })
                        .await;
                        // A resend of a turn this stream is relaying already:
                        // its events keep coming once, not twice.
                        if let Some(id) = id.filter(|id| !relays.contains(id)) {
                            let me = self.clone();
                            let tx = tx.clone();
                            relays.spawn(id, async move {
                                if let Err(e) =
                                    me.watch_into(id, 0, tx.clone(), wrap_converse).await
                                {
                                    let s: Status = e.into();
                                    let _ = tx.send(Ok(wrap_converse(failed("", &s)))).await;
                                }
                            });
                        }
                    }
                    Err(e) => {
                        let st: Status = e.into();
                        say(failed(&cid, &st)).await;
                    }
                }
            }
            Some(Action::Cancel(c)) => {
                if let Err(st) = self.reverify(auth).await {
                    return say(failed("", &st)).await;
                }
                if let Err(e) = self.cancel(&auth.principal, &c.message_id).await {
                    let st: Status = e.into();
                    say(failed("", &st)).await;
                }
            }
            Some(Action::Authenticate(a)) => match self.reauthenticate(auth, &a.access_token).await
            {
                Ok(done) => {
                    say(pb::ChatEvent {
                        event: Some(Ev::Authenticated(done)),
                    })
                    .await
                }
                Err(st) => say(failed("", &st)).await,
            },
            None => {
                let st = Status::invalid_argument(
                    "a ConverseRequest needs send, cancel or authenticate",
                );
                say(failed("", &st)).await;
            }
        }
    }

    /// Runs one turn into a fresh response stream (SendMessage, Regenerate).
    async fn one_turn<T: Send + 'static>(
        &self,
        started: TurnStart,
        wrap: fn(pb::ChatEvent) -> T,
    ) -> Result<Response<Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>>, Status> {
        let (tx, stream) = out_channel(self.cfg().stream_buffer);
        let guard = StreamGuard::new(&self.engine.metrics.active_streams);
        match started {
            TurnStart::New {
                accepted,
                live,
                rx: events,
            } => {
                let id = Uuid::parse_str(&accepted.assistant_message_id).unwrap_or_default();
                let _ = tx
                    .send(Ok(wrap(pb::ChatEvent {
                        event: Some(Ev::Accepted(accepted)),
                    })))
                    .await;
                tokio::spawn(async move {
                    let _guard = guard;
                    forward(events, live, id, tx, wrap).await;
                });
            }
            TurnStart::Duplicate { accepted } => {
                let id = Uuid::parse_str(&accepted.assistant_message_id).ok();
                let _ = tx
                    .send(Ok(wrap(pb::ChatEvent {
                        event: Some(Ev::Accepted(accepted)),
                    })))
                    .await;
                if let Some(id) = id {
                    let me = self.clone();
                    tokio::spawn(async move {
                        let _guard = guard;
                        if let Err(e) = me.watch_into(id, 0, tx.clone(), wrap).await {
                            let _ = tx.send(Err(e.into())).await;
                        }
                    });
                }
            }
        }
        Ok(Response::new(stream))
    }
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn wrap_converse(e: pb::ChatEvent) -> pb::ConverseResponse {
    pb::ConverseResponse { event: Some(e) }
}
fn wrap_send(e: pb::ChatEvent) -> pb::SendMessageResponse {
    pb::SendMessageResponse { event: Some(e) }
}
fn wrap_watch(e: pb::ChatEvent) -> pb::WatchMessageResponse {
    pb::WatchMessageResponse { event: Some(e) }
}
fn wrap_regenerate(e: pb::ChatEvent) -> pb::RegenerateMessageResponse {
    pb::RegenerateMessageResponse { event: Some(e) }
}

#[tonic::async_trait]
impl ChatService for ChatSvc {
    async fn create_session(
        &self,
        req: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        let p = authenticated(&req)?;
        p.require(SESSIONS)?;
        let r = req.into_inner();
        let mut v = FieldViolations::new();
        if r.title.chars().count() > sessions::MAX_TITLE {
            v.add(
                "title",
                format!("at most {} characters", sessions::MAX_TITLE),
            );
        } else if !text::is_single_line(&r.title) {
            v.add("title", SINGLE_LINE);
        }
        if r.system_prompt.chars().count() > sessions::MAX_SYSTEM_PROMPT {
            v.add(
                "system_prompt",
                format!("at most {} characters", sessions::MAX_SYSTEM_PROMPT),
            );
        } else if !text::is_clean_text(&r.system_prompt) {
            v.add("system_prompt", CLEAN_TEXT);
        }
        let model = if r.model.trim().is_empty() {
            self.default_model.clone()
        } else {
            r.model.trim().to_string()
        };
        if model.is_empty() {
            v.add("model", "is required (no default model is configured)");
        } else {
            self.check_model("model", &model, &mut v);
        }
        v.check()?;
        let mut conn = self.engine.store.pg().await.map_err(ChatError::from)?;
        let row = sessions::create(
            &mut conn,
            NewSession {
                id: Uuid::now_v7(),
                user_id: p.user_id,
                title: r.title.trim().to_string(),
                model,
                system_prompt: r.system_prompt,
                retrieval: r.retrieval,
            },
        )
        .await?;
        Ok(Response::new(pb::CreateSessionResponse {
            session: Some(sessions::to_pb(self.cfg(), &row, 0)),
        }))
    }

    async fn get_session(
        &self,
        req: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::GetSessionResponse>, Status> {
        let p = authenticated(&req)?;
        p.require(READ)?;
        let id = parse_id("session_id", &req.get_ref().session_id)?;
        let mut conn = self.engine.store.pg().await.map_err(ChatError::from)?;
        let row = sessions::owned(&mut conn, id, p.user_id).await?;
        let n = sessions::message_count(&mut conn, id).await?;
        Ok(Response::new(pb::GetSessionResponse {
            session: Some(sessions::to_pb(self.cfg(), &row, n)),
        }))
    }

    async fn list_sessions(
        &self,
        req: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let p = authenticated(&req)?;
        p.require(READ)?;
        let r = req.into_inner();
        let mut v = FieldViolations::new();
        let size = trellis_core::page::page_size(&mut v, r.page_size);
        let status = pb::SessionStatus::try_from(r.status).unwrap_or_else(|_| {
            v.add("status", "unknown status");
            pb::SessionStatus::Unspecified
        });
        v.check()?;
        let fingerprint = format!("chat-sessions:{}:{}", p.user_id, status as i32);
        let cursor = self.pages.open(&r.page_token, &fingerprint)?;
        let mut conn = self.engine.store.pg().await.map_err(ChatError::from)?;
        let (rows, next) =
            sessions::list(&mut conn, self.cfg(), p.user_id, status, size, cursor).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let n = sessions::message_count(&mut conn, row.id).await?;
            out.push(sessions::to_pb(self.cfg(), row, n));
        }
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: out,
            next_page_token: next
                .map(|c| self.pages.seal(&fingerprint, &c))
                .unwrap_or_default(),
        }))
    }

    async fn update_session(
        &self,
        req: Request<pb::UpdateSessionRequest>,
    ) -> Result<Response<pb::UpdateSessionResponse>, Status> {
        use diesel::prelude::*;
        use diesel_async::RunQueryDsl;
        use trellis_store::schema::chat_sessions as s;
        let p = authenticated(&req)?;
        p.require(SESSIONS)?;
        let r = req.into_inner();
        let Some(update) = r.session else {
            return Err(ChatError::field("session", "is required").into());
        };
        let id = parse_id("session.id", &update.id)?;
        let mut v = FieldViolations::new();
        let paths: Vec<String> = match &r.update_mask {
            Some(m) if !m.paths.is_empty() => m.paths.clone(),
            _ => {
                v.add(
                    "update_mask",
                    "name the fields to change: title, system_prompt, model, retrieval",
                );
                Vec::new()
            }
        };
        for path in &paths {
            match path.as_str() {
                "title" if update.title.chars().count() > sessions::MAX_TITLE => {
                    v.add(
                        "session.title",
                        format!("at most {} characters", sessions::MAX_TITLE),
                    );
                }
                "title" if !text::is_single_line(&update.title) => {
                    v.add("session.title", SINGLE_LINE);
                }
                "system_prompt"
                    if update.system_prompt.chars().count() > sessions::MAX_SYSTEM_PROMPT =>
                {
                    v.add(
                        "session.system_prompt",
                        format!("at most {} characters", sessions::MAX_SYSTEM_PROMPT),
                    );
                }
                "system_prompt" if !text::is_clean_text(&update.system_prompt) => {
                    v.add("session.system_prompt", CLEAN_TEXT);
                }
                "model" => self.check_model("session.model", update.model.trim(), &mut v),
                "title" | "system_prompt" | "retrieval" => {}
                other => v.add("update_mask", format!("'{other}' cannot be changed")),
            }
        }
        v.check()?;
        let mut conn = self.engine.store.pg().await.map_err(ChatError::from)?;
        let current = sessions::owned(&mut conn, id, p.user_id).await?;
        if sessions::status(self.cfg(), current.last_activity_at) == pb::SessionStatus::Expired {
            return Err(ChatError::Precondition(
                "the session has expired and is read-only; start a new one".into(),
            )
            .into());
        }
        let now = chrono::Utc::now();
        for path in &paths {
            let target = s::table.filter(s::id.eq(id));
            let q = match path.as_str() {
                "title" => {
                    diesel::update(target)
                        .set((s::title.eq(update.title.trim()), s::updated_at.eq(now)))
                        .execute(&mut conn)
                        .await
                }
                "system_prompt" => {
                    diesel::update(target)
                        .set((
                            s::system_prompt.eq(&update.system_prompt),
                            s::updated_at.eq(now),
                        ))
                        .execute(&mut conn)
                        .await
                }
                "model" => {
                    diesel::update(target)
                        .set((s::model.eq(update.model.trim()), s::updated_at.eq(now)))
                        .execute(&mut conn)
                        .await
                }
                _ => {
                    diesel::update(target)
                        .set((s::retrieval.eq(update.retrieval), s::updated_at.eq(now)))
                        .execute(&mut conn)
                        .await
                }
            };
            q.map_err(ChatError::from)?;
        }
        let row = sessions::owned(&mut conn, id, p.user_id).await?;
        let n = sessions::message_count(&mut conn, id).await?;
        Ok(Response::new(pb::UpdateSessionResponse {
            session: Some(sessions::to_pb(self.cfg(), &row, n)),
        }))
    }

    async fn delete_session(
        &self,
        req: Request<pb::DeleteSessionRequest>,
    ) -> Result<Response<pb::DeleteSessionResponse>, Status> {
        use diesel::prelude::*;
        use diesel_async::RunQueryDsl;
        use trellis_store::schema::{chat_messages as m, chat_sessions as s};
        let p = authenticated(&req)?;
        p.require(SESSIONS)?;
        let id = parse_id("session_id", &req.get_ref().session_id)?;
        let mut conn = self.engine.store.pg().await.map_err(ChatError::from)?;
        sessions::owned(&mut conn, id, p.user_id).await?;
        diesel::update(s::table.filter(s::id.eq(id)))
            .set(s::deleted_at.eq(chrono::Utc::now()))
            .execute(&mut conn)
            .await
            .map_err(ChatError::from)?;
        // A reply still generating in it stops.
        let streaming: Vec<Uuid> = m::table
            .filter(m::session_id.eq(id))
            .filter(m::status.eq(messages::STREAMING))
            .select(m::id)
            .load(&mut conn)
            .await
            .map_err(ChatError::from)?;
        for r in streaming {
            if !self.engine.registry.stop(r, Stop::Cancel) {
                let _ = self.engine.fanout.publish_cancel(r).await;
            }
        }
        Ok(Response::new(pb::DeleteSessionResponse {}))
    }

    async fn list_messages(
        &self,
        req: Request<pb::ListMessagesRequest>,
    ) -> Result<Response<pb::ListMessagesResponse>, Status> {
        let p = authenticated(&req)?;
        p.require(READ)?;
        let r = req.into_inner();
        let mut v = FieldViolations::new();
        let id = Uuid::parse_str(r.session_id.trim()).unwrap_or_else(|_| {
            v.add("session_id", "must be an id (UUID)");
            Uuid::nil()
        });
        let size = trellis_core::page::page_size(&mut v, r.page_size);
        v.check()?;
        let fingerprint = format!("chat-messages:{}:{}:{}", p.user_id, id, r.newest_first);
        let cursor = self.pages.open(&r.page_token, &fingerprint)?;
        let mut conn = self.engine.store.pg().await.map_err(ChatError::from)?;
        sessions::owned(&mut conn, id, p.user_id).await?;
        let (rows, next) = messages::page(&mut conn, id, r.newest_first, size, cursor).await?;
        Ok(Response::new(pb::ListMessagesResponse {
            messages: rows.iter().map(messages::to_pb).collect(),
            next_page_token: next
                .map(|c| self.pages.seal(&fingerprint, &c))
                .unwrap_or_default(),
        }))
    }

    async fn search_messages(
        &self,
        req: Request<pb::SearchMessagesRequest>,
    ) -> Result<Response<pb::SearchMessagesResponse>, Status> {
        let p = authenticated(&req)?;
        p.require(READ)?;
        let r = req.into_inner();
        let mut v = FieldViolations::new();
        let query = r.query.trim();
        if query.is_empty() || query.chars().count() > 1000 {
            v.add("query", "1 to 1000 characters");
        } else if !text::is_clean_text(query) {
            v.add("query", CLEAN_TEXT);
        }
        let size = match r.page_size {
            n if n < 0 => {
                v.add("page_size", "must not be negative");
                20
            }
            0 => 20,
            n => (n as usize).min(100),
        };
        let session = if r.session_id.trim().is_empty() {
            None
        } else {
            match Uuid::parse_str(r.session_id.trim()) {
                Ok(s) => Some(s),
                Err(_) => {
                    v.add("session_id", "must be an id (UUID)");
                    None
                }
            }
        };
        v.check()?;
        let mut conn = self.engine.store.pg().await.map_err(ChatError::from)?;
        if let Some(s) = session {
            sessions::owned(&mut conn, s, p.user_id).await?;
        }
        let hits = messages::search(&mut conn, p.user_id, query, session, size).await?;
        Ok(Response::new(pb::SearchMessagesResponse {
            hits: hits
                .into_iter()
                .map(|h| pb::MessageHit {
                    message_id: h.id.to_string(),
                    session_id: h.session_id.to_string(),
                    role: if h.role == "user" {
                        pb::Role::User as i32
                    } else {
                        pb::Role::Assistant as i32
                    },
                    snippet: h.snippet,
                    create_time: Some(sessions::ts(h.created_at)),
                })
                .collect(),
        }))
    }

    type ConverseStream = EventStream<pb::ConverseResponse>;

    async fn converse(
        &self,
        req: Request<Streaming<pb::ConverseRequest>>,
    ) -> Result<Response<Self::ConverseStream>, Status> {
        let p = authenticated(&req)?;
        p.require(SEND)?;
        let auth = StreamAuth {
            principal: p,
            credential: trellis_mesh::layers::authn::credential(req.metadata().as_ref()),
            ctx: turn_context(&req),
        };
        let mut inbound = req.into_inner();
        let (tx, stream) = out_channel(self.cfg().stream_buffer);
        let me = self.clone();
        let guard = StreamGuard::new(&self.engine.metrics.active_streams);
        tokio::spawn(async move {
            let _guard = guard;
            let mut auth = auth;
            let mut relays = Relays::default();
            let mut draining = me.engine.shutting_down.clone();
            loop {
                let msg = tokio::select! {
                    m = inbound.message() => m,
                    _ = tx.closed() => break,
                    _ = draining.wait_for(|d| *d) => break,
                };
                let action = match msg {
                    Ok(Some(m)) => m.action,
                    // The client has finished sending (or is gone): finish
                    // relaying the turns in flight, then end.
                    Ok(None) | Err(_) => break,
                };
                // Finished relays need not wait for the end of the stream.
                relays.reap();
                // Boxed: its state (a whole turn's) is allocated while an
                // action runs, not held by every idle stream's task.
                Box::pin(me.converse_action(action, &mut auth, &tx, &mut relays)).await;
            }
            relays.finish().await;
        });
        Ok(Response::new(stream))
    }

    type SendMessageStream = EventStream<pb::SendMessageResponse>;

    async fn send_message(
        &self,
        req: Request<pb::SendMessageRequest>,
    ) -> Result<Response<Self::SendMessageStream>, Status> {
        let p = authenticated(&req)?;
        p.require(SEND)?;
        let ctx = turn_context(&req);
        let Some(send) = req.into_inner().send else {
            return Err(ChatError::field("send", "is required").into());
        };
        let started = self.turn(&ctx, &p, send).await?;
        self.one_turn(started, wrap_send).await
    }

    async fn cancel_generation(
        &self,
        req: Request<pb::CancelGenerationRequest>,
    ) -> Result<Response<pb::CancelGenerationResponse>, Status> {
        let p = authenticated(&req)?;
        p.require(SEND)?;
        let cancelled = self.cancel(&p, &req.get_ref().message_id).await?;
        Ok(Response::new(pb::CancelGenerationResponse { cancelled }))
    }

    type WatchMessageStream = EventStream<pb::WatchMessageResponse>;

    async fn watch_message(
        &self,
        req: Request<pb::WatchMessageRequest>,
    ) -> Result<Response<Self::WatchMessageStream>, Status> {
        let p = authenticated(&req)?;
        p.require(READ)?;
        let r = req.into_inner();
        let id = parse_id("message_id", &r.message_id)?;
        let row = {
            let mut conn = self.engine.store.pg().await.map_err(ChatError::from)?;
            messages::owned(&mut conn, id, p.user_id).await?
        };
        if r.offset < 0
            || (r.offset as usize > row.content.len() && row.status != messages::STREAMING)
        {
            return Err(
                ChatError::field("offset", "must be between 0 and the content's length").into(),
            );
        }
        let (tx, stream) = out_channel(self.cfg().stream_buffer);
        let me = self.clone();
        let guard = StreamGuard::new(&self.engine.metrics.active_streams);
        tokio::spawn(async move {
            let _guard = guard;
            if let Err(e) = me
                .watch_into(id, r.offset as usize, tx.clone(), wrap_watch)
                .await
            {
                let _ = tx.send(Err(e.into())).await;
            }
        });
        Ok(Response::new(stream))
    }

    type RegenerateMessageStream = EventStream<pb::RegenerateMessageResponse>;

    async fn regenerate_message(
        &self,
        req: Request<pb::RegenerateMessageRequest>,
    ) -> Result<Response<Self::RegenerateMessageStream>, Status> {
        let p = authenticated(&req)?;
        p.require(SEND)?;
        let ctx = turn_context(&req);
        let id = parse_id("message_id", &req.get_ref().message_id)?;
        let (session, user_row) = {
            let mut conn = self.engine.store.pg().await.map_err(ChatError::from)?;
            let reply = messages::owned(&mut conn, id, p.user_id).await?;
            let Some(user_id) = reply.reply_to.filter(|_| reply.role == "assistant") else {
                return Err(
                    ChatError::field("message_id", "must name an assistant message").into(),
                );
            };
            let user_row = messages::by_id(&mut conn, user_id)
                .await?
                .ok_or(ChatError::NotFound)?;
            let session = sessions::owned(&mut conn, reply.session_id, p.user_id).await?;
            (session, user_row)
        };
        let started = self
            .engine
            .start(
                ctx,
                p.user_id,
                session,
                TurnRequest {
                    content: user_row.content.clone(),
                    regenerate: Some(user_row),
                    ..Default::default()
                },
            )
            .await?;
        self.one_turn(started, wrap_regenerate).await
    }
}
