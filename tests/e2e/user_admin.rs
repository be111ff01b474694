//! UserService self-service and administration end to end: profiles with
//! field masks, preferences, deleting one's own account, and the admin
//! lifecycle (create, read, update, suspend, reactivate, delete, restore,
//! purge) with its authorization rules.

use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use tonic::Code;
use tonic::transport::Channel;
use trellis_core::ServiceName;
use trellis_proto::auth::v1 as apb;
use trellis_proto::user::v1 as pb;
use trellis_proto::user::v1::user_service_client::UserServiceClient;
use trellis_store::schema::auth_sessions;
use trellis_tests::{TestMesh, split};

use crate::auth::{PASSWORD, access, auth, bearer, register, violations as fields};
use crate::util::{eventually, mask};

pub async fn users(mesh: &TestMesh) -> UserServiceClient<Channel> {
    UserServiceClient::new(mesh.channel().await)
}

/// An access token of a fresh administrator named `name`.
pub async fn admin_token(mesh: &TestMesh, name: &str) -> String {
    crate::auth::admin_account(mesh, name).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_updates_follow_the_field_mask() {
    let mesh = TestMesh::start().await;
    let token = access(&register(&mut auth(&mesh).await, "profiled").await);
    let mut c = users(&mesh).await;
    let me = c
        .get_me(bearer(pb::GetMeRequest {}, &token))
        .await
        .expect("me")
        .into_inner()
        .user
        .expect("user");
    assert_eq!(me.username, "profiled");
    assert_eq!(me.status, pb::UserStatus::Active as i32);
    assert_eq!(me.roles, vec!["member".to_string()]);

    let update = |user: pb::User, m: Option<prost_types::FieldMask>| {
        let mut c = c.clone();
        let t = token.clone();
        async move {
            c.update_me(bearer(
                pb::UpdateMeRequest {
                    user: Some(user),
                    update_mask: m,
                },
                &t,
            ))
            .await
        }
    };
    let good = pb::User {
        display_name: "Ada L.".into(),
        first_name: "Ada".into(),
        last_name: "Lovelace".into(),
        phone: "+441234567890".into(),
        date_of_birth: "1815-12-10".into(),
        bio: "Analyst".into(),
        avatar_url: "https://example.com/ada.png".into(),
        locale: "en-GB".into(),
        time_zone: "Europe/London".into(),
        email: "ignored@example.com".into(),
        ..Default::default()
    };
    let err = update(good.clone(), None)
        .await
        .expect_err("1815 is before 1900");
    assert_eq!(fields(&err), vec!["user.date_of_birth".to_string()]);
    let updated = update(
        pb::User {
            date_of_birth: "1990-12-10".into(),
            ..good.clone()
        },
        mask(&[
            "display_name",
            "first_name",
            "last_name",
            "phone",
            "date_of_birth",
            "bio",
            "avatar_url",
            "locale",
            "time_zone",
        ]),
    )
    .await
    .expect("update")
    .into_inner()
    .user
    .expect("user");
    assert_eq!(updated.display_name, "Ada L.");
    assert_eq!(updated.date_of_birth, "1990-12-10");
    assert_eq!(updated.time_zone, "Europe/London");
    assert_eq!(
        updated.email, "profiled@example.com",
        "email is not a self-service field"
    );

    // Only masked fields change; a masked empty field is cleared.
    let after = update(
        pb::User {
            bio: String::new(),
            ..Default::default()
        },
        mask(&["bio"]),
    )
    .await
    .expect("clear bio")
    .into_inner()
    .user
    .expect("user");
    assert_eq!(after.bio, "");
    assert_eq!(after.first_name, "Ada");

    let bad = pb::User {
        phone: "12345".into(),
        date_of_birth: "2999-01-01".into(),
        avatar_url: "javascript:alert(1)".into(),
        locale: "english".into(),
        time_zone: "Mars/Olympus".into(),
        first_name: "x".repeat(101),
        ..Default::default()
    };
    let err = update(bad, None).await.expect_err("invalid");
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut got = fields(&err);
    got.sort();
    assert_eq!(
        got,
        [
            "user.avatar_url",
            "user.date_of_birth",
            "user.first_name",
            "user.locale",
            "user.phone",
            "user.time_zone"
        ]
    );
    // A biography may run over lines; NUL (which PostgreSQL cannot store)
    // or other control characters are a field violation, not INTERNAL.
    let err = update(
        pb::User {
            bio: "line\0".into(),
            ..Default::default()
        },
        mask(&["bio"]),
    )
    .await
    .expect_err("NUL");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(fields(&err), ["user.bio"]);
    let multi = update(
        pb::User {
            bio: "Analyst.\n\tLikes maps.".into(),
            ..Default::default()
        },
        mask(&["bio"]),
    )
    .await
    .expect("multi-line bio")
    .into_inner()
    .user
    .expect("user");
    assert_eq!(multi.bio, "Analyst.\n\tLikes maps.");
    let err = update(good, mask(&["email"])).await.expect_err("read-only");
    assert_eq!(fields(&err), vec!["update_mask".to_string()]);
    assert_eq!(
        c.get_me(pb::GetMeRequest {})
            .await
            .expect_err("anonymous")
            .code(),
        Code::Unauthenticated
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferences_round_trip() {
    let mesh = TestMesh::start().await;
    let token = access(&register(&mut auth(&mesh).await, "prefers").await);
    let mut c = users(&mesh).await;
    let empty = c
        .get_preferences(bearer(pb::GetPreferencesRequest {}, &token))
        .await
        .expect("defaults")
        .into_inner()
        .preferences
        .expect("prefs");
    assert_eq!(
        empty.communication_style,
        pb::CommunicationStyle::Unspecified as i32
    );

    let custom = prost_types::Struct {
        fields: [(
            "theme".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("dark".into())),
            },
        )]
        .into(),
    };
    let prefs = pb::Preferences {
        communication_style: pb::CommunicationStyle::Technical as i32,
        industry_focus: vec!["fintech".into(), "health".into()],
        experience_levels: vec!["senior".into()],
        custom: Some(custom.clone()),
        ..Default::default()
    };
    let saved = c
        .update_preferences(bearer(
            pb::UpdatePreferencesRequest {
                preferences: Some(prefs),
                update_mask: mask(&[
                    "communication_style",
                    "industry_focus",
                    "experience_levels",
                    "custom",
                ]),
            },
            &token,
        ))
        .await
        .expect("saved")
        .into_inner()
        .preferences
        .expect("prefs");
    assert_eq!(
        saved.communication_style,
        pb::CommunicationStyle::Technical as i32
    );
    assert_eq!(saved.industry_focus, vec!["fintech", "health"]);
    assert_eq!(saved.custom, Some(custom));
    let again = c
        .get_preferences(bearer(pb::GetPreferencesRequest {}, &token))
        .await
        .expect("read back")
        .into_inner()
        .preferences
        .expect("prefs");
    assert_eq!(again.experience_levels, vec!["senior"]);

    let err = c
        .update_preferences(bearer(
            pb::UpdatePreferencesRequest {
                preferences: Some(pb::Preferences {
                    communication_style: 42,
                    industry_focus: vec!["x".into(); 21],
                    ..Default::default()
                }),
                update_mask: mask(&["communication_style", "industry_focus", "nonsense"]),
            },
            &token,
        ))
        .await
        .expect_err("invalid");
    let got = fields(&err);
    for f in [
        "preferences.communication_style",
        "preferences.industry_focus",
        "update_mask",
    ] {
        assert!(got.contains(&f.to_string()), "{f} missing from {got:?}");
    }
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_me_ends_access_and_admins_can_restore() {
    let mesh = TestMesh::start().await;
    let mut a = auth(&mesh).await;
    let reg = register(&mut a, "leaving").await;
    let id = reg.account.clone().expect("account").id;
    let token = access(&reg);
    let mut c = users(&mesh).await;
    let err = c
        .delete_me(bearer(
            pb::DeleteMeRequest {
                password: "Wr0ng!pass".into(),
            },
            &token,
        ))
        .await
        .expect_err("wrong password");
    assert_eq!(fields(&err), vec!["password".to_string()]);
    c.delete_me(bearer(
        pb::DeleteMeRequest {
            password: PASSWORD.into(),
        },
        &token,
    ))
    .await
    .expect("deleted");
    assert_eq!(
        c.get_me(bearer(pb::GetMeRequest {}, &token))
            .await
            .expect_err("revoked")
            .code(),
        Code::Unauthenticated
    );
    let login = a
        .login(apb::LoginRequest {
            login: "leaving".into(),
            password: PASSWORD.into(),
            ..Default::default()
        })
        .await
        .expect_err("deleted accounts cannot log in");
    assert_eq!(login.code(), Code::Unauthenticated);
    // The name stays taken until purge (the documented rule).
    let again = a
        .register(apb::RegisterRequest {
            email: "leaving@example.com".into(),
            username: "leaving2".into(),
            password: PASSWORD.into(),
            display_name: String::new(),
        })
        .await
        .expect_err("still taken");
    assert_eq!(again.code(), Code::AlreadyExists);

    let admin = admin_token(&mesh, "restorer").await;
    let seen = c
        .get_user(bearer(pb::GetUserRequest { id: id.clone() }, &admin))
        .await
        .expect("admins see deleted users")
        .into_inner()
        .user
        .expect("user");
    assert!(seen.delete_time.is_some());
    c.restore_user(bearer(pb::RestoreUserRequest { id: id.clone() }, &admin))
        .await
        .expect("restored");
    a.login(apb::LoginRequest {
        login: "leaving".into(),
        password: PASSWORD.into(),
        ..Default::default()
    })
    .await
    .expect("restored accounts log in");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_lifecycle_and_authorization() {
    let mesh = TestMesh::start().await;
    let admin = admin_token(&mesh, "boss").await;
    let member = access(&register(&mut auth(&mesh).await, "minion").await);
    let mut c = users(&mesh).await;
    let base = c.clone();

    // Create: validation, unknown roles, duplicates, and members refused.
    let err = c
        .create_user(bearer(
            pb::CreateUserRequest {
                email: "bad".into(),
                username: "x".into(),
                password: "weak".into(),
                roles: vec!["wizard".into()],
                ..Default::default()
            },
            &admin,
        ))
        .await
        .expect_err("invalid");
    let mut got = fields(&err);
    got.sort();
    assert_eq!(got, ["email", "password", "roles[0]", "username"]);
    let create = |token: &str, name: &str| {
        let mut c = base.clone();
        let req = bearer(
            pb::CreateUserRequest {
                email: format!("{name}@example.com"),
                username: name.into(),
                password: PASSWORD.into(),
                first_name: "Created".into(),
                last_name: "User".into(),
                ..Default::default()
            },
            token,
        );
        async move { c.create_user(req).await }
    };
    assert_eq!(
        create(&member, "nope").await.expect_err("member").code(),
        Code::PermissionDenied
    );
    let made = create(&admin, "newbie")
        .await
        .expect("created")
        .into_inner()
        .user
        .expect("user");
    assert_eq!(made.last_name, "User");
    assert_eq!(made.roles, vec!["member".to_string()]);
    assert_eq!(
        create(&admin, "newbie")
            .await
            .expect_err("duplicate")
            .code(),
        Code::AlreadyExists
    );
    let id = made.id.clone();

    // Read: members see themselves only; others' ids are NOT_FOUND.
    let get = |token: &str, id: &str| {
        let mut c = base.clone();
        let req = bearer(pb::GetUserRequest { id: id.into() }, token);
        async move { c.get_user(req).await }
    };
    get(&admin, &id).await.expect("admin reads");
    assert_eq!(
        get(&member, &id).await.expect_err("hidden").code(),
        Code::NotFound
    );
    assert_eq!(
        get(&member, "garbage").await.expect_err("bad id").code(),
        Code::InvalidArgument
    );
    assert_eq!(
        get(&admin, &uuid::Uuid::now_v7().to_string())
            .await
            .expect_err("missing")
            .code(),
        Code::NotFound
    );

    // Update: e-mail uniqueness, and members cannot touch others.
    let upd = |token: &str, user: pb::User, paths: &[&str]| {
        let mut c = base.clone();
        let req = bearer(
            pb::UpdateUserRequest {
                user: Some(user),
                update_mask: mask(paths),
            },
            token,
        );
        async move { c.update_user(req).await }
    };
    let taken = upd(
        &admin,
        pb::User {
            id: id.clone(),
            email: "minion@example.com".into(),
            ..Default::default()
        },
        &["email"],
    )
    .await
    .expect_err("email taken");
    assert_eq!(taken.code(), Code::AlreadyExists);
    let renamed = upd(
        &admin,
        pb::User {
            id: id.clone(),
            email: "fresh@example.com".into(),
            ..Default::default()
        },
        &["email"],
    )
    .await
    .expect("email changed")
    .into_inner()
    .user
    .expect("user");
    assert_eq!(renamed.email, "fresh@example.com");
    assert!(!renamed.email_verified);
    let hidden = upd(
        &member,
        pb::User {
            id: id.clone(),
            bio: "hacked".into(),
            ..Default::default()
        },
        &["bio"],
    )
    .await
    .expect_err("member");
    assert_eq!(hidden.code(), Code::NotFound);

    // Suspend: sessions end at once, login is refused; reactivate restores.
    let mut a = auth(&mesh).await;
    let victim = a
        .login(apb::LoginRequest {
            login: "newbie".into(),
            password: PASSWORD.into(),
            ..Default::default()
        })
        .await
        .expect("login")
        .into_inner()
        .tokens
        .expect("tokens");
    let suspended = c
        .suspend_user(bearer(
            pb::SuspendUserRequest {
                id: id.clone(),
                reason: "spam".into(),
            },
            &admin,
        ))
        .await
        .expect("suspended")
        .into_inner()
        .user
        .expect("user");
    assert_eq!(suspended.status, pb::UserStatus::Suspended as i32);
    assert_eq!(
        c.get_me(bearer(pb::GetMeRequest {}, &victim.access_token))
            .await
            .expect_err("ended")
            .code(),
        Code::Unauthenticated
    );
    let refresh = a
        .refresh(apb::RefreshRequest {
            refresh_token: victim.refresh_token.clone(),
        })
        .await
        .expect_err("no refresh");
    assert_eq!(refresh.code(), Code::Unauthenticated);
    let login = a
        .login(apb::LoginRequest {
            login: "newbie".into(),
            password: PASSWORD.into(),
            ..Default::default()
        })
        .await
        .expect_err("suspended");
    assert_eq!(login.code(), Code::PermissionDenied);
    assert_eq!(
        c.suspend_user(bearer(
            pb::SuspendUserRequest {
                id: id.clone(),
                reason: String::new()
            },
            &member
        ))
        .await
        .expect_err("member")
        .code(),
        Code::NotFound
    );
    c.reactivate_user(bearer(pb::ReactivateUserRequest { id: id.clone() }, &admin))
        .await
        .expect("reactivated");
    a.login(apb::LoginRequest {
        login: "newbie".into(),
        password: PASSWORD.into(),
        ..Default::default()
    })
    .await
    .expect("active again");

    // Delete and purge: purge removes everything the account owned and
    // frees its name.
    c.delete_user(bearer(pb::DeleteUserRequest { id: id.clone() }, &admin))
        .await
        .expect("deleted");
    assert_eq!(
        get(&member, &id).await.expect_err("gone").code(),
        Code::NotFound
    );
    assert_eq!(
        c.purge_user(bearer(pb::PurgeUserRequest { id: id.clone() }, &member))
            .await
            .expect_err("member")
            .code(),
        Code::NotFound
    );
    c.purge_user(bearer(pb::PurgeUserRequest { id: id.clone() }, &admin))
        .await
        .expect("purged");
    assert_eq!(
        get(&admin, &id).await.expect_err("purged").code(),
        Code::NotFound
    );
    let mut conn = mesh.store.pg().await.expect("pg");
    let uid = uuid::Uuid::parse_str(&id).expect("uuid");
    let left: i64 = auth_sessions::table
        .filter(auth_sessions::user_id.eq(uid))
        .count()
        .get_result(&mut conn)
        .await
        .expect("count");
    assert_eq!(left, 0, "sessions purged");
    drop(conn);
    create(&admin, "newbie")
        .await
        .expect("the name is free again");

    // Admins cannot lock themselves out by accident.
    let me = c
        .get_me(bearer(pb::GetMeRequest {}, &admin))
        .await
        .expect("me")
        .into_inner()
        .user
        .expect("user");
    for code in [
        c.suspend_user(bearer(
            pb::SuspendUserRequest {
                id: me.id.clone(),
                reason: String::new(),
            },
            &admin,
        ))
        .await
        .expect_err("self")
        .code(),
        c.purge_user(bearer(pb::PurgeUserRequest { id: me.id.clone() }, &admin))
            .await
            .expect_err("self")
            .code(),
    ] {
        assert_eq!(code, Code::FailedPrecondition);
    }
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspension_reaches_another_server_within_a_second() {
    let meshes = split(&[&[ServiceName::Auth, ServiceName::User], &[]]).await;
    let (home, other) = (&meshes[0], &meshes[1]);
    let admin = admin_token(home, "warden").await;
    let reg = register(&mut auth(home).await, "inmate").await;
    let token = access(&reg);

    let (verifier, _feed) = crate::util::replica_verifier(other);
    verifier.verify(&token).await.expect("valid before");
    tokio::time::sleep(Duration::from_millis(200)).await;

    users(home)
        .await
        .suspend_user(bearer(
            pb::SuspendUserRequest {
                id: reg.account.expect("account").id,
                reason: "test".into(),
            },
            &admin,
        ))
        .await
        .expect("suspended");
    let started = Instant::now();
    assert!(
        eventually(Duration::from_secs(1), || async {
            verifier.verify(&token).await.is_err()
        })
        .await,
        "suspension not seen on the other server within a second"
    );
    println!(
        "suspension seen by the other server after {:?}",
        started.elapsed()
    );
    for m in meshes {
        m.shutdown().await;
    }
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// Rows of `table` whose `column` is `id`.
async fn rows_of(mesh: &TestMesh, table: &str, column: &str, id: uuid::Uuid) -> i64 {
    let mut conn = mesh.store.pg().await.expect("pg");
    diesel::sql_query(format!(
        "SELECT count(*) AS n FROM {table} WHERE {column} = $1"
    ))
    .bind::<diesel::sql_types::Uuid, _>(id)
    .get_result::<Count>(&mut conn)
    .await
    .expect("count")
    .n
}

/// Audit events whose text mentions `needle` anywhere (ids, details, IP).
async fn audit_mentions(mesh: &TestMesh, needle: &str) -> i64 {
    let mut conn = mesh.store.pg().await.expect("pg");
    diesel::sql_query("SELECT count(*) AS n FROM audit_events e WHERE e::text ILIKE $1")
        .bind::<diesel::sql_types::Text, _>(format!("%{needle}%"))
        .get_result::<Count>(&mut conn)
        .await
        .expect("count")
        .n
}

/// Redis keys of this mesh containing `needle`.
async fn redis_keys(mesh: &TestMesh, needle: &str) -> Vec<String> {
    let mut conn = mesh.store.redis().await.expect("redis");
    redis::cmd("KEYS")
        .arg(mesh.store.key(&format!("*{needle}*")))
        .query_async(&mut *conn)
        .await
        .expect("keys")
}

/// Everything a member leaves behind through ordinary use: an LLM call
/// (usage, quota counters), a chat turn, a search document and history, an
/// API key, preferences, mail, audit events.
async fn leave_traces(mesh: &TestMesh, token: &str, name: &str) {
    use trellis_proto::chat::v1 as cpb;
    use trellis_proto::search::v1 as spb;
    let done = crate::llm::stream(
        &mut crate::llm::llm(mesh).await,
        token,
        crate::llm::params("fast", "hello"),
    )
    .await
    .expect("generate");
    assert!(done.completed.is_some(), "{done:?}");

    let mut chat = crate::chat::chat(mesh).await;
    let session = chat
        .create_session(bearer(
            cpb::CreateSessionRequest {
                title: format!("{name}'s chat"),
                model: "fast".into(),
                ..Default::default()
            },
            token,
        ))
        .await
        .expect("chat session")
        .into_inner()
        .session
        .expect("session");
    let mut events = chat
        .send_message(bearer(
            cpb::SendMessageRequest {
                send: Some(cpb::Send {
                    session_id: session.id.clone(),
                    content: format!("I am {name}@example.com"),
                    client_message_id: "m1".into(),
                    ..Default::default()
                }),
            },
            token,
        ))
        .await
        .expect("send")
        .into_inner();
    let mut completed = false;
    while let Some(e) = events.message().await.expect("event") {
        if let Some(cpb::chat_event::Event::Completed(_)) = e.event.and_then(|e| e.event) {
            completed = true;
            break;
        }
    }
    assert!(completed, "the chat turn completed");

    let mut search = crate::search::search_client(mesh).await;
    crate::search::index(
        &mut search,
        token,
        vec![crate::search::doc("cv", "1", "My résumé", "Rust engineer")],
    )
    .await;
    crate::search::find(
        &mut search,
        token,
        spb::SearchRequest {
            query: "rust".into(),
            ..Default::default()
        },
    )
    .await
    .expect("search");

    let mut a = auth(mesh).await;
    a.create_api_key(bearer(
        apb::CreateApiKeyRequest {
            name: "ci".into(),
            scopes: vec!["chat:*".into()],
            ttl: None,
        },
        token,
    ))
    .await
    .expect("api key");
    a.request_email_verification(bearer(apb::RequestEmailVerificationRequest {}, token))
        .await
        .expect("verification mail");
    a.request_password_reset(apb::RequestPasswordResetRequest {
        email: format!("{name}@example.com"),
    })
    .await
    .expect("reset mail");
    let wrong = crate::auth::login(&mut a, name, "Wr0ng!password").await;
    assert_eq!(
        wrong.expect_err("wrong password").code(),
        Code::Unauthenticated
    );
    users(mesh)
        .await
        .update_preferences(bearer(
            pb::UpdatePreferencesRequest {
                preferences: Some(pb::Preferences {
                    industry_focus: vec!["fintech".into()],
                    ..Default::default()
                }),
                update_mask: None,
            },
            token,
        ))
        .await
        .expect("preferences");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_erases_everything_the_user_owned() {
    let rig = crate::llm::rig(|_| {}).await;
    let mesh = &rig.mesh;
    let admin = admin_token(mesh, "eraser").await;
    let uid = uuid::Uuid::parse_str(&rig.user_id).expect("uuid");
    let bystander = register(&mut auth(mesh).await, "bystander").await;
    let bid = uuid::Uuid::parse_str(&bystander.account.as_ref().expect("account").id).expect("id");
    leave_traces(mesh, &rig.token, "llmuser").await;
    leave_traces(mesh, &access(&bystander), "bystander").await;
    // An admin act about the user, with a reason naming them, and a failed
    // login typed with their address before the account existed.
    let mut c = users(mesh).await;
    c.suspend_user(bearer(
        pb::SuspendUserRequest {
            id: rig.user_id.clone(),
            reason: "spam from llmuser@example.com".into(),
        },
        &admin,
    ))
    .await
    .expect("suspend");
    let mut conn = mesh.store.pg().await.expect("pg");
    trellis_store::audit::record(
        &mut conn,
        trellis_store::audit::AuditEvent {
            action: "auth.login.failed",
            target_type: "user",
            details: serde_json::json!({ "reason": "unknown account", "login": "LLMuser@example.com" }),
            ip_address: "203.0.113.9".into(),
            ..Default::default()
        },
    )
    .await
    .expect("anonymous event");
    drop(conn);

    let owned: &[(&str, &str)] = &[
        ("auth_sessions", "user_id"),
        ("user_roles", "user_id"),
        ("user_preferences", "user_id"),
        ("api_keys", "user_id"),
        ("auth_one_time_tokens", "user_id"),
        ("mail_outbox", "user_id"),
        ("chat_sessions", "user_id"),
        ("chat_messages", "user_id"),
        ("llm_usage", "user_id"),
        ("search_documents", "owner_id"),
        ("search_history", "user_id"),
    ];
    // Usage and history rows are written just after the answers.
    for who in [uid, bid] {
        for table in ["llm_usage", "search_history"] {
            let m = mesh;
            assert!(
                eventually(Duration::from_secs(5), || async move {
                    rows_of(m, table, "user_id", who).await > 0
                })
                .await,
                "{table} row of {who} never written"
            );
        }
        for (table, column) in owned {
            assert!(
                rows_of(mesh, table, column, who).await > 0,
                "{table} of {who} before"
            );
        }
    }
    assert!(
        !redis_keys(mesh, &rig.user_id).await.is_empty(),
        "quota keys before"
    );
    assert!(audit_mentions(mesh, "llmuser").await >= 2);
    let before_events = audit_mentions(mesh, &rig.user_id).await;
    assert!(before_events >= 4, "{before_events}");

    c.delete_user(bearer(
        pb::DeleteUserRequest {
            id: rig.user_id.clone(),
        },
        &admin,
    ))
    .await
    .expect("deleted");
    c.purge_user(bearer(
        pb::PurgeUserRequest {
            id: rig.user_id.clone(),
        },
        &admin,
    ))
    .await
    .expect("purged");

    for (table, column) in owned {
        assert_eq!(
            rows_of(mesh, table, column, uid).await,
            0,
            "{table} after purge"
        );
    }
    let mut conn = mesh.store.pg().await.expect("pg");
    let mails: i64 = trellis_store::schema::mail_outbox::table
        .filter(trellis_store::schema::mail_outbox::to_address.ilike("llmuser@example.com"))
        .count()
        .get_result(&mut conn)
        .await
        .expect("mail");
    assert_eq!(mails, 0, "mail to the address");
    // The trail keeps its events, pseudonymised: only the purge itself
    // names the id, and nothing names the person.
    use trellis_store::schema::audit_events as ae;
    let naming: Vec<String> = ae::table
        .filter(ae::actor_id.eq(uid).or(ae::target_id.eq(&rig.user_id)))
        .select(ae::action)
        .load(&mut conn)
        .await
        .expect("events");
    assert_eq!(naming, vec!["user.purged".to_string()]);
    assert_eq!(
        audit_mentions(mesh, "llmuser").await,
        0,
        "login, e-mail, reason erased"
    );
    let erased: Vec<(String, String, Vec<String>, String)> = ae::table
        .filter(ae::details.eq(serde_json::json!({ "subject_erased": true })))
        .select((
            ae::action,
            ae::ip_address,
            ae::changed_fields,
            ae::request_id,
        ))
        .load(&mut conn)
        .await
        .expect("erased events");
    let actions: std::collections::HashSet<&str> = erased.iter().map(|e| e.0.as_str()).collect();
    for kept in [
        "auth.account.registered",
        "auth.login.failed",
        "auth.api_key.created",
        "user.suspended",
        "user.deleted",
    ] {
        assert!(actions.contains(kept), "{kept} kept: {actions:?}");
    }
    assert!(
        erased
            .iter()
            .filter(|e| !e.0.starts_with("user."))
            .all(|e| e.1.is_empty()),
        "the subject's addresses are gone: {erased:?}"
    );
    assert!(erased.iter().any(|e| !e.3.is_empty()), "request ids stay");
    drop(conn);
    assert_eq!(redis_keys(mesh, &rig.user_id).await, Vec::<String>::new());

    // The bystander lost nothing.
    for (table, column) in owned {
        assert!(
            rows_of(mesh, table, column, bid).await > 0,
            "bystander's {table}"
        );
    }
    assert!(!redis_keys(mesh, &bid.to_string()).await.is_empty());
    assert!(audit_mentions(mesh, &bid.to_string()).await >= 3);
    let mut conn = mesh.store.pg().await.expect("pg");
    let addressed: i64 = ae::table
        .filter(ae::actor_id.eq(bid))
        .filter(ae::ip_address.ne(""))
        .count()
        .get_result(&mut conn)
        .await
        .expect("count");
    assert!(
        addressed >= 3,
        "the bystander's events keep their addresses"
    );
    drop(conn);
    rig.mesh.shutdown().await;
}

/// `msg` as `token`'s call with request id `rid`.
fn traced<T>(msg: T, token: &str, rid: &str) -> tonic::Request<T> {
    let mut req = bearer(msg, token);
    req.metadata_mut()
        .insert("x-request-id", rid.parse().expect("ascii"));
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_profile_acts_leave_an_audit_trail() {
    use crate::auth_totp::{detail, event, trail};
    let mesh = TestMesh::start().await;
    let (admin_id, admin) = crate::auth::admin_account(&mesh, "overseer").await;
    let mut c = users(&mesh).await;
    let id = c
        .create_user(traced(
            pb::CreateUserRequest {
                email: "ursula@example.com".into(),
                username: "ursula".into(),
                password: PASSWORD.into(),
                display_name: "Ursula".into(),
                ..Default::default()
            },
            &admin,
            "r-create",
        ))
        .await
        .expect("create")
        .into_inner()
        .user
        .expect("user")
        .id;
    c.update_user(traced(
        pb::UpdateUserRequest {
            user: Some(pb::User {
                id: id.clone(),
                display_name: "Ursula K.".into(),
                email: "ursula.k@example.com".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name", "email"]),
        },
        &admin,
        "r-update",
    ))
    .await
    .expect("update");
    c.suspend_user(traced(
        pb::SuspendUserRequest {
            id: id.clone(),
            reason: "policy review".into(),
        },
        &admin,
        "r-suspend",
    ))
    .await
    .expect("suspend");
    c.reactivate_user(traced(
        pb::ReactivateUserRequest { id: id.clone() },
        &admin,
        "r-reactivate",
    ))
    .await
    .expect("reactivate");
    let own = crate::auth::login(&mut auth(&mesh).await, "ursula", PASSWORD)
        .await
        .expect("login")
        .access_token;
    c.update_me(traced(
        pb::UpdateMeRequest {
            user: Some(pb::User {
                bio: "Writes.".into(),
                ..Default::default()
            }),
            update_mask: mask(&["bio"]),
        },
        &own,
        "r-me",
    ))
    .await
    .expect("update me");
    c.update_preferences(traced(
        pb::UpdatePreferencesRequest {
            preferences: Some(pb::Preferences {
                industry_focus: vec!["publishing".into()],
                ..Default::default()
            }),
            update_mask: mask(&["industry_focus"]),
        },
        &own,
        "r-prefs",
    ))
    .await
    .expect("preferences");
    c.delete_user(traced(
        pb::DeleteUserRequest { id: id.clone() },
        &admin,
        "r-delete",
    ))
    .await
    .expect("delete");
    c.restore_user(traced(
        pb::RestoreUserRequest { id: id.clone() },
        &admin,
        "r-restore",
    ))
    .await
    .expect("restore");

    let trail = trail(&mesh, &admin).await;
    let check = |actor: &str, action: &str, rid: &str, changed: &[&str]| {
        let e = event(&trail, action, rid).clone();
        assert_eq!(
            (
                e.actor_id.as_str(),
                e.target_type.as_str(),
                e.target_id.as_str()
            ),
            (actor, "user", id.as_str()),
            "{e:?}"
        );
        let mut got = e.changed_fields.clone();
        got.sort();
        assert_eq!(got, changed, "{action}");
        assert!(e.occur_time.is_some());
        e
    };
    check(&admin_id, "user.created", "r-create", &[]);
    check(
        &admin_id,
        "user.updated",
        "r-update",
        &["display_name", "email"],
    );
    let e = check(&admin_id, "user.suspended", "r-suspend", &[]);
    assert_eq!(detail(&e, "reason").as_deref(), Some("policy review"));
    check(&admin_id, "user.reactivated", "r-reactivate", &[]);
    check(&id, "user.profile.updated", "r-me", &["bio"]);
    check(
        &id,
        "user.preferences.updated",
        "r-prefs",
        &["industry_focus"],
    );
    check(&admin_id, "user.deleted", "r-delete", &[]);
    check(&admin_id, "user.restored", "r-restore", &[]);

    // After the purge the trail keeps these events under one pseudonym,
    // and the purge itself names the account.
    c.purge_user(traced(
        pb::PurgeUserRequest { id: id.clone() },
        &admin,
        "r-purge",
    ))
    .await
    .expect("purge");
    let after = crate::auth_totp::trail(&mesh, &admin).await;
    let purged = event(&after, "user.purged", "r-purge");
    assert_eq!(
        (purged.actor_id.as_str(), purged.target_id.as_str()),
        (admin_id.as_str(), id.as_str())
    );
    let mut pseudonyms = std::collections::HashSet::new();
    for (action, rid) in [
        ("user.created", "r-create"),
        ("user.updated", "r-update"),
        ("user.suspended", "r-suspend"),
        ("user.profile.updated", "r-me"),
        ("user.restored", "r-restore"),
    ] {
        let e = event(&after, action, rid);
        assert_ne!(e.target_id, id, "{action} still names the account");
        assert!(detail(e, "reason").is_none(), "{e:?}");
        pseudonyms.insert(e.target_id.clone());
    }
    assert_eq!(pseudonyms.len(), 1, "one pseudonym per erasure");
    let me = event(&after, "user.profile.updated", "r-me");
    assert_eq!(me.actor_id, me.target_id, "the same pseudonym as actor");
    assert_eq!(
        me.changed_fields,
        vec!["bio".to_string()],
        "field names stay"
    );
    assert!(me.ip_address.is_empty());
    mesh.shutdown().await;
}

/// The code and field violations of a refused call.
fn refusal<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
) -> (Code, Vec<String>) {
    let e = r.expect_err("refused");
    (e.code(), fields(&e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_rpcs_refuse_bad_ids_outsiders_and_bad_fields() {
    let mesh = TestMesh::start().await;
    let admin = admin_token(&mesh, "chief").await;
    let member_reg = register(&mut auth(&mesh).await, "plain").await;
    let member = access(&member_reg);
    let target = register(&mut auth(&mesh).await, "target").await;
    let id = target.account.expect("account").id;
    let unknown = uuid::Uuid::now_v7().to_string();
    let mut c = users(&mesh).await;
    let nf = (Code::NotFound, vec![]);
    let bad_id = (Code::InvalidArgument, vec!["id".to_string()]);

    // Reactivate, delete and restore: a member sees nothing, a malformed id
    // names the field, an unknown id is NOT_FOUND.
    for (token, who) in [(&member, "member"), (&admin, "admin")] {
        let r = |i: &str| pb::ReactivateUserRequest { id: i.into() };
        let d = |i: &str| pb::DeleteUserRequest { id: i.into() };
        let s = |i: &str| pb::RestoreUserRequest { id: i.into() };
        for i in ["garbage", ""] {
            assert_eq!(
                refusal(c.reactivate_user(bearer(r(i), token)).await),
                bad_id,
                "{who}"
            );
            assert_eq!(
                refusal(c.delete_user(bearer(d(i), token)).await),
                bad_id,
                "{who}"
            );
            assert_eq!(
                refusal(c.restore_user(bearer(s(i), token)).await),
                bad_id,
                "{who}"
            );
        }
        assert_eq!(
            refusal(c.reactivate_user(bearer(r(&unknown), token)).await),
            nf
        );
        assert_eq!(refusal(c.delete_user(bearer(d(&unknown), token)).await), nf);
        assert_eq!(
            refusal(c.restore_user(bearer(s(&unknown), token)).await),
            nf
        );
    }
    let r = pb::ReactivateUserRequest { id: id.clone() };
    assert_eq!(refusal(c.reactivate_user(bearer(r, &member)).await), nf);
    let d = pb::DeleteUserRequest { id: id.clone() };
    assert_eq!(refusal(c.delete_user(bearer(d.clone(), &member)).await), nf);
    // Restoring a live account: nothing to restore.
    let s = pb::RestoreUserRequest { id: id.clone() };
    assert_eq!(refusal(c.restore_user(bearer(s.clone(), &admin)).await), nf);
    c.delete_user(bearer(d, &admin)).await.expect("deleted");
    assert_eq!(
        refusal(c.restore_user(bearer(s.clone(), &member)).await),
        nf
    );
    let r = pb::ReactivateUserRequest { id: id.clone() };
    assert_eq!(
        refusal(c.reactivate_user(bearer(r, &admin)).await),
        nf,
        "a deleted account is not reactivated"
    );
    c.restore_user(bearer(s, &admin)).await.expect("restored");
    let anonymous = c
        .delete_user(pb::DeleteUserRequest { id: id.clone() })
        .await
        .expect_err("anonymous");
    assert_eq!(anonymous.code(), Code::Unauthenticated);

    // Suspension reasons are bounded.
    let long = pb::SuspendUserRequest {
        id: id.clone(),
        reason: "x".repeat(501),
    };
    assert_eq!(
        refusal(c.suspend_user(bearer(long, &admin)).await),
        (Code::InvalidArgument, vec!["reason".to_string()])
    );
    let max = pb::SuspendUserRequest {
        id: id.clone(),
        reason: "x".repeat(500),
    };
    c.suspend_user(bearer(max, &admin))
        .await
        .expect("500 characters are fine");

    // UpdateUser validates every field it is asked to change, and leaves
    // the account as it was.
    let bad = pb::UpdateUserRequest {
        user: Some(pb::User {
            id: id.clone(),
            email: "not-an-address".into(),
            username: "x".into(),
            phone: "12345".into(),
            bio: "b".repeat(501),
            first_name: "f".repeat(101),
            ..Default::default()
        }),
        update_mask: mask(&[
            "email",
            "username",
            "phone",
            "bio",
            "first_name",
            "password",
        ]),
    };
    let (code, got) = refusal(c.update_user(bearer(bad, &admin)).await);
    assert_eq!(code, Code::InvalidArgument);
    for f in [
        "user.email",
        "user.username",
        "user.phone",
        "user.bio",
        "user.first_name",
        "update_mask",
    ] {
        assert!(got.contains(&f.to_string()), "{f} missing from {got:?}");
    }
    let no_id = pb::UpdateUserRequest {
        user: Some(pb::User {
            bio: "b".into(),
            ..Default::default()
        }),
        update_mask: mask(&["bio"]),
    };
    assert_eq!(
        refusal(c.update_user(bearer(no_id, &admin)).await),
        (Code::InvalidArgument, vec!["user.id".to_string()])
    );
    let ghost = pb::UpdateUserRequest {
        user: Some(pb::User {
            id: unknown.clone(),
            bio: "b".into(),
            ..Default::default()
        }),
        update_mask: mask(&["bio"]),
    };
    assert_eq!(refusal(c.update_user(bearer(ghost, &admin)).await), nf);
    let same = c
        .get_user(bearer(pb::GetUserRequest { id: id.clone() }, &admin))
        .await
        .expect("get")
        .into_inner()
        .user
        .expect("user");
    assert_eq!(
        (same.email.as_str(), same.bio.as_str()),
        ("target@example.com", "")
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferences_need_credentials_and_keep_search_filters() {
    let mesh = TestMesh::start().await;
    let token = access(&register(&mut auth(&mesh).await, "filterer").await);
    let mut c = users(&mesh).await;
    for status in [
        c.get_preferences(pb::GetPreferencesRequest {})
            .await
            .map(|_| ())
            .expect_err("anonymous"),
        c.update_preferences(pb::UpdatePreferencesRequest::default())
            .await
            .map(|_| ())
            .expect_err("anonymous"),
    ] {
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    use prost_types::value::Kind;
    let v = |k: Kind| prost_types::Value { kind: Some(k) };
    let filters = prost_types::Struct {
        fields: [
            (
                "tags".to_string(),
                v(Kind::ListValue(prost_types::ListValue {
                    values: vec![
                        v(Kind::StringValue("rust".into())),
                        v(Kind::StringValue("remote".into())),
                    ],
                })),
            ),
            ("min_years".to_string(), v(Kind::NumberValue(5.0))),
            ("include_web".to_string(), v(Kind::BoolValue(true))),
            (
                "location".to_string(),
                v(Kind::StructValue(prost_types::Struct {
                    fields: [("city".to_string(), v(Kind::StringValue("Berlin".into())))].into(),
                })),
            ),
        ]
        .into(),
    };
    let saved = c
        .update_preferences(bearer(
            pb::UpdatePreferencesRequest {
                preferences: Some(pb::Preferences {
                    default_search_filters: Some(filters.clone()),
                    ..Default::default()
                }),
                update_mask: mask(&["default_search_filters"]),
            },
            &token,
        ))
        .await
        .expect("saved")
        .into_inner()
        .preferences
        .expect("prefs");
    assert_eq!(saved.default_search_filters, Some(filters.clone()));
    let read = c
        .get_preferences(bearer(pb::GetPreferencesRequest {}, &token))
        .await
        .expect("read")
        .into_inner()
        .preferences
        .expect("prefs");
    assert_eq!(read.default_search_filters, Some(filters));
    // Clearing it with a mask and no value.
    let cleared = c
        .update_preferences(bearer(
            pb::UpdatePreferencesRequest {
                preferences: Some(pb::Preferences::default()),
                update_mask: mask(&["default_search_filters"]),
            },
            &token,
        ))
        .await
        .expect("cleared")
        .into_inner()
        .preferences
        .expect("prefs");
    assert_eq!(
        cleared.default_search_filters.map(|s| s.fields.len()),
        Some(0)
    );
    // Oversized filters are refused, naming the field.
    let huge = prost_types::Struct {
        fields: [("blob".to_string(), v(Kind::StringValue("x".repeat(20_000))))].into(),
    };
    let err = c
        .update_preferences(bearer(
            pb::UpdatePreferencesRequest {
                preferences: Some(pb::Preferences {
                    default_search_filters: Some(huge),
                    ..Default::default()
                }),
                update_mask: mask(&["default_search_filters"]),
            },
            &token,
        ))
        .await
        .expect_err("too big");
    assert_eq!(
        fields(&err),
        vec!["preferences.default_search_filters".to_string()]
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deactivation_makes_an_account_inactive_until_reactivated() {
    let mesh = TestMesh::start().await;
    let admin = admin_token(&mesh, "keeper").await;
    let mut a = auth(&mesh).await;
    let leaver = register(&mut a, "leaver").await;
    let id = leaver.account.as_ref().expect("account").id.clone();
    let token = access(&leaver);
    let member = access(&register(&mut a, "bystander").await);
    let mut c = users(&mesh).await;
    let dc = c.clone();
    let deactivate = |id: &str, token: &str| {
        let mut c = dc.clone();
        let req = bearer(pb::DeactivateUserRequest { id: id.into() }, token);
        async move { c.deactivate_user(req).await }
    };

    // Members cannot, not even see that the account exists; ids are checked.
    assert_eq!(
        deactivate(&id, &member).await.expect_err("refused").code(),
        Code::NotFound
    );
    let bad = deactivate("nope", &admin).await.expect_err("refused");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(fields(&bad), ["id"]);
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_eq!(
        deactivate(&unknown, &admin)
            .await
            .expect_err("refused")
            .code(),
        Code::NotFound
    );
    let admin_id = c
        .get_me(bearer(pb::GetMeRequest {}, &admin))
        .await
        .expect("me")
        .into_inner()
        .user
        .expect("user")
        .id;
    assert_eq!(
        deactivate(&admin_id, &admin)
            .await
            .expect_err("refused")
            .code(),
        Code::FailedPrecondition
    );

    let user = deactivate(&id, &admin)
        .await
        .expect("deactivated")
        .into_inner()
        .user
        .expect("user");
    assert_eq!(user.status, pb::UserStatus::Inactive as i32);
    // Its sessions ended at once and it cannot sign in.
    let ended = c
        .get_me(bearer(pb::GetMeRequest {}, &token))
        .await
        .expect_err("ended");
    assert_eq!(ended.code(), Code::Unauthenticated);
    let login =
        |a: &mut trellis_proto::auth::v1::auth_service_client::AuthServiceClient<Channel>| {
            let mut a = a.clone();
            async move {
                a.login(apb::LoginRequest {
                    login: "leaver".into(),
                    password: PASSWORD.into(),
                    ..Default::default()
                })
                .await
            }
        };
    assert_eq!(
        login(&mut a).await.expect_err("refused").code(),
        Code::PermissionDenied
    );
    // The status filter finds it.
    let inactive = c
        .list_users(bearer(
            pb::ListUsersRequest {
                status: pb::UserStatus::Inactive as i32,
                ..Default::default()
            },
            &admin,
        ))
        .await
        .expect("list")
        .into_inner()
        .users;
    assert_eq!(
        inactive.iter().map(|u| u.id.as_str()).collect::<Vec<_>>(),
        [id.as_str()]
    );
    // Reactivation restores sign-in.
    c.reactivate_user(bearer(pb::ReactivateUserRequest { id: id.clone() }, &admin))
        .await
        .expect("reactivated");
    login(&mut a).await.expect("signs in again");
    // Both acts are in the audit trail.
    let events = c
        .list_audit_events(bearer(
            pb::ListAuditEventsRequest {
                target_id: id.clone(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .expect("audit")
        .into_inner()
        .events;
    let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    assert!(actions.contains(&"user.deactivated"), "{actions:?}");
    assert!(actions.contains(&"user.reactivated"), "{actions:?}");
    mesh.shutdown().await;
}

/// GetMe and GetUser read on the store's multiplexed connections: when
/// PostgreSQL ends them, the call that finds one dead drops it and reads
/// again on a fresh one — the caller sees no error — and later calls dial
/// afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_recover_when_their_shared_connections_are_cut() {
    let mesh = TestMesh::start_with(Default::default(), |c| {
        c.database.multiplexed_connections = 2;
    })
    .await;
    let token = access(&register(&mut auth(&mesh).await, "multiplexed").await);
    let mut c = users(&mesh).await;
    let me = |mut c: UserServiceClient<Channel>| {
        let t = token.clone();
        async move { c.get_me(bearer(pb::GetMeRequest {}, &t)).await }
    };
    for _ in 0..4 {
        let user = me(c.clone()).await.expect("me").into_inner().user;
        assert_eq!(user.expect("user").username, "multiplexed");
    }
    assert_eq!(mesh.store.pg_shared_open(), 2, "both dialled, in turn");
    let metrics = mesh.metrics().await;
    assert!(
        metrics.contains(r#"trellis_pool_connections{pool="database_multiplexed",state="open"} 2"#),
        "{metrics}"
    );

    let mut conn = mesh.store.pg().await.expect("pooled connection");
    let cut: Vec<bool> = diesel::select(diesel::dsl::sql::<diesel::sql_types::Bool>(
        "pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    ))
    .load(&mut conn)
    .await
    .expect("terminate the other backends");
    assert!(
        cut.len() >= 2,
        "the shared connections were among them: {cut:?}"
    );
    drop(conn);

    for _ in 0..6 {
        let user = me(c.clone())
            .await
            .expect("me after the cut")
            .into_inner()
            .user;
        assert_eq!(user.expect("user").username, "multiplexed");
    }
    // Every later lookup succeeds, by id (GetUser) as well.
    let id = me(c.clone())
        .await
        .expect("me")
        .into_inner()
        .user
        .expect("user")
        .id;
    for _ in 0..4 {
        let got = c
            .get_user(bearer(pb::GetUserRequest { id: id.clone() }, &token))
            .await
            .expect("get user");
        assert_eq!(got.into_inner().user.expect("user").id, id);
    }
    assert_eq!(mesh.store.pg_shared_open(), 2);
}
