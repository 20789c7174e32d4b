//! Builds the running service: the HTTP server and/or the workers, sharing one pool.
//! Tests build the same [`Application`] on port 0.

use std::net::SocketAddr;
use std::sync::Arc;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::config::{ConfigError, HttpArgs, WorkerSettingsArgs};
use crate::http::{self, AppState, HttpLimits, RequestPolicy};
use crate::jobs::{Registry, WorkerConfig, WorkerPool};
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
}

/// A built, not yet running, service.
pub struct Application {
    pub db: PgPool,
    listener: Option<TcpListener>,
    state: Option<AppState>,
    limits: Option<HttpLimits>,
    workers: Option<WorkerPool>,
    pub shutdown: CancellationToken,
}

impl Application {
    /// Builds the API (if `http` is given) and the workers (if `worker.workers > 0`). Migrations
    /// run first. `registry` holds the job kinds the workers run.
    pub async fn build(
        db: PgPool,
        http: Option<&HttpArgs>,
        worker: &WorkerSettingsArgs,
        registry: Registry,
    ) -> Result<Self, StartupError> {
        worker.check()?;
        crate::db::migrate(&db).await?;
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let mut app = Application {
            db: db.clone(),
            listener: None,
            state: None,
            limits: None,
            workers: None,
            shutdown,
        };
        if let Some(http) = http {
            app.build_http(http, worker, metrics.clone()).await?;
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
            app.workers = Some(WorkerPool::new(db, registry, config).with_metrics(metrics));
        }
        Ok(app)
    }

    async fn build_http(
        &mut self,
        http: &HttpArgs,
        worker: &WorkerSettingsArgs,
        metrics: Arc<Metrics>,
    ) -> Result<(), StartupError> {
        http.check()?;
        let auth = Authenticator::new(http.auth_config()?).await?;
        let policy = RequestPolicy {
            idempotency_abandon_after: http.request_timeout + std::time::Duration::from_secs(5),
            bucket_pattern: http.bucket_pattern()?,
            allowed_namespaces: http.allowed_namespaces.clone(),
            max_attempts: worker.max_attempts,
        };
        let job_events = http::jobs::JobEvents::start(self.db.clone(), self.shutdown.clone());
        self.state = Some(AppState {
            db: self.db.clone(),
            auth,
            metrics,
            policy: Arc::new(policy),
            job_events,
        });
        self.limits = Some(HttpLimits {
            max_body_bytes: http.max_body_bytes,
            request_timeout: http.request_timeout,
            cors_origins: http.cors_origins.clone(),
        });
        self.listener = Some(TcpListener::bind(http.listen_addr).await?);
        Ok(())
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
        if let (Some(listener), Some(state), Some(limits)) =
            (self.listener, self.state, self.limits)
        {
            let app = http::router(state, &limits);
            let stop = shutdown.clone();
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await?;
        }
        if let Some(workers) = workers {
            match workers.await {
                Ok(result) => result?,
                Err(e) => tracing::error!(error = %e, "worker task panicked"),
            }
        }
        Ok(())
    }
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
