//! The periodic verification of every ready repository (issue 10, item 2): a task of the worker
//! process ([`VerifySweeper::run`]) that queues `verify-repository` jobs (`repair: false`) so
//! that no ready repository's last verification grows older than `BP_VERIFY_INTERVAL`.
//!
//! Every `tick` the replica holding the advisory lock [`VERIFY_SWEEP_LOCK`] tops up: it counts
//! the verify jobs queued or running (the API's included) and queues at most
//! `BP_VERIFY_CONCURRENCY` minus that many, for the ready repositories whose `verified_at` is
//! older than the interval, oldest first (never verified before all), skipping a
//! repository with an active job of any kind and one whose verify job was queued within the
//! interval (a verify that failed waits for the next interval, not for the next tick). A
//! repository never verified counts from its last change (`updated_at`: the provisioning that
//! made it ready converged every setting), so a new repository is not verified at once. So the
//! fleet is verified at the pace of the free slots, each repository about once an interval, and
//! the AWS request-rate limit (`BP_AWS_MAX_RPS`) paces the calls the jobs make.
//!
//! Each queued job is audited (`sweep.verify`, actor `backup-provisioner`) in the transaction
//! that queues it, as the API audits what it queues.

use std::time::Duration;

use serde_json::json;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::audit::{self, AuditEntry};
use crate::domain::{BucketName, Namespace, Region, RepositoryName};
use crate::jobs::{self, EnqueueOptions, JobKind};
use crate::provision::sweep::{report_rounds, round_under_lock};
use crate::provision::verify::{VerifyPayload, VerifyRepository};

/// The advisory lock whose holder queues periodic verifications ("bpverif1").
pub const VERIFY_SWEEP_LOCK: i64 = 0x6270_7665_7269_6631;
/// Who the sweep's jobs and audit entries name.
pub const ACTOR: &str = "backup-provisioner";
const ACTION: &str = "sweep.verify";

/// The periodic verification: Postgres and its settings.
#[derive(Debug, Clone)]
pub struct VerifySweeper {
    pub db: PgPool,
    /// `BP_VERIFY_INTERVAL`: a repository is due when its last verification is older.
    pub interval: Duration,
    /// `BP_VERIFY_CONCURRENCY`: verify jobs queued or running at once.
    pub concurrency: u32,
    /// Attempts of each queued job (`BP_JOB_MAX_ATTEMPTS`).
    pub max_attempts: i32,
}

/// What one top-up did.
#[derive(Debug, Default, PartialEq, Eq)]
pub enum TopUp {
    /// Another replica holds the lock.
    #[default]
    Skipped,
    /// The names of the repositories whose verification was queued (maybe none).
    Queued(Vec<String>),
}

/// A ready repository whose verification is due.
#[derive(Debug, sqlx::FromRow)]
struct Due {
    id: Uuid,
    name: String,
    namespace: String,
    bucket: String,
    region: String,
    verified_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Logs the repositories a top-up queued, if any.
fn log_queued(done: TopUp) {
    if let TopUp::Queued(names) = done
        && !names.is_empty()
    {
        tracing::info!(repositories = ?names, "periodic verification queued");
    }
}

impl VerifySweeper {
    /// Tops up every `tick` until `shutdown` fires; the first right away.
    pub async fn run(self, tick: Duration, shutdown: CancellationToken) {
        let (ticks, top_up) = (tokio::time::interval(tick), || self.top_up_once());
        report_rounds(
            ticks,
            shutdown,
            "periodic verification failed",
            top_up,
            log_queued,
        )
        .await
    }

    /// One top-up, if this replica wins the lock.
    pub async fn top_up_once(&self) -> Result<TopUp, sqlx::Error> {
        let queue = || self.queue_due();
        round_under_lock(&self.db, VERIFY_SWEEP_LOCK, queue, TopUp::Queued).await
    }

    async fn queue_due(&self) -> Result<Vec<String>, sqlx::Error> {
        let active: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE kind = $1 AND state IN ('queued', 'running')",
        )
        .bind(VerifyRepository::KIND)
        .fetch_one(&self.db)
        .await?;
        let free = i64::from(self.concurrency) - active;
        if free <= 0 {
            return Ok(Vec::new());
        }
        let mut queued = Vec::new();
        for repository in due(&self.db, self.interval, free).await? {
            match self.queue_one(&repository).await {
                Ok(true) => queued.push(repository.name),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(repository = %repository.name, error = %e,
                        "periodic verification not queued");
                }
            }
        }
        Ok(queued)
    }

    /// Queues the verification of `repository`, audited, unless it stopped being due (another
    /// job arrived, its state changed) since it was selected.
    async fn queue_one(&self, repository: &Due) -> Result<bool, QueueError> {
        let payload = payload_for(repository)?;
        let mut tx = self.db.begin().await?;
        if !still_ready(&mut tx, repository.id).await? {
            return Ok(false);
        }
        let options = EnqueueOptions {
            created_by: ACTOR,
            max_attempts: self.max_attempts,
            callback_url: None,
        };
        let job_id = match jobs::enqueue::<VerifyRepository>(&mut tx, &payload, options).await {
            Ok(id) => id,
            Err(e) if jobs::queue::is_subject_busy(&e) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let entry = AuditEntry {
            actor: ACTOR.to_owned(),
            subject: Some(repository.name.clone()),
            job_id: Some(job_id),
            action: ACTION.to_owned(),
            outcome: "queued".to_owned(),
            detail: json!({
                "kind": VerifyRepository::KIND,
                "repair": false,
                "last_verified_at": repository.verified_at,
                "interval_seconds": self.interval.as_secs(),
            }),
            ..Default::default()
        };
        audit::record(&mut *tx, &entry).await?;
        tx.commit().await?;
        Ok(true)
    }
}

#[derive(Debug, thiserror::Error)]
enum QueueError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("stored value no longer valid: {0}")]
    Invalid(#[from] crate::domain::ValidationError),
}

/// The job's payload from the stored row (parsed again into domain types, as the API does).
fn payload_for(repository: &Due) -> Result<VerifyPayload, crate::domain::ValidationError> {
    Ok(VerifyPayload {
        repository: RepositoryName::parse(&repository.name)?,
        repository_id: repository.id,
        namespace: Namespace::try_from(repository.namespace.clone())?,
        bucket: BucketName::try_from(repository.bucket.clone())?,
        region: Region::parse(&repository.region)?,
        repair: false,
    })
}

/// The repository is still ready (locking its row until the transaction ends).
async fn still_ready(tx: &mut PgConnection, id: Uuid) -> Result<bool, sqlx::Error> {
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM backup_repositories WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    Ok(state.as_deref() == Some("ready"))
}

/// At most `limit` ready repositories due for verification, oldest verification first.
async fn due(db: &PgPool, interval: Duration, limit: i64) -> Result<Vec<Due>, sqlx::Error> {
    sqlx::query_as(
        "SELECT r.id, r.name, r.namespace, r.bucket, r.region, r.verified_at
           FROM backup_repositories r
          WHERE r.state = 'ready'
            AND coalesce(r.verified_at, r.updated_at) < now() - make_interval(secs => $1)
            AND NOT EXISTS (SELECT 1 FROM jobs a WHERE a.subject_id = r.id
                               AND a.state IN ('queued', 'running'))
            AND NOT EXISTS (SELECT 1 FROM jobs v WHERE v.subject_id = r.id AND v.kind = $3
                               AND v.created_at > now() - make_interval(secs => $1))
          ORDER BY r.verified_at ASC NULLS FIRST, r.updated_at, r.name
          LIMIT $2",
    )
    .bind(interval.as_secs_f64())
    .bind(limit)
    .bind(VerifyRepository::KIND)
    .fetch_all(db)
    .await
}
