//! `GET /v1/jobs/{id}/events` with `Accept: text/event-stream`: a real provisioning's
//! transitions as Server-Sent Events, in order and ending with the job's end; a reconnect with
//! `Last-Event-ID` gets exactly the rest; keep-alive comments; a cancel seen live; the same
//! auth and errors as the job's other routes; CORS for the portal's stream.

use std::time::Duration;

use serde_json::{Value, json};

use crate::http_common::{assert_problem, create_repository, job_id, repository_body};
use crate::support::app::{AppOptions, TestApp, http_args, spawn_app_with};
use crate::support::env::{Env, unique_name};
use crate::support::test_jobs::{self, StepSpec};

const NS: &str = "zitadel";

/// Long enough for a whole provisioning against moto and the kube-apiserver on a busy machine.
const STREAM_DEADLINE: Duration = Duration::from_secs(120);

/// One event as received.
#[derive(Debug, Clone, PartialEq)]
struct Received {
    id: i64,
    event: String,
    data: Value,
}

/// An open event stream, read block by block (a block ends with an empty line).
struct EventStream {
    response: reqwest::Response,
    pending: Vec<u8>,
    /// Comment lines seen so far (`: keep-alive`).
    comments: usize,
}

async fn request(
    app: &TestApp,
    job: &str,
    token: Option<&str>,
    last_event_id: Option<i64>,
) -> reqwest::Response {
    let mut request = app
        .client
        .get(app.url(&format!("/v1/jobs/{job}/events")))
        .header("accept", "text/event-stream");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id.to_string());
    }
    request.send().await.expect("request")
}

impl EventStream {
    async fn open(app: &TestApp, job: &str, last_event_id: Option<i64>) -> EventStream {
        let response = request(app, job, Some(&app.viewer()), last_event_id).await;
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        assert_eq!(response.headers()["x-accel-buffering"], "no");
        EventStream {
            response,
            pending: Vec::new(),
            comments: 0,
        }
    }

    /// The next event; None when the server ended the stream.
    async fn next(&mut self) -> Option<Received> {
        loop {
            while let Some(block) = self.take_block() {
                if let Some(event) = self.parse(&block) {
                    return Some(event);
                }
            }
            if !self.read().await {
                return None;
            }
        }
    }

    /// Reads until a comment arrives; panics on an event.
    async fn until_keep_alive(&mut self) {
        while self.comments == 0 {
            while let Some(block) = self.take_block() {
                let parsed = self.parse(&block);
                assert!(parsed.is_none(), "nothing but keep-alives: {parsed:?}");
            }
            assert!(self.read().await, "the stream stays open");
        }
    }

    /// The next complete block, if one was received.
    fn take_block(&mut self) -> Option<String> {
        let end = self.pending.windows(2).position(|w| w == b"\n\n")?;
        let block: Vec<u8> = self.pending.drain(..end + 2).collect();
        Some(String::from_utf8(block).expect("utf-8"))
    }

    /// Receives a chunk; false when the stream ended.
    async fn read(&mut self) -> bool {
        let chunk = tokio::time::timeout(STREAM_DEADLINE, self.response.chunk())
            .await
            .expect("the stream stays alive")
            .expect("read the stream");
        match chunk {
            Some(chunk) => {
                self.pending.extend_from_slice(&chunk);
                true
            }
            None => false,
        }
    }

    fn parse(&mut self, block: &str) -> Option<Received> {
        let (mut id, mut event, mut data) = (None, None, None);
        for line in block.lines() {
            match line.split_once(':') {
                Some(("", _)) => self.comments += 1,
                Some(("id", value)) => id = Some(value.trim().parse().expect("numeric id")),
                Some(("event", value)) => event = Some(value.trim().to_owned()),
                Some(("data", value)) => data = Some(serde_json::from_str(value).expect("json")),
                _ => {}
            }
        }
        Some(Received {
            id: id?,
            event: event.expect("every event names its type"),
            data: data.expect("every event has data"),
        })
    }

    /// Every event until the server ends the stream.
    async fn rest(&mut self) -> Vec<Received> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}

fn is_job_end(event: &Received) -> bool {
    event.event == "job"
        && ["succeeded", "failed", "cancelled"].contains(&event.data["state"].as_str().unwrap())
}

/// A provisioning followed live: the stream is dropped after three events and resumed with
/// `Last-Event-ID`; together they are exactly the whole stream replayed once the job ended,
/// which shows every step's transitions in order and ends with the job's success.
#[tokio::test]
async fn a_provisioning_streams_every_transition_and_resumes_exactly() {
    // Boxed: the environment's future is large, and the test's own on top of it overflowed
    // the test thread's stack in a debug build.
    let env = Box::pin(Env::start(&[NS])).await;
    let app = &env.app;
    let name = unique_name("events");
    let body = json!({"name": name, "namespace": env.ns(NS)});
    let job = job_id(&create_repository(app, &app.operator(), &body).await);

    let mut live = EventStream::open(app, &job, None).await;
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(live.next().await.expect("three events before the end"));
    }
    drop(live);
    let resumed_after = first.last().unwrap().id;
    let rest = EventStream::open(app, &job, Some(resumed_after))
        .await
        .rest()
        .await;
    let followed: Vec<Received> = first.into_iter().chain(rest).collect();

    let replayed = EventStream::open(app, &job, None).await.rest().await;
    assert_eq!(
        followed, replayed,
        "no gap and no duplicate across the reconnect"
    );
    Box::pin(assert_in_order_with_every_step(app, &job, &replayed)).await;

    // From the middle of an ended job: exactly what came after.
    let middle = replayed.len() / 2;
    let after_middle = EventStream::open(app, &job, Some(replayed[middle].id))
        .await
        .rest()
        .await;
    assert_eq!(after_middle, replayed[middle + 1..]);
    // A client that has the final event gets 204: a browser's EventSource stops reconnecting.
    let done = request(
        app,
        &job,
        Some(&app.viewer()),
        Some(replayed.last().unwrap().id),
    )
    .await;
    assert_eq!(done.status(), 204);
}

async fn assert_in_order_with_every_step(app: &TestApp, job: &str, events: &[Received]) {
    let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids grow: {ids:?}");
    let last = events.last().expect("events");
    assert!(is_job_end(last), "the job's end comes last: {last:?}");
    assert_eq!(last.data["state"], "succeeded");
    assert_eq!(last.data["id"], job);
    assert_eq!(last.data["kind"], "provision-repository");
    assert_eq!(events.iter().filter(|e| is_job_end(e)).count(), 1);
    let job_states: Vec<&str> = events
        .iter()
        .filter(|e| e.event == "job")
        .map(|e| e.data["state"].as_str().unwrap())
        .collect();
    assert_eq!(job_states, ["queued", "running", "succeeded"]);

    let view: Value = app
        .get(&format!("/v1/jobs/{job}"), &app.viewer())
        .await
        .json()
        .await
        .unwrap();
    let steps = view["steps"].as_array().expect("steps");
    assert!(steps.len() >= 8, "{view}");
    for step in steps {
        let name = step["name"].as_str().unwrap();
        let states: Vec<&str> = events
            .iter()
            .filter(|e| e.event == "step" && e.data["name"] == name)
            .map(|e| e.data["state"].as_str().unwrap())
            .collect();
        // Each attempt: running, then its outcome; the last outcome is the view's.
        assert_eq!(states.first(), Some(&"running"), "{name}: {states:?}");
        assert_eq!(states.last().copied(), step["state"].as_str(), "{name}");
        assert_eq!(states.len() % 2, 0, "{name}: {states:?}");
        let finished = events
            .iter()
            .rfind(|e| e.event == "step" && e.data["name"] == name)
            .unwrap();
        assert_eq!(finished.data["attempts"], step["attempts"], "{name}");
        assert_eq!(finished.data["job_id"], job);
        assert!(finished.data["duration_ms"].is_i64(), "{finished:?}");
    }
}

/// Without workers the job stays queued: the stream shows it queued, sends keep-alive comments
/// while nothing happens, and ends with the cancel an operator makes meanwhile.
#[tokio::test]
async fn keep_alives_while_queued_and_a_cancel_ends_the_stream() {
    let mut http = http_args();
    http.event_stream_keep_alive = Duration::from_millis(50);
    let app = spawn_app_with(AppOptions {
        http,
        ..AppOptions::default()
    })
    .await;
    let job = job_id(&create_repository(&app, &app.operator(), &repository_body(NS)).await);

    let mut stream = EventStream::open(&app, &job, None).await;
    let queued = stream.next().await.expect("the job's first event");
    assert_eq!(
        (queued.event.as_str(), &queued.data["state"]),
        ("job", &json!("queued"))
    );
    // Nothing happens to a queued job without workers: keep-alives come.
    stream.until_keep_alive().await;

    let cancelled = app
        .client
        .post(app.url(&format!("/v1/jobs/{job}/cancel")))
        .bearer_auth(app.operator())
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 202);
    let rest = stream.rest().await;
    let last = rest.last().expect("the cancel arrives live");
    assert_eq!(
        (last.event.as_str(), &last.data["state"]),
        ("job", &json!("cancelled"))
    );
    assert!(last.id > queued.id);
    app.stop().await;
}

/// The stream has the auth and errors of the job's other routes; a plain GET still answers
/// the audit page; the portal's origin may open it cross-origin, another may not.
#[tokio::test]
async fn auth_errors_json_fallback_and_cors() {
    let app = spawn_app_with(AppOptions::default()).await;
    let job = job_id(&create_repository(&app, &app.operator(), &repository_body(NS)).await);
    let viewer = app.viewer();

    let unknown = uuid::Uuid::new_v4().to_string();
    assert_problem(request(&app, &unknown, Some(&viewer), None).await, 404).await;
    assert_problem(request(&app, &job, None, None).await, 401).await;
    let bad_id = app
        .client
        .get(app.url(&format!("/v1/jobs/{job}/events")))
        .header("accept", "text/event-stream")
        .header("last-event-id", "not-a-number")
        .bearer_auth(&viewer)
        .send()
        .await
        .unwrap();
    assert_problem(bad_id, 400).await;

    let page = app.get(&format!("/v1/jobs/{job}/events"), &viewer).await;
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let page: Value = page.json().await.unwrap();
    assert!(page["items"].is_array(), "{page}");

    let preflight = |origin: &'static str| {
        app.client
            .request(
                reqwest::Method::OPTIONS,
                app.url(&format!("/v1/jobs/{job}/events")),
            )
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header(
                "access-control-request-headers",
                "authorization, last-event-id",
            )
            .send()
    };
    let allowed = preflight("https://portal.example.com").await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://portal.example.com"
    );
    let headers = allowed.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(
        headers.contains("last-event-id") && headers.contains("authorization"),
        "{headers}"
    );
    let other = preflight("https://elsewhere.example.com").await.unwrap();
    assert!(other.status().as_u16() < 500);
    let cors: Vec<_> = other
        .headers()
        .keys()
        .filter(|name| name.as_str().starts_with("access-control-"))
        .collect();
    assert!(
        cors.is_empty(),
        "no CORS headers for another origin: {cors:?}"
    );
    app.stop().await;
}

fn states(events: &[Received], kind: &str, name: Option<&str>) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.event == kind && name.is_none_or(|n| e.data["name"] == n))
        .map(|e| e.data["state"].as_str().unwrap().to_owned())
        .collect()
}

/// A retried step and a job queued again for its backoff do not end the stream; a job that
/// failed ends it, and after an operator's retry the stream resumed from that end goes on to
/// the job's new end.
#[tokio::test]
async fn retries_and_a_retried_failure_continue_the_stream() {
    let app = spawn_app_with(AppOptions::default()).await;
    test_jobs::install(&app.db).await;
    let steps = vec![
        StepSpec::new("a").fail_retryable(1),
        StepSpec::new("b").fail_permanent(1),
    ];
    let job = test_jobs::enqueue(&app.db, steps, 5).await.to_string();
    let mut stream = EventStream::open(&app, &job, None).await;
    let pool = test_jobs::start_pool(&app.database_url, test_jobs::worker_config("w1", 1)).await;

    let first = stream.rest().await;
    assert_eq!(
        states(&first, "job", None),
        ["queued", "running", "queued", "running", "failed"]
    );
    assert_eq!(
        states(&first, "step", Some("a")),
        ["running", "failed", "running", "succeeded"]
    );
    assert_eq!(states(&first, "step", Some("b")), ["running", "failed"]);

    let retried = app
        .client
        .post(app.url(&format!("/v1/jobs/{job}/retry")))
        .bearer_auth(app.operator())
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), 202);
    let failed_at = first.last().unwrap().id;
    let after = EventStream::open(&app, &job, Some(failed_at))
        .await
        .rest()
        .await;
    assert_eq!(
        states(&after, "job", None),
        ["queued", "running", "succeeded"]
    );
    // b was set back to pending by the retry, then ran again; a (succeeded) did not.
    assert_eq!(
        states(&after, "step", Some("b")),
        ["pending", "running", "succeeded"]
    );
    assert!(states(&after, "step", Some("a")).is_empty());
    pool.stop().await;
    app.stop().await;
}
