//! The gateway's errors and their gRPC status.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use trellis_core::error::{FieldViolations, internal};

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("invalid request")]
    Invalid(FieldViolations),
    #[error("{0}")]
    Denied(String),
    /// A quota is used up: which one, and when it frees up.
    #[error("{quota} exhausted")]
    Quota {
        quota: &'static str,
        description: String,
        retry_after: Duration,
    },
    /// No provider could answer (all failed, or their breakers are open).
    #[error("{0}")]
    Unavailable(String),
    /// As `Unavailable`, with a known time after which trying again may
    /// help (the providers' `Retry-After`, or an open breaker's cool-down).
    #[error("{message}")]
    UnavailableFor {
        message: String,
        retry_after: Duration,
    },
    /// The caller's deadline (or the providers' timeouts) ran out first.
    #[error("{0}")]
    Deadline(String),
    /// The upstream refused the request itself (HTTP 400/422): retrying
    /// elsewhere would not help.
    #[error("{0}")]
    Rejected(String),
    /// A status from another service, passed on as it is.
    #[error("{0}")]
    Upstream(Status),
    /// Configuration that could not be turned into a working service.
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Store(#[from] trellis_store::StoreError),
    #[error("database: {0}")]
    Db(#[from] diesel::result::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

impl From<FieldViolations> for LlmError {
    fn from(v: FieldViolations) -> Self {
        LlmError::Invalid(v)
    }
}

impl LlmError {
    /// A single field violation.
    pub fn field(field: &str, description: impl Into<String>) -> LlmError {
        let mut v = FieldViolations::new();
        v.add(field, description);
        LlmError::Invalid(v)
    }
}

impl From<LlmError> for Status {
    fn from(e: LlmError) -> Status {
        match e {
            LlmError::Invalid(v) => v.into_status(),
            LlmError::Denied(m) => Status::permission_denied(m),
            LlmError::Quota {
                quota,
                description,
                retry_after,
            } => {
                let mut details = ErrorDetails::with_retry_info(Some(retry_after));
                details.add_quota_failure_violation(quota, description.clone());
                Status::with_error_details(
                    Code::ResourceExhausted,
                    format!("{description}; retry in {}s", retry_after.as_secs().max(1)),
                    details,
                )
            }
            LlmError::Unavailable(m) => Status::unavailable(m),
            LlmError::UnavailableFor {
                message,
                retry_after,
            } => Status::with_error_details(
                Code::Unavailable,
                message,
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
            LlmError::Deadline(m) => Status::deadline_exceeded(m),
            LlmError::Rejected(m) => Status::invalid_argument(m),
            LlmError::Upstream(s) => s,
            LlmError::Store(e) => e.into(),
            LlmError::Db(e) => trellis_store::StoreError::Query(e).into(),
            LlmError::Redis(e) => trellis_store::StoreError::Redis(e).into(),
            other => internal(&other),
        }
    }
}
