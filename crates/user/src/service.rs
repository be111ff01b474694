//! `trellis.user.v1.UserService`: the struct, the shared lookups and
//! authorization rules, and the trait impl that hands each RPC to its
//! module (profile, admin, list, roles, audit).

use std::sync::Arc;

use diesel::pg::Pg;
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
    /// row and its roles in one statement, prepared once per connection
    /// (see [`UserById`]). `deleted_too`: soft-deleted rows count.
    pub(crate) async fn user<C>(
        conn: &mut C,
        id: Uuid,
        deleted_too: bool,
    ) -> Result<pb::User, UserError>
    where
        C: diesel_async::AsyncConnectionCore<Backend = Pg> + Send,
    {
        // By primary key: at most one row, so no LIMIT (and no bind for it).
        let found: Option<(UserRow, Vec<String>)> = if deleted_too {
            UserById::<true>(id).get_result(conn).await.optional()?
        } else {
            UserById::<false>(id).get_result(conn).await.optional()?
        };
        let (row, roles) = found.ok_or(UserError::NotFound)?;
        Ok(crate::convert::user_pb(row, roles))
    }

    /// [`Self::user`] for the read-only answers (GetUser, GetMe), on one of
    /// the store's multiplexed connections rather than a pooled one: under
    /// load, concurrent lookups share its writes and reads. A connection
    /// found broken (the server restarted, or ended it) is dropped and the
    /// read — one idempotent statement — tried once more on a fresh one.
    pub(crate) async fn look_up(&self, id: Uuid, deleted_too: bool) -> Result<pb::User, UserError> {
        let mut conn = self.store.pg_shared().await?;
        let mut retried = false;
        loop {
            match Self::user(&mut &*conn, id, deleted_too).await {
                Err(UserError::Db(e)) if !trellis_store::pg::connection_intact(&e) => {
                    tracing::warn!(error = %e, retried, "a multiplexed database connection failed");
                    if retried {
                        self.store.pg_shared_failed(&conn, &e);
                        return Err(trellis_store::StoreError::Unavailable("database").into());
                    }
                    conn = self.store.pg_shared_redial(&conn).await?;
                    retried = true;
                }
                found => return found,
            }
        }
    }
}

/// The DSL form of the lookup behind [`UserSvc::user`]: the profile
/// columns of the row `id` and its roles (`ARRAY(SELECT …)`, sorted).
fn user_by_id_sql(deleted_too: bool) -> String {
    use diesel::query_builder::{QueryBuilder, QueryFragment};
    let roles = diesel::dsl::array(
        user_roles::table
            .filter(user_roles::user_id.eq(users::id))
            .order(user_roles::role.asc())
            .select(user_roles::role),
    );
    let q = users::table
        .filter(users::id.eq(Uuid::nil()))
        .select((<UserRow as SelectableHelper<Pg>>::as_select(), roles));
    let mut sql = diesel::pg::PgQueryBuilder::default();
    let built = if deleted_too {
        QueryFragment::<Pg>::to_sql(&q, &mut sql, &Pg)
    } else {
        let q = q.filter(users::deleted_at.is_null());
        QueryFragment::<Pg>::to_sql(&q, &mut sql, &Pg)
    };
    match built {
        Ok(()) => sql.finish(),
        Err(e) => unreachable!("a static select always builds: {e}"),
    }
}

/// [`user_by_id_sql`] split around its one placeholder (`$1`, the id),
/// built once per process: `[live rows only, deleted too]`.
static USER_BY_ID: std::sync::LazyLock<[(String, String); 2]> = std::sync::LazyLock::new(|| {
    [false, true].map(|deleted_too| {
        let sql = user_by_id_sql(deleted_too);
        match sql.split_once("$1") {
            Some((head, tail)) if !tail.contains('$') => (head.to_owned(), tail.to_owned()),
            _ => unreachable!("the user lookup binds exactly one value: {sql}"),
        }
    })
});

/// The hottest statement of the service (every GetUser, GetMe and admin
/// answer ends with it), as a query fragment of static type: diesel-async
/// writes a statement's SQL text on every call, even one it has prepared,
/// and for the DSL form that means walking and quoting its eighteen
/// columns each time; this pushes the text built once from the DSL
/// ([`USER_BY_ID`]) and binds the id, and its type is its statement-cache
/// key (no hashing of the text). Same SQL, same rows, less CPU per call.
#[derive(Debug, Clone, Copy)]
struct UserById<const DELETED_TOO: bool>(Uuid);

impl<const D: bool> diesel::query_builder::QueryFragment<Pg> for UserById<D> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, Pg>,
    ) -> QueryResult<()> {
        let (head, tail) = &USER_BY_ID[usize::from(D)];
        out.push_sql(head);
        out.push_bind_param::<diesel::sql_types::Uuid, _>(&self.0)?;
        out.push_sql(tail);
        Ok(())
    }
}

impl<const D: bool> diesel::query_builder::QueryId for UserById<D> {
    type QueryId = Self;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<const D: bool> diesel::query_builder::Query for UserById<D> {
    type SqlType = (
        diesel::dsl::SqlTypeOf<diesel::dsl::AsSelect<UserRow, Pg>>,
        diesel::sql_types::Array<diesel::sql_types::Text>,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frozen_user_lookup_is_the_dsl_statement() {
        for (i, deleted_too) in [false, true].into_iter().enumerate() {
            let (head, tail) = &USER_BY_ID[i];
            assert_eq!(format!("{head}$1{tail}"), user_by_id_sql(deleted_too));
        }
        let live = diesel::debug_query::<Pg, _>(&UserById::<false>(Uuid::nil())).to_string();
        assert!(live.contains(r#""users"."deleted_at" IS NULL"#), "{live}");
        assert!(live.contains("ARRAY(SELECT"), "{live}");
        let all = diesel::debug_query::<Pg, _>(&UserById::<true>(Uuid::nil())).to_string();
        assert!(!all.contains("deleted_at\" IS NULL"), "{all}");
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
