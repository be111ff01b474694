//! The shared end-to-end harness: real PostgreSQL and Redis (from
//! `TRELLIS_TEST_DATABASE_URL` / `TRELLIS_TEST_REDIS_URL`, or private servers
//! started once per run by the same code as `trellisd dev`), a database per
//! test cloned from a migrated template, a Redis key prefix per test, and
//! in-process meshes on 127.0.0.1:0 — alone or split over several servers.

pub mod fake_llm;
pub mod fake_web;
pub mod infra;
pub mod mesh;

pub use fake_llm::{FakeLlm, Script, echo_reply};
pub use fake_web::{FakeWeb, WebScript};
pub use infra::{Infra, infra};
pub use mesh::{TestMesh, TestOptions, split, split_with};
