//! The operators' listings: `GET /v1/backup-repositories?state=&namespace=` (deleted
//! repositories only with `state=deleted`, several of one name paged apart) and
//! `GET /v1/jobs?state=&kind=&repository=`, newest first, with cursor paging and 422 on
//! filters that cannot match. No worker runs: a deprovisioning is finished by updating its job
//! as a worker would, so the state trigger is exercised too.

use backup_provisioner::auth::Role;
use serde_json::{Value, json};

use crate::http_common::{REPOSITORIES, assert_problem, create_repository, job_id};
use crate::support::app::{TestApp, spawn_app};

/// Every page of `path` (a list endpoint with its query), `limit` at a time: the items.
async fn all_pages(app: &TestApp, path: &str, limit: usize) -> Vec<Value> {
    let token = app.viewer();
    let separator = if path.contains('?') { '&' } else { '?' };
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{path}{separator}limit={limit}");
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let response = app.get(&url, &token).await;
        assert_eq!(response.status(), 200, "{url}");
        let page: Value = response.json().await.unwrap();
        let got = page["items"].as_array().unwrap();
        assert!(got.len() <= limit, "{page}");
        items.extend(got.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return items,
        }
    }
}

fn field<'a>(items: &'a [Value], name: &str) -> Vec<&'a str> {
    items.iter().map(|i| i[name].as_str().unwrap()).collect()
}

fn admin(app: &TestApp) -> String {
    app.token("admin@test", &[Role::Admin])
}

/// Queues the deprovisioning of `name` (no worker runs it) and returns the job id.
async fn queue_deprovision(app: &TestApp, name: &str) -> String {
    let response = app
        .client
        .delete(app.url(&format!("{REPOSITORIES}/{name}")))
        .bearer_auth(admin(app))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["repository"]["state"], "deprovisioning");
    job_id(&body)
}

/// Ends a job as a worker would (the trigger moves its repository).
async fn finish_job(app: &TestApp, job: &str, state: &str) {
    sqlx::query("UPDATE jobs SET state = $2, finished_at = now() WHERE id = $1::uuid")
        .bind(job)
        .bind(state)
        .execute(&app.db)
        .await
        .unwrap();
}

/// alpha, bravo (team-a), charlie (team-b) pending; delta provisioned and deleted twice, and
/// pending again. Returns bravo's provisioning job.
async fn repositories(app: &TestApp) -> String {
    let token = app.operator();
    let mut jobs = Vec::new();
    for (name, namespace) in [
        ("alpha", "team-a"),
        ("bravo", "team-a"),
        ("charlie", "team-b"),
        ("delta", "team-b"),
    ] {
        let body = json!({"name": name, "namespace": namespace});
        jobs.push(job_id(&create_repository(app, &token, &body).await));
    }
    let mut delta_job = jobs[3].clone();
    for _ in 0..2 {
        finish_job(app, &delta_job, "succeeded").await;
        let job = queue_deprovision(app, "delta").await;
        finish_job(app, &job, "succeeded").await;
        let view: Value = app
            .get(&format!("{REPOSITORIES}/delta"), &token)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(view["state"], "deleted", "{view}");
        let body = json!({"name": "delta", "namespace": "team-b"});
        delta_job = job_id(&create_repository(app, &token, &body).await);
    }
    jobs.swap_remove(1)
}

#[tokio::test]
async fn repositories_are_listed_by_state_and_namespace_and_deleted_ones_only_when_asked() {
    let app = spawn_app().await;
    let bravo_job = repositories(&app).await;

    let live = all_pages(&app, REPOSITORIES, 2).await;
    assert_eq!(field(&live, "name"), ["alpha", "bravo", "charlie", "delta"]);
    assert!(live.iter().all(|r| r["state"] == "pending"), "{live:?}");
    let team_b = all_pages(&app, &format!("{REPOSITORIES}?namespace=team-b"), 1).await;
    assert_eq!(field(&team_b, "name"), ["charlie", "delta"]);

    // Two deleted repositories of one name, paged one at a time: both, once each.
    let deleted = all_pages(&app, &format!("{REPOSITORIES}?state=deleted"), 1).await;
    assert_eq!(field(&deleted, "name"), ["delta", "delta"]);
    assert!(deleted.iter().all(|r| r["state"] == "deleted"));
    assert_ne!(deleted[0]["created_at"], deleted[1]["created_at"]);
    let deleted_b = all_pages(
        &app,
        &format!("{REPOSITORIES}?state=deleted&namespace=team-b"),
        5,
    )
    .await;
    assert_eq!(deleted_b.len(), 2);
    assert!(
        all_pages(
            &app,
            &format!("{REPOSITORIES}?state=deleted&namespace=team-a"),
            5
        )
        .await
        .is_empty()
    );

    // A deprovisioning in flight is listed under its own state.
    finish_job(&app, &bravo_job, "succeeded").await;
    let job = queue_deprovision(&app, "bravo").await;
    let busy = all_pages(&app, &format!("{REPOSITORIES}?state=deprovisioning"), 5).await;
    assert_eq!(field(&busy, "name"), ["bravo"]);
    // It failed before any step (a refusal): the repository is back in the state it had.
    finish_job(&app, &job, "failed").await;
    let ready = all_pages(&app, &format!("{REPOSITORIES}?state=ready"), 5).await;
    assert_eq!(field(&ready, "name"), ["bravo"]);

    // Unknown states are 422 problems naming the valid ones; bad cursors 400.
    let viewer = app.viewer();
    for state in ["done", "DELETED", "deleted%20"] {
        let url = format!("{REPOSITORIES}?state={state}");
        let problem = assert_problem(app.get(&url, &viewer).await, 422).await;
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains("deprovisioning, deleted"), "{detail}");
    }
    let url = format!("{REPOSITORIES}?cursor=YWxwaGEKbm90LWEtdXVpZA");
    assert_problem(app.get(&url, &viewer).await, 400).await;
    app.stop().await;
}

#[tokio::test]
async fn jobs_are_listed_newest_first_by_state_kind_and_repository_with_cursors() {
    let app = spawn_app().await;
    repositories(&app).await;
    // Jobs: 4 creates, then per delta round a deprovision (succeeded) and a create.
    let all = all_pages(&app, "/v1/jobs", 3).await;
    assert_eq!(all.len(), 8, "{all:?}");
    let created: Vec<chrono::DateTime<chrono::FixedOffset>> = field(&all, "created_at")
        .into_iter()
        .map(|at| chrono::DateTime::parse_from_rfc3339(at).unwrap())
        .collect();
    let mut sorted = created.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(created, sorted, "newest first");
    let mut ids = field(&all, "id");
    ids.dedup();
    assert_eq!(ids.len(), 8, "no job twice across pages");

    let deprovisions = all_pages(&app, "/v1/jobs?kind=deprovision-repository", 1).await;
    assert_eq!(field(&deprovisions, "repository"), ["delta", "delta"]);
    assert!(deprovisions.iter().all(|j| j["state"] == "succeeded"));
    let delta = all_pages(&app, "/v1/jobs?repository=delta", 2).await;
    assert_eq!(
        field(&delta, "kind"),
        [
            "provision-repository",
            "deprovision-repository",
            "provision-repository",
            "deprovision-repository",
            "provision-repository"
        ]
    );
    let queued = all_pages(&app, "/v1/jobs?state=queued&kind=provision-repository", 2).await;
    assert_eq!(
        field(&queued, "repository"),
        ["delta", "charlie", "bravo", "alpha"]
    );
    let succeeded = all_pages(&app, "/v1/jobs?state=succeeded&repository=delta", 1).await;
    assert_eq!(succeeded.len(), 4, "{succeeded:?}");
    let none = all_pages(&app, "/v1/jobs?state=running&repository=alpha", 2).await;
    assert!(none.is_empty());

    let viewer = app.viewer();
    for (query, says) in [
        ("state=done", "state must be one of"),
        ("kind=Provision_Repository", "kind must be"),
        ("repository=Not_A_Name", "repository"),
    ] {
        let url = format!("/v1/jobs?{query}");
        let problem = assert_problem(app.get(&url, &viewer).await, 422).await;
        assert!(
            problem["detail"].as_str().unwrap().contains(says),
            "{problem}"
        );
    }
    for query in ["cursor=garbage", "cursor=YWJj", "limit=0", "bogus=1"] {
        let url = format!("/v1/jobs?{query}");
        assert_problem(app.get(&url, &viewer).await, 400).await;
    }
    let anonymous = app.client.get(app.url("/v1/jobs")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    app.stop().await;
}
