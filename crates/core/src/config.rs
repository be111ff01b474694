//! Typed configuration, loaded once at start-up and validated before anything
//! runs. Sources, later ones winning: built-in defaults → an optional
//! `trellis.toml` → `TRELLIS_*` environment variables (`__` nests, e.g.
//! `TRELLIS_SERVER__LISTEN`; `TRELLIS_DATABASE_URL` and `TRELLIS_REDIS_URL` are
//! accepted as the short forms of `database.url` / `redis.url`) → command-line
//! flags. This is the only module that reads the environment.
//!
//! A bad value stops start-up with one line naming the key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::Value;
use serde::{Deserialize, Deserializer, Serialize};

/// Environment variables with this prefix are configuration.
pub const ENV_PREFIX: &str = "TRELLIS_";

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A source could not be read or a value has the wrong type; figment's
    /// message names the key and the source it came from.
    #[error("invalid configuration: {0}")]
    Load(String),
    /// A value parsed but is out of range or inconsistent.
    #[error("invalid configuration: {key}: {message}")]
    Invalid { key: String, message: String },
}

impl From<figment::Error> for ConfigError {
    fn from(err: figment::Error) -> Self {
        // figment may chain several errors; the first one is enough to act on
        // and keeps the message to one line.
        let first = err.into_iter().next().map(|e| e.to_string());
        ConfigError::Load(
            first
                .unwrap_or_else(|| "unknown error".into())
                .replace('\n', " "),
        )
    }
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// The whole configuration of one trellisd process.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub services: ServicesConfig,
    pub telemetry: TelemetryConfig,
    pub auth: AuthConfig,
    pub secrets: SecretsConfig,
    pub mail: MailConfig,
    pub llm: LlmConfig,
    pub search: SearchConfig,
    pub chat: ChatConfig,
    pub dev: DevConfig,
}

/// The listening server and its request path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address for gRPC, gRPC-web and `/metrics` (one port).
    pub listen: SocketAddr,
    /// Largest message accepted or sent, in bytes.
    pub max_message_bytes: usize,
    /// Deadline for a call whose client sent none; a client's shorter
    /// `grpc-timeout` wins.
    #[serde(with = "humantime_serde")]
    pub default_timeout: Duration,
    /// Calls handled at once before new ones are shed with UNAVAILABLE.
    pub concurrency_limit: usize,
    /// How long in-flight calls may run after SIGTERM/SIGINT.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Browser origins allowed to call over gRPC-web; `"*"` allows any.
    pub cors_allowed_origins: Vec<String>,
    /// How often dependency health (PostgreSQL, Redis) is probed.
    #[serde(with = "humantime_serde")]
    pub health_check_interval: Duration,
    /// Reverse proxies / load balancers (addresses or CIDR ranges) whose
    /// `X-Forwarded-For` is believed: a call arriving from one of them is
    /// attributed to the nearest address in that header that is not itself
    /// a trusted proxy. Empty (the default): the socket's peer address is
    /// the client, and `X-Forwarded-For` is ignored.
    pub trusted_proxies: Vec<String>,
}

impl ServerConfig {
    /// `trusted_proxies` parsed (entries that do not parse are skipped;
    /// [`Config::validate`] refuses them at start-up).
    pub fn trusted_proxy_nets(&self) -> Vec<ipnet::IpNet> {
        self.trusted_proxies
            .iter()
            .filter_map(|p| parse_net(p))
            .collect()
    }
}

/// An address (`10.0.0.7`, `::1`) or a CIDR range (`10.0.0.0/8`).
pub fn parse_net(s: &str) -> Option<ipnet::IpNet> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            max_message_bytes: 4 * 1024 * 1024,
            default_timeout: Duration::from_secs(30),
            concurrency_limit: 2048,
            drain_timeout: Duration::from_secs(30),
            cors_allowed_origins: vec!["*".to_string()],
            health_check_interval: Duration::from_secs(2),
            trusted_proxies: Vec::new(),
        }
    }
}

/// PostgreSQL.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://…` URL. `trellisd dev` starts a private server when unset.
    pub url: Option<String>,
    pub pool_size: u32,
    /// How long a call waits for a pooled connection before UNAVAILABLE.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// Long-lived connections, besides the pool, that hot point reads
    /// (GetUser, GetMe) share with their queries pipelined; default one
    /// per CPU, at most 8.
    pub multiplexed_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: None,
            pool_size: 16,
            acquire_timeout: Duration::from_secs(2),
            multiplexed_connections: std::thread::available_parallelism()
                .map_or(2, |n| n.get().min(8) as u32),
        }
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("pool_size", &self.pool_size)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("multiplexed_connections", &self.multiplexed_connections)
            .finish()
    }
}

/// Redis.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://…` URL. `trellisd dev` starts a private server when unset.
    pub url: Option<String>,
    pub pool_size: u32,
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// Prefix of every key Trellis writes, so several installs (or tests)
    /// can share one Redis.
    pub key_prefix: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            pool_size: 16,
            acquire_timeout: Duration::from_secs(2),
            key_prefix: "trellis:".to_string(),
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("pool_size", &self.pool_size)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

/// The Trellis services, by short name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceName {
    System,
    Auth,
    User,
    Chat,
    Llm,
    Search,
}

impl ServiceName {
    pub const ALL: [ServiceName; 6] = [
        ServiceName::System,
        ServiceName::Auth,
        ServiceName::User,
        ServiceName::Chat,
        ServiceName::Llm,
        ServiceName::Search,
    ];

    /// Services this build can serve. The others have contracts still to
    /// land; asking for them is a configuration error, not a silent no-op.
    pub const BUILT: [ServiceName; 6] = [
        ServiceName::System,
        ServiceName::Auth,
        ServiceName::User,
        ServiceName::Chat,
        ServiceName::Llm,
        ServiceName::Search,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ServiceName::System => "system",
            ServiceName::Auth => "auth",
            ServiceName::User => "user",
            ServiceName::Chat => "chat",
            ServiceName::Llm => "llm",
            ServiceName::Search => "search",
        }
    }

    pub fn is_built(self) -> bool {
        Self::BUILT.contains(&self)
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ServiceName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|n| n.as_str() == s.trim())
            .ok_or_else(|| {
                format!(
                    "unknown service '{}' (known: {}, or all)",
                    s.trim(),
                    Self::ALL.map(|n| n.as_str()).join(", ")
                )
            })
    }
}

/// Which services this process serves, and where the others live.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServicesConfig {
    /// Names to serve, or `all`. Accepts a list or a comma-separated string.
    #[serde(deserialize_with = "string_or_list")]
    pub enabled: Vec<String>,
    pub system: Option<Endpoint>,
    pub auth: Option<Endpoint>,
    pub user: Option<Endpoint>,
    pub chat: Option<Endpoint>,
    pub llm: Option<Endpoint>,
    pub search: Option<Endpoint>,
}

impl Default for ServicesConfig {
    fn default() -> Self {
        Self {
            enabled: vec!["all".to_string()],
            system: None,
            auth: None,
            user: None,
            chat: None,
            llm: None,
            search: None,
        }
    }
}

impl ServicesConfig {
    /// The configured address of another service, if any.
    pub fn endpoint(&self, name: ServiceName) -> Option<&Endpoint> {
        match name {
            ServiceName::System => self.system.as_ref(),
            ServiceName::Auth => self.auth.as_ref(),
            ServiceName::User => self.user.as_ref(),
            ServiceName::Chat => self.chat.as_ref(),
            ServiceName::Llm => self.llm.as_ref(),
            ServiceName::Search => self.search.as_ref(),
        }
    }

    /// The services to mount in this process (always including `system`).
    pub fn resolve_enabled(&self) -> Result<Vec<ServiceName>, ConfigError> {
        let mut out = vec![ServiceName::System];
        for raw in &self.enabled {
            if raw.trim() == "all" {
                out.extend(ServiceName::BUILT);
                continue;
            }
            let name: ServiceName = raw.parse().map_err(|m| invalid("services.enabled", m))?;
            if !name.is_built() {
                return Err(invalid(
                    "services.enabled",
                    format!("service '{name}' is not available in this build yet"),
                ));
            }
            out.push(name);
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// Where a service is reached over the mesh.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// `http://host:port` (or `https://`).
    pub address: String,
}

/// Logs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `tracing` env-filter directives, e.g. `info,trellis_mesh=debug`.
    pub log_filter: String,
    pub log_format: LogFormat,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_filter: "info".to_string(),
            log_format: LogFormat::Pretty,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Identity: token lifetimes, password hashing, lockout.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `iss` of issued access tokens, checked on verification.
    pub issuer: String,
    /// `aud` of issued access tokens, checked on verification.
    pub audience: String,
    #[serde(with = "humantime_serde")]
    pub access_token_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub refresh_token_ttl: Duration,
    /// How long a spent refresh token still yields the same successor pair
    /// (concurrent refreshes from one client) instead of revoking the session.
    #[serde(with = "humantime_serde")]
    pub refresh_grace: Duration,
    pub argon2: Argon2Config,
    /// Password hashes computed at once (0: one per CPU core). Further
    /// logins wait, so a login flood cannot starve other calls.
    pub hash_concurrency: usize,
    /// Failed logins within `lockout_window` that lock an account.
    pub lockout_threshold: u32,
    #[serde(with = "humantime_serde")]
    pub lockout_window: Duration,
    /// First lockout's length; each further lockout doubles it (up to a day).
    #[serde(with = "humantime_serde")]
    pub lockout_base: Duration,
    /// Mark session cookies `Secure` (turn off only for plain-HTTP development).
    pub cookie_secure: bool,
    /// Calls per client IP per minute to Login, Register and
    /// RequestPasswordReset (each counted separately).
    pub login_per_ip_per_minute: u32,
    pub register_per_ip_per_minute: u32,
    pub password_reset_per_ip_per_minute: u32,
    /// Introspect calls per client IP and minute (0 = unlimited). Every
    /// replica's verifier asks about API keys it has not cached, from its
    /// own address: size this for the busiest replica.
    pub introspect_per_ip_per_minute: u32,
    /// Lifetime of mailed password-reset tokens.
    #[serde(with = "humantime_serde")]
    pub password_reset_ttl: Duration,
    /// Lifetime of mailed e-mail verification tokens.
    #[serde(with = "humantime_serde")]
    pub email_verification_ttl: Duration,
    /// How often auth state that can no longer be used is deleted (0:
    /// never): see `expired_retention`.
    #[serde(with = "humantime_serde")]
    pub housekeeping_interval: Duration,
    /// How long auth state is kept after it stopped being usable: sessions
    /// after they expired or were revoked (with their refresh tokens),
    /// refresh and mailed tokens after they expired, mail after it was sent.
    #[serde(with = "humantime_serde")]
    pub expired_retention: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            issuer: "trellis".into(),
            audience: "trellis".into(),
            access_token_ttl: Duration::from_secs(15 * 60),
            refresh_token_ttl: Duration::from_secs(30 * 24 * 3600),
            refresh_grace: Duration::from_secs(10),
            argon2: Argon2Config::default(),
            hash_concurrency: 0,
            lockout_threshold: 5,
            lockout_window: Duration::from_secs(15 * 60),
            lockout_base: Duration::from_secs(60),
            cookie_secure: true,
            login_per_ip_per_minute: 30,
            register_per_ip_per_minute: 10,
            password_reset_per_ip_per_minute: 5,
            introspect_per_ip_per_minute: 6000,
            password_reset_ttl: Duration::from_secs(3600),
            email_verification_ttl: Duration::from_secs(48 * 3600),
            housekeeping_interval: Duration::from_secs(3600),
            expired_retention: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// argon2id parameters; the defaults are OWASP's (m=19 MiB, t=2, p=1).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Argon2Config {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for Argon2Config {
    fn default() -> Self {
        Self {
            memory_kib: 19 * 1024,
            iterations: 2,
            parallelism: 1,
        }
    }
}

/// Secrets shared by every replica. Never logged.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SecretsConfig {
    /// Seals page tokens. Replicas serving the same lists must share it;
    /// unset, each process makes its own (fine for one process).
    pub page_token_key: Option<String>,
    /// Seals the auth service's private signing keys in PostgreSQL
    /// (ChaCha20-Poly1305 under a key derived from it; at least 32
    /// characters). Unset, they are stored unencrypted; set later, the keys
    /// stored until then are sealed at startup. Every replica needs the same.
    pub signing_key_secret: Option<String>,
    /// Secrets keys may still be sealed with (rotating the secret): they
    /// open with these, and are sealed again under `signing_key_secret` at
    /// startup.
    pub previous_signing_key_secrets: Vec<String>,
}

impl fmt::Debug for SecretsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretsConfig")
            .field(
                "page_token_key",
                &self.page_token_key.as_ref().map(|_| "***"),
            )
            .field(
                "signing_key_secret",
                &self.signing_key_secret.as_ref().map(|_| "***"),
            )
            .field(
                "previous_signing_key_secrets",
                &format!("{} ***", self.previous_signing_key_secrets.len()),
            )
            .finish()
    }
}

/// Outgoing mail (password resets, e-mail verification).
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MailConfig {
    /// `smtp://user:pass@host:587?tls=required` (STARTTLS), `smtps://…:465`
    /// (implicit TLS) or `smtp://host:25` (plain). Unset: mail is only
    /// logged and kept in the outbox (development).
    pub smtp_url: Option<String>,
    /// The From header, e.g. `Trellis <no-reply@example.com>`.
    pub from: String,
    /// How often the outbox is drained.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl Default for MailConfig {
    fn default() -> Self {
        Self {
            smtp_url: None,
            from: "Trellis <no-reply@trellis.local>".into(),
            poll_interval: Duration::from_secs(2),
        }
    }
}

impl fmt::Debug for MailConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MailConfig")
            .field("smtp_url", &self.smtp_url.as_deref().map(redact_url))
            .field("from", &self.from)
            .field("poll_interval", &self.poll_interval)
            .finish()
    }
}

/// The LLM gateway: providers, model routes, limits, retries, breaker, cache.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LlmConfig {
    /// OpenAI-compatible upstreams by name (lowercase).
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Model aliases callers use, by alias.
    pub models: BTreeMap<String, ModelConfig>,
    /// Quotas of users none of whose roles is listed in `role_limits`.
    pub default_limits: LimitsConfig,
    /// Quotas by role; a user with several listed roles gets, per quota,
    /// the most generous one.
    pub role_limits: BTreeMap<String, LimitsConfig>,
    /// Consecutive failures that open a provider's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker skips its provider before one probe call.
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// First retry back-off; doubles per attempt, with full jitter.
    #[serde(with = "humantime_serde")]
    pub retry_base: Duration,
    /// Longest wait before a retry (back-off cap, and the longest
    /// `Retry-After` honoured; a longer one fails over at once).
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Lifetime of cached responses (requests with `cache` and temperature 0).
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
}

impl Default for LlmConfig {
    fn default() -> Self {
        let mut role_limits = BTreeMap::new();
        role_limits.insert("admin".to_string(), LimitsConfig::UNLIMITED);
        Self {
            providers: BTreeMap::new(),
            models: BTreeMap::new(),
            default_limits: LimitsConfig::default(),
            role_limits,
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(30),
            retry_base: Duration::from_millis(200),
            retry_max: Duration::from_secs(5),
            cache_ttl: Duration::from_secs(3600),
        }
    }
}

/// One OpenAI-compatible upstream.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderConfig {
    /// e.g. `https://api.openai.com/v1`, `https://openrouter.ai/api/v1`,
    /// `http://127.0.0.1:11434/v1` (Ollama).
    pub base_url: String,
    /// The API key itself (prefer `api_key_env`). Never logged.
    pub api_key: Option<String>,
    /// Name of an environment variable holding the API key, read once at
    /// start-up.
    pub api_key_env: Option<String>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// From sending the request to the first generated token.
    #[serde(with = "humantime_serde")]
    pub first_token_timeout: Duration,
    /// The whole call.
    #[serde(with = "humantime_serde")]
    pub total_timeout: Duration,
    /// Retries on this provider (5xx, 429) before failing over.
    pub max_retries: u32,
    /// Ask for a usage report in the stream (`stream_options.include_usage`).
    /// Off for servers that reject the field; a 400 naming it turns it off
    /// by itself too. Without a report, tokens are counted with tiktoken.
    pub include_usage: bool,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        Self {
            base_url: String::new(),
            api_key: None,
            api_key_env: None,
            connect_timeout: Duration::from_secs(3),
            first_token_timeout: Duration::from_secs(30),
            total_timeout: Duration::from_secs(300),
            max_retries: 1,
            include_usage: true,
        }
    }
}

impl fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("api_key_env", &self.api_key_env)
            .field("connect_timeout", &self.connect_timeout)
            .field("first_token_timeout", &self.first_token_timeout)
            .field("total_timeout", &self.total_timeout)
            .field("max_retries", &self.max_retries)
            .field("include_usage", &self.include_usage)
            .finish()
    }
}

/// A model alias.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Providers in failover order: `provider` (the upstream model is the
    /// alias) or `provider:upstream-model`.
    pub routes: Vec<String>,
    /// Prompt and completion tokens together.
    pub context_window: u32,
    /// Completion tokens when the request asks for none.
    pub default_max_tokens: u32,
    /// Micro-dollars per million prompt tokens.
    pub prompt_price_per_million: u64,
    /// Micro-dollars per million completion tokens.
    pub completion_price_per_million: u64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            routes: Vec::new(),
            context_window: 8192,
            default_max_tokens: 1024,
            prompt_price_per_million: 0,
            completion_price_per_million: 0,
        }
    }
}

impl ModelConfig {
    /// The routes as (provider, upstream model) pairs.
    pub fn parsed_routes<'a>(&'a self, alias: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.routes.iter().map(move |r| match r.split_once(':') {
            Some((p, m)) => (p.trim(), m.trim()),
            None => (r.trim(), alias),
        })
    }
}

/// Per-user quotas; 0 means unlimited.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub requests_per_minute: u64,
    pub tokens_per_day: u64,
    pub cost_micros_per_month: u64,
    pub concurrent_streams: u64,
}

impl LimitsConfig {
    pub const UNLIMITED: LimitsConfig = LimitsConfig {
        requests_per_minute: 0,
        tokens_per_day: 0,
        cost_micros_per_month: 0,
        concurrent_streams: 0,
    };
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            requests_per_minute: 60,
            tokens_per_day: 500_000,
            cost_micros_per_month: 10_000_000,
            concurrent_streams: 4,
        }
    }
}

/// ChatService: limits, timeouts, streaming.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ChatConfig {
    /// Model alias of sessions created without one (empty: the first alias
    /// of `llm.models`).
    pub default_model: String,
    /// Longest user message, in characters.
    pub max_message_chars: usize,
    /// A session without activity for this long is INACTIVE.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A session without activity for this long is EXPIRED (read-only).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often a growing reply is written to the database.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Earlier messages sent as context (the gateway trims to the window).
    pub history_messages: usize,
    /// Events buffered per client stream; a slower reader is caught up
    /// from the stored reply instead of buffering more.
    pub stream_buffer: usize,
    /// How long a user's preferences are cached.
    #[serde(with = "humantime_serde")]
    pub preferences_ttl: Duration,
    /// How long fetching a user's preferences may take before the reply
    /// goes ahead without them.
    #[serde(with = "humantime_serde")]
    pub preferences_timeout: Duration,
    /// A STREAMING reply whose replica has not written its heartbeat for
    /// this long is marked INTERRUPTED (replicas beat every quarter of it).
    #[serde(with = "humantime_serde")]
    pub stale_after: Duration,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            default_model: String::new(),
            max_message_chars: 32_000,
            idle_timeout: Duration::from_secs(24 * 3600),
            retention: Duration::from_secs(90 * 24 * 3600),
            flush_interval: Duration::from_millis(250),
            history_messages: 200,
            stream_buffer: 64,
            preferences_ttl: Duration::from_secs(60),
            preferences_timeout: Duration::from_secs(2),
            stale_after: Duration::from_secs(60),
        }
    }
}

/// SearchService: text search language and the optional web provider.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SearchConfig {
    /// PostgreSQL text search configuration for stemming and stop words
    /// (`english`, `simple`, `german`, `french`, …). Documents are indexed
    /// in it: reindex after changing it.
    pub language: String,
    /// Longest query accepted, in characters.
    pub max_query_chars: usize,
    /// External web search (Tavily API); off when unset.
    pub web: Option<WebSearchConfig>,
    /// How long search history is kept (ListHistory, the popular-queries
    /// analytics); older entries are deleted hourly. 0: kept for ever.
    #[serde(with = "humantime_serde")]
    pub history_retention: Duration,
}

impl Default for SearchConfig {
    fn default() -> Self {
        Self {
            language: "english".into(),
            max_query_chars: 1000,
            web: None,
            history_retention: Duration::from_secs(365 * 24 * 3600),
        }
    }
}

/// A web search provider speaking the Tavily search API.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebSearchConfig {
    /// e.g. `https://api.tavily.com`.
    pub url: String,
    pub api_key: Option<String>,
    /// Name of an environment variable holding the key, read at start-up.
    pub api_key_env: Option<String>,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Web results merged into a page at most.
    pub max_results: u32,
}

impl Default for WebSearchConfig {
    fn default() -> Self {
        Self {
            url: "https://api.tavily.com".into(),
            api_key: None,
            api_key_env: None,
            timeout: Duration::from_secs(3),
            max_results: 5,
        }
    }
}

impl fmt::Debug for WebSearchConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebSearchConfig")
            .field("url", &self.url)
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("api_key_env", &self.api_key_env)
            .field("timeout", &self.timeout)
            .field("max_results", &self.max_results)
            .finish()
    }
}

/// Text search configurations PostgreSQL ships.
pub const SEARCH_LANGUAGES: &[&str] = &[
    "simple",
    "arabic",
    "armenian",
    "basque",
    "catalan",
    "danish",
    "dutch",
    "english",
    "finnish",
    "french",
    "german",
    "greek",
    "hindi",
    "hungarian",
    "indonesian",
    "irish",
    "italian",
    "lithuanian",
    "nepali",
    "norwegian",
    "portuguese",
    "romanian",
    "russian",
    "serbian",
    "spanish",
    "swedish",
    "tamil",
    "turkish",
    "yiddish",
];

/// `trellisd dev` only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DevConfig {
    /// Where private PostgreSQL/Redis keep their data between runs.
    pub data_dir: PathBuf,
}

impl Default for DevConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(".trellis"),
        }
    }
}

fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Either::deserialize(d)? {
        Either::One(s) => s
            .split(',')
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect(),
        Either::Many(v) => v,
    })
}

/// Hides the password of a connection URL so it can be logged.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Where configuration comes from, besides defaults and the environment.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// A TOML file that must exist. Without one, `./trellis.toml` is read
    /// when present, or the file named by `TRELLIS_CONFIG`.
    pub file: Option<PathBuf>,
    /// Command-line overrides as (dotted key, value).
    pub overrides: Vec<(String, Value)>,
}

impl Config {
    /// Loads and validates configuration from every source.
    pub fn load(sources: Sources) -> Result<Config, ConfigError> {
        let file = match sources.file {
            Some(f) => {
                if !f.exists() {
                    return Err(invalid(
                        "config",
                        format!("file {} does not exist", f.display()),
                    ));
                }
                Some(f)
            }
            None => std::env::var_os("TRELLIS_CONFIG")
                .map(PathBuf::from)
                .or_else(|| Some(PathBuf::from("trellis.toml")).filter(|p| p.exists())),
        };
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(f) = &file {
            figment = figment.merge(Toml::file_exact(f));
        }
        figment = figment.merge(env_provider());
        for (key, value) in sources.overrides {
            figment = figment.merge(Serialized::global(&key, value));
        }
        let mut config: Config = figment.extract()?;
        config.resolve_secrets_from_env()?;
        config.validate()?;
        Ok(config)
    }

    /// Reads the environment variables that configuration names as secret
    /// sources (`llm.providers.*.api_key_env`).
    fn resolve_secrets_from_env(&mut self) -> Result<(), ConfigError> {
        for (name, p) in &mut self.llm.providers {
            if p.api_key.is_none()
                && let Some(var) = &p.api_key_env
            {
                match std::env::var(var) {
                    Ok(v) if !v.trim().is_empty() => p.api_key = Some(v.trim().to_string()),
                    _ => {
                        return Err(invalid(
                            &format!("llm.providers.{name}.api_key_env"),
                            format!("environment variable {var} is not set"),
                        ));
                    }
                }
            }
        }
        if let Some(w) = &mut self.search.web
            && w.api_key.is_none()
            && let Some(var) = &w.api_key_env
        {
            match std::env::var(var) {
                Ok(v) if !v.trim().is_empty() => w.api_key = Some(v.trim().to_string()),
                _ => {
                    return Err(invalid(
                        "search.web.api_key_env",
                        format!("environment variable {var} is not set"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Loads only defaults plus `file` — no environment. For tests and tools.
    pub fn from_file(file: &Path) -> Result<Config, ConfigError> {
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::file_exact(file))
            .extract()?;
        config.validate()?;
        Ok(config)
    }

    /// Range and consistency checks that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if !(1024..=256 * 1024 * 1024).contains(&s.max_message_bytes) {
            return Err(invalid(
                "server.max_message_bytes",
                "must be between 1024 and 268435456",
            ));
        }
        if s.concurrency_limit == 0 {
            return Err(invalid("server.concurrency_limit", "must be at least 1"));
        }
        if s.default_timeout.is_zero() {
            return Err(invalid(
                "server.default_timeout",
                "must be greater than zero",
            ));
        }
        if s.health_check_interval < Duration::from_millis(50) {
            return Err(invalid(
                "server.health_check_interval",
                "must be at least 50ms",
            ));
        }
        for (i, proxy) in s.trusted_proxies.iter().enumerate() {
            if parse_net(proxy).is_none() {
                return Err(invalid(
                    &format!("server.trusted_proxies[{i}]"),
                    "must be an IP address or a CIDR range, e.g. 10.0.0.0/8",
                ));
            }
        }
        for (i, origin) in s.cors_allowed_origins.iter().enumerate() {
            let ok = origin == "*"
                || ((origin.starts_with("http://") || origin.starts_with("https://"))
                    && !origin.ends_with('/')
                    && http_header_safe(origin));
            if !ok {
                return Err(invalid(
                    &format!("server.cors_allowed_origins[{i}]"),
                    format!("'{origin}' is not an origin like https://app.example.com or *"),
                ));
            }
        }
        if let Some(url) = &self.database.url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err(invalid(
                "database.url",
                "must start with postgres:// or postgresql://",
            ));
        }
        if !(1..=1000).contains(&self.database.pool_size) {
            return Err(invalid("database.pool_size", "must be between 1 and 1000"));
        }
        if !(1..=64).contains(&self.database.multiplexed_connections) {
            return Err(invalid(
                "database.multiplexed_connections",
                "must be between 1 and 64",
            ));
        }
        if let Some(url) = &self.redis.url
            && !(url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("unix://"))
        {
            return Err(invalid(
                "redis.url",
                "must start with redis://, rediss:// or unix://",
            ));
        }
        if !(1..=1000).contains(&self.redis.pool_size) {
            return Err(invalid("redis.pool_size", "must be between 1 and 1000"));
        }
        if self
            .redis
            .key_prefix
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid("redis.key_prefix", "must not contain whitespace"));
        }
        if self
            .secrets
            .page_token_key
            .as_ref()
            .is_some_and(|k| k.len() < 16)
        {
            return Err(invalid(
                "secrets.page_token_key",
                "must be at least 16 characters",
            ));
        }
        if self
            .secrets
            .signing_key_secret
            .as_ref()
            .is_some_and(|k| k.chars().count() < 32)
        {
            return Err(invalid(
                "secrets.signing_key_secret",
                "must be at least 32 characters (e.g. openssl rand -base64 32)",
            ));
        }
        if !self.secrets.previous_signing_key_secrets.is_empty() {
            if self.secrets.signing_key_secret.is_none() {
                return Err(invalid(
                    "secrets.previous_signing_key_secrets",
                    "needs secrets.signing_key_secret (the secret the keys are sealed with again)",
                ));
            }
            if self
                .secrets
                .previous_signing_key_secrets
                .iter()
                .any(|k| k.chars().count() < 32)
            {
                return Err(invalid(
                    "secrets.previous_signing_key_secrets",
                    "each must be at least 32 characters",
                ));
            }
        }
        if let Some(url) = &self.mail.smtp_url
            && !(url.starts_with("smtp://") || url.starts_with("smtps://"))
        {
            return Err(invalid(
                "mail.smtp_url",
                "must start with smtp:// or smtps://",
            ));
        }
        if !self.mail.from.contains('@') {
            return Err(invalid(
                "mail.from",
                "must be an address like Trellis <no-reply@example.com>",
            ));
        }
        let a = &self.auth;
        if a.access_token_ttl < Duration::from_secs(10) {
            return Err(invalid("auth.access_token_ttl", "must be at least 10s"));
        }
        if a.refresh_token_ttl <= a.access_token_ttl {
            return Err(invalid(
                "auth.refresh_token_ttl",
                "must be longer than auth.access_token_ttl",
            ));
        }
        if a.argon2.iterations == 0
            || a.argon2.parallelism == 0
            || a.argon2.memory_kib < 8 * a.argon2.parallelism
        {
            return Err(invalid(
                "auth.argon2",
                "iterations and parallelism must be at least 1 and memory_kib at least 8 × parallelism",
            ));
        }
        if a.lockout_threshold == 0 {
            return Err(invalid("auth.lockout_threshold", "must be at least 1"));
        }
        if a.issuer.is_empty() || a.audience.is_empty() {
            return Err(invalid(
                "auth.issuer",
                "issuer and audience must not be empty",
            ));
        }
        self.validate_llm()?;
        self.services.resolve_enabled()?;
        for name in ServiceName::ALL {
            if let Some(ep) = self.services.endpoint(name) {
                let a = &ep.address;
                let ok = (a.starts_with("http://") || a.starts_with("https://"))
                    && a.len() > 8
                    && http_header_safe(a);
                if !ok {
                    return Err(invalid(
                        &format!("services.{name}.address"),
                        format!("'{a}' is not a URL like http://host:port"),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Config {
    fn validate_llm(&self) -> Result<(), ConfigError> {
        let l = &self.llm;
        for (name, p) in &l.providers {
            let key = |k: &str| format!("llm.providers.{name}.{k}");
            if !(p.base_url.starts_with("http://") || p.base_url.starts_with("https://"))
                || !http_header_safe(&p.base_url)
            {
                return Err(invalid(
                    &key("base_url"),
                    "must be a URL like https://api.openai.com/v1",
                ));
            }
            if p.connect_timeout.is_zero()
                || p.first_token_timeout.is_zero()
                || p.total_timeout.is_zero()
            {
                return Err(invalid(
                    &key("total_timeout"),
                    "timeouts must be above zero",
                ));
            }
            if p.max_retries > 10 {
                return Err(invalid(&key("max_retries"), "must be at most 10"));
            }
        }
        for (alias, m) in &l.models {
            let key = |k: &str| format!("llm.models.{alias}.{k}");
            if alias.is_empty() || alias.len() > 64 || !alias.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(invalid(
                    &key("routes"),
                    "aliases are 1-64 visible characters",
                ));
            }
            if m.routes.is_empty() {
                return Err(invalid(&key("routes"), "needs at least one provider"));
            }
            for (provider, upstream) in m.parsed_routes(alias) {
                if !l.providers.contains_key(provider) {
                    return Err(invalid(
                        &key("routes"),
                        format!("provider '{provider}' is not configured under llm.providers"),
                    ));
                }
                if upstream.is_empty() {
                    return Err(invalid(&key("routes"), "upstream model name is empty"));
                }
            }
            if m.context_window < 16 {
                return Err(invalid(&key("context_window"), "must be at least 16"));
            }
            if m.default_max_tokens == 0 || m.default_max_tokens >= m.context_window {
                return Err(invalid(
                    &key("default_max_tokens"),
                    "must be above zero and below context_window",
                ));
            }
        }
        let ch = &self.chat;
        if !(1..=1_000_000).contains(&ch.max_message_chars) {
            return Err(invalid(
                "chat.max_message_chars",
                "must be between 1 and 1000000",
            ));
        }
        if ch.idle_timeout.is_zero() || ch.retention <= ch.idle_timeout {
            return Err(invalid(
                "chat.retention",
                "idle_timeout must be above zero and retention longer than it",
            ));
        }
        if ch.flush_interval < Duration::from_millis(10) {
            return Err(invalid("chat.flush_interval", "must be at least 10ms"));
        }
        if !(4..=100_000).contains(&ch.stream_buffer) || ch.history_messages > 10_000 {
            return Err(invalid(
                "chat.stream_buffer",
                "stream_buffer 4-100000, history_messages at most 10000",
            ));
        }
        if ch.stale_after < Duration::from_millis(100) {
            return Err(invalid("chat.stale_after", "must be at least 100ms"));
        }
        if ch.preferences_timeout.is_zero() {
            return Err(invalid("chat.preferences_timeout", "must be above zero"));
        }
        if !ch.default_model.is_empty() && !l.models.contains_key(&ch.default_model) {
            return Err(invalid(
                "chat.default_model",
                format!("'{}' is not an alias under llm.models", ch.default_model),
            ));
        }
        let sc = &self.search;
        if !SEARCH_LANGUAGES.contains(&sc.language.as_str()) {
            return Err(invalid(
                "search.language",
                format!("must be one of {}", SEARCH_LANGUAGES.join(", ")),
            ));
        }
        if !(16..=100_000).contains(&sc.max_query_chars) {
            return Err(invalid(
                "search.max_query_chars",
                "must be between 16 and 100000",
            ));
        }
        if let Some(w) = &sc.web {
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                return Err(invalid("search.web.url", "must be an http(s) URL"));
            }
            if w.timeout.is_zero() || !(1..=20).contains(&w.max_results) {
                return Err(invalid(
                    "search.web.max_results",
                    "timeout must be above zero and max_results between 1 and 20",
                ));
            }
        }
        if l.breaker_failures == 0 {
            return Err(invalid("llm.breaker_failures", "must be at least 1"));
        }
        if l.retry_base.is_zero() || l.retry_max < l.retry_base {
            return Err(invalid(
                "llm.retry_max",
                "retry_base must be above zero and retry_max at least retry_base",
            ));
        }
        Ok(())
    }
}

fn http_header_safe(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic())
}

fn env_provider() -> Env {
    Env::prefixed(ENV_PREFIX)
        // TRELLIS_CONFIG names the file; TRELLIS_TEST_* belong to the test harness.
        .filter(|k| {
            let k = k.as_str().to_ascii_lowercase();
            k != "config" && !k.starts_with("test_")
        })
        .map(|k| match k.as_str().to_ascii_lowercase().as_str() {
            "database_url" => "database.url".into(),
            "redis_url" => "redis.url".into(),
            other => other.replace("__", ".").into(),
        })
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail fixes the closure's error type
mod tests {
    use super::*;
    use figment::Jail;

    fn load_in_jail() -> Result<Config, ConfigError> {
        Config::load(Sources::default())
    }

    #[test]
    fn defaults_are_valid() {
        Jail::expect_with(|_| {
            let c = load_in_jail().expect("defaults load");
            assert_eq!(c.server.max_message_bytes, 4 * 1024 * 1024);
            assert_eq!(
                c.services.resolve_enabled().expect("enabled"),
                vec![
                    ServiceName::System,
                    ServiceName::Auth,
                    ServiceName::User,
                    ServiceName::Chat,
                    ServiceName::Llm,
                    ServiceName::Search
                ]
            );
            Ok(())
        });
    }

    #[test]
    fn trusted_proxies_are_addresses_or_ranges() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "trellis.toml",
                "[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.168.1.7\", \"::1\"]\n",
            )?;
            let c = load_in_jail().expect("load");
            let nets = c.server.trusted_proxy_nets();
            assert_eq!(nets.len(), 3);
            assert!(nets[0].contains(&"10.20.30.40".parse::<std::net::IpAddr>().expect("ip")));
            assert!(nets[1].contains(&"192.168.1.7".parse::<std::net::IpAddr>().expect("ip")));
            assert!(!nets[1].contains(&"192.168.1.8".parse::<std::net::IpAddr>().expect("ip")));
            jail.create_file(
                "trellis.toml",
                "[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"proxy.local\"]\n",
            )?;
            let e = load_in_jail().expect_err("a host name is not an address");
            assert!(e.to_string().contains("server.trusted_proxies[1]"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn file_then_env_then_flags() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "trellis.toml",
                "[server]\nlisten = \"127.0.0.1:7000\"\ndefault_timeout = \"5s\"\n[redis]\nkey_prefix = \"file:\"\n",
            )?;
            jail.set_env("TRELLIS_SERVER__DEFAULT_TIMEOUT", "7s");
            jail.set_env("TRELLIS_DATABASE_URL", "postgres://u:hunter2@h/db");
            jail.set_env("TRELLIS_TEST_DATABASE_URL", "ignored");
            let c = Config::load(Sources {
                file: None,
                overrides: vec![("redis.key_prefix".into(), Value::from("flag:"))],
            })
            .expect("load");
            assert_eq!(c.server.listen.port(), 7000);
            assert_eq!(c.server.default_timeout, Duration::from_secs(7));
            assert_eq!(c.redis.key_prefix, "flag:");
            assert_eq!(c.database.url.as_deref(), Some("postgres://u:hunter2@h/db"));
            assert!(
                !format!("{c:?}").contains("hunter2"),
                "secrets never reach Debug output"
            );
            Ok(())
        });
    }

    #[test]
    fn signing_key_secret_from_env_is_checked_and_never_shown() {
        Jail::expect_with(|jail| {
            jail.set_env("TRELLIS_SECRETS__SIGNING_KEY_SECRET", "too-short");
            let e = Config::load(Sources::default()).expect_err("short secret");
            assert!(e.to_string().contains("secrets.signing_key_secret"), "{e}");
            let secret = "Zm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3JhdWx0Z2FycGx5";
            jail.set_env("TRELLIS_SECRETS__SIGNING_KEY_SECRET", secret);
            let c = Config::load(Sources::default()).expect("load");
            assert_eq!(c.secrets.signing_key_secret.as_deref(), Some(secret));
            assert!(!format!("{c:?}").contains(secret));
            let old = "dGhlIG9sZCBzZWNyZXQsIHRoaXJ0eS10d28gY2hhcnM";
            let list = format!("[\"{old}\"]");
            jail.set_env("TRELLIS_SECRETS__PREVIOUS_SIGNING_KEY_SECRETS", &list);
            let c = Config::load(Sources::default()).expect("load");
            assert_eq!(
                c.secrets.previous_signing_key_secrets,
                vec![old.to_string()]
            );
            assert!(!format!("{c:?}").contains(old));
            jail.clear_env();
            jail.set_env("TRELLIS_SECRETS__PREVIOUS_SIGNING_KEY_SECRETS", &list);
            let e = Config::load(Sources::default()).expect_err("previous without current");
            assert!(
                e.to_string().contains("previous_signing_key_secrets"),
                "{e}"
            );
            Ok(())
        });
    }

    #[test]
    fn llm_providers_and_models_from_file_and_env() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "trellis.toml",
                "[llm.providers.openai]\nbase_url = \"https://api.openai.com/v1\"\napi_key_env = \"MY_OPENAI_KEY\"\n\
                 [llm.models.smart]\nroutes = [\"openai:gpt-4o-mini\"]\ncontext_window = 128000\n",
            )?;
            jail.set_env("MY_OPENAI_KEY", "sk-secret-value");
            jail.set_env(
                "TRELLIS_LLM__PROVIDERS__LOCAL__BASE_URL",
                "http://127.0.0.1:11434/v1",
            );
            jail.set_env(
                "TRELLIS_LLM__MODELS__FAST__ROUTES",
                "[\"local:llama3.2\", \"openai\"]",
            );
            let c = load_in_jail().expect("load");
            let openai = &c.llm.providers["openai"];
            assert_eq!(openai.api_key.as_deref(), Some("sk-secret-value"));
            assert!(!format!("{c:?}").contains("sk-secret-value"));
            let fast = &c.llm.models["fast"];
            let routes: Vec<_> = fast.parsed_routes("fast").collect();
            assert_eq!(routes, vec![("local", "llama3.2"), ("openai", "fast")]);
            assert_eq!(c.llm.models["smart"].context_window, 128000);

            jail.set_env("TRELLIS_LLM__MODELS__BAD__ROUTES", "[\"nowhere\"]");
            let err = load_in_jail().expect_err("unknown provider").to_string();
            assert!(err.contains("llm.models.bad.routes"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env(
                "TRELLIS_LLM__PROVIDERS__OPENAI__BASE_URL",
                "https://api.openai.com/v1",
            );
            jail.set_env(
                "TRELLIS_LLM__PROVIDERS__OPENAI__API_KEY_ENV",
                "UNSET_KEY_VAR",
            );
            let err = load_in_jail().expect_err("missing key").to_string();
            assert!(err.contains("UNSET_KEY_VAR is not set"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn bad_type_names_the_key() {
        Jail::expect_with(|jail| {
            jail.set_env("TRELLIS_SERVER__CONCURRENCY_LIMIT", "lots");
            let err = load_in_jail().expect_err("must fail").to_string();
            assert!(
                err.to_lowercase().contains("server.concurrency_limit"),
                "{err}"
            );
            assert!(!err.contains('\n'));
            Ok(())
        });
    }

    #[test]
    fn out_of_range_names_the_key() {
        Jail::expect_with(|jail| {
            jail.set_env("TRELLIS_SERVER__MAX_MESSAGE_BYTES", "12");
            let err = load_in_jail().expect_err("must fail").to_string();
            assert_eq!(
                err,
                "invalid configuration: server.max_message_bytes: must be between 1024 and 268435456"
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_rejected() {
        Jail::expect_with(|jail| {
            jail.create_file("trellis.toml", "[server]\nlisten_addr = \"127.0.0.1:1\"\n")?;
            let err = load_in_jail().expect_err("must fail").to_string();
            assert!(err.contains("listen_addr"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn services_list_and_endpoints() {
        Jail::expect_with(|jail| {
            jail.set_env("TRELLIS_SERVICES__ENABLED", "system, all");
            jail.set_env("TRELLIS_SERVICES__AUTH__ADDRESS", "http://auth:50051");
            let c = load_in_jail().expect("load");
            assert_eq!(
                c.services
                    .endpoint(ServiceName::Auth)
                    .map(|e| e.address.as_str()),
                Some("http://auth:50051")
            );
            jail.set_env("TRELLIS_SERVICES__ENABLED", "bogus");
            let err = load_in_jail().expect_err("unknown service").to_string();
            assert!(
                err.contains("services.enabled") && err.contains("bogus"),
                "{err}"
            );
            jail.set_env("TRELLIS_SERVICES__ENABLED", "all");
            jail.set_env("TRELLIS_SERVICES__AUTH__ADDRESS", "auth:50051");
            let err = load_in_jail().expect_err("bad address").to_string();
            assert!(err.contains("services.auth.address"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:pw@h:5/db"),
            "postgres://u:***@h:5/db"
        );
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
    }
}
