//! UserService roles and audit trail end to end: ListRoles, CreateRole,
//! UpdateRole and DeleteRole with their validation and built-in protection,
//! AssignRole / RevokeRole reaching tokens at the next refresh,
//! CheckPermission with wildcards and its visibility rule, and
//! ListAuditEvents with its filters, pagination and the auth service's
//! events in the same trail.

use std::collections::HashSet;

use tonic::transport::Channel;
use tonic::{Code, Status};
use trellis_proto::user::v1 as pb;
use trellis_proto::user::v1::user_service_client::UserServiceClient;
use trellis_tests::TestMesh;

use crate::auth::{access, auth, bearer, refresh, register};
use crate::user_list::{admin, invalid_fields, users_client};
use crate::util::mask;

fn role(name: &str, description: &str, permissions: &[&str]) -> pb::Role {
    pb::Role {
        name: name.into(),
        description: description.into(),
        permissions: permissions.iter().map(|p| p.to_string()).collect(),
        ..Default::default()
    }
}

async fn create(
    c: &mut UserServiceClient<Channel>,
    token: &str,
    r: pb::Role,
) -> Result<pb::Role, Status> {
    c.create_role(bearer(pb::CreateRoleRequest { role: Some(r) }, token))
        .await
        .map(|r| r.into_inner().role.expect("role"))
}

async fn all_roles(
    c: &mut UserServiceClient<Channel>,
    token: &str,
    page_size: i32,
) -> Vec<pb::Role> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = c
            .list_roles(bearer(
                pb::ListRolesRequest {
                    page_size,
                    page_token,
                },
                token,
            ))
            .await
            .expect("list roles")
            .into_inner();
        assert!(page.roles.len() <= page_size as usize);
        out.extend(page.roles);
        if page.next_page_token.is_empty() {
            return out;
        }
        page_token = page.next_page_token;
    }
}

async fn assign(
    c: &mut UserServiceClient<Channel>,
    token: &str,
    user_id: &str,
    role: &str,
) -> Result<Vec<String>, Status> {
    c.assign_role(bearer(
        pb::AssignRoleRequest {
            user_id: user_id.into(),
            role: role.into(),
        },
        token,
    ))
    .await
    .map(|r| r.into_inner().roles)
}

async fn revoke(
    c: &mut UserServiceClient<Channel>,
    token: &str,
    user_id: &str,
    role: &str,
) -> Result<Vec<String>, Status> {
    c.revoke_role(bearer(
        pb::RevokeRoleRequest {
            user_id: user_id.into(),
            role: role.into(),
        },
        token,
    ))
    .await
    .map(|r| r.into_inner().roles)
}

async fn check(
    c: &mut UserServiceClient<Channel>,
    token: &str,
    user_id: &str,
    permission: &str,
) -> Result<pb::CheckPermissionResponse, Status> {
    c.check_permission(bearer(
        pb::CheckPermissionRequest {
            user_id: user_id.into(),
            permission: permission.into(),
        },
        token,
    ))
    .await
    .map(|r| r.into_inner())
}

async fn events(
    c: &mut UserServiceClient<Channel>,
    token: &str,
    req: pb::ListAuditEventsRequest,
) -> Result<pb::ListAuditEventsResponse, Status> {
    c.list_audit_events(bearer(req, token))
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_listed_created_updated_and_deleted() {
    let mesh = TestMesh::start().await;
    let (_, token) = admin(&mesh, "root").await;
    let mia = register(&mut auth(&mesh).await, "mia").await;
    let mia_id = mia.account.clone().expect("account").id;
    let member = access(&mia);
    let mut c = users_client(&mesh).await;

    // The built-ins, with their holders counted.
    let roles = all_roles(&mut c, &token, 20).await;
    let names: Vec<&str> = roles.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, vec!["admin", "member"]);
    assert!(roles.iter().all(|r| r.builtin));
    assert_eq!((roles[0].user_count, roles[1].user_count), (1, 2));
    assert_eq!(roles[0].permissions, vec!["*"]);

    // Create, with validation.
    let made = create(
        &mut c,
        &token,
        role(
            "support",
            "Answers tickets",
            &["user:users:read", "chat:*", "chat:*"],
        ),
    )
    .await
    .expect("create");
    assert_eq!(made.name, "support");
    assert_eq!(
        made.permissions,
        vec!["user:users:read", "chat:*"],
        "duplicates dropped"
    );
    assert!(!made.builtin && made.user_count == 0 && made.create_time.is_some());
    let dup = create(&mut c, &token, role("support", "", &[]))
        .await
        .expect_err("duplicate");
    assert_eq!(dup.code(), Code::AlreadyExists);
    let builtin_dup = create(&mut c, &token, role("admin", "", &[]))
        .await
        .expect_err("duplicate built-in");
    assert_eq!(builtin_dup.code(), Code::AlreadyExists);
    let bad = create(
        &mut c,
        &token,
        role(
            "Bad Name",
            &"d".repeat(201),
            &["ok:fine", "Not:Valid", "a:b:c:d", ""],
        ),
    )
    .await
    .expect_err("invalid");
    assert_eq!(
        invalid_fields(&bad),
        vec![
            "role.name",
            "role.description",
            "role.permissions[1]",
            "role.permissions[2]",
            "role.permissions[3]"
        ]
    );
    for name in ["x", &"y".repeat(51), "", "dots.not.allowed"] {
        let err = create(&mut c, &token, role(name, "", &[]))
            .await
            .expect_err(name);
        assert_eq!(invalid_fields(&err), vec!["role.name"], "{name:?}");
    }
    let no_role = c
        .create_role(bearer(pb::CreateRoleRequest { role: None }, &token))
        .await
        .expect_err("no role");
    assert_eq!(invalid_fields(&no_role), vec!["role.name"]);
    create(&mut c, &token, role("a-1_", &"d".repeat(200), &[]))
        .await
        .expect("limits are inclusive");

    // Paging by name, one at a time.
    let paged = all_roles(&mut c, &token, 1).await;
    assert_eq!(
        paged.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        vec!["a-1_", "admin", "member", "support"]
    );
    let tampered = c
        .list_roles(bearer(
            pb::ListRolesRequest {
                page_size: 1,
                page_token: "bm90IGEgdG9rZW4".into(),
            },
            &token,
        ))
        .await
        .expect_err("bad token");
    assert_eq!(invalid_fields(&tampered), vec!["page_token"]);

    // Update by mask.
    let updated = c
        .update_role(bearer(
            pb::UpdateRoleRequest {
                role: Some(role(
                    "support",
                    "Answers tickets, reads users",
                    &["user:*:read"],
                )),
                update_mask: mask(&["permissions"]),
            },
            &token,
        ))
        .await
        .expect("update permissions")
        .into_inner()
        .role
        .expect("role");
    assert_eq!(updated.permissions, vec!["user:*:read"]);
    assert_eq!(updated.description, "Answers tickets", "not in the mask");
    let updated = c
        .update_role(bearer(
            pb::UpdateRoleRequest {
                role: Some(role("support", "Second line", &[])),
                update_mask: None,
            },
            &token,
        ))
        .await
        .expect("implied mask")
        .into_inner()
        .role
        .expect("role");
    assert_eq!(
        (updated.description.as_str(), updated.permissions.clone()),
        ("Second line", vec!["user:*:read".to_string()])
    );
    let builtin = c
        .update_role(bearer(
            pb::UpdateRoleRequest {
                role: Some(role("member", "", &["*"])),
                update_mask: mask(&["permissions"]),
            },
            &token,
        ))
        .await
        .expect_err("built-in permissions");
    assert_eq!(builtin.code(), Code::FailedPrecondition);
    let described = c
        .update_role(bearer(
            pb::UpdateRoleRequest {
                role: Some(role("member", "Everyone who signed up", &[])),
                update_mask: mask(&["description"]),
            },
            &token,
        ))
        .await
        .expect("built-in description")
        .into_inner()
        .role
        .expect("role");
    assert_eq!(described.description, "Everyone who signed up");
    assert!(described.permissions.contains(&"chat:*".to_string()));
    assert_eq!(described.user_count, 2);
    let unknown = c
        .update_role(bearer(
            pb::UpdateRoleRequest {
                role: Some(role("ghost", "boo", &[])),
                update_mask: mask(&["description"]),
            },
            &token,
        ))
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), Code::NotFound);
    for (paths, perms) in [
        (vec!["name"], vec![]),
        (vec!["builtin"], vec![]),
        (vec![], vec![]),
    ] {
        let err = c
            .update_role(bearer(
                pb::UpdateRoleRequest {
                    role: Some(role("support", "", &perms)),
                    update_mask: mask(&paths),
                },
                &token,
            ))
            .await
            .expect_err("bad mask");
        assert_eq!(invalid_fields(&err), vec!["update_mask"], "{paths:?}");
    }
    let bad_perm = c
        .update_role(bearer(
            pb::UpdateRoleRequest {
                role: Some(role("support", "", &["user::read"])),
                update_mask: mask(&["permissions"]),
            },
            &token,
        ))
        .await
        .expect_err("bad permission");
    assert_eq!(invalid_fields(&bad_perm), vec!["role.permissions[0]"]);

    // Delete: built-ins never, assigned roles only by force.
    let del = |name: &str, force: bool| pb::DeleteRoleRequest {
        name: name.into(),
        force,
    };
    for name in ["admin", "member"] {
        let err = c
            .delete_role(bearer(del(name, true), &token))
            .await
            .expect_err("built-in");
        assert_eq!(err.code(), Code::FailedPrecondition, "{name}");
    }
    assert_eq!(
        c.delete_role(bearer(del("ghost", false), &token))
            .await
            .expect_err("unknown")
            .code(),
        Code::NotFound
    );
    assert_eq!(
        invalid_fields(
            &c.delete_role(bearer(del("", false), &token))
                .await
                .expect_err("empty")
        ),
        vec!["name"]
    );
    assign(&mut c, &token, &mia_id, "support")
        .await
        .expect("assign");
    let held = c
        .delete_role(bearer(del("support", false), &token))
        .await
        .expect_err("assigned");
    assert_eq!(held.code(), Code::FailedPrecondition);
    assert_eq!(
        all_roles(&mut c, &token, 10)
            .await
            .iter()
            .find(|r| r.name == "support")
            .expect("kept")
            .user_count,
        1
    );
    c.delete_role(bearer(del("support", true), &token))
        .await
        .expect("forced");
    c.delete_role(bearer(del("a-1_", false), &token))
        .await
        .expect("unassigned");
    let left: Vec<String> = all_roles(&mut c, &token, 10)
        .await
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(left, vec!["admin", "member"]);
    let mia_roles = c
        .get_user(bearer(pb::GetUserRequest { id: mia_id.clone() }, &token))
        .await
        .expect("mia")
        .into_inner()
        .user
        .expect("user")
        .roles;
    assert_eq!(
        mia_roles,
        vec!["member"],
        "the forced delete took the assignment"
    );

    // Members may do none of it.
    let denied = [
        c.list_roles(bearer(pb::ListRolesRequest::default(), &member))
            .await
            .map(|_| ()),
        c.create_role(bearer(
            pb::CreateRoleRequest {
                role: Some(role("mine", "", &[])),
            },
            &member,
        ))
        .await
        .map(|_| ()),
        c.update_role(bearer(
            pb::UpdateRoleRequest {
                role: Some(role("member", "mine", &[])),
                update_mask: mask(&["description"]),
            },
            &member,
        ))
        .await
        .map(|_| ()),
        c.delete_role(bearer(del("member", true), &member))
            .await
            .map(|_| ()),
        assign(&mut c, &member, &mia_id, "admin").await.map(|_| ()),
        revoke(&mut c, &member, &mia_id, "member").await.map(|_| ()),
    ];
    for (i, r) in denied.into_iter().enumerate() {
        assert_eq!(
            r.expect_err("member refused").code(),
            Code::PermissionDenied,
            "call {i}"
        );
    }
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assigned_roles_reach_the_next_refresh() {
    let mesh = TestMesh::start().await;
    let (_, token) = admin(&mesh, "root").await;
    let mut a = auth(&mesh).await;
    let bob = register(&mut a, "bob").await;
    let bob_id = bob.account.clone().expect("account").id;
    let old = bob.tokens.clone().expect("tokens");
    let mut c = users_client(&mesh).await;
    let list = pb::ListUsersRequest::default();

    assert_eq!(
        c.list_users(bearer(list.clone(), &old.access_token))
            .await
            .expect_err("member")
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        assign(&mut c, &token, &bob_id, "admin")
            .await
            .expect("assign"),
        vec!["admin", "member"]
    );
    assert_eq!(
        assign(&mut c, &token, &bob_id, "admin")
            .await
            .expect("assigning twice is fine"),
        vec!["admin", "member"]
    );
    // The database knows at once; the token bob holds does not.
    assert!(
        check(&mut c, &old.access_token, "", "user:users:read")
            .await
            .expect("check")
            .allowed
    );
    assert_eq!(
        c.list_users(bearer(list.clone(), &old.access_token))
            .await
            .expect_err("old token")
            .code(),
        Code::PermissionDenied
    );
    let second = refresh(&mut a, &old.refresh_token).await.expect("refresh");
    let listed = c
        .list_users(bearer(list.clone(), &second.access_token))
        .await
        .expect("refreshed token");
    assert_eq!(listed.into_inner().total_size, 2);

    assert_eq!(
        revoke(&mut c, &token, &bob_id, "admin")
            .await
            .expect("revoke"),
        vec!["member"]
    );
    assert_eq!(
        revoke(&mut c, &token, &bob_id, "admin")
            .await
            .expect("revoking twice is fine"),
        vec!["member"]
    );
    c.list_users(bearer(list.clone(), &second.access_token))
        .await
        .expect("the current token keeps its permissions until refreshed");
    let third = refresh(&mut a, &second.refresh_token)
        .await
        .expect("refresh");
    assert_eq!(
        c.list_users(bearer(list.clone(), &third.access_token))
            .await
            .expect_err("revoked")
            .code(),
        Code::PermissionDenied
    );

    // Unknown users and roles, and malformed requests.
    let nobody = uuid::Uuid::now_v7().to_string();
    assert_eq!(
        assign(&mut c, &token, &nobody, "admin")
            .await
            .expect_err("no user")
            .code(),
        Code::NotFound
    );
    assert_eq!(
        assign(&mut c, &token, &bob_id, "ghost")
            .await
            .expect_err("no role")
            .code(),
        Code::NotFound
    );
    assert_eq!(
        revoke(&mut c, &token, &nobody, "member")
            .await
            .expect_err("no user")
            .code(),
        Code::NotFound
    );
    assert_eq!(
        revoke(&mut c, &token, &bob_id, "ghost")
            .await
            .expect_err("no role")
            .code(),
        Code::NotFound
    );
    let bad = assign(&mut c, &token, "not-a-uuid", "Not A Role")
        .await
        .expect_err("malformed");
    assert_eq!(invalid_fields(&bad), vec!["role", "user_id"]);
    let bad = revoke(&mut c, &token, "", "member")
        .await
        .expect_err("malformed");
    assert_eq!(invalid_fields(&bad), vec!["user_id"]);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_permission_honours_wildcards_and_visibility() {
    let mesh = TestMesh::start().await;
    let (root_id, token) = admin(&mesh, "root").await;
    let mia = register(&mut auth(&mesh).await, "mia").await;
    let mia_id = mia.account.clone().expect("account").id;
    let member = access(&mia);
    let mut c = users_client(&mesh).await;

    // Members check themselves, by empty id or their own.
    let chat = check(&mut c, &member, "", "chat:sessions:read")
        .await
        .expect("self");
    assert!(chat.allowed);
    assert_eq!(chat.granted_by, vec!["member"], "chat:* covers it");
    let own = check(&mut c, &member, &mia_id, "llm:generate:stream")
        .await
        .expect("own id");
    assert_eq!(
        (own.allowed, own.granted_by),
        (true, vec!["member".to_string()])
    );
    let no = check(&mut c, &member, "", "user:users:read")
        .await
        .expect("self");
    assert!(!no.allowed && no.granted_by.is_empty());
    let no = check(&mut c, &member, "", "llm:usage:write")
        .await
        .expect("exact only");
    assert!(!no.allowed);

    // A role with a middle wildcard, assigned: the answer comes from the
    // database, not from the (older) token.
    create(&mut c, &token, role("reader", "", &["user:*:read"]))
        .await
        .expect("create");
    assign(&mut c, &token, &mia_id, "reader")
        .await
        .expect("assign");
    let read = check(&mut c, &member, "", "user:profiles:read")
        .await
        .expect("reader");
    assert_eq!(
        (read.allowed, read.granted_by),
        (true, vec!["reader".to_string()])
    );
    assert!(
        !check(&mut c, &member, "", "user:profiles:write")
            .await
            .expect("write")
            .allowed
    );
    let both = check(&mut c, &member, "", "user:self:read")
        .await
        .expect("both");
    assert_eq!(both.granted_by, vec!["member", "reader"]);

    // Admins hold everything through `*`, and may ask about others.
    let any = check(&mut c, &token, "", "anything:at:all")
        .await
        .expect("admin");
    assert_eq!(
        (any.allowed, any.granted_by),
        (true, vec!["admin".to_string()])
    );
    let of_mia = check(&mut c, &token, &mia_id, "user:audit:write")
        .await
        .expect("about mia");
    assert!(!of_mia.allowed);
    let of_mia = check(&mut c, &token, &mia_id, "user:roles:read")
        .await
        .expect("about mia");
    assert_eq!(of_mia.granted_by, vec!["reader"]);
    let ghost = check(
        &mut c,
        &token,
        &uuid::Uuid::now_v7().to_string(),
        "chat:x:y",
    )
    .await
    .expect_err("no user");
    assert_eq!(ghost.code(), Code::NotFound);

    // Members may not ask about others: not found, like a missing user.
    let other = check(&mut c, &member, &root_id, "chat:x:y")
        .await
        .expect_err("other");
    assert_eq!(other.code(), Code::NotFound);

    for bad in ["", "Chat:x", "a:b:c:d", "chat::read", "chat:read "] {
        let err = check(&mut c, &member, "", bad).await;
        match bad {
            // Surrounding whitespace is trimmed.
            "chat:read " => assert!(err.is_ok()),
            _ => assert_eq!(
                invalid_fields(&err.expect_err(bad)),
                vec!["permission"],
                "{bad:?}"
            ),
        }
    }
    let bad_id = check(&mut c, &member, "42", "chat:x")
        .await
        .expect_err("bad id");
    assert_eq!(invalid_fields(&bad_id), vec!["user_id"]);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_trail_filters_and_pages() {
    let mesh = TestMesh::start().await;
    let (root_id, token) = admin(&mesh, "root").await;
    let mia = register(&mut auth(&mesh).await, "mia").await;
    let mia_id = mia.account.clone().expect("account").id;
    let member = access(&mia);
    let mut c = users_client(&mesh).await;

    // Some acts of the user service to go with auth's.
    for i in 0..5 {
        create(&mut c, &token, role(&format!("team-{i}"), "", &["chat:*"]))
            .await
            .expect("create");
    }
    c.update_role(bearer(
        pb::UpdateRoleRequest {
            role: Some(role("team-0", "Team zero", &["search:*"])),
            update_mask: mask(&["description", "permissions"]),
        },
        &token,
    ))
    .await
    .expect("update");
    assign(&mut c, &token, &mia_id, "team-1")
        .await
        .expect("assign");
    assign(&mut c, &token, &mia_id, "team-1")
        .await
        .expect("again");
    revoke(&mut c, &token, &mia_id, "team-1")
        .await
        .expect("revoke");
    c.delete_role(bearer(
        pb::DeleteRoleRequest {
            name: "team-2".into(),
            force: false,
        },
        &token,
    ))
    .await
    .expect("delete");

    let req = pb::ListAuditEventsRequest::default;
    let all = events(
        &mut c,
        &token,
        pb::ListAuditEventsRequest {
            page_size: 100,
            ..req()
        },
    )
    .await
    .expect("all")
    .events;
    let actions: Vec<&str> = all.iter().map(|e| e.action.as_str()).collect();
    for a in [
        "auth.account.registered",
        "auth.login.succeeded",
        "role.created",
        "role.updated",
        "role.assigned",
        "role.revoked",
        "role.deleted",
    ] {
        assert!(actions.contains(&a), "{a} missing from {actions:?}");
    }
    // Newest first.
    for w in all.windows(2) {
        let (a, b) = (
            w[0].occur_time.expect("time"),
            w[1].occur_time.expect("time"),
        );
        assert!((a.seconds, a.nanos, &w[0].id) > (b.seconds, b.nanos, &w[1].id));
    }
    assert_eq!(
        actions.iter().filter(|a| **a == "role.assigned").count(),
        1,
        "assigning twice is one change"
    );

    // Pages of three give the same sequence.
    let mut paged = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = events(
            &mut c,
            &token,
            pb::ListAuditEventsRequest {
                page_size: 3,
                page_token,
                ..req()
            },
        )
        .await
        .expect("page");
        assert!(page.events.len() <= 3);
        paged.extend(page.events.into_iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(paged, all.iter().map(|e| e.id.clone()).collect::<Vec<_>>());
    assert_eq!(paged.iter().collect::<HashSet<_>>().len(), paged.len());

    // Filters.
    let created = events(
        &mut c,
        &token,
        pb::ListAuditEventsRequest {
            action: "role.created".into(),
            ..req()
        },
    )
    .await
    .expect("by action")
    .events;
    assert_eq!(created.len(), 5);
    assert_eq!(created[0].target_id, "team-4", "newest first");
    assert!(
        created
            .iter()
            .all(|e| e.actor_id == root_id && e.target_type == "role")
    );
    let details = created[0].details.as_ref().expect("details");
    assert!(details.fields.contains_key("permissions"), "{details:?}");

    let updated = events(
        &mut c,
        &token,
        pb::ListAuditEventsRequest {
            action: "role.updated".into(),
            ..req()
        },
    )
    .await
    .expect("updated")
    .events;
    assert_eq!(updated.len(), 1);
    assert_eq!(
        updated[0].changed_fields,
        vec!["description", "permissions"]
    );

    let about_mia = events(
        &mut c,
        &token,
        pb::ListAuditEventsRequest {
            target_type: "user".into(),
            target_id: mia_id.clone(),
            ..req()
        },
    )
    .await
    .expect("by target")
    .events;
    let about: Vec<&str> = about_mia.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        about,
        vec!["role.revoked", "role.assigned", "auth.account.registered"]
    );

    let by_mia = events(
        &mut c,
        &token,
        pb::ListAuditEventsRequest {
            actor_id: mia_id.clone(),
            ..req()
        },
    )
    .await
    .expect("by actor")
    .events;
    assert!(!by_mia.is_empty() && by_mia.iter().all(|e| e.actor_id == mia_id));
    let logins = events(
        &mut c,
        &token,
        pb::ListAuditEventsRequest {
            actor_id: root_id.clone(),
            action: "auth.login.succeeded".into(),
            target_type: "session".into(),
            ..req()
        },
    )
    .await
    .expect("auth's events")
    .events;
    assert_eq!(logins.len(), 1, "root logged in once (after registering)");

    // Time bounds: start inclusive, end exclusive.
    let pivot = about_mia[1].clone();
    let t = pivot.occur_time;
    let from = events(
        &mut c,
        &token,
        pb::ListAuditEventsRequest {
            start_time: t,
            target_id: mia_id.clone(),
            ..req()
        },
    )
    .await
    .expect("from")
    .events;
    assert_eq!(
        from.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        vec!["role.revoked", "role.assigned"]
    );
    let until = events(
        &mut c,
        &token,
        pb::ListAuditEventsRequest {
            end_time: t,
            target_id: mia_id.clone(),
            ..req()
        },
    )
    .await
    .expect("until")
    .events;
    assert_eq!(
        until.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        vec!["auth.account.registered"]
    );

    // A token belongs to its filters.
    let first = events(
        &mut c,
        &token,
        pb::ListAuditEventsRequest {
            page_size: 2,
            action: "role.created".into(),
            ..req()
        },
    )
    .await
    .expect("first");
    let err = events(
        &mut c,
        &token,
        pb::ListAuditEventsRequest {
            page_size: 2,
            action: "role.deleted".into(),
            page_token: first.next_page_token.clone(),
            ..req()
        },
    )
    .await
    .expect_err("other filter");
    assert_eq!(invalid_fields(&err), vec!["page_token"]);

    // Validation.
    let ts = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
    let bad = events(
        &mut c,
        &token,
        pb::ListAuditEventsRequest {
            actor_id: "someone".into(),
            start_time: ts(2_000_000_000),
            end_time: ts(1_000_000_000),
            ..req()
        },
    )
    .await
    .expect_err("invalid");
    assert_eq!(invalid_fields(&bad), vec!["actor_id", "end_time"]);
    let bad = events(
        &mut c,
        &token,
        pb::ListAuditEventsRequest {
            start_time: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: -5,
            }),
            action: "x".repeat(201),
            ..req()
        },
    )
    .await
    .expect_err("invalid");
    assert_eq!(invalid_fields(&bad), vec!["action", "start_time"]);

    let denied = events(&mut c, &member, req()).await.expect_err("member");
    assert_eq!(denied.code(), Code::PermissionDenied);
    mesh.shutdown().await;
}
