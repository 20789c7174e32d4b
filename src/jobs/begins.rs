//! Step begins, batched. Marking a step running takes the job's row lock (the lease check),
//! so the steps of a job that start together (the branches of one `tokio::join!`) would queue
//! behind each other's commit, one round trip each. Instead, begins that arrive together are
//! written by one statement: one round trip and one commit for all of them. Each caller waits
//! for its own answer; whoever holds the flush lock writes every begin waiting at that moment.

use std::sync::Mutex;

use sqlx::PgPool;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::JobError;

/// The database's answer for one step's begin.
#[derive(sqlx::FromRow)]
pub(super) struct BeginRow {
    step: String,
    /// The step already succeeded in an earlier attempt; `output` is what it stored.
    pub earlier: bool,
    pub output: Option<serde_json::Value>,
    /// `None`: the lease is gone.
    pub cancel_requested: Option<bool>,
    /// This attempt's number, when the step was marked running.
    pub attempt: Option<i32>,
}

struct Waiting {
    step: String,
    position: i32,
    answer: oneshot::Sender<Result<BeginRow, String>>,
}

/// The begins of one job's attempt (see the module's documentation).
#[derive(Default)]
pub(super) struct Begins {
    waiting: Mutex<Vec<Waiting>>,
    flushing: tokio::sync::Mutex<()>,
}

/// The job a begin belongs to and the lease that fences it.
pub(super) struct Lease<'a> {
    pub pool: &'a PgPool,
    pub job: Uuid,
    pub token: Uuid,
}

impl Begins {
    /// Marks `step` running (fenced by the lease) unless it already succeeded, together with
    /// the other begins waiting now.
    pub(super) async fn begin(
        &self,
        lease: Lease<'_>,
        step: &str,
        position: i32,
    ) -> Result<BeginRow, JobError> {
        let (answer, answered) = oneshot::channel();
        let waiting = Waiting {
            step: step.to_owned(),
            position,
            answer,
        };
        self.waiting.lock().expect("not poisoned").push(waiting);
        // One turn for the sibling branches polled after this one to add theirs.
        tokio::task::yield_now().await;
        {
            let _flushing = self.flushing.lock().await;
            let batch = std::mem::take(&mut *self.waiting.lock().expect("not poisoned"));
            if !batch.is_empty() {
                write(lease, batch).await;
            }
        }
        match answered.await {
            Ok(Ok(row)) => Ok(row),
            Ok(Err(message)) => Err(JobError::Retryable(message)),
            // The writer was dropped mid-statement (the attempt is being abandoned).
            Err(_) => Err(JobError::Retryable(format!(
                "the begin of step {step} was not written"
            ))),
        }
    }
}

/// One statement for `batch`; every waiting caller gets its own row (or the error).
async fn write(lease: Lease<'_>, batch: Vec<Waiting>) {
    let steps: Vec<&str> = batch.iter().map(|w| w.step.as_str()).collect();
    let positions: Vec<i32> = batch.iter().map(|w| w.position).collect();
    let sql = format!(
        "WITH lease AS ({}), {BEGIN_STEPS}",
        super::queue::held_lease(1, 2)
    );
    let rows: Result<Vec<BeginRow>, sqlx::Error> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(lease.job)
        .bind(lease.token)
        .bind(&steps)
        .bind(&positions)
        .fetch_all(lease.pool)
        .await;
    let mut rows = match rows {
        Ok(rows) => rows,
        Err(e) => {
            let message = format!("database: {e}");
            for waiting in batch {
                let _ = waiting.answer.send(Err(message.clone()));
            }
            return;
        }
    };
    for waiting in batch {
        let row = rows
            .iter()
            .position(|r| r.step == waiting.step)
            .map(|at| rows.swap_remove(at))
            .ok_or_else(|| format!("step {} was not marked running", waiting.step));
        let _ = waiting.answer.send(row);
    }
}

/// Marks each wanted step running (a new row, or the next attempt of a failed or interrupted
/// one) unless it already succeeded, only while the lease holds and no cancel was requested;
/// answers for each whether it succeeded earlier (and its output), the cancel flag (`NULL`:
/// the lease is gone) and the attempt's number. Follows the CTE `lease`
/// ([`super::queue::held_lease`]).
const BEGIN_STEPS: &str = "
 wanted AS (
     SELECT * FROM unnest($3::text[], $4::int4[]) WITH ORDINALITY AS w(step, position, n)),
 earlier AS (
     SELECT step, output FROM job_steps
      WHERE job_id = $1 AND step = ANY($3) AND state = 'succeeded'),
 started AS (
     INSERT INTO job_steps (job_id, step, position, state, attempts, started_at)
     SELECT $1, w.step, w.position, 'running', 1, clock_timestamp() FROM wanted w, lease
      WHERE NOT lease.cancel_requested AND w.step NOT IN (SELECT step FROM earlier)
      ORDER BY w.n
     ON CONFLICT (job_id, step) DO UPDATE
        SET state = 'running', attempts = job_steps.attempts + 1,
            started_at = clock_timestamp(), finished_at = NULL
     RETURNING step, attempts)
SELECT w.step, e.step IS NOT NULL AS earlier, e.output,
       (SELECT cancel_requested FROM lease) AS cancel_requested, s.attempts AS attempt
  FROM wanted w LEFT JOIN earlier e USING (step) LEFT JOIN started s USING (step)";
