//! The audit log: one entry per API mutation (actor and request id), append-only in Postgres,
//! step attempts stored once, and readable through `/v1/audit` and `/v1/jobs/{id}/events`.

use backup_provisioner::audit::{self, AuditEntry};
use backup_provisioner::auth::Role;
use serde_json::{Value, json};

use crate::http_common::{
    REPOSITORIES, assert_problem, create_repository, job_id, repository_body,
};
use crate::support::app::{TestApp, TestDb, migrated_db, spawn_app};

/// actor, request_id, repository, action, outcome, detail
type AuditRow = (
    String,
    Option<String>,
    Option<String>,
    String,
    String,
    Value,
);

async fn audit_page(app: &TestApp, query: &[(&str, &str)]) -> Value {
    let response = app
        .client
        .get(app.url("/v1/audit"))
        .bearer_auth(app.viewer())
        .query(query)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let page: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{query:?}: {page}");
    page
}

fn items(page: &Value) -> &Vec<Value> {
    page["items"].as_array().expect("items")
}

fn repositories_of(page: &Value) -> Vec<String> {
    items(page)
        .iter()
        .map(|e| e["repository"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn a_mutation_writes_one_entry_with_the_actor_and_request_id() {
    let app = spawn_app().await;
    let token = app.token("alice@example.com", &[Role::Operator]);
    let response = app
        .post_json(REPOSITORIES, &token, &repository_body("zitadel"))
        .await;
    assert_eq!(response.status(), 202);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let created: Value = response.json().await.unwrap();

    let rows: Vec<AuditRow> = sqlx::query_as(
        "SELECT actor, request_id, repository, action, outcome, detail FROM audit_events ORDER BY id",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (actor, stored_request_id, repository, action, outcome, detail) = &rows[0];
    assert_eq!(actor, "alice@example.com");
    assert_eq!(stored_request_id.as_deref(), Some(request_id.as_str()));
    assert_eq!(repository.as_deref(), Some("zitadel"));
    assert_eq!(action, "repository.create");
    assert_eq!(outcome, "created");
    assert_eq!(detail["bucket"], "holos-zitadel-backups");
    assert_eq!(detail["namespace"], "zitadel");

    // The same entry over the API, linked to the job.
    let page = audit_page(&app, &[]).await;
    assert_eq!(items(&page).len(), 1);
    let event = &items(&page)[0];
    assert_eq!(event["actor"], "alice@example.com");
    assert_eq!(event["request_id"], request_id.as_str());
    assert_eq!(event["job_id"], created["job"]["id"]);

    // A client-chosen request id is echoed and recorded apart from the server's own.
    let response = app
        .client
        .post(app.url(REPOSITORIES))
        .bearer_auth(&token)
        .header("x-request-id", "client-chosen-42")
        .json(&repository_body("holos"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(response.headers()["x-request-id"], "client-chosen-42");
    let (recorded, client): (String, Option<String>) = sqlx::query_as(
        "SELECT request_id, client_request_id FROM audit_events WHERE repository = 'holos'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(uuid::Uuid::parse_str(&recorded).is_ok(), "{recorded}");
    assert_eq!(client.as_deref(), Some("client-chosen-42"));

    // Reads, refused and repeated requests write nothing.
    app.get(REPOSITORIES, &token).await;
    app.post_json(REPOSITORIES, &token, &repository_body("zitadel"))
        .await; // 200: exists
    app.post_json(REPOSITORIES, &app.viewer(), &repository_body("other"))
        .await; // 403
    app.post_json(
        REPOSITORIES,
        &token,
        &json!({"name": "Bad", "namespace": "x"}),
    )
    .await; // 422
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(count, 2);
    app.stop().await;
}

#[tokio::test]
async fn the_audit_table_is_append_only() {
    let app = spawn_app().await;
    create_repository(&app, &app.operator(), &repository_body("zitadel")).await;
    for statement in [
        "UPDATE audit_events SET actor = 'mallory'",
        "UPDATE audit_events SET detail = '{}'::jsonb WHERE id = (SELECT min(id) FROM audit_events)",
        "DELETE FROM audit_events",
        "DELETE FROM audit_events WHERE actor = 'operator@test'",
        "TRUNCATE audit_events",
    ] {
        let error = sqlx::query(statement)
            .execute(&app.db)
            .await
            .expect_err(statement);
        let message = error.to_string();
        assert!(message.contains("append-only"), "{statement}: {message}");
    }
    let (count, actor): (i64, String) =
        sqlx::query_as("SELECT count(*), min(actor) FROM audit_events")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(
        (count, actor.as_str()),
        (1, "operator@test"),
        "nothing changed"
    );
    // Appending still works.
    let written = audit::record(
        &app.db,
        &AuditEntry {
            actor: "t".into(),
            action: "x".into(),
            outcome: "y".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(written);
    app.stop().await;
}

#[tokio::test]
async fn the_same_step_attempt_is_stored_once() {
    let TestDb {
        pool: db,
        guard: _guard,
        ..
    } = migrated_db().await;
    let job = uuid::Uuid::new_v4();
    let entry = AuditEntry {
        actor: "worker".into(),
        subject: Some("zitadel".into()),
        job_id: Some(job),
        step: Some("create-bucket".into()),
        attempt: Some(1),
        action: "step.attempt".into(),
        outcome: "created".into(),
        detail: json!({"bucket": "holos-zitadel-backups"}),
        upstream_request_id: Some("REQ123".into()),
        ..Default::default()
    };
    assert!(
        audit::record(&db, &entry).await.unwrap(),
        "the first write stores the entry"
    );
    assert!(
        !audit::record(&db, &entry).await.unwrap(),
        "the second write is ignored"
    );
    // Even with another outcome: the (job, step, attempt, action) key decides.
    let changed = AuditEntry {
        outcome: "failed".into(),
        ..entry.clone()
    };
    assert!(!audit::record(&db, &changed).await.unwrap());
    // Inside a transaction too.
    let mut tx = db.begin().await.unwrap();
    assert!(!audit::record(&mut *tx, &entry).await.unwrap());
    tx.commit().await.unwrap();
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(count, 1);
    let (outcome, upstream): (String, Option<String>) =
        sqlx::query_as("SELECT outcome, upstream_request_id FROM audit_events")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(
        (outcome.as_str(), upstream.as_deref()),
        ("created", Some("REQ123"))
    );

    // Another attempt, step or action is another entry.
    for other in [
        AuditEntry {
            attempt: Some(2),
            ..entry.clone()
        },
        AuditEntry {
            step: Some("create-policy".into()),
            ..entry.clone()
        },
        AuditEntry {
            action: "step.output".into(),
            ..entry.clone()
        },
        AuditEntry {
            job_id: Some(uuid::Uuid::new_v4()),
            ..entry.clone()
        },
    ] {
        assert!(audit::record(&db, &other).await.unwrap());
    }
    // Entries that are not step attempts are never deduplicated.
    let mutation = AuditEntry {
        actor: "alice".into(),
        action: "repository.create".into(),
        outcome: "created".into(),
        ..Default::default()
    };
    assert!(audit::record(&db, &mutation).await.unwrap());
    assert!(audit::record(&db, &mutation).await.unwrap());
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(count, 7);
    db.close().await;
}

#[tokio::test]
async fn the_audit_api_filters_by_repository_actor_and_since_and_paginates() {
    let app = spawn_app().await;
    let alice = app.token("alice", &[Role::Operator]);
    let bob = app.token("bob", &[Role::Operator]);
    create_repository(&app, &alice, &repository_body("one")).await;
    create_repository(&app, &bob, &repository_body("two")).await;
    let three = create_repository(&app, &alice, &repository_body("three")).await;
    let cancel = app
        .client
        .post(app.url(&format!("/v1/jobs/{}/cancel", job_id(&three))))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 202);
    create_repository(&app, &bob, &repository_body("four")).await;

    let all = audit_page(&app, &[]).await;
    assert_eq!(
        repositories_of(&all),
        ["one", "two", "three", "three", "four"],
        "oldest first"
    );
    let ids: Vec<i64> = items(&all)
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));

    // Filters.
    assert_eq!(
        repositories_of(&audit_page(&app, &[("repository", "three")]).await),
        ["three", "three"]
    );
    let three_actions: Vec<String> = items(&audit_page(&app, &[("repository", "three")]).await)
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(three_actions, ["repository.create", "job.cancel"]);
    assert_eq!(
        repositories_of(&audit_page(&app, &[("actor", "alice")]).await),
        ["one", "three"]
    );
    assert_eq!(
        repositories_of(&audit_page(&app, &[("actor", "bob")]).await),
        ["two", "three", "four"]
    );
    assert_eq!(
        repositories_of(&audit_page(&app, &[("actor", "bob"), ("repository", "three")]).await),
        ["three"]
    );
    assert!(items(&audit_page(&app, &[("actor", "carol")]).await).is_empty());
    // `since` is inclusive: from the cancel on.
    let cancel_at = items(&all)[3]["at"].as_str().unwrap().to_owned();
    assert_eq!(
        repositories_of(&audit_page(&app, &[("since", cancel_at.as_str())]).await),
        ["three", "four"]
    );
    assert_eq!(
        repositories_of(&audit_page(&app, &[("since", "2000-01-01T00:00:00Z")]).await).len(),
        5
    );
    assert!(items(&audit_page(&app, &[("since", "2999-01-01T00:00:00+02:00")]).await).is_empty());
    let problem = assert_problem(
        app.client
            .get(app.url("/v1/audit"))
            .bearer_auth(app.viewer())
            .query(&[("since", "last tuesday")])
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    assert!(
        problem["detail"].as_str().unwrap().contains("since"),
        "{problem}"
    );

    // Pagination: 5 entries, 2 a page.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut query = vec![("limit", "2".to_owned())];
        if let Some(c) = &cursor {
            query.push(("cursor", c.clone()));
        }
        let query: Vec<(&str, &str)> = query.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let page = audit_page(&app, &query).await;
        pages += 1;
        assert!(items(&page).len() <= 2);
        seen.extend(items(&page).iter().map(|e| e["id"].as_i64().unwrap()));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids, "every entry exactly once, in order");
    // Filters and cursors combine.
    let page = audit_page(&app, &[("actor", "bob"), ("limit", "2")]).await;
    assert_eq!(repositories_of(&page), ["two", "three"]);
    let next = page["next_cursor"].as_str().unwrap().to_owned();
    assert_eq!(
        repositories_of(
            &audit_page(
                &app,
                &[("actor", "bob"), ("limit", "2"), ("cursor", next.as_str())]
            )
            .await
        ),
        ["four"]
    );
    app.stop().await;
}

#[tokio::test]
async fn job_events_list_the_audit_entries_of_one_job() {
    let app = spawn_app().await;
    let token = app.operator();
    let first = create_repository(&app, &token, &repository_body("zitadel")).await;
    let other = create_repository(&app, &token, &repository_body("holos")).await;
    let job = job_id(&first);
    for action in ["cancel", "retry", "cancel"] {
        let response = app
            .client
            .post(app.url(&format!("/v1/jobs/{job}/{action}")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "{action}");
    }
    let response = app
        .get(&format!("/v1/jobs/{job}/events"), &app.viewer())
        .await;
    assert_eq!(response.status(), 200);
    let page: Value = response.json().await.unwrap();
    let actions: Vec<&str> = items(&page)
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["repository.create", "job.cancel", "job.retry", "job.cancel"]
    );
    assert!(
        items(&page)
            .iter()
            .all(|e| e["job_id"] == job.as_str() && e["repository"] == "zitadel")
    );
    assert!(page.get("next_cursor").is_none());

    // Paginated.
    let page: Value = app
        .get(&format!("/v1/jobs/{job}/events?limit=3"), &app.viewer())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(items(&page).len(), 3);
    let cursor = page["next_cursor"].as_str().unwrap();
    let rest: Value = app
        .get(
            &format!("/v1/jobs/{job}/events?limit=3&cursor={cursor}"),
            &app.viewer(),
        )
        .await
        .json()
        .await
        .unwrap();
    let actions: Vec<&str> = items(&rest)
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["job.cancel"]);

    // The other job has only its own entry; unknown jobs are 404.
    let page: Value = app
        .get(
            &format!("/v1/jobs/{}/events", job_id(&other)),
            &app.viewer(),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(items(&page).len(), 1);
    let unknown = "6f1d7a43-0000-4000-8000-000000000000";
    assert_problem(
        app.get(&format!("/v1/jobs/{unknown}/events"), &app.viewer())
            .await,
        404,
    )
    .await;
    assert_problem(
        app.client
            .get(app.url(&format!("/v1/jobs/{job}/events")))
            .send()
            .await
            .unwrap(),
        401,
    )
    .await;
    app.stop().await;
}
