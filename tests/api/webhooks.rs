//! Signed webhooks (issue 13 item 2): a job-starting request's `callback_url` gets the job's end
//! as one Standard Webhooks event, checked here by an independent implementation (the
//! `standardwebhooks` crate) in a receiver on a local port; failures are retried and every
//! attempt is listed at `GET /v1/jobs/{id}/deliveries`; a redirect is not followed; a
//! destination not in `BP_WEBHOOK_ALLOWED_HOSTS` or a callback without `BP_WEBHOOK_SECRET` is
//! refused at request time.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use backup_provisioner::config::{WebhookArgs, WorkerSettingsArgs};
use base64::Engine;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::support::app::{AppOptions, TestApp, eventually, spawn_app_with, worker_args};
use crate::support::env::{Env, unique_name};

/// One POST the receiver got.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    id: String,
    body: Value,
    /// The independent implementation accepted its signature.
    verified: bool,
}

struct ReceiverState {
    verifier: standardwebhooks::Webhook,
    /// Answers to give, in order; 200 once they are used up.
    script: Mutex<VecDeque<StatusCode>>,
    received: Mutex<Vec<Received>>,
    redirect_to: String,
}

/// A webhook receiver on a local port.
struct Receiver {
    url: String,
    /// `host:port`, for `BP_WEBHOOK_ALLOWED_HOSTS`.
    authority: String,
    state: Arc<ReceiverState>,
    stop: CancellationToken,
}

impl Receiver {
    async fn start(secret: &str, script: &[StatusCode]) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let authority = listener.local_addr().expect("address").to_string();
        let state = Arc::new(ReceiverState {
            verifier: standardwebhooks::Webhook::new(secret).expect("secret"),
            script: Mutex::new(script.iter().copied().collect()),
            received: Mutex::new(Vec::new()),
            redirect_to: format!("http://{authority}/elsewhere"),
        });
        let router = Router::new()
            .route("/hook", post(hook))
            .route("/elsewhere", post(elsewhere))
            .with_state(state.clone());
        let stop = CancellationToken::new();
        let signal = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(signal)
                .await;
        });
        Receiver {
            url: format!("http://{authority}/hook"),
            authority,
            state,
            stop,
        }
    }

    fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn record(state: &ReceiverState, path: &str, headers: &HeaderMap, body: &Bytes) {
    let verified = state.verifier.verify(body, headers).is_ok();
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = serde_json::from_slice(body).unwrap_or(Value::Null);
    state.received.lock().unwrap().push(Received {
        path: path.to_owned(),
        id,
        body,
        verified,
    });
}

async fn hook(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(&state, "/hook", &headers, &body);
    let status = state
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(StatusCode::OK);
    if status.is_redirection() {
        return (status, [(header::LOCATION, state.redirect_to.clone())]).into_response();
    }
    status.into_response()
}

async fn elsewhere(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    record(&state, "/elsewhere", &headers, &body);
    StatusCode::OK
}

/// A fresh `whsec_` secret.
fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// Webhooks on, to `receiver` over plain HTTP, retried quickly.
fn webhooks_to(receiver: &Receiver, secret: &str) -> WebhookArgs {
    WebhookArgs {
        webhook_secret: Some(secret.to_owned().into()),
        webhook_allowed_hosts: vec![format!("http://{}", receiver.authority)],
        webhook_timeout: Duration::from_secs(5),
        webhook_retry_base: Duration::from_millis(50),
        webhook_retry_window: Duration::from_secs(3600),
    }
}

async fn env_sending_to(receiver: &Receiver, secret: &str) -> Env {
    let webhooks = webhooks_to(receiver, secret);
    // Boxed: in a debug build the environment's start is a large future, and the test thread's
    // stack (2 MiB) also polls the service's tasks (a stack overflow was seen once without it).
    let start = Env::builder(&["zitadel"])
        .map_worker(move |worker| worker.webhooks = webhooks)
        .start();
    Box::pin(start).await
}

/// Creates repository `name` with `callback_url`; returns the job id once the job ended.
async fn create_with_callback(env: &Env, name: &str, callback_url: &str) -> (String, Value) {
    let body = json!({
        "name": name, "namespace": env.ns("zitadel"), "callback_url": callback_url,
    });
    let response = env
        .app
        .post_json("/v1/backup-repositories", &env.app.operator(), &body)
        .await;
    let status = response.status();
    let created: Value = response.json().await.expect("json");
    assert_eq!(status, 202, "{created}");
    let job_id = created["job"]["id"].as_str().expect("job id").to_owned();
    let job = env.app.wait_for_job(&job_id, Duration::from_secs(90)).await;
    (job_id, job)
}

async fn deliveries(app: &TestApp, job_id: &str) -> Value {
    let response = app
        .get(&format!("/v1/jobs/{job_id}/deliveries"), &app.viewer())
        .await;
    assert_eq!(response.status(), 200);
    response.json().await.expect("json")
}

/// Waits until the job's only delivery is no longer pending; returns it.
async fn settled_delivery(app: &TestApp, job_id: &str) -> Value {
    eventually(Duration::from_secs(60), "the delivery settles", || async {
        let list = deliveries(app, job_id).await;
        let items = list["items"].as_array().cloned().unwrap_or_default();
        match items.as_slice() {
            [only] if only["state"] != "pending" => Some(only.clone()),
            [_] | [] => None,
            more => panic!("one delivery per job end, got {more:?}"),
        }
    })
    .await
}

#[tokio::test]
async fn a_created_repository_reports_its_end_once_signed() {
    let secret = new_secret();
    let receiver = Receiver::start(&secret, &[]).await;
    let env = env_sending_to(&receiver, &secret).await;
    let name = unique_name("hooked");
    let (job_id, job) = create_with_callback(&env, &name, &receiver.url).await;
    assert_eq!(job["state"], "succeeded", "{job}");

    let delivery = settled_delivery(&env.app, &job_id).await;
    assert_eq!(delivery["state"], "delivered", "{delivery}");
    assert_eq!(delivery["event_type"], "job.succeeded");
    let attempts = delivery["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 1, "{delivery}");
    assert_eq!(attempts[0]["status_code"], 200);

    let received = receiver.received();
    assert_eq!(received.len(), 1, "exactly the job's end: {received:?}");
    let event = &received[0];
    assert!(event.verified, "the signature verifies independently");
    assert_eq!(event.id, delivery["id"].as_str().unwrap());
    assert_eq!(event.body["type"], "job.succeeded");
    assert_eq!(event.body["data"]["job_id"], job_id);
    assert_eq!(event.body["data"]["kind"], "provision-repository");
    assert_eq!(event.body["data"]["repository"], name);
    assert_eq!(event.body["data"]["state"], "succeeded");
    assert_eq!(event.body["data"]["job_url"], format!("/v1/jobs/{job_id}"));
    assert_eq!(event.body, delivery["payload"]);
    let text = event.body.to_string();
    assert!(!text.contains(secret.trim_start_matches("whsec_")));

    // The request's audit entry names the callback.
    let audited: Option<String> = sqlx::query_scalar(
        "SELECT detail->>'callback_url' FROM audit_events
          WHERE job_id = $1::text::uuid AND action = 'repository.create'",
    )
    .bind(&job_id)
    .fetch_one(&env.app.db)
    .await
    .expect("audit entry");
    assert_eq!(audited.as_deref(), Some(receiver.url.as_str()));
    env.app.stop().await;
}

#[tokio::test]
async fn a_failing_receiver_gets_the_event_once_it_recovers_and_every_attempt_is_listed() {
    let secret = new_secret();
    let failures = [
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::SERVICE_UNAVAILABLE,
    ];
    let receiver = Receiver::start(&secret, &failures).await;
    let env = env_sending_to(&receiver, &secret).await;
    let (job_id, _) = create_with_callback(&env, &unique_name("retried"), &receiver.url).await;

    let delivery = settled_delivery(&env.app, &job_id).await;
    assert_eq!(delivery["state"], "delivered", "{delivery}");
    let attempts = delivery["attempts"].as_array().expect("attempts");
    let codes: Vec<&Value> = attempts.iter().map(|a| &a["status_code"]).collect();
    assert_eq!(codes, [&json!(500), &json!(503), &json!(200)], "{delivery}");
    assert!(attempts[0]["error"].as_str().unwrap().contains("500"));
    assert!(attempts[2].get("error").is_none());
    let numbers: Vec<i64> = attempts
        .iter()
        .map(|a| a["attempt"].as_i64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2, 3]);

    let received = receiver.received();
    assert_eq!(received.len(), 3, "{received:?}");
    assert!(
        received.iter().all(|r| r.verified),
        "every attempt is signed"
    );
    assert!(
        received
            .iter()
            .all(|r| r.id == delivery["id"].as_str().unwrap()),
        "the webhook-id is stable across attempts"
    );
    env.app.stop().await;
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_counts_as_a_failed_attempt() {
    let secret = new_secret();
    let receiver = Receiver::start(&secret, &[StatusCode::FOUND]).await;
    let env = env_sending_to(&receiver, &secret).await;
    let (job_id, _) = create_with_callback(&env, &unique_name("redirected"), &receiver.url).await;

    let delivery = settled_delivery(&env.app, &job_id).await;
    let attempts = delivery["attempts"].as_array().expect("attempts");
    assert_eq!(attempts[0]["status_code"], 302, "{delivery}");
    let error = attempts[0]["error"].as_str().expect("error");
    assert!(error.contains("redirects are not followed"), "{error}");
    assert_eq!(
        delivery["state"], "delivered",
        "retried at the callback URL itself"
    );
    assert!(
        receiver.received().iter().all(|r| r.path == "/hook"),
        "the redirect's target was never requested"
    );
    env.app.stop().await;
}

/// An API (no workers, no AWS) with webhooks on, allowing https to `holos.example.com` only.
async fn api_with_webhooks(secret: Option<&str>) -> TestApp {
    let worker = WorkerSettingsArgs {
        webhooks: WebhookArgs {
            webhook_secret: secret.map(|s| s.to_owned().into()),
            webhook_allowed_hosts: vec!["holos.example.com".into()],
            ..WebhookArgs::default()
        },
        ..worker_args(0)
    };
    spawn_app_with(AppOptions {
        worker,
        ..AppOptions::default()
    })
    .await
}

async fn assert_refused(response: reqwest::Response, why: &str) {
    assert_eq!(response.status(), 422);
    let content_type = response.headers()[header::CONTENT_TYPE.as_str()].clone();
    assert_eq!(content_type, "application/problem+json");
    let problem: Value = response.json().await.expect("json");
    assert_eq!(problem["errors"][0]["field"], "callback_url", "{problem}");
    let message = problem["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains(why), "{why}: {problem}");
}

#[tokio::test]
async fn a_callback_to_a_host_not_allowed_is_refused_at_request_time_and_nothing_is_created() {
    let app = api_with_webhooks(Some(&new_secret())).await;
    let operator = app.operator();
    let refused = [
        (
            "https://evil.example.com/hook",
            "not an allowed webhook destination",
        ),
        (
            "https://holos.example.com:8443/hook",
            "not an allowed webhook destination",
        ),
        ("http://holos.example.com/hook", "plain http"),
        (
            "https://user:pw@holos.example.com/hook",
            "user name or password",
        ),
        ("/relative", "absolute https URL"),
    ];
    for (url, why) in refused {
        let body = json!({"name": "zitadel", "namespace": "zitadel", "callback_url": url});
        let response = app
            .post_json("/v1/backup-repositories", &operator, &body)
            .await;
        assert_refused(response, why).await;
    }
    // Nothing was stored, queued or audited.
    let repositories: i64 = sqlx::query_scalar("SELECT count(*) FROM backup_repositories")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!((repositories, jobs), (0, 0));

    // Every job-starting request checks its callback before anything else is looked up.
    let body = json!({"callback_url": "https://evil.example.com/hook"});
    for path in ["reconcile", "verify", "rotate-key"] {
        let path = format!("/v1/backup-repositories/zitadel/{path}");
        assert_refused(
            app.post_json(&path, &operator, &body).await,
            "not an allowed",
        )
        .await;
    }
    let deleted = app
        .client
        .delete(app.url("/v1/backup-repositories/zitadel"))
        .bearer_auth(app.token("admin@test", &[backup_provisioner::auth::Role::Admin]))
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_refused(deleted, "not an allowed").await;

    // An unknown job has no deliveries: a 404 problem.
    let unknown = app
        .get(
            &format!("/v1/jobs/{}/deliveries", uuid::Uuid::new_v4()),
            &app.viewer(),
        )
        .await;
    assert_eq!(unknown.status(), 404);
    assert_eq!(
        unknown.headers()[header::CONTENT_TYPE.as_str()],
        "application/problem+json"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_callback_without_a_webhook_secret_is_refused() {
    let app = api_with_webhooks(None).await;
    let body = json!({
        "name": "zitadel", "namespace": "zitadel",
        "callback_url": "https://holos.example.com/hook",
    });
    let response = app
        .post_json("/v1/backup-repositories", &app.operator(), &body)
        .await;
    assert_refused(response, "BP_WEBHOOK_SECRET").await;
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(jobs, 0);
    app.stop().await;
}

/// A service whose workers run no job kind (a queued job stays queued until cancelled) and
/// whose sender sends to `receiver`, giving up after `window`.
async fn idle_workers_sending_to(receiver: &Receiver, secret: &str, window: Duration) -> TestApp {
    let worker = WorkerSettingsArgs {
        webhooks: WebhookArgs {
            webhook_retry_window: window,
            ..webhooks_to(receiver, secret)
        },
        ..worker_args(1)
    };
    spawn_app_with(AppOptions {
        worker,
        ..AppOptions::default()
    })
    .await
}

/// Queues a provisioning with `callback_url` and cancels it while queued; returns the job id.
async fn cancelled_job(app: &TestApp, callback_url: &str) -> String {
    let body = json!({"name": "zitadel", "namespace": "zitadel", "callback_url": callback_url});
    let operator = app.operator();
    let created: Value = app
        .post_json("/v1/backup-repositories", &operator, &body)
        .await
        .json()
        .await
        .expect("json");
    let job_id = created["job"]["id"].as_str().expect("job id").to_owned();
    let path = format!("/v1/jobs/{job_id}/cancel");
    let response = app.post_json(&path, &operator, &json!({})).await;
    assert_eq!(response.status(), 202);
    job_id
}

#[tokio::test]
async fn a_job_cancelled_while_queued_reports_its_cancellation() {
    let secret = new_secret();
    let receiver = Receiver::start(&secret, &[]).await;
    let app = idle_workers_sending_to(&receiver, &secret, Duration::from_secs(3600)).await;
    let job_id = cancelled_job(&app, &receiver.url).await;
    let delivery = settled_delivery(&app, &job_id).await;
    assert_eq!(delivery["state"], "delivered", "{delivery}");
    assert_eq!(delivery["event_type"], "job.cancelled");
    let received = receiver.received();
    assert_eq!(received.len(), 1, "{received:?}");
    assert!(received[0].verified);
    assert_eq!(received[0].body["data"]["state"], "cancelled");
    assert_eq!(received[0].body["data"]["repository"], "zitadel");
    app.stop().await;
}

#[tokio::test]
async fn a_delivery_never_answered_2xx_fails_after_the_retry_window() {
    let secret = new_secret();
    let always_failing = [StatusCode::INTERNAL_SERVER_ERROR; 1000];
    let receiver = Receiver::start(&secret, &always_failing).await;
    let app = idle_workers_sending_to(&receiver, &secret, Duration::from_millis(500)).await;
    let job_id = cancelled_job(&app, &receiver.url).await;
    let delivery = settled_delivery(&app, &job_id).await;
    assert_eq!(delivery["state"], "failed", "{delivery}");
    assert!(delivery.get("next_attempt_at").is_none());
    assert!(delivery["finished_at"].is_string());
    let attempts = delivery["attempts"].as_array().expect("attempts");
    assert!(!attempts.is_empty());
    assert!(
        attempts.iter().all(|a| a["status_code"] == 500),
        "{delivery}"
    );
    assert_eq!(receiver.received().len(), attempts.len());
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("backup_provisioner_webhook_deliveries{state=\"failed\"} 1"),
        "{metrics}"
    );
    app.stop().await;
}

/// A create answered 200 (the repository exists as asked, its job still queued) queues
/// nothing: its `callback_url` goes to that job, which had none, and the job's end is
/// delivered there. A later one, the job having its callback, is not registered.
#[tokio::test]
async fn a_callback_on_a_repeated_create_is_attached_to_the_active_job_without_one() {
    let secret = new_secret();
    let receiver = Receiver::start(&secret, &[]).await;
    let app = idle_workers_sending_to(&receiver, &secret, Duration::from_secs(3600)).await;
    let operator = app.operator();
    let create = |callback_url: Option<&str>| {
        let mut body = json!({"name": "zitadel", "namespace": "zitadel"});
        if let Some(url) = callback_url {
            body["callback_url"] = url.into();
        }
        let (app, operator) = (&app, &operator);
        async move {
            let response = app
                .post_json("/v1/backup-repositories", operator, &body)
                .await;
            let status = response.status().as_u16();
            let answer: Value = response.json().await.expect("json");
            (
                status,
                answer["job"]["id"].as_str().expect("job id").to_owned(),
            )
        }
    };
    let (status, job_id) = create(None).await;
    assert_eq!(status, 202);
    let (status, again) = create(Some(&receiver.url)).await;
    assert_eq!((status, &again), (200, &job_id));
    let elsewhere = format!("http://{}/elsewhere", receiver.authority);
    let (status, again) = create(Some(&elsewhere)).await;
    assert_eq!((status, &again), (200, &job_id));
    let path = format!("/v1/jobs/{job_id}/cancel");
    let response = app.post_json(&path, &operator, &json!({})).await;
    assert_eq!(response.status(), 202);
    let delivery = settled_delivery(&app, &job_id).await;
    assert_eq!(delivery["state"], "delivered", "{delivery}");
    assert_eq!(delivery["event_type"], "job.cancelled");
    let received = receiver.received();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0].path, "/hook");
    assert!(received[0].verified);
    app.stop().await;
}
