//! trellis-mesh: how Trellis services become one server and reach each other.
//!
//! - [`server`] mounts any subset of services on one port, speaking gRPC and
//!   gRPC-web, with CORS, reflection (v1 and v1alpha), per-service health,
//!   `/metrics`, the request-path layers and graceful shutdown.
//! - [`clients`] hands a service a typed client for any other service,
//!   forwarding the caller's request id, deadline and credentials.
//! - [`local`] links a process's mesh clients to its own server in memory.
//! - [`context`] is what a handler knows about its call.

pub mod clients;
pub mod context;
pub mod health;
pub mod layers;
pub mod local;
pub mod server;
pub mod system;

pub use clients::{Forward, Local, MeshClients};
pub use context::{CallContext, ClientIp, CredentialKind, Deadline, Principal, authenticated};
pub use layers::authn::Authenticator;
pub use server::{MeshBuilder, Needs, RunningMesh, shutdown_signal};
