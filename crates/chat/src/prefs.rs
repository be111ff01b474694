//! The user's preferences as a line of the system prompt, fetched from
//! UserService over the mesh with the user's own credentials and cached
//! per user for `chat.preferences_ttl`. A failure means no preferences,
//! never a failed reply.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use trellis_core::ServiceName;
use trellis_mesh::{CallContext, MeshClients};
use trellis_proto::user::v1 as upb;
use trellis_proto::user::v1::user_service_client::UserServiceClient;
use uuid::Uuid;

#[derive(Debug)]
pub struct Prefs {
    clients: MeshClients,
    ttl: Duration,
    cache: Mutex<HashMap<Uuid, (Instant, Option<String>)>>,
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
    pub fn new(clients: MeshClients, ttl: Duration) -> Prefs {
        Prefs {
            clients,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub async fn line(&self, ctx: &CallContext, user: Uuid) -> Option<String> {
        if let Some((at, v)) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&user)
            && at.elapsed() < self.ttl
        {
            return v.clone();
        }
        let fetched = async {
            let mut c = self
                .clients
                .client(ServiceName::User, ctx, UserServiceClient::new)
                .ok()?;
            let r = c
                .get_preferences(upb::GetPreferencesRequest {})
                .await
                .map_err(|s| tracing::debug!(error = %s, "no preferences for the chat context"))
                .ok()?;
            r.into_inner().preferences
        }
        .await;
        let line = fetched.as_ref().and_then(describe);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > 100_000 {
            cache.clear();
        }
        cache.insert(user, (Instant::now(), line.clone()));
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
