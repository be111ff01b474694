//! Housekeeping: auth state that can no longer be used is deleted
//! `auth.expired_retention` after it stopped mattering, so the tables stay
//! the size of what is live rather than of everything ever issued:
//!
//! - sessions that expired or were revoked (their refresh tokens go with
//!   them, by cascade) — ListSessions shows only live ones;
//! - refresh tokens past their expiry — a spent one is kept until then, as
//!   presenting it again must still revoke its session (reuse detection);
//! - mailed one-time tokens (password reset, e-mail verification) past
//!   their expiry;
//! - mail once sent (unsent mail is the outbox's and stays).
//!
//! A round runs every `auth.housekeeping_interval` in deletes of at most
//! [`BATCH`] rows, each its own short transaction, found through indexes;
//! one replica sweeps at a time (a transaction-scoped advisory lock: a
//! replica that finds it taken leaves the round to the holder).

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Bool, Timestamptz};
use diesel_async::{AsyncConnection, RunQueryDsl};
use trellis_store::Store;

use crate::error::AuthError;

/// Rows deleted per statement (and transaction).
pub const BATCH: i64 = 1000;

/// The advisory lock one sweeping replica holds ("trellis housekeeping").
pub const LOCK: i64 = 0x7472_6c68_6b70_0001;

/// Each table's delete: rows that stopped being usable before `$1`, at
/// most `$2` ([`BATCH`]) of them, and the count it adds to.
type Sweep = (fn(&mut Swept) -> &mut usize, &'static str);
const SWEEPS: [Sweep; 4] = [
    (
        |s| &mut s.sessions,
        "DELETE FROM auth_sessions WHERE id IN (SELECT id FROM auth_sessions \
         WHERE expires_at < $1 OR revoked_at < $1 LIMIT $2)",
    ),
    (
        |s| &mut s.refresh_tokens,
        "DELETE FROM refresh_tokens WHERE token_hash IN (SELECT token_hash FROM refresh_tokens \
         WHERE expires_at < $1 LIMIT $2)",
    ),
    (
        |s| &mut s.one_time_tokens,
        "DELETE FROM auth_one_time_tokens WHERE token_hash IN (SELECT token_hash \
         FROM auth_one_time_tokens WHERE expires_at < $1 LIMIT $2)",
    ),
    (
        |s| &mut s.mails,
        "DELETE FROM mail_outbox WHERE id IN (SELECT id FROM mail_outbox \
         WHERE sent_at < $1 LIMIT $2)",
    ),
];

/// Rows one round deleted, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub sessions: usize,
    pub refresh_tokens: usize,
    pub one_time_tokens: usize,
    pub mails: usize,
}

impl Swept {
    pub fn total(&self) -> usize {
        self.sessions + self.refresh_tokens + self.one_time_tokens + self.mails
    }
}

#[derive(diesel::QueryableByName)]
struct Locked {
    #[diesel(sql_type = Bool)]
    locked: bool,
}

/// One round: deletes what stopped being usable before `before`. `None`
/// when another replica holds the round's lock.
pub async fn sweep(store: &Store, before: DateTime<Utc>) -> Result<Option<Swept>, AuthError> {
    let mut swept = Swept::default();
    let mut conn = store.pg().await?;
    for (count, statement) in SWEEPS {
        loop {
            let deleted = conn
                .transaction::<_, AuthError, _>(async |c| {
                    let lock: Locked =
                        diesel::sql_query("SELECT pg_try_advisory_xact_lock($1) AS locked")
                            .bind::<BigInt, _>(LOCK)
                            .get_result(c)
                            .await?;
                    if !lock.locked {
                        return Ok(None);
                    }
                    let n = diesel::sql_query(statement)
                        .bind::<Timestamptz, _>(before)
                        .bind::<BigInt, _>(BATCH)
                        .execute(c)
                        .await?;
                    Ok(Some(n))
                })
                .await?;
            let Some(n) = deleted else {
                return Ok(None);
            };
            *count(&mut swept) += n;
            if (n as i64) < BATCH {
                break;
            }
        }
    }
    Ok(Some(swept))
}

/// Sweeps every `every` (the first round one `every` after the start) until
/// aborted, deleting what stopped being usable `retention` ago.
pub fn spawn(store: Store, every: Duration, retention: Duration) -> tokio::task::JoinHandle<()> {
    trellis_store::retention::spawn(store, every, retention, async |store, before| match sweep(
        &store, before,
    )
    .await
    {
        Ok(Some(s)) if s.total() > 0 => tracing::info!(
            sessions = s.sessions,
            refresh_tokens = s.refresh_tokens,
            one_time_tokens = s.one_time_tokens,
            mails = s.mails,
            "housekeeping deleted auth state past its retention"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "housekeeping failed; next round retries"),
    })
}
