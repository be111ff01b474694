//! LlmService end to end against fake OpenAI-compatible upstreams (real
//! HTTP servers in the test process speaking chat-completions SSE): the
//! stream and its accounting, retries, failover, timeouts, broken and
//! malformed streams, circuit breaking, cancellation, every quota, the
//! cache, prompt trimming, validation and authorization.

use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use trellis_core::Config;
use trellis_core::config::{LimitsConfig, ModelConfig, ProviderConfig};
use trellis_proto::llm::v1 as pb;
use trellis_proto::llm::v1::generate_stream_response::Event;
use trellis_proto::llm::v1::llm_service_client::LlmServiceClient;
use trellis_tests::fake_llm::{Blackhole, refused_base_url};
use trellis_tests::{FakeLlm, Script, TestMesh, TestOptions};

use crate::auth::{access, admin_account, auth, bearer, register, violations};
use crate::util::eventually;

pub struct Rig {
    pub mesh: TestMesh,
    pub primary: FakeLlm,
    pub backup: FakeLlm,
    pub token: String,
    pub user_id: String,
}

fn provider(fake: &FakeLlm, key: Option<&str>) -> ProviderConfig {
    ProviderConfig {
        base_url: fake.base_url(),
        api_key: key.map(str::to_string),
        first_token_timeout: Duration::from_secs(5),
        max_retries: 0,
        ..Default::default()
    }
}

/// Points the gateway at two fake providers: model `fast` routes primary →
/// backup, `solo` only primary. Prices: 1 µ$ per prompt token, 2 µ$ per
/// completion token. Generous quotas, a quick retry.
pub fn configure(c: &mut Config, primary: &FakeLlm, backup: &FakeLlm) {
    c.llm
        .providers
        .insert("primary".into(), provider(primary, Some("sk-primary")));
    c.llm
        .providers
        .insert("backup".into(), provider(backup, None));
    let model = |routes: &[&str]| ModelConfig {
        routes: routes.iter().map(|s| s.to_string()).collect(),
        context_window: 4096,
        default_max_tokens: 256,
        prompt_price_per_million: 1_000_000,
        completion_price_per_million: 2_000_000,
    };
    c.llm
        .models
        .insert("fast".into(), model(&["primary:fake-a", "backup:fake-b"]));
    c.llm.models.insert("solo".into(), model(&["primary"]));
    c.llm.retry_base = Duration::from_millis(10);
    c.llm.breaker_failures = 100;
    c.llm.default_limits = LimitsConfig {
        requests_per_minute: 1000,
        tokens_per_day: 10_000_000,
        cost_micros_per_month: 10_000_000_000,
        concurrent_streams: 200,
    };
}

/// Two fake providers (see [`configure`]) and a registered member.
pub async fn rig(tweak: impl FnOnce(&mut Config)) -> Rig {
    let primary = FakeLlm::start(Script::ok(&["Hel", "lo", " world"], Some((12, 3)))).await;
    let backup = FakeLlm::start(Script::ok(&["from", " backup"], Some((12, 2)))).await;
    let mesh = TestMesh::start_with(TestOptions::default(), |c| {
        configure(c, &primary, &backup);
        tweak(c);
    })
    .await;
    let reg = register(&mut auth(&mesh).await, "llmuser").await;
    Rig {
        token: access(&reg),
        user_id: reg.account.expect("account").id,
        mesh,
        primary,
        backup,
    }
}

pub async fn llm(mesh: &TestMesh) -> LlmServiceClient<Channel> {
    LlmServiceClient::new(mesh.channel().await)
}

pub fn user(text: &str) -> pb::Message {
    pb::Message {
        role: pb::Role::User as i32,
        content: text.into(),
    }
}

pub fn params(model: &str, text: &str) -> pb::GenerateParams {
    pb::GenerateParams {
        model: model.into(),
        system_prompt: "You are terse.".into(),
        messages: vec![user(text)],
        ..Default::default()
    }
}

/// What one GenerateStream call produced.
#[derive(Debug, Default)]
pub struct Outcome {
    pub deltas: Vec<String>,
    pub completed: Option<pb::Completed>,
    pub failed: Option<pb::Failed>,
}

pub async fn stream(
    c: &mut LlmServiceClient<Channel>,
    token: &str,
    p: pb::GenerateParams,
) -> Result<Outcome, Status> {
    let mut s = c
        .generate_stream(bearer(pb::GenerateStreamRequest { params: Some(p) }, token))
        .await?
        .into_inner();
    let mut out = Outcome::default();
    while let Some(msg) = s.message().await? {
        match msg.event {
            Some(Event::Delta(d)) => out.deltas.push(d),
            Some(Event::Completed(c)) => out.completed = Some(c),
            Some(Event::Failed(f)) => out.failed = Some(f),
            other => panic!("unexpected event {other:?}"),
        }
    }
    Ok(out)
}

/// Asserts that Prometheus text has `sample` (name, labels and value).
fn assert_sample(text: &str, sample: &str) {
    assert!(text.lines().any(|l| l == sample), "no {sample} in:\n{text}");
}

/// The value of one sample in Prometheus text.
fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {sample} in {text}"))
}

async fn usage_of(
    c: &mut LlmServiceClient<Channel>,
    token: &str,
    user_id: &str,
) -> Result<pb::GetUsageResponse, Status> {
    c.get_usage(bearer(
        pb::GetUsageRequest {
            user_id: user_id.into(),
            ..Default::default()
        },
        token,
    ))
    .await
    .map(|r| r.into_inner())
}

/// The usage rows of the rig's database, newest last.
async fn usage_rows(mesh: &TestMesh) -> Vec<(String, String, i32, i32, bool, i64, String, bool)> {
    use diesel::prelude::*;
    use diesel_async::RunQueryDsl;
    use trellis_store::schema::llm_usage::dsl as u;
    let mut conn = mesh.store.pg().await.expect("pg");
    u::llm_usage
        .order(u::id.asc())
        .select((
            u::model,
            u::provider,
            u::prompt_tokens,
            u::completion_tokens,
            u::estimated,
            u::cost_micros,
            u::status,
            u::cached,
        ))
        .load(&mut conn)
        .await
        .expect("usage rows")
}

async fn wait_rows(
    mesh: &TestMesh,
    n: usize,
) -> Vec<(String, String, i32, i32, bool, i64, String, bool)> {
    let ok = eventually(Duration::from_secs(5), || async {
        usage_rows(mesh).await.len() >= n
    })
    .await;
    assert!(
        ok,
        "expected {n} usage rows, have {:?}",
        usage_rows(mesh).await
    );
    usage_rows(mesh).await
}

/// A usage row as stored: user, provider, upstream model, prompt and
/// completion tokens, estimated, cost, TTFT, duration, status, model.
type StoredUsage = (
    uuid::Uuid,
    String,
    String,
    i32,
    i32,
    bool,
    i64,
    Option<i32>,
    i32,
    String,
    String,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_batch_skips_rows_of_vanished_users_and_keeps_every_field() {
    use diesel::prelude::*;
    use diesel_async::RunQueryDsl;
    use trellis_llm::usage::{Recorder, UsageRow};
    use trellis_store::schema::llm_usage::dsl as u;
    let r = rig(|_| {}).await;
    let owner: uuid::Uuid = r.user_id.parse().expect("uuid");
    let row = |user_id, ttft_ms, status: &str| UsageRow {
        id: uuid::Uuid::now_v7(),
        user_id,
        model: "fast".into(),
        provider: "primary".into(),
        upstream_model: "up-fast".into(),
        prompt_tokens: 12,
        completion_tokens: 3,
        estimated: true,
        cost_micros: 4567,
        ttft_ms,
        duration_ms: 89,
        status: status.into(),
        cached: false,
        request_id: "req-batch".into(),
        created_at: chrono::Utc::now(),
    };
    let (recorder, writer) = Recorder::spawn(r.mesh.store.clone());
    // One batch: a row of a user who does not exist (purged meanwhile)
    // between two of a real one; the ghost must not sink the others.
    for (user, ttft, status) in [
        (owner, Some(7), "ok"),
        (uuid::Uuid::now_v7(), Some(1), "ok"),
        (owner, None, "failed"),
    ] {
        recorder.record(row(user, ttft, status)).await;
    }
    drop(recorder);
    writer.await.expect("writer drains and ends");
    let mut conn = r.mesh.store.pg().await.expect("pg");
    let rows: Vec<StoredUsage> = u::llm_usage
        .filter(u::request_id.eq("req-batch"))
        .order(u::id.asc())
        .select((
            u::user_id,
            u::provider,
            u::upstream_model,
            u::prompt_tokens,
            u::completion_tokens,
            u::estimated,
            u::cost_micros,
            u::ttft_ms,
            u::duration_ms,
            u::status,
            u::model,
        ))
        .load(&mut conn)
        .await
        .expect("rows");
    let expect = |ttft, status: &str| {
        (
            owner,
            "primary".to_string(),
            "up-fast".to_string(),
            12,
            3,
            true,
            4567,
            ttft,
            89,
            status.to_string(),
            "fast".to_string(),
        )
    };
    assert_eq!(rows, vec![expect(Some(7), "ok"), expect(None, "failed")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pieces_arriving_apart_are_streamed_apart() {
    let r = rig(|_| {}).await;
    r.primary
        .push([Script::slow(5, std::time::Duration::from_millis(60))]);
    let mut c = llm(&r.mesh).await;
    let mut s = c
        .generate_stream(bearer(
            pb::GenerateStreamRequest {
                params: Some(params("solo", "count")),
            },
            &r.token,
        ))
        .await
        .expect("stream")
        .into_inner();
    // Each piece is passed on as it comes, not held for the next one.
    let mut seen = Vec::new();
    let mut gaps = Vec::new();
    let mut last = Instant::now();
    while let Some(m) = s.message().await.expect("event") {
        if let Some(Event::Delta(d)) = m.event {
            gaps.push(last.elapsed());
            last = Instant::now();
            seen.push(d);
        }
    }
    assert_eq!(seen, ["t0 ", "t1 ", "t2 ", "t3 ", "t4 "]);
    assert!(
        gaps[1..].iter().all(|g| *g >= Duration::from_millis(30)),
        "{gaps:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_delivers_deltas_in_order_then_usage_and_is_accounted() {
    let r = rig(|_| {}).await;
    let mut c = llm(&r.mesh).await;
    let out = stream(&mut c, &r.token, params("fast", "say hello"))
        .await
        .expect("stream");
    // Pieces that arrive together may travel as one delta; the text is
    // whole and in order either way.
    assert_eq!(out.deltas.concat(), "Hello world");
    assert!((1..=3).contains(&out.deltas.len()), "{:?}", out.deltas);
    assert!(out.failed.is_none());
    let done = out.completed.expect("completed");
    let usage = done.usage.expect("usage");
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (12, 3));
    assert!(!usage.estimated);
    assert_eq!(usage.cost_micros, 12 + 2 * 3);
    assert_eq!(done.provider, "primary");
    assert_eq!(done.upstream_model, "fake-a");
    assert_eq!(done.finish_reason, "stop");
    assert!(done.time_to_first_token.is_some() && done.duration.is_some());
    assert!(!done.cached);

    // What the upstream received: the mapped model, streaming with usage,
    // the system prompt first, our API key.
    let seen = r.primary.seen();
    assert_eq!(seen.len(), 1);
    let body = &seen[0].body;
    assert_eq!(body["model"], "fake-a");
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(body["max_tokens"], 256);
    assert_eq!(body["messages"][0]["role"], "system");
    assert_eq!(body["messages"][1]["content"], "say hello");
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer sk-primary"));
    assert_eq!(r.backup.hits(), 0);

    let rows = wait_rows(&r.mesh, 1).await;
    assert_eq!(
        rows[0],
        (
            "fast".into(),
            "primary".into(),
            12,
            3,
            false,
            18,
            "ok".into(),
            false
        )
    );
    let u = usage_of(&mut c, &r.token, "").await.expect("usage");
    let total = u.total.expect("total");
    assert_eq!(
        (
            total.requests,
            total.prompt_tokens,
            total.completion_tokens,
            total.cost_micros
        ),
        (1, 12, 3, 18)
    );
    assert_eq!(u.buckets.len(), 1);
    assert_eq!(u.buckets[0].model, "fast");
    assert_eq!(
        u.buckets[0].day,
        chrono::Utc::now().format("%Y-%m-%d").to_string()
    );

    // Unary Generate runs the same path.
    let g = c
        .generate(bearer(
            pb::GenerateRequest {
                params: Some(params("fast", "again")),
            },
            &r.token,
        ))
        .await
        .expect("generate")
        .into_inner();
    assert_eq!(g.text, "Hello world");
    assert_eq!(g.provider, "primary");
    assert_eq!(g.usage.expect("usage").completion_tokens, 3);
    wait_rows(&r.mesh, 2).await;

    // Metrics know the provider.
    let metrics = r.mesh.metrics().await;
    assert_sample(
        &metrics,
        "trellis_llm_tokens_total{kind=\"completion\",provider=\"primary\"} 6",
    );
    assert_sample(
        &metrics,
        "trellis_llm_time_to_first_token_seconds_count{provider=\"primary\"} 2",
    );
    assert_sample(
        &metrics,
        "trellis_llm_breaker_state{provider=\"primary\"} 0",
    );
    // Two calls of 12 prompt + 3 completion tokens at 1 and 2 µ$ each.
    assert_sample(
        &metrics,
        "trellis_llm_cost_micros_total{provider=\"primary\"} 36",
    );
    assert_sample(
        &metrics,
        "trellis_llm_upstream_duration_seconds_count{outcome=\"ok\",provider=\"primary\"} 2",
    );
    let took = metric_value(
        &metrics,
        "trellis_llm_upstream_duration_seconds_sum{outcome=\"ok\",provider=\"primary\"}",
    );
    assert!(took > 0.0 && took < 5.0, "{took}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_fails_over_to_the_next_provider() {
    let r = rig(|_| {}).await;
    r.primary.push([Script::status(500)]);
    let mut c = llm(&r.mesh).await;
    let out = stream(&mut c, &r.token, params("fast", "hi"))
        .await
        .expect("stream");
    assert_eq!(out.deltas.concat(), "from backup");
    let done = out.completed.expect("completed");
    assert_eq!(done.provider, "backup");
    assert_eq!(done.upstream_model, "fake-b");
    assert_eq!(r.primary.hits(), 1);
    assert_eq!(r.backup.hits(), 1);
    assert_eq!(r.backup.seen()[0].body["model"], "fake-b");
    assert_eq!(r.backup.seen()[0].authorization, None);
    let metrics = r.mesh.metrics().await;
    assert_sample(
        &metrics,
        "trellis_llm_failovers_total{provider=\"primary\",reason=\"server_error\"} 1",
    );

    // With no provider left the call is UNAVAILABLE, naming what failed.
    r.primary.push([Script::status(503)]);
    let err = stream(&mut c, &r.token, params("solo", "hi"))
        .await
        .expect_err("unavailable");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("HTTP 503"), "{}", err.message());
    let rows = wait_rows(&r.mesh, 2).await;
    assert_eq!(rows[1].6, "failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_call_waits_as_retry_after_says_then_succeeds() {
    let r = rig(|c| {
        c.llm
            .providers
            .get_mut("primary")
            .expect("primary")
            .max_retries = 2;
    })
    .await;
    r.primary.push([Script::Status {
        code: 429,
        retry_after: Some("1".into()),
    }]);
    let mut c = llm(&r.mesh).await;
    let out = stream(&mut c, &r.token, params("fast", "hi"))
        .await
        .expect("stream");
    assert_eq!(out.completed.expect("completed").provider, "primary");
    let seen = r.primary.seen();
    assert_eq!(seen.len(), 2);
    let waited = seen[1].at - seen[0].at;
    assert!(
        waited >= Duration::from_millis(950),
        "retried after {waited:?}"
    );
    assert_eq!(r.backup.hits(), 0);

    // A Retry-After beyond llm.retry_max fails over at once instead.
    r.primary.push([Script::Status {
        code: 429,
        retry_after: Some("3600".into()),
    }]);
    let t = Instant::now();
    let out = stream(&mut c, &r.token, params("fast", "hi"))
        .await
        .expect("stream");
    assert_eq!(out.completed.expect("completed").provider, "backup");
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_first_token_fails_over() {
    let r = rig(|c| {
        c.llm
            .providers
            .get_mut("primary")
            .expect("primary")
            .first_token_timeout = Duration::from_millis(300);
    })
    .await;
    r.primary.push([Script::Hang]);
    let t = Instant::now();
    let mut c = llm(&r.mesh).await;
    let out = stream(&mut c, &r.token, params("fast", "hi"))
        .await
        .expect("stream");
    let done = out.completed.expect("completed");
    assert_eq!(done.provider, "backup");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // The caller's time to first token includes the wait on the primary;
    // the backup's own metric does not.
    let ttft = done.time_to_first_token.expect("ttft");
    let ttft = Duration::new(ttft.seconds as u64, ttft.nanos as u32);
    assert!(ttft >= Duration::from_millis(300), "{ttft:?}");
    let m = r.mesh.metrics().await;
    let backup_ttft = metric_value(
        &m,
        "trellis_llm_time_to_first_token_seconds_sum{provider=\"backup\"}",
    );
    assert!(backup_ttft < 0.3, "{backup_ttft}");
    // The hung stream was abandoned, not left open.
    assert!(
        eventually(Duration::from_secs(2), || async {
            r.primary.abandoned() == 1
        })
        .await
    );

    // Alone, the model answers DEADLINE_EXCEEDED.
    r.primary.push([Script::Hang]);
    let err = stream(&mut c, &r.token, params("solo", "hi"))
        .await
        .expect_err("slow");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_midway_ends_with_a_failed_event_and_partial_usage() {
    let r = rig(|_| {}).await;
    r.primary.push([Script::Cut {
        pieces: vec!["partial".into(), " answer".into()],
    }]);
    let mut c = llm(&r.mesh).await;
    let out = stream(&mut c, &r.token, params("fast", "hi"))
        .await
        .expect("stream");
    assert_eq!(out.deltas.concat(), "partial answer");
    assert!(out.completed.is_none());
    let failed = out.failed.expect("failed event");
    assert_eq!(failed.code, Code::Unavailable as i32);
    let usage = failed.usage.expect("partial usage");
    assert!(
        usage.estimated,
        "no usage chunk came: counted with the tokenizer"
    );
    assert_eq!(usage.completion_tokens, 2);
    assert!(usage.prompt_tokens > 0);
    // No failover after the first token.
    assert_eq!(r.backup.hits(), 0);
    let rows = wait_rows(&r.mesh, 1).await;
    assert_eq!(rows[0].6, "failed");
    assert_eq!(rows[0].3, 2);
    assert!(rows[0].4, "estimated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunk_is_a_provider_failure_not_an_internal_error() {
    let r = rig(|_| {}).await;
    r.primary.push([Script::Malformed]);
    let mut c = llm(&r.mesh).await;
    let out = stream(&mut c, &r.token, params("fast", "hi"))
        .await
        .expect("stream");
    assert_eq!(out.completed.expect("completed").provider, "backup");

    r.primary.push([Script::Malformed]);
    let err = stream(&mut c, &r.token, params("solo", "hi"))
        .await
        .expect_err("malformed");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("malformed"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_upstream_usage_the_tokens_are_estimated() {
    let r = rig(|_| {}).await;
    r.primary
        .push([Script::ok(&["one", " two", " three"], None)]);
    let mut c = llm(&r.mesh).await;
    let out = stream(&mut c, &r.token, params("fast", "count"))
        .await
        .expect("stream");
    let usage = out.completed.expect("completed").usage.expect("usage");
    assert!(usage.estimated);
    assert_eq!(usage.completion_tokens, 3, "o200k: 'one', ' two', ' three'");
    // system (4 + tokens) + user (4 + 1) + 3 priming
    let sys = usage.prompt_tokens;
    assert!((15..=25).contains(&sys), "{sys}");
    assert_eq!(usage.cost_micros, i64::from(usage.prompt_tokens) + 2 * 3);
    let rows = wait_rows(&r.mesh, 1).await;
    assert!(rows[0].4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_after_failures_and_recovers_after_cooldown() {
    let r = rig(|c| {
        c.llm.breaker_failures = 2;
        c.llm.breaker_cooldown = Duration::from_millis(500);
    })
    .await;
    r.primary.set_fallback(Script::status(502));
    let mut c = llm(&r.mesh).await;
    for _ in 0..2 {
        let err = stream(&mut c, &r.token, params("solo", "hi"))
            .await
            .expect_err("502");
        assert_eq!(err.code(), Code::Unavailable);
    }
    assert_eq!(r.primary.hits(), 2);
    // Open: the provider is not even called.
    let err = stream(&mut c, &r.token, params("solo", "hi"))
        .await
        .expect_err("open");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("circuit open"), "{}", err.message());
    let retry = err
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay);
    assert_eq!(
        retry,
        Some(Duration::from_secs(1)),
        "the cool-down, at least 1s"
    );
    assert_eq!(r.primary.hits(), 2);
    // ... and a model with a fallback goes straight to it.
    let out = stream(&mut c, &r.token, params("fast", "hi"))
        .await
        .expect("backup");
    assert_eq!(out.completed.expect("completed").provider, "backup");
    assert_eq!(r.primary.hits(), 2);
    let metrics = r.mesh.metrics().await;
    assert_sample(
        &metrics,
        "trellis_llm_breaker_state{provider=\"primary\"} 1",
    );

    // After the cooldown one probe goes through; its success closes it.
    r.primary.set_fallback(Script::ok(&["back"], Some((1, 1))));
    tokio::time::sleep(Duration::from_millis(600)).await;
    // The gauge is read at scrape time: half-open before any call.
    let m = r.mesh.metrics().await;
    assert_sample(&m, "trellis_llm_breaker_state{provider=\"primary\"} 2");
    let out = stream(&mut c, &r.token, params("solo", "hi"))
        .await
        .expect("probe");
    assert_eq!(out.deltas.concat(), "back");
    let m = r.mesh.metrics().await;
    assert_sample(&m, "trellis_llm_breaker_state{provider=\"primary\"} 0");
    assert_sample(&m, "trellis_llm_breaker_state{provider=\"backup\"} 0");
    let out = stream(&mut c, &r.token, params("solo", "hi"))
        .await
        .expect("closed");
    assert_eq!(out.deltas.concat(), "back");
    assert_eq!(r.primary.hits(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_reaches_the_upstream_and_records_what_was_produced() {
    let r = rig(|_| {}).await;
    r.primary
        .push([Script::slow(50, Duration::from_millis(100))]);
    let mut c = llm(&r.mesh).await;
    let mut s = c
        .generate_stream(bearer(
            pb::GenerateStreamRequest {
                params: Some(params("fast", "long story")),
            },
            &r.token,
        ))
        .await
        .expect("stream")
        .into_inner();
    for _ in 0..2 {
        let m = s.message().await.expect("message").expect("some");
        assert!(matches!(m.event, Some(Event::Delta(_))));
    }
    drop(s);
    assert!(
        eventually(Duration::from_secs(3), || async {
            r.primary.abandoned() == 1
        })
        .await,
        "the fake upstream saw its connection close"
    );
    let rows = wait_rows(&r.mesh, 1).await;
    assert_eq!(rows[0].6, "cancelled");
    assert!(
        (2..50).contains(&rows[0].3),
        "completion tokens so far: {}",
        rows[0].3
    );
    // The lease was given back: concurrency is free again.
    let limits = c
        .get_limits(bearer(pb::GetLimitsRequest {}, &r.token))
        .await
        .expect("limits")
        .into_inner();
    let streams = limits
        .limits
        .iter()
        .find(|l| l.name == "concurrent_streams")
        .expect("streams");
    assert!(
        eventually(Duration::from_secs(2), || {
            let mut c = c.clone();
            let t = r.token.clone();
            async move {
                c.get_limits(bearer(pb::GetLimitsRequest {}, &t))
                    .await
                    .map(|l| {
                        l.into_inner()
                            .limits
                            .iter()
                            .any(|l| l.name == "concurrent_streams" && l.remaining == l.limit)
                    })
                    .unwrap_or(false)
            }
        })
        .await,
        "{streams:?}"
    );
}

fn quota_of(status: &Status) -> (String, Option<Duration>) {
    let d = status.get_error_details();
    let quota = d
        .quota_failure()
        .and_then(|q| q.violations.first().map(|v| v.subject.clone()))
        .unwrap_or_default();
    (quota, d.retry_info().and_then(|r| r.retry_delay))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_minute_and_concurrent_streams_are_enforced() {
    let r = rig(|c| {
        c.llm.default_limits.requests_per_minute = 3;
        c.llm.default_limits.concurrent_streams = 1;
    })
    .await;
    let mut c = llm(&r.mesh).await;
    // The per-minute count is kept per calendar minute: start early in
    // one, so that the four counted calls below (a few seconds) share it.
    let second = chrono::Timelike::second(&chrono::Utc::now());
    if second >= 45 {
        tokio::time::sleep(Duration::from_secs(u64::from(61 - second))).await;
    }
    // One slow stream holds the only slot.
    r.primary
        .push([Script::slow(10, Duration::from_millis(100))]);
    let mut slow = c
        .generate_stream(bearer(
            pb::GenerateStreamRequest {
                params: Some(params("fast", "slow")),
            },
            &r.token,
        ))
        .await
        .expect("slow stream")
        .into_inner();
    let err = stream(&mut c, &r.token, params("fast", "second"))
        .await
        .expect_err("busy");
    assert_eq!(err.code(), Code::ResourceExhausted);
    let (quota, retry) = quota_of(&err);
    assert_eq!(quota, "concurrent_streams");
    assert_eq!(retry, Some(Duration::from_secs(1)));
    assert_eq!(quota_description(&err), "at most 1 generations at once");
    while slow.message().await.expect("slow").is_some() {}
    // Slot free again at once: a call made as soon as the stream has
    // ended is admitted (the lease is given back before the next
    // admission, though the stream ends before Redis confirms it).
    stream(&mut c, &r.token, params("fast", "third"))
        .await
        .expect("the ended stream's slot is free");
    // Two requests counted (refusals do not count); a third is allowed,
    // a fourth is over the per-minute limit.
    stream(&mut c, &r.token, params("fast", "fourth"))
        .await
        .expect("third counted");
    let err = stream(&mut c, &r.token, params("fast", "fifth"))
        .await
        .expect_err("rpm");
    let (quota, retry) = quota_of(&err);
    assert_eq!(quota, "requests_per_minute");
    assert_eq!(quota_description(&err), "at most 3 requests per minute");
    let retry = retry.expect("retry info");
    assert!(retry <= Duration::from_secs(61), "{retry:?}");
    let limits = c
        .get_limits(bearer(pb::GetLimitsRequest {}, &r.token))
        .await
        .expect("limits")
        .into_inner()
        .limits;
    let rpm = limits
        .iter()
        .find(|l| l.name == "requests_per_minute")
        .expect("rpm");
    assert_eq!((rpm.limit, rpm.remaining), (3, 0));
    assert!(rpm.reset_time.is_some());
}

fn quota_description(status: &Status) -> String {
    status
        .get_error_details()
        .quota_failure()
        .and_then(|q| q.violations.first().map(|v| v.description.clone()))
        .unwrap_or_default()
}

async fn limit_of(c: &mut LlmServiceClient<Channel>, token: &str, name: &str) -> pb::Limit {
    c.get_limits(bearer(pb::GetLimitsRequest {}, token))
        .await
        .expect("limits")
        .into_inner()
        .limits
        .into_iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("no limit {name}"))
}

/// Runs `n` GenerateStream calls at once.
async fn at_once(
    c: &LlmServiceClient<Channel>,
    token: &str,
    p: &pb::GenerateParams,
    n: usize,
) -> Vec<Result<Outcome, Status>> {
    futures::future::join_all((0..n).map(|_| {
        let mut c = c.clone();
        let p = p.clone();
        async move { stream(&mut c, token, p).await }
    }))
    .await
}

/// The refusals among `results`, each RESOURCE_EXHAUSTED on `quota` with
/// a RetryInfo between 1s and `longest`: their descriptions. The calls
/// that were admitted completed.
fn refusals(results: &[Result<Outcome, Status>], quota: &str, longest: Duration) -> Vec<String> {
    let mut out = Vec::new();
    for r in results {
        match r {
            Ok(ok) => assert!(ok.completed.is_some(), "{ok:?}"),
            Err(err) => {
                assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
                let (subject, retry) = quota_of(err);
                assert_eq!(subject, quota);
                let retry = retry.expect("retry info");
                assert!(
                    (Duration::from_secs(1)..=longest).contains(&retry),
                    "until the window ends: {retry:?}"
                );
                out.push(quota_description(err));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_cost_budgets_reserve_each_calls_worst_case_up_front() {
    // Tokens: each call reserves prompt + max_tokens, so of five calls at
    // once only those that fit the day's budget together are admitted.
    let r = rig(|c| {
        c.llm.default_limits.tokens_per_day = 100;
    })
    .await;
    // Slow enough (2.5s) that all five overlap; reports 10 + 3 tokens.
    r.primary
        .set_fallback(Script::slow(3, Duration::from_millis(500)));
    let mut c = llm(&r.mesh).await;
    let mut p = params("fast", "one");
    p.max_tokens = 20;
    let prompt = c
        .count_tokens(bearer(
            pb::CountTokensRequest {
                params: Some(p.clone()),
            },
            &r.token,
        ))
        .await
        .expect("count")
        .into_inner()
        .prompt_tokens;
    let worst = prompt + 20;
    assert!(worst * 2 <= 100 && worst * 3 > 100, "worst case {worst}");
    let results = at_once(&c, &r.token, &p, 5).await;
    let refused = refusals(&results, "tokens_per_day", Duration::from_secs(86_400));
    assert_eq!(refused.len(), 3, "two of five admitted: {results:?}");
    for d in refused {
        assert!(
            d.contains(&format!("may use {worst} tokens")) && d.contains("of 100 tokens per day"),
            "{d}"
        );
    }
    assert_eq!(r.primary.hits(), 2);
    // Settled to what was used: 2 × 13.
    let settled = eventually(Duration::from_secs(2), || {
        let mut c = c.clone();
        let t = r.token.clone();
        async move { limit_of(&mut c, &t, "tokens_per_day").await.remaining == 74 }
    })
    .await;
    assert!(
        settled,
        "{:?}",
        limit_of(&mut c, &r.token, "tokens_per_day").await
    );
    // A call whose worst case exceeds what is left is refused outright.
    p.max_tokens = 200;
    let err = stream(&mut c, &r.token, p.clone())
        .await
        .expect_err("too big");
    assert_eq!(quota_of(&err).0, "tokens_per_day");
    assert!(
        quota_description(&err).contains("but 74 of 100"),
        "{}",
        quota_description(&err)
    );
    assert_eq!(r.primary.hits(), 2);

    // Cost: the worst case at the model's prices (1 µ$ per prompt token,
    // 2 per completion token).
    let r = rig(|c| {
        c.llm.default_limits.cost_micros_per_month = 150;
    })
    .await;
    r.primary
        .set_fallback(Script::slow(3, Duration::from_millis(500)));
    let mut c = llm(&r.mesh).await;
    let mut p = params("fast", "one");
    p.max_tokens = 20;
    let worst_cost = prompt + 2 * 20;
    assert!(
        worst_cost * 2 <= 150 && worst_cost * 3 > 150,
        "{worst_cost}"
    );
    let results = at_once(&c, &r.token, &p, 4).await;
    let refused = refusals(
        &results,
        "cost_micros_per_month",
        Duration::from_secs(31 * 86_400),
    );
    assert_eq!(refused.len(), 2, "two of four admitted: {results:?}");
    for d in refused {
        assert!(
            d.contains(&format!("may cost {worst_cost} micro-dollars")),
            "{d}"
        );
    }
    // Settled: 2 × (10 + 2 × 3) µ$ used of 150, readable through GetLimits.
    let settled = eventually(Duration::from_secs(2), || {
        let mut c = c.clone();
        let t = r.token.clone();
        async move {
            let l = limit_of(&mut c, &t, "cost_micros_per_month").await;
            (l.limit, l.remaining) == (150, 118)
        }
    })
    .await;
    let cost = limit_of(&mut c, &r.token, "cost_micros_per_month").await;
    assert!(settled, "{cost:?}");
    assert!(cost.reset_time.is_some());
    let rows = wait_rows(&r.mesh, 2).await;
    assert_eq!(rows.iter().map(|r| r.5).sum::<i64>(), 32);
    // Admins are unlimited by default.
    let (_, admin) = admin_account(&r.mesh, "boss").await;
    let results = at_once(&c, &admin, &p, 4).await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deterministic_requests_are_served_from_the_cache() {
    let r = rig(|_| {}).await;
    let mut c = llm(&r.mesh).await;
    let mut p = params("fast", "cache me");
    p.temperature = Some(0.0);
    p.cache = true;
    let first = stream(&mut c, &r.token, p.clone()).await.expect("first");
    assert!(!first.completed.as_ref().expect("done").cached);
    let second = stream(&mut c, &r.token, p.clone()).await.expect("second");
    let done = second.completed.expect("done");
    assert!(done.cached);
    assert_eq!(second.deltas.concat(), "Hello world");
    assert_eq!(done.usage.expect("usage").cost_micros, 0);
    assert_eq!(r.primary.hits(), 1, "served without calling upstream");
    // A different prompt is a miss.
    let mut other = p.clone();
    other.messages = vec![user("something else")];
    stream(&mut c, &r.token, other).await.expect("miss");
    assert_eq!(r.primary.hits(), 2);
    let rows = wait_rows(&r.mesh, 3).await;
    assert_eq!(rows.iter().filter(|r| r.7).count(), 1);
    assert!(rows.iter().filter(|r| r.7).all(|r| r.5 == 0));

    // Caching needs temperature 0.
    p.temperature = Some(0.7);
    let err = stream(&mut c, &r.token, p).await.expect_err("invalid");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violations(&err), vec!["params.cache"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_conversations_are_trimmed_oldest_first() {
    let r = rig(|c| {
        let m = c.llm.models.get_mut("fast").expect("fast");
        m.context_window = 400;
        m.default_max_tokens = 100;
    })
    .await;
    let mut c = llm(&r.mesh).await;
    let long = "lorem ipsum ".repeat(40); // ~80 tokens each
    let mut p = params("fast", "latest question");
    p.messages = vec![
        user(&format!("oldest {long}")),
        pb::Message {
            role: pb::Role::Assistant as i32,
            content: format!("older {long}"),
        },
        user(&format!("middle {long}")),
        pb::Message {
            role: pb::Role::Assistant as i32,
            content: format!("recent {long}"),
        },
        user("latest question"),
    ];
    let counted = c
        .count_tokens(bearer(
            pb::CountTokensRequest {
                params: Some(p.clone()),
            },
            &r.token,
        ))
        .await
        .expect("count")
        .into_inner();
    assert!(!counted.fits, "{counted:?}");
    assert!(counted.prompt_tokens > 300);
    stream(&mut c, &r.token, p.clone()).await.expect("trimmed");
    let sent = &r.primary.seen()[0].body["messages"];
    let sent: Vec<String> = sent
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            m["content"]
                .as_str()
                .unwrap_or_default()
                .split(' ')
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(
        sent.first().map(String::as_str),
        Some("You"),
        "system prompt kept: {sent:?}"
    );
    assert_eq!(sent.last().map(String::as_str), Some("latest"));
    assert!(!sent.contains(&"oldest".to_string()), "{sent:?}");
    assert!(sent.len() < 6);

    // When even the system prompt and the latest message cannot fit: a
    // field violation, not an upstream call.
    let mut p = params("fast", &"word ".repeat(400));
    p.max_tokens = 100;
    let err = stream(&mut c, &r.token, p).await.expect_err("too long");
    assert_eq!(violations(&err), vec!["params.messages"]);
    assert_eq!(r.primary.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_field_violations() {
    let r = rig(|_| {}).await;
    let mut c = llm(&r.mesh).await;
    let checker = c.clone();
    let check = |p: pb::GenerateParams, field: &'static str| {
        let mut c = checker.clone();
        let t = r.token.clone();
        async move {
            let err = c
                .generate(bearer(pb::GenerateRequest { params: Some(p) }, &t))
                .await
                .expect_err("invalid");
            assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
            assert!(
                violations(&err).contains(&field.to_string()),
                "{field}: {:?}",
                violations(&err)
            );
        }
    };
    check(params("nope", "hi"), "params.model").await;
    check(params("", "hi"), "params.model").await;
    let mut p = params("fast", "hi");
    p.messages.clear();
    check(p, "params.messages").await;
    let mut p = params("fast", "hi");
    p.messages[0].role = 0;
    check(p, "params.messages[0].role").await;
    let mut p = params("fast", "hi");
    p.messages.push(user("  "));
    check(p, "params.messages[1].content").await;
    let mut p = params("fast", "hi");
    p.messages[0].role = pb::Role::Assistant as i32;
    check(p, "params.messages").await;
    let mut p = params("fast", "hi");
    p.temperature = Some(2.5);
    check(p, "params.temperature").await;
    let mut p = params("fast", "hi");
    p.max_tokens = -1;
    check(p, "params.max_tokens").await;
    let mut p = params("fast", "hi");
    p.max_tokens = 5000;
    check(p, "params.max_tokens").await;
    let err = c
        .generate(bearer(pb::GenerateRequest { params: None }, &r.token))
        .await
        .expect_err("no params");
    assert_eq!(violations(&err), vec!["params"]);
    let mut p = params("fast", "hi");
    p.retrieval = Some(pb::RetrievalOptions {
        top_k: 0,
        ..Default::default()
    });
    check(p, "params.retrieval.top_k").await;
    assert_eq!(r.primary.hits(), 0, "nothing invalid reached the upstream");
    // No credentials.
    let err = c
        .generate(pb::GenerateRequest {
            params: Some(params("fast", "hi")),
        })
        .await
        .expect_err("anonymous");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = c
        .list_models(pb::ListModelsRequest {})
        .await
        .expect_err("anonymous");
    assert_eq!(err.code(), Code::Unauthenticated);
    // A bad usage window.
    let err = c
        .get_usage(bearer(
            pb::GetUsageRequest {
                start_time: Some(prost_types::Timestamp {
                    seconds: 2_000_000_000,
                    nanos: 0,
                }),
                end_time: Some(prost_types::Timestamp {
                    seconds: 1_000_000_000,
                    nanos: 0,
                }),
                user_id: String::new(),
            },
            &r.token,
        ))
        .await
        .expect_err("window");
    assert_eq!(violations(&err), vec!["start_time"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_see_only_their_own_usage_and_admins_see_everyones() {
    let r = rig(|_| {}).await;
    let mut c = llm(&r.mesh).await;
    let other = register(&mut auth(&r.mesh).await, "otheruser").await;
    let other_token = access(&other);
    let other_id = other.account.expect("account").id;
    stream(&mut c, &r.token, params("fast", "mine"))
        .await
        .expect("mine");
    stream(&mut c, &other_token, params("fast", "theirs"))
        .await
        .expect("theirs");
    stream(&mut c, &other_token, params("fast", "theirs again"))
        .await
        .expect("theirs");
    wait_rows(&r.mesh, 3).await;

    let own = usage_of(&mut c, &r.token, "").await.expect("own");
    assert_eq!(own.total.expect("total").requests, 1);
    let same = usage_of(&mut c, &r.token, &r.user_id)
        .await
        .expect("own by id");
    assert_eq!(same.total.expect("total").requests, 1);
    for target in [other_id.as_str(), "*"] {
        let err = usage_of(&mut c, &r.token, target)
            .await
            .expect_err("not theirs");
        assert_eq!(err.code(), Code::PermissionDenied, "{target}");
    }
    let (_, admin) = admin_account(&r.mesh, "auditor").await;
    let theirs = usage_of(&mut c, &admin, &other_id)
        .await
        .expect("admin reads");
    assert_eq!(theirs.total.expect("total").requests, 2);
    let all = usage_of(&mut c, &admin, "*")
        .await
        .expect("admin reads all");
    assert_eq!(all.total.expect("total").requests, 3);

    // ListModels shows the configured aliases.
    let models = c
        .list_models(bearer(pb::ListModelsRequest {}, &r.token))
        .await
        .expect("models")
        .into_inner()
        .models;
    let fast = models.iter().find(|m| m.alias == "fast").expect("fast");
    assert_eq!(fast.providers, vec!["primary", "backup"]);
    assert_eq!(fast.context_window, 4096);
    assert_eq!(fast.prompt_price_per_million, 1_000_000);
    assert_eq!(models.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrieval_grounds_the_prompt_and_streams_citations_first() {
    use trellis_proto::search::v1 as spb;
    let r = rig(|_| {}).await;
    let mut search = crate::search::search_client(&r.mesh).await;
    let mut shared = crate::search::doc(
        "kb",
        "1",
        "Vacation policy",
        "Employees get 30 days of paid vacation per year.",
    );
    shared.visibility = spb::Visibility::Shared as i32;
    let mut other = crate::search::doc(
        "kb",
        "2",
        "Expense policy",
        "Receipts are needed for every expense.",
    );
    other.visibility = spb::Visibility::Shared as i32;
    crate::search::index(&mut search, &r.token, vec![shared, other]).await;
    // Another user's private document must never be retrieved.
    let intruder = register(&mut auth(&r.mesh).await, "intruder").await;
    crate::search::index(
        &mut search,
        &access(&intruder),
        vec![crate::search::doc(
            "kb",
            "3",
            "Secret vacation plan",
            "vacation secret",
        )],
    )
    .await;

    let mut c = llm(&r.mesh).await;
    let mut p = params("fast", "How many vacation days do I get?");
    p.retrieval = Some(pb::RetrievalOptions {
        top_k: 3,
        ..Default::default()
    });
    let mut s = c
        .generate_stream(bearer(
            pb::GenerateStreamRequest {
                params: Some(p.clone()),
            },
            &r.token,
        ))
        .await
        .expect("stream")
        .into_inner();
    let first = s.message().await.expect("first").expect("event");
    let Some(Event::Citations(cites)) = first.event else {
        panic!("citations come first: {first:?}");
    };
    let titles: Vec<&str> = cites.citations.iter().map(|c| c.title.as_str()).collect();
    assert_eq!(titles, vec!["Vacation policy"]);
    assert!(cites.citations[0].snippet.contains("30 days"));
    assert!(!cites.citations[0].snippet.contains("<mark>"));
    while s.message().await.expect("rest").is_some() {}
    let system = r.primary.seen()[0].body["messages"][0]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(system.starts_with("You are terse."), "{system}");
    assert!(system.contains("[1] Vacation policy"), "{system}");
    assert!(!system.contains("Secret"), "{system}");

    // Unary Generate returns them too; collections narrow the search.
    p.retrieval = Some(pb::RetrievalOptions {
        top_k: 2,
        query: "expense receipts".into(),
        collections: vec!["kb".into()],
        ..Default::default()
    });
    let g = c
        .generate(bearer(pb::GenerateRequest { params: Some(p) }, &r.token))
        .await
        .expect("generate")
        .into_inner();
    assert_eq!(g.citations.len(), 1);
    assert_eq!(g.citations[0].title, "Expense policy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_provider_fails_over_and_counts_against_its_breaker() {
    let hole = Blackhole::start().await;
    let r = rig(|c| {
        let p = c.llm.providers.get_mut("primary").expect("primary");
        p.base_url = hole.base_url();
        p.connect_timeout = Duration::from_millis(300);
        p.max_retries = 2;
        c.llm.breaker_failures = 2;
    })
    .await;
    let mut c = llm(&r.mesh).await;
    for round in 1..=2 {
        let t = Instant::now();
        let out = stream(&mut c, &r.token, params("fast", "hi"))
            .await
            .expect("the backup answers");
        assert_eq!(out.completed.expect("completed").provider, "backup");
        // One connect timeout, not retried (it already cost its time).
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert_eq!(r.backup.hits(), round);
    }
    let m = r.mesh.metrics().await;
    assert_sample(
        &m,
        "trellis_llm_failovers_total{provider=\"primary\",reason=\"connect_timeout\"} 2",
    );
    assert_sample(
        &m,
        "trellis_llm_upstream_duration_seconds_count{outcome=\"connect_timeout\",provider=\"primary\"} 2",
    );
    // Two consecutive failures opened the breaker: the provider is skipped.
    assert_sample(&m, "trellis_llm_breaker_state{provider=\"primary\"} 1");
    let err = stream(&mut c, &r.token, params("solo", "hi"))
        .await
        .expect_err("open");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("circuit open"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_retried_then_fails_over() {
    let refused = refused_base_url().await;
    let r = rig(|c| {
        let p = c.llm.providers.get_mut("primary").expect("primary");
        p.base_url = refused;
        p.max_retries = 1;
    })
    .await;
    let mut c = llm(&r.mesh).await;
    let out = stream(&mut c, &r.token, params("fast", "hi"))
        .await
        .expect("the backup answers");
    assert_eq!(out.completed.expect("completed").provider, "backup");
    let m = r.mesh.metrics().await;
    assert_sample(
        &m,
        "trellis_llm_upstream_duration_seconds_count{outcome=\"connect\",provider=\"primary\"} 2",
    );
    assert_sample(
        &m,
        "trellis_llm_failovers_total{provider=\"primary\",reason=\"connect\"} 1",
    );
    // Alone, the model is UNAVAILABLE and says why.
    let err = stream(&mut c, &r.token, params("solo", "hi"))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("connection failed"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_total_timeout_bounds_the_whole_call() {
    let r = rig(|c| {
        c.llm
            .providers
            .get_mut("primary")
            .expect("primary")
            .total_timeout = Duration::from_millis(700);
    })
    .await;
    let mut c = llm(&r.mesh).await;
    // Mid-stream: the stream ends with DEADLINE_EXCEEDED and what was
    // produced is billed; no failover after the first token.
    r.primary
        .push([Script::slow(50, Duration::from_millis(100))]);
    let t = Instant::now();
    let out = stream(&mut c, &r.token, params("fast", "long story"))
        .await
        .expect("stream");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(
        (2..50).contains(&out.deltas.len()),
        "{} deltas",
        out.deltas.len()
    );
    assert!(out.completed.is_none());
    let failed = out.failed.expect("failed event");
    assert_eq!(failed.code, Code::DeadlineExceeded as i32, "{failed:?}");
    let usage = failed.usage.expect("partial usage");
    assert!(usage.estimated);
    assert!(usage.completion_tokens >= out.deltas.len() as i32);
    assert_eq!(r.backup.hits(), 0);
    let rows = wait_rows(&r.mesh, 1).await;
    assert_eq!(rows[0].6, "failed");
    assert_eq!(rows[0].3, usage.completion_tokens);
    assert!(
        eventually(Duration::from_secs(2), || async {
            r.primary.abandoned() == 1
        })
        .await,
        "the upstream connection was closed"
    );

    // Before the first token it bounds the wait even when the first-token
    // timeout (5s here) is longer: the provider is failed over.
    r.primary.push([Script::Hang]);
    let t = Instant::now();
    let out = stream(&mut c, &r.token, params("fast", "hi"))
        .await
        .expect("stream");
    assert_eq!(out.completed.expect("completed").provider, "backup");
    assert!(
        t.elapsed() < Duration::from_millis(3500),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunk_or_an_error_object_after_the_first_token_ends_the_stream() {
    let r = rig(|_| {}).await;
    let mut c = llm(&r.mesh).await;
    r.primary.push([Script::MalformedAfter {
        pieces: vec!["partial".into(), " text".into()],
    }]);
    let out = stream(&mut c, &r.token, params("fast", "hi"))
        .await
        .expect("stream");
    assert_eq!(out.deltas.concat(), "partial text");
    assert!(out.completed.is_none());
    let failed = out.failed.expect("failed event");
    assert_eq!(failed.code, Code::Unavailable as i32);
    assert!(failed.message.contains("malformed"), "{}", failed.message);
    let usage = failed.usage.expect("partial usage");
    assert_eq!((usage.completion_tokens, usage.estimated), (2, true));
    assert_eq!(r.backup.hits(), 0, "no failover after the first token");

    r.primary.push([Script::ErrorAfter {
        pieces: vec!["half".into()],
        message: "model overloaded".into(),
    }]);
    let out = stream(&mut c, &r.token, params("fast", "hi"))
        .await
        .expect("stream");
    assert_eq!(out.deltas.concat(), "half");
    let failed = out.failed.expect("failed event");
    assert_eq!(failed.code, Code::Unavailable as i32);
    assert!(
        failed.message.contains("model overloaded"),
        "{}",
        failed.message
    );
    assert_eq!(failed.usage.expect("usage").completion_tokens, 1);
    assert_eq!(r.backup.hits(), 0);
    let rows = wait_rows(&r.mesh, 2).await;
    assert_eq!(
        rows.iter()
            .map(|r| (r.1.as_str(), r.3, r.6.as_str()))
            .collect::<Vec<_>>(),
        vec![("primary", 2, "failed"), ("primary", 1, "failed")]
    );

    // The same error object before any token fails over.
    r.primary.push([Script::ErrorAfter {
        pieces: vec![],
        message: "model overloaded".into(),
    }]);
    let out = stream(&mut c, &r.token, params("fast", "hi"))
        .await
        .expect("stream");
    assert_eq!(out.completed.expect("completed").provider, "backup");
    assert_eq!(out.deltas.concat(), "from backup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_on_the_same_provider_with_back_off() {
    let r = rig(|c| {
        c.llm
            .providers
            .get_mut("primary")
            .expect("primary")
            .max_retries = 1;
    })
    .await;
    let mut c = llm(&r.mesh).await;
    r.primary.push([Script::status(500)]);
    let out = stream(&mut c, &r.token, params("fast", "hi"))
        .await
        .expect("stream");
    assert_eq!(out.completed.expect("completed").provider, "primary");
    assert_eq!(out.deltas.concat(), "Hello world");
    assert_eq!((r.primary.hits(), r.backup.hits()), (2, 0));
    let m = r.mesh.metrics().await;
    assert_sample(
        &m,
        "trellis_llm_upstream_duration_seconds_count{outcome=\"server_error\",provider=\"primary\"} 1",
    );
    assert!(!m.contains("trellis_llm_failovers_total{"), "{m}");

    // Retry-After as an HTTP date is honoured too (whole seconds: 3-4s
    // from now, less the time until the gateway reads it).
    let at = chrono::Utc::now() + chrono::Duration::seconds(4);
    r.primary.push([Script::Status {
        code: 429,
        retry_after: Some(at.format("%a, %d %b %Y %H:%M:%S GMT").to_string()),
    }]);
    let out = stream(&mut c, &r.token, params("fast", "hi"))
        .await
        .expect("stream");
    assert_eq!(out.completed.expect("completed").provider, "primary");
    let seen = r.primary.seen();
    assert_eq!(seen.len(), 4);
    let waited = seen[3].at - seen[2].at;
    assert!(
        (Duration::from_millis(1500)..Duration::from_millis(4500)).contains(&waited),
        "retried after {waited:?}"
    );

    // Both tries refused, with a Retry-After beyond llm.retry_max: the
    // caller is told when to come back.
    r.primary.push([
        Script::Status {
            code: 429,
            retry_after: Some("1".into()),
        },
        Script::Status {
            code: 429,
            retry_after: Some("30".into()),
        },
    ]);
    let err = stream(&mut c, &r.token, params("solo", "hi"))
        .await
        .expect_err("rate limited");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("HTTP 429"), "{}", err.message());
    let retry = err
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay);
    assert_eq!(retry, Some(Duration::from_secs(30)));
    // A plain failure carries no RetryInfo.
    r.primary.push([Script::status(502), Script::status(502)]);
    let err = stream(&mut c, &r.token, params("solo", "hi"))
        .await
        .expect_err("failing");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.get_error_details().retry_info().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_answers_expire_after_the_cache_ttl() {
    let r = rig(|c| {
        c.llm.cache_ttl = Duration::from_secs(1);
    })
    .await;
    let mut c = llm(&r.mesh).await;
    let mut p = params("fast", "cache me briefly");
    p.temperature = Some(0.0);
    p.cache = true;
    let first = stream(&mut c, &r.token, p.clone()).await.expect("first");
    assert!(!first.completed.expect("done").cached);
    let second = stream(&mut c, &r.token, p.clone()).await.expect("second");
    assert!(second.completed.expect("done").cached);
    assert_eq!(r.primary.hits(), 1);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let third = stream(&mut c, &r.token, p.clone()).await.expect("third");
    let done = third.completed.expect("done");
    assert!(!done.cached, "expired: asked upstream again");
    assert!(done.usage.expect("usage").cost_micros > 0, "and billed");
    assert_eq!(r.primary.hits(), 2);
    // ... and cached again from then on.
    let fourth = stream(&mut c, &r.token, p).await.expect("fourth");
    assert!(fourth.completed.expect("done").cached);
    assert_eq!(r.primary.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_needs_credentials_and_the_right_permission() {
    use trellis_proto::auth::v1 as apb;
    let r = rig(|_| {}).await;
    let mut c = llm(&r.mesh).await;
    let p = || Some(params("fast", "hi"));
    let codes = |results: Vec<Result<(), Status>>| {
        results
            .into_iter()
            .map(|r| r.err().map(|e| e.code()))
            .collect::<Vec<_>>()
    };
    // Anonymous: every RPC is UNAUTHENTICATED.
    let anonymous = codes(vec![
        c.generate_stream(pb::GenerateStreamRequest { params: p() })
            .await
            .map(drop),
        c.count_tokens(pb::CountTokensRequest { params: p() })
            .await
            .map(drop),
        c.get_usage(pb::GetUsageRequest::default()).await.map(drop),
        c.get_limits(pb::GetLimitsRequest {}).await.map(drop),
    ]);
    assert_eq!(anonymous, vec![Some(Code::Unauthenticated); 4]);

    // An API key scoped to reading usage may not generate.
    let a = auth(&r.mesh).await;
    let key = |scopes: &[&str]| {
        let mut a = a.clone();
        let t = r.token.clone();
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        async move {
            a.create_api_key(bearer(
                apb::CreateApiKeyRequest {
                    name: scopes.join(" "),
                    scopes,
                    ttl: None,
                },
                &t,
            ))
            .await
            .expect("api key")
            .into_inner()
            .secret
        }
    };
    let usage_only = key(&["llm:usage:read"]).await;
    let denied = codes(vec![
        c.generate(bearer(pb::GenerateRequest { params: p() }, &usage_only))
            .await
            .map(drop),
        c.generate_stream(bearer(
            pb::GenerateStreamRequest { params: p() },
            &usage_only,
        ))
        .await
        .map(drop),
        c.count_tokens(bearer(pb::CountTokensRequest { params: p() }, &usage_only))
            .await
            .map(drop),
        c.get_limits(bearer(pb::GetLimitsRequest {}, &usage_only))
            .await
            .map(drop),
        c.list_models(bearer(pb::ListModelsRequest {}, &usage_only))
            .await
            .map(drop),
    ]);
    assert_eq!(denied, vec![Some(Code::PermissionDenied); 5]);
    assert_eq!(r.primary.hits(), 0);
    usage_of(&mut c, &usage_only, "")
        .await
        .expect("reads own usage");

    // A generate-only key generates but may not read usage.
    let generate_only = key(&["llm:generate:call"]).await;
    stream(&mut c, &generate_only, params("fast", "hi"))
        .await
        .expect("generates");
    let err = usage_of(&mut c, &generate_only, "")
        .await
        .expect_err("no usage scope");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(r.primary.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_tokens_counts_exactly_and_says_whether_the_request_fits() {
    let r = rig(|_| {}).await;
    let mut c = llm(&r.mesh).await;
    let count = |p: pb::GenerateParams| {
        let mut c = c.clone();
        let t = r.token.clone();
        async move {
            c.count_tokens(bearer(pb::CountTokensRequest { params: Some(p) }, &t))
                .await
                .map(|r| r.into_inner())
        }
    };
    let mut p = params("fast", "The quick brown fox jumps over the lazy dog.");
    p.system_prompt.clear();
    // o200k_base: 10 tokens of text, 4 per message, 3 priming the reply.
    let n = count(p.clone()).await.expect("count");
    assert_eq!((n.prompt_tokens, n.fits), (17, true));
    p.messages.push(pb::Message {
        role: pb::Role::Assistant as i32,
        content: "hello".into(),
    });
    assert_eq!(count(p.clone()).await.expect("count").prompt_tokens, 22);
    // Fits exactly when prompt + max_tokens is the context window (4096).
    p.max_tokens = 4096 - 22;
    assert!(count(p.clone()).await.expect("count").fits);
    p.max_tokens += 1;
    assert!(!count(p.clone()).await.expect("count").fits);
    // The same validation as Generate; nothing reaches the upstream.
    let err = count(params("nope", "hi"))
        .await
        .expect_err("unknown model");
    assert_eq!(violations(&err), vec!["params.model"]);
    let mut bad = params("fast", "hi");
    bad.max_tokens = 4096;
    let err = count(bad).await.expect_err("max_tokens");
    assert_eq!(violations(&err), vec!["params.max_tokens"]);
    let err = c
        .count_tokens(bearer(pb::CountTokensRequest { params: None }, &r.token))
        .await
        .expect_err("no params");
    assert_eq!(violations(&err), vec!["params"]);
    assert_eq!(r.primary.hits(), 0);
}

/// Drops the pending `call` once `fake` has received its `nth` request
/// (and a little more has happened upstream); false if it ended first.
async fn gone_once_upstream_has_it<F: std::future::Future>(
    call: F,
    fake: &FakeLlm,
    nth: usize,
) -> bool {
    let reached = async {
        while fake.hits() < nth {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    tokio::select! {
        _ = call => false,
        _ = tokio::time::timeout(Duration::from_secs(10), reached) => true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_before_the_first_token_or_a_unary_call_reaches_the_upstream() {
    let r = rig(|_| {}).await;
    let mut c = llm(&r.mesh).await;
    // Before the first token (the upstream sends only keep-alives): the
    // RPC has not even answered yet.
    r.primary.push([Script::Hang]);
    let call = c.generate_stream(bearer(
        pb::GenerateStreamRequest {
            params: Some(params("fast", "never mind")),
        },
        &r.token,
    ));
    assert!(
        gone_once_upstream_has_it(call, &r.primary, 1).await,
        "still waiting for the first token"
    );
    assert!(
        eventually(Duration::from_secs(3), || async {
            r.primary.abandoned() == 1
        })
        .await,
        "the fake upstream saw its connection close"
    );
    let rows = wait_rows(&r.mesh, 1).await;
    let (model, provider, prompt, completion, estimated, cost, status, _) = &rows[0];
    assert_eq!(
        (model.as_str(), provider.as_str(), status.as_str()),
        ("fast", "primary", "cancelled")
    );
    assert!(*prompt > 0 && *estimated, "the prompt was sent: {rows:?}");
    assert_eq!((*completion, *cost), (0, i64::from(*prompt)));
    assert_eq!(r.backup.hits(), 0);

    // A unary Generate whose caller goes away.
    r.primary
        .push([Script::slow(50, Duration::from_millis(100))]);
    let call = c.generate(bearer(
        pb::GenerateRequest {
            params: Some(params("fast", "long story")),
        },
        &r.token,
    ));
    assert!(gone_once_upstream_has_it(call, &r.primary, 2).await);
    assert!(
        eventually(Duration::from_secs(3), || async {
            r.primary.abandoned() == 2
        })
        .await,
        "the upstream of the unary call was closed"
    );
    let rows = wait_rows(&r.mesh, 2).await;
    assert_eq!(rows[1].6, "cancelled");
    assert!((1..50).contains(&rows[1].3), "{:?}", rows[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_usage_reports_the_window_asked_for() {
    use diesel_async::RunQueryDsl;
    let r = rig(|_| {}).await;
    let mut c = llm(&r.mesh).await;
    for model in ["fast", "fast", "solo"] {
        stream(&mut c, &r.token, params(model, "hi"))
            .await
            .expect("stream");
    }
    wait_rows(&r.mesh, 3).await;
    // Backdate the first call by 40 days and the second by 3.
    let mut conn = r.mesh.store.pg().await.expect("pg");
    for (nth, days) in [(0, 40), (1, 3)] {
        diesel::sql_query(format!(
            "UPDATE llm_usage SET created_at = now() - interval '{days} days' \
             WHERE id = (SELECT id FROM llm_usage ORDER BY id OFFSET {nth} LIMIT 1)"
        ))
        .execute(&mut conn)
        .await
        .expect("backdate");
    }
    drop(conn);
    let now = chrono::Utc::now();
    let ts = |t: chrono::DateTime<chrono::Utc>| prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    };
    let day = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d").to_string();
    let ago = |d: i64| now - chrono::Duration::days(d);
    let window = |start: Option<prost_types::Timestamp>, end: Option<prost_types::Timestamp>| {
        let mut c = c.clone();
        let t = r.token.clone();
        async move {
            c.get_usage(bearer(
                pb::GetUsageRequest {
                    start_time: start,
                    end_time: end,
                    user_id: String::new(),
                },
                &t,
            ))
            .await
            .map(|r| r.into_inner())
        }
    };
    let summary = |u: &pb::GetUsageResponse| {
        u.buckets
            .iter()
            .map(|b| (b.day.clone(), b.model.clone(), b.requests))
            .collect::<Vec<_>>()
    };
    // Default: the last 30 days.
    let u = window(None, None).await.expect("default");
    assert_eq!(
        summary(&u),
        vec![
            (day(ago(3)), "fast".into(), 1),
            (day(now), "solo".into(), 1)
        ]
    );
    assert_eq!(u.total.expect("total").requests, 2);
    // An old window.
    let u = window(Some(ts(ago(45))), Some(ts(ago(35))))
        .await
        .expect("old");
    assert_eq!(summary(&u), vec![(day(ago(40)), "fast".into(), 1)]);
    let total = u.total.expect("total");
    assert_eq!((total.prompt_tokens, total.completion_tokens), (12, 3));
    // Only an end: the 30 days before it.
    let u = window(None, Some(ts(ago(2)))).await.expect("end only");
    assert_eq!(summary(&u), vec![(day(ago(3)), "fast".into(), 1)]);
    // Only a start: until now.
    let u = window(Some(ts(now - chrono::Duration::hours(1))), None)
        .await
        .expect("start only");
    assert_eq!(summary(&u), vec![(day(now), "solo".into(), 1)]);
    // A window before anything happened is empty, not an error.
    let u = window(Some(ts(ago(100))), Some(ts(ago(90))))
        .await
        .expect("empty");
    assert!(u.buckets.is_empty());
    assert_eq!(u.total.expect("total").requests, 0);
    // Bad windows.
    let err = window(Some(ts(ago(500))), None)
        .await
        .expect_err("too long");
    assert_eq!(violations(&err), vec!["start_time"]);
    let err = window(
        None,
        Some(prost_types::Timestamp {
            seconds: 1,
            nanos: -1,
        }),
    )
    .await
    .expect_err("invalid");
    assert_eq!(violations(&err), vec!["end_time"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_that_refuse_stream_options_are_asked_without_them() {
    let r = rig(|c| {
        c.llm
            .providers
            .get_mut("backup")
            .expect("backup")
            .include_usage = false;
    })
    .await;
    let mut c = llm(&r.mesh).await;
    r.primary.set_fallback(Script::RejectsStreamOptions {
        pieces: vec!["old".into(), " server".into()],
    });
    let out = stream(&mut c, &r.token, params("solo", "hi"))
        .await
        .expect("asked again without");
    assert_eq!(out.deltas.concat(), "old server");
    let done = out.completed.expect("completed");
    assert_eq!(done.provider, "primary");
    assert!(done.usage.expect("usage").estimated);
    let seen = r.primary.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].body["stream_options"]["include_usage"], true);
    assert!(
        seen[1].body.get("stream_options").is_none(),
        "{:?}",
        seen[1].body
    );
    // Remembered: not sent to that provider again.
    stream(&mut c, &r.token, params("solo", "again"))
        .await
        .expect("stream");
    let seen = r.primary.seen();
    assert_eq!(seen.len(), 3);
    assert!(seen[2].body.get("stream_options").is_none());

    // A provider configured with include_usage = false never gets them.
    r.primary.push([Script::status(500)]);
    let out = stream(&mut c, &r.token, params("fast", "hi"))
        .await
        .expect("backup");
    let done = out.completed.expect("completed");
    assert_eq!(done.provider, "backup");
    assert!(
        done.usage.expect("usage").estimated,
        "no usage was asked for"
    );
    assert!(r.backup.seen()[0].body.get("stream_options").is_none());

    // Any other 400 is still the request's fault: no failover.
    r.primary.push([Script::status(400)]);
    let err = stream(&mut c, &r.token, params("fast", "hi"))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(r.backup.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prompt_reserves_its_exact_token_count() {
    let r = rig(|c| {
        c.llm.default_limits.tokens_per_day = 5000;
        c.llm.models.get_mut("fast").expect("fast").context_window = 65_536;
    })
    .await;
    let mut c = llm(&r.mesh).await;
    // ~20 KB: fits the window by its bytes, so only the reservation counts
    // its tokens (off the async workers).
    let mut p = params("fast", &"lorem ipsum dolor ".repeat(1200));
    p.max_tokens = 2000;
    let prompt = c
        .count_tokens(bearer(
            pb::CountTokensRequest {
                params: Some(p.clone()),
            },
            &r.token,
        ))
        .await
        .expect("count")
        .into_inner()
        .prompt_tokens;
    assert!(prompt + 2000 > 5000, "{prompt}");
    let err = stream(&mut c, &r.token, p.clone())
        .await
        .expect_err("over budget");
    assert_eq!(quota_of(&err).0, "tokens_per_day");
    let d = quota_description(&err);
    assert!(
        d.contains(&format!("may use {} tokens", prompt + 2000)),
        "{d}"
    );
    assert_eq!(r.primary.hits(), 0);
    // With room for it, it runs.
    p.max_tokens = 5000 - prompt;
    stream(&mut c, &r.token, p).await.expect("fits exactly");
    assert_eq!(r.primary.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_retrieval_filters_are_the_callers_field_violations() {
    use prost_types::value::Kind;
    let r = rig(|_| {}).await;
    let mut c = llm(&r.mesh).await;
    let value = |s: &str| prost_types::Value {
        kind: Some(Kind::StringValue(s.into())),
    };
    let cases: Vec<(pb::RetrievalOptions, &str)> = vec![
        (
            pb::RetrievalOptions {
                top_k: 3,
                filters: Some(prost_types::Struct {
                    fields: [("seniority".to_string(), value("sen\u{0}ior"))].into(),
                }),
                ..Default::default()
            },
            "params.retrieval.filters.seniority",
        ),
        (
            pb::RetrievalOptions {
                top_k: 3,
                filters: Some(prost_types::Struct {
                    fields: [("location".to_string(), value(&"x".repeat(300)))].into(),
                }),
                ..Default::default()
            },
            "params.retrieval.filters.location",
        ),
        (
            pb::RetrievalOptions {
                top_k: 3,
                collections: vec!["Not A Collection".into()],
                ..Default::default()
            },
            "params.retrieval.collections[0]",
        ),
        (
            pb::RetrievalOptions {
                top_k: 3,
                query: "bad\u{7}query".into(),
                ..Default::default()
            },
            "params.retrieval.query",
        ),
    ];
    for (options, field) in cases {
        let mut p = params("fast", "Who knows Rust?");
        p.retrieval = Some(options);
        let err = c
            .generate(bearer(pb::GenerateRequest { params: Some(p) }, &r.token))
            .await
            .expect_err("invalid retrieval");
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert_eq!(violations(&err), vec![field.to_string()]);
    }
    assert_eq!(r.primary.hits(), 0, "nothing invalid reached the provider");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrieval_sees_the_callers_private_documents_and_nobody_elses() {
    use trellis_proto::search::v1 as spb;
    let r = rig(|_| {}).await;
    let mut search = crate::search::search_client(&r.mesh).await;
    let other = access(&register(&mut auth(&r.mesh).await, "neighbour").await);
    // Private to the caller, private to the neighbour, and one shared by
    // the neighbour.
    crate::search::index(
        &mut search,
        &r.token,
        vec![crate::search::doc(
            "notes",
            "mine",
            "My onboarding checklist",
            "Laptop, badge and the onboarding buddy.",
        )],
    )
    .await;
    crate::search::index(
        &mut search,
        &other,
        vec![crate::search::doc(
            "notes",
            "theirs",
            "Neighbour onboarding diary",
            "Private onboarding thoughts.",
        )],
    )
    .await;
    let mut shared = crate::search::doc(
        "kb",
        "guide",
        "Onboarding guide",
        "Everyone's first week of onboarding.",
    );
    shared.visibility = spb::Visibility::Shared as i32;
    crate::search::index(&mut search, &other, vec![shared]).await;

    let c = llm(&r.mesh).await;
    let ask = |token: &str| {
        let mut c = c.clone();
        let token = token.to_string();
        async move {
            let mut p = params("fast", "What is in the onboarding?");
            p.retrieval = Some(pb::RetrievalOptions {
                top_k: 5,
                ..Default::default()
            });
            let g = c
                .generate(bearer(pb::GenerateRequest { params: Some(p) }, &token))
                .await
                .expect("generate")
                .into_inner();
            let mut t: Vec<String> = g.citations.into_iter().map(|c| c.title).collect();
            t.sort();
            t
        }
    };
    assert_eq!(
        ask(&r.token).await,
        vec!["My onboarding checklist", "Onboarding guide"]
    );
    let system = r.primary.seen()[0].body["messages"][0]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(system.contains("My onboarding checklist"), "{system}");
    assert!(!system.contains("Neighbour"), "{system}");
    // The same question from the neighbour: their own private document,
    // never the caller's.
    assert_eq!(
        ask(&other).await,
        vec!["Neighbour onboarding diary", "Onboarding guide"]
    );
    let system = r.primary.seen()[1].body["messages"][0]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!system.contains("My onboarding checklist"), "{system}");
    // Each mesh call ran as its caller: each history holds one search.
    for token in [&r.token, &other] {
        let history = || {
            let mut s = search.clone();
            let t = token.clone();
            async move {
                s.list_search_history(bearer(spb::ListSearchHistoryRequest::default(), &t))
                    .await
                    .map(|r| r.into_inner().entries)
                    .unwrap_or_default()
            }
        };
        assert!(
            eventually(Duration::from_secs(3), || async {
                history().await.len() == 1
            })
            .await
        );
        assert!(history().await[0].query.contains("onboarding"));
    }
}
