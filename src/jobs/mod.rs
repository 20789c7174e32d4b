//! A durable job queue in Postgres. It knows jobs, steps, leases, attempts and audit entries,
//! nothing of repositories, AWS or Kubernetes: a job kind names itself, its payload and its
//! subject through [`JobKind`], runs through [`JobHandler`], and reports progress through
//! [`JobContext`] steps.
//!
//! - enqueue happens in the caller's transaction, next to the domain write;
//! - workers claim with `FOR UPDATE SKIP LOCKED`, woken by LISTEN/NOTIFY with polling as fallback;
//!   under load a slot's end and its next claim are one statement, batched across slots
//!   (`runner::Turnover`): a NOTIFYing commit serialises the server, so fewer commits is speed;
//! - a claimed job carries a lease token; heartbeats extend the lease, a rescuer re-queues jobs
//!   whose lease expired, and every write by a worker is fenced by its token;
//! - retryable errors back off exponentially with jitter; permanent errors fail at once;
//! - step outputs persist, so a retried job resumes where it stopped.

pub mod backoff;
mod begins;
pub mod context;
pub mod control;
pub mod queue;
pub mod runner;
pub mod state_changes;

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::PgConnection;
use uuid::Uuid;

pub use context::{JobContext, StepDone};
pub use queue::{Job, JobState, NewJob, StepRow, Subject};
pub use runner::{WorkerConfig, WorkerPool};
pub use state_changes::JobStateChanges;

/// How a job (or one of its steps) ended badly.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Worth another attempt after a backoff (throttling, 5xx, eventual consistency).
    #[error("{0}")]
    Retryable(String),
    /// A retry cannot help; the job fails at once with this message.
    #[error("{0}")]
    Permanent(String),
    /// A cancel was requested; the job stopped at a step boundary.
    #[error("cancelled")]
    Cancelled,
    /// Another worker owns the job now; this worker must stop writing.
    #[error("lease lost")]
    LeaseLost,
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// A kind of job, typed: the name stored with each job, its payload, and what it works on
/// (the crates.io `BackgroundJob` pattern). Queue one with [`enqueue`].
pub trait JobKind {
    /// Stored in `jobs.kind`; must never change once jobs of this kind exist.
    const KIND: &'static str;
    /// Stored as the job's payload (never a secret value).
    type Payload: Serialize + DeserializeOwned + Send + Sync;
    /// What the job works on: at most one job per subject is queued or running.
    fn subject(payload: &Self::Payload) -> Option<Subject>;
}

/// Who queues a job, how many attempts it gets, and where its end is reported.
#[derive(Debug, Clone, Copy)]
pub struct EnqueueOptions<'a> {
    pub created_by: &'a str,
    pub max_attempts: i32,
    /// Stored on the job; when the job ends, a delivery to it is written to the webhook outbox
    /// in the same transaction (a trigger on `jobs`, see `webhooks`).
    pub callback_url: Option<&'a str>,
}

/// Queues a job of kind `K` inside the caller's transaction, next to the domain write it
/// belongs to. A subject that already has an active job fails it: see [`queue::is_subject_busy`].
pub async fn enqueue<K: JobKind>(
    conn: &mut PgConnection,
    payload: &K::Payload,
    options: EnqueueOptions<'_>,
) -> Result<Uuid, sqlx::Error> {
    let value = serde_json::to_value(payload).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let job = NewJob {
        kind: K::KIND,
        subject: K::subject(payload),
        payload: value,
        max_attempts: options.max_attempts,
        created_by: options.created_by,
    };
    let id = queue::enqueue(&mut *conn, job).await?;
    if let Some(url) = options.callback_url {
        queue::set_callback_url(conn, id, url).await?;
    }
    Ok(id)
}

/// A kind of job: a name stored with each job, and the code that runs it.
#[async_trait::async_trait]
pub trait JobHandler: Send + Sync + 'static {
    /// Stored in `jobs.kind`; must never change once jobs of this kind exist.
    fn kind(&self) -> &'static str;
    async fn run(&self, ctx: &JobContext) -> Result<(), JobError>;

    /// A dry run: what [`run`](Self::run) would do with `payload`, found with read calls only
    /// (no mutating call, no job, no step). `None` when the kind has no dry run.
    async fn plan(
        &self,
        payload: serde_json::Value,
    ) -> Option<Result<serde_json::Value, JobError>> {
        let _ = payload;
        None
    }
}

/// The job kinds a worker can run, by name.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<&'static str, Arc<dyn JobHandler>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register(mut self, handler: impl JobHandler) -> Self {
        self.handlers.insert(handler.kind(), Arc::new(handler));
        self
    }

    pub fn get(&self, kind: &str) -> Option<Arc<dyn JobHandler>> {
        self.handlers.get(kind).cloned()
    }

    pub fn kinds(&self) -> Vec<&'static str> {
        self.handlers.keys().copied().collect()
    }

    /// The plan of a job of `kind` (see [`JobHandler::plan`]); `None` when this process does
    /// not run that kind or the kind has no dry run.
    pub async fn plan<K: JobKind>(
        &self,
        payload: &K::Payload,
    ) -> Option<Result<serde_json::Value, JobError>> {
        let handler = self.get(K::KIND)?;
        let value = match serde_json::to_value(payload) {
            Ok(value) => value,
            Err(e) => return Some(Err(JobError::Permanent(format!("payload: {e}")))),
        };
        handler.plan(value).await
    }
}
