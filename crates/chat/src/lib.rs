//! trellis-chat: the ChatService — sessions and history, and replies
//! streamed token by token from LlmService over the mesh, stored as they
//! grow, surviving client disconnects, watchable and cancellable from any
//! replica (Redis pub/sub), finalised even when the server stops.

mod engine;
mod error;
mod live;
mod messages;
mod metrics;
mod prefs;
mod service;
mod sessions;

pub use error::ChatError;
pub use service::{Built, ChatSvc, service};
