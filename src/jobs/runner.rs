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
    /// Records the ends of attempts and hands out the next jobs, many per commit
    /// ([`Turnover`]); started by [`Self::run`].
    turnover: Option<Turnover>,
}

impl WorkerPool {
    pub fn new(pool: PgPool, registry: Registry, config: WorkerConfig) -> Self {
        WorkerPool {
            heartbeat_pool: pool.clone(),
            pool,
            registry,
            config,
            metrics: None,
            turnover: None,
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
        let claimant = Claimant {
            kinds: self.registry.kinds(),
            worker: self.config.worker_id.clone(),
            lease: self.config.lease,
        };
        self.turnover = Some(Turnover::start(self.pool.clone(), claimant));
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
            this.claim_while_possible(&slots, (&job_stop, &shutdown), &mut running)
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
        (job_stop, shutdown): (&CancellationToken, &CancellationToken),
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
                let (job_stop, shutdown) = (job_stop.clone(), shutdown.clone());
                running.spawn(async move {
                    this.run_slot((job, leased_at), &job_stop, &shutdown).await;
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

    /// Runs `job` in a slot, then, while the pool is not shutting down and jobs are waiting,
    /// the jobs this slot is handed as it records each end: under load a slot's end and its
    /// next job are one statement ([`Turnover`]), and the slots' ends go together, instead of a
    /// commit for each end and each claim. An idle slot ends; the pool's loop claims for it on
    /// the next notification.
    async fn run_slot(
        &self,
        (mut job, mut leased_at): (Job, Instant),
        job_stop: &CancellationToken,
        shutdown: &CancellationToken,
    ) {
        loop {
            let attempt = self.attempt(job, job_stop.child_token(), leased_at).await;
            let wants_job = !shutdown.is_cancelled();
            // The next lease runs from no earlier than the request.
            let asked_at = Instant::now();
            let Some(next) = self.end_and_take(attempt, wants_job).await else {
                return;
            };
            // Shutdown began while the claim was in flight: the job goes back untouched.
            if shutdown.is_cancelled() {
                if let Some(token) = next.lease_token {
                    let _ = queue::release(&self.pool, next.id, token).await;
                }
                return;
            }
            (job, leased_at) = (next, asked_at);
        }
    }

    /// Runs one claimed job's handler to the end of this attempt. None when there is nothing
    /// to record: no handler for the kind, or the lease was handed back on shutdown.
    async fn attempt(
        &self,
        job: Job,
        stop: CancellationToken,
        leased_at: Instant,
    ) -> Option<Attempt> {
        let handler = self.registry.get(&job.kind)?;
        let (id, token) = (job.id, job.lease_token.expect("claimed job has a token"));
        let span = tracing::info_span!("job", %id, kind = %job.kind, attempt = job.attempts);
        let started = std::time::Instant::now();
        let result = self
            .run_handler(&job, handler, stop, (id, token, leased_at))
            .instrument(span.clone())
            .await?;
        Some(Attempt {
            job,
            token,
            result,
            started,
            span,
        })
    }

    async fn run_handler(
        &self,
        job: &Job,
        handler: Arc<dyn super::JobHandler>,
        stop: CancellationToken,
        (id, token, leased_at): (Uuid, Uuid, Instant),
    ) -> Option<Result<(), JobError>> {
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
        let result = tokio::select! {
            result = handler.run(&ctx) => result,
            _ = lease_lost.cancelled() => Err(if stop.is_cancelled() { JobError::Cancelled } else { JobError::LeaseLost }),
        };
        heartbeat.abort();
        if stop.is_cancelled() && result.is_err() {
            // Shutdown interrupted the job: hand it back without counting the attempt.
            let _ = queue::release(&self.pool, id, token).await;
            tracing::info!("released lease on shutdown");
            return None;
        }
        Some(result)
    }

    /// Records how `attempt` ended and, when `wants_job`, takes the slot's next job in the same
    /// statement.
    async fn end_and_take(&self, attempt: Option<Attempt>, wants_job: bool) -> Option<Job> {
        let Some(attempt) = attempt else {
            return self.exchange(None, wants_job).await.next;
        };
        let _entered = attempt.span.enter();
        let (ending, label) = self.ending_of(&attempt.job, attempt.token, &attempt.result);
        drop(_entered);
        // The attempt's duration, not the wait for its record or the next claim.
        let elapsed = attempt.started.elapsed();
        let answer = self.exchange(ending, wants_job).await;
        let outcome = match answer.recorded {
            None | Some(Ok(true)) => label,
            Some(Ok(false)) => "lease_lost",
            Some(Err(e)) => {
                attempt.span.in_scope(|| tracing::error!(error = %e, "recording the end of a job failed; the rescuer will retry it"));
                "unrecorded"
            }
        };
        if let Some(metrics) = &self.metrics {
            metrics.observe_job(&attempt.job.kind, outcome, elapsed);
        }
        answer.next
    }

    /// The row change recording an attempt's result (none when the lease was lost: the job is
    /// another worker's now), and the result's label for the metrics.
    fn ending_of(
        &self,
        job: &Job,
        token: Uuid,
        result: &Result<(), JobError>,
    ) -> (Option<queue::Ending>, &'static str) {
        let (finish, label) = match result {
            Ok(()) => (Finish::Succeeded, "succeeded"),
            Err(JobError::Cancelled) => (Finish::Cancelled, "cancelled"),
            Err(JobError::LeaseLost) => {
                tracing::warn!("lease lost; another worker owns the job now");
                return (None, "lease_lost");
            }
            Err(e @ (JobError::Retryable(_) | JobError::Database(_)))
                if job.attempts < job.max_attempts =>
            {
                let delay = backoff::delay(self.config.retry_base, job.attempts);
                tracing::warn!(error = %e, ?delay, "attempt failed; will retry");
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
        (Some(queue::Ending::new(job.id, token, finish)), label)
    }

    async fn exchange(&self, ending: Option<queue::Ending>, wants_job: bool) -> Answer {
        if ending.is_none() && !wants_job {
            return Answer::default();
        }
        match &self.turnover {
            Some(turnover) => turnover.exchange(ending, wants_job).await,
            None => Answer {
                recorded: ending.map(|_| Err(TURNOVER_STOPPED.to_owned())),
                next: None,
            },
        }
    }
}

/// How one attempt ended, to be recorded.
struct Attempt {
    job: Job,
    token: Uuid,
    result: Result<(), JobError>,
    started: std::time::Instant,
    span: tracing::Span,
}

/// A slot's request to [`Turnover`]: the end of its last attempt, if any to record, and
/// whether it takes another job.
struct Request {
    ending: Option<queue::Ending>,
    wants_job: bool,
    reply: oneshot::Sender<Answer>,
}

#[derive(Default)]
struct Answer {
    /// For an ending: true once recorded, false when the lease was lost, the error's text else.
    recorded: Option<Result<bool, String>>,
    /// The slot's next job, when it wanted one and one was waiting.
    next: Option<Job>,
}

const TURNOVER_STOPPED: &str = "the job finisher stopped";

/// Records the ends of attempts and hands slots their next jobs: the requests that arrive
/// while one statement is in flight go together in the next ([`queue::finish_and_claim`]), so
/// an idle queue waits for nothing and a busy one commits once for many ends and claims.
struct Turnover {
    requests: mpsc::UnboundedSender<Request>,
}

/// Who claims through a [`Turnover`]: the pool's kinds, its worker id and lease.
struct Claimant {
    kinds: Vec<&'static str>,
    worker: String,
    lease: Duration,
}

impl Turnover {
    fn start(pool: PgPool, claimant: Claimant) -> Self {
        let (requests, queued) = mpsc::unbounded_channel();
        tokio::spawn(turn_over(pool, claimant, queued));
        Turnover { requests }
    }

    async fn exchange(&self, ending: Option<queue::Ending>, wants_job: bool) -> Answer {
        let stopped = |ending: &Option<queue::Ending>| Answer {
            recorded: ending.as_ref().map(|_| Err(TURNOVER_STOPPED.to_owned())),
            next: None,
        };
        let failed = stopped(&ending);
        let (reply, answer) = oneshot::channel();
        let request = Request {
            ending,
            wants_job,
            reply,
        };
        if self.requests.send(request).is_err() {
            return failed;
        }
        answer.await.unwrap_or(failed)
    }
}

/// After `failed`, the ends on their own: the claim's part of the statement can fail (a lock
/// timeout on a claimed job's subject) where recording the ends would not.
async fn record_alone(
    pool: &PgPool,
    endings: &[queue::Ending],
    failed: &sqlx::Error,
) -> Result<Vec<Uuid>, String> {
    tracing::warn!(error = %failed, "recording job ends with the next claims failed; recording the ends alone");
    if endings.is_empty() {
        return Ok(Vec::new());
    }
    queue::finish_all(pool, endings)
        .await
        .map_err(|e| e.to_string())
}

/// Runs until every [`Turnover`] handle is gone.
async fn turn_over(pool: PgPool, claimant: Claimant, mut queued: mpsc::UnboundedReceiver<Request>) {
    const MOST_PER_STATEMENT: usize = 256;
    let mut batch = Vec::new();
    while queued.recv_many(&mut batch, MOST_PER_STATEMENT).await > 0 {
        // Slots handed jobs by the last statement are finishing short ones at this moment: a
        // moment's yield lets them join this statement instead of waiting for the next.
        tokio::task::yield_now().await;
        while batch.len() < MOST_PER_STATEMENT
            && let Ok(request) = queued.try_recv()
        {
            batch.push(request);
        }
        let endings: Vec<queue::Ending> = batch.iter().filter_map(|r| r.ending.clone()).collect();
        let want = batch.iter().filter(|r| r.wants_job).count();
        let claims = (
            &claimant.kinds[..],
            claimant.worker.as_str(),
            claimant.lease,
        );
        let (held, mut jobs) = match queue::finish_and_claim(&pool, &endings, claims, want).await {
            Ok((held, jobs)) => (Ok(held), jobs.into_iter()),
            Err(e) => (
                record_alone(&pool, &endings, &e).await,
                Vec::new().into_iter(),
            ),
        };
        for request in batch.drain(..) {
            let recorded = request.ending.as_ref().map(|ending| match &held {
                Ok(held) => Ok(held.contains(&ending.id)),
                Err(e) => Err(e.clone()),
            });
            let next = if request.wants_job { jobs.next() } else { None };
            let answer = Answer { recorded, next };
            // A slot whose task is gone (aborted at shutdown) cannot run what it was given.
            if let Err(Answer {
                next: Some(job), ..
            }) = request.reply.send(answer)
                && let Some(token) = job.lease_token
            {
                let _ = queue::release(&pool, job.id, token).await;
            }
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
