//! The queue's SQL: enqueue, claim, heartbeat, finish, rescue, cancel, retry.
//!
//! A job may have a subject (what it works on); at most one job per subject is active. How a
//! subject follows its jobs' states is up to the job kinds: a database trigger on `jobs`, so the
//! subject changes in the same transaction as the job, whoever changes the job.

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

#[derive(Debug, Clone, sqlx::FromRow, serde::Deserialize)]
pub struct Job {
    pub id: Uuid,
    pub kind: String,
    pub subject_id: Option<Uuid>,
    pub subject_name: Option<String>,
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

#[derive(Debug, Clone, Serialize, serde::Deserialize, sqlx::FromRow)]
pub struct StepRow {
    pub step: String,
    pub position: i32,
    pub state: String,
    pub attempts: i32,
    /// None where a query leaves it out ([`get_with_steps`]).
    #[serde(default)]
    pub output: Option<serde_json::Value>,
    pub last_error: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// What a job works on: the id that at most one active job may hold, and a name for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub id: Uuid,
    pub name: String,
}

pub struct NewJob<'a> {
    pub kind: &'a str,
    pub subject: Option<Subject>,
    pub payload: serde_json::Value,
    pub max_attempts: i32,
    pub created_by: &'a str,
}

pub(crate) const JOB_COLUMNS: &str = "id, kind, subject_id, subject_name, payload, state, attempts, max_attempts, run_at, lease_token, \
     lease_expires_at, cancel_requested, last_error, created_by, created_at, started_at, finished_at";

/// Inserts a queued job. Call it inside the transaction that writes the domain change; the
/// insert trigger notifies workers when that transaction commits. Fails with a unique violation
/// on [`ONE_ACTIVE_PER_SUBJECT`] when the subject already has an active job (see
/// [`is_subject_busy`]).
pub async fn enqueue(conn: &mut PgConnection, job: NewJob<'_>) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::new_v4();
    let (subject_id, subject_name) = job.subject.map(|s| (s.id, s.name)).unzip();
    sqlx::query(
        "INSERT INTO jobs (id, kind, subject_id, subject_name, payload, max_attempts, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(job.kind)
    .bind(subject_id)
    .bind(subject_name)
    .bind(&job.payload)
    .bind(job.max_attempts)
    .bind(job.created_by)
    .execute(&mut *conn)
    .await?;
    Ok(id)
}

/// Stores where the end of job `id` is reported (see [`super::EnqueueOptions::callback_url`]);
/// call it in the transaction that queued the job.
pub async fn set_callback_url(
    conn: &mut PgConnection,
    id: Uuid,
    url: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE jobs SET callback_url = $2 WHERE id = $1")
        .bind(id)
        .bind(url)
        .execute(conn)
        .await?;
    Ok(())
}

/// The unique index that allows one queued or running job per subject.
pub const ONE_ACTIVE_PER_SUBJECT: &str = "jobs_one_active_per_subject";

/// True when `err` says the subject already has a queued or running job.
pub fn is_subject_busy(err: &sqlx::Error) -> bool {
    crate::db::violated_constraint(err) == Some(ONE_ACTIVE_PER_SUBJECT)
}

/// Claims the runnable job of the given kinds that has waited longest (earliest `run_at`), if
/// any, with a fresh lease token.
pub async fn claim(
    pool: &PgPool,
    kinds: &[&str],
    worker: &str,
    lease: Duration,
) -> Result<Option<Job>, sqlx::Error> {
    Ok(claim_up_to(pool, kinds, worker, lease, 1).await?.pop())
}

/// Claims up to `limit` runnable jobs of the given kinds, those that have waited longest first
/// (earliest `run_at`), each with its own fresh lease token. The order is exactly the
/// `jobs_claimable` index's, so a claim reads `limit` index entries: ordering by `created_at`
/// after `run_at` too made Postgres read and sort every queued job on each claim.
pub async fn claim_up_to(
    pool: &PgPool,
    kinds: &[&str],
    worker: &str,
    lease: Duration,
    limit: usize,
) -> Result<Vec<Job>, sqlx::Error> {
    // One statement for every free slot, so no explicit transaction: it commits on its own,
    // and BEGIN and COMMIT would be two more round trips.
    let (_, jobs) = finish_and_claim(pool, &[], (kinds, worker, lease), limit).await?;
    Ok(jobs)
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
/// Exclusive, so that a job's transactions that write its events never overlap (their
/// `job_events` ids are then in commit order, which the live stream relies on).
pub async fn hold_lease(
    conn: &mut PgConnection,
    id: Uuid,
    token: Uuid,
) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar::<_, bool>(sqlx::AssertSqlSafe(held_lease(1, 2)))
        .bind(id)
        .bind(token)
        .fetch_optional(conn)
        .await
}

/// The fence of [`hold_lease`] as a query (its job's `cancel_requested` when the lease holds,
/// no row otherwise), with the job's id and the lease token as parameters `$id` and `$token`:
/// the `lease` CTE of the one-statement fenced writes (`JobContext`, `jobs::begins`).
pub(crate) fn held_lease(id: u8, token: u8) -> String {
    format!(
        "SELECT cancel_requested FROM jobs
          WHERE id = ${id} AND lease_token = ${token} AND state = 'running' FOR UPDATE"
    )
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
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// One attempt's end for [`finish_all`].
#[derive(Debug, Clone)]
pub struct Ending {
    pub id: Uuid,
    pub token: Uuid,
    /// The job's state afterwards: `queued` (a retry after `delay`), `succeeded`, `failed` or
    /// `cancelled`.
    pub state: &'static str,
    pub error: Option<String>,
    pub delay: Duration,
}

impl Ending {
    pub fn new(id: Uuid, token: Uuid, finish: Finish<'_>) -> Self {
        let (state, error, delay) = match finish {
            Finish::Succeeded => ("succeeded", None, Duration::ZERO),
            Finish::Retry { error, delay } => ("queued", Some(error), delay),
            Finish::Failed { error } => ("failed", Some(error), Duration::ZERO),
            Finish::Cancelled => ("cancelled", None, Duration::ZERO),
        };
        let error = error.map(str::to_owned);
        Ending {
            id,
            token,
            state,
            error,
            delay,
        }
    }
}

/// Records the ends of several attempts in one statement, so in one commit: each row exactly
/// as [`finish`] writes it, fenced by its own lease token. Returns the ids whose lease held.
/// A commit that NOTIFYs (the jobs' triggers do) holds a server-wide lock until its WAL is
/// flushed, so such commits cannot overlap: one commit for many ends is what lets the queue's
/// throughput grow beyond one flush per job.
pub async fn finish_all(pool: &PgPool, endings: &[Ending]) -> Result<Vec<Uuid>, sqlx::Error> {
    let nothing_claimed = (&[][..], "", Duration::ZERO);
    let (held, _) = finish_and_claim(pool, endings, nothing_claimed, 0).await?;
    Ok(held)
}

/// [`finish_all`] and [`claim_up_to`] (`want` jobs) in one statement, so in one commit: a
/// slot's end and its next job cost one NOTIFY commit, not two. Both parts see the same
/// snapshot, so a job ended here (even one queued again for a retry) is not claimed by it.
/// Returns the ended ids whose lease held and the claimed jobs, oldest first.
pub async fn finish_and_claim(
    pool: &PgPool,
    endings: &[Ending],
    (kinds, worker, lease): (&[&str], &str, Duration),
    want: usize,
) -> Result<(Vec<Uuid>, Vec<Job>), sqlx::Error> {
    let ids: Vec<Uuid> = endings.iter().map(|e| e.id).collect();
    let tokens: Vec<Uuid> = endings.iter().map(|e| e.token).collect();
    let states: Vec<&str> = endings.iter().map(|e| e.state).collect();
    let errors: Vec<Option<&str>> = endings.iter().map(|e| e.error.as_deref()).collect();
    let delays: Vec<f64> = endings.iter().map(|e| e.delay.as_secs_f64()).collect();
    let kinds: Vec<String> = kinds.iter().map(|k| k.to_string()).collect();
    // The two parts return different rows: one column each, the other NULL.
    let rows: Vec<(Option<Uuid>, Option<sqlx::types::Json<Job>>)> =
        sqlx::query_as(sqlx::AssertSqlSafe(finish_and_claim_sql()))
            .bind(&ids)
            .bind(&tokens)
            .bind(&states)
            .bind(&errors)
            .bind(&delays)
            .bind(&kinds)
            .bind(worker)
            .bind(lease.as_secs_f64())
            .bind(i64::try_from(want).unwrap_or(i64::MAX))
            .fetch_all(pool)
            .await?;
    let mut held = Vec::new();
    let mut claimed = Vec::new();
    for (ended, job) in rows {
        held.extend(ended);
        claimed.extend(job.map(|json| json.0));
    }
    claimed.sort_by_key(|job| job.run_at);
    Ok((held, claimed))
}

/// [`finish_and_claim`]'s statement: `$1`–`$5` the ends, `$6`–`$9` the claim.
fn finish_and_claim_sql() -> String {
    format!(
        "WITH ended AS (
                UPDATE jobs j
                   SET state = e.state, last_error = coalesce(e.error, j.last_error),
                       lease_token = NULL, lease_expires_at = NULL, locked_by = NULL,
                       run_at = now() + make_interval(secs => e.delay),
                       finished_at = CASE WHEN e.state = 'queued' THEN NULL ELSE now() END
                  FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::float8[])
                       AS e(id, token, state, error, delay)
                 WHERE j.id = e.id AND j.lease_token = e.token AND j.state = 'running'
                RETURNING j.id
             ), claimed AS (
                -- `gen_random_uuid()` is volatile: each row gets a token of its own.
                UPDATE jobs
                   SET state = 'running', attempts = attempts + 1,
                       lease_token = gen_random_uuid(),
                       lease_expires_at = now() + make_interval(secs => $8), locked_by = $7,
                       started_at = coalesce(started_at, now())
                 WHERE id IN (SELECT id FROM jobs
                               WHERE state = 'queued' AND run_at <= now() AND kind = ANY($6)
                               ORDER BY run_at
                               FOR UPDATE SKIP LOCKED
                               LIMIT $9)
                RETURNING {JOB_COLUMNS}
             )
             SELECT id, NULL::jsonb FROM ended
             UNION ALL
             SELECT NULL, to_jsonb(claimed) FROM claimed"
    )
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
    sqlx::query_scalar(
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
        RETURNING id",
    )
    .fetch_all(pool)
    .await
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
    /// The job's subject has another active job.
    Conflict,
    /// A newer job (created later) exists for the job's subject: retrying this one would run
    /// stale options. Retry the newer one instead.
    Superseded {
        newer: Uuid,
    },
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
    match newer_job_of_subject(tx, id).await? {
        Some((_, active)) if active => return Ok(RetryOutcome::Conflict),
        Some((newer, _)) => return Ok(RetryOutcome::Superseded { newer }),
        None => {}
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
        Err(e) if is_subject_busy(&e) => return Ok(RetryOutcome::Conflict),
        other => other?,
    };
    sqlx::query("UPDATE job_steps SET state = 'pending', last_error = NULL WHERE job_id = $1 AND state = 'failed'")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    Ok(RetryOutcome::Queued)
}

/// The newest job created after job `id` for the same subject, if any, and whether it is
/// queued or running.
async fn newer_job_of_subject(
    conn: &mut PgConnection,
    id: Uuid,
) -> Result<Option<(Uuid, bool)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT newer.id, newer.state IN ('queued', 'running')
           FROM jobs newer JOIN jobs old ON newer.subject_id = old.subject_id
          WHERE old.id = $1 AND newer.id <> old.id AND newer.created_at > old.created_at
          ORDER BY newer.created_at DESC
          LIMIT 1",
    )
    .bind(id)
    .fetch_optional(conn)
    .await
}

pub async fn get(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<Job>, sqlx::Error> {
    sqlx::query_as::<_, Job>(sqlx::AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(db)
    .await
}

/// A job and its steps (in [`steps`]' order, without their outputs) in one query: what a job's
/// page shows, read often while clients follow a job.
pub async fn get_with_steps(
    db: impl PgExecutor<'_>,
    id: Uuid,
) -> Result<Option<(Job, Vec<StepRow>)>, sqlx::Error> {
    type Row = (sqlx::types::Json<Job>, sqlx::types::Json<Vec<StepRow>>);
    let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT to_jsonb(j),
                coalesce((SELECT jsonb_agg(to_jsonb(s) ORDER BY s.position, s.step)
                            FROM (SELECT step, position, state, attempts, last_error, started_at,
                                         finished_at
                                    FROM job_steps WHERE job_id = j.id) s),
                         '[]'::jsonb)
           FROM (SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1) j"
    )))
    .bind(id)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|(job, steps)| (job.0, steps.0)))
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

/// The latest job of each subject in `ids`, e.g. for list views.
pub async fn latest_per_subject(
    db: impl PgExecutor<'_>,
    ids: &[Uuid],
) -> Result<Vec<Job>, sqlx::Error> {
    sqlx::query_as::<_, Job>(sqlx::AssertSqlSafe(format!(
        "SELECT DISTINCT ON (subject_id) {JOB_COLUMNS}
           FROM jobs WHERE subject_id = ANY($1)
          ORDER BY subject_id, created_at DESC"
    )))
    .bind(ids)
    .fetch_all(db)
    .await
}

/// Filters of the operators' job listing, newest first.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub state: Option<String>,
    pub kind: Option<String>,
    /// Only jobs of the subject of this name (whichever subject row carried it).
    pub subject_name: Option<String>,
    /// Cursor: only jobs created before this `(created_at, id)`.
    pub before: Option<(DateTime<Utc>, Uuid)>,
    pub limit: i64,
}

/// Jobs matching `filter`, newest first (`created_at`, then `id`, descending).
pub async fn list(db: impl PgExecutor<'_>, filter: &JobFilter) -> Result<Vec<Job>, sqlx::Error> {
    let (before_at, before_id) = filter.before.unzip();
    sqlx::query_as::<_, Job>(sqlx::AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} FROM jobs
          WHERE ($1::text IS NULL OR state = $1)
            AND ($2::text IS NULL OR kind = $2)
            AND ($3::text IS NULL OR subject_name = $3)
            AND ($4::timestamptz IS NULL OR (created_at, id) < ($4, $5))
          ORDER BY created_at DESC, id DESC
          LIMIT $6"
    )))
    .bind(&filter.state)
    .bind(&filter.kind)
    .bind(&filter.subject_name)
    .bind(before_at)
    .bind(before_id)
    .bind(filter.limit)
    .fetch_all(db)
    .await
}
