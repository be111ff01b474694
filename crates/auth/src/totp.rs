//! TOTP second factor: enrolment (secret + otpauth URI), confirmation with
//! one-time recovery codes, disabling, and the check Login makes for
//! enrolled accounts.
//!
//! Codes follow RFC 6238 as authenticator apps expect them: SHA-1, six
//! digits, 30-second steps, one step of clock skew either way. A code works
//! once: the last accepted step is kept on the account and only later steps
//! are accepted, so a code seen over a shoulder (or in a log) cannot be
//! replayed. Recovery codes are random, stored as SHA-256 hashes (they are
//! high-entropy, so a fast hash is enough) and each works once.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use tonic::{Request, Response, Status};
use totp_rs::{Algorithm, Builder, Secret, Totp};
use trellis_core::error::FieldViolations;
use trellis_mesh::authenticated;
use trellis_proto::auth::v1 as pb;
use trellis_store::accounts::{self, Account};
use trellis_store::audit::AuditEvent;
use trellis_store::schema::{totp_recovery_codes, users};
use uuid::Uuid;

use crate::api_keys::{TOTP, require_session};
use crate::audit::{Origin, record};
use crate::error::AuthError;
use crate::service::AuthSvc;
use crate::tokens;

const ISSUER: &str = "Trellis";
const DIGITS: usize = 6;
const STEP_SECONDS: i64 = 30;
/// Steps accepted either side of now, for clocks that drift and codes
/// typed just as they roll over.
const SKEW_STEPS: i64 = 1;
/// 160 bits, RFC 4226's recommendation.
const SECRET_BYTES: usize = 20;
const RECOVERY_CODES: usize = 10;
/// Characters of a recovery code, shown as two groups of five.
const RECOVERY_LEN: usize = 10;
/// Crockford's base32 in lower case: no i, l, o or u to misread. 32
/// symbols, so a random byte masked to five bits picks one uniformly.
const RECOVERY_ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
/// Longest second-factor input looked at.
const MAX_CODE_INPUT: usize = 64;

/// The authenticator-app view of a secret. Skew is handled by
/// [`matching_step`], which needs to know which step matched.
fn totp(secret_base32: &str, account_name: &str) -> Result<Totp, AuthError> {
    let secret = Secret::try_from_base32(secret_base32)
        .map_err(|e| AuthError::Internal(format!("stored TOTP secret: {e}")))?;
    Builder::new()
        .with_algorithm(Algorithm::SHA1)
        .with_digits(DIGITS as u8)
        .with_step_duration(STEP_SECONDS as u64)
        .with_skew(0)
        .with_secret(secret)
        .with_account_name(account_name)
        .with_issuer(Some(ISSUER))
        .build()
        .map_err(|e| AuthError::Internal(format!("TOTP parameters: {e}")))
}

/// The otpauth label: the e-mail address, unless it holds the `:` the URI
/// format reserves (a legal but rare local part), then the username.
fn account_label(a: &Account) -> &str {
    if a.email.contains(':') {
        &a.username
    } else {
        &a.email
    }
}

/// Whether `code` is shaped like a TOTP code (as opposed to a recovery code).
fn is_totp_shaped(code: &str) -> bool {
    code.len() == DIGITS && code.bytes().all(|b| b.is_ascii_digit())
}

/// The newest step within the skew window, after `after`, whose code is
/// `code`. Newest first, so that a rare code shared by two steps never
/// leaves the newer one usable again.
fn matching_step(t: &Totp, code: &str, after: Option<i64>) -> Option<i64> {
    let now = Utc::now().timestamp().max(0);
    let origin = now / STEP_SECONDS;
    ((origin - SKEW_STEPS)..=(origin + SKEW_STEPS))
        .rev()
        .filter(|s| *s >= 0 && after.is_none_or(|last| *s > last))
        .find(|s| t.check(code, (*s * STEP_SECONDS) as u64).is_some())
}

fn random_bytes<const N: usize>() -> Result<[u8; N], AuthError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| AuthError::Internal(format!("randomness: {e}")))?;
    Ok(bytes)
}

/// A new recovery code as shown to the user, e.g. `7k2mq-x9d4a`.
fn new_recovery_code() -> Result<String, AuthError> {
    let bytes = random_bytes::<RECOVERY_LEN>()?;
    let mut code = String::with_capacity(RECOVERY_LEN + 1);
    for (i, b) in bytes.iter().enumerate() {
        if i == RECOVERY_LEN / 2 {
            code.push('-');
        }
        code.push(char::from(RECOVERY_ALPHABET[usize::from(b & 31)]));
    }
    Ok(code)
}

/// The canonical form of a typed recovery code (what is hashed): case,
/// separators and the letters Crockford's alphabet reads as digits do not
/// matter. `None` when it cannot be a recovery code.
fn canonical_recovery_code(input: &str) -> Option<String> {
    if input.len() > MAX_CODE_INPUT {
        return None;
    }
    let mut out = String::with_capacity(RECOVERY_LEN);
    for c in input.chars() {
        let c = match c.to_ascii_lowercase() {
            '-' | ' ' => continue,
            'i' | 'l' => '1',
            'o' => '0',
            c if c.is_ascii() && RECOVERY_ALPHABET.contains(&(c as u8)) => c,
            _ => return None,
        };
        out.push(c);
    }
    (out.len() == RECOVERY_LEN).then_some(out)
}

fn precondition(m: &str) -> Status {
    Status::failed_precondition(m.to_string())
}

/// Field violations for a code that must be a current TOTP code.
fn check_code_shape(v: &mut FieldViolations, code: &str) {
    if code.is_empty() {
        v.add("code", "is required");
    } else if !is_totp_shaped(code) {
        v.add(
            "code",
            "must be the 6-digit code from the authenticator app",
        );
    }
}

impl AuthSvc {
    async fn live_account(
        &self,
        conn: &mut AsyncPgConnection,
        id: Uuid,
    ) -> Result<Account, AuthError> {
        accounts::find(conn, id)
            .await?
            .filter(|a| a.status == accounts::ACTIVE)
            .ok_or(AuthError::Unauthenticated("account is not active"))
    }

    pub(crate) async fn rpc_enroll_totp(
        &self,
        req: Request<pb::EnrollTotpRequest>,
    ) -> Result<Response<pb::EnrollTotpResponse>, Status> {
        let p = authenticated(&req)?;
        require_session(&p)?;
        p.require(TOTP)?;
        let origin = Origin::of(&req);
        let mut conn = self.store.pg().await.map_err(AuthError::from)?;
        let account = self.live_account(&mut conn, p.user_id).await?;
        if account.totp_enabled_at.is_some() {
            return Err(precondition(
                "TOTP is already enabled; disable it before enrolling again",
            ));
        }
        let raw = random_bytes::<SECRET_BYTES>()?;
        let secret = Secret::from(raw.to_vec()).to_base32();
        let otpauth_uri = totp(&secret, account_label(&account))?
            .to_url()
            .map_err(|e| AuthError::Internal(format!("otpauth URI: {e}")))?;
        // A pending secret from an earlier, unconfirmed enrolment is
        // replaced: only the newest QR code the user scanned counts.
        let n = diesel::update(
            users::table
                .filter(users::id.eq(account.id))
                .filter(users::totp_enabled_at.is_null()),
        )
        .set((
            users::totp_pending_secret.eq(&secret),
            users::updated_at.eq(Utc::now()),
        ))
        .execute(&mut conn)
        .await
        .map_err(AuthError::from)?;
        if n == 0 {
            return Err(precondition(
                "TOTP is already enabled; disable it before enrolling again",
            ));
        }
        record(
            &mut conn,
            &origin,
            AuditEvent {
                actor_id: Some(account.id),
                action: "auth.totp.enrollment_started",
                target_type: "user",
                target_id: account.id.to_string(),
                ..Default::default()
            },
        )
        .await;
        Ok(Response::new(pb::EnrollTotpResponse {
            secret,
            otpauth_uri,
        }))
    }

    pub(crate) async fn rpc_confirm_totp(
        &self,
        req: Request<pb::ConfirmTotpRequest>,
    ) -> Result<Response<pb::ConfirmTotpResponse>, Status> {
        let p = authenticated(&req)?;
        require_session(&p)?;
        p.require(TOTP)?;
        let origin = Origin::of(&req);
        let code = req.into_inner().code.trim().to_string();
        let mut v = FieldViolations::new();
        check_code_shape(&mut v, &code);
        v.check()?;
        let mut conn = self.store.pg().await.map_err(AuthError::from)?;
        let account = self.live_account(&mut conn, p.user_id).await?;
        if account.totp_enabled_at.is_some() {
            return Err(precondition("TOTP is already enabled"));
        }
        let pending: Option<String> = users::table
            .filter(users::id.eq(account.id))
            .select(users::totp_pending_secret)
            .first(&mut conn)
            .await
            .map_err(AuthError::from)?;
        let Some(pending) = pending else {
            return Err(precondition(
                "no TOTP enrolment to confirm; call EnrollTotp first",
            ));
        };
        let Some(step) = matching_step(&totp(&pending, account_label(&account))?, &code, None)
        else {
            let mut v = FieldViolations::new();
            v.add("code", "is not a current code for the enrolled secret");
            return Err(v.into_status());
        };
        let codes = (0..RECOVERY_CODES)
            .map(|_| new_recovery_code())
            .collect::<Result<Vec<_>, _>>()?;
        let hashes: Vec<Vec<u8>> = codes
            .iter()
            .filter_map(|c| canonical_recovery_code(c))
            .map(|c| tokens::digest(&c))
            .collect();
        if hashes.len() != codes.len() {
            return Err(AuthError::Internal("recovery code round trip".into()).into());
        }
        let user = account.id;
        let confirmed = conn
            .transaction::<_, AuthError, _>(async move |conn| {
                let now = Utc::now();
                // Guarded on the pending secret: a concurrent re-enrolment
                // must not be enabled with a code for the old one.
                let n = diesel::update(
                    users::table
                        .filter(users::id.eq(user))
                        .filter(users::totp_enabled_at.is_null())
                        .filter(users::totp_pending_secret.eq(&pending)),
                )
                .set((
                    users::totp_secret.eq(Some(&pending)),
                    users::totp_pending_secret.eq(None::<String>),
                    users::totp_enabled_at.eq(Some(now)),
                    users::totp_last_step.eq(Some(step)),
                    users::updated_at.eq(now),
                ))
                .execute(conn)
                .await?;
                if n == 0 {
                    return Ok(false);
                }
                diesel::delete(
                    totp_recovery_codes::table.filter(totp_recovery_codes::user_id.eq(user)),
                )
                .execute(conn)
                .await?;
                let rows: Vec<_> = hashes
                    .iter()
                    .map(|h| {
                        (
                            totp_recovery_codes::user_id.eq(user),
                            totp_recovery_codes::code_hash.eq(h),
                        )
                    })
                    .collect();
                diesel::insert_into(totp_recovery_codes::table)
                    .values(&rows)
                    .execute(conn)
                    .await?;
                Ok(true)
            })
            .await?;
        if !confirmed {
            return Err(precondition(
                "the TOTP enrolment changed meanwhile; enrol again",
            ));
        }
        tracing::info!(user_id = %user, "TOTP enabled");
        record(
            &mut conn,
            &origin,
            AuditEvent {
                actor_id: Some(user),
                action: "auth.totp.enabled",
                target_type: "user",
                target_id: user.to_string(),
                ..Default::default()
            },
        )
        .await;
        Ok(Response::new(pb::ConfirmTotpResponse {
            recovery_codes: codes,
        }))
    }

    pub(crate) async fn rpc_disable_totp(
        &self,
        req: Request<pb::DisableTotpRequest>,
    ) -> Result<Response<pb::DisableTotpResponse>, Status> {
        let p = authenticated(&req)?;
        require_session(&p)?;
        p.require(TOTP)?;
        let origin = Origin::of(&req);
        let r = req.into_inner();
        let code = r.code.trim().to_string();
        let mut v = FieldViolations::new();
        if r.password.is_empty() {
            v.add("password", "is required");
        } else if r.password.chars().count() > 128 {
            v.add("password", "must be at most 128 characters");
        }
        check_code_shape(&mut v, &code);
        v.check()?;
        let mut conn = self.store.pg().await.map_err(AuthError::from)?;
        let account = self.live_account(&mut conn, p.user_id).await?;
        if account.totp_enabled_at.is_none() {
            return Err(precondition("TOTP is not enabled"));
        }
        let now = Utc::now();
        // A stolen session must not be a way around the lockout.
        if let Some(until) = account.locked_until.filter(|u| *u > now) {
            let left = (until - now)
                .to_std()
                .unwrap_or(std::time::Duration::from_secs(1));
            return Err(AuthError::Locked(left).into());
        }
        let password_ok = self
            .hasher
            .verify(r.password, Some(account.password_hash.clone()))
            .await?;
        let code_ok = password_ok && self.accept_totp(&mut conn, &account, &code).await?;
        if !code_ok {
            tracing::info!(user_id = %account.id, "TOTP disable refused: wrong password or code");
            let reason = if password_ok {
                "wrong code"
            } else {
                "wrong password"
            };
            self.record_failure(
                &mut conn,
                &origin,
                &account,
                "auth.totp.disable_failed",
                reason,
            )
            .await?;
            return Err(AuthError::BadCredentials.into());
        }
        let user = account.id;
        conn.transaction::<_, AuthError, _>(async move |conn| {
            diesel::update(users::table.filter(users::id.eq(user)))
                .set((
                    users::totp_secret.eq(None::<String>),
                    users::totp_pending_secret.eq(None::<String>),
                    users::totp_enabled_at.eq(None::<DateTime<Utc>>),
                    users::totp_last_step.eq(None::<i64>),
                    users::updated_at.eq(Utc::now()),
                ))
                .execute(conn)
                .await?;
            diesel::delete(
                totp_recovery_codes::table.filter(totp_recovery_codes::user_id.eq(user)),
            )
            .execute(conn)
            .await?;
            Ok(())
        })
        .await?;
        tracing::info!(user_id = %user, "TOTP disabled");
        record(
            &mut conn,
            &origin,
            AuditEvent {
                actor_id: Some(user),
                action: "auth.totp.disabled",
                target_type: "user",
                target_id: user.to_string(),
                ..Default::default()
            },
        )
        .await;
        Ok(Response::new(pb::DisableTotpResponse {}))
    }

    /// Accepts a current TOTP code for the enabled secret once: the step it
    /// belongs to must be later than the last accepted one, and is recorded
    /// in the same statement that checks it, so two concurrent uses of one
    /// code cannot both pass.
    async fn accept_totp(
        &self,
        conn: &mut AsyncPgConnection,
        account: &Account,
        code: &str,
    ) -> Result<bool, AuthError> {
        let Some(secret) = account.totp_secret.as_deref() else {
            return Ok(false);
        };
        if !is_totp_shaped(code) {
            return Ok(false);
        }
        let last: Option<i64> = users::table
            .filter(users::id.eq(account.id))
            .select(users::totp_last_step)
            .first(conn)
            .await?;
        let Some(step) = matching_step(&totp(secret, account_label(account))?, code, last) else {
            return Ok(false);
        };
        let n = diesel::update(
            users::table
                .filter(users::id.eq(account.id))
                .filter(users::totp_secret.eq(secret))
                .filter(
                    users::totp_last_step
                        .is_null()
                        .or(users::totp_last_step.lt(step)),
                ),
        )
        .set(users::totp_last_step.eq(Some(step)))
        .execute(conn)
        .await?;
        Ok(n == 1)
    }

    /// Spends an unused recovery code of `user`; false when it is unknown
    /// or already spent.
    async fn spend_recovery_code(
        &self,
        conn: &mut AsyncPgConnection,
        user: Uuid,
        input: &str,
    ) -> Result<bool, AuthError> {
        let Some(code) = canonical_recovery_code(input) else {
            return Ok(false);
        };
        let n = diesel::update(
            totp_recovery_codes::table
                .filter(totp_recovery_codes::user_id.eq(user))
                .filter(totp_recovery_codes::code_hash.eq(tokens::digest(&code)))
                .filter(totp_recovery_codes::used_at.is_null()),
        )
        .set(totp_recovery_codes::used_at.eq(Some(Utc::now())))
        .execute(conn)
        .await?;
        if n == 1 {
            tracing::info!(user_id = %user, "recovery code used");
        }
        Ok(n == 1)
    }

    /// Login's second step for an account with TOTP enrolled: a current
    /// code or an unused recovery code, else UNAUTHENTICATED. A recovery
    /// code may come in either field; a wrong one counts as a failed login.
    pub(crate) async fn check_second_factor(
        &self,
        conn: &mut AsyncPgConnection,
        origin: &Origin,
        account: &Account,
        totp_code: &str,
        recovery_code: &str,
    ) -> Result<(), AuthError> {
        let (totp_code, recovery_code) = (totp_code.trim(), recovery_code.trim());
        if totp_code.is_empty() && recovery_code.is_empty() {
            // Never let an enrolled account in on the password alone; the
            // message tells clients to prompt for the code.
            return Err(AuthError::Unauthenticated("second factor required"));
        }
        let (ok, recovery) = if !recovery_code.is_empty() {
            (
                self.spend_recovery_code(conn, account.id, recovery_code)
                    .await?,
                true,
            )
        } else if is_totp_shaped(totp_code) {
            (self.accept_totp(conn, account, totp_code).await?, false)
        } else {
            (
                self.spend_recovery_code(conn, account.id, totp_code)
                    .await?,
                true,
            )
        };
        if ok {
            if recovery {
                let left: i64 = totp_recovery_codes::table
                    .filter(totp_recovery_codes::user_id.eq(account.id))
                    .filter(totp_recovery_codes::used_at.is_null())
                    .count()
                    .get_result(conn)
                    .await?;
                record(
                    conn,
                    origin,
                    AuditEvent {
                        actor_id: Some(account.id),
                        action: "auth.totp.recovery_code_used",
                        target_type: "user",
                        target_id: account.id.to_string(),
                        details: serde_json::json!({ "codes_left": left }),
                        ..Default::default()
                    },
                )
                .await;
            }
            return Ok(());
        }
        let reason = if recovery {
            "wrong recovery code"
        } else {
            "wrong TOTP code"
        };
        let locked = self
            .record_failure(conn, origin, account, "auth.login.failed", reason)
            .await?;
        tracing::info!(user_id = %account.id, locked, "login failed: wrong second factor");
        Err(AuthError::Unauthenticated("invalid second factor"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_codes_are_readable_and_canonical() {
        let a = new_recovery_code().expect("code");
        let b = new_recovery_code().expect("code");
        assert_ne!(a, b);
        assert_eq!(a.len(), RECOVERY_LEN + 1);
        assert_eq!(a.as_bytes()[RECOVERY_LEN / 2], b'-');
        let canon = canonical_recovery_code(&a).expect("canonical");
        assert_eq!(canon, a.replace('-', ""));
        assert_eq!(
            canonical_recovery_code(&a.to_uppercase().replace('-', " ")),
            Some(canon)
        );
        assert_eq!(
            canonical_recovery_code("abcdeOIL23"),
            Some("abcde01123".into())
        );
        for bad in ["", "123456", "abcde-fghij-k", "abcde-fghiu", "äbcde-fghij"] {
            assert_eq!(canonical_recovery_code(bad), None, "{bad}");
        }
        assert_eq!(canonical_recovery_code(&"a".repeat(1000)), None);
    }

    #[test]
    fn steps_match_within_the_skew_and_after_the_last() {
        let secret = Secret::from(vec![7u8; SECRET_BYTES]).to_base32();
        let t = totp(&secret, "ada@example.com").expect("totp");
        let now = Utc::now().timestamp();
        let step = now / STEP_SECONDS;
        let code = t.generate(now as u64).to_string();
        // The clock may tick between generating and checking.
        let found = matching_step(&t, &code, None).expect("current code");
        assert!((step..=step + 1).contains(&found));
        assert_eq!(matching_step(&t, &code, Some(found)), None, "replay");
        let old = t.generate((now - 10 * STEP_SECONDS) as u64).to_string();
        assert_eq!(matching_step(&t, &old, None), None, "outside the skew");
        assert!(is_totp_shaped("012345"));
        assert!(!is_totp_shaped("01234a") && !is_totp_shaped("+12345"));
        let uri = t.to_url().expect("uri");
        assert!(uri.starts_with("otpauth://totp/Trellis:ada%40example.com?secret="));
        assert!(uri.contains("issuer=Trellis"), "{uri}");
    }
}
