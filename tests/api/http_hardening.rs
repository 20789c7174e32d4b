//! Security hardening of the HTTP layer (issue "Security hardening", items 1, 3, 4, 7, 8, 10):
//! metric labels from a closed set, slow clients cut off, client request ids bounded and kept
//! apart from the server's, `no-store`/`nosniff` headers, problem+json for every error (hyper's
//! own answers too), and rate limits on mutations.

use std::net::SocketAddr;
use std::time::Duration;

use backup_provisioner::auth::Role;
use backup_provisioner::config::HttpArgs;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::http_common::{
    REPOSITORIES, assert_problem, create_repository, job_id, repository_body,
};
use crate::support::app::{AppOptions, TestApp, eventually, http_args, spawn_app, spawn_app_with};

async fn app_with(configure: impl FnOnce(&mut HttpArgs)) -> TestApp {
    let mut http = http_args();
    configure(&mut http);
    spawn_app_with(AppOptions {
        http,
        ..AppOptions::default()
    })
    .await
}

/// A random extension method of `len` token characters.
fn odd_method(len: usize) -> String {
    let seed = uuid::Uuid::new_v4().simple().to_string().to_uppercase();
    let mut method = String::from("X");
    while method.len() < len {
        method.push_str(&seed);
    }
    method.truncate(len);
    method
}

async fn metrics_text(app: &TestApp) -> String {
    let response = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

/// Every value of `label` in the Prometheus text.
fn label_values(metrics: &str, label: &str) -> std::collections::BTreeSet<String> {
    let needle = format!("{label}=\"");
    let mut values = std::collections::BTreeSet::new();
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let mut rest = line;
        while let Some(start) = rest.find(&needle) {
            let tail = &rest[start + needle.len()..];
            let end = tail.find('"').unwrap_or(tail.len());
            values.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    values
}

// -------------------------------------------------------------------------------------------
// 1. Metric labels from a closed set

#[tokio::test]
async fn odd_methods_and_paths_do_not_grow_the_metrics() {
    let app = spawn_app().await;
    let before = metrics_text(&app).await.len();
    let mut methods = Vec::new();
    for i in 0..20 {
        let method = odd_method(2000);
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        for path in [REPOSITORIES.to_owned(), format!("/nowhere-{i}")] {
            let response = app.client.request(m.clone(), app.url(&path)).send().await;
            let status = response.unwrap().status().as_u16();
            assert!((400..500).contains(&status), "{path}: {status}");
        }
        methods.push(method);
    }
    let metrics = metrics_text(&app).await;
    for method in &methods {
        assert!(
            !metrics.contains(&method[..40]),
            "a raw method became a label"
        );
    }
    let known = [
        "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other",
    ];
    for value in label_values(&metrics, "method") {
        assert!(known.contains(&value.as_str()), "method label {value:?}");
    }
    for value in label_values(&metrics, "route") {
        assert!(
            value == "unmatched" || value.starts_with('/') && !value.contains("nowhere"),
            "route label {value:?}"
        );
    }
    eprintln!(
        "/metrics before 40 requests with 2 KB methods: {before} bytes, after: {}",
        metrics.len()
    );
    // 40 requests added at most a few label sets (405 and 404 as `other`).
    assert!(
        metrics.len() < before + 16 * 1024,
        "/metrics grew from {before} to {} bytes",
        metrics.len()
    );
    app.stop().await;
}

/// The attack: 20 requests with 300 KB method names. They are refused (431, the head
/// is over BP_MAX_HEADER_BYTES) and `/metrics` stays small.
#[tokio::test]
async fn the_300kb_method_attack_leaves_metrics_small() {
    let app = spawn_app().await;
    for _ in 0..20 {
        let request = format!(
            "{} /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            odd_method(300_000)
        );
        assert_raw_problem(&raw_exchange(app.addr, request.as_bytes()).await, 431);
    }
    let metrics = metrics_text(&app).await;
    eprintln!(
        "/metrics after 20 requests with 300 KB methods: {} bytes",
        metrics.len()
    );
    assert!(
        metrics.len() < 64 * 1024,
        "/metrics is {} bytes",
        metrics.len()
    );
    app.stop().await;
}

// -------------------------------------------------------------------------------------------
// Raw HTTP/1.1 over TCP (for what reqwest would not send, and to see hyper's own answers)

#[derive(Debug)]
struct RawResponse {
    /// 0: the server closed without an answer.
    status: u16,
    head: String,
    body: String,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends `request` on a new connection and reads until the server closes it (or 10 s pass).
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before reading all of a request it refuses.
    let _ = stream.write_all(request).await;
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let until = Instant::now() + Duration::from_secs(10);
    while let Ok(Ok(n)) = tokio::time::timeout_at(until, stream.read(&mut chunk)).await {
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    RawResponse {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

fn assert_raw_problem(response: &RawResponse, status: u16) -> Value {
    assert_eq!(response.status, status, "{response:?}");
    assert_eq!(
        response.header("content-type"),
        Some("application/problem+json"),
        "{response:?}"
    );
    assert!(response.header("x-request-id").is_some(), "{response:?}");
    let problem: Value = serde_json::from_str(&response.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {response:?}"));
    assert_eq!(problem["status"], json!(status), "{problem}");
    for field in ["type", "title", "detail"] {
        assert!(
            problem[field].as_str().is_some_and(|s| !s.is_empty()),
            "{problem}"
        );
    }
    problem
}

// -------------------------------------------------------------------------------------------
// 3. Slow clients

const HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// Waits until the server closes `stream` (read returns 0 or an error); false at the deadline.
async fn closed_by_server(stream: &mut TcpStream, until: Instant) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // Bytes of an answer (a 408 would do): keep reading until the close.
            Ok(Ok(_)) => continue,
        }
    }
}

/// On a new connection each time: a pooled one left idle for the header timeout is being
/// closed by the server (as it should: `an_idle_keep_alive_connection_is_closed`), and a
/// request sent on it at that moment races the close.
async fn healthz_ok(app: &TestApp) {
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let response = fresh
        .get(app.url("/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("a normal request is served");
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn slow_clients_are_cut_off_while_others_are_served() {
    let app = app_with(|http| http.header_read_timeout = HEADER_TIMEOUT).await;
    let started = Instant::now();
    let mut slow = Vec::new();
    for i in 0..300 {
        let mut stream = TcpStream::connect(app.addr).await.unwrap();
        // A partial request line, or (one in ten) nothing at all.
        if i % 10 != 0 {
            stream.write_all(b"GET /healthz HT").await.unwrap();
        }
        slow.push(stream);
    }
    healthz_ok(&app).await;
    let until = started + HEADER_TIMEOUT + Duration::from_secs(10);
    let mut held = 0;
    for stream in &mut slow {
        if !closed_by_server(stream, until).await {
            held += 1;
        }
    }
    eprintln!(
        "300 slow connections: {held} still held {:?} after the first",
        started.elapsed()
    );
    assert_eq!(
        held, 0,
        "the server still holds {held} of 300 slow connections"
    );
    healthz_ok(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let app = app_with(|http| http.header_read_timeout = HEADER_TIMEOUT).await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let until = Instant::now() + HEADER_TIMEOUT + Duration::from_secs(10);
    assert!(
        closed_by_server(&mut stream, until).await,
        "an idle keep-alive connection is kept beyond the header timeout"
    );
    app.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_free_slot() {
    let timeout = Duration::from_secs(4);
    let app = app_with(|http| {
        http.header_read_timeout = timeout;
        http.max_connections = 20;
    })
    .await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(app.addr).await.unwrap());
    }
    // Every slot is taken until the silent connections time out: a request waits.
    let waited = app
        .client
        .get(app.url("/healthz"))
        .timeout(Duration::from_secs(1))
        .send()
        .await;
    assert!(waited.is_err(), "a 21st connection was served: {waited:?}");
    // Once they are cut off, requests are served again.
    let until = Instant::now() + timeout + Duration::from_secs(10);
    for stream in &mut silent {
        assert!(closed_by_server(stream, until).await);
    }
    healthz_ok(&app).await;
    app.stop().await;
}

/// The server (`src/http/server.rs`) still shuts down gracefully: a request in flight
/// (held here on a table lock) finishes, new connections are refused, and the server returns.
#[tokio::test]
async fn shutdown_lets_a_request_in_flight_finish_and_refuses_new_connections() {
    let mut app = spawn_app().await;
    let created = create_repository(&app, &app.operator(), &repository_body("zitadel")).await;
    let mut lock = app.db.begin().await.unwrap();
    sqlx::query("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let request = tokio::spawn(
        reqwest::Client::new()
            .get(app.url(&format!("/v1/jobs/{}", job_id(&created))))
            .bearer_auth(app.viewer())
            .send(),
    );
    let db = app.db.clone();
    eventually(
        Duration::from_secs(10),
        "the request waits for the lock",
        || {
            let db = db.clone();
            async move {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .fetch_one(&db)
                .await
                .unwrap();
                (waiting > 0).then_some(())
            }
        },
    )
    .await;
    app.shutdown.cancel();
    let addr = app.addr;
    eventually(
        Duration::from_secs(10),
        "new connections are refused",
        || async move { TcpStream::connect(addr).await.is_err().then_some(()) },
    )
    .await;
    lock.commit().await.unwrap();
    let response = request
        .await
        .unwrap()
        .expect("the request in flight is answered");
    assert_eq!(response.status(), 200);
    tokio::time::timeout(Duration::from_secs(10), &mut app.server)
        .await
        .expect("the server stops once its last request is answered")
        .unwrap();
}

// -------------------------------------------------------------------------------------------
// 4. Request ids

fn is_safe_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

async fn post_with_request_id(app: &TestApp, token: &str, id: &str, name: &str) -> String {
    let response = app
        .client
        .post(app.url(REPOSITORIES))
        .bearer_auth(token)
        .header("x-request-id", id)
        .json(&repository_body(name))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// (request_id, client_request_id) of the audit entry of repository `name`.
async fn audit_ids(app: &TestApp, name: &str) -> (String, Option<String>) {
    sqlx::query_as("SELECT request_id, client_request_id FROM audit_events WHERE repository = $1")
        .bind(name)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn long_or_unsafe_client_request_ids_are_replaced() {
    let app = spawn_app().await;
    let token = app.operator();
    let long = "a".repeat(8000);
    let cases = [
        ("long", long.as_str()),
        ("space", "two words"),
        ("markup", "<script>alert(1)</script>"),
        ("quote", "a\"b"),
        ("over128", &long[..129]),
    ];
    for (name, sent) in cases {
        let echoed = post_with_request_id(&app, &token, sent, name).await;
        assert_ne!(echoed, sent, "{name}: echoed as sent");
        assert!(is_safe_id(&echoed), "{name}: echoed {echoed:?}");
        let (stored, client) = audit_ids(&app, name).await;
        assert_eq!(
            stored, echoed,
            "{name}: the audit log keeps the server's id"
        );
        assert_eq!(client, None, "{name}: an unsafe client id is not stored");
    }
    app.stop().await;
}

#[tokio::test]
async fn the_audit_log_keeps_the_servers_request_id_and_the_clients_apart() {
    let app = spawn_app().await;
    let token = app.operator();
    let client_id = "deploy-42:step.1_a";
    let first = post_with_request_id(&app, &token, client_id, "first").await;
    let second = post_with_request_id(&app, &token, client_id, "second").await;
    // A short, safe client id is echoed (the client's correlation id).
    assert_eq!(first, client_id);
    assert_eq!(second, client_id);
    let (first_server, first_client) = audit_ids(&app, "first").await;
    let (second_server, second_client) = audit_ids(&app, "second").await;
    assert_ne!(
        first_server, client_id,
        "the client's id is not the audit log's request id"
    );
    assert_ne!(
        first_server, second_server,
        "two requests with one client id have two server ids"
    );
    assert!(
        uuid::Uuid::parse_str(&first_server).is_ok(),
        "{first_server}"
    );
    assert_eq!(first_client.as_deref(), Some(client_id));
    assert_eq!(second_client.as_deref(), Some(client_id));
    // The API shows both.
    let page: Value = app
        .get("/v1/audit?repository=first", &app.viewer())
        .await
        .json()
        .await
        .unwrap();
    let event = &page["items"][0];
    assert_eq!(event["request_id"], json!(first_server));
    assert_eq!(event["client_request_id"], json!(client_id));
    app.stop().await;
}

// -------------------------------------------------------------------------------------------
// 7. Headers

#[tokio::test]
async fn v1_responses_say_no_store_and_every_response_nosniff() {
    let app = spawn_app().await;
    let viewer = app.viewer();
    let responses = [
        ("list", app.get(REPOSITORIES, &viewer).await),
        (
            "404",
            app.get("/v1/backup-repositories/nope", &viewer).await,
        ),
        ("401", app.get(REPOSITORIES, "not-a-token").await),
        ("unknown", app.get("/v1/nothing-here", &viewer).await),
    ];
    for (what, response) in responses {
        let headers = response.headers();
        assert_eq!(
            headers.get("cache-control").map(|v| v.to_str().unwrap()),
            Some("no-store"),
            "{what}"
        );
        assert_eq!(
            headers
                .get("x-content-type-options")
                .map(|v| v.to_str().unwrap()),
            Some("nosniff"),
            "{what}"
        );
    }
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.headers()["x-content-type-options"], "nosniff");
    app.stop().await;
}

// -------------------------------------------------------------------------------------------
// 8. problem+json everywhere

#[tokio::test]
async fn a_malformed_job_id_is_a_problem_404() {
    let app = spawn_app().await;
    let operator = app.operator();
    let requests = [
        app.get("/v1/jobs/not-a-uuid", &operator).await,
        app.get("/v1/jobs/not-a-uuid/events", &operator).await,
        app.post_json("/v1/jobs/12345/cancel", &operator, &json!({}))
            .await,
        app.post_json("/v1/jobs/12345/retry", &operator, &json!({}))
            .await,
    ];
    for response in requests {
        let problem = assert_problem(response, 404).await;
        assert_eq!(
            problem["type"], "https://backup-provisioner.holos.run/problems/not-found",
            "{problem}"
        );
    }
    // A repository name that is not UTF-8 names no repository either.
    let response = app.get("/v1/backup-repositories/%FF", &operator).await;
    assert_problem(response, 404).await;
    app.stop().await;
}

#[tokio::test]
async fn hypers_own_answers_are_problem_json() {
    let app = spawn_app().await;
    // Headers over BP_MAX_HEADER_BYTES (32 KiB).
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(40 * 1024)
    );
    assert_raw_problem(&raw_exchange(app.addr, big.as_bytes()).await, 431);
    // More than 100 headers.
    let mut many = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    for i in 0..150 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    assert_raw_problem(&raw_exchange(app.addr, many.as_bytes()).await, 431);
    // A header line without a colon, and a request line that is not HTTP.
    for bad in [
        &b"GET /healthz HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n"[..],
        &b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n"[..],
    ] {
        assert_raw_problem(&raw_exchange(app.addr, bad).await, 400);
    }
    // A URI over 8 KiB (within the header limit): 414 from the service.
    let long_uri = format!(
        "GET /v1/jobs/{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "u".repeat(10 * 1024)
    );
    assert_raw_problem(&raw_exchange(app.addr, long_uri.as_bytes()).await, 414);
    // After all that, the server answers normally.
    healthz_ok(&app).await;
    app.stop().await;
}

// -------------------------------------------------------------------------------------------
// 10. Rate limits

async fn invalid_create(app: &TestApp, token: &str) -> reqwest::Response {
    // `{}` is refused with 422 before anything is stored: only the limiter is exercised.
    app.post_json(REPOSITORIES, token, &json!({})).await
}

async fn assert_rate_limited(response: reqwest::Response) {
    let retry_after: u64 = response
        .headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    let problem = assert_problem(response, 429).await;
    assert_eq!(
        problem["type"], "https://backup-provisioner.holos.run/problems/rate-limited",
        "{problem}"
    );
}

#[tokio::test]
async fn mutations_are_rate_limited_per_subject_and_globally() {
    let app = app_with(|http| {
        http.rate_limit_per_subject = "3/min".parse().unwrap();
        http.rate_limit_global = "5/min".parse().unwrap();
    })
    .await;
    let alice = app.token("alice@test", &[Role::Operator]);
    let bob = app.token("bob@test", &[Role::Operator]);
    let carol = app.token("carol@test", &[Role::Operator]);
    for _ in 0..3 {
        assert_eq!(invalid_create(&app, &alice).await.status(), 422);
    }
    assert_rate_limited(invalid_create(&app, &alice).await).await;
    // Requests without a valid token are not counted against anyone.
    for _ in 0..10 {
        assert_eq!(invalid_create(&app, "not-a-token").await.status(), 401);
    }
    // Bob has a budget of his own, until the global one (5) is spent.
    for _ in 0..2 {
        assert_eq!(invalid_create(&app, &bob).await.status(), 422);
    }
    assert_rate_limited(invalid_create(&app, &carol).await).await;
    // Reads are not limited.
    for _ in 0..30 {
        assert_eq!(app.get(REPOSITORIES, &alice).await.status(), 200);
    }
    app.stop().await;
}

#[tokio::test]
async fn a_flood_of_mutations_from_one_subject_is_limited() {
    let app = spawn_app_with(AppOptions {
        http: HttpArgs {
            rate_limit_per_subject: "60/min".parse().unwrap(),
            ..http_args()
        },
        ..AppOptions::default()
    })
    .await;
    let token = app.operator();
    let mut limited = 0;
    for _ in 0..70 {
        let response = invalid_create(&app, &token).await;
        if response.status() == 429 {
            limited += 1;
            assert_rate_limited(response).await;
        }
    }
    assert!(limited >= 9, "only {limited} of 70 mutations were limited");
    // A repository is still created by another subject.
    let other = app.token("other@test", &[Role::Operator]);
    create_repository(&app, &other, &repository_body("zitadel")).await;
    app.stop().await;
}
