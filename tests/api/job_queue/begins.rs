//! Step begins that come together are one statement (`jobs::begins`): the concurrent steps of a
//! job are marked running by one transaction, each with its own attempt, and a retry's batch
//! mixes steps that succeeded earlier (not run again) with steps that begin again.

use sqlx::PgPool;
use uuid::Uuid;

use crate::support::test_jobs::{self as tj, StepSpec};

use super::{DEADLINE, setup, step_row};

/// How many transactions wrote the job's step rows as they are now (`xmin`: the writer).
async fn step_writers(db: &PgPool, id: Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT count(DISTINCT xmin::text) FROM job_steps WHERE job_id = $1 AND state = 'running'",
    )
    .bind(id)
    .fetch_one(db)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_steps_begin_in_one_statement_and_a_retry_begins_only_what_failed() {
    let test_db = setup().await;
    let db = &test_db.pool;
    let steps = vec![
        StepSpec::new("a").wait_for("go"),
        StepSpec::new("b").wait_for("go").fail_retryable(1),
        StepSpec::new("c").wait_for("go"),
    ];
    let id = tj::enqueue_concurrent(db, steps, 3).await;
    let pool = tj::start_pool(&test_db.url, tj::worker_config("begins", 1)).await;

    for step in ["a", "b", "c"] {
        tj::wait_for_step_started(db, id, step, 1, DEADLINE).await;
    }
    assert_eq!(
        step_writers(db, id).await,
        1,
        "the three steps were marked running by one transaction"
    );
    for step in ["a", "b", "c"] {
        let row = step_row(db, id, step).await.expect("step row");
        assert_eq!((row.state.as_str(), row.attempts), ("running", 1), "{step}");
    }

    // b fails once: the retry's begins find a and c succeeded (their bodies do not run again)
    // and begin b's second attempt.
    tj::set_flag(db, "go").await;
    let job = tj::wait_for_job(db, id, DEADLINE, "the job to end", |j| {
        j.finished_at.is_some()
    })
    .await;
    assert_eq!((job.state.as_str(), job.attempts), ("succeeded", 2));
    let attempts: Vec<(i32, i64)> = {
        let mut out = Vec::new();
        for step in ["a", "b", "c"] {
            let row = step_row(db, id, step).await.expect("step row");
            assert_eq!(row.state, "succeeded", "{step}");
            out.push((row.attempts, tj::step_executions(db, id, step).await));
        }
        out
    };
    assert_eq!(
        attempts,
        vec![(1, 1), (2, 2), (1, 1)],
        "(attempts, executions) of a, b and c"
    );
    pool.stop().await;
}
