//! Roles: listing, creating, changing and deleting them, assigning and
//! revoking them, and answering permission checks.
//!
//! Reading roles needs `user:roles:read`, changing them or their holders
//! `user:roles:write`. Built-in roles (admin, member) keep their
//! permissions and cannot be deleted. A role change reaches a holder's
//! access token at its next refresh (tokens carry the permissions they were
//! signed with); CheckPermission answers from the database, so it tells the
//! current state. Every change is recorded in the audit trail.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use tonic::{Request, Response, Status};
use trellis_auth::audit::{Origin, record};
use trellis_core::error::FieldViolations;
use trellis_core::page::page_size;
use trellis_core::rbac;
use trellis_mesh::{Principal, authenticated};
use trellis_proto::user::v1 as pb;
use trellis_store::audit::AuditEvent;
use trellis_store::schema::{roles, user_roles};
use uuid::Uuid;

use crate::convert::ts;
use crate::error::UserError;
use crate::list::is_role_name;
use crate::service::{UserSvc, parse_id};

/// Longest role description, in characters.
const MAX_DESCRIPTION: usize = 200;
/// Most permissions one role may list.
const MAX_PERMISSIONS: usize = 100;
/// The fingerprint ListRoles page tokens are bound to (it has no filters).
const LIST_ROLES: &str = "ListRoles/v1";

/// A row of `roles`.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = roles)]
#[diesel(check_for_backend(diesel::pg::Pg))]
struct RoleRow {
    name: String,
    description: String,
    permissions: Vec<String>,
    builtin: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

fn role_pb(r: RoleRow, user_count: i64) -> pb::Role {
    pb::Role {
        name: r.name,
        description: r.description,
        permissions: r.permissions,
        builtin: r.builtin,
        user_count: i32::try_from(user_count).unwrap_or(i32::MAX),
        create_time: Some(ts(r.created_at)),
        update_time: Some(ts(r.updated_at)),
    }
}

/// Records a violation on `field` unless `name` is a well-formed role name.
fn check_name(v: &mut FieldViolations, field: &str, name: &str) {
    if name.is_empty() {
        v.add(field, "is required");
    } else if !is_role_name(name) {
        v.add(field, "must be 2 to 50 of a-z, 0-9, '_' and '-'");
    }
}

fn check_description(v: &mut FieldViolations, field: &str, d: &str) {
    if d.chars().count() > MAX_DESCRIPTION {
        v.add(
            field,
            format!("must be at most {MAX_DESCRIPTION} characters"),
        );
    } else if d.chars().any(char::is_control) {
        v.add(field, "must not contain control characters");
    }
}

/// The permissions, validated, trimmed and without duplicates (first
/// occurrence kept).
fn check_permissions(v: &mut FieldViolations, field: &str, perms: &[String]) -> Vec<String> {
    if perms.len() > MAX_PERMISSIONS {
        v.add(
            field,
            format!("must list at most {MAX_PERMISSIONS} permissions"),
        );
        return Vec::new();
    }
    let mut out: Vec<String> = Vec::new();
    for (i, p) in perms.iter().enumerate() {
        let p = p.trim();
        if !rbac::is_valid(p) {
            v.add(
                format!("{field}[{i}]"),
                "must be service:resource:action (1 to 3 segments of a-z, 0-9, '_', '-' or '*')",
            );
        } else if !out.iter().any(|o| o == p) {
            out.push(p.to_string());
        }
    }
    out
}

fn role_event(p: &Principal, action: &'static str, name: &str) -> AuditEvent {
    AuditEvent {
        actor_id: Some(p.user_id),
        action,
        target_type: "role",
        target_id: name.to_string(),
        ..Default::default()
    }
}

/// How many users hold each of `names`.
async fn holders(
    conn: &mut AsyncPgConnection,
    names: &[String],
) -> Result<HashMap<String, i64>, UserError> {
    if names.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, i64)> = user_roles::table
        .filter(user_roles::role.eq_any(names))
        .group_by(user_roles::role)
        .select((user_roles::role, diesel::dsl::count_star()))
        .load(conn)
        .await?;
    Ok(rows.into_iter().collect())
}

async fn load_role(conn: &mut AsyncPgConnection, name: &str) -> Result<RoleRow, UserError> {
    roles::table
        .filter(roles::name.eq(name))
        .select(RoleRow::as_select())
        .first(conn)
        .await
        .optional()?
        .ok_or(UserError::NotFound)
}

/// Checks the user and role of AssignRole / RevokeRole; NOT_FOUND when
/// either does not exist (soft-deleted accounts included).
async fn user_and_role(
    conn: &mut AsyncPgConnection,
    user: Uuid,
    role: &str,
) -> Result<(), UserError> {
    UserSvc::row(conn, user, false)
        .await?
        .ok_or(UserError::NotFound)?;
    load_role(conn, role).await?;
    Ok(())
}

fn unique_violation(e: &diesel::result::Error) -> bool {
    matches!(
        e,
        diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _)
    )
}

impl UserSvc {
    pub(crate) async fn rpc_list_roles(
        &self,
        req: Request<pb::ListRolesRequest>,
    ) -> Result<Response<pb::ListRolesResponse>, Status> {
        let p = authenticated(&req)?;
        p.require("user:roles:read")?;
        let r = req.into_inner();
        let mut v = FieldViolations::new();
        let size = page_size(&mut v, r.page_size);
        v.check()?;
        let after: Option<String> = self.pages.open(&r.page_token, LIST_ROLES)?;
        let mut q = roles::table.order(roles::name.asc()).into_boxed();
        if let Some(after) = &after {
            q = q.filter(roles::name.gt(after));
        }
        let mut conn = self.store.pg().await.map_err(UserError::from)?;
        let mut rows: Vec<RoleRow> = q
            .limit(size as i64 + 1)
            .select(RoleRow::as_select())
            .load(&mut conn)
            .await
            .map_err(UserError::from)?;
        let more = rows.len() > size;
        rows.truncate(size);
        let next_page_token = match rows.last() {
            Some(last) if more => self.pages.seal(LIST_ROLES, &last.name),
            _ => String::new(),
        };
        let names: Vec<String> = rows.iter().map(|r| r.name.clone()).collect();
        let counts = holders(&mut conn, &names).await?;
        let roles = rows
            .into_iter()
            .map(|r| {
                let n = counts.get(&r.name).copied().unwrap_or(0);
                role_pb(r, n)
            })
            .collect();
        Ok(Response::new(pb::ListRolesResponse {
            roles,
            next_page_token,
        }))
    }

    pub(crate) async fn rpc_create_role(
        &self,
        req: Request<pb::CreateRoleRequest>,
    ) -> Result<Response<pb::CreateRoleResponse>, Status> {
        let p = authenticated(&req)?;
        p.require("user:roles:write")?;
        let origin = Origin::of(&req);
        let role = req.into_inner().role.unwrap_or_default();
        let name = role.name.trim().to_string();
        let description = role.description.trim().to_string();
        let mut v = FieldViolations::new();
        check_name(&mut v, "role.name", &name);
        check_description(&mut v, "role.description", &description);
        let permissions = check_permissions(&mut v, "role.permissions", &role.permissions);
        v.check()?;
        let mut conn = self.store.pg().await.map_err(UserError::from)?;
        let row: RoleRow = diesel::insert_into(roles::table)
            .values((
                roles::name.eq(&name),
                roles::description.eq(&description),
                roles::permissions.eq(&permissions),
                roles::builtin.eq(false),
            ))
            .returning(RoleRow::as_returning())
            .get_result(&mut conn)
            .await
            .map_err(|e| {
                if unique_violation(&e) {
                    UserError::Taken(format!("a role named '{name}' already exists"))
                } else {
                    UserError::Db(e)
                }
            })?;
        let mut e = role_event(&p, "role.created", &name);
        e.changed_fields = vec!["name".into(), "description".into(), "permissions".into()];
        e.details = serde_json::json!({ "description": description, "permissions": permissions });
        record(&mut conn, &origin, e).await;
        Ok(Response::new(pb::CreateRoleResponse {
            role: Some(role_pb(row, 0)),
        }))
    }

    pub(crate) async fn rpc_update_role(
        &self,
        req: Request<pb::UpdateRoleRequest>,
    ) -> Result<Response<pb::UpdateRoleResponse>, Status> {
        let p = authenticated(&req)?;
        p.require("user:roles:write")?;
        let origin = Origin::of(&req);
        let r = req.into_inner();
        let role = r.role.unwrap_or_default();
        let name = role.name.trim().to_string();
        let mut v = FieldViolations::new();
        check_name(&mut v, "role.name", &name);
        // AIP-134: without a mask, every field the request sets.
        let paths: Vec<String> = match r.update_mask.as_ref().filter(|m| !m.paths.is_empty()) {
            Some(m) => m.paths.iter().map(|p| p.trim().to_string()).collect(),
            None => {
                let mut implied = Vec::new();
                if !role.description.is_empty() {
                    implied.push("description".to_string());
                }
                if !role.permissions.is_empty() {
                    implied.push("permissions".to_string());
                }
                implied
            }
        };
        if paths.is_empty() {
            v.add("update_mask", "names no field to change");
        }
        let mut description = None;
        let mut permissions = None;
        let mut changed: Vec<String> = Vec::new();
        for path in &paths {
            match path.as_str() {
                "description" => {
                    let d = role.description.trim().to_string();
                    check_description(&mut v, "role.description", &d);
                    description = Some(d);
                }
                "permissions" => {
                    permissions = Some(check_permissions(
                        &mut v,
                        "role.permissions",
                        &role.permissions,
                    ));
                }
                other => {
                    v.add(
                        "update_mask",
                        format!("'{other}' cannot be changed (allowed: description, permissions)"),
                    );
                    continue;
                }
            }
            if !changed.contains(path) {
                changed.push(path.clone());
            }
        }
        v.check()?;
        let mut conn = self.store.pg().await.map_err(UserError::from)?;
        let (before, after) = conn
            .transaction::<_, UserError, _>(async |conn| {
                let before: RoleRow = roles::table
                    .filter(roles::name.eq(&name))
                    .select(RoleRow::as_select())
                    .for_update()
                    .first(conn)
                    .await
                    .optional()?
                    .ok_or(UserError::NotFound)?;
                if before.builtin && permissions.is_some() {
                    return Err(UserError::Precondition(format!(
                        "'{name}' is a built-in role; its permissions cannot be changed"
                    )));
                }
                let after: RoleRow = diesel::update(roles::table.filter(roles::name.eq(&name)))
                    .set((
                        roles::description.eq(description.as_ref().unwrap_or(&before.description)),
                        roles::permissions.eq(permissions.as_ref().unwrap_or(&before.permissions)),
                        roles::updated_at.eq(Utc::now()),
                    ))
                    .returning(RoleRow::as_returning())
                    .get_result(conn)
                    .await?;
                Ok((before, after))
            })
            .await?;
        let mut e = role_event(&p, "role.updated", &name);
        let mut old = serde_json::Map::new();
        let mut new = serde_json::Map::new();
        if description.is_some() {
            old.insert("description".into(), before.description.into());
            new.insert("description".into(), after.description.clone().into());
        }
        if permissions.is_some() {
            old.insert("permissions".into(), before.permissions.into());
            new.insert("permissions".into(), after.permissions.clone().into());
        }
        e.changed_fields = changed;
        e.details = serde_json::json!({ "before": old, "after": new });
        record(&mut conn, &origin, e).await;
        let count = holders(&mut conn, std::slice::from_ref(&name))
            .await?
            .get(&name)
            .copied()
            .unwrap_or(0);
        Ok(Response::new(pb::UpdateRoleResponse {
            role: Some(role_pb(after, count)),
        }))
    }

    pub(crate) async fn rpc_delete_role(
        &self,
        req: Request<pb::DeleteRoleRequest>,
    ) -> Result<Response<pb::DeleteRoleResponse>, Status> {
        let p = authenticated(&req)?;
        p.require("user:roles:write")?;
        let origin = Origin::of(&req);
        let r = req.into_inner();
        let name = r.name.trim().to_string();
        let mut v = FieldViolations::new();
        check_name(&mut v, "name", &name);
        v.check()?;
        let force = r.force;
        let mut conn = self.store.pg().await.map_err(UserError::from)?;
        let unassigned = conn
            .transaction::<_, UserError, _>(async |conn| {
                let role: RoleRow = roles::table
                    .filter(roles::name.eq(&name))
                    .select(RoleRow::as_select())
                    .for_update()
                    .first(conn)
                    .await
                    .optional()?
                    .ok_or(UserError::NotFound)?;
                if role.builtin {
                    return Err(UserError::Precondition(format!("'{name}' is a built-in role and cannot be deleted")));
                }
                // Assigning takes a share lock on the role row (the foreign
                // key), so the count cannot change under this row lock.
                let assigned: i64 = user_roles::table
                    .filter(user_roles::role.eq(&name))
                    .count()
                    .get_result(conn)
                    .await?;
                if assigned > 0 && !force {
                    return Err(UserError::Precondition(format!(
                        "'{name}' is assigned to {assigned} user(s); revoke it first or delete with force"
                    )));
                }
                let removed = diesel::delete(user_roles::table.filter(user_roles::role.eq(&name)))
                    .execute(conn)
                    .await?;
                diesel::delete(roles::table.filter(roles::name.eq(&name))).execute(conn).await?;
                Ok(removed)
            })
            .await?;
        let mut e = role_event(&p, "role.deleted", &name);
        e.details = serde_json::json!({ "force": force, "unassigned": unassigned });
        record(&mut conn, &origin, e).await;
        Ok(Response::new(pb::DeleteRoleResponse {}))
    }

    /// Validates an AssignRole / RevokeRole request: the user id and role.
    fn assignment(user_id: &str, role: &str) -> Result<(Uuid, String), UserError> {
        let mut v = FieldViolations::new();
        let role = role.trim().to_string();
        check_name(&mut v, "role", &role);
        let id = parse_id("user_id", user_id).ok();
        if id.is_none() {
            v.add("user_id", "must be a user id (UUID)");
        }
        match id {
            Some(id) if v.is_empty() => Ok((id, role)),
            _ => Err(UserError::Invalid(v)),
        }
    }

    pub(crate) async fn rpc_assign_role(
        &self,
        req: Request<pb::AssignRoleRequest>,
    ) -> Result<Response<pb::AssignRoleResponse>, Status> {
        let p = authenticated(&req)?;
        p.require("user:roles:write")?;
        let origin = Origin::of(&req);
        let (user, role) = Self::assignment(&req.get_ref().user_id, &req.get_ref().role)?;
        let mut conn = self.store.pg().await.map_err(UserError::from)?;
        user_and_role(&mut conn, user, &role).await?;
        let inserted = diesel::insert_into(user_roles::table)
            .values((user_roles::user_id.eq(user), user_roles::role.eq(&role)))
            .on_conflict_do_nothing()
            .execute(&mut conn)
            .await
            .map_err(|e| match e {
                // The user or role went away since the check.
                diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::ForeignKeyViolation,
                    _,
                ) => UserError::NotFound,
                e => UserError::Db(e),
            })?;
        // Assigning twice changes nothing, and records nothing.
        if inserted > 0 {
            let mut e = AuditEvent {
                actor_id: Some(p.user_id),
                action: "role.assigned",
                target_type: "user",
                target_id: user.to_string(),
                changed_fields: vec!["roles".into()],
                ..Default::default()
            };
            e.details = serde_json::json!({ "role": role });
            record(&mut conn, &origin, e).await;
        }
        let roles = Self::roles_of(&mut conn, user).await?;
        Ok(Response::new(pb::AssignRoleResponse { roles }))
    }

    pub(crate) async fn rpc_revoke_role(
        &self,
        req: Request<pb::RevokeRoleRequest>,
    ) -> Result<Response<pb::RevokeRoleResponse>, Status> {
        let p = authenticated(&req)?;
        p.require("user:roles:write")?;
        let origin = Origin::of(&req);
        let (user, role) = Self::assignment(&req.get_ref().user_id, &req.get_ref().role)?;
        let mut conn = self.store.pg().await.map_err(UserError::from)?;
        user_and_role(&mut conn, user, &role).await?;
        let removed = diesel::delete(
            user_roles::table
                .filter(user_roles::user_id.eq(user))
                .filter(user_roles::role.eq(&role)),
        )
        .execute(&mut conn)
        .await
        .map_err(UserError::from)?;
        if removed > 0 {
            let mut e = AuditEvent {
                actor_id: Some(p.user_id),
                action: "role.revoked",
                target_type: "user",
                target_id: user.to_string(),
                changed_fields: vec!["roles".into()],
                ..Default::default()
            };
            e.details = serde_json::json!({ "role": role });
            record(&mut conn, &origin, e).await;
        }
        let roles = Self::roles_of(&mut conn, user).await?;
        Ok(Response::new(pb::RevokeRoleResponse { roles }))
    }

    pub(crate) async fn rpc_check_permission(
        &self,
        req: Request<pb::CheckPermissionRequest>,
    ) -> Result<Response<pb::CheckPermissionResponse>, Status> {
        let p = authenticated(&req)?;
        let r = req.into_inner();
        let mut v = FieldViolations::new();
        let permission = r.permission.trim();
        if !rbac::is_valid(permission) {
            v.add(
                "permission",
                "must be service:resource:action (1 to 3 segments of a-z, 0-9, '_', '-' or '*')",
            );
        }
        let user = if r.user_id.trim().is_empty() {
            p.user_id
        } else {
            parse_id("user_id", &r.user_id).unwrap_or_else(|_| {
                v.add(
                    "user_id",
                    "must be a user id (UUID), or empty for the caller",
                );
                p.user_id
            })
        };
        v.check()?;
        // Anyone may ask about themselves; others are invisible without
        // the right to read roles.
        if user != p.user_id && !p.can("user:roles:read") {
            return Err(UserError::NotFound.into());
        }
        // One's own roles are part of one's profile: a key scoped for
        // other work does not reveal them.
        if user == p.user_id && !p.can("user:roles:read") {
            p.require("user:self:read")?;
        }
        let mut conn = self.store.pg().await.map_err(UserError::from)?;
        Self::row(&mut conn, user, false)
            .await?
            .ok_or(UserError::NotFound)?;
        let held: Vec<(String, Vec<String>)> = user_roles::table
            .inner_join(roles::table)
            .filter(user_roles::user_id.eq(user))
            .order(roles::name.asc())
            .select((roles::name, roles::permissions))
            .load(&mut conn)
            .await
            .map_err(UserError::from)?;
        let granted_by: Vec<String> = held
            .into_iter()
            .filter(|(_, perms)| rbac::any_permits(perms, permission))
            .map(|(name, _)| name)
            .collect();
        Ok(Response::new(pb::CheckPermissionResponse {
            allowed: !granted_by.is_empty(),
            granted_by,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_are_checked_and_deduplicated() {
        let mut v = FieldViolations::new();
        let out = check_permissions(
            &mut v,
            "role.permissions",
            &[
                "chat:*".into(),
                " chat:* ".into(),
                "Bad:Perm".into(),
                "a:b:c:d".into(),
                "*".into(),
            ],
        );
        assert_eq!(out, vec!["chat:*".to_string(), "*".to_string()]);
        let fields: Vec<&str> = v.iter().map(|(f, _)| f).collect();
        assert_eq!(fields, vec!["role.permissions[2]", "role.permissions[3]"]);
    }

    #[test]
    fn names_and_descriptions() {
        let mut v = FieldViolations::new();
        check_name(&mut v, "n", "ok_name");
        check_description(&mut v, "d", &"x".repeat(200));
        assert!(v.is_empty());
        check_name(&mut v, "n", "");
        check_name(&mut v, "n", "x");
        check_name(&mut v, "n", "Has Space");
        check_description(&mut v, "d", &"x".repeat(201));
        check_description(&mut v, "d", "a\u{0}b");
        assert_eq!(v.iter().count(), 5);
    }
}
