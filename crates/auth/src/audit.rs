//! Where a call came from, and recording what it did in the audit trail.
//! A failed audit write is logged, not returned: the act it describes has
//! already happened and must not be reported as failed.

use diesel_async::AsyncPgConnection;
use tonic::Request;
use trellis_store::audit::{self, AuditEvent};

/// The client side of a call: request id, address, user agent.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub request_id: String,
    pub ip: String,
    pub user_agent: String,
}

impl Origin {
    pub fn of<T>(req: &Request<T>) -> Origin {
        let text = |name: &str| {
            req.metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .chars()
                .take(300)
                .collect::<String>()
        };
        Origin {
            request_id: text("x-request-id"),
            // Behind a trusted proxy, the client it forwarded for.
            ip: req
                .extensions()
                .get::<trellis_mesh::ClientIp>()
                .map(|c| c.0)
                .or_else(|| req.remote_addr().map(|a| a.ip()))
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
            user_agent: text("user-agent"),
        }
    }
}

/// Records `event`, filling in the origin.
pub async fn record(conn: &mut AsyncPgConnection, origin: &Origin, mut event: AuditEvent) {
    event.request_id = origin.request_id.clone();
    event.ip_address = origin.ip.clone();
    let action = event.action;
    if let Err(e) = audit::record(conn, event).await {
        tracing::error!(error = %e, action, "could not write audit event");
    }
}
