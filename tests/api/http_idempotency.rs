//! `Idempotency-Key` as the IETF httpapi draft describes it: same key and same body → the first
//! response again; same key, different body → 422; same key while the first request is in
//! flight → 409; an expired key is new.

use backup_provisioner::auth::Role;
use reqwest::Response;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::http_common::{REPOSITORIES, assert_problem, count_rows};
use crate::support::app::{TestApp, spawn_app};

async fn post_with_key(app: &TestApp, token: &str, key: &str, body: &Value) -> Response {
    app.client
        .post(app.url(REPOSITORIES))
        .bearer_auth(token)
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body).unwrap())
        .send()
        .await
        .expect("request")
}

struct Captured {
    status: u16,
    location: Option<String>,
    content_type: Option<String>,
    replayed: Option<String>,
    body: Vec<u8>,
}

async fn capture(response: Response) -> Captured {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (status, location, content_type, replayed) = (
        response.status().as_u16(),
        header("location"),
        header("content-type"),
        header("idempotent-replayed"),
    );
    Captured {
        status,
        location,
        content_type,
        replayed,
        body: response.bytes().await.unwrap().to_vec(),
    }
}

#[tokio::test]
async fn same_key_and_body_replays_the_first_response() {
    let app = spawn_app().await;
    let token = app.operator();
    let body = json!({"name": "zitadel", "namespace": "zitadel"});

    let first = capture(post_with_key(&app, &token, "key-1", &body).await).await;
    assert_eq!(first.status, 202);
    assert!(first.location.is_some());
    assert_eq!(first.replayed, None, "the first response is not a replay");

    for _ in 0..2 {
        let again = capture(post_with_key(&app, &token, "key-1", &body).await).await;
        assert_eq!(
            again.status, 202,
            "the replay repeats the first status, not the 200 a new request would get"
        );
        assert_eq!(again.location, first.location);
        assert_eq!(again.content_type, first.content_type);
        assert_eq!(
            again.body, first.body,
            "the replay repeats the first body byte for byte"
        );
        assert_eq!(again.replayed.as_deref(), Some("true"));
    }
    // The key may be sent as a structured-field string.
    let quoted = capture(post_with_key(&app, &token, "\"key-1\"", &body).await).await;
    assert_eq!(quoted.status, 202);
    assert_eq!(quoted.body, first.body);

    // Without the key the request is simply the same request again: 200.
    assert_eq!(
        app.post_json(REPOSITORIES, &token, &body).await.status(),
        200
    );
    assert_eq!(count_rows(&app, "jobs").await, 1);
    assert_eq!(count_rows(&app, "backup_repositories").await, 1);

    // Errors are replayed too: a validation failure under a key stays that failure.
    let bad = json!({"name": "Bad", "namespace": "zitadel"});
    let first_bad = capture(post_with_key(&app, &token, "key-bad", &bad).await).await;
    assert_eq!(first_bad.status, 422);
    let again_bad = capture(post_with_key(&app, &token, "key-bad", &bad).await).await;
    assert_eq!(again_bad.status, 422);
    assert_eq!(again_bad.body, first_bad.body);
    assert!(
        again_bad
            .content_type
            .unwrap()
            .starts_with("application/problem+json")
    );
    app.stop().await;
}

#[tokio::test]
async fn same_key_with_a_different_body_is_422() {
    let app = spawn_app().await;
    let token = app.operator();
    let first = post_with_key(
        &app,
        &token,
        "key-2",
        &json!({"name": "zitadel", "namespace": "zitadel"}),
    )
    .await;
    assert_eq!(first.status(), 202);
    let response = post_with_key(
        &app,
        &token,
        "key-2",
        &json!({"name": "holos", "namespace": "holos"}),
    )
    .await;
    let problem = assert_problem(response, 422).await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("Idempotency-Key"),
        "{problem}"
    );
    assert_eq!(
        count_rows(&app, "backup_repositories").await,
        1,
        "the second request did not run"
    );
    // Another path with the same key is another request too.
    let response = app
        .client
        .post(app.url("/v1/jobs/00000000-0000-0000-0000-000000000000/cancel"))
        .bearer_auth(&token)
        .header("idempotency-key", "key-2")
        .send()
        .await
        .unwrap();
    assert_problem(response, 422).await;
    app.stop().await;
}

#[tokio::test]
async fn keys_are_scoped_to_the_caller() {
    let app = spawn_app().await;
    let alice = app.token("alice", &[Role::Operator]);
    let bob = app.token("bob", &[Role::Operator]);
    let response = post_with_key(
        &app,
        &alice,
        "shared",
        &json!({"name": "zitadel", "namespace": "zitadel"}),
    )
    .await;
    assert_eq!(response.status(), 202);
    // Bob's key of the same name is his own: his different request runs.
    let response = post_with_key(
        &app,
        &bob,
        "shared",
        &json!({"name": "holos", "namespace": "holos"}),
    )
    .await;
    assert_eq!(response.status(), 202);
    assert!(response.headers().get("idempotent-replayed").is_none());
    app.stop().await;
}

fn fingerprint(path: &str, body: &[u8]) -> Vec<u8> {
    let mut hash = Sha256::new();
    hash.update("POST");
    hash.update([0]);
    hash.update(path);
    hash.update([0]);
    hash.update(body);
    hash.finalize().to_vec()
}

#[tokio::test]
async fn same_key_while_the_first_is_in_flight_is_409() {
    let app = spawn_app().await;
    let token = app.operator();
    let body = json!({"name": "zitadel", "namespace": "zitadel"});
    let bytes = serde_json::to_vec(&body).unwrap();
    // A claimed key without a response: the first request is still being processed.
    sqlx::query(
        "INSERT INTO idempotency_keys (actor, key, request_hash, method, path) VALUES ($1, $2, $3, 'POST', $4)",
    )
    .bind("operator@test")
    .bind("in-flight")
    .bind(fingerprint(REPOSITORIES, &bytes))
    .bind(REPOSITORIES)
    .execute(&app.db)
    .await
    .unwrap();

    let response = post_with_key(&app, &token, "in-flight", &body).await;
    let problem = assert_problem(response, 409).await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("still being processed"),
        "{problem}"
    );
    assert_eq!(
        count_rows(&app, "backup_repositories").await,
        0,
        "the request did not run"
    );
    // A different body under that key is still a 422, in flight or not.
    let response = post_with_key(
        &app,
        &token,
        "in-flight",
        &json!({"name": "other", "namespace": "other"}),
    )
    .await;
    assert_problem(response, 422).await;

    // Once the first request finishes (its response stored) the key replays that response.
    sqlx::query(
        "UPDATE idempotency_keys SET response_status = 201, response_headers = '[[\"content-type\", \"application/json\"]]',
                response_body = '{\"stored\":true}'::bytea WHERE key = 'in-flight'",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let replay = capture(post_with_key(&app, &token, "in-flight", &body).await).await;
    assert_eq!(replay.status, 201);
    assert_eq!(replay.body, b"{\"stored\":true}");
    assert_eq!(replay.replayed.as_deref(), Some("true"));
    app.stop().await;
}

#[tokio::test]
async fn an_expired_key_is_treated_as_new() {
    let app = spawn_app().await;
    let token = app.operator();
    let body = json!({"name": "zitadel", "namespace": "zitadel"});
    let first = post_with_key(&app, &token, "old-key", &body).await;
    assert_eq!(first.status(), 202);
    // New keys expire in 24 hours.
    let hours: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM expires_at - created_at)::float8 / 3600 FROM idempotency_keys WHERE key = 'old-key'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(
        (hours - 24.0).abs() < 0.01,
        "keys expire after 24 hours, got {hours}"
    );

    sqlx::query("UPDATE idempotency_keys SET expires_at = now() - interval '1 second' WHERE key = 'old-key'")
        .execute(&app.db)
        .await
        .unwrap();
    // Same body: the request runs again and this time finds the repository (200, not a replay).
    let again = post_with_key(&app, &token, "old-key", &body).await;
    assert_eq!(again.status(), 200);
    assert!(again.headers().get("idempotent-replayed").is_none());
    // A different body is not a mismatch either: the expired key carries nothing over.
    sqlx::query("UPDATE idempotency_keys SET expires_at = now() - interval '1 second' WHERE key = 'old-key'")
        .execute(&app.db)
        .await
        .unwrap();
    let other = post_with_key(
        &app,
        &token,
        "old-key",
        &json!({"name": "holos", "namespace": "holos"}),
    )
    .await;
    assert_eq!(other.status(), 202);
    assert!(other.headers().get("idempotent-replayed").is_none());
    // And the renewed key replays the new response.
    let replay = post_with_key(
        &app,
        &token,
        "old-key",
        &json!({"name": "holos", "namespace": "holos"}),
    )
    .await;
    assert_eq!(replay.status(), 202);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let fresh: bool = sqlx::query_scalar("SELECT expires_at > now() + interval '23 hours' FROM idempotency_keys WHERE key = 'old-key'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(fresh, "the reused key got a new 24 h lifetime");
    app.stop().await;
}

#[tokio::test]
async fn a_key_is_checked_only_after_authentication() {
    let app = spawn_app().await;
    let body = json!({"name": "zitadel", "namespace": "zitadel"});
    let response = app
        .client
        .post(app.url(REPOSITORIES))
        .header("idempotency-key", "no-token")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_problem(response, 401).await;
    assert_eq!(
        count_rows(&app, "idempotency_keys").await,
        0,
        "an unauthenticated request claims no key"
    );
    // A key that is not valid is not looked at before the token either: 401, not 400.
    let long = "k".repeat(256);
    for key in ["", "   ", long.as_str()] {
        for token in [None, Some("not-a-jwt")] {
            let mut request = app
                .client
                .post(app.url(REPOSITORIES))
                .header("idempotency-key", key)
                .json(&body);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.unwrap();
            assert_problem(response, 401).await;
        }
    }
    // With a valid token the key is checked: 400.
    let response = post_with_key(&app, &app.operator(), "", &body).await;
    assert_problem(response, 400).await;
    app.stop().await;
}

#[tokio::test]
async fn a_replay_is_authorized_again() {
    let app = spawn_app().await;
    let operator = app.token("alice", &[Role::Operator]);
    let body = json!({"name": "zitadel", "namespace": "zitadel"});
    let first = capture(post_with_key(&app, &operator, "key-roles", &body).await).await;
    assert_eq!(first.status, 202);

    // Alice is a viewer now: the answer stored for her operator request is not replayed.
    let viewer = app.token("alice", &[Role::Viewer]);
    let response = post_with_key(&app, &viewer, "key-roles", &body).await;
    assert!(response.headers().get("idempotent-replayed").is_none());
    let problem = assert_problem(response, 403).await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("needs the role 'operator'"),
        "{problem}"
    );
    let no_roles = app.token("alice", &[]);
    assert_problem(
        post_with_key(&app, &no_roles, "key-roles", &body).await,
        403,
    )
    .await;

    // With the role back (an admin has it too) the stored answer is replayed.
    for token in [operator, app.token("alice", &[Role::Admin])] {
        let again = capture(post_with_key(&app, &token, "key-roles", &body).await).await;
        assert_eq!(again.status, 202);
        assert_eq!(again.body, first.body);
        assert_eq!(again.replayed.as_deref(), Some("true"));
    }
    assert_eq!(count_rows(&app, "jobs").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn refusals_are_not_stored() {
    let app = spawn_app().await;
    let body = json!({"name": "zitadel", "namespace": "zitadel"});
    // A 403 under a key is not kept for 24 hours...
    let viewer = app.token("bob", &[Role::Viewer]);
    assert_problem(post_with_key(&app, &viewer, "key-403", &body).await, 403).await;
    assert_eq!(
        count_rows(&app, "idempotency_keys").await,
        0,
        "a refused request leaves no key"
    );
    // ...so once Bob is an operator the same request under the same key runs.
    let operator = app.token("bob", &[Role::Operator]);
    let response = post_with_key(&app, &operator, "key-403", &body).await;
    assert_eq!(response.status(), 202);
    assert!(response.headers().get("idempotent-replayed").is_none());
    app.stop().await;
}
