//! UserService.ListUsers end to end: every sort order in both directions,
//! every filter (search, status, role, soft-deleted), total sizes, keyset
//! pagination over thousands of rows while rows are being inserted, sealed
//! page tokens, validation and authorization — and a query plan check that
//! the search is served by the trigram index.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use chrono::{Duration as ChronoDuration, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use tonic::transport::Channel;
use tonic::{Code, Status};
use trellis_proto::user::v1 as pb;
use trellis_proto::user::v1::user_service_client::UserServiceClient;
use trellis_store::schema::{user_roles, users};
use trellis_tests::TestMesh;
use uuid::Uuid;

use crate::auth::{access, auth, bearer, register, violations};

pub use crate::user_admin::users as users_client;

/// An administrator's id and access token.
pub async fn admin(mesh: &TestMesh, name: &str) -> (String, String) {
    crate::auth::admin_account(mesh, name).await
}

/// The field names of an INVALID_ARGUMENT's violations.
pub fn invalid_fields(s: &Status) -> Vec<String> {
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    violations(s)
}

async fn list(
    c: &mut UserServiceClient<Channel>,
    token: &str,
    req: pb::ListUsersRequest,
) -> Result<pb::ListUsersResponse, Status> {
    c.list_users(bearer(req, token))
        .await
        .map(|r| r.into_inner())
}

/// Every page of `req`, in order.
async fn all_pages(
    c: &mut UserServiceClient<Channel>,
    token: &str,
    mut req: pb::ListUsersRequest,
) -> Vec<pb::User> {
    let mut out = Vec::new();
    for _ in 0..1000 {
        let page = list(c, token, req.clone()).await.expect("page");
        assert!(
            page.users.len() <= req.page_size.max(1) as usize || req.page_size == 0,
            "page larger than asked"
        );
        out.extend(page.users);
        if page.next_page_token.is_empty() {
            return out;
        }
        req.page_token = page.next_page_token;
    }
    panic!("pagination does not end");
}

fn usernames(us: &[pb::User]) -> Vec<String> {
    let mut v: Vec<String> = us.iter().map(|u| u.username.clone()).collect();
    v.sort();
    v
}

fn query(q: &str) -> pb::ListUsersRequest {
    pb::ListUsersRequest {
        query: q.into(),
        ..Default::default()
    }
}

/// Six accounts with chosen names, created 1 to 6 hours ago; all but
/// `frank` hold `member`. Sort values are chosen to order the same under
/// any collation (distinct first letters).
async fn seed(mesh: &TestMesh) -> Vec<Uuid> {
    let people = [
        (
            "alice",
            "alice.wonder@example.com",
            "Alice",
            "Zimmer",
            "Alice Z",
        ),
        ("bobby", "bob@example.org", "Robert", "Young", "Bob"),
        ("carol", "carol@example.net", "Carol", "Xu", "Carol X"),
        ("dave", "DAVE@example.com", "David", "Walker", "Dave"),
        ("erin", "under_score@example.com", "Erin", "Vance", "Erin"),
        ("frank", "frank@example.com", "Frank", "Umber", "100% Frank"),
    ];
    let now = Utc::now();
    let ids: Vec<Uuid> = people.iter().map(|_| Uuid::now_v7()).collect();
    let rows: Vec<_> = people
        .iter()
        .zip(&ids)
        .enumerate()
        .map(|(i, ((username, email, first, last, display), id))| {
            (
                users::id.eq(*id),
                users::email.eq(*email),
                users::username.eq(*username),
                users::password_hash.eq("not-a-hash"),
                users::first_name.eq(*first),
                users::last_name.eq(*last),
                users::display_name.eq(*display),
                users::created_at.eq(now - ChronoDuration::hours(i as i64 + 1)),
            )
        })
        .collect();
    let mut conn = mesh.store.pg().await.expect("pg");
    diesel::insert_into(users::table)
        .values(rows)
        .execute(&mut conn)
        .await
        .expect("seed users");
    let grants: Vec<_> = ids[..5]
        .iter()
        .map(|id| (user_roles::user_id.eq(*id), user_roles::role.eq("member")))
        .collect();
    diesel::insert_into(user_roles::table)
        .values(grants)
        .execute(&mut conn)
        .await
        .expect("seed roles");
    ids
}

/// The sort key of `u` under `field`, lower-cased as citext compares.
fn sort_value(u: &pb::User, field: &str) -> (String, i64, i32) {
    match field {
        "create_time" => {
            let t = u.create_time.expect("create_time");
            (String::new(), t.seconds, t.nanos)
        }
        "email" => (u.email.to_lowercase(), 0, 0),
        "username" => (u.username.to_lowercase(), 0, 0),
        "last_name" => (u.last_name.clone(), 0, 0),
        other => panic!("no field {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_users_sorts_every_way() {
    let mesh = TestMesh::start().await;
    let (_, token) = admin(&mesh, "root").await;
    register(&mut auth(&mesh).await, "mia").await;
    seed(&mesh).await;
    let mut c = users_client(&mesh).await;

    let default = all_pages(
        &mut c,
        &token,
        pb::ListUsersRequest {
            page_size: 3,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(default.len(), 8);
    let explicit = all_pages(
        &mut c,
        &token,
        pb::ListUsersRequest {
            page_size: 3,
            order_by: "create_time desc".into(),
            ..Default::default()
        },
    )
    .await;
    let ids = |us: &[pb::User]| us.iter().map(|u| u.id.clone()).collect::<Vec<_>>();
    assert_eq!(
        ids(&default),
        ids(&explicit),
        "the default is create_time desc"
    );
    // Registered just now, then the seeded accounts from 1 to 6 hours ago.
    assert_eq!(
        default
            .iter()
            .skip(2)
            .map(|u| u.username.as_str())
            .collect::<Vec<_>>(),
        vec!["alice", "bobby", "carol", "dave", "erin", "frank"]
    );

    for field in ["create_time", "email", "username", "last_name"] {
        let mut asc_ids = None;
        for dir in ["", " asc", " desc", " DESC"] {
            let got = all_pages(
                &mut c,
                &token,
                pb::ListUsersRequest {
                    page_size: 3,
                    order_by: format!("{field}{dir}"),
                    ..Default::default()
                },
            )
            .await;
            assert_eq!(got.len(), 8, "{field}{dir}");
            let desc = dir.to_lowercase().contains("desc");
            for w in got.windows(2) {
                let (a, b) = (
                    (sort_value(&w[0], field), &w[0].id),
                    (sort_value(&w[1], field), &w[1].id),
                );
                let a = (a.0, Uuid::parse_str(a.1).expect("uuid"));
                let b = (b.0, Uuid::parse_str(b.1).expect("uuid"));
                if desc {
                    assert!(a > b, "{field}{dir}: {a:?} before {b:?}");
                } else {
                    assert!(a < b, "{field}{dir}: {a:?} before {b:?}");
                }
            }
            let mut these = ids(&got);
            if desc {
                these.reverse();
            }
            match &asc_ids {
                None => asc_ids = Some(these),
                Some(first) => assert_eq!(first, &these, "{field}{dir} is the mirror image"),
            }
        }
    }
    let last_names = all_pages(
        &mut c,
        &token,
        pb::ListUsersRequest {
            order_by: "last_name desc".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        last_names
            .iter()
            .take(6)
            .map(|u| u.last_name.as_str())
            .collect::<Vec<_>>(),
        vec!["Zimmer", "Young", "Xu", "Walker", "Vance", "Umber"]
    );

    for bad in [
        "password",
        "email sideways",
        "create_time desc asc",
        "id",
        "-email",
        "Email",
    ] {
        let err = list(
            &mut c,
            &token,
            pb::ListUsersRequest {
                order_by: bad.into(),
                ..Default::default()
            },
        )
        .await
        .expect_err(bad);
        assert_eq!(invalid_fields(&err), vec!["order_by"], "{bad}");
    }
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_users_filters_and_counts() {
    let mesh = TestMesh::start().await;
    let (root_id, token) = admin(&mesh, "root").await;
    let member = access(&register(&mut auth(&mesh).await, "mia").await);
    let ids = seed(&mesh).await;
    let mut c = users_client(&mesh).await;

    let everyone = list(
        &mut c,
        &token,
        pb::ListUsersRequest {
            page_size: 2,
            ..Default::default()
        },
    )
    .await
    .expect("list");
    assert_eq!(everyone.total_size, 8, "total counts every page");
    assert_eq!(everyone.users.len(), 2);
    assert!(!everyone.next_page_token.is_empty());

    // Roles come with each user, loaded for the whole page.
    let all = all_pages(&mut c, &token, pb::ListUsersRequest::default()).await;
    let by_name = |n: &str| all.iter().find(|u| u.username == n).expect(n).clone();
    assert_eq!(by_name("root").roles, vec!["admin", "member"]);
    assert_eq!(by_name("alice").roles, vec!["member"]);
    assert!(by_name("frank").roles.is_empty());
    assert_eq!(by_name("alice").last_name, "Zimmer");

    // Search: case-insensitive substrings of names, e-mail and username.
    for (q, want) in [
        ("zimm", vec!["alice"]),
        ("WONDER", vec!["alice"]),
        ("robert", vec!["bobby"]),
        ("BOBBY", vec!["bobby"]),
        ("dave@EXAMPLE", vec!["dave"]),
        ("carol x", vec!["carol"]),
        ("  ErIn  ", vec!["erin"]),
        // LIKE's metacharacters are matched literally.
        ("%", vec!["frank"]),
        ("0% f", vec!["frank"]),
        ("_", vec!["erin"]),
        ("\\", vec![]),
        ("nobody-has-this", vec![]),
    ] {
        let got = list(&mut c, &token, query(q)).await.expect(q);
        assert_eq!(usernames(&got.users), want, "query {q:?}");
        assert_eq!(got.total_size as usize, want.len(), "query {q:?}");
    }
    let example = list(&mut c, &token, query("Example"))
        .await
        .expect("example");
    assert_eq!(example.total_size, 8);
    let too_long = list(&mut c, &token, query(&"x".repeat(201)))
        .await
        .expect_err("long");
    assert_eq!(invalid_fields(&too_long), vec!["query"]);
    list(&mut c, &token, query(&"é".repeat(200)))
        .await
        .expect("200 characters are fine");

    // Role.
    let admins = list(
        &mut c,
        &token,
        pb::ListUsersRequest {
            role: "admin".into(),
            ..Default::default()
        },
    )
    .await
    .expect("admins");
    assert_eq!(
        admins
            .users
            .iter()
            .map(|u| u.id.clone())
            .collect::<Vec<_>>(),
        vec![root_id.clone()]
    );
    assert_eq!(admins.total_size, 1);
    let members = list(
        &mut c,
        &token,
        pb::ListUsersRequest {
            role: "member".into(),
            ..Default::default()
        },
    )
    .await
    .expect("members");
    assert_eq!(members.total_size, 7, "everyone but frank");
    assert!(!usernames(&members.users).contains(&"frank".to_string()));
    let nobody = list(
        &mut c,
        &token,
        pb::ListUsersRequest {
            role: "no-such-role".into(),
            ..Default::default()
        },
    )
    .await
    .expect("unknown role");
    assert_eq!(nobody.total_size, 0);
    let bad_role = list(
        &mut c,
        &token,
        pb::ListUsersRequest {
            role: "Bad Role".into(),
            ..Default::default()
        },
    )
    .await
    .expect_err("bad role");
    assert_eq!(invalid_fields(&bad_role), vec!["role"]);
    let combined = list(
        &mut c,
        &token,
        pb::ListUsersRequest {
            role: "member".into(),
            query: "example.com".into(),
            ..Default::default()
        },
    )
    .await
    .expect("combined");
    assert_eq!(
        usernames(&combined.users),
        vec!["alice", "dave", "erin", "mia", "root"]
    );

    // Status: suspend carol.
    c.suspend_user(bearer(
        pb::SuspendUserRequest {
            id: ids[2].to_string(),
            reason: "testing".into(),
        },
        &token,
    ))
    .await
    .expect("suspend");
    let status = |s: pb::UserStatus| pb::ListUsersRequest {
        status: s as i32,
        ..Default::default()
    };
    let suspended = list(&mut c, &token, status(pb::UserStatus::Suspended))
        .await
        .expect("suspended");
    assert_eq!(usernames(&suspended.users), vec!["carol"]);
    assert_eq!(suspended.users[0].status, pb::UserStatus::Suspended as i32);
    let active = list(&mut c, &token, status(pb::UserStatus::Active))
        .await
        .expect("active");
    assert_eq!(active.total_size, 7);
    assert!(!usernames(&active.users).contains(&"carol".to_string()));
    let inactive = list(&mut c, &token, status(pb::UserStatus::Inactive))
        .await
        .expect("inactive");
    assert_eq!(inactive.total_size, 0);
    let bogus = list(
        &mut c,
        &token,
        pb::ListUsersRequest {
            status: 42,
            ..Default::default()
        },
    )
    .await
    .expect_err("unknown status");
    assert_eq!(invalid_fields(&bogus), vec!["status"]);

    // Soft-deleted accounts only with show_deleted.
    c.delete_user(bearer(
        pb::DeleteUserRequest {
            id: ids[3].to_string(),
        },
        &token,
    ))
    .await
    .expect("delete dave");
    let live = list(&mut c, &token, pb::ListUsersRequest::default())
        .await
        .expect("live");
    assert_eq!(live.total_size, 7);
    assert!(!usernames(&live.users).contains(&"dave".to_string()));
    let with_deleted = list(
        &mut c,
        &token,
        pb::ListUsersRequest {
            show_deleted: true,
            ..Default::default()
        },
    )
    .await
    .expect("with deleted");
    assert_eq!(with_deleted.total_size, 8);
    let dave = with_deleted
        .users
        .iter()
        .find(|u| u.username == "dave")
        .expect("dave listed");
    assert!(dave.delete_time.is_some());
    let dave_search = list(
        &mut c,
        &token,
        pb::ListUsersRequest {
            query: "walker".into(),
            show_deleted: true,
            ..Default::default()
        },
    )
    .await
    .expect("search deleted");
    assert_eq!(usernames(&dave_search.users), vec!["dave"]);
    assert_eq!(
        list(&mut c, &token, query("walker"))
            .await
            .expect("search")
            .total_size,
        0
    );

    // Page sizes: clamped above 100, refused below 0.
    let negative = list(
        &mut c,
        &token,
        pb::ListUsersRequest {
            page_size: -1,
            ..Default::default()
        },
    )
    .await
    .expect_err("negative");
    assert_eq!(invalid_fields(&negative), vec!["page_size"]);
    let big = list(
        &mut c,
        &token,
        pb::ListUsersRequest {
            page_size: 100_000,
            ..Default::default()
        },
    )
    .await
    .expect("clamped");
    assert_eq!(big.users.len(), 7);

    // Members may not list.
    let denied = list(&mut c, &member, pb::ListUsersRequest::default())
        .await
        .expect_err("member");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let anonymous = c
        .list_users(pb::ListUsersRequest::default())
        .await
        .expect_err("anonymous");
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_users_page_tokens_are_sealed_to_their_query() {
    let mesh = TestMesh::start().await;
    let (_, token) = admin(&mesh, "root").await;
    seed(&mesh).await;
    let mut c = users_client(&mesh).await;
    let base = pb::ListUsersRequest {
        page_size: 2,
        query: "example".into(),
        ..Default::default()
    };
    let first = list(&mut c, &token, base.clone())
        .await
        .expect("first page");
    let t = first.next_page_token.clone();
    assert!(!t.is_empty());
    // The same query continues; a different page size is the same query.
    let second = list(
        &mut c,
        &token,
        pb::ListUsersRequest {
            page_token: t.clone(),
            page_size: 3,
            ..base.clone()
        },
    )
    .await
    .expect("second page");
    assert_eq!(second.users.len(), 3);
    assert!(
        second
            .users
            .iter()
            .all(|u| !first.users.iter().any(|f| f.id == u.id))
    );

    let others = [
        pb::ListUsersRequest {
            order_by: "email".into(),
            ..base.clone()
        },
        pb::ListUsersRequest {
            order_by: "create_time asc".into(),
            ..base.clone()
        },
        pb::ListUsersRequest {
            query: "exampl".into(),
            ..base.clone()
        },
        pb::ListUsersRequest {
            status: pb::UserStatus::Active as i32,
            ..base.clone()
        },
        pb::ListUsersRequest {
            role: "member".into(),
            ..base.clone()
        },
        pb::ListUsersRequest {
            show_deleted: true,
            ..base.clone()
        },
    ];
    for other in others {
        let err = list(
            &mut c,
            &token,
            pb::ListUsersRequest {
                page_token: t.clone(),
                ..other.clone()
            },
        )
        .await
        .expect_err("token of another query");
        assert_eq!(invalid_fields(&err), vec!["page_token"], "{other:?}");
    }
    let mut tampered: Vec<char> = t.chars().collect();
    let mid = tampered.len() / 2;
    tampered[mid] = if tampered[mid] == 'A' { 'B' } else { 'A' };
    for bad in [
        tampered.into_iter().collect::<String>(),
        "garbage!".into(),
        format!("{t}x"),
        "A".repeat(5000),
    ] {
        let err = list(
            &mut c,
            &token,
            pb::ListUsersRequest {
                page_token: bad,
                ..base.clone()
            },
        )
        .await
        .expect_err("tampered");
        assert_eq!(invalid_fields(&err), vec!["page_token"]);
    }
    mesh.shutdown().await;
}

/// Inserts `n` accounts in one statement: `bulk<g>` with last names cycling
/// through 37 values and seven accounts sharing each creation time (so
/// every order has ties that only the id breaks).
async fn bulk_insert(mesh: &TestMesh, n: i32) {
    let mut conn = mesh.store.pg().await.expect("pg");
    diesel::sql_query(
        "INSERT INTO users (id, email, username, password_hash, display_name, first_name, last_name, created_at) \
         SELECT gen_random_uuid(), 'bulk' || g || '@load.test', 'bulk' || g, 'not-a-hash', 'Bulk User ' || g, \
                'Bulk', 'Last' || (g % 37), now() - make_interval(secs => g / 7) \
         FROM generate_series(1, $1) AS g",
    )
    .bind::<diesel::sql_types::Integer, _>(n)
    .execute(&mut conn)
    .await
    .expect("bulk insert");
}

/// The ids of live accounts in the order given, as the database sorts them.
async fn db_order(mesh: &TestMesh, order_by: &str) -> Vec<Uuid> {
    let mut conn = mesh.store.pg().await.expect("pg");
    let q = users::table
        .filter(users::deleted_at.is_null())
        .select(users::id)
        .into_boxed();
    let q = match order_by {
        "create_time desc" => q.order((users::created_at.desc(), users::id.desc())),
        "last_name" => q.order((users::last_name.asc(), users::id.asc())),
        "email desc" => q.order((users::email.desc(), users::id.desc())),
        "username asc" => q.order((users::username.asc(), users::id.asc())),
        other => panic!("no order {other}"),
    };
    q.load(&mut conn).await.expect("db order")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_users_keyset_pages_stay_exact_under_concurrent_inserts() {
    let mesh = TestMesh::start().await;
    let (_, token) = admin(&mesh, "root").await;
    bulk_insert(&mesh, 2000).await;
    let orders = [
        "create_time desc",
        "last_name",
        "email desc",
        "username asc",
    ];
    let mut before = Vec::new();
    for o in orders {
        before.push(db_order(&mesh, o).await);
    }
    assert_eq!(before[0].len(), 2001);

    // Keep inserting accounts (sorting anywhere among the others) for as
    // long as the client pages.
    let stop = Arc::new(AtomicBool::new(false));
    let inserted = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, inserted) = (stop.clone(), inserted.clone());
        let store = mesh.store.clone();
        tokio::spawn(async move {
            let mut conn = store.pg().await.expect("pg");
            let mut batch = 0;
            while !AtomicBool::load(&stop, Ordering::Relaxed) {
                batch += 1;
                diesel::sql_query(
                    "INSERT INTO users (id, email, username, password_hash, last_name) \
                     SELECT gen_random_uuid(), 'late' || $1 || '-' || g || '@load.test', 'late' || $1 || 'x' || g, \
                            'not-a-hash', 'Last' || ((g * 13 + $1) % 37) \
                     FROM generate_series(1, 5) AS g",
                )
                .bind::<diesel::sql_types::Integer, _>(batch)
                .execute(&mut conn)
                .await
                .expect("concurrent insert");
                inserted.fetch_add(5, Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
    };

    let mut c = users_client(&mesh).await;
    for (order, expected) in orders.iter().zip(&before) {
        let mut seen: Vec<Uuid> = Vec::new();
        let mut req = pb::ListUsersRequest {
            page_size: 100,
            order_by: order.to_string(),
            ..Default::default()
        };
        let mut pages = 0;
        loop {
            let page = list(&mut c, &token, req.clone()).await.expect("page");
            pages += 1;
            assert!(page.total_size >= 2001);
            seen.extend(
                page.users
                    .iter()
                    .map(|u| Uuid::parse_str(&u.id).expect("uuid")),
            );
            if page.next_page_token.is_empty() {
                break;
            }
            req.page_token = page.next_page_token;
        }
        assert!(pages >= 21, "{order}: {pages} pages");
        let unique: HashSet<Uuid> = seen.iter().copied().collect();
        assert_eq!(unique.len(), seen.len(), "{order}: duplicates");
        let old: HashSet<Uuid> = expected.iter().copied().collect();
        let old_seen: Vec<Uuid> = seen.into_iter().filter(|id| old.contains(id)).collect();
        assert_eq!(
            &old_seen, expected,
            "{order}: every old row exactly once, in order"
        );
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");
    assert!(
        AtomicUsize::load(&inserted, Ordering::Relaxed) > 0,
        "inserts ran while paging"
    );
    mesh.shutdown().await;
}

#[derive(QueryableByName)]
struct PlanLine {
    #[diesel(sql_type = diesel::sql_types::Text)]
    #[diesel(column_name = "QUERY PLAN")]
    line: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_users_search_uses_the_trigram_index() {
    let mesh = TestMesh::start().await;
    let (_, token) = admin(&mesh, "root").await;
    bulk_insert(&mesh, 3000).await;
    let mut conn = mesh.store.pg().await.expect("pg");
    // VACUUM as well as ANALYZE: right after a bulk insert the new index
    // entries still sit in the GIN pending list (fastupdate), which every
    // index scan must read in full, so the planner rightly prefers a
    // sequential scan until (auto)vacuum merges them. No planner settings
    // are changed: once merged, the trigram index wins on cost alone
    // (about 56 against 118 for a sequential scan of these 3,001 rows).
    diesel::sql_query("VACUUM ANALYZE users")
        .execute(&mut conn)
        .await
        .expect("analyze");
    // The statement ListUsers runs for `query: "BULK1234"` (live accounts,
    // default order, a page of 20 plus one), the search text bound as the
    // service binds it.
    let plan: Vec<PlanLine> = diesel::sql_query(
        "EXPLAIN SELECT users.* FROM users \
         WHERE users.deleted_at IS NULL AND users.search_text LIKE '%' || lower($1) || '%' \
         ORDER BY users.created_at DESC, users.id DESC LIMIT 21",
    )
    .bind::<diesel::sql_types::Text, _>("BULK1234")
    .load(&mut conn)
    .await
    .expect("explain");
    let plan = plan
        .into_iter()
        .map(|l| l.line)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        plan.contains("Bitmap Index Scan on users_search_trgm"),
        "plan does not use the trigram index:\n{plan}"
    );
    drop(conn);
    // And the service answers the same search.
    let mut c = users_client(&mesh).await;
    let got = list(&mut c, &token, query("BULK1234"))
        .await
        .expect("search");
    assert_eq!(usernames(&got.users), vec!["bulk1234"]);
    assert_eq!(got.total_size, 1);
    mesh.shutdown().await;
}
