//! The Trellis end-to-end suite: one binary, one shared harness
//! (`trellis_tests`), real PostgreSQL and Redis.

mod auth;
mod auth_account;
mod auth_api_keys;
mod auth_keys;
mod auth_mail;
mod auth_totp;
mod chat;
mod cli;
mod foundation;
mod llm;
mod search;
mod user_admin;
mod user_list;
mod user_roles;
mod util;
mod walkthrough;
