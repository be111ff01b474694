//! ListUsers: search, filters, sort orders and keyset pagination.
//!
//! The search is a case-insensitive substring match on the generated,
//! lower-cased `users.search_text` column, which carries a trigram GIN index
//! (`users_search_trgm`), so `LIKE '%…%'` is index-backed. Every sort order
//! is `(column, id)` with a matching keyset index; a page continues strictly
//! after the last row's `(value, id)` — never with OFFSET — so rows inserted
//! or removed while a client pages cause neither duplicates nor gaps among
//! the rows that were there all along. Page tokens are sealed with
//! [`trellis_core::page::PageTokens`] and bound to a canonical fingerprint of
//! every filter and the order, so a token altered or reused with another
//! query is INVALID_ARGUMENT on `page_token`.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use diesel::dsl::{exists, sql};
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::sql_types::{Bool, Citext, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};
use trellis_core::error::FieldViolations;
use trellis_core::page::page_size;
use trellis_mesh::authenticated;
use trellis_proto::user::v1 as pb;
use trellis_store::schema::{user_roles, users};
use uuid::Uuid;

use crate::convert::{UserRow, status_db, user_pb};
use crate::error::UserError;
use crate::service::UserSvc;

/// Longest search text accepted, in characters.
const MAX_QUERY: usize = 200;

/// A sort column of ListUsers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SortKey {
    CreateTime,
    Email,
    Username,
    LastName,
}

impl SortKey {
    fn parse(s: &str) -> Option<SortKey> {
        match s {
            "create_time" => Some(SortKey::CreateTime),
            "email" => Some(SortKey::Email),
            "username" => Some(SortKey::Username),
            "last_name" => Some(SortKey::LastName),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            SortKey::CreateTime => "create_time",
            SortKey::Email => "email",
            SortKey::Username => "username",
            SortKey::LastName => "last_name",
        }
    }

    /// The column, as written in the keyset comparison (a fixed string,
    /// never user input).
    fn column(self) -> &'static str {
        match self {
            SortKey::CreateTime => "users.created_at",
            SortKey::Email => "users.email",
            SortKey::Username => "users.username",
            SortKey::LastName => "users.last_name",
        }
    }

    /// The row's value of this column, as kept in a cursor.
    fn key_of(self, r: &UserRow) -> Key {
        match self {
            SortKey::CreateTime => Key::Micros(r.created_at.timestamp_micros()),
            SortKey::Email => Key::Text(r.email.clone()),
            SortKey::Username => Key::Text(r.username.clone()),
            SortKey::LastName => Key::Text(r.last_name.clone()),
        }
    }
}

/// A sort order: the column and its direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Order {
    key: SortKey,
    desc: bool,
}

impl Order {
    /// Newest first.
    const DEFAULT: Order = Order {
        key: SortKey::CreateTime,
        desc: true,
    };

    /// `order_by` as AIP-132 writes it: a field, optionally followed by
    /// ` desc` or ` asc` (ascending when omitted); empty is `create_time desc`.
    fn parse(raw: &str) -> Option<Order> {
        let mut words = raw.split_whitespace();
        let Some(field) = words.next() else {
            return Some(Order::DEFAULT);
        };
        let key = SortKey::parse(field)?;
        let desc = match words.next() {
            None => false,
            Some(d) if d.eq_ignore_ascii_case("asc") => false,
            Some(d) if d.eq_ignore_ascii_case("desc") => true,
            Some(_) => return None,
        };
        if words.next().is_some() {
            return None;
        }
        Some(Order { key, desc })
    }
}

/// The sort value of the last row of a page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Key {
    /// `created_at` in microseconds since the epoch (PostgreSQL's precision).
    Micros(i64),
    Text(String),
}

/// Where the next page starts: strictly after `(k, id)` in the list's order.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Cursor {
    k: Key,
    id: Uuid,
}

/// A validated ListUsers query (everything but the page position and size).
#[derive(Debug)]
struct Filters {
    /// The search text with LIKE's metacharacters escaped; `None`: no search.
    pattern: Option<String>,
    /// The trimmed search text as the client sent it (for the fingerprint).
    query: String,
    status: Option<&'static str>,
    role: Option<String>,
    order: Order,
    show_deleted: bool,
}

impl Filters {
    /// The canonical form of the query a page token is bound to: every
    /// filter and the order, in a fixed layout (JSON of a tuple, so that no
    /// two different queries render alike).
    fn fingerprint(&self) -> String {
        let rendered = serde_json::to_string(&(
            "ListUsers/v1",
            &self.query,
            self.status.unwrap_or(""),
            self.role.as_deref().unwrap_or(""),
            self.order.key.name(),
            if self.order.desc { "desc" } else { "asc" },
            self.show_deleted,
        ));
        rendered.unwrap_or_default()
    }

    /// `users` narrowed by every filter (no order, no page position).
    fn filtered(&self) -> users::BoxedQuery<'_, Pg> {
        let mut q = users::table.into_boxed();
        if !self.show_deleted {
            q = q.filter(users::deleted_at.is_null());
        }
        if let Some(status) = self.status {
            q = q.filter(users::status.eq(status));
        }
        if let Some(role) = &self.role {
            q = q.filter(exists(
                user_roles::table
                    .filter(user_roles::user_id.eq(users::id))
                    .filter(user_roles::role.eq(role)),
            ));
        }
        if let Some(pattern) = &self.pattern {
            // `search_text` is already lower-cased by PostgreSQL; lowering
            // the needle there too keeps both sides under the same rules.
            q = q.filter(
                sql::<Bool>("users.search_text LIKE '%' || lower(")
                    .bind::<Text, _>(pattern.clone())
                    .sql(") || '%'"),
            );
        }
        q
    }
}

/// `s` with LIKE's metacharacters (`\`, `%`, `_`) escaped by a backslash,
/// PostgreSQL's default LIKE escape character.
fn escape_like(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Whether `name` is a well-formed role name: 2–50 of `[a-z0-9_-]`.
pub(crate) fn is_role_name(name: &str) -> bool {
    (2..=50).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// The request's filters and order; what is invalid is recorded in `v`
/// (and replaced by a harmless default, never used since `v` refuses the
/// request).
fn validate(r: &pb::ListUsersRequest, v: &mut FieldViolations) -> Filters {
    let query = r.query.trim();
    if query.chars().count() > MAX_QUERY {
        v.add("query", format!("must be at most {MAX_QUERY} characters"));
    } else if query.chars().any(char::is_control) {
        v.add("query", "must not contain control characters");
    }
    let status = match pb::UserStatus::try_from(r.status) {
        Ok(s) => status_db(s),
        Err(_) => {
            v.add("status", "is not a known user status");
            None
        }
    };
    let role = r.role.trim();
    if !role.is_empty() && !is_role_name(role) {
        v.add(
            "role",
            "must be a role name: 2 to 50 of a-z, 0-9, '_' and '-'",
        );
    }
    let order = Order::parse(&r.order_by).unwrap_or_else(|| {
        v.add(
            "order_by",
            "must be one of create_time, email, username, last_name, optionally followed by ' asc' or ' desc'",
        );
        Order::DEFAULT
    });
    Filters {
        pattern: (!query.is_empty()).then(|| escape_like(query)),
        query: query.to_string(),
        status,
        role: (!role.is_empty()).then(|| role.to_string()),
        order,
        show_deleted: r.show_deleted,
    }
}

/// The roles of each of `ids`, in one query, names sorted.
async fn roles_by_user(
    conn: &mut AsyncPgConnection,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Vec<String>>, UserError> {
    let mut out: HashMap<Uuid, Vec<String>> = HashMap::new();
    if ids.is_empty() {
        return Ok(out);
    }
    let rows: Vec<(Uuid, String)> = user_roles::table
        .filter(user_roles::user_id.eq_any(ids))
        .order((user_roles::user_id.asc(), user_roles::role.asc()))
        .select((user_roles::user_id, user_roles::role))
        .load(conn)
        .await?;
    for (id, role) in rows {
        out.entry(id).or_default().push(role);
    }
    Ok(out)
}

fn bad_token() -> UserError {
    let mut v = FieldViolations::new();
    v.add(
        "page_token",
        "is not a page token of this list (altered, or made for other filters or ordering)",
    );
    UserError::Invalid(v)
}

impl UserSvc {
    pub(crate) async fn rpc_list_users(
        &self,
        req: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let p = authenticated(&req)?;
        p.require("user:users:read")?;
        let r = req.into_inner();
        let mut v = FieldViolations::new();
        let size = page_size(&mut v, r.page_size);
        let filters = validate(&r, &mut v);
        v.check()?;
        let fingerprint = filters.fingerprint();
        let cursor: Option<Cursor> = self.pages.open(&r.page_token, &fingerprint)?;

        let order = filters.order;
        let mut page = filters.filtered();
        if let Some(c) = &cursor {
            let op = if order.desc { "<" } else { ">" };
            let head = format!("({}, users.id) {op} (", order.key.column());
            page = match (order.key, &c.k) {
                (SortKey::CreateTime, Key::Micros(us)) => {
                    let at: DateTime<Utc> =
                        DateTime::from_timestamp_micros(*us).ok_or_else(bad_token)?;
                    page.filter(
                        sql::<Bool>(&head)
                            .bind::<Timestamptz, _>(at)
                            .sql(", ")
                            .bind::<diesel::sql_types::Uuid, _>(c.id)
                            .sql(")"),
                    )
                }
                (SortKey::Email | SortKey::Username, Key::Text(s)) => page.filter(
                    sql::<Bool>(&head)
                        .bind::<Citext, _>(s.clone())
                        .sql(", ")
                        .bind::<diesel::sql_types::Uuid, _>(c.id)
                        .sql(")"),
                ),
                (SortKey::LastName, Key::Text(s)) => page.filter(
                    sql::<Bool>(&head)
                        .bind::<Text, _>(s.clone())
                        .sql(", ")
                        .bind::<diesel::sql_types::Uuid, _>(c.id)
                        .sql(")"),
                ),
                _ => return Err(bad_token().into()),
            };
        }
        page = match (order.key, order.desc) {
            (SortKey::CreateTime, false) => page.order((users::created_at.asc(), users::id.asc())),
            (SortKey::CreateTime, true) => page.order((users::created_at.desc(), users::id.desc())),
            (SortKey::Email, false) => page.order((users::email.asc(), users::id.asc())),
            (SortKey::Email, true) => page.order((users::email.desc(), users::id.desc())),
            (SortKey::Username, false) => page.order((users::username.asc(), users::id.asc())),
            (SortKey::Username, true) => page.order((users::username.desc(), users::id.desc())),
            (SortKey::LastName, false) => page.order((users::last_name.asc(), users::id.asc())),
            (SortKey::LastName, true) => page.order((users::last_name.desc(), users::id.desc())),
        };

        let mut conn = self.store.pg().await.map_err(UserError::from)?;
        let mut rows: Vec<UserRow> = page
            .limit(size as i64 + 1)
            .select(UserRow::as_select())
            .load(&mut conn)
            .await
            .map_err(UserError::from)?;
        let more = rows.len() > size;
        rows.truncate(size);
        let total: i64 = filters
            .filtered()
            .count()
            .get_result(&mut conn)
            .await
            .map_err(UserError::from)?;

        let next_page_token = match rows.last() {
            Some(last) if more => self.pages.seal(
                &fingerprint,
                &Cursor {
                    k: order.key.key_of(last),
                    id: last.id,
                },
            ),
            _ => String::new(),
        };
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let mut roles = roles_by_user(&mut conn, &ids).await?;
        let users = rows
            .into_iter()
            .map(|r| {
                let of = roles.remove(&r.id).unwrap_or_default();
                user_pb(r, of)
            })
            .collect();
        Ok(Response::new(pb::ListUsersResponse {
            users,
            next_page_token,
            total_size: i32::try_from(total).unwrap_or(i32::MAX),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders() {
        let o = |s: &str| Order::parse(s).map(|o| (o.key, o.desc));
        assert_eq!(o(""), Some((SortKey::CreateTime, true)));
        assert_eq!(o("  "), Some((SortKey::CreateTime, true)));
        assert_eq!(o("email"), Some((SortKey::Email, false)));
        assert_eq!(o("username desc"), Some((SortKey::Username, true)));
        assert_eq!(o("last_name  ASC"), Some((SortKey::LastName, false)));
        assert_eq!(o("create_time desc"), Some((SortKey::CreateTime, true)));
        for bad in [
            "name",
            "email up",
            "email desc desc",
            "id",
            "email,username",
            "EMAIL",
        ] {
            assert_eq!(o(bad), None, "{bad}");
        }
    }

    #[test]
    fn like_escaping() {
        assert_eq!(escape_like("a%b_c\\d"), "a\\%b\\_c\\\\d");
        assert_eq!(escape_like("plain"), "plain");
    }

    #[test]
    fn fingerprints_differ_per_filter() {
        let base = pb::ListUsersRequest::default();
        let fp = |r: pb::ListUsersRequest| {
            let mut v = FieldViolations::new();
            let f = validate(&r, &mut v);
            assert!(v.is_empty());
            f.fingerprint()
        };
        let a = fp(base.clone());
        let variants = [
            pb::ListUsersRequest {
                query: "x".into(),
                ..base.clone()
            },
            pb::ListUsersRequest {
                status: 1,
                ..base.clone()
            },
            pb::ListUsersRequest {
                role: "admin".into(),
                ..base.clone()
            },
            pb::ListUsersRequest {
                order_by: "email".into(),
                ..base.clone()
            },
            pb::ListUsersRequest {
                order_by: "create_time".into(),
                ..base.clone()
            },
            pb::ListUsersRequest {
                show_deleted: true,
                ..base.clone()
            },
        ];
        for r in variants {
            assert_ne!(fp(r), a);
        }
        let same = pb::ListUsersRequest {
            order_by: "create_time desc".into(),
            page_size: 7,
            ..base
        };
        assert_eq!(
            fp(same),
            a,
            "page size and spelling of the default order do not matter"
        );
    }

    #[test]
    fn role_names() {
        assert!(is_role_name("admin") && is_role_name("a1") && is_role_name("support-tier_2"));
        assert!(
            !is_role_name("a")
                && !is_role_name("Admin")
                && !is_role_name("x y")
                && !is_role_name(&"a".repeat(51))
        );
    }
}
