//! Messages: rows and their wire form, the turn insert (user message and
//! STREAMING reply in one transaction; the database refuses a second
//! streaming reply in a session and a repeated client message id), flushes
//! and finalisation of a growing reply, the history sent as context,
//! paging and full-text search.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{BigInt, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};
use trellis_proto::chat::v1 as pb;
use trellis_store::pg::Cacheable;
use trellis_store::schema::chat_messages as m;
use uuid::Uuid;

use crate::error::ChatError;
use crate::sessions::ts;

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = m)]
pub struct MessageRow {
    pub id: Uuid,
    pub session_id: Uuid,
    pub role: String,
    pub content: String,
    pub status: String,
    pub client_message_id: Option<String>,
    pub reply_to: Option<Uuid>,
    pub model: String,
    pub provider: String,
    pub prompt_tokens: i32,
    pub completion_tokens: i32,
    pub cost_micros: i64,
    pub citations: serde_json::Value,
    pub error: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finish_reason: String,
    /// The google.rpc.Code a FAILED or INTERRUPTED reply ended with.
    pub error_code: i32,
    pub time_to_first_token_micros: Option<i64>,
    pub duration_micros: Option<i64>,
}

pub const STREAMING: &str = "streaming";
pub const COMPLETED: &str = "completed";
pub const CANCELLED: &str = "cancelled";
pub const FAILED: &str = "failed";
pub const INTERRUPTED: &str = "interrupted";

pub fn status_pb(s: &str) -> pb::MessageStatus {
    match s {
        STREAMING => pb::MessageStatus::Streaming,
        COMPLETED => pb::MessageStatus::Completed,
        CANCELLED => pb::MessageStatus::Cancelled,
        FAILED => pb::MessageStatus::Failed,
        INTERRUPTED => pb::MessageStatus::Interrupted,
        _ => pb::MessageStatus::Unspecified,
    }
}

pub fn citations_of(v: &serde_json::Value) -> Vec<pb::Citation> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|c| pb::Citation {
                    document_id: c["document_id"].as_str().unwrap_or_default().into(),
                    title: c["title"].as_str().unwrap_or_default().into(),
                    snippet: c["snippet"].as_str().unwrap_or_default().into(),
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn citations_json(c: &[pb::Citation]) -> serde_json::Value {
    serde_json::Value::Array(
        c.iter()
            .map(|c| {
                serde_json::json!({
                    "document_id": c.document_id, "title": c.title, "snippet": c.snippet
                })
            })
            .collect(),
    )
}

pub fn to_pb(r: &MessageRow) -> pb::Message {
    pb::Message {
        id: r.id.to_string(),
        session_id: r.session_id.to_string(),
        role: if r.role == "user" {
            pb::Role::User as i32
        } else {
            pb::Role::Assistant as i32
        },
        content: r.content.clone(),
        status: status_pb(&r.status) as i32,
        client_message_id: r.client_message_id.clone().unwrap_or_default(),
        reply_to: r.reply_to.map(|u| u.to_string()).unwrap_or_default(),
        model: r.model.clone(),
        provider: r.provider.clone(),
        usage: Some(pb::Usage {
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            cost_micros: r.cost_micros,
        }),
        citations: citations_of(&r.citations),
        error: r.error.clone(),
        create_time: Some(ts(r.created_at)),
        update_time: Some(ts(r.updated_at)),
    }
}

#[derive(Debug, Insertable)]
#[diesel(table_name = m)]
struct NewMessage<'a> {
    id: Uuid,
    session_id: Uuid,
    user_id: Uuid,
    role: &'a str,
    content: &'a str,
    status: &'a str,
    client_message_id: Option<&'a str>,
    reply_to: Option<Uuid>,
    model: &'a str,
}

/// What inserting a turn did.
#[derive(Debug)]
pub enum Inserted {
    New {
        user: Uuid,
        assistant: Uuid,
    },
    /// The client message id was used before in this session.
    Duplicate {
        user: Uuid,
        assistant: Option<Uuid>,
    },
}

fn constraint(e: &DieselError) -> Option<&str> {
    match e {
        DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info) => {
            info.constraint_name()
        }
        _ => None,
    }
}

const BUSY: &str = "a reply is already being generated in this session; wait for it or cancel it";

/// Stores a user message (unless `user_message` names an existing one, for
/// regeneration) and a STREAMING reply in one transaction.
/// [`insert_turn`]'s statement for a new turn: $1 user message id, $2
/// session, $3 user, $4 content, $5 client message id, $6 reply id, $7 model.
const NEW_TURN: &str = "WITH u AS (\
    INSERT INTO chat_messages (id, session_id, user_id, role, content, status, client_message_id, model) \
    VALUES ($1, $2, $3, 'user', $4, 'completed', $5, '')), \
  a AS (\
    INSERT INTO chat_messages (id, session_id, user_id, role, content, status, reply_to, model) \
    VALUES ($6, $2, $3, 'assistant', '', 'streaming', $1, $7)) \
  UPDATE chat_sessions SET last_activity_at = now() WHERE id = $2";

/// The same for a regeneration, whose user message $1 exists: $2
/// session, $3 user, $4 reply id, $5 model.
const REGENERATE_TURN: &str = "WITH a AS (\
    INSERT INTO chat_messages (id, session_id, user_id, role, content, status, reply_to, model) \
    VALUES ($4, $2, $3, 'assistant', '', 'streaming', $1, $5)) \
  UPDATE chat_sessions SET last_activity_at = now() WHERE id = $2";

/// [`open_turn`]'s statement: [`NEW_TURN`] guarded by the session's
/// ownership and age, so that it can be sent before the session is read:
/// $1 user message id, $2 session, $3 user, $4 content, $5 client message
/// id, $6 reply id, $7 model (NULL: the session's), $8 retention in
/// seconds. It inserts nothing (and updates no row) unless the session is
/// the user's, not deleted and not expired.
const OPEN_TURN: &str = "WITH s AS (\
    SELECT id, model FROM chat_sessions \
    WHERE id = $2 AND user_id = $3 AND deleted_at IS NULL \
      AND last_activity_at > now() - make_interval(secs => $8)), \
  u AS (\
    INSERT INTO chat_messages (id, session_id, user_id, role, content, status, client_message_id, model) \
    SELECT $1, s.id, $3, 'user', $4, 'completed', $5, '' FROM s), \
  a AS (\
    INSERT INTO chat_messages (id, session_id, user_id, role, content, status, reply_to, model) \
    SELECT $6, s.id, $3, 'assistant', '', 'streaming', $1, COALESCE($7, s.model) FROM s) \
  UPDATE chat_sessions SET last_activity_at = now() WHERE id IN (SELECT id FROM s)";

/// A message of the history sent as context.
#[derive(Debug, Clone, Queryable)]
pub struct Turn {
    pub role: String,
    pub content: String,
    pub reply_to: Option<Uuid>,
}

/// What [`open_turn`] found and did.
#[derive(Debug)]
pub struct Opened {
    /// The caller's session as it was (None: not theirs, deleted, or
    /// unknown).
    pub session: Option<crate::sessions::SessionRow>,
    pub inserted: Option<Inserted>,
    /// The conversation before this turn, oldest first, then the new user
    /// message (when it was inserted).
    pub history: Vec<Turn>,
}

/// Opens a new turn in one round trip: the session read, the guarded
/// insert of the user message and STREAMING reply, and the history before
/// them are pipelined on one connection. The three statements do not
/// depend on the order PostgreSQL runs them in: the insert checks the
/// session itself, and the history leaves the new messages out.
#[allow(clippy::too_many_arguments)]
pub async fn open_turn(
    conn: &AsyncPgConnection,
    session: Uuid,
    user_id: Uuid,
    content: &str,
    client_message_id: Option<&str>,
    model: Option<&str>,
    retention: std::time::Duration,
    limit: usize,
) -> Result<Opened, ChatError> {
    use diesel::sql_types::{Double, Nullable, Uuid as SqlUuid};
    use trellis_store::schema::chat_sessions as s;
    let new_user = Uuid::now_v7();
    let assistant = Uuid::now_v7();
    let read = s::table
        .filter(s::id.eq(session))
        .filter(s::user_id.eq(user_id))
        .filter(s::deleted_at.is_null())
        .select(crate::sessions::SessionRow::as_select())
        .first::<crate::sessions::SessionRow>(&mut &*conn);
    let insert = Cacheable(
        diesel::sql_query(OPEN_TURN)
            .bind::<SqlUuid, _>(new_user)
            .bind::<SqlUuid, _>(session)
            .bind::<SqlUuid, _>(user_id)
            .bind::<Text, _>(content)
            .bind::<Nullable<Text>, _>(client_message_id)
            .bind::<SqlUuid, _>(assistant)
            .bind::<Nullable<Text>, _>(model)
            .bind::<Double, _>(retention.as_secs_f64()),
    )
    .execute(&mut &*conn);
    // Twice the limit: superseded answers are dropped below.
    let prior = m::table
        .filter(m::session_id.eq(session))
        .filter(m::user_id.eq(user_id))
        .filter(m::content.ne(""))
        .filter(m::id.ne(new_user))
        .order((m::created_at.desc(), m::id.desc()))
        .limit(2 * limit as i64)
        .select((m::role, m::content, m::reply_to))
        .load::<Turn>(&mut &*conn);
    let (read, insert, prior) = futures::join!(read, insert, prior);
    let session_row = read.optional()?;
    let mut history = prior?;
    let inserted = match insert {
        Ok(0) => None,
        Ok(_) => Some(Inserted::New {
            user: new_user,
            assistant,
        }),
        Err(e) => {
            let mut c = conn;
            Some(conflict(&mut c, session, client_message_id, e).await?)
        }
    };
    if matches!(inserted, Some(Inserted::New { .. })) {
        trim_history(&mut history, limit);
        history.push(Turn {
            role: "user".into(),
            content: content.to_string(),
            reply_to: None,
        });
    } else {
        history.clear();
    }
    Ok(Opened {
        session: session_row,
        inserted,
        history,
    })
}

/// Newest first in, oldest first out: keeps the latest `limit` messages,
/// a user turn answered more than once (regenerated) with only its latest
/// answer.
fn trim_history<T: AsTurn>(rows: &mut Vec<T>, limit: usize) {
    // Newest first: the first answer met for a user turn is its latest.
    let mut answered = std::collections::HashSet::new();
    rows.retain(|r| r.role() != "assistant" || r.reply_to().is_none_or(|u| answered.insert(u)));
    rows.truncate(limit);
    rows.reverse();
}

trait AsTurn {
    fn role(&self) -> &str;
    fn reply_to(&self) -> Option<Uuid>;
}

impl AsTurn for Turn {
    fn role(&self) -> &str {
        &self.role
    }
    fn reply_to(&self) -> Option<Uuid> {
        self.reply_to
    }
}

impl AsTurn for MessageRow {
    fn role(&self) -> &str {
        &self.role
    }
    fn reply_to(&self) -> Option<Uuid> {
        self.reply_to
    }
}

/// A turn's insert hit a unique index: a resend of a turn already taken
/// answers with that turn, even while its reply is still generating (which
/// statement part failed first is not defined); otherwise the session is
/// busy with another reply.
async fn conflict<C>(
    conn: &mut C,
    session: Uuid,
    client_message_id: Option<&str>,
    e: DieselError,
) -> Result<Inserted, ChatError>
where
    C: diesel_async::AsyncConnectionCore<Backend = diesel::pg::Pg> + Send,
{
    let which = constraint(&e);
    if !matches!(
        which,
        Some("chat_messages_client_id" | "chat_messages_one_streaming")
    ) {
        return Err(e.into());
    }
    if let Some(cid) = client_message_id {
        let user: Option<Uuid> = m::table
            .filter(m::session_id.eq(session))
            .filter(m::client_message_id.eq(cid))
            .select(m::id)
            .first(conn)
            .await
            .optional()?;
        if let Some(user) = user {
            let assistant: Option<Uuid> = m::table
                .filter(m::reply_to.eq(user))
                .order((m::created_at.desc(), m::id.desc()))
                .select(m::id)
                .first(conn)
                .await
                .optional()?;
            return Ok(Inserted::Duplicate { user, assistant });
        }
    }
    Err(ChatError::Precondition(BUSY.into()))
}

pub async fn insert_turn(
    conn: &mut AsyncPgConnection,
    session: Uuid,
    user_id: Uuid,
    content: &str,
    client_message_id: Option<&str>,
    model: &str,
    user_message: Option<Uuid>,
) -> Result<Inserted, ChatError> {
    // One statement, so one round trip: the user message (unless this is a
    // regeneration), the STREAMING reply, and the session's activity —
    // atomic as a statement is (the reply's foreign key to the user message
    // is checked at its end).
    use diesel::sql_types::{Nullable, Uuid as SqlUuid};
    // The user message's id first: ids order messages of one instant.
    let new_user = Uuid::now_v7();
    let assistant = Uuid::now_v7();
    let (user, q) = match user_message {
        Some(u) => (
            u,
            diesel::sql_query(REGENERATE_TURN)
                .into_boxed::<diesel::pg::Pg>()
                .bind::<SqlUuid, _>(u)
                .bind::<SqlUuid, _>(session)
                .bind::<SqlUuid, _>(user_id)
                .bind::<SqlUuid, _>(assistant)
                .bind::<Text, _>(model),
        ),
        None => {
            let u = new_user;
            (
                u,
                diesel::sql_query(NEW_TURN)
                    .into_boxed::<diesel::pg::Pg>()
                    .bind::<SqlUuid, _>(u)
                    .bind::<SqlUuid, _>(session)
                    .bind::<SqlUuid, _>(user_id)
                    .bind::<Text, _>(content)
                    .bind::<Nullable<Text>, _>(client_message_id)
                    .bind::<SqlUuid, _>(assistant)
                    .bind::<Text, _>(model),
            )
        }
    };
    match Cacheable(q).execute(conn).await {
        Ok(_) => Ok(Inserted::New { user, assistant }),
        Err(e) => conflict(conn, session, client_message_id, e).await,
    }
}

/// Writes the reply's content so far.
pub async fn flush(conn: &mut AsyncPgConnection, id: Uuid, content: &str) -> Result<(), ChatError> {
    diesel::update(
        m::table
            .filter(m::id.eq(id))
            .filter(m::status.eq(STREAMING)),
    )
    .set((m::content.eq(content), m::updated_at.eq(Utc::now())))
    .execute(conn)
    .await?;
    Ok(())
}

/// How a reply ended.
#[derive(Debug, Clone, Default)]
pub struct Ending {
    pub status: &'static str,
    pub content: String,
    pub provider: String,
    pub prompt_tokens: i32,
    pub completion_tokens: i32,
    pub cost_micros: i64,
    pub citations: Vec<pb::Citation>,
    pub error: String,
    pub error_code: i32,
    pub finish_reason: String,
    pub time_to_first_token: Option<std::time::Duration>,
    pub duration: Option<std::time::Duration>,
}

fn micros(d: Option<std::time::Duration>) -> Option<i64> {
    d.map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Stores a reply's citations as soon as the gateway sends them.
pub async fn store_citations(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    c: &[pb::Citation],
) -> Result<(), ChatError> {
    diesel::update(m::table.filter(m::id.eq(id)))
        .set(m::citations.eq(citations_json(c)))
        .execute(conn)
        .await?;
    Ok(())
}

/// Marks replies `ids` (generating on this replica) as alive.
pub async fn heartbeat(conn: &mut AsyncPgConnection, ids: &[Uuid]) -> Result<(), ChatError> {
    diesel::update(
        m::table
            .filter(m::id.eq_any(ids))
            .filter(m::status.eq(STREAMING)),
    )
    .set(m::heartbeat_at.eq(Utc::now()))
    .execute(conn)
    .await?;
    Ok(())
}

/// Finalises a reply by the replica that generated it. A reply the
/// sweeper marked INTERRUPTED while it was still generating (its heartbeat
/// could not be written) gets its real ending and full content. False when
/// the reply no longer exists (its session or user was purged).
pub async fn finalize(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    e: &Ending,
) -> Result<bool, ChatError> {
    let n = diesel::update(
        m::table
            .filter(m::id.eq(id))
            .filter(m::status.eq_any([STREAMING, INTERRUPTED])),
    )
    .set((
        m::content.eq(&e.content),
        m::status.eq(e.status),
        m::provider.eq(&e.provider),
        m::prompt_tokens.eq(e.prompt_tokens),
        m::completion_tokens.eq(e.completion_tokens),
        m::cost_micros.eq(e.cost_micros),
        m::citations.eq(citations_json(&e.citations)),
        m::error.eq(&e.error),
        m::error_code.eq(e.error_code),
        m::finish_reason.eq(&e.finish_reason),
        m::time_to_first_token_micros.eq(micros(e.time_to_first_token)),
        m::duration_micros.eq(micros(e.duration)),
        m::updated_at.eq(Utc::now()),
    ))
    .execute(conn)
    .await?;
    Ok(n == 1)
}

/// The caller's message `id` in a live session, or NOT_FOUND.
pub async fn owned(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    user: Uuid,
) -> Result<MessageRow, ChatError> {
    use trellis_store::schema::chat_sessions as s;
    m::table
        .inner_join(s::table)
        .filter(m::id.eq(id))
        .filter(m::user_id.eq(user))
        .filter(s::deleted_at.is_null())
        .select(MessageRow::as_select())
        .first(conn)
        .await
        .optional()?
        .ok_or(ChatError::NotFound)
}

pub async fn by_id(
    conn: &mut AsyncPgConnection,
    id: Uuid,
) -> Result<Option<MessageRow>, ChatError> {
    Ok(m::table
        .filter(m::id.eq(id))
        .select(MessageRow::as_select())
        .first(conn)
        .await
        .optional()?)
}

/// The conversation up to and including `user_message`: the latest
/// `limit` messages with content, oldest first. A user turn answered more
/// than once (regenerated) contributes only its latest answer; replies to
/// `user_message` itself are left out, so a regeneration does not see the
/// earlier answer. `None` when `user_message` is not in `session` (one
/// statement: the user message's time is looked up inside it, so a turn
/// costs no round trip for it).
pub async fn history(
    conn: &mut AsyncPgConnection,
    session: Uuid,
    user_message: Uuid,
    limit: usize,
) -> Result<Option<Vec<MessageRow>>, ChatError> {
    let asked = diesel::alias!(trellis_store::schema::chat_messages as asked);
    let asked_at = asked
        .filter(asked.field(m::id).eq(user_message))
        .select(asked.field(m::created_at))
        .single_value();
    // Twice the limit: superseded answers are dropped below.
    let mut rows: Vec<MessageRow> = m::table
        .filter(m::session_id.eq(session))
        .filter(m::content.ne(""))
        .filter(
            m::created_at
                .nullable()
                .lt(asked_at)
                .or(m::id.eq(user_message).nullable()),
        )
        .order((m::created_at.desc(), m::id.desc()))
        .limit(2 * limit as i64 + 1)
        .select(MessageRow::as_select())
        .load(conn)
        .await?;
    if rows.as_slice().first().is_none_or(|r| r.id != user_message) {
        // Newest first, so the user message (content never empty) leads.
        return Ok(None);
    }
    trim_history(&mut rows, limit + 1);
    Ok(Some(rows))
}

/// Where the next page of messages starts.
#[derive(Debug, Serialize, Deserialize)]
pub struct MessageCursor {
    pub micros: i64,
    pub id: Uuid,
}

pub async fn page(
    conn: &mut AsyncPgConnection,
    session: Uuid,
    newest_first: bool,
    size: usize,
    after: Option<MessageCursor>,
) -> Result<(Vec<MessageRow>, Option<MessageCursor>), ChatError> {
    let mut q = m::table.filter(m::session_id.eq(session)).into_boxed();
    if let Some(c) = &after {
        let t = DateTime::from_timestamp_micros(c.micros).unwrap_or_default();
        q = if newest_first {
            q.filter(
                m::created_at
                    .lt(t)
                    .or(m::created_at.eq(t).and(m::id.lt(c.id))),
            )
        } else {
            q.filter(
                m::created_at
                    .gt(t)
                    .or(m::created_at.eq(t).and(m::id.gt(c.id))),
            )
        };
    }
    q = if newest_first {
        q.order((m::created_at.desc(), m::id.desc()))
    } else {
        q.order((m::created_at.asc(), m::id.asc()))
    };
    let rows: Vec<MessageRow> = q
        .limit(size as i64 + 1)
        .select(MessageRow::as_select())
        .load(conn)
        .await?;
    let more = rows.len() > size;
    let rows: Vec<MessageRow> = rows.into_iter().take(size).collect();
    let next = match rows.last() {
        Some(last) if more => Some(MessageCursor {
            micros: last.created_at.timestamp_micros(),
            id: last.id,
        }),
        _ => None,
    };
    Ok((rows, next))
}

#[derive(QueryableByName)]
pub struct HitRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub id: Uuid,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub session_id: Uuid,
    #[diesel(sql_type = Text)]
    pub role: String,
    #[diesel(sql_type = Text)]
    pub snippet: String,
    #[diesel(sql_type = Timestamptz)]
    pub created_at: DateTime<Utc>,
}

/// Full-text search over `user`'s messages in live sessions.
pub async fn search(
    conn: &mut AsyncPgConnection,
    user: Uuid,
    query: &str,
    session: Option<Uuid>,
    limit: usize,
) -> Result<Vec<HitRow>, ChatError> {
    let sql = format!(
        "WITH q AS (SELECT websearch_to_tsquery('english', $1) AS tsq) \
         SELECT h.id, h.session_id, h.role, \
           ts_headline('english', h.content, q.tsq, 'StartSel=<mark>, StopSel=</mark>, MaxWords=30, MinWords=10') AS snippet, \
           h.created_at \
         FROM (SELECT cm.id, cm.session_id, cm.role, cm.content, cm.created_at, ts_rank_cd(cm.tsv, q.tsq) AS rank \
               FROM chat_messages cm JOIN chat_sessions cs ON cs.id = cm.session_id, q \
               WHERE cm.user_id = $2 AND cs.deleted_at IS NULL AND cm.tsv @@ q.tsq {} \
               ORDER BY rank DESC, cm.id DESC LIMIT $3) h, q \
         ORDER BY h.rank DESC, h.id DESC",
        if session.is_some() {
            "AND cm.session_id = $4"
        } else {
            ""
        }
    );
    let q = diesel::sql_query(sql)
        .into_boxed::<diesel::pg::Pg>()
        .bind::<Text, _>(query)
        .bind::<diesel::sql_types::Uuid, _>(user)
        .bind::<BigInt, _>(limit as i64);
    let q = match session {
        Some(s) => q.bind::<diesel::sql_types::Uuid, _>(s),
        None => q,
    };
    Ok(q.load(conn).await?)
}

/// Marks replies left STREAMING by a replica that is gone (no heartbeat
/// since `older_than`) as INTERRUPTED; returns their ids.
pub async fn sweep_stale(
    conn: &mut AsyncPgConnection,
    older_than: DateTime<Utc>,
) -> Result<Vec<Uuid>, ChatError> {
    Ok(diesel::update(
        m::table
            .filter(m::status.eq(STREAMING))
            .filter(m::heartbeat_at.lt(older_than)),
    )
    .set((
        m::status.eq(INTERRUPTED),
        m::error.eq("the server generating this reply stopped"),
        m::error_code.eq(tonic::Code::Unavailable as i32),
        m::updated_at.eq(Utc::now()),
    ))
    .returning(m::id)
    .get_results(conn)
    .await?)
}
