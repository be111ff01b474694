//! Passwords and e-mail: ChangePassword, the reset flow
//! (RequestPasswordReset → mailed single-use token → ResetPassword) and
//! e-mail verification (RequestEmailVerification → token → VerifyEmail).
//! Tokens are random, stored hashed, expire, and work once.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use tonic::{Request, Response, Status};
use trellis_core::error::FieldViolations;
use trellis_mesh::authenticated;
use trellis_proto::auth::v1 as pb;
use trellis_store::accounts::{self, Account};
use trellis_store::audit::AuditEvent;
use trellis_store::schema::{auth_one_time_tokens, auth_sessions, users};
use uuid::Uuid;

use crate::api_keys::{EMAIL, PASSWORD};
use crate::audit::{Origin, record};
use crate::error::AuthError;
use crate::mail::{self, Mail};
use crate::revocation::Revocation;
use crate::service::{AuthSvc, chrono_dur};
use crate::tokens;
use crate::validate;

const RESET: &str = "password_reset";
const VERIFY: &str = "email_verification";

/// A one-time token as redeeming it needs: user, e-mail, used, expiry.
type TokenRow = (Uuid, String, Option<DateTime<Utc>>, DateTime<Utc>);

fn bad_token() -> Status {
    let mut v = FieldViolations::new();
    v.add("token", "is invalid, used or expired");
    v.into_status()
}

impl AuthSvc {
    /// Creates a single-use token for `purpose` and mails it to `to`.
    async fn mail_token(
        &self,
        conn: &mut AsyncPgConnection,
        account: &Account,
        purpose: &'static str,
        ttl: std::time::Duration,
    ) -> Result<(), AuthError> {
        let (prefix, subject, what) = match purpose {
            RESET => ("prt_", "Reset your Trellis password", "reset your password"),
            _ => (
                "evt_",
                "Verify your Trellis e-mail address",
                "verify your e-mail address",
            ),
        };
        let token = tokens::secret(prefix)?;
        diesel::insert_into(auth_one_time_tokens::table)
            .values((
                auth_one_time_tokens::token_hash.eq(tokens::digest(&token)),
                auth_one_time_tokens::user_id.eq(account.id),
                auth_one_time_tokens::purpose.eq(purpose),
                auth_one_time_tokens::email.eq(&account.email),
                auth_one_time_tokens::expires_at.eq(Utc::now() + chrono_dur(ttl)),
            ))
            .execute(conn)
            .await?;
        let minutes = ttl.as_secs() / 60;
        mail::send(
            conn,
            Mail {
                user_id: Some(account.id),
                to: account.email.clone(),
                subject: subject.into(),
                body: format!(
                    "Hello {},\n\nUse this code to {what}; it works once and expires in {minutes} minutes:\n\n{token}\n\nIf you did not ask for this, ignore this message.\n",
                    account.display_name
                ),
                purpose,
            },
        )
        .await
    }

    /// Ends every session and token of `user`, whose token version is
    /// already bumped to `version`, telling every replica.
    pub(crate) async fn end_all_sessions(
        &self,
        conn: &mut AsyncPgConnection,
        user: Uuid,
        version: i32,
        reason: &str,
    ) -> Result<(), AuthError> {
        crate::sessions::revoke_all(conn, user, reason).await?;
        self.revocations
            .publish(Revocation::UserBefore(user, version))
            .await
    }

    /// Ends every session of `user` except `keep`, telling every replica.
    async fn end_sessions_except(
        &self,
        conn: &mut AsyncPgConnection,
        user: Uuid,
        keep: Option<Uuid>,
        reason: &str,
    ) -> Result<(), AuthError> {
        let ended: Vec<Uuid> = diesel::update(
            auth_sessions::table
                .filter(auth_sessions::user_id.eq(user))
                .filter(auth_sessions::revoked_at.is_null())
                .filter(auth_sessions::id.ne(keep.unwrap_or(Uuid::nil()))),
        )
        .set((
            auth_sessions::revoked_at.eq(Utc::now()),
            auth_sessions::revoke_reason.eq(reason),
        ))
        .returning(auth_sessions::id)
        .get_results(conn)
        .await?;
        for sid in ended {
            self.revocations.publish(Revocation::Session(sid)).await?;
        }
        Ok(())
    }

    pub(crate) async fn rpc_change_password(
        &self,
        req: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        let p = authenticated(&req)?;
        p.require(PASSWORD)?;
        let origin = Origin::of(&req);
        let r = req.into_inner();
        let mut conn = self.store.pg().await.map_err(AuthError::from)?;
        let account = accounts::find(&mut conn, p.user_id)
            .await
            .map_err(AuthError::from)?
            .ok_or(AuthError::Unauthenticated("account no longer exists"))?;
        let mut v = FieldViolations::new();
        if r.current_password.is_empty() {
            v.add("current_password", "is required");
        }
        validate::password(
            &mut v,
            "new_password",
            &r.new_password,
            &account.email,
            &account.username,
        );
        if !r.new_password.is_empty() && r.new_password == r.current_password {
            v.add("new_password", "must differ from the current password");
        }
        v.check()?;
        if !self
            .hasher
            .verify(r.current_password, Some(account.password_hash.clone()))
            .await?
        {
            let mut v = FieldViolations::new();
            v.add("current_password", "is incorrect");
            return Err(v.into_status());
        }
        let hash = self.hasher.hash(r.new_password).await?;
        diesel::update(users::table.filter(users::id.eq(account.id)))
            .set((
                users::password_hash.eq(hash),
                users::updated_at.eq(Utc::now()),
            ))
            .execute(&mut conn)
            .await
            .map_err(AuthError::from)?;
        self.end_sessions_except(&mut conn, account.id, p.session_id, "password changed")
            .await?;
        record(
            &mut conn,
            &origin,
            AuditEvent {
                actor_id: Some(account.id),
                action: "auth.password.changed",
                target_type: "user",
                target_id: account.id.to_string(),
                changed_fields: vec!["password".into()],
                ..Default::default()
            },
        )
        .await;
        Ok(Response::new(pb::ChangePasswordResponse {}))
    }

    pub(crate) async fn rpc_request_password_reset(
        &self,
        req: Request<pb::RequestPasswordResetRequest>,
    ) -> Result<Response<pb::RequestPasswordResetResponse>, Status> {
        let origin = Origin::of(&req);
        self.limit_ip(
            &origin,
            "password_reset",
            self.cfg.password_reset_per_ip_per_minute,
        )
        .await?;
        let email = req.into_inner().email.trim().to_string();
        let mut v = FieldViolations::new();
        validate::email(&mut v, "email", &email);
        v.check()?;
        let mut conn = self.store.pg().await.map_err(AuthError::from)?;
        let account = users::table
            .filter(users::email.eq(&email))
            .filter(users::deleted_at.is_null())
            .filter(users::status.eq(accounts::ACTIVE))
            .select(Account::as_select())
            .first(&mut conn)
            .await
            .optional()
            .map_err(AuthError::from)?;
        // The answer is the same either way: no account enumeration.
        if let Some(account) = account {
            self.mail_token(&mut conn, &account, RESET, self.cfg.password_reset_ttl)
                .await?;
            record(
                &mut conn,
                &origin,
                AuditEvent {
                    actor_id: None,
                    action: "auth.password.reset_requested",
                    target_type: "user",
                    target_id: account.id.to_string(),
                    ..Default::default()
                },
            )
            .await;
        }
        Ok(Response::new(pb::RequestPasswordResetResponse {}))
    }

    /// Locks and returns the live token of `purpose`, or None.
    async fn take_token(
        conn: &mut AsyncPgConnection,
        token: &str,
        purpose: &str,
    ) -> Result<Option<(Uuid, String)>, diesel::result::Error> {
        let found: Option<TokenRow> = auth_one_time_tokens::table
            .filter(auth_one_time_tokens::token_hash.eq(tokens::digest(token)))
            .filter(auth_one_time_tokens::purpose.eq(purpose))
            .select((
                auth_one_time_tokens::user_id,
                auth_one_time_tokens::email,
                auth_one_time_tokens::used_at,
                auth_one_time_tokens::expires_at,
            ))
            .for_update()
            .first(conn)
            .await
            .optional()?;
        Ok(match found {
            Some((user, email, None, expires)) if expires > Utc::now() => {
                diesel::update(
                    auth_one_time_tokens::table
                        .filter(auth_one_time_tokens::token_hash.eq(tokens::digest(token))),
                )
                .set(auth_one_time_tokens::used_at.eq(Utc::now()))
                .execute(conn)
                .await?;
                Some((user, email))
            }
            _ => None,
        })
    }

    pub(crate) async fn rpc_reset_password(
        &self,
        req: Request<pb::ResetPasswordRequest>,
    ) -> Result<Response<pb::ResetPasswordResponse>, Status> {
        let origin = Origin::of(&req);
        let r = req.into_inner();
        let mut v = FieldViolations::new();
        if r.token.is_empty() || r.token.len() > 200 {
            v.add("token", "is required");
        }
        if r.new_password.is_empty() {
            v.add("new_password", "is required");
        }
        v.check()?;
        let mut conn = self.store.pg().await.map_err(AuthError::from)?;
        // Validate the new password before spending the token, so a weak
        // password does not cost the user their link.
        let peek: Option<Uuid> = auth_one_time_tokens::table
            .filter(auth_one_time_tokens::token_hash.eq(tokens::digest(&r.token)))
            .filter(auth_one_time_tokens::purpose.eq(RESET))
            .select(auth_one_time_tokens::user_id)
            .first(&mut conn)
            .await
            .optional()
            .map_err(AuthError::from)?;
        let account = match peek {
            Some(uid) => accounts::find(&mut conn, uid)
                .await
                .map_err(AuthError::from)?,
            None => None,
        };
        let Some(account) = account else {
            return Err(bad_token());
        };
        let mut v = FieldViolations::new();
        validate::password(
            &mut v,
            "new_password",
            &r.new_password,
            &account.email,
            &account.username,
        );
        v.check()?;
        let hash = self.hasher.hash(r.new_password).await?;
        let token = r.token.clone();
        let version = conn
            .transaction::<_, AuthError, _>(async move |conn| {
                let Some((user, _)) = Self::take_token(conn, &token, RESET).await? else {
                    return Ok(None);
                };
                diesel::update(users::table.filter(users::id.eq(user)))
                    .set((
                        users::password_hash.eq(&hash),
                        users::updated_at.eq(Utc::now()),
                        users::failed_logins.eq(0),
                        users::locked_until.eq(None::<DateTime<Utc>>),
                    ))
                    .execute(conn)
                    .await?;
                // Other outstanding reset links die with this one.
                diesel::update(
                    auth_one_time_tokens::table
                        .filter(auth_one_time_tokens::user_id.eq(user))
                        .filter(auth_one_time_tokens::purpose.eq(RESET))
                        .filter(auth_one_time_tokens::used_at.is_null()),
                )
                .set(auth_one_time_tokens::used_at.eq(Utc::now()))
                .execute(conn)
                .await?;
                Ok(Some(accounts::bump_token_version(conn, user).await?))
            })
            .await?;
        let Some(version) = version else {
            return Err(bad_token());
        };
        self.end_all_sessions(&mut conn, account.id, version, "password reset")
            .await?;
        record(
            &mut conn,
            &origin,
            AuditEvent {
                actor_id: Some(account.id),
                action: "auth.password.reset",
                target_type: "user",
                target_id: account.id.to_string(),
                changed_fields: vec!["password".into()],
                ..Default::default()
            },
        )
        .await;
        Ok(Response::new(pb::ResetPasswordResponse {}))
    }

    pub(crate) async fn rpc_request_email_verification(
        &self,
        req: Request<pb::RequestEmailVerificationRequest>,
    ) -> Result<Response<pb::RequestEmailVerificationResponse>, Status> {
        let p = authenticated(&req)?;
        p.require(EMAIL)?;
        let origin = Origin::of(&req);
        let mut conn = self.store.pg().await.map_err(AuthError::from)?;
        let account = accounts::find(&mut conn, p.user_id)
            .await
            .map_err(AuthError::from)?
            .ok_or(AuthError::Unauthenticated("account no longer exists"))?;
        if account.email_verified_at.is_some() {
            return Err(Status::failed_precondition(
                "the e-mail address is already verified",
            ));
        }
        self.mail_token(&mut conn, &account, VERIFY, self.cfg.email_verification_ttl)
            .await?;
        record(
            &mut conn,
            &origin,
            AuditEvent {
                actor_id: Some(account.id),
                action: "auth.email.verification_requested",
                target_type: "user",
                target_id: account.id.to_string(),
                ..Default::default()
            },
        )
        .await;
        Ok(Response::new(pb::RequestEmailVerificationResponse {}))
    }

    pub(crate) async fn rpc_verify_email(
        &self,
        req: Request<pb::VerifyEmailRequest>,
    ) -> Result<Response<pb::VerifyEmailResponse>, Status> {
        let origin = Origin::of(&req);
        let token = req.into_inner().token;
        if token.is_empty() || token.len() > 200 {
            let mut v = FieldViolations::new();
            v.add("token", "is required");
            return Err(v.into_status());
        }
        let mut conn = self.store.pg().await.map_err(AuthError::from)?;
        let verified = conn
            .transaction::<_, AuthError, _>(async move |conn| {
                let Some((user, email)) = Self::take_token(conn, &token, VERIFY).await? else {
                    return Ok(None);
                };
                // Only the address the token was sent to becomes verified.
                let n = diesel::update(
                    users::table
                        .filter(users::id.eq(user))
                        .filter(users::email.eq(&email))
                        .filter(users::deleted_at.is_null()),
                )
                .set(users::email_verified_at.eq(Utc::now()))
                .execute(conn)
                .await?;
                Ok((n > 0).then_some(user))
            })
            .await?;
        let Some(user) = verified else {
            return Err(bad_token());
        };
        record(
            &mut conn,
            &origin,
            AuditEvent {
                actor_id: Some(user),
                action: "auth.email.verified",
                target_type: "user",
                target_id: user.to_string(),
                changed_fields: vec!["email_verified".into()],
                ..Default::default()
            },
        )
        .await;
        Ok(Response::new(pb::VerifyEmailResponse {}))
    }
}
