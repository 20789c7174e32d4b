//! Job state changes, fanned out from one LISTEN connection to every task that waits for a job
//! (long-polling requests today). The `jobs_notify` trigger sends the job id on `bp_job_state`.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const CHANNEL: &str = "bp_job_state";

/// A handle to the fan-out; cheap to clone.
#[derive(Clone)]
pub struct JobStateChanges {
    sender: broadcast::Sender<Uuid>,
}

impl JobStateChanges {
    /// Starts listening; reconnects after errors until `stop` fires.
    pub fn start(db: PgPool, stop: CancellationToken) -> Self {
        let (sender, _) = broadcast::channel(1024);
        let changes = JobStateChanges {
            sender: sender.clone(),
        };
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Err(e) = forward(&db, &sender, &stop).await {
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
        self.sender.subscribe()
    }
}

async fn forward(
    db: &PgPool,
    sender: &broadcast::Sender<Uuid>,
    stop: &CancellationToken,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(db).await?;
    listener.listen(CHANNEL).await?;
    loop {
        let note = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            note = listener.recv() => note?,
        };
        if let Ok(id) = note.payload().parse::<Uuid>() {
            let _ = sender.send(id);
        }
    }
}
