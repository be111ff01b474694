//! `trellis users`, `trellis roles`, `trellis audit`, `trellis can`:
//! account administration (each call needs the permission the server
//! checks; a member sees NOT_FOUND or PERMISSION_DENIED).

use clap::{Subcommand, ValueEnum};
use trellis_proto::user::v1 as user;
use uuid::Uuid;

use user::user_service_client::UserServiceClient;

use crate::{CliError, Client, Io, json, table, timestamp};

#[derive(Subcommand, Debug)]
pub enum UsersCommand {
    /// Accounts, newest first unless --order-by says otherwise.
    List {
        /// Case-insensitive part of a name, e-mail or username.
        #[arg(long, short)]
        query: Option<String>,
        #[arg(long, value_enum)]
        status: Option<UserStatusArg>,
        /// Only holders of this role.
        #[arg(long)]
        role: Option<String>,
        #[arg(long, value_enum, default_value = "created")]
        order_by: UserOrderArg,
        /// Ascending (default: descending).
        #[arg(long)]
        asc: bool,
        /// Include soft-deleted accounts.
        #[arg(long)]
        deleted: bool,
        /// Accounts per page (at most 100).
        #[arg(long, default_value_t = 20)]
        limit: i32,
        /// Continue where a previous page ended (tokens may begin with
        /// "-").
        #[arg(long, allow_hyphen_values = true)]
        page_token: Option<String>,
        /// Every page, not just the first.
        #[arg(long)]
        all: bool,
    },
    /// One account (by id, username or e-mail).
    Show { user: String },
    /// Create an account (its password from the terminal or standard
    /// input).
    Create {
        #[arg(long)]
        email: String,
        #[arg(long)]
        username: String,
        #[arg(long)]
        display_name: Option<String>,
        #[arg(long)]
        first_name: Option<String>,
        #[arg(long)]
        last_name: Option<String>,
        /// A role (repeatable; default: member).
        #[arg(long = "role", value_name = "ROLE")]
        roles: Vec<String>,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Change an account's e-mail, username or profile fields (only those
    /// given; "" clears a profile field).
    Update {
        user: String,
        #[arg(long)]
        email: Option<String>,
        #[arg(long)]
        username: Option<String>,
        #[command(flatten)]
        fields: crate::profile::ProfileFields,
    },
    /// Erase an account and everything it owns, for good (sessions,
    /// messages, documents, keys, usage).
    Purge {
        user: String,
        /// Confirm: this cannot be undone.
        #[arg(long)]
        yes: bool,
    },
    /// Suspend an account: it cannot sign in and its sessions end at once.
    Suspend {
        user: String,
        #[arg(long, required = true)]
        reason: String,
    },
    /// Deactivate an account (it cannot sign in; its sessions end).
    Deactivate { user: String },
    /// Let a suspended or deactivated account sign in again.
    Reactivate { user: String },
    /// Soft-delete an account (restorable; its sessions end).
    Delete { user: String },
    /// Undo a soft delete.
    Restore { user: String },
}

#[derive(Subcommand, Debug)]
pub enum RolesCommand {
    /// Roles, their permissions and how many accounts hold each.
    List,
    /// Create a role.
    Create {
        name: String,
        /// A permission it grants, service:resource:action with *
        /// wildcards (repeatable).
        #[arg(long = "permission", value_name = "PERMISSION", required = true)]
        permissions: Vec<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Change a role's permissions (the list given replaces them) or
    /// description; holders get them at their next token refresh.
    Update {
        name: String,
        #[arg(long = "permission", value_name = "PERMISSION")]
        permissions: Vec<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Delete a role (refused while assigned, unless --force).
    Delete {
        name: String,
        /// Delete it while assigned: the assignments go too.
        #[arg(long)]
        force: bool,
    },
    /// Give an account a role (it takes effect at the account's next token
    /// refresh).
    Assign { user: String, role: String },
    /// Take a role from an account.
    Revoke { user: String, role: String },
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum UserStatusArg {
    Active,
    Inactive,
    Suspended,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum UserOrderArg {
    Created,
    Email,
    Username,
    LastName,
}

fn status_name(s: i32) -> &'static str {
    match user::UserStatus::try_from(s) {
        Ok(user::UserStatus::Active) => "active",
        Ok(user::UserStatus::Inactive) => "inactive",
        Ok(user::UserStatus::Suspended) => "suspended",
        _ => "-",
    }
}

/// The order_by text ListUsers takes.
pub fn order_by(field: UserOrderArg, asc: bool) -> String {
    let f = match field {
        UserOrderArg::Created => "create_time",
        UserOrderArg::Email => "email",
        UserOrderArg::Username => "username",
        UserOrderArg::LastName => "last_name",
    };
    format!("{f} {}", if asc { "asc" } else { "desc" })
}

fn row(u: &user::User) -> Vec<String> {
    let mut status = status_name(u.status).to_string();
    if u.delete_time.is_some() {
        status.push_str(" (deleted)");
    }
    vec![
        u.id.clone(),
        u.username.clone(),
        u.email.clone(),
        u.display_name.clone(),
        status,
        u.roles.join(","),
        timestamp(u.create_time.as_ref()),
    ]
}

const HEAD: [&str; 7] = [
    "ID", "USERNAME", "EMAIL", "NAME", "STATUS", "ROLES", "CREATED",
];

/// An account as `key value` lines, empty fields left out.
pub(crate) fn print_user(io: &mut Io<'_>, u: &user::User) -> std::io::Result<()> {
    let name = [u.first_name.as_str(), u.last_name.as_str()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    let lines = [
        ("id", u.id.clone()),
        ("username", u.username.clone()),
        (
            "email",
            format!(
                "{}{}",
                u.email,
                if u.email_verified { " (verified)" } else { "" }
            ),
        ),
        ("display name", u.display_name.clone()),
        ("name", name),
        ("status", status_name(u.status).to_string()),
        ("roles", u.roles.join(", ")),
        ("phone", u.phone.clone()),
        ("date of birth", u.date_of_birth.clone()),
        ("bio", u.bio.clone()),
        ("avatar", u.avatar_url.clone()),
        ("locale", u.locale.clone()),
        ("time zone", u.time_zone.clone()),
        ("created", timestamp(u.create_time.as_ref())),
        ("updated", timestamp(u.update_time.as_ref())),
        (
            "deleted",
            u.delete_time
                .as_ref()
                .map(|t| timestamp(Some(t)))
                .unwrap_or_default(),
        ),
    ];
    for (k, v) in lines.iter().filter(|(_, v)| !v.is_empty()) {
        writeln!(io.out, "{k:<13} {v}")?;
    }
    Ok(())
}

impl Client {
    fn users_client(&self) -> UserServiceClient<tonic::transport::Channel> {
        UserServiceClient::new(self.channel.clone())
    }

    /// The id of the account `who` names: an id as it is, else the one
    /// account whose username or e-mail it is (deleted ones included).
    async fn resolve(&self, bearer: &str, who: &str) -> Result<String, CliError> {
        let who = who.trim();
        if Uuid::parse_str(who).is_ok() {
            return Ok(who.to_string());
        }
        // The query matches parts of names too: walk its pages (by
        // username, so an exact username comes early) until the account
        // whose username or e-mail it is turns up.
        let mut req = user::ListUsersRequest {
            page_size: 100,
            query: who.to_string(),
            order_by: "username asc".into(),
            show_deleted: true,
            ..Default::default()
        };
        loop {
            let r = self
                .users_client()
                .list_users(self.unary(req.clone(), Some(bearer))?)
                .await?
                .into_inner();
            if let Some(u) = r
                .users
                .into_iter()
                .find(|u| u.username.eq_ignore_ascii_case(who) || u.email.eq_ignore_ascii_case(who))
            {
                return Ok(u.id);
            }
            if r.next_page_token.is_empty() {
                return Err(CliError::Server(format!(
                    "NOT_FOUND: no account is named {who}"
                )));
            }
            req.page_token = r.next_page_token;
        }
    }

    pub(crate) async fn users(
        &self,
        io: &mut Io<'_>,
        action: UsersCommand,
    ) -> Result<(), CliError> {
        let bearer = self.bearer().await?;
        let mut client = self.users_client();
        // An act on one account: resolve it, call, and name the outcome.
        macro_rules! act {
            ($who:expr, $what:literal, $method:ident, |$id:ident| $req:expr) => {{
                let $id = self.resolve(&bearer, &$who).await?;
                let r = client.$method(self.unary($req, Some(&bearer))?).await?;
                ($what, r.into_inner().user)
            }};
        }
        let changed = match action {
            UsersCommand::List {
                query,
                status,
                role,
                order_by: field,
                asc,
                deleted,
                limit,
                page_token,
                all,
            } => {
                let mut req = user::ListUsersRequest {
                    page_size: limit,
                    page_token: page_token.unwrap_or_default(),
                    query: query.unwrap_or_default(),
                    status: match status {
                        None => user::UserStatus::Unspecified,
                        Some(UserStatusArg::Active) => user::UserStatus::Active,
                        Some(UserStatusArg::Inactive) => user::UserStatus::Inactive,
                        Some(UserStatusArg::Suspended) => user::UserStatus::Suspended,
                    } as i32,
                    role: role.unwrap_or_default(),
                    order_by: order_by(field, asc),
                    show_deleted: deleted,
                };
                let mut rows = Vec::new();
                let (total, next) = loop {
                    let r = client
                        .list_users(self.unary(req.clone(), Some(&bearer))?)
                        .await?
                        .into_inner();
                    if self.json {
                        for u in &r.users {
                            json::print(io.out, u)?;
                        }
                    }
                    rows.extend(r.users.iter().map(row));
                    if !all || r.next_page_token.is_empty() {
                        break (r.total_size, r.next_page_token);
                    }
                    req.page_token = r.next_page_token;
                };
                if !self.json {
                    table(io.out, &HEAD, &rows)?;
                }
                writeln!(
                    io.err,
                    "{} of {total} account{}",
                    rows.len(),
                    if total == 1 { "" } else { "s" }
                )?;
                if !next.is_empty() {
                    writeln!(io.err, "more: --page-token={next}")?;
                }
                return Ok(());
            }
            UsersCommand::Show { user: who } => {
                let id = self.resolve(&bearer, &who).await?;
                let u = client
                    .get_user(self.unary(user::GetUserRequest { id }, Some(&bearer))?)
                    .await?
                    .into_inner()
                    .user
                    .unwrap_or_default();
                if self.json {
                    return json::print(io.out, &u);
                }
                print_user(io, &u)?;
                return Ok(());
            }
            UsersCommand::Create {
                email,
                username,
                display_name,
                first_name,
                last_name,
                roles,
                password_stdin,
            } => {
                let password = self
                    .password(io, "their password: ", password_stdin, true)
                    .await?;
                let r = client
                    .create_user(self.unary(
                        user::CreateUserRequest {
                            email,
                            username,
                            password,
                            display_name: display_name.unwrap_or_default(),
                            first_name: first_name.unwrap_or_default(),
                            last_name: last_name.unwrap_or_default(),
                            roles,
                        },
                        Some(&bearer),
                    )?)
                    .await?;
                ("created", r.into_inner().user)
            }
            UsersCommand::Update {
                user: who,
                email,
                username,
                fields,
            } => {
                let (mut u, mut paths) = fields.into_update();
                if let Some(e) = email {
                    u.email = e;
                    paths.push("email".into());
                }
                if let Some(n) = username {
                    u.username = n;
                    paths.push("username".into());
                }
                if paths.is_empty() {
                    return Err(CliError::Usage(
                        "nothing to change: name at least one field (see --help)".into(),
                    ));
                }
                u.id = self.resolve(&bearer, &who).await?;
                let r = client
                    .update_user(self.unary(
                        user::UpdateUserRequest {
                            user: Some(u),
                            update_mask: Some(prost_types::FieldMask { paths }),
                        },
                        Some(&bearer),
                    )?)
                    .await?;
                ("updated", r.into_inner().user)
            }
            UsersCommand::Purge { user: who, yes } => {
                if !yes {
                    return Err(CliError::Usage(
                        "purging erases the account and all it owns for good: add --yes".into(),
                    ));
                }
                let id = self.resolve(&bearer, &who).await?;
                client
                    .purge_user(
                        self.unary(user::PurgeUserRequest { id: id.clone() }, Some(&bearer))?,
                    )
                    .await?;
                writeln!(io.out, "purged {id}")?;
                return Ok(());
            }
            UsersCommand::Suspend { user: who, reason } => {
                act!(who, "suspended", suspend_user, |id| {
                    user::SuspendUserRequest { id, reason }
                })
            }
            UsersCommand::Deactivate { user: who } => {
                act!(who, "deactivated", deactivate_user, |id| {
                    user::DeactivateUserRequest { id }
                })
            }
            UsersCommand::Reactivate { user: who } => {
                act!(who, "reactivated", reactivate_user, |id| {
                    user::ReactivateUserRequest { id }
                })
            }
            UsersCommand::Delete { user: who } => {
                act!(who, "deleted", delete_user, |id| user::DeleteUserRequest {
                    id
                })
            }
            UsersCommand::Restore { user: who } => {
                act!(who, "restored", restore_user, |id| {
                    user::RestoreUserRequest { id }
                })
            }
        };
        let (what, u) = changed;
        let u = u.unwrap_or_default();
        if self.json {
            return json::print(io.out, &u);
        }
        writeln!(
            io.out,
            "{what} {} ({}): {}",
            u.username,
            u.id,
            status_name(u.status)
        )?;
        Ok(())
    }

    pub(crate) async fn roles(
        &self,
        io: &mut Io<'_>,
        action: RolesCommand,
    ) -> Result<(), CliError> {
        let bearer = self.bearer().await?;
        let mut client = self.users_client();
        match action {
            RolesCommand::List => {
                let mut rows = Vec::new();
                let mut page_token = String::new();
                loop {
                    let r = client
                        .list_roles(self.unary(
                            user::ListRolesRequest {
                                page_size: 100,
                                page_token,
                            },
                            Some(&bearer),
                        )?)
                        .await?
                        .into_inner();
                    for role in r.roles {
                        if self.json {
                            json::print(io.out, &role)?;
                            continue;
                        }
                        rows.push(vec![
                            role.name,
                            role.user_count.to_string(),
                            if role.builtin { "built-in" } else { "" }.to_string(),
                            role.permissions.join(","),
                        ]);
                    }
                    if r.next_page_token.is_empty() {
                        break;
                    }
                    page_token = r.next_page_token;
                }
                if !self.json {
                    table(io.out, &["ROLE", "ACCOUNTS", "", "PERMISSIONS"], &rows)?;
                }
            }
            RolesCommand::Create {
                name,
                permissions,
                description,
            } => {
                let role = user::Role {
                    name,
                    description: description.unwrap_or_default(),
                    permissions,
                    ..Default::default()
                };
                let r = client
                    .create_role(
                        self.unary(user::CreateRoleRequest { role: Some(role) }, Some(&bearer))?,
                    )
                    .await?
                    .into_inner()
                    .role
                    .unwrap_or_default();
                self.print_role(io, "created", &r)?;
            }
            RolesCommand::Update {
                name,
                permissions,
                description,
            } => {
                let mut paths = Vec::new();
                if !permissions.is_empty() {
                    paths.push("permissions".to_string());
                }
                if description.is_some() {
                    paths.push("description".to_string());
                }
                if paths.is_empty() {
                    return Err(CliError::Usage(
                        "nothing to change: give --permission or --description".into(),
                    ));
                }
                let role = user::Role {
                    name,
                    description: description.unwrap_or_default(),
                    permissions,
                    ..Default::default()
                };
                let r = client
                    .update_role(self.unary(
                        user::UpdateRoleRequest {
                            role: Some(role),
                            update_mask: Some(prost_types::FieldMask { paths }),
                        },
                        Some(&bearer),
                    )?)
                    .await?
                    .into_inner()
                    .role
                    .unwrap_or_default();
                self.print_role(io, "updated", &r)?;
            }
            RolesCommand::Delete { name, force } => {
                client
                    .delete_role(self.unary(
                        user::DeleteRoleRequest {
                            name: name.clone(),
                            force,
                        },
                        Some(&bearer),
                    )?)
                    .await?;
                writeln!(io.out, "deleted role {name}")?;
            }
            RolesCommand::Assign { user: who, role } => {
                let user_id = self.resolve(&bearer, &who).await?;
                let req = user::AssignRoleRequest {
                    user_id: user_id.clone(),
                    role,
                };
                let r = client
                    .assign_role(self.unary(req, Some(&bearer))?)
                    .await?
                    .into_inner();
                if self.json {
                    return json::print(io.out, &r);
                }
                writeln!(io.out, "{user_id}: {}", r.roles.join(", "))?;
            }
            RolesCommand::Revoke { user: who, role } => {
                let user_id = self.resolve(&bearer, &who).await?;
                let req = user::RevokeRoleRequest {
                    user_id: user_id.clone(),
                    role,
                };
                let r = client
                    .revoke_role(self.unary(req, Some(&bearer))?)
                    .await?
                    .into_inner();
                if self.json {
                    return json::print(io.out, &r);
                }
                writeln!(io.out, "{user_id}: {}", r.roles.join(", "))?;
            }
        }
        Ok(())
    }

    fn print_role(&self, io: &mut Io<'_>, what: &str, r: &user::Role) -> Result<(), CliError> {
        if self.json {
            return json::print(io.out, r);
        }
        writeln!(
            io.out,
            "{what} role {}: {}",
            r.name,
            r.permissions.join(", ")
        )?;
        Ok(())
    }

    /// `trellis can`: whether an account (default: you) holds a permission.
    pub(crate) async fn can(
        &self,
        io: &mut Io<'_>,
        permission: String,
        who: Option<String>,
    ) -> Result<(), CliError> {
        let bearer = self.bearer().await?;
        let user_id = match who {
            Some(w) => self.resolve(&bearer, &w).await?,
            None => String::new(),
        };
        let r = self
            .users_client()
            .check_permission(self.unary(
                user::CheckPermissionRequest {
                    user_id,
                    permission: permission.clone(),
                },
                Some(&bearer),
            )?)
            .await?
            .into_inner();
        if self.json {
            return json::print(io.out, &r);
        }
        if r.allowed {
            writeln!(
                io.out,
                "yes: {permission} (granted by {})",
                r.granted_by.join(", ")
            )?;
        } else {
            writeln!(io.out, "no: {permission}")?;
        }
        Ok(())
    }

    /// `trellis audit`: the trail, newest first.
    pub(crate) async fn audit(
        &self,
        io: &mut Io<'_>,
        actor: Option<String>,
        target: Option<String>,
        action: Option<String>,
        days: Option<u32>,
        limit: i32,
    ) -> Result<(), CliError> {
        let bearer = self.bearer().await?;
        let actor_id = match actor {
            Some(a) => self.resolve(&bearer, &a).await?,
            None => String::new(),
        };
        let target_id = match target {
            Some(t) if Uuid::parse_str(t.trim()).is_ok() => t.trim().to_string(),
            Some(t) => self.resolve(&bearer, &t).await?,
            None => String::new(),
        };
        let start_time = days.map(|d| prost_types::Timestamp {
            seconds: crate::credentials::now_unix() - i64::from(d) * 86_400,
            nanos: 0,
        });
        let r = self
            .users_client()
            .list_audit_events(self.unary(
                user::ListAuditEventsRequest {
                    page_size: limit,
                    actor_id,
                    target_id,
                    action: action.unwrap_or_default(),
                    start_time,
                    ..Default::default()
                },
                Some(&bearer),
            )?)
            .await?
            .into_inner();
        if self.json {
            for e in &r.events {
                json::print(io.out, e)?;
            }
        }
        let rows: Vec<Vec<String>> = r
            .events
            .iter()
            .map(|e| {
                vec![
                    chrono::DateTime::from_timestamp(
                        e.occur_time.as_ref().map_or(0, |t| t.seconds),
                        0,
                    )
                    .map(|d| d.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_default(),
                    e.action.clone(),
                    if e.actor_id.is_empty() {
                        "-".into()
                    } else {
                        e.actor_id.clone()
                    },
                    format!("{} {}", e.target_type, e.target_id)
                        .trim()
                        .to_string(),
                    e.changed_fields.join(","),
                ]
            })
            .collect();
        if !self.json {
            table(
                io.out,
                &["TIME", "ACTION", "ACTOR", "TARGET", "CHANGED"],
                &rows,
            )?;
        }
        if !r.next_page_token.is_empty() {
            writeln!(io.err, "more events: raise --limit or narrow the filters")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_token_may_begin_with_a_hyphen() {
        use clap::Parser;
        let cli = crate::Cli::try_parse_from(["trellis", "users", "list", "--page-token", "-Hx_9"])
            .expect("parses");
        match cli.command {
            crate::Command::Users {
                action: UsersCommand::List { page_token, .. },
            } => assert_eq!(page_token.as_deref(), Some("-Hx_9")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn orders_are_what_list_users_takes() {
        assert_eq!(order_by(UserOrderArg::Created, false), "create_time desc");
        assert_eq!(order_by(UserOrderArg::LastName, true), "last_name asc");
        assert_eq!(order_by(UserOrderArg::Email, false), "email desc");
    }

    #[test]
    fn a_row_marks_a_deleted_account() {
        let u = user::User {
            id: "i".into(),
            username: "ann".into(),
            status: user::UserStatus::Suspended as i32,
            roles: vec!["admin".into(), "member".into()],
            delete_time: Some(prost_types::Timestamp::default()),
            ..Default::default()
        };
        let r = row(&u);
        assert_eq!(r[4], "suspended (deleted)");
        assert_eq!(r[5], "admin,member");
    }
}
