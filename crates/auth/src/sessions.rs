//! Sessions (refresh-token families) and refresh tokens in PostgreSQL.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use trellis_store::schema::{auth_sessions, refresh_tokens};
use uuid::Uuid;

/// A refresh token with its session, as locked for rotation.
#[derive(Debug, Clone, Queryable)]
pub struct RefreshRow {
    pub session_id: Uuid,
    pub token_expires_at: DateTime<Utc>,
    pub used_at: Option<DateTime<Utc>>,
    pub user_id: Uuid,
    pub session_expires_at: DateTime<Utc>,
    pub session_revoked_at: Option<DateTime<Utc>>,
}

/// Opens a session with its first refresh token.
pub async fn create(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    user_agent: &str,
    ip: &str,
    refresh_hash: &[u8],
    expires_at: DateTime<Utc>,
) -> Result<Uuid, diesel::result::Error> {
    let id = trellis_core::id::new_id();
    diesel::insert_into(auth_sessions::table)
        .values((
            auth_sessions::id.eq(id),
            auth_sessions::user_id.eq(user_id),
            auth_sessions::expires_at.eq(expires_at),
            auth_sessions::user_agent.eq(user_agent),
            auth_sessions::ip_address.eq(ip),
        ))
        .execute(conn)
        .await?;
    insert_token(conn, id, refresh_hash, expires_at).await?;
    Ok(id)
}

pub async fn insert_token(
    conn: &mut AsyncPgConnection,
    session_id: Uuid,
    hash: &[u8],
    expires_at: DateTime<Utc>,
) -> Result<(), diesel::result::Error> {
    diesel::insert_into(refresh_tokens::table)
        .values((
            refresh_tokens::token_hash.eq(hash),
            refresh_tokens::session_id.eq(session_id),
            refresh_tokens::expires_at.eq(expires_at),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// The refresh token and its session, row-locked until the transaction ends
/// so that concurrent refreshes of one token are serialised.
pub async fn lock_token(
    conn: &mut AsyncPgConnection,
    hash: &[u8],
) -> Result<Option<RefreshRow>, diesel::result::Error> {
    refresh_tokens::table
        .inner_join(auth_sessions::table)
        .filter(refresh_tokens::token_hash.eq(hash))
        .select((
            refresh_tokens::session_id,
            refresh_tokens::expires_at,
            refresh_tokens::used_at,
            auth_sessions::user_id,
            auth_sessions::expires_at,
            auth_sessions::revoked_at,
        ))
        .for_update()
        .first(conn)
        .await
        .optional()
}

/// Marks a token spent and records the session's use.
pub async fn spend(
    conn: &mut AsyncPgConnection,
    hash: &[u8],
    session_id: Uuid,
) -> Result<(), diesel::result::Error> {
    let now = Utc::now();
    diesel::update(refresh_tokens::table.filter(refresh_tokens::token_hash.eq(hash)))
        .set(refresh_tokens::used_at.eq(now))
        .execute(conn)
        .await?;
    diesel::update(auth_sessions::table.filter(auth_sessions::id.eq(session_id)))
        .set(auth_sessions::last_used_at.eq(now))
        .execute(conn)
        .await?;
    Ok(())
}

/// Ends one session of `user_id`; false when there was no such live session.
pub async fn revoke(
    conn: &mut AsyncPgConnection,
    session_id: Uuid,
    user_id: Uuid,
    reason: &str,
) -> Result<bool, diesel::result::Error> {
    let n = diesel::update(
        auth_sessions::table
            .filter(auth_sessions::id.eq(session_id))
            .filter(auth_sessions::user_id.eq(user_id))
            .filter(auth_sessions::revoked_at.is_null()),
    )
    .set((
        auth_sessions::revoked_at.eq(Utc::now()),
        auth_sessions::revoke_reason.eq(reason),
    ))
    .execute(conn)
    .await?;
    Ok(n > 0)
}

/// Ends every live session of `user_id`.
pub async fn revoke_all(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    reason: &str,
) -> Result<usize, diesel::result::Error> {
    diesel::update(
        auth_sessions::table
            .filter(auth_sessions::user_id.eq(user_id))
            .filter(auth_sessions::revoked_at.is_null()),
    )
    .set((
        auth_sessions::revoked_at.eq(Utc::now()),
        auth_sessions::revoke_reason.eq(reason),
    ))
    .execute(conn)
    .await
}

/// Ends every session and token of `user` now, on every replica: bumps the
/// token version (access tokens carry it), revokes every session (refresh
/// tokens die with them) and publishes the revocation. The user service
/// calls this for suspension, deletion and purge.
pub async fn end_user_access(
    conn: &mut AsyncPgConnection,
    revocations: &crate::Revocations,
    user_id: Uuid,
    reason: &str,
) -> Result<(), crate::AuthError> {
    let version = trellis_store::accounts::bump_token_version(conn, user_id).await?;
    revoke_all(conn, user_id, reason).await?;
    revocations
        .publish(crate::revocation::Revocation::UserBefore(user_id, version))
        .await
}
