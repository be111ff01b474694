//! trellis-auth: the AuthService (accounts' credentials, sessions, tokens,
//! signing keys) and the [`TokenVerifier`] every service mounts through the
//! mesh's authentication layer.

mod abuse;
mod api_keys;
pub mod audit;
mod credentials;
mod error;
pub mod housekeeping;
pub mod keys;
pub mod mail;
mod password;
pub mod revocation;
pub mod seed;
mod service;
mod session_rpcs;
mod sessions;
pub mod tokens;
mod totp;
pub mod validate;
pub mod verifier;

pub use error::AuthError;
pub use password::PasswordHasher;
pub use revocation::Revocations;
pub use service::{AuthSvc, service};
pub use sessions::end_user_access;
pub use verifier::TokenVerifier;
