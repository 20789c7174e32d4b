//! What a running job sees: its row, a fenced connection to record progress, and steps.
//!
//! A step is a named unit of work whose output persists. When a job runs again (a retry, or a
//! rescue after a crash) a step that already succeeded returns its stored output without running.
//! Every step write is fenced by the job's lease token, and every attempt leaves one audit entry.

use std::future::Future;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::{PgPool, Postgres, Row, Transaction};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::JobError;
use super::begins;
use super::queue::{self, Job};
use crate::audit::{self, AuditEntry};
use crate::telemetry::Metrics;

/// A test and fault-injection hook called at named points (see [`JobContext::checkpoint`]).
/// Unset in production; tests use it to SIGKILL a worker at an exact point.
pub type CheckpointHook = Arc<dyn Fn(&str) + Send + Sync>;

static CHECKPOINT_HOOK: std::sync::OnceLock<CheckpointHook> = std::sync::OnceLock::new();

/// Installs the process-wide checkpoint hook (once; later calls are ignored).
pub fn set_checkpoint_hook(hook: CheckpointHook) {
    let _ = CHECKPOINT_HOOK.set(hook);
}

/// A step that finished: its output (stored, returned on re-runs) and its audit record.
pub struct StepDone<T> {
    pub output: T,
    pub outcome: &'static str,
    pub detail: serde_json::Value,
    pub upstream_request_id: Option<String>,
}

impl<T> StepDone<T> {
    pub fn new(output: T, outcome: &'static str, detail: serde_json::Value) -> Self {
        StepDone {
            output,
            outcome,
            detail,
            upstream_request_id: None,
        }
    }
}

pub struct JobContext {
    pool: PgPool,
    job: Job,
    token: Uuid,
    /// Fires when the lease is lost or the process must stop; long steps should watch it.
    pub stop: CancellationToken,
    metrics: Option<Arc<Metrics>>,
    /// This attempt's step begins, batched (see [`begins`]).
    begins: begins::Begins,
}

impl JobContext {
    pub(crate) fn new(pool: PgPool, job: Job, stop: CancellationToken) -> Self {
        let token = job.lease_token.expect("a claimed job has a lease token");
        JobContext {
            pool,
            job,
            token,
            stop,
            metrics: None,
            begins: begins::Begins::default(),
        }
    }

    pub(crate) fn with_metrics(mut self, metrics: Option<Arc<Metrics>>) -> Self {
        self.metrics = metrics;
        self
    }

    fn observe_step(&self, step: &str, outcome: &str, seconds: Option<f64>) {
        if let (Some(metrics), Some(seconds)) = (&self.metrics, seconds) {
            metrics.observe_step(
                step,
                outcome,
                std::time::Duration::from_secs_f64(seconds.max(0.0)),
            );
        }
    }

    pub fn job(&self) -> &Job {
        &self.job
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn payload<T: DeserializeOwned>(&self) -> Result<T, JobError> {
        serde_json::from_value(self.job.payload.clone())
            .map_err(|e| JobError::Permanent(format!("job payload does not match its kind: {e}")))
    }

    /// Calls the checkpoint hook, if one is installed, with `"{step}:{point}"`.
    pub fn checkpoint(&self, step: &str, point: &str) {
        if let Some(hook) = CHECKPOINT_HOOK.get() {
            hook(&format!("{step}:{point}"));
        }
    }

    /// Runs `work` as the step `name` unless it already succeeded, in which case its stored
    /// output is returned and `work` is dropped without being polled.
    pub async fn step<T, F>(&self, name: &str, position: i32, work: F) -> Result<T, JobError>
    where
        T: Serialize + DeserializeOwned,
        F: Future<Output = Result<StepDone<T>, JobError>>,
    {
        let attempt = match self.begin_step(name, position).await? {
            Begun::Earlier(output) => return Ok(output),
            Begun::Attempt(attempt) => attempt,
        };
        match work.await {
            Ok(done) => {
                self.checkpoint(name, "before-record");
                // The work is done: record it even if a cancel arrived meanwhile (the job stops
                // at the next step boundary, in begin_step), so its output and audit entry are
                // kept. Only a lost lease refuses the write.
                self.record_success(name, attempt, &done).await?;
                Ok(done.output)
            }
            Err(err) => {
                self.fail_step(name, attempt, &err).await?;
                Err(err)
            }
        }
    }

    /// Like [`Self::step`], for steps that must commit their own writes together with their
    /// success: `work` gets the attempt number and must call [`Self::finish_step`] in a
    /// [`Self::fenced_tx_unless_cancelled`] before returning (or in a [`Self::fenced_tx`] when
    /// its external change is already made and must be recorded despite a cancel). Failures are
    /// recorded here.
    pub async fn step_with_own_commit<T, F, Fut>(
        &self,
        name: &str,
        position: i32,
        work: F,
    ) -> Result<T, JobError>
    where
        T: DeserializeOwned,
        F: FnOnce(i32) -> Fut,
        Fut: Future<Output = Result<T, JobError>>,
    {
        let attempt = match self.begin_step(name, position).await? {
            Begun::Earlier(output) => return Ok(output),
            Begun::Attempt(attempt) => attempt,
        };
        match work(attempt).await {
            Ok(output) => Ok(output),
            Err(err) => {
                self.fail_step(name, attempt, &err).await?;
                Err(err)
            }
        }
    }

    /// Makes succeeded steps run again on the next attempt (their inputs went stale).
    pub async fn reset_steps(&self, names: &[&str]) -> Result<(), JobError> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut tx = self.fenced_tx_unless_cancelled().await?;
        sqlx::query("UPDATE job_steps SET state = 'pending', output = NULL WHERE job_id = $1 AND step = ANY($2)")
            .bind(self.job.id)
            .bind(&names)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The stored output of a step that already succeeded in an earlier attempt.
    pub async fn completed_output<T: DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, JobError> {
        let output: Option<Option<serde_json::Value>> = sqlx::query_scalar(
            "SELECT output FROM job_steps WHERE job_id = $1 AND step = $2 AND state = 'succeeded'",
        )
        .bind(self.job.id)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        output.map(|value| stored_output(name, value)).transpose()
    }

    /// The step's output if an earlier attempt succeeded; else marks it running and counts the
    /// attempt, fenced by the lease, and stops here if a cancel was requested. Begins that come
    /// together are one statement (see [`begins`]): the job's row lock is held only while it
    /// runs. The lock stays exclusive: two transactions writing events of one job must not
    /// overlap, so that their `job_events` ids are in commit order (what the live stream
    /// relies on).
    async fn begin_step<T: DeserializeOwned>(
        &self,
        name: &str,
        position: i32,
    ) -> Result<Begun<T>, JobError> {
        let lease = begins::Lease {
            pool: &self.pool,
            job: self.job.id,
            token: self.token,
        };
        let row = self.begins.begin(lease, name, position).await?;
        if row.earlier {
            return stored_output(name, row.output).map(Begun::Earlier);
        }
        match (row.cancel_requested, row.attempt) {
            (None, _) => Err(JobError::LeaseLost),
            (Some(true), _) => Err(JobError::Cancelled),
            (Some(false), Some(attempt)) => Ok(Begun::Attempt(attempt)),
            // Not seen: the insert answers a row whenever the lease holds and no cancel came.
            (Some(false), None) => Err(JobError::Retryable(format!(
                "step {name} was not marked running"
            ))),
        }
    }

    /// Opens a transaction fenced by the job's lease: it holds the job's row lock, or fails with
    /// `LeaseLost` when another worker owns the job now. A requested cancel does not refuse it
    /// (work already done is still recorded).
    pub async fn fenced_tx(&self) -> Result<Transaction<'static, Postgres>, JobError> {
        let mut tx = self.pool.begin().await?;
        match queue::hold_lease(&mut tx, self.job.id, self.token).await? {
            None => Err(JobError::LeaseLost),
            Some(_) => Ok(tx),
        }
    }

    /// Like [`Self::fenced_tx`], but fails with `Cancelled` when a cancel was requested: for
    /// transactions that start new work.
    pub async fn fenced_tx_unless_cancelled(
        &self,
    ) -> Result<Transaction<'static, Postgres>, JobError> {
        let mut tx = self.pool.begin().await?;
        match queue::hold_lease(&mut tx, self.job.id, self.token).await? {
            None => Err(JobError::LeaseLost),
            Some(true) => Err(JobError::Cancelled),
            Some(false) => Ok(tx),
        }
    }

    /// Runs one data-modifying statement fenced by the lease, in one round trip (the job's row
    /// lock held only while it runs): `statement` is a data-modifying statement that must read
    /// the CTE `lease` (e.g. `... WHERE id = $3 AND EXISTS (SELECT 1 FROM lease)`); its own
    /// parameters start at `$3`, bound by `bind`. Fails with `LeaseLost` when the lease is gone.
    pub async fn fenced_write<'q>(
        &self,
        statement: &str,
        bind: impl FnOnce(PgQuery<'q>) -> PgQuery<'q>,
    ) -> Result<(), JobError> {
        let lease = queue::held_lease(1, 2);
        let sql = format!(
            "WITH lease AS ({lease}),
             written AS ({statement})
             SELECT EXISTS (SELECT 1 FROM lease)"
        );
        let query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(self.job.id)
            .bind(self.token);
        let held: bool = bind(query).fetch_one(&self.pool).await?.try_get(0)?;
        if !held {
            return Err(JobError::LeaseLost);
        }
        Ok(())
    }

    /// Fails with `LeaseLost` or `Cancelled` unless this worker still owns the job and no
    /// cancel was requested; holds no lock afterwards. For a step about to start external work
    /// that must not run inside a transaction (an AWS or Kubernetes call).
    pub async fn check_lease_unless_cancelled(&self) -> Result<(), JobError> {
        self.fenced_tx_unless_cancelled().await?.rollback().await?;
        Ok(())
    }

    /// Records a step's success and its audit entry inside `tx` (which must come from
    /// [`Self::fenced_tx_unless_cancelled`], or [`Self::fenced_tx`] for work already done);
    /// callers add their own writes to the same transaction.
    pub async fn finish_step<T: Serialize>(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        name: &str,
        attempt: i32,
        done: &StepDone<T>,
    ) -> Result<(), JobError> {
        let (output, entry) = self.success_record(name, attempt, done)?;
        let seconds: Option<f64> = sqlx::query_scalar(
            "UPDATE job_steps SET state = 'succeeded', output = $3, last_error = NULL, finished_at = clock_timestamp()
              WHERE job_id = $1 AND step = $2
          RETURNING extract(epoch FROM finished_at - started_at)::float8",
        )
        .bind(self.job.id)
        .bind(name)
        .bind(output)
        .fetch_optional(&mut **tx)
        .await?
        .flatten();
        self.observe_step(name, done.outcome, seconds);
        audit::record(&mut **tx, &entry).await?;
        Ok(())
    }

    /// A succeeded step's stored output and its audit entry.
    fn success_record<T: Serialize>(
        &self,
        name: &str,
        attempt: i32,
        done: &StepDone<T>,
    ) -> Result<(serde_json::Value, AuditEntry), JobError> {
        let output = serde_json::to_value(&done.output).map_err(|e| {
            JobError::Permanent(format!("step {name} output is not serializable: {e}"))
        })?;
        let entry = self.audit_entry(
            name,
            attempt,
            done.outcome,
            done.detail.clone(),
            done.upstream_request_id.clone(),
        );
        Ok((output, entry))
    }

    /// What [`Self::finish_step`] writes, in one statement that holds the job's row lock (the
    /// lease check) only while it runs: concurrent steps of a job finishing together do not
    /// queue behind each other's BEGIN/SELECT/UPDATE/INSERT/COMMIT. For steps with no writes of
    /// their own.
    async fn record_success<T: Serialize>(
        &self,
        name: &str,
        attempt: i32,
        done: &StepDone<T>,
    ) -> Result<(), JobError> {
        self.record_success_with(name, attempt, done, None, |query| query)
            .await
    }

    /// Like [`Self::record_success`], with `also` written by the same statement (durable
    /// together with the step's success): a data-modifying statement that must read the CTE
    /// `lease` (e.g. `... SELECT ... FROM lease`); its own parameters start at `$16`, bound by
    /// `bind` (owned values). Recorded even after a cancel; fails with `LeaseLost` when the lease is gone.
    pub async fn record_success_with<T: Serialize>(
        &self,
        name: &str,
        attempt: i32,
        done: &StepDone<T>,
        also: Option<&str>,
        bind: impl for<'q> FnOnce(PgQuery<'q>) -> PgQuery<'q>,
    ) -> Result<(), JobError> {
        let (output, entry) = self.success_record(name, attempt, done)?;
        let audit =
            audit::insert_sql("SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11 FROM lease");
        let also = also.map(|s| format!(", also AS ({s})")).unwrap_or_default();
        let lease = queue::held_lease(12, 13);
        let sql = format!(
            "WITH lease AS ({lease}),
             done AS (
                 UPDATE job_steps
                    SET state = 'succeeded', output = $15, last_error = NULL,
                        finished_at = clock_timestamp()
                  WHERE job_id = $12 AND step = $14 AND EXISTS (SELECT 1 FROM lease)
              RETURNING extract(epoch FROM finished_at - started_at)::float8 AS seconds),
             logged AS ({audit}){also}
             SELECT EXISTS (SELECT 1 FROM lease), (SELECT seconds FROM done)"
        );
        let query = sqlx::query(sqlx::AssertSqlSafe(sql));
        let query = audit::bind_entry(query, &entry)
            .bind(self.job.id)
            .bind(self.token)
            .bind(name)
            .bind(output);
        let row = bind(query).fetch_one(&self.pool).await?;
        let (held, seconds): (bool, Option<f64>) = (row.try_get(0)?, row.try_get(1)?);
        if !held {
            return Err(JobError::LeaseLost);
        }
        self.observe_step(name, done.outcome, seconds);
        Ok(())
    }

    /// Records a failed step attempt (fenced) and its audit entry.
    pub async fn fail_step(
        &self,
        name: &str,
        attempt: i32,
        err: &JobError,
    ) -> Result<(), JobError> {
        if matches!(err, JobError::LeaseLost) {
            return Ok(());
        }
        let mut tx = self.fenced_tx().await?;
        let message = err.to_string();
        let seconds: Option<f64> = sqlx::query_scalar(
            "UPDATE job_steps SET state = 'failed', last_error = $3, finished_at = clock_timestamp()
              WHERE job_id = $1 AND step = $2
          RETURNING extract(epoch FROM finished_at - started_at)::float8",
        )
        .bind(self.job.id)
        .bind(name)
        .bind(&message)
        .fetch_optional(&mut *tx)
        .await?
        .flatten();
        self.observe_step(name, "failed", seconds);
        let detail = serde_json::json!({ "error": message, "retryable": matches!(err, JobError::Retryable(_)) });
        audit::record(
            &mut *tx,
            &self.audit_entry(name, attempt, "failed", detail, None),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    fn audit_entry(
        &self,
        step: &str,
        attempt: i32,
        outcome: &str,
        detail: serde_json::Value,
        upstream_request_id: Option<String>,
    ) -> AuditEntry {
        AuditEntry {
            actor: self.job.created_by.clone(),
            request_id: None,
            client_request_id: None,
            subject: self.job.subject_name.clone(),
            job_id: Some(self.job.id),
            step: Some(step.to_owned()),
            attempt: Some(attempt),
            action: format!("{}.{step}", self.job.kind),
            outcome: outcome.to_owned(),
            detail,
            upstream_request_id,
        }
    }
}

/// How a step begins: with the output of an earlier attempt that succeeded, or as this attempt.
enum Begun<T> {
    Earlier(T),
    Attempt(i32),
}

/// A query of [`JobContext::fenced_write`].
pub type PgQuery<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

/// A succeeded step's stored output, read back as `T`.
fn stored_output<T: DeserializeOwned>(
    name: &str,
    value: Option<serde_json::Value>,
) -> Result<T, JobError> {
    serde_json::from_value(value.unwrap_or(serde_json::Value::Null)).map_err(|e| {
        JobError::Permanent(format!("stored output of step {name} is unreadable: {e}"))
    })
}
