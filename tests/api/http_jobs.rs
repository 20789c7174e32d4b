//! `/v1/jobs/{id}` with no workers running: the job stays queued; long polling, cancel and retry.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::http_common::{
    REPOSITORIES, assert_problem, create_repository, job_id, repository_body,
};
use crate::support::app::{TestApp, spawn_app};

async fn post(app: &TestApp, path: &str, token: &str) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .expect("request")
}

async fn repository_state(app: &TestApp, name: &str) -> String {
    let view: Value = app
        .get(&format!("{REPOSITORIES}/{name}"), &app.viewer())
        .await
        .json()
        .await
        .unwrap();
    view["state"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_job_without_workers_stays_queued_and_long_polls_until_the_wait_ends() {
    let app = spawn_app().await;
    let created = create_repository(&app, &app.operator(), &repository_body("zitadel")).await;
    let job = job_id(&created);
    let viewer = app.viewer();

    let response = app.get(&format!("/v1/jobs/{job}"), &viewer).await;
    assert_eq!(response.status(), 200);
    let view: Value = response.json().await.unwrap();
    assert_eq!(view["id"], job.as_str());
    assert_eq!(view["state"], "queued");
    assert_eq!(view["kind"], created["job"]["kind"]);
    assert_eq!(view["repository"], "zitadel");
    assert_eq!(view["attempts"], 0);
    assert_eq!(view["cancel_requested"], false);
    assert_eq!(view["created_by"], "operator@test");
    assert!(view["max_attempts"].as_i64().unwrap() >= 1);
    assert!(view["steps"].is_array());

    // Long poll: nothing happens, so it returns when the wait is over, still queued.
    let started = Instant::now();
    let response = app.get(&format!("/v1/jobs/{job}?wait=1s"), &viewer).await;
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 200);
    let view: Value = response.json().await.unwrap();
    assert_eq!(view["state"], "queued");
    assert!(
        elapsed >= Duration::from_millis(900),
        "returned after {elapsed:?}, before the wait ended"
    );
    assert!(
        elapsed < Duration::from_secs(15),
        "returned after {elapsed:?}"
    );

    // Other duration spellings.
    assert_eq!(
        app.get(&format!("/v1/jobs/{job}?wait=100ms"), &viewer)
            .await
            .status(),
        200
    );
    assert_eq!(
        app.get(&format!("/v1/jobs/{job}?wait=0s"), &viewer)
            .await
            .status(),
        200
    );
    let problem = assert_problem(
        app.get(&format!("/v1/jobs/{job}?wait=31s"), &viewer).await,
        400,
    )
    .await;
    assert!(
        problem["detail"].as_str().unwrap().contains("at most 30s"),
        "{problem}"
    );

    let unknown = "6f1d7a43-0000-4000-8000-000000000000";
    let problem = assert_problem(app.get(&format!("/v1/jobs/{unknown}"), &viewer).await, 404).await;
    assert_eq!(problem["detail"], format!("no job {unknown}"));
    app.stop().await;
}

#[tokio::test]
async fn a_long_poll_returns_as_soon_as_the_job_ends() {
    let app = spawn_app().await;
    let token = app.operator();
    let created = create_repository(&app, &token, &repository_body("zitadel")).await;
    let job = job_id(&created);
    let poll = {
        let (client, url, viewer) = (
            app.client.clone(),
            app.url(&format!("/v1/jobs/{job}?wait=30s")),
            app.viewer(),
        );
        tokio::spawn(async move {
            let started = Instant::now();
            let view: Value = client
                .get(url)
                .bearer_auth(viewer)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            (view, started.elapsed())
        })
    };
    // Whether the cancel lands before the poll's first read or while it waits, the poll must
    // answer with the cancelled job long before its 30 s wait is over.
    assert_eq!(
        post(&app, &format!("/v1/jobs/{job}/cancel"), &token)
            .await
            .status(),
        202
    );
    let (view, elapsed) = tokio::time::timeout(Duration::from_secs(40), poll)
        .await
        .expect("poll returned")
        .unwrap();
    assert_eq!(view["state"], "cancelled");
    assert!(
        elapsed < Duration::from_secs(25),
        "the poll returned at the change, not at the end of the wait: {elapsed:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn cancel_and_retry_follow_the_job_state() {
    let app = spawn_app().await;
    let token = app.operator();
    let created = create_repository(&app, &token, &repository_body("zitadel")).await;
    let job = job_id(&created);
    assert_eq!(repository_state(&app, "zitadel").await, "pending");

    // A viewer may neither cancel nor retry.
    let viewer = app.viewer();
    let problem = assert_problem(
        post(&app, &format!("/v1/jobs/{job}/cancel"), &viewer).await,
        403,
    )
    .await;
    assert!(
        problem["detail"].as_str().unwrap().contains("'operator'"),
        "{problem}"
    );
    assert_problem(
        post(&app, &format!("/v1/jobs/{job}/retry"), &viewer).await,
        403,
    )
    .await;
    // Nor may anyone without a token.
    let response = app
        .client
        .post(app.url(&format!("/v1/jobs/{job}/cancel")))
        .send()
        .await
        .unwrap();
    assert_problem(response, 401).await;

    // Retrying a queued job is a conflict.
    let problem = assert_problem(
        post(&app, &format!("/v1/jobs/{job}/retry"), &token).await,
        409,
    )
    .await;
    assert!(
        problem["detail"].as_str().unwrap().contains("queued"),
        "{problem}"
    );

    // Cancel a queued job: at once.
    let response = post(&app, &format!("/v1/jobs/{job}/cancel"), &token).await;
    assert_eq!(response.status(), 202);
    let view: Value = response.json().await.unwrap();
    assert_eq!(view["state"], "cancelled");
    assert!(view["finished_at"].is_string());
    let view: Value = app
        .get(&format!("/v1/jobs/{job}"), &viewer)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(view["state"], "cancelled");
    assert_eq!(repository_state(&app, "zitadel").await, "cancelled");

    // Cancelling again: it already ended.
    let problem = assert_problem(
        post(&app, &format!("/v1/jobs/{job}/cancel"), &token).await,
        409,
    )
    .await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("already ended (cancelled)"),
        "{problem}"
    );

    // Retry the cancelled job: queued again, the repository pending again.
    let response = post(&app, &format!("/v1/jobs/{job}/retry"), &token).await;
    assert_eq!(response.status(), 202);
    let view: Value = response.json().await.unwrap();
    assert_eq!(view["state"], "queued");
    assert_eq!(view["cancel_requested"], false);
    assert_eq!(view["attempts"], 0);
    assert_eq!(repository_state(&app, "zitadel").await, "pending");
    // ...and now a second retry conflicts.
    assert_problem(
        post(&app, &format!("/v1/jobs/{job}/retry"), &token).await,
        409,
    )
    .await;

    // Unknown jobs.
    let unknown = "6f1d7a43-0000-4000-8000-000000000000";
    assert_problem(
        post(&app, &format!("/v1/jobs/{unknown}/cancel"), &token).await,
        404,
    )
    .await;
    assert_problem(
        post(&app, &format!("/v1/jobs/{unknown}/retry"), &token).await,
        404,
    )
    .await;

    // Still one job for the repository, and the actions are in the audit log.
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(jobs, 1);
    let actions: Vec<(String, String)> = sqlx::query_as(
        "SELECT action, outcome FROM audit_events WHERE job_id = $1::uuid ORDER BY id",
    )
    .bind(&job)
    .fetch_all(&app.db)
    .await
    .unwrap();
    let actions: Vec<(&str, &str)> = actions
        .iter()
        .map(|(a, o)| (a.as_str(), o.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("repository.create", "created"),
            ("job.cancel", "cancelled"),
            ("job.retry", "queued")
        ],
        "rejected requests leave no audit entry"
    );
    app.stop().await;
}
