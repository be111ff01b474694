//! trellis-core: what every Trellis crate shares and nothing else — typed
//! configuration, the gRPC error helpers of the error model, ids, the
//! checks on stored text and telemetry set-up.

pub mod config;
pub mod error;
pub mod id;
pub mod page;
pub mod rbac;
pub mod telemetry;
pub mod text;

pub use config::{Config, ConfigError, ServiceName};
