//! The user service's errors and their gRPC status.

use tonic::Status;
use trellis_core::error::FieldViolations;

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("invalid request")]
    Invalid(FieldViolations),
    /// Missing, or not visible to the caller (the same answer on purpose).
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    Taken(String),
    #[error("{0}")]
    Precondition(String),
    #[error(transparent)]
    Store(#[from] trellis_store::StoreError),
    #[error(transparent)]
    Auth(#[from] trellis_auth::AuthError),
    #[error("database: {0}")]
    Db(#[from] diesel::result::Error),
}

impl From<FieldViolations> for UserError {
    fn from(v: FieldViolations) -> Self {
        UserError::Invalid(v)
    }
}

impl From<trellis_store::accounts::AccountError> for UserError {
    fn from(e: trellis_store::accounts::AccountError) -> Self {
        match e {
            trellis_store::accounts::AccountError::Taken(f) => {
                UserError::Taken(format!("{f} is already taken"))
            }
            trellis_store::accounts::AccountError::Db(e) => UserError::Db(e),
        }
    }
}

impl From<UserError> for Status {
    fn from(e: UserError) -> Status {
        match e {
            UserError::Invalid(v) => v.into_status(),
            UserError::NotFound => Status::not_found("not found"),
            UserError::Denied(m) => Status::permission_denied(m),
            UserError::Taken(m) => Status::already_exists(m),
            UserError::Precondition(m) => Status::failed_precondition(m),
            UserError::Store(e) => e.into(),
            UserError::Db(e) => trellis_store::StoreError::Query(e).into(),
            UserError::Auth(e) => e.into(),
        }
    }
}
