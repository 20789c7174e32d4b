//! `spawn_app`: a fresh database per test and the real Application on port 0.

use std::net::SocketAddr;
use std::time::Duration;

use backup_provisioner::auth::{Role, mint_hs256};
use backup_provisioner::config::{HttpArgs, WorkerSettingsArgs};
use backup_provisioner::crypto::EncryptionKey;
use backup_provisioner::jobs::Registry;
use backup_provisioner::startup::Application;
use secrecy::SecretString;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

pub const HS256_SECRET: &str = "test-secret-that-is-long-enough-for-hs256-0123456789";
pub const AUDIENCE: &str = "backup-provisioner";

/// Server Postgres URL without a database name; tests make their own databases.
pub fn postgres_base_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A new, empty database (migrated by the Application, or by [`migrated_db`]).
pub async fn fresh_database() -> (PgPool, String) {
    let name = format!("bp_test_{}", uuid::Uuid::new_v4().simple());
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{}/postgres", postgres_base_url()))
        .await
        .expect("connect to Postgres (is it running on 127.0.0.1:5432?)");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .expect("create database");
    admin.close().await;
    let url = format!("{}/{name}", postgres_base_url());
    let pool = PgPoolOptions::new()
        .max_connections(20)
        .connect(&url)
        .await
        .expect("connect to test database");
    (pool, url)
}

/// A fresh database with every migration applied.
pub async fn migrated_db() -> (PgPool, String) {
    let (pool, url) = fresh_database().await;
    backup_provisioner::db::migrate(&pool)
        .await
        .expect("migrate");
    (pool, url)
}

pub fn http_args() -> HttpArgs {
    HttpArgs {
        listen_addr: "127.0.0.1:0".parse().unwrap(),
        jwt_hs256_secret: Some(SecretString::from(HS256_SECRET)),
        oidc_issuer: None,
        jwt_audience: None,
        jwt_roles_claim: "roles".into(),
        cors_origins: vec!["https://portal.example.com".into()],
        allowed_namespaces: vec![],
        bucket_name_pattern: backup_provisioner::domain::DEFAULT_BUCKET_PATTERN.into(),
        max_body_bytes: 16 * 1024,
        request_timeout: Duration::from_secs(60),
    }
}

pub fn worker_args(workers: usize) -> WorkerSettingsArgs {
    WorkerSettingsArgs {
        workers,
        encryption_key: Some(SecretString::from(EncryptionKey::generate_base64())),
        job_lease: Duration::from_secs(5),
        poll_interval: Duration::from_millis(200),
        max_attempts: 5,
        retry_base: Duration::from_millis(50),
        shutdown_grace: Duration::from_secs(5),
        aws_endpoint_url: None,
        credential_check_budget: Duration::from_secs(20),
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub db: PgPool,
    pub database_url: String,
    pub client: reqwest::Client,
    pub shutdown: CancellationToken,
    pub server: tokio::task::JoinHandle<()>,
}

pub struct AppOptions {
    pub http: HttpArgs,
    pub worker: WorkerSettingsArgs,
    pub registry: Registry,
}

impl Default for AppOptions {
    fn default() -> Self {
        AppOptions {
            http: http_args(),
            worker: worker_args(0),
            registry: Registry::new(),
        }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(AppOptions::default()).await
}

pub async fn spawn_app_with(options: AppOptions) -> TestApp {
    backup_provisioner::install_crypto_provider();
    let (db, database_url) = fresh_database().await;
    spawn_app_on(db, database_url, options).await
}

/// Starts the Application against an existing database (e.g. a second replica).
pub async fn spawn_app_on(db: PgPool, database_url: String, options: AppOptions) -> TestApp {
    let app = Application::build(
        db.clone(),
        Some(&options.http),
        &options.worker,
        options.registry,
    )
    .await
    .expect("build application");
    let addr = app.local_addr().expect("bound");
    let shutdown = app.shutdown.clone();
    let server = tokio::spawn(async move {
        app.run_until_stopped().await.expect("server ran");
    });
    TestApp {
        addr,
        db,
        database_url,
        client: reqwest::Client::new(),
        shutdown,
        server,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn token(&self, subject: &str, roles: &[Role]) -> String {
        mint_hs256(
            &SecretString::from(HS256_SECRET),
            subject,
            roles,
            Duration::from_secs(600),
            AUDIENCE,
        )
        .expect("mint token")
    }

    pub fn operator(&self) -> String {
        self.token("operator@test", &[Role::Operator])
    }

    pub fn viewer(&self) -> String {
        self.token("viewer@test", &[Role::Viewer])
    }

    pub async fn post_json(
        &self,
        path: &str,
        token: &str,
        body: &serde_json::Value,
    ) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("request")
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("request")
    }

    /// Long-polls a job until it ends or `deadline` passes; returns its last view.
    pub async fn wait_for_job(&self, job_id: &str, deadline: Duration) -> serde_json::Value {
        let token = self.viewer();
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let view: serde_json::Value = self
                .get(&format!("/v1/jobs/{job_id}?wait=5s"), &token)
                .await
                .json()
                .await
                .expect("job json");
            let state = view["state"].as_str().unwrap_or_default().to_owned();
            if ["succeeded", "failed", "cancelled"].contains(&state.as_str())
                || tokio::time::Instant::now() >= until
            {
                return view;
            }
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.server).await;
    }
}

/// Polls `check` until it returns Some or the deadline passes (then panics with `what`).
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
