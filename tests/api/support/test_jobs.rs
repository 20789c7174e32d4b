//! A test-only job kind whose behaviour comes from its payload, and helpers to run worker pools
//! against a test database.
//!
//! Each step of a `test` job can sleep, wait for a flag row to appear, or fail (retryably or
//! permanently) for its first N executions. Every run of the handler and every execution of a
//! step leaves a row in bookkeeping tables (`test_job_runs`, `test_job_step_runs`) so tests can
//! check who ran what, when, and how often. Those tables are not part of the schema: tests
//! create them with [`install`].

use std::time::Duration;

use backup_provisioner::jobs::queue::{self, Job, NewJob, Subject};
use backup_provisioner::jobs::{
    JobContext, JobError, JobHandler, Registry, StepDone, WorkerConfig, WorkerPool,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::app::eventually;

/// `jobs.kind` of the test job.
pub const KIND: &str = "test";

/// What one step does, in this order: sleep, wait for a flag, then fail while its execution
/// count (1-based, over every run of the job) is within a `fail_*_times` budget.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    pub name: String,
    #[serde(default)]
    pub sleep_ms: u64,
    #[serde(default)]
    pub wait_for_flag: Option<String>,
    #[serde(default)]
    pub fail_retryable_times: i64,
    #[serde(default)]
    pub fail_permanent_times: i64,
}

impl StepSpec {
    pub fn new(name: &str) -> Self {
        StepSpec {
            name: name.to_owned(),
            ..Default::default()
        }
    }

    pub fn sleep_ms(mut self, ms: u64) -> Self {
        self.sleep_ms = ms;
        self
    }

    pub fn wait_for(mut self, flag: &str) -> Self {
        self.wait_for_flag = Some(flag.to_owned());
        self
    }

    pub fn fail_retryable(mut self, times: i64) -> Self {
        self.fail_retryable_times = times;
        self
    }

    pub fn fail_permanent(mut self, times: i64) -> Self {
        self.fail_permanent_times = times;
        self
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestPayload {
    pub steps: Vec<StepSpec>,
    /// Copied into audit entries by `JobContext` (it reads `payload.repository`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// The steps run concurrently (the branches of one join) instead of one after another.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub concurrent: bool,
}

/// The handler. `worker` names the pool it runs in, for the bookkeeping tables.
pub struct TestJob {
    worker: String,
}

impl TestJob {
    pub fn new(worker: &str) -> Self {
        TestJob {
            worker: worker.to_owned(),
        }
    }

    async fn run_steps(&self, ctx: &JobContext, payload: &TestPayload) -> Result<Value, JobError> {
        if payload.concurrent {
            return self.run_steps_concurrently(ctx, payload).await;
        }
        let mut outputs = serde_json::Map::new();
        for (position, spec) in payload.steps.iter().enumerate() {
            let output: Value = ctx
                .step(&spec.name, position as i32, self.execute_step(ctx, spec))
                .await?;
            outputs.insert(spec.name.clone(), output);
        }
        Ok(Value::Object(outputs))
    }

    async fn run_steps_concurrently(
        &self,
        ctx: &JobContext,
        payload: &TestPayload,
    ) -> Result<Value, JobError> {
        let steps = payload.steps.iter().enumerate().map(|(position, spec)| {
            let output = ctx.step(&spec.name, position as i32, self.execute_step(ctx, spec));
            async move { Ok::<_, JobError>((spec.name.clone(), output.await?)) }
        });
        let outputs: Vec<Result<(String, Value), JobError>> =
            futures::future::join_all(steps).await;
        let outputs: Result<serde_json::Map<String, Value>, JobError> =
            outputs.into_iter().collect();
        Ok(Value::Object(outputs?))
    }

    /// The body of one step; only polled when the step has not already succeeded.
    async fn execute_step(
        &self,
        ctx: &JobContext,
        spec: &StepSpec,
    ) -> Result<StepDone<Value>, JobError> {
        let db = ctx.pool();
        let job_id = ctx.job().id;
        let run_id: i64 = sqlx::query_scalar(
            "INSERT INTO test_job_step_runs (job_id, step, worker, job_attempt, started_at)
             VALUES ($1, $2, $3, $4, clock_timestamp()) RETURNING id",
        )
        .bind(job_id)
        .bind(&spec.name)
        .bind(&self.worker)
        .bind(ctx.job().attempts)
        .fetch_one(db)
        .await?;
        let execution: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM test_job_step_runs WHERE job_id = $1 AND step = $2 AND id <= $3",
        )
        .bind(job_id)
        .bind(&spec.name)
        .bind(run_id)
        .fetch_one(db)
        .await?;

        let result = self.step_behaviour(ctx, spec, execution).await;
        let outcome = match &result {
            Ok(()) => "ok".to_owned(),
            Err(e) => e.to_string(),
        };
        sqlx::query("UPDATE test_job_step_runs SET ended_at = clock_timestamp(), outcome = $2 WHERE id = $1")
            .bind(run_id)
            .bind(&outcome)
            .execute(db)
            .await?;
        result?;
        let output = json!({
            "step": spec.name,
            "worker": self.worker,
            "execution": execution,
            "nonce": Uuid::new_v4(),
        });
        Ok(StepDone::new(
            output,
            "created",
            json!({ "execution": execution }),
        ))
    }

    async fn step_behaviour(
        &self,
        ctx: &JobContext,
        spec: &StepSpec,
        execution: i64,
    ) -> Result<(), JobError> {
        if spec.sleep_ms > 0 {
            tokio::time::sleep(Duration::from_millis(spec.sleep_ms)).await;
        }
        if let Some(flag) = &spec.wait_for_flag {
            loop {
                if flag_is_set(ctx.pool(), flag).await? {
                    break;
                }
                tokio::select! {
                    _ = ctx.stop.cancelled() => {
                        return Err(JobError::Retryable(format!("stopped while waiting for flag {flag}")));
                    }
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        }
        if execution <= spec.fail_permanent_times {
            return Err(JobError::Permanent(format!(
                "step {} fails permanently (execution {execution})",
                spec.name
            )));
        }
        if execution <= spec.fail_retryable_times {
            return Err(JobError::Retryable(format!(
                "step {} fails retryably (execution {execution})",
                spec.name
            )));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl JobHandler for TestJob {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn run(&self, ctx: &JobContext) -> Result<(), JobError> {
        let payload: TestPayload = ctx.payload()?;
        let run_id: i64 = sqlx::query_scalar(
            "INSERT INTO test_job_runs (job_id, worker, attempt, started_at)
             VALUES ($1, $2, $3, clock_timestamp()) RETURNING id",
        )
        .bind(ctx.job().id)
        .bind(&self.worker)
        .bind(ctx.job().attempts)
        .fetch_one(ctx.pool())
        .await?;
        let result = self.run_steps(ctx, &payload).await;
        let (outcome, outputs) = match &result {
            Ok(outputs) => ("ok".to_owned(), Some(outputs.clone())),
            Err(e) => (e.to_string(), None),
        };
        sqlx::query("UPDATE test_job_runs SET ended_at = clock_timestamp(), outcome = $2, outputs = $3 WHERE id = $1")
            .bind(run_id)
            .bind(outcome)
            .bind(outputs)
            .execute(ctx.pool())
            .await?;
        result.map(|_| ())
    }
}

/// Creates the bookkeeping tables the test job writes to.
pub async fn install(db: &PgPool) {
    for statement in [
        "CREATE TABLE IF NOT EXISTS test_job_runs (
            id         bigserial PRIMARY KEY,
            job_id     uuid NOT NULL,
            worker     text NOT NULL,
            attempt    integer NOT NULL,
            started_at timestamptz NOT NULL,
            ended_at   timestamptz,
            outcome    text,
            outputs    jsonb
        )",
        "CREATE TABLE IF NOT EXISTS test_job_step_runs (
            id          bigserial PRIMARY KEY,
            job_id      uuid NOT NULL,
            step        text NOT NULL,
            worker      text NOT NULL,
            job_attempt integer NOT NULL,
            started_at  timestamptz NOT NULL,
            ended_at    timestamptz,
            outcome     text
        )",
        "CREATE TABLE IF NOT EXISTS test_job_flags (name text PRIMARY KEY)",
    ] {
        sqlx::query(statement)
            .execute(db)
            .await
            .expect("create test job table");
    }
}

pub async fn set_flag(db: &PgPool, name: &str) {
    sqlx::query("INSERT INTO test_job_flags (name) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(name)
        .execute(db)
        .await
        .expect("set flag");
}

async fn flag_is_set(db: &PgPool, name: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM test_job_flags WHERE name = $1)")
        .bind(name)
        .fetch_one(db)
        .await
}

pub fn payload(steps: Vec<StepSpec>, repository: Option<&str>) -> Value {
    serde_json::to_value(TestPayload {
        steps,
        repository: repository.map(str::to_owned),
        concurrent: false,
    })
    .unwrap()
}

/// Enqueues a test job whose steps run concurrently (autocommit) and returns its id.
pub async fn enqueue_concurrent(db: &PgPool, steps: Vec<StepSpec>, max_attempts: i32) -> Uuid {
    let payload = TestPayload {
        steps,
        repository: None,
        concurrent: true,
    };
    let payload = serde_json::to_value(payload).unwrap();
    enqueue_payload(db, payload, max_attempts, None)
        .await
        .expect("enqueue test job")
}

/// Enqueues a test job (autocommit) and returns its id.
pub async fn enqueue(db: &PgPool, steps: Vec<StepSpec>, max_attempts: i32) -> Uuid {
    enqueue_for(db, steps, max_attempts, None)
        .await
        .expect("enqueue test job")
}

/// Enqueues a test job for a repository (`(id, name)`), in its own transaction.
pub async fn enqueue_for(
    db: &PgPool,
    steps: Vec<StepSpec>,
    max_attempts: i32,
    repository: Option<(Uuid, &str)>,
) -> Result<Uuid, sqlx::Error> {
    let payload = payload(steps, repository.map(|(_, name)| name));
    enqueue_payload(db, payload, max_attempts, repository).await
}

async fn enqueue_payload(
    db: &PgPool,
    payload: Value,
    max_attempts: i32,
    repository: Option<(Uuid, &str)>,
) -> Result<Uuid, sqlx::Error> {
    let mut tx = db.begin().await?;
    let id = queue::enqueue(
        &mut tx,
        NewJob {
            kind: KIND,
            subject: repository.map(|(id, name)| Subject {
                id,
                name: name.to_owned(),
            }),
            payload,
            max_attempts,
            created_by: "test@jobs",
        },
    )
    .await?;
    tx.commit().await?;
    Ok(id)
}

/// Inserts a repository row directly (no API) and returns its id.
pub async fn insert_repository(db: &PgPool, name: &str) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO backup_repositories (id, name, namespace, bucket, region, created_by)
         VALUES ($1, $2, $2, 'holos-' || $2 || '-backups', 'us-east-1', 'test@jobs')",
    )
    .bind(id)
    .bind(name)
    .execute(db)
    .await
    .expect("insert repository");
    id
}

pub async fn repository_state(db: &PgPool, id: Uuid) -> (String, Option<String>) {
    sqlx::query_as("SELECT state, last_error FROM backup_repositories WHERE id = $1")
        .bind(id)
        .fetch_one(db)
        .await
        .expect("repository row")
}

pub async fn job(db: &PgPool, id: Uuid) -> Job {
    queue::get(db, id)
        .await
        .expect("read job")
        .expect("job exists")
}

/// Waits until the job satisfies `pred`, then returns it.
pub async fn wait_for_job(
    db: &PgPool,
    id: Uuid,
    deadline: Duration,
    what: &str,
    pred: impl Fn(&Job) -> bool,
) -> Job {
    eventually(deadline, what, || async {
        let job = job(db, id).await;
        pred(&job).then_some(job)
    })
    .await
}

/// Waits until the job is in `state`.
pub async fn wait_for_state(db: &PgPool, id: Uuid, state: &str, deadline: Duration) -> Job {
    wait_for_job(
        db,
        id,
        deadline,
        &format!("job {id} to be {state}"),
        |job| job.state == state,
    )
    .await
}

/// Waits until some worker has started executing `step` of the job (at least `times` times).
pub async fn wait_for_step_started(
    db: &PgPool,
    id: Uuid,
    step: &str,
    times: i64,
    deadline: Duration,
) {
    eventually(
        deadline,
        &format!("step {step} of job {id} to start {times} time(s)"),
        || async { (step_executions(db, id, step).await >= times).then_some(()) },
    )
    .await
}

/// How many times the body of `step` began executing, across all runs of the job.
pub async fn step_executions(db: &PgPool, id: Uuid, step: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM test_job_step_runs WHERE job_id = $1 AND step = $2")
        .bind(id)
        .bind(step)
        .fetch_one(db)
        .await
        .expect("count step runs")
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Run {
    pub id: i64,
    pub job_id: Uuid,
    pub worker: String,
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub outcome: Option<String>,
    pub outputs: Option<Value>,
}

/// Every run of the handler for a job, oldest first.
pub async fn runs(db: &PgPool, id: Uuid) -> Vec<Run> {
    sqlx::query_as(
        "SELECT id, job_id, worker, attempt, started_at, ended_at, outcome, outputs
           FROM test_job_runs WHERE job_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(db)
    .await
    .expect("read runs")
}

/// A worker configuration for tests: short lease, fast polling and retries.
pub fn worker_config(worker: &str, concurrency: usize) -> WorkerConfig {
    WorkerConfig {
        concurrency,
        lease: Duration::from_secs(5),
        poll_interval: Duration::from_millis(200),
        retry_base: Duration::from_millis(50),
        shutdown_grace: Duration::from_secs(5),
        worker_id: worker.to_owned(),
    }
}

pub fn registry(worker: &str) -> Registry {
    Registry::new().register(TestJob::new(worker))
}

/// A [`WorkerPool`] running in a task with its own connection pool, like a separate process.
pub struct RunningPool {
    pub shutdown: CancellationToken,
    handle: JoinHandle<Result<(), sqlx::Error>>,
}

impl RunningPool {
    /// Fires the shutdown token and waits (at most `deadline`) for the pool to drain.
    /// Returns how long the drain took.
    pub async fn stop_within(self, deadline: Duration) -> Duration {
        let started = tokio::time::Instant::now();
        self.shutdown.cancel();
        tokio::time::timeout(deadline, self.handle)
            .await
            .expect("worker pool stopped within the deadline")
            .expect("worker pool task did not panic")
            .expect("worker pool ran without a database error");
        started.elapsed()
    }

    pub async fn stop(self) {
        self.stop_within(Duration::from_secs(30)).await;
    }
}

/// Starts a pool running the test job kind against `database_url`.
pub async fn start_pool(database_url: &str, config: WorkerConfig) -> RunningPool {
    let db = PgPoolOptions::new()
        .max_connections(2 * config.concurrency as u32 + 3)
        .connect(database_url)
        .await
        .expect("connect worker pool");
    let registry = registry(&config.worker_id);
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(WorkerPool::new(db, registry, config).run(shutdown.clone()));
    RunningPool { shutdown, handle }
}
