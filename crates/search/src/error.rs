//! The search service's errors and their gRPC status.

use tonic::Status;
use trellis_core::error::FieldViolations;

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("invalid request")]
    Invalid(FieldViolations),
    /// Missing, or not visible to the caller (the same answer on purpose).
    #[error("not found")]
    NotFound,
    #[error(transparent)]
    Store(#[from] trellis_store::StoreError),
    #[error("database: {0}")]
    Db(#[from] diesel::result::Error),
}

impl From<FieldViolations> for SearchError {
    fn from(v: FieldViolations) -> Self {
        SearchError::Invalid(v)
    }
}

impl SearchError {
    pub fn field(field: &str, description: impl Into<String>) -> SearchError {
        let mut v = FieldViolations::new();
        v.add(field, description);
        SearchError::Invalid(v)
    }
}

impl From<SearchError> for Status {
    fn from(e: SearchError) -> Status {
        match e {
            SearchError::Invalid(v) => v.into_status(),
            SearchError::NotFound => Status::not_found("not found"),
            SearchError::Store(e) => e.into(),
            SearchError::Db(e) => trellis_store::StoreError::Query(e).into(),
        }
    }
}
