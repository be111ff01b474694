//! The account core: the `users` table and role assignments, shared by the
//! auth service (credentials, sessions) and the user service (profiles,
//! administration) through this one module, so neither reaches into the
//! other's tables.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use crate::schema::{roles, user_roles, users};

/// Account status.
pub const ACTIVE: &str = "active";
pub const INACTIVE: &str = "inactive";
pub const SUSPENDED: &str = "suspended";

/// A row of `users`.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = users)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct Account {
    pub id: Uuid,
    pub email: String,
    pub username: String,
    pub password_hash: String,
    pub display_name: String,
    pub status: String,
    pub email_verified_at: Option<DateTime<Utc>>,
    pub token_version: i32,
    pub failed_logins: i32,
    pub first_failed_at: Option<DateTime<Utc>>,
    pub locked_until: Option<DateTime<Utc>>,
    pub lockouts: i32,
    pub totp_secret: Option<String>,
    pub totp_enabled_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
}

/// What creating an account needs.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = users)]
pub struct NewAccount<'a> {
    pub id: Uuid,
    pub email: &'a str,
    pub username: &'a str,
    pub password_hash: &'a str,
    pub display_name: &'a str,
}

/// Why an account could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// A unique field is taken; names the field (`email` or `username`).
    #[error("{0} is already taken")]
    Taken(&'static str),
    #[error(transparent)]
    Db(#[from] DieselError),
}

/// Creates an account with `roles` in one transaction.
pub async fn create(
    conn: &mut AsyncPgConnection,
    new: NewAccount<'_>,
    role_names: &[&str],
) -> Result<Account, AccountError> {
    use diesel_async::AsyncConnection;
    let roles_owned: Vec<String> = role_names.iter().map(|r| r.to_string()).collect();
    conn.transaction::<_, AccountError, _>(async move |conn| {
        let account: Account = diesel::insert_into(users::table)
            .values(&new)
            .returning(Account::as_returning())
            .get_result(conn)
            .await
            .map_err(taken)?;
        for role in &roles_owned {
            diesel::insert_into(user_roles::table)
                .values((
                    user_roles::user_id.eq(account.id),
                    user_roles::role.eq(role),
                ))
                .execute(conn)
                .await?;
        }
        Ok(account)
    })
    .await
}

fn taken(err: DieselError) -> AccountError {
    if let DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info) = &err {
        match info.constraint_name() {
            Some("users_email_key") => return AccountError::Taken("email"),
            Some("users_username_key") => return AccountError::Taken("username"),
            _ => {}
        }
    }
    AccountError::Db(err)
}

/// A live (not soft-deleted) account by e-mail or username, case-insensitively.
pub async fn find_by_login(
    conn: &mut AsyncPgConnection,
    login: &str,
) -> Result<Option<Account>, DieselError> {
    users::table
        .filter(users::deleted_at.is_null())
        .filter(users::email.eq(login).or(users::username.eq(login)))
        .select(Account::as_select())
        .first(conn)
        .await
        .optional()
}

/// A live account by id.
pub async fn find(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<Account>, DieselError> {
    users::table
        .filter(users::id.eq(id))
        .filter(users::deleted_at.is_null())
        .select(Account::as_select())
        .first(conn)
        .await
        .optional()
}

/// The account's role names and the union of their permissions.
pub async fn roles_and_permissions(
    conn: &mut AsyncPgConnection,
    id: Uuid,
) -> Result<(Vec<String>, Vec<String>), DieselError> {
    let rows: Vec<(String, Vec<String>)> = user_roles::table
        .inner_join(roles::table)
        .filter(user_roles::user_id.eq(id))
        .order(roles::name.asc())
        .select((roles::name, roles::permissions))
        .load(conn)
        .await?;
    let mut perms: Vec<String> = rows.iter().flat_map(|(_, p)| p.iter().cloned()).collect();
    perms.sort();
    perms.dedup();
    Ok((rows.into_iter().map(|(n, _)| n).collect(), perms))
}

/// Invalidates every token of the account by bumping its token version;
/// returns the new version.
pub async fn bump_token_version(
    conn: &mut AsyncPgConnection,
    id: Uuid,
) -> Result<i32, DieselError> {
    diesel::update(users::table.filter(users::id.eq(id)))
        .set((
            users::token_version.eq(users::token_version + 1),
            users::updated_at.eq(diesel::dsl::now),
        ))
        .returning(users::token_version)
        .get_result(conn)
        .await
}
