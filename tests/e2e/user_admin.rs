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
