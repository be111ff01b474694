//! AuthService account upkeep end to end: listing and ending sessions,
//! changing and resetting passwords, verifying e-mail, per-IP rate limits
//! and the audit trail those acts leave.

use std::collections::HashSet;
use std::time::Duration;

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use tonic::Code;
use tonic_types::StatusExt;
use trellis_proto::auth::v1 as pb;
use trellis_proto::auth::v1::auth_service_client as auth_client;
use trellis_store::schema::{audit_events, mail_outbox};
use trellis_tests::{TestMesh, TestOptions};

use crate::auth::{PASSWORD, access, auth, bearer, login, register, violations as fields};

/// The newest mailed token of `purpose` sent to `to`, read from the outbox.
pub async fn mailed_token(mesh: &TestMesh, to: &str, purpose: &str) -> Option<String> {
    let mut conn = mesh.store.pg().await.expect("pg");
    let body: Option<String> = mail_outbox::table
        .filter(mail_outbox::to_address.eq(to))
        .filter(mail_outbox::purpose.eq(purpose))
        .order(mail_outbox::created_at.desc())
        .select(mail_outbox::body)
        .first(&mut conn)
        .await
        .optional()
        .expect("outbox");
    body.and_then(|b| {
        b.split_whitespace()
            .find(|w| w.starts_with("prt_") || w.starts_with("evt_"))
            .map(str::to_string)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_listed_paged_and_revoked() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let reg = register(&mut client, "multi").await;
    let first = reg.tokens.clone().expect("tokens");
    let second = login(&mut client, "multi", PASSWORD).await.expect("login");
    let third = login(&mut client, "multi", PASSWORD).await.expect("login");

    let page = |token: String, size: i32| {
        let mut c = client.clone();
        let auth_token = third.access_token.clone();
        async move {
            c.list_sessions(bearer(
                pb::ListSessionsRequest {
                    page_size: size,
                    page_token: token,
                },
                &auth_token,
            ))
            .await
        }
    };
    let p1 = page(String::new(), 2).await.expect("page 1").into_inner();
    assert_eq!(p1.sessions.len(), 2);
    assert!(!p1.next_page_token.is_empty());
    let p2 = page(p1.next_page_token.clone(), 2)
        .await
        .expect("page 2")
        .into_inner();
    assert_eq!(p2.sessions.len(), 1);
    assert!(p2.next_page_token.is_empty(), "last page");
    let ids: HashSet<String> = p1
        .sessions
        .iter()
        .chain(&p2.sessions)
        .map(|s| s.id.clone())
        .collect();
    assert_eq!(ids.len(), 3, "no duplicates, no gaps");
    let current: Vec<&pb::Session> = p1
        .sessions
        .iter()
        .chain(&p2.sessions)
        .filter(|s| s.current)
        .collect();
    assert_eq!(current.len(), 1);
    assert_eq!(
        current[0].id, third.session_id,
        "newest first, and marked current"
    );

    let mut tampered = p1.next_page_token.clone();
    tampered.insert(3, 'x');
    let err = page(tampered, 2).await.expect_err("tampered");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(fields(&err), vec!["page_token".to_string()]);
    assert_eq!(
        page(String::new(), -1).await.expect_err("negative").code(),
        Code::InvalidArgument
    );

    // Ending one session ends its tokens, not the others.
    client
        .revoke_session(bearer(
            pb::RevokeSessionRequest {
                session_id: second.session_id.clone(),
            },
            &third.access_token,
        ))
        .await
        .expect("revoke");
    let base = client.clone();
    let who = |t: String| {
        let mut c = base.clone();
        async move { c.who_am_i(bearer(pb::WhoAmIRequest {}, &t)).await }
    };
    assert_eq!(
        who(second.access_token.clone())
            .await
            .expect_err("ended")
            .code(),
        Code::Unauthenticated
    );
    who(first.access_token.clone())
        .await
        .expect("others live on");

    // Another user's session is invisible; nonsense ids are refused.
    let other = register(&mut client, "stranger").await;
    for (id, code) in [
        (first.session_id.clone(), Code::NotFound),
        (uuid::Uuid::now_v7().to_string(), Code::NotFound),
        ("not-a-uuid".to_string(), Code::InvalidArgument),
    ] {
        let err = client
            .revoke_session(bearer(
                pb::RevokeSessionRequest { session_id: id },
                &access(&other),
            ))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), code);
    }
    who(first.access_token.clone())
        .await
        .expect("untouched by the stranger");
    let theirs = client
        .list_sessions(bearer(pb::ListSessionsRequest::default(), &access(&other)))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(theirs.sessions.len(), 1, "only their own");
    assert_eq!(
        client
            .list_sessions(pb::ListSessionsRequest::default())
            .await
            .expect_err("anonymous")
            .code(),
        Code::Unauthenticated
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_password_keeps_this_session_and_ends_the_others() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let reg = register(&mut client, "changer").await;
    let here = reg.tokens.clone().expect("tokens");
    let elsewhere = login(&mut client, "changer", PASSWORD)
        .await
        .expect("login");
    let change = |current: &str, new: &str| {
        let mut c = client.clone();
        let req = bearer(
            pb::ChangePasswordRequest {
                current_password: current.into(),
                new_password: new.into(),
            },
            &here.access_token,
        );
        async move { c.change_password(req).await }
    };
    let wrong = change("Wr0ng!pass", "N3w!password")
        .await
        .expect_err("wrong current");
    assert_eq!(
        (wrong.code(), fields(&wrong)),
        (Code::InvalidArgument, vec!["current_password".to_string()])
    );
    let weak = change(PASSWORD, "weak").await.expect_err("weak");
    assert_eq!(fields(&weak), vec!["new_password".to_string()]);
    let same = change(PASSWORD, PASSWORD).await.expect_err("same");
    assert_eq!(fields(&same), vec!["new_password".to_string()]);

    change(PASSWORD, "N3w!password").await.expect("changed");
    client
        .who_am_i(bearer(pb::WhoAmIRequest {}, &here.access_token))
        .await
        .expect("this session lives on");
    let ended = client
        .who_am_i(bearer(pb::WhoAmIRequest {}, &elsewhere.access_token))
        .await
        .expect_err("other session ended");
    assert_eq!(ended.code(), Code::Unauthenticated);
    assert_eq!(
        login(&mut client, "changer", PASSWORD)
            .await
            .expect_err("old password")
            .code(),
        Code::Unauthenticated
    );
    login(&mut client, "changer", "N3w!password")
        .await
        .expect("new password");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_reset_by_mailed_single_use_token() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let reg = register(&mut client, "forgetful").await;
    let old = reg.tokens.clone().expect("tokens");
    let email = "forgetful@example.com";

    // Unknown addresses get the same answer, and no mail.
    client
        .request_password_reset(pb::RequestPasswordResetRequest {
            email: "nobody@example.com".into(),
        })
        .await
        .expect("same answer for unknown addresses");
    assert!(
        mailed_token(&mesh, "nobody@example.com", "password_reset")
            .await
            .is_none()
    );
    let bad = client
        .request_password_reset(pb::RequestPasswordResetRequest {
            email: "nope".into(),
        })
        .await
        .expect_err("malformed");
    assert_eq!(fields(&bad), vec!["email".to_string()]);

    client
        .request_password_reset(pb::RequestPasswordResetRequest {
            email: email.into(),
        })
        .await
        .expect("requested");
    let token = mailed_token(&mesh, email, "password_reset")
        .await
        .expect("mailed");
    assert!(token.starts_with("prt_"));

    let reset = |token: &str, pw: &str| {
        let mut c = client.clone();
        let req = pb::ResetPasswordRequest {
            token: token.into(),
            new_password: pw.into(),
        };
        async move { c.reset_password(req).await }
    };
    let weak = reset(&token, "weak").await.expect_err("weak");
    assert_eq!(fields(&weak), vec!["new_password".to_string()]);
    reset(&token, "Res3t!pass")
        .await
        .expect("a weak attempt does not spend the token");
    let reuse = reset(&token, "An0ther!pass").await.expect_err("single use");
    assert_eq!(
        (reuse.code(), fields(&reuse)),
        (Code::InvalidArgument, vec!["token".to_string()])
    );
    assert_eq!(
        reset("prt_forged", "An0ther!pass")
            .await
            .expect_err("forged")
            .code(),
        Code::InvalidArgument
    );

    login(&mut client, "forgetful", "Res3t!pass")
        .await
        .expect("new password");
    assert_eq!(
        login(&mut client, "forgetful", PASSWORD)
            .await
            .expect_err("old")
            .code(),
        Code::Unauthenticated
    );
    let revoked = client
        .who_am_i(bearer(pb::WhoAmIRequest {}, &old.access_token))
        .await
        .expect_err("sessions ended by the reset");
    assert_eq!(revoked.code(), Code::Unauthenticated);

    // Both halves are in the trail, about the account; only the reset
    // itself (not the weak attempt or the reuse) counts as a change.
    let user = reg.account.expect("account").id;
    let mut conn = mesh.store.pg().await.expect("pg");
    let rows: Vec<(String, Option<uuid::Uuid>, String, Vec<String>)> = audit_events::table
        .filter(audit_events::action.like("auth.password.reset%"))
        .order(audit_events::occurred_at.asc())
        .select((
            audit_events::action,
            audit_events::actor_id,
            audit_events::target_id,
            audit_events::changed_fields,
        ))
        .load(&mut conn)
        .await
        .expect("audit");
    let uid = uuid::Uuid::parse_str(&user).ok();
    assert_eq!(
        rows,
        vec![
            (
                "auth.password.reset_requested".into(),
                None,
                user.clone(),
                vec![]
            ),
            (
                "auth.password.reset".into(),
                uid,
                user,
                vec!["password".into()]
            ),
        ]
    );
    drop(conn);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_tokens_expire() {
    let mesh = TestMesh::start_with(TestOptions::default(), |c| {
        c.auth.password_reset_ttl = Duration::from_secs(1)
    })
    .await;
    let mut client = auth(&mesh).await;
    register(&mut client, "slowpoke").await;
    client
        .request_password_reset(pb::RequestPasswordResetRequest {
            email: "slowpoke@example.com".into(),
        })
        .await
        .expect("requested");
    let token = mailed_token(&mesh, "slowpoke@example.com", "password_reset")
        .await
        .expect("mailed");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let err = client
        .reset_password(pb::ResetPasswordRequest {
            token,
            new_password: "Res3t!pass".into(),
        })
        .await
        .expect_err("expired");
    assert_eq!(err.code(), Code::InvalidArgument);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_verification_by_mailed_token() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let reg = register(&mut client, "verifier").await;
    let token = access(&reg);
    assert_eq!(
        client
            .request_email_verification(pb::RequestEmailVerificationRequest {})
            .await
            .expect_err("anonymous")
            .code(),
        Code::Unauthenticated
    );
    client
        .request_email_verification(bearer(pb::RequestEmailVerificationRequest {}, &token))
        .await
        .expect("requested");
    let code = mailed_token(&mesh, "verifier@example.com", "email_verification")
        .await
        .expect("mailed");
    client
        .verify_email(pb::VerifyEmailRequest {
            token: code.clone(),
        })
        .await
        .expect("verified");
    let me = client
        .who_am_i(bearer(pb::WhoAmIRequest {}, &token))
        .await
        .expect("whoami")
        .into_inner();
    assert!(me.account.expect("account").email_verified);
    assert_eq!(
        client
            .verify_email(pb::VerifyEmailRequest { token: code })
            .await
            .expect_err("used")
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        client
            .request_email_verification(bearer(pb::RequestEmailVerificationRequest {}, &token))
            .await
            .expect_err("already verified")
            .code(),
        Code::FailedPrecondition
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_rate_limits_on_login_and_register() {
    let mesh = TestMesh::start_with(TestOptions::default(), |c| {
        c.auth.login_per_ip_per_minute = 3;
        c.auth.register_per_ip_per_minute = 2;
    })
    .await;
    let mut client = auth(&mesh).await;
    register(&mut client, "first").await;
    register(&mut client, "second").await;
    let err = client
        .register(pb::RegisterRequest {
            email: "third@example.com".into(),
            username: "third".into(),
            password: PASSWORD.into(),
            display_name: String::new(),
        })
        .await
        .expect_err("limited");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.get_error_details().retry_info().is_some());
    for _ in 0..3 {
        login(&mut client, "first", PASSWORD)
            .await
            .expect("within the limit");
    }
    let err = login(&mut client, "first", PASSWORD)
        .await
        .expect_err("limited");
    assert_eq!(err.code(), Code::ResourceExhausted);
    let delay = err
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("retry delay");
    assert!(delay <= Duration::from_secs(60));
    mesh.shutdown().await;
}

/// Login as `who` with `X-Forwarded-For: forwarded`.
async fn login_via(
    client: &mut auth_client::AuthServiceClient<tonic::transport::Channel>,
    who: &str,
    forwarded: &str,
) -> Result<pb::TokenPair, tonic::Status> {
    let mut req = tonic::Request::new(pb::LoginRequest {
        login: who.into(),
        password: PASSWORD.into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("x-forwarded-for", forwarded.parse().expect("ascii"));
    let res = client.login(req).await?.into_inner();
    Ok(res.tokens.expect("tokens"))
}

/// The addresses the caller's sessions were opened from.
async fn session_ips(
    client: &mut auth_client::AuthServiceClient<tonic::transport::Channel>,
    token: &str,
) -> HashSet<String> {
    client
        .list_sessions(bearer(pb::ListSessionsRequest::default(), token))
        .await
        .expect("sessions")
        .into_inner()
        .sessions
        .into_iter()
        .map(|s| s.ip_address)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_limits_and_sessions_see_the_forwarded_client() {
    let mesh = TestMesh::start_with(TestOptions::default(), |c| {
        c.server.trusted_proxies = vec!["127.0.0.1".into(), "10.0.0.0/8".into()];
        c.auth.login_per_ip_per_minute = 2;
    })
    .await;
    let mut client = auth(&mesh).await;
    register(&mut client, "proxied").await;
    // Two logins a minute per client, wherever the proxy chain put it.
    let tokens = login_via(&mut client, "proxied", "203.0.113.7")
        .await
        .expect("first");
    login_via(&mut client, "proxied", "203.0.113.7, 10.1.2.3")
        .await
        .expect("second, through two proxies");
    let err = login_via(&mut client, "proxied", "203.0.113.7")
        .await
        .expect_err("third from the same client");
    assert_eq!(err.code(), Code::ResourceExhausted);
    login_via(&mut client, "proxied", "198.51.100.4")
        .await
        .expect("another client has its own limit");
    // The session records the forwarded client, not the proxy.
    // (Registration came without the header: the proxy's own address.)
    let want: HashSet<String> = ["127.0.0.1", "203.0.113.7", "198.51.100.4"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(session_ips(&mut client, &tokens.access_token).await, want);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_trusted_proxies_a_client_cannot_choose_its_address() {
    let mesh = TestMesh::start_with(TestOptions::default(), |c| {
        c.auth.login_per_ip_per_minute = 2;
    })
    .await;
    let mut client = auth(&mesh).await;
    register(&mut client, "spoofer").await;
    let tokens = login_via(&mut client, "spoofer", "203.0.113.1")
        .await
        .expect("first");
    login_via(&mut client, "spoofer", "203.0.113.2")
        .await
        .expect("second");
    let err = login_via(&mut client, "spoofer", "203.0.113.3")
        .await
        .expect_err("the header does not make a new client");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(
        session_ips(&mut client, &tokens.access_token).await,
        HashSet::from(["127.0.0.1".to_string()])
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_events_land_in_the_audit_trail() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let reg = register(&mut client, "audited").await;
    let user = reg.account.expect("account").id;
    login(&mut client, "audited", PASSWORD)
        .await
        .expect("login");
    login(&mut client, "audited", "Wr0ng!pass")
        .await
        .expect_err("wrong");
    login(&mut client, "ghost", "Wr0ng!pass")
        .await
        .expect_err("unknown");
    let mut req = tonic::Request::new(pb::ChangePasswordRequest {
        current_password: PASSWORD.into(),
        new_password: "N3w!password".into(),
    });
    req.metadata_mut()
        .insert("x-request-id", "audit-me-1".parse().expect("ascii"));
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", reg.tokens.expect("tokens").access_token)
            .parse()
            .expect("ascii"),
    );
    client.change_password(req).await.expect("changed");

    let mut conn = mesh.store.pg().await.expect("pg");
    let rows: Vec<(String, String, String)> = audit_events::table
        .order(audit_events::occurred_at.asc())
        .select((
            audit_events::action,
            audit_events::target_id,
            audit_events::request_id,
        ))
        .load(&mut conn)
        .await
        .expect("audit");
    let actions: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    for expected in [
        "auth.account.registered",
        "auth.login.succeeded",
        "auth.login.failed",
        "auth.password.changed",
    ] {
        assert!(
            actions.contains(&expected),
            "{expected} missing from {actions:?}"
        );
    }
    assert_eq!(
        actions
            .iter()
            .filter(|a| **a == "auth.login.failed")
            .count(),
        2,
        "wrong password and unknown account"
    );
    let changed = rows
        .iter()
        .find(|r| r.0 == "auth.password.changed")
        .expect("row");
    assert_eq!(changed.1, user);
    assert_eq!(changed.2, "audit-me-1", "request id recorded");
    drop(conn);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_tokens_expire_and_need_a_value() {
    let mesh = TestMesh::start_with(TestOptions::default(), |c| {
        c.auth.email_verification_ttl = Duration::from_secs(1)
    })
    .await;
    let mut client = auth(&mesh).await;
    let token = access(&register(&mut client, "tardy").await);
    let empty = client
        .verify_email(pb::VerifyEmailRequest {
            token: String::new(),
        })
        .await
        .expect_err("empty");
    assert_eq!(
        (empty.code(), fields(&empty)),
        (Code::InvalidArgument, vec!["token".to_string()])
    );
    let request = |c: &mut auth_client::AuthServiceClient<tonic::transport::Channel>| {
        let mut c = c.clone();
        let t = token.clone();
        async move {
            c.request_email_verification(bearer(pb::RequestEmailVerificationRequest {}, &t))
                .await
                .expect("requested")
        }
    };
    request(&mut client).await;
    let stale = mailed_token(&mesh, "tardy@example.com", "email_verification")
        .await
        .expect("mailed");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let expired = client
        .verify_email(pb::VerifyEmailRequest { token: stale })
        .await
        .expect_err("expired");
    assert_eq!(
        (expired.code(), fields(&expired)),
        (Code::InvalidArgument, vec!["token".to_string()])
    );
    let me = client
        .who_am_i(bearer(pb::WhoAmIRequest {}, &token))
        .await
        .expect("whoami")
        .into_inner();
    assert!(!me.account.expect("account").email_verified);
    // A fresh token, used in time, works.
    request(&mut client).await;
    let fresh = mailed_token(&mesh, "tardy@example.com", "email_verification")
        .await
        .expect("mailed");
    client
        .verify_email(pb::VerifyEmailRequest { token: fresh })
        .await
        .expect("verified in time");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_upkeep_needs_credentials() {
    let mesh = TestMesh::start().await;
    let mut c = auth(&mesh).await;
    let codes = [
        c.logout_all(pb::LogoutAllRequest {}).await.map(|_| ()),
        c.change_password(pb::ChangePasswordRequest {
            current_password: PASSWORD.into(),
            new_password: "N3w!password".into(),
        })
        .await
        .map(|_| ()),
        c.list_sessions(pb::ListSessionsRequest::default())
            .await
            .map(|_| ()),
        c.revoke_session(pb::RevokeSessionRequest {
            session_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .map(|_| ()),
        c.logout(pb::LogoutRequest {}).await.map(|_| ()),
        c.logout_all(bearer(pb::LogoutAllRequest {}, "not-a-token"))
            .await
            .map(|_| ()),
    ]
    .map(|r| r.expect_err("no credentials").code());
    assert_eq!(codes, [Code::Unauthenticated; 6]);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_reset_requests_are_limited_per_ip() {
    let mesh = TestMesh::start_with(TestOptions::default(), |c| {
        c.auth.password_reset_per_ip_per_minute = 2;
    })
    .await;
    let mut client = auth(&mesh).await;
    register(&mut client, "resetter").await;
    let ask = |email: &'static str| {
        let mut c = client.clone();
        async move {
            c.request_password_reset(pb::RequestPasswordResetRequest {
                email: email.into(),
            })
            .await
        }
    };
    ask("resetter@example.com").await.expect("first");
    ask("nobody@example.com")
        .await
        .expect("unknown addresses count too");
    let limited = ask("resetter@example.com").await.expect_err("limited");
    assert_eq!(limited.code(), Code::ResourceExhausted);
    let delay = limited
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("retry delay");
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(60),
        "{delay:?}"
    );
    let mut conn = mesh.store.pg().await.expect("pg");
    let mails: i64 = mail_outbox::table
        .filter(mail_outbox::to_address.eq("resetter@example.com"))
        .count()
        .get_result(&mut conn)
        .await
        .expect("count");
    assert_eq!(mails, 1, "the refused request mailed nothing");
    drop(conn);
    mesh.shutdown().await;
}
