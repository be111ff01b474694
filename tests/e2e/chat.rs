//! ChatService end to end against a fake LLM upstream (through the real
//! LlmService, a mesh hop away), on real PostgreSQL and Redis: sessions,
//! many turns over one Converse stream, idempotent resends, cancellation
//! that reaches the upstream, replies that outlive their client, watching
//! and cancelling from another server, regeneration, shutdown, load,
//! search, preferences, retrieval, and another user's everything NOT_FOUND.

use std::time::Duration;

use tonic::Code;
use tonic::transport::Channel;
use trellis_core::ServiceName;
use trellis_proto::chat::v1 as pb;
use trellis_proto::chat::v1::chat_event::Event as Ev;
use trellis_proto::chat::v1::chat_service_client::ChatServiceClient;
use trellis_tests::{FakeLlm, Script, TestMesh, echo_reply, split_with};

use crate::auth::{access, auth, bearer, register, violations};
use crate::llm::{Rig, configure, rig};
use crate::util::eventually;

pub async fn chat(mesh: &TestMesh) -> ChatServiceClient<Channel> {
    ChatServiceClient::new(mesh.channel().await)
}

async fn new_session(c: &mut ChatServiceClient<Channel>, token: &str, model: &str) -> pb::Session {
    c.create_session(bearer(
        pb::CreateSessionRequest {
            title: "Test chat".into(),
            model: model.into(),
            system_prompt: "Be helpful.".into(),
            retrieval: false,
        },
        token,
    ))
    .await
    .expect("create session")
    .into_inner()
    .session
    .expect("session")
}

fn send(session: &str, content: &str, cid: &str) -> pb::Send {
    pb::Send {
        session_id: session.into(),
        content: content.into(),
        client_message_id: cid.into(),
        ..Default::default()
    }
}

/// What one turn produced.
#[derive(Debug)]
struct Turn {
    accepted: Option<pb::Accepted>,
    text: String,
    offsets_ok: bool,
    citations: Vec<pb::Citation>,
    completed: Option<pb::Completed>,
    failed: Option<pb::Failed>,
}

impl Default for Turn {
    fn default() -> Turn {
        Turn {
            accepted: None,
            text: String::new(),
            offsets_ok: true,
            citations: Vec::new(),
            completed: None,
            failed: None,
        }
    }
}

/// A server stream of chat events (SendMessage, WatchMessage, Regenerate).
trait Events {
    fn into_event(self) -> pb::ChatEvent;
}

macro_rules! events {
    ($($t:ty),*) => {$(
        impl Events for $t {
            fn into_event(self) -> pb::ChatEvent {
                self.event.expect("every response carries an event")
            }
        }
    )*};
}
events!(
    pb::ConverseResponse,
    pb::SendMessageResponse,
    pb::WatchMessageResponse,
    pb::RegenerateMessageResponse
);

/// Reads `stream` into `turn` until `done` holds (or the turn ends).
async fn read_until<T: Events>(
    stream: &mut tonic::Streaming<T>,
    turn: &mut Turn,
    done: impl Fn(&Turn) -> bool,
) {
    while !done(turn) {
        let m = stream
            .message()
            .await
            .expect("the stream is healthy")
            .expect("the stream is open");
        if take(turn, m.into_event()) {
            return;
        }
    }
}

/// The next event of `stream`.
async fn next_event<T: Events>(stream: &mut tonic::Streaming<T>) -> pb::ChatEvent {
    stream
        .message()
        .await
        .expect("the stream is healthy")
        .expect("the stream is open")
        .into_event()
}

/// Reads `stream` into `turn` up to the turn's final event.
async fn finish<T: Events>(stream: &mut tonic::Streaming<T>, turn: &mut Turn) {
    read_until(stream, turn, |_| false).await
}

fn take(turn: &mut Turn, e: pb::ChatEvent) -> bool {
    match e.event {
        Some(Ev::Accepted(a)) => turn.accepted = Some(a),
        Some(Ev::Delta(d)) => {
            turn.offsets_ok &= d.offset as usize == turn.text.len();
            turn.text.push_str(&d.text);
        }
        Some(Ev::Citations(c)) => turn.citations = c.citations,
        Some(Ev::Completed(c)) => {
            turn.completed = Some(c);
            return true;
        }
        Some(Ev::Failed(f)) => {
            turn.failed = Some(f);
            return true;
        }
        Some(Ev::Authenticated(_)) | None => {}
    }
    false
}

/// Starts a SendMessage turn; its events are left to read.
async fn open_send(
    c: &mut ChatServiceClient<Channel>,
    token: &str,
    s: pb::Send,
) -> tonic::Streaming<pb::SendMessageResponse> {
    c.send_message(bearer(pb::SendMessageRequest { send: Some(s) }, token))
        .await
        .expect("send")
        .into_inner()
}

async fn send_message(
    c: &mut ChatServiceClient<Channel>,
    token: &str,
    s: pb::Send,
) -> Result<Turn, tonic::Status> {
    let mut stream = c
        .send_message(bearer(pb::SendMessageRequest { send: Some(s) }, token))
        .await?
        .into_inner();
    let mut turn = Turn::default();
    while let Some(m) = stream.message().await? {
        if take(&mut turn, m.event.expect("event")) {
            break;
        }
    }
    Ok(turn)
}

/// A Converse stream: actions in, events out.
struct Conv {
    tx: tokio::sync::mpsc::Sender<pb::ConverseRequest>,
    rx: tonic::Streaming<pb::ConverseResponse>,
}

impl Conv {
    async fn open(c: &mut ChatServiceClient<Channel>, token: &str) -> Conv {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let rx = c
            .converse(bearer(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                token,
            ))
            .await
            .expect("converse")
            .into_inner();
        Conv { tx, rx }
    }

    async fn act(&self, action: pb::converse_request::Action) {
        self.tx
            .send(pb::ConverseRequest {
                action: Some(action),
            })
            .await
            .expect("the stream takes actions");
    }

    async fn send(&self, s: pb::Send) {
        self.act(pb::converse_request::Action::Send(s)).await
    }

    async fn cancel(&self, message_id: &str) {
        self.act(pb::converse_request::Action::Cancel(pb::Cancel {
            message_id: message_id.into(),
        }))
        .await
    }

    async fn authenticate(&self, token: &str) {
        self.act(pb::converse_request::Action::Authenticate(
            pb::Authenticate {
                access_token: token.into(),
            },
        ))
        .await
    }

    /// The next event (a test failure after 15 s without one).
    async fn next(&mut self) -> Ev {
        let m = tokio::time::timeout(Duration::from_secs(15), self.rx.message())
            .await
            .expect("an event within 15 s")
            .expect("the stream is healthy")
            .expect("the stream is open");
        m.event.expect("event").event.expect("event")
    }

    /// The events of one turn, up to its final event.
    async fn turn(&mut self) -> Turn {
        let mut turn = Turn::default();
        loop {
            let e = self.next().await;
            if take(&mut turn, pb::ChatEvent { event: Some(e) }) {
                return turn;
            }
        }
    }

    /// Turns in flight at once on this stream (other sessions), until each
    /// has its final event: by client message id, events matched to their
    /// turn by the reply's id.
    async fn turns(&mut self, n: usize) -> std::collections::HashMap<String, Turn> {
        let mut by_reply: std::collections::HashMap<String, Turn> = Default::default();
        let mut done = 0;
        while done < n {
            let e = self.next().await;
            let id = match &e {
                Ev::Accepted(a) => a.assistant_message_id.clone(),
                Ev::Delta(d) => d.message_id.clone(),
                Ev::Citations(c) => c.message_id.clone(),
                Ev::Completed(c) => c.message_id.clone(),
                Ev::Failed(f) => f.message_id.clone(),
                Ev::Authenticated(_) => continue,
            };
            let turn = by_reply.entry(id).or_default();
            if take(turn, pb::ChatEvent { event: Some(e) }) {
                done += 1;
            }
        }
        by_reply
            .into_values()
            .map(|t| {
                let cid = t
                    .accepted
                    .as_ref()
                    .map(|a| a.client_message_id.clone())
                    .unwrap_or_default();
                (cid, t)
            })
            .collect()
    }
}

/// A new access token for the rig's user (it logs in again).
async fn fresh_token(mesh: &TestMesh) -> String {
    crate::auth::login(&mut auth(mesh).await, "llmuser", crate::auth::PASSWORD)
        .await
        .expect("login")
        .access_token
}

fn failure(e: Ev) -> pb::Failed {
    match e {
        Ev::Failed(f) => f,
        other => panic!("expected a failed event, got {other:?}"),
    }
}

async fn messages(
    c: &mut ChatServiceClient<Channel>,
    token: &str,
    session: &str,
) -> Vec<pb::Message> {
    c.list_messages(bearer(
        pb::ListMessagesRequest {
            session_id: session.into(),
            page_size: 100,
            ..Default::default()
        },
        token,
    ))
    .await
    .expect("messages")
    .into_inner()
    .messages
}

async fn status_of(
    c: &mut ChatServiceClient<Channel>,
    token: &str,
    session: &str,
    id: &str,
) -> pb::MessageStatus {
    let all = messages(c, token, session).await;
    let m = all.iter().find(|m| m.id == id).expect("message");
    pb::MessageStatus::try_from(m.status).expect("status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_created_listed_updated_and_deleted_by_their_owner_only() {
    let r = rig(|_| {}).await;
    let mut c = chat(&r.mesh).await;
    let s1 = new_session(&mut c, &r.token, "").await;
    assert_eq!(s1.model, "fast", "the first model alias is the default");
    assert_eq!(s1.status, pb::SessionStatus::Active as i32);
    let s2 = new_session(&mut c, &r.token, "solo").await;
    let list = c
        .list_sessions(bearer(
            pb::ListSessionsRequest {
                page_size: 1,
                ..Default::default()
            },
            &r.token,
        ))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.sessions[0].id, s2.id, "most recent first");
    let next = c
        .list_sessions(bearer(
            pb::ListSessionsRequest {
                page_size: 1,
                page_token: list.next_page_token,
                ..Default::default()
            },
            &r.token,
        ))
        .await
        .expect("page 2")
        .into_inner();
    assert_eq!(next.sessions[0].id, s1.id);
    assert!(next.next_page_token.is_empty());
    let updated = c
        .update_session(bearer(
            pb::UpdateSessionRequest {
                session: Some(pb::Session {
                    id: s1.id.clone(),
                    title: "Renamed".into(),
                    model: "solo".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["title".into(), "model".into()],
                }),
            },
            &r.token,
        ))
        .await
        .expect("update")
        .into_inner()
        .session
        .expect("session");
    assert_eq!(
        (updated.title.as_str(), updated.model.as_str()),
        ("Renamed", "solo")
    );
    let err = c
        .update_session(bearer(
            pb::UpdateSessionRequest {
                session: Some(pb::Session {
                    id: s1.id.clone(),
                    model: "nope".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["model".into(), "status".into()],
                }),
            },
            &r.token,
        ))
        .await
        .expect_err("invalid");
    assert_eq!(violations(&err), vec!["session.model", "update_mask"]);
    let err = c
        .create_session(bearer(
            pb::CreateSessionRequest {
                title: "x".repeat(201),
                model: "nope".into(),
                ..Default::default()
            },
            &r.token,
        ))
        .await
        .expect_err("invalid");
    assert_eq!(violations(&err), vec!["title", "model"]);

    // Another user sees none of it.
    let other = access(&register(&mut auth(&r.mesh).await, "chatother").await);
    let err = c
        .get_session(bearer(
            pb::GetSessionRequest {
                session_id: s1.id.clone(),
            },
            &other,
        ))
        .await
        .expect_err("idor");
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .update_session(bearer(
            pb::UpdateSessionRequest {
                session: Some(pb::Session {
                    id: s1.id.clone(),
                    title: "x".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["title".into()],
                }),
            },
            &other,
        ))
        .await
        .expect_err("idor");
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .delete_session(bearer(
            pb::DeleteSessionRequest {
                session_id: s1.id.clone(),
            },
            &other,
        ))
        .await
        .expect_err("idor");
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .list_messages(bearer(
            pb::ListMessagesRequest {
                session_id: s1.id.clone(),
                ..Default::default()
            },
            &other,
        ))
        .await
        .expect_err("idor");
    assert_eq!(err.code(), Code::NotFound);
    let listed = c
        .list_sessions(bearer(pb::ListSessionsRequest::default(), &other))
        .await
        .expect("list")
        .into_inner();
    assert!(listed.sessions.is_empty());

    c.delete_session(bearer(
        pb::DeleteSessionRequest {
            session_id: s1.id.clone(),
        },
        &r.token,
    ))
    .await
    .expect("delete");
    let err = c
        .get_session(bearer(
            pb::GetSessionRequest {
                session_id: s1.id.clone(),
            },
            &r.token,
        ))
        .await
        .expect_err("gone");
    assert_eq!(err.code(), Code::NotFound);
    let err = send_message(&mut c, &r.token, send(&s1.id, "hi", ""))
        .await
        .expect_err("gone");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_larger_than_the_in_process_pipe_reaches_the_gateway_whole() {
    // Chat sends every turn of the history to LlmService over the
    // in-process link, whose pipe buffers 256 KiB: nine messages of 31,000
    // characters make the last request larger than that. The model's
    // window holds them all, so the upstream gets the whole of it too.
    let r = rig(|c| {
        if let Some(m) = c.llm.models.get_mut("fast") {
            m.context_window = 200_000;
        }
    })
    .await;
    let mut c = chat(&r.mesh).await;
    let s = new_session(&mut c, &r.token, "fast").await;
    for i in 0..9 {
        let content = format!("turn{i} {}", "word ".repeat(6_200));
        let turn = send_message(&mut c, &r.token, send(&s.id, &content, &format!("big{i}")))
            .await
            .expect("turn");
        assert_eq!(turn.text, "Hello world", "turn {i}: {:?}", turn.failed);
        let seen = r.primary.seen();
        let sent = seen.last().expect("an upstream call").body["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let text = |m: &serde_json::Value| m["content"].as_str().unwrap_or("").to_string();
        // Every turn so far and its answers, in order, this one last.
        let users: Vec<String> = sent
            .iter()
            .filter(|m| m["role"] == "user")
            .map(text)
            .collect();
        assert_eq!(users.len(), i + 1, "turn {i}");
        assert!(
            users
                .iter()
                .enumerate()
                .all(|(k, u)| u.starts_with(&format!("turn{k} ")))
        );
        assert_eq!(users.last(), Some(&content), "turn {i}");
    }
    let total: usize = r.primary.seen().last().expect("call").body["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|m| m["content"].as_str().map_or(0, str::len))
                .sum()
        })
        .unwrap_or(0);
    assert!(total > 256 * 1024, "{total} bytes of conversation");
    let all = messages(&mut c, &r.token, &s.id).await;
    assert_eq!(all.len(), 18);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converse_carries_many_turns_in_order_with_history() {
    let r = rig(|_| {}).await;
    let mut c = chat(&r.mesh).await;
    let s = new_session(&mut c, &r.token, "fast").await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut inbound = c
        .converse(bearer(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            &r.token,
        ))
        .await
        .expect("converse")
        .into_inner();
    for i in 0..3 {
        tx.send(pb::ConverseRequest {
            action: Some(pb::converse_request::Action::Send(send(
                &s.id,
                &format!("turn {i}"),
                &format!("c{i}"),
            ))),
        })
        .await
        .expect("send");
        let mut turn = Turn::default();
        finish(&mut inbound, &mut turn).await;
        let accepted = turn.accepted.expect("accepted");
        assert_eq!(accepted.client_message_id, format!("c{i}"));
        assert!(!accepted.duplicate);
        assert_eq!(turn.text, "Hello world", "turn {i}");
        assert!(turn.offsets_ok);
        let done = turn.completed.expect("completed");
        assert_eq!(done.status, pb::MessageStatus::Completed as i32);
        assert_eq!(done.usage.expect("usage").completion_tokens, 3);
        assert!(done.time_to_first_token.is_some());
    }
    // A malformed request and an invalid turn are error events; the
    // stream goes on.
    tx.send(pb::ConverseRequest { action: None })
        .await
        .expect("send");
    let e = inbound.message().await.expect("event").expect("some");
    assert!(
        matches!(e.event, Some(pb::ChatEvent { event: Some(Ev::Failed(ref f)) }) if f.code == Code::InvalidArgument as i32)
    );
    tx.send(pb::ConverseRequest {
        action: Some(pb::converse_request::Action::Send(send(
            &s.id,
            &"x".repeat(32_001),
            "big",
        ))),
    })
    .await
    .expect("send");
    let e = inbound.message().await.expect("event").expect("some");
    let Some(pb::ChatEvent {
        event: Some(Ev::Failed(f)),
    }) = e.event
    else {
        panic!("{e:?}")
    };
    assert_eq!(f.code, Code::InvalidArgument as i32);
    assert_eq!(f.client_message_id, "big");
    drop(tx);
    assert!(
        inbound.message().await.expect("end").is_none(),
        "the stream ends when the client is done"
    );

    let all = messages(&mut c, &r.token, &s.id).await;
    assert_eq!(all.len(), 6);
    let roles: Vec<i32> = all.iter().map(|m| m.role).collect();
    assert_eq!(roles, [1, 2, 1, 2, 1, 2]);
    assert!(
        all.iter()
            .all(|m| m.status == pb::MessageStatus::Completed as i32)
    );
    assert_eq!(all[5].reply_to, all[4].id);
    assert_eq!(all[5].provider, "primary");
    // The third request carried the whole conversation after the system prompt.
    let seen = r.primary.seen();
    assert_eq!(seen.len(), 3);
    let sent = seen[2].body["messages"]
        .as_array()
        .expect("messages")
        .clone();
    let contents: Vec<&str> = sent
        .iter()
        .map(|m| m["content"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        contents,
        vec![
            "Be helpful.",
            "turn 0",
            "Hello world",
            "turn 1",
            "Hello world",
            "turn 2"
        ]
    );
    // Newest first, paged.
    let page = c
        .list_messages(bearer(
            pb::ListMessagesRequest {
                session_id: s.id.clone(),
                page_size: 4,
                newest_first: true,
                ..Default::default()
            },
            &r.token,
        ))
        .await
        .expect("page")
        .into_inner();
    assert_eq!(page.messages[0].id, all[5].id);
    let page2 = c
        .list_messages(bearer(
            pb::ListMessagesRequest {
                session_id: s.id.clone(),
                page_size: 4,
                newest_first: true,
                page_token: page.next_page_token,
            },
            &r.token,
        ))
        .await
        .expect("page 2")
        .into_inner();
    assert_eq!(
        page2
            .messages
            .iter()
            .map(|m| m.id.clone())
            .collect::<Vec<_>>(),
        vec![all[1].id.clone(), all[0].id.clone()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_send_while_generating_is_refused_and_resends_are_idempotent() {
    let r = rig(|_| {}).await;
    let mut c = chat(&r.mesh).await;
    let s = new_session(&mut c, &r.token, "fast").await;
    r.primary
        .push([Script::slow(6, Duration::from_millis(100))]);
    let mut first = open_send(&mut c, &r.token, send(&s.id, "slow one", "k1")).await;
    let accepted = match next_event(&mut first).await.event {
        Some(Ev::Accepted(a)) => a,
        other => panic!("{other:?}"),
    };
    let err = send_message(&mut c, &r.token, send(&s.id, "meanwhile", "k2"))
        .await
        .expect_err("busy");
    assert_eq!(err.code(), Code::FailedPrecondition);
    // Resending the same client message id: the original turn, followed live.
    let again = send_message(&mut c, &r.token, send(&s.id, "slow one", "k1"))
        .await
        .expect("resend");
    let a2 = again.accepted.expect("accepted");
    assert!(a2.duplicate);
    assert_eq!(a2.user_message_id, accepted.user_message_id);
    assert_eq!(a2.assistant_message_id, accepted.assistant_message_id);
    assert_eq!(again.text, "t0 t1 t2 t3 t4 t5 ");
    assert_eq!(
        again.completed.expect("done").status,
        pb::MessageStatus::Completed as i32
    );
    while first.message().await.expect("rest").is_some() {}
    // And after completion, too: no new message, no upstream call.
    let hits = r.primary.hits();
    let third = send_message(&mut c, &r.token, send(&s.id, "slow one", "k1"))
        .await
        .expect("resend");
    assert!(third.accepted.expect("a").duplicate);
    assert_eq!(third.text, "t0 t1 t2 t3 t4 t5 ");
    assert_eq!(r.primary.hits(), hits);
    assert_eq!(messages(&mut c, &r.token, &s.id).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_on_the_converse_stream_relaying_its_reply_does_not_repeat_the_reply() {
    let r = rig(|_| {}).await;
    let mut c = chat(&r.mesh).await;
    let s = new_session(&mut c, &r.token, "fast").await;
    r.primary.push([Script::slow(8, Duration::from_millis(60))]);
    let mut conv = Conv::open(&mut c, &r.token).await;
    conv.send(send(&s.id, "slow one", "k1")).await;
    let mut turn = Turn::default();
    while turn.text.is_empty() {
        let e = conv.next().await;
        assert!(!take(&mut turn, pb::ChatEvent { event: Some(e) }));
    }
    let first = turn.accepted.clone().expect("accepted");
    assert!(!first.duplicate);
    // The client resends the turn on the same stream while its reply is
    // still coming: acknowledged as the original, and the reply's events
    // go on arriving once each.
    conv.send(send(&s.id, "slow one", "k1")).await;
    let mut acks = Vec::new();
    let completed = loop {
        match conv.next().await {
            Ev::Accepted(a) => acks.push(a),
            Ev::Delta(d) => {
                assert_eq!(d.offset as usize, turn.text.len(), "no delta twice");
                turn.text.push_str(&d.text);
            }
            Ev::Completed(done) => break done,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(acks.len(), 1);
    assert!(acks[0].duplicate);
    assert_eq!(acks[0].assistant_message_id, first.assistant_message_id);
    assert_eq!(completed.message_id, first.assistant_message_id);
    assert_eq!(turn.text, "t0 t1 t2 t3 t4 t5 t6 t7 ");
    let quiet = tokio::time::timeout(Duration::from_millis(300), conv.rx.message()).await;
    assert!(quiet.is_err(), "nothing after the one completed: {quiet:?}");
    // Once the reply is over, a resend replays it whole.
    conv.send(send(&s.id, "slow one", "k1")).await;
    let replay = conv.turn().await;
    assert!(replay.accepted.expect("accepted").duplicate);
    assert_eq!(replay.text, "t0 t1 t2 t3 t4 t5 t6 t7 ");
    assert!(replay.offsets_ok);
    assert_eq!(
        replay.completed.expect("completed").status,
        pb::MessageStatus::Completed as i32
    );
    assert_eq!(messages(&mut c, &r.token, &s.id).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_upstream_and_keeps_the_partial_reply() {
    let r = rig(|_| {}).await;
    let mut c = chat(&r.mesh).await;
    let s = new_session(&mut c, &r.token, "fast").await;
    r.primary
        .push([Script::slow(40, Duration::from_millis(100))]);
    let mut stream = open_send(&mut c, &r.token, send(&s.id, "long", "")).await;
    let mut turn = Turn::default();
    read_until(&mut stream, &mut turn, |t| t.text.len() >= 6).await;
    let id = turn
        .accepted
        .as_ref()
        .expect("accepted")
        .assistant_message_id
        .clone();
    // Another user cannot cancel it.
    let other = access(&register(&mut auth(&r.mesh).await, "canceller").await);
    let err = c
        .cancel_generation(bearer(
            pb::CancelGenerationRequest {
                message_id: id.clone(),
            },
            &other,
        ))
        .await
        .expect_err("idor");
    assert_eq!(err.code(), Code::NotFound);
    let res = c
        .cancel_generation(bearer(
            pb::CancelGenerationRequest {
                message_id: id.clone(),
            },
            &r.token,
        ))
        .await
        .expect("cancel")
        .into_inner();
    assert!(res.cancelled);
    finish(&mut stream, &mut turn).await;
    let done = turn.completed.expect("completed");
    assert_eq!(done.status, pb::MessageStatus::Cancelled as i32);
    assert!(
        eventually(Duration::from_secs(3), || async {
            r.primary.abandoned() == 1
        })
        .await,
        "the upstream saw the disconnect"
    );
    let stored = messages(&mut c, &r.token, &s.id).await;
    assert_eq!(stored[1].status, pb::MessageStatus::Cancelled as i32);
    assert_eq!(stored[1].content, turn.text);
    assert!(!stored[1].content.is_empty() && stored[1].content.len() < 40 * 4);
    // Already finished: nothing to cancel.
    let res = c
        .cancel_generation(bearer(
            pb::CancelGenerationRequest { message_id: id },
            &r.token,
        ))
        .await
        .expect("cancel")
        .into_inner();
    assert!(!res.cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_is_searchable_once_it_has_stopped_streaming() {
    let r = rig(|_| {}).await;
    let mut c = chat(&r.mesh).await;
    let s = new_session(&mut c, &r.token, "fast").await;
    r.primary
        .push([Script::slow(30, Duration::from_millis(60))]);
    let mut stream = open_send(&mut c, &r.token, send(&s.id, "count for me", "")).await;
    let accepted = match next_event(&mut stream).await.event {
        Some(Ev::Accepted(a)) => a,
        other => panic!("{other:?}"),
    };
    let search = |c: &mut ChatServiceClient<Channel>, t: &str| {
        let mut c = c.clone();
        let t = t.to_string();
        async move {
            c.search_messages(bearer(
                pb::SearchMessagesRequest {
                    query: "t2".into(),
                    ..Default::default()
                },
                &t,
            ))
            .await
            .expect("search")
            .into_inner()
            .hits
        }
    };
    // Flushed while it grows, but not searchable yet.
    let sid = s.id.clone();
    let flushed = eventually(Duration::from_secs(5), || {
        let mut c = c.clone();
        let (t, sid) = (r.token.clone(), sid.clone());
        async move {
            let m = messages(&mut c, &t, &sid).await;
            m.len() == 2
                && m[1].status == pb::MessageStatus::Streaming as i32
                && m[1].content.contains("t2 ")
        }
    })
    .await;
    assert!(flushed, "the growing reply is stored");
    assert!(search(&mut c, &r.token).await.is_empty());
    let mut turn = Turn::default();
    finish(&mut stream, &mut turn).await;
    assert!(turn.text.starts_with("t0 t1 t2 "), "{}", turn.text);
    let hits = search(&mut c, &r.token).await;
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0].message_id, accepted.assistant_message_id);
    assert!(
        hits[0].snippet.contains("<mark>t2</mark>"),
        "{}",
        hits[0].snippet
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_outlives_its_client_and_can_be_regenerated() {
    let r = rig(|_| {}).await;
    let mut c = chat(&r.mesh).await;
    let s = new_session(&mut c, &r.token, "fast").await;
    r.primary.push([Script::slow(8, Duration::from_millis(50))]);
    let mut stream = open_send(&mut c, &r.token, send(&s.id, "go on", "")).await;
    let accepted = match next_event(&mut stream).await.event {
        Some(Ev::Accepted(a)) => a,
        other => panic!("{other:?}"),
    };
    drop(stream);
    let id = accepted.assistant_message_id.clone();
    let sid = s.id.clone();
    let done = eventually(Duration::from_secs(5), || {
        let mut c = c.clone();
        let (t, sid, id) = (r.token.clone(), sid.clone(), id.clone());
        async move { status_of(&mut c, &t, &sid, &id).await == pb::MessageStatus::Completed }
    })
    .await;
    assert!(done);
    let stored = messages(&mut c, &r.token, &s.id).await;
    assert_eq!(stored[1].content, "t0 t1 t2 t3 t4 t5 t6 t7 ");
    assert_eq!(r.primary.abandoned(), 0, "generation ran to completion");

    // Regenerate: a new reply to the same user turn; the first is kept.
    let mut regen = c
        .regenerate_message(bearer(
            pb::RegenerateMessageRequest {
                message_id: id.clone(),
            },
            &r.token,
        ))
        .await
        .expect("regenerate")
        .into_inner();
    let mut turn = Turn::default();
    finish(&mut regen, &mut turn).await;
    assert_eq!(turn.text, "Hello world");
    let a = turn.accepted.expect("accepted");
    assert_eq!(a.user_message_id, accepted.user_message_id);
    assert_ne!(a.assistant_message_id, id);
    let stored = messages(&mut c, &r.token, &s.id).await;
    assert_eq!(stored.len(), 3);
    assert_eq!(stored[2].reply_to, stored[0].id);
    // The regenerated request did not include the earlier answer.
    let last = r.primary.seen().pop().expect("request");
    let contents: Vec<String> = last.body["messages"]
        .as_array()
        .expect("m")
        .iter()
        .map(|m| m["content"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(contents, vec!["Be helpful.", "go on"]);
    // Only assistant messages can be regenerated; others' are NOT_FOUND.
    let err = c
        .regenerate_message(bearer(
            pb::RegenerateMessageRequest {
                message_id: accepted.user_message_id.clone(),
            },
            &r.token,
        ))
        .await
        .expect_err("user message");
    assert_eq!(violations(&err), vec!["message_id"]);
    let other = access(&register(&mut auth(&r.mesh).await, "regen").await);
    let err = c
        .regenerate_message(bearer(
            pb::RegenerateMessageRequest {
                message_id: id.clone(),
            },
            &other,
        ))
        .await
        .expect_err("idor");
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .watch_message(bearer(
            pb::WatchMessageRequest {
                message_id: id,
                offset: 0,
            },
            &other,
        ))
        .await
        .expect_err("idor");
    assert_eq!(err.code(), Code::NotFound);
}

async fn split_rig() -> (Vec<TestMesh>, FakeLlm, String) {
    let primary = FakeLlm::start(Script::ok(&["Hel", "lo", " world"], Some((12, 3)))).await;
    let backup = FakeLlm::start(Script::ok(&["from", " backup"], Some((12, 2)))).await;
    let all = [
        ServiceName::Auth,
        ServiceName::User,
        ServiceName::Llm,
        ServiceName::Search,
        ServiceName::Chat,
    ];
    let meshes = split_with(&[&all, &[ServiceName::Chat]], |c| {
        configure(c, &primary, &backup)
    })
    .await;
    let token = access(&register(&mut auth(&meshes[0]).await, "splitter").await);
    drop(backup);
    (meshes, primary, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_and_cancel_work_from_another_server() {
    let (meshes, primary, token) = split_rig().await;
    let mut a = chat(&meshes[0]).await;
    let mut b = chat(&meshes[1]).await;
    let s = new_session(&mut a, &token, "fast").await;
    primary.push([Script::slow(10, Duration::from_millis(80))]);
    let mut stream = open_send(&mut a, &token, send(&s.id, "tell me", "")).await;
    let mut turn = Turn::default();
    read_until(&mut stream, &mut turn, |t| t.text.len() >= 6).await;
    let id = turn
        .accepted
        .as_ref()
        .expect("accepted")
        .assistant_message_id
        .clone();
    // Server B replays what exists and follows live.
    let mut watch = b
        .watch_message(bearer(
            pb::WatchMessageRequest {
                message_id: id.clone(),
                offset: 0,
            },
            &token,
        ))
        .await
        .expect("watch")
        .into_inner();
    let mut watched = Turn::default();
    finish(&mut watch, &mut watched).await;
    assert_eq!(watched.text, "t0 t1 t2 t3 t4 t5 t6 t7 t8 t9 ");
    assert!(watched.offsets_ok, "contiguous offsets");
    assert_eq!(
        watched.completed.expect("done").status,
        pb::MessageStatus::Completed as i32
    );
    // Resuming from an offset sends only the rest.
    let mut resumed = b
        .watch_message(bearer(
            pb::WatchMessageRequest {
                message_id: id.clone(),
                offset: 27,
            },
            &token,
        ))
        .await
        .expect("resume")
        .into_inner();
    let first = next_event(&mut resumed).await;
    let Some(Ev::Delta(d)) = first.event else {
        panic!("{first:?}")
    };
    assert_eq!((d.offset, d.text.as_str()), (27, "t9 "));
    while stream.message().await.expect("rest").is_some() {}

    // Cancel on B stops a generation running on A.
    primary.push([Script::slow(50, Duration::from_millis(80))]);
    let mut stream = open_send(&mut a, &token, send(&s.id, "again", "")).await;
    let mut turn = Turn::default();
    read_until(&mut stream, &mut turn, |t| t.text.len() >= 3).await;
    let id = turn
        .accepted
        .as_ref()
        .expect("accepted")
        .assistant_message_id
        .clone();
    let res = b
        .cancel_generation(bearer(
            pb::CancelGenerationRequest { message_id: id },
            &token,
        ))
        .await
        .expect("cancel")
        .into_inner();
    assert!(res.cancelled);
    finish(&mut stream, &mut turn).await;
    assert_eq!(
        turn.completed.expect("completed").status,
        pb::MessageStatus::Cancelled as i32
    );
    assert!(
        eventually(Duration::from_secs(3), || async {
            primary.abandoned() == 1
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_conversations_all_get_their_own_reply() {
    // The pool of a real deployment, not the suite's small default; health
    // probes patient enough for a loaded test machine.
    let r = rig(|c| {
        c.database.pool_size = 16;
        c.database.acquire_timeout = Duration::from_secs(5);
        c.server.health_check_interval = Duration::from_secs(2);
    })
    .await;
    r.primary.set_fallback(Script::Echo {
        gap: Duration::from_millis(5),
    });
    let c = chat(&r.mesh).await;
    let mut tasks = Vec::new();
    // 70 over SendMessage, one conversation each.
    for i in 0..70 {
        let mut c = c.clone();
        let token = r.token.clone();
        tasks.push(tokio::spawn(async move {
            let s = new_session(&mut c, &token, "fast").await;
            let q = format!("question number {i} of the browsers");
            let turn = send_message(&mut c, &token, send(&s.id, &q, ""))
                .await
                .expect("turn");
            assert!(turn.offsets_ok);
            vec![(q, turn)]
        }));
    }
    // 30 over 10 Converse streams, three conversations in flight on each.
    for i in 0..10 {
        let mut c = c.clone();
        let token = r.token.clone();
        tasks.push(tokio::spawn(async move {
            let mut conv = Conv::open(&mut c, &token).await;
            let mut questions = Vec::new();
            for j in 0..3 {
                let s = new_session(&mut c, &token, "fast").await;
                let q = format!("stream {i} conversation {j}");
                conv.send(send(&s.id, &q, &q)).await;
                questions.push(q);
            }
            let mut turns = conv.turns(3).await;
            questions
                .into_iter()
                .map(|q| {
                    let t = turns.remove(&q).expect("a turn per question");
                    (q, t)
                })
                .collect()
        }));
    }
    let mut n = 0;
    for t in tasks {
        for (q, turn) in t.await.expect("task") {
            assert_eq!(turn.text, echo_reply(&q), "{:?}", turn.failed);
            assert!(turn.offsets_ok, "{q}");
            assert_eq!(
                turn.completed.map(|d| d.status),
                Some(pb::MessageStatus::Completed as i32)
            );
            n += 1;
        }
    }
    assert_eq!(n, 100);
    assert_eq!(r.primary.hits(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converse_keeps_turns_apart_refuses_a_busy_session_and_cancels() {
    let r = rig(|_| {}).await;
    r.primary.set_fallback(Script::echo());
    let mut c = chat(&r.mesh).await;
    let s = new_session(&mut c, &r.token, "fast").await;
    let mut conv = Conv::open(&mut c, &r.token).await;
    // Many turns, one after another: each its own reply, in order.
    for i in 0..12 {
        let q = format!("turn {i}: {}", "abc".repeat(i));
        conv.send(send(&s.id, &q, &format!("t{i}"))).await;
        let turn = conv.turn().await;
        assert_eq!(turn.accepted.expect("a").client_message_id, format!("t{i}"));
        assert_eq!(turn.text, echo_reply(&q));
        assert!(turn.offsets_ok);
    }
    let stored = messages(&mut c, &r.token, &s.id).await;
    assert_eq!(stored.len(), 24);
    for (i, pair) in stored.chunks(2).enumerate() {
        assert_eq!(pair[1].content, echo_reply(&pair[0].content), "turn {i}");
        assert_eq!(pair[1].reply_to, pair[0].id);
    }

    // Turns in three sessions at once on one stream: interleaved events,
    // each reply whole and its own.
    r.primary.set_fallback(Script::Echo {
        gap: Duration::from_millis(10),
    });
    let mut questions = Vec::new();
    for k in 0..3 {
        let other = new_session(&mut c, &r.token, "fast").await;
        let q = format!("parallel question {k} with some length to it");
        conv.send(send(&other.id, &q, &q)).await;
        questions.push(q);
    }
    let turns = conv.turns(3).await;
    for q in &questions {
        let t = &turns[q];
        assert_eq!(t.text, echo_reply(q));
        assert!(t.offsets_ok);
    }

    // A second send while the session's reply is generating: an error
    // event for that send; the first reply goes on undisturbed.
    r.primary
        .push([Script::slow(10, Duration::from_millis(60))]);
    conv.send(send(&s.id, "slow", "first")).await;
    let Ev::Accepted(first) = conv.next().await else {
        panic!("accepted")
    };
    conv.send(send(&s.id, "meanwhile", "second")).await;
    let mut turn = Turn::default();
    let refused = loop {
        match conv.next().await {
            Ev::Failed(f) if f.client_message_id == "second" => break f,
            e => {
                assert!(!take(&mut turn, pb::ChatEvent { event: Some(e) }));
            }
        }
    };
    assert_eq!(refused.code, Code::FailedPrecondition as i32);
    assert!(refused.message_id.is_empty());
    let rest = conv.turn().await;
    turn.text.push_str(&rest.text);
    assert_eq!(turn.text, "t0 t1 t2 t3 t4 t5 t6 t7 t8 t9 ");
    assert_eq!(
        rest.completed.expect("done").message_id,
        first.assistant_message_id
    );

    // `cancel` on the stream stops the reply and keeps what it had.
    r.primary
        .push([Script::slow(40, Duration::from_millis(60))]);
    conv.send(send(&s.id, "long", "long")).await;
    let mut turn = Turn::default();
    while turn.text.len() < 6 {
        let e = conv.next().await;
        take(&mut turn, pb::ChatEvent { event: Some(e) });
    }
    let id = turn.accepted.clone().expect("a").assistant_message_id;
    // Another user's stream can neither cancel it nor send into the session.
    let other = access(&register(&mut auth(&r.mesh).await, "intruder").await);
    let mut theirs = Conv::open(&mut c, &other).await;
    theirs.cancel(&id).await;
    assert_eq!(failure(theirs.next().await).code, Code::NotFound as i32);
    theirs.send(send(&s.id, "hijack", "h")).await;
    let f = failure(theirs.next().await);
    assert_eq!(
        (f.code, f.client_message_id.as_str()),
        (Code::NotFound as i32, "h")
    );
    conv.cancel(&id).await;
    loop {
        let e = conv.next().await;
        if take(&mut turn, pb::ChatEvent { event: Some(e) }) {
            break;
        }
    }
    let done = turn.completed.expect("completed");
    assert_eq!(done.status, pb::MessageStatus::Cancelled as i32);
    assert!(
        eventually(Duration::from_secs(3), || async {
            r.primary.abandoned() == 1
        })
        .await,
        "the upstream saw the cancel"
    );
    let stored = messages(&mut c, &r.token, &s.id).await;
    let reply = stored.iter().find(|m| m.id == id).expect("reply");
    assert_eq!(reply.status, pb::MessageStatus::Cancelled as i32);
    assert_eq!(reply.content, turn.text);
    assert!(turn.text.len() < 40 * 4);
    assert!(
        !stored
            .iter()
            .any(|m| m.content == "hijack" || m.content == "meanwhile"),
        "refused sends stored nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_leaves_every_reply_completed_or_interrupted() {
    let primary = FakeLlm::start(Script::slow(100, Duration::from_millis(50))).await;
    let backup = FakeLlm::start(Script::ok(&["b"], None)).await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let infra = trellis_tests::infra().await;
    let mut config = trellis_tests::mesh::test_config(
        infra.fresh_database().await,
        infra.redis_url.clone(),
        infra.fresh_prefix(),
    );
    configure(&mut config, &primary, &backup);
    let mesh = TestMesh::start_on(listener, config, async {
        let _ = stop_rx.await;
    })
    .await;
    let token = access(&register(&mut auth(&mesh).await, "shutter").await);
    let mut c = chat(&mesh).await;
    let mut streams = Vec::new();
    let mut sessions = Vec::new();
    for _ in 0..3 {
        let s = new_session(&mut c, &token, "fast").await;
        let mut st = open_send(&mut c, &token, send(&s.id, "long", "")).await;
        // Wait for the first delta.
        loop {
            let e = next_event(&mut st).await;
            if matches!(e.event, Some(Ev::Delta(_))) {
                break;
            }
        }
        streams.push(st);
        sessions.push(s.id);
    }
    let store = mesh.store.clone();
    stop_tx.send(()).expect("stop");
    for mut st in streams {
        let mut turn = Turn::default();
        while let Ok(Some(m)) = st.message().await {
            if take(&mut turn, m.event.expect("e")) {
                break;
            }
        }
        let f = turn.failed.expect("the client hears of the interruption");
        assert_eq!(f.status, pb::MessageStatus::Interrupted as i32);
    }
    mesh.wait().await.expect("clean stop");
    use diesel::prelude::*;
    use diesel_async::RunQueryDsl;
    use trellis_store::schema::chat_messages as m;
    let mut conn = store.pg().await.expect("pg");
    let statuses: Vec<String> = m::table
        .filter(m::role.eq("assistant"))
        .select(m::status)
        .load(&mut conn)
        .await
        .expect("statuses");
    assert_eq!(statuses.len(), 3);
    assert!(
        statuses
            .iter()
            .all(|s| s == "interrupted" || s == "completed"),
        "{statuses:?}"
    );
    let contents: Vec<String> = m::table
        .filter(m::role.eq("assistant"))
        .select(m::content)
        .load(&mut conn)
        .await
        .expect("content");
    assert!(
        contents.iter().all(|c| c.starts_with("t0 ")),
        "partial content kept: {contents:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_preferences_retrieval_and_expiry() {
    let r: Rig = rig(|_| {}).await;
    let mut c = chat(&r.mesh).await;
    // Preferences reach the system prompt.
    let mut users = trellis_proto::user::v1::user_service_client::UserServiceClient::new(
        r.mesh.channel().await,
    );
    users
        .update_preferences(bearer(
            trellis_proto::user::v1::UpdatePreferencesRequest {
                preferences: Some(trellis_proto::user::v1::Preferences {
                    communication_style: trellis_proto::user::v1::CommunicationStyle::Formal as i32,
                    ..Default::default()
                }),
                update_mask: None,
            },
            &r.token,
        ))
        .await
        .expect("preferences");
    let s = new_session(&mut c, &r.token, "fast").await;
    send_message(
        &mut c,
        &r.token,
        send(&s.id, "quarterly kubernetes migration", ""),
    )
    .await
    .expect("turn");
    let system = r.primary.seen()[0].body["messages"][0]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        system.contains("Be helpful.") && system.contains("formal"),
        "{system}"
    );

    // Full-text search over one's own messages.
    let hits = c
        .search_messages(bearer(
            pb::SearchMessagesRequest {
                query: "kubernetes".into(),
                ..Default::default()
            },
            &r.token,
        ))
        .await
        .expect("search")
        .into_inner()
        .hits;
    assert_eq!(hits.len(), 1);
    assert!(hits[0].snippet.contains("<mark>kubernetes</mark>"));
    let other = access(&register(&mut auth(&r.mesh).await, "snooper").await);
    let none = c
        .search_messages(bearer(
            pb::SearchMessagesRequest {
                query: "kubernetes".into(),
                ..Default::default()
            },
            &other,
        ))
        .await
        .expect("search")
        .into_inner()
        .hits;
    assert!(none.is_empty());
    let err = c
        .search_messages(bearer(
            pb::SearchMessagesRequest {
                query: "x".into(),
                session_id: s.id.clone(),
                ..Default::default()
            },
            &other,
        ))
        .await
        .expect_err("idor");
    assert_eq!(err.code(), Code::NotFound);

    // A retrieval session streams citations and stores them.
    let mut search = crate::search::search_client(&r.mesh).await;
    let mut d = crate::search::doc(
        "kb",
        "1",
        "Migration runbook",
        "Steps for the kubernetes migration.",
    );
    d.visibility = trellis_proto::search::v1::Visibility::Shared as i32;
    crate::search::index(&mut search, &r.token, vec![d]).await;
    let rs = c
        .create_session(bearer(
            pb::CreateSessionRequest {
                title: "rag".into(),
                model: "fast".into(),
                retrieval: true,
                ..Default::default()
            },
            &r.token,
        ))
        .await
        .expect("session")
        .into_inner()
        .session
        .expect("s");
    let turn = send_message(
        &mut c,
        &r.token,
        send(&rs.id, "How do we do the kubernetes migration?", ""),
    )
    .await
    .expect("turn");
    assert_eq!(turn.citations.len(), 1);
    assert_eq!(turn.citations[0].title, "Migration runbook");
    let stored = messages(&mut c, &r.token, &rs.id).await;
    assert_eq!(stored[1].citations.len(), 1);

    // An expired session is read-only.
    age_session(&r.mesh, &s.id, chrono::Duration::days(365)).await;
    assert_eq!(
        session_status(&mut c, &r.token, &s.id).await,
        pb::SessionStatus::Expired as i32
    );
    let err = send_message(&mut c, &r.token, send(&s.id, "still there?", ""))
        .await
        .expect_err("expired");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(messages(&mut c, &r.token, &s.id).await.len(), 2, "readable");
    let expired = c
        .list_sessions(bearer(
            pb::ListSessionsRequest {
                status: pb::SessionStatus::Expired as i32,
                ..Default::default()
            },
            &r.token,
        ))
        .await
        .expect("list")
        .into_inner()
        .sessions;
    assert_eq!(
        expired.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
        vec![s.id]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_stalls_nobody_and_still_gets_every_byte() {
    let r = rig(|c| c.chat.stream_buffer = 8).await;
    let mut c = chat(&r.mesh).await;
    let slow_session = new_session(&mut c, &r.token, "fast").await;
    let fast_session = new_session(&mut c, &r.token, "fast").await;
    let pieces: Vec<String> = (0..3000).map(|i| format!("w{i} ")).collect();
    let expected: String = pieces.concat();
    r.primary.push([Script::Stream {
        pieces,
        usage: Some((5, 3000)),
        first_delay: Duration::ZERO,
        gap: Duration::ZERO,
    }]);
    let mut slow = open_send(&mut c, &r.token, send(&slow_session.id, "flood me", "")).await;
    let first = next_event(&mut slow).await;
    assert!(matches!(first.event, Some(Ev::Accepted(_))));
    // The flood script is taken by the slow conversation's upstream call,
    // not the next one's.
    let fake = &r.primary;
    assert!(eventually(Duration::from_secs(5), || async move { fake.hits() >= 1 }).await);
    // While the slow reader reads nothing, another conversation completes.
    let t = std::time::Instant::now();
    let other = send_message(&mut c, &r.token, send(&fast_session.id, "quick", ""))
        .await
        .expect("other");
    assert_eq!(other.text, "Hello world");
    assert!(t.elapsed() < Duration::from_secs(3));
    // The flood was generated and stored in full without the reader.
    let slow_id = {
        let all = messages(&mut c, &r.token, &slow_session.id).await;
        all[1].id.clone()
    };
    let stored = eventually(Duration::from_secs(10), || {
        let mut c = c.clone();
        let (t, s, id) = (r.token.clone(), slow_session.id.clone(), slow_id.clone());
        async move { status_of(&mut c, &t, &s, &id).await == pb::MessageStatus::Completed }
    })
    .await;
    assert!(stored);
    // Now it reads: caught up from the stored content, every byte once.
    let mut turn = Turn::default();
    finish(&mut slow, &mut turn).await;
    assert!(turn.offsets_ok, "no gap, no overlap");
    assert_eq!(turn.text.len(), expected.len());
    assert_eq!(turn.text, expected);
    assert_eq!(
        turn.completed.expect("done").status,
        pb::MessageStatus::Completed as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_converse_stream_outlives_its_access_token_through_authenticate() {
    let ttl = Duration::from_secs(10);
    let r = rig(|c| c.auth.access_token_ttl = ttl).await;
    let expires = tokio::time::Instant::now() + ttl;
    let mut c = chat(&r.mesh).await;
    let s = new_session(&mut c, &r.token, "fast").await;
    let mut conv = Conv::open(&mut c, &r.token).await;
    conv.send(send(&s.id, "before", "b")).await;
    assert_eq!(conv.turn().await.text, "Hello world");

    // The access token the stream was opened with expires: a turn is
    // refused with UNAUTHENTICATED, stores nothing, and the stream stays.
    tokio::time::sleep_until(expires + Duration::from_millis(500)).await;
    conv.send(send(&s.id, "after", "late")).await;
    let f = failure(conv.next().await);
    assert_eq!(f.code, Code::Unauthenticated as i32, "{f:?}");
    assert_eq!(f.client_message_id, "late");
    assert!(f.message.contains("authenticate"), "{}", f.message);
    conv.cancel(&uuid::Uuid::now_v7().to_string()).await;
    assert_eq!(
        failure(conv.next().await).code,
        Code::Unauthenticated as i32
    );
    assert_eq!(
        messages(&mut c, &fresh_token(&r.mesh).await, &s.id)
            .await
            .len(),
        2
    );

    // Another user's token cannot take the stream over; a bad one is
    // refused; neither replaces the credentials.
    let other = access(&register(&mut auth(&r.mesh).await, "takeover").await);
    conv.authenticate(&other).await;
    assert_eq!(
        failure(conv.next().await).code,
        Code::PermissionDenied as i32
    );
    conv.authenticate("not-a-token").await;
    assert_eq!(
        failure(conv.next().await).code,
        Code::Unauthenticated as i32
    );
    conv.authenticate("").await;
    assert_eq!(
        failure(conv.next().await).code,
        Code::InvalidArgument as i32
    );
    conv.send(send(&s.id, "after", "late")).await;
    assert_eq!(
        failure(conv.next().await).code,
        Code::Unauthenticated as i32
    );

    // A fresh token of the same user: turns work again on the same stream.
    let fresh = fresh_token(&r.mesh).await;
    conv.authenticate(&fresh).await;
    let Ev::Authenticated(a) = conv.next().await else {
        panic!("authenticated expected")
    };
    let exp = a.expire_time.expect("expire time").seconds;
    assert!(exp > chrono::Utc::now().timestamp(), "{exp}");
    conv.send(send(&s.id, "after", "late")).await;
    let turn = conv.turn().await;
    assert_eq!(turn.text, "Hello world", "{:?}", turn.failed);
    assert_eq!(turn.accepted.expect("accepted").client_message_id, "late");
    assert_eq!(messages(&mut c, &fresh, &s.id).await.len(), 4);
    // The gateway heard the turn with the fresh credentials.
    assert_eq!(r.primary.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_replies_whose_replica_is_gone_are_swept() {
    let r = rig(|c| c.chat.stale_after = Duration::from_millis(300)).await;
    let mut c = chat(&r.mesh).await;
    let s = new_session(&mut c, &r.token, "fast").await;
    // The first token takes five sweep thresholds: the reply is alive
    // (heartbeat) all along — never swept — and completes with its content.
    r.primary.push([Script::Stream {
        pieces: vec!["slow".into(), " start".into()],
        usage: Some((3, 2)),
        first_delay: Duration::from_millis(1500),
        gap: Duration::ZERO,
    }]);
    let mut stream = open_send(&mut c, &r.token, send(&s.id, "take your time", "")).await;
    let Some(Ev::Accepted(a)) = next_event(&mut stream).await.event else {
        panic!("accepted first")
    };
    let waiting = std::time::Instant::now();
    while waiting.elapsed() < Duration::from_millis(1200) {
        let now = status_of(&mut c, &r.token, &s.id, &a.assistant_message_id).await;
        assert_eq!(now, pb::MessageStatus::Streaming, "swept while alive");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut turn = Turn::default();
    finish(&mut stream, &mut turn).await;
    assert!(turn.failed.is_none(), "{:?}", turn.failed);
    assert_eq!(turn.text, "slow start");
    let stored = messages(&mut c, &r.token, &s.id).await;
    assert_eq!(stored[1].status, pb::MessageStatus::Completed as i32);
    assert_eq!(stored[1].content, "slow start");

    // A reply left STREAMING by a replica that died (its heartbeat is old)
    // is swept INTERRUPTED, its partial content kept, and a watcher is told.
    let orphan = uuid::Uuid::now_v7();
    {
        use diesel::prelude::*;
        use diesel_async::RunQueryDsl;
        use trellis_store::schema::chat_messages as m;
        let mut conn = r.mesh.store.pg().await.expect("pg");
        diesel::insert_into(m::table)
            .values((
                m::id.eq(orphan),
                m::session_id.eq(uuid::Uuid::parse_str(&s.id).expect("id")),
                m::user_id.eq(uuid::Uuid::parse_str(&r.user_id).expect("id")),
                m::role.eq("assistant"),
                m::content.eq("half an ans"),
                m::status.eq("streaming"),
                m::reply_to.eq(uuid::Uuid::parse_str(&stored[0].id).expect("id")),
                m::model.eq("fast"),
                m::heartbeat_at.eq(chrono::Utc::now() - chrono::Duration::hours(1)),
            ))
            .execute(&mut conn)
            .await
            .expect("orphan");
    }
    let swept = eventually(Duration::from_secs(5), || {
        let mut c = c.clone();
        let (t, sid, id) = (r.token.clone(), s.id.clone(), orphan.to_string());
        async move { status_of(&mut c, &t, &sid, &id).await == pb::MessageStatus::Interrupted }
    })
    .await;
    assert!(swept, "the orphan is swept");
    let all = messages(&mut c, &r.token, &s.id).await;
    let o = all
        .iter()
        .find(|m| m.id == orphan.to_string())
        .expect("orphan");
    assert_eq!(o.content, "half an ans");
    let mut watch = c
        .watch_message(bearer(
            pb::WatchMessageRequest {
                message_id: orphan.to_string(),
                offset: 0,
            },
            &r.token,
        ))
        .await
        .expect("watch")
        .into_inner();
    let mut watched = Turn::default();
    finish(&mut watch, &mut watched).await;
    assert_eq!(watched.text, "half an ans");
    assert_eq!(
        watched.failed.expect("failed").status,
        pb::MessageStatus::Interrupted as i32
    );
    // The live reply completed earlier was never touched.
    assert_eq!(
        status_of(&mut c, &r.token, &s.id, &stored[1].id).await,
        pb::MessageStatus::Completed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_deadline_bounds_its_reply_and_the_server_default_does_not() {
    // The server's default timeout is shorter than the replies: it does
    // not apply to generations.
    let r = rig(|c| c.server.default_timeout = Duration::from_secs(1)).await;
    let mut c = chat(&r.mesh).await;
    let s = new_session(&mut c, &r.token, "fast").await;
    r.primary
        .push([Script::slow(15, Duration::from_millis(100))]);
    let turn = send_message(&mut c, &r.token, send(&s.id, "no deadline", ""))
        .await
        .expect("turn");
    assert!(turn.failed.is_none(), "{:?}", turn.failed);
    assert_eq!(turn.text.len(), "t0 ".len() * 10 + "t10 ".len() * 5);

    // A deadline the client set ends the reply FAILED with
    // DEADLINE_EXCEEDED, stops the upstream and keeps the partial reply.
    r.primary
        .push([Script::slow(40, Duration::from_millis(100))]);
    let mut req = bearer(
        pb::SendMessageRequest {
            send: Some(send(&s.id, "with a deadline", "")),
        },
        &r.token,
    );
    req.set_timeout(Duration::from_millis(1500));
    let t = std::time::Instant::now();
    let mut stream = c.send_message(req).await.expect("send").into_inner();
    let mut turn = Turn::default();
    finish(&mut stream, &mut turn).await;
    let f = turn.failed.expect("failed");
    assert_eq!(f.code, Code::DeadlineExceeded as i32, "{f:?}");
    assert_eq!(f.status, pb::MessageStatus::Failed as i32);
    assert!(
        t.elapsed() < Duration::from_millis(3000),
        "{:?}",
        t.elapsed()
    );
    assert!(!turn.text.is_empty() && turn.text.len() < 40 * 4);
    let stored = messages(&mut c, &r.token, &s.id).await;
    assert_eq!(stored[3].status, pb::MessageStatus::Failed as i32);
    assert_eq!(stored[3].content, turn.text, "partial content kept");
    assert!(
        eventually(Duration::from_secs(3), || async {
            r.primary.abandoned() == 1
        })
        .await,
        "the upstream was stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_preferences_fetch_is_bounded_and_cancellable() {
    // UserService is a black hole: connections are accepted, never answered.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hole_addr = hole.local_addr().expect("addr");
    let _hole = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hole.accept().await {
            held.push(socket);
        }
    });
    let primary = FakeLlm::start(Script::ok(&["Hel", "lo", " world"], Some((12, 3)))).await;
    let backup = FakeLlm::start(Script::ok(&["b"], None)).await;
    let services: Vec<ServiceName> = ServiceName::ALL
        .into_iter()
        .filter(|s| *s != ServiceName::User)
        .collect();
    let mesh = TestMesh::start_with(
        trellis_tests::TestOptions {
            services: Some(services),
            ..Default::default()
        },
        |c| {
            configure(c, &primary, &backup);
            c.services.user = Some(trellis_core::config::Endpoint {
                address: format!("http://{hole_addr}"),
            });
            c.chat.preferences_timeout = Duration::from_secs(3);
        },
    )
    .await;
    let token = access(&register(&mut auth(&mesh).await, "prefless").await);
    let mut c = chat(&mesh).await;
    let s = new_session(&mut c, &token, "fast").await;

    // Cancelled while the preferences are being fetched: stopped at once.
    let t = std::time::Instant::now();
    let mut stream = open_send(&mut c, &token, send(&s.id, "cancel me", "")).await;
    let Some(Ev::Accepted(a)) = next_event(&mut stream).await.event else {
        panic!("accepted first")
    };
    let res = c
        .cancel_generation(bearer(
            pb::CancelGenerationRequest {
                message_id: a.assistant_message_id.clone(),
            },
            &token,
        ))
        .await
        .expect("cancel")
        .into_inner();
    assert!(res.cancelled);
    let mut turn = Turn::default();
    finish(&mut stream, &mut turn).await;
    assert_eq!(
        turn.completed.expect("completed").status,
        pb::MessageStatus::Cancelled as i32
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(primary.hits(), 0, "the model was never asked");

    // Not cancelled: the reply goes ahead without preferences once the
    // fetch times out.
    let t = std::time::Instant::now();
    let turn = send_message(&mut c, &token, send(&s.id, "go ahead", ""))
        .await
        .expect("turn");
    assert_eq!(turn.text, "Hello world", "{:?}", turn.failed);
    assert!(
        t.elapsed() >= Duration::from_millis(2900),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(primary.hits(), 1);
    assert_eq!(
        primary.seen()[0].body["messages"][0]["content"],
        "Be helpful."
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_regeneration_the_next_turn_sees_only_the_latest_answer() {
    let r = rig(|_| {}).await;
    let mut c = chat(&r.mesh).await;
    let s = new_session(&mut c, &r.token, "fast").await;
    r.primary.push([
        Script::ok(&["first answer"], Some((1, 2))),
        Script::ok(&["second answer"], Some((1, 2))),
        Script::ok(&["third answer"], Some((1, 2))),
    ]);
    let first = send_message(&mut c, &r.token, send(&s.id, "question A", ""))
        .await
        .expect("turn");
    let first_id = first.accepted.expect("a").assistant_message_id;
    for _ in 0..2 {
        let mut regen = c
            .regenerate_message(bearer(
                pb::RegenerateMessageRequest {
                    message_id: first_id.clone(),
                },
                &r.token,
            ))
            .await
            .expect("regenerate")
            .into_inner();
        finish(&mut regen, &mut Turn::default()).await;
    }
    send_message(&mut c, &r.token, send(&s.id, "question B", ""))
        .await
        .expect("turn");
    let last = r.primary.seen().pop().expect("request");
    let contents: Vec<String> = last.body["messages"]
        .as_array()
        .expect("m")
        .iter()
        .map(|m| m["content"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        contents,
        vec!["Be helpful.", "question A", "third answer", "question B"]
    );
    // Every answer is kept.
    assert_eq!(messages(&mut c, &r.token, &s.id).await.len(), 6);
}

/// Subscribers of reply `id`'s live channel, across every process.
async fn subscribers(mesh: &TestMesh, id: &str) -> i64 {
    let channel = mesh.store.key(&format!("chat:msg:{id}"));
    let mut conn = mesh.store.redis_shared().await.expect("redis");
    let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(&channel)
        .query_async(&mut conn)
        .await
        .expect("numsub");
    counts.first().map(|c| c.1).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_share_one_subscription_and_a_lagging_watcher_catches_up() {
    let primary = FakeLlm::start(Script::ok(&["Hel", "lo", " world"], Some((12, 3)))).await;
    let backup = FakeLlm::start(Script::ok(&["b"], None)).await;
    let all = [
        ServiceName::Auth,
        ServiceName::User,
        ServiceName::Llm,
        ServiceName::Search,
        ServiceName::Chat,
    ];
    let meshes = split_with(&[&all, &[ServiceName::Chat]], |c| {
        configure(c, &primary, &backup);
        c.chat.stream_buffer = 8;
    })
    .await;
    let token = access(&register(&mut auth(&meshes[0]).await, "watchers").await);
    let mut a = chat(&meshes[0]).await;
    let mut b = chat(&meshes[1]).await;
    let s = new_session(&mut a, &token, "fast").await;

    // Five watchers of one reply on server B: one Redis subscription.
    primary.push([Script::slow(20, Duration::from_millis(60))]);
    let mut stream = open_send(&mut a, &token, send(&s.id, "watch this", "")).await;
    let mut turn = Turn::default();
    read_until(&mut stream, &mut turn, |t| !t.text.is_empty()).await;
    let id = turn.accepted.clone().expect("a").assistant_message_id;
    let mut watchers = Vec::new();
    for _ in 0..5 {
        let mut w = b
            .watch_message(bearer(
                pb::WatchMessageRequest {
                    message_id: id.clone(),
                    offset: 0,
                },
                &token,
            ))
            .await
            .expect("watch")
            .into_inner();
        // The first event comes after the subscription: all five are in.
        let mut t = Turn::default();
        take(&mut t, next_event(&mut w).await);
        watchers.push((w, t));
    }
    assert_eq!(
        subscribers(&meshes[1], &id).await,
        1,
        "one shared subscription"
    );
    for (mut w, mut t) in watchers {
        finish(&mut w, &mut t).await;
        assert_eq!(
            t.text,
            "t0 t1 t2 t3 t4 t5 t6 t7 t8 t9 t10 t11 t12 t13 t14 t15 t16 t17 t18 t19 "
        );
        assert!(t.offsets_ok);
    }
    while stream.message().await.expect("rest").is_some() {}
    let gone = eventually(Duration::from_secs(3), || {
        let (m, id) = (&meshes[1], id.clone());
        async move { subscribers(m, &id).await == 0 }
    })
    .await;
    assert!(gone, "unsubscribed once nobody watches");

    // A watcher that reads nothing while a flood goes by (a tiny HTTP/2
    // window, a buffer of 8) is not buffered for: it lags, then catches up
    // from the stored reply, every byte once.
    let pieces: Vec<String> = (0..3000).map(|i| format!("w{i} ")).collect();
    let expected: String = pieces.concat();
    primary.push([Script::Stream {
        pieces,
        usage: Some((5, 3000)),
        first_delay: Duration::from_millis(300),
        gap: Duration::ZERO,
    }]);
    let slow_channel = Channel::from_shared(meshes[1].url())
        .expect("url")
        .initial_stream_window_size(Some(2048))
        .connect()
        .await
        .expect("connect");
    let mut slow_b = ChatServiceClient::new(slow_channel);
    let (flooded, reply_id) = {
        // Start the flood, learn its id from the stored messages, watch it.
        let handle = tokio::spawn({
            let mut a = a.clone();
            let token = token.clone();
            let sid = s.id.clone();
            async move {
                send_message(&mut a, &token, send(&sid, "flood", "flood"))
                    .await
                    .expect("flood")
            }
        });
        let mut reply = None;
        while reply.is_none() {
            let all = messages(&mut a, &token, &s.id).await;
            reply = all
                .iter()
                .find(|m| m.status == pb::MessageStatus::Streaming as i32)
                .map(|m| m.id.clone());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (handle, reply.expect("reply"))
    };
    let mut w = slow_b
        .watch_message(bearer(
            pb::WatchMessageRequest {
                message_id: reply_id.clone(),
                offset: 0,
            },
            &token,
        ))
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(flooded.await.expect("task").text, expected);
    let sid = s.id.clone();
    assert!(
        eventually(Duration::from_secs(10), || {
            let mut a = a.clone();
            let (t, s, id) = (token.clone(), sid.clone(), reply_id.clone());
            async move { status_of(&mut a, &t, &s, &id).await == pb::MessageStatus::Completed }
        })
        .await
    );
    let mut t = Turn::default();
    finish(&mut w, &mut t).await;
    assert!(t.offsets_ok, "no gap, no overlap");
    assert_eq!(t.text.len(), expected.len());
    assert_eq!(t.text, expected);
    assert_eq!(
        t.completed.expect("done").status,
        pb::MessageStatus::Completed as i32
    );
}

async fn session_status(c: &mut ChatServiceClient<Channel>, token: &str, id: &str) -> i32 {
    c.get_session(bearer(
        pb::GetSessionRequest {
            session_id: id.into(),
        },
        token,
    ))
    .await
    .expect("get")
    .into_inner()
    .session
    .expect("session")
    .status
}

/// Moves session `id`'s last activity `ago` into the past.
async fn age_session(mesh: &TestMesh, id: &str, ago: chrono::Duration) {
    use diesel::prelude::*;
    use diesel_async::RunQueryDsl;
    use trellis_store::schema::chat_sessions as cs;
    let mut conn = mesh.store.pg().await.expect("pg");
    diesel::update(cs::table.filter(cs::id.eq(uuid::Uuid::parse_str(id).expect("id"))))
        .set(cs::last_activity_at.eq(chrono::Utc::now() - ago))
        .execute(&mut conn)
        .await
        .expect("age");
}

async fn listed(
    c: &mut ChatServiceClient<Channel>,
    token: &str,
    status: pb::SessionStatus,
) -> Vec<String> {
    c.list_sessions(bearer(
        pb::ListSessionsRequest {
            status: status as i32,
            page_size: 100,
            ..Default::default()
        },
        token,
    ))
    .await
    .expect("list")
    .into_inner()
    .sessions
    .into_iter()
    .map(|s| s.id)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_statuses_follow_activity_and_govern_what_is_allowed() {
    let r = rig(|_| {}).await;
    let mut c = chat(&r.mesh).await;
    let idle = new_session(&mut c, &r.token, "fast").await;
    let busy = new_session(&mut c, &r.token, "fast").await;
    let old = new_session(&mut c, &r.token, "fast").await;
    let first = send_message(&mut c, &r.token, send(&old.id, "long ago", ""))
        .await
        .expect("turn");
    let old_reply = first.accepted.expect("a").assistant_message_id;
    // Idle for more than chat.idle_timeout (24 h): INACTIVE.
    age_session(&r.mesh, &idle.id, chrono::Duration::hours(25)).await;
    age_session(&r.mesh, &old.id, chrono::Duration::days(91)).await;
    assert_eq!(
        listed(&mut c, &r.token, pb::SessionStatus::Active).await,
        vec![busy.id.clone()]
    );
    assert_eq!(
        listed(&mut c, &r.token, pb::SessionStatus::Inactive).await,
        vec![idle.id.clone()]
    );
    assert_eq!(
        listed(&mut c, &r.token, pb::SessionStatus::Expired).await,
        vec![old.id.clone()]
    );
    assert_eq!(
        listed(&mut c, &r.token, pb::SessionStatus::Unspecified)
            .await
            .len(),
        3
    );
    assert_eq!(
        session_status(&mut c, &r.token, &idle.id).await,
        pb::SessionStatus::Inactive as i32
    );

    // Sending into an INACTIVE session works and reactivates it.
    let turn = send_message(&mut c, &r.token, send(&idle.id, "back again", ""))
        .await
        .expect("turn");
    assert_eq!(turn.text, "Hello world");
    let mut active = listed(&mut c, &r.token, pb::SessionStatus::Active).await;
    active.sort();
    let mut want = vec![idle.id.clone(), busy.id.clone()];
    want.sort();
    assert_eq!(active, want);
    assert!(
        listed(&mut c, &r.token, pb::SessionStatus::Inactive)
            .await
            .is_empty()
    );

    // EXPIRED is read-only: regenerate and update refused, reading and
    // deleting allowed.
    let err = c
        .regenerate_message(bearer(
            pb::RegenerateMessageRequest {
                message_id: old_reply.clone(),
            },
            &r.token,
        ))
        .await
        .expect_err("expired");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = c
        .update_session(bearer(
            pb::UpdateSessionRequest {
                session: Some(pb::Session {
                    id: old.id.clone(),
                    title: "renamed".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["title".into()],
                }),
            },
            &r.token,
        ))
        .await
        .expect_err("expired");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let mut conv = Conv::open(&mut c, &r.token).await;
    conv.send(send(&old.id, "hello?", "x")).await;
    assert_eq!(
        failure(conv.next().await).code,
        Code::FailedPrecondition as i32
    );
    assert_eq!(messages(&mut c, &r.token, &old.id).await.len(), 2);
    let mut watch = c
        .watch_message(bearer(
            pb::WatchMessageRequest {
                message_id: old_reply,
                offset: 0,
            },
            &r.token,
        ))
        .await
        .expect("watch")
        .into_inner();
    let mut watched = Turn::default();
    finish(&mut watch, &mut watched).await;
    assert_eq!(watched.text, "Hello world");
    c.delete_session(bearer(
        pb::DeleteSessionRequest {
            session_id: old.id.clone(),
        },
        &r.token,
    ))
    .await
    .expect("an expired session can be deleted");
    assert!(
        listed(&mut c, &r.token, pb::SessionStatus::Expired)
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_chat_rpc_validates_its_input_and_hides_other_users_things() {
    let (meshes, primary, token) = split_rig().await;
    let mut a = chat(&meshes[0]).await;
    let mut b = chat(&meshes[1]).await;
    let other = access(&register(&mut auth(&meshes[0]).await, "nosy").await);
    let s = new_session(&mut a, &token, "fast").await;
    primary.push([Script::slow(30, Duration::from_millis(60))]);
    let mut stream = open_send(&mut a, &token, send(&s.id, "mine", "")).await;
    let Some(Ev::Accepted(acc)) = next_event(&mut stream).await.event else {
        panic!("accepted")
    };
    let reply = acc.assistant_message_id.clone();

    // Another user, on either server: NOT_FOUND for every id of mine.
    for c in [&mut a, &mut b] {
        let err = send_message(c, &other, send(&s.id, "intrude", ""))
            .await
            .expect_err("idor");
        assert_eq!(err.code(), Code::NotFound);
        let err = c
            .cancel_generation(bearer(
                pb::CancelGenerationRequest {
                    message_id: reply.clone(),
                },
                &other,
            ))
            .await
            .expect_err("idor");
        assert_eq!(err.code(), Code::NotFound);
        let err = c
            .watch_message(bearer(
                pb::WatchMessageRequest {
                    message_id: reply.clone(),
                    offset: 0,
                },
                &other,
            ))
            .await
            .expect_err("idor");
        assert_eq!(err.code(), Code::NotFound);
        let err = c
            .regenerate_message(bearer(
                pb::RegenerateMessageRequest {
                    message_id: acc.user_message_id.clone(),
                },
                &other,
            ))
            .await
            .expect_err("idor");
        assert_eq!(err.code(), Code::NotFound);
        let err = c
            .get_session(bearer(
                pb::GetSessionRequest {
                    session_id: s.id.clone(),
                },
                &other,
            ))
            .await
            .expect_err("idor");
        assert_eq!(err.code(), Code::NotFound);
    }
    assert_eq!(
        status_of(&mut a, &token, &s.id, &reply).await,
        pb::MessageStatus::Streaming,
        "nothing the intruder did reached the reply"
    );

    // Bad input: INVALID_ARGUMENT naming the fields.
    let err = a
        .get_session(bearer(
            pb::GetSessionRequest {
                session_id: "nope".into(),
            },
            &token,
        ))
        .await
        .expect_err("bad id");
    assert_eq!(violations(&err), vec!["session_id"]);
    let err = a
        .list_messages(bearer(
            pb::ListMessagesRequest {
                session_id: "nope".into(),
                page_size: -1,
                ..Default::default()
            },
            &token,
        ))
        .await
        .expect_err("bad list");
    assert_eq!(violations(&err), vec!["session_id", "page_size"]);
    let err = a
        .list_messages(bearer(
            pb::ListMessagesRequest {
                session_id: s.id.clone(),
                page_token: "forged".into(),
                ..Default::default()
            },
            &token,
        ))
        .await
        .expect_err("bad token");
    assert_eq!(violations(&err), vec!["page_token"]);
    for (query, session, size, fields) in [
        ("", "", 0, vec!["query"]),
        ("ok", "nope", -1, vec!["page_size", "session_id"]),
        ("bell\u{7}", "", 0, vec!["query"]),
    ] {
        let err = a
            .search_messages(bearer(
                pb::SearchMessagesRequest {
                    query: query.into(),
                    session_id: session.into(),
                    page_size: size,
                },
                &token,
            ))
            .await
            .expect_err("bad search");
        assert_eq!(violations(&err), fields, "{query:?}");
    }
    let err = a
        .search_messages(bearer(
            pb::SearchMessagesRequest {
                query: "q".repeat(1001),
                ..Default::default()
            },
            &token,
        ))
        .await
        .expect_err("long");
    assert_eq!(violations(&err), vec!["query"]);
    let err = a
        .cancel_generation(bearer(
            pb::CancelGenerationRequest {
                message_id: "12".into(),
            },
            &token,
        ))
        .await
        .expect_err("bad id");
    assert_eq!(violations(&err), vec!["message_id"]);
    let err = a
        .watch_message(bearer(
            pb::WatchMessageRequest {
                message_id: "x".into(),
                offset: 0,
            },
            &token,
        ))
        .await
        .expect_err("bad id");
    assert_eq!(violations(&err), vec!["message_id"]);
    let err = a
        .watch_message(bearer(
            pb::WatchMessageRequest {
                message_id: reply.clone(),
                offset: -1,
            },
            &token,
        ))
        .await
        .expect_err("bad offset");
    assert_eq!(violations(&err), vec!["offset"]);
    let err = a
        .send_message(bearer(pb::SendMessageRequest { send: None }, &token))
        .await
        .expect_err("no send");
    assert_eq!(violations(&err), vec!["send"]);
    let err = send_message(
        &mut a,
        &token,
        pb::Send {
            session_id: "bad".into(),
            content: " ".into(),
            client_message_id: "c".repeat(129),
            model: Some("nope".into()),
            temperature: Some(3.0),
            max_tokens: Some(-1),
        },
    )
    .await
    .expect_err("bad send");
    assert_eq!(
        violations(&err),
        vec![
            "session_id",
            "content",
            "client_message_id",
            "model",
            "temperature",
            "max_tokens"
        ]
    );
    let err = a
        .regenerate_message(bearer(
            pb::RegenerateMessageRequest {
                message_id: "".into(),
            },
            &token,
        ))
        .await
        .expect_err("bad id");
    assert_eq!(violations(&err), vec!["message_id"]);

    // The reply finishes; now an offset past its end is refused.
    while stream.message().await.expect("rest").is_some() {}
    let stored = messages(&mut a, &token, &s.id).await;
    let err = b
        .watch_message(bearer(
            pb::WatchMessageRequest {
                message_id: reply.clone(),
                offset: stored[1].content.len() as i64 + 1,
            },
            &token,
        ))
        .await
        .expect_err("past the end");
    assert_eq!(violations(&err), vec!["offset"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_replies_say_why_keep_what_they_had_and_how_long_to_wait() {
    let r = rig(|c| c.llm.default_limits.concurrent_streams = 1).await;
    let mut c = chat(&r.mesh).await;
    let s = new_session(&mut c, &r.token, "fast").await;

    // Every provider fails before the first token: a failed event with
    // the gateway's code, the reply stored FAILED with the reason.
    r.primary.set_fallback(Script::status(500));
    r.backup.set_fallback(Script::status(500));
    let turn = send_message(&mut c, &r.token, send(&s.id, "anyone?", ""))
        .await
        .expect("turn");
    let f = turn.failed.expect("failed");
    assert_eq!(f.code, Code::Unavailable as i32, "{f:?}");
    assert_eq!(f.status, pb::MessageStatus::Failed as i32);
    assert!(!f.message.is_empty());
    assert_eq!(f.message_id, turn.accepted.expect("a").assistant_message_id);
    let stored = messages(&mut c, &r.token, &s.id).await;
    assert_eq!(stored[1].status, pb::MessageStatus::Failed as i32);
    assert_eq!(stored[1].error, f.message);

    // The stream is cut after some tokens: FAILED, the partial content kept.
    r.primary.push([Script::Cut {
        pieces: vec!["par".into(), "tial".into()],
    }]);
    let turn = send_message(&mut c, &r.token, send(&s.id, "try again", ""))
        .await
        .expect("turn");
    let f = turn.failed.expect("failed");
    assert_ne!(f.code, Code::Ok as i32);
    assert_eq!(f.status, pb::MessageStatus::Failed as i32);
    assert_eq!(turn.text, "partial");
    let stored = messages(&mut c, &r.token, &s.id).await;
    assert_eq!(stored[3].status, pb::MessageStatus::Failed as i32);
    assert_eq!(stored[3].content, "partial");

    // The user's concurrent generations limit (1): the second reply is
    // RESOURCE_EXHAUSTED with the gateway's retry delay.
    r.primary
        .set_fallback(Script::ok(&["Hel", "lo", " world"], Some((12, 3))));
    r.primary
        .push([Script::slow(20, Duration::from_millis(100))]);
    let other = new_session(&mut c, &r.token, "fast").await;
    let mut first = open_send(&mut c, &r.token, send(&s.id, "long one", "")).await;
    let mut t = Turn::default();
    read_until(&mut first, &mut t, |t| !t.text.is_empty()).await;
    let turn = send_message(&mut c, &r.token, send(&other.id, "me too", "m2"))
        .await
        .expect("turn");
    let f = turn.failed.expect("failed");
    assert_eq!(f.code, Code::ResourceExhausted as i32, "{f:?}");
    assert_eq!(f.client_message_id, "m2");
    let delay = f.retry_delay.expect("retry delay");
    assert!(delay.seconds > 0 || delay.nanos > 0, "{delay:?}");
    while first.message().await.expect("rest").is_some() {}
    // Once the first is done, the same turn goes through.
    let turn = send_message(&mut c, &r.token, send(&other.id, "me too", "m3"))
        .await
        .expect("turn");
    assert_eq!(turn.text, "Hello world", "{:?}", turn.failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_metrics_count_streams_generations_ttft_and_throughput() {
    use crate::foundation::metric_value;
    let r = rig(|_| {}).await;
    let mut c = chat(&r.mesh).await;
    let s = new_session(&mut c, &r.token, "fast").await;
    let scrape = || async { r.mesh.metrics().await };
    let before = scrape().await;
    assert_eq!(metric_value(&before, "trellis_chat_generating "), 0.0);
    assert_eq!(
        metric_value(&before, "trellis_chat_time_to_first_token_seconds_count"),
        0.0
    );
    r.primary
        .push([Script::slow(10, Duration::from_millis(100))]);
    let mut stream = open_send(&mut c, &r.token, send(&s.id, "measure me", "")).await;
    let mut turn = Turn::default();
    read_until(&mut stream, &mut turn, |t| !t.text.is_empty()).await;
    let during = scrape().await;
    assert_eq!(
        metric_value(&during, "trellis_chat_generating "),
        1.0,
        "{during}"
    );
    assert_eq!(metric_value(&during, "trellis_chat_active_streams "), 1.0);
    finish(&mut stream, &mut turn).await;
    drop(stream);
    let settled = eventually(Duration::from_secs(3), || async {
        let now = scrape().await;
        metric_value(&now, "trellis_chat_active_streams ") == 0.0
            && metric_value(&now, "trellis_chat_generating ") == 0.0
    })
    .await;
    assert!(settled, "streams and generations counted down");
    let after = scrape().await;
    assert_eq!(
        metric_value(&after, "trellis_chat_time_to_first_token_seconds_count"),
        1.0
    );
    assert!(metric_value(&after, "trellis_chat_time_to_first_token_seconds_sum") > 0.0);
    assert_eq!(
        metric_value(&after, "trellis_chat_tokens_per_second_count"),
        1.0
    );
    // Ten tokens over about 0.9 s after the first: roughly ten per second.
    let rate = metric_value(&after, "trellis_chat_tokens_per_second_sum");
    assert!((3.0..=30.0).contains(&rate), "{rate}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_growing_reply_is_stored_as_it_grows() {
    let r = rig(|_| {}).await;
    let mut c = chat(&r.mesh).await;
    let s = new_session(&mut c, &r.token, "fast").await;
    r.primary
        .push([Script::slow(30, Duration::from_millis(100))]);
    let mut stream = open_send(&mut c, &r.token, send(&s.id, "grow", "")).await;
    let mut turn = Turn::default();
    read_until(&mut stream, &mut turn, |t| t.text.len() >= 20).await;
    // Within a flush interval or two (250 ms), the stored reply has what
    // was streamed, while it is still STREAMING.
    let mut seen = Vec::new();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let all = messages(&mut c, &r.token, &s.id).await;
        assert_eq!(all[1].status, pb::MessageStatus::Streaming as i32);
        seen.push(all[1].content.clone());
    }
    finish(&mut stream, &mut turn).await;
    assert!(seen[0].len() >= 20, "{seen:?}");
    assert!(seen[1].len() > seen[0].len(), "it keeps growing: {seen:?}");
    for partial in &seen {
        assert!(turn.text.starts_with(partial.as_str()), "{partial}");
    }
    assert!(seen[1].len() < turn.text.len());
}

async fn watch_all(
    c: &mut ChatServiceClient<Channel>,
    token: &str,
    id: &str,
    offset: i64,
    prefix: &str,
) -> Turn {
    let mut w = c
        .watch_message(bearer(
            pb::WatchMessageRequest {
                message_id: id.into(),
                offset,
            },
            token,
        ))
        .await
        .expect("watch")
        .into_inner();
    let mut t = Turn {
        text: prefix.into(),
        ..Default::default()
    };
    finish(&mut w, &mut t).await;
    t
}

fn micros(d: &Option<prost_types::Duration>) -> i64 {
    let d = d.as_ref().expect("duration");
    d.seconds * 1_000_000 + i64::from(d.nanos) / 1000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_reply_replays_as_it_was_sent_and_resumes_mid_stream_elsewhere() {
    let (meshes, primary, token) = split_rig().await;
    let mut a = chat(&meshes[0]).await;
    let mut b = chat(&meshes[1]).await;
    let mut search = crate::search::search_client(&meshes[0]).await;
    let mut d = crate::search::doc("kb", "1", "Release checklist", "Steps for the release.");
    d.visibility = trellis_proto::search::v1::Visibility::Shared as i32;
    crate::search::index(&mut search, &token, vec![d]).await;
    let rs = a
        .create_session(bearer(
            pb::CreateSessionRequest {
                title: "rag".into(),
                model: "fast".into(),
                retrieval: true,
                ..Default::default()
            },
            &token,
        ))
        .await
        .expect("session")
        .into_inner()
        .session
        .expect("s");
    let live = send_message(&mut a, &token, send(&rs.id, "How does the release go?", ""))
        .await
        .expect("turn");
    assert_eq!(live.citations.len(), 1);
    let live_done = live.completed.clone().expect("completed");
    let id = live.accepted.clone().expect("a").assistant_message_id;
    // Replayed on the other server: the same citations, content and end.
    let replay = watch_all(&mut b, &token, &id, 0, "").await;
    assert_eq!(replay.citations, live.citations);
    assert_eq!(replay.text, live.text);
    let done = replay.completed.expect("completed");
    assert_eq!(done.finish_reason, live_done.finish_reason);
    assert_eq!(done.finish_reason, "stop");
    assert_eq!(done.usage, live_done.usage);
    assert!(
        (micros(&done.time_to_first_token) - micros(&live_done.time_to_first_token)).abs() <= 1
    );
    assert!((micros(&done.duration) - micros(&live_done.duration)).abs() <= 1);

    // A failure replays with its real code.
    let s = new_session(&mut a, &token, "fast").await;
    primary.push([Script::status(400)]);
    let failed = send_message(&mut a, &token, send(&s.id, "bad request", ""))
        .await
        .expect("turn");
    let f = failed.failed.expect("failed");
    assert_eq!(f.code, Code::InvalidArgument as i32, "{f:?}");
    let replay = watch_all(&mut b, &token, &f.message_id, 0, "").await;
    let rf = replay.failed.expect("failed");
    assert_eq!(
        (rf.code, rf.message.as_str(), rf.status),
        (f.code, f.message.as_str(), f.status)
    );

    // Resuming mid-stream on the other server from the bytes received.
    primary.push([Script::slow(20, Duration::from_millis(60))]);
    let mut stream = open_send(&mut a, &token, send(&s.id, "stream it", "")).await;
    let mut turn = Turn::default();
    read_until(&mut stream, &mut turn, |t| t.text.len() >= 9).await;
    let got = turn.text.clone();
    let id = turn.accepted.clone().expect("a").assistant_message_id;
    let resumed = watch_all(&mut b, &token, &id, got.len() as i64, &got).await;
    finish(&mut stream, &mut turn).await;
    assert!(resumed.offsets_ok, "continues exactly where the client was");
    assert_eq!(resumed.text, turn.text);
    assert_eq!(
        resumed.text,
        "t0 t1 t2 t3 t4 t5 t6 t7 t8 t9 t10 t11 t12 t13 t14 t15 t16 t17 t18 t19 "
    );
    assert_eq!(
        resumed.completed.expect("done").status,
        pb::MessageStatus::Completed as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_overrides_session_updates_deletion_and_the_preferences_cache() {
    use crate::foundation::metric_value;
    let r = rig(|_| {}).await;
    let mut c = chat(&r.mesh).await;
    let s = new_session(&mut c, &r.token, "fast").await;
    // Per-turn overrides reach the upstream and are stored.
    let turn = send_message(
        &mut c,
        &r.token,
        pb::Send {
            session_id: s.id.clone(),
            content: "override".into(),
            model: Some("solo".into()),
            temperature: Some(0.25),
            max_tokens: Some(7),
            ..Default::default()
        },
    )
    .await
    .expect("turn");
    assert_eq!(turn.text, "Hello world");
    let body = r.primary.seen().pop().expect("request").body;
    assert_eq!(body["temperature"], 0.25, "{body}");
    assert!(
        body["max_tokens"] == 7 || body["max_completion_tokens"] == 7,
        "{body}"
    );
    let stored = messages(&mut c, &r.token, &s.id).await;
    assert_eq!(stored[1].model, "solo");
    // Without overrides: the session's model, no temperature.
    send_message(&mut c, &r.token, send(&s.id, "plain", ""))
        .await
        .expect("turn");
    let body = r.primary.seen().pop().expect("request").body;
    assert_eq!(body["model"], "fake-a", "{body}");
    assert!(
        body.get("temperature").is_none_or(|t| t.is_null()),
        "{body}"
    );
    assert_eq!(messages(&mut c, &r.token, &s.id).await[3].model, "fast");

    // Preferences were fetched once for all those turns (cached).
    let scrape = r.mesh.metrics().await;
    let fetched = metric_value(
        &scrape,
        r#"trellis_grpc_requests_total{code="OK",method="GetPreferences",service="trellis.user.v1.UserService"}"#,
    );
    assert_eq!(fetched, 1.0, "one UserService call within the cache TTL");

    // A new system prompt and retrieval apply to the next turn.
    let mut search = crate::search::search_client(&r.mesh).await;
    let mut d = crate::search::doc("kb", "1", "Vacation policy", "Thirty days of vacation.");
    d.visibility = trellis_proto::search::v1::Visibility::Shared as i32;
    crate::search::index(&mut search, &r.token, vec![d]).await;
    c.update_session(bearer(
        pb::UpdateSessionRequest {
            session: Some(pb::Session {
                id: s.id.clone(),
                system_prompt: "Be terse.".into(),
                retrieval: true,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["system_prompt".into(), "retrieval".into()],
            }),
        },
        &r.token,
    ))
    .await
    .expect("update");
    let turn = send_message(
        &mut c,
        &r.token,
        send(&s.id, "How much vacation do I get?", ""),
    )
    .await
    .expect("turn");
    assert_eq!(turn.citations.len(), 1, "retrieval is on");
    let body = r.primary.seen().pop().expect("request").body;
    let system = body["messages"][0]["content"].as_str().unwrap_or_default();
    assert!(system.starts_with("Be terse."), "{system}");
    assert!(!system.contains("Be helpful."), "{system}");

    // Deleting the session stops the reply being generated in it.
    r.primary
        .push([Script::slow(50, Duration::from_millis(60))]);
    let other = new_session(&mut c, &r.token, "fast").await;
    let mut stream = open_send(&mut c, &r.token, send(&other.id, "long", "")).await;
    let mut t = Turn::default();
    read_until(&mut stream, &mut t, |t| !t.text.is_empty()).await;
    c.delete_session(bearer(
        pb::DeleteSessionRequest {
            session_id: other.id.clone(),
        },
        &r.token,
    ))
    .await
    .expect("delete");
    finish(&mut stream, &mut t).await;
    assert_eq!(
        t.completed.expect("completed").status,
        pb::MessageStatus::Cancelled as i32
    );
    assert!(
        eventually(Duration::from_secs(3), || async {
            r.primary.abandoned() == 1
        })
        .await,
        "the upstream was stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrieval_sessions_cite_the_callers_private_documents_only() {
    let r: Rig = rig(|_| {}).await;
    let mut c = chat(&r.mesh).await;
    let mut search = crate::search::search_client(&r.mesh).await;
    let other = access(&register(&mut auth(&r.mesh).await, "otherrag").await);
    crate::search::index(
        &mut search,
        &r.token,
        vec![crate::search::doc(
            "notes",
            "mine",
            "My rollout plan",
            "The database rollout happens on Tuesday.",
        )],
    )
    .await;
    crate::search::index(
        &mut search,
        &other,
        vec![crate::search::doc(
            "notes",
            "theirs",
            "Competing rollout plan",
            "Their database rollout is secret.",
        )],
    )
    .await;
    let creator = c.clone();
    let session = |token: &str| {
        let mut c = creator.clone();
        let token = token.to_string();
        async move {
            c.create_session(bearer(
                pb::CreateSessionRequest {
                    title: "rag".into(),
                    model: "fast".into(),
                    retrieval: true,
                    ..Default::default()
                },
                &token,
            ))
            .await
            .expect("session")
            .into_inner()
            .session
            .expect("s")
        }
    };
    let mine = session(&r.token).await;
    let turn = send_message(
        &mut c,
        &r.token,
        send(&mine.id, "When is the database rollout?", ""),
    )
    .await
    .expect("turn");
    let cited: Vec<&str> = turn.citations.iter().map(|c| c.title.as_str()).collect();
    assert_eq!(cited, vec!["My rollout plan"]);
    assert!(turn.citations[0].snippet.contains("Tuesday"));
    let stored = messages(&mut c, &r.token, &mine.id).await;
    let stored_titles: Vec<&str> = stored[1]
        .citations
        .iter()
        .map(|c| c.title.as_str())
        .collect();
    assert_eq!(stored_titles, vec!["My rollout plan"]);
    // The other user asking the same gets their own document only.
    let theirs = session(&other).await;
    let turn = send_message(
        &mut c,
        &other,
        send(&theirs.id, "When is the database rollout?", ""),
    )
    .await
    .expect("turn");
    let cited: Vec<&str> = turn.citations.iter().map(|c| c.title.as_str()).collect();
    assert_eq!(cited, vec!["Competing rollout plan"]);
}

/// Text PostgreSQL cannot store (NUL) or that a one-line field never
/// means is a field violation naming the field, before anything is
/// stored — not a database error surfacing as INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_are_field_violations_not_internal_errors() {
    let r = rig(|_| {}).await;
    let mut c = chat(&r.mesh).await;
    let fields = |e: &tonic::Status| {
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        crate::auth::violations(e)
    };
    for (title, system_prompt, field) in [
        ("nul\0", "", "title"),
        ("two\nlines", "", "title"),
        ("fine", "a prompt with \0 in it", "system_prompt"),
    ] {
        let e = c
            .create_session(bearer(
                pb::CreateSessionRequest {
                    title: title.into(),
                    system_prompt: system_prompt.into(),
                    ..Default::default()
                },
                &r.token,
            ))
            .await
            .expect_err("refused");
        assert_eq!(fields(&e), [field]);
    }
    // Line breaks and tabs are what prompts and messages are made of.
    let s = c
        .create_session(bearer(
            pb::CreateSessionRequest {
                title: "Fine".into(),
                system_prompt: "Rules:\n\t1. be brief\r\n".into(),
                ..Default::default()
            },
            &r.token,
        ))
        .await
        .expect("multi-line prompt")
        .into_inner()
        .session
        .expect("session");

    let e = c
        .update_session(bearer(
            pb::UpdateSessionRequest {
                session: Some(pb::Session {
                    id: s.id.clone(),
                    title: "x\0".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["title".into()],
                }),
            },
            &r.token,
        ))
        .await
        .expect_err("refused");
    assert_eq!(fields(&e), ["session.title"]);

    for (content, client_message_id, field) in [
        ("hello \0 there", "", "content"),
        ("hello", "id\0", "client_message_id"),
    ] {
        let e = send_message(
            &mut c,
            &r.token,
            pb::Send {
                session_id: s.id.clone(),
                content: content.into(),
                client_message_id: client_message_id.into(),
                ..Default::default()
            },
        )
        .await
        .expect_err("refused");
        assert_eq!(fields(&e), [field]);
    }
    let turn = send_message(
        &mut c,
        &r.token,
        pb::Send {
            session_id: s.id.clone(),
            content: "line one\nline two".into(),
            ..Default::default()
        },
    )
    .await
    .expect("a multi-line message is taken");
    assert!(turn.accepted.is_some() && turn.completed.is_some());
    // Nothing of the refused turns was stored.
    let stored = messages(&mut c, &r.token, &s.id).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
}
