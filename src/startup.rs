//! The composition root: wires configuration, clients, job kinds, the HTTP server and the
//! workers into a running service sharing one pool. Tests build the same [`Application`] on
//! port 0 with job kinds of their own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::cloud::aws::{self, AwsClients, AwsSettings};
use crate::cloud::rate_limit::AwsRateLimit;
use crate::config::{
    ConfigError, ControllerArgs, ControllerSettingsArgs, DatabaseArgs, HttpArgs, MigrateArgs,
    WorkerSettingsArgs,
};
use crate::http::{self, AppState, AppStateParts, HttpLimits, RequestPolicy};
use crate::jobs::{JobStateChanges, Registry, WorkerConfig, WorkerPool};
use crate::provision::Provisioner;
use crate::provision::sweep::Sweeper;
use crate::provision::verify_sweep::VerifySweeper;
use crate::telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("auth: {0}")]
    Auth(#[from] crate::auth::AuthError),
    #[error("listen: {0}")]
    Io(#[from] std::io::Error),
    /// The schema is older than the binary and the service's role may not migrate it (exit 3).
    #[error("database schema: {0}")]
    StaleSchema(String),
}

impl From<crate::db::SchemaError> for StartupError {
    fn from(err: crate::db::SchemaError) -> Self {
        match err {
            crate::db::SchemaError::Stale(message) => StartupError::StaleSchema(message),
            crate::db::SchemaError::Database(e) => StartupError::Database(e),
            crate::db::SchemaError::Migrate(e) => StartupError::Migrate(e),
        }
    }
}

/// A built, not yet running, service.
pub struct Application {
    pub db: PgPool,
    listener: Option<TcpListener>,
    state: Option<AppState>,
    limits: Option<HttpLimits>,
    workers: Option<WorkerPool>,
    /// The sweep of what failed jobs left, and its interval (see [`sweeper`]).
    sweep: Option<(Sweeper, Duration)>,
    /// Sends the webhook outbox (with workers and `BP_WEBHOOK_SECRET`; see [`webhook_sender`]).
    webhook_sender: Option<crate::webhooks::Sender>,
    pub shutdown: CancellationToken,
}

impl Application {
    /// Builds the API (if `http` is given) and the workers (if `worker.workers > 0`). First the
    /// schema: migrated when the pool's role may (tests, installs with one role), else checked
    /// to be current ([`crate::db::prepare_schema`]). `registry` holds the job kinds the workers
    /// run.
    pub async fn build(
        db: PgPool,
        http: Option<&HttpArgs>,
        worker: &WorkerSettingsArgs,
        registry: Registry,
    ) -> Result<Self, StartupError> {
        worker.check()?;
        crate::db::prepare_schema(&db).await?;
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let mut app = Application {
            db: db.clone(),
            listener: None,
            state: None,
            limits: None,
            workers: None,
            sweep: None,
            webhook_sender: None,
            shutdown,
        };
        if let Some(http) = http {
            app.build_http(http, worker, metrics.clone(), registry.clone())
                .await?;
        }
        if worker.workers > 0 {
            let config = WorkerConfig {
                concurrency: worker.workers,
                lease: worker.job_lease,
                poll_interval: worker.poll_interval,
                retry_base: worker.retry_base,
                shutdown_grace: worker.shutdown_grace,
                ..WorkerConfig::default()
            };
            let heartbeats = crate::db::heartbeat_pool(&db);
            let workers = WorkerPool::new(db, registry, config).with_heartbeat_pool(heartbeats);
            app.workers = Some(workers.with_metrics(metrics));
            app.webhook_sender = webhook_sender(worker, &app.db)?;
        }
        Ok(app)
    }

    async fn build_http(
        &mut self,
        http: &HttpArgs,
        worker: &WorkerSettingsArgs,
        metrics: Arc<Metrics>,
        job_kinds: Registry,
    ) -> Result<(), StartupError> {
        http.check()?;
        let auth = Authenticator::new(http.auth_config()?).await?;
        let policy = RequestPolicy {
            idempotency_abandon_after: http.request_timeout + Duration::from_secs(5),
            bucket_pattern: http.bucket_pattern()?,
            allowed_namespaces: http.allowed_namespaces.clone(),
            max_attempts: worker.max_attempts,
            event_stream_keep_alive: http.event_stream_keep_alive,
            webhooks: worker.webhooks.callback_policy()?,
        };
        let job_state_changes = JobStateChanges::start(self.db.clone(), self.shutdown.clone());
        self.state = Some(AppState::new(AppStateParts {
            db: self.db.clone(),
            auth,
            metrics,
            policy: Arc::new(policy),
            job_state_changes,
            job_kinds,
        }));
        self.limits = Some(HttpLimits {
            max_body_bytes: http.max_body_bytes,
            request_timeout: http.request_timeout,
            cors_origins: http.cors_origins.clone(),
            connections: http::server::ConnectionLimits {
                header_read_timeout: http.header_read_timeout,
                max_connections: http.max_connections,
                max_header_bytes: http.max_header_bytes,
            },
            rate_limits: http::rate_limit::RateLimitSettings {
                per_subject: http.rate_limit_per_subject,
                global: http.rate_limit_global,
                reads_per_subject: http.rate_limit_reads_per_subject,
            },
            ui: http::ui::UiSettings::new(
                http.oidc_issuer.as_ref(),
                http.ui_oidc_client_id.as_deref(),
                &http.ui_oidc_scopes,
            ),
        });
        self.listener = Some(TcpListener::bind(http.listen_addr).await?);
        Ok(())
    }

    /// Runs `sweep` (from [`sweeper`]) next to the workers until shutdown.
    pub fn with_sweeper(mut self, sweep: Option<(Sweeper, Duration)>) -> Self {
        self.sweep = sweep;
        self
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Runs until the shutdown token fires (see [`shutdown_on_signals`]), then stops accepting
    /// requests, lets workers drain, and returns.
    pub async fn run_until_stopped(self) -> Result<(), StartupError> {
        let shutdown = self.shutdown.clone();
        let workers: Option<JoinHandle<Result<(), sqlx::Error>>> =
            self.workers.map(|w| tokio::spawn(w.run(shutdown.clone())));
        let sweep = self
            .sweep
            .map(|(sweeper, every)| tokio::spawn(sweeper.run(every, shutdown.clone())));
        if let Some(sender) = self.webhook_sender {
            tokio::spawn(sender.run(shutdown.clone()));
        }
        if let (Some(listener), Some(state), Some(limits)) =
            (self.listener, self.state, self.limits)
        {
            let app = http::router(state, &limits);
            http::server::serve(listener, app, &limits.connections, shutdown.clone()).await?;
        }
        if let Some(workers) = workers {
            match workers.await {
                Ok(result) => result?,
                Err(e) => tracing::error!(error = %e, "worker task panicked"),
            }
        }
        if let Some(sweep) = sweep
            && let Err(e) = sweep.await
        {
            tracing::error!(error = %e, "sweep task panicked");
        }
        Ok(())
    }
}

/// `serve` (API and workers) and `worker` (workers only, `http` is None): connects, builds the
/// service with the job kinds from [`job_kinds`], and runs it until SIGTERM or SIGINT.
pub async fn run(
    database: &DatabaseArgs,
    http: Option<&HttpArgs>,
    worker: &WorkerSettingsArgs,
    controller: Option<&ControllerSettingsArgs>,
) -> Result<(), StartupError> {
    if let Some(http) = http {
        http.check()?;
    }
    worker.check()?;
    let options = crate::db::options(&database.database_url)?;
    let registry = job_kinds(worker).await?;
    let pool = crate::db::connect(options, worker.workers).await?;
    let app = Application::build(pool, http, worker, registry).await?;
    let sweep = sweeper(worker, &app.db).await?;
    let app = app.with_sweeper(sweep);
    if let Some((verify_sweep, tick)) = verify_sweeper(worker, &app.db) {
        tokio::spawn(verify_sweep.run(tick, app.shutdown.clone()));
    }
    if let Some((schedule, every)) = key_schedule(worker, &app.db).await? {
        tokio::spawn(schedule.run(every, app.shutdown.clone()));
    }
    if let Some((checker, tick)) = freshness_checker(worker, &app.db).await? {
        tokio::spawn(checker.run(tick, app.shutdown.clone()));
    }
    if let (Some(http), Some(controller)) = (http, controller)
        && controller.watch_postgresclusters
    {
        let rules = (&http.allowed_namespaces, &http.bucket_name_pattern);
        let settings = controller_settings(controller, rules, worker.max_attempts)?;
        let kube = kube_client().await?;
        let shutdown = app.shutdown.clone();
        tokio::spawn(crate::controller::run(
            app.db.clone(),
            kube,
            settings,
            shutdown,
        ));
    }
    if let Some(addr) = app.local_addr() {
        tracing::info!(%addr, workers = worker.workers, "serving");
    }
    shutdown_on_signals(app.shutdown.clone());
    app.run_until_stopped().await
}

/// The job kinds this service runs, with AWS clients from the standard credential chain
/// (`AWS_*`, profiles, web identity) and Kubernetes from `KUBECONFIG` or in-cluster config.
/// Without workers there is nothing to run, and no client is made.
pub async fn job_kinds(worker: &WorkerSettingsArgs) -> Result<Registry, StartupError> {
    if worker.workers == 0 {
        return Ok(Registry::new());
    }
    let encryption_key = worker.encryption_keys()?;
    let (aws, kube) = worker_clients(worker).await?;
    let provisioner = Provisioner {
        aws,
        kube,
        encryption_key,
        credential_check_budget: worker.credential_check_budget,
        credential_check_backoff: Duration::from_millis(50),
    };
    let timeline = crate::provision::rotate::Timeline {
        grace: worker.key_rotation.key_grace,
        delete_grace: worker.key_rotation.key_delete_grace,
    };
    let (rotator, retirer) = crate::provision::rotate::job_kinds(&provisioner, timeline);
    let adopter = crate::provision::adopt::Adopter::like(&provisioner);
    let deprovisioner = crate::provision::deprovision::Deprovisioner::like(&provisioner);
    let verifier = crate::provision::verify::Verifier::like(&provisioner);
    Ok(Registry::new()
        .register(verifier)
        .register(adopter)
        .register(deprovisioner)
        .register(provisioner)
        .register(rotator)
        .register(retirer))
}

/// The workers' AWS clients (standard credential chain), every request under the process's
/// `BP_AWS_MAX_RPS`, and Kubernetes client (`KUBECONFIG` or in-cluster).
async fn worker_clients(
    worker: &WorkerSettingsArgs,
) -> Result<(AwsClients, kube::Client), StartupError> {
    let settings = AwsSettings {
        endpoint_url: worker.aws_endpoint_url.clone(),
        region: None,
    };
    let limit = AwsRateLimit::process_wide(worker.aws_max_rps);
    let aws = aws::clients(&settings, None).await.with_rate_limit(&limit);
    let kube = crate::cloud::kube::client_from_env().await.map_err(|e| {
        ConfigError::new(
            "KUBECONFIG",
            format!("no usable Kubernetes configuration: {e}"),
        )
    })?;
    Ok((aws, kube))
}

/// The sweep of what failed or cancelled jobs left (`provision::sweep`) and its interval; none
/// without workers or with `BP_SWEEP_INTERVAL=0s`.
pub async fn sweeper(
    worker: &WorkerSettingsArgs,
    db: &PgPool,
) -> Result<Option<(Sweeper, Duration)>, StartupError> {
    if worker.workers == 0 || worker.sweep_interval.is_zero() {
        return Ok(None);
    }
    let (aws, kube) = worker_clients(worker).await?;
    let sweeper = Sweeper {
        db: db.clone(),
        iam: aws.iam,
        kube,
        keys: worker.encryption_keys()?,
        grace: worker.sweep_grace,
    };
    Ok(Some((sweeper, worker.sweep_interval)))
}

/// The key schedule (`provision::key_schedule`: due key retirements, automatic rotation) and
/// its interval; none without workers or with `BP_KEY_SCHEDULE_INTERVAL=0s`.
pub async fn key_schedule(
    worker: &WorkerSettingsArgs,
    db: &PgPool,
) -> Result<Option<(crate::provision::key_schedule::KeySchedule, Duration)>, StartupError> {
    let every = worker.key_rotation.key_schedule_interval;
    if worker.workers == 0 || every.is_zero() {
        return Ok(None);
    }
    let (aws, _) = worker_clients(worker).await?;
    let schedule = crate::provision::key_schedule::KeySchedule {
        db: db.clone(),
        iam: aws.iam,
        max_age: worker.key_rotation.key_max_age,
        max_attempts: worker.max_attempts,
    };
    Ok(Some((schedule, every)))
}

/// The periodic verification (`provision::verify_sweep`) and how often it tops up (every
/// second, or `BP_POLL_INTERVAL` if shorter: a freed slot is refilled within it, one cheap
/// query); none without workers or with `BP_VERIFY_INTERVAL=0s`.
pub fn verify_sweeper(
    worker: &WorkerSettingsArgs,
    db: &PgPool,
) -> Option<(VerifySweeper, Duration)> {
    if worker.workers == 0 || worker.verify_interval.is_zero() {
        return None;
    }
    let sweeper = VerifySweeper {
        db: db.clone(),
        interval: worker.verify_interval,
        concurrency: worker.verify_concurrency,
        max_attempts: worker.max_attempts,
    };
    Some((sweeper, worker.poll_interval.min(Duration::from_secs(1))))
}

/// The periodic backup freshness check (`provision::freshness`) and how often it looks for
/// due repositories (every minute, or `BP_FRESHNESS_INTERVAL` if shorter); none without
/// workers or with `BP_FRESHNESS_INTERVAL=0s`.
pub async fn freshness_checker(
    worker: &WorkerSettingsArgs,
    db: &PgPool,
) -> Result<Option<(crate::provision::freshness::FreshnessChecker, Duration)>, StartupError> {
    let interval = worker.freshness.freshness_interval;
    if worker.workers == 0 || interval.is_zero() {
        return Ok(None);
    }
    let (aws, _) = worker_clients(worker).await?;
    let checker = crate::provision::freshness::FreshnessChecker {
        db: db.clone(),
        aws,
        interval,
        concurrency: worker.freshness.freshness_concurrency,
    };
    Ok(Some((checker, interval.min(Duration::from_secs(60)))))
}

/// The webhook sender (`webhooks::sender`), run next to the workers of every replica (claims
/// do not collide); none without workers or without `BP_WEBHOOK_SECRET`.
pub fn webhook_sender(
    worker: &WorkerSettingsArgs,
    db: &PgPool,
) -> Result<Option<crate::webhooks::Sender>, StartupError> {
    let settings = &worker.webhooks;
    let Some(key) = settings.signing_key()? else {
        return Ok(None);
    };
    let sender_settings = crate::webhooks::SenderSettings {
        allowed: settings.allowed_hosts()?,
        timeout: settings.webhook_timeout,
        retry_base: settings.webhook_retry_base,
        retry_window: settings.webhook_retry_window,
        poll_interval: worker.poll_interval,
    };
    let sender = crate::webhooks::Sender::new(db.clone(), key, sender_settings)
        .map_err(|e| ConfigError::new("BP_WEBHOOK_TIMEOUT", e))?;
    Ok(Some(sender))
}

/// `controller`: the PostgresCluster controller alone until SIGTERM or SIGINT (its jobs run
/// on the workers of `serve` or `worker`). The schema is prepared as `serve` does.
pub async fn controller(args: &ControllerArgs) -> Result<(), StartupError> {
    let rules = (&args.allowed_namespaces, &args.bucket_name_pattern);
    let settings = controller_settings(&args.controller, rules, args.max_attempts)?;
    let options = crate::db::options(&args.database.database_url)?;
    let pool = crate::db::connect(options, 0).await?;
    crate::db::prepare_schema(&pool).await?;
    let kube = kube_client().await?;
    let shutdown = CancellationToken::new();
    shutdown_on_signals(shutdown.clone());
    crate::controller::run(pool, kube, settings, shutdown).await;
    Ok(())
}

/// The controller's settings from its arguments and the API's request rules (allowed
/// namespaces, bucket pattern), checked as the API checks them.
pub fn controller_settings(
    args: &ControllerSettingsArgs,
    (allowed_namespaces, bucket_pattern): (&Vec<String>, &String),
    max_attempts: i32,
) -> Result<crate::controller::Settings, ConfigError> {
    args.check()?;
    for namespace in allowed_namespaces {
        crate::domain::Namespace::parse(namespace, &[])
            .map_err(|e| ConfigError::new("BP_ALLOWED_NAMESPACES", e.to_string()))?;
    }
    let bucket_pattern = regex::Regex::new(bucket_pattern).map_err(|e| {
        ConfigError::new(
            "BP_BUCKET_NAME_PATTERN",
            format!("not a valid regular expression: {e}"),
        )
    })?;
    if max_attempts < 1 {
        return Err(ConfigError::new(
            "BP_JOB_MAX_ATTEMPTS",
            "must be at least 1",
        ));
    }
    Ok(crate::controller::Settings {
        name: args.controller_name.clone(),
        rules: crate::controller::RequestRules {
            allowed_namespaces: allowed_namespaces.clone(),
            bucket_pattern,
            default_region: args.controller_default_region.clone(),
        },
        api_url: args.controller_api_url.as_ref().map(|url| url.to_string()),
        follow_interval: args.controller_follow_interval,
        resync_interval: args.controller_resync_interval,
        max_attempts,
    })
}

/// The Kubernetes client of `KUBECONFIG` or the in-cluster configuration.
async fn kube_client() -> Result<kube::Client, StartupError> {
    crate::cloud::kube::client_from_env().await.map_err(|e| {
        StartupError::Config(ConfigError::new(
            "KUBECONFIG",
            format!("no usable Kubernetes configuration: {e}"),
        ))
    })
}

/// Fires `token` on SIGTERM or SIGINT.
pub fn shutdown_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {}
            _ = term => {}
        }
        tracing::info!("shutdown signal received");
        token.cancel();
    });
}

/// `migrate`: applies the migrations as the owner role (`BP_MIGRATION_DATABASE_URL`, else
/// `DATABASE_URL`), then, with `--grant-to` (`BP_RUNTIME_DB_ROLE`), grants the runtime role what
/// the service needs ([`crate::db::grant_runtime`]); the role is checked before anything runs.
pub async fn migrate(args: &MigrateArgs) -> Result<(), StartupError> {
    let (variable, url) = args.owner_url()?;
    let pool = crate::db::connect(crate::db::options_from(variable, url)?, 0).await?;
    let refused = |e: crate::db::GrantError| match e {
        crate::db::GrantError::Role(message) => {
            StartupError::Config(ConfigError::new("BP_RUNTIME_DB_ROLE", message))
        }
        crate::db::GrantError::Database(e) => StartupError::Database(e),
    };
    if let Some(role) = &args.grant_to {
        crate::db::check_runtime_role(&pool, role)
            .await
            .map_err(refused)?;
    }
    crate::db::migrate(&pool).await?;
    tracing::info!("migrations applied");
    if let Some(role) = &args.grant_to {
        crate::db::grant_runtime(&pool, role)
            .await
            .map_err(refused)?;
        tracing::info!(role, "runtime role granted its privileges");
    }
    pool.close().await;
    Ok(())
}
