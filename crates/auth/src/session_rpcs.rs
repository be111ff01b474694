//! ListSessions and RevokeSession: a user's view of where they are signed in.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use tonic::{Request, Response, Status};
use trellis_core::error::FieldViolations;
use trellis_core::page::page_size;
use trellis_mesh::authenticated;
use trellis_proto::auth::v1 as pb;
use trellis_store::audit::AuditEvent;
use trellis_store::schema::auth_sessions;
use uuid::Uuid;

use crate::api_keys::SESSIONS;
use crate::audit::{Origin, record};
use crate::error::AuthError;
use crate::revocation::Revocation;
use crate::service::{AuthSvc, ts};
use crate::sessions;

type Row = (
    Uuid,
    DateTime<Utc>,
    DateTime<Utc>,
    DateTime<Utc>,
    String,
    String,
);

impl AuthSvc {
    pub(crate) async fn rpc_list_sessions(
        &self,
        req: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let p = authenticated(&req)?;
        p.require(SESSIONS)?;
        let r = req.into_inner();
        let mut v = FieldViolations::new();
        let size = page_size(&mut v, r.page_size);
        v.check()?;
        let list = format!("sessions:{}", p.user_id);
        let after: Option<(DateTime<Utc>, Uuid)> = self.pages.open(&r.page_token, &list)?;
        let mut conn = self.store.pg().await.map_err(AuthError::from)?;
        let mut q = auth_sessions::table
            .filter(auth_sessions::user_id.eq(p.user_id))
            .filter(auth_sessions::revoked_at.is_null())
            .filter(auth_sessions::expires_at.gt(Utc::now()))
            .into_boxed();
        if let Some((at, id)) = after {
            q = q.filter(
                auth_sessions::created_at
                    .lt(at)
                    .or(auth_sessions::created_at
                        .eq(at)
                        .and(auth_sessions::id.lt(id))),
            );
        }
        let mut rows: Vec<Row> = q
            .order((auth_sessions::created_at.desc(), auth_sessions::id.desc()))
            .limit(size as i64 + 1)
            .select((
                auth_sessions::id,
                auth_sessions::created_at,
                auth_sessions::last_used_at,
                auth_sessions::expires_at,
                auth_sessions::user_agent,
                auth_sessions::ip_address,
            ))
            .load(&mut conn)
            .await
            .map_err(AuthError::from)?;
        let next_page_token = if rows.len() > size {
            rows.truncate(size);
            rows.last()
                .map(|r| self.pages.seal(&list, &(r.1, r.0)))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: rows
                .into_iter()
                .map(|(id, created, used, expires, ua, ip)| pb::Session {
                    id: id.to_string(),
                    create_time: Some(ts(created)),
                    last_use_time: Some(ts(used)),
                    expire_time: Some(ts(expires)),
                    user_agent: ua,
                    ip_address: ip,
                    current: p.session_id == Some(id),
                })
                .collect(),
            next_page_token,
        }))
    }

    pub(crate) async fn rpc_revoke_session(
        &self,
        req: Request<pb::RevokeSessionRequest>,
    ) -> Result<Response<pb::RevokeSessionResponse>, Status> {
        let p = authenticated(&req)?;
        p.require(SESSIONS)?;
        let origin = Origin::of(&req);
        let raw = req.into_inner().session_id;
        let Ok(id) = Uuid::parse_str(&raw) else {
            let mut v = FieldViolations::new();
            v.add("session_id", "must be a session id (UUID)");
            return Err(v.into_status());
        };
        let mut conn = self.store.pg().await.map_err(AuthError::from)?;
        // Another user's session is as absent as a made-up one.
        if !sessions::revoke(&mut conn, id, p.user_id, "revoked by user")
            .await
            .map_err(AuthError::from)?
        {
            return Err(AuthError::NotFound.into());
        }
        self.revocations.publish(Revocation::Session(id)).await?;
        record(
            &mut conn,
            &origin,
            AuditEvent {
                actor_id: Some(p.user_id),
                action: "auth.session.revoked",
                target_type: "session",
                target_id: id.to_string(),
                ..Default::default()
            },
        )
        .await;
        Ok(Response::new(pb::RevokeSessionResponse {}))
    }
}
