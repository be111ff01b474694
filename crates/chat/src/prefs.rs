//! The user's preferences as a line of the system prompt, fetched from
//! UserService over the mesh with the user's own credentials, bounded by
//! `chat.preferences_timeout`, and cached per user (moka) for
//! `chat.preferences_ttl`. A failure or timeout means no preferences for
//! that turn (not cached), never a failed reply.

use std::time::{Duration, Instant};

use moka::sync::Cache;
use tonic::Code;
use trellis_core::ServiceName;
use trellis_mesh::{CallContext, MeshClients};
use trellis_proto::user::v1 as upb;
use trellis_proto::user::v1::user_service_client::UserServiceClient;
use uuid::Uuid;

#[derive(Debug)]
pub struct Prefs {
    clients: MeshClients,
    timeout: Duration,
    cache: Cache<Uuid, Option<String>>,
}

/// The preferences as an instruction, if there is anything to say.
pub fn describe(p: &upb::Preferences) -> Option<String> {
    let mut parts = Vec::new();
    match upb::CommunicationStyle::try_from(p.communication_style) {
        Ok(upb::CommunicationStyle::Formal) => {
            parts.push("Use a formal communication style.".to_string())
        }
        Ok(upb::CommunicationStyle::Casual) => {
            parts.push("Use a casual communication style.".to_string())
        }
        Ok(upb::CommunicationStyle::Technical) => {
            parts.push("Use a technical communication style.".to_string())
        }
        _ => {}
    }
    if !p.industry_focus.is_empty() {
        parts.push(format!(
            "The user's industry focus: {}.",
            p.industry_focus.join(", ")
        ));
    }
    if !p.experience_levels.is_empty() {
        parts.push(format!(
            "Experience levels of interest: {}.",
            p.experience_levels.join(", ")
        ));
    }
    (!parts.is_empty()).then(|| parts.join(" "))
}

impl Prefs {
    pub fn new(clients: MeshClients, ttl: Duration, timeout: Duration) -> Prefs {
        Prefs {
            clients,
            timeout,
            cache: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
        }
    }

    pub async fn line(&self, ctx: &CallContext, user: Uuid) -> Option<String> {
        if let Some(hit) = self.cache.get(&user) {
            return hit;
        }
        let limit = Instant::now() + self.timeout;
        let ctx = CallContext {
            deadline: Some(ctx.deadline.map_or(limit, |d| d.min(limit))),
            ..ctx.clone()
        };
        let fetched = tokio::time::timeout(self.timeout, async {
            let mut c = self
                .clients
                .client(ServiceName::User, &ctx, UserServiceClient::new)?;
            c.get_preferences(upb::GetPreferencesRequest {}).await
        })
        .await;
        let line = match fetched {
            Ok(Ok(r)) => r.into_inner().preferences.as_ref().and_then(describe),
            // Definitive answers for this user: nothing to add.
            Ok(Err(s)) if matches!(s.code(), Code::NotFound | Code::PermissionDenied) => None,
            Ok(Err(s)) => {
                tracing::debug!(error = %s, "no preferences for the chat context");
                return None;
            }
            Err(_) => {
                tracing::warn!(timeout = ?self.timeout, "preferences took too long; replying without them");
                return None;
            }
        };
        self.cache.insert(user, line.clone());
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preferences_become_one_instruction() {
        let p = upb::Preferences {
            communication_style: upb::CommunicationStyle::Formal as i32,
            industry_focus: vec!["fintech".into()],
            ..Default::default()
        };
        assert_eq!(
            describe(&p).as_deref(),
            Some("Use a formal communication style. The user's industry focus: fintech.")
        );
        assert_eq!(describe(&upb::Preferences::default()), None);
    }
}
