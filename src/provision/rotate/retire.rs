//! The `retire-access-key` job kind: the end of a rotated-out key's life, queued by the key
//! schedule (`key_schedule.rs`) when its retirement is due.
//!
//! - phase `deactivate` (the grace period passed): `last_used` reads `GetAccessKeyLastUsed` of
//!   the old key and reports a use after the Secret changed (a consumer that did not move);
//!   `deactivate` makes the key inactive (`UpdateAccessKey`).
//! - phase `delete` (the second period passed since deactivation): `delete` deletes it, unless
//!   someone made it active again (then it is kept and the retirement halts).
//!
//! Before any change the Secret is read: a Secret that references the old key (again), or that
//! is gone (copies synced from it may hold any key), halts the retirement with a report; the
//! key is kept until an operator looks at it. The key the Secret references is never touched.

use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::keys::{self, LastUsed};
use super::retirements::{self, Phase, Retirement};
use crate::cloud::{Outcome, StepReport};
use crate::domain::{BucketName, Namespace, Region, RepositoryName};
use crate::jobs::{JobContext, JobError, JobHandler, JobKind, Subject};
use crate::provision::access_key;
use crate::provision::report::done;
use crate::provision::secret;

/// The retirement job kind.
pub struct RetireAccessKey;

impl JobKind for RetireAccessKey {
    /// Never rename: queued jobs carry it.
    const KIND: &'static str = "retire-access-key";
    type Payload = RetirePayload;

    fn subject(payload: &RetirePayload) -> Option<Subject> {
        Some(Subject {
            id: payload.repository_id,
            name: payload.repository.to_string(),
        })
    }
}

/// One due retirement (stored as the job payload).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RetirePayload {
    pub repository: RepositoryName,
    pub repository_id: Uuid,
    pub namespace: Namespace,
    pub bucket: BucketName,
    pub region: Region,
    pub retirement_id: Uuid,
    pub phase: Phase,
    /// The Secret's name when it is not the bucket's (an adopted `pgo-s3-creds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
}

/// What the retirement job needs.
pub struct Retirer {
    pub iam: aws_sdk_iam::Client,
    pub kube: kube::Client,
}

/// The retirement's steps. Stored names: never rename.
const LAST_USED: (&str, i32) = ("last_used", 1);
const DEACTIVATE: (&str, i32) = ("deactivate", 2);
const DELETE: (&str, i32) = ("delete", 3);

#[async_trait::async_trait]
impl JobHandler for Retirer {
    fn kind(&self) -> &'static str {
        RetireAccessKey::KIND
    }

    async fn run(&self, ctx: &JobContext) -> Result<(), JobError> {
        let payload: RetirePayload = ctx.payload()?;
        let retirement = retirements::get(ctx.pool(), payload.retirement_id)
            .await?
            .ok_or_else(|| JobError::Permanent("the retirement no longer exists".into()))?;
        match payload.phase {
            Phase::Deactivate => {
                self.last_used_step(ctx, &retirement).await?;
                self.deactivate_step(ctx, &payload, &retirement).await
            }
            Phase::Delete => self.delete_step(ctx, &payload, &retirement).await,
        }
    }
}

/// The report of a use of the old key after the Secret changed.
pub fn not_moved_note(used: &LastUsed, retirement: &Retirement) -> Option<String> {
    let at = used.last_used_at?;
    used.used_after(retirement.secret_changed_at).then(|| {
        format!(
            "a consumer did not move: access key {} was used at {at} ({}), after the Secret \
             changed to access key {} at {}; it is deactivated now as scheduled",
            retirement.old_key_id,
            used.service.as_deref().unwrap_or("unknown service"),
            retirement.new_key_id,
            retirement.secret_changed_at,
        )
    })
}

impl Retirer {
    /// Reads the old key's last use, records it on the retirement, and reports a use after the
    /// Secret changed.
    async fn last_used_step(
        &self,
        ctx: &JobContext,
        retirement: &Retirement,
    ) -> Result<(), JobError> {
        let (name, position) = LAST_USED;
        let _: serde_json::Value = ctx
            .step_with_own_commit(name, position, |attempt| async move {
                let used = keys::last_used(&self.iam, &retirement.old_key_id).await?;
                let note = used.as_ref().and_then(|u| not_moved_note(u, retirement));
                let detail = json!({
                    "access_key_id": retirement.old_key_id,
                    "secret_changed_at": retirement.secret_changed_at,
                    "last_used": used,
                    "used_after_secret_changed": note.is_some(),
                    "warning": note,
                });
                if let Some(note) = &note {
                    tracing::warn!(access_key_id = %retirement.old_key_id, "{note}");
                }
                ctx.checkpoint(name, "before-record");
                // Fenced like every write of the job: a worker that lost its lease writes nothing.
                let mut tx = ctx.fenced_tx().await?;
                retirements::record_last_used(&mut *tx, retirement.id, &detail).await?;
                let report = StepReport::new(Outcome::AlreadyPresent, detail.clone());
                ctx.finish_step(&mut tx, name, attempt, &done(detail.clone(), report))
                    .await?;
                tx.commit().await?;
                Ok(detail)
            })
            .await?;
        Ok(())
    }

    async fn deactivate_step(
        &self,
        ctx: &JobContext,
        payload: &RetirePayload,
        retirement: &Retirement,
    ) -> Result<(), JobError> {
        let (name, position) = DEACTIVATE;
        ctx.step_with_own_commit(name, position, |attempt| async move {
            self.guard(ctx, payload, retirement).await?;
            let user = payload.bucket.iam_user_name();
            let report = keys::deactivate(&self.iam, user, &retirement.old_key_id).await?;
            ctx.checkpoint(name, "before-record");
            let mut tx = ctx.fenced_tx().await?;
            retirements::mark_deactivated(&mut *tx, retirement.id).await?;
            ctx.finish_step(&mut tx, name, attempt, &done((), report))
                .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn delete_step(
        &self,
        ctx: &JobContext,
        payload: &RetirePayload,
        retirement: &Retirement,
    ) -> Result<(), JobError> {
        let (name, position) = DELETE;
        ctx.step_with_own_commit(name, position, |attempt| async move {
            self.guard(ctx, payload, retirement).await?;
            let user = payload.bucket.iam_user_name();
            let key = &retirement.old_key_id;
            let listed = access_key::list(&self.iam, user).await?;
            if listed.iter().any(|k| k.id == *key && k.is_active()) {
                let reason = format!(
                    "access key {key} is active again (someone reactivated it after it was \
                     deactivated); it was not deleted"
                );
                return Err(self.halt(ctx, retirement, reason).await);
            }
            let mut report = access_key::delete(&self.iam, user, key).await?;
            access_key::remove_description_tag(&self.iam, user, key).await?;
            ctx.checkpoint(name, "before-record");
            report.detail["new_access_key_id"] = json!(retirement.new_key_id);
            let mut tx = ctx.fenced_tx().await?;
            retirements::mark_deleted(&mut *tx, retirement.id).await?;
            ctx.finish_step(&mut tx, name, attempt, &done((), report))
                .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Never touches the key the Secret references: reads the Secret right before the change.
    async fn guard(
        &self,
        ctx: &JobContext,
        payload: &RetirePayload,
        retirement: &Retirement,
    ) -> Result<(), JobError> {
        let name = payload.secret_name.as_deref();
        let (namespace, name) = (
            payload.namespace.as_str(),
            name.unwrap_or(payload.bucket.as_str()),
        );
        let existing = secret::read(&self.kube, namespace, name).await?;
        let old = &retirement.old_key_id;
        let reason = match existing.as_ref().map(|s| s.access_key_id.as_deref()) {
            None => format!(
                "Secret {namespace}/{name} does not exist: copies synced from it may still use \
                 access key {old}; it was kept"
            ),
            Some(Some(id)) if id == old => format!(
                "Secret {namespace}/{name} references access key {old} again; it was kept \
                 (restore the Secret with access key {new}, or deactivate or delete {new} by \
                 hand once nothing uses it, then rotate again)",
                new = retirement.new_key_id
            ),
            Some(_) => return Ok(()),
        };
        Err(self.halt(ctx, retirement, reason).await)
    }

    /// Halts the retirement (the schedule stops queueing it) and fails the job with `reason`.
    async fn halt(&self, ctx: &JobContext, retirement: &Retirement, reason: String) -> JobError {
        let halted = async {
            let mut tx = ctx.fenced_tx().await?;
            retirements::halt(&mut *tx, retirement.id, &reason).await?;
            tx.commit().await?;
            Ok::<(), JobError>(())
        };
        match halted.await {
            Ok(()) => JobError::Permanent(reason),
            Err(e) => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, Utc};

    use super::*;

    #[test]
    fn only_a_use_after_the_secret_changed_is_reported() {
        let changed = Utc::now();
        let retirement = Retirement {
            id: Uuid::new_v4(),
            repository_id: Uuid::new_v4(),
            rotation_job_id: Uuid::new_v4(),
            old_key_id: "OLD".into(),
            new_key_id: "NEW".into(),
            secret_changed_at: changed,
            deactivate_after: changed,
            delete_after: changed,
            deactivated_at: None,
            deleted_at: None,
            last_used: None,
            halted_at: None,
            halt_reason: None,
        };
        let used = |at| LastUsed {
            access_key_id: "OLD".into(),
            last_used_at: at,
            service: Some("s3".into()),
            region: None,
        };
        let late = not_moved_note(&used(Some(changed + Duration::minutes(5))), &retirement);
        let late = late.expect("reported");
        assert!(
            late.contains("a consumer did not move") && late.contains("OLD"),
            "{late}"
        );
        assert!(not_moved_note(&used(Some(changed - Duration::minutes(5))), &retirement).is_none());
        assert!(not_moved_note(&used(None), &retirement).is_none());
    }
}
