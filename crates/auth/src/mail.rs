//! Outgoing mail. A message is first written to the `mail_outbox` table in
//! the request (so nothing acknowledged is lost, and tests and tools can
//! read what was sent); a background task then drains the outbox through a
//! [`Mailer`]: SMTP via lettre when `mail.smtp_url` is set, otherwise the
//! development mailer, which only logs. Failed deliveries are retried with
//! doubling back-off; replicas share the work with `FOR UPDATE SKIP LOCKED`.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use futures::future::BoxFuture;
use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use trellis_core::config::MailConfig;
use trellis_store::Store;
use trellis_store::schema::mail_outbox;
use uuid::Uuid;

use crate::error::AuthError;

/// Deliveries given up after this many attempts (the row stays, with its error).
const MAX_ATTEMPTS: i32 = 10;

/// A message to send.
#[derive(Debug, Clone)]
pub struct Mail {
    /// The account it concerns (its mail goes when the account is purged).
    pub user_id: Option<Uuid>,
    pub to: String,
    pub subject: String,
    pub body: String,
    /// What it is for, e.g. `password_reset`.
    pub purpose: &'static str,
}

/// Queues `mail` in the outbox (inside the caller's transaction, if any).
pub async fn send(conn: &mut AsyncPgConnection, mail: Mail) -> Result<(), AuthError> {
    diesel::insert_into(mail_outbox::table)
        .values((
            mail_outbox::id.eq(trellis_core::id::new_id()),
            mail_outbox::user_id.eq(mail.user_id),
            mail_outbox::to_address.eq(&mail.to),
            mail_outbox::subject.eq(&mail.subject),
            mail_outbox::body.eq(&mail.body),
            mail_outbox::purpose.eq(mail.purpose),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// [`forget`]'s statement: $1 the account, $2 its lower-cased addresses
/// (both arms index-served).
pub const FORGET: &str =
    "DELETE FROM mail_outbox WHERE user_id = $1 OR lower(to_address) = ANY($2)";

/// Deletes the outbox rows of `user` and any sent to `addresses` (mail
/// queued before rows named their account), for erasure.
pub async fn forget(
    conn: &mut AsyncPgConnection,
    user: Uuid,
    addresses: &[String],
) -> Result<usize, diesel::result::Error> {
    use diesel::sql_types::{Array, Text, Uuid as SqlUuid};
    let lower: Vec<String> = addresses.iter().map(|a| a.to_lowercase()).collect();
    diesel::sql_query(FORGET)
        .bind::<SqlUuid, _>(user)
        .bind::<Array<Text>, _>(lower)
        .execute(conn)
        .await
}

/// Delivers one message; the error text is kept on the outbox row.
pub trait Mailer: Send + Sync + 'static {
    fn deliver<'a>(
        &'a self,
        to: &'a str,
        subject: &'a str,
        body: &'a str,
    ) -> BoxFuture<'a, Result<(), String>>;
}

/// The development mailer: logs the message (tokens included, so a
/// developer can follow a reset link) and delivers nothing.
#[derive(Debug, Default)]
pub struct LogMailer;

impl Mailer for LogMailer {
    fn deliver<'a>(
        &'a self,
        to: &'a str,
        subject: &'a str,
        body: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            tracing::info!(%to, %subject, %body, "mail (development mailer: logged, not delivered)");
            Ok(())
        })
    }
}

/// Delivery over SMTP.
pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl std::fmt::Debug for SmtpMailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpMailer")
            .field("from", &self.from.to_string())
            .finish()
    }
}

impl Mailer for SmtpMailer {
    fn deliver<'a>(
        &'a self,
        to: &'a str,
        subject: &'a str,
        body: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let to: Mailbox = to.parse().map_err(|e| format!("recipient: {e}"))?;
            let message = Message::builder()
                .from(self.from.clone())
                .to(to)
                .subject(subject)
                .body(body.to_string())
                .map_err(|e| format!("message: {e}"))?;
            self.transport
                .send(message)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}

/// The mailer `cfg` asks for.
pub fn mailer(cfg: &MailConfig) -> Result<Arc<dyn Mailer>, AuthError> {
    let Some(url) = &cfg.smtp_url else {
        return Ok(Arc::new(LogMailer));
    };
    let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
        .map_err(|e| AuthError::Internal(format!("mail.smtp_url: {e}")))?
        .timeout(Some(Duration::from_secs(20)))
        .build();
    let from = cfg
        .from
        .parse()
        .map_err(|e| AuthError::Internal(format!("mail.from: {e}")))?;
    Ok(Arc::new(SmtpMailer { transport, from }))
}

type Pending = (Uuid, String, String, String, i32);

/// Delivers what is due; returns how many were sent.
pub async fn drain(
    store: &Store,
    mailer: &dyn Mailer,
    base_backoff: Duration,
) -> Result<usize, AuthError> {
    let mut conn = store.pg().await?;
    conn.transaction::<_, AuthError, _>(async move |conn| {
        let due: Vec<Pending> = mail_outbox::table
            .filter(mail_outbox::sent_at.is_null())
            .filter(mail_outbox::next_attempt_at.le(Utc::now()))
            .filter(mail_outbox::attempts.lt(MAX_ATTEMPTS))
            .order(mail_outbox::created_at.asc())
            .limit(20)
            .select((
                mail_outbox::id,
                mail_outbox::to_address,
                mail_outbox::subject,
                mail_outbox::body,
                mail_outbox::attempts,
            ))
            .for_update()
            .skip_locked()
            .load(conn)
            .await?;
        let mut sent = 0;
        for (id, to, subject, body, attempts) in due {
            let row = mail_outbox::table.filter(mail_outbox::id.eq(id));
            match mailer.deliver(&to, &subject, &body).await {
                Ok(()) => {
                    diesel::update(row)
                        .set((
                            mail_outbox::sent_at.eq(Utc::now()),
                            mail_outbox::attempts.eq(attempts + 1),
                            mail_outbox::last_error.eq(None::<String>),
                        ))
                        .execute(conn)
                        .await?;
                    sent += 1;
                }
                Err(e) => {
                    let wait = base_backoff.saturating_mul(1 << attempts.clamp(0, 12)).min(Duration::from_secs(3600));
                    tracing::warn!(%id, attempt = attempts + 1, error = %e, "mail delivery failed; will retry");
                    diesel::update(row)
                        .set((
                            mail_outbox::attempts.eq(attempts + 1),
                            mail_outbox::last_error.eq(Some(e.chars().take(500).collect::<String>())),
                            mail_outbox::next_attempt_at.eq(Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default()),
                        ))
                        .execute(conn)
                        .await?;
                }
            }
        }
        Ok(sent)
    })
    .await
}

/// Drains the outbox every `every` until aborted.
pub fn spawn_outbox(
    store: Store,
    mailer: Arc<dyn Mailer>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if store.pg_state.is_up()
                && let Err(e) = drain(&store, mailer.as_ref(), every).await
            {
                tracing::warn!(error = %e, "mail outbox drain failed");
            }
            tokio::time::sleep(every).await;
        }
    })
}
