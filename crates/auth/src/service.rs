//! `trellis.auth.v1.AuthService`. Handlers turn wire requests into checked
//! values, do the work through the store and the key ring, and answer with
//! the error model's statuses.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use jsonwebtoken::Header;
use prost::Message;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use trellis_core::config::AuthConfig;
use trellis_core::error::FieldViolations;
use trellis_core::page::PageTokens;
use trellis_mesh::layers::authn::cookie;
use trellis_mesh::{CredentialKind, Principal, authenticated};
use trellis_proto::auth::v1 as pb;
use trellis_proto::auth::v1::auth_service_server::{AuthService, AuthServiceServer};
use trellis_store::Store;
use trellis_store::accounts::{self, Account, NewAccount};
use trellis_store::audit::AuditEvent;
use trellis_store::schema::users;
use uuid::Uuid;

use crate::audit::{Origin, record};
use crate::error::AuthError;
use crate::keys::{KeyRing, KeySeal};
use crate::password::PasswordHasher;
use crate::revocation::{Revocation, Revocations};
use crate::sessions;
use crate::tokens::{self, Claims};
use crate::validate;
use crate::verifier::TokenVerifier;

/// Cookie carrying the refresh token for browsers; scoped to AuthService.
pub const REFRESH_COOKIE: &str = "trellis_refresh";

/// The role every self-registered account gets.
pub const DEFAULT_ROLE: &str = "member";

#[derive(Clone)]
pub struct AuthSvc {
    pub(crate) cfg: Arc<AuthConfig>,
    pub(crate) store: Store,
    pub(crate) hasher: PasswordHasher,
    pub(crate) keys: KeyRing,
    pub(crate) verifier: Arc<TokenVerifier>,
    pub(crate) revocations: Arc<Revocations>,
    pub(crate) pages: PageTokens,
}

impl std::fmt::Debug for AuthSvc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSvc").finish_non_exhaustive()
    }
}

/// The generated server around an [`AuthSvc`], with message limits applied.
/// `seal`: seals the signing keys at rest (`secrets.signing_key_secret`).
#[allow(clippy::too_many_arguments)]
pub fn service(
    cfg: &AuthConfig,
    max_message_bytes: usize,
    store: Store,
    hasher: PasswordHasher,
    verifier: Arc<TokenVerifier>,
    revocations: Arc<Revocations>,
    pages: PageTokens,
    seal: Option<Arc<KeySeal>>,
) -> Result<AuthServiceServer<AuthSvc>, AuthError> {
    let svc = AuthSvc::new(cfg, store, hasher, verifier, revocations, pages, seal);
    Ok(AuthServiceServer::new(svc)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes))
}

/// Who is refreshing, as far as the server can tell (user agent and
/// address): the grace window hands a rotated token's successor only to
/// the client that rotated it.
fn client_fingerprint(origin: &Origin) -> Vec<u8> {
    tokens::digest(&format!("{}\0{}", origin.user_agent, origin.ip))
}

pub(crate) fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub(crate) fn chrono_dur(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::days(1))
}

fn principal_pb(p: &Principal) -> pb::Principal {
    let (credential_type, api_key_id) = match &p.credential {
        CredentialKind::AccessToken { .. } => ("access_token", String::new()),
        CredentialKind::ApiKey { key_id } => ("api_key", key_id.to_string()),
    };
    pb::Principal {
        user_id: p.user_id.to_string(),
        session_id: p.session_id.map(|s| s.to_string()).unwrap_or_default(),
        roles: p.roles.clone(),
        permissions: p.permissions.clone(),
        credential_type: credential_type.to_string(),
        api_key_id,
    }
}

impl AuthSvc {
    pub fn new(
        cfg: &AuthConfig,
        store: Store,
        hasher: PasswordHasher,
        verifier: Arc<TokenVerifier>,
        revocations: Arc<Revocations>,
        pages: PageTokens,
        seal: Option<Arc<KeySeal>>,
    ) -> AuthSvc {
        AuthSvc {
            pages,
            hasher,
            keys: KeyRing::new(store.clone(), cfg.access_token_ttl, seal),
            cfg: Arc::new(cfg.clone()),
            store,
            verifier,
            revocations,
        }
    }

    pub(crate) async fn account_pb(
        &self,
        conn: &mut AsyncPgConnection,
        a: &Account,
    ) -> Result<pb::Account, AuthError> {
        let (roles, _) = accounts::roles_and_permissions(conn, a.id).await?;
        Ok(pb::Account {
            id: a.id.to_string(),
            email: a.email.clone(),
            username: a.username.clone(),
            display_name: a.display_name.clone(),
            email_verified: a.email_verified_at.is_some(),
            roles,
            totp_enabled: a.totp_enabled_at.is_some(),
            create_time: Some(ts(a.created_at)),
        })
    }

    /// Signs an access token for `account` in `session_id`.
    async fn access_token(
        &self,
        conn: &mut AsyncPgConnection,
        account: &Account,
        session_id: Uuid,
    ) -> Result<(String, DateTime<Utc>), AuthError> {
        let (roles, perms) = accounts::roles_and_permissions(conn, account.id).await?;
        let key = self.keys.current().await?;
        let now = Utc::now();
        let exp = now + chrono_dur(self.cfg.access_token_ttl);
        let claims = Claims {
            sub: account.id.to_string(),
            sid: session_id.to_string(),
            roles,
            perms,
            ver: account.token_version,
            jti: URL_SAFE_NO_PAD.encode(Uuid::now_v7().as_bytes()),
            iss: self.cfg.issuer.clone(),
            aud: self.cfg.audience.clone(),
            iat: now.timestamp(),
            nbf: now.timestamp(),
            exp: exp.timestamp(),
        };
        let mut header = Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(key.kid);
        let token = jsonwebtoken::encode(&header, &claims, &key.encoding)
            .map_err(|e| AuthError::Internal(format!("signing: {e}")))?;
        Ok((token, exp))
    }

    /// Opens a session for `account` and returns its first token pair.
    async fn open_session(
        &self,
        conn: &mut AsyncPgConnection,
        account: &Account,
        ua: &str,
        ip: &str,
    ) -> Result<pb::TokenPair, AuthError> {
        let refresh = tokens::secret("rt_")?;
        let refresh_exp = Utc::now() + chrono_dur(self.cfg.refresh_token_ttl);
        let session_id = sessions::create(
            conn,
            account.id,
            ua,
            ip,
            &tokens::digest(&refresh),
            refresh_exp,
        )
        .await?;
        let (access, access_exp) = self.access_token(conn, account, session_id).await?;
        Ok(pb::TokenPair {
            access_token: access,
            access_token_expire_time: Some(ts(access_exp)),
            refresh_token: refresh,
            refresh_token_expire_time: Some(ts(refresh_exp)),
            token_type: "Bearer".into(),
            session_id: session_id.to_string(),
        })
    }

    /// Sets the browser cookies for a token pair on a response.
    fn set_cookies<T>(&self, resp: &mut Response<T>, pair: &pb::TokenPair) {
        let secure = if self.cfg.cookie_secure {
            "; Secure"
        } else {
            ""
        };
        let access_age = self.cfg.access_token_ttl.as_secs();
        let refresh_age = self.cfg.refresh_token_ttl.as_secs();
        let cookies = [
            format!(
                "{}={}; Path=/; Max-Age={access_age}; HttpOnly; SameSite=Strict{secure}",
                trellis_mesh::layers::authn::ACCESS_COOKIE,
                pair.access_token
            ),
            format!(
                "{REFRESH_COOKIE}={}; Path=/trellis.auth.v1.AuthService/; Max-Age={refresh_age}; HttpOnly; SameSite=Strict{secure}",
                pair.refresh_token
            ),
        ];
        for c in cookies {
            if let Ok(v) = MetadataValue::try_from(c) {
                resp.metadata_mut().append("set-cookie", v);
            }
        }
    }

    fn clear_cookies<T>(&self, resp: &mut Response<T>) {
        for c in [
            format!(
                "{}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict",
                trellis_mesh::layers::authn::ACCESS_COOKIE
            ),
            format!(
                "{REFRESH_COOKIE}=; Path=/trellis.auth.v1.AuthService/; Max-Age=0; HttpOnly; SameSite=Strict"
            ),
        ] {
            if let Ok(v) = MetadataValue::try_from(c) {
                resp.metadata_mut().append("set-cookie", v);
            }
        }
    }

    /// Counts a failed login (or second-factor check), locking the account
    /// once the threshold is reached within the window — each lockout
    /// doubles the next one — and records the failure (`action`, with
    /// `reason`) and any lockout in the audit trail.
    pub(crate) async fn record_failure(
        &self,
        conn: &mut AsyncPgConnection,
        origin: &Origin,
        a: &Account,
        action: &'static str,
        reason: &'static str,
    ) -> Result<bool, AuthError> {
        let locked = self.count_failure(conn, a).await?;
        let event = |action, reason: &str| AuditEvent {
            actor_id: Some(a.id),
            action,
            target_type: "user",
            target_id: a.id.to_string(),
            details: serde_json::json!({ "reason": reason }),
            ..Default::default()
        };
        record(conn, origin, event(action, reason)).await;
        if let Some(lock) = locked {
            let mut e = event("auth.account.locked", "too many failed logins");
            e.details["lock_seconds"] = lock.num_seconds().into();
            record(conn, origin, e).await;
        }
        Ok(locked.is_some())
    }

    /// The counting half of [`Self::record_failure`]: the lock's length
    /// when this failure locked the account.
    async fn count_failure(
        &self,
        conn: &mut AsyncPgConnection,
        a: &Account,
    ) -> Result<Option<chrono::Duration>, AuthError> {
        let now = Utc::now();
        let in_window = a
            .first_failed_at
            .is_some_and(|t| now - t < chrono_dur(self.cfg.lockout_window));
        let failed = if in_window { a.failed_logins + 1 } else { 1 };
        let first = if in_window {
            a.first_failed_at
        } else {
            Some(now)
        };
        if failed as u32 >= self.cfg.lockout_threshold {
            let factor = 1i64 << a.lockouts.clamp(0, 10);
            let lock =
                (chrono_dur(self.cfg.lockout_base) * factor as i32).min(chrono::Duration::days(1));
            diesel::update(users::table.filter(users::id.eq(a.id)))
                .set((
                    users::failed_logins.eq(0),
                    users::first_failed_at.eq(None::<DateTime<Utc>>),
                    users::locked_until.eq(Some(now + lock)),
                    users::lockouts.eq(a.lockouts + 1),
                ))
                .execute(conn)
                .await?;
            tracing::warn!(user_id = %a.id, lock_seconds = lock.num_seconds(), "account locked after failed logins");
            return Ok(Some(lock));
        } else {
            diesel::update(users::table.filter(users::id.eq(a.id)))
                .set((
                    users::failed_logins.eq(failed),
                    users::first_failed_at.eq(first),
                ))
                .execute(conn)
                .await?;
        }
        Ok(None)
    }

    fn grace_key(&self, hash: &[u8]) -> String {
        self.store
            .key(&format!("auth:grace:{}", URL_SAFE_NO_PAD.encode(hash)))
    }

    async fn do_refresh(
        &self,
        presented: &str,
        origin: &Origin,
    ) -> Result<pb::TokenPair, AuthError> {
        let hash = tokens::digest(presented);
        let grace_key = self.grace_key(&hash);
        let client = client_fingerprint(origin);
        let grace = chrono_dur(self.cfg.refresh_grace);
        let mut conn = self.store.pg().await?;
        let this = self.clone();
        let outcome = conn
            .transaction::<_, AuthError, _>(async move |conn| {
                let Some(row) = sessions::lock_token(conn, &hash).await? else {
                    return Err(AuthError::Unauthenticated("invalid refresh token"));
                };
                let now = Utc::now();
                if row.session_revoked_at.is_some() {
                    return Err(AuthError::Unauthenticated("session has ended"));
                }
                if row.token_expires_at <= now || row.session_expires_at <= now {
                    return Err(AuthError::Unauthenticated("refresh token expired"));
                }
                if let Some(used) = row.used_at {
                    if now - used <= grace {
                        // A concurrent refresh by the same client: hand back
                        // the successor the first one received. Anyone else
                        // presenting the spent token is treated as a thief.
                        let mut r = this.store.redis().await?;
                        let cached: Option<Vec<u8>> = redis::cmd("GET")
                            .arg(&grace_key)
                            .query_async(&mut *r)
                            .await?;
                        if let Some(pair) = cached
                            .as_deref()
                            .and_then(|b| b.strip_prefix(client.as_slice()))
                            .and_then(|b| pb::TokenPair::decode(b).ok())
                        {
                            return Ok(Ok(pair));
                        }
                    }
                    // Reuse of a spent token: assume theft, end the family.
                    sessions::revoke(conn, row.session_id, row.user_id, "refresh token reuse")
                        .await?;
                    return Ok(Err((row.session_id, row.user_id)));
                }
                let account = accounts::find(conn, row.user_id)
                    .await?
                    .filter(|a| a.status == accounts::ACTIVE)
                    .ok_or(AuthError::Unauthenticated("account is not active"))?;
                sessions::spend(conn, &hash, row.session_id).await?;
                let refresh = tokens::secret("rt_")?;
                let refresh_exp =
                    (now + chrono_dur(this.cfg.refresh_token_ttl)).min(row.session_expires_at);
                sessions::insert_token(
                    conn,
                    row.session_id,
                    &tokens::digest(&refresh),
                    refresh_exp,
                )
                .await?;
                let (access, access_exp) =
                    this.access_token(conn, &account, row.session_id).await?;
                let pair = pb::TokenPair {
                    access_token: access,
                    access_token_expire_time: Some(ts(access_exp)),
                    refresh_token: refresh,
                    refresh_token_expire_time: Some(ts(refresh_exp)),
                    token_type: "Bearer".into(),
                    session_id: row.session_id.to_string(),
                };
                // Cached before commit: a concurrent refresh waiting on the
                // row lock finds it as soon as it can read the spent row.
                let mut cached = client.clone();
                cached.extend_from_slice(&pair.encode_to_vec());
                let mut r = this.store.redis().await?;
                redis::cmd("SET")
                    .arg(&grace_key)
                    .arg(cached)
                    .arg("PX")
                    .arg(this.cfg.refresh_grace.as_millis().max(1) as u64)
                    .query_async::<()>(&mut *r)
                    .await?;
                Ok(Ok(pair))
            })
            .await?;
        match outcome {
            Ok(pair) => Ok(pair),
            Err((session, user)) => {
                tracing::warn!(session_id = %session, "refresh token reused; session revoked");
                self.revocations
                    .publish(Revocation::Session(session))
                    .await?;
                record(
                    &mut conn,
                    origin,
                    AuditEvent {
                        actor_id: Some(user),
                        action: "auth.session.reuse_detected",
                        target_type: "session",
                        target_id: session.to_string(),
                        ..Default::default()
                    },
                )
                .await;
                Err(AuthError::Unauthenticated(
                    "refresh token reuse detected; the session has been ended",
                ))
            }
        }
    }
}

#[tonic::async_trait]
impl AuthService for AuthSvc {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let origin = Origin::of(&req);
        self.limit_ip(&origin, "register", self.cfg.register_per_ip_per_minute)
            .await?;
        let r = req.into_inner();
        let mut v = FieldViolations::new();
        let email = r.email.trim().to_string();
        let username = r.username.trim().to_string();
        validate::email(&mut v, "email", &email);
        validate::username(&mut v, "username", &username);
        validate::password(&mut v, "password", &r.password, &email, &username);
        validate::text(
            &mut v,
            "display_name",
            &r.display_name,
            validate::MAX_DISPLAY_NAME,
        );
        v.check()?;
        let hash = self.hasher.hash(r.password).await?;
        let display = if r.display_name.trim().is_empty() {
            username.clone()
        } else {
            r.display_name.trim().to_string()
        };
        let mut conn = self.store.pg().await.map_err(AuthError::from)?;
        let account = accounts::create(
            &mut conn,
            NewAccount {
                id: trellis_core::id::new_id(),
                email: &email,
                username: &username,
                password_hash: &hash,
                display_name: &display,
            },
            &[DEFAULT_ROLE],
        )
        .await
        .map_err(AuthError::from)?;
        tracing::info!(user_id = %account.id, "account registered");
        record(
            &mut conn,
            &origin,
            AuditEvent {
                actor_id: Some(account.id),
                action: "auth.account.registered",
                target_type: "user",
                target_id: account.id.to_string(),
                ..Default::default()
            },
        )
        .await;
        let tokens = self
            .open_session(&mut conn, &account, &origin.user_agent, &origin.ip)
            .await?;
        let account_pb = self.account_pb(&mut conn, &account).await?;
        let mut resp = Response::new(pb::RegisterResponse {
            account: Some(account_pb),
            tokens: Some(tokens.clone()),
        });
        self.set_cookies(&mut resp, &tokens);
        Ok(resp)
    }

    async fn login(
        &self,
        req: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let origin = Origin::of(&req);
        self.limit_ip(&origin, "login", self.cfg.login_per_ip_per_minute)
            .await?;
        let r = req.into_inner();
        let mut v = FieldViolations::new();
        let login = r.login.trim();
        if login.is_empty() {
            v.add("login", "is required");
        } else if login.len() > validate::MAX_EMAIL {
            v.add("login", "must be at most 255 characters");
        } else if !trellis_core::text::is_single_line(login) {
            v.add("login", "must not contain control characters");
        }
        if r.password.is_empty() {
            v.add("password", "is required");
        } else if r.password.chars().count() > 128 {
            v.add("password", "must be at most 128 characters");
        }
        v.check()?;
        let mut conn = self.store.pg().await.map_err(AuthError::from)?;
        let account = accounts::find_by_login(&mut conn, login)
            .await
            .map_err(AuthError::from)?;
        let ok = self
            .hasher
            .verify(
                r.password.clone(),
                account.as_ref().map(|a| a.password_hash.clone()),
            )
            .await?;
        let failed = |actor: Option<Uuid>, reason: &'static str| AuditEvent {
            actor_id: actor,
            action: "auth.login.failed",
            target_type: "user",
            target_id: actor.map(|a| a.to_string()).unwrap_or_default(),
            details: serde_json::json!({ "reason": reason, "login": login.chars().take(255).collect::<String>() }),
            ..Default::default()
        };
        let Some(account) = account else {
            tracing::info!("login failed: unknown account");
            record(&mut conn, &origin, failed(None, "unknown account")).await;
            // Answered as an account would be, lockout included.
            if let Some(left) = self.ghost_locked(login).await {
                return Err(AuthError::Locked(left).into());
            }
            self.ghost_failed(login).await;
            return Err(AuthError::BadCredentials.into());
        };
        let now = Utc::now();
        if let Some(until) = account.locked_until.filter(|u| *u > now) {
            let left = (until - now).to_std().unwrap_or(Duration::from_secs(1));
            record(
                &mut conn,
                &origin,
                failed(Some(account.id), "account locked"),
            )
            .await;
            return Err(AuthError::Locked(left).into());
        }
        if !ok {
            tracing::info!(user_id = %account.id, "login failed: wrong password");
            self.record_failure(
                &mut conn,
                &origin,
                &account,
                "auth.login.failed",
                "wrong password",
            )
            .await?;
            return Err(AuthError::BadCredentials.into());
        }
        if account.status != accounts::ACTIVE {
            record(
                &mut conn,
                &origin,
                failed(Some(account.id), "account not active"),
            )
            .await;
            return Err(AuthError::Denied("account is not active").into());
        }
        if account.totp_enabled_at.is_some() {
            self.check_second_factor(&mut conn, &origin, &account, &r.totp_code, &r.recovery_code)
                .await?;
        }
        if account.failed_logins > 0 || account.lockouts > 0 || account.locked_until.is_some() {
            diesel::update(users::table.filter(users::id.eq(account.id)))
                .set((
                    users::failed_logins.eq(0),
                    users::first_failed_at.eq(None::<DateTime<Utc>>),
                    users::locked_until.eq(None::<DateTime<Utc>>),
                    users::lockouts.eq(0),
                ))
                .execute(&mut conn)
                .await
                .map_err(AuthError::from)?;
        }
        let tokens = self
            .open_session(&mut conn, &account, &origin.user_agent, &origin.ip)
            .await?;
        tracing::info!(user_id = %account.id, session_id = %tokens.session_id, "login succeeded");
        record(
            &mut conn,
            &origin,
            AuditEvent {
                actor_id: Some(account.id),
                action: "auth.login.succeeded",
                target_type: "session",
                target_id: tokens.session_id.clone(),
                ..Default::default()
            },
        )
        .await;
        let account_pb = self.account_pb(&mut conn, &account).await?;
        let mut resp = Response::new(pb::LoginResponse {
            account: Some(account_pb),
            tokens: Some(tokens.clone()),
        });
        self.set_cookies(&mut resp, &tokens);
        Ok(resp)
    }

    async fn refresh(
        &self,
        req: Request<pb::RefreshRequest>,
    ) -> Result<Response<pb::RefreshResponse>, Status> {
        let origin = Origin::of(&req);
        let from_cookie = cookie(req.metadata().as_ref(), REFRESH_COOKIE);
        let presented = match req.into_inner().refresh_token {
            t if !t.is_empty() => t,
            _ => from_cookie.ok_or_else(|| {
                let mut v = FieldViolations::new();
                v.add("refresh_token", "is required (or the session cookie)");
                v.into_status()
            })?,
        };
        if presented.len() > 200 {
            return Err(AuthError::Unauthenticated("invalid refresh token").into());
        }
        let tokens = self.do_refresh(&presented, &origin).await?;
        let mut resp = Response::new(pb::RefreshResponse {
            tokens: Some(tokens.clone()),
        });
        self.set_cookies(&mut resp, &tokens);
        Ok(resp)
    }

    async fn logout(
        &self,
        req: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        let p = authenticated(&req)?;
        let origin = Origin::of(&req);
        let mut conn = self.store.pg().await.map_err(AuthError::from)?;
        if let Some(sid) = p.session_id {
            sessions::revoke(&mut conn, sid, p.user_id, "logout")
                .await
                .map_err(AuthError::from)?;
            self.revocations.publish(Revocation::Session(sid)).await?;
            record(
                &mut conn,
                &origin,
                AuditEvent {
                    actor_id: Some(p.user_id),
                    action: "auth.logout",
                    target_type: "session",
                    target_id: sid.to_string(),
                    ..Default::default()
                },
            )
            .await;
        }
        if let CredentialKind::AccessToken { token_id } = &p.credential {
            self.revocations
                .publish(Revocation::Token(token_id.clone()))
                .await?;
        }
        let mut resp = Response::new(pb::LogoutResponse {});
        self.clear_cookies(&mut resp);
        Ok(resp)
    }

    async fn logout_all(
        &self,
        req: Request<pb::LogoutAllRequest>,
    ) -> Result<Response<pb::LogoutAllResponse>, Status> {
        let p = authenticated(&req)?;
        p.require(crate::api_keys::SESSIONS)?;
        let origin = Origin::of(&req);
        let mut conn = self.store.pg().await.map_err(AuthError::from)?;
        let version = accounts::bump_token_version(&mut conn, p.user_id)
            .await
            .map_err(AuthError::from)?;
        self.end_all_sessions(&mut conn, p.user_id, version, "logout all")
            .await?;
        tracing::info!(user_id = %p.user_id, "logged out everywhere");
        record(
            &mut conn,
            &origin,
            AuditEvent {
                actor_id: Some(p.user_id),
                action: "auth.sessions.ended_all",
                target_type: "user",
                target_id: p.user_id.to_string(),
                ..Default::default()
            },
        )
        .await;
        let mut resp = Response::new(pb::LogoutAllResponse {});
        self.clear_cookies(&mut resp);
        Ok(resp)
    }

    async fn list_sessions(
        &self,
        req: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        self.rpc_list_sessions(req).await
    }

    async fn revoke_session(
        &self,
        req: Request<pb::RevokeSessionRequest>,
    ) -> Result<Response<pb::RevokeSessionResponse>, Status> {
        self.rpc_revoke_session(req).await
    }

    async fn change_password(
        &self,
        req: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        self.rpc_change_password(req).await
    }

    async fn request_password_reset(
        &self,
        req: Request<pb::RequestPasswordResetRequest>,
    ) -> Result<Response<pb::RequestPasswordResetResponse>, Status> {
        self.rpc_request_password_reset(req).await
    }

    async fn reset_password(
        &self,
        req: Request<pb::ResetPasswordRequest>,
    ) -> Result<Response<pb::ResetPasswordResponse>, Status> {
        self.rpc_reset_password(req).await
    }

    async fn request_email_verification(
        &self,
        req: Request<pb::RequestEmailVerificationRequest>,
    ) -> Result<Response<pb::RequestEmailVerificationResponse>, Status> {
        self.rpc_request_email_verification(req).await
    }

    async fn verify_email(
        &self,
        req: Request<pb::VerifyEmailRequest>,
    ) -> Result<Response<pb::VerifyEmailResponse>, Status> {
        self.rpc_verify_email(req).await
    }

    async fn enroll_totp(
        &self,
        req: Request<pb::EnrollTotpRequest>,
    ) -> Result<Response<pb::EnrollTotpResponse>, Status> {
        self.rpc_enroll_totp(req).await
    }

    async fn confirm_totp(
        &self,
        req: Request<pb::ConfirmTotpRequest>,
    ) -> Result<Response<pb::ConfirmTotpResponse>, Status> {
        self.rpc_confirm_totp(req).await
    }

    async fn disable_totp(
        &self,
        req: Request<pb::DisableTotpRequest>,
    ) -> Result<Response<pb::DisableTotpResponse>, Status> {
        self.rpc_disable_totp(req).await
    }

    async fn create_api_key(
        &self,
        req: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        self.rpc_create_api_key(req).await
    }

    async fn list_api_keys(
        &self,
        req: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        self.rpc_list_api_keys(req).await
    }

    async fn revoke_api_key(
        &self,
        req: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        self.rpc_revoke_api_key(req).await
    }

    async fn get_jwks(
        &self,
        _: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        let keys = self.keys.public_keys().await?;
        Ok(Response::new(pb::GetJwksResponse {
            keys: keys
                .into_iter()
                .map(|(kid, public)| pb::Jwk {
                    kty: "OKP".into(),
                    crv: "Ed25519".into(),
                    x: URL_SAFE_NO_PAD.encode(public),
                    kid,
                    alg: "EdDSA".into(),
                    r#use: "sig".into(),
                })
                .collect(),
        }))
    }

    async fn rotate_signing_key(
        &self,
        req: Request<pb::RotateSigningKeyRequest>,
    ) -> Result<Response<pb::RotateSigningKeyResponse>, Status> {
        let p = authenticated(&req)?;
        p.require("auth:keys:rotate")?;
        let origin = Origin::of(&req);
        let kid = self.keys.rotate().await?;
        tracing::info!(%kid, by = %p.user_id, "signing key rotated");
        let mut conn = self.store.pg().await.map_err(AuthError::from)?;
        record(
            &mut conn,
            &origin,
            AuditEvent {
                actor_id: Some(p.user_id),
                action: "auth.signing_key.rotated",
                target_type: "signing_key",
                target_id: kid.clone(),
                ..Default::default()
            },
        )
        .await;
        Ok(Response::new(pb::RotateSigningKeyResponse { kid }))
    }

    async fn introspect(
        &self,
        req: Request<pb::IntrospectRequest>,
    ) -> Result<Response<pb::IntrospectResponse>, Status> {
        let origin = Origin::of(&req);
        let token = req.into_inner().token;
        if token.is_empty() {
            let mut v = FieldViolations::new();
            v.add("token", "is required");
            return Err(v.into_status());
        }
        self.limit_ip(&origin, "introspect", self.cfg.introspect_per_ip_per_minute)
            .await?;
        // API keys are looked up here, not through the verifier: the
        // verifier asks this very RPC about them.
        if token.starts_with(crate::api_keys::SECRET_PREFIX) {
            let found = self.api_key_principal(&token).await?;
            return Ok(Response::new(match found {
                Some((p, expires_at)) => pb::IntrospectResponse {
                    active: true,
                    scope: p.permissions.join(" "),
                    principal: Some(principal_pb(&p)),
                    expire_time: expires_at.map(ts),
                    claims: None,
                },
                None => pb::IntrospectResponse::default(),
            }));
        }
        Ok(Response::new(match self.verifier.verify(&token).await {
            Ok(found) => {
                let (p, c) = (&found.0, &found.1);
                let at = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
                pb::IntrospectResponse {
                    active: true,
                    scope: p.permissions.join(" "),
                    principal: Some(principal_pb(p)),
                    expire_time: at(c.exp),
                    claims: Some(pb::TokenClaims {
                        subject: c.sub.clone(),
                        session_id: c.sid.clone(),
                        issuer: c.iss.clone(),
                        audience: c.aud.clone(),
                        token_id: c.jti.clone(),
                        issue_time: at(c.iat),
                        not_before_time: at(c.nbf),
                        expire_time: at(c.exp),
                        token_version: c.ver,
                        roles: c.roles.clone(),
                    }),
                }
            }
            Err(_) => pb::IntrospectResponse::default(),
        }))
    }

    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let p = authenticated(&req)?;
        let mut conn = self.store.pg().await.map_err(AuthError::from)?;
        let account = match accounts::find(&mut conn, p.user_id)
            .await
            .map_err(AuthError::from)?
        {
            Some(a) => Some(self.account_pb(&mut conn, &a).await?),
            None => None,
        };
        Ok(Response::new(pb::WhoAmIResponse {
            principal: Some(principal_pb(&p)),
            account,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_tell_clients_apart() {
        let o = |ua: &str, ip: &str| Origin {
            user_agent: ua.into(),
            ip: ip.into(),
            ..Default::default()
        };
        let a = client_fingerprint(&o("app/1", "10.0.0.1"));
        assert_eq!(a, client_fingerprint(&o("app/1", "10.0.0.1")));
        assert_eq!(a.len(), 32);
        assert_ne!(a, client_fingerprint(&o("app/1", "10.0.0.2")), "address");
        assert_ne!(a, client_fingerprint(&o("app/2", "10.0.0.1")), "user agent");
    }
}
