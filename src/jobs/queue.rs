//! The queue's SQL: enqueue, claim, heartbeat, finish, rescue, cancel, retry.
//!
//! A job's subject repository (if any) follows the job's state in the same statement, so the
//! repository's state can never disagree with its active job.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgExecutor, PgPool};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Job {
    pub id: Uuid,
    pub kind: String,
    pub repository_id: Option<Uuid>,
    pub payload: serde_json::Value,
    pub state: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub lease_token: Option<Uuid>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub cancel_requested: bool,
    pub last_error: Option<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl Job {
    pub fn state(&self) -> JobState {
        JobState::parse(&self.state).unwrap_or(JobState::Failed)
    }
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StepRow {
    pub step: String,
    pub position: i32,
    pub state: String,
    pub attempts: i32,
    pub output: Option<serde_json::Value>,
    pub last_error: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

pub struct NewJob<'a> {
    pub kind: &'a str,
    pub repository_id: Option<Uuid>,
    pub payload: serde_json::Value,
    pub max_attempts: i32,
    pub created_by: &'a str,
}

const JOB_COLUMNS: &str = "id, kind, repository_id, payload, state, attempts, max_attempts, run_at, lease_token, \
     lease_expires_at, cancel_requested, last_error, created_by, created_at, started_at, finished_at";

/// Inserts a queued job. Call it inside the transaction that writes the domain change; the
/// insert trigger notifies workers when that transaction commits. Fails with a unique violation
/// on `jobs_one_active_per_repository` when the repository already has an active job.
pub async fn enqueue(conn: &mut PgConnection, job: NewJob<'_>) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO jobs (id, kind, repository_id, payload, max_attempts, created_by)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(job.kind)
    .bind(job.repository_id)
    .bind(&job.payload)
    .bind(job.max_attempts)
    .bind(job.created_by)
    .execute(&mut *conn)
    .await?;
    set_subject_state(&mut *conn, id, "pending").await?;
    Ok(id)
}

/// Claims the oldest runnable job of the given kinds, if any, with a fresh lease token.
pub async fn claim(
    pool: &PgPool,
    kinds: &[&str],
    worker: &str,
    lease: Duration,
) -> Result<Option<Job>, sqlx::Error> {
    let kinds: Vec<String> = kinds.iter().map(|k| k.to_string()).collect();
    let mut tx = pool.begin().await?;
    let job = sqlx::query_as::<_, Job>(sqlx::AssertSqlSafe(format!(
        "UPDATE jobs
            SET state = 'running', attempts = attempts + 1, lease_token = gen_random_uuid(),
                lease_expires_at = now() + make_interval(secs => $3), locked_by = $2,
                started_at = coalesce(started_at, now())
          WHERE id = (SELECT id FROM jobs
                       WHERE state = 'queued' AND run_at <= now() AND kind = ANY($1)
                       ORDER BY run_at, created_at
                       FOR UPDATE SKIP LOCKED
                       LIMIT 1)
        RETURNING {JOB_COLUMNS}"
    )))
    .bind(&kinds)
    .bind(worker)
    .bind(lease.as_secs_f64())
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(job) = &job {
        set_subject_state(&mut tx, job.id, "provisioning").await?;
    }
    tx.commit().await?;
    Ok(job)
}

/// How long until the earliest queued job of these kinds becomes runnable (a backoff ends).
pub async fn next_due_in(pool: &PgPool, kinds: &[&str]) -> Result<Option<Duration>, sqlx::Error> {
    let kinds: Vec<String> = kinds.iter().map(|k| k.to_string()).collect();
    let seconds: Option<f64> = sqlx::query_scalar(
        "SELECT greatest(extract(epoch FROM min(run_at) - now()), 0)::float8
           FROM jobs WHERE state = 'queued' AND kind = ANY($1)",
    )
    .bind(&kinds)
    .fetch_one(pool)
    .await?;
    Ok(seconds.map(Duration::from_secs_f64))
}

/// Extends a lease. False means the lease is gone (rescued, cancelled or finished elsewhere).
pub async fn heartbeat(
    pool: &PgPool,
    id: Uuid,
    token: Uuid,
    lease: Duration,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $3)
          WHERE id = $1 AND lease_token = $2 AND state = 'running'",
    )
    .bind(id)
    .bind(token)
    .bind(lease.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Locks the job row if `token` still holds its lease: the fence every worker write passes.
pub async fn hold_lease(
    conn: &mut PgConnection,
    id: Uuid,
    token: Uuid,
) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar::<_, bool>(
        "SELECT cancel_requested FROM jobs
          WHERE id = $1 AND lease_token = $2 AND state = 'running' FOR UPDATE",
    )
    .bind(id)
    .bind(token)
    .fetch_optional(conn)
    .await
}

/// How a worker's attempt at a job ended.
pub enum Finish<'a> {
    Succeeded,
    Retry { error: &'a str, delay: Duration },
    Failed { error: &'a str },
    Cancelled,
}

/// Records the end of an attempt, fenced by the lease token. False: the lease was lost.
pub async fn finish(
    pool: &PgPool,
    id: Uuid,
    token: Uuid,
    finish: Finish<'_>,
) -> Result<bool, sqlx::Error> {
    let (state, error, delay) = match finish {
        Finish::Succeeded => ("succeeded", None, Duration::ZERO),
        Finish::Retry { error, delay } => ("queued", Some(error), delay),
        Finish::Failed { error } => ("failed", Some(error), Duration::ZERO),
        Finish::Cancelled => ("cancelled", None, Duration::ZERO),
    };
    let mut tx = pool.begin().await?;
    let done = sqlx::query(
        "UPDATE jobs
            SET state = $3, last_error = coalesce($4, last_error), lease_token = NULL,
                lease_expires_at = NULL, locked_by = NULL,
                run_at = now() + make_interval(secs => $5),
                finished_at = CASE WHEN $3 = 'queued' THEN NULL ELSE now() END
          WHERE id = $1 AND lease_token = $2 AND state = 'running'",
    )
    .bind(id)
    .bind(token)
    .bind(state)
    .bind(error)
    .bind(delay.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    let subject_state = match state {
        "succeeded" => "ready",
        "queued" => "provisioning",
        other => other,
    };
    set_subject_state(&mut tx, id, subject_state).await?;
    set_subject_error(&mut tx, id, error).await?;
    tx.commit().await?;
    Ok(true)
}

/// Gives a job back to the queue without counting the attempt (graceful shutdown).
pub async fn release(pool: &PgPool, id: Uuid, token: Uuid) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE jobs
            SET state = 'queued', attempts = greatest(attempts - 1, 0), lease_token = NULL,
                lease_expires_at = NULL, locked_by = NULL, run_at = now()
          WHERE id = $1 AND lease_token = $2 AND state = 'running'",
    )
    .bind(id)
    .bind(token)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Re-queues jobs whose lease expired (their worker died or hung); fails those out of attempts.
/// Returns the ids it touched.
pub async fn rescue_expired(pool: &PgPool) -> Result<Vec<Uuid>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let rescued: Vec<(Uuid, String)> = sqlx::query_as(
        "UPDATE jobs
            SET state = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END,
                last_error = CASE WHEN attempts >= max_attempts
                                  THEN 'worker lost its lease on the last attempt'
                                  ELSE last_error END,
                finished_at = CASE WHEN attempts >= max_attempts THEN now() END,
                lease_token = NULL, lease_expires_at = NULL, locked_by = NULL, run_at = now()
          WHERE id IN (SELECT id FROM jobs
                        WHERE state = 'running' AND lease_expires_at < now()
                        FOR UPDATE SKIP LOCKED)
        RETURNING id, state",
    )
    .fetch_all(&mut *tx)
    .await?;
    for (id, state) in &rescued {
        let subject = if state == "failed" {
            "failed"
        } else {
            "provisioning"
        };
        set_subject_state(&mut tx, *id, subject).await?;
    }
    tx.commit().await?;
    Ok(rescued.into_iter().map(|(id, _)| id).collect())
}

/// Outcome of a cancel request.
#[derive(Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Queued: cancelled at once.
    Cancelled,
    /// Running: it stops at its next step boundary.
    Requested,
    /// Already finished; nothing to do.
    AlreadyFinished(JobState),
    NotFound,
}

/// Locks a job row for a state change by the API and returns its state.
async fn lock_state(conn: &mut PgConnection, id: Uuid) -> Result<Option<JobState>, sqlx::Error> {
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(conn)
            .await?;
    Ok(state.map(|s| JobState::parse(&s).unwrap_or(JobState::Failed)))
}

pub async fn cancel(pool: &PgPool, id: Uuid) -> Result<CancelOutcome, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let outcome = cancel_in(&mut tx, id).await?;
    tx.commit().await?;
    Ok(outcome)
}

/// [`cancel`] inside the caller's transaction (to audit the request in the same commit).
pub async fn cancel_in(tx: &mut PgConnection, id: Uuid) -> Result<CancelOutcome, sqlx::Error> {
    let Some(state) = lock_state(tx, id).await? else {
        return Ok(CancelOutcome::NotFound);
    };
    let outcome = match state {
        JobState::Queued => {
            sqlx::query("UPDATE jobs SET state = 'cancelled', cancel_requested = true, finished_at = now() WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            set_subject_state(tx, id, "cancelled").await?;
            CancelOutcome::Cancelled
        }
        JobState::Running => {
            sqlx::query("UPDATE jobs SET cancel_requested = true WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            CancelOutcome::Requested
        }
        done => CancelOutcome::AlreadyFinished(done),
    };
    Ok(outcome)
}

#[derive(Debug, PartialEq, Eq)]
pub enum RetryOutcome {
    Queued,
    NotRetryable(JobState),
    /// The repository has another active job.
    Conflict,
    NotFound,
}

/// Puts a failed or cancelled job back in the queue with a fresh attempt budget. Its completed
/// steps keep their outputs, so it resumes where it stopped.
pub async fn retry(pool: &PgPool, id: Uuid) -> Result<RetryOutcome, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let outcome = retry_in(&mut tx, id).await?;
    if outcome == RetryOutcome::Queued {
        tx.commit().await?;
    }
    Ok(outcome)
}

/// [`retry`] inside the caller's transaction; commit it only on `Queued`.
pub async fn retry_in(tx: &mut PgConnection, id: Uuid) -> Result<RetryOutcome, sqlx::Error> {
    let Some(state) = lock_state(tx, id).await? else {
        return Ok(RetryOutcome::NotFound);
    };
    if !matches!(state, JobState::Failed | JobState::Cancelled) {
        return Ok(RetryOutcome::NotRetryable(state));
    }
    let updated = sqlx::query(
        "UPDATE jobs SET state = 'queued', attempts = 0, run_at = now(), cancel_requested = false,
                         last_error = NULL, finished_at = NULL
          WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
    .await;
    match updated {
        Err(e) if crate::db::violated_constraint(&e) == Some("jobs_one_active_per_repository") => {
            return Ok(RetryOutcome::Conflict);
        }
        other => other?,
    };
    sqlx::query("UPDATE job_steps SET state = 'pending', last_error = NULL WHERE job_id = $1 AND state = 'failed'")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    set_subject_state(tx, id, "pending").await?;
    Ok(RetryOutcome::Queued)
}

pub async fn get(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<Job>, sqlx::Error> {
    sqlx::query_as::<_, Job>(sqlx::AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(db)
    .await
}

pub async fn steps(db: impl PgExecutor<'_>, id: Uuid) -> Result<Vec<StepRow>, sqlx::Error> {
    sqlx::query_as::<_, StepRow>(
        "SELECT step, position, state, attempts, output, last_error, started_at, finished_at
           FROM job_steps WHERE job_id = $1 ORDER BY position, step",
    )
    .bind(id)
    .fetch_all(db)
    .await
}

/// Counts of jobs by state (for /metrics) and the age of the oldest runnable job (queue lag).
pub async fn stats(pool: &PgPool) -> Result<(Vec<(String, i64)>, f64), sqlx::Error> {
    let by_state: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM jobs GROUP BY state")
            .fetch_all(pool)
            .await?;
    let lag: Option<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - min(run_at))::float8 FROM jobs WHERE state = 'queued' AND run_at <= now()",
    )
    .fetch_one(pool)
    .await?;
    Ok((by_state, lag.unwrap_or(0.0).max(0.0)))
}

async fn set_subject_state(
    conn: &mut PgConnection,
    job_id: Uuid,
    state: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE backup_repositories SET state = $2, updated_at = now()
          WHERE id = (SELECT repository_id FROM jobs WHERE id = $1)",
    )
    .bind(job_id)
    .bind(state)
    .execute(conn)
    .await?;
    Ok(())
}

async fn set_subject_error(
    conn: &mut PgConnection,
    job_id: Uuid,
    error: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE backup_repositories SET last_error = $2
          WHERE id = (SELECT repository_id FROM jobs WHERE id = $1)",
    )
    .bind(job_id)
    .bind(error)
    .execute(conn)
    .await?;
    Ok(())
}
