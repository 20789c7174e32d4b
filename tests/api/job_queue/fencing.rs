//! Fencing: a worker that lost its lease can no longer write.

use std::time::Duration;

use backup_provisioner::jobs::queue::{self, Finish};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::app::{TestDb, eventually};
use crate::support::test_jobs::{self as tj, StepSpec};

use super::{DEADLINE, setup, step_row};

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
