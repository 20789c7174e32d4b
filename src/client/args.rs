//! The command line of `backup-provisioner client`: one subcommand per API operation.

use clap::{Args, Subcommand, ValueEnum};

/// `backup-provisioner client [--url URL] [--token TOKEN] [--output table|json] <operation>`.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The service's base URL (default: $BP_API_URL, else $API, else http://127.0.0.1:8080).
    #[arg(long, env = "BP_API_URL", global = true)]
    pub url: Option<String>,
    /// Bearer token (default: $BP_TOKEN, else $TOKEN; `backup-provisioner token` mints one).
    #[arg(long, env = "BP_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// How answers are printed: tables for people, the API's JSON for scripts.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    #[command(subcommand)]
    pub operation: Operation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Follow the job a mutating operation queued.
#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// Follow the queued job with live per-step progress until it ends; exit 1 when it fails.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait follows the job before giving up (exit 5), e.g. 10m.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub wait_timeout: std::time::Duration,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Operation {
    /// Create (or adopt) a repository: POST /v1/backup-repositories.
    Create(CreateArgs),
    /// Show one repository: GET /v1/backup-repositories/{name}.
    Get { name: String },
    /// List repositories: GET /v1/backup-repositories.
    List(ListArgs),
    /// Provision an existing repository again: POST .../{name}/reconcile.
    Reconcile(NamedArgs),
    /// Check every runbook setting (read-only unless --repair): POST .../{name}/verify.
    Verify(VerifyArgs),
    /// Replace the access key without downtime: POST .../{name}/rotate-key.
    RotateKey(NamedArgs),
    /// Always refused (409): the cipher pass is never rotated.
    RotateCipherPass { name: String },
    /// Deprovision a repository: DELETE /v1/backup-repositories/{name}.
    Delete(DeleteArgs),
    /// Jobs: get, list, cancel, retry, events.
    #[command(subcommand)]
    Jobs(JobsOperation),
    /// The audit log: GET /v1/audit.
    Audit(AuditArgs),
}

#[derive(Debug, Clone, Args)]
pub struct CreateArgs {
    pub name: String,
    /// Namespace of the Secret in the management cluster.
    #[arg(long)]
    pub namespace: String,
    /// Bucket name (default: the service's naming rule).
    #[arg(long)]
    pub bucket: Option<String>,
    #[arg(long)]
    pub region: Option<String>,
    /// A label KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Take over a repository made by hand with the runbook; nothing is recreated.
    #[arg(long)]
    pub adopt: bool,
    /// With --adopt: converge what differs from the runbook (key and cipher pass kept).
    #[arg(long, requires = "adopt")]
    pub repair: bool,
    /// With --adopt: the hand-made Secret's name when it is not the bucket's.
    #[arg(long, requires = "adopt")]
    pub secret_name: Option<String>,
    /// Allow a new cipher pass over a bucket that holds objects.
    #[arg(long)]
    pub allow_new_cipher_pass: bool,
    /// Take over an existing unlabelled Secret of the bucket's name.
    #[arg(long)]
    pub adopt_existing_secret: bool,
    /// Makes a retried create safe (default: a new random key per invocation).
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Print the plan (resource, setting, expected, actual, action); change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// pending, provisioning, ready, failed, cancelled, deprovisioning or deleted.
    #[arg(long)]
    pub state: Option<String>,
    #[arg(long)]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub page: PageArgs,
}

#[derive(Debug, Clone, Args)]
pub struct PageArgs {
    /// Page size, 1 to 200.
    #[arg(long)]
    pub limit: Option<u32>,
    /// The previous page's next_cursor.
    #[arg(long)]
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct NamedArgs {
    pub name: String,
    /// Print the plan; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub named: NamedArgs,
    /// Converge what is safe to converge (never the cipher pass or the key).
    #[arg(long)]
    pub repair: bool,
}

#[derive(Debug, Clone, Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub named: NamedArgs,
    /// Delete the bucket too (kept by default).
    #[arg(long)]
    pub delete_bucket: bool,
    /// The bucket's name: confirms deleting a bucket that holds objects (with --force).
    #[arg(long, requires = "delete_bucket")]
    pub confirm: Option<String>,
    /// Empty a bucket that holds objects before deleting it (with --confirm).
    #[arg(long, requires = "confirm")]
    pub force: bool,
}

#[derive(Debug, Clone, Subcommand)]
pub enum JobsOperation {
    /// One job with its steps: GET /v1/jobs/{id}.
    Get {
        id: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// List jobs, newest first: GET /v1/jobs.
    List(JobListArgs),
    /// Cancel a job: POST /v1/jobs/{id}/cancel.
    Cancel {
        id: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Retry a failed or cancelled job: POST /v1/jobs/{id}/retry.
    Retry {
        id: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// A job's audit events, oldest first: GET /v1/jobs/{id}/events.
    Events {
        id: String,
        #[command(flatten)]
        page: PageArgs,
    },
}

#[derive(Debug, Clone, Args)]
pub struct JobListArgs {
    /// queued, running, succeeded, failed or cancelled.
    #[arg(long)]
    pub state: Option<String>,
    /// e.g. provision-repository.
    #[arg(long)]
    pub kind: Option<String>,
    /// A repository's name.
    #[arg(long)]
    pub repository: Option<String>,
    #[command(flatten)]
    pub page: PageArgs,
}

#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    #[arg(long)]
    pub repository: Option<String>,
    #[arg(long)]
    pub actor: Option<String>,
    /// RFC 3339 time, e.g. 2026-12-01T00:00:00Z.
    #[arg(long)]
    pub since: Option<String>,
    #[command(flatten)]
    pub page: PageArgs,
}
