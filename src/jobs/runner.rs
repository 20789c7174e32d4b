//! The worker pool: claims jobs, runs them with a heartbeat, records how they ended, rescues
//! jobs whose worker died, and shuts down gracefully.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
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
    /// Renews leases: its own connections, so that jobs holding every connection of `pool`
    /// cannot starve the heartbeats (see [`WorkerPool::with_heartbeat_pool`]).
    heartbeat_pool: PgPool,
    registry: Registry,
    config: WorkerConfig,
    metrics: Option<Arc<Metrics>>,
    /// Records the ends of attempts, many per commit ([`Finisher`]); started by [`Self::run`].
    finisher: Option<Finisher>,
}

impl WorkerPool {
    pub fn new(pool: PgPool, registry: Registry, config: WorkerConfig) -> Self {
        WorkerPool {
            heartbeat_pool: pool.clone(),
            pool,
            registry,
            config,
            metrics: None,
            finisher: None,
        }
    }

    /// Heartbeats use `pool` instead of the jobs' pool (default: the same pool).
    pub fn with_heartbeat_pool(mut self, pool: PgPool) -> Self {
        self.heartbeat_pool = pool;
        self
    }

    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Runs until `shutdown` fires, then stops claiming and drains in-flight jobs: they may
    /// finish within the grace period; after it their leases are released for another worker.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), sqlx::Error> {
        self.finisher = Some(Finisher::start(self.pool.clone()));
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
        loop {
            let free = slots.available_permits();
            if free == 0 {
                return;
            }
            // The leases run from no earlier than now: the heartbeats count from here.
            let leased_at = Instant::now();
            let claimed = match queue::claim_up_to(
                &self.pool,
                &self.registry.kinds(),
                &self.config.worker_id,
                self.config.lease,
                free,
            )
            .await
            {
                Ok(jobs) => jobs,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming jobs failed");
                    return;
                }
            };
            let all_slots_filled = claimed.len() == free;
            for job in claimed {
                // Only this loop takes permits, so each of the `free` claimed jobs has one.
                let permit = slots
                    .clone()
                    .try_acquire_owned()
                    .expect("a free slot per claim");
                let this = self.clone();
                let stop = job_stop.child_token();
                running.spawn(async move {
                    this.execute(job, stop, leased_at).await;
                    drop(permit);
                });
            }
            // Fewer jobs than free slots: the queue is drained for now.
            if !all_slots_filled {
                return;
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
    async fn execute(&self, job: Job, stop: CancellationToken, leased_at: Instant) {
        let Some(handler) = self.registry.get(&job.kind) else {
            return;
        };
        let (id, token) = (job.id, job.lease_token.expect("claimed job has a token"));
        let span = tracing::info_span!("job", %id, kind = %job.kind, attempt = job.attempts);
        self.execute_in_span(job, handler, stop, (id, token, leased_at))
            .instrument(span)
            .await;
    }

    async fn execute_in_span(
        &self,
        job: Job,
        handler: Arc<dyn super::JobHandler>,
        stop: CancellationToken,
        (id, token, leased_at): (Uuid, Uuid, Instant),
    ) {
        // Fires when the lease is lost or about to expire unrenewed: the select below then
        // drops the job's future, so it makes no further call.
        let lease_lost = stop.child_token();
        let lease = Lease {
            id,
            token,
            length: self.config.lease,
            renewed_at: leased_at,
        };
        let heartbeat = tokio::spawn(heartbeat(
            self.heartbeat_pool.clone(),
            lease,
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
        let ending = queue::Ending::new(job.id, token, finish);
        let recorded = match &self.finisher {
            Some(finisher) => finisher.finish(ending).await,
            None => queue::finish_all(&self.pool, &[ending])
                .await
                .map(|held| !held.is_empty())
                .map_err(|e| e.to_string()),
        };
        match recorded {
            Ok(true) => label,
            Ok(false) => "lease_lost",
            Err(e) => {
                tracing::error!(error = %e, "recording the end of a job failed; the rescuer will retry it");
                "unrecorded"
            }
        }
    }
}

type Reply = oneshot::Sender<Result<bool, String>>;

/// Records the ends of attempts for the pool's jobs: the ends that arrive while one statement
/// is in flight go together in the next ([`queue::finish_all`]), so an idle queue waits for
/// nothing and a busy one commits once for many jobs.
struct Finisher {
    endings: mpsc::UnboundedSender<(queue::Ending, Reply)>,
}

impl Finisher {
    fn start(pool: PgPool) -> Self {
        let (endings, queued) = mpsc::unbounded_channel();
        tokio::spawn(finish_batches(pool, queued));
        Finisher { endings }
    }

    /// True once the end is recorded; false when the lease was lost; the error's text else.
    async fn finish(&self, ending: queue::Ending) -> Result<bool, String> {
        let (reply, answer) = oneshot::channel();
        let stopped = || "the job finisher stopped".to_owned();
        self.endings.send((ending, reply)).map_err(|_| stopped())?;
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

/// Runs until every [`Finisher`] handle is gone.
async fn finish_batches(pool: PgPool, mut queued: mpsc::UnboundedReceiver<(queue::Ending, Reply)>) {
    const MOST_PER_STATEMENT: usize = 256;
    let mut batch = Vec::new();
    while queued.recv_many(&mut batch, MOST_PER_STATEMENT).await > 0 {
        let endings: Vec<queue::Ending> = batch.iter().map(|(ending, _)| ending.clone()).collect();
        let recorded = queue::finish_all(&pool, &endings).await;
        for (ending, reply) in batch.drain(..) {
            let answer = match &recorded {
                Ok(held) => Ok(held.contains(&ending.id)),
                Err(e) => Err(e.to_string()),
            };
            // A job whose task is gone needs no answer.
            let _ = reply.send(answer);
        }
    }
}

/// A job's lease as this worker knows it.
struct Lease {
    id: Uuid,
    token: Uuid,
    length: Duration,
    /// When the claim or the last successful renewal was sent. The database set the lease's
    /// expiry from its own clock on receipt, so it expires no earlier than `renewed_at +
    /// length`.
    renewed_at: Instant,
}

impl Lease {
    /// When the job must have stopped: a margin before the earliest possible expiry, for
    /// dropping the job's future and for a renewal that was answered late.
    fn stop_at(&self) -> Instant {
        self.renewed_at + self.length - stop_margin(self.length)
    }
}

/// A sixth of the lease: with renewals every third, two renewals in a row may fail (or hang)
/// before the job is stopped.
fn stop_margin(lease: Duration) -> Duration {
    lease / 6
}

/// Extends the lease every third of its length and cancels `lost` when the lease is gone, or
/// when no renewal succeeded in time to keep it ([`Lease::stop_at`]): once the lease expires
/// the rescuer may hand the job to another worker, and two workers must never call AWS for the
/// same job. A renewal that hangs (a network partition) counts as failed at that deadline.
async fn heartbeat(pool: PgPool, mut lease: Lease, lost: CancellationToken) {
    let every = lease.length / 3;
    let mut tick = tokio::time::interval_at(lease.renewed_at + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stop_at = lease.stop_at();
        tokio::select! {
            _ = lost.cancelled() => return,
            _ = tokio::time::sleep_until(stop_at) => break,
            _ = tick.tick() => {}
        }
        let sent = Instant::now();
        let renewal = queue::heartbeat(&pool, lease.id, lease.token, lease.length);
        match tokio::time::timeout_at(stop_at, renewal).await {
            Ok(Ok(true)) => lease.renewed_at = sent,
            Ok(Ok(false)) => {
                lost.cancel();
                return;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "heartbeat failed; retrying"),
            Err(_) => break,
        }
    }
    tracing::warn!(lease = ?lease.length, "the lease could not be renewed; stopping the job before it expires");
    lost.cancel();
}
