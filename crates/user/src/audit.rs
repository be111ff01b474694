//! ListAuditEvents: the trail every service writes, filtered and paged.
//!
//! Needs `user:audit:read`. Events come newest first, ordered by
//! `(occurred_at, id)` descending, and pages continue strictly after the
//! last event's `(occurred_at, id)` (keyset pagination, so events written
//! while a client pages never shift what it sees). Page tokens are sealed
//! and bound to every filter.

use chrono::{DateTime, Datelike, Utc};
use diesel::dsl::sql;
use diesel::prelude::*;
use diesel::sql_types::{Bool, Timestamptz};
use diesel_async::RunQueryDsl;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};
use trellis_core::error::FieldViolations;
use trellis_core::page::page_size;
use trellis_mesh::authenticated;
use trellis_proto::user::v1 as pb;
use trellis_store::schema::audit_events;
use uuid::Uuid;

use crate::convert::{json_to_struct, ts};
use crate::error::UserError;
use crate::service::{UserSvc, parse_id};

/// Longest text filter accepted, in characters.
const MAX_FILTER: usize = 200;

/// A row of `audit_events`.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = audit_events)]
#[diesel(check_for_backend(diesel::pg::Pg))]
struct AuditRow {
    id: Uuid,
    occurred_at: DateTime<Utc>,
    actor_id: Option<Uuid>,
    action: String,
    target_type: String,
    target_id: String,
    changed_fields: Vec<String>,
    details: serde_json::Value,
    request_id: String,
    ip_address: String,
}

fn event_pb(r: AuditRow) -> pb::AuditEvent {
    pb::AuditEvent {
        id: r.id.to_string(),
        occur_time: Some(ts(r.occurred_at)),
        actor_id: r.actor_id.map(|a| a.to_string()).unwrap_or_default(),
        action: r.action,
        target_type: r.target_type,
        target_id: r.target_id,
        changed_fields: r.changed_fields,
        details: Some(json_to_struct(&r.details)),
        request_id: r.request_id,
        ip_address: r.ip_address,
    }
}

/// Where the next page starts: strictly before this event (newest first).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Cursor {
    /// `occurred_at` in microseconds since the epoch.
    at: i64,
    id: Uuid,
}

/// A validated ListAuditEvents query.
#[derive(Debug, Default, Serialize)]
struct Filters {
    actor: Option<Uuid>,
    target_type: Option<String>,
    target_id: Option<String>,
    action: Option<String>,
    /// Inclusive, in microseconds since the epoch.
    start: Option<i64>,
    /// Exclusive, in microseconds since the epoch.
    end: Option<i64>,
}

impl Filters {
    /// The canonical form a page token is bound to.
    fn fingerprint(&self) -> String {
        serde_json::to_string(&("ListAuditEvents/v1", self)).unwrap_or_default()
    }
}

/// An optional text filter: trimmed, bounded, no control characters.
fn text_filter(v: &mut FieldViolations, field: &str, raw: &str) -> Option<String> {
    let s = raw.trim();
    if s.chars().count() > MAX_FILTER {
        v.add(field, format!("must be at most {MAX_FILTER} characters"));
        None
    } else if s.chars().any(char::is_control) {
        v.add(field, "must not contain control characters");
        None
    } else {
        (!s.is_empty()).then(|| s.to_string())
    }
}

/// A timestamp in microseconds since the epoch, rounded up to the next
/// microsecond (PostgreSQL's precision; rounding up keeps an inclusive lower
/// bound and an exclusive upper bound exact). Years 1 to 9999 only.
fn micros(v: &mut FieldViolations, field: &str, t: Option<&prost_types::Timestamp>) -> Option<i64> {
    let t = t?;
    let at = u32::try_from(t.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .and_then(|n| DateTime::from_timestamp(t.seconds, n))
        .filter(|d| (1..=9999).contains(&d.year()));
    match at {
        Some(d) => {
            Some(d.timestamp() * 1_000_000 + i64::from(d.timestamp_subsec_nanos().div_ceil(1000)))
        }
        None => {
            v.add(field, "must be a valid time between the years 1 and 9999");
            None
        }
    }
}

fn validate(r: &pb::ListAuditEventsRequest, v: &mut FieldViolations) -> Filters {
    let actor = if r.actor_id.trim().is_empty() {
        None
    } else {
        let id = parse_id("actor_id", &r.actor_id).ok();
        if id.is_none() {
            v.add("actor_id", "must be a user id (UUID)");
        }
        id
    };
    let f = Filters {
        actor,
        target_type: text_filter(v, "target_type", &r.target_type),
        target_id: text_filter(v, "target_id", &r.target_id),
        action: text_filter(v, "action", &r.action),
        start: micros(v, "start_time", r.start_time.as_ref()),
        end: micros(v, "end_time", r.end_time.as_ref()),
    };
    if let (Some(s), Some(e)) = (f.start, f.end)
        && s >= e
    {
        v.add("end_time", "must be after start_time");
    }
    f
}

fn time(us: i64) -> Result<DateTime<Utc>, UserError> {
    DateTime::from_timestamp_micros(us).ok_or_else(|| {
        let mut v = FieldViolations::new();
        v.add("page_token", "is not a page token of this list");
        UserError::Invalid(v)
    })
}

impl UserSvc {
    pub(crate) async fn rpc_list_audit_events(
        &self,
        req: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let p = authenticated(&req)?;
        p.require("user:audit:read")?;
        let r = req.into_inner();
        let mut v = FieldViolations::new();
        let size = page_size(&mut v, r.page_size);
        let f = validate(&r, &mut v);
        v.check()?;
        let fingerprint = f.fingerprint();
        let cursor: Option<Cursor> = self.pages.open(&r.page_token, &fingerprint)?;

        let mut q = audit_events::table.into_boxed();
        if let Some(actor) = f.actor {
            q = q.filter(audit_events::actor_id.eq(actor));
        }
        if let Some(t) = &f.target_type {
            q = q.filter(audit_events::target_type.eq(t));
        }
        if let Some(t) = &f.target_id {
            q = q.filter(audit_events::target_id.eq(t));
        }
        if let Some(a) = &f.action {
            q = q.filter(audit_events::action.eq(a));
        }
        if let Some(s) = f.start {
            q = q.filter(audit_events::occurred_at.ge(time(s)?));
        }
        if let Some(e) = f.end {
            q = q.filter(audit_events::occurred_at.lt(time(e)?));
        }
        if let Some(c) = &cursor {
            q = q.filter(
                sql::<Bool>("(audit_events.occurred_at, audit_events.id) < (")
                    .bind::<Timestamptz, _>(time(c.at)?)
                    .sql(", ")
                    .bind::<diesel::sql_types::Uuid, _>(c.id)
                    .sql(")"),
            );
        }
        let mut conn = self.store.pg().await.map_err(UserError::from)?;
        let mut rows: Vec<AuditRow> = q
            .order((audit_events::occurred_at.desc(), audit_events::id.desc()))
            .limit(size as i64 + 1)
            .select(AuditRow::as_select())
            .load(&mut conn)
            .await
            .map_err(UserError::from)?;
        let more = rows.len() > size;
        rows.truncate(size);
        let next_page_token = match rows.last() {
            Some(last) if more => self.pages.seal(
                &fingerprint,
                &Cursor {
                    at: last.occurred_at.timestamp_micros(),
                    id: last.id,
                },
            ),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: rows.into_iter().map(event_pb).collect(),
            next_page_token,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_up_to_microseconds() {
        let mut v = FieldViolations::new();
        let t = |seconds, nanos| Some(prost_types::Timestamp { seconds, nanos });
        assert_eq!(micros(&mut v, "t", t(1, 0).as_ref()), Some(1_000_000));
        assert_eq!(micros(&mut v, "t", t(1, 1).as_ref()), Some(1_000_001));
        assert_eq!(
            micros(&mut v, "t", t(1, 999_999_999).as_ref()),
            Some(2_000_000)
        );
        assert!(v.is_empty());
        assert_eq!(micros(&mut v, "t", t(1, -1).as_ref()), None);
        assert_eq!(micros(&mut v, "t", t(i64::MAX, 0).as_ref()), None);
        assert_eq!(micros(&mut v, "t", t(-70_000_000_000, 0).as_ref()), None);
        assert_eq!(v.iter().count(), 3);
    }

    #[test]
    fn validation() {
        let mut v = FieldViolations::new();
        let r = pb::ListAuditEventsRequest {
            actor_id: "nope".into(),
            action: "a\u{0}".into(),
            start_time: Some(prost_types::Timestamp {
                seconds: 10,
                nanos: 0,
            }),
            end_time: Some(prost_types::Timestamp {
                seconds: 10,
                nanos: 0,
            }),
            ..Default::default()
        };
        validate(&r, &mut v);
        let fields: Vec<&str> = v.iter().map(|(f, _)| f).collect();
        assert_eq!(fields, vec!["actor_id", "action", "end_time"]);
    }
}
