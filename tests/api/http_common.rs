//! Shared assertions for the HTTP API tests: problem+json documents and repository creation.

use serde_json::{Value, json};

use crate::support::app::TestApp;

pub const REPOSITORIES: &str = "/v1/backup-repositories";

/// Asserts that `response` is an RFC 9457 problem with `status`: content type
/// `application/problem+json`, the fields type/title/status/detail, and an `x-request-id`
/// header. Returns the document.
pub async fn assert_problem(response: reqwest::Response, status: u16) -> Value {
    let url = response.url().to_string();
    let got = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let request_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let text = response.text().await.expect("response body");
    assert_eq!(
        got, status,
        "{url}: expected status {status}, got {got}: {text}"
    );
    assert!(
        content_type.starts_with("application/problem+json"),
        "{url}: content-type of a {status} must be application/problem+json, got {content_type:?}: {text}"
    );
    assert!(
        !request_id.is_empty(),
        "{url}: a {status} must carry an x-request-id header"
    );
    let problem: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{url}: problem body is not JSON ({e}): {text}"));
    for field in ["type", "title", "detail"] {
        assert!(
            problem[field].as_str().is_some_and(|s| !s.is_empty()),
            "{url}: problem lacks a non-empty '{field}': {problem}"
        );
    }
    assert_eq!(
        problem["status"],
        json!(status),
        "{url}: problem status field: {problem}"
    );
    problem
}

/// The `(field, message)` pairs of a validation problem.
pub fn field_errors(problem: &Value) -> Vec<(String, String)> {
    problem["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| {
                    (
                        e["field"].as_str().unwrap_or_default().to_owned(),
                        e["message"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A create request for repository `name` in namespace `name`, with the default bucket.
pub fn repository_body(name: &str) -> Value {
    json!({"name": name, "namespace": name})
}

/// Creates a repository (asserting 202) and returns the response body.
pub async fn create_repository(app: &TestApp, token: &str, body: &Value) -> Value {
    let response = app.post_json(REPOSITORIES, token, body).await;
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    assert_eq!(status, 202, "create {body}: {text}");
    serde_json::from_str(&text).expect("created json")
}

/// The job id in a create response.
pub fn job_id(created: &Value) -> String {
    created["job"]["id"].as_str().expect("job id").to_owned()
}

/// Number of rows in `table` (a fixed table name from the test itself).
pub async fn count_rows(app: &TestApp, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(&app.db)
        .await
        .expect("count rows")
}
