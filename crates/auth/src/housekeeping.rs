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
use diesel::sql_types::{Bool, Timestamptz};
use diesel_async::{AsyncConnection, RunQueryDsl};
use trellis_store::Store;

use crate::error::AuthError;

/// Rows deleted per statement (and transaction).
pub const BATCH: i64 = 1000;

/// The advisory lock one sweeping replica holds ("trellis housekeeping").
pub const LOCK: i64 = 0x7472_6c68_6b70_0001;

/// What one table's delete removes: rows that stopped being usable before
/// `$1`, at most [`BATCH`] of them.
const SWEEPS: [(&str, &str); 4] = [
    (
        "sessions",
        "DELETE FROM auth_sessions WHERE id IN (SELECT id FROM auth_sessions \
         WHERE expires_at < $1 OR revoked_at < $1 LIMIT 1000)",
    ),
    (
        "refresh_tokens",
        "DELETE FROM refresh_tokens WHERE token_hash IN (SELECT token_hash FROM refresh_tokens \
         WHERE expires_at < $1 LIMIT 1000)",
    ),
    (
        "one_time_tokens",
        "DELETE FROM auth_one_time_tokens WHERE token_hash IN (SELECT token_hash \
         FROM auth_one_time_tokens WHERE expires_at < $1 LIMIT 1000)",
    ),
    (
        "mails",
        "DELETE FROM mail_outbox WHERE id IN (SELECT id FROM mail_outbox \
         WHERE sent_at < $1 LIMIT 1000)",
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

    fn add(&mut self, kind: &str, n: usize) {
        match kind {
            "sessions" => self.sessions += n,
            "refresh_tokens" => self.refresh_tokens += n,
            "one_time_tokens" => self.one_time_tokens += n,
            _ => self.mails += n,
        }
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
    for (kind, statement) in SWEEPS {
        loop {
            let deleted = conn
                .transaction::<_, AuthError, _>(async |c| {
                    let lock: Locked =
                        diesel::sql_query("SELECT pg_try_advisory_xact_lock($1) AS locked")
                            .bind::<diesel::sql_types::BigInt, _>(LOCK)
                            .get_result(c)
                            .await?;
                    if !lock.locked {
                        return Ok(None);
                    }
                    let n = diesel::sql_query(statement)
                        .bind::<Timestamptz, _>(before)
                        .execute(c)
                        .await?;
                    Ok(Some(n))
                })
                .await?;
            let Some(n) = deleted else {
                return Ok(None);
            };
            swept.add(kind, n);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sweep_deletes_a_batch_at_most_and_counts_its_kind() {
        for (kind, sql) in SWEEPS {
            assert!(sql.contains(&format!("LIMIT {BATCH}")), "{kind}: {sql}");
            assert!(sql.contains("< $1"), "{kind}: {sql}");
            let mut s = Swept::default();
            s.add(kind, 3);
            assert_eq!(s.total(), 3);
        }
        let mut s = Swept::default();
        s.add("sessions", 1);
        s.add("mails", 2);
        assert_eq!((s.sessions, s.mails, s.total()), (1, 2, 3));
    }
}
