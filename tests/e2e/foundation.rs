//! The foundation: reflection through a real grpcurl, health following
//! dependencies, gRPC-web and CORS, request ids, metrics, unknown methods,
//! message limits, graceful drain on SIGTERM, split topologies, per-test
//! databases and the private dev servers.

use std::time::{Duration, Instant};

use tokio_stream::wrappers::ReceiverStream;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use trellis_core::ServiceName;
use trellis_mesh::CallContext;
use trellis_proto::system::v1::system_service_client::SystemServiceClient;
use trellis_proto::system::v1::{GetInfoRequest, GetInfoResponse};
use trellis_store::devserver::PrivateRedis;
use trellis_tests::{TestMesh, TestOptions, infra, split};

use crate::util::{eventually, grpc_frame, grpcurl, parse_grpc_web, raw_unary};

const SYSTEM: &str = "trellis.system.v1.SystemService";

pub(crate) fn run_grpcurl(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(grpcurl())
        .args(args)
        .output()
        .expect("grpcurl runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_and_describes_through_reflection() {
    let mesh = TestMesh::start().await;
    let addr = mesh.addr.to_string();
    let (ok, listed) = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || run_grpcurl(&["-plaintext", &addr, "list"])
    })
    .await
    .expect("join");
    assert!(ok, "grpcurl list failed: {listed}");
    for name in [
        SYSTEM,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            listed.lines().any(|l| l.trim() == name),
            "{name} missing from:\n{listed}"
        );
    }
    let (ok, described) = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || {
            run_grpcurl(&[
                "-plaintext",
                &addr,
                "describe",
                "trellis.system.v1.GetInfoResponse",
            ])
        }
    })
    .await
    .expect("join");
    assert!(ok, "grpcurl describe failed: {described}");
    assert!(
        described.contains("repeated string enabled_services"),
        "{described}"
    );
    assert!(
        described.contains(".google.protobuf.Duration uptime"),
        "{described}"
    );

    let (ok, called) = tokio::task::spawn_blocking(move || {
        run_grpcurl(&[
            "-plaintext",
            &addr,
            "trellis.system.v1.SystemService/GetInfo",
        ])
    })
    .await
    .expect("join");
    assert!(ok, "grpcurl call failed: {called}");
    assert!(called.contains("\"enabledServices\""), "{called}");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_info_describes_the_server() {
    let mesh = TestMesh::start().await;
    let info = mesh
        .system()
        .await
        .get_info(GetInfoRequest {})
        .await
        .expect("GetInfo")
        .into_inner();
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    assert!(!info.build.is_empty());
    assert!(info.services.contains(&SYSTEM.to_string()));
    assert!(info.enabled_services.contains(&"system".to_string()));
    let uptime = info.uptime.expect("uptime");
    assert!(uptime.seconds >= 0 && uptime.seconds < 60);
    assert!(info.start_time.is_some());
    mesh.shutdown().await;
}

async fn status_of(mesh: &TestMesh, service: &str) -> ServingStatus {
    let resp = mesh
        .health()
        .await
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .expect("health check")
        .into_inner();
    ServingStatus::try_from(resp.status).expect("known status")
}

/// A mesh on a Redis of its own (which a test may stop or freeze), kept in
/// the returned directory.
async fn mesh_on_own_redis() -> (tempfile::TempDir, PrivateRedis, TestMesh) {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = PrivateRedis::start(dir.path(), None)
        .await
        .expect("redis starts");
    let mesh = TestMesh::start_with(
        TestOptions {
            redis_url: Some(redis.url()),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    (dir, redis, mesh)
}

/// A Redis that hangs (frozen: its connections stay open, nothing is
/// answered) before the health probe has noticed: calls that need it end
/// in UNAVAILABLE naming Redis — worth retrying — not INTERNAL, and work
/// again once it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_redis_is_unavailable_not_internal() {
    use trellis_proto::llm::v1 as llm;
    use trellis_proto::llm::v1::llm_service_client::LlmServiceClient;
    let (_dir, redis, mesh) = mesh_on_own_redis().await;
    let mut auth = crate::auth::auth(&mesh).await;
    let token = crate::auth::access(&crate::auth::register(&mut auth, "frozen").await);
    let mut llm_client = LlmServiceClient::new(mesh.channel().await);

    redis.freeze();
    let login = crate::auth::login(&mut auth, "frozen", crate::auth::PASSWORD)
        .await
        .expect_err("login needs Redis");
    assert_eq!(login.code(), tonic::Code::Unavailable, "{login:?}");
    assert!(login.message().contains("redis"), "{login:?}");
    let limits = llm_client
        .get_limits(crate::auth::bearer(llm::GetLimitsRequest {}, &token))
        .await
        .expect_err("limits live in Redis");
    assert_eq!(limits.code(), tonic::Code::Unavailable, "{limits:?}");
    // Tokens are verified locally: who the caller is needs no Redis.
    let me = crate::auth::who(&mut auth, &token).await;
    assert!(
        me.is_ok() || me.as_ref().err().map(|s| s.code()) == Some(tonic::Code::Unavailable),
        "never INTERNAL: {me:?}"
    );

    redis.thaw();
    assert!(
        eventually(Duration::from_secs(10), || async {
            crate::auth::login(&mut auth.clone(), "frozen", crate::auth::PASSWORD)
                .await
                .is_ok()
        })
        .await,
        "login works again once Redis answers"
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_redis_down_and_back() {
    let (dir, redis, mesh) = mesh_on_own_redis().await;
    let port = redis.port;

    assert!(
        eventually(Duration::from_secs(5), || async {
            status_of(&mesh, "").await == ServingStatus::Serving
        })
        .await,
        "starts SERVING"
    );
    assert_eq!(status_of(&mesh, SYSTEM).await, ServingStatus::Serving);
    let unknown = mesh
        .health()
        .await
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(
        unknown.code(),
        tonic::Code::NotFound,
        "as the health protocol says"
    );

    redis.stop();
    assert!(
        eventually(Duration::from_secs(5), || async {
            status_of(&mesh, "").await == ServingStatus::NotServing
        })
        .await,
        "NOT_SERVING once Redis is down"
    );
    // SystemService needs no Redis: it keeps serving, and says so.
    assert_eq!(status_of(&mesh, SYSTEM).await, ServingStatus::Serving);
    mesh.system()
        .await
        .get_info(GetInfoRequest {})
        .await
        .expect("GetInfo works without Redis");
    // A call that needs Redis fails fast with UNAVAILABLE instead of hanging.
    let started = Instant::now();
    let err = mesh.store.redis().await.expect_err("redis is down");
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "failed fast: {:?}",
        started.elapsed()
    );

    let _redis = PrivateRedis::start(dir.path(), Some(port))
        .await
        .expect("redis restarts");
    assert!(
        eventually(Duration::from_secs(10), || async {
            status_of(&mesh, "").await == ServingStatus::Serving
        })
        .await,
        "SERVING again after Redis returns"
    );
    let mut conn = mesh.store.redis().await.expect("redis usable again");
    let pong: String = redis::cmd("PING")
        .query_async(&mut *conn)
        .await
        .expect("ping");
    assert_eq!(pong, "PONG");
    drop(conn);
    mesh.shutdown().await;
}

/// Pooled Redis connections are not PINGed on checkout: one whose link
/// the server cut must be noticed on its failed command and discarded, not
/// handed out again and again (idle connections go most recently used
/// first, so a kept dead one would be the next every time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_connection_cut_by_the_server_is_discarded_not_reused() {
    let mesh = TestMesh::start().await;
    let mut conn = mesh.store.redis().await.expect("redis");
    let id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut *conn)
        .await
        .expect("CLIENT ID");
    drop(conn);
    let mut other = mesh
        .store
        .redis_shared()
        .await
        .expect("a second connection");
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(id)
        .query_async(&mut other)
        .await
        .expect("CLIENT KILL");
    assert_eq!(killed, 1, "the pooled connection was cut");

    let mut failed = 0;
    let mut ids = Vec::new();
    for _ in 0..6 {
        let mut conn = mesh.store.redis().await.expect("a pooled connection");
        match redis::cmd("CLIENT")
            .arg("ID")
            .query_async::<i64>(&mut *conn)
            .await
        {
            Ok(n) => ids.push(n),
            Err(e) => {
                failed += 1;
                assert!(
                    e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error(),
                    "the cut connection fails as broken: {e}"
                );
            }
        }
    }
    assert!(failed <= 1, "the cut connection came back {failed} times");
    assert!(ids.len() >= 5 && !ids.contains(&id), "{ids:?} vs cut {id}");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_over_http1_with_cors() {
    let mesh = TestMesh::start().await;
    let http = reqwest::Client::builder()
        .http1_only()
        .build()
        .expect("client");
    let url = format!("{}/{SYSTEM}/GetInfo", mesh.url());

    let preflight = http
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,x-grpc-web,authorization",
        )
        .send()
        .await
        .expect("preflight");
    assert!(preflight.status().is_success(), "{}", preflight.status());
    let h = preflight.headers();
    assert_eq!(h["access-control-allow-origin"], "*");
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .expect("ascii")
        .to_lowercase();
    assert!(
        allowed.contains("x-grpc-web") && allowed.contains("authorization"),
        "{allowed}"
    );

    let resp = http
        .post(&url)
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("origin", "https://app.example.com")
        .body(grpc_frame(&[]))
        .send()
        .await
        .expect("grpc-web call");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    let h = resp.headers().clone();
    assert!(
        h["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("application/grpc-web")
    );
    let exposed = h["access-control-expose-headers"]
        .to_str()
        .expect("ascii")
        .to_lowercase();
    for name in ["grpc-status", "grpc-message", "x-request-id"] {
        assert!(exposed.contains(name), "{name} not exposed: {exposed}");
    }
    assert!(h.contains_key("x-request-id"));
    let body = resp.bytes().await.expect("body");
    let (messages, trailers) = parse_grpc_web(&body);
    assert!(trailers.contains("grpc-status:0"), "trailers: {trailers:?}");
    assert_eq!(messages.len(), 1);
    let info: GetInfoResponse = prost::Message::decode(messages[0].as_slice()).expect("decodes");
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));

    // Non-browser clients send no Origin and get no CORS headers.
    let plain = mesh
        .system()
        .await
        .get_info(GetInfoRequest {})
        .await
        .expect("native call");
    assert!(
        plain
            .metadata()
            .get("access-control-allow-origin")
            .is_none()
    );
    assert!(plain.metadata().get("vary").is_none());

    // A disallowed origin gets no CORS grant when origins are restricted.
    let strict = TestMesh::start_with(TestOptions::default(), |c| {
        c.server.cors_allowed_origins = vec!["https://app.example.com".into()];
    })
    .await;
    let url = format!("{}/{SYSTEM}/GetInfo", strict.url());
    for (origin, granted) in [
        ("https://app.example.com", true),
        ("https://evil.example.net", false),
    ] {
        let r = http
            .request(reqwest::Method::OPTIONS, &url)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .send()
            .await
            .expect("preflight");
        assert_eq!(
            r.headers().get("access-control-allow-origin").is_some(),
            granted,
            "origin {origin}"
        );
    }
    strict.shutdown().await;
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_is_echoed_or_generated() {
    let mesh = TestMesh::start().await;
    let mut client = mesh.system().await;

    let mut req = tonic::Request::new(GetInfoRequest {});
    req.metadata_mut()
        .insert("x-request-id", "trace-me-42".parse().expect("ascii"));
    let resp = client.get_info(req).await.expect("call");
    assert_eq!(
        resp.metadata().get("x-request-id").expect("echoed"),
        "trace-me-42"
    );

    let resp = client.get_info(GetInfoRequest {}).await.expect("call");
    let generated = resp
        .metadata()
        .get("x-request-id")
        .expect("generated")
        .to_str()
        .expect("ascii");
    let id = uuid::Uuid::parse_str(generated).expect("a UUID");
    assert_eq!(id.get_version_num(), 7);

    // An absurd id is replaced, not echoed into logs and forwarded calls.
    let mut req = tonic::Request::new(GetInfoRequest {});
    req.metadata_mut()
        .insert("x-request-id", "x".repeat(500).parse().expect("ascii"));
    let resp = client.get_info(req).await.expect("call");
    let replaced = resp
        .metadata()
        .get("x-request-id")
        .expect("present")
        .to_str()
        .expect("ascii");
    assert!(uuid::Uuid::parse_str(replaced).is_ok(), "{replaced}");
    mesh.shutdown().await;
}

pub fn metric_value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_the_calls_just_made() {
    let mesh = TestMesh::start().await;
    let http = reqwest::Client::new();
    let scrape = || async {
        let r = http
            .get(format!("{}/metrics", mesh.url()))
            .send()
            .await
            .expect("scrape");
        assert_eq!(r.status(), 200);
        r.text().await.expect("text")
    };
    let ok = r#"trellis_grpc_requests_total{code="OK",method="GetInfo",service="trellis.system.v1.SystemService"}"#;
    let before = metric_value(&scrape().await, ok);
    let channel = mesh.channel().await;
    let mut client = SystemServiceClient::new(channel.clone());
    for _ in 0..3 {
        client.get_info(GetInfoRequest {}).await.expect("call");
    }
    let err = raw_unary::<GetInfoRequest, GetInfoResponse>(
        channel,
        "/trellis.system.v1.SystemService/Nope",
        GetInfoRequest {},
    )
    .await
    .expect_err("unknown method");
    assert_eq!(err.code(), tonic::Code::Unimplemented);

    let text = scrape().await;
    assert_eq!(metric_value(&text, ok) - before, 3.0, "{text}");
    assert!(
        text.contains("trellis_grpc_request_duration_seconds_bucket"),
        "latency histogram"
    );
    assert!(
        text.contains(r#"trellis_pool_connections{pool="database",state="idle"}"#),
        "{text}"
    );
    assert!(
        text.contains(r#"trellis_pool_connections{pool="redis",state="idle"}"#),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, r#"trellis_grpc_in_flight{method="GetInfo""#),
        0.0,
        "nothing left in flight"
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_methods_and_services_are_unimplemented() {
    let mesh = TestMesh::start().await;
    for path in [
        "/trellis.system.v1.SystemService/DoesNotExist",
        "/trellis.nope.v1.Nope/Call",
    ] {
        let err = raw_unary::<GetInfoRequest, GetInfoResponse>(
            mesh.channel().await,
            path,
            GetInfoRequest {},
        )
        .await
        .expect_err("must fail");
        assert_eq!(err.code(), tonic::Code::Unimplemented, "{path}");
    }
    mesh.shutdown().await;
}

/// A message with room for a large payload, sent where GetInfoRequest is
/// expected (unknown fields would be ignored if it were small enough).
#[derive(Clone, PartialEq, prost::Message)]
struct Padded {
    #[prost(bytes = "vec", tag = "99")]
    padding: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_rejected_cleanly() {
    let mesh = TestMesh::start_with(TestOptions::default(), |c| {
        c.server.max_message_bytes = 64 * 1024
    })
    .await;
    let path = "/trellis.system.v1.SystemService/GetInfo";
    let small = Padded {
        padding: vec![1; 1024],
    };
    let info: GetInfoResponse = raw_unary(mesh.channel().await, path, small)
        .await
        .expect("small is fine");
    assert!(!info.version.is_empty());

    let big = Padded {
        padding: vec![7; 200 * 1024],
    };
    let err = raw_unary::<Padded, GetInfoResponse>(mesh.channel().await, path, big)
        .await
        .expect_err("too big");
    // tonic reports an over-limit message as OUT_OF_RANGE naming both sizes.
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("too large"), "{}", err.message());
    // The server is unharmed.
    mesh.system()
        .await
        .get_info(GetInfoRequest {})
        .await
        .expect("still serving");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_calls() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

    // The real signal path: handlers installed now, the process signalled below.
    let signal = trellis_mesh::shutdown_signal();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let infra = infra().await;
    let mut config = trellis_tests::mesh::test_config(
        infra.fresh_database().await,
        infra.redis_url.clone(),
        infra.fresh_prefix(),
    );
    config.server.drain_timeout = Duration::from_secs(20);
    let mesh = TestMesh::start_on(listener, config, signal).await;
    let addr = mesh.addr;

    // An in-flight call: a reflection stream that stays open until we close it.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut client = ServerReflectionClient::new(mesh.channel().await);
    let list = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    tx.send(list()).await.expect("send");
    let mut responses = client
        .server_reflection_info(ReceiverStream::new(rx))
        .await
        .expect("stream opens")
        .into_inner();
    assert!(responses.message().await.expect("first answer").is_some());

    nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGTERM)
        .expect("SIGTERM");

    // The listener closes: new connections are refused.
    assert!(
        eventually(Duration::from_secs(5), || async {
            tokio::net::TcpStream::connect(addr).await.is_err()
        })
        .await,
        "stops accepting new connections"
    );
    // The in-flight call is still served while draining…
    tx.send(list()).await.expect("send during drain");
    let answer = tokio::time::timeout(Duration::from_secs(5), responses.message())
        .await
        .expect("answered during drain")
        .expect("no error");
    assert!(answer.is_some(), "in-flight stream still answers");
    // …and once it finishes, the server stops well before the drain deadline.
    drop(tx);
    assert!(responses.message().await.expect("clean end").is_none());
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), mesh.wait())
        .await
        .expect("server stopped after its last call")
        .expect("clean exit");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_cuts_calls_that_never_end() {
    use tonic_health::pb::health_client::HealthClient;
    let mesh = TestMesh::start_with(TestOptions::default(), |c| {
        c.server.drain_timeout = Duration::from_millis(300);
    })
    .await;
    let mut watch = HealthClient::new(mesh.channel().await)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("ok").expect("status");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let started = Instant::now();
    let stop = tokio::spawn(mesh.shutdown());
    // Watchers learn the server is going away before it goes.
    let next = watch.message().await.expect("ok").expect("status");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    tokio::time::timeout(Duration::from_secs(5), stop)
        .await
        .expect("stops at the drain deadline")
        .expect("join");
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_topology_forwards_request_id_and_deadline() {
    // Server 0 serves nothing of its own but reaches SystemService at server 1.
    let meshes = split(&[&[], &[ServiceName::System]]).await;
    let (front, back) = (&meshes[0], &meshes[1]);
    let ctx = CallContext {
        request_id: Some("split-call-7".parse().expect("ascii")),
        deadline: Some(Instant::now() + Duration::from_secs(5)),
        authorization: Some("Bearer opaque-credential".parse().expect("ascii")),
    };
    let mut client = front
        .clients
        .client(ServiceName::System, &ctx, SystemServiceClient::new)
        .expect("system is reachable");
    let resp = client
        .get_info(GetInfoRequest {})
        .await
        .expect("through the mesh");
    // The back server echoes the id it received: the id was forwarded.
    assert_eq!(
        resp.metadata().get("x-request-id").expect("id"),
        "split-call-7"
    );

    let scrape = |m: &TestMesh| {
        let url = format!("{}/metrics", m.url());
        async move {
            reqwest::get(url)
                .await
                .expect("scrape")
                .text()
                .await
                .expect("text")
        }
    };
    let ok = r#"trellis_grpc_requests_total{code="OK",method="GetInfo""#;
    assert_eq!(
        metric_value(&scrape(back).await, ok),
        1.0,
        "served by the back server"
    );
    assert_eq!(
        metric_value(&scrape(front).await, ok),
        0.0,
        "not by the front one"
    );

    // No time left: the mesh call is refused before it is made.
    let expired = CallContext {
        deadline: Some(Instant::now()),
        ..ctx.clone()
    };
    let mut client = front
        .clients
        .client(ServiceName::System, &expired, SystemServiceClient::new)
        .expect("client");
    let err = client
        .get_info(GetInfoRequest {})
        .await
        .expect_err("deadline passed");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded);

    // A service that is neither local nor configured is UNAVAILABLE, by name.
    let err = front
        .clients
        .client(ServiceName::Search, &ctx, SystemServiceClient::new)
        .expect_err("search is nowhere");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(
        err.message().contains("services.search.address"),
        "{}",
        err.message()
    );
    for m in meshes {
        m.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_test_gets_its_own_migrated_database() {
    use diesel_async::RunQueryDsl;
    let a = TestMesh::start().await;
    let b = TestMesh::start().await;
    assert_ne!(a.config.database.url, b.config.database.url);
    assert_ne!(a.config.redis.key_prefix, b.config.redis.key_prefix);

    #[derive(diesel::QueryableByName)]
    struct Name {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
    }
    let mut conn = a.store.pg().await.expect("pg");
    let ext: Vec<Name> = diesel::sql_query("SELECT extname AS name FROM pg_extension ORDER BY 1")
        .load(&mut conn)
        .await
        .expect("query");
    let names: Vec<&str> = ext.iter().map(|e| e.name.as_str()).collect();
    assert!(
        names.contains(&"pg_trgm") && names.contains(&"citext"),
        "{names:?}"
    );
    diesel::sql_query("CREATE TABLE only_in_a (x int)")
        .execute(&mut conn)
        .await
        .expect("create");
    drop(conn);
    let mut conn = b.store.pg().await.expect("pg");
    let seen: Vec<Name> =
        diesel::sql_query("SELECT tablename AS name FROM pg_tables WHERE tablename = 'only_in_a'")
            .load(&mut conn)
            .await
            .expect("query");
    assert!(seen.is_empty(), "databases are isolated");
    drop(conn);
    a.shutdown().await;
    b.shutdown().await;
}

/// A dedicated connection to a freshly migrated database that plans every
/// statement generically (as prepared statements and foreign-key cascades
/// are run) with sequential scans priced out: a Seq Scan left in a plan
/// means no index can serve that statement.
async fn planner() -> diesel_async::AsyncPgConnection {
    use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
    let url = infra().await.fresh_database().await;
    let mut conn = AsyncPgConnection::establish(&url).await.expect("connect");
    conn.batch_execute(
        r#"
        SET enable_seqscan = off;
        SET plan_cache_mode = force_generic_plan;
        CREATE FUNCTION pg_temp.plan_lines(q text) RETURNS SETOF text
        LANGUAGE plpgsql AS $$
        DECLARE line text;
        BEGIN
            FOR line IN EXECUTE 'EXPLAIN ' || q LOOP
                RETURN NEXT line;
            END LOOP;
        END $$;
        "#,
    )
    .await
    .expect("planner session");
    conn
}

/// Whether `sql` (with `params` parameters, their types inferred) would
/// scan a whole table: the plan lines naming a Seq Scan.
async fn seq_scans(
    conn: &mut diesel_async::AsyncPgConnection,
    sql: &str,
    params: usize,
) -> Vec<String> {
    use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
    #[derive(diesel::QueryableByName)]
    struct Line {
        #[diesel(sql_type = diesel::sql_types::Text)]
        line: String,
    }
    conn.batch_execute(&format!("PREPARE planned AS {sql}"))
        .await
        .unwrap_or_else(|e| panic!("preparing {sql}: {e}"));
    let args = vec!["NULL"; params].join(", ");
    let lines: Vec<Line> = diesel::sql_query(format!(
        "SELECT line FROM pg_temp.plan_lines('EXECUTE planned({args})') AS line"
    ))
    .load(conn)
    .await
    .expect("plan");
    conn.batch_execute("DEALLOCATE planned")
        .await
        .expect("deallocate");
    assert!(!lines.is_empty(), "no plan for {sql}");
    lines
        .into_iter()
        .map(|l| l.line)
        .filter(|l| l.contains("Seq Scan"))
        .collect()
}

/// Every foreign key finds its referencing rows by index: the cascades of
/// PurgeUser (and any delete of a referenced row) then cost index lookups,
/// not a scan of the referencing table per deleted parent row. Checked on
/// the migrated schema twice over: an index leads with the key's columns
/// (whole, or partial on `col IS NOT NULL`, which an equality implies), and
/// the cascade's own statement, planned generically with sequential scans
/// priced out, has no Seq Scan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_foreign_key_cascade_is_served_by_an_index() {
    use diesel_async::RunQueryDsl;
    let mut conn = planner().await;
    #[derive(diesel::QueryableByName)]
    struct Fk {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        cascade: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        columns: i64,
        #[diesel(sql_type = diesel::sql_types::Bool)]
        indexed: bool,
    }
    let fks: Vec<Fk> = diesel::sql_query(
        "SELECT c.conname::text AS name, \
                'DELETE FROM ' || c.conrelid::regclass::text || ' WHERE ' || \
                string_agg(quote_ident(a.attname) || ' = $' || x.n, ' AND ' ORDER BY x.n) AS cascade, \
                count(*) AS columns, \
                EXISTS (SELECT 1 FROM pg_index i \
                        WHERE i.indrelid = c.conrelid \
                          AND (i.indkey::int2[])[0:cardinality(c.conkey) - 1] = c.conkey \
                          AND (i.indpred IS NULL OR cardinality(c.conkey) = 1 AND \
                               pg_get_expr(i.indpred, i.indrelid) = \
                               '(' || quote_ident(min(a.attname)) || ' IS NOT NULL)')) AS indexed \
         FROM pg_constraint c \
         CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS x(attnum, n) \
         JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = x.attnum \
         WHERE c.contype = 'f' AND c.connamespace = 'public'::regnamespace \
         GROUP BY c.conname, c.conrelid, c.conkey ORDER BY 1",
    )
    .load(&mut conn)
    .await
    .expect("foreign keys");
    assert!(fks.len() >= 15, "only {} foreign keys found", fks.len());
    let mut unserved = Vec::new();
    for fk in &fks {
        let scans = seq_scans(&mut conn, &fk.cascade, fk.columns as usize).await;
        if !fk.indexed || !scans.is_empty() {
            unserved.push(fk.name.as_str());
        }
    }
    assert!(
        unserved.is_empty(),
        "foreign keys whose cascades scan their table: {unserved:?}"
    );
}

/// An erasure's rewrites beyond the cascades — the audit trail pseudonymised,
/// the account's mail deleted by id and by address — touch a handful of
/// pages however long the trail and the outbox are: run (EXPLAIN ANALYZE)
/// over 50,000 other people's events and 20,000 mails, each reads at most a
/// few dozen buffers (a scan of either table reads hundreds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_statements_touch_a_handful_of_pages() {
    use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
    let mut conn = planner().await;
    conn.batch_execute(
        "SET enable_seqscan = on; SET plan_cache_mode = auto;
         INSERT INTO audit_events (id, occurred_at, actor_id, action, target_type, target_id, details, ip_address)
         SELECT gen_random_uuid(), now() - i * interval '1 second',
                CASE WHEN i % 5 = 0 THEN NULL ELSE gen_random_uuid() END,
                'auth.login', 'user', gen_random_uuid()::text,
                CASE WHEN i % 5 = 0 THEN jsonb_build_object('login', 'someone' || i || '@example.com')
                     ELSE '{}'::jsonb END,
                '127.0.0.1'
         FROM generate_series(1, 50000) AS i;
         INSERT INTO mail_outbox (id, to_address, subject, body, purpose)
         SELECT gen_random_uuid(), 'someone' || i || '@example.com', 'Hello', 'A body of some length', 'verify'
         FROM generate_series(1, 20000) AS i;
         ANALYZE audit_events; ANALYZE mail_outbox;",
    )
    .await
    .expect("fill the trail and the outbox");
    #[derive(diesel::QueryableByName)]
    struct Line {
        #[diesel(sql_type = diesel::sql_types::Text)]
        line: String,
    }
    let subject = uuid::Uuid::now_v7();
    let pseudonym = uuid::Uuid::now_v7();
    for (sql, args) in [
        (
            trellis_store::audit::PSEUDONYMISE,
            format!("'{subject}', '{pseudonym}', ARRAY['erased@example.com', 'erased']"),
        ),
        (
            trellis_auth::mail::FORGET,
            format!("'{subject}', ARRAY['erased@example.com']"),
        ),
    ] {
        conn.batch_execute(&format!("PREPARE erasing AS {sql}"))
            .await
            .expect("prepare");
        let plan: Vec<Line> = diesel::sql_query(format!(
            "SELECT line FROM pg_temp.plan_lines('(ANALYZE, BUFFERS, FORMAT JSON) EXECUTE erasing({})') AS line",
            args.replace('\'', "''")
        ))
        .load(&mut conn)
        .await
        .expect("explain analyze");
        conn.batch_execute("DEALLOCATE erasing")
            .await
            .expect("deallocate");
        let json: serde_json::Value =
            serde_json::from_str(&plan.iter().map(|l| l.line.as_str()).collect::<String>())
                .expect("a JSON plan");
        let top = &json[0]["Plan"];
        let blocks = top["Shared Hit Blocks"].as_u64().unwrap_or(0)
            + top["Shared Read Blocks"].as_u64().unwrap_or(0);
        assert!(blocks <= 60, "{sql}\nread {blocks} buffers:\n{json:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_starts_private_servers_that_keep_data() {
    use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = trellis_core::Config::default();
    config.dev.data_dir = dir.path().join(".trellis");

    let servers = trellisd::dev::prepare(&mut config)
        .await
        .expect("dev servers start");
    let url = config.database.url.clone().expect("database url filled in");
    assert!(config.redis.url.is_some());
    let mut conn = AsyncPgConnection::establish(&url).await.expect("connect");
    conn.batch_execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('survives')")
        .await
        .expect("write");
    drop(conn);
    drop(servers);

    let mut again = trellis_core::Config::default();
    again.dev.data_dir = dir.path().join(".trellis");
    let servers = trellisd::dev::prepare(&mut again)
        .await
        .expect("dev servers restart");
    let mut conn = AsyncPgConnection::establish(again.database.url.as_deref().expect("url"))
        .await
        .expect("connect");
    #[derive(diesel::QueryableByName)]
    struct V {
        #[diesel(sql_type = diesel::sql_types::Text)]
        v: String,
    }
    let rows: Vec<V> = diesel::sql_query("SELECT v FROM kept")
        .load(&mut conn)
        .await
        .expect("read");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].v, "survives");
    drop(conn);
    drop(servers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_is_reported_and_recovered_without_failed_calls() {
    use trellis_store::devserver::{PgOptions, PrivatePostgres};
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = |port| PgOptions {
        data_dir: dir.path().join("pg"),
        durable: false,
        port,
    };
    let pg = PrivatePostgres::start(opts(None))
        .await
        .expect("postgres starts");
    let port = pg.port;
    pg.ensure_database("trellis").await.expect("database");
    let url = pg.url("trellis");
    trellis_store::migrate::run(&url).await.expect("migrated");
    let mesh = TestMesh::start_with(
        TestOptions {
            database_url: Some(url.clone()),
            ..Default::default()
        },
        |_| {},
    )
    .await;
    // Fill the pool with connections the outage will break.
    let calls = || async {
        let mut ok = 0;
        for _ in 0..8 {
            let mut conn = mesh.store.pg().await.expect("pooled connection");
            use diesel_async::RunQueryDsl;
            if diesel::sql_query("SELECT 1")
                .execute(&mut conn)
                .await
                .is_ok()
            {
                ok += 1;
            }
        }
        ok
    };
    let warm = futures::future::join_all((0..4).map(|_| calls())).await;
    assert_eq!(warm.iter().sum::<i32>(), 32);

    pg.stop();
    assert!(
        eventually(Duration::from_secs(5), || async {
            status_of(&mesh, "").await == ServingStatus::NotServing
        })
        .await,
        "NOT_SERVING while the database is down"
    );
    let Err(err) = mesh.store.pg().await else {
        panic!("a connection while the database is down")
    };
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);

    let _pg = PrivatePostgres::start(opts(Some(port)))
        .await
        .expect("postgres restarts");
    assert!(
        eventually(Duration::from_secs(10), || async {
            status_of(&mesh, "").await == ServingStatus::Serving
        })
        .await,
        "SERVING again"
    );
    // Stale connections were dropped on recovery: no call fails.
    let after = futures::future::join_all((0..4).map(|_| calls())).await;
    assert_eq!(
        after.iter().sum::<i32>(),
        32,
        "every call after recovery succeeds"
    );
    mesh.shutdown().await;
}

/// RegisterRequest's `email` (tag 1) as raw bytes, so that it can be sent
/// as invalid UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawEmail {
    #[prost(bytes = "vec", tag = "1")]
    email: Vec<u8>,
}

/// RegisterRequest's `email` (tag 1) sent with the wrong wire type.
#[derive(Clone, PartialEq, prost::Message)]
struct VarintEmail {
    #[prost(uint64, tag = "1")]
    email: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_requests_are_invalid_argument_naming_the_field() {
    use tonic_types::StatusExt;
    use trellis_proto::auth::v1::RegisterResponse;
    let mesh = TestMesh::start().await;
    const REGISTER: &str = "/trellis.auth.v1.AuthService/Register";
    let err = raw_unary::<RawEmail, RegisterResponse>(
        mesh.channel().await,
        REGISTER,
        RawEmail {
            email: b"ada\xff\xfe@example.com".to_vec(),
        },
    )
    .await
    .expect_err("invalid UTF-8");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let v = err
        .get_details_bad_request()
        .expect("field violations")
        .field_violations;
    assert_eq!(v[0].field, "email", "{v:?}");
    assert!(v[0].description.contains("UTF-8"), "{v:?}");

    let err = raw_unary::<VarintEmail, RegisterResponse>(
        mesh.channel().await,
        REGISTER,
        VarintEmail { email: 7 },
    )
    .await
    .expect_err("wrong wire type");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_eq!(
        err.get_details_bad_request()
            .expect("violations")
            .field_violations[0]
            .field,
        "email"
    );

    // The metrics count what the client saw.
    let text = mesh.metrics().await;
    assert!(
        text.contains(r#"trellis_grpc_requests_total{code="INVALID_ARGUMENT",method="Register""#),
        "{text}"
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_of_one_process_call_each_other_over_the_in_process_link_through_every_layer() {
    use std::sync::Arc;
    use trellis_mesh::{MeshBuilder, MeshClients, local};
    let infra = infra().await;
    let config = Arc::new(trellis_tests::mesh::test_config(
        infra.fresh_database().await,
        infra.redis_url.clone(),
        infra.fresh_prefix(),
    ));
    let store = trellis_store::Store::from_config(&config).expect("store");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (link, incoming) = local::link();
    let mesh = MeshBuilder::new(config.clone(), store, vec![ServiceName::System])
        .in_process(incoming)
        .start(listener, std::future::pending())
        .await
        .expect("starts");
    // System is mounted here and has no address: its client takes the link.
    let clients =
        MeshClients::new(&config.services, link.clone(), &[ServiceName::System]).expect("clients");
    let mut client = clients
        .client(
            ServiceName::System,
            &CallContext::background(),
            SystemServiceClient::new,
        )
        .expect("client");
    for _ in 0..2 {
        let info = client
            .get_info(GetInfoRequest {})
            .await
            .expect("a call over the link")
            .into_inner();
        assert!(!info.version.is_empty(), "{info:?}");
    }
    // The server's own layers saw both calls, like any other.
    let ok = r#"trellis_grpc_requests_total{code="OK",method="GetInfo",service="trellis.system.v1.SystemService"}"#;
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text");
    assert_eq!(metric_value(&text, ok), 2.0, "{text}");
    mesh.shutdown().await.expect("stops");
    // A stopped server takes no more calls over the link: UNAVAILABLE, as
    // from a closed listener.
    assert_eq!(
        link.dial().err().map(|e| e.kind()),
        Some(std::io::ErrorKind::ConnectionRefused)
    );
    let err = client
        .get_info(GetInfoRequest {})
        .await
        .expect_err("no server");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
}
