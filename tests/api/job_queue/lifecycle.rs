//! Graceful shutdown, wake-up by NOTIFY, and the audit entries of step attempts.

use std::time::Duration;

use chrono::Utc;

use crate::support::app::TestDb;
use crate::support::test_jobs::{self as tj, StepSpec};

use super::{DEADLINE, locked_by, setup};

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
