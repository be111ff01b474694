//! API keys end to end: creation and its validation, the secret working as
//! a bearer credential (WhoAmI, Introspect), keyset pagination over the
//! caller's keys only, revocation taking effect at once here and within a
//! second on another server (and so does the owner's suspension), expiry,
//! scopes enforced by handlers, and keys refused for minting more keys.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use trellis_core::ServiceName;
use trellis_proto::auth::v1 as pb;
use trellis_proto::auth::v1::auth_service_client::AuthServiceClient;
use trellis_store::schema::users;
use trellis_tests::{TestMesh, split};

use crate::auth::{access, auth, bearer, make_admin, refresh, register, violations, who};
use crate::util::eventually;

async fn create_key(
    client: &mut AuthServiceClient<Channel>,
    token: &str,
    name: &str,
    scopes: &[&str],
    ttl: Option<prost_types::Duration>,
) -> Result<pb::CreateApiKeyResponse, Status> {
    client
        .create_api_key(bearer(
            pb::CreateApiKeyRequest {
                name: name.into(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                ttl,
            },
            token,
        ))
        .await
        .map(|r| r.into_inner())
}

async fn list_keys(
    client: &mut AuthServiceClient<Channel>,
    token: &str,
    page_size: i32,
    page_token: &str,
) -> Result<pb::ListApiKeysResponse, Status> {
    client
        .list_api_keys(bearer(
            pb::ListApiKeysRequest {
                page_size,
                page_token: page_token.into(),
            },
            token,
        ))
        .await
        .map(|r| r.into_inner())
}

async fn introspect(
    client: &mut AuthServiceClient<Channel>,
    token: &str,
) -> pb::IntrospectResponse {
    client
        .introspect(pb::IntrospectRequest {
            token: token.into(),
        })
        .await
        .expect("introspect")
        .into_inner()
}

fn secs(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_created_and_work_as_bearer_credentials() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let reg = register(&mut client, "kira").await;
    let token = access(&reg);
    let user_id = reg.account.as_ref().expect("account").id.clone();

    let anonymous = client
        .create_api_key(pb::CreateApiKeyRequest {
            name: "ci".into(),
            scopes: vec!["chat:*".into()],
            ttl: None,
        })
        .await
        .expect_err("unauthenticated");
    assert_eq!(anonymous.code(), Code::Unauthenticated);

    let created = create_key(&mut client, &token, "  ci  ", &["chat:*", "chat:*"], None)
        .await
        .expect("create");
    let key = created.api_key.expect("api key");
    let secret = created.secret;
    assert!(secret.starts_with("trk_") && secret.len() > 40, "{secret}");
    assert_eq!(
        uuid::Uuid::parse_str(&key.id)
            .expect("uuid")
            .get_version_num(),
        7
    );
    assert_eq!(key.name, "ci");
    assert_eq!(key.scopes, vec!["chat:*".to_string()], "deduplicated");
    assert_eq!(key.prefix, secret[..12]);
    assert!(key.create_time.is_some());
    assert!(key.expire_time.is_none() && key.last_use_time.is_none() && key.revoke_time.is_none());

    let me = who(&mut client, &secret)
        .await
        .expect("whoami with the key");
    let p = me.principal.expect("principal");
    assert_eq!(p.credential_type, "api_key");
    assert_eq!(p.api_key_id, key.id);
    assert_eq!(p.user_id, user_id);
    assert_eq!(p.session_id, "");
    assert!(p.roles.is_empty());
    assert_eq!(p.permissions, vec!["chat:*".to_string()]);
    assert_eq!(me.account.expect("account").username, "kira");

    let r = introspect(&mut client, &secret).await;
    assert!(r.active);
    assert!(r.expire_time.is_none(), "never expires");
    let ip = r.principal.expect("principal");
    assert_eq!(
        (ip.credential_type.as_str(), ip.api_key_id.as_str()),
        ("api_key", key.id.as_str())
    );
    let bogus = introspect(&mut client, "trk_not-a-real-key").await;
    assert!(!bogus.active && bogus.principal.is_none());
    let bogus = who(&mut client, "trk_not-a-real-key")
        .await
        .expect_err("made-up key");
    assert_eq!(bogus.code(), Code::Unauthenticated);

    // Use is recorded (at most once a minute).
    let listed = list_keys(&mut client, &token, 0, "").await.expect("list");
    assert_eq!(listed.api_keys.len(), 1);
    assert!(listed.api_keys[0].last_use_time.is_some());
    assert!(listed.next_page_token.is_empty());

    // A key cannot mint keys, even one allowed to manage them.
    let denied = create_key(&mut client, &secret, "child", &["chat:*"], None)
        .await
        .expect_err("a key creating a key");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let manager = create_key(&mut client, &token, "manager", &["auth:self:*"], None)
        .await
        .expect("create")
        .secret;
    let denied = create_key(&mut client, &manager, "child", &["auth:self:*"], None)
        .await
        .expect_err("a managing key creating a key");
    assert_eq!(denied.code(), Code::PermissionDenied);
    // Listing needs the permission to manage keys: the chat key lacks it.
    let denied = list_keys(&mut client, &secret, 0, "")
        .await
        .expect_err("chat-scoped key listing keys");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(
        list_keys(&mut client, &manager, 0, "")
            .await
            .expect("managing key lists")
            .api_keys
            .len(),
        2
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_api_key_validates_and_limits_scopes_to_the_callers() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let token = access(&register(&mut client, "vera").await);

    let empty = create_key(&mut client, &token, " ", &[], None)
        .await
        .expect_err("empty");
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert_eq!(
        violations(&empty),
        vec!["name".to_string(), "scopes".to_string()]
    );

    let long_name = "n".repeat(101);
    let bad = create_key(
        &mut client,
        &token,
        &long_name,
        &["Chat:x", "chat:*", "a:b:c:d", ""],
        secs(0),
    )
    .await
    .expect_err("invalid");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(
        violations(&bad),
        ["name", "scopes[0]", "scopes[2]", "scopes[3]", "ttl"]
            .map(String::from)
            .to_vec()
    );
    for (ttl, what) in [
        (secs(-5), "negative"),
        (secs(3 * 365 * 24 * 3600), "over two years"),
        (
            Some(prost_types::Duration {
                seconds: 5,
                nanos: -1,
            }),
            "malformed",
        ),
    ] {
        let err = create_key(&mut client, &token, "k", &["chat:*"], ttl)
            .await
            .expect_err(what);
        assert_eq!(violations(&err), vec!["ttl".to_string()], "{what}");
    }

    // Members hold chat:* and auth:self:*, not everything.
    let denied = create_key(
        &mut client,
        &token,
        "greedy",
        &["chat:sessions:read", "*", "auth:keys:rotate", "auth:self:*"],
        None,
    )
    .await
    .expect_err("scopes beyond the caller's");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let fields: Vec<String> = denied
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default();
    assert_eq!(
        fields,
        vec!["scopes[1]".to_string(), "scopes[2]".to_string()]
    );

    let ok = create_key(
        &mut client,
        &token,
        "narrow",
        &["chat:sessions:read"],
        secs(3600),
    )
    .await
    .expect("a narrower scope than held");
    let key = ok.api_key.expect("key");
    let expire = key.expire_time.expect("expiry").seconds;
    let create = key.create_time.expect("created").seconds;
    assert!(
        (3599..=3601).contains(&(expire - create)),
        "{expire} - {create}"
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_page_newest_first_without_gaps_or_duplicates() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let token = access(&register(&mut client, "paige").await);
    let other = access(&register(&mut client, "olive").await);
    let others_key = create_key(&mut client, &other, "theirs", &["chat:*"], None)
        .await
        .expect("create")
        .api_key
        .expect("key")
        .id;

    let mut created = Vec::new();
    for i in 0..5 {
        let k = create_key(&mut client, &token, &format!("key {i}"), &["chat:*"], None)
            .await
            .expect("create");
        created.push(k.api_key.expect("key").id);
    }
    created.reverse();

    let mut seen = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = list_keys(&mut client, &token, 2, &page_token)
            .await
            .expect("page");
        pages += 1;
        assert!(page.api_keys.len() <= 2);
        seen.extend(page.api_keys.iter().map(|k| k.id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
        assert!(pages < 10, "runaway paging");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, created, "newest first, each once");
    assert!(!seen.contains(&others_key));
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 5);

    let first = list_keys(&mut client, &token, 2, "").await.expect("page");
    let good = first.next_page_token;
    let mut tampered = good.clone().into_bytes();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("ascii");
    for (t, what) in [(tampered.as_str(), "tampered"), ("garbage!", "garbage")] {
        let err = list_keys(&mut client, &token, 2, t).await.expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}");
        assert_eq!(violations(&err), vec!["page_token".to_string()], "{what}");
    }
    // A token belongs to its owner's list.
    let err = list_keys(&mut client, &other, 2, &good)
        .await
        .expect_err("someone else's page token");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = list_keys(&mut client, &token, -1, "")
        .await
        .expect_err("negative page size");
    assert_eq!(violations(&err), vec!["page_size".to_string()]);

    let theirs = list_keys(&mut client, &other, 0, "").await.expect("list");
    assert_eq!(
        theirs
            .api_keys
            .iter()
            .map(|k| k.id.clone())
            .collect::<Vec<_>>(),
        vec![others_key]
    );
    let anonymous = client
        .list_api_keys(pb::ListApiKeysRequest::default())
        .await
        .expect_err("unauthenticated");
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_key_takes_effect_at_once_and_only_for_its_owner() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let alice = access(&register(&mut client, "alice").await);
    let bob = access(&register(&mut client, "bob").await);
    let created = create_key(&mut client, &alice, "deploy", &["chat:*"], None)
        .await
        .expect("create");
    let (id, secret) = (created.api_key.expect("key").id, created.secret);
    // Verified (and now cached) before the revocation.
    who(&mut client, &secret).await.expect("key works");

    let base = client.clone();
    let revoke = |token: &str, id: &str| {
        let mut c = base.clone();
        let req = bearer(pb::RevokeApiKeyRequest { id: id.into() }, token);
        async move { c.revoke_api_key(req).await.map(|r| r.into_inner()) }
    };
    for (token, target, code, what) in [
        (
            bob.as_str(),
            id.clone(),
            Code::NotFound,
            "another user's key",
        ),
        (
            bob.as_str(),
            uuid::Uuid::now_v7().to_string(),
            Code::NotFound,
            "unknown key",
        ),
        (
            alice.as_str(),
            "nope".to_string(),
            Code::InvalidArgument,
            "malformed id",
        ),
    ] {
        let err = revoke(token, &target).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}");
    }
    let malformed = revoke(&alice, "nope").await.expect_err("malformed");
    assert_eq!(violations(&malformed), vec!["id".to_string()]);
    let anonymous = client
        .revoke_api_key(pb::RevokeApiKeyRequest { id: id.clone() })
        .await
        .expect_err("unauthenticated");
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    assert!(
        list_keys(&mut client, &bob, 0, "")
            .await
            .expect("bob's list")
            .api_keys
            .is_empty()
    );
    who(&mut client, &secret)
        .await
        .expect("still works after the refused attempts");

    revoke(&alice, &id).await.expect("revoke");
    let err = who(&mut client, &secret).await.expect_err("revoked");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(!introspect(&mut client, &secret).await.active);
    revoke(&alice, &id)
        .await
        .expect("revoking again is harmless");
    let listed = list_keys(&mut client, &alice, 0, "").await.expect("list");
    assert_eq!(listed.api_keys.len(), 1);
    assert!(listed.api_keys[0].revoke_time.is_some());
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_expire() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let token = access(&register(&mut client, "ephemera").await);
    let created = create_key(&mut client, &token, "short", &["chat:*"], secs(2))
        .await
        .expect("create");
    let secret = created.secret;
    let r = introspect(&mut client, &secret).await;
    assert!(r.active);
    assert!(r.expire_time.is_some());
    who(&mut client, &secret).await.expect("works while fresh");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let err = who(&mut client, &secret).await.expect_err("expired");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(!introspect(&mut client, &secret).await.active);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_scopes_are_enforced_by_handlers() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let reg = register(&mut client, "rootie").await;
    make_admin(&mesh, &reg.account.as_ref().expect("account").id).await;
    let admin = refresh(
        &mut client,
        &reg.tokens.as_ref().expect("tokens").refresh_token,
    )
    .await
    .expect("refresh")
    .access_token;

    let rotate = create_key(&mut client, &admin, "rotator", &["auth:keys:rotate"], None)
        .await
        .expect("an admin may grant auth:keys:rotate")
        .secret;
    let chat = create_key(&mut client, &admin, "chatter", &["chat:*"], None)
        .await
        .expect("create")
        .secret;
    let kid = client
        .rotate_signing_key(bearer(pb::RotateSigningKeyRequest {}, &rotate))
        .await
        .expect("rotate with the scoped key")
        .into_inner()
        .kid;
    assert!(!kid.is_empty());
    let denied = client
        .rotate_signing_key(bearer(pb::RotateSigningKeyRequest {}, &chat))
        .await
        .expect_err("chat-scoped key of an admin");
    assert_eq!(denied.code(), Code::PermissionDenied);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_verify_on_another_server_and_revocation_reaches_it() {
    // Server 0 runs auth; server 1 runs none of it and verifies keys by
    // asking server 0's Introspect, keeping its own revocation set.
    let meshes = split(&[&[ServiceName::Auth], &[]]).await;
    let (auth_server, other) = (&meshes[0], &meshes[1]);
    let mut client = auth(auth_server).await;
    let token = access(&register(&mut client, "wanderer").await);
    let created = create_key(&mut client, &token, "remote", &["chat:*"], None)
        .await
        .expect("create");
    let (id, secret) = (created.api_key.expect("key").id, created.secret);
    let second = create_key(&mut client, &token, "second", &["chat:*"], None)
        .await
        .expect("create")
        .secret;

    let (verifier, _feed) = crate::util::replica_verifier(other);
    let p = verifier
        .verify_api_key(&secret)
        .await
        .expect("verified through Introspect");
    assert_eq!(p.permissions, vec!["chat:*".to_string()]);
    assert_eq!(p.session_id, None);
    let unknown = verifier
        .verify_api_key("trk_made-up")
        .await
        .expect_err("unknown key");
    assert_eq!(unknown.code(), Code::Unauthenticated);
    // Let the replica's subscription settle before revoking.
    tokio::time::sleep(Duration::from_millis(200)).await;

    client
        .revoke_api_key(bearer(pb::RevokeApiKeyRequest { id }, &token))
        .await
        .expect("revoke");
    let started = Instant::now();
    let seen = eventually(Duration::from_secs(1), || async {
        verifier.verify_api_key(&secret).await.is_err()
    })
    .await;
    assert!(seen, "key revocation not seen within a second");
    println!(
        "key revocation seen by the other server after {:?}",
        started.elapsed()
    );

    // Suspending the owner (status, then every token cut) reaches keys the
    // replica has cached, too.
    verifier
        .verify_api_key(&second)
        .await
        .expect("the other key still works");
    let mut conn = auth_server.store.pg().await.expect("pg");
    diesel::update(users::table.filter(users::username.eq("wanderer")))
        .set(users::status.eq("suspended"))
        .execute(&mut conn)
        .await
        .expect("suspend");
    drop(conn);
    client
        .logout_all(bearer(pb::LogoutAllRequest {}, &token))
        .await
        .expect("cut every token");
    let seen = eventually(Duration::from_secs(1), || async {
        verifier.verify_api_key(&second).await.is_err()
    })
    .await;
    assert!(seen, "the owner's suspension not seen within a second");
    for m in meshes {
        m.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_service_rpcs_need_their_scope_with_an_api_key() {
    let mesh = TestMesh::start().await;
    let mut client = auth(&mesh).await;
    let mut users =
        trellis_proto::user::v1::user_service_client::UserServiceClient::new(mesh.channel().await);
    let reg = register(&mut client, "scoped").await;
    let token = access(&reg);
    let other_session = crate::auth::login(&mut client, "scoped", crate::auth::PASSWORD)
        .await
        .expect("second session")
        .session_id;
    let key = |scopes: &'static [&'static str]| {
        let (mut c, t) = (client.clone(), token.clone());
        async move {
            create_key(&mut c, &t, "k", scopes, None)
                .await
                .expect("create")
                .secret
        }
    };
    let chat = key(&["chat:*"]).await;
    let sessions = key(&["auth:self:sessions"]).await;
    let password = key(&["auth:self:password"]).await;
    let email = key(&["auth:self:email"]).await;

    // A key scoped for other work is refused every self-service act.
    let req = pb::ListSessionsRequest::default();
    denied(
        client.list_sessions(bearer(req, &chat)).await,
        "ListSessions",
    );
    let req = pb::RevokeSessionRequest {
        session_id: other_session.clone(),
    };
    denied(
        client.revoke_session(bearer(req, &chat)).await,
        "RevokeSession",
    );
    let req = pb::LogoutAllRequest {};
    denied(client.logout_all(bearer(req, &chat)).await, "LogoutAll");
    let change = |with: &str, new: &str| {
        bearer(
            pb::ChangePasswordRequest {
                current_password: crate::auth::PASSWORD.into(),
                new_password: new.into(),
            },
            with,
        )
    };
    let req = change(&chat, "N3w!password");
    denied(client.change_password(req).await, "ChangePassword");
    let req = bearer(pb::RequestEmailVerificationRequest {}, &chat);
    denied(
        client.request_email_verification(req).await,
        "RequestEmailVerification",
    );
    let req = trellis_proto::user::v1::CheckPermissionRequest {
        user_id: String::new(),
        permission: "chat:sessions:read".into(),
    };
    denied(
        users.check_permission(bearer(req, &chat)).await,
        "CheckPermission about oneself",
    );
    // Nothing happened: both sessions live, the password unchanged.
    let listed = client
        .list_sessions(bearer(pb::ListSessionsRequest::default(), &token))
        .await
        .expect("list with the session")
        .into_inner();
    assert_eq!(listed.sessions.len(), 2);

    // Keys holding the scope may.
    let listed = client
        .list_sessions(bearer(pb::ListSessionsRequest::default(), &sessions))
        .await
        .expect("list with auth:self:sessions")
        .into_inner();
    assert_eq!(listed.sessions.len(), 2);
    assert!(
        listed.sessions.iter().all(|s| !s.current),
        "a key has no session"
    );
    client
        .revoke_session(bearer(
            pb::RevokeSessionRequest {
                session_id: other_session.clone(),
            },
            &sessions,
        ))
        .await
        .expect("revoke with auth:self:sessions");
    client
        .request_email_verification(bearer(pb::RequestEmailVerificationRequest {}, &email))
        .await
        .expect("verification mail with auth:self:email");
    let mut conn = mesh.store.pg().await.expect("pg");
    let mails: i64 = trellis_store::schema::mail_outbox::table
        .filter(trellis_store::schema::mail_outbox::to_address.eq("scoped@example.com"))
        .filter(trellis_store::schema::mail_outbox::purpose.eq("email_verification"))
        .count()
        .get_result(&mut conn)
        .await
        .expect("outbox");
    assert_eq!(mails, 1);
    drop(conn);
    client
        .change_password(change(&password, "N3w!password"))
        .await
        .expect("change with auth:self:password");
    crate::auth::login(&mut client, "scoped", "N3w!password")
        .await
        .expect("the new password works");
    client
        .logout_all(bearer(pb::LogoutAllRequest {}, &sessions))
        .await
        .expect("logout-all with auth:self:sessions");
    let after = who(&mut client, &token).await.expect_err("session ended");
    assert_eq!(after.code(), Code::Unauthenticated);
    mesh.shutdown().await;
}

/// Asserts that a call was refused with PERMISSION_DENIED.
#[track_caller]
fn denied<T: std::fmt::Debug>(r: Result<tonic::Response<T>, Status>, what: &str) {
    match r {
        Ok(r) => panic!("{what} allowed: {r:?}"),
        Err(e) => assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}"),
    }
}
