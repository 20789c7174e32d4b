//! The Postgres job queue against a real database, real `WorkerPool`s and, for the crash test,
//! a real child process killed with SIGKILL. Jobs are of the test-only kind in
//! `support::test_jobs`, whose payload says what each step does.

use std::time::Duration;

use backup_provisioner::jobs::queue;
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::app::{TestDb, migrated_db};
use crate::support::test_jobs as tj;

mod begins;
mod exclusion;
mod failures;
mod fencing;
mod lifecycle;
mod turnover;

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
