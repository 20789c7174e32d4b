//! Authentication and authorisation over HTTP: bad tokens are 401 problems, missing roles 403,
//! the open endpoints need no token, /metrics reports traffic, CORS follows configuration.

use std::time::{SystemTime, UNIX_EPOCH};

use backup_provisioner::auth::Role;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::http_common::{REPOSITORIES, assert_problem, create_repository, repository_body};
use crate::support::app::{
    AUDIENCE, AppOptions, HS256_SECRET, TestApp, http_args, spawn_app, spawn_app_with,
};

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An HS256 token with the test secret and these claims over sensible defaults.
fn token_with(overrides: Value) -> String {
    let mut claims = json!({
        "iss": "backup-provisioner", "aud": AUDIENCE, "sub": "crafted@test",
        "iat": now(), "nbf": now(), "exp": now() + 600, "roles": ["admin"],
    });
    for (key, value) in overrides.as_object().unwrap() {
        if value.is_null() {
            claims.as_object_mut().unwrap().remove(key);
        } else {
            claims[key] = value.clone();
        }
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(HS256_SECRET.as_bytes()),
    )
    .expect("encode token")
}

async fn get_with_authorization(
    app: &TestApp,
    path: &str,
    authorization: Option<&str>,
) -> reqwest::Response {
    let mut request = app.client.get(app.url(path));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    request.send().await.expect("request")
}

#[tokio::test]
async fn bad_credentials_are_401_problems() {
    let app = spawn_app().await;
    // The crafted token itself is fine: the baseline.
    let good = token_with(json!({}));
    assert_eq!(
        get_with_authorization(&app, REPOSITORIES, Some(&format!("Bearer {good}")))
            .await
            .status(),
        200
    );

    let wrong_secret = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"iss": "backup-provisioner", "aud": AUDIENCE, "sub": "x", "exp": now() + 600, "roles": ["admin"]}),
        &EncodingKey::from_secret(b"another-secret-that-is-long-enough-for-hs256-00"),
    )
    .unwrap();
    let unsigned = {
        use base64::Engine;
        let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.",
            b64(json!({"alg": "none", "typ": "JWT"})),
            b64(
                json!({"iss": "backup-provisioner", "aud": AUDIENCE, "sub": "x", "exp": now() + 600, "roles": ["admin"]})
            )
        )
    };
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no token", None, "missing Authorization header"),
        ("empty header", Some(String::new()), "Bearer"),
        (
            "basic scheme",
            Some("Basic dXNlcjpwYXNz".into()),
            "must be 'Bearer <JWT>'",
        ),
        (
            "bearer without token",
            Some("Bearer".into()),
            "must be 'Bearer <JWT>'",
        ),
        (
            "bearer with blank token",
            Some("Bearer    ".into()),
            "Bearer",
        ),
        (
            "garbage token",
            Some("Bearer not-a-jwt".into()),
            "malformed token",
        ),
        (
            "garbage parts",
            Some("Bearer a.b.c".into()),
            "malformed token",
        ),
        (
            "token without scheme",
            Some(good.clone()),
            "must be 'Bearer <JWT>'",
        ),
        (
            "expired",
            Some(format!(
                "Bearer {}",
                token_with(json!({"iat": now() - 7200, "nbf": now() - 7200, "exp": now() - 3600}))
            )),
            "token expired",
        ),
        (
            "not yet valid",
            Some(format!(
                "Bearer {}",
                token_with(json!({"nbf": now() + 3600}))
            )),
            "token not yet valid",
        ),
        (
            "wrong audience",
            Some(format!(
                "Bearer {}",
                token_with(json!({"aud": "someone-else"}))
            )),
            "wrong audience",
        ),
        (
            "no audience",
            Some(format!("Bearer {}", token_with(json!({"aud": null})))),
            "aud",
        ),
        (
            "wrong issuer",
            Some(format!(
                "Bearer {}",
                token_with(json!({"iss": "https://evil.example"}))
            )),
            "wrong issuer",
        ),
        (
            "no subject",
            Some(format!("Bearer {}", token_with(json!({"sub": null})))),
            "sub",
        ),
        (
            "wrong secret",
            Some(format!("Bearer {wrong_secret}")),
            "invalid signature",
        ),
        (
            "alg none",
            Some(format!("Bearer {unsigned}")),
            "algorithm none is not accepted",
        ),
    ];
    for (what, authorization, needle) in cases {
        for path in [REPOSITORIES, "/v1/audit"] {
            let response = get_with_authorization(&app, path, authorization.as_deref()).await;
            let problem = assert_problem(response, 401).await;
            let detail = problem["detail"].as_str().unwrap();
            assert!(
                detail.contains(needle),
                "{what} on {path}: expected {needle:?} in {detail:?}"
            );
            assert_eq!(
                problem["type"],
                "https://backup-provisioner.holos.run/problems/unauthorized"
            );
        }
        // Mutations are refused the same way, before the body is looked at.
        let mut request = app
            .client
            .post(app.url(REPOSITORIES))
            .json(&repository_body("zitadel"));
        if let Some(value) = &authorization {
            request = request.header("authorization", value);
        }
        assert_problem(request.send().await.unwrap(), 401).await;
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM backup_repositories")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    app.stop().await;
}

#[tokio::test]
async fn roles_decide_what_a_caller_may_do() {
    let app = spawn_app().await;
    let viewer = app.viewer();
    let response = app
        .post_json(REPOSITORIES, &viewer, &repository_body("zitadel"))
        .await;
    let problem = assert_problem(response, 403).await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("needs the role 'operator'"),
        "{problem}"
    );
    let no_roles = app.token("nobody@test", &[]);
    assert_problem(app.get(REPOSITORIES, &no_roles).await, 403).await;
    let unknown_role = token_with(json!({"roles": ["superuser"]}));
    assert_problem(app.get(REPOSITORIES, &unknown_role).await, 403).await;

    // Viewers read; operators and admins create.
    assert_eq!(app.get(REPOSITORIES, &viewer).await.status(), 200);
    assert_eq!(app.get("/v1/audit", &viewer).await.status(), 200);
    create_repository(&app, &app.operator(), &repository_body("zitadel")).await;
    create_repository(
        &app,
        &app.token("admin@test", &[Role::Admin]),
        &repository_body("holos"),
    )
    .await;
    assert_eq!(
        app.get(&format!("{REPOSITORIES}/zitadel"), &viewer)
            .await
            .status(),
        200
    );
    // ZITADEL's object-shaped roles claim works too.
    let zitadel_shape = token_with(json!({"roles": {"viewer": {"123": "org.example"}}}));
    assert_eq!(app.get(REPOSITORIES, &zitadel_shape).await.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn token_edge_cases_are_401() {
    let mut http = http_args();
    http.jwt_max_lifetime = Some(std::time::Duration::from_secs(3600));
    let app = spawn_app_with(AppOptions {
        http,
        ..AppOptions::default()
    })
    .await;
    // The service's own tokens (10 minutes) pass.
    assert_eq!(app.get(REPOSITORIES, &app.viewer()).await.status(), 200);
    let cases = [
        (
            json!({"iss": ["backup-provisioner"]}),
            "token claim iss is invalid",
        ),
        (
            json!({"iat": now(), "exp": now() + 7200}),
            "token lifetime (exp - iat) exceeds the maximum of 1h",
        ),
        (json!({"iat": null}), "token has no iat claim"),
        (
            json!({"iat": now() + 600, "nbf": null}),
            "token issued in the future",
        ),
    ];
    for (claims, detail) in cases {
        let response = get_with_authorization(
            &app,
            REPOSITORIES,
            Some(&format!("Bearer {}", token_with(claims.clone()))),
        )
        .await;
        let problem = assert_problem(response, 401).await;
        assert_eq!(problem["detail"], detail, "{claims}");
    }
    // A space-separated roles string grants nothing (the claim is an array or an object).
    let spaced = token_with(json!({"roles": "viewer admin"}));
    let problem = assert_problem(app.get(REPOSITORIES, &spaced).await, 403).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("no roles"),
        "{problem}"
    );
    app.stop().await;
}

#[tokio::test]
async fn open_endpoints_need_no_token() {
    let app = spawn_app().await;
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert!(
            response.headers().contains_key("x-request-id"),
            "{path} carries a request id"
        );
    }
    let health = app
        .client
        .get(app.url("/healthz"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(health, "ok");
    let ready = app
        .client
        .get(app.url("/readyz"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(ready, "ready");
    let spec: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(spec["paths"]["/v1/backup-repositories"].is_object());

    // /docs leads (through redirects) to the Swagger UI page, served from the binary.
    let response = app.client.get(app.url("/docs")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let final_url = response.url().clone();
    let html = response.text().await.unwrap();
    assert!(
        html.contains("swagger-ui"),
        "{final_url}: not the Swagger UI page: {html:.300}"
    );
    // Its assets and its configuration (pointing at /openapi.json) are local.
    let page = app.client.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let initializer = app
        .client
        .get(app.url("/docs/swagger-initializer.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(initializer.status(), 200);
    let script = initializer.text().await.unwrap();
    assert!(
        script.contains("/openapi.json"),
        "the UI loads our spec: {script:.500}"
    );
    let bundle = app
        .client
        .get(app.url("/docs/swagger-ui-bundle.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(bundle.status(), 200);
    assert!(
        bundle.bytes().await.unwrap().len() > 100_000,
        "the bundled UI script is served"
    );
    app.stop().await;
}

/// A Prometheus sample value: the line `name{labels} value` whose name and labels contain every
/// `needles` entry.
fn sample(metrics: &str, needles: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| needles.iter().all(|n| line.contains(n)))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_report_job_states_and_http_requests() {
    let app = spawn_app().await;
    let token = app.operator();
    create_repository(&app, &token, &repository_body("zitadel")).await;
    let created = create_repository(&app, &token, &repository_body("holos")).await;
    let job = created["job"]["id"].as_str().unwrap();
    let cancel = app
        .client
        .post(app.url(&format!("/v1/jobs/{job}/cancel")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 202);
    app.get(&format!("{REPOSITORIES}/nope"), &token).await;
    app.get(&format!("{REPOSITORIES}/zitadel"), &token).await;

    let response = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.contains("text") && content_type.contains("version="),
        "{content_type}"
    );
    let metrics = response.text().await.unwrap();
    assert_eq!(
        sample(&metrics, &["backup_provisioner_jobs{", "state=\"queued\""]),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            &["backup_provisioner_jobs{", "state=\"cancelled\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, &["backup_provisioner_jobs{", "state=\"running\""]),
        Some(0.0),
        "{metrics}"
    );
    assert!(
        sample(&metrics, &["backup_provisioner_queue_lag_seconds"]).is_some(),
        "{metrics}"
    );
    // Requests are counted by route template and status, never by raw path.
    let created_count = sample(
        &metrics,
        &[
            "backup_provisioner_http_requests_total{",
            "method=\"POST\"",
            "route=\"/v1/backup-repositories\"",
            "status=\"202\"",
        ],
    );
    assert_eq!(created_count, Some(2.0), "{metrics}");
    let not_found = sample(
        &metrics,
        &[
            "backup_provisioner_http_requests_total{",
            "route=\"/v1/backup-repositories/{name}\"",
            "status=\"404\"",
        ],
    );
    assert_eq!(not_found, Some(1.0), "{metrics}");
    assert!(
        !metrics.contains("/v1/backup-repositories/nope"),
        "raw paths must not become labels"
    );
    assert!(
        metrics.contains("backup_provisioner_http_request_duration_seconds"),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn cors_allows_the_configured_origin_only() {
    let app = spawn_app().await;
    let preflight = |origin: &'static str| {
        app.client
            .request(reqwest::Method::OPTIONS, app.url(REPOSITORIES))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type, idempotency-key",
            )
            .send()
    };
    let allowed = preflight("https://portal.example.com").await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    let headers = allowed.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://portal.example.com"
    );
    let methods = headers["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(
        methods.contains("post") && methods.contains("get") && methods.contains("delete"),
        "{methods}"
    );
    let allowed_headers = headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    for header in ["authorization", "content-type", "idempotency-key"] {
        assert!(allowed_headers.contains(header), "{allowed_headers}");
    }

    let denied = preflight("https://evil.example.com").await.unwrap();
    assert!(denied.status().as_u16() < 500);
    assert!(
        denied
            .headers()
            .get("access-control-allow-origin")
            .is_none(),
        "another origin is not allowed"
    );

    // Simple requests: the allowed origin gets the header (and may read Location and the request id).
    let viewer = app.viewer();
    let response = app
        .client
        .get(app.url(REPOSITORIES))
        .bearer_auth(&viewer)
        .header("origin", "https://portal.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://portal.example.com"
    );
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(
        exposed.contains("location") && exposed.contains("x-request-id"),
        "{exposed}"
    );
    let response = app
        .client
        .get(app.url(REPOSITORIES))
        .bearer_auth(&viewer)
        .header("origin", "https://evil.example.com")
        .send()
        .await
        .unwrap();
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    app.stop().await;
}
