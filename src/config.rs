//! Command line and configuration: every flag is also an environment variable, secrets are held
//! in `secrecy` types, and a bad value stops the process with exit code 2 and one line that names
//! the variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use secrecy::SecretString;

use crate::auth::{AuthConfig, AuthSettings, Role};
use crate::domain::DEFAULT_BUCKET_PATTERN;

#[derive(Debug, Parser)]
#[command(
    name = "backup-provisioner",
    version,
    about = "Provisions pgBackRest S3 repositories for PGO PostgresClusters"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Emit logs as JSON lines (for log shippers) instead of human-readable text.
    #[arg(long, env = "BP_LOG_JSON", global = true, default_value_t = false)]
    pub log_json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP API and (unless --workers 0) job workers in one process.
    Serve(Box<ServeArgs>),
    /// Run job workers only (boxed: its settings make it the largest variant).
    Worker(Box<WorkerArgs>),
    /// Apply database migrations as the schema's owner role and exit (--grant-to: and grant the
    /// runtime role what the service needs).
    Migrate(MigrateArgs),
    /// Print the OpenAPI document.
    Openapi,
    /// Mint an HS256 token for simple installs and curl.
    Token(TokenArgs),
    /// The admin CLI: every API operation over HTTP (exit codes: 0 ok, 1 job failed, 2 usage,
    /// 3 refused (4xx), 4 unavailable, 5 --wait timed out).
    Client(Box<crate::client::ClientArgs>),
    /// The PostgresCluster controller alone: annotated PostgresClusters get their repositories
    /// (jobs run on `serve` or `worker`).
    Controller(Box<ControllerArgs>),
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// Postgres connection string.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: SecretString,
}

/// `migrate`: the owner role's connection and the runtime role to grant.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// Connection string of the role that owns the schema (default: DATABASE_URL).
    #[arg(long, env = "BP_MIGRATION_DATABASE_URL", hide_env_values = true)]
    pub migration_database_url: Option<SecretString>,
    /// Used when BP_MIGRATION_DATABASE_URL is not set.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<SecretString>,
    /// The role the service runs as (DATABASE_URL of serve and worker): granted what it needs,
    /// on the audit log only SELECT and INSERT, now and on tables later migrations add.
    #[arg(long = "grant-to", env = "BP_RUNTIME_DB_ROLE")]
    pub grant_to: Option<String>,
}

impl MigrateArgs {
    /// The owner role's connection string and the variable it came from.
    pub fn owner_url(&self) -> Result<(&'static str, &SecretString), ConfigError> {
        match (&self.migration_database_url, &self.database_url) {
            (Some(url), _) => Ok(("BP_MIGRATION_DATABASE_URL", url)),
            (None, Some(url)) => Ok(("DATABASE_URL", url)),
            (None, None) => Err(ConfigError::new(
                "BP_MIGRATION_DATABASE_URL",
                "missing: set BP_MIGRATION_DATABASE_URL (or DATABASE_URL) to the schema owner's connection string",
            )),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub worker: WorkerSettingsArgs,
    #[command(flatten)]
    pub controller: ControllerSettingsArgs,
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub worker: WorkerSettingsArgs,
}

#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
    /// Address the API listens on.
    #[arg(long, env = "BP_LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen_addr: SocketAddr,
    /// Shared secret for HS256 tokens (simple installs). Exclusive with BP_OIDC_ISSUER.
    #[arg(long, env = "BP_JWT_HS256_SECRET", hide_env_values = true)]
    pub jwt_hs256_secret: Option<SecretString>,
    /// OIDC issuer whose JWKS signs RS256/ES256 tokens (e.g. ZITADEL).
    #[arg(long, env = "BP_OIDC_ISSUER")]
    pub oidc_issuer: Option<url::Url>,
    /// Expected `aud` claim.
    #[arg(long, env = "BP_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Claim that carries roles: an array of names or an object whose keys are names.
    #[arg(long, env = "BP_JWT_ROLES_CLAIM", default_value = "roles")]
    pub jwt_roles_claim: String,
    /// Longest accepted token lifetime (`exp - iat`, e.g. 1h); tokens must then carry `iat`.
    #[arg(long, env = "BP_JWT_MAX_LIFETIME", value_parser = humantime::parse_duration)]
    pub jwt_max_lifetime: Option<Duration>,
    /// Comma-separated origins allowed by CORS (the internal portal).
    #[arg(long, env = "BP_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// A job's event stream (`GET /v1/jobs/{id}/events`, `text/event-stream`) sends a
    /// keep-alive comment after this long without an event, so proxies keep it open.
    #[arg(long, env = "BP_EVENT_STREAM_KEEP_ALIVE", default_value = "15s", value_parser = humantime::parse_duration)]
    pub event_stream_keep_alive: Duration,
    /// Comma-separated namespaces a repository may target (empty: any).
    #[arg(long, env = "BP_ALLOWED_NAMESPACES", value_delimiter = ',')]
    pub allowed_namespaces: Vec<String>,
    /// Regular expression every bucket name must match.
    #[arg(long, env = "BP_BUCKET_NAME_PATTERN", default_value = DEFAULT_BUCKET_PATTERN)]
    pub bucket_name_pattern: String,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "BP_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// Requests taking longer are answered 503 (must exceed the 30 s long-poll maximum).
    #[arg(long, env = "BP_REQUEST_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// How long a client may take to send a request's line and headers; an idle keep-alive
    /// connection is closed after the same time.
    #[arg(long, env = "BP_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// Connections served at once; further ones wait in the listen backlog.
    #[arg(long, env = "BP_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Largest request line plus headers, in bytes (431 beyond; at least 8192).
    #[arg(long, env = "BP_MAX_HEADER_BYTES", default_value_t = 32 * 1024)]
    pub max_header_bytes: usize,
    /// Mutating /v1 requests (POST, PUT, PATCH, DELETE) per token subject, e.g. 60/min; off.
    #[arg(long, env = "BP_RATE_LIMIT_PER_SUBJECT", default_value = "60/min")]
    pub rate_limit_per_subject: RateLimit,
    /// Mutating /v1 requests of all subjects together, e.g. 600/min; off.
    #[arg(long, env = "BP_RATE_LIMIT_GLOBAL", default_value = "600/min")]
    pub rate_limit_global: RateLimit,
    /// Reading /v1 requests (GET, HEAD) per token subject; off by default.
    #[arg(long, env = "BP_RATE_LIMIT_READS_PER_SUBJECT", default_value = "off")]
    pub rate_limit_reads_per_subject: RateLimit,
    /// The operator console's OIDC client id (`/ui`): it logs in with the authorization code
    /// flow and PKCE against BP_OIDC_ISSUER, as a public client. Unset: it asks for a token.
    #[arg(long, env = "BP_UI_OIDC_CLIENT_ID")]
    pub ui_oidc_client_id: Option<String>,
    /// Space-separated scopes the console asks for (add what puts the roles into the token,
    /// e.g. ZITADEL's `urn:zitadel:iam:org:project:roles`).
    #[arg(long, env = "BP_UI_OIDC_SCOPES", default_value = "openid profile")]
    pub ui_oidc_scopes: String,
}

/// A request rate: `N/s`, `N/min` or `N/h` (a burst of N, refilled evenly), or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit(pub Option<(std::num::NonZeroU32, Duration)>);

impl std::str::FromStr for RateLimit {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let value = value.trim();
        if value.eq_ignore_ascii_case("off") {
            return Ok(RateLimit(None));
        }
        let usage = || format!("'{value}' is not a rate like 60/min, 5/s or 1000/h (or off)");
        let (count, unit) = value.split_once('/').ok_or_else(usage)?;
        let count = count.trim().parse().map_err(|_| usage())?;
        let period = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(usage()),
        };
        Ok(RateLimit(Some((count, period))))
    }
}

#[derive(Debug, Clone, Args)]
pub struct WorkerSettingsArgs {
    /// Concurrent jobs in this process (0: API only).
    #[arg(long, env = "BP_WORKERS", default_value_t = 4)]
    pub workers: usize,
    /// 32 bytes, base64: encrypts access-key secrets at rest until they reach the Secret.
    #[arg(long, env = "BP_ENCRYPTION_KEY", hide_env_values = true)]
    pub encryption_key: Option<SecretString>,
    /// Comma-separated earlier BP_ENCRYPTION_KEY values (base64), kept after a rotation: they
    /// still open what they sealed, which is re-sealed with the current key when used.
    #[arg(long, env = "BP_PREVIOUS_ENCRYPTION_KEYS", hide_env_values = true)]
    pub previous_encryption_keys: Option<SecretString>,
    /// How long a claimed job is leased before another worker may rescue it.
    #[arg(long, env = "BP_JOB_LEASE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub job_lease: Duration,
    /// Fallback polling interval when no notification arrives.
    #[arg(long, env = "BP_POLL_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,
    /// Attempts before a retryable failure becomes final.
    #[arg(long, env = "BP_JOB_MAX_ATTEMPTS", default_value_t = 8)]
    pub max_attempts: i32,
    /// First retry delay; doubles per attempt (with jitter), capped at 10 minutes.
    #[arg(long, env = "BP_RETRY_BASE", default_value = "2s", value_parser = humantime::parse_duration)]
    pub retry_base: Duration,
    /// On SIGTERM, how long in-flight steps may run before their leases are released.
    #[arg(long, env = "BP_SHUTDOWN_GRACE", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Overrides AWS_ENDPOINT_URL for S3 and IAM (emulators, S3-compatible stores).
    #[arg(long, env = "BP_AWS_ENDPOINT_URL")]
    pub aws_endpoint_url: Option<String>,
    /// How long the credential check waits for IAM's eventual consistency.
    #[arg(long, env = "BP_CREDENTIAL_CHECK_BUDGET", default_value = "2m", value_parser = humantime::parse_duration)]
    pub credential_check_budget: Duration,
    /// How often one worker sweeps what failed or cancelled jobs left (sealed material the
    /// Secret holds, access keys nobody can use); 0s: never.
    #[arg(long, env = "BP_SWEEP_INTERVAL", default_value = "10m", value_parser = humantime::parse_duration)]
    pub sweep_interval: Duration,
    /// How long after a repository's latest job ended the sweep may clean up after it.
    #[arg(long, env = "BP_SWEEP_GRACE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub sweep_grace: Duration,
    /// AWS requests per second of this process, all clients together, retries included
    /// (evenly spaced, with a burst of the rate itself); 0: the default, never unlimited.
    #[arg(long, env = "BP_AWS_MAX_RPS", default_value_t = crate::cloud::rate_limit::DEFAULT_AWS_MAX_RPS)]
    pub aws_max_rps: u32,
    /// How old a ready repository's last verification may grow before the periodic sweep
    /// verifies it again; 0s: no periodic verification.
    #[arg(long, env = "BP_VERIFY_INTERVAL", default_value = "6h", value_parser = humantime::parse_duration)]
    pub verify_interval: Duration,
    /// Verify jobs queued or running at once, all replicas together, from the periodic sweep.
    #[arg(long, env = "BP_VERIFY_CONCURRENCY", default_value_t = 4)]
    pub verify_concurrency: u32,
    /// Access key rotation: grace periods, automatic rotation, the key schedule.
    #[command(flatten)]
    pub key_rotation: KeyRotationArgs,
    /// The periodic backup freshness check.
    #[command(flatten)]
    pub freshness: FreshnessArgs,
    /// Signed webhooks: the API checks `callback_url` against them, workers send.
    #[command(flatten)]
    pub webhooks: WebhookArgs,
}

/// Signed webhooks (`callback_url`, `webhooks`): read by the API (which callbacks to accept)
/// and by workers (which send them).
#[derive(Debug, Clone, Args)]
pub struct WebhookArgs {
    /// Signs webhook deliveries (Standard Webhooks): `whsec_` and the base64 of 24 to 64 random
    /// bytes. Unset: a request with `callback_url` is refused (422).
    #[arg(long, env = "BP_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<SecretString>,
    /// Comma-separated hosts a `callback_url` may name: `host` (port 443), `host:port`,
    /// `*.domain`; an entry written `http://host[:port]` allows plain HTTP to it.
    #[arg(long, env = "BP_WEBHOOK_ALLOWED_HOSTS", value_delimiter = ',')]
    pub webhook_allowed_hosts: Vec<String>,
    /// How long a receiver has to answer one delivery.
    #[arg(long, env = "BP_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub webhook_timeout: Duration,
    /// First retry delay of a delivery; doubles per attempt (with jitter), capped at 10 minutes.
    #[arg(long, env = "BP_WEBHOOK_RETRY_BASE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub webhook_retry_base: Duration,
    /// A delivery not answered 2xx within this long after the job ended is marked failed.
    #[arg(long, env = "BP_WEBHOOK_RETRY_WINDOW", default_value = "24h", value_parser = humantime::parse_duration)]
    pub webhook_retry_window: Duration,
}

impl Default for WebhookArgs {
    fn default() -> Self {
        WebhookArgs {
            webhook_secret: None,
            webhook_allowed_hosts: Vec::new(),
            webhook_timeout: Duration::from_secs(10),
            webhook_retry_base: Duration::from_secs(10),
            webhook_retry_window: Duration::from_secs(24 * 3600),
        }
    }
}

impl WebhookArgs {
    /// The key deliveries are signed with; None when webhooks are off.
    pub fn signing_key(&self) -> Result<Option<crate::webhooks::SigningKey>, ConfigError> {
        self.webhook_secret
            .as_ref()
            .map(crate::webhooks::SigningKey::from_secret)
            .transpose()
            .map_err(|e| ConfigError::new("BP_WEBHOOK_SECRET", e))
    }

    pub fn allowed_hosts(&self) -> Result<crate::webhooks::AllowedHosts, ConfigError> {
        crate::webhooks::AllowedHosts::parse(&self.webhook_allowed_hosts)
            .map_err(|e| ConfigError::new("BP_WEBHOOK_ALLOWED_HOSTS", e))
    }

    /// What the API accepts as a `callback_url`.
    pub fn callback_policy(&self) -> Result<crate::webhooks::CallbackPolicy, ConfigError> {
        Ok(crate::webhooks::CallbackPolicy {
            allowed: self.allowed_hosts()?,
            signing: self.signing_key()?.is_some(),
        })
    }

    pub fn check(&self) -> Result<(), ConfigError> {
        self.callback_policy()?;
        for (variable, value) in [
            ("BP_WEBHOOK_TIMEOUT", self.webhook_timeout),
            ("BP_WEBHOOK_RETRY_BASE", self.webhook_retry_base),
            ("BP_WEBHOOK_RETRY_WINDOW", self.webhook_retry_window),
        ] {
            if value.is_zero() {
                return Err(ConfigError::new(variable, "must be greater than 0s"));
            }
        }
        Ok(())
    }
}

/// The periodic backup freshness check (`provision::freshness`).
#[derive(Debug, Clone, Args)]
pub struct FreshnessArgs {
    /// How old a ready repository's last backup freshness check may grow before it is checked
    /// again (a few ListObjectsV2 requests per repository); 0s: no freshness check.
    #[arg(long, env = "BP_FRESHNESS_INTERVAL", default_value = "15m", value_parser = humantime::parse_duration)]
    pub freshness_interval: Duration,
    /// Repositories checked at once by the replica holding the freshness lock.
    #[arg(long, env = "BP_FRESHNESS_CONCURRENCY", default_value_t = 4)]
    pub freshness_concurrency: usize,
}

impl Default for FreshnessArgs {
    fn default() -> Self {
        FreshnessArgs {
            freshness_interval: Duration::from_secs(15 * 60),
            freshness_concurrency: 4,
        }
    }
}

/// Access key rotation (`POST .../rotate-key`, `provision::rotate`, `provision::key_schedule`).
#[derive(Debug, Clone, Args)]
pub struct KeyRotationArgs {
    /// How long a rotated-out access key stays active after the Secret holds the new one
    /// (longer than an ExternalSecret's refresh interval), before it is deactivated.
    #[arg(long, env = "BP_KEY_GRACE", default_value = "24h", value_parser = humantime::parse_duration)]
    pub key_grace: Duration,
    /// How long a rotated-out access key stays inactive before it is deleted (an operator can
    /// still reactivate it meanwhile).
    #[arg(long, env = "BP_KEY_DELETE_GRACE", default_value = "24h", value_parser = humantime::parse_duration)]
    pub key_delete_grace: Duration,
    /// Rotate a ready repository's access key automatically once it is older than this
    /// (e.g. 90d); unset: only on request.
    #[arg(long, env = "BP_KEY_MAX_AGE", value_parser = humantime::parse_duration)]
    pub key_max_age: Option<Duration>,
    /// How often one worker queues due key retirements (and automatic rotations); 0s: never.
    #[arg(long, env = "BP_KEY_SCHEDULE_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    pub key_schedule_interval: Duration,
}

impl Default for KeyRotationArgs {
    fn default() -> Self {
        KeyRotationArgs {
            key_grace: Duration::from_secs(24 * 3600),
            key_delete_grace: Duration::from_secs(24 * 3600),
            key_max_age: None,
            key_schedule_interval: Duration::from_secs(60),
        }
    }
}

impl KeyRotationArgs {
    pub fn check(&self) -> Result<(), ConfigError> {
        if self
            .key_max_age
            .is_some_and(|age| age < Duration::from_secs(3600))
        {
            return Err(ConfigError::new(
                "BP_KEY_MAX_AGE",
                "must be at least 1h (unset: no automatic rotation)",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// Token subject (who is acting; recorded in the audit log).
    #[arg(long)]
    pub sub: String,
    /// Role: viewer, operator or admin (repeatable).
    #[arg(long, required = true)]
    pub role: Vec<Role>,
    /// Lifetime, e.g. 1h, 30m.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    #[arg(long, env = "BP_JWT_HS256_SECRET", hide_env_values = true)]
    pub jwt_hs256_secret: SecretString,
    #[arg(long, env = "BP_JWT_AUDIENCE", default_value = DEFAULT_AUDIENCE)]
    pub jwt_audience: String,
}

/// Turns a clap error about a flag's value (or a missing required flag) into one line naming
/// the environment variable behind the flag; None for help, version and other errors.
pub fn config_error_from_clap(err: &clap::Error) -> Option<ConfigError> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        err.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation | ErrorKind::MissingRequiredArgument
    ) {
        return None;
    }
    let arg = match err.get(ContextKind::InvalidArg)? {
        ContextValue::String(s) => s.clone(),
        ContextValue::Strings(v) => v.first()?.clone(),
        _ => return None,
    };
    let long = arg
        .trim_start_matches("--")
        .split([' ', '='])
        .next()?
        .to_owned();
    let variable = env_for_flag(&long)?;
    let message = match err.kind() {
        ErrorKind::MissingRequiredArgument => "missing".to_owned(),
        _ => {
            let value = match err.get(ContextKind::InvalidValue) {
                Some(ContextValue::String(v)) => v.clone(),
                _ => String::new(),
            };
            let reason = std::error::Error::source(err)
                .map(|e| e.to_string())
                .unwrap_or_else(|| "invalid value".into());
            format!("invalid value '{value}': {reason}")
        }
    };
    Some(ConfigError::new(variable, message))
}

/// The environment variable of a long flag, searched through every subcommand.
fn env_for_flag(long: &str) -> Option<String> {
    use clap::CommandFactory;
    fn search(command: &clap::Command, long: &str) -> Option<String> {
        command
            .get_arguments()
            .find(|a| a.get_long() == Some(long))
            .and_then(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
            .or_else(|| command.get_subcommands().find_map(|c| search(c, long)))
    }
    search(&Cli::command(), long)
}

/// Audience of HS256 tokens when BP_JWT_AUDIENCE is not set.
pub const DEFAULT_AUDIENCE: &str = "backup-provisioner";

/// A configuration value that cannot be used; printed as one line before exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {variable}: {message}")]
pub struct ConfigError {
    pub variable: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(variable: impl Into<String>, message: impl Into<String>) -> Self {
        // One line, always: multi-line causes (a regex parser's caret diagram) are folded.
        let message: String = message.into();
        ConfigError {
            variable: variable.into(),
            message: message.split_whitespace().collect::<Vec<_>>().join(" "),
        }
    }
}

impl HttpArgs {
    pub fn auth_config(&self) -> Result<AuthConfig, ConfigError> {
        let settings = match (&self.jwt_hs256_secret, &self.oidc_issuer) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "BP_JWT_HS256_SECRET",
                    "set either BP_JWT_HS256_SECRET or BP_OIDC_ISSUER, not both",
                ));
            }
            (None, None) => {
                return Err(ConfigError::new(
                    "BP_JWT_HS256_SECRET",
                    "missing: set BP_JWT_HS256_SECRET (shared secret) or BP_OIDC_ISSUER (OIDC)",
                ));
            }
            (Some(secret), None) => {
                check_hs256_secret(secret)?;
                AuthSettings::Hs256 {
                    secret: secret.clone(),
                    audience: self
                        .jwt_audience
                        .clone()
                        .unwrap_or_else(|| DEFAULT_AUDIENCE.into()),
                }
            }
            (None, Some(issuer)) => AuthSettings::Oidc {
                issuer: issuer.clone(),
                // Without an audience any token the issuer mints for any application would do.
                audience: Some(self.jwt_audience.clone().ok_or_else(|| {
                    ConfigError::new("BP_JWT_AUDIENCE", "required with BP_OIDC_ISSUER: the client id or audience the IdP puts in `aud`")
                })?),
                jwks_refetch_floor: Duration::from_secs(30),
            },
        };
        if self.jwt_max_lifetime.is_some_and(|max| max.is_zero()) {
            return Err(ConfigError::new(
                "BP_JWT_MAX_LIFETIME",
                "must be more than 0s (unset: no maximum)",
            ));
        }
        Ok(AuthConfig {
            settings,
            roles_claim: self.jwt_roles_claim.clone(),
            max_lifetime: self.jwt_max_lifetime,
        })
    }

    pub fn bucket_pattern(&self) -> Result<regex::Regex, ConfigError> {
        regex::Regex::new(&self.bucket_name_pattern).map_err(|e| {
            ConfigError::new(
                "BP_BUCKET_NAME_PATTERN",
                format!("not a valid regular expression: {e}"),
            )
        })
    }

    pub fn check(&self) -> Result<(), ConfigError> {
        if self.request_timeout <= Duration::from_secs(31) {
            return Err(ConfigError::new(
                "BP_REQUEST_TIMEOUT",
                "must be longer than 31s (long polls wait up to 30s)",
            ));
        }
        if self.max_body_bytes == 0 {
            return Err(ConfigError::new(
                "BP_MAX_BODY_BYTES",
                "must be greater than 0",
            ));
        }
        self.check_connection_limits()?;
        if self.event_stream_keep_alive.is_zero() {
            return Err(ConfigError::new(
                "BP_EVENT_STREAM_KEEP_ALIVE",
                "must be greater than 0s",
            ));
        }
        for origin in &self.cors_origins {
            if origin.parse::<axum::http::HeaderValue>().is_err()
                || url::Url::parse(origin).is_err()
            {
                return Err(ConfigError::new(
                    "BP_CORS_ORIGINS",
                    format!("'{origin}' is not an origin like https://portal.example.com"),
                ));
            }
        }
        for namespace in &self.allowed_namespaces {
            crate::domain::Namespace::parse(namespace, &[])
                .map_err(|e| ConfigError::new("BP_ALLOWED_NAMESPACES", e.to_string()))?;
        }
        self.bucket_pattern()?;
        self.auth_config()?;
        if self.ui_oidc_client_id.is_some() && self.oidc_issuer.is_none() {
            return Err(ConfigError::new(
                "BP_UI_OIDC_CLIENT_ID",
                "set only with BP_OIDC_ISSUER (the console logs in at that issuer)",
            ));
        }
        Ok(())
    }
}

impl HttpArgs {
    fn check_connection_limits(&self) -> Result<(), ConfigError> {
        if self.header_read_timeout.is_zero() {
            return Err(ConfigError::new(
                "BP_HEADER_READ_TIMEOUT",
                "must be greater than 0s",
            ));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::new("BP_MAX_CONNECTIONS", "must be at least 1"));
        }
        if self.max_header_bytes < 8192 {
            return Err(ConfigError::new(
                "BP_MAX_HEADER_BYTES",
                "must be at least 8192",
            ));
        }
        Ok(())
    }
}

fn check_hs256_secret(secret: &SecretString) -> Result<(), ConfigError> {
    use secrecy::ExposeSecret;
    if secret.expose_secret().len() < 32 {
        return Err(ConfigError::new(
            "BP_JWT_HS256_SECRET",
            "must be at least 32 characters",
        ));
    }
    Ok(())
}

impl WorkerSettingsArgs {
    pub fn encryption_key(&self) -> Result<crate::crypto::EncryptionKey, ConfigError> {
        use secrecy::ExposeSecret;
        let raw = self.encryption_key.as_ref().ok_or_else(|| {
            ConfigError::new(
                "BP_ENCRYPTION_KEY",
                "missing: workers need 32 random bytes, base64 (openssl rand -base64 32)",
            )
        })?;
        crate::crypto::EncryptionKey::from_base64(raw.expose_secret())
            .map_err(|e| ConfigError::new("BP_ENCRYPTION_KEY", e.to_string()))
    }

    /// The current key (`BP_ENCRYPTION_KEY`) and the previous ones
    /// (`BP_PREVIOUS_ENCRYPTION_KEYS`); an invalid previous key is named by its position only.
    pub fn encryption_keys(&self) -> Result<crate::crypto::Keyring, ConfigError> {
        use secrecy::ExposeSecret;
        let current = self.encryption_key()?;
        let raw = self
            .previous_encryption_keys
            .as_ref()
            .map(|keys| keys.expose_secret())
            .unwrap_or_default();
        let previous = raw
            .split(',')
            .map(str::trim)
            .filter(|key| !key.is_empty())
            .enumerate()
            .map(|(i, key)| {
                crate::crypto::EncryptionKey::from_base64(key).map_err(|e| {
                    ConfigError::new("BP_PREVIOUS_ENCRYPTION_KEYS", format!("key {}: {e}", i + 1))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(crate::crypto::Keyring::new(current, previous))
    }

    pub fn check(&self) -> Result<(), ConfigError> {
        if self.max_attempts < 1 {
            return Err(ConfigError::new(
                "BP_JOB_MAX_ATTEMPTS",
                "must be at least 1",
            ));
        }
        if self.job_lease < Duration::from_secs(1) {
            return Err(ConfigError::new("BP_JOB_LEASE", "must be at least 1s"));
        }
        self.key_rotation.check()?;
        self.webhooks.check()?;
        if self.verify_concurrency == 0 {
            return Err(ConfigError::new(
                "BP_VERIFY_CONCURRENCY",
                "must be at least 1 (BP_VERIFY_INTERVAL=0s turns the periodic verification off)",
            ));
        }
        if self.freshness.freshness_concurrency == 0 {
            return Err(ConfigError::new(
                "BP_FRESHNESS_CONCURRENCY",
                "must be at least 1 (BP_FRESHNESS_INTERVAL=0s turns the freshness check off)",
            ));
        }
        if self.workers > 0 {
            self.encryption_keys()?;
        }
        Ok(())
    }
}

/// `controller`: the PostgresCluster controller alone, with the API's request rules.
#[derive(Debug, Clone, Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub controller: ControllerSettingsArgs,
    /// Comma-separated namespaces watched, the ones a repository may target (empty: every
    /// namespace, which needs a ClusterRole the shipped RBAC does not grant).
    #[arg(long, env = "BP_ALLOWED_NAMESPACES", value_delimiter = ',')]
    pub allowed_namespaces: Vec<String>,
    /// Regular expression every bucket name must match.
    #[arg(long, env = "BP_BUCKET_NAME_PATTERN", default_value = DEFAULT_BUCKET_PATTERN)]
    pub bucket_name_pattern: String,
    /// Attempts of the jobs the controller queues before a retryable failure becomes final.
    #[arg(long, env = "BP_JOB_MAX_ATTEMPTS", default_value_t = 8)]
    pub max_attempts: i32,
}

/// The PostgresCluster controller (`src/controller`): `controller`, or `serve` with
/// `BP_WATCH_POSTGRESCLUSTERS=true`.
#[derive(Debug, Clone, Args)]
pub struct ControllerSettingsArgs {
    /// `serve`: also run the PostgresCluster controller in this process (run it in one
    /// replica only).
    #[arg(long, env = "BP_WATCH_POSTGRESCLUSTERS", default_value_t = false)]
    pub watch_postgresclusters: bool,
    /// The controller's name: its audit actor is `controller:<name>`, its field manager and
    /// Events' reporting controller `<name>-controller`.
    #[arg(long, env = "BP_CONTROLLER_NAME", default_value = "backup-provisioner")]
    pub controller_name: String,
    /// Region of a bucket whose PostgresCluster has no `backup-provisioner.holos.run/region`.
    #[arg(long, env = "BP_CONTROLLER_DEFAULT_REGION", default_value = crate::domain::DEFAULT_REGION)]
    pub controller_default_region: String,
    /// The API's address as users reach it (e.g. https://backup-provisioner.example.com): the
    /// job annotation is `<url>/v1/jobs/<id>` (unset: `/v1/jobs/<id>`).
    #[arg(long, env = "BP_CONTROLLER_API_URL")]
    pub controller_api_url: Option<url::Url>,
    /// How often a repository being provisioned is looked at again.
    #[arg(long, env = "BP_CONTROLLER_FOLLOW_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub controller_follow_interval: Duration,
    /// How often the PostgresClusters the controller linked are compared with the watched
    /// ones, to record deletions it did not see (while stopped, or during a relist).
    #[arg(long, env = "BP_CONTROLLER_RESYNC_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub controller_resync_interval: Duration,
}

impl Default for ControllerSettingsArgs {
    fn default() -> Self {
        ControllerSettingsArgs {
            watch_postgresclusters: false,
            controller_name: "backup-provisioner".into(),
            controller_default_region: crate::domain::DEFAULT_REGION.into(),
            controller_api_url: None,
            controller_follow_interval: Duration::from_secs(5),
            controller_resync_interval: Duration::from_secs(300),
        }
    }
}

impl ControllerSettingsArgs {
    pub fn check(&self) -> Result<(), ConfigError> {
        crate::domain::RepositoryName::parse(&self.controller_name).map_err(|_| {
            ConfigError::new(
                "BP_CONTROLLER_NAME",
                "must be a DNS-1123 label (lowercase letters, digits and '-')",
            )
        })?;
        crate::domain::Region::parse(&self.controller_default_region)
            .map_err(|e| ConfigError::new("BP_CONTROLLER_DEFAULT_REGION", e.message))?;
        if self.controller_follow_interval.is_zero() {
            return Err(ConfigError::new(
                "BP_CONTROLLER_FOLLOW_INTERVAL",
                "must be greater than 0s",
            ));
        }
        if self.controller_resync_interval.is_zero() {
            return Err(ConfigError::new(
                "BP_CONTROLLER_RESYNC_INTERVAL",
                "must be greater than 0s",
            ));
        }
        Ok(())
    }
}
