//! `spawn_app`: a fresh database per test and the real Application on port 0.

use std::net::SocketAddr;
use std::time::Duration;

use backup_provisioner::auth::{Role, mint_hs256};
use backup_provisioner::config::{HttpArgs, WorkerSettingsArgs};
use backup_provisioner::crypto::EncryptionKey;
use backup_provisioner::jobs::Registry;
use backup_provisioner::startup::Application;
use secrecy::SecretString;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

pub const HS256_SECRET: &str = "test-secret-that-is-long-enough-for-hs256-0123456789";
pub const AUDIENCE: &str = "backup-provisioner";

/// Server Postgres URL without a database name; tests make their own databases.
pub fn postgres_base_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// Test databases made more than this long ago that nobody is connected to are dropped by the
/// sweep at the start of a test process (they were left by a run that was killed).
pub const STALE_DATABASE_AGE: Duration = Duration::from_secs(10 * 60);
/// The prefix of every test database's name: `bp_test_<unix seconds>_<random>`.
pub const DATABASE_PREFIX: &str = "bp_test_";

/// A test database: its pool, its URL, and the guard that drops it.
pub struct TestDb {
    pub pool: PgPool,
    pub url: String,
    /// Drops the database when dropped: keep it for as long as anything (a child process too)
    /// uses the database, normally until the test ends.
    pub guard: DatabaseGuard,
}

/// Owns a test database's name and drops the database when dropped: at the end of a test that
/// passed, and while one that failed unwinds. `DROP DATABASE … WITH (FORCE)` ends connections
/// still open (a pool not closed yet, a child process).
pub struct DatabaseGuard {
    /// Empty once [`DatabaseGuard::keep`] disarmed the guard.
    name: String,
}

impl DatabaseGuard {
    /// Takes charge of an existing database.
    pub fn new(name: String) -> DatabaseGuard {
        DatabaseGuard { name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Disarms the guard and returns the database's name: the caller drops the database itself.
    pub fn keep(mut self) -> String {
        std::mem::take(&mut self.name)
    }
}

impl Drop for DatabaseGuard {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        // Drop cannot await and may run on a runtime's own thread (or while that runtime shuts
        // down): a thread of its own with a runtime of its own.
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                match tokio::time::timeout(Duration::from_secs(30), drop_database(&name, true))
                    .await
                {
                    Ok(result) => result.map_err(|e| e.to_string()),
                    Err(_) => Err("timed out after 30 s".to_owned()),
                }
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("test database {}: could not drop it: {e}", self.name),
            Err(_) => eprintln!("test database {}: dropping it panicked", self.name),
        }
    }
}

async fn admin_connection() -> Result<PgConnection, sqlx::Error> {
    PgConnection::connect(&format!("{}/postgres", postgres_base_url())).await
}

/// `DROP DATABASE IF EXISTS`, with `FORCE` ending any connection still open.
async fn drop_database(name: &str, force: bool) -> Result<(), sqlx::Error> {
    let mut admin = admin_connection().await?;
    let force = if force { " WITH (FORCE)" } else { "" };
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name}{force}"
    )))
    .execute(&mut admin)
    .await?;
    admin.close().await
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// A fresh test database name: `bp_test_<unix seconds>_<12 random hex digits>`.
pub fn new_database_name() -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{DATABASE_PREFIX}{}_{}", unix_now(), &random[..12])
}

/// When a test database was made, from its name; `None` for other names (including the older
/// `bp_test_<uuid>` form, which carries no time).
pub fn database_created_at(name: &str) -> Option<u64> {
    let (secs, random) = name.strip_prefix(DATABASE_PREFIX)?.split_once('_')?;
    let valid = !secs.is_empty()
        && secs.bytes().all(|b| b.is_ascii_digit())
        && !random.is_empty()
        && random.bytes().all(|b| b.is_ascii_hexdigit());
    valid.then(|| secs.parse().ok()).flatten()
}

/// Drops the test databases that nobody is connected to and that were made more than
/// `older_than` ago; returns their names. The age comes from the name; a `bp_test_` name
/// without a time (the older form) is aged by its data directory's `PG_VERSION` file when the
/// server lets us read it (superuser), and kept otherwise. A database someone connected to
/// since is kept too (the drop is not forced), so a concurrent test process never loses one.
pub async fn sweep_stale_databases(older_than: Duration) -> Result<Vec<String>, sqlx::Error> {
    let mut admin = admin_connection().await?;
    let idle: Vec<(String, sqlx::postgres::types::Oid)> = sqlx::query_as(
        "SELECT d.datname::text, d.oid FROM pg_database d \
         WHERE starts_with(d.datname::text, $1) \
           AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datname = d.datname)",
    )
    .bind(DATABASE_PREFIX)
    .fetch_all(&mut admin)
    .await?;
    let now = unix_now();
    let mut dropped = Vec::new();
    for (name, oid) in idle {
        let age = match database_created_at(&name) {
            Some(created) => Some(now.saturating_sub(created)),
            None => sqlx::query_scalar::<_, f64>(
                "SELECT extract(epoch FROM now() - (pg_stat_file('base/' || $1::oid::text || '/PG_VERSION')).modification)::float8",
            )
            .bind(oid)
            .fetch_one(&mut admin)
            .await
            .ok()
            .map(|secs| secs.max(0.0) as u64),
        };
        let stale = age.is_some_and(|age| age > older_than.as_secs());
        if !stale {
            continue;
        }
        // Only names of our own making reach SQL text.
        let ours = name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if ours && drop_database(&name, false).await.is_ok() {
            dropped.push(name);
        }
    }
    admin.close().await?;
    Ok(dropped)
}

/// A new, empty database (migrated by the Application, or by [`migrated_db`]). The first call
/// in a process first sweeps away stale test databases of earlier runs.
pub async fn fresh_database() -> TestDb {
    static SWEPT: OnceCell<()> = OnceCell::const_new();
    SWEPT
        .get_or_init(|| async {
            match sweep_stale_databases(STALE_DATABASE_AGE).await {
                Ok(dropped) if !dropped.is_empty() => {
                    eprintln!("dropped {} stale test databases", dropped.len())
                }
                Ok(_) => {}
                Err(e) => eprintln!("sweeping stale test databases: {e}"),
            }
        })
        .await;
    let name = new_database_name();
    let mut admin = admin_connection()
        .await
        .expect("connect to Postgres (is it running on 127.0.0.1:5432?)");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("create database");
    // From here on the database is dropped however the test ends.
    let guard = DatabaseGuard::new(name);
    let _ = admin.close().await;
    let url = format!("{}/{}", postgres_base_url(), guard.name);
    let pool = PgPoolOptions::new()
        .max_connections(20)
        .connect(&url)
        .await
        .expect("connect to test database");
    TestDb { pool, url, guard }
}

/// A fresh database with every migration applied.
pub async fn migrated_db() -> TestDb {
    let db = fresh_database().await;
    backup_provisioner::db::migrate(&db.pool)
        .await
        .expect("migrate");
    db
}

/// A port nobody listens on right now (for a child process to bind).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

pub fn http_args() -> HttpArgs {
    HttpArgs {
        listen_addr: "127.0.0.1:0".parse().unwrap(),
        jwt_hs256_secret: Some(SecretString::from(HS256_SECRET)),
        oidc_issuer: None,
        jwt_audience: None,
        jwt_roles_claim: "roles".into(),
        jwt_max_lifetime: None,
        cors_origins: vec!["https://portal.example.com".into()],
        event_stream_keep_alive: Duration::from_secs(15),
        allowed_namespaces: vec![],
        bucket_name_pattern: backup_provisioner::domain::DEFAULT_BUCKET_PATTERN.into(),
        max_body_bytes: 16 * 1024,
        request_timeout: Duration::from_secs(60),
        header_read_timeout: Duration::from_secs(10),
        max_connections: 1024,
        max_header_bytes: 32 * 1024,
        // Tests make many mutations quickly: generous limits (http_hardening tests them).
        rate_limit_per_subject: "100000/min".parse().unwrap(),
        rate_limit_global: "100000/min".parse().unwrap(),
        rate_limit_reads_per_subject: "off".parse().unwrap(),
        ui_oidc_client_id: None,
        ui_oidc_scopes: "openid profile".into(),
    }
}

pub fn worker_args(workers: usize) -> WorkerSettingsArgs {
    WorkerSettingsArgs {
        workers,
        encryption_key: Some(SecretString::from(EncryptionKey::generate_base64())),
        previous_encryption_keys: None,
        job_lease: Duration::from_secs(5),
        poll_interval: Duration::from_millis(200),
        max_attempts: 5,
        retry_base: Duration::from_millis(50),
        shutdown_grace: Duration::from_secs(5),
        aws_endpoint_url: None,
        credential_check_budget: Duration::from_secs(20),
        sweep_interval: Duration::ZERO,
        sweep_grace: Duration::from_secs(3600),
        // Tests build their AWS clients unlimited; tests/api/verify_sweep.rs sets its own.
        aws_max_rps: 10_000,
        verify_interval: Duration::ZERO,
        verify_concurrency: 4,
        key_rotation: Default::default(),
        freshness: Default::default(),
        webhooks: Default::default(),
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub db: PgPool,
    pub database_url: String,
    pub client: reqwest::Client,
    pub shutdown: CancellationToken,
    pub server: tokio::task::JoinHandle<()>,
    /// Last, so the pool above is dropped before the database.
    database: DatabaseGuard,
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
    spawn_app_on(fresh_database().await, options).await
}

/// Starts the Application against a database made by [`fresh_database`]; the app owns it.
pub async fn spawn_app_on(database: TestDb, options: AppOptions) -> TestApp {
    let TestDb {
        pool: db,
        url: database_url,
        guard,
    } = database;
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
        database: guard,
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

    /// The name of the test's database (dropped when the app is).
    pub fn database_name(&self) -> &str {
        self.database.name()
    }

    /// Stops the service, then drops its database.
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
