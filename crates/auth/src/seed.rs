//! The first administrator, created by `trellisd dev` so a fresh mesh can
//! be administered at once.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use trellis_core::config::AuthConfig;
use trellis_store::Store;
use trellis_store::accounts::{self, NewAccount};
use trellis_store::schema::user_roles;

use crate::error::AuthError;
use crate::password::PasswordHasher;
use crate::tokens;

/// Login name and e-mail of the seeded administrator.
pub const ADMIN_USERNAME: &str = "admin";
pub const ADMIN_EMAIL: &str = "admin@trellis.local";

/// Creates the administrator when no account holds the `admin` role;
/// returns its (username, password) when it did.
pub async fn ensure_admin(
    cfg: &AuthConfig,
    store: &Store,
) -> Result<Option<(String, String)>, AuthError> {
    let mut conn = store.pg().await?;
    let admins: i64 = user_roles::table
        .filter(user_roles::role.eq("admin"))
        .count()
        .get_result(&mut conn)
        .await?;
    if admins > 0 {
        return Ok(None);
    }
    // Meets the password policy: upper, lower, digit, special, 16+ chars.
    let password = format!("Aa1!{}", &tokens::secret("")?[..16]);
    let hash = PasswordHasher::new(cfg.argon2, 1)?
        .hash(password.clone())
        .await?;
    accounts::create(
        &mut conn,
        NewAccount {
            id: trellis_core::id::new_id(),
            email: ADMIN_EMAIL,
            username: ADMIN_USERNAME,
            password_hash: &hash,
            display_name: "Administrator",
        },
        &["admin", "member"],
    )
    .await?;
    Ok(Some((ADMIN_USERNAME.to_string(), password)))
}
