//! The thinnest end-to-end path: create a repository over HTTP and read it back.

use crate::support::app::spawn_app;

#[tokio::test]
async fn create_then_get_repository() {
    let app = spawn_app().await;
    let token = app.operator();
    let body = serde_json::json!({"name": "zitadel", "namespace": "zitadel"});
    let response = app
        .post_json("/v1/backup-repositories", &token, &body)
        .await;
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let created: serde_json::Value = response.json().await.unwrap();
    assert_eq!(created["repository"]["bucket"], "holos-zitadel-backups");
    assert_eq!(
        location,
        format!("/v1/jobs/{}", created["job"]["id"].as_str().unwrap())
    );
    let got: serde_json::Value = app
        .get("/v1/backup-repositories/zitadel", &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got["state"], "pending");
    app.stop().await;
}
