//! Deprovisioning (issue 10, day-2 operations): the job kind `deprovision-repository` takes a
//! repository's resources down in the reverse order of the runbook, one step (and one audit
//! entry) each:
//!
//! | step              | does                                                               |
//! |-------------------|--------------------------------------------------------------------|
//! | `deactivate_keys` | every access key of the user `Inactive` (whatever uses one stops)  |
//! | `remove_secret`   | the Secret, only if ours; the sealed material wiped in its commit  |
//! | `delete_keys`     | the user's access keys                                             |
//! | `leave_group`     | the user out of the bucket's group                                 |
//! | `delete_user`     | the user (and its login profile, policies, other groups, tags)     |
//! | `delete_group`    | the group's policies detached, its members removed, the group      |
//! | `delete_policy`   | the policy's non-default versions, then the policy                 |
//! | `bucket`          | kept, unless `delete_bucket` (emptied first only with `force`)     |
//!
//! Before any change ([`Deprovisioner::preflight`]): an IAM user that is neither tagged as ours
//! nor recorded by the repository is refused, and so is `delete_bucket` on a bucket that holds
//! objects without `force`. Every step reads first and treats "already gone" as done: a re-run
//! after a crash or a failure converges. The repository's record and audit log stay; the
//! trigger `backup_repository_follows_job` makes it `deleted` when the job succeeds.
//!
//! A job that ends (refused, failed, cancelled) before the Secret was removed undoes the
//! deactivation on its way out ([`undo`]): the keys are made active again, audited
//! (`reactivate_keys`), and the step is pending again (a retry deactivates them again and
//! goes on). A job that changed nothing leaves the repository in the state it had before
//! (migration `20261202000050`): a refused deprovision does not take a healthy repository out
//! of the verify sweep and the automatic rotation.
//!
//! [`JobHandler::plan`] runs the same functions in [`Mode::Plan`] (read calls only): a dry run.

pub mod iam;
pub mod kube_secret;
pub mod request;
pub mod storage;
pub mod teardown;
mod undo;

use std::future::Future;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use self::storage::Contents;
use self::teardown::{Mode, Teardown};
use crate::cloud::CloudError;
use crate::cloud::aws::AwsClients;
use crate::domain::{BucketName, Namespace, Region, RepositoryName};
use crate::jobs::{JobContext, JobError, JobHandler, JobKind, Subject};
use crate::provision::bucket::{MANAGED_BY_KEY, MANAGED_BY_VALUE};
use crate::provision::sealed;

/// The deprovisioning job kind: one repository's resources deleted.
pub struct DeprovisionRepository;

impl JobKind for DeprovisionRepository {
    /// Never rename: queued jobs carry it.
    const KIND: &'static str = "deprovision-repository";
    type Payload = DeprovisionPayload;

    fn subject(payload: &DeprovisionPayload) -> Option<Subject> {
        Some(Subject {
            id: payload.repository_id,
            name: payload.repository.to_string(),
        })
    }
}

/// What a deprovisioning job is asked to do (the job payload; no secrets).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeprovisionPayload {
    pub repository: RepositoryName,
    pub repository_id: Uuid,
    pub namespace: Namespace,
    pub bucket: BucketName,
    pub region: Region,
    /// Delete the bucket too (kept by default).
    #[serde(default)]
    pub delete_bucket: bool,
    /// Delete the bucket even though it holds objects (the request confirmed its name).
    #[serde(default)]
    pub force: bool,
    /// The repository's resources name the IAM user: it is ours even without our tag.
    #[serde(default)]
    pub recorded_user: bool,
    /// The repository's resources name the Secret: it is ours even without our label.
    #[serde(default)]
    pub recorded_secret: bool,
    /// The name of the Secret the repository recorded, when not the bucket's (an adopted
    /// Secret such as `pgo-s3-creds`).
    #[serde(default)]
    pub secret_name: Option<String>,
}

impl DeprovisionPayload {
    /// The Secret to remove: the one the repository recorded, else the one named after the
    /// bucket.
    pub fn secret_name(&self) -> &str {
        self.secret_name.as_deref().unwrap_or(self.bucket.as_str())
    }
}

/// What the deprovisioning job needs from the outside world.
pub struct Deprovisioner {
    pub aws: AwsClients,
    pub kube: kube::Client,
}

/// The steps of the deprovisioning job, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    DeactivateKeys,
    RemoveSecret,
    DeleteKeys,
    LeaveGroup,
    DeleteUser,
    DeleteGroup,
    DeletePolicy,
    Bucket,
}

impl Step {
    /// Stored in `job_steps.step`; never rename.
    pub const fn name(self) -> &'static str {
        match self {
            Step::DeactivateKeys => "deactivate_keys",
            Step::RemoveSecret => "remove_secret",
            Step::DeleteKeys => "delete_keys",
            Step::LeaveGroup => "leave_group",
            Step::DeleteUser => "delete_user",
            Step::DeleteGroup => "delete_group",
            Step::DeletePolicy => "delete_policy",
            Step::Bucket => "bucket",
        }
    }

    pub const fn position(self) -> i32 {
        self as i32 + 1
    }
}

#[async_trait::async_trait]
impl JobHandler for Deprovisioner {
    fn kind(&self) -> &'static str {
        DeprovisionRepository::KIND
    }

    async fn run(&self, ctx: &JobContext) -> Result<(), JobError> {
        let p: DeprovisionPayload = ctx.payload()?;
        match self.teardown(ctx, &p).await {
            Err(err) if undo::job_ends(ctx, &err) => Err(self.on_the_way_out(ctx, &p, err).await),
            other => other,
        }
    }

    async fn plan(&self, payload: Value) -> Option<Result<Value, JobError>> {
        Some(self.plan_of(payload).await)
    }
}

impl Deprovisioner {
    /// The preflight, then every step in order.
    async fn teardown(&self, ctx: &JobContext, p: &DeprovisionPayload) -> Result<(), JobError> {
        let s3 = self.aws.s3_for_region(p.region.as_str());
        self.preflight(&s3, p).await?;
        let (iam, apply) = (&self.aws.iam, Mode::Apply);
        let (user, group) = (p.bucket.iam_user_name(), p.bucket.iam_group_name());
        self.deactivate_step(ctx, user).await?;
        self.secret_step(ctx, p).await?;
        simple_step(ctx, Step::DeleteKeys, iam::delete_keys(iam, user, apply)).await?;
        simple_step(
            ctx,
            Step::LeaveGroup,
            iam::leave_group(iam, user, group, apply),
        )
        .await?;
        simple_step(
            ctx,
            Step::DeleteUser,
            iam::delete_user(iam, user, group, apply),
        )
        .await?;
        simple_step(ctx, Step::DeleteGroup, iam::delete_group(iam, group, apply)).await?;
        let policy = iam::delete_policy(iam, p.bucket.as_str(), apply);
        simple_step(ctx, Step::DeletePolicy, policy).await?;
        let bucket =
            storage::delete_bucket(&s3, p.bucket.as_str(), p.delete_bucket, p.force, apply);
        simple_step(ctx, Step::Bucket, bucket).await
    }

    /// Deactivates the user's keys; the step's output names those it made inactive (for
    /// [`undo`]; `None` in steps recorded before it did).
    async fn deactivate_step(&self, ctx: &JobContext, user: &str) -> Result<(), JobError> {
        let step = Step::DeactivateKeys;
        let _: Option<Vec<String>> = ctx
            .step(step.name(), step.position(), async {
                let deactivated = iam::deactivate_keys(&self.aws.iam, user, Mode::Apply).await?;
                Ok(deactivated.report.done(Some(deactivated.keys)))
            })
            .await?;
        Ok(())
    }
}

/// Runs one step whose work is a single teardown function; its report is the audit detail.
async fn simple_step(
    ctx: &JobContext,
    step: Step,
    work: impl Future<Output = Result<Teardown, CloudError>>,
) -> Result<(), JobError> {
    ctx.step(step.name(), step.position(), async {
        Ok(work.await?.done(()))
    })
    .await
}

impl Deprovisioner {
    /// A deprovisioner with the provisioner's clients (the same AWS and Kubernetes identity).
    pub fn like(provisioner: &crate::provision::job::Provisioner) -> Self {
        Deprovisioner {
            aws: provisioner.aws.clone(),
            kube: provisioner.kube.clone(),
        }
    }

    /// Refuses, before any change, what the job must not do or could not finish: delete an IAM
    /// user that is not ours, a Secret the service may not delete, a bucket that holds objects
    /// without `force`.
    async fn preflight(
        &self,
        s3: &aws_sdk_s3::Client,
        p: &DeprovisionPayload,
    ) -> Result<(), JobError> {
        let user = p.bucket.iam_user_name();
        if iam::user_tagged_ours(&self.aws.iam, user).await? == Some(false) && !p.recorded_user {
            return Err(JobError::Permanent(format!(
                "IAM user {user} is not tagged {MANAGED_BY_KEY}: {MANAGED_BY_VALUE} and the \
                 repository did not record it: it was not made by backup-provisioner, so nothing \
                 was deleted. Remove or tag it by hand, then retry"
            )));
        }
        let (namespace, name) = (p.namespace.as_str(), p.secret_name());
        kube_secret::preflight(&self.kube, namespace, name, p.recorded_secret).await?;
        if p.delete_bucket && !p.force {
            let bucket = p.bucket.as_str();
            if let Contents::Objects(n) = storage::contents(s3, bucket).await?
                && n > 0
            {
                return Err(JobError::Permanent(storage::refusal(bucket)));
            }
        }
        Ok(())
    }

    /// Removes the Secret (if ours) and wipes the repository's sealed material in the
    /// transaction that records the step: nothing secret of the repository stays behind.
    async fn secret_step(&self, ctx: &JobContext, p: &DeprovisionPayload) -> Result<(), JobError> {
        let step = Step::RemoveSecret;
        ctx.step_with_own_commit(step.name(), step.position(), |attempt| async move {
            let (namespace, name) = (p.namespace.as_str(), p.secret_name());
            let report =
                kube_secret::remove(&self.kube, namespace, name, p.recorded_secret, Mode::Apply)
                    .await?;
            ctx.checkpoint(step.name(), "before-record");
            // The Secret is gone: record that even if a cancel arrived meanwhile.
            let mut tx = ctx.fenced_tx().await?;
            let wiped = sealed::wipe(&mut *tx, p.repository_id).await?;
            let mut done = report.done(());
            done.detail["sealed_material_wiped"] = json!(wiped);
            ctx.finish_step(&mut tx, step.name(), attempt, &done)
                .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// The dry run: the preflight, then every step's function in [`Mode::Plan`].
    async fn plan_of(&self, payload: Value) -> Result<Value, JobError> {
        let p: DeprovisionPayload = serde_json::from_value(payload)
            .map_err(|e| JobError::Permanent(format!("payload: {e}")))?;
        let s3 = self.aws.s3_for_region(p.region.as_str());
        self.preflight(&s3, &p).await?;
        let (iam, plan) = (&self.aws.iam, Mode::Plan);
        let (user, group, bucket) = (
            p.bucket.iam_user_name(),
            p.bucket.iam_group_name(),
            p.bucket.as_str(),
        );
        let (namespace, recorded) = (p.namespace.as_str(), p.recorded_secret);
        let reports = [
            iam::deactivate_keys(iam, user, plan).await?.report,
            kube_secret::remove(&self.kube, namespace, p.secret_name(), recorded, plan).await?,
            iam::delete_keys(iam, user, plan).await?,
            iam::leave_group(iam, user, group, plan).await?,
            iam::delete_user(iam, user, group, plan).await?,
            iam::delete_group(iam, group, plan).await?,
            iam::delete_policy(iam, bucket, plan).await?,
            storage::delete_bucket(&s3, bucket, p.delete_bucket, p.force, plan).await?,
        ];
        Ok(Value::Array(
            reports.iter().map(Teardown::to_json).collect(),
        ))
    }
}
