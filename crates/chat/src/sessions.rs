//! Sessions: rows, their status (derived from the last activity, so no
//! background job is needed), and create/read/list/update/delete for their
//! owner. Another user's or a deleted session is NOT_FOUND.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};
use trellis_core::config::ChatConfig;
use trellis_proto::chat::v1 as pb;
use trellis_store::schema::{chat_messages, chat_sessions as s};
use uuid::Uuid;

use crate::error::ChatError;

pub const MAX_TITLE: usize = 200;
pub const MAX_SYSTEM_PROMPT: usize = 8000;

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = s)]
pub struct SessionRow {
    pub id: Uuid,
    pub title: String,
    pub model: String,
    pub system_prompt: String,
    pub retrieval: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_activity_at: DateTime<Utc>,
}

pub fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// A session's status now.
pub fn status(cfg: &ChatConfig, last_activity: DateTime<Utc>) -> pb::SessionStatus {
    let idle = (Utc::now() - last_activity).to_std().unwrap_or_default();
    if idle >= cfg.retention {
        pb::SessionStatus::Expired
    } else if idle >= cfg.idle_timeout {
        pb::SessionStatus::Inactive
    } else {
        pb::SessionStatus::Active
    }
}

pub fn to_pb(cfg: &ChatConfig, r: &SessionRow, message_count: i64) -> pb::Session {
    pb::Session {
        id: r.id.to_string(),
        title: r.title.clone(),
        model: r.model.clone(),
        system_prompt: r.system_prompt.clone(),
        retrieval: r.retrieval,
        status: status(cfg, r.last_activity_at) as i32,
        message_count,
        create_time: Some(ts(r.created_at)),
        update_time: Some(ts(r.updated_at)),
        last_activity_time: Some(ts(r.last_activity_at)),
    }
}

/// The caller's live session `id`, or NOT_FOUND.
pub async fn owned(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    user: Uuid,
) -> Result<SessionRow, ChatError> {
    s::table
        .filter(s::id.eq(id))
        .filter(s::user_id.eq(user))
        .filter(s::deleted_at.is_null())
        .select(SessionRow::as_select())
        .first(conn)
        .await
        .optional()?
        .ok_or(ChatError::NotFound)
}

pub async fn message_count(conn: &mut AsyncPgConnection, id: Uuid) -> Result<i64, ChatError> {
    Ok(chat_messages::table
        .filter(chat_messages::session_id.eq(id))
        .count()
        .get_result(conn)
        .await?)
}

#[derive(Debug, Insertable)]
#[diesel(table_name = s)]
pub struct NewSession {
    pub id: Uuid,
    pub user_id: Uuid,
    pub title: String,
    pub model: String,
    pub system_prompt: String,
    pub retrieval: bool,
}

pub async fn create(
    conn: &mut AsyncPgConnection,
    new: NewSession,
) -> Result<SessionRow, ChatError> {
    Ok(diesel::insert_into(s::table)
        .values(&new)
        .returning(SessionRow::as_returning())
        .get_result(conn)
        .await?)
}

/// Where the next page of sessions starts.
#[derive(Debug, Serialize, Deserialize)]
pub struct SessionCursor {
    pub micros: i64,
    pub id: Uuid,
}

/// One page of `user`'s sessions, most recent activity first, optionally
/// only those in `status`.
pub async fn list(
    conn: &mut AsyncPgConnection,
    cfg: &ChatConfig,
    user: Uuid,
    status: pb::SessionStatus,
    size: usize,
    after: Option<SessionCursor>,
) -> Result<(Vec<SessionRow>, Option<SessionCursor>), ChatError> {
    let now = Utc::now();
    let idle = now - chrono::Duration::from_std(cfg.idle_timeout).unwrap_or_default();
    let expired = now - chrono::Duration::from_std(cfg.retention).unwrap_or_default();
    let mut q = s::table
        .filter(s::user_id.eq(user))
        .filter(s::deleted_at.is_null())
        .into_boxed();
    q = match status {
        pb::SessionStatus::Active => q.filter(s::last_activity_at.gt(idle)),
        pb::SessionStatus::Inactive => q
            .filter(s::last_activity_at.le(idle))
            .filter(s::last_activity_at.gt(expired)),
        pb::SessionStatus::Expired => q.filter(s::last_activity_at.le(expired)),
        pb::SessionStatus::Unspecified => q,
    };
    if let Some(c) = &after {
        let t = DateTime::from_timestamp_micros(c.micros).unwrap_or_default();
        q = q.filter(
            s::last_activity_at
                .lt(t)
                .or(s::last_activity_at.eq(t).and(s::id.lt(c.id))),
        );
    }
    let rows: Vec<SessionRow> = q
        .order((s::last_activity_at.desc(), s::id.desc()))
        .limit(size as i64 + 1)
        .select(SessionRow::as_select())
        .load(conn)
        .await?;
    let more = rows.len() > size;
    let rows: Vec<SessionRow> = rows.into_iter().take(size).collect();
    let next = match rows.last() {
        Some(last) if more => Some(SessionCursor {
            micros: last.last_activity_at.timestamp_micros(),
            id: last.id,
        }),
        _ => None,
    };
    Ok((rows, next))
}
