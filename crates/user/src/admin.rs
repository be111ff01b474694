//! Administration of accounts: create, read, update, suspend and
//! reactivate, soft-delete and restore, purge. Each needs its
//! `user:users:*` permission; callers without it get NOT_FOUND for an id
//! (existence must not leak) and PERMISSION_DENIED otherwise. Suspension,
//! deletion and purge end the account's sessions through the auth
//! revocation path, on every replica within a second.

use chrono::Utc;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use tonic::{Request, Response, Status};
use trellis_auth::audit::{Origin, record};
use trellis_core::error::FieldViolations;
use trellis_mesh::{Principal, authenticated};
use trellis_proto::user::v1 as pb;
use trellis_store::accounts::{self, NewAccount};
use trellis_store::audit::AuditEvent;
use trellis_store::schema::{roles, users};
use uuid::Uuid;

use crate::error::UserError;
use crate::service::{UserSvc, may_touch, parse_id, taken};
use crate::validate::{SELF_FIELDS, patch};

fn event(p: &Principal, action: &'static str, target: Uuid) -> AuditEvent {
    AuditEvent {
        actor_id: Some(p.user_id),
        action,
        target_type: "user",
        target_id: target.to_string(),
        ..Default::default()
    }
}

impl UserSvc {
    pub(crate) async fn rpc_create_user(
        &self,
        req: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let p = authenticated(&req)?;
        p.require("user:users:write")?;
        let origin = Origin::of(&req);
        let r = req.into_inner();
        let email = r.email.trim().to_string();
        let username = r.username.trim().to_string();
        let mut v = FieldViolations::new();
        trellis_auth::validate::email(&mut v, "email", &email);
        trellis_auth::validate::username(&mut v, "username", &username);
        trellis_auth::validate::password(&mut v, "password", &r.password, &email, &username);
        for (field, value) in [
            ("display_name", &r.display_name),
            ("first_name", &r.first_name),
            ("last_name", &r.last_name),
        ] {
            trellis_auth::validate::text(&mut v, field, value, 100);
        }
        let wanted: Vec<String> = if r.roles.is_empty() {
            vec!["member".into()]
        } else {
            r.roles.clone()
        };
        let mut conn = self.store.pg().await.map_err(UserError::from)?;
        let known: Vec<String> = roles::table
            .filter(roles::name.eq_any(&wanted))
            .select(roles::name)
            .load(&mut conn)
            .await
            .map_err(UserError::from)?;
        for (i, role) in wanted.iter().enumerate() {
            if !known.contains(role) {
                v.add(format!("roles[{i}]"), format!("no role named '{role}'"));
            }
        }
        v.check()?;
        let hash = self
            .hasher
            .hash(r.password)
            .await
            .map_err(UserError::from)?;
        let display = if r.display_name.trim().is_empty() {
            username.clone()
        } else {
            r.display_name.trim().to_string()
        };
        let role_refs: Vec<&str> = wanted.iter().map(String::as_str).collect();
        let id = trellis_core::id::new_id();
        accounts::create(
            &mut conn,
            NewAccount {
                id,
                email: &email,
                username: &username,
                password_hash: &hash,
                display_name: &display,
            },
            &role_refs,
        )
        .await
        .map_err(UserError::from)?;
        diesel::update(users::table.filter(users::id.eq(id)))
            .set((
                users::first_name.eq(r.first_name.trim()),
                users::last_name.eq(r.last_name.trim()),
            ))
            .execute(&mut conn)
            .await
            .map_err(UserError::from)?;
        record(&mut conn, &origin, event(&p, "user.created", id)).await;
        let user = Self::user(&mut conn, id, false).await?;
        Ok(Response::new(pb::CreateUserResponse { user: Some(user) }))
    }

    pub(crate) async fn rpc_get_user(
        &self,
        req: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        let p = authenticated(&req)?;
        let id = parse_id("id", &req.get_ref().id)?;
        // Anyone may read themselves; reading others needs the permission.
        let admin = p.can("user:users:read");
        if id != p.user_id && !admin {
            return Err(UserError::NotFound.into());
        }
        if id == p.user_id {
            p.require("user:self:read")?;
        }
        let user = self.look_up(id, admin).await?;
        Ok(Response::new(pb::GetUserResponse { user: Some(user) }))
    }

    pub(crate) async fn rpc_update_user(
        &self,
        req: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::UpdateUserResponse>, Status> {
        let p = authenticated(&req)?;
        let origin = Origin::of(&req);
        let r = req.into_inner();
        let user = r.user.unwrap_or_default();
        let id = parse_id("user.id", &user.id)?;
        may_touch(&p, "user:users:write")?;
        let mut allowed: Vec<&str> = SELF_FIELDS.to_vec();
        allowed.extend(["email", "username"]);
        let (changes, changed) =
            patch(&user, r.update_mask.as_ref(), &allowed).map_err(UserError::from)?;
        let email_changed = changes.email.is_some();
        let mut conn = self.store.pg().await.map_err(UserError::from)?;
        let n = diesel::update(
            users::table
                .filter(users::id.eq(id))
                .filter(users::deleted_at.is_null()),
        )
        .set((&changes, users::updated_at.eq(Utc::now())))
        .execute(&mut conn)
        .await
        .map_err(taken)?;
        if n == 0 {
            return Err(UserError::NotFound.into());
        }
        if email_changed {
            // A new address is unverified until proven otherwise.
            diesel::update(users::table.filter(users::id.eq(id)))
                .set(users::email_verified_at.eq(None::<chrono::DateTime<Utc>>))
                .execute(&mut conn)
                .await
                .map_err(UserError::from)?;
        }
        let mut e = event(&p, "user.updated", id);
        e.changed_fields = changed;
        record(&mut conn, &origin, e).await;
        let user = Self::user(&mut conn, id, false).await?;
        Ok(Response::new(pb::UpdateUserResponse { user: Some(user) }))
    }

    /// Sets the status (and suspension reason) of a live account other than
    /// the caller's; returns false when there is no such account.
    async fn set_status(
        &self,
        conn: &mut diesel_async::AsyncPgConnection,
        id: Uuid,
        status: &str,
        reason: Option<&str>,
    ) -> Result<bool, UserError> {
        let n = diesel::update(
            users::table
                .filter(users::id.eq(id))
                .filter(users::deleted_at.is_null()),
        )
        .set((
            users::status.eq(status),
            users::suspend_reason.eq(reason),
            users::updated_at.eq(Utc::now()),
        ))
        .execute(conn)
        .await?;
        Ok(n > 0)
    }

    pub(crate) async fn rpc_suspend_user(
        &self,
        req: Request<pb::SuspendUserRequest>,
    ) -> Result<Response<pb::SuspendUserResponse>, Status> {
        let p = authenticated(&req)?;
        let origin = Origin::of(&req);
        let r = req.into_inner();
        let id = parse_id("id", &r.id)?;
        may_touch(&p, "user:users:suspend")?;
        if id == p.user_id {
            return Err(UserError::Precondition("you cannot suspend yourself".into()).into());
        }
        let mut v = FieldViolations::new();
        trellis_auth::validate::text(&mut v, "reason", &r.reason, 500);
        v.check()?;
        let mut conn = self.store.pg().await.map_err(UserError::from)?;
        if !self
            .set_status(&mut conn, id, accounts::SUSPENDED, Some(r.reason.trim()))
            .await?
        {
            return Err(UserError::NotFound.into());
        }
        trellis_auth::end_user_access(&mut conn, &self.revocations, id, "suspended")
            .await
            .map_err(UserError::from)?;
        let mut e = event(&p, "user.suspended", id);
        e.details = serde_json::json!({ "reason": r.reason.trim() });
        record(&mut conn, &origin, e).await;
        let user = Self::user(&mut conn, id, false).await?;
        Ok(Response::new(pb::SuspendUserResponse { user: Some(user) }))
    }

    pub(crate) async fn rpc_deactivate_user(
        &self,
        req: Request<pb::DeactivateUserRequest>,
    ) -> Result<Response<pb::DeactivateUserResponse>, Status> {
        let p = authenticated(&req)?;
        let origin = Origin::of(&req);
        let id = parse_id("id", &req.get_ref().id)?;
        may_touch(&p, "user:users:suspend")?;
        if id == p.user_id {
            return Err(UserError::Precondition("you cannot deactivate yourself".into()).into());
        }
        let mut conn = self.store.pg().await.map_err(UserError::from)?;
        if !self
            .set_status(&mut conn, id, accounts::INACTIVE, None)
            .await?
        {
            return Err(UserError::NotFound.into());
        }
        trellis_auth::end_user_access(&mut conn, &self.revocations, id, "deactivated")
            .await
            .map_err(UserError::from)?;
        record(&mut conn, &origin, event(&p, "user.deactivated", id)).await;
        let user = Self::user(&mut conn, id, false).await?;
        Ok(Response::new(pb::DeactivateUserResponse {
            user: Some(user),
        }))
    }

    pub(crate) async fn rpc_reactivate_user(
        &self,
        req: Request<pb::ReactivateUserRequest>,
    ) -> Result<Response<pb::ReactivateUserResponse>, Status> {
        let p = authenticated(&req)?;
        let origin = Origin::of(&req);
        let id = parse_id("id", &req.get_ref().id)?;
        may_touch(&p, "user:users:suspend")?;
        let mut conn = self.store.pg().await.map_err(UserError::from)?;
        if !self
            .set_status(&mut conn, id, accounts::ACTIVE, None)
            .await?
        {
            return Err(UserError::NotFound.into());
        }
        record(&mut conn, &origin, event(&p, "user.reactivated", id)).await;
        let user = Self::user(&mut conn, id, false).await?;
        Ok(Response::new(pb::ReactivateUserResponse {
            user: Some(user),
        }))
    }

    pub(crate) async fn rpc_delete_user(
        &self,
        req: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        let p = authenticated(&req)?;
        let origin = Origin::of(&req);
        let id = parse_id("id", &req.get_ref().id)?;
        may_touch(&p, "user:users:delete")?;
        if id == p.user_id {
            return Err(
                UserError::Precondition("delete your own account with DeleteMe".into()).into(),
            );
        }
        let mut conn = self.store.pg().await.map_err(UserError::from)?;
        let n = diesel::update(
            users::table
                .filter(users::id.eq(id))
                .filter(users::deleted_at.is_null()),
        )
        .set((
            users::deleted_at.eq(Utc::now()),
            users::updated_at.eq(Utc::now()),
        ))
        .execute(&mut conn)
        .await
        .map_err(UserError::from)?;
        if n == 0 {
            return Err(UserError::NotFound.into());
        }
        trellis_auth::end_user_access(&mut conn, &self.revocations, id, "deleted")
            .await
            .map_err(UserError::from)?;
        record(&mut conn, &origin, event(&p, "user.deleted", id)).await;
        let user = Self::user(&mut conn, id, true).await?;
        Ok(Response::new(pb::DeleteUserResponse { user: Some(user) }))
    }

    pub(crate) async fn rpc_restore_user(
        &self,
        req: Request<pb::RestoreUserRequest>,
    ) -> Result<Response<pb::RestoreUserResponse>, Status> {
        let p = authenticated(&req)?;
        let origin = Origin::of(&req);
        let id = parse_id("id", &req.get_ref().id)?;
        may_touch(&p, "user:users:delete")?;
        let mut conn = self.store.pg().await.map_err(UserError::from)?;
        let n = diesel::update(
            users::table
                .filter(users::id.eq(id))
                .filter(users::deleted_at.is_not_null()),
        )
        .set((
            users::deleted_at.eq(None::<chrono::DateTime<Utc>>),
            users::updated_at.eq(Utc::now()),
        ))
        .execute(&mut conn)
        .await
        .map_err(UserError::from)?;
        if n == 0 {
            return Err(UserError::NotFound.into());
        }
        record(&mut conn, &origin, event(&p, "user.restored", id)).await;
        let user = Self::user(&mut conn, id, false).await?;
        Ok(Response::new(pb::RestoreUserResponse { user: Some(user) }))
    }

    pub(crate) async fn rpc_purge_user(
        &self,
        req: Request<pb::PurgeUserRequest>,
    ) -> Result<Response<pb::PurgeUserResponse>, Status> {
        let p = authenticated(&req)?;
        let origin = Origin::of(&req);
        let id = parse_id("id", &req.get_ref().id)?;
        may_touch(&p, "user:users:purge")?;
        if id == p.user_id {
            return Err(UserError::Precondition("you cannot purge yourself".into()).into());
        }
        let mut conn = self.store.pg().await.map_err(UserError::from)?;
        if Self::row(&mut conn, id, true).await?.is_none() {
            return Err(UserError::NotFound.into());
        }
        // Tokens die first; then the account and everything it owns
        // (see `erasure` for what goes and what is kept).
        trellis_auth::end_user_access(&mut conn, &self.revocations, id, "purged")
            .await
            .map_err(UserError::from)?;
        if !crate::erasure::purge(&self.store, &mut conn, id).await? {
            return Err(UserError::NotFound.into());
        }
        record(&mut conn, &origin, event(&p, "user.purged", id)).await;
        Ok(Response::new(pb::PurgeUserResponse {}))
    }
}
