//! AuthService end to end: registration and its validation, login and
//! lockout, refresh rotation with reuse detection and the grace window,
//! logout and logout-all, token attacks, keys and rotation, introspection,
//! revocation across servers and the browser cookie path.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;
use trellis_core::ServiceName;
use trellis_proto::auth::v1 as pb;
use trellis_proto::auth::v1::auth_service_client::AuthServiceClient;
use trellis_store::schema::{signing_keys, user_roles};
use trellis_tests::{TestMesh, TestOptions, split};

use crate::util::eventually;

pub const PASSWORD: &str = "Str0ng!pass";

pub async fn auth(mesh: &TestMesh) -> AuthServiceClient<Channel> {
    AuthServiceClient::new(mesh.channel().await)
}

pub fn bearer<T>(msg: T, token: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    req
}

pub async fn register(client: &mut AuthServiceClient<Channel>, name: &str) -> pb::RegisterResponse {
    client
        .register(pb::RegisterRequest {
            email: format!("{name}@example.com"),
            username: name.to_string(),
            password: PASSWORD.to_string(),
            display_name: format!("{name} Example"),
        })
        .await
        .expect("register")
        .into_inner()
}

pub fn access(r: &pb::RegisterResponse) -> String {
    r.tokens.as_ref().expect("tokens").access_token.clone()
}

pub async fn who(
    client: &mut AuthServiceClient<Channel>,
    token: &str,
) -> Result<pb::WhoAmIResponse, Status> {
    client
        .who_am_i(bearer(pb::WhoAmIRequest {}, token))
        .await
        .map(|r| r.into_inner())
}

pub fn violations(status: &Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_validates_and_refuses_duplicates() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let reg = register(&mut client, "ada").await;
    let account = reg.account.as_ref().expect("account");
    assert_eq!(account.email, "ada@example.com");
    assert_eq!(account.roles, vec!["member".to_string()]);
    assert!(!account.email_verified);
    assert_eq!(
        uuid::Uuid::parse_str(&account.id)
            .expect("uuid")
            .get_version_num(),
        7
    );
    let tokens = reg.tokens.as_ref().expect("tokens");
    assert_eq!(tokens.token_type, "Bearer");
    assert!(tokens.refresh_token.starts_with("rt_"));

    let bad = client
        .register(pb::RegisterRequest {
            email: "not-an-email".into(),
            username: "x".into(),
            password: "short".into(),
            display_name: "ok".into(),
        })
        .await
        .expect_err("invalid");
    assert_eq!(bad.code(), Code::InvalidArgument);
    let fields = violations(&bad);
    for f in ["email", "username", "password"] {
        assert!(
            fields.contains(&f.to_string()),
            "{f} missing from {fields:?}"
        );
    }

    let weak = client
        .register(pb::RegisterRequest {
            email: "bob@example.com".into(),
            username: "bob".into(),
            password: "alllowercase1".into(),
            display_name: String::new(),
        })
        .await
        .expect_err("weak password");
    assert_eq!(violations(&weak), vec!["password".to_string()]);
    assert!(weak.message().contains("upper-case"), "{}", weak.message());

    for (email, username) in [
        ("ADA@example.com", "someoneelse"),
        ("other@example.com", "ADA"),
    ] {
        let dup = client
            .register(pb::RegisterRequest {
                email: email.into(),
                username: username.into(),
                password: PASSWORD.into(),
                display_name: String::new(),
            })
            .await
            .expect_err("duplicate");
        assert_eq!(dup.code(), Code::AlreadyExists, "{email}/{username}");
    }
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_by_email_or_username_and_who_am_i() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let reg = register(&mut client, "grace").await;
    let user_id = reg.account.as_ref().expect("account").id.clone();

    for login in ["grace@example.com", "GRACE", "Grace@Example.com"] {
        let resp = client
            .login(pb::LoginRequest {
                login: login.into(),
                password: PASSWORD.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("login as {login}: {e}"))
            .into_inner();
        let token = resp.tokens.expect("tokens").access_token;
        let me = who(&mut client, &token).await.expect("whoami");
        let p = me.principal.expect("principal");
        assert_eq!(p.user_id, user_id);
        assert_eq!(p.credential_type, "access_token");
        assert!(
            p.permissions.iter().any(|x| x == "chat:*"),
            "{:?}",
            p.permissions
        );
        assert_eq!(me.account.expect("account").username, "grace");
    }

    let missing = client
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .expect_err("no token");
    assert_eq!(missing.code(), Code::Unauthenticated);

    let wrong = client
        .login(pb::LoginRequest {
            login: "grace".into(),
            password: "Wr0ng!pass".into(),
            ..Default::default()
        })
        .await
        .expect_err("wrong password");
    let unknown = client
        .login(pb::LoginRequest {
            login: "nobody".into(),
            password: "Wr0ng!pass".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown account");
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert_eq!(
        (unknown.code(), unknown.message()),
        (wrong.code(), wrong.message()),
        "no account enumeration"
    );

    let empty = client
        .login(pb::LoginRequest::default())
        .await
        .expect_err("empty");
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert_eq!(
        violations(&empty),
        vec!["login".to_string(), "password".to_string()]
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockout_after_failed_logins_and_its_expiry() {
    let mesh = TestMesh::start_with(TestOptions::default(), |c| {
        c.auth.lockout_threshold = 3;
        c.auth.lockout_base = Duration::from_secs(1);
    })
    .await;
    let mut client = auth(&mesh).await;
    register(&mut client, "locked").await;
    let attempt = |password: &'static str| {
        let mut c = client.clone();
        async move {
            c.login(pb::LoginRequest {
                login: "locked".into(),
                password: password.into(),
                ..Default::default()
            })
            .await
        }
    };
    for _ in 0..3 {
        assert_eq!(
            attempt("Wr0ng!pass").await.expect_err("wrong").code(),
            Code::Unauthenticated
        );
    }
    // Locked: even the right password is refused, with a retry hint.
    let locked = attempt(PASSWORD).await.expect_err("locked");
    assert_eq!(locked.code(), Code::ResourceExhausted);
    let retry = locked
        .get_error_details()
        .retry_info()
        .cloned()
        .expect("retry info");
    assert!(retry.retry_delay.expect("delay") <= Duration::from_secs(1));

    tokio::time::sleep(Duration::from_millis(1200)).await;
    attempt(PASSWORD).await.expect("lock expired");
    mesh.shutdown().await;
}

pub async fn refresh(
    client: &mut AuthServiceClient<Channel>,
    token: &str,
) -> Result<pb::TokenPair, Status> {
    client
        .refresh(pb::RefreshRequest {
            refresh_token: token.into(),
        })
        .await
        .map(|r| r.into_inner().tokens.expect("tokens"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_rotates_and_reuse_revokes_the_family() {
    let mesh = TestMesh::start_with(TestOptions::default(), |c| {
        c.auth.refresh_grace = Duration::from_millis(200);
    })
    .await;
    let mut client = auth(&mesh).await;
    let reg = register(&mut client, "rotor").await;
    let first = reg.tokens.expect("tokens");
    let second = refresh(&mut client, &first.refresh_token)
        .await
        .expect("rotate");
    assert_ne!(second.refresh_token, first.refresh_token);
    assert_eq!(second.session_id, first.session_id, "same family");
    who(&mut client, &second.access_token)
        .await
        .expect("new access token works");

    tokio::time::sleep(Duration::from_millis(300)).await;
    let reuse = refresh(&mut client, &first.refresh_token)
        .await
        .expect_err("reuse");
    assert_eq!(reuse.code(), Code::Unauthenticated);
    assert!(reuse.message().contains("reuse"), "{}", reuse.message());
    // The whole family is gone: the successor and its access token too.
    let after = refresh(&mut client, &second.refresh_token)
        .await
        .expect_err("family revoked");
    assert_eq!(after.code(), Code::Unauthenticated);
    let access = who(&mut client, &second.access_token)
        .await
        .expect_err("access revoked");
    assert_eq!(access.code(), Code::Unauthenticated);
    assert_eq!(
        refresh(&mut client, "rt_made_up")
            .await
            .expect_err("unknown")
            .code(),
        Code::Unauthenticated
    );
    let empty = refresh(&mut client, "").await.expect_err("empty");
    assert_eq!(empty.code(), Code::InvalidArgument);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_refreshes_in_the_grace_window_share_one_successor() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let reg = register(&mut client, "twin").await;
    let token = reg.tokens.expect("tokens").refresh_token;
    let (a, b) = tokio::join!(
        {
            let mut c = client.clone();
            let t = token.clone();
            async move { refresh(&mut c, &t).await }
        },
        {
            let mut c = client.clone();
            let t = token.clone();
            async move { refresh(&mut c, &t).await }
        }
    );
    let (a, b) = (a.expect("first"), b.expect("second"));
    assert_eq!(a.refresh_token, b.refresh_token);
    assert_eq!(a.access_token, b.access_token);
    // And the successor is live.
    refresh(&mut client, &a.refresh_token)
        .await
        .expect("successor rotates");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_and_logout_all() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let reg = register(&mut client, "leaver").await;
    let one = reg.tokens.expect("tokens");
    let base = client.clone();
    let login = || {
        let mut c = base.clone();
        async move {
            c.login(pb::LoginRequest {
                login: "leaver".into(),
                password: PASSWORD.into(),
                ..Default::default()
            })
            .await
            .expect("login")
            .into_inner()
            .tokens
            .expect("tokens")
        }
    };
    let two = login().await;
    let three = login().await;

    client
        .logout(bearer(pb::LogoutRequest {}, &one.access_token))
        .await
        .expect("logout");
    assert_eq!(
        who(&mut client, &one.access_token)
            .await
            .expect_err("revoked")
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        refresh(&mut client, &one.refresh_token)
            .await
            .expect_err("ended")
            .code(),
        Code::Unauthenticated
    );
    who(&mut client, &two.access_token)
        .await
        .expect("other sessions live on");

    client
        .logout_all(bearer(pb::LogoutAllRequest {}, &two.access_token))
        .await
        .expect("logout all");
    for t in [&two, &three] {
        assert_eq!(
            who(&mut client, &t.access_token)
                .await
                .expect_err("all revoked")
                .code(),
            Code::Unauthenticated
        );
        assert_eq!(
            refresh(&mut client, &t.refresh_token)
                .await
                .expect_err("all ended")
                .code(),
            Code::Unauthenticated
        );
    }
    let fresh = login().await;
    who(&mut client, &fresh.access_token)
        .await
        .expect("a new login works");
    assert_eq!(
        client
            .logout(pb::LogoutRequest {})
            .await
            .expect_err("anonymous")
            .code(),
        Code::Unauthenticated
    );
    mesh.shutdown().await;
}

/// Signs `claims` with the server's current private key (read from its
/// database, as an attacker who cannot would not).
async fn server_key(mesh: &TestMesh) -> (String, jsonwebtoken::EncodingKey, Vec<u8>) {
    let mut conn = mesh.store.pg().await.expect("pg");
    let (kid, private, public): (String, Vec<u8>, Vec<u8>) = signing_keys::table
        .filter(signing_keys::retired_at.is_null())
        .select((
            signing_keys::kid,
            signing_keys::private_key,
            signing_keys::public_key,
        ))
        .first(&mut conn)
        .await
        .expect("a signing key");
    (
        kid,
        jsonwebtoken::EncodingKey::from_ed_der(&private),
        public,
    )
}

fn claims_of(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).expect("payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("b64")).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_stale_tokens_are_unauthenticated() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let reg = register(&mut client, "target").await;
    let good = access(&reg);
    who(&mut client, &good).await.expect("genuine token works");
    let (kid, key, public) = server_key(&mesh).await;
    let base = claims_of(&good);
    let now = chrono::Utc::now().timestamp();
    let sign = |claims: &serde_json::Value, kid: &str, key: &EncodingKey| {
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some(kid.to_string());
        encode(&h, claims, key).expect("sign")
    };
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = base.clone();
        f(&mut c);
        c
    };
    // Sanity: our re-signing of the genuine claims is accepted.
    who(&mut client, &sign(&base, &kid, &key))
        .await
        .expect("re-signed genuine claims");

    let mut attacks: Vec<(&str, String)> = vec![
        (
            "expired",
            sign(
                &with(&|c| {
                    c["exp"] = (now - 120).into();
                    c["iat"] = (now - 1000).into();
                }),
                &kid,
                &key,
            ),
        ),
        (
            "not yet valid",
            sign(&with(&|c| c["nbf"] = (now + 600).into()), &kid, &key),
        ),
        (
            "wrong audience",
            sign(&with(&|c| c["aud"] = "someone-else".into()), &kid, &key),
        ),
        (
            "wrong issuer",
            sign(&with(&|c| c["iss"] = "evil".into()), &kid, &key),
        ),
        ("escalated roles, unknown kid", {
            let other = jsonwebtoken::EncodingKey::from_ed_der(&fresh_ed25519_der());
            sign(
                &with(&|c| c["perms"] = serde_json::json!(["*"])),
                "no-such-kid",
                &other,
            )
        }),
        ("own key under the server's kid", {
            let other = jsonwebtoken::EncodingKey::from_ed_der(&fresh_ed25519_der());
            sign(&base, &kid, &other)
        }),
        ("HS256 with the public key as secret", {
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some(kid.clone());
            encode(&h, &base, &EncodingKey::from_secret(&public)).expect("sign")
        }),
        ("garbage", "not.a.jwt".to_string()),
        ("longer than any token", "a".repeat(10_000)),
    ];
    // alg: none — header and claims with an empty signature.
    let none_header =
        URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"none","typ":"JWT","kid":"{kid}"}}"#));
    let none_body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&base).expect("json"));
    attacks.push(("alg none", format!("{none_header}.{none_body}.")));
    // Tampered: the genuine token with escalated claims but the old signature.
    let parts: Vec<&str> = good.split('.').collect();
    let escalated = URL_SAFE_NO_PAD.encode(
        serde_json::to_vec(&with(&|c| c["perms"] = serde_json::json!(["*"]))).expect("json"),
    );
    attacks.push((
        "tampered payload",
        format!("{}.{}.{}", parts[0], escalated, parts[2]),
    ));

    for (name, token) in &attacks {
        let err = who(&mut client, token).await.expect_err(name);
        assert_eq!(err.code(), Code::Unauthenticated, "{name}: {err:?}");
    }

    // Revoked by logout, and after LogoutAll: also UNAUTHENTICATED.
    client
        .logout(bearer(pb::LogoutRequest {}, &good))
        .await
        .expect("logout");
    assert_eq!(
        who(&mut client, &good)
            .await
            .expect_err("revoked jti")
            .code(),
        Code::Unauthenticated
    );
    let again = client
        .login(pb::LoginRequest {
            login: "target".into(),
            password: PASSWORD.into(),
            ..Default::default()
        })
        .await
        .expect("login")
        .into_inner()
        .tokens
        .expect("tokens")
        .access_token;
    client
        .logout_all(bearer(pb::LogoutAllRequest {}, &again))
        .await
        .expect("logout all");
    assert_eq!(
        who(&mut client, &again)
            .await
            .expect_err("after logout-all")
            .code(),
        Code::Unauthenticated
    );
    mesh.shutdown().await;
}

fn fresh_ed25519_der() -> Vec<u8> {
    // PKCS#8 v1 wrapping of a fixed, non-server Ed25519 seed.
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(&[42u8; 32]);
    der
}

/// Signs in as `who`.
pub async fn login(
    client: &mut AuthServiceClient<Channel>,
    who: &str,
    password: &str,
) -> Result<pb::TokenPair, Status> {
    client
        .login(pb::LoginRequest {
            login: who.into(),
            password: password.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().tokens.expect("tokens"))
}

/// Registers `name` as an administrator: returns its id and an access
/// token that carries the role (a fresh login, as roles reach tokens when
/// they are issued).
pub async fn admin_account(mesh: &TestMesh, name: &str) -> (String, String) {
    let mut a = auth(mesh).await;
    let id = register(&mut a, name).await.account.expect("account").id;
    make_admin(mesh, &id).await;
    let token = login(&mut a, name, PASSWORD)
        .await
        .expect("login")
        .access_token;
    (id, token)
}

pub async fn make_admin(mesh: &TestMesh, user_id: &str) {
    let mut conn = mesh.store.pg().await.expect("pg");
    diesel::insert_into(user_roles::table)
        .values((
            user_roles::user_id.eq(uuid::Uuid::parse_str(user_id).expect("uuid")),
            user_roles::role.eq("admin"),
        ))
        .execute(&mut conn)
        .await
        .expect("grant admin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_keys_rotate_and_old_tokens_keep_verifying() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let reg = register(&mut client, "keeper").await;
    let member_token = access(&reg);
    let jwks = client
        .get_jwks(pb::GetJwksRequest {})
        .await
        .expect("jwks")
        .into_inner();
    assert_eq!(jwks.keys.len(), 1);
    let k = &jwks.keys[0];
    assert_eq!(
        (
            k.kty.as_str(),
            k.crv.as_str(),
            k.alg.as_str(),
            k.r#use.as_str()
        ),
        ("OKP", "Ed25519", "EdDSA", "sig")
    );
    assert_eq!(URL_SAFE_NO_PAD.decode(&k.x).expect("b64").len(), 32);

    let denied = client
        .rotate_signing_key(bearer(pb::RotateSigningKeyRequest {}, &member_token))
        .await
        .expect_err("members cannot rotate");
    assert_eq!(denied.code(), Code::PermissionDenied);

    make_admin(&mesh, &reg.account.as_ref().expect("account").id).await;
    // Roles reach tokens at the next refresh.
    let admin_token = refresh(
        &mut client,
        &reg.tokens.as_ref().expect("tokens").refresh_token,
    )
    .await
    .expect("refresh")
    .access_token;
    let kid = client
        .rotate_signing_key(bearer(pb::RotateSigningKeyRequest {}, &admin_token))
        .await
        .expect("admin rotates")
        .into_inner()
        .kid;
    assert_ne!(kid, k.kid);
    // The new key is published at once (other replicas pick it up within seconds).
    let jwks = client
        .get_jwks(pb::GetJwksRequest {})
        .await
        .expect("jwks")
        .into_inner();
    let kids: Vec<&str> = jwks.keys.iter().map(|k| k.kid.as_str()).collect();
    assert_eq!(kids.len(), 2);
    assert!(kids.contains(&kid.as_str()) && kids.contains(&k.kid.as_str()));
    who(&mut client, &member_token)
        .await
        .expect("tokens signed by the retired key still verify");
    let fresh = client
        .login(pb::LoginRequest {
            login: "keeper".into(),
            password: PASSWORD.into(),
            ..Default::default()
        })
        .await
        .expect("login")
        .into_inner()
        .tokens
        .expect("tokens")
        .access_token;
    let header = jsonwebtoken::decode_header(&fresh).expect("header");
    assert_eq!(
        header.kid.as_deref(),
        Some(kid.as_str()),
        "new tokens use the new key"
    );
    who(&mut client, &fresh)
        .await
        .expect("verifier learns the new key");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspect_reports_active_and_inactive() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let reg = register(&mut client, "inspect").await;
    let r = client
        .introspect(pb::IntrospectRequest {
            token: access(&reg),
        })
        .await
        .expect("introspect")
        .into_inner();
    assert!(r.active);
    let user_id = reg.account.as_ref().expect("account").id.clone();
    assert_eq!(r.principal.expect("principal").user_id, user_id);
    let now = chrono::Utc::now().timestamp();
    assert!(r.expire_time.expect("exp").seconds > now);
    // RFC 7662's fields, from the token's own claims.
    let c = r.claims.expect("claims");
    let token_claims = claims_of(&access(&reg));
    assert_eq!(c.subject, user_id);
    assert_eq!(
        c.session_id,
        reg.tokens.as_ref().expect("tokens").session_id
    );
    assert_eq!(c.issuer, "trellis");
    assert_eq!(c.audience, "trellis");
    assert_eq!(c.token_id, token_claims["jti"].as_str().expect("jti"));
    assert_eq!(c.roles, ["member"]);
    let iat = c.issue_time.expect("iat").seconds;
    assert!((now - 60..=now).contains(&iat));
    assert_eq!(c.expire_time.expect("exp").seconds - iat, 15 * 60);
    assert!(r.scope.split(' ').any(|s| s == "chat:*"), "{}", r.scope);
    let r = client
        .introspect(pb::IntrospectRequest {
            token: "junk".into(),
        })
        .await
        .expect("introspect")
        .into_inner();
    assert_eq!(
        r,
        pb::IntrospectResponse::default(),
        "inactive: nothing else"
    );
    let empty = client
        .introspect(pb::IntrospectRequest::default())
        .await
        .expect_err("empty");
    assert_eq!(empty.code(), Code::InvalidArgument);
    mesh.shutdown().await;

    // Introspection is limited per client address.
    let mesh = TestMesh::start_with(TestOptions::default(), |c| {
        c.auth.introspect_per_ip_per_minute = 3;
    })
    .await;
    let mut client = auth(&mesh).await;
    for _ in 0..3 {
        client
            .introspect(pb::IntrospectRequest {
                token: "junk".into(),
            })
            .await
            .expect("within the limit");
    }
    let e = client
        .introspect(pb::IntrospectRequest {
            token: "junk".into(),
        })
        .await
        .expect_err("over the limit");
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.get_error_details().retry_info().is_some());
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_reaches_another_server_within_a_second() {
    // Server 0 runs auth; server 1 runs only system and verifies tokens with
    // keys fetched from server 0 and its own revocation set.
    let meshes = split(&[&[ServiceName::Auth], &[]]).await;
    let (auth_server, other) = (&meshes[0], &meshes[1]);
    let mut client = auth(auth_server).await;
    let reg = register(&mut client, "roamer").await;
    let token = access(&reg);

    // A replica's verifier, as the other server builds it.
    let (verifier, _feed) = crate::util::replica_verifier(other);
    verifier
        .verify(&token)
        .await
        .expect("verified with keys from the auth server");
    // Let the replica's subscription settle before revoking.
    tokio::time::sleep(Duration::from_millis(200)).await;

    client
        .logout(bearer(pb::LogoutRequest {}, &token))
        .await
        .expect("logout");
    let started = Instant::now();
    let seen = eventually(Duration::from_secs(1), || async {
        verifier.verify(&token).await.is_err()
    })
    .await;
    assert!(seen, "revocation not seen within a second");
    let err = verifier.verify(&token).await.expect_err("revoked");
    assert_eq!(err.code(), Code::Unauthenticated);
    println!(
        "revocation seen by the other server after {:?}",
        started.elapsed()
    );
    for m in meshes {
        m.shutdown().await;
    }
}

/// gRPC-web frame of a prost message.
fn web_frame<M: prost::Message>(m: &M) -> Vec<u8> {
    crate::util::grpc_frame(&m.encode_to_vec())
}

/// The (last) message and the trailer text of a gRPC-web body.
fn web_message<M: prost::Message + Default>(body: &[u8]) -> (Option<M>, String) {
    let (messages, trailers) = crate::util::parse_grpc_web(body);
    (
        messages.last().and_then(|m| M::decode(m.as_slice()).ok()),
        trailers,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_cookie_path_over_grpc_web() {
    let mesh = TestMesh::start().await;
    register(&mut auth(&mesh).await, "browser").await;
    let http = reqwest::Client::builder()
        .http1_only()
        .build()
        .expect("client");
    let call = |method: &str, body: Vec<u8>, cookie: Option<String>| {
        let mut req = http
            .post(format!(
                "{}/trellis.auth.v1.AuthService/{method}",
                mesh.url()
            ))
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .body(body);
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        req.send()
    };
    let resp = call(
        "Login",
        web_frame(&pb::LoginRequest {
            login: "browser".into(),
            password: PASSWORD.into(),
            ..Default::default()
        }),
        None,
    )
    .await
    .expect("login");
    let cookies: Vec<String> = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().expect("ascii").to_string())
        .collect();
    assert_eq!(cookies.len(), 2, "{cookies:?}");
    for c in &cookies {
        assert!(
            c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Secure"),
            "{c}"
        );
    }
    let jar: Vec<String> = cookies
        .iter()
        .map(|c| c.split(';').next().expect("pair").to_string())
        .collect();
    let jar = jar.join("; ");
    let (login, trailers) = web_message::<pb::LoginResponse>(&resp.bytes().await.expect("body"));
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    let user_id = login.expect("login response").account.expect("account").id;

    // The access token travels in the cookie alone.
    let resp = call(
        "WhoAmI",
        web_frame(&pb::WhoAmIRequest {}),
        Some(jar.clone()),
    )
    .await
    .expect("whoami");
    let (me, trailers) = web_message::<pb::WhoAmIResponse>(&resp.bytes().await.expect("body"));
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    assert_eq!(
        me.expect("me").principal.expect("principal").user_id,
        user_id
    );

    // Refresh with an empty request uses the refresh cookie.
    let resp = call(
        "Refresh",
        web_frame(&pb::RefreshRequest::default()),
        Some(jar),
    )
    .await
    .expect("refresh");
    assert_eq!(
        resp.headers().get_all("set-cookie").iter().count(),
        2,
        "rotated cookies"
    );
    let (refreshed, trailers) =
        web_message::<pb::RefreshResponse>(&resp.bytes().await.expect("body"));
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    assert!(refreshed.expect("refreshed").tokens.is_some());

    // Without cookies WhoAmI is refused.
    let resp = call("WhoAmI", web_frame(&pb::WhoAmIRequest {}), None)
        .await
        .expect("whoami");
    let status = resp
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().expect("ascii").to_string())
        .unwrap_or_default();
    let body = resp.bytes().await.expect("body");
    let (_, trailers) = web_message::<pb::WhoAmIResponse>(&body);
    assert!(
        status == "16" || trailers.contains("grpc-status:16"),
        "{status} {trailers}"
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_identity_follows_mesh_calls_and_cors_allows_credentials() {
    use trellis_proto::chat::v1 as cpb;
    const APP: &str = "https://app.example.com";
    let rig = crate::llm::rig(|c| {
        c.server.cors_allowed_origins = vec![APP.into()];
    })
    .await;
    let mesh = &rig.mesh;
    let http = reqwest::Client::builder()
        .http1_only()
        .build()
        .expect("client");
    let call = |path: &str, body: Vec<u8>, cookie: Option<&str>| {
        let mut req = http
            .post(format!("{}/{path}", mesh.url()))
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .header("origin", APP)
            .body(body);
        if let Some(c) = cookie {
            req = req.header("cookie", c.to_string());
        }
        req.send()
    };
    let resp = call(
        "trellis.auth.v1.AuthService/Login",
        web_frame(&pb::LoginRequest {
            login: "llmuser".into(),
            password: PASSWORD.into(),
            ..Default::default()
        }),
        None,
    )
    .await
    .expect("login");
    assert_eq!(resp.headers()["access-control-allow-origin"], APP);
    assert_eq!(resp.headers()["access-control-allow-credentials"], "true");
    let jar = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().expect("ascii"))
        .find(|c| c.starts_with("trellis_access="))
        .expect("access cookie")
        .split(';')
        .next()
        .expect("pair")
        .to_string();

    // Chat calls the LLM gateway over the mesh as the cookie's user.
    let resp = call(
        "trellis.chat.v1.ChatService/CreateSession",
        web_frame(&cpb::CreateSessionRequest {
            title: "from a browser".into(),
            model: "fast".into(),
            ..Default::default()
        }),
        Some(&jar),
    )
    .await
    .expect("create session");
    let (created, trailers) =
        web_message::<cpb::CreateSessionResponse>(&resp.bytes().await.expect("body"));
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    let session = created.expect("created").session.expect("session").id;
    let resp = call(
        "trellis.chat.v1.ChatService/SendMessage",
        web_frame(&cpb::SendMessageRequest {
            send: Some(cpb::Send {
                session_id: session,
                content: "hi".into(),
                client_message_id: "b1".into(),
                ..Default::default()
            }),
        }),
        Some(&jar),
    )
    .await
    .expect("send");
    let (frames, trailers) = crate::util::parse_grpc_web(&resp.bytes().await.expect("body"));
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    let events: Vec<cpb::chat_event::Event> = frames
        .iter()
        .filter_map(|f| {
            <cpb::SendMessageResponse as prost::Message>::decode(f.as_slice())
                .ok()
                .and_then(|m| m.event)
                .and_then(|e| e.event)
        })
        .collect();
    let text: String = events
        .iter()
        .filter_map(|e| match e {
            cpb::chat_event::Event::Delta(d) => Some(d.text.as_str()),
            _ => None,
        })
        .collect();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, cpb::chat_event::Event::Completed(_))),
        "the reply completed: {events:?}"
    );
    assert_eq!(text, "Hello world");
    assert_eq!(rig.primary.hits(), 1, "the gateway reached the provider");

    // Preflights: a listed origin may send credentials, others get nothing.
    let preflight = |origin: &'static str| {
        http.request(
            reqwest::Method::OPTIONS,
            format!("{}/trellis.chat.v1.ChatService/SendMessage", mesh.url()),
        )
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type,x-grpc-web")
        .send()
    };
    let ok = preflight(APP).await.expect("preflight");
    assert_eq!(ok.headers()["access-control-allow-origin"], APP);
    assert_eq!(ok.headers()["access-control-allow-credentials"], "true");
    let other = preflight("https://evil.example.com")
        .await
        .expect("preflight");
    assert!(
        other.headers().get("access-control-allow-origin").is_none(),
        "{:?}",
        other.headers()
    );

    // With the wildcard default, no credentials (browsers would refuse them).
    let open = TestMesh::start().await;
    let any = http
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/trellis.auth.v1.AuthService/WhoAmI", open.url()),
        )
        .header("origin", APP)
        .header("access-control-request-method", "POST")
        .send()
        .await
        .expect("preflight");
    assert_eq!(any.headers()["access-control-allow-origin"], "*");
    assert!(
        any.headers()
            .get("access-control-allow-credentials")
            .is_none()
    );
    open.shutdown().await;
    rig.mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockouts_grow_and_failures_count_only_within_the_window() {
    let mesh = TestMesh::start_with(TestOptions::default(), |c| {
        c.auth.lockout_threshold = 2;
        c.auth.lockout_base = Duration::from_secs(1);
        c.auth.lockout_window = Duration::from_secs(1);
    })
    .await;
    let mut client = auth(&mesh).await;
    register(&mut client, "repeat").await;
    register(&mut client, "spaced").await;
    let attempt = |who: &'static str, password: &'static str| {
        let mut c = client.clone();
        async move {
            c.login(pb::LoginRequest {
                login: who.into(),
                password: password.into(),
                ..Default::default()
            })
            .await
        }
    };
    let lock_delay = |who: &'static str| async move {
        let e = attempt(who, PASSWORD).await.expect_err("locked");
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        e.get_error_details()
            .retry_info()
            .and_then(|r| r.retry_delay)
            .expect("retry delay")
    };
    let fail_twice = |who: &'static str| async move {
        for _ in 0..2 {
            let e = attempt(who, "Wr0ng!pass").await.expect_err("wrong");
            assert_eq!(e.code(), Code::Unauthenticated);
        }
    };
    fail_twice("repeat").await;
    let first = lock_delay("repeat").await;
    assert!(first <= Duration::from_secs(1), "{first:?}");
    tokio::time::sleep(first + Duration::from_millis(200)).await;
    // Failing again before any success: the next lock is twice as long.
    fail_twice("repeat").await;
    let second = lock_delay("repeat").await;
    assert!(
        second > Duration::from_millis(1500) && second <= Duration::from_secs(2),
        "{second:?}"
    );
    tokio::time::sleep(second + Duration::from_millis(200)).await;
    // A successful login forgives: the back-off starts over.
    attempt("repeat", PASSWORD).await.expect("unlocked");
    fail_twice("repeat").await;
    assert!(lock_delay("repeat").await <= Duration::from_secs(1));

    // Failures further apart than the window never add up.
    attempt("spaced", "Wr0ng!pass").await.expect_err("wrong");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    attempt("spaced", "Wr0ng!pass").await.expect_err("wrong");
    attempt("spaced", PASSWORD)
        .await
        .expect("one failure within the window is not a lockout");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_seeding_creates_one_working_administrator() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let (name, password) = trellis_auth::seed::ensure_admin(&mesh.config.auth, &mesh.store)
        .await
        .expect("seed")
        .expect("created on an empty install");
    assert_eq!(name, trellis_auth::seed::ADMIN_USERNAME);
    assert!(password.chars().count() >= 16, "{password}");
    let tokens = login(&mut client, &name, &password)
        .await
        .expect("the printed credentials work");
    let me = who(&mut client, &tokens.access_token)
        .await
        .expect("whoami");
    let p = me.principal.expect("principal");
    assert!(p.roles.contains(&"admin".to_string()), "{:?}", p.roles);
    assert!(
        p.permissions.contains(&"*".to_string()),
        "{:?}",
        p.permissions
    );
    assert_eq!(
        me.account.expect("account").email,
        trellis_auth::seed::ADMIN_EMAIL
    );
    // A second start finds the administrator and creates nobody.
    let again = trellis_auth::seed::ensure_admin(&mesh.config.auth, &mesh.store)
        .await
        .expect("seed again");
    assert_eq!(again, None);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_seeding_leaves_an_install_with_an_administrator_alone() {
    let mesh = TestMesh::start().await;
    let (id, _) = admin_account(&mesh, "existing").await;
    assert!(!id.is_empty());
    let seeded = trellis_auth::seed::ensure_admin(&mesh.config.auth, &mesh.store)
        .await
        .expect("seed");
    assert_eq!(seeded, None);
    let err = login(&mut auth(&mesh).await, "admin", "Aa1!whatever")
        .await
        .expect_err("no seeded account");
    assert_eq!(err.code(), Code::Unauthenticated);
    mesh.shutdown().await;
}

/// An AuthService client whose calls carry `user_agent`.
async fn auth_as(mesh: &TestMesh, user_agent: &str) -> AuthServiceClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(mesh.url())
        .expect("url")
        .user_agent(user_agent)
        .expect("user agent")
        .connect()
        .await
        .expect("connect");
    AuthServiceClient::new(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grace_window_answers_only_the_client_that_rotated() {
    let mesh = TestMesh::start_with(TestOptions::default(), |c| {
        c.auth.refresh_grace = Duration::from_secs(10);
    })
    .await;
    let mut phone = auth_as(&mesh, "trellis-app/2.1 (phone)").await;
    let mut other = auth_as(&mesh, "curl/8.5").await;

    // The same client, again within the grace window: the same successor.
    let first = register(&mut phone, "bound").await.tokens.expect("tokens");
    let a = refresh(&mut phone, &first.refresh_token)
        .await
        .expect("rotate");
    let b = refresh(&mut phone, &first.refresh_token)
        .await
        .expect("the same client within the grace window");
    assert_eq!(
        (&a.refresh_token, &a.access_token),
        (&b.refresh_token, &b.access_token)
    );

    // Another client presenting the spent token gets nothing and ends the
    // family, successor included.
    let stolen = refresh(&mut other, &first.refresh_token)
        .await
        .expect_err("another client");
    assert_eq!(stolen.code(), Code::Unauthenticated);
    assert!(stolen.message().contains("reuse"), "{}", stolen.message());
    assert_eq!(
        refresh(&mut phone, &a.refresh_token)
            .await
            .expect_err("family ended")
            .code(),
        Code::Unauthenticated
    );
    assert_eq!(
        who(&mut phone, &a.access_token)
            .await
            .expect_err("access ended")
            .code(),
        Code::Unauthenticated
    );
    let mut conn = mesh.store.pg().await.expect("pg");
    let reuse: i64 = trellis_store::schema::audit_events::table
        .filter(trellis_store::schema::audit_events::action.eq("auth.session.reuse_detected"))
        .filter(trellis_store::schema::audit_events::target_id.eq(&first.session_id))
        .count()
        .get_result(&mut conn)
        .await
        .expect("audit");
    assert_eq!(reuse, 1);
    drop(conn);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_reach_a_second_servers_own_auth_layer() {
    use trellis_proto::search::v1 as spb;
    use trellis_proto::user::v1 as upb;
    // Server 1 serves only search; its authentication layer verifies every
    // call with its own verifier and revocation feed.
    let meshes = split(&[
        &[ServiceName::Auth, ServiceName::User],
        &[ServiceName::Search],
    ])
    .await;
    let (home, other) = (&meshes[0], &meshes[1]);
    let mut client = auth(home).await;
    let leaver = access(&register(&mut client, "leaver").await);
    let suspect = register(&mut client, "suspect").await;
    let suspect_token = access(&suspect);
    let key = client
        .create_api_key(bearer(
            pb::CreateApiKeyRequest {
                name: "remote".into(),
                scopes: vec!["search:documents:read".into()],
                ttl: None,
            },
            &leaver,
        ))
        .await
        .expect("key")
        .into_inner();
    let (_, admin) = admin_account(home, "sheriff").await;
    let search = trellis_proto::search::v1::search_service_client::SearchServiceClient::new(
        other.channel().await,
    );
    let call = |token: String| {
        let mut s = search.clone();
        async move {
            s.list_collections(bearer(spb::ListCollectionsRequest {}, &token))
                .await
                .map(|_| ())
        }
    };
    for t in [&leaver, &suspect_token, &key.secret] {
        call(t.clone()).await.expect("accepted by the other server");
    }
    // Let the other server's subscription settle before revoking.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused_within_a_second = |token: String, what: &'static str| async move {
        let started = Instant::now();
        let seen = eventually(Duration::from_secs(1), || {
            let c = call(token.clone());
            async move { matches!(c.await, Err(s) if s.code() == Code::Unauthenticated) }
        })
        .await;
        assert!(seen, "{what} not seen by the other server within a second");
        println!(
            "{what} seen by the other server after {:?}",
            started.elapsed()
        );
    };

    client
        .logout(bearer(pb::LogoutRequest {}, &leaver))
        .await
        .expect("logout");
    refused_within_a_second(leaver.clone(), "logout").await;
    call(key.secret.clone())
        .await
        .expect("the key outlives the session");
    let fresh = login(&mut client, "leaver", PASSWORD)
        .await
        .expect("login")
        .access_token;
    client
        .revoke_api_key(bearer(
            pb::RevokeApiKeyRequest {
                id: key.api_key.expect("key").id,
            },
            &fresh,
        ))
        .await
        .expect("revoke");
    refused_within_a_second(key.secret.clone(), "key revocation").await;

    upb::user_service_client::UserServiceClient::new(home.channel().await)
        .suspend_user(bearer(
            upb::SuspendUserRequest {
                id: suspect.account.expect("account").id,
                reason: "test".into(),
            },
            &admin,
        ))
        .await
        .expect("suspend");
    refused_within_a_second(suspect_token, "suspension").await;
    for m in meshes {
        m.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_kids_neither_flood_auth_nor_delay_a_new_key() {
    use jsonwebtoken::{Algorithm, Header, encode};
    use trellis_proto::search::v1 as spb;
    let meshes = split(&[
        &[ServiceName::Auth, ServiceName::User],
        &[ServiceName::Search],
    ])
    .await;
    let (home, other) = (&meshes[0], &meshes[1]);
    let mut client = auth(home).await;
    let reg = register(&mut client, "flooded").await;
    let genuine = access(&reg);
    let search = spb::search_service_client::SearchServiceClient::new(other.channel().await);
    let call = |token: String| {
        let mut s = search.clone();
        async move {
            s.list_collections(bearer(spb::ListCollectionsRequest {}, &token))
                .await
                .map(|_| ())
        }
    };
    call(genuine.clone())
        .await
        .expect("the other server knows the key");
    let jwks_calls = || async {
        let text = home.metrics().await;
        text.lines()
            .filter(|l| l.starts_with("trellis_grpc_requests_total") && l.contains("GetJwks"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let before = jwks_calls().await;

    // The key rotates; a token signed with the new key is coming.
    let (_, admin) = admin_account(home, "rotator").await;
    client
        .rotate_signing_key(bearer(pb::RotateSigningKeyRequest {}, &admin))
        .await
        .expect("rotate");
    let (kid, key, _) = server_key(home).await;
    let claims = claims_of(&genuine);
    let sign = |kid: &str| {
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some(kid.to_string());
        encode(&h, &claims, &key).expect("sign")
    };
    // 300 calls, each with its own made-up kid, all at once …
    let flood: Vec<_> = (0..300)
        .map(|i| tokio::spawn(call(sign(&format!("made-up-{i}")))))
        .collect();
    // … and, among them, the genuine new-key token.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let started = Instant::now();
    call(sign(&kid))
        .await
        .expect("the new key is learnt despite the flood");
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(2),
        "the genuine token waited {waited:?}"
    );
    for f in flood {
        let err = f.await.expect("join").expect_err("made-up kid");
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    // Repeating a made-up kid is refused without asking AuthService again.
    for _ in 0..20 {
        let err = call(sign("made-up-7")).await.expect_err("still unknown");
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    let fetches = jwks_calls().await - before;
    assert!(
        (1.0..=12.0).contains(&fetches),
        "{fetches} key fetches for 321 unknown-kid calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockouts_do_not_reveal_which_accounts_exist() {
    let mesh = TestMesh::start_with(TestOptions::default(), |c| {
        c.auth.lockout_threshold = 3;
        c.auth.lockout_base = Duration::from_secs(1);
    })
    .await;
    let mut client = auth(&mesh).await;
    register(&mut client, "existing").await;
    let answers = |who: &'static str| {
        let c = client.clone();
        async move {
            let mut seen = Vec::new();
            for _ in 0..5 {
                let e = login(&mut c.clone(), who, "Wr0ng!pass")
                    .await
                    .expect_err("wrong password");
                let retry = e.get_error_details().retry_info().is_some();
                seen.push((e.code(), e.message().to_string(), retry));
            }
            seen
        }
    };
    let real = answers("existing").await;
    let ghost = answers("Nobody-At-All").await;
    assert_eq!(
        real.iter().map(|a| a.0).collect::<Vec<_>>(),
        [
            Code::Unauthenticated,
            Code::Unauthenticated,
            Code::Unauthenticated,
            Code::ResourceExhausted,
            Code::ResourceExhausted
        ],
        "{real:?}"
    );
    assert_eq!(real, ghost, "an unknown login is answered like an account");
    // The "lock" ends like a real one, and counting starts over.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(answers("existing").await, real, "reset");
    assert_eq!(
        answers("nobody-at-all").await,
        real,
        "case-insensitive, reset"
    );
    // A second lock lasts twice as long (2 s), for an account and for a
    // login naming none alike: both are still locked after the first's 1 s.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for who in ["existing", "nobody-at-all"] {
        let e = login(&mut client, who, "Wr0ng!pass")
            .await
            .expect_err("locked");
        assert_eq!(e.code(), Code::ResourceExhausted, "{who}: {e:?}");
    }
}

/// Housekeeping deletes auth state past its retention — sessions expired or
/// revoked long enough ago (their refresh tokens with them), refresh and
/// mailed tokens long expired, mail sent long ago — and nothing that still
/// counts: a live session still refreshes, its spent but unexpired token
/// still trips reuse detection, a recently revoked session, a valid mailed
/// token, recent and unsent mail stay. One replica sweeps at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn housekeeping_deletes_only_what_is_past_its_retention() {
    use diesel::sql_types::{Text, Uuid as SqlUuid};
    use diesel_async::{AsyncConnection, AsyncPgConnection};
    use trellis_auth::housekeeping::{LOCK, Swept, sweep};
    // A short grace window: the reuse below is not a concurrent refresh.
    let mesh = TestMesh::start_with(TestOptions::default(), |c| {
        c.auth.refresh_grace = Duration::from_millis(100);
    })
    .await;
    let mut client = auth(&mesh).await;
    let keeper = register(&mut client, "keeper").await;
    let first = keeper.tokens.clone().expect("tokens");
    let second = refresh(&mut client, &first.refresh_token)
        .await
        .expect("rotate");
    let leaver = register(&mut client, "leaver")
        .await
        .tokens
        .expect("tokens");
    let expired = login(&mut client, "leaver", PASSWORD).await.expect("login");
    let revoked_long_ago = login(&mut client, "leaver", PASSWORD).await.expect("login");
    let revoked_lately = login(&mut client, "leaver", PASSWORD).await.expect("login");
    let id = |s: &str| uuid::Uuid::parse_str(s).expect("session id");
    let keeper_id = id(&keeper.account.as_ref().expect("account").id);
    {
        let mut conn = mesh.store.pg().await.expect("pg");
        for (sql, session) in [
            (
                "UPDATE auth_sessions SET expires_at = now() - interval '40 days' WHERE id = $1",
                &expired.session_id,
            ),
            (
                "UPDATE refresh_tokens SET expires_at = now() - interval '40 days' WHERE session_id = $1",
                &expired.session_id,
            ),
            (
                "UPDATE auth_sessions SET revoked_at = now() - interval '40 days' WHERE id = $1",
                &revoked_long_ago.session_id,
            ),
            (
                "UPDATE auth_sessions SET revoked_at = now() - interval '1 day' WHERE id = $1",
                &revoked_lately.session_id,
            ),
            // A spent token of the live session, long expired.
            (
                "INSERT INTO refresh_tokens (token_hash, session_id, expires_at, used_at) \
                 VALUES ('\\x01', $1, now() - interval '40 days', now() - interval '41 days')",
                &second.session_id,
            ),
        ] {
            let n = diesel::sql_query(sql)
                .bind::<SqlUuid, _>(id(session))
                .execute(&mut conn)
                .await
                .expect("age the state");
            assert!(n >= 1, "{sql}");
        }
        diesel::sql_query(
            "INSERT INTO auth_one_time_tokens (token_hash, user_id, purpose, email, expires_at) VALUES \
             ('\\x02', $1, 'password_reset', 'keeper@example.com', now() - interval '40 days'), \
             ('\\x03', $1, 'email_verification', 'keeper@example.com', now() + interval '1 day')",
        )
        .bind::<SqlUuid, _>(keeper_id)
        .execute(&mut conn)
        .await
        .expect("mailed tokens");
        diesel::sql_query(
            "INSERT INTO mail_outbox (id, to_address, subject, body, purpose, created_at, sent_at, user_id) VALUES \
             (gen_random_uuid(), $2, 'old', 'b', 'verify', now() - interval '41 days', now() - interval '40 days', $1), \
             (gen_random_uuid(), $2, 'recent', 'b', 'verify', now() - interval '2 days', now() - interval '1 day', $1), \
             (gen_random_uuid(), $2, 'unsent', 'b', 'verify', now() - interval '40 days', NULL, $1)",
        )
        .bind::<SqlUuid, _>(keeper_id)
        .bind::<Text, _>("keeper@example.com")
        .execute(&mut conn)
        .await
        .expect("mail");
    }

    // While another replica holds the round, this one leaves it alone.
    let url = mesh.config.database.url.clone().expect("database url");
    let mut other = AsyncPgConnection::establish(&url).await.expect("connect");
    diesel::sql_query("SELECT pg_advisory_lock($1)")
        .bind::<diesel::sql_types::BigInt, _>(LOCK)
        .execute(&mut other)
        .await
        .expect("lock");
    let cutoff = chrono::Utc::now() - chrono::Duration::days(30);
    assert_eq!(sweep(&mesh.store, cutoff).await.expect("sweep"), None);
    diesel::sql_query("SELECT pg_advisory_unlock($1)")
        .bind::<diesel::sql_types::BigInt, _>(LOCK)
        .execute(&mut other)
        .await
        .expect("unlock");

    let swept = sweep(&mesh.store, cutoff)
        .await
        .expect("sweep")
        .expect("the lock is free");
    assert_eq!(
        swept,
        Swept {
            sessions: 2,
            refresh_tokens: 1,
            one_time_tokens: 1,
            mails: 1
        }
    );
    // A second round finds nothing more.
    assert_eq!(
        sweep(&mesh.store, cutoff).await.expect("sweep"),
        Some(Swept::default())
    );

    #[derive(diesel::QueryableByName)]
    struct Left {
        #[diesel(sql_type = Text)]
        what: String,
    }
    let mut conn = mesh.store.pg().await.expect("pg");
    let left: Vec<Left> = diesel::sql_query(
        "SELECT 'session ' || id::text AS what FROM auth_sessions \
         UNION ALL SELECT 'mail ' || subject FROM mail_outbox \
         UNION ALL SELECT 'token ' || purpose FROM auth_one_time_tokens ORDER BY 1",
    )
    .load(&mut conn)
    .await
    .expect("what is left");
    drop(conn);
    let mut want: Vec<String> = [
        format!("session {}", second.session_id),
        format!("session {}", revoked_lately.session_id),
        format!("session {}", leaver.session_id),
        "mail recent".into(),
        "mail unsent".into(),
        "token email_verification".into(),
    ]
    .into_iter()
    .collect();
    let mut left: Vec<String> = left.into_iter().map(|l| l.what).collect();
    left.sort();
    want.sort();
    assert_eq!(left, want);

    // What is live still works: the session refreshes, and its spent token,
    // kept until it expires, still counts as reuse (revoking the session).
    let third = refresh(&mut client, &second.refresh_token)
        .await
        .expect("the live session refreshes");
    who(&mut client, &third.access_token).await.expect("usable");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let reuse = refresh(&mut client, &first.refresh_token)
        .await
        .expect_err("reuse");
    assert!(reuse.message().contains("reuse"), "{}", reuse.message());
    mesh.shutdown().await;
}

/// NUL and other control characters in what a caller signs in with, or in
/// a token they present, are refused as bad input — never a database
/// error surfacing as INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_logins_and_tokens_are_refused_as_bad_input() {
    let mesh = TestMesh::start().await;
    let mut a = auth(&mesh).await;
    register(&mut a, "nulda").await;
    for login in ["nul\0da", "nul\nda"] {
        let e = super::auth::login(&mut a, login, PASSWORD)
            .await
            .expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{login:?}: {e:?}");
        assert_eq!(violations(&e), ["login"]);
    }
    let refresh = a
        .refresh(pb::RefreshRequest {
            refresh_token: "a\0b".into(),
        })
        .await
        .expect_err("no such token");
    assert!(
        matches!(
            refresh.code(),
            Code::InvalidArgument | Code::Unauthenticated
        ),
        "{refresh:?}"
    );
    let verify = a
        .verify_email(pb::VerifyEmailRequest {
            token: "a\0b".into(),
        })
        .await
        .expect_err("no such token");
    assert!(
        matches!(
            verify.code(),
            Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition
        ),
        "{verify:?}"
    );
    let reset = a
        .reset_password(pb::ResetPasswordRequest {
            token: "a\0b".into(),
            new_password: "An0ther!pass".into(),
        })
        .await
        .expect_err("no such token");
    assert!(
        matches!(
            reset.code(),
            Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition
        ),
        "{reset:?}"
    );
    // The account is untouched: the right login still works.
    super::auth::login(&mut a, "nulda", PASSWORD)
        .await
        .expect("login");
}
