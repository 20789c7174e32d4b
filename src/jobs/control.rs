//! What operators do to jobs: cancel and retry, each audited in the transaction that changes
//! the job, so the audit log never records an action that did not happen (or misses one).

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::queue::{self, CancelOutcome, RetryOutcome};
use crate::audit::{self, Actor, AuditEntry};

/// Cancels job `id` for `actor`: a queued job at once, a running one at its next step boundary.
pub async fn cancel(db: &PgPool, id: Uuid, actor: Actor<'_>) -> Result<CancelOutcome, sqlx::Error> {
    let mut tx = db.begin().await?;
    let outcome = queue::cancel_in(&mut tx, id).await?;
    let recorded = match outcome {
        CancelOutcome::Cancelled => "cancelled",
        CancelOutcome::Requested => "cancel-requested",
        CancelOutcome::AlreadyFinished(_) | CancelOutcome::NotFound => return Ok(outcome),
    };
    record(&mut tx, actor, id, "job.cancel", recorded).await?;
    tx.commit().await?;
    Ok(outcome)
}

/// Queues failed or cancelled job `id` again for `actor`; its completed steps are not redone.
/// A job with a newer job for the same subject is refused ([`RetryOutcome::Superseded`]) and
/// nothing changes.
pub async fn retry(db: &PgPool, id: Uuid, actor: Actor<'_>) -> Result<RetryOutcome, sqlx::Error> {
    let mut tx = db.begin().await?;
    let outcome = queue::retry_in(&mut tx, id).await?;
    if outcome != RetryOutcome::Queued {
        return Ok(outcome);
    }
    record(&mut tx, actor, id, "job.retry", "queued").await?;
    tx.commit().await?;
    Ok(outcome)
}

async fn record(
    tx: &mut PgConnection,
    actor: Actor<'_>,
    id: Uuid,
    action: &str,
    outcome: &str,
) -> Result<(), sqlx::Error> {
    let subject = queue::get(&mut *tx, id).await?.and_then(|j| j.subject_name);
    let entry = AuditEntry {
        actor: actor.subject.to_owned(),
        request_id: actor.request_id.map(str::to_owned),
        client_request_id: actor.client_request_id.map(str::to_owned),
        subject,
        job_id: Some(id),
        action: action.into(),
        outcome: outcome.into(),
        ..Default::default()
    };
    audit::record(&mut *tx, &entry).await?;
    Ok(())
}
