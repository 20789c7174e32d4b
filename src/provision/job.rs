//! The provisioning job: runs the runbook's steps in order (the bucket alongside the IAM chain),
//! each as a persisted, idempotent [`JobContext`] step, and records what it made.
//!
//! Credential safety rules, in the order they bite:
//! - an existing Secret that we do not manage stops the job before anything is changed;
//! - a cipher pass found anywhere (the Secret, or sealed in Postgres) is reused, never replaced;
//! - an access key's secret is sealed in the same transaction that records the key step's
//!   success, and that transaction holds the job's lease across the CreateAccessKey call, so no
//!   other worker can create a key for this repository at the same time;
//! - keys we cannot use (no secret held, not referenced by the Secret) are deleted before a new
//!   one is made, so the user never needs more than IAM's two keys.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::secret::{self, ExistingSecret, S3Conf};
use super::{access_key, bucket, cipher_pass, credential_check, group, policy, sealed, user};
use crate::cloud::aws::AwsClients;
use crate::cloud::{Outcome, StepReport};
use crate::crypto::EncryptionKey;
use crate::domain::{BucketName, Namespace, Region, RepositoryName};
use crate::jobs::{JobContext, JobError, JobHandler, JobKind, StepDone, Subject};
use crate::repository::{self, Resources, SecretRef};

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

/// What the provisioning job needs from the outside world.
pub struct Provisioner {
    pub aws: AwsClients,
    pub kube: kube::Client,
    pub encryption_key: EncryptionKey,
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
        }
    }

    pub const fn position(self) -> i32 {
        self as i32 + 1
    }
}

/// Where the access key's secret comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeySource {
    /// Made by this job; its secret is sealed in Postgres until the Secret holds it.
    Created,
    /// Made by an earlier attempt; its secret is still sealed in Postgres.
    Held,
    /// Referenced by the existing Secret, which holds its secret.
    Secret,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyOutput {
    pub access_key_id: String,
    pub source: KeySource,
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
        refuse_unmanaged_secret(existing.as_ref(), &payload)?;
        let s3 = self.aws.s3_for_region(payload.region.as_str());
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
        self.key_description_step(ctx, &payload, &key).await?;
        let conf = self.s3_conf(ctx, &payload, existing.as_ref(), &key).await?;
        self.credential_check_step(ctx, &payload, &key, &conf)
            .await?;
        self.secret_step(ctx, &payload, &conf).await
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

fn refuse_unmanaged_secret(
    existing: Option<&ExistingSecret>,
    payload: &ProvisionPayload,
) -> Result<(), JobError> {
    match existing {
        Some(s) if !s.managed_by_us && !payload.adopt_existing_secret => {
            Err(JobError::Permanent(format!(
                "Secret {}/{} exists and is not managed by backup-provisioner; it was left untouched. \
             Remove it, or create the repository with \"adopt_existing_secret\": true to take it over \
             (its cipher pass is kept)",
                payload.namespace, payload.bucket
            )))
        }
        _ => Ok(()),
    }
}

/// The key to keep among the user's keys `in_iam`: the one whose secret is sealed in Postgres
/// (made by an earlier attempt, not yet delivered), else the one the Secret references. A key
/// we hold no secret for is useless: the caller deletes it.
pub fn choose_key(
    in_iam: &[&str],
    held: Option<&str>,
    referenced: Option<&str>,
) -> Option<KeyOutput> {
    let present = |id: &&str| in_iam.contains(id);
    match (held.filter(present), referenced.filter(present)) {
        (Some(id), _) => Some(KeyOutput {
            access_key_id: id.to_owned(),
            source: KeySource::Held,
        }),
        (None, Some(id)) => Some(KeyOutput {
            access_key_id: id.to_owned(),
            source: KeySource::Secret,
        }),
        (None, None) => None,
    }
}

fn done<T>(output: T, report: StepReport) -> StepDone<T> {
    StepDone {
        output,
        outcome: report.outcome.as_str(),
        detail: report.detail,
        upstream_request_id: report.upstream_request_id,
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

    async fn bucket_step(
        &self,
        ctx: &JobContext,
        s3: &aws_sdk_s3::Client,
        payload: &ProvisionPayload,
    ) -> Result<String, JobError> {
        let arn: String = ctx
            .step(Step::Bucket.name(), Step::Bucket.position(), async {
                let report = bucket::ensure(
                    s3,
                    payload.bucket.as_str(),
                    payload.region.as_str(),
                    payload.repository.as_str(),
                )
                .await?;
                Ok(done(bucket::arn(payload.bucket.as_str()), report))
            })
            .await?;
        self.record_resources(
            ctx,
            payload,
            Resources {
                bucket_arn: Some(arn.clone()),
                ..Default::default()
            },
        )
        .await?;
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
        self.record_resources(
            ctx,
            payload,
            Resources {
                policy_arn: Some(arn.clone()),
                ..Default::default()
            },
        )
        .await?;
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
                Ok(done(payload.bucket.to_string(), report))
            })
            .await?;
        self.record_resources(
            ctx,
            payload,
            Resources {
                group: Some(name),
                ..Default::default()
            },
        )
        .await
    }

    async fn user_step(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
    ) -> Result<(), JobError> {
        let name: String = ctx
            .step(Step::User.name(), Step::User.position(), async {
                let report = user::ensure(
                    &self.aws.iam,
                    payload.bucket.as_str(),
                    payload.repository.as_str(),
                )
                .await?;
                Ok(done(payload.bucket.to_string(), report))
            })
            .await?;
        self.record_resources(
            ctx,
            payload,
            Resources {
                user: Some(name),
                ..Default::default()
            },
        )
        .await
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
        ctx.step_with_own_commit(
            Step::CipherPass.name(),
            Step::CipherPass.position(),
            |attempt| async move {
                let held = self
                    .sealed_material(ctx, payload, sealed::Kind::CipherPass)
                    .await?;
                let in_secret = existing.and_then(|s| s.cipher_pass.as_ref()).is_some();
                let bucket_has_objects = || bucket::has_objects(s3, payload.bucket.as_str());
                let decision =
                    cipher_pass::decide(in_secret, held.is_some(), payload, bucket_has_objects)
                        .await?;
                let mut tx = ctx.fenced_tx_unless_cancelled().await?;
                if let cipher_pass::Decision::Generate(pass) = &decision {
                    let secret = SecretString::from(pass.expose().to_owned());
                    sealed::put(
                        &mut tx,
                        &self.encryption_key,
                        payload.repository_id,
                        sealed::Kind::CipherPass,
                        "cipher-pass",
                        &secret,
                    )
                    .await?;
                }
                ctx.checkpoint(Step::CipherPass.name(), "before-record");
                let source = decision.source();
                let report = StepReport::new(decision.outcome(), json!({ "source": source }));
                ctx.finish_step(
                    &mut tx,
                    Step::CipherPass.name(),
                    attempt,
                    &done(source, report),
                )
                .await?;
                tx.commit().await?;
                Ok(source)
            },
        )
        .await
    }

    async fn sealed_material(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        kind: sealed::Kind,
    ) -> Result<Option<sealed::Held>, JobError> {
        Ok(sealed::get(
            ctx.pool(),
            &self.encryption_key,
            payload.repository_id,
            kind,
        )
        .await?)
    }

    async fn access_key_step(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        existing: Option<&ExistingSecret>,
    ) -> Result<KeyOutput, JobError> {
        let key: KeyOutput = ctx
            .step_with_own_commit(
                Step::AccessKey.name(),
                Step::AccessKey.position(),
                |attempt| self.reconcile_access_key(ctx, payload, existing, attempt),
            )
            .await?;
        self.record_resources(
            ctx,
            payload,
            Resources {
                access_key_id: Some(key.access_key_id.clone()),
                ..Default::default()
            },
        )
        .await?;
        Ok(key)
    }

    /// Keeps the one key whose secret we have (sealed, or in the Secret), deletes the rest, and
    /// creates a key only when none is usable. The whole reconciliation runs inside a fenced
    /// transaction that holds the job's row lock: a worker that lost its lease cannot list,
    /// delete or create keys, and no other worker can claim the job until the new key's secret
    /// is sealed and the step's success recorded.
    async fn reconcile_access_key(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        existing: Option<&ExistingSecret>,
        attempt: i32,
    ) -> Result<KeyOutput, JobError> {
        let mut tx = ctx.fenced_tx_unless_cancelled().await?;
        let keys = access_key::list(&self.aws.iam, payload.bucket.as_str()).await?;
        let ids: Vec<&str> = keys.iter().map(|k| k.id.as_str()).collect();
        let held = self
            .sealed_material(ctx, payload, sealed::Kind::AccessKey)
            .await?;
        let referenced = existing
            .and_then(|s| s.conf.as_ref())
            .map(|c| c.access_key_id.as_str());
        let keep = choose_key(&ids, held.as_ref().map(|h| h.key_id.as_str()), referenced);
        let deleted = self
            .delete_keys_except(payload, &ids, keep.as_ref())
            .await?;
        let (output, mut report) = match keep {
            Some(key) => {
                let outcome = if deleted.is_empty() {
                    Outcome::AlreadyPresent
                } else {
                    Outcome::Updated
                };
                (key, StepReport::new(outcome, json!({})))
            }
            None => {
                sealed::forget(&mut *tx, payload.repository_id, sealed::Kind::AccessKey).await?;
                self.create_sealed_key(ctx, &mut tx, payload).await?
            }
        };
        report.detail = json!({ "access_key_id": output.access_key_id, "source": output.source, "deleted": deleted });
        ctx.finish_step(
            &mut tx,
            Step::AccessKey.name(),
            attempt,
            &done(output.clone(), report),
        )
        .await?;
        tx.commit().await?;
        Ok(output)
    }

    /// Deletes every key of the user except `keep` (and its description tag).
    async fn delete_keys_except(
        &self,
        payload: &ProvisionPayload,
        ids: &[&str],
        keep: Option<&KeyOutput>,
    ) -> Result<Vec<String>, JobError> {
        let mut deleted = Vec::new();
        for id in ids
            .iter()
            .filter(|id| Some(**id) != keep.map(|k| k.access_key_id.as_str()))
        {
            access_key::delete(&self.aws.iam, payload.bucket.as_str(), id).await?;
            access_key::remove_description_tag(&self.aws.iam, payload.bucket.as_str(), id).await?;
            deleted.push((*id).to_owned());
        }
        Ok(deleted)
    }

    /// Creates a key and seals its secret in `tx` (committed with the step's success).
    async fn create_sealed_key(
        &self,
        ctx: &JobContext,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        payload: &ProvisionPayload,
    ) -> Result<(KeyOutput, StepReport), JobError> {
        let new = access_key::create(&self.aws.iam, payload.bucket.as_str()).await?;
        ctx.checkpoint(Step::AccessKey.name(), "before-record");
        sealed::put(
            tx,
            &self.encryption_key,
            payload.repository_id,
            sealed::Kind::AccessKey,
            &new.id,
            &new.secret,
        )
        .await?;
        let mut report = StepReport::new(Outcome::Created, json!({}));
        report.upstream_request_id = new.request_id.clone();
        Ok((
            KeyOutput {
                access_key_id: new.id,
                source: KeySource::Created,
            },
            report,
        ))
    }

    async fn key_description_step(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        key: &KeyOutput,
    ) -> Result<(), JobError> {
        ctx.step(
            Step::AccessKeyDescription.name(),
            Step::AccessKeyDescription.position(),
            async {
                let report = access_key::ensure_description_tag(
                    &self.aws.iam,
                    payload.bucket.as_str(),
                    &key.access_key_id,
                )
                .await?;
                Ok(done((), report))
            },
        )
        .await
    }

    /// The Secret's content: the cipher pass and key secret from wherever we hold them.
    async fn s3_conf(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        existing: Option<&ExistingSecret>,
        key: &KeyOutput,
    ) -> Result<S3Conf, JobError> {
        let current = existing.and_then(|s| s.conf.as_ref());
        let in_secret = existing.and_then(|s| s.cipher_pass.clone());
        let cipher_pass = match (
            in_secret,
            self.sealed_material(ctx, payload, sealed::Kind::CipherPass)
                .await?,
        ) {
            (Some(pass), _) => pass,
            (None, Some(held)) => held.secret,
            (None, None) => {
                return Err(JobError::Permanent(format!(
                    "the cipher pass for {} is no longer available: the Secret {}/{} disappeared after it was read. \
                     Restore the Secret (backups are encrypted with its cipher pass), then retry",
                    payload.repository, payload.namespace, payload.bucket
                )));
            }
        };
        let secret_access_key = match self
            .sealed_material(ctx, payload, sealed::Kind::AccessKey)
            .await?
        {
            Some(held) if held.key_id == key.access_key_id => held.secret,
            _ => match current {
                Some(conf) if conf.access_key_id == key.access_key_id => {
                    conf.secret_access_key.clone()
                }
                _ => {
                    // The key's secret is gone (e.g. the Secret changed meanwhile): make a new key.
                    ctx.reset_steps(&[
                        Step::AccessKey.name(),
                        Step::AccessKeyDescription.name(),
                        Step::CredentialCheck.name(),
                    ])
                    .await?;
                    return Err(JobError::Retryable(format!(
                        "no secret is held for access key {}; a new key will be made on the next attempt",
                        key.access_key_id
                    )));
                }
            },
        };
        Ok(S3Conf {
            cipher_pass,
            access_key_id: key.access_key_id.clone(),
            secret_access_key,
        })
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
        ctx.step(
            Step::CredentialCheck.name(),
            Step::CredentialCheck.position(),
            async {
                let client = self.aws.s3_with_static_credentials(
                    payload.region.as_str(),
                    &conf.access_key_id,
                    conf.secret_access_key.expose_secret(),
                );
                let budget = self.credential_check_budget;
                let backoff = self.credential_check_backoff;
                let report = match key.source {
                    KeySource::Secret => {
                        credential_check::verify_read_only(
                            &client,
                            payload.bucket.as_str(),
                            budget,
                            backoff,
                        )
                        .await?
                    }
                    KeySource::Created | KeySource::Held => {
                        credential_check::verify(&client, payload.bucket.as_str(), budget, backoff)
                            .await?
                    }
                };
                Ok(done((), report))
            },
        )
        .await
    }

    /// Writes the Secret, reads it back, and wipes the sealed material in the same transaction
    /// that records success.
    async fn secret_step(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        conf: &S3Conf,
    ) -> Result<(), JobError> {
        let secret_ref: SecretRef = ctx
            .step_with_own_commit(
                Step::Secret.name(),
                Step::Secret.position(),
                |attempt| async move {
                    let report = secret::apply(
                        &self.kube,
                        payload.namespace.as_str(),
                        payload.bucket.as_str(),
                        conf,
                        payload.adopt_existing_secret,
                    )
                    .await?;
                    ctx.checkpoint(Step::Secret.name(), "before-record");
                    let mut tx = ctx.fenced_tx_unless_cancelled().await?;
                    sealed::wipe(&mut *tx, payload.repository_id).await?;
                    let output = SecretRef {
                        namespace: payload.namespace.to_string(),
                        name: payload.bucket.to_string(),
                    };
                    ctx.finish_step(
                        &mut tx,
                        Step::Secret.name(),
                        attempt,
                        &done(output.clone(), report),
                    )
                    .await?;
                    tx.commit().await?;
                    Ok(output)
                },
            )
            .await?;
        self.record_resources(
            ctx,
            payload,
            Resources {
                secret: Some(secret_ref),
                ..Default::default()
            },
        )
        .await
    }
}

impl From<sealed::SealedError> for JobError {
    fn from(err: sealed::SealedError) -> Self {
        match err {
            sealed::SealedError::Database(e) => JobError::Database(e),
            other => JobError::Permanent(other.to_string()),
        }
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

    #[test]
    fn a_held_key_wins_then_the_referenced_one_then_none() {
        let chosen = choose_key(&["AKIA1", "AKIA2"], Some("AKIA2"), Some("AKIA1")).unwrap();
        assert_eq!(
            (chosen.access_key_id.as_str(), chosen.source),
            ("AKIA2", KeySource::Held)
        );
        let chosen = choose_key(&["AKIA1"], Some("AKIA9"), Some("AKIA1")).unwrap();
        assert_eq!(
            (chosen.access_key_id.as_str(), chosen.source),
            ("AKIA1", KeySource::Secret)
        );
        assert!(
            choose_key(&["AKIA1"], None, Some("AKIA9")).is_none(),
            "a key gone from IAM is not kept"
        );
        assert!(
            choose_key(&["AKIA1"], None, None).is_none(),
            "an orphan we hold no secret for is not kept"
        );
    }
}
