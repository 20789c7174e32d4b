//! The binary's commands and its configuration errors (exit code 2, one line naming the variable).

use std::process::{Command, Output};

use crate::support::app::HS256_SECRET;

fn binary(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_backup-provisioner"));
    command.args(args).env_clear().env("RUST_LOG", "off");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("run backup-provisioner")
}

fn base_env() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        ),
        ("BP_JWT_HS256_SECRET", HS256_SECRET),
        (
            "BP_ENCRYPTION_KEY",
            "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
        ),
    ]
}

fn assert_config_error(output: &Output, variable: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "one line expected, got: {stderr}"
    );
    assert!(
        stderr.contains(variable),
        "the error must name {variable}: {stderr}"
    );
}

#[test]
fn bad_configuration_exits_2_naming_the_variable() {
    let cases: [(&str, &str, &str); 7] = [
        ("BP_BUCKET_NAME_PATTERN", "(", "BP_BUCKET_NAME_PATTERN"),
        ("BP_ENCRYPTION_KEY", "not-base64!", "BP_ENCRYPTION_KEY"),
        ("BP_ENCRYPTION_KEY", "c2hvcnQ=", "BP_ENCRYPTION_KEY"),
        ("BP_JWT_HS256_SECRET", "short", "BP_JWT_HS256_SECRET"),
        (
            "BP_ALLOWED_NAMESPACES",
            "Not_A_Namespace",
            "BP_ALLOWED_NAMESPACES",
        ),
        (
            "BP_ALLOWED_NAMESPACES",
            "zitadel,kube-system",
            "BP_ALLOWED_NAMESPACES",
        ),
        ("BP_CORS_ORIGINS", "not an origin", "BP_CORS_ORIGINS"),
    ];
    for (variable, value, named) in cases {
        let mut env = base_env();
        env.retain(|(k, _)| *k != variable);
        env.push((variable, value));
        let output = binary(&["serve"], &env);
        assert_config_error(&output, named);
    }
}

#[test]
fn values_clap_rejects_exit_2_naming_the_variable() {
    for (variable, value) in [
        ("BP_JOB_LEASE", "bogus"),
        ("BP_WORKERS", "-1"),
        ("BP_LISTEN_ADDR", "nope"),
        ("BP_REQUEST_TIMEOUT", "soon"),
        ("BP_OIDC_ISSUER", "not a url"),
        ("BP_JWT_MAX_LIFETIME", "forever"),
    ] {
        let mut env = base_env();
        env.push((variable, value));
        assert_config_error(&binary(&["serve"], &env), variable);
    }
    let mut env = base_env();
    env.retain(|(k, _)| *k != "DATABASE_URL");
    env.push(("DATABASE_URL", "not a url"));
    assert_config_error(&binary(&["migrate"], &env), "DATABASE_URL");
}

#[test]
fn oidc_needs_an_audience() {
    let mut env = base_env();
    env.retain(|(k, _)| *k != "BP_JWT_HS256_SECRET");
    env.push(("BP_OIDC_ISSUER", "https://issuer.example.com"));
    assert_config_error(&binary(&["serve"], &env), "BP_JWT_AUDIENCE");
}

#[test]
fn missing_settings_exit_2() {
    let output = binary(&["serve"], &[("BP_JWT_HS256_SECRET", HS256_SECRET)]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("DATABASE_URL"));

    let env: Vec<_> = base_env()
        .into_iter()
        .filter(|(k, _)| *k != "BP_JWT_HS256_SECRET")
        .collect();
    assert_config_error(&binary(&["serve"], &env), "BP_JWT_HS256_SECRET");

    let env: Vec<_> = base_env()
        .into_iter()
        .filter(|(k, _)| *k != "BP_ENCRYPTION_KEY")
        .collect();
    assert_config_error(&binary(&["worker"], &env), "BP_ENCRYPTION_KEY");
    // The API alone needs no encryption key.
    let output = binary(
        &["serve", "--workers", "0", "--listen-addr", "999.0.0.1:1"],
        &env,
    );
    assert_ne!(output.status.code(), Some(0));
}

#[test]
fn openapi_command_prints_the_committed_spec() {
    let output = binary(&["openapi"], &[]);
    assert!(output.status.success());
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json"))
            .unwrap();
    assert_eq!(String::from_utf8(output.stdout).unwrap(), committed);
}

#[tokio::test]
async fn token_command_mints_a_token_the_api_accepts() {
    let output = binary(
        &[
            "token",
            "--sub",
            "alice@example.com",
            "--role",
            "viewer",
            "--ttl",
            "5m",
        ],
        &[("BP_JWT_HS256_SECRET", HS256_SECRET)],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    let app = crate::support::app::spawn_app().await;
    let response = app.get("/v1/backup-repositories", &token).await;
    assert_eq!(response.status(), 200);
    let forbidden = app
        .post_json("/v1/backup-repositories", &token, &serde_json::json!({}))
        .await;
    assert_eq!(forbidden.status(), 403);
    app.stop().await;
}
