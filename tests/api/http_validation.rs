//! Input validation over HTTP: every rule gives a 422 problem naming the field with a precise
//! message; malformed JSON, wrong content types and oversized bodies give 4xx problems; no input
//! gives a 5xx.

use reqwest::Method;
use serde_json::{Value, json};

use crate::http_common::{REPOSITORIES, assert_problem, field_errors};
use crate::support::app::{AppOptions, http_args, spawn_app, spawn_app_with};

const PATTERN_MESSAGE: &str =
    "bucket name must match the configured pattern ^holos-[a-z0-9-]+-backups$";
const REGION_MESSAGE: &str =
    "region must be an AWS region code like us-east-1, eu-central-2 or ap-southeast-4";
const LABEL_NAME_RULE: &str = "name must consist of letters, digits, '-', '_' and '.', and start and end with a letter or digit";

fn with(overrides: Value) -> Value {
    let mut body = json!({"name": "zitadel", "namespace": "zitadel"});
    for (key, value) in overrides.as_object().expect("object") {
        body[key] = value.clone();
    }
    body
}

/// Requests that must be rejected, each with the exact field errors expected.
fn bad_cases() -> Vec<(Value, Vec<(&'static str, String)>)> {
    let long63 = "a".repeat(63);
    let long64 = "a".repeat(64);
    let bucket = |value: &str, message: &str| {
        (
            with(json!({"bucket": value})),
            vec![("bucket", message.to_owned())],
        )
    };
    let namespace = |value: &str, message: &str| {
        (
            with(json!({"namespace": value})),
            vec![("namespace", message.to_owned())],
        )
    };
    let region = |value: &str| {
        (
            with(json!({"region": value})),
            vec![("region", REGION_MESSAGE.to_owned())],
        )
    };
    let labels =
        |value: Value, message: String| (with(json!({"labels": value})), vec![("labels", message)]);
    let many_labels: serde_json::Map<String, Value> =
        (0..33).map(|i| (format!("k{i}"), json!("v"))).collect();
    vec![
        // Buckets: the S3 naming rules, then the configured pattern.
        bucket("ab", "bucket name must be 3 to 63 characters long (got 2)"),
        bucket(&long64, "bucket name must be 3 to 63 characters long (got 64)"),
        bucket(
            "Holos-x-backups",
            "bucket name may contain only lowercase letters, digits, '.' and '-' (found 'H' at position 0)",
        ),
        bucket(
            "holos_x_backups",
            "bucket name may contain only lowercase letters, digits, '.' and '-' (found '_' at position 5)",
        ),
        bucket("-holos-x-backups", "bucket name must start with a lowercase letter or digit"),
        bucket(".holos-x-backups", "bucket name must start with a lowercase letter or digit"),
        bucket("holos-x-backups-", "bucket name must end with a lowercase letter or digit"),
        bucket("holos..x-backups", "bucket name must not contain two adjacent periods ('..')"),
        bucket("192.168.5.4", "bucket name must not be formatted as an IP address (like 192.168.5.4)"),
        bucket("xn--holos-backups", "bucket name must not start with 'xn--'"),
        bucket("sthree-holos-backups", "bucket name must not start with 'sthree-'"),
        bucket("amzn-s3-demo-holos-backups", "bucket name must not start with 'amzn-s3-demo-'"),
        bucket("holos-x-backups-s3alias", "bucket name must not end with '-s3alias'"),
        bucket("holos-x-backups--ol-s3", "bucket name must not end with '--ol-s3'"),
        bucket("holos-x-backups.mrap", "bucket name must not end with '.mrap'"),
        bucket("holos-x-backups--x-s3", "bucket name must not end with '--x-s3'"),
        bucket("other-bucket", PATTERN_MESSAGE),
        bucket("holos-a.b-backups", PATTERN_MESSAGE),
        bucket("holos--backups", PATTERN_MESSAGE),
        // Namespaces: DNS-1123 labels.
        namespace("", "namespace must not be empty"),
        namespace(&long64, "namespace must be at most 63 characters long (got 64)"),
        namespace(
            "Zitadel",
            "namespace may contain only lowercase letters, digits and '-' (found 'Z' at position 0)",
        ),
        namespace("my_ns", "namespace may contain only lowercase letters, digits and '-' (found '_' at position 2)"),
        namespace("my.ns", "namespace may contain only lowercase letters, digits and '-' (found '.' at position 2)"),
        namespace("-ns", "namespace must start with a lowercase letter or digit"),
        namespace("ns-", "namespace must end with a lowercase letter or digit"),
        // With no BP_ALLOWED_NAMESPACES (as here) the cluster's own namespaces are refused.
        namespace("kube-system", "namespace 'kube-system' belongs to the cluster itself and is never written to"),
        namespace("kube-public", "namespace 'kube-public' belongs to the cluster itself and is never written to"),
        namespace("kube-node-lease", "namespace 'kube-node-lease' belongs to the cluster itself and is never written to"),
        // Regions.
        region(""),
        region("us-east"),
        region("US-EAST-1"),
        region("us_east_1"),
        region("us-east-1a"),
        region("moon-1"),
        region(" us-east-1"),
        // Names: DNS-1123 labels (and then the derived default bucket must be valid too).
        (json!({"name": "", "namespace": "zitadel"}), vec![("name", "repository name must not be empty".to_owned())]),
        (
            json!({"name": "Zitadel", "namespace": "zitadel"}),
            vec![(
                "name",
                "repository name may contain only lowercase letters, digits and '-' (found 'Z' at position 0)"
                    .to_owned(),
            )],
        ),
        (
            json!({"name": "-zitadel", "namespace": "zitadel"}),
            vec![("name", "repository name must start with a lowercase letter or digit".to_owned())],
        ),
        (
            json!({"name": long64, "namespace": "zitadel"}),
            vec![("name", "repository name must be at most 63 characters long (got 64)".to_owned())],
        ),
        (
            json!({"name": long63, "namespace": "zitadel"}),
            vec![("bucket", "bucket name must be 3 to 63 characters long (got 77)".to_owned())],
        ),
        // Labels.
        labels(json!({"-bad": "v"}), format!("label key \"-bad\": {LABEL_NAME_RULE}")),
        labels(json!({"/name": "v"}), "label key \"/name\" has an empty prefix".to_owned()),
        labels(json!({"example.com/": "v"}), "label key \"example.com/\" has an empty name".to_owned()),
        labels(
            json!({"team": "bad value"}),
            "value of label \"team\" must be empty or consist of letters, digits, '-', '_' and '.', and start and end with a letter or digit".to_owned(),
        ),
        labels(
            json!({"k": "v".repeat(64)}),
            "value of label \"k\" must be at most 63 characters long (got 64)".to_owned(),
        ),
        labels(Value::Object(many_labels), "at most 32 labels are allowed (got 33)".to_owned()),
        // Every violation is reported, not just the first.
        (
            json!({"name": "Bad", "namespace": "Bad", "region": "nowhere", "labels": {"-x": "y"}}),
            vec![
                (
                    "name",
                    "repository name may contain only lowercase letters, digits and '-' (found 'B' at position 0)"
                        .to_owned(),
                ),
                (
                    "namespace",
                    "namespace may contain only lowercase letters, digits and '-' (found 'B' at position 0)".to_owned(),
                ),
                ("region", REGION_MESSAGE.to_owned()),
                ("labels", format!("label key \"-x\": {LABEL_NAME_RULE}")),
            ],
        ),
    ]
}

#[tokio::test]
async fn bad_repository_requests_are_422_with_precise_field_errors() {
    let app = spawn_app().await;
    let token = app.operator();
    for (body, expected) in bad_cases() {
        let response = app.post_json(REPOSITORIES, &token, &body).await;
        let problem = assert_problem(response, 422).await;
        let got = field_errors(&problem);
        let expected: Vec<(String, String)> = expected
            .into_iter()
            .map(|(f, m)| (f.to_owned(), m))
            .collect();
        assert_eq!(got, expected, "request {body}: {problem}");
        assert_eq!(
            problem["type"],
            "https://backup-provisioner.holos.run/problems/validation"
        );
        for (_, message) in &expected {
            assert!(
                problem["detail"]
                    .as_str()
                    .unwrap()
                    .contains(message.as_str()),
                "{problem}"
            );
        }
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM backup_repositories")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(rows, 0, "no rejected request may write a repository");
    app.stop().await;
}

#[tokio::test]
async fn good_repository_requests_are_accepted() {
    let app = spawn_app().await;
    let token = app.operator();
    let longest_bucket = format!("holos-{}-backups", "b".repeat(63 - 14));
    let longest_name = "n".repeat(49);
    let cases = [
        (
            json!({"name": "zitadel", "namespace": "zitadel"}),
            "holos-zitadel-backups",
            "us-east-1",
        ),
        (
            json!({"name": "holos-server", "namespace": "holos", "bucket": "holos-server-backups"}),
            "holos-server-backups",
            "us-east-1",
        ),
        (
            json!({"name": "a", "namespace": "a", "region": "eu-central-2"}),
            "holos-a-backups",
            "eu-central-2",
        ),
        (
            json!({"name": "mel", "namespace": "x1-y2", "region": "ap-southeast-4"}),
            "holos-mel-backups",
            "ap-southeast-4",
        ),
        (
            json!({"name": "longest", "namespace": "n", "bucket": longest_bucket}),
            longest_bucket.as_str(),
            "us-east-1",
        ),
        (
            json!({"name": longest_name, "namespace": "a".repeat(63)}),
            &*format!("holos-{longest_name}-backups"),
            "us-east-1",
        ),
        (
            json!({
                "name": "labelled", "namespace": "ns",
                "labels": {"app": "zitadel", "app.kubernetes.io/managed-by": "backup-provisioner", "empty": ""},
                "allow_new_cipher_pass": true, "adopt_existing_secret": false,
            }),
            "holos-labelled-backups",
            "us-east-1",
        ),
    ];
    for (body, bucket, region) in cases {
        let response = app.post_json(REPOSITORIES, &token, &body).await;
        let status = response.status().as_u16();
        let created: Value = response.json().await.unwrap();
        assert_eq!(status, 202, "{body}: {created}");
        assert_eq!(created["repository"]["bucket"], bucket, "{body}");
        assert_eq!(created["repository"]["region"], region, "{body}");
        assert_eq!(created["repository"]["name"], body["name"]);
        assert_eq!(created["repository"]["namespace"], body["namespace"]);
    }
    app.stop().await;
}

#[tokio::test]
async fn allowed_namespaces_reject_every_other_namespace() {
    let mut http = http_args();
    http.allowed_namespaces = vec!["zitadel".into(), "holos".into()];
    let app = spawn_app_with(AppOptions {
        http,
        ..AppOptions::default()
    })
    .await;
    let token = app.operator();
    let response = app
        .post_json(
            REPOSITORIES,
            &token,
            &json!({"name": "other", "namespace": "other"}),
        )
        .await;
    let problem = assert_problem(response, 422).await;
    assert_eq!(
        field_errors(&problem),
        vec![(
            "namespace".to_owned(),
            "namespace 'other' is not in the allowed list: zitadel, holos".to_owned()
        )]
    );
    for (name, namespace) in [("zitadel", "zitadel"), ("holos-server", "holos")] {
        let response = app
            .post_json(
                REPOSITORIES,
                &token,
                &json!({"name": name, "namespace": namespace}),
            )
            .await;
        assert_eq!(response.status(), 202, "{namespace} is allowed");
    }
    app.stop().await;
}

#[tokio::test]
async fn unknown_fields_and_wrong_types_are_422() {
    let app = spawn_app().await;
    let token = app.operator();
    let cases = [
        (
            json!({"name": "zitadel", "namespace": "zitadel", "color": "blue"}),
            "unknown field `color`",
        ),
        (
            json!({"name": "zitadel", "namespace": "zitadel", "Bucket": "holos-x-backups"}),
            "unknown field `Bucket`",
        ),
        (json!({"name": "zitadel"}), "missing field `namespace`"),
        (json!({"name": 7, "namespace": "zitadel"}), "invalid type"),
        (
            json!({"name": "zitadel", "namespace": "zitadel", "labels": {"a": 1}}),
            "invalid type",
        ),
        (
            json!({"name": "zitadel", "namespace": "zitadel", "labels": ["a"]}),
            "invalid type",
        ),
        (json!("zitadel"), "invalid type"),
    ];
    for (body, needle) in cases {
        let response = app.post_json(REPOSITORIES, &token, &body).await;
        let problem = assert_problem(response, 422).await;
        let detail = problem["detail"].as_str().unwrap();
        assert!(
            detail.contains(needle),
            "{body}: expected {needle:?} in {detail:?}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn malformed_json_is_400() {
    let app = spawn_app().await;
    let token = app.operator();
    for body in [
        "{",
        "{\"name\": \"zitadel\",}",
        "not json",
        "{\"name\": \"zitadel\", \"namespace\": \"zitadel\"} trailing",
        "\u{feff}{}",
        "",
    ] {
        let response = app
            .client
            .post(app.url(REPOSITORIES))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let problem = assert_problem(response, 400).await;
        assert!(
            problem["detail"].as_str().unwrap().contains("JSON"),
            "{body:?}: {problem}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn wrong_or_missing_content_type_is_415() {
    let app = spawn_app().await;
    let token = app.operator();
    let body = json!({"name": "zitadel", "namespace": "zitadel"}).to_string();
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("application/xml"),
    ] {
        let mut request = app
            .client
            .post(app.url(REPOSITORIES))
            .bearer_auth(&token)
            .body(body.clone());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let problem = assert_problem(request.send().await.unwrap(), 415).await;
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("application/json"),
            "{content_type:?}: {problem}"
        );
    }
    // A JSON media type with parameters or a +json suffix is JSON.
    let response = app
        .client
        .post(app.url(REPOSITORIES))
        .bearer_auth(&token)
        .header("content-type", "application/json; charset=utf-8")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    app.stop().await;
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let app = spawn_app().await;
    let token = app.operator();
    // The test limit is 16 KiB; a padded label set well over it.
    let labels: serde_json::Map<String, Value> = (0..400)
        .map(|i| (format!("key-{i:04}"), json!("v".repeat(40))))
        .collect();
    let body = json!({"name": "zitadel", "namespace": "zitadel", "labels": labels});
    assert!(body.to_string().len() > 16 * 1024);
    let response = app.post_json(REPOSITORIES, &token, &body).await;
    assert_problem(response, 413).await;
    // The same with an Idempotency-Key (the middleware buffers the body itself).
    let response = app
        .client
        .post(app.url(REPOSITORIES))
        .bearer_auth(&token)
        .header("idempotency-key", "oversized-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_problem(response, 413).await;
    // Just over the limit with no JSON at all.
    let response = app
        .client
        .post(app.url(REPOSITORIES))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(vec![b' '; 16 * 1024 + 1])
        .send()
        .await
        .unwrap();
    assert_problem(response, 413).await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM backup_repositories")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    app.stop().await;
}

/// Garbage of every kind: each answer is a 4xx problem (or a success), never a 5xx.
#[tokio::test]
async fn no_input_gives_a_5xx() {
    let app = spawn_app().await;
    let token = app.operator();
    let created = crate::http_common::create_repository(
        &app,
        &token,
        &json!({"name": "zitadel", "namespace": "zitadel"}),
    )
    .await;
    let job = crate::http_common::job_id(&created);
    let mut failures: Vec<String> = Vec::new();
    let get_paths = [
        "/".to_owned(),
        "/v2".to_owned(),
        "/v1".to_owned(),
        "/v1/".to_owned(),
        "/etc/passwd".to_owned(),
        "/v1/backup-repositories/".to_owned(),
        "/v1/backup-repositories/%00".to_owned(),
        "/v1/backup-repositories/%ff%fe".to_owned(),
        "/v1/backup-repositories/a%2Fb".to_owned(),
        format!("/v1/backup-repositories/{}", "x".repeat(5000)),
        "/v1/backup-repositories/zitadel/extra".to_owned(),
        "/v1/backup-repositories?limit=0".to_owned(),
        "/v1/backup-repositories?limit=-1".to_owned(),
        "/v1/backup-repositories?limit=201".to_owned(),
        "/v1/backup-repositories?limit=abc".to_owned(),
        "/v1/backup-repositories?limit=99999999999999999999999".to_owned(),
        "/v1/backup-repositories?cursor=!!!".to_owned(),
        "/v1/backup-repositories?cursor=%00".to_owned(),
        "/v1/backup-repositories?cursor=AA".to_owned(),
        "/v1/backup-repositories?cursor=_w".to_owned(),
        "/v1/backup-repositories?state=bogus".to_owned(),
        "/v1/backup-repositories?namespace=%00".to_owned(),
        "/v1/backup-repositories?unknown=1".to_owned(),
        "/v1/backup-repositories?limit=1&limit=2".to_owned(),
        "/v1/jobs/not-a-uuid".to_owned(),
        "/v1/jobs/00000000-0000-0000-0000-000000000000".to_owned(),
        "/v1/jobs/%00".to_owned(),
        format!("/v1/jobs/{job}?wait=999s"),
        format!("/v1/jobs/{job}?wait=forever"),
        format!("/v1/jobs/{job}?wait=-1s"),
        format!("/v1/jobs/{job}?wait=18446744073709551616s"),
        format!("/v1/jobs/{job}?bogus=1"),
        format!("/v1/jobs/{job}/events?cursor=garbage"),
        format!("/v1/jobs/{job}/events?cursor=YWJj"),
        format!("/v1/jobs/{job}/events?limit=0"),
        "/v1/jobs/not-a-uuid/events".to_owned(),
        "/v1/audit?since=yesterday".to_owned(),
        "/v1/audit?since=99999-01-01T00:00:00Z".to_owned(),
        "/v1/audit?since=-5000-01-01T00:00:00Z".to_owned(),
        "/v1/audit?since=262143-12-31T23:59:59Z".to_owned(),
        "/v1/audit?actor=%00".to_owned(),
        "/v1/audit?repository=%00".to_owned(),
        "/v1/audit?limit=0".to_owned(),
        "/v1/audit?cursor=LTE".to_owned(),
        "/v1/audit?cursor=OTk5OTk5OTk5OTk5OTk5OTk5OTk5".to_owned(),
        "/docs/no-such-file.js".to_owned(),
    ];
    for path in &get_paths {
        let response = app.get(path, &token).await;
        check_not_5xx(&mut failures, response, &format!("GET {path}")).await;
    }
    let bodyless_posts = [
        "/v1/jobs/not-a-uuid/cancel".to_owned(),
        "/v1/jobs/00000000-0000-0000-0000-000000000000/cancel".to_owned(),
        "/v1/jobs/00000000-0000-0000-0000-000000000000/retry".to_owned(),
        format!("/v1/jobs/{job}/retry"),
        "/v1/backup-repositories/zitadel".to_owned(),
        "/healthz".to_owned(),
    ];
    for path in &bodyless_posts {
        let response = app
            .client
            .post(app.url(path))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        check_not_5xx(&mut failures, response, &format!("POST {path}")).await;
    }
    for method in [Method::PUT, Method::DELETE, Method::PATCH] {
        let response = app
            .client
            .request(method.clone(), app.url(REPOSITORIES))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let problem = assert_problem(response, 405).await;
        assert!(!problem["detail"].as_str().unwrap().is_empty());
    }
    let odd_bodies: [(&str, Vec<u8>); 6] = [
        ("application/json", vec![0xff, 0xfe, 0x00]),
        ("application/json", b"{\"name\": \"\\u0000\", \"namespace\": \"zitadel\"}".to_vec()),
        ("application/json", b"{\"name\": \"zitadel\", \"namespace\": \"zitadel\", \"labels\": {\"a\\u0000\": \"b\"}}".to_vec()),
        ("application/json", b"{\"name\": \"zitadel\", \"namespace\": \"zitadel\", \"region\": \"\\ud800\"}".to_vec()),
        ("application/json", "[".repeat(5000).into_bytes()),
        ("application/json", b"null".to_vec()),
    ];
    for (content_type, body) in odd_bodies {
        let response = app
            .client
            .post(app.url(REPOSITORIES))
            .bearer_auth(&token)
            .header("content-type", content_type)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        check_not_5xx(
            &mut failures,
            response,
            &format!("POST body {:?}", String::from_utf8_lossy(&body)),
        )
        .await;
    }
    for key in ["", "\"\"", &"k".repeat(300)] {
        let response = app
            .client
            .post(app.url(REPOSITORIES))
            .bearer_auth(&token)
            .header("idempotency-key", key)
            .json(&json!({"name": "other", "namespace": "other"}))
            .send()
            .await
            .unwrap();
        check_not_5xx(&mut failures, response, &format!("Idempotency-Key {key:?}")).await;
    }
    assert!(failures.is_empty(), "5xx answers:\n{}", failures.join("\n"));
    app.stop().await;
}

/// Records a 5xx in `failures`; any 4xx must be a well-formed problem.
async fn check_not_5xx(failures: &mut Vec<String>, response: reqwest::Response, what: &str) {
    let status = response.status().as_u16();
    if status >= 500 {
        failures.push(format!(
            "{what}: got {status}: {}",
            response.text().await.unwrap_or_default()
        ));
    } else if status >= 400 {
        assert_problem(response, status).await;
    }
}
