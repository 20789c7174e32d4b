//! Job changes, fanned out from one LISTEN connection to every task that waits for a job:
//! long-polling requests wait for a job's state (`bp_job_state`, sent by the `jobs_notify`
//! trigger), event streams for any new row of `job_events` (`bp_job_events`, sent by the
//! triggers that write those rows on each transition of a job or of one of its steps). Both
//! carry the job id.
//!
//! A notification is only a hint to re-read: one may be lost (a lagged receiver, the listener
//! reconnecting), so waiters re-read what they wait for after a lag and now and then anyway.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const STATE_CHANNEL: &str = "bp_job_state";
const EVENTS_CHANNEL: &str = "bp_job_events";

/// A handle to the fan-out; cheap to clone.
#[derive(Clone)]
pub struct JobStateChanges {
    states: broadcast::Sender<Uuid>,
    events: broadcast::Sender<Uuid>,
    stop: CancellationToken,
}

impl JobStateChanges {
    /// Starts listening; reconnects after errors until `stop` fires.
    pub fn start(db: PgPool, stop: CancellationToken) -> Self {
        let (states, _) = broadcast::channel(1024);
        let (events, _) = broadcast::channel(1024);
        let changes = JobStateChanges {
            states,
            events,
            stop: stop.clone(),
        };
        let senders = changes.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Err(e) = senders.forward(&db).await {
                    tracing::warn!(error = %e, "job state listener failed; reconnecting");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        });
        changes
    }

    /// Ids of jobs whose state changed from now on. A lagged receiver may have missed some:
    /// re-read what it waits for.
    pub fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.states.subscribe()
    }

    /// Ids of jobs that recorded a new event (a transition of the job or of a step) from now
    /// on. A lagged receiver may have missed some: re-read what it waits for.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Uuid> {
        self.events.subscribe()
    }

    /// Fires when the process stops: tasks that would wait forever (event streams) end then.
    pub fn stopping(&self) -> CancellationToken {
        self.stop.clone()
    }

    async fn forward(&self, db: &PgPool) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect_with(db).await?;
        listener.listen_all([STATE_CHANNEL, EVENTS_CHANNEL]).await?;
        loop {
            let note = tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                note = listener.recv() => note?,
            };
            let Ok(id) = note.payload().parse::<Uuid>() else {
                continue;
            };
            let sender = match note.channel() {
                STATE_CHANNEL => &self.states,
                _ => &self.events,
            };
            let _ = sender.send(id);
        }
    }
}

/// One recorded transition of a job (`kind` `job`) or of one of its steps (`kind` `step`), a
/// row of `job_events`. Within a job, `id` grows in commit order (see the migration
/// `20261203000030_job_events`), so "every event after id N" is exact.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RecordedEvent {
    pub id: i64,
    pub job_id: Uuid,
    pub kind: String,
    pub job_kind: String,
    pub step: Option<String>,
    pub position: Option<i32>,
    pub state: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub at: DateTime<Utc>,
}

impl RecordedEvent {
    /// A job's transition into a state it ends in (until someone retries it).
    pub fn ends_job(&self) -> bool {
        self.kind == "job"
            && super::JobState::parse(&self.state).is_some_and(super::JobState::is_terminal)
    }
}

const EVENT_COLUMNS: &str = "e.id, e.job_id, e.kind, j.kind AS job_kind, e.step, e.position, \
     e.state, e.attempts, e.last_error, e.started_at, e.finished_at, e.at";

/// The events of job `job` with an id above `after`, oldest first, at most `limit`.
pub async fn events_after(
    db: &PgPool,
    job: Uuid,
    after: i64,
    limit: i64,
) -> Result<Vec<RecordedEvent>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {EVENT_COLUMNS} FROM job_events e JOIN jobs j ON j.id = e.job_id
          WHERE e.job_id = $1 AND e.id > $2 ORDER BY e.id LIMIT $3"
    )))
    .bind(job)
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// The newest event of job `job`, if it has any.
pub async fn newest_event(db: &PgPool, job: Uuid) -> Result<Option<RecordedEvent>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {EVENT_COLUMNS} FROM job_events e JOIN jobs j ON j.id = e.job_id
          WHERE e.job_id = $1 ORDER BY e.id DESC LIMIT 1"
    )))
    .bind(job)
    .fetch_optional(db)
    .await
}
