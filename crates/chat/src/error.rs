//! The chat service's errors and their gRPC status.

use tonic::Status;
use trellis_core::error::FieldViolations;

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("invalid request")]
    Invalid(FieldViolations),
    /// Missing, deleted or another user's (the same answer on purpose).
    #[error("not found")]
    NotFound,
    /// The request is fine but the resource's state forbids it.
    #[error("{0}")]
    Precondition(String),
    /// A status from another service, passed on as it is.
    #[error("{0}")]
    Upstream(Status),
    #[error(transparent)]
    Store(#[from] trellis_store::StoreError),
    #[error("database: {0}")]
    Db(#[from] diesel::result::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

impl From<FieldViolations> for ChatError {
    fn from(v: FieldViolations) -> Self {
        ChatError::Invalid(v)
    }
}

impl ChatError {
    pub fn field(field: &str, description: impl Into<String>) -> ChatError {
        let mut v = FieldViolations::new();
        v.add(field, description);
        ChatError::Invalid(v)
    }
}

impl From<ChatError> for Status {
    fn from(e: ChatError) -> Status {
        match e {
            ChatError::Invalid(v) => v.into_status(),
            ChatError::NotFound => Status::not_found("not found"),
            ChatError::Precondition(m) => Status::failed_precondition(m),
            ChatError::Upstream(s) => s,
            ChatError::Store(e) => e.into(),
            ChatError::Db(e) => trellis_store::StoreError::Query(e).into(),
            ChatError::Redis(e) => trellis_store::StoreError::Redis(e).into(),
        }
    }
}
