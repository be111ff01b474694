//! The audit trail: one row per security-relevant or administrative act,
//! written by whichever service performed it, read by UserService's
//! ListAuditEvents.

use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use crate::schema::audit_events;

/// One act to record.
#[derive(Debug, Clone, Default)]
pub struct AuditEvent {
    /// Who acted; `None` for anonymous acts (a failed login).
    pub actor_id: Option<Uuid>,
    /// Dotted name, e.g. `auth.login.succeeded`.
    pub action: &'static str,
    /// What it was done to, e.g. `user`, `session`, `api_key`.
    pub target_type: &'static str,
    pub target_id: String,
    pub changed_fields: Vec<String>,
    pub details: serde_json::Value,
    pub request_id: String,
    pub ip_address: String,
}

pub async fn record(
    conn: &mut AsyncPgConnection,
    e: AuditEvent,
) -> Result<(), diesel::result::Error> {
    use diesel::ExpressionMethods;
    diesel::insert_into(audit_events::table)
        .values((
            audit_events::id.eq(trellis_core::id::new_id()),
            audit_events::actor_id.eq(e.actor_id),
            audit_events::action.eq(e.action),
            audit_events::target_type.eq(e.target_type),
            audit_events::target_id.eq(e.target_id),
            audit_events::changed_fields.eq(e.changed_fields),
            audit_events::details.eq(if e.details.is_null() {
                serde_json::json!({})
            } else {
                e.details
            }),
            audit_events::request_id.eq(e.request_id),
            audit_events::ip_address.eq(e.ip_address),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// [`pseudonymise`]'s statement: $1 the subject, $2 the pseudonym, $3 the
/// lower-cased logins. Each arm of its condition has an index (by actor, by
/// target id, anonymous events by login), so an erasure costs lookups, not
/// a scan of the whole trail.
pub const PSEUDONYMISE: &str = "UPDATE audit_events SET \
     actor_id = CASE WHEN actor_id = $1 THEN $2 ELSE actor_id END, \
     target_id = CASE WHEN target_id = $1::text THEN $2::text ELSE target_id END, \
     ip_address = CASE WHEN actor_id = $1 OR actor_id IS NULL THEN '' ELSE ip_address END, \
     details = '{\"subject_erased\": true}'::jsonb \
     WHERE actor_id = $1 OR target_id = $1::text \
        OR (actor_id IS NULL AND lower(details->>'login') = ANY($3))";

/// Pseudonymises the trail about `subject` for an erasure request (see
/// `docs/architecture.md`, Users): events stay — what happened, when, with
/// which request id and changed field names — but the subject's id becomes
/// `pseudonym` (one per erasure, so the events still read as one person's),
/// details (free text, logins, reasons) are replaced by
/// `{"subject_erased": true}`, and the IP address goes from events the
/// subject performed. Anonymous events naming one of `logins` (a failed
/// login typed with the e-mail or username) lose their details and IP too.
/// Returns how many events changed.
pub async fn pseudonymise(
    conn: &mut AsyncPgConnection,
    subject: Uuid,
    pseudonym: Uuid,
    logins: &[String],
) -> Result<usize, diesel::result::Error> {
    use diesel::sql_types::{Array, Text, Uuid as SqlUuid};
    let logins: Vec<String> = logins.iter().map(|l| l.to_lowercase()).collect();
    diesel::sql_query(PSEUDONYMISE)
        .bind::<SqlUuid, _>(subject)
        .bind::<SqlUuid, _>(pseudonym)
        .bind::<Array<Text>, _>(logins)
        .execute(conn)
        .await
}
