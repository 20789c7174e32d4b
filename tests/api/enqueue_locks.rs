//! Check-then-enqueue: `POST .../rotate-key` and `POST .../verify` read the repository, then
//! queue their job in a transaction that locks the repository's row and checks its state again.
//! Here the row is locked by another transaction (as a deprovisioning or its job's end would)
//! that changes the state after the request read it: the request must wait for that lock and
//! refuse, not queue a job for a repository that stopped being ready or was deleted.

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;

use crate::http_common::{REPOSITORIES, create_repository, job_id};
use crate::support::app::{TestApp, eventually, spawn_app};

/// A repository `name` in state `ready` (no worker here: its provisioning is cancelled and the
/// state set as if it had succeeded).
async fn ready_repository(app: &TestApp, name: &str) {
    let body = json!({"name": name, "namespace": "zitadel"});
    let created = create_repository(app, &app.operator(), &body).await;
    let cancel = format!("/v1/jobs/{}/cancel", job_id(&created));
    let response = app.post_json(&cancel, &app.operator(), &json!({})).await;
    assert_eq!(response.status(), 202);
    sqlx::query("UPDATE backup_repositories SET state = 'ready' WHERE name = $1")
        .bind(name)
        .execute(&app.db)
        .await
        .unwrap();
}

/// Whether a backend of this database waits for a row lock.
async fn someone_waits_for_a_lock(db: &PgPool) -> bool {
    sqlx::query_scalar(
        "SELECT count(*) > 0 FROM pg_stat_activity
          WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(db)
    .await
    .unwrap()
}

/// Posts `path` while another transaction holds the repository's row and sets its state to
/// `state`; commits once the request waits for the row (or answered without waiting).
/// Returns the answer's status.
async fn post_while_state_changes(app: &TestApp, name: &str, path: &str, state: &str) -> u16 {
    let mut tx = app.db.begin().await.unwrap();
    sqlx::query("UPDATE backup_repositories SET state = $2 WHERE name = $1 AND state = 'ready'")
        .bind(name)
        .bind(state)
        .execute(&mut *tx)
        .await
        .unwrap();
    let (client, url, token) = (app.client.clone(), app.url(path), app.operator());
    let request = tokio::spawn(async move {
        let sent = client.post(url).bearer_auth(token).json(&json!({}));
        sent.send().await.expect("request")
    });
    eventually(
        Duration::from_secs(30),
        "the request to wait or answer",
        || {
            let (db, finished) = (app.db.clone(), request.is_finished());
            async move { (finished || someone_waits_for_a_lock(&db).await).then_some(()) }
        },
    )
    .await;
    tx.commit().await.unwrap();
    request.await.unwrap().status().as_u16()
}

async fn jobs_of(db: &PgPool, kind: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = $1")
        .bind(kind)
        .fetch_one(db)
        .await
        .unwrap()
}

/// A deprovisioning queued between the rotation request's read and its enqueue: refused (409).
#[tokio::test]
async fn a_rotation_request_rechecks_the_state_under_the_row_lock() {
    let app = spawn_app().await;
    ready_repository(&app, "zitadel").await;
    let path = format!("{REPOSITORIES}/zitadel/rotate-key");
    let status = post_while_state_changes(&app, "zitadel", &path, "deprovisioning").await;
    assert_eq!(status, 409, "not ready any more");
    assert_eq!(jobs_of(&app.db, "rotate-access-key").await, 0);
    app.stop().await;
}

/// A repository deleted between the verify request's read and its enqueue: 404.
#[tokio::test]
async fn a_verify_request_rechecks_the_state_under_the_row_lock() {
    let app = spawn_app().await;
    ready_repository(&app, "zitadel").await;
    let path = format!("{REPOSITORIES}/zitadel/verify");
    let status = post_while_state_changes(&app, "zitadel", &path, "deleted").await;
    assert_eq!(status, 404, "deleted meanwhile");
    assert_eq!(jobs_of(&app.db, "verify-repository").await, 0);
    app.stop().await;
}
