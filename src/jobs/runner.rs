//! The worker pool: claims jobs, runs them with a heartbeat, records how they ended, rescues
//! jobs whose worker died, and shuts down gracefully.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::queue::{self, Finish, Job};
use super::{JobContext, JobError, Registry, backoff};
use crate::telemetry::Metrics;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Jobs run concurrently by this process.
    pub concurrency: usize,
    pub lease: Duration,
    pub poll_interval: Duration,
    pub retry_base: Duration,
    pub shutdown_grace: Duration,
    /// Identifies this process in `jobs.locked_by`.
    pub worker_id: String,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            concurrency: 4,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(5),
            retry_base: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(20),
            worker_id: format!("{}-{}", hostname(), std::process::id()),
        }
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into())
}

pub struct WorkerPool {
    pool: PgPool,
    registry: Registry,
    config: WorkerConfig,
    metrics: Option<Arc<Metrics>>,
}

impl WorkerPool {
    pub fn new(pool: PgPool, registry: Registry, config: WorkerConfig) -> Self {
        WorkerPool {
            pool,
            registry,
            config,
            metrics: None,
        }
    }

    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Runs until `shutdown` fires, then stops claiming and drains in-flight jobs: they may
    /// finish within the grace period; after it their leases are released for another worker.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), sqlx::Error> {
        let this = Arc::new(self);
        let mut listener = PgListener::connect_with(&this.pool).await?;
        listener.listen("bp_jobs_queued").await?;
        let slots = Arc::new(Semaphore::new(this.config.concurrency.max(1)));
        let job_stop = CancellationToken::new();
        let mut running = JoinSet::new();
        let mut tick = tokio::time::interval(this.config.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(worker = %this.config.worker_id, concurrency = this.config.concurrency, "workers started");
        loop {
            this.claim_while_possible(&slots, &job_stop, &mut running)
                .await;
            // A job in backoff becomes runnable without any NOTIFY: wake when it is due.
            // With every slot busy, a finishing job wakes the loop instead.
            let due = if slots.available_permits() == 0 {
                this.config.poll_interval
            } else {
                this.next_due().await
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => this.rescue().await,
                _ = tokio::time::sleep(due) => {}
                note = listener.try_recv() => if let Err(e) = note {
                    tracing::warn!(error = %e, "job notification listener failed; relying on polling");
                },
                Some(_) = running.join_next(), if !running.is_empty() => {}
            }
        }
        this.drain(running, job_stop).await;
        Ok(())
    }

    async fn claim_while_possible(
        self: &Arc<Self>,
        slots: &Arc<Semaphore>,
        job_stop: &CancellationToken,
        running: &mut JoinSet<()>,
    ) {
        while let Ok(permit) = slots.clone().try_acquire_owned() {
            match queue::claim(
                &self.pool,
                &self.registry.kinds(),
                &self.config.worker_id,
                self.config.lease,
            )
            .await
            {
                Ok(Some(job)) => {
                    let this = self.clone();
                    let stop = job_stop.child_token();
                    running.spawn(async move {
                        this.execute(job, stop).await;
                        drop(permit);
                    });
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming a job failed");
                    break;
                }
            }
        }
    }

    async fn next_due(&self) -> Duration {
        match queue::next_due_in(&self.pool, &self.registry.kinds()).await {
            Ok(Some(due)) => due
                .max(Duration::from_millis(10))
                .min(self.config.poll_interval),
            _ => self.config.poll_interval,
        }
    }

    async fn rescue(&self) {
        match queue::rescue_expired(&self.pool).await {
            Ok(ids) if !ids.is_empty() => {
                tracing::warn!(?ids, "re-queued jobs whose lease expired")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "rescuing expired jobs failed"),
        }
    }

    async fn drain(&self, mut running: JoinSet<()>, job_stop: CancellationToken) {
        if running.is_empty() {
            return;
        }
        tracing::info!(in_flight = running.len(), grace = ?self.config.shutdown_grace, "draining jobs");
        let all_done = async { while running.join_next().await.is_some() {} };
        if tokio::time::timeout(self.config.shutdown_grace, all_done)
            .await
            .is_err()
        {
            // Ask jobs to stop; each releases its own lease as it unwinds.
            job_stop.cancel();
            let release_deadline = Duration::from_secs(5);
            let rest = async { while running.join_next().await.is_some() {} };
            if tokio::time::timeout(release_deadline, rest).await.is_err() {
                running.abort_all();
            }
        }
    }

    /// Runs one claimed job to the end of this attempt.
    async fn execute(&self, job: Job, stop: CancellationToken) {
        let Some(handler) = self.registry.get(&job.kind) else {
            return;
        };
        let (id, token) = (job.id, job.lease_token.expect("claimed job has a token"));
        let span = tracing::info_span!("job", %id, kind = %job.kind, attempt = job.attempts);
        self.execute_in_span(job, handler, stop, id, token)
            .instrument(span)
            .await;
    }

    async fn execute_in_span(
        &self,
        job: Job,
        handler: Arc<dyn super::JobHandler>,
        stop: CancellationToken,
        id: Uuid,
        token: Uuid,
    ) {
        let lease_lost = stop.child_token();
        let heartbeat = tokio::spawn(heartbeat(
            self.pool.clone(),
            id,
            token,
            self.config.lease,
            lease_lost.clone(),
        ));
        let ctx = JobContext::new(self.pool.clone(), job.clone(), lease_lost.clone())
            .with_metrics(self.metrics.clone());
        let started = std::time::Instant::now();
        let result = tokio::select! {
            result = handler.run(&ctx) => result,
            _ = lease_lost.cancelled() => Err(if stop.is_cancelled() { JobError::Cancelled } else { JobError::LeaseLost }),
        };
        heartbeat.abort();
        if stop.is_cancelled() && result.is_err() {
            // Shutdown interrupted the job: hand it back without counting the attempt.
            let _ = queue::release(&self.pool, id, token).await;
            tracing::info!("released lease on shutdown");
            return;
        }
        let outcome = self.record_end(&job, token, result).await;
        if let Some(metrics) = &self.metrics {
            metrics.observe_job(&job.kind, outcome, started.elapsed());
        }
    }

    async fn record_end(
        &self,
        job: &Job,
        token: Uuid,
        result: Result<(), JobError>,
    ) -> &'static str {
        let (finish, label) = match &result {
            Ok(()) => (Finish::Succeeded, "succeeded"),
            Err(JobError::Cancelled) => (Finish::Cancelled, "cancelled"),
            Err(JobError::LeaseLost) => {
                tracing::warn!("lease lost; another worker owns the job now");
                return "lease_lost";
            }
            Err(JobError::Retryable(_) | JobError::Database(_))
                if job.attempts < job.max_attempts =>
            {
                let delay = backoff::delay(self.config.retry_base, job.attempts);
                tracing::warn!(error = %result.as_ref().unwrap_err(), ?delay, "attempt failed; will retry");
                (Finish::Retry { error: "", delay }, "retry")
            }
            Err(_) => (Finish::Failed { error: "" }, "failed"),
        };
        let message = result
            .as_ref()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        let finish = match finish {
            Finish::Retry { delay, .. } => Finish::Retry {
                error: &message,
                delay,
            },
            Finish::Failed { .. } => Finish::Failed { error: &message },
            other => other,
        };
        match queue::finish(&self.pool, job.id, token, finish).await {
            Ok(true) => label,
            Ok(false) => "lease_lost",
            Err(e) => {
                tracing::error!(error = %e, "recording the end of a job failed; the rescuer will retry it");
                "unrecorded"
            }
        }
    }
}

/// Extends the lease every third of its length; cancels `lost` when the lease is gone.
async fn heartbeat(pool: PgPool, id: Uuid, token: Uuid, lease: Duration, lost: CancellationToken) {
    let mut tick = tokio::time::interval(lease / 3);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = lost.cancelled() => return,
            _ = tick.tick() => {}
        }
        match queue::heartbeat(&pool, id, token, lease).await {
            Ok(true) => {}
            Ok(false) => {
                lost.cancel();
                return;
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed; retrying"),
        }
    }
}
