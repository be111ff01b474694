//! The auth service's errors and their gRPC status.

use std::time::Duration;

use tonic::Status;
use trellis_core::error::{FieldViolations, internal, resource_exhausted};
use trellis_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid request")]
    Invalid(FieldViolations),
    /// Wrong credentials, or an account that does not exist: the same
    /// answer, so that accounts cannot be enumerated.
    #[error("invalid credentials")]
    BadCredentials,
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("{0}")]
    Denied(&'static str),
    #[error("{0} is already taken")]
    Taken(&'static str),
    #[error("too many failed logins")]
    Locked(Duration),
    #[error("too many requests")]
    RateLimited(Duration),
    /// Password hashing is saturated (its queue is full).
    #[error("busy")]
    Busy(Duration),
    #[error("not found")]
    NotFound,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("database: {0}")]
    Db(#[from] diesel::result::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    Internal(String),
}

impl From<trellis_store::accounts::AccountError> for AuthError {
    fn from(e: trellis_store::accounts::AccountError) -> Self {
        match e {
            trellis_store::accounts::AccountError::Taken(field) => AuthError::Taken(field),
            trellis_store::accounts::AccountError::Db(e) => AuthError::Db(e),
        }
    }
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Status {
        match e {
            AuthError::Invalid(v) => v.into_status(),
            AuthError::BadCredentials => Status::unauthenticated("invalid credentials"),
            AuthError::Unauthenticated(m) => Status::unauthenticated(m),
            AuthError::Denied(m) => Status::permission_denied(m),
            AuthError::Taken(field) => Status::already_exists(format!("{field} is already taken")),
            AuthError::Locked(retry) => resource_exhausted(
                format!(
                    "too many failed logins; try again in {}s",
                    retry.as_secs().max(1)
                ),
                retry,
            ),
            AuthError::RateLimited(retry) => resource_exhausted(
                format!(
                    "too many requests from this address; try again in {}s",
                    retry.as_secs().max(1)
                ),
                retry,
            ),
            AuthError::Busy(retry) => resource_exhausted(
                "the server is busy checking passwords; try again shortly".to_string(),
                retry,
            ),
            AuthError::NotFound => Status::not_found("not found"),
            AuthError::Store(e) => e.into(),
            AuthError::Db(e) => StoreError::Query(e).into(),
            AuthError::Redis(e) => StoreError::Redis(e).into(),
            other => internal(&other),
        }
    }
}

/// Field violations → AuthError, for `?` in validation.
impl From<FieldViolations> for AuthError {
    fn from(v: FieldViolations) -> Self {
        AuthError::Invalid(v)
    }
}
