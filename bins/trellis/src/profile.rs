//! `trellis profile`, `trellis prefs`, `trellis delete-account`: the
//! caller's own account in UserService.

use clap::{Args, Subcommand, ValueEnum};
use trellis_proto::user::v1 as user;

use crate::admin::print_user;
use crate::{CliError, Client, Io, json, timestamp};

#[derive(Subcommand, Debug)]
pub enum ProfileCommand {
    /// Change profile fields (only those given; "" clears one).
    Set(ProfileFields),
}

#[derive(Args, Debug, Default)]
pub struct ProfileFields {
    #[arg(long)]
    pub display_name: Option<String>,
    #[arg(long)]
    pub first_name: Option<String>,
    #[arg(long)]
    pub last_name: Option<String>,
    /// E.164, e.g. +14155550123.
    #[arg(long)]
    pub phone: Option<String>,
    /// YYYY-MM-DD, in the past.
    #[arg(long)]
    pub date_of_birth: Option<String>,
    #[arg(long)]
    pub bio: Option<String>,
    /// An http(s) URL.
    #[arg(long)]
    pub avatar_url: Option<String>,
    /// A BCP 47 tag, e.g. en-GB.
    #[arg(long)]
    pub locale: Option<String>,
    /// An IANA zone, e.g. Europe/Berlin.
    #[arg(long)]
    pub time_zone: Option<String>,
}

impl ProfileFields {
    /// The user message carrying the given fields, and their mask paths.
    pub fn into_update(self) -> (user::User, Vec<String>) {
        let mut u = user::User::default();
        let mut paths = Vec::new();
        let fields: [(&str, Option<String>, &mut String); 9] = [
            ("display_name", self.display_name, &mut u.display_name),
            ("first_name", self.first_name, &mut u.first_name),
            ("last_name", self.last_name, &mut u.last_name),
            ("phone", self.phone, &mut u.phone),
            ("date_of_birth", self.date_of_birth, &mut u.date_of_birth),
            ("bio", self.bio, &mut u.bio),
            ("avatar_url", self.avatar_url, &mut u.avatar_url),
            ("locale", self.locale, &mut u.locale),
            ("time_zone", self.time_zone, &mut u.time_zone),
        ];
        for (path, value, slot) in fields {
            if let Some(v) = value {
                *slot = v;
                paths.push(path.to_string());
            }
        }
        (u, paths)
    }
}

#[derive(Subcommand, Debug)]
pub enum PrefsCommand {
    /// Change preferences (only those given).
    Set(PrefsFields),
}

#[derive(Args, Debug)]
pub struct PrefsFields {
    /// How the assistant addresses you.
    #[arg(long, value_enum)]
    pub style: Option<StyleArg>,
    /// Industries you work in (repeatable; replaces the list).
    #[arg(long = "industry", value_name = "INDUSTRY")]
    pub industries: Vec<String>,
    /// Empty the industry list.
    #[arg(long, conflicts_with = "industries")]
    pub no_industries: bool,
    /// Experience levels (repeatable; replaces the list).
    #[arg(long = "experience", value_name = "LEVEL")]
    pub experience: Vec<String>,
    /// Empty the experience list.
    #[arg(long, conflicts_with = "experience")]
    pub no_experience: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum StyleArg {
    Formal,
    Casual,
    Technical,
    /// No preference.
    Unset,
}

impl PrefsFields {
    pub fn into_update(self) -> (user::Preferences, Vec<String>) {
        let mut p = user::Preferences::default();
        let mut paths = Vec::new();
        if let Some(s) = self.style {
            p.communication_style = match s {
                StyleArg::Formal => user::CommunicationStyle::Formal,
                StyleArg::Casual => user::CommunicationStyle::Casual,
                StyleArg::Technical => user::CommunicationStyle::Technical,
                StyleArg::Unset => user::CommunicationStyle::Unspecified,
            } as i32;
            paths.push("communication_style".to_string());
        }
        if !self.industries.is_empty() || self.no_industries {
            p.industry_focus = self.industries;
            paths.push("industry_focus".to_string());
        }
        if !self.experience.is_empty() || self.no_experience {
            p.experience_levels = self.experience;
            paths.push("experience_levels".to_string());
        }
        (p, paths)
    }
}

fn style_name(s: i32) -> &'static str {
    match user::CommunicationStyle::try_from(s) {
        Ok(user::CommunicationStyle::Formal) => "formal",
        Ok(user::CommunicationStyle::Casual) => "casual",
        Ok(user::CommunicationStyle::Technical) => "technical",
        _ => "-",
    }
}

fn nothing_to_change() -> CliError {
    CliError::Usage("nothing to change: name at least one field (see --help)".into())
}

impl Client {
    pub(crate) async fn profile(
        &self,
        io: &mut Io<'_>,
        action: Option<ProfileCommand>,
    ) -> Result<(), CliError> {
        let bearer = self.bearer().await?;
        let mut client = user::user_service_client::UserServiceClient::new(self.channel.clone());
        let u = match action {
            None => {
                client
                    .get_me(self.unary(user::GetMeRequest {}, Some(&bearer))?)
                    .await?
                    .into_inner()
                    .user
            }
            Some(ProfileCommand::Set(fields)) => {
                let (u, paths) = fields.into_update();
                if paths.is_empty() {
                    return Err(nothing_to_change());
                }
                client
                    .update_me(self.unary(
                        user::UpdateMeRequest {
                            user: Some(u),
                            update_mask: Some(prost_types::FieldMask { paths }),
                        },
                        Some(&bearer),
                    )?)
                    .await?
                    .into_inner()
                    .user
            }
        }
        .unwrap_or_default();
        if self.json {
            return json::print(io.out, &u);
        }
        print_user(io, &u)?;
        Ok(())
    }

    pub(crate) async fn prefs(
        &self,
        io: &mut Io<'_>,
        action: Option<PrefsCommand>,
    ) -> Result<(), CliError> {
        let bearer = self.bearer().await?;
        let mut client = user::user_service_client::UserServiceClient::new(self.channel.clone());
        let p = match action {
            None => {
                client
                    .get_preferences(self.unary(user::GetPreferencesRequest {}, Some(&bearer))?)
                    .await?
                    .into_inner()
                    .preferences
            }
            Some(PrefsCommand::Set(fields)) => {
                let (p, paths) = fields.into_update();
                if paths.is_empty() {
                    return Err(nothing_to_change());
                }
                client
                    .update_preferences(self.unary(
                        user::UpdatePreferencesRequest {
                            preferences: Some(p),
                            update_mask: Some(prost_types::FieldMask { paths }),
                        },
                        Some(&bearer),
                    )?)
                    .await?
                    .into_inner()
                    .preferences
            }
        }
        .unwrap_or_default();
        if self.json {
            return json::print(io.out, &p);
        }
        writeln!(
            io.out,
            "style         {}",
            style_name(p.communication_style)
        )?;
        writeln!(io.out, "industries    {}", p.industry_focus.join(", "))?;
        writeln!(io.out, "experience    {}", p.experience_levels.join(", "))?;
        writeln!(
            io.out,
            "updated       {}",
            timestamp(p.update_time.as_ref())
        )?;
        Ok(())
    }

    /// `trellis delete-account`: DeleteMe with the password; the login is
    /// forgotten (every session ended).
    pub(crate) async fn delete_account(
        &self,
        io: &mut Io<'_>,
        password_stdin: bool,
    ) -> Result<(), CliError> {
        let bearer = self.bearer().await?;
        let password = self
            .password(
                io,
                "password (this deletes your account): ",
                password_stdin,
                false,
            )
            .await?;
        user::user_service_client::UserServiceClient::new(self.channel.clone())
            .delete_me(self.unary(user::DeleteMeRequest { password }, Some(&bearer))?)
            .await?;
        if let Some(creds) = &self.creds {
            creds.remove(&self.server)?;
        }
        writeln!(io.out, "account deleted; every session ended")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_given_fields_are_in_the_mask() {
        let (u, paths) = ProfileFields {
            bio: Some("hi".into()),
            phone: Some(String::new()),
            ..Default::default()
        }
        .into_update();
        assert_eq!(paths, ["phone", "bio"]);
        assert_eq!(u.bio, "hi");
        assert_eq!(ProfileFields::default().into_update().1.len(), 0);

        let (p, paths) = PrefsFields {
            style: Some(StyleArg::Casual),
            industries: vec![],
            no_industries: true,
            experience: vec!["senior".into()],
            no_experience: false,
        }
        .into_update();
        assert_eq!(
            paths,
            ["communication_style", "industry_focus", "experience_levels"]
        );
        assert_eq!(
            p.communication_style,
            user::CommunicationStyle::Casual as i32
        );
        assert!(p.industry_focus.is_empty());
    }
}
