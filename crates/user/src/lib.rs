//! trellis-user: the UserService — profiles and preferences for everyone,
//! account administration, roles and the audit trail for those allowed.
//! Accounts are the shared account core (`trellis_store::accounts`);
//! ending a user's access goes through the auth crate's revocation path.

mod admin;
mod audit;
mod convert;
mod erasure;
mod error;
mod list;
mod profile;
mod roles;
mod service;
mod validate;

pub use error::UserError;
pub use service::{UserSvc, service};
