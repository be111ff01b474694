//! PurgeUser's erasure: what a hard delete removes and what it keeps.
//!
//! - Every row the account owns goes with it, by `ON DELETE CASCADE` from
//!   `users`: sessions and refresh tokens, roles, preferences, API keys,
//!   TOTP recovery codes, one-time tokens, chat sessions and messages, LLM
//!   usage, search documents and history, and its mail (`mail_outbox`),
//!   plus mail sent to its addresses before rows named their account.
//! - The audit trail keeps its events but not the person
//!   ([`trellis_store::audit::pseudonymise`]): the id becomes a pseudonym,
//!   details and the subject's IP addresses go. The `user.purged` event
//!   written afterwards keeps the real id, as the record that the erasure
//!   was done.
//! - Redis keys naming the account (LLM quota counters and stream leases)
//!   are deleted after the commit. Should Redis be down they are left to
//!   expire by themselves (at the latest with their month), holding only
//!   counts. Cached LLM answers are keyed by content, not by user, and
//!   expire after `llm.cache_ttl`.

use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use trellis_store::Store;
use trellis_store::schema::{auth_one_time_tokens, users};
use uuid::Uuid;

use crate::error::UserError;

/// Erases account `id` (already cut off from its tokens); false when it
/// does not exist.
pub(crate) async fn purge(
    store: &Store,
    conn: &mut AsyncPgConnection,
    id: Uuid,
) -> Result<bool, UserError> {
    let erased = conn
        .transaction::<_, UserError, _>(async move |conn| {
            let Some((email, username)) = users::table
                .filter(users::id.eq(id))
                .select((users::email, users::username))
                .for_update()
                .first::<(String, String)>(conn)
                .await
                .optional()?
            else {
                return Ok(false);
            };
            // Addresses tokens went to: earlier e-mail addresses too.
            let mut addresses: Vec<String> = auth_one_time_tokens::table
                .filter(auth_one_time_tokens::user_id.eq(id))
                .select(auth_one_time_tokens::email)
                .distinct()
                .load(conn)
                .await?;
            addresses.push(email.clone());
            trellis_auth::mail::forget(conn, id, &addresses).await?;
            let mut logins = addresses;
            logins.push(username);
            trellis_store::audit::pseudonymise(conn, id, trellis_core::id::new_id(), &logins)
                .await?;
            diesel::delete(users::table.filter(users::id.eq(id)))
                .execute(conn)
                .await?;
            Ok(true)
        })
        .await?;
    if erased {
        match trellis_store::redis::delete_containing(store, &id.to_string()).await {
            Ok(n) => tracing::info!(user_id = %id, redis_keys = n, "account purged"),
            Err(e) => {
                tracing::warn!(user_id = %id, error = %e, "account purged; its Redis keys are left to expire")
            }
        }
    }
    Ok(erased)
}
