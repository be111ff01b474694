//! The Trellis end-to-end suite: one binary, one shared harness
//! (`trellis_tests`), real PostgreSQL and Redis.

mod auth;
mod auth_account;
mod foundation;
mod util;
