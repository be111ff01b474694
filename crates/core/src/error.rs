//! The error model's shared helpers. Each service crate keeps its own
//! `thiserror` enum and converts it into a `tonic::Status` with these, so
//! that every service sends the same shape: INVALID_ARGUMENT carries
//! `google.rpc.BadRequest` field violations, RESOURCE_EXHAUSTED carries
//! `RetryInfo`, and internal causes are logged, never sent.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Field violations collected while validating a request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FieldViolations(Vec<(String, String)>);

impl FieldViolations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `field` (a dotted path, e.g. `user.email`) is invalid.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push((field.into(), description.into()));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(f, d)| (f.as_str(), d.as_str()))
    }

    /// `Ok(())` when nothing was recorded, the INVALID_ARGUMENT status otherwise.
    pub fn check(self) -> Result<(), Status> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.into_status())
        }
    }

    pub fn into_status(self) -> Status {
        invalid_argument(self)
    }
}

/// INVALID_ARGUMENT with a `google.rpc.BadRequest` detail listing every violation.
pub fn invalid_argument(violations: FieldViolations) -> Status {
    let summary = violations
        .iter()
        .map(|(f, d)| format!("{f}: {d}"))
        .collect::<Vec<_>>()
        .join("; ");
    let mut details = ErrorDetails::new();
    for (field, description) in violations.iter() {
        details.add_bad_request_violation(field, description);
    }
    Status::with_error_details(Code::InvalidArgument, summary, details)
}

/// RESOURCE_EXHAUSTED with a `google.rpc.RetryInfo` telling when to retry.
pub fn resource_exhausted(message: impl Into<String>, retry_after: Duration) -> Status {
    let details = ErrorDetails::with_retry_info(Some(retry_after));
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

/// UNAVAILABLE for a dependency that is down; names the dependency, not the cause.
pub fn unavailable(dependency: &str) -> Status {
    Status::unavailable(format!("{dependency} is unavailable, retry later"))
}

/// INTERNAL for a cause the client must not see: logs it (the current span
/// carries the request id) and returns a generic status.
pub fn internal(cause: &dyn std::fmt::Display) -> Status {
    tracing::error!(error = %cause, "internal error");
    Status::internal("internal error")
}

/// The canonical upper-case name of a status code, as gRPC documents it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_carries_field_violations() {
        let mut v = FieldViolations::new();
        v.add("email", "must be a valid address");
        v.add("password", "too short");
        let status = v.into_status();
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let bad = details.bad_request().expect("bad request detail");
        assert_eq!(bad.field_violations.len(), 2);
        assert_eq!(bad.field_violations[0].field, "email");
        assert!(status.message().contains("password: too short"));
    }

    #[test]
    fn empty_violations_pass() {
        assert!(FieldViolations::new().check().is_ok());
    }

    #[test]
    fn resource_exhausted_carries_retry_info() {
        let status = resource_exhausted("slow down", Duration::from_secs(3));
        assert_eq!(status.code(), Code::ResourceExhausted);
        let info = status.get_error_details();
        let retry = info.retry_info().expect("retry info");
        assert_eq!(retry.retry_delay, Some(Duration::from_secs(3)));
    }
}
