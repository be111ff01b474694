//! `trellis sessions show|rename|set|rm|search`: one chat session, and a
//! search over every message you have sent or received (`sessions` alone
//! lists them, in lib.rs).

use clap::Subcommand;
use trellis_proto::chat::v1 as chat;

use chat::chat_service_client::ChatServiceClient;

use crate::{CliError, Client, Io, highlight, json, status_word, timestamp};

#[derive(Subcommand, Debug)]
pub enum SessionsCommand {
    /// A session's settings.
    Show { session: String },
    /// Retitle a session.
    Rename { session: String, title: String },
    /// Change a session's settings (only those given).
    Set {
        session: String,
        /// The instructions every reply follows ("" removes them).
        #[arg(long)]
        system: Option<String>,
        /// Model alias for later turns.
        #[arg(long, short)]
        model: Option<String>,
        /// Ground replies in your indexed documents (on/off).
        #[arg(long, value_name = "on|off", value_parser = on_off)]
        retrieval: Option<bool>,
    },
    /// Delete sessions and their messages.
    Rm {
        #[arg(required = true)]
        sessions: Vec<String>,
    },
    /// Full-text search over your messages, best match first.
    Search {
        query: String,
        /// Only this session.
        #[arg(long, short)]
        session: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: i32,
    },
}

fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("`{s}`: on or off")),
    }
}

fn print_session(io: &mut Io<'_>, s: &chat::Session) -> std::io::Result<()> {
    let st = chat::SessionStatus::try_from(s.status).unwrap_or(chat::SessionStatus::Unspecified);
    let lines = [
        ("id", s.id.clone()),
        ("title", s.title.clone()),
        ("status", status_word(st.as_str_name(), "SESSION_STATUS_")),
        ("model", s.model.clone()),
        (
            "retrieval",
            if s.retrieval { "on" } else { "off" }.to_string(),
        ),
        ("messages", s.message_count.to_string()),
        ("created", timestamp(s.create_time.as_ref())),
        ("last active", timestamp(s.last_activity_time.as_ref())),
        ("system", s.system_prompt.clone()),
    ];
    for (k, v) in lines.iter().filter(|(_, v)| !v.is_empty()) {
        writeln!(io.out, "{k:<12} {v}")?;
    }
    Ok(())
}

impl Client {
    pub(crate) async fn session(
        &self,
        io: &mut Io<'_>,
        action: SessionsCommand,
    ) -> Result<(), CliError> {
        let bearer = self.bearer().await?;
        let mut client = ChatServiceClient::new(self.channel.clone());
        let session = match action {
            SessionsCommand::Show { session } => {
                client
                    .get_session(self.unary(
                        chat::GetSessionRequest {
                            session_id: session,
                        },
                        Some(&bearer),
                    )?)
                    .await?
                    .into_inner()
                    .session
            }
            SessionsCommand::Rename { session, title } => {
                let s = chat::Session {
                    id: session,
                    title,
                    ..Default::default()
                };
                self.update_session(&mut client, &bearer, s, vec!["title".into()])
                    .await?
            }
            SessionsCommand::Set {
                session,
                system,
                model,
                retrieval,
            } => {
                let mut s = chat::Session {
                    id: session,
                    ..Default::default()
                };
                let mut paths = Vec::new();
                if let Some(p) = system {
                    s.system_prompt = p;
                    paths.push("system_prompt".to_string());
                }
                if let Some(m) = model {
                    s.model = m;
                    paths.push("model".to_string());
                }
                if let Some(r) = retrieval {
                    s.retrieval = r;
                    paths.push("retrieval".to_string());
                }
                if paths.is_empty() {
                    return Err(CliError::Usage(
                        "nothing to change: give --system, --model or --retrieval".into(),
                    ));
                }
                self.update_session(&mut client, &bearer, s, paths).await?
            }
            SessionsCommand::Rm { sessions } => {
                for id in &sessions {
                    client
                        .delete_session(self.unary(
                            chat::DeleteSessionRequest {
                                session_id: id.clone(),
                            },
                            Some(&bearer),
                        )?)
                        .await?;
                    writeln!(io.out, "deleted {id}")?;
                }
                return Ok(());
            }
            SessionsCommand::Search {
                query,
                session,
                limit,
            } => {
                let r = client
                    .search_messages(self.unary(
                        chat::SearchMessagesRequest {
                            query,
                            session_id: session.unwrap_or_default(),
                            page_size: limit,
                        },
                        Some(&bearer),
                    )?)
                    .await?
                    .into_inner();
                for h in &r.hits {
                    if self.json {
                        json::print(io.out, h)?;
                        continue;
                    }
                    let who = match chat::Role::try_from(h.role) {
                        Ok(chat::Role::User) => "you",
                        Ok(chat::Role::Assistant) => "assistant",
                        _ => "?",
                    };
                    writeln!(
                        io.out,
                        "[{}] {} {} {who}: {}",
                        timestamp(h.create_time.as_ref()),
                        h.session_id,
                        h.message_id,
                        highlight(&h.snippet, io.color)
                    )?;
                }
                let n = r.hits.len();
                writeln!(io.err, "{n} message{}", if n == 1 { "" } else { "s" })?;
                return Ok(());
            }
        }
        .unwrap_or_default();
        if self.json {
            return json::print(io.out, &session);
        }
        print_session(io, &session)?;
        Ok(())
    }

    async fn update_session(
        &self,
        client: &mut ChatServiceClient<tonic::transport::Channel>,
        bearer: &str,
        session: chat::Session,
        paths: Vec<String>,
    ) -> Result<Option<chat::Session>, CliError> {
        Ok(client
            .update_session(self.unary(
                chat::UpdateSessionRequest {
                    session: Some(session),
                    update_mask: Some(prost_types::FieldMask { paths }),
                },
                Some(bearer),
            )?)
            .await?
            .into_inner()
            .session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retrieval_is_on_or_off() {
        assert_eq!(on_off("on"), Ok(true));
        assert_eq!(on_off("off"), Ok(false));
        assert!(on_off("maybe").is_err());
    }
}
