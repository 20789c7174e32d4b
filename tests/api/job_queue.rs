//! The Postgres job queue against a real database, real `WorkerPool`s and, for the crash test,
//! a real child process killed with SIGKILL. Jobs are of the test-only kind in
//! `support::test_jobs`, whose payload says what each step does.

use std::sync::Arc;
use std::time::Duration;

use backup_provisioner::jobs::backoff;
use backup_provisioner::jobs::queue::{self, CancelOutcome, Finish, JobState, RetryOutcome};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::app::{TestDb, eventually, migrated_db};
use crate::support::test_jobs::{self as tj, StepSpec};

const DEADLINE: Duration = Duration::from_secs(30);

/// A migrated database with the test job's bookkeeping tables.
async fn setup() -> TestDb {
    let db = migrated_db().await;
    tj::install(&db.pool).await;
    db
}

async fn step_row(db: &PgPool, id: Uuid, step: &str) -> Option<queue::StepRow> {
    queue::steps(db, id)
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.step == step)
}

async fn locked_by(db: &PgPool, id: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT locked_by FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_one(db)
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Mutual exclusion and crash recovery
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_worker_pools_run_each_job_exactly_once() {
    let TestDb {
        pool: db,
        url,
        guard: _guard,
    } = setup().await;
    const JOBS: usize = 90;
    let mut ids = Vec::new();
    for _ in 0..JOBS {
        ids.push(
            tj::enqueue(
                &db,
                vec![StepSpec::new("work").sleep_ms(10), StepSpec::new("more")],
                3,
            )
            .await,
        );
    }
    let pools = futures::future::join_all(
        ["w1", "w2", "w3"].map(|w| tj::start_pool(&url, tj::worker_config(w, 3))),
    )
    .await;
    eventually(DEADLINE, "every job to succeed", || async {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'succeeded'")
            .fetch_one(&db)
            .await
            .unwrap();
        (done == JOBS as i64).then_some(())
    })
    .await;
    for pool in pools {
        pool.stop().await;
    }

    // Each job: one claim, one run of the handler, one execution of each step.
    let attempts: Vec<i32> = sqlx::query_scalar("SELECT attempts FROM jobs")
        .fetch_all(&db)
        .await
        .unwrap();
    assert!(
        attempts.iter().all(|&a| a == 1),
        "every job claimed once: {attempts:?}"
    );
    let runs_per_job: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT job_id, count(*) FROM test_job_runs GROUP BY job_id")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(runs_per_job.len(), JOBS);
    assert!(
        runs_per_job.iter().all(|(_, n)| *n == 1),
        "a job ran more than once: {runs_per_job:?}"
    );
    let step_runs: i64 = sqlx::query_scalar("SELECT count(*) FROM test_job_step_runs")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(step_runs, 2 * JOBS as i64);

    // No two runs of the same job ever overlapped in time (open-ended runs count as endless).
    let overlaps: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM test_job_runs a JOIN test_job_runs b ON a.job_id = b.job_id AND a.id < b.id
          WHERE tstzrange(a.started_at, coalesce(a.ended_at, 'infinity'))
             && tstzrange(b.started_at, coalesce(b.ended_at, 'infinity'))",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(overlaps, 0);
    let unfinished: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM test_job_runs WHERE ended_at IS NULL OR outcome <> 'ok'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(unfinished, 0);

    // The pools really competed for the same queue.
    let workers: i64 = sqlx::query_scalar("SELECT count(DISTINCT worker) FROM test_job_runs")
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(workers >= 2, "only {workers} pool(s) ran jobs");
}

const CHILD_TEST: &str = "job_queue::sigkill_child_worker_process";
const CHILD_DATABASE_ENV: &str = "BP_TEST_CHILD_DATABASE_URL";
const CHILD_WORKER: &str = "child";

/// Not a test on its own: the worker process that `job_of_a_sigkilled_worker_is_rescued`
/// starts (this same test binary, run with `--exact --ignored`) and then kills with SIGKILL.
#[tokio::test]
#[ignore = "child process of job_of_a_sigkilled_worker_is_rescued; does nothing when run directly"]
async fn sigkill_child_worker_process() {
    let Ok(url) = std::env::var(CHILD_DATABASE_ENV) else {
        eprintln!(
            "{CHILD_DATABASE_ENV} is not set: this test only runs as a child of another test"
        );
        return;
    };
    let mut config = tj::worker_config(CHILD_WORKER, 1);
    config.lease = Duration::from_secs(2);
    let pool = tj::start_pool(&url, config).await;
    eprintln!("child worker running");
    // The parent kills this process; the cap only matters if the parent dies first.
    tokio::time::sleep(Duration::from_secs(120)).await;
    pool.stop().await;
}

#[tokio::test]
async fn job_of_a_sigkilled_worker_is_rescued() {
    use std::os::unix::process::ExitStatusExt;

    let TestDb {
        pool: db,
        url,
        guard: _guard,
    } = setup().await;
    let id = tj::enqueue(
        &db,
        vec![
            StepSpec::new("prepare"),
            StepSpec::new("hold").wait_for("release"),
        ],
        5,
    )
    .await;

    let log = tempfile::NamedTempFile::new().unwrap();
    let out = log.reopen().unwrap();
    let err = out.try_clone().unwrap();
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([CHILD_TEST, "--exact", "--ignored", "--nocapture"])
        .env(CHILD_DATABASE_ENV, &url)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the child worker");
    let child_log = || std::fs::read_to_string(log.path()).unwrap_or_default();

    // Wait until the child is inside step "hold" (it finished "prepare" and recorded it).
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    while tj::step_executions(&db, id, "hold").await == 0 {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "child worker exited early ({status}); its output:\n{}",
                child_log()
            );
        }
        assert!(
            tokio::time::Instant::now() < until,
            "child never started the job; its output:\n{}",
            child_log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let running = tj::job(&db, id).await;
    assert_eq!((running.state.as_str(), running.attempts), ("running", 1));
    assert_eq!(locked_by(&db, id).await.as_deref(), Some(CHILD_WORKER));

    let pid = nix::unistd::Pid::from_raw(child.id().expect("child pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("SIGKILL the child");
    let status = child.wait().await.unwrap();
    assert_eq!(
        status.signal(),
        Some(nix::sys::signal::Signal::SIGKILL as i32),
        "child died of SIGKILL"
    );

    // The dead worker still holds the lease: nothing released it.
    assert_eq!(tj::job(&db, id).await.state, "running");

    tj::set_flag(&db, "release").await;
    let mut config = tj::worker_config("rescuer", 1);
    config.lease = Duration::from_secs(2);
    let rescuer = tj::start_pool(&url, config).await;
    let done = tj::wait_for_job(&db, id, DEADLINE, "the rescued job to end", |j| {
        j.state().is_terminal()
    })
    .await;
    rescuer.stop().await;

    assert_eq!(done.state, "succeeded", "last error: {:?}", done.last_error);
    assert_eq!(done.attempts, 2);
    // It resumed: "prepare" ran only in the child, "hold" ran again in the rescuer.
    assert_eq!(tj::step_executions(&db, id, "prepare").await, 1);
    assert_eq!(tj::step_executions(&db, id, "hold").await, 2);
    assert_eq!(step_row(&db, id, "prepare").await.unwrap().attempts, 1);
    assert_eq!(step_row(&db, id, "hold").await.unwrap().attempts, 2);
    let runs = tj::runs(&db, id).await;
    assert_eq!(runs.len(), 2);
    assert_eq!(
        (runs[0].worker.as_str(), runs[0].ended_at),
        (CHILD_WORKER, None)
    );
    assert_eq!(
        (
            runs[1].worker.as_str(),
            runs[1].attempt,
            runs[1].outcome.as_deref()
        ),
        ("rescuer", 2, Some("ok"))
    );
}

// ---------------------------------------------------------------------------------------------
// Fencing
// ---------------------------------------------------------------------------------------------

type JobSnapshot = (
    String,
    i32,
    Option<Uuid>,
    Option<DateTime<Utc>>,
    Option<String>,
    Option<String>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
);

async fn snapshot(db: &PgPool, id: Uuid) -> JobSnapshot {
    sqlx::query_as(
        "SELECT state, attempts, lease_token, lease_expires_at, locked_by, last_error, run_at, finished_at
           FROM jobs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(db)
    .await
    .unwrap()
}

#[tokio::test]
async fn queue_rejects_every_late_write_of_a_fenced_worker() {
    let TestDb {
        pool: db,
        guard: _guard,
        ..
    } = setup().await;
    let repo = tj::insert_repository(&db, "fenced").await;
    let id = tj::enqueue_for(&db, vec![StepSpec::new("a")], 5, Some((repo, "fenced")))
        .await
        .unwrap();

    // Worker A claims with a short lease and then stalls past it.
    let a = queue::claim(&db, &[tj::KIND], "worker-a", Duration::from_millis(200))
        .await
        .unwrap()
        .expect("A claims");
    let token_a = a.lease_token.unwrap();
    assert_eq!((a.id, a.attempts), (id, 1));
    eventually(
        DEADLINE,
        "the rescuer to re-queue A's expired job",
        || async {
            queue::rescue_expired(&db)
                .await
                .unwrap()
                .contains(&id)
                .then_some(())
        },
    )
    .await;
    assert_eq!(tj::job(&db, id).await.state, "queued");

    // Worker B takes it over.
    let lease = Duration::from_secs(30);
    let b = queue::claim(&db, &[tj::KIND], "worker-b", lease)
        .await
        .unwrap()
        .expect("B claims");
    let token_b = b.lease_token.unwrap();
    assert_eq!((b.id, b.attempts), (id, 2));
    assert_ne!(token_a, token_b);
    let before = snapshot(&db, id).await;

    // Every write A attempts with its old token is refused and changes nothing.
    assert!(
        !queue::heartbeat(&db, id, token_a, lease).await.unwrap(),
        "heartbeat"
    );
    assert!(
        !queue::finish(&db, id, token_a, Finish::Succeeded)
            .await
            .unwrap(),
        "finish succeeded"
    );
    assert!(
        !queue::finish(&db, id, token_a, Finish::Failed { error: "late" })
            .await
            .unwrap(),
        "finish failed"
    );
    let retry = Finish::Retry {
        error: "late",
        delay: Duration::from_secs(60),
    };
    assert!(
        !queue::finish(&db, id, token_a, retry).await.unwrap(),
        "finish retry"
    );
    assert!(
        !queue::finish(&db, id, token_a, Finish::Cancelled)
            .await
            .unwrap(),
        "finish cancelled"
    );
    assert!(!queue::release(&db, id, token_a).await.unwrap(), "release");
    let mut conn = db.acquire().await.unwrap();
    assert_eq!(
        queue::hold_lease(&mut conn, id, token_a).await.unwrap(),
        None,
        "hold_lease"
    );
    assert_eq!(
        queue::hold_lease(&mut conn, id, token_b).await.unwrap(),
        Some(false)
    );
    drop(conn);
    assert_eq!(snapshot(&db, id).await, before);
    assert_eq!(before.4.as_deref(), Some("worker-b"));
    assert_eq!(
        tj::repository_state(&db, repo).await,
        ("provisioning".to_owned(), None)
    );

    // B still owns the job and finishes it; A's token cannot touch the finished job either.
    assert!(queue::heartbeat(&db, id, token_b, lease).await.unwrap());
    assert!(
        queue::finish(&db, id, token_b, Finish::Succeeded)
            .await
            .unwrap()
    );
    assert!(
        !queue::finish(&db, id, token_a, Finish::Failed { error: "late" })
            .await
            .unwrap()
    );
    assert!(
        !queue::finish(&db, id, token_b, Finish::Failed { error: "twice" })
            .await
            .unwrap()
    );
    let done = tj::job(&db, id).await;
    assert_eq!(
        (done.state.as_str(), done.attempts, done.last_error),
        ("succeeded", 2, None)
    );
    assert_eq!(tj::repository_state(&db, repo).await.0, "ready");
}

#[tokio::test]
async fn a_step_that_ends_after_its_worker_lost_the_lease_records_nothing() {
    let TestDb {
        pool: db,
        url,
        guard: _guard,
    } = setup().await;
    let id = tj::enqueue(
        &db,
        vec![
            StepSpec::new("first"),
            StepSpec::new("slow").wait_for("go"),
            StepSpec::new("last"),
        ],
        5,
    )
    .await;
    // One slot, so A cannot claim the job back; a long lease, so A's heartbeat (every 20 s)
    // does not notice the loss during the test: A learns of it only at its next fenced write.
    let mut config = tj::worker_config("worker-a", 1);
    config.lease = Duration::from_secs(60);
    let a = tj::start_pool(&url, config).await;
    tj::wait_for_step_started(&db, id, "slow", 1, DEADLINE).await;

    // A stalls as if paused for longer than its lease: the lease expires, the rescuer re-queues
    // the job and worker B claims it.
    sqlx::query("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(id)
        .execute(&db)
        .await
        .unwrap();
    assert_eq!(queue::rescue_expired(&db).await.unwrap(), vec![id]);
    let b = queue::claim(&db, &[tj::KIND], "worker-b", Duration::from_secs(60))
        .await
        .unwrap()
        .expect("B claims");
    let token_b = b.lease_token.unwrap();
    let before = snapshot(&db, id).await;

    // A's step now completes; its JobContext tries to record it.
    tj::set_flag(&db, "go").await;
    let run_a = eventually(DEADLINE, "A's run to end", || async {
        tj::runs(&db, id)
            .await
            .into_iter()
            .find(|r| r.worker == "worker-a" && r.ended_at.is_some())
    })
    .await;
    assert_eq!(run_a.outcome.as_deref(), Some("lease lost"));
    assert_eq!(
        snapshot(&db, id).await,
        before,
        "A's late write changed the job"
    );
    let slow = step_row(&db, id, "slow").await.unwrap();
    assert_eq!(
        (slow.state.as_str(), slow.output.is_none()),
        ("running", true),
        "A's step result was recorded"
    );
    assert!(
        step_row(&db, id, "last").await.is_none(),
        "A went on to the next step"
    );
    let audited: Vec<String> =
        sqlx::query_scalar("SELECT step FROM audit_events WHERE job_id = $1 ORDER BY id")
            .bind(id)
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(audited, vec!["first"]);

    // B gives the job back; A (now idle) completes it, resuming after "first".
    assert!(queue::release(&db, id, token_b).await.unwrap());
    let done = tj::wait_for_state(&db, id, "succeeded", DEADLINE).await;
    a.stop().await;
    assert_eq!(done.attempts, 2);
    assert_eq!(tj::step_executions(&db, id, "first").await, 1);
    assert_eq!(tj::step_executions(&db, id, "slow").await, 2);
    assert_eq!(tj::step_executions(&db, id, "last").await, 1);
}

// ---------------------------------------------------------------------------------------------
// Retries, permanent errors, cancel, retry
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn retryable_failures_back_off_then_fail_after_max_attempts() {
    let TestDb {
        pool: db,
        url,
        guard: _guard,
    } = setup().await;
    let repo = tj::insert_repository(&db, "flaky").await;
    let id = tj::enqueue_for(
        &db,
        vec![StepSpec::new("flaky").fail_retryable(100)],
        3,
        Some((repo, "flaky")),
    )
    .await
    .unwrap();
    let base = Duration::from_millis(800);
    let mut config = tj::worker_config("w", 1);
    config.retry_base = base;
    let pool = tj::start_pool(&url, config).await;

    for attempt in 1..=2 {
        // The job between attempts, read with its step in one statement.
        let (run_at, failed_at, last_error): (DateTime<Utc>, DateTime<Utc>, Option<String>) =
            eventually(DEADLINE, &format!("attempt {attempt} to fail and be re-queued"), || async {
                sqlx::query_as(
                    "SELECT j.run_at, s.finished_at, j.last_error FROM jobs j
                       JOIN job_steps s ON s.job_id = j.id AND s.step = 'flaky'
                      WHERE j.id = $1 AND j.state = 'queued' AND j.attempts = $2 AND s.state = 'failed'",
                )
                .bind(id)
                .bind(attempt)
                .fetch_optional(&db)
                .await
                .unwrap()
            })
            .await;
        let delay = (run_at - failed_at)
            .to_std()
            .expect("run_at after the failure");
        let ceiling = backoff::ceiling(base, attempt);
        assert!(
            delay >= ceiling / 2 && delay <= ceiling + Duration::from_millis(500),
            "attempt {attempt}: next run {delay:?} after the failure, outside [{:?}, {ceiling:?}]",
            ceiling / 2
        );
        assert!(
            last_error
                .unwrap()
                .contains(&format!("fails retryably (execution {attempt})"))
        );
        assert_eq!(tj::repository_state(&db, repo).await.0, "provisioning");
    }

    let failed = tj::wait_for_job(&db, id, DEADLINE, "the job to end", |j| {
        j.state().is_terminal()
    })
    .await;
    pool.stop().await;
    assert_eq!((failed.state.as_str(), failed.attempts), ("failed", 3));
    assert!(
        failed
            .last_error
            .as_deref()
            .unwrap()
            .contains("fails retryably (execution 3)"),
        "{:?}",
        failed.last_error
    );
    assert!(failed.finished_at.is_some());
    assert_eq!(tj::step_executions(&db, id, "flaky").await, 3);
    let step = step_row(&db, id, "flaky").await.unwrap();
    assert_eq!((step.state.as_str(), step.attempts), ("failed", 3));
    let (state, error) = tj::repository_state(&db, repo).await;
    assert_eq!(state, "failed");
    assert!(error.unwrap().contains("fails retryably"));
}

#[tokio::test]
async fn permanent_error_fails_the_job_at_once() {
    let TestDb {
        pool: db,
        url,
        guard: _guard,
    } = setup().await;
    let repo = tj::insert_repository(&db, "doomed").await;
    let steps = vec![
        StepSpec::new("ok"),
        StepSpec::new("doomed").fail_permanent(1),
        StepSpec::new("after"),
    ];
    let id = tj::enqueue_for(&db, steps, 5, Some((repo, "doomed")))
        .await
        .unwrap();
    let pool = tj::start_pool(&url, tj::worker_config("w", 1)).await;
    let failed = tj::wait_for_job(&db, id, DEADLINE, "the job to end", |j| {
        j.state().is_terminal()
    })
    .await;
    pool.stop().await;

    assert_eq!((failed.state.as_str(), failed.attempts), ("failed", 1));
    assert!(
        failed
            .last_error
            .as_deref()
            .unwrap()
            .contains("fails permanently"),
        "{:?}",
        failed.last_error
    );
    assert_eq!(tj::step_executions(&db, id, "doomed").await, 1);
    assert_eq!(tj::step_executions(&db, id, "after").await, 0);
    assert_eq!(step_row(&db, id, "ok").await.unwrap().state, "succeeded");
    assert_eq!(step_row(&db, id, "doomed").await.unwrap().state, "failed");
    assert!(step_row(&db, id, "after").await.is_none());
    let (state, error) = tj::repository_state(&db, repo).await;
    assert_eq!(state, "failed");
    assert!(error.unwrap().contains("fails permanently"));
}

#[tokio::test]
async fn cancel_stops_a_running_job_at_the_next_step_boundary() {
    let TestDb {
        pool: db,
        url,
        guard: _guard,
    } = setup().await;
    let repo = tj::insert_repository(&db, "cancelled").await;
    let steps = vec![
        StepSpec::new("current").wait_for("finish-current"),
        StepSpec::new("next"),
    ];
    let id = tj::enqueue_for(&db, steps, 5, Some((repo, "cancelled")))
        .await
        .unwrap();
    let pool = tj::start_pool(&url, tj::worker_config("w", 1)).await;
    tj::wait_for_step_started(&db, id, "current", 1, DEADLINE).await;

    assert_eq!(
        queue::cancel(&db, id).await.unwrap(),
        CancelOutcome::Requested
    );
    let job = tj::job(&db, id).await;
    assert_eq!(
        (job.state.as_str(), job.cancel_requested),
        ("running", true),
        "the step in flight is not interrupted"
    );

    tj::set_flag(&db, "finish-current").await;
    let cancelled = tj::wait_for_job(&db, id, DEADLINE, "the job to end", |j| {
        j.state().is_terminal()
    })
    .await;
    pool.stop().await;
    assert_eq!(
        (cancelled.state.as_str(), cancelled.attempts),
        ("cancelled", 1)
    );
    assert!(cancelled.finished_at.is_some());
    // The step in flight ran to its end and its result was kept; the next one never started.
    let current = step_row(&db, id, "current").await.unwrap();
    assert_eq!(current.state, "succeeded", "step in flight: {current:?}");
    assert!(current.output.is_some());
    assert_eq!(tj::step_executions(&db, id, "next").await, 0);
    assert!(step_row(&db, id, "next").await.is_none());
    assert_eq!(tj::repository_state(&db, repo).await.0, "cancelled");
    assert_eq!(
        queue::cancel(&db, id).await.unwrap(),
        CancelOutcome::AlreadyFinished(JobState::Cancelled)
    );
}

#[tokio::test]
async fn cancel_of_a_queued_job_takes_effect_at_once() {
    let TestDb {
        pool: db,
        url,
        guard: _guard,
    } = setup().await;
    let id = tj::enqueue(&db, vec![StepSpec::new("never")], 5).await;
    assert_eq!(
        queue::cancel(&db, id).await.unwrap(),
        CancelOutcome::Cancelled
    );
    let job = tj::job(&db, id).await;
    assert_eq!((job.state.as_str(), job.attempts), ("cancelled", 0));
    assert!(job.finished_at.is_some());
    assert_eq!(
        queue::cancel(&db, Uuid::new_v4()).await.unwrap(),
        CancelOutcome::NotFound
    );

    // A worker that is demonstrably running never picks the cancelled job up.
    let pool = tj::start_pool(&url, tj::worker_config("w", 2)).await;
    let other = tj::enqueue(&db, vec![StepSpec::new("x")], 5).await;
    tj::wait_for_state(&db, other, "succeeded", DEADLINE).await;
    pool.stop().await;
    assert!(tj::runs(&db, id).await.is_empty());
    assert_eq!(tj::job(&db, id).await.state, "cancelled");
}

#[tokio::test]
async fn retry_of_a_failed_job_resumes_after_its_completed_steps() {
    let TestDb {
        pool: db,
        url,
        guard: _guard,
    } = setup().await;
    let repo = tj::insert_repository(&db, "resumed").await;
    let steps = vec![
        StepSpec::new("a"),
        StepSpec::new("b").fail_permanent(1),
        StepSpec::new("c"),
    ];
    let id = tj::enqueue_for(&db, steps, 5, Some((repo, "resumed")))
        .await
        .unwrap();
    let pool = tj::start_pool(&url, tj::worker_config("w", 1)).await;
    let failed = tj::wait_for_job(&db, id, DEADLINE, "the job to end", |j| {
        j.state().is_terminal()
    })
    .await;
    pool.stop().await;
    assert_eq!((failed.state.as_str(), failed.attempts), ("failed", 1));
    let a_output = step_row(&db, id, "a")
        .await
        .unwrap()
        .output
        .expect("a's output is stored");
    assert_eq!(queue::retry(&db, id).await.unwrap(), RetryOutcome::Queued);

    let queued = tj::job(&db, id).await;
    assert_eq!(
        (queued.state.as_str(), queued.attempts, queued.last_error),
        ("queued", 0, None)
    );
    assert_eq!(step_row(&db, id, "b").await.unwrap().state, "pending");
    assert_eq!(tj::repository_state(&db, repo).await.0, "pending");

    let pool = tj::start_pool(&url, tj::worker_config("w2", 1)).await;
    let done = tj::wait_for_job(&db, id, DEADLINE, "the retried job to end", |j| {
        j.state().is_terminal()
    })
    .await;
    pool.stop().await;
    assert_eq!(
        (done.state.as_str(), done.attempts),
        ("succeeded", 1),
        "last error: {:?}",
        done.last_error
    );
    assert_eq!(
        tj::step_executions(&db, id, "a").await,
        1,
        "a completed step ran again"
    );
    assert_eq!(tj::step_executions(&db, id, "b").await, 2);
    assert_eq!(tj::step_executions(&db, id, "c").await, 1);
    // The second run got a's output back from job_steps, unchanged.
    let runs = tj::runs(&db, id).await;
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[1].outputs.as_ref().unwrap()["a"], a_output);
    assert_eq!(
        step_row(&db, id, "a").await.unwrap().output.unwrap(),
        a_output
    );
    assert_eq!(step_row(&db, id, "a").await.unwrap().attempts, 1);
    assert_eq!(
        tj::repository_state(&db, repo).await,
        ("ready".to_owned(), None)
    );

    assert_eq!(
        queue::retry(&db, id).await.unwrap(),
        RetryOutcome::NotRetryable(JobState::Succeeded)
    );
    assert_eq!(
        queue::retry(&db, Uuid::new_v4()).await.unwrap(),
        RetryOutcome::NotFound
    );
}

#[tokio::test]
async fn retry_is_refused_while_the_repository_has_another_active_job() {
    let TestDb {
        pool: db,
        url,
        guard: _guard,
    } = setup().await;
    let repo = tj::insert_repository(&db, "busy").await;
    let first = tj::enqueue_for(&db, vec![StepSpec::new("x")], 5, Some((repo, "busy")))
        .await
        .unwrap();
    assert_eq!(
        queue::cancel(&db, first).await.unwrap(),
        CancelOutcome::Cancelled
    );
    let second = tj::enqueue_for(
        &db,
        vec![StepSpec::new("hold").wait_for("done")],
        5,
        Some((repo, "busy")),
    )
    .await
    .unwrap();
    assert_eq!(
        queue::retry(&db, first).await.unwrap(),
        RetryOutcome::Conflict
    );
    assert_eq!(tj::job(&db, first).await.state, "cancelled");

    tj::set_flag(&db, "done").await;
    let pool = tj::start_pool(&url, tj::worker_config("w", 1)).await;
    tj::wait_for_state(&db, second, "succeeded", DEADLINE).await;
    assert_eq!(
        queue::retry(&db, first).await.unwrap(),
        RetryOutcome::Queued
    );
    tj::wait_for_state(&db, first, "succeeded", DEADLINE).await;
    pool.stop().await;
}

// ---------------------------------------------------------------------------------------------
// One active job per repository
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_enqueues_for_one_repository_leave_one_active_job() {
    let TestDb {
        pool: db,
        url,
        guard: _guard,
    } = setup().await;
    let repo = tj::insert_repository(&db, "contended").await;
    const N: usize = 50;
    let start = Arc::new(tokio::sync::Barrier::new(N));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let (db, start) = (db.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                let step = StepSpec::new(&format!("from-{i}"));
                tj::enqueue_for(&db, vec![step], 5, Some((repo, "contended"))).await
            })
        })
        .collect();
    let mut accepted = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(id) => accepted.push(id),
            Err(e) => assert_eq!(
                backup_provisioner::db::violated_constraint(&e),
                Some("jobs_one_active_per_repository"),
                "unexpected error: {e}"
            ),
        }
    }
    assert_eq!(accepted.len(), 1, "exactly one enqueue wins");
    let jobs: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, state FROM jobs WHERE repository_id = $1")
            .bind(repo)
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(jobs, vec![(accepted[0], "queued".to_owned())]);

    // The constraint covers active jobs only: once the job ends, a new one may be queued.
    let pool = tj::start_pool(&url, tj::worker_config("w", 1)).await;
    tj::wait_for_state(&db, accepted[0], "succeeded", DEADLINE).await;
    pool.stop().await;
    let next = tj::enqueue_for(
        &db,
        vec![StepSpec::new("again")],
        5,
        Some((repo, "contended")),
    )
    .await;
    assert!(next.is_ok(), "{next:?}");
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn shutdown_lets_a_short_in_flight_job_finish_and_claims_nothing_more() {
    let TestDb {
        pool: db,
        url,
        guard: _guard,
    } = setup().await;
    let short = tj::enqueue(&db, vec![StepSpec::new("short").sleep_ms(500)], 5).await;
    let mut config = tj::worker_config("w", 1);
    config.shutdown_grace = Duration::from_secs(10);
    let pool = tj::start_pool(&url, config).await;
    tj::wait_for_step_started(&db, short, "short", 1, DEADLINE).await;
    // Queued while the only slot is busy: a draining pool must not take it.
    let waiting = tj::enqueue(&db, vec![StepSpec::new("later")], 5).await;

    let took = pool.stop_within(Duration::from_secs(20)).await;
    assert!(
        took < Duration::from_secs(10),
        "drain took {took:?}, longer than the grace"
    );
    let done = tj::job(&db, short).await;
    assert_eq!((done.state.as_str(), done.attempts), ("succeeded", 1));
    assert_eq!(tj::runs(&db, short).await[0].outcome.as_deref(), Some("ok"));
    let left = tj::job(&db, waiting).await;
    assert_eq!((left.state.as_str(), left.attempts), ("queued", 0));
    assert!(tj::runs(&db, waiting).await.is_empty());
}

#[tokio::test]
async fn shutdown_releases_the_lease_of_a_job_past_the_grace() {
    let TestDb {
        pool: db,
        url,
        guard: _guard,
    } = setup().await;
    let id = tj::enqueue(
        &db,
        vec![
            StepSpec::new("first"),
            StepSpec::new("long").wait_for("resume"),
        ],
        5,
    )
    .await;
    let grace = Duration::from_millis(500);
    let mut config = tj::worker_config("leaving", 1);
    config.shutdown_grace = grace;
    let pool = tj::start_pool(&url, config).await;
    tj::wait_for_step_started(&db, id, "long", 1, DEADLINE).await;

    let took = pool.stop_within(Duration::from_secs(20)).await;
    assert!(took >= grace, "stopped after {took:?}, before the grace");
    // The grace, then at most the release deadline (5 s) and some slack.
    assert!(
        took < grace + Duration::from_secs(7),
        "stopped after {took:?}"
    );
    let released = tj::job(&db, id).await;
    assert_eq!(
        (released.state.as_str(), released.attempts),
        ("queued", 0),
        "released, attempt not counted"
    );
    assert_eq!(
        (released.lease_token, released.lease_expires_at),
        (None, None)
    );
    assert_eq!(locked_by(&db, id).await, None);
    assert!(released.run_at <= Utc::now());

    tj::set_flag(&db, "resume").await;
    let next = tj::start_pool(&url, tj::worker_config("staying", 1)).await;
    let done = tj::wait_for_state(&db, id, "succeeded", DEADLINE).await;
    next.stop().await;
    assert_eq!(done.attempts, 1);
    assert_eq!(tj::step_executions(&db, id, "first").await, 1);
    assert_eq!(tj::step_executions(&db, id, "long").await, 2);
    let runs = tj::runs(&db, id).await;
    assert_eq!(
        runs.last()
            .map(|r| (r.worker.as_str(), r.outcome.as_deref())),
        Some(("staying", Some("ok")))
    );
}

// ---------------------------------------------------------------------------------------------
// Wake-up and audit
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn notify_wakes_an_idle_worker_long_before_the_next_poll() {
    let TestDb {
        pool: db,
        url,
        guard: _guard,
    } = setup().await;
    let mut config = tj::worker_config("w", 2);
    config.poll_interval = Duration::from_secs(60);
    let pool = tj::start_pool(&url, config).await;
    // A first job proves the pool is up and idle in its wait loop afterwards.
    let first = tj::enqueue(&db, vec![StepSpec::new("x")], 5).await;
    tj::wait_for_state(&db, first, "succeeded", DEADLINE).await;

    let enqueued = tokio::time::Instant::now();
    let second = tj::enqueue(&db, vec![StepSpec::new("x")], 5).await;
    tj::wait_for_state(&db, second, "succeeded", Duration::from_secs(5)).await;
    let took = enqueued.elapsed();
    pool.stop().await;
    assert!(
        took < Duration::from_secs(5),
        "took {took:?} with a 60 s poll interval"
    );
}

#[tokio::test]
async fn audit_log_has_exactly_one_entry_per_step_attempt() {
    let TestDb {
        pool: db,
        url,
        guard: _guard,
    } = setup().await;
    let repo = tj::insert_repository(&db, "audited").await;
    let steps = vec![
        StepSpec::new("a"),
        StepSpec::new("b").fail_retryable(2),
        StepSpec::new("c"),
    ];
    let id = tj::enqueue_for(&db, steps, 5, Some((repo, "audited")))
        .await
        .unwrap();
    let pool = tj::start_pool(&url, tj::worker_config("w", 1)).await;
    let done = tj::wait_for_job(&db, id, DEADLINE, "the job to end", |j| {
        j.state().is_terminal()
    })
    .await;
    pool.stop().await;
    assert_eq!(
        (done.state.as_str(), done.attempts),
        ("succeeded", 3),
        "last error: {:?}",
        done.last_error
    );

    type Row = (
        Option<String>,
        Option<i32>,
        String,
        String,
        Option<String>,
        String,
        serde_json::Value,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT step, attempt, action, outcome, repository, actor, detail
           FROM audit_events WHERE job_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(&db)
    .await
    .unwrap();
    let got: Vec<(&str, i32, &str)> = rows
        .iter()
        .map(|r| (r.0.as_deref().unwrap(), r.1.unwrap(), r.3.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("a", 1, "created"),
            ("b", 1, "failed"),
            ("b", 2, "failed"),
            ("b", 3, "created"),
            ("c", 1, "created")
        ]
    );
    for (step, _, action, _, repository, actor, detail) in &rows {
        assert_eq!(action, &format!("test.{}", step.as_deref().unwrap()));
        assert_eq!(repository.as_deref(), Some("audited"));
        assert_eq!(actor, "test@jobs");
        assert!(detail.is_object());
    }
    assert_eq!(rows[1].6["retryable"], true);
    let step_attempts: i64 =
        sqlx::query_scalar("SELECT sum(attempts)::bigint FROM job_steps WHERE job_id = $1")
            .bind(id)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(step_attempts, rows.len() as i64);
}
