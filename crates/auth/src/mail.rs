//! Outgoing mail. Everything goes through the `mail_outbox` table first (so
//! nothing acknowledged is lost, and tests and tools can read what was
//! sent); the default mailer then just logs it. Delivery over SMTP is a
//! later addition that will drain the same outbox.

use diesel::ExpressionMethods;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use trellis_store::schema::mail_outbox;

use crate::error::AuthError;

/// A message to send.
#[derive(Debug, Clone)]
pub struct Mail {
    pub to: String,
    pub subject: String,
    pub body: String,
    /// What it is for, e.g. `password_reset`.
    pub purpose: &'static str,
}

/// Stores `mail` in the outbox and logs it (the development mailer).
pub async fn send(conn: &mut AsyncPgConnection, mail: Mail) -> Result<(), AuthError> {
    diesel::insert_into(mail_outbox::table)
        .values((
            mail_outbox::id.eq(trellis_core::id::new_id()),
            mail_outbox::to_address.eq(&mail.to),
            mail_outbox::subject.eq(&mail.subject),
            mail_outbox::body.eq(&mail.body),
            mail_outbox::purpose.eq(mail.purpose),
        ))
        .execute(conn)
        .await?;
    tracing::info!(to = %mail.to, subject = %mail.subject, purpose = mail.purpose, "mail queued in the outbox (development mailer: not delivered)");
    Ok(())
}
