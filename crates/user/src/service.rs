//! `trellis.user.v1.UserService`: the struct, the shared lookups and
//! authorization rules, and the trait impl that hands each RPC to its
//! module (profile, admin, list, roles, audit).

use std::sync::Arc;

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use tonic::{Request, Response, Status};
use trellis_auth::{PasswordHasher, Revocations};
use trellis_core::error::FieldViolations;
use trellis_core::page::PageTokens;
use trellis_mesh::Principal;
use trellis_proto::user::v1 as pb;
use trellis_proto::user::v1::user_service_server::{UserService, UserServiceServer};
use trellis_store::Store;
use trellis_store::schema::{user_roles, users};
use uuid::Uuid;

use crate::convert::UserRow;
use crate::error::UserError;

#[derive(Clone)]
pub struct UserSvc {
    pub(crate) store: Store,
    pub(crate) revocations: Arc<Revocations>,
    pub(crate) pages: PageTokens,
    pub(crate) hasher: PasswordHasher,
}

impl std::fmt::Debug for UserSvc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserSvc").finish_non_exhaustive()
    }
}

/// The generated server around a [`UserSvc`], with message limits applied.
pub fn service(
    max_message_bytes: usize,
    store: Store,
    hasher: PasswordHasher,
    revocations: Arc<Revocations>,
    pages: PageTokens,
) -> Result<UserServiceServer<UserSvc>, UserError> {
    let svc = UserSvc {
        store,
        revocations,
        pages,
        hasher,
    };
    Ok(UserServiceServer::new(svc)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes))
}

/// A UUID from a request field, or INVALID_ARGUMENT naming it.
pub(crate) fn parse_id(field: &str, raw: &str) -> Result<Uuid, UserError> {
    Uuid::parse_str(raw.trim()).map_err(|_| {
        let mut v = FieldViolations::new();
        v.add(field, "must be a user id (UUID)");
        UserError::Invalid(v)
    })
}

/// Whether `p` may act on another user's account with `permission`.
/// Refusals are NOT_FOUND, so that callers cannot probe which ids exist.
pub(crate) fn may_touch(p: &Principal, permission: &str) -> Result<(), UserError> {
    if p.can(permission) {
        Ok(())
    } else {
        Err(UserError::NotFound)
    }
}

/// A unique violation on the account core, as the field it concerns.
pub(crate) fn taken(e: diesel::result::Error) -> UserError {
    use diesel::result::{DatabaseErrorKind, Error};
    if let Error::DatabaseError(DatabaseErrorKind::UniqueViolation, info) = &e {
        match info.constraint_name() {
            Some("users_email_key") => return UserError::Taken("email is already taken".into()),
            Some("users_username_key") => {
                return UserError::Taken("username is already taken".into());
            }
            _ => {}
        }
    }
    UserError::Db(e)
}

impl UserSvc {
    /// The profile row of `id`; soft-deleted rows only when `deleted_too`.
    pub(crate) async fn row(
        conn: &mut AsyncPgConnection,
        id: Uuid,
        deleted_too: bool,
    ) -> Result<Option<UserRow>, UserError> {
        let mut q = users::table.filter(users::id.eq(id)).into_boxed();
        if !deleted_too {
            q = q.filter(users::deleted_at.is_null());
        }
        Ok(q.select(UserRow::as_select())
            .first(conn)
            .await
            .optional()?)
    }

    pub(crate) async fn roles_of(
        conn: &mut AsyncPgConnection,
        id: Uuid,
    ) -> Result<Vec<String>, UserError> {
        Ok(user_roles::table
            .filter(user_roles::user_id.eq(id))
            .order(user_roles::role.asc())
            .select(user_roles::role)
            .load(conn)
            .await?)
    }

    /// The wire form of user `id`, as the caller may see it: the profile
    /// row and its roles in one statement (`ARRAY(SELECT …)` built with
    /// diesel's DSL, so the prepared statement is cached per connection —
    /// literal SQL text would be re-planned on every call).
    pub(crate) async fn user(
        conn: &mut AsyncPgConnection,
        id: Uuid,
        deleted_too: bool,
    ) -> Result<pb::User, UserError> {
        let roles = diesel::dsl::array(
            user_roles::table
                .filter(user_roles::user_id.eq(users::id))
                .order(user_roles::role.asc())
                .select(user_roles::role),
        );
        // Not boxed: a query of static shape is found in diesel's statement
        // cache by its type, without building its SQL text on every call.
        let q = users::table
            .filter(users::id.eq(id))
            .select((UserRow::as_select(), roles));
        // By primary key: at most one row, so no LIMIT (and no bind for it).
        let found: Option<(UserRow, Vec<String>)> = if deleted_too {
            q.get_result(conn).await.optional()?
        } else {
            q.filter(users::deleted_at.is_null())
                .get_result(conn)
                .await
                .optional()?
        };
        let (row, roles) = found.ok_or(UserError::NotFound)?;
        Ok(crate::convert::user_pb(&row, roles))
    }
}

macro_rules! delegate {
    ($($name:ident: $req:ident => $resp:ident via $imp:ident;)*) => {
        #[tonic::async_trait]
        impl UserService for UserSvc {
            $(
                async fn $name(&self, req: Request<pb::$req>) -> Result<Response<pb::$resp>, Status> {
                    self.$imp(req).await
                }
            )*
        }
    };
}

delegate! {
    get_me: GetMeRequest => GetMeResponse via rpc_get_me;
    update_me: UpdateMeRequest => UpdateMeResponse via rpc_update_me;
    get_preferences: GetPreferencesRequest => GetPreferencesResponse via rpc_get_preferences;
    update_preferences: UpdatePreferencesRequest => UpdatePreferencesResponse via rpc_update_preferences;
    delete_me: DeleteMeRequest => DeleteMeResponse via rpc_delete_me;
    create_user: CreateUserRequest => CreateUserResponse via rpc_create_user;
    get_user: GetUserRequest => GetUserResponse via rpc_get_user;
    list_users: ListUsersRequest => ListUsersResponse via rpc_list_users;
    update_user: UpdateUserRequest => UpdateUserResponse via rpc_update_user;
    suspend_user: SuspendUserRequest => SuspendUserResponse via rpc_suspend_user;
    deactivate_user: DeactivateUserRequest => DeactivateUserResponse via rpc_deactivate_user;
    reactivate_user: ReactivateUserRequest => ReactivateUserResponse via rpc_reactivate_user;
    delete_user: DeleteUserRequest => DeleteUserResponse via rpc_delete_user;
    restore_user: RestoreUserRequest => RestoreUserResponse via rpc_restore_user;
    purge_user: PurgeUserRequest => PurgeUserResponse via rpc_purge_user;
    list_roles: ListRolesRequest => ListRolesResponse via rpc_list_roles;
    create_role: CreateRoleRequest => CreateRoleResponse via rpc_create_role;
    update_role: UpdateRoleRequest => UpdateRoleResponse via rpc_update_role;
    delete_role: DeleteRoleRequest => DeleteRoleResponse via rpc_delete_role;
    assign_role: AssignRoleRequest => AssignRoleResponse via rpc_assign_role;
    revoke_role: RevokeRoleRequest => RevokeRoleResponse via rpc_revoke_role;
    check_permission: CheckPermissionRequest => CheckPermissionResponse via rpc_check_permission;
    list_audit_events: ListAuditEventsRequest => ListAuditEventsResponse via rpc_list_audit_events;
}
