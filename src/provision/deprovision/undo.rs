//! The way out of a deprovisioning job that ends before the Secret was removed: the Secret
//! still references one of the keys `deactivate_keys` made inactive, so whatever uses it is
//! denied while the repository shows only `failed` or `cancelled`. The job makes those keys
//! active again (`UpdateAccessKey`), audited as `deprovision-repository.reactivate_keys`, and
//! puts the step back to pending in the same transaction: a retry deactivates them again and
//! continues, and the repository, with no step done, returns to the state it had before the
//! deprovision was queued (the trigger of migration `20261202000050`).
//!
//! When the undoing fails, the step stays done and the trigger writes into the repository's
//! `last_error` which keys are inactive and how to reactivate them. A job that ends without a
//! worker (cancelled while queued for a retry, or out of attempts after its worker died) gets
//! that message too.

use serde_json::json;

use super::{DeprovisionPayload, Deprovisioner, Step, iam};
use crate::audit::{self, AuditEntry};
use crate::jobs::{JobContext, JobError};

/// The undoing's name in the audit log (`<kind>.reactivate_keys`).
const UNDO: &str = "reactivate_keys";

/// Whether `err` ends the job (no further attempt will run): a permanent failure, a cancel, or
/// a retryable error on the last attempt. Not a lost lease or a shutdown (another worker, or
/// this one after a restart, continues).
pub(super) fn job_ends(ctx: &JobContext, err: &JobError) -> bool {
    if ctx.stop.is_cancelled() {
        return false;
    }
    match err {
        JobError::Permanent(_) | JobError::Cancelled => true,
        JobError::Retryable(_) | JobError::Database(_) => {
            ctx.job().attempts >= ctx.job().max_attempts
        }
        JobError::LeaseLost => false,
    }
}

impl Deprovisioner {
    /// Undoes the deactivation when the Secret was not removed; returns the error the job ends
    /// with (`err`, or `err` and why the undoing failed).
    pub(super) async fn on_the_way_out(
        &self,
        ctx: &JobContext,
        p: &DeprovisionPayload,
        err: JobError,
    ) -> JobError {
        match self.undo_deactivation(ctx, p).await {
            Ok(()) => err,
            Err(JobError::LeaseLost) => JobError::LeaseLost,
            Err(undo) => JobError::Permanent(format!(
                "{err}; making the access keys it deactivated active again failed: {undo}"
            )),
        }
    }

    async fn undo_deactivation(
        &self,
        ctx: &JobContext,
        p: &DeprovisionPayload,
    ) -> Result<(), JobError> {
        let removed: Option<serde_json::Value> =
            ctx.completed_output(Step::RemoveSecret.name()).await?;
        let deactivated: Option<Option<Vec<String>>> =
            ctx.completed_output(Step::DeactivateKeys.name()).await?;
        // `Some(None)`: recorded before the step named its keys; the trigger's message says
        // what to do.
        let (None, Some(Some(keys))) = (removed, deactivated) else {
            return Ok(());
        };
        let user = p.bucket.iam_user_name();
        let report = iam::reactivate_keys(&self.aws.iam, user, &keys).await?;
        // The keys are active again: recorded even when a cancel is what ends the job.
        let mut tx = ctx.fenced_tx().await?;
        // The step's own row (src/jobs has no "undo a step despite a cancel"): pending again,
        // so a retry deactivates the keys again and the trigger sees no step done.
        let attempt: Option<i32> = sqlx::query_scalar(
            "UPDATE job_steps SET state = 'pending', output = NULL, last_error = $3
              WHERE job_id = $1 AND step = $2 AND state = 'succeeded'
          RETURNING attempts",
        )
        .bind(ctx.job().id)
        .bind(Step::DeactivateKeys.name())
        .bind(format!(
            "undone: access keys {} made active again as the job ended before the Secret was \
             removed",
            keys.join(", ")
        ))
        .fetch_optional(&mut *tx)
        .await?;
        let mut detail = report.to_json();
        detail["reason"] =
            json!("the job ended before the Secret (which references one of them) was removed");
        let entry = AuditEntry {
            actor: ctx.job().created_by.clone(),
            subject: ctx.job().subject_name.clone(),
            job_id: Some(ctx.job().id),
            step: Some(UNDO.to_owned()),
            // One undoing per deactivation: the deactivation's attempt number.
            attempt,
            action: format!("{}.{UNDO}", ctx.job().kind),
            outcome: report.outcome().to_owned(),
            detail,
            ..Default::default()
        };
        audit::record(&mut *tx, &entry).await?;
        tx.commit().await?;
        Ok(())
    }
}
