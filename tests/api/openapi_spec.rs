//! The committed `openapi/openapi.json` is exactly what the code generates, and what the server
//! serves at `/openapi.json`.
//!
//! After changing a route or a schema, regenerate the committed file with
//!
//! ```text
//! UPDATE_OPENAPI=1 cargo test --test api openapi_spec
//! ```
//!
//! (with `UPDATE_OPENAPI=1` the test rewrites the file instead of comparing), then commit it.

use std::path::PathBuf;

use serde_json::Value;

use crate::support::app::spawn_app;

fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("openapi")
        .join("openapi.json")
}

#[test]
fn committed_openapi_file_equals_the_generated_spec() {
    let generated = backup_provisioner::http::openapi::spec_json();
    let path = committed_path();
    if std::env::var("UPDATE_OPENAPI").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).expect("create openapi/");
        std::fs::write(&path, &generated).expect("write openapi/openapi.json");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map(|i| i + 1)
            .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()) + 1);
        panic!(
            "{} differs from the spec the code generates (first difference at line {line}).\n\
             Regenerate it with: UPDATE_OPENAPI=1 cargo test --test api openapi_spec\n\
             and commit the result.",
            path.display()
        );
    }
}

#[test]
fn the_spec_describes_every_route_and_the_bearer_scheme() {
    let spec: Value =
        serde_json::from_str(&backup_provisioner::http::openapi::spec_json()).unwrap();
    for (path, methods) in [
        ("/v1/backup-repositories", &["get", "post"][..]),
        ("/v1/backup-repositories/{name}", &["get"]),
        ("/v1/jobs/{id}", &["get"]),
        ("/v1/jobs/{id}/cancel", &["post"]),
        ("/v1/jobs/{id}/retry", &["post"]),
        ("/v1/jobs/{id}/events", &["get"]),
        ("/v1/audit", &["get"]),
        ("/healthz", &["get"]),
        ("/readyz", &["get"]),
        ("/metrics", &["get"]),
    ] {
        for method in methods {
            assert!(
                spec["paths"][path][method].is_object(),
                "{method} {path} is not described"
            );
        }
    }
    assert_eq!(
        spec["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let post = &spec["paths"]["/v1/backup-repositories"]["post"];
    for status in [
        "200", "202", "400", "401", "403", "409", "413", "415", "422",
    ] {
        assert!(
            post["responses"][status].is_object(),
            "POST /v1/backup-repositories lacks {status}"
        );
    }
    assert!(
        post["responses"]["422"]["content"]["application/problem+json"].is_object(),
        "errors are documented as problem+json"
    );
}

#[tokio::test]
async fn the_served_spec_equals_the_committed_file() {
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(committed_path()).expect("openapi/openapi.json is committed"),
    )
    .expect("openapi/openapi.json is JSON");
    let app = spawn_app().await;
    let response = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let served: Value = response.json().await.unwrap();
    assert!(
        served == committed,
        "/openapi.json differs from openapi/openapi.json; regenerate with UPDATE_OPENAPI=1 cargo test --test api openapi_spec"
    );
    app.stop().await;
}
