//! trellis-search: the SearchService — documents indexed in PostgreSQL
//! full-text search (tsvector + GIN, pg_trgm for typos), ranked queries
//! with snippets and filters, search history and analytics, optional web
//! search merged by reciprocal rank fusion, and the sample corpus.

mod documents;
mod error;
pub mod history;
mod query;
mod service;
mod web;

pub mod seed;

pub use error::SearchError;
pub use service::{SearchSvc, service};
