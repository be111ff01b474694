//! `trellis`: the command-line client of a Trellis mesh, over the generated
//! gRPC clients. `trellis login` keeps the token pair per server (see
//! [`credentials`]) and later commands refresh it when it is about to
//! expire; `--token` / `TRELLIS_TOKEN` uses an API key (or any access
//! token) instead. `trellis chat` prints a reply's tokens as they arrive
//! and Ctrl-C cancels the reply being generated (the server stores what was
//! said, CANCELLED).
//!
//! [`run`] takes its input, output and interrupts as arguments ([`Io`]), so
//! the end-to-end suite drives it against a real mesh without a terminal.

pub mod account;
pub mod admin;
pub mod credentials;
pub mod docs;
pub mod json;
pub mod profile;
pub mod sessions;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};
use tokio::sync::mpsc;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;
use trellis_proto::auth::v1 as auth;
use trellis_proto::chat::v1 as chat;
use trellis_proto::llm::v1 as llm;
use trellis_proto::search::v1 as search;

use auth::auth_service_client::AuthServiceClient;
use chat::chat_service_client::ChatServiceClient;
use credentials::{Credentials, Entry, now_unix};
use llm::llm_service_client::LlmServiceClient;
use search::search_service_client::SearchServiceClient;

/// Refresh the access token when it has less than this left.
const REFRESH_AHEAD_SECS: i64 = 30;
/// Bound of every unary call (a chat reply has none: it takes as long as
/// the model does).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(
    name = "trellis",
    version,
    about = "Command-line client of a Trellis mesh: accounts, chat with streaming replies, search and documents, LLM usage, administration"
)]
pub struct Cli {
    /// The server's address.
    #[arg(
        long,
        global = true,
        env = "TRELLIS_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,
    /// Where the login is kept [default: $XDG_CONFIG_HOME/trellis, else
    /// ~/.config/trellis].
    #[arg(long, global = true, env = "TRELLIS_CONFIG_DIR", value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
    /// A bearer token to use instead of the stored login: an API key
    /// (trk_…) or an access token.
    #[arg(long, global = true, env = "TRELLIS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print data as JSON, one object per line (per item of a list, per
    /// event of a reply), in protobuf's canonical JSON mapping; summaries
    /// stay on standard error.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create an account and log in with it.
    Register {
        #[arg(long)]
        email: String,
        #[arg(long)]
        username: String,
        #[arg(long)]
        display_name: Option<String>,
        /// Read the password from the first line of standard input (it is
        /// also read from there whenever standard input is not a terminal).
        #[arg(long)]
        password_stdin: bool,
    },
    /// Log in (by username or e-mail); later commands use the session.
    Login {
        login: String,
        /// The authenticator's current code, for an account with TOTP (asked
        /// for on a terminal when needed).
        #[arg(long, value_name = "CODE")]
        totp: Option<String>,
        /// A recovery code instead of the authenticator's.
        #[arg(long, value_name = "CODE")]
        recovery_code: Option<String>,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// End this login's session (--all: every session of the account).
    Logout {
        #[arg(long)]
        all: bool,
    },
    /// Who the server takes you for.
    Whoami,
    /// Change your password (your other sessions end).
    Passwd {
        /// Read the current and the new password from the first two lines
        /// of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// API keys: credentials for scripts and services (`--token`).
    Keys {
        #[command(subcommand)]
        action: KeysCommand,
    },
    /// Your profile; `profile set --bio …` changes it.
    Profile {
        #[command(subcommand)]
        action: Option<profile::ProfileCommand>,
    },
    /// Your preferences (how the assistant addresses you …); `prefs set`
    /// changes them.
    Prefs {
        #[command(subcommand)]
        action: Option<profile::PrefsCommand>,
    },
    /// Delete your account (soft: an administrator can restore it); every
    /// session ends.
    DeleteAccount {
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Two-factor authentication: enroll, confirm, disable.
    Totp {
        #[command(subcommand)]
        action: account::TotpCommand,
    },
    /// A forgotten password: request a mailed token, then apply it.
    ResetPassword {
        #[command(subcommand)]
        action: account::ResetCommand,
    },
    /// Verify your e-mail address with the mailed TOKEN; without one, mail
    /// a new token.
    VerifyEmail { token: Option<String> },
    /// The models the gateway offers.
    Models,
    /// Chat: one turn with MESSAGE ("-": standard input), or a conversation
    /// read line by line from standard input. Ctrl-C cancels a reply.
    Chat(ChatArgs),
    /// Your chat sessions, most recently active first; `sessions
    /// show|rename|set|rm ID`, and `sessions search QUERY` over your
    /// messages.
    #[command(args_conflicts_with_subcommands = true)]
    Sessions {
        #[command(subcommand)]
        action: Option<sessions::SessionsCommand>,
        #[arg(long, value_enum)]
        status: Option<SessionStatusArg>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// A chat session's latest messages, oldest first.
    History {
        session: String,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Show each message's id (for watch, cancel and regenerate).
        #[arg(long)]
        ids: bool,
    },
    /// Follow a reply: what it has said so far, then live to its end — after
    /// a disconnect, or from another terminal. Ctrl-C stops watching (the
    /// reply goes on).
    Watch {
        /// The assistant message (`trellis history --ids`).
        message: String,
        #[arg(long)]
        stats: bool,
    },
    /// Cancel a reply being generated, on whichever server generates it.
    Cancel {
        /// The assistant message.
        message: String,
    },
    /// A new reply to the turn an assistant message answered (that one is
    /// kept). Ctrl-C cancels it.
    Regenerate {
        /// The assistant message.
        message: String,
        #[arg(long)]
        stats: bool,
    },
    /// Full-text search over the documents you can see.
    Search(SearchArgs),
    /// The documents search finds: index files, show, delete, collections.
    Docs {
        #[command(subcommand)]
        action: docs::DocsCommand,
    },
    /// Your LLM usage by day and model.
    Usage {
        /// The last this many days.
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
    /// Accounts (administrators): list and search, show, suspend,
    /// deactivate, reactivate, delete, restore. USER is an id, a username or
    /// an e-mail address.
    Users {
        #[command(subcommand)]
        action: admin::UsersCommand,
    },
    /// Roles (administrators): list, assign, revoke.
    Roles {
        #[command(subcommand)]
        action: admin::RolesCommand,
    },
    /// The audit trail (administrators), newest first.
    Audit {
        /// Only acts by this account.
        #[arg(long)]
        actor: Option<String>,
        /// Only acts on this target (an account, or any id).
        #[arg(long)]
        target: Option<String>,
        /// Only this action, e.g. user.suspended or auth.login.failed.
        #[arg(long)]
        action: Option<String>,
        /// Only the last this many days.
        #[arg(long)]
        days: Option<u32>,
        #[arg(long, default_value_t = 50)]
        limit: i32,
    },
    /// Whether you (or --user) hold a permission, wildcards honoured.
    Can {
        permission: String,
        #[arg(long)]
        user: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create a key; its secret is printed once, alone on standard output.
    Create {
        name: String,
        /// A permission the key carries, wildcards allowed (repeatable; at
        /// most your own).
        #[arg(long = "scope", value_name = "PERMISSION", required = true)]
        scopes: Vec<String>,
        /// Expire after this many days (default: never).
        #[arg(long, value_name = "DAYS")]
        ttl_days: Option<u32>,
    },
    /// Your keys, newest first.
    List,
    /// Revoke a key at once.
    Revoke { id: String },
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    /// The message; none: read one turn per line from standard input.
    pub message: Vec<String>,
    /// Continue this session (default: a new one, whose id is printed on
    /// standard error).
    #[arg(long, short)]
    pub session: Option<String>,
    /// Model alias (see `trellis models`).
    #[arg(long, short)]
    pub model: Option<String>,
    /// A new session's title (default: the first message, shortened).
    #[arg(long)]
    pub title: Option<String>,
    /// A new session's system prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Ground a new session's replies in your indexed documents.
    #[arg(long)]
    pub retrieval: bool,
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub max_tokens: Option<i32>,
    /// After each reply, print its tokens, cost and timings on standard
    /// error.
    #[arg(long)]
    pub stats: bool,
}

#[derive(Args, Debug)]
pub struct SearchArgs {
    pub query: String,
    /// Only these collections (repeatable).
    #[arg(long = "collection", value_name = "NAME")]
    pub collections: Vec<String>,
    /// Only documents with all of these tags (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    #[arg(long, default_value_t = 10)]
    pub limit: i32,
    /// Newest first rather than best first.
    #[arg(long)]
    pub recent: bool,
    /// Merge in web results (when the server has a web search provider).
    #[arg(long)]
    pub web: bool,
    /// Show each hit's document id (for `docs show` and `docs rm`).
    #[arg(long)]
    pub ids: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum SessionStatusArg {
    Active,
    Inactive,
    Expired,
}

/// What a command reads and writes. `terminal`: standard input is a
/// terminal, so prompts are shown (and passwords read without echo).
pub struct Io<'a> {
    pub stdin: &'a mut (dyn AsyncBufRead + Unpin + Send),
    pub out: &'a mut (dyn Write + Send),
    pub err: &'a mut (dyn Write + Send),
    /// One message per Ctrl-C.
    pub interrupts: &'a mut mpsc::UnboundedReceiver<()>,
    pub terminal: bool,
    /// Standard output is a terminal: search highlights in bold.
    pub color: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The server refused or failed a call (its code, message and details).
    #[error("{0}")]
    Server(String),
    /// A chat reply failed (the conversation itself goes on).
    #[error("{0}")]
    Reply(String),
    #[error("{0}")]
    Usage(String),
    #[error("not logged in to {0}: run `trellis login`")]
    NotLoggedIn(String),
    #[error("cannot reach {0}")]
    Unreachable(String),
    #[error("interrupted")]
    Interrupted,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl CliError {
    /// The process's exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            _ if self.reader_gone() => 0,
            CliError::Usage(_) => 2,
            CliError::Interrupted => 130,
            _ => 1,
        }
    }

    /// Standard output was closed by its reader (`trellis users list |
    /// head`): it wanted no more, so the command ends quietly, not with an
    /// error.
    pub fn reader_gone(&self) -> bool {
        matches!(self, CliError::Io(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

impl From<Status> for CliError {
    fn from(s: Status) -> Self {
        CliError::Server(describe(&s))
    }
}

pub use trellis_core::error::code_name;

/// A status as a person reads it: code and message, then each field
/// violation, quota and retry delay its details carry.
pub fn describe(s: &Status) -> String {
    let mut text = format!("{}: {}", code_name(s.code()), s.message());
    let details = s.get_error_details();
    if let Some(bad) = details.bad_request() {
        for v in &bad.field_violations {
            let line = format!("{}: {}", v.field, v.description);
            // Said once: servers often put the first violation in the message.
            if !s.message().contains(&line) {
                text.push_str(&format!("\n  {line}"));
            }
        }
    }
    if let Some(q) = details.quota_failure() {
        for v in &q.violations {
            text.push_str(&format!("\n  {}: {}", v.subject, v.description));
        }
    }
    if let Some(d) = details.retry_info().and_then(|r| r.retry_delay) {
        text.push_str(&format!("\n  retry in {:.1}s", d.as_secs_f64()));
    }
    text
}

/// `host:port` → `http://host:port`; no trailing slash. The result is also
/// the key the login is kept under.
pub fn normalize_server(server: &str) -> String {
    let s = server.trim().trim_end_matches('/');
    if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    }
}

/// Runs one command.
pub async fn run(cli: Cli, io: &mut Io<'_>) -> Result<(), CliError> {
    let server = normalize_server(&cli.server);
    let dir = cli.config_dir.clone().or_else(Credentials::default_dir);
    let client = Client {
        channel: connect(&server).await?,
        creds: dir.as_deref().map(Credentials::new),
        token: cli.token.clone().filter(|t| !t.trim().is_empty()),
        server,
        json: cli.json,
    };
    // These read the interrupts themselves: Ctrl-C cancels a reply.
    match cli.command {
        Command::Chat(a) => return client.chat(io, a).await,
        Command::Regenerate { message, stats } => {
            return client.regenerate(io, message, stats).await;
        }
        _ => {}
    }
    let mut interrupts = std::mem::replace(io.interrupts, mpsc::unbounded_channel().1);
    let outcome = tokio::select! {
        r = client.command(io, cli.command) => r,
        Some(()) = interrupts.recv() => Err(CliError::Interrupted),
    };
    *io.interrupts = interrupts;
    outcome
}

async fn connect(server: &str) -> Result<Channel, CliError> {
    let mut endpoint = Endpoint::from_shared(server.to_string())
        .map_err(|e| CliError::Usage(format!("--server {server}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    if server.starts_with("https://") {
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().with_webpki_roots())
            .map_err(|e| CliError::Usage(format!("--server {server}: {e}")))?;
    }
    endpoint.connect().await.map_err(|e| {
        // The innermost cause says most ("Connection refused").
        let mut cause: &dyn std::error::Error = &e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        CliError::Unreachable(format!("{server}: {cause}"))
    })
}

async fn read_line(r: &mut (dyn AsyncBufRead + Unpin + Send)) -> std::io::Result<Option<String>> {
    let mut s = String::new();
    if r.read_line(&mut s).await? == 0 {
        return Ok(None);
    }
    while s.ends_with('\n') || s.ends_with('\r') {
        s.pop();
    }
    Ok(Some(s))
}

fn timestamp(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, 0))
        .map(|d| d.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_else(|| "-".into())
}

fn dollars(micros: i64) -> String {
    format!("${:.6}", micros as f64 / 1_000_000.0)
}

fn millis(d: Option<&prost_types::Duration>) -> String {
    match d {
        Some(d) => format!(
            "{:.0} ms",
            d.seconds as f64 * 1000.0 + f64::from(d.nanos) / 1e6
        ),
        None => "-".into(),
    }
}

/// Rows as left-aligned columns, two spaces apart.
fn table(out: &mut (dyn Write + Send), head: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut widths: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_string()
    };
    writeln!(out, "{}", line(head.to_vec()))?;
    for r in rows {
        writeln!(out, "{}", line(r.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

/// The first line of `text`, at most 60 characters.
fn title_of(text: &str) -> String {
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    let mut t: String = first.chars().take(60).collect();
    if first.chars().count() > 60 {
        t.push('…');
    }
    if t.is_empty() {
        "Terminal chat".into()
    } else {
        t
    }
}

/// `<mark>…</mark>` (search snippets) in bold on a terminal, as is
/// otherwise.
fn highlight(snippet: &str, color: bool) -> String {
    // One line: a snippet may span the title and the body's lines.
    let flat = snippet.split_whitespace().collect::<Vec<_>>().join(" ");
    if color {
        flat.replace("<mark>", "\x1b[1m")
            .replace("</mark>", "\x1b[0m")
    } else {
        flat
    }
}

fn entry_of(username: &str, t: auth::TokenPair) -> Entry {
    Entry {
        username: username.to_string(),
        access_token: t.access_token,
        access_expires: t.access_token_expire_time.map(|t| t.seconds).unwrap_or(0),
        refresh_token: t.refresh_token,
        refresh_expires: t.refresh_token_expire_time.map(|t| t.seconds).unwrap_or(0),
    }
}

struct Client {
    server: String,
    channel: Channel,
    creds: Option<Credentials>,
    token: Option<String>,
    /// `--json`.
    json: bool,
}

impl Client {
    fn creds(&self) -> Result<&Credentials, CliError> {
        self.creds.as_ref().ok_or_else(|| {
            CliError::Usage("no configuration directory: set HOME or pass --config-dir".into())
        })
    }

    fn auth(&self) -> AuthServiceClient<Channel> {
        AuthServiceClient::new(self.channel.clone())
    }

    /// A unary request with the bearer token and the call timeout.
    fn unary<T>(&self, msg: T, bearer: Option<&str>) -> Result<Request<T>, CliError> {
        let mut req = self.streaming(msg, bearer)?;
        req.set_timeout(CALL_TIMEOUT);
        Ok(req)
    }

    fn streaming<T>(&self, msg: T, bearer: Option<&str>) -> Result<Request<T>, CliError> {
        let mut req = Request::new(msg);
        if let Some(b) = bearer {
            let value = format!("Bearer {b}")
                .parse()
                .map_err(|_| CliError::Usage("the token is not a valid header value".into()))?;
            req.metadata_mut().insert("authorization", value);
        }
        Ok(req)
    }

    /// The token to call with: `--token`, else the stored access token,
    /// refreshed first when it is about to expire (the refresh token
    /// rotates; the new pair is stored).
    async fn bearer(&self) -> Result<String, CliError> {
        if let Some(t) = &self.token {
            return Ok(t.trim().to_string());
        }
        let creds = self.creds()?;
        let Some(e) = creds.get(&self.server)? else {
            return Err(CliError::NotLoggedIn(self.server.clone()));
        };
        let now = now_unix();
        if e.access_expires > now + REFRESH_AHEAD_SECS {
            return Ok(e.access_token);
        }
        if e.refresh_expires <= now {
            creds.remove(&self.server)?;
            return Err(CliError::NotLoggedIn(self.server.clone()));
        }
        let refreshed = self
            .auth()
            .refresh(self.unary(
                auth::RefreshRequest {
                    refresh_token: e.refresh_token.clone(),
                },
                None,
            )?)
            .await;
        match refreshed {
            Ok(r) => {
                let pair = r
                    .into_inner()
                    .tokens
                    .ok_or_else(|| CliError::Server("the refresh answered no tokens".into()))?;
                let entry = entry_of(&e.username, pair);
                let token = entry.access_token.clone();
                creds.put(&self.server, entry)?;
                Ok(token)
            }
            Err(s) if s.code() == Code::Unauthenticated => {
                // Revoked, rotated elsewhere or expired: the login is over.
                creds.remove(&self.server)?;
                Err(CliError::NotLoggedIn(self.server.clone()))
            }
            Err(s) => Err(s.into()),
        }
    }

    /// A password: the next line of standard input when asked to or when
    /// it is not a terminal, else typed at `prompt` without echo (twice when
    /// `confirm`).
    async fn password(
        &self,
        io: &mut Io<'_>,
        prompt: &'static str,
        from_stdin: bool,
        confirm: bool,
    ) -> Result<String, CliError> {
        if from_stdin || !io.terminal {
            return read_line(io.stdin)
                .await?
                .filter(|p| !p.is_empty())
                .ok_or_else(|| {
                    CliError::Usage(format!(
                        "no {} on standard input",
                        prompt.trim_end_matches([':', ' '])
                    ))
                });
        }
        let typed = tokio::task::spawn_blocking(move || {
            let p = rpassword::prompt_password(prompt)?;
            if confirm && rpassword::prompt_password("again: ")? != p {
                return Err(std::io::Error::other("the two passwords differ"));
            }
            Ok(p)
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(typed)
    }

    fn save(&self, username: &str, tokens: Option<auth::TokenPair>) -> Result<(), CliError> {
        let pair =
            tokens.ok_or_else(|| CliError::Server("the server answered no tokens".into()))?;
        self.creds()?.put(&self.server, entry_of(username, pair))?;
        Ok(())
    }

    async fn command(&self, io: &mut Io<'_>, command: Command) -> Result<(), CliError> {
        match command {
            Command::Register {
                email,
                username,
                display_name,
                password_stdin,
            } => {
                let password = self
                    .password(io, "password: ", password_stdin, true)
                    .await?;
                let r = self
                    .auth()
                    .register(self.unary(
                        auth::RegisterRequest {
                            email,
                            username,
                            password,
                            display_name: display_name.unwrap_or_default(),
                        },
                        None,
                    )?)
                    .await?
                    .into_inner();
                let account = r.account.unwrap_or_default();
                self.save(&account.username, r.tokens)?;
                writeln!(
                    io.out,
                    "registered {} ({}); logged in to {}",
                    account.username, account.id, self.server
                )?;
            }
            Command::Login {
                login,
                totp,
                recovery_code,
                password_stdin,
            } => {
                let password = self
                    .password(io, "password: ", password_stdin, false)
                    .await?;
                let mut req = auth::LoginRequest {
                    login,
                    password,
                    totp_code: totp.unwrap_or_default(),
                    recovery_code: recovery_code.unwrap_or_default(),
                };
                let answer = match self.auth().login(self.unary(req.clone(), None)?).await {
                    Err(s)
                        if s.code() == Code::Unauthenticated
                            && s.message().contains("second factor")
                            && req.totp_code.is_empty()
                            && req.recovery_code.is_empty() =>
                    {
                        if !io.terminal || password_stdin {
                            return Err(CliError::Usage(
                                "this account has two-factor authentication: pass --totp CODE (or --recovery-code CODE)".into(),
                            ));
                        }
                        write!(io.err, "authenticator code: ")?;
                        io.err.flush()?;
                        req.totp_code = read_line(io.stdin).await?.unwrap_or_default();
                        self.auth().login(self.unary(req, None)?).await?
                    }
                    r => r?,
                };
                let r = answer.into_inner();
                let account = r.account.unwrap_or_default();
                self.save(&account.username, r.tokens)?;
                writeln!(
                    io.out,
                    "logged in to {} as {}",
                    self.server, account.username
                )?;
            }
            Command::Logout { all } => {
                if self.token.is_some() {
                    return Err(CliError::Usage(
                        "logout ends a stored login; a --token (TRELLIS_TOKEN) is revoked with AuthService.RevokeApiKey".into(),
                    ));
                }
                let bearer = match self.bearer().await {
                    Ok(b) => b,
                    Err(CliError::NotLoggedIn(_)) => {
                        writeln!(io.out, "not logged in to {}", self.server)?;
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                };
                let ended = if all {
                    self.auth()
                        .logout_all(self.unary(auth::LogoutAllRequest {}, Some(&bearer))?)
                        .await
                        .map(|_| ())
                } else {
                    self.auth()
                        .logout(self.unary(auth::LogoutRequest {}, Some(&bearer))?)
                        .await
                        .map(|_| ())
                };
                match ended {
                    // Already over on the server: forgetting it is all that is left.
                    Ok(()) => {}
                    Err(s) if s.code() == Code::Unauthenticated => {}
                    Err(s) => return Err(s.into()),
                }
                self.creds()?.remove(&self.server)?;
                writeln!(
                    io.out,
                    "logged out of {}{}",
                    self.server,
                    if all { " (every session)" } else { "" }
                )?;
            }
            Command::Whoami => {
                let bearer = self.bearer().await?;
                let r = self
                    .auth()
                    .who_am_i(self.unary(auth::WhoAmIRequest {}, Some(&bearer))?)
                    .await?
                    .into_inner();
                if self.json {
                    return json::print(io.out, &r);
                }
                let p = r.principal.unwrap_or_default();
                let a = r.account.unwrap_or_default();
                let name = if a.display_name.is_empty() || a.display_name == a.username {
                    a.username.clone()
                } else {
                    format!("{} ({})", a.username, a.display_name)
                };
                writeln!(
                    io.out,
                    "{name} <{}>{}",
                    a.email,
                    if a.email_verified {
                        ""
                    } else {
                        " (not verified)"
                    }
                )?;
                writeln!(io.out, "id:          {}", p.user_id)?;
                writeln!(io.out, "roles:       {}", p.roles.join(", "))?;
                writeln!(io.out, "permissions: {}", p.permissions.join(", "))?;
                writeln!(io.out, "credential:  {}", p.credential_type)?;
                writeln!(
                    io.out,
                    "two-factor:  {}",
                    if a.totp_enabled { "on" } else { "off" }
                )?;
            }
            Command::Passwd { password_stdin } => {
                let bearer = self.bearer().await?;
                let current_password = self
                    .password(io, "current password: ", password_stdin, false)
                    .await?;
                let new_password = self
                    .password(io, "new password: ", password_stdin, true)
                    .await?;
                self.auth()
                    .change_password(self.unary(
                        auth::ChangePasswordRequest {
                            current_password,
                            new_password,
                        },
                        Some(&bearer),
                    )?)
                    .await?;
                writeln!(io.out, "password changed; your other sessions have ended")?;
            }
            Command::Keys { action } => self.keys(io, action).await?,
            Command::Models => {
                let bearer = self.bearer().await?;
                let r = LlmServiceClient::new(self.channel.clone())
                    .list_models(self.unary(llm::ListModelsRequest {}, Some(&bearer))?)
                    .await?
                    .into_inner();
                if self.json {
                    for m in &r.models {
                        json::print(io.out, m)?;
                    }
                    return Ok(());
                }
                let rows: Vec<Vec<String>> = r
                    .models
                    .iter()
                    .map(|m| {
                        vec![
                            m.alias.clone(),
                            m.context_window.to_string(),
                            format!("{:.2}", m.prompt_price_per_million as f64 / 1e6),
                            format!("{:.2}", m.completion_price_per_million as f64 / 1e6),
                            m.providers.join(", "),
                        ]
                    })
                    .collect();
                table(
                    io.out,
                    &["MODEL", "CONTEXT", "$/1M IN", "$/1M OUT", "PROVIDERS"],
                    &rows,
                )?;
            }
            Command::Sessions {
                action: Some(action),
                ..
            } => self.session(io, action).await?,
            Command::Sessions {
                action: None,
                status,
                limit,
            } => self.sessions(io, status, limit).await?,
            Command::History {
                session,
                limit,
                ids,
            } => self.history(io, session, limit, ids).await?,
            Command::Watch { message, stats } => {
                let bearer = self.bearer().await?;
                let mut events = ChatServiceClient::new(self.channel.clone())
                    .watch_message(self.streaming(
                        chat::WatchMessageRequest {
                            message_id: message.clone(),
                            offset: 0,
                        },
                        Some(&bearer),
                    )?)
                    .await?
                    .into_inner();
                self.follow(io, stats, &mut events, CancelBy::Nothing, Some(message))
                    .await?;
            }
            Command::Cancel { message } => {
                let bearer = self.bearer().await?;
                let r = ChatServiceClient::new(self.channel.clone())
                    .cancel_generation(self.unary(
                        chat::CancelGenerationRequest {
                            message_id: message,
                        },
                        Some(&bearer),
                    )?)
                    .await?
                    .into_inner();
                if self.json {
                    return json::print(io.out, &r);
                }
                writeln!(
                    io.out,
                    "{}",
                    if r.cancelled {
                        "cancelled"
                    } else {
                        "already finished"
                    }
                )?;
            }
            Command::Totp { action } => self.totp(io, action).await?,
            Command::Profile { action } => self.profile(io, action).await?,
            Command::Prefs { action } => self.prefs(io, action).await?,
            Command::DeleteAccount { password_stdin } => {
                self.delete_account(io, password_stdin).await?
            }
            Command::ResetPassword { action } => self.reset_password(io, action).await?,
            Command::VerifyEmail { token } => self.verify_email(io, token).await?,
            Command::Search(a) => self.search(io, a).await?,
            Command::Docs { action } => self.docs(io, action).await?,
            Command::Users { action } => self.users(io, action).await?,
            Command::Roles { action } => self.roles(io, action).await?,
            Command::Audit {
                actor,
                target,
                action,
                days,
                limit,
            } => self.audit(io, actor, target, action, days, limit).await?,
            Command::Can { permission, user } => self.can(io, permission, user).await?,
            Command::Usage { days } => self.usage(io, days).await?,
            Command::Chat(_) | Command::Regenerate { .. } => {
                unreachable!("run by `run` itself")
            }
        }
        Ok(())
    }

    async fn keys(&self, io: &mut Io<'_>, action: KeysCommand) -> Result<(), CliError> {
        let bearer = self.bearer().await?;
        let mut client = self.auth();
        match action {
            KeysCommand::Create {
                name,
                scopes,
                ttl_days,
            } => {
                let r = client
                    .create_api_key(self.unary(
                        auth::CreateApiKeyRequest {
                            name,
                            scopes,
                            ttl: ttl_days.map(|d| prost_types::Duration {
                                seconds: i64::from(d) * 86_400,
                                nanos: 0,
                            }),
                        },
                        Some(&bearer),
                    )?)
                    .await?
                    .into_inner();
                let key = r.api_key.clone().unwrap_or_default();
                writeln!(
                    io.err,
                    "created key {} ({}): keep the secret below, it is not shown again",
                    key.id, key.name
                )?;
                if self.json {
                    return json::print(io.out, &r);
                }
                writeln!(io.out, "{}", r.secret)?;
            }
            KeysCommand::List => {
                let mut rows = Vec::new();
                let mut page_token = String::new();
                loop {
                    let r = client
                        .list_api_keys(self.unary(
                            auth::ListApiKeysRequest {
                                page_size: 100,
                                page_token,
                            },
                            Some(&bearer),
                        )?)
                        .await?
                        .into_inner();
                    let now = now_unix();
                    for k in r.api_keys {
                        if self.json {
                            json::print(io.out, &k)?;
                            continue;
                        }
                        let state = if k.revoke_time.is_some() {
                            "revoked"
                        } else if k.expire_time.as_ref().is_some_and(|t| t.seconds <= now) {
                            "expired"
                        } else {
                            "active"
                        };
                        rows.push(vec![
                            k.id,
                            k.name,
                            format!("{}…", k.prefix),
                            state.to_string(),
                            timestamp(k.create_time.as_ref()),
                            timestamp(k.expire_time.as_ref()),
                            timestamp(k.last_use_time.as_ref()),
                            k.scopes.join(","),
                        ]);
                    }
                    if r.next_page_token.is_empty() {
                        break;
                    }
                    page_token = r.next_page_token;
                }
                if self.json {
                    return Ok(());
                }
                table(
                    io.out,
                    &[
                        "ID",
                        "NAME",
                        "PREFIX",
                        "STATE",
                        "CREATED",
                        "EXPIRES",
                        "LAST USED",
                        "SCOPES",
                    ],
                    &rows,
                )?;
            }
            KeysCommand::Revoke { id } => {
                client
                    .revoke_api_key(
                        self.unary(auth::RevokeApiKeyRequest { id: id.clone() }, Some(&bearer))?,
                    )
                    .await?;
                writeln!(io.out, "revoked {id}")?;
            }
        }
        Ok(())
    }

    async fn sessions(
        &self,
        io: &mut Io<'_>,
        status: Option<SessionStatusArg>,
        limit: usize,
    ) -> Result<(), CliError> {
        let bearer = self.bearer().await?;
        let mut client = ChatServiceClient::new(self.channel.clone());
        let status = match status {
            None => chat::SessionStatus::Unspecified,
            Some(SessionStatusArg::Active) => chat::SessionStatus::Active,
            Some(SessionStatusArg::Inactive) => chat::SessionStatus::Inactive,
            Some(SessionStatusArg::Expired) => chat::SessionStatus::Expired,
        };
        let mut rows = Vec::new();
        let mut page_token = String::new();
        while rows.len() < limit {
            let r = client
                .list_sessions(self.unary(
                    chat::ListSessionsRequest {
                        page_size: (limit - rows.len()).min(100) as i32,
                        page_token,
                        status: status as i32,
                    },
                    Some(&bearer),
                )?)
                .await?
                .into_inner();
            for s in r.sessions {
                if self.json {
                    if rows.len() < limit {
                        json::print(io.out, &s)?;
                    }
                    rows.push(Vec::new());
                    continue;
                }
                let st = chat::SessionStatus::try_from(s.status)
                    .unwrap_or(chat::SessionStatus::Unspecified);
                rows.push(vec![
                    s.id,
                    status_word(st.as_str_name(), "SESSION_STATUS_"),
                    s.message_count.to_string(),
                    timestamp(s.last_activity_time.as_ref()),
                    s.model,
                    s.title,
                ]);
            }
            if r.next_page_token.is_empty() {
                break;
            }
            page_token = r.next_page_token;
        }
        if self.json {
            return Ok(());
        }
        rows.truncate(limit);
        table(
            io.out,
            &["ID", "STATUS", "MESSAGES", "LAST ACTIVE", "MODEL", "TITLE"],
            &rows,
        )?;
        Ok(())
    }

    async fn history(
        &self,
        io: &mut Io<'_>,
        session: String,
        limit: usize,
        ids: bool,
    ) -> Result<(), CliError> {
        let bearer = self.bearer().await?;
        let mut client = ChatServiceClient::new(self.channel.clone());
        let mut messages = Vec::new();
        let mut page_token = String::new();
        while messages.len() < limit {
            let r = client
                .list_messages(self.unary(
                    chat::ListMessagesRequest {
                        session_id: session.clone(),
                        page_size: (limit - messages.len()).min(100) as i32,
                        page_token,
                        newest_first: true,
                    },
                    Some(&bearer),
                )?)
                .await?
                .into_inner();
            messages.extend(r.messages);
            if r.next_page_token.is_empty() {
                break;
            }
            page_token = r.next_page_token;
        }
        messages.truncate(limit);
        for m in messages.iter().rev() {
            if self.json {
                json::print(io.out, m)?;
                continue;
            }
            let who = match chat::Role::try_from(m.role) {
                Ok(chat::Role::User) => "you",
                Ok(chat::Role::Assistant) => "assistant",
                _ => "?",
            };
            let status =
                chat::MessageStatus::try_from(m.status).unwrap_or(chat::MessageStatus::Unspecified);
            let note = match status {
                chat::MessageStatus::Completed | chat::MessageStatus::Unspecified => String::new(),
                s => format!(" ({})", status_word(s.as_str_name(), "MESSAGE_STATUS_")),
            };
            let id = if ids {
                format!(" {}", m.id)
            } else {
                String::new()
            };
            writeln!(
                io.out,
                "[{}]{id} {who}{note}: {}",
                timestamp(m.create_time.as_ref()),
                m.content
            )?;
        }
        Ok(())
    }

    async fn search(&self, io: &mut Io<'_>, a: SearchArgs) -> Result<(), CliError> {
        let bearer = self.bearer().await?;
        let r = SearchServiceClient::new(self.channel.clone())
            .search(self.unary(
                search::SearchRequest {
                    query: a.query,
                    collections: a.collections,
                    tags: a.tags,
                    page_size: a.limit,
                    include_web: a.web,
                    order_by: if a.recent {
                        search::SearchOrder::Recency as i32
                    } else {
                        search::SearchOrder::Relevance as i32
                    },
                    ..Default::default()
                },
                Some(&bearer),
            )?)
            .await?
            .into_inner();
        for (i, h) in r.hits.iter().enumerate() {
            if self.json {
                json::print(io.out, h)?;
                continue;
            }
            let place = if h.collection.is_empty() {
                "web".to_string()
            } else {
                h.collection.clone()
            };
            if a.ids && !h.document_id.is_empty() {
                writeln!(
                    io.out,
                    "{}. {} [{place}] {:.3}  {}",
                    i + 1,
                    h.title,
                    h.score,
                    h.document_id
                )?;
            } else {
                writeln!(io.out, "{}. {} [{place}] {:.3}", i + 1, h.title, h.score)?;
            }
            if !h.snippet.is_empty() {
                writeln!(io.out, "   {}", highlight(&h.snippet, io.color))?;
            }
            if !h.url.is_empty() {
                writeln!(io.out, "   {}", h.url)?;
            }
        }
        for w in &r.warnings {
            writeln!(io.err, "warning: {w}")?;
        }
        if !r.did_you_mean.is_empty() {
            writeln!(io.err, "did you mean: {}", r.did_you_mean)?;
        }
        writeln!(
            io.err,
            "{} of about {} results{} ({})",
            r.hits.len(),
            r.estimated_total_size,
            if r.fuzzy { ", by similar spelling" } else { "" },
            millis(r.took.as_ref())
        )?;
        Ok(())
    }

    async fn usage(&self, io: &mut Io<'_>, days: u32) -> Result<(), CliError> {
        let bearer = self.bearer().await?;
        let now = now_unix();
        let r = LlmServiceClient::new(self.channel.clone())
            .get_usage(self.unary(
                llm::GetUsageRequest {
                    start_time: Some(prost_types::Timestamp {
                        seconds: now - i64::from(days) * 86_400,
                        nanos: 0,
                    }),
                    end_time: Some(prost_types::Timestamp {
                        seconds: now + 1,
                        nanos: 0,
                    }),
                    user_id: String::new(),
                },
                Some(&bearer),
            )?)
            .await?
            .into_inner();
        if self.json {
            return json::print(io.out, &r);
        }
        let row = |b: &llm::UsageBucket, day: &str, model: &str| {
            vec![
                day.to_string(),
                model.to_string(),
                b.requests.to_string(),
                b.prompt_tokens.to_string(),
                b.completion_tokens.to_string(),
                dollars(b.cost_micros),
            ]
        };
        let mut rows: Vec<Vec<String>> =
            r.buckets.iter().map(|b| row(b, &b.day, &b.model)).collect();
        let total = r.total.unwrap_or_default();
        rows.push(row(&total, "total", ""));
        table(
            io.out,
            &["DAY", "MODEL", "REQUESTS", "PROMPT", "COMPLETION", "COST"],
            &rows,
        )?;
        Ok(())
    }

    async fn chat(&self, io: &mut Io<'_>, a: ChatArgs) -> Result<(), CliError> {
        let bearer = self.bearer().await?;
        let mut client = ChatServiceClient::new(self.channel.clone());
        let one_turn = match a.message.as_slice() {
            [] => None,
            [dash] if dash == "-" => {
                let mut text = String::new();
                io.stdin.read_to_string(&mut text).await?;
                Some(text)
            }
            words => Some(words.join(" ")),
        };
        if one_turn.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(CliError::Usage("the message is empty".into()));
        }
        let session = match &a.session {
            Some(s) => s.clone(),
            None => {
                let title = a
                    .title
                    .clone()
                    .unwrap_or_else(|| title_of(one_turn.as_deref().unwrap_or("")));
                let s = client
                    .create_session(self.unary(
                        chat::CreateSessionRequest {
                            title,
                            model: a.model.clone().unwrap_or_default(),
                            system_prompt: a.system.clone().unwrap_or_default(),
                            retrieval: a.retrieval,
                        },
                        Some(&bearer),
                    )?)
                    .await?
                    .into_inner()
                    .session
                    .unwrap_or_default();
                writeln!(io.err, "session {}", s.id)?;
                s.id
            }
        };
        let (tx, rx) = mpsc::channel::<chat::ConverseRequest>(4);
        let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut events = client
            .converse(self.streaming(requests, Some(&bearer))?)
            .await?
            .into_inner();
        if let Some(text) = one_turn {
            return self.turn(io, &a, &tx, &mut events, &session, text).await;
        }
        loop {
            if io.terminal {
                write!(io.err, "> ")?;
                io.err.flush()?;
            }
            let line = tokio::select! {
                l = read_line(io.stdin) => l?,
                Some(()) = io.interrupts.recv() => return Err(CliError::Interrupted),
            };
            let Some(line) = line else { break };
            if line.trim().is_empty() {
                continue;
            }
            match self.turn(io, &a, &tx, &mut events, &session, line).await {
                Ok(_) => {}
                Err(CliError::Reply(why)) => writeln!(io.err, "error: {why}")?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends one turn and prints its reply as it streams.
    async fn turn(
        &self,
        io: &mut Io<'_>,
        a: &ChatArgs,
        tx: &mpsc::Sender<chat::ConverseRequest>,
        events: &mut tonic::Streaming<chat::ConverseResponse>,
        session: &str,
        content: String,
    ) -> Result<(), CliError> {
        use chat::converse_request::Action;
        tx.send(chat::ConverseRequest {
            action: Some(Action::Send(chat::Send {
                session_id: session.to_string(),
                content,
                client_message_id: uuid::Uuid::now_v7().to_string(),
                model: a.model.clone().filter(|_| a.session.is_some()),
                temperature: a.temperature,
                max_tokens: a.max_tokens,
            })),
        })
        .await
        .map_err(|_| closed())?;
        self.follow(io, a.stats, events, CancelBy::Converse(tx), None)
            .await
    }

    async fn regenerate(
        &self,
        io: &mut Io<'_>,
        message: String,
        stats: bool,
    ) -> Result<(), CliError> {
        let bearer = self.bearer().await?;
        let mut events = ChatServiceClient::new(self.channel.clone())
            .regenerate_message(self.streaming(
                chat::RegenerateMessageRequest {
                    message_id: message,
                },
                Some(&bearer),
            )?)
            .await?
            .into_inner();
        self.follow(io, stats, &mut events, CancelBy::Unary(&bearer), None)
            .await
    }

    /// Prints a reply's events as they arrive, until it ends. The first
    /// Ctrl-C cancels the reply (the server ends it CANCELLED, keeping what
    /// was said) when `cancel` says how; a second one leaves.
    async fn follow<T: CarriesEvent>(
        &self,
        io: &mut Io<'_>,
        stats: bool,
        events: &mut tonic::Streaming<T>,
        cancel: CancelBy<'_>,
        mut reply: Option<String>,
    ) -> Result<(), CliError> {
        use chat::chat_event::Event;
        let mut cancelling = false;
        let mut open_line = false;
        let mut citations = Vec::new();
        loop {
            let message = tokio::select! {
                biased;
                m = events.message() => m?,
                Some(()) = io.interrupts.recv() => {
                    let Some(id) = reply.clone().filter(|_| !cancelling) else {
                        return Err(CliError::Interrupted);
                    };
                    match &cancel {
                        CancelBy::Converse(tx) => tx
                            .send(chat::ConverseRequest {
                                action: Some(chat::converse_request::Action::Cancel(
                                    chat::Cancel { message_id: id },
                                )),
                            })
                            .await
                            .map_err(|_| closed())?,
                        CancelBy::Unary(bearer) => {
                            ChatServiceClient::new(self.channel.clone())
                                .cancel_generation(self.unary(
                                    chat::CancelGenerationRequest { message_id: id },
                                    Some(bearer),
                                )?)
                                .await?;
                        }
                        CancelBy::Nothing => return Err(CliError::Interrupted),
                    }
                    cancelling = true;
                    continue;
                }
            };
            let Some(message) = message else {
                return Err(closed());
            };
            let Some(event) = message.into_event() else {
                continue;
            };
            if self.json && event.event.is_some() {
                json::print(io.out, &event)?;
                io.out.flush()?;
            }
            let printing = !self.json;
            match event.event {
                Some(Event::Accepted(acc)) => reply = Some(acc.assistant_message_id),
                _ if !printing => match event.event {
                    Some(Event::Completed(_)) => return Ok(()),
                    Some(Event::Failed(f)) => {
                        return Err(CliError::Reply(format!(
                            "{}: {}",
                            code_name(Code::from(f.code)),
                            f.message
                        )));
                    }
                    _ => {}
                },
                Some(Event::Delta(d)) => {
                    io.out.write_all(d.text.as_bytes())?;
                    io.out.flush()?;
                    open_line = !d.text.ends_with('\n');
                }
                Some(Event::Citations(c)) => citations = c.citations,
                Some(Event::Completed(c)) => {
                    if open_line {
                        writeln!(io.out)?;
                    }
                    for (i, cite) in citations.iter().enumerate() {
                        writeln!(io.out, "[{}] {} ({})", i + 1, cite.title, cite.document_id)?;
                    }
                    let cancelled = c.status == chat::MessageStatus::Cancelled as i32;
                    if cancelled {
                        writeln!(io.err, "[cancelled]")?;
                    }
                    if stats {
                        let u = c.usage.unwrap_or_default();
                        writeln!(
                            io.err,
                            "[{} prompt + {} completion tokens, {}, first token {}, {} in all]",
                            u.prompt_tokens,
                            u.completion_tokens,
                            dollars(u.cost_micros),
                            millis(c.time_to_first_token.as_ref()),
                            millis(c.duration.as_ref())
                        )?;
                    }
                    return Ok(());
                }
                Some(Event::Failed(f)) => {
                    if open_line {
                        writeln!(io.out)?;
                    }
                    let mut why = format!("{}: {}", code_name(Code::from(f.code)), f.message);
                    if let Some(d) = f.retry_delay {
                        why.push_str(&format!(" (retry in {}s)", d.seconds.max(1)));
                    }
                    return Err(CliError::Reply(why));
                }
                Some(Event::Authenticated(_)) | None => {}
            }
        }
    }
}

fn closed() -> CliError {
    CliError::Server("the server closed the stream".into())
}

/// How Ctrl-C reaches a reply being printed.
enum CancelBy<'a> {
    /// A Cancel on the conversation's own stream.
    Converse(&'a mpsc::Sender<chat::ConverseRequest>),
    /// CancelGeneration, with this bearer token.
    Unary(&'a str),
    /// It does not: Ctrl-C stops watching.
    Nothing,
}

/// A server-stream message wrapping one chat event.
trait CarriesEvent {
    fn into_event(self) -> Option<chat::ChatEvent>;
}

macro_rules! carries_event {
    ($($t:ty),*) => {$(
        impl CarriesEvent for $t {
            fn into_event(self) -> Option<chat::ChatEvent> {
                self.event
            }
        }
    )*};
}

carries_event!(
    chat::ConverseResponse,
    chat::WatchMessageResponse,
    chat::RegenerateMessageResponse
);

/// `SESSION_STATUS_ACTIVE` → `active`.
fn status_word(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippets_print_on_one_line_marks_in_bold_on_a_terminal() {
        let s = "Beans\nRunner  beans climb <mark>trellises</mark>";
        assert_eq!(
            highlight(s, false),
            "Beans Runner beans climb <mark>trellises</mark>"
        );
        assert_eq!(
            highlight(s, true),
            "Beans Runner beans climb \x1b[1mtrellises\x1b[0m"
        );
    }

    #[test]
    fn servers_are_keyed_with_a_scheme_and_no_trailing_slash() {
        assert_eq!(
            normalize_server("127.0.0.1:50051"),
            "http://127.0.0.1:50051"
        );
        assert_eq!(
            normalize_server("https://api.example.com/"),
            "https://api.example.com"
        );
        assert_eq!(normalize_server(" http://h:1 "), "http://h:1");
    }

    #[test]
    fn statuses_read_with_their_field_violations_and_retry_delay() {
        use tonic_types::{ErrorDetails, StatusExt};
        let mut d = ErrorDetails::new();
        d.add_bad_request_violation("content", "must not be empty");
        d.set_retry_info(Some(Duration::from_secs(3)));
        let s = Status::with_error_details(Code::InvalidArgument, "invalid request", d);
        assert_eq!(
            describe(&s),
            "INVALID_ARGUMENT: invalid request\n  content: must not be empty\n  retry in 3.0s"
        );
        assert_eq!(
            describe(&Status::not_found("no such session")),
            "NOT_FOUND: no such session"
        );
        // A violation the message already states is not repeated.
        let mut d = ErrorDetails::new();
        d.add_bad_request_violation("email", "is required");
        d.add_bad_request_violation("username", "is required");
        let s = Status::with_error_details(Code::InvalidArgument, "email: is required", d);
        assert_eq!(
            describe(&s),
            "INVALID_ARGUMENT: email: is required\n  username: is required"
        );
    }

    #[test]
    fn titles_take_the_first_line_shortened() {
        assert_eq!(title_of("\n  hello there \nsecond"), "hello there");
        assert_eq!(title_of(""), "Terminal chat");
        let long = "x".repeat(80);
        assert_eq!(title_of(&long).chars().count(), 61);
    }

    #[test]
    fn tables_align_their_columns() {
        let mut out = Vec::new();
        table(
            &mut out,
            &["A", "BB"],
            &[
                vec!["long".into(), "x".into()],
                vec!["s".into(), "y".into()],
            ],
        )
        .expect("ok");
        assert_eq!(
            String::from_utf8(out).expect("ok"),
            "A     BB\nlong  x\ns     y\n"
        );
    }

    #[test]
    fn command_lines_parse() {
        let cli = Cli::try_parse_from([
            "trellis", "--server", "h:1", "chat", "-m", "fast", "hello", "world",
        ])
        .expect("ok");
        match cli.command {
            Command::Chat(a) => {
                assert_eq!(a.message, ["hello", "world"]);
                assert_eq!(a.model.as_deref(), Some("fast"));
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["trellis", "sessions", "--status", "nope"]).is_err());
    }
}
