//! TOTP second factor end to end: enrolment and confirmation, Login
//! requiring the second factor once enrolled, replayed codes refused,
//! recovery codes working exactly once, wrong second factors counting
//! towards the lockout, and disabling with the password and a current code.
//! Codes are computed here from the returned secret, as an authenticator
//! app would.

use std::collections::HashSet;
use std::time::Duration;

use tonic::transport::Channel;
use tonic::{Code, Status};
use totp_rs::{Builder, Secret};
use trellis_proto::auth::v1 as pb;
use trellis_proto::auth::v1::auth_service_client::AuthServiceClient;
use trellis_tests::{TestMesh, TestOptions};

use crate::auth::{PASSWORD, access, auth, bearer, register, violations, who};

/// The code an authenticator app shows at `unix` seconds.
pub fn code_at(secret: &str, unix: i64) -> String {
    Builder::new()
        .with_secret(Secret::try_from_base32(secret).expect("base32 secret"))
        .build()
        .expect("totp")
        .generate(unix as u64)
        .to_string()
}

/// Waits, when needed, until at least ten seconds of the current 30-second
/// step remain, so that the codes of the previous, current and next step
/// all stay acceptable for the next few calls; returns the step's start.
pub async fn fresh_step() -> i64 {
    let ms = chrono::Utc::now().timestamp_millis();
    let into = ms.rem_euclid(30_000);
    if into > 20_000 {
        tokio::time::sleep(Duration::from_millis((30_000 - into + 100) as u64)).await;
    }
    let now = chrono::Utc::now().timestamp();
    now - now.rem_euclid(30)
}

/// TOTP enabled on the caller's account: (secret, recovery codes, start of
/// the step it was confirmed in). Confirmation spends the previous step's
/// code, leaving the current and next steps' codes for the test.
pub async fn enable_totp(
    client: &mut AuthServiceClient<Channel>,
    token: &str,
) -> (String, Vec<String>, i64) {
    let secret = client
        .enroll_totp(bearer(pb::EnrollTotpRequest {}, token))
        .await
        .expect("enroll")
        .into_inner()
        .secret;
    let step = fresh_step().await;
    let codes = client
        .confirm_totp(bearer(
            pb::ConfirmTotpRequest {
                code: code_at(&secret, step - 30),
            },
            token,
        ))
        .await
        .expect("confirm")
        .into_inner()
        .recovery_codes;
    (secret, codes, step)
}

async fn login(
    client: &mut AuthServiceClient<Channel>,
    name: &str,
    password: &str,
    totp_code: &str,
    recovery_code: &str,
) -> Result<pb::LoginResponse, Status> {
    client
        .login(pb::LoginRequest {
            login: name.into(),
            password: password.into(),
            totp_code: totp_code.into(),
            recovery_code: recovery_code.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// A six-digit code that is none of `taken`.
fn wrong_code(taken: &[&str]) -> String {
    (0..1_000_000u64)
        .map(|n| format!("{:06}", (n * 7919 + 123_457) % 1_000_000))
        .find(|c| !taken.contains(&c.as_str()))
        .expect("a free code")
}

fn assert_unauthenticated(r: Result<pb::LoginResponse, Status>, message: &str) {
    let err = r.expect_err(message);
    assert_eq!(
        (err.code(), err.message()),
        (Code::Unauthenticated, message),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totp_enrolment_is_confirmed_with_a_current_code() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let token = access(&register(&mut client, "tina").await);

    let anonymous = client
        .enroll_totp(pb::EnrollTotpRequest {})
        .await
        .expect_err("unauthenticated");
    assert_eq!(anonymous.code(), Code::Unauthenticated);

    let first = client
        .enroll_totp(bearer(pb::EnrollTotpRequest {}, &token))
        .await
        .expect("enroll")
        .into_inner();
    assert_eq!(first.secret.len(), 32, "160 bits in base32");
    assert!(
        first
            .otpauth_uri
            .starts_with("otpauth://totp/Trellis:tina%40example.com?"),
        "{}",
        first.otpauth_uri
    );
    assert!(
        first
            .otpauth_uri
            .contains(&format!("secret={}", first.secret))
            && first.otpauth_uri.contains("issuer=Trellis"),
        "{}",
        first.otpauth_uri
    );
    // Enrolling again before confirming replaces the pending secret.
    let second = client
        .enroll_totp(bearer(pb::EnrollTotpRequest {}, &token))
        .await
        .expect("enroll again")
        .into_inner();
    assert_ne!(second.secret, first.secret);

    for (code, what) in [
        ("", "empty"),
        ("12ab56", "not digits"),
        ("1234567", "7 digits"),
    ] {
        let err = client
            .confirm_totp(bearer(pb::ConfirmTotpRequest { code: code.into() }, &token))
            .await
            .expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}");
        assert_eq!(violations(&err), vec!["code".to_string()], "{what}");
    }
    let step = fresh_step().await;
    let replaced = client
        .confirm_totp(bearer(
            pb::ConfirmTotpRequest {
                code: code_at(&first.secret, step),
            },
            &token,
        ))
        .await
        .expect_err("the replaced secret's code");
    assert_eq!(replaced.code(), Code::InvalidArgument);
    assert_eq!(violations(&replaced), vec!["code".to_string()]);

    let codes = client
        .confirm_totp(bearer(
            pb::ConfirmTotpRequest {
                code: code_at(&second.secret, step),
            },
            &token,
        ))
        .await
        .expect("confirm")
        .into_inner()
        .recovery_codes;
    assert_eq!(codes.len(), 10);
    assert_eq!(codes.iter().collect::<HashSet<_>>().len(), 10, "distinct");
    for c in &codes {
        let (a, b) = c.split_once('-').expect("two groups");
        assert!(
            a.len() == 5
                && b.len() == 5
                && (a.to_string() + b)
                    .bytes()
                    .all(|x| x.is_ascii_digit() || x.is_ascii_lowercase()),
            "{c}"
        );
    }
    let me = who(&mut client, &token).await.expect("whoami");
    assert!(me.account.expect("account").totp_enabled);

    let again = client
        .enroll_totp(bearer(pb::EnrollTotpRequest {}, &token))
        .await
        .expect_err("already enabled");
    assert_eq!(again.code(), Code::FailedPrecondition);
    let reconfirm = client
        .confirm_totp(bearer(
            pb::ConfirmTotpRequest {
                code: code_at(&second.secret, step + 30),
            },
            &token,
        ))
        .await
        .expect_err("already enabled");
    assert_eq!(reconfirm.code(), Code::FailedPrecondition);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_without_enrolment_and_api_keys_are_refused() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let token = access(&register(&mut client, "nora").await);
    let err = client
        .confirm_totp(bearer(
            pb::ConfirmTotpRequest {
                code: "123456".into(),
            },
            &token,
        ))
        .await
        .expect_err("nothing to confirm");
    assert_eq!(err.code(), Code::FailedPrecondition);

    // The second factor is managed from a signed-in session, never with an
    // API key, whatever its scopes.
    let key = client
        .create_api_key(bearer(
            pb::CreateApiKeyRequest {
                name: "automation".into(),
                scopes: vec!["auth:self:*".into()],
                ttl: None,
            },
            &token,
        ))
        .await
        .expect("create key")
        .into_inner()
        .secret;
    let err = client
        .enroll_totp(bearer(pb::EnrollTotpRequest {}, &key))
        .await
        .expect_err("API key");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = client
        .disable_totp(bearer(
            pb::DisableTotpRequest {
                password: PASSWORD.into(),
                code: "123456".into(),
            },
            &key,
        ))
        .await
        .expect_err("API key");
    assert_eq!(err.code(), Code::PermissionDenied);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_requires_the_second_factor_and_refuses_replays() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let token = access(&register(&mut client, "otto").await);
    let (secret, _, step) = enable_totp(&mut client, &token).await;
    let (prev, cur, next) = (
        code_at(&secret, step - 30),
        code_at(&secret, step),
        code_at(&secret, step + 30),
    );

    assert_unauthenticated(
        login(&mut client, "otto", PASSWORD, "", "").await,
        "second factor required",
    );
    assert_unauthenticated(
        login(&mut client, "otto", "Wr0ng!pass", &cur, "").await,
        "invalid credentials",
    );
    let wrong = wrong_code(&[&prev, &cur, &next]);
    assert_unauthenticated(
        login(&mut client, "otto", PASSWORD, &wrong, "").await,
        "invalid second factor",
    );

    let ok = login(&mut client, "otto", PASSWORD, &cur, "")
        .await
        .expect("password and current code");
    assert!(ok.account.expect("account").totp_enabled);
    who(&mut client, &ok.tokens.expect("tokens").access_token)
        .await
        .expect("signed in");

    // A code works once; and an older step's code is no better.
    assert_unauthenticated(
        login(&mut client, "otto", PASSWORD, &cur, "").await,
        "invalid second factor",
    );
    assert_unauthenticated(
        login(&mut client, "otto", PASSWORD, &prev, "").await,
        "invalid second factor",
    );
    login(&mut client, "otto", PASSWORD, &next, "")
        .await
        .expect("the next step's code (clock skew)");
    assert_unauthenticated(
        login(&mut client, "otto", PASSWORD, &next, "").await,
        "invalid second factor",
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_codes_work_exactly_once() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let token = access(&register(&mut client, "rory").await);
    let (_, codes, _) = enable_totp(&mut client, &token).await;

    let ok = login(&mut client, "rory", PASSWORD, "", &codes[0])
        .await
        .expect("recovery code");
    assert!(ok.tokens.is_some());
    assert_unauthenticated(
        login(&mut client, "rory", PASSWORD, "", &codes[0]).await,
        "invalid second factor",
    );
    // In the TOTP field too, and however it is typed.
    login(&mut client, "rory", PASSWORD, &codes[1].to_uppercase(), "")
        .await
        .expect("recovery code in the totp_code field");
    assert_unauthenticated(
        login(&mut client, "rory", PASSWORD, "", &codes[1]).await,
        "invalid second factor",
    );
    assert_unauthenticated(
        login(&mut client, "rory", PASSWORD, "", "aaaaa-bbbbb").await,
        "invalid second factor",
    );
    login(&mut client, "rory", PASSWORD, "", &codes[9])
        .await
        .expect("another unused code");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_second_factors_count_towards_the_lockout() {
    let mesh = TestMesh::start_with(TestOptions::default(), |c| {
        c.auth.lockout_threshold = 3;
    })
    .await;
    let mut client = auth(&mesh).await;
    let token = access(&register(&mut client, "lara").await);
    let (secret, codes, step) = enable_totp(&mut client, &token).await;
    let (prev, cur, next) = (
        code_at(&secret, step - 30),
        code_at(&secret, step),
        code_at(&secret, step + 30),
    );
    let wrong = wrong_code(&[&prev, &cur, &next]);
    for _ in 0..3 {
        assert_unauthenticated(
            login(&mut client, "lara", PASSWORD, &wrong, "").await,
            "invalid second factor",
        );
    }
    let locked = login(&mut client, "lara", PASSWORD, &cur, "")
        .await
        .expect_err("locked");
    assert_eq!(locked.code(), Code::ResourceExhausted);
    let locked = login(&mut client, "lara", PASSWORD, "", &codes[0])
        .await
        .expect_err("locked");
    assert_eq!(locked.code(), Code::ResourceExhausted);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_totp_needs_the_password_and_a_current_code() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let token = access(&register(&mut client, "dina").await);
    let base = client.clone();
    let disable = |password: &str, code: &str, token: &str| {
        let mut c = base.clone();
        let req = bearer(
            pb::DisableTotpRequest {
                password: password.into(),
                code: code.into(),
            },
            token,
        );
        async move { c.disable_totp(req).await.map(|r| r.into_inner()) }
    };
    let not_enabled = disable(PASSWORD, "123456", &token)
        .await
        .expect_err("not enabled");
    assert_eq!(not_enabled.code(), Code::FailedPrecondition);

    let (secret, codes, step) = enable_totp(&mut client, &token).await;
    let cur = code_at(&secret, step);

    let empty = disable("", "", &token).await.expect_err("empty");
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert_eq!(
        violations(&empty),
        vec!["password".to_string(), "code".to_string()]
    );
    let recovery = disable(PASSWORD, &codes[0], &token)
        .await
        .expect_err("recovery codes do not disable 2FA");
    assert_eq!(recovery.code(), Code::InvalidArgument);
    assert_eq!(violations(&recovery), vec!["code".to_string()]);
    let wrong_password = disable("Wr0ng!pass", &cur, &token)
        .await
        .expect_err("wrong password");
    assert_eq!(
        (wrong_password.code(), wrong_password.message()),
        (Code::Unauthenticated, "invalid credentials")
    );
    let wrong = wrong_code(&[
        &code_at(&secret, step - 30),
        &cur,
        &code_at(&secret, step + 30),
    ]);
    let bad_code = disable(PASSWORD, &wrong, &token)
        .await
        .expect_err("wrong code");
    assert_eq!(
        (bad_code.code(), bad_code.message()),
        (Code::Unauthenticated, "invalid credentials")
    );
    let anonymous = client
        .disable_totp(pb::DisableTotpRequest {
            password: PASSWORD.into(),
            code: cur.clone(),
        })
        .await
        .expect_err("unauthenticated");
    assert_eq!(anonymous.code(), Code::Unauthenticated);

    disable(PASSWORD, &cur, &token).await.expect("disabled");
    let me = who(&mut client, &token).await.expect("whoami");
    assert!(!me.account.expect("account").totp_enabled);
    let plain = login(&mut client, "dina", PASSWORD, "", "")
        .await
        .expect("the password alone is enough again");
    assert!(!plain.account.expect("account").totp_enabled);

    // And 2FA can be set up afresh.
    let (_, fresh_codes, _) = enable_totp(&mut client, &token).await;
    assert!(fresh_codes.iter().all(|c| !codes.contains(c)));
    assert_unauthenticated(
        login(&mut client, "dina", PASSWORD, "", &codes[1]).await,
        "invalid second factor",
    );
    mesh.shutdown().await;
}

/// `req` with `authorization` (when `token` is set) and `x-request-id`.
fn traced<T>(msg: T, token: Option<&str>, request_id: &str) -> tonic::Request<T> {
    let mut req = match token {
        Some(t) => bearer(msg, t),
        None => tonic::Request::new(msg),
    };
    req.metadata_mut()
        .insert("x-request-id", request_id.parse().expect("ascii"));
    req
}

/// The trail as an administrator reads it, newest first.
pub async fn trail(mesh: &TestMesh, admin: &str) -> Vec<trellis_proto::user::v1::AuditEvent> {
    let mut users =
        trellis_proto::user::v1::user_service_client::UserServiceClient::new(mesh.channel().await);
    users
        .list_audit_events(bearer(
            trellis_proto::user::v1::ListAuditEventsRequest {
                page_size: 100,
                ..Default::default()
            },
            admin,
        ))
        .await
        .expect("audit events")
        .into_inner()
        .events
}

/// The one event of `action` in request `request_id`.
pub fn event<'a>(
    trail: &'a [trellis_proto::user::v1::AuditEvent],
    action: &str,
    request_id: &str,
) -> &'a trellis_proto::user::v1::AuditEvent {
    let found: Vec<_> = trail
        .iter()
        .filter(|e| e.action == action && e.request_id == request_id)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{action} in {request_id}: {:?}",
        trail
            .iter()
            .map(|e| (&e.action, &e.request_id))
            .collect::<Vec<_>>()
    );
    found[0]
}

/// A string field of an event's details.
pub fn detail(e: &trellis_proto::user::v1::AuditEvent, key: &str) -> Option<String> {
    use prost_types::value::Kind;
    match e.details.as_ref()?.fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(s) => Some(s.clone()),
        Kind::NumberValue(n) => Some(n.to_string()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_factor_lockout_keys_and_rotation_leave_an_audit_trail() {
    let mesh = TestMesh::start_with(TestOptions::default(), |c| {
        c.auth.lockout_threshold = 3;
    })
    .await;
    let mut client = auth(&mesh).await;
    let reg = register(&mut client, "tess").await;
    let (tess, token) = (reg.account.clone().expect("account").id, access(&reg));
    let (admin_id, admin) = crate::auth::admin_account(&mesh, "auditor").await;
    let (secret, codes, step) = enable_totp(&mut client, &token).await;
    let base = client.clone();
    let sign_in = |totp: &str, recovery: &str, rid: &str| {
        let mut c = base.clone();
        let req = traced(
            pb::LoginRequest {
                login: "tess".into(),
                password: PASSWORD.into(),
                totp_code: totp.into(),
                recovery_code: recovery.into(),
            },
            None,
            rid,
        );
        async move { c.login(req).await }
    };
    sign_in("", &codes[0], "r-recovery")
        .await
        .expect("recovery code");
    let cur = code_at(&secret, step);
    let wrong = wrong_code(&[
        &code_at(&secret, step - 30),
        &cur,
        &code_at(&secret, step + 30),
    ]);
    sign_in(&wrong, "", "r-bad-totp")
        .await
        .expect_err("wrong code");
    sign_in("", "aaaaa-bbbbb", "r-bad-recovery")
        .await
        .expect_err("wrong recovery code");
    // The third failure, through DisableTotp, locks the account.
    let refused = client
        .disable_totp(traced(
            pb::DisableTotpRequest {
                password: PASSWORD.into(),
                code: wrong.clone(),
            },
            Some(&token),
            "r-bad-disable",
        ))
        .await
        .expect_err("wrong code");
    assert_eq!(refused.code(), Code::Unauthenticated);
    let locked = sign_in(&cur, "", "r-locked").await.expect_err("locked");
    assert_eq!(locked.code(), Code::ResourceExhausted);

    let key = client
        .create_api_key(traced(
            pb::CreateApiKeyRequest {
                name: "deploy".into(),
                scopes: vec!["chat:*".into()],
                ttl: None,
            },
            Some(&token),
            "r-key-create",
        ))
        .await
        .expect("key")
        .into_inner()
        .api_key
        .expect("key")
        .id;
    client
        .revoke_api_key(traced(
            pb::RevokeApiKeyRequest { id: key.clone() },
            Some(&token),
            "r-key-revoke",
        ))
        .await
        .expect("revoke");
    let kid = client
        .rotate_signing_key(traced(
            pb::RotateSigningKeyRequest {},
            Some(&admin),
            "r-rotate",
        ))
        .await
        .expect("rotate")
        .into_inner()
        .kid;
    let admin = crate::auth::login(&mut client, "auditor", PASSWORD)
        .await
        .expect("fresh admin token")
        .access_token;

    let trail = trail(&mesh, &admin).await;
    let on_tess = |action: &str, rid: &str| {
        let e = event(&trail, action, rid);
        assert_eq!(
            (
                e.actor_id.as_str(),
                e.target_type.as_str(),
                e.target_id.as_str()
            ),
            (tess.as_str(), "user", tess.as_str()),
            "{e:?}"
        );
        assert!(!e.ip_address.is_empty(), "{e:?}");
        e.clone()
    };
    let used = on_tess("auth.totp.recovery_code_used", "r-recovery");
    assert_eq!(detail(&used, "codes_left").as_deref(), Some("9"));
    let e = on_tess("auth.login.failed", "r-bad-totp");
    assert_eq!(detail(&e, "reason").as_deref(), Some("wrong TOTP code"));
    let e = on_tess("auth.login.failed", "r-bad-recovery");
    assert_eq!(detail(&e, "reason").as_deref(), Some("wrong recovery code"));
    let e = on_tess("auth.totp.disable_failed", "r-bad-disable");
    assert_eq!(detail(&e, "reason").as_deref(), Some("wrong code"));
    let e = on_tess("auth.account.locked", "r-bad-disable");
    assert!(detail(&e, "lock_seconds").is_some(), "{e:?}");
    let e = on_tess("auth.login.failed", "r-locked");
    assert_eq!(detail(&e, "reason").as_deref(), Some("account locked"));
    for (action, rid) in [
        ("auth.api_key.created", "r-key-create"),
        ("auth.api_key.revoked", "r-key-revoke"),
    ] {
        let e = event(&trail, action, rid);
        assert_eq!(
            (
                e.actor_id.as_str(),
                e.target_type.as_str(),
                e.target_id.as_str()
            ),
            (tess.as_str(), "api_key", key.as_str())
        );
    }
    let e = event(&trail, "auth.signing_key.rotated", "r-rotate");
    assert_eq!(
        (
            e.actor_id.as_str(),
            e.target_type.as_str(),
            e.target_id.as_str()
        ),
        (admin_id.as_str(), "signing_key", kid.as_str())
    );
    let actions: HashSet<&str> = trail.iter().map(|e| e.action.as_str()).collect();
    for a in ["auth.totp.enrollment_started", "auth.totp.enabled"] {
        assert!(actions.contains(a), "{a} missing from {actions:?}");
    }
    mesh.shutdown().await;
}
