//! Access key rotation without downtime (issue 10, item 3): the `rotate-access-key` job kind.
//!
//! Steps, each with its audit entry:
//! 1. `make_room`: IAM allows two keys per user; a key the Secret does not reference and nobody
//!    holds a secret for is deleted (never the one the Secret references). An active key of an
//!    earlier rotation still in its grace period refuses the rotation ([`keys::InGrace`]).
//! 2. `new_key`: CreateAccessKey; its secret is sealed (`sealed.rs`) in the transaction that
//!    records the step. A worker that dies in between leaves a key nobody can use: the next
//!    attempt deletes it before making another, so the user never holds more than two.
//! 3. `new_key_description`: the runbook's description tag on the new key.
//! 4. `prove`: the new key writes, reads and deletes a probe in the bucket, waiting out IAM's
//!    eventual consistency (`credential_check::verify`).
//! 5. `secret`: the Secret gets the new key and its unchanged cipher pass (read from the Secret,
//!    never generated here), is read back, and is never written over when it changed since this
//!    attempt read it (`secret::apply_built_from`). Its record wipes the sealed key secret and
//!    schedules the old key's retirement ([`retirements::schedule`]) in one transaction.
//! 6. `schedule_retirement`: reports the old key's timeline.
//!
//! The old key then stays active for `BP_KEY_GRACE`, is deactivated (after its last use is
//! checked), and is deleted `BP_KEY_DELETE_GRACE` later, by the `retire-access-key` job kind
//! ([`retire`]) that the key schedule (`key_schedule.rs`) queues when a retirement is due.
//!
//! A crash at any point never leaves a Secret referencing a deleted or inactive key: the key
//! the Secret references is never deleted by this job, the new key is in the Secret only once
//! proven, and the old key is retired only while the Secret references another one.

pub mod keys;
pub mod plan;
pub mod request;
pub mod retire;
pub mod retirements;

use std::time::Duration;

use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::access_key::{self, KeyOutput, KeySource};
use super::report::done;
use super::secret::{self, ExistingSecret, RepositorySecret, S3Conf};
use super::{credential_check, sealed};
use crate::cloud::aws::AwsClients;
use crate::cloud::{CloudError, Outcome, StepReport};
use crate::crypto::Keyring;
use crate::domain::{BucketName, Namespace, Region, RepositoryName};
use crate::jobs::{JobContext, JobError, JobHandler, JobKind, Subject};
use crate::repository::{self, Resources};

/// The longest pause between listings while IAM does not show the room a step made.
const ROOM_BACKOFF_CAP: Duration = Duration::from_secs(1);

/// A key the `new_key` step made (with its secret) or reused, and its report.
type KeyMade = (KeyOutput, StepReport, Option<access_key::NewAccessKey>);

/// The rotation job kind: one repository's access key, replaced without downtime.
pub struct RotateAccessKey;

impl JobKind for RotateAccessKey {
    /// Never rename: queued jobs carry it.
    const KIND: &'static str = "rotate-access-key";
    type Payload = RotatePayload;

    fn subject(payload: &RotatePayload) -> Option<Subject> {
        Some(Subject {
            id: payload.repository_id,
            name: payload.repository.to_string(),
        })
    }
}

/// What a rotation works on (stored as the job payload; no secrets).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RotatePayload {
    pub repository: RepositoryName,
    pub repository_id: uuid::Uuid,
    pub namespace: Namespace,
    pub bucket: BucketName,
    pub region: Region,
    /// The Secret's name when it is not the bucket's (an adopted `pgo-s3-creds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
}

impl RotatePayload {
    /// The repository's Secret: named after the bucket unless adopted under another name.
    pub fn secret_name(&self) -> &str {
        self.secret_name.as_deref().unwrap_or(self.bucket.as_str())
    }

    pub fn secret(&self) -> RepositorySecret<'_> {
        RepositorySecret {
            repository: &self.repository,
            namespace: &self.namespace,
            bucket: &self.bucket,
        }
    }
}

/// How long an old key lives after the Secret stopped referencing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeline {
    /// Active after the Secret changed (`BP_KEY_GRACE`): consumers syncing the Secret (an
    /// ExternalSecret refreshes hourly) move to the new key meanwhile.
    pub grace: Duration,
    /// Inactive before it is deleted (`BP_KEY_DELETE_GRACE`): an operator can still reactivate
    /// it if a forgotten consumer breaks.
    pub delete_grace: Duration,
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline {
            grace: Duration::from_secs(24 * 3600),
            delete_grace: Duration::from_secs(24 * 3600),
        }
    }
}

/// What the rotation job needs from the outside world.
pub struct Rotator {
    pub aws: AwsClients,
    pub kube: kube::Client,
    pub encryption_key: Keyring,
    pub credential_check_budget: Duration,
    pub credential_check_backoff: Duration,
    pub timeline: Timeline,
}

/// The rotation's steps, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    MakeRoom,
    NewKey,
    NewKeyDescription,
    Prove,
    Secret,
    ScheduleRetirement,
}

impl Step {
    /// Stored in `job_steps.step`; never rename.
    pub const fn name(self) -> &'static str {
        match self {
            Step::MakeRoom => "make_room",
            Step::NewKey => "new_key",
            Step::NewKeyDescription => "new_key_description",
            Step::Prove => "prove",
            Step::Secret => "secret",
            Step::ScheduleRetirement => "schedule_retirement",
        }
    }

    pub const fn position(self) -> i32 {
        self as i32 + 1
    }
}

/// The `make_room` step's output: the key the Secret referenced when the rotation began (the
/// one it retires) and what was deleted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Room {
    pub old_key_id: String,
    pub deleted: Vec<String>,
}

/// The Secret a rotation starts from must be ours and complete: its cipher pass is kept, its
/// key is the one retired.
pub fn ready_secret<'a>(
    existing: Option<&'a ExistingSecret>,
    namespace: &str,
    name: &str,
) -> Result<&'a S3Conf, JobError> {
    match existing {
        None => Err(JobError::Permanent(format!(
            "Secret {namespace}/{name} does not exist: there is no key to rotate; reconcile the \
             repository first"
        ))),
        Some(s) if !s.managed_by_us => Err(JobError::Permanent(format!(
            "Secret {namespace}/{name} is not managed by backup-provisioner; adopt it first"
        ))),
        Some(s) => s.conf.as_ref().ok_or_else(|| {
            JobError::Permanent(format!(
                "Secret {namespace}/{name} holds no complete s3.conf; reconcile the repository \
                 first (its cipher pass is kept)"
            ))
        }),
    }
}

#[async_trait::async_trait]
impl JobHandler for Rotator {
    fn kind(&self) -> &'static str {
        RotateAccessKey::KIND
    }

    async fn run(&self, ctx: &JobContext) -> Result<(), JobError> {
        let payload: RotatePayload = ctx.payload()?;
        let rotated = self.rotate(ctx, &payload).await;
        if let Err(err) = &rotated
            && gives_up(ctx, err)
        {
            self.abandon(ctx, &payload, err).await;
        }
        rotated
    }

    async fn plan(
        &self,
        payload: serde_json::Value,
    ) -> Option<Result<serde_json::Value, JobError>> {
        Some(self.plan_rotation(payload).await)
    }
}

/// Whether the job ends with `err` (no further attempt): a permanent failure, a cancel, or the
/// last attempt. A lost lease is another worker's business.
fn gives_up(ctx: &JobContext, err: &JobError) -> bool {
    match err {
        JobError::Permanent(_) | JobError::Cancelled => true,
        JobError::LeaseLost => false,
        JobError::Retryable(_) | JobError::Database(_) => {
            ctx.job().attempts >= ctx.job().max_attempts
        }
    }
}

impl Rotator {
    /// The rotation's steps, in order.
    async fn rotate(&self, ctx: &JobContext, payload: &RotatePayload) -> Result<(), JobError> {
        let payload = payload.clone();
        let (namespace, name) = (payload.namespace.as_str(), payload.secret_name());
        // This attempt's first read: s3.conf is built from it, and a Secret changed since is
        // not written over.
        let existing = secret::read(&self.kube, namespace, name).await?;
        let room = self
            .make_room_step(ctx, &payload, existing.as_ref())
            .await?;
        let key = self
            .new_key_step(ctx, &payload, existing.as_ref(), &room)
            .await?;
        let step = (
            Step::NewKeyDescription.name(),
            Step::NewKeyDescription.position(),
        );
        let (iam, user) = (&self.aws.iam, payload.bucket.iam_user_name());
        access_key::description_step(ctx, step, iam, user, &key.access_key_id).await?;
        let conf = self.s3_conf(ctx, &payload, existing.as_ref(), &key).await?;
        self.prove_step(ctx, &payload, &conf).await?;
        self.secret_step(ctx, &payload, &conf, existing.as_ref(), &room)
            .await?;
        self.schedule_step(ctx).await
    }

    /// A rotation that ends before the Secret holds its new key deletes that key (best effort):
    /// left sealed, a later reconcile would deliver it and delete the old key at once, without
    /// a grace period. A key the Secret references is never deleted; with no Secret to read,
    /// nothing is.
    async fn abandon(&self, ctx: &JobContext, payload: &RotatePayload, why: &JobError) {
        if let Err(e) = self.delete_undelivered_key(ctx, payload, why).await {
            tracing::warn!(error = %e, "the abandoned rotation's new key was kept");
        }
    }

    async fn delete_undelivered_key(
        &self,
        ctx: &JobContext,
        payload: &RotatePayload,
        why: &JobError,
    ) -> Result<(), JobError> {
        let store = self.sealed(payload);
        let Some(held) = store.get(ctx.pool(), sealed::Kind::AccessKey).await? else {
            return Ok(());
        };
        let (namespace, name) = (payload.namespace.as_str(), payload.secret_name());
        let existing = secret::read(&self.kube, namespace, name).await?;
        let referenced = existing.as_ref().map(|s| s.access_key_id.as_deref());
        if referenced == Some(Some(held.key_id.as_str())) {
            // An earlier attempt wrote the Secret but did not record it: finish that record.
            return self.schedule_unrecorded(ctx, payload, &held.key_id).await;
        }
        if referenced.is_none() {
            return Ok(());
        }
        let user = payload.bucket.iam_user_name();
        delete_key(&self.aws.iam, user, &held.key_id).await?;
        let mut tx = ctx.fenced_tx().await?;
        store.forget(&mut *tx, sealed::Kind::AccessKey).await?;
        let entry = crate::audit::AuditEntry {
            actor: ctx.job().created_by.clone(),
            subject: Some(payload.repository.to_string()),
            job_id: Some(ctx.job().id),
            action: format!("{}.abandon", RotateAccessKey::KIND),
            outcome: Outcome::Deleted.as_str().to_owned(),
            detail: json!({
                "user_name": user, "access_key_id": held.key_id,
                "reason": format!("the rotation ended before the Secret held its new key: {why}"),
            }),
            ..Default::default()
        };
        crate::audit::record(&mut *tx, &entry).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The Secret holds the new key `new_key` although the `secret` step was not recorded: the
    /// old key's retirement is scheduled (else the sweep would delete it without a grace
    /// period) and the sealed secret, which the Secret holds, is forgotten.
    async fn schedule_unrecorded(
        &self,
        ctx: &JobContext,
        payload: &RotatePayload,
        new_key: &str,
    ) -> Result<(), JobError> {
        let Some(room) = ctx.completed_output::<Room>(Step::MakeRoom.name()).await? else {
            return Ok(());
        };
        let mut tx = ctx.fenced_tx().await?;
        self.record_new_key(&mut tx, ctx, payload, &room, new_key)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// In the transaction `conn`: forgets the sealed key secret (the Secret now holds the new key), schedules
    /// the old key's retirement and records `new_key` as the repository's access key.
    async fn record_new_key(
        &self,
        conn: &mut sqlx::PgConnection,
        ctx: &JobContext,
        payload: &RotatePayload,
        room: &Room,
        new_key: &str,
    ) -> Result<(), JobError> {
        self.sealed(payload)
            .forget(&mut *conn, sealed::Kind::AccessKey)
            .await?;
        let retirement = retirements::NewRetirement {
            repository_id: payload.repository_id,
            rotation_job_id: ctx.job().id,
            old_key_id: &room.old_key_id,
            new_key_id: new_key,
            grace: self.timeline.grace,
            delete_grace: self.timeline.delete_grace,
        };
        retirements::schedule(&mut *conn, &retirement).await?;
        let resources = Resources {
            access_key_id: Some(new_key.to_owned()),
            ..Default::default()
        };
        repository::merge_resources(&mut *conn, payload.repository_id, &resources).await?;
        Ok(())
    }

    fn sealed(&self, payload: &RotatePayload) -> sealed::Store<'_> {
        sealed::Store {
            key: &self.encryption_key,
            repository_id: payload.repository_id,
        }
    }

    async fn make_room_step(
        &self,
        ctx: &JobContext,
        payload: &RotatePayload,
        existing: Option<&ExistingSecret>,
    ) -> Result<Room, JobError> {
        let step = Step::MakeRoom;
        ctx.step_with_own_commit(step.name(), step.position(), |attempt| async move {
            let namespace = payload.namespace.as_str();
            let conf = ready_secret(existing, namespace, payload.secret_name())?;
            let old = conf.access_key_id.clone();
            let user = payload.bucket.iam_user_name();
            let listed = access_key::list(&self.aws.iam, user).await?;
            let sealed = self.sealed(payload).get(ctx.pool(), sealed::Kind::AccessKey).await?;
            let pending = retirements::pending(ctx.pool(), payload.repository_id).await?;
            let sealed_id = sealed.as_ref().map(|s| s.key_id.as_str());
            let plan = keys::plan_room(&listed, &old, sealed_id, &pending)
                .map_err(|e| JobError::Permanent(e.to_string()))?;
            let gone: Vec<&String> = plan.retire_early.iter().map(|(_, id)| id).collect();
            if !plan.delete.is_empty() || !gone.is_empty() {
                ctx.check_lease_unless_cancelled().await?;
            }
            for id in plan.delete.iter().chain(gone.iter().copied()) {
                delete_key(&self.aws.iam, user, id).await?;
            }
            ctx.checkpoint(step.name(), "before-record");
            let mut tx = ctx.fenced_tx().await?;
            for (retirement, _) in &plan.retire_early {
                retirements::mark_deleted(&mut *tx, *retirement).await?;
            }
            let in_iam = listed.iter().any(|k| k.id == old);
            let room = Room {
                old_key_id: old,
                deleted: plan.delete.iter().chain(gone).cloned().collect(),
            };
            let outcome = match room.deleted.is_empty() {
                true => Outcome::AlreadyPresent,
                false => Outcome::Deleted,
            };
            let detail = json!({
                "user_name": user, "referenced_by_secret": room.old_key_id,
                "referenced_key_in_iam": in_iam, "deleted": room.deleted,
                "deleted_early_from_earlier_rotations": plan.retire_early.iter().map(|(_, id)| id).collect::<Vec<_>>(),
            });
            let finished = done(room.clone(), StepReport::new(outcome, detail));
            ctx.finish_step(&mut tx, step.name(), attempt, &finished).await?;
            tx.commit().await?;
            Ok(room)
        })
        .await
    }

    /// Reuses the key an earlier attempt made and sealed, else deletes the keys nobody can use
    /// and makes one, sealing its secret with the step's record.
    async fn new_key_step(
        &self,
        ctx: &JobContext,
        payload: &RotatePayload,
        existing: Option<&ExistingSecret>,
        room: &Room,
    ) -> Result<KeyOutput, JobError> {
        let step = Step::NewKey;
        ctx.step_with_own_commit(step.name(), step.position(), |attempt| async move {
            let user = payload.bucket.iam_user_name();
            let store = self.sealed(payload);
            let (deleted, (output, mut report, new)) = self
                .key_once_room_shows(ctx, payload, existing, room)
                .await?;
            report.detail = json!({
                "user_name": user, "access_key_id": output.access_key_id,
                "source": output.source, "deleted": deleted,
            });
            // Recorded even after a cancel: the key exists now, and its secret is lost unless
            // sealed.
            let mut tx = ctx.fenced_tx().await?;
            if let Some(new) = &new {
                let kind = sealed::Kind::AccessKey;
                store.put(&mut tx, kind, &new.id, &new.secret).await?;
            }
            let finished = done(output.clone(), report);
            ctx.finish_step(&mut tx, step.name(), attempt, &finished)
                .await?;
            tx.commit().await?;
            Ok(output)
        })
        .await
    }

    /// Lists the user's keys, deletes those nobody can use and makes (or reuses) one; returns
    /// every key it deleted. When IAM
    /// refuses the new key although the listing left room (keys made by a lost answer not
    /// listed yet, deleted keys still counted), lists again after a short capped backoff, within
    /// the credential check's budget, instead of failing the attempt: both pass within seconds.
    async fn key_once_room_shows(
        &self,
        ctx: &JobContext,
        payload: &RotatePayload,
        existing: Option<&ExistingSecret>,
        room: &Room,
    ) -> Result<(Vec<String>, KeyMade), JobError> {
        let until = tokio::time::Instant::now() + self.credential_check_budget;
        let mut pause = self.credential_check_backoff;
        let mut deleted = Vec::new();
        loop {
            let (plan, kept) = self.plan_new_key(ctx, payload, existing, room).await?;
            let user = payload.bucket.iam_user_name();
            let made = self.make_or_reuse(ctx, user, &plan).await?;
            for id in plan.delete {
                // A key IAM still lists after its delete is deleted again: named once.
                if !deleted.contains(&id) {
                    deleted.push(id);
                }
            }
            match made {
                Ok(made) => return Ok((deleted, made)),
                // With two keys kept (none of them deletable) the quota is real: no wait helps.
                Err(e) if kept < 2 && access_key::is_room_not_yet_visible(&e) => {
                    if tokio::time::Instant::now() + pause > until {
                        return Err(e.into());
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(ROOM_BACKOFF_CAP);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Which key to reuse and which to delete: every key but the sealed one, the one the Secret
    /// references and those in their grace period. Also returns how many listed keys it keeps.
    async fn plan_new_key(
        &self,
        ctx: &JobContext,
        payload: &RotatePayload,
        existing: Option<&ExistingSecret>,
        room: &Room,
    ) -> Result<(keys::NewKeyPlan, usize), JobError> {
        let user = payload.bucket.iam_user_name();
        let listed = access_key::list(&self.aws.iam, user).await?;
        let sealed = self
            .sealed(payload)
            .get(ctx.pool(), sealed::Kind::AccessKey)
            .await?;
        let grace = retirements::keys_in_grace(ctx.pool(), payload.repository_id).await?;
        let mut spare: Vec<&str> = grace.iter().map(String::as_str).collect();
        spare.push(&room.old_key_id);
        spare.extend(existing.and_then(|s| s.access_key_id.as_deref()));
        let sealed_id = sealed.as_ref().map(|s| s.key_id.as_str());
        let plan = keys::plan_new_key(&listed, sealed_id, &spare);
        let kept = listed.len().saturating_sub(plan.delete.len());
        Ok((plan, kept))
    }

    /// Deletes the keys `plan` names, then reuses the sealed key or makes one. The checkpoint
    /// `new_key:before-record` lies between CreateAccessKey and sealing its secret.
    async fn make_or_reuse(
        &self,
        ctx: &JobContext,
        user: &str,
        plan: &keys::NewKeyPlan,
    ) -> Result<Result<KeyMade, CloudError>, JobError> {
        if plan.reuse.is_none() || !plan.delete.is_empty() {
            // New work: not after a cancel, not without the lease.
            ctx.check_lease_unless_cancelled().await?;
        }
        for id in &plan.delete {
            delete_key(&self.aws.iam, user, id).await?;
        }
        if let Some(id) = &plan.reuse {
            let output = KeyOutput {
                access_key_id: id.clone(),
                source: KeySource::Sealed,
            };
            let report = StepReport::new(Outcome::AlreadyPresent, json!({}));
            return Ok(Ok((output, report, None)));
        }
        let new = match access_key::create_after_deleting(&self.aws.iam, user, &plan.delete).await {
            Ok(new) => new,
            Err(e) => return Ok(Err(e)),
        };
        ctx.checkpoint(Step::NewKey.name(), "before-record");
        let output = KeyOutput {
            access_key_id: new.id.clone(),
            source: KeySource::Created,
        };
        let mut report = StepReport::new(Outcome::Created, json!({}));
        report.upstream_request_id = new.request_id.clone();
        Ok(Ok((output, report, Some(new))))
    }

    /// The Secret's next content: the new key (its secret sealed) and the cipher pass of the
    /// Secret this attempt read (never a new one). A key secret held nowhere makes the key
    /// steps run again on the next attempt.
    async fn s3_conf(
        &self,
        ctx: &JobContext,
        payload: &RotatePayload,
        existing: Option<&ExistingSecret>,
        key: &KeyOutput,
    ) -> Result<S3Conf, JobError> {
        let (store, target) = (self.sealed(payload), payload.secret());
        let key_steps = [
            Step::NewKey.name(),
            Step::NewKeyDescription.name(),
            Step::Prove.name(),
        ];
        let key_id = key.access_key_id.as_str();
        secret::s3_conf_in_job(ctx, store, existing, key_id, target, &key_steps).await
    }

    /// The new key writes, reads and deletes a probe object before any consumer gets it.
    async fn prove_step(
        &self,
        ctx: &JobContext,
        payload: &RotatePayload,
        conf: &S3Conf,
    ) -> Result<(), JobError> {
        let step = Step::Prove;
        ctx.step(step.name(), step.position(), async {
            let client = self.aws.s3_with_static_credentials(
                payload.region.as_str(),
                &conf.access_key_id,
                conf.secret_access_key.expose_secret(),
            );
            let (budget, backoff) = (self.credential_check_budget, self.credential_check_backoff);
            let bucket = payload.bucket.as_str();
            let report = credential_check::verify(&client, bucket, budget, backoff).await?;
            Ok(done((), report))
        })
        .await
    }

    /// Writes the Secret with the new key and reads it back; its record wipes the sealed key
    /// secret and schedules the old key's retirement, in one transaction.
    async fn secret_step(
        &self,
        ctx: &JobContext,
        payload: &RotatePayload,
        conf: &S3Conf,
        existing: Option<&ExistingSecret>,
        room: &Room,
    ) -> Result<String, JobError> {
        let step = Step::Secret;
        let (namespace, name) = (payload.namespace.as_str(), payload.secret_name());
        let basis = secret::Basis::of(existing);
        ctx.step_with_own_commit(step.name(), step.position(), |attempt| async move {
            let mut report =
                secret::apply_built_from(&self.kube, namespace, name, conf, false, basis).await?;
            ctx.checkpoint(step.name(), "before-record");
            report.detail["cipher_pass"] = json!("unchanged");
            report.detail["previous_access_key_id"] = json!(room.old_key_id);
            let new_key = conf.access_key_id.as_str();
            let mut tx = ctx.fenced_tx().await?;
            self.record_new_key(&mut tx, ctx, payload, room, new_key)
                .await?;
            ctx.finish_step(
                &mut tx,
                step.name(),
                attempt,
                &done(new_key.to_owned(), report),
            )
            .await?;
            tx.commit().await?;
            Ok(new_key.to_owned())
        })
        .await
    }

    /// Reports the old key's timeline (scheduled with the Secret's record).
    async fn schedule_step(&self, ctx: &JobContext) -> Result<(), JobError> {
        let step = Step::ScheduleRetirement;
        let _: serde_json::Value = ctx
            .step(step.name(), step.position(), async {
                let scheduled = retirements::of_rotation(ctx.pool(), ctx.job().id)
                    .await?
                    .ok_or_else(|| {
                        JobError::Permanent("the Secret step scheduled no retirement".into())
                    })?;
                let detail = json!({
                    "old_access_key_id": scheduled.old_key_id,
                    "new_access_key_id": scheduled.new_key_id,
                    "secret_changed_at": scheduled.secret_changed_at,
                    "deactivate_after": scheduled.deactivate_after,
                    "delete_after": scheduled.delete_after,
                });
                let output = detail.clone();
                Ok(done(output, StepReport::new(Outcome::Created, detail)))
            })
            .await?;
        Ok(())
    }
}

/// Deletes a key and its description tag (a key already gone counts as deleted).
pub(crate) async fn delete_key(
    iam: &aws_sdk_iam::Client,
    user: &str,
    id: &str,
) -> Result<(), JobError> {
    access_key::delete(iam, user, id).await?;
    access_key::remove_description_tag(iam, user, id).await?;
    Ok(())
}

/// The rotation and retirement job kinds, with the clients and keys of the provisioning job.
pub fn job_kinds(
    provisioner: &super::Provisioner,
    timeline: Timeline,
) -> (Rotator, retire::Retirer) {
    let rotator = Rotator {
        aws: provisioner.aws.clone(),
        kube: provisioner.kube.clone(),
        encryption_key: provisioner.encryption_key.clone(),
        credential_check_budget: provisioner.credential_check_budget,
        credential_check_backoff: provisioner.credential_check_backoff,
        timeline,
    };
    let retirer = retire::Retirer {
        iam: provisioner.aws.iam.clone(),
        kube: provisioner.kube.clone(),
    };
    (rotator, retirer)
}
