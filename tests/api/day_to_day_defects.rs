//! Defects found running the service day to day against real AWS, Kubernetes and Postgres
//! (issue "Behave on real AWS, Kubernetes and Postgres"), each pinned by a test that failed
//! before its fix.

use serde_json::{Value, json};

use crate::http_common::{REPOSITORIES, assert_problem, create_repository, job_id};
use crate::support::app::{TestApp, spawn_app};

async fn post(app: &TestApp, path: &str, token: &str) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .expect("request")
}

async fn get_json(app: &TestApp, path: &str) -> Value {
    app.get(path, &app.viewer())
        .await
        .json()
        .await
        .expect("json")
}

/// #11: a superseded job (a newer job exists for its repository) is not run again with its old
/// options; the refusal changes nothing, and the repository keeps showing its latest job.
#[tokio::test]
async fn retrying_a_superseded_job_is_refused_and_changes_nothing() {
    let app = spawn_app().await;
    let token = app.operator();
    let body = json!({"name": "zitadel", "namespace": "zitadel", "allow_new_cipher_pass": true});
    let old = job_id(&create_repository(&app, &token, &body).await);
    assert_eq!(
        post(&app, &format!("/v1/jobs/{old}/cancel"), &token)
            .await
            .status(),
        202
    );
    // The switch goes off again: a newer job, with the new options, is queued; then cancelled.
    let body = json!({"name": "zitadel", "namespace": "zitadel", "allow_new_cipher_pass": false});
    let newer = job_id(&create_repository(&app, &token, &body).await);
    assert_ne!(old, newer);
    assert_eq!(
        post(&app, &format!("/v1/jobs/{newer}/cancel"), &token)
            .await
            .status(),
        202
    );
    let before = get_json(&app, &format!("{REPOSITORIES}/zitadel")).await;
    assert_eq!(before["last_job"]["id"], newer.as_str(), "{before}");

    let problem = assert_problem(
        post(&app, &format!("/v1/jobs/{old}/retry"), &token).await,
        409,
    )
    .await;
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("a newer job") && detail.contains(&newer),
        "the refusal names the newer job: {problem}"
    );

    let old_view = get_json(&app, &format!("/v1/jobs/{old}")).await;
    assert_eq!(old_view["state"], "cancelled", "{old_view}");
    let after = get_json(&app, &format!("{REPOSITORIES}/zitadel")).await;
    assert_eq!(after["state"], "cancelled", "{after}");
    assert_eq!(after["last_job"]["id"], newer.as_str(), "{after}");
    let retries: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE action = 'job.retry'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(retries, 0, "a refused retry leaves no audit entry");

    // The newer job itself can still be retried.
    let response = post(&app, &format!("/v1/jobs/{newer}/retry"), &token).await;
    assert_eq!(response.status(), 202);
    app.stop().await;
}
