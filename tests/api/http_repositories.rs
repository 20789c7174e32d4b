//! `/v1/backup-repositories`: create (202 + job), same request again (200, no new job),
//! conflicting requests (409), listing with cursors and filters, and 50 concurrent creates.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::http_common::{
    REPOSITORIES, assert_problem, count_rows, create_repository, job_id, repository_body,
};
use crate::support::app::{TestApp, spawn_app};

#[tokio::test]
async fn create_returns_202_with_the_job_location_and_repeating_it_returns_200() {
    let app = spawn_app().await;
    let token = app.operator();
    let body = json!({"name": "zitadel", "namespace": "zitadel", "labels": {"team": "identity"}});

    let response = app.post_json(REPOSITORIES, &token, &body).await;
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let created: Value = response.json().await.unwrap();
    let job = job_id(&created);
    assert_eq!(location, format!("/v1/jobs/{job}"));
    assert_eq!(created["repository"]["name"], "zitadel");
    assert_eq!(created["repository"]["namespace"], "zitadel");
    assert_eq!(created["repository"]["bucket"], "holos-zitadel-backups");
    assert_eq!(created["repository"]["region"], "us-east-1");
    assert_eq!(created["repository"]["labels"], json!({"team": "identity"}));
    assert_eq!(created["repository"]["state"], "pending");
    assert_eq!(created["repository"]["created_by"], "operator@test");
    assert_eq!(created["repository"]["last_job"]["id"], job.as_str());
    assert_eq!(created["job"]["state"], "queued");
    assert_eq!(count_rows(&app, "jobs").await, 1);

    // The Location resolves to the job.
    let view: Value = app.get(&location, &token).await.json().await.unwrap();
    assert_eq!(view["id"], job.as_str());
    assert_eq!(view["repository"], "zitadel");

    // The same request again: 200 with the same job, and no second job.
    let response = app.post_json(REPOSITORIES, &token, &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["location"].to_str().unwrap(), location);
    let again: Value = response.json().await.unwrap();
    assert_eq!(job_id(&again), job);
    assert_eq!(again["repository"]["bucket"], "holos-zitadel-backups");
    // The explicit default bucket and region are the same desired state.
    let explicit = json!({
        "name": "zitadel", "namespace": "zitadel", "bucket": "holos-zitadel-backups", "region": "us-east-1",
        "labels": {"team": "identity"},
    });
    let response = app.post_json(REPOSITORIES, &token, &explicit).await;
    assert_eq!(response.status(), 200);
    // Another caller asking for the same thing also gets it.
    let other = app.token(
        "someone-else@test",
        &[backup_provisioner::auth::Role::Admin],
    );
    assert_eq!(
        app.post_json(REPOSITORIES, &other, &body).await.status(),
        200
    );

    assert_eq!(count_rows(&app, "jobs").await, 1);
    assert_eq!(count_rows(&app, "backup_repositories").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn a_different_desired_state_is_409_naming_the_differing_fields() {
    let app = spawn_app().await;
    let token = app.operator();
    create_repository(
        &app,
        &token,
        &json!({"name": "zitadel", "namespace": "zitadel", "labels": {"a": "b"}}),
    )
    .await;

    let cases = [
        (
            json!({"name": "zitadel", "namespace": "other", "labels": {"a": "b"}}),
            "namespace differs",
        ),
        (
            json!({"name": "zitadel", "namespace": "zitadel", "region": "eu-west-1", "labels": {"a": "b"}}),
            "region differs",
        ),
        (
            json!({"name": "zitadel", "namespace": "zitadel"}),
            "labels differs",
        ),
        (
            json!({"name": "zitadel", "namespace": "zitadel", "bucket": "holos-zitadel2-backups", "region": "eu-west-1", "labels": {"a": "c"}}),
            "bucket, region, labels differ",
        ),
    ];
    for (body, needle) in cases {
        let response = app.post_json(REPOSITORIES, &token, &body).await;
        let problem = assert_problem(response, 409).await;
        let detail = problem["detail"].as_str().unwrap();
        assert!(
            detail.contains("'zitadel' already exists with a different desired state"),
            "{detail}"
        );
        assert!(
            detail.contains(needle),
            "{body}: expected {needle:?} in {detail:?}"
        );
    }
    assert_eq!(count_rows(&app, "jobs").await, 1);
    assert_eq!(count_rows(&app, "backup_repositories").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn a_bucket_used_by_another_repository_is_409() {
    let app = spawn_app().await;
    let token = app.operator();
    create_repository(&app, &token, &repository_body("zitadel")).await;
    let response = app
        .post_json(
            REPOSITORIES,
            &token,
            &json!({"name": "other", "namespace": "other", "bucket": "holos-zitadel-backups"}),
        )
        .await;
    let problem = assert_problem(response, 409).await;
    assert_eq!(
        problem["detail"],
        "bucket 'holos-zitadel-backups' is already used by repository 'zitadel'"
    );
    assert_eq!(count_rows(&app, "backup_repositories").await, 1);
    assert_eq!(count_rows(&app, "jobs").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn get_unknown_repository_is_404() {
    let app = spawn_app().await;
    let response = app
        .get(&format!("{REPOSITORIES}/nope"), &app.viewer())
        .await;
    let problem = assert_problem(response, 404).await;
    assert_eq!(problem["detail"], "no backup repository named 'nope'");
    app.stop().await;
}

#[tokio::test]
async fn get_shows_state_last_job_and_no_secret() {
    let app = spawn_app().await;
    let created = create_repository(&app, &app.operator(), &repository_body("zitadel")).await;
    let response = app
        .get(&format!("{REPOSITORIES}/zitadel"), &app.viewer())
        .await;
    assert_eq!(response.status(), 200);
    let view: Value = response.json().await.unwrap();
    assert_eq!(view["state"], "pending");
    assert_eq!(view["last_job"]["id"], created["job"]["id"]);
    assert_eq!(view["last_job"]["state"], "queued");
    assert_eq!(view["resources"], json!({}));
    let text = view.to_string().to_lowercase();
    for secret in ["secret_access_key", "s3-key-secret", "cipher-pass\""] {
        assert!(!text.contains(secret), "{secret} in {view}");
    }
    app.stop().await;
}

async fn list_page(app: &TestApp, query: &str) -> Value {
    let response = app
        .get(&format!("{REPOSITORIES}?{query}"), &app.viewer())
        .await;
    let status = response.status();
    let page: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{query}: {page}");
    page
}

fn names(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn list_paginates_with_a_cursor_and_filters_by_state_and_namespace() {
    let app = spawn_app().await;
    let token = app.operator();
    let mut jobs = Vec::new();
    for (name, namespace) in [
        ("echo", "team-b"),
        ("alpha", "team-a"),
        ("delta", "team-b"),
        ("charlie", "team-a"),
        ("bravo", "team-a"),
    ] {
        let created =
            create_repository(&app, &token, &json!({"name": name, "namespace": namespace})).await;
        jobs.push((name, job_id(&created)));
    }

    // Five repositories, two a page: three pages in name order.
    let first = list_page(&app, "limit=2").await;
    assert_eq!(names(&first), ["alpha", "bravo"]);
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a next cursor")
        .to_owned();
    let second = list_page(&app, &format!("limit=2&cursor={cursor}")).await;
    assert_eq!(names(&second), ["charlie", "delta"]);
    let cursor = second["next_cursor"]
        .as_str()
        .expect("a next cursor")
        .to_owned();
    let third = list_page(&app, &format!("limit=2&cursor={cursor}")).await;
    assert_eq!(names(&third), ["echo"]);
    assert!(
        third.get("next_cursor").is_none(),
        "the last page has no cursor: {third}"
    );
    // Every item carries its last job.
    for item in first["items"].as_array().unwrap() {
        assert_eq!(item["last_job"]["state"], "queued", "{item}");
    }
    // Exactly one page when everything fits; the default limit is large enough.
    let all = list_page(&app, "").await;
    assert_eq!(names(&all), ["alpha", "bravo", "charlie", "delta", "echo"]);
    assert!(all.get("next_cursor").is_none());
    let exact = list_page(&app, "limit=5").await;
    assert_eq!(names(&exact).len(), 5);
    assert!(exact.get("next_cursor").is_none());

    // Filters.
    assert_eq!(
        names(&list_page(&app, "namespace=team-a").await),
        ["alpha", "bravo", "charlie"]
    );
    assert_eq!(
        names(&list_page(&app, "namespace=team-b").await),
        ["delta", "echo"]
    );
    assert!(names(&list_page(&app, "namespace=nobody").await).is_empty());
    let page = list_page(&app, "namespace=team-a&limit=2").await;
    assert_eq!(names(&page), ["alpha", "bravo"]);
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    assert_eq!(
        names(&list_page(&app, &format!("namespace=team-a&limit=2&cursor={cursor}")).await),
        ["charlie"]
    );

    // Cancel delta's job: its repository becomes cancelled.
    let delta_job = &jobs.iter().find(|(n, _)| *n == "delta").unwrap().1;
    let response = app
        .client
        .post(app.url(&format!("/v1/jobs/{delta_job}/cancel")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(names(&list_page(&app, "state=cancelled").await), ["delta"]);
    assert_eq!(
        names(&list_page(&app, "state=pending").await),
        ["alpha", "bravo", "charlie", "echo"]
    );
    assert_eq!(
        names(&list_page(&app, "state=pending&namespace=team-b").await),
        ["echo"]
    );
    assert!(names(&list_page(&app, "state=ready").await).is_empty());

    // An unknown state is a 422 that lists the valid ones.
    let problem = assert_problem(
        app.get(&format!("{REPOSITORIES}?state=done"), &token).await,
        422,
    )
    .await;
    assert_eq!(
        problem["detail"],
        "state must be one of pending, provisioning, ready, failed, cancelled, deprovisioning, \
         deleted"
    );
    app.stop().await;
}

/// 50 clients create the same repository at once: one repository, one active job, exactly one
/// 202 and 200 for every other request.
#[tokio::test]
async fn fifty_concurrent_creates_of_one_repository_make_one_repository_and_one_job() {
    let app = spawn_app().await;
    let token = app.operator();
    let url = app.url(REPOSITORIES);
    let body = json!({"name": "zitadel", "namespace": "zitadel", "labels": {"app": "zitadel"}});
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(50));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let client = app.client.clone();
            let (url, token, body, barrier) =
                (url.clone(), token.clone(), body.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let response = client
                    .post(url)
                    .bearer_auth(token)
                    .json(&body)
                    .send()
                    .await
                    .expect("request");
                let status = response.status().as_u16();
                let location = response
                    .headers()
                    .get("location")
                    .map(|v| v.to_str().unwrap().to_owned());
                let text = response.text().await.expect("body");
                (status, location, text)
            })
        })
        .collect();
    let mut accepted = 0;
    let mut locations = BTreeSet::new();
    for task in tasks {
        let (status, location, text) = task.await.expect("task");
        assert!(
            status == 200 || status == 202,
            "every concurrent create must be 200 or 202, got {status}: {text}"
        );
        if status == 202 {
            accepted += 1;
        }
        locations.insert(location.expect("a Location on every success"));
    }
    assert_eq!(accepted, 1, "exactly one request creates the repository");
    assert_eq!(
        locations.len(),
        1,
        "every response names the same job: {locations:?}"
    );
    assert_eq!(count_rows(&app, "backup_repositories").await, 1);
    assert_eq!(count_rows(&app, "jobs").await, 1);
    let active: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(active, 1);
    let audits: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE action = 'repository.create'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(audits, 1, "one audit entry for the one mutation");
    app.stop().await;
}
