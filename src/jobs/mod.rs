//! A durable job queue in Postgres. It knows nothing of AWS or Kubernetes: job kinds plug in
//! through [`JobHandler`], and each kind reports progress through [`JobContext`] steps.
//!
//! - enqueue happens in the caller's transaction, next to the domain write;
//! - workers claim with `FOR UPDATE SKIP LOCKED`, woken by LISTEN/NOTIFY with polling as fallback;
//! - a claimed job carries a lease token; heartbeats extend the lease, a rescuer re-queues jobs
//!   whose lease expired, and every write by a worker is fenced by its token;
//! - retryable errors back off exponentially with jitter; permanent errors fail at once;
//! - step outputs persist, so a retried job resumes where it stopped.

pub mod backoff;
pub mod context;
pub mod queue;
pub mod runner;

use std::collections::HashMap;
use std::sync::Arc;

pub use context::{JobContext, StepDone};
pub use queue::{Job, JobState, NewJob, StepRow};
pub use runner::{WorkerConfig, WorkerPool};

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

impl From<crate::cloud::CloudError> for JobError {
    fn from(err: crate::cloud::CloudError) -> Self {
        if err.is_retryable() {
            JobError::Retryable(err.to_string())
        } else {
            JobError::Permanent(err.to_string())
        }
    }
}

/// A kind of job: a name stored with each job, and the code that runs it.
#[async_trait::async_trait]
pub trait JobHandler: Send + Sync + 'static {
    /// Stored in `jobs.kind`; must never change once jobs of this kind exist.
    fn kind(&self) -> &'static str;
    async fn run(&self, ctx: &JobContext) -> Result<(), JobError>;
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
}
