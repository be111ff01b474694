//! What a handler knows about its call, and what a mesh call forwards:
//! request id, deadline and the caller's credentials. A service never trusts
//! a user id from a request body; identity travels as credentials.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::metadata::{AsciiMetadataValue, MetadataMap};

use crate::layers::authn::{self, Authn};
use crate::layers::request_id;

/// How a principal authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialKind {
    /// A signed access token from Login/Refresh.
    AccessToken {
        /// The token's id (`jti`), for revocation.
        token_id: String,
    },
    /// An API key; its scopes are the principal's permissions.
    ApiKey { key_id: uuid::Uuid },
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user_id: uuid::Uuid,
    /// The session (refresh-token family); none for API keys.
    pub session_id: Option<uuid::Uuid>,
    pub roles: Vec<String>,
    /// Effective permissions: the roles' for users, the scopes for API keys.
    pub permissions: Vec<String>,
    pub credential: CredentialKind,
    /// When the credential stops being valid (seconds since the epoch).
    pub expires_at: Option<i64>,
}

impl Principal {
    /// Whether the principal holds `permission` (wildcards honoured).
    pub fn can(&self, permission: &str) -> bool {
        trellis_core::rbac::any_permits(&self.permissions, permission)
    }

    /// PERMISSION_DENIED unless the principal holds `permission`.
    pub fn require(&self, permission: &str) -> Result<(), tonic::Status> {
        if self.can(permission) {
            Ok(())
        } else {
            Err(tonic::Status::permission_denied(format!(
                "missing permission {permission}"
            )))
        }
    }
}

/// The caller of a request that needs one: the verified principal, the
/// reason its credential was rejected, or UNAUTHENTICATED when it sent none.
pub fn authenticated<T>(req: &tonic::Request<T>) -> Result<Arc<Principal>, tonic::Status> {
    match req.extensions().get::<Authn>() {
        Some(Authn::Verified(p)) => Ok(p.clone()),
        Some(Authn::Rejected(status)) => Err(status.clone()),
        None => Err(tonic::Status::unauthenticated(
            "missing credentials (authorization: Bearer <token>)",
        )),
    }
}

/// The call's deadline, set by the deadline layer on every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub Instant);

impl Deadline {
    pub fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }
}

/// The parts of an incoming call that follow it across the mesh.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    pub request_id: Option<AsciiMetadataValue>,
    pub deadline: Option<Instant>,
    pub authorization: Option<AsciiMetadataValue>,
}

impl CallContext {
    /// The context of an incoming call. The credential forwarded is the
    /// one the authentication layer used: the `authorization` header, or
    /// else a browser's session cookie, which becomes a bearer token (the
    /// mesh's own calls carry no cookies, and only this one is needed).
    pub fn from_request<T>(req: &tonic::Request<T>) -> CallContext {
        let md = req.metadata();
        let authorization = md.get("authorization").cloned().or_else(|| {
            authn::cookie(md.as_ref(), authn::ACCESS_COOKIE)
                .and_then(|t| AsciiMetadataValue::try_from(format!("Bearer {t}")).ok())
        });
        CallContext {
            request_id: md.get(request_id::HEADER).cloned(),
            deadline: req.extensions().get::<Deadline>().map(|d| d.0),
            authorization,
        }
    }

    /// A context for work that no client started (start-up, background
    /// jobs): a fresh request id, no deadline, no credentials.
    pub fn background() -> CallContext {
        CallContext {
            request_id: AsciiMetadataValue::try_from(uuid::Uuid::now_v7().to_string()).ok(),
            deadline: None,
            authorization: None,
        }
    }

    /// The same context with credentials replaced (e.g. a service acting
    /// with its own API key).
    pub fn with_authorization(mut self, value: AsciiMetadataValue) -> CallContext {
        self.authorization = Some(value);
        self
    }

    /// Writes this context into an outgoing request's metadata; fails with
    /// DEADLINE_EXCEEDED when no time is left.
    pub fn apply(&self, md: &mut MetadataMap) -> Result<Option<Duration>, tonic::Status> {
        if let Some(id) = &self.request_id {
            md.insert(request_id::HEADER, id.clone());
        }
        if let Some(auth) = &self.authorization {
            md.insert("authorization", auth.clone());
        }
        match self.deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(tonic::Status::deadline_exceeded(
                        "deadline exceeded before the mesh call",
                    ));
                }
                Ok(Some(left))
            }
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(headers: &[(&'static str, &'static str)]) -> CallContext {
        let mut req = tonic::Request::new(());
        for (k, v) in headers {
            req.metadata_mut()
                .append(*k, AsciiMetadataValue::from_static(v));
        }
        CallContext::from_request(&req)
    }

    #[test]
    fn the_credential_used_is_forwarded() {
        let auth = |c: CallContext| {
            c.authorization
                .map(|v| v.to_str().unwrap_or("").to_string())
        };
        assert_eq!(
            auth(ctx(&[("cookie", "a=1; trellis_access=tok.en; b=2")])),
            Some("Bearer tok.en".into())
        );
        assert_eq!(
            auth(ctx(&[
                ("authorization", "Bearer header"),
                ("cookie", "trellis_access=cookie")
            ])),
            Some("Bearer header".into()),
            "the header wins, as in the authentication layer"
        );
        assert_eq!(auth(ctx(&[("cookie", "other=1")])), None);
        assert_eq!(auth(ctx(&[("cookie", "trellis_access=")])), None);
    }
}

/// The client's address as [`crate::layers::client_ip`] resolved it (the
/// socket's peer, or the forwarded client behind a trusted proxy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub std::net::IpAddr);
