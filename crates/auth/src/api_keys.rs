//! API keys for services and automation: created with scopes and an
//! optional expiry, the secret shown once and stored hashed, listed and
//! revoked by their owner.
//!
//! Keys are `trk_` + 256 random bits. Other services never read these
//! tables: their verifier asks AuthService.Introspect, which recognises
//! keys here ([`AuthSvc::api_key_principal`]). A key's permissions are its
//! scopes, limited to what its owner still holds, so a demoted owner's keys
//! lose the permissions the owner lost.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};
use trellis_core::error::FieldViolations;
use trellis_core::page::page_size;
use trellis_core::rbac;
use trellis_mesh::{CredentialKind, Principal, authenticated};
use trellis_proto::auth::v1 as pb;
use trellis_store::accounts;
use trellis_store::audit::AuditEvent;
use trellis_store::schema::{api_keys, users};
use uuid::Uuid;

use crate::audit::{Origin, record};
use crate::error::AuthError;
use crate::revocation::Revocation;
use crate::service::{AuthSvc, ts};
use crate::tokens;
use crate::validate;

/// How every API key secret starts; the verifier routes on it.
pub(crate) const SECRET_PREFIX: &str = "trk_";
/// The permission to manage one's own keys (members hold `auth:self:*`).
/// Checked so that a key scoped for, say, `chat:*` cannot list or revoke
/// its owner's other keys.
const MANAGE: &str = "auth:self:api_keys";
/// Seeing and ending one's sessions (ListSessions, RevokeSession,
/// LogoutAll). Like every `auth:self:*` permission, members hold it and a
/// key holds it only when granted, so a key scoped for `chat:*` cannot end
/// its owner's sessions or touch their password.
pub(crate) const SESSIONS: &str = "auth:self:sessions";
/// ChangePassword.
pub(crate) const PASSWORD: &str = "auth:self:password";
/// RequestEmailVerification.
pub(crate) const EMAIL: &str = "auth:self:email";
/// EnrollTotp, ConfirmTotp, DisableTotp (which also need a session).
pub(crate) const TOTP: &str = "auth:self:totp";
const MAX_NAME: usize = 100;
const MAX_SCOPES: usize = 50;
const MAX_SCOPE_LEN: usize = 200;
/// Two years (of 365 days).
const MAX_TTL_SECONDS: i64 = 2 * 365 * 24 * 3600;
/// Characters of the secret kept in clear to tell keys apart.
const PREFIX_LEN: usize = 12;
/// Longer credentials are not keys and are not hashed or looked up.
const MAX_SECRET: usize = 200;
/// `last_used_at` is written at most this often per key, so that a busy
/// key does not turn every verification into a write.
const TOUCH_EVERY_SECONDS: i64 = 60;

/// A live key as verification needs it: id, owner, scopes, expiry, last use.
type LiveKey = (
    Uuid,
    Uuid,
    Vec<String>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

/// A key as listed (never its secret).
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = api_keys)]
#[diesel(check_for_backend(diesel::pg::Pg))]
struct KeyRow {
    id: Uuid,
    name: String,
    scopes: Vec<String>,
    prefix: String,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    last_used_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

impl KeyRow {
    fn into_pb(self) -> pb::ApiKey {
        pb::ApiKey {
            id: self.id.to_string(),
            name: self.name,
            scopes: self.scopes,
            prefix: self.prefix,
            create_time: Some(ts(self.created_at)),
            expire_time: self.expires_at.map(ts),
            last_use_time: self.last_used_at.map(ts),
            revoke_time: self.revoked_at.map(ts),
        }
    }
}

/// PERMISSION_DENIED unless the caller signed in: some acts (creating
/// keys, managing the second factor) are not for API keys, whatever their
/// scopes, so that a leaked key cannot mint more keys or lock its owner out.
pub(crate) fn require_session(p: &Principal) -> Result<(), Status> {
    match p.credential {
        CredentialKind::AccessToken { .. } => Ok(()),
        CredentialKind::ApiKey { .. } => Err(Status::permission_denied(
            "this needs a signed-in session; API keys cannot do it",
        )),
    }
}

/// A requested lifetime, or a description of what is wrong with it.
fn ttl(d: &prost_types::Duration) -> Result<chrono::Duration, &'static str> {
    let malformed = d.nanos <= -1_000_000_000
        || d.nanos >= 1_000_000_000
        || (d.seconds > 0 && d.nanos < 0)
        || (d.seconds < 0 && d.nanos > 0);
    if malformed {
        return Err("is not a valid duration");
    }
    if d.seconds < 0 || d.nanos < 0 || (d.seconds == 0 && d.nanos == 0) {
        return Err("must be positive");
    }
    if d.seconds > MAX_TTL_SECONDS || (d.seconds == MAX_TTL_SECONDS && d.nanos > 0) {
        return Err("must be at most 2 years");
    }
    Ok(chrono::Duration::seconds(d.seconds) + chrono::Duration::nanoseconds(i64::from(d.nanos)))
}

impl AuthSvc {
    pub(crate) async fn rpc_create_api_key(
        &self,
        req: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let p = authenticated(&req)?;
        require_session(&p)?;
        p.require(MANAGE)?;
        let origin = Origin::of(&req);
        let r = req.into_inner();
        let mut v = FieldViolations::new();
        let name = r.name.trim().to_string();
        if name.is_empty() {
            v.add("name", "is required");
        } else {
            validate::text(&mut v, "name", &name, MAX_NAME);
        }
        if r.scopes.is_empty() {
            v.add("scopes", "at least one scope is required");
        } else if r.scopes.len() > MAX_SCOPES {
            v.add("scopes", format!("at most {MAX_SCOPES} scopes"));
        } else {
            for (i, s) in r.scopes.iter().enumerate() {
                if s.len() > MAX_SCOPE_LEN || !rbac::is_valid(s) {
                    v.add(
                        format!("scopes[{i}]"),
                        "must be a permission like service:resource:action (* wildcards allowed)",
                    );
                }
            }
        }
        let lifetime = match r.ttl.as_ref().map(ttl) {
            Some(Err(problem)) => {
                v.add("ttl", problem);
                None
            }
            Some(Ok(d)) => Some(d),
            None => None,
        };
        v.check()?;
        // A key never grants more than its creator holds.
        let mut denied = ErrorDetails::new();
        let mut missing = Vec::new();
        for (i, s) in r.scopes.iter().enumerate() {
            if !p.can(s) {
                denied.add_bad_request_violation(
                    format!("scopes[{i}]"),
                    "is not a permission you hold",
                );
                missing.push(s.as_str());
            }
        }
        if !missing.is_empty() {
            return Err(Status::with_error_details(
                Code::PermissionDenied,
                format!(
                    "a key cannot grant permissions you do not hold: {}",
                    missing.join(", ")
                ),
                denied,
            ));
        }
        let mut scopes: Vec<String> = Vec::with_capacity(r.scopes.len());
        for s in r.scopes {
            if !scopes.contains(&s) {
                scopes.push(s);
            }
        }
        let secret = tokens::secret(SECRET_PREFIX)?;
        let prefix: String = secret.chars().take(PREFIX_LEN).collect();
        let now = Utc::now();
        let mut conn = self.store.pg().await.map_err(AuthError::from)?;
        let row: KeyRow = diesel::insert_into(api_keys::table)
            .values((
                api_keys::id.eq(trellis_core::id::new_id()),
                api_keys::user_id.eq(p.user_id),
                api_keys::name.eq(&name),
                api_keys::scopes.eq(&scopes),
                api_keys::prefix.eq(&prefix),
                api_keys::secret_hash.eq(tokens::digest(&secret)),
                api_keys::created_at.eq(now),
                api_keys::expires_at.eq(lifetime.map(|d| now + d)),
            ))
            .returning(KeyRow::as_returning())
            .get_result(&mut conn)
            .await
            .map_err(AuthError::from)?;
        tracing::info!(user_id = %p.user_id, key_id = %row.id, "API key created");
        record(
            &mut conn,
            &origin,
            AuditEvent {
                actor_id: Some(p.user_id),
                action: "auth.api_key.created",
                target_type: "api_key",
                target_id: row.id.to_string(),
                details: serde_json::json!({ "name": name, "scopes": scopes }),
                ..Default::default()
            },
        )
        .await;
        Ok(Response::new(pb::CreateApiKeyResponse {
            api_key: Some(row.into_pb()),
            secret,
        }))
    }

    pub(crate) async fn rpc_list_api_keys(
        &self,
        req: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let p = authenticated(&req)?;
        p.require(MANAGE)?;
        let r = req.into_inner();
        let mut v = FieldViolations::new();
        let size = page_size(&mut v, r.page_size);
        v.check()?;
        let list = format!("api_keys:{}", p.user_id);
        let after: Option<(DateTime<Utc>, Uuid)> = self.pages.open(&r.page_token, &list)?;
        let mut conn = self.store.pg().await.map_err(AuthError::from)?;
        let mut q = api_keys::table
            .filter(api_keys::user_id.eq(p.user_id))
            .into_boxed();
        if let Some((at, id)) = after {
            q = q.filter(
                api_keys::created_at
                    .lt(at)
                    .or(api_keys::created_at.eq(at).and(api_keys::id.lt(id))),
            );
        }
        let mut rows: Vec<KeyRow> = q
            .order((api_keys::created_at.desc(), api_keys::id.desc()))
            .limit(size as i64 + 1)
            .select(KeyRow::as_select())
            .load(&mut conn)
            .await
            .map_err(AuthError::from)?;
        let next_page_token = if rows.len() > size {
            rows.truncate(size);
            rows.last()
                .map(|k| self.pages.seal(&list, &(k.created_at, k.id)))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListApiKeysResponse {
            api_keys: rows.into_iter().map(KeyRow::into_pb).collect(),
            next_page_token,
        }))
    }

    pub(crate) async fn rpc_revoke_api_key(
        &self,
        req: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let p = authenticated(&req)?;
        p.require(MANAGE)?;
        let origin = Origin::of(&req);
        let id = match trellis_core::id::parse_id(&req.into_inner().id) {
            Ok(id) => id,
            Err(problem) => {
                let mut v = FieldViolations::new();
                v.add("id", problem);
                return Err(v.into_status());
            }
        };
        let mut conn = self.store.pg().await.map_err(AuthError::from)?;
        let revoked = diesel::update(
            api_keys::table
                .filter(api_keys::id.eq(id))
                .filter(api_keys::user_id.eq(p.user_id))
                .filter(api_keys::revoked_at.is_null()),
        )
        .set(api_keys::revoked_at.eq(Some(Utc::now())))
        .execute(&mut conn)
        .await
        .map_err(AuthError::from)?;
        if revoked == 0 {
            // Revoking one's own revoked key again is fine; another user's
            // key is as absent as a made-up one.
            let own: i64 = api_keys::table
                .filter(api_keys::id.eq(id))
                .filter(api_keys::user_id.eq(p.user_id))
                .count()
                .get_result(&mut conn)
                .await
                .map_err(AuthError::from)?;
            if own == 0 {
                return Err(AuthError::NotFound.into());
            }
            return Ok(Response::new(pb::RevokeApiKeyResponse {}));
        }
        self.revocations.publish(Revocation::ApiKey(id)).await?;
        tracing::info!(user_id = %p.user_id, key_id = %id, "API key revoked");
        record(
            &mut conn,
            &origin,
            AuditEvent {
                actor_id: Some(p.user_id),
                action: "auth.api_key.revoked",
                target_type: "api_key",
                target_id: id.to_string(),
                ..Default::default()
            },
        )
        .await;
        Ok(Response::new(pb::RevokeApiKeyResponse {}))
    }

    /// The principal of a live API key (not revoked, not expired, owner
    /// active), with the key's expiry; `None` for anything else. Reads the
    /// database directly: this is what Introspect answers for keys, so it
    /// must not go through the verifier (which asks Introspect).
    pub(crate) async fn api_key_principal(
        &self,
        secret: &str,
    ) -> Result<Option<(Principal, Option<DateTime<Utc>>)>, AuthError> {
        if !secret.starts_with(SECRET_PREFIX) || secret.len() > MAX_SECRET {
            return Ok(None);
        }
        let now = Utc::now();
        let mut conn = self.store.pg().await?;
        let found: Option<LiveKey> = api_keys::table
            .inner_join(users::table)
            .filter(api_keys::secret_hash.eq(tokens::digest(secret)))
            .filter(api_keys::revoked_at.is_null())
            .filter(
                api_keys::expires_at
                    .is_null()
                    .or(api_keys::expires_at.gt(now)),
            )
            .filter(users::status.eq(accounts::ACTIVE))
            .filter(users::deleted_at.is_null())
            .select((
                api_keys::id,
                api_keys::user_id,
                api_keys::scopes,
                api_keys::expires_at,
                api_keys::last_used_at,
            ))
            .first(&mut conn)
            .await
            .optional()?;
        let Some((id, user_id, scopes, expires_at, last_used_at)) = found else {
            return Ok(None);
        };
        if self.revocations.is_api_key_revoked(id) {
            return Ok(None);
        }
        let (_, held) = accounts::roles_and_permissions(&mut conn, user_id).await?;
        let permissions: Vec<String> = scopes
            .into_iter()
            .filter(|s| rbac::any_permits(&held, s))
            .collect();
        let touch_before = now - chrono::Duration::seconds(TOUCH_EVERY_SECONDS);
        if last_used_at.is_none_or(|t| t < touch_before) {
            diesel::update(
                api_keys::table.filter(api_keys::id.eq(id)).filter(
                    api_keys::last_used_at
                        .is_null()
                        .or(api_keys::last_used_at.lt(touch_before)),
                ),
            )
            .set(api_keys::last_used_at.eq(Some(now)))
            .execute(&mut conn)
            .await?;
        }
        Ok(Some((
            Principal {
                user_id,
                session_id: None,
                roles: Vec::new(),
                permissions,
                credential: CredentialKind::ApiKey { key_id: id },
                expires_at: expires_at.map(|t| t.timestamp()),
            },
            expires_at,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(seconds: i64, nanos: i32) -> prost_types::Duration {
        prost_types::Duration { seconds, nanos }
    }

    #[test]
    fn lifetimes() {
        assert_eq!(ttl(&d(2, 0)), Ok(chrono::Duration::seconds(2)));
        assert_eq!(ttl(&d(0, 500)), Ok(chrono::Duration::nanoseconds(500)));
        assert!(ttl(&d(MAX_TTL_SECONDS, 0)).is_ok());
        assert_eq!(ttl(&d(0, 0)), Err("must be positive"));
        assert_eq!(ttl(&d(-5, 0)), Err("must be positive"));
        assert_eq!(ttl(&d(MAX_TTL_SECONDS, 1)), Err("must be at most 2 years"));
        assert_eq!(ttl(&d(i64::MAX, 0)), Err("must be at most 2 years"));
        assert_eq!(ttl(&d(1, -1)), Err("is not a valid duration"));
        assert_eq!(ttl(&d(0, 1_000_000_000)), Err("is not a valid duration"));
    }
}
