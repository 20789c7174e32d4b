//! The provisioning job kind and its step sequence: the runbook's sections in order (the
//! bucket alongside the IAM chain), each run as a persisted, idempotent [`JobContext`] step by
//! a thin wrapper that calls into the section's module and records what it made. The work of
//! each step lives in its section's module (see the table in [`super`]).
//!
//! Credential safety rules, in the order they bite:
//! - an existing Secret that we do not manage stops the job before anything is changed
//!   ([`secret::refuse_unmanaged`]);
//! - a cipher pass found anywhere (the Secret, or sealed in Postgres) is reused, never replaced
//!   ([`cipher_pass::decide`]); a new one is sealed with the step's success;
//! - an access key's secret is sealed in the short transaction that records the key step's
//!   success, right after CreateAccessKey returns; no transaction is open during the call,
//!   and the lease (given up before it expires, see `jobs::runner`) keeps other workers away
//!   ([`access_key::reconcile_access_key`]);
//! - keys we cannot use (no secret held, not referenced by the Secret) are deleted before a new
//!   one is made, so the user never needs more than IAM's two keys;
//! - make before break: the key the Secret references is deleted only by the last step, once
//!   its replacement is proven and in the Secret ([`access_key::retire_keys_except`]);
//! - the sealed material is wiped in the transaction that records the Secret's step.

use std::time::Duration;

use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::access_key::{self, KeyOutput, KeySource, UserKeys};
use super::adopt::in_the_way;
use super::report::done;
use super::secret::{self, ExistingSecret, RepositorySecret, S3Conf};
use super::{bucket, cipher_pass, credential_check, group, policy, sealed, user};
use crate::cloud::StepReport;
use crate::cloud::aws::AwsClients;
use crate::crypto::Keyring;
use crate::domain::{BucketName, Namespace, Region, RepositoryName, ValidationError};
use crate::jobs::{JobContext, JobError, JobHandler, JobKind, Subject};
use crate::repository::{self, DesiredRepository, RepositoryRow, Resources, SecretRef};

/// The provisioning job kind: one repository, brought to the runbook's state.
pub struct ProvisionRepository;

impl JobKind for ProvisionRepository {
    /// Never rename: queued jobs carry it.
    const KIND: &'static str = "provision-repository";
    type Payload = ProvisionPayload;

    fn subject(payload: &ProvisionPayload) -> Option<Subject> {
        Some(Subject {
            id: payload.repository_id,
            name: payload.repository.to_string(),
        })
    }
}

/// What a provisioning job is asked to do (stored as the job payload; no secrets). Every name is
/// validated again when a worker reads the payload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProvisionPayload {
    pub repository: RepositoryName,
    pub repository_id: uuid::Uuid,
    pub namespace: Namespace,
    pub bucket: BucketName,
    pub region: Region,
    #[serde(default)]
    pub allow_new_cipher_pass: bool,
    #[serde(default)]
    pub adopt_existing_secret: bool,
}

impl ProvisionPayload {
    /// The payload provisioning `desired` as repository `repository_id` (e.g. a nil id for a
    /// dry run of a repository not stored yet).
    pub fn for_desired(desired: &DesiredRepository, repository_id: uuid::Uuid) -> Self {
        ProvisionPayload {
            repository: desired.name.clone(),
            repository_id,
            namespace: desired.namespace.clone(),
            bucket: desired.bucket.clone(),
            region: desired.region.clone(),
            allow_new_cipher_pass: desired.options.allow_new_cipher_pass,
            adopt_existing_secret: desired.options.adopt_existing_secret,
        }
    }

    /// The payload provisioning the stored repository `row` with its options. Its names were
    /// validated when it was stored; they are parsed again here.
    pub fn for_row(row: &RepositoryRow) -> Result<Self, ValidationError> {
        Ok(ProvisionPayload {
            repository: RepositoryName::parse(&row.name)?,
            repository_id: row.id,
            namespace: Namespace::try_from(row.namespace.clone())?,
            bucket: BucketName::try_from(row.bucket.clone())?,
            region: Region::parse(&row.region)?,
            allow_new_cipher_pass: row.options.0.allow_new_cipher_pass,
            adopt_existing_secret: row.options.0.adopt_existing_secret,
        })
    }

    /// The repository's Secret.
    pub fn secret(&self) -> RepositorySecret<'_> {
        RepositorySecret {
            repository: &self.repository,
            namespace: &self.namespace,
            bucket: &self.bucket,
        }
    }
}

/// What the provisioning job needs from the outside world.
pub struct Provisioner {
    pub aws: AwsClients,
    pub kube: kube::Client,
    /// Seals with the current key; previous keys still open what they sealed (rotation).
    pub encryption_key: Keyring,
    /// How long the credential check waits for IAM's eventual consistency.
    pub credential_check_budget: Duration,
    pub credential_check_backoff: Duration,
}

/// The steps of the provisioning job, in display order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Bucket,
    Policy,
    Group,
    User,
    CipherPass,
    AccessKey,
    AccessKeyDescription,
    CredentialCheck,
    Secret,
    RetireOldKeys,
}

impl Step {
    /// Stored in `job_steps.step`; never rename.
    pub const fn name(self) -> &'static str {
        match self {
            Step::Bucket => "bucket",
            Step::Policy => "policy",
            Step::Group => "group",
            Step::User => "user",
            Step::CipherPass => "cipher_pass",
            Step::AccessKey => "access_key",
            Step::AccessKeyDescription => "access_key_description",
            Step::CredentialCheck => "credential_check",
            Step::Secret => "secret",
            Step::RetireOldKeys => "retire_old_keys",
        }
    }

    pub const fn position(self) -> i32 {
        self as i32 + 1
    }
}

#[async_trait::async_trait]
impl JobHandler for Provisioner {
    fn kind(&self) -> &'static str {
        ProvisionRepository::KIND
    }

    async fn run(&self, ctx: &JobContext) -> Result<(), JobError> {
        let payload: ProvisionPayload = ctx.payload()?;
        let existing = secret::read(
            &self.kube,
            payload.namespace.as_str(),
            payload.bucket.as_str(),
        )
        .await?;
        let adopt = payload.adopt_existing_secret;
        secret::refuse_unmanaged(existing.as_ref(), payload.secret(), adopt)?;
        if !adopt {
            let (bucket, region) = (payload.bucket.as_str(), payload.region.as_str());
            let (db, id) = (ctx.pool(), payload.repository_id);
            in_the_way::refuse_hand_made_unless_known(&self.aws, db, id, bucket, region).await?;
        }
        let s3 = self.aws.s3_for_region(payload.region.as_str());
        // What would otherwise fail the job only after every AWS resource is made is checked
        // before the first AWS change: the Secret can be written, an existing bucket is usable.
        let (namespace, name) = (payload.namespace.as_str(), payload.bucket.as_str());
        secret::preflight(&self.kube, namespace, name).await?;
        bucket::preflight(&s3, name, payload.region.as_str()).await?;
        // The bucket and the IAM chain (policy, then group, then user) do not depend on each
        // other: they run concurrently.
        let iam_chain = async {
            let policy_arn = self.policy_step(ctx, &payload).await?;
            self.group_step(ctx, &payload, &policy_arn).await?;
            self.user_step(ctx, &payload).await
        };
        // join, not try_join: a failure on one side lets the other finish and record its step
        // instead of abandoning it half-way.
        let (bucket, iam) = tokio::join!(self.bucket_step(ctx, &s3, &payload), iam_chain);
        first_failure_of(bucket.map(drop), iam)?;
        self.cipher_pass_step(ctx, &s3, &payload, existing.as_ref())
            .await?;
        let key = self
            .access_key_step(ctx, &payload, existing.as_ref())
            .await?;
        let step = (
            Step::AccessKeyDescription.name(),
            Step::AccessKeyDescription.position(),
        );
        let (iam, user) = (&self.aws.iam, payload.bucket.iam_user_name());
        access_key::description_step(ctx, step, iam, user, &key.access_key_id).await?;
        let conf = self.s3_conf(ctx, &payload, existing.as_ref(), &key).await?;
        self.credential_check_step(ctx, &payload, &key, &conf)
            .await?;
        self.secret_step(ctx, &payload, &conf, existing.as_ref())
            .await?;
        self.retire_step(ctx, &payload, &conf).await
    }

    /// The job's steps in plan mode (`plan.rs`: `plan_provisioning`): read calls only.
    async fn plan(
        &self,
        payload: serde_json::Value,
    ) -> Option<Result<serde_json::Value, JobError>> {
        Some(self.plan_provisioning(payload).await)
    }
}

/// Combines two concurrent branches: a permanent failure on either side wins (retrying cannot
/// help), then any other failure.
fn first_failure_of(a: Result<(), JobError>, b: Result<(), JobError>) -> Result<(), JobError> {
    match (a, b) {
        (Err(e @ JobError::Permanent(_)), _) | (_, Err(e @ JobError::Permanent(_))) => Err(e),
        (Err(e), _) | (_, Err(e)) => Err(e),
        (Ok(()), Ok(())) => Ok(()),
    }
}

impl Provisioner {
    async fn record_resources(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        patch: Resources,
    ) -> Result<(), JobError> {
        // Fenced like every other write of the job: a worker that lost its lease stays quiet.
        let mut tx = ctx.fenced_tx().await?;
        repository::merge_resources(&mut *tx, payload.repository_id, &patch).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The repository's sealed material (an access key's secret, a new cipher pass).
    fn sealed(&self, payload: &ProvisionPayload) -> sealed::Store<'_> {
        sealed::Store {
            key: &self.encryption_key,
            repository_id: payload.repository_id,
        }
    }

    async fn bucket_step(
        &self,
        ctx: &JobContext,
        s3: &aws_sdk_s3::Client,
        payload: &ProvisionPayload,
    ) -> Result<String, JobError> {
        let (bucket, region) = (payload.bucket.as_str(), payload.region.as_str());
        let arn: String = ctx
            .step(Step::Bucket.name(), Step::Bucket.position(), async {
                let repository = payload.repository.as_str();
                let report = bucket::ensure(s3, bucket, region, repository).await?;
                Ok(done(bucket::arn(bucket), report))
            })
            .await?;
        let resources = Resources {
            bucket_arn: Some(arn.clone()),
            ..Default::default()
        };
        self.record_resources(ctx, payload, resources).await?;
        Ok(arn)
    }

    async fn policy_step(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
    ) -> Result<String, JobError> {
        let arn: String = ctx
            .step(Step::Policy.name(), Step::Policy.position(), async {
                let (report, arn) = policy::ensure(&self.aws.iam, payload.bucket.as_str()).await?;
                Ok(done(arn, report))
            })
            .await?;
        let resources = Resources {
            policy_arn: Some(arn.clone()),
            ..Default::default()
        };
        self.record_resources(ctx, payload, resources).await?;
        Ok(arn)
    }

    async fn group_step(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        policy_arn: &str,
    ) -> Result<(), JobError> {
        let name: String = ctx
            .step(Step::Group.name(), Step::Group.position(), async {
                let report =
                    group::ensure(&self.aws.iam, payload.bucket.as_str(), policy_arn).await?;
                Ok(done(payload.bucket.iam_group_name().to_owned(), report))
            })
            .await?;
        let resources = Resources {
            group: Some(name),
            ..Default::default()
        };
        self.record_resources(ctx, payload, resources).await
    }

    async fn user_step(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
    ) -> Result<(), JobError> {
        let name: String = ctx
            .step(Step::User.name(), Step::User.position(), async {
                let (bucket, repository) = (payload.bucket.as_str(), payload.repository.as_str());
                let report = user::ensure(&self.aws.iam, bucket, repository).await?;
                Ok(done(payload.bucket.iam_user_name().to_owned(), report))
            })
            .await?;
        let resources = Resources {
            user: Some(name),
            ..Default::default()
        };
        self.record_resources(ctx, payload, resources).await
    }

    /// Settles which cipher pass the Secret will hold (see [`cipher_pass::decide`]); a newly
    /// generated one is sealed in the same transaction as the step's success.
    async fn cipher_pass_step(
        &self,
        ctx: &JobContext,
        s3: &aws_sdk_s3::Client,
        payload: &ProvisionPayload,
        existing: Option<&ExistingSecret>,
    ) -> Result<cipher_pass::Source, JobError> {
        let step = Step::CipherPass;
        let sealed = self.sealed(payload);
        ctx.step_with_own_commit(step.name(), step.position(), |attempt| async move {
            let copies = cipher_pass::Copies::find(existing, ctx.pool(), sealed).await?;
            let allow_new = payload.allow_new_cipher_pass;
            let has_objects = || bucket::has_objects(s3, payload.bucket.as_str());
            let decision =
                cipher_pass::decide(copies, allow_new, payload.secret(), has_objects).await?;
            let mut tx = ctx.fenced_tx_unless_cancelled().await?;
            cipher_pass::seal_generated(&mut tx, sealed, &decision).await?;
            ctx.checkpoint(step.name(), "before-record");
            let source = decision.source();
            let report = StepReport::new(decision.outcome(), json!({ "source": source }));
            ctx.finish_step(&mut tx, step.name(), attempt, &done(source, report))
                .await?;
            tx.commit().await?;
            Ok(source)
        })
        .await
    }

    /// Reconciles the user's access keys (see [`access_key::reconcile_access_key`], which also
    /// records the step's success and seals a new key's secret).
    async fn access_key_step(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        existing: Option<&ExistingSecret>,
    ) -> Result<KeyOutput, JobError> {
        let step = Step::AccessKey;
        let keys = UserKeys {
            iam: &self.aws.iam,
            user: &payload.bucket,
            sealed: self.sealed(payload),
        };
        let referenced = existing
            .and_then(|s| s.conf.as_ref())
            .map(|c| c.access_key_id.as_str());
        let key: KeyOutput = ctx
            .step_with_own_commit(step.name(), step.position(), |attempt| {
                access_key::reconcile_access_key(ctx, step.name(), attempt, &keys, referenced)
            })
            .await?;
        let resources = Resources {
            access_key_id: Some(key.access_key_id.clone()),
            ..Default::default()
        };
        self.record_resources(ctx, payload, resources).await?;
        Ok(key)
    }

    /// The Secret's content (see [`secret::s3_conf`]). When the key's secret is held nowhere,
    /// the key steps run again on the next attempt and make a new key.
    async fn s3_conf(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        existing: Option<&ExistingSecret>,
        key: &KeyOutput,
    ) -> Result<S3Conf, JobError> {
        let sealed = self.sealed(payload);
        let (key_id, target) = (key.access_key_id.as_str(), payload.secret());
        let key_steps = [
            Step::AccessKey.name(),
            Step::AccessKeyDescription.name(),
            Step::CredentialCheck.name(),
        ];
        secret::s3_conf_in_job(ctx, sealed, existing, key_id, target, &key_steps).await
    }

    /// Proves the key works before the repository is `ready`: a new key writes, reads and
    /// deletes a probe object; a key already in the Secret is checked read-only, so a re-run of
    /// a ready repository makes no mutating call.
    async fn credential_check_step(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        key: &KeyOutput,
        conf: &S3Conf,
    ) -> Result<(), JobError> {
        let step = Step::CredentialCheck;
        ctx.step(step.name(), step.position(), async {
            let client = self.aws.s3_with_static_credentials(
                payload.region.as_str(),
                &conf.access_key_id,
                conf.secret_access_key.expose_secret(),
            );
            let bucket = payload.bucket.as_str();
            let (budget, backoff) = (self.credential_check_budget, self.credential_check_backoff);
            let report = match key.source {
                KeySource::InSecret => {
                    credential_check::verify_read_only(&client, bucket, budget, backoff).await?
                }
                KeySource::Created | KeySource::Sealed => {
                    credential_check::verify(&client, bucket, budget, backoff).await?
                }
            };
            Ok(done((), report))
        })
        .await
    }

    /// Writes the Secret, reads it back, and wipes the sealed material in the same transaction
    /// that records success. `conf` was built from `existing` (this attempt's first read): a
    /// Secret changed since is not written over, the next attempt builds from it.
    async fn secret_step(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        conf: &S3Conf,
        existing: Option<&ExistingSecret>,
    ) -> Result<(), JobError> {
        let step = Step::Secret;
        let (namespace, name) = (payload.namespace.as_str(), payload.bucket.as_str());
        let adopt = payload.adopt_existing_secret;
        let basis = secret::Basis::of(existing);
        let secret_ref: SecretRef = ctx
            .step_with_own_commit(step.name(), step.position(), |attempt| async move {
                let report =
                    secret::apply_built_from(&self.kube, namespace, name, conf, adopt, basis)
                        .await?;
                ctx.checkpoint(step.name(), "before-record");
                // The Secret is written and read back: record that and wipe the sealed material
                // even if a cancel arrived meanwhile (only a lost lease refuses the write).
                let mut tx = ctx.fenced_tx().await?;
                self.sealed(payload).wipe(&mut *tx).await?;
                let output = SecretRef {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                };
                let finished = done(output.clone(), report);
                ctx.finish_step(&mut tx, step.name(), attempt, &finished)
                    .await?;
                tx.commit().await?;
                Ok(output)
            })
            .await?;
        let resources = Resources {
            secret: Some(secret_ref),
            ..Default::default()
        };
        self.record_resources(ctx, payload, resources).await
    }

    /// Deletes every key but the one the Secret now holds: the key it replaced goes only now,
    /// once the new one is proven and workloads can read it (make before break).
    async fn retire_step(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        conf: &S3Conf,
    ) -> Result<(), JobError> {
        let step = Step::RetireOldKeys;
        ctx.step(step.name(), step.position(), async {
            let user = payload.bucket.iam_user_name();
            let (db, id) = (ctx.pool(), payload.repository_id);
            let in_grace = super::rotate::retirements::keys_in_grace(db, id).await?;
            let key = &conf.access_key_id;
            let report =
                access_key::retire_keys_sparing(&self.aws.iam, user, key, &in_grace).await?;
            Ok(done((), report))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_permanent_failure_of_either_branch_wins() {
        let permanent = || Err(JobError::Permanent("denied".into()));
        let retryable = || Err(JobError::Retryable("throttled".into()));
        assert!(matches!(
            first_failure_of(retryable(), permanent()),
            Err(JobError::Permanent(_))
        ));
        assert!(matches!(
            first_failure_of(permanent(), retryable()),
            Err(JobError::Permanent(_))
        ));
        assert!(matches!(
            first_failure_of(Ok(()), retryable()),
            Err(JobError::Retryable(_))
        ));
        assert!(first_failure_of(Ok(()), Ok(())).is_ok());
    }
}
