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
