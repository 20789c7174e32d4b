//! Retries, permanent errors, cancel and retry of a job.

use std::time::Duration;

use backup_provisioner::jobs::backoff;
use backup_provisioner::jobs::queue::{self, CancelOutcome, JobState, RetryOutcome};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::support::app::{TestDb, eventually};
use crate::support::test_jobs::{self as tj, StepSpec};

use super::{DEADLINE, setup, step_row};

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
    // Once the newer job ended, the older one stays superseded: it would run stale options.
    assert_eq!(
        queue::retry(&db, first).await.unwrap(),
        RetryOutcome::Superseded { newer: second }
    );
    assert_eq!(tj::job(&db, first).await.state, "cancelled");
    pool.stop().await;
}
