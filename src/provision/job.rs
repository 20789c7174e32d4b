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
//! - an access key's secret is sealed by the statement that records the key step's success,
//!   right after CreateAccessKey returns; no transaction is open during the call,
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

use super::access_key::{self, KeyInfo, KeyOutput, KeySource, UserKeys};
use super::adopt::in_the_way;
use super::report::{Mode, done};
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

mod progress;
mod world;

use progress::Progress;
use world::World;

/// Milestones of one attempt (see [`Progress`]).
const BUCKET_EXISTS: &str = "bucket-exists";
/// No access key is made before the cipher pass is settled (a bucket holding backups without
/// one refuses the job).
const CIPHER_PASS_DECIDED: &str = "cipher-pass-decided";
const POLICY_ARN: &str = "policy-arn";
const GROUP_EXISTS: &str = "group-exists";
/// Reached with `"created"` when this attempt made the user (it has no keys yet), else `""`.
const USER_EXISTS: &str = "user-exists";
/// Reached when the group's policy is attached: the key's proof can start then, before the
/// group step is recorded.
const GROUP_READY: &str = "group-ready";
/// Reached when the user is in the group (as [`GROUP_READY`]).
const USER_READY: &str = "user-ready";
/// Reached with the read probe's key once the service wrote it (a key is to be made, see
/// [`Provisioner::read_probe`]), else missed.
const READ_PROBE: &str = "read-probe";
/// Barriers: the creates of a first run go out together, then the calls that need them.
const CREATES: &str = "creates";
const AFTER_CREATES: &str = "after-creates";
/// The steps whose creates go out together.
const FIRST_WAVE: [&str; 4] = [
    Step::Bucket.name(),
    Step::Policy.name(),
    Step::Group.name(),
    Step::User.name(),
];
/// The steps whose calls after the creates (AttachGroupPolicy, AddUserToGroup,
/// CreateAccessKey) go out together: the key's proof needs all three. The bucket's settings
/// go out as soon as the bucket exists: nothing later waits for them.
const SECOND_WAVE: [&str; 3] = [
    Step::Group.name(),
    Step::User.name(),
    Step::AccessKey.name(),
];

#[async_trait::async_trait]
impl JobHandler for Provisioner {
    fn kind(&self) -> &'static str {
        ProvisionRepository::KIND
    }

    async fn run(&self, ctx: &JobContext) -> Result<(), JobError> {
        let payload: ProvisionPayload = ctx.payload()?;
        let (namespace, name) = (payload.namespace.as_str(), payload.bucket.as_str());
        let (existing, row) = tokio::join!(
            secret::read(&self.kube, namespace, name),
            repository::by_id(ctx.pool(), payload.repository_id)
        );
        let (existing, row) = (existing?, row?);
        let adopt = payload.adopt_existing_secret;
        secret::refuse_unmanaged(existing.as_ref(), payload.secret(), adopt)?;
        let s3 = self.aws.s3_for_region(payload.region.as_str());
        let world =
            Box::pin(self.preflight(&payload, &s3, existing.as_ref(), row.as_ref())).await?;
        let progress = Progress::new();
        let made = self.make_resources(ctx, &payload, &s3, existing.as_ref(), (&world, &progress));
        let ProvenKey {
            key,
            conf,
            client,
            probe,
        } = Box::pin(made).await?;
        self.deliver(
            ctx,
            &payload,
            (&conf, existing.as_ref()),
            (probe, &client),
            (&world, &key),
        )
        .await
    }

    /// The job's steps in plan mode (`plan.rs`: `plan_provisioning`): read calls only.
    async fn plan(
        &self,
        payload: serde_json::Value,
    ) -> Option<Result<serde_json::Value, JobError>> {
        Some(self.plan_provisioning(payload).await)
    }
}

/// The access key, proven to work, and the Secret's content built with it.
struct ProvenKey {
    key: KeyOutput,
    conf: S3Conf,
    /// An S3 client that signs with the key (for the credential check, and the probes' delete).
    client: aws_sdk_s3::Client,
    /// The probe object the credential check left, for [`Provisioner::deliver`] to delete
    /// with its read probe.
    probe: Option<String>,
}

/// Combines concurrent branches: a permanent failure on any side wins (retrying cannot help),
/// then any other failure.
fn first_failure_of(
    results: impl IntoIterator<Item = Result<(), JobError>>,
) -> Result<(), JobError> {
    let mut first = None;
    for result in results {
        match (result, &first) {
            (Ok(()), _) => {}
            (Err(e @ JobError::Permanent(_)), _) => return Err(e),
            (Err(e), None) => first = Some(e),
            (Err(_), Some(_)) => {}
        }
    }
    first.map_or(Ok(()), Err)
}

impl Provisioner {
    /// Before the first AWS change: the observation wave alongside the Secret's dry-run apply,
    /// then what would otherwise fail late fails now: a hand-made set in the way, a Secret that
    /// cannot be written, an existing bucket that is unusable.
    async fn preflight(
        &self,
        payload: &ProvisionPayload,
        s3: &aws_sdk_s3::Client,
        existing: Option<&ExistingSecret>,
        row: Option<&RepositoryRow>,
    ) -> Result<World, JobError> {
        let (namespace, name) = (payload.namespace.as_str(), payload.bucket.as_str());
        let region = payload.region.as_str();
        let known = row.map(|r| &r.resources.0);
        let target = world::Target {
            aws: &self.aws,
            s3,
            bucket: name,
            region,
            bucket_known: known.is_some_and(|k| k.bucket_arn.is_some()),
            iam_known: known.is_some_and(|k| k.user.is_some() && k.group.is_some()),
            policy_arn: known.and_then(|k| k.policy_arn.as_deref()),
            conf: existing.and_then(|s| s.conf.as_ref()),
        };
        let (world, writable) = tokio::join!(
            world::observe(target),
            secret::preflight(&self.kube, namespace, name)
        );
        let world = world?;
        // A user our user step made or adopted is ours even if a tag was removed by hand since
        // (drift the user step repairs).
        let user_known = known.is_some_and(|k| k.user.is_some());
        if !payload.adopt_existing_secret && !user_known {
            let tags = world.user.tags();
            in_the_way::refuse_hand_made_found(&self.aws, name, region, tags).await?;
        }
        writable?;
        world.bucket.refuse_unusable(name)?;
        Ok(world)
    }

    /// The bucket, the IAM chain and the key, each call as soon as what it needs exists:
    /// the bucket ‖ policy ‖ group ‖ user are made at once, the policy is attached, the user
    /// added to the group and its key made at once (the cipher pass is settled meanwhile),
    /// and the key is proven as soon as IAM can let it work (see [`Self::proven_key`]).
    /// join, not try_join: a failure on one side lets the others finish and record their
    /// steps instead of abandoning them half-way.
    async fn make_resources(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        s3: &aws_sdk_s3::Client,
        existing: Option<&ExistingSecret>,
        (world, progress): (&World, &Progress),
    ) -> Result<ProvenKey, JobError> {
        let settled = |step: Step, result: Result<(), JobError>| {
            progress.settle(step.name(), result.is_ok());
            result
        };
        let bucket = async {
            let made = self.bucket_step(ctx, s3, payload, (world, progress)).await;
            progress.conclude(BUCKET_EXISTS, made.is_ok());
            settled(Step::Bucket, made.map(drop))
        };
        let policy = async {
            let made = self.policy_step(ctx, payload, (world, progress)).await;
            match &made {
                Ok(arn) => progress.reach(POLICY_ARN, arn.clone()),
                Err(_) => progress.miss(POLICY_ARN),
            }
            settled(Step::Policy, made.map(drop))
        };
        let group = async {
            let made = self.group_step(ctx, payload, world, progress).await;
            progress.miss(GROUP_EXISTS);
            // Also when an earlier attempt did the step's work.
            progress.conclude(GROUP_READY, made.is_ok());
            settled(Step::Group, made)
        };
        let user = async {
            let made = self.user_step(ctx, payload, world, progress).await;
            progress.miss(USER_EXISTS);
            progress.conclude(USER_READY, made.is_ok());
            settled(Step::User, made)
        };
        let (cipher_pass, key) = self.key_branch(ctx, payload, s3, existing, (world, progress));
        let read_probe = self.read_probe(ctx, payload, s3, existing, progress);
        // Boxed: the branches' futures together are too large for a worker thread's stack in
        // a debug build.
        let (bucket, policy, group, user, cipher_pass, key, ()) = tokio::join!(
            Box::pin(bucket),
            Box::pin(policy),
            Box::pin(group),
            Box::pin(user),
            Box::pin(cipher_pass),
            Box::pin(key),
            Box::pin(read_probe)
        );
        let others = first_failure_of([bucket, policy, group, user, cipher_pass]);
        if key.is_err() {
            self.forget_job_probes(ctx, payload, s3, existing, progress)
                .await;
        }
        self.attempt_result(payload, others, key).await
    }

    /// A read probe for the new key's check (see [`credential_check::put_read_probe`]), written
    /// with the service's credentials once the bucket exists and the cipher pass is settled (a
    /// bucket holding backups without one refuses the job: nothing is written to it), alongside
    /// the bucket's settings and the IAM calls that make the key: the key's proof then puts and
    /// reads at once, one round trip instead of two. Only when no Secret holds a key (one is to
    /// be made). Its failure (e.g. a service policy without `s3:PutObject` on probes) costs that
    /// round trip, not the attempt: the check reads back its own probe instead.
    async fn read_probe(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        s3: &aws_sdk_s3::Client,
        existing: Option<&ExistingSecret>,
        progress: &Progress,
    ) {
        let Some(probe) = probe_of_new_key(ctx, existing) else {
            return progress.miss(READ_PROBE);
        };
        let ready = async {
            let (bucket, cipher_pass) = tokio::join!(
                progress.reached(BUCKET_EXISTS),
                progress.reached(CIPHER_PASS_DECIDED)
            );
            bucket.is_some() && cipher_pass.is_some()
        };
        if !ready.await {
            return progress.miss(READ_PROBE);
        }
        let key = credential_check::read_probe_key(&probe);
        let written = credential_check::put_read_probe(s3, payload.bucket.as_str(), &key).await;
        if let Err(e) = written {
            tracing::warn!(error = %e, "no read probe: the new key's check reads its own back");
            return progress.miss(READ_PROBE);
        }
        progress.reach(READ_PROBE, key);
    }

    /// Deletes the job's probe objects with the service's credentials when the key branch
    /// failed (a proven key's own delete them): the read probe may be written, and the check
    /// may have put its probe before it failed. Only when one of them may exist: a key was to
    /// be made (no Secret holds one; a re-run of a ready repository stays read-only) and the
    /// read probe was written or the key made. Best effort, as [`Self::forget_probe`].
    async fn forget_job_probes(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        s3: &aws_sdk_s3::Client,
        existing: Option<&ExistingSecret>,
        progress: &Progress,
    ) {
        let Some(probe) = probe_of_new_key(ctx, existing) else {
            return;
        };
        let read_probe = progress.reached(READ_PROBE).await.is_some();
        let key_made = progress.succeeded([Step::AccessKey.name()]).await;
        if !(read_probe || key_made) {
            return;
        }
        let bucket = payload.bucket.as_str();
        if let Err(e) = delete_probes(s3, bucket, &probe).await {
            tracing::warn!(error = %e, "the job's probe objects were not deleted");
        }
    }

    /// The key branch's result unless another branch failed (see [`first_failure_of`]); a key
    /// proven meanwhile has its probe deleted, as `deliver`, which the attempt does not reach,
    /// would have.
    async fn attempt_result(
        &self,
        payload: &ProvisionPayload,
        others: Result<(), JobError>,
        key: Result<ProvenKey, JobError>,
    ) -> Result<ProvenKey, JobError> {
        match (others, key) {
            (Ok(()), key) => key,
            (Err(other), Err(key)) => {
                Err(first_failure_of([Err(other), Err(key)]).expect_err("two failures"))
            }
            (Err(other), Ok(proven)) => {
                self.forget_probe(payload, &proven).await;
                Err(other)
            }
        }
    }

    /// Deletes the probe object of a proven key whose attempt stops before delivering it (best
    /// effort: a probe left behind is not a backup, see [`bucket::has_objects`]).
    async fn forget_probe(&self, payload: &ProvisionPayload, proven: &ProvenKey) {
        let bucket = payload.bucket.as_str();
        let Some(probe) = &proven.probe else { return };
        let deleted = delete_probes(&proven.client, bucket, probe).await;
        if let Err(e) = deleted {
            tracing::warn!(error = %e, "the credential check's probe objects were not deleted");
        }
    }

    /// The cipher pass step, and concurrently the access key step and its proof (see
    /// [`Self::make_resources`]).
    #[allow(clippy::type_complexity)]
    fn key_branch<'a>(
        &'a self,
        ctx: &'a JobContext,
        payload: &'a ProvisionPayload,
        s3: &'a aws_sdk_s3::Client,
        existing: Option<&'a ExistingSecret>,
        (world, progress): (&'a World, &'a Progress),
    ) -> (
        impl Future<Output = Result<(), JobError>> + 'a,
        impl Future<Output = Result<ProvenKey, JobError>> + 'a,
    ) {
        let settled = |step: Step, result: Result<(), JobError>| {
            progress.settle(step.name(), result.is_ok());
            result
        };
        let cipher_pass = async move {
            let made = self.cipher_pass_step(ctx, s3, payload, existing, (world, progress));
            let made = made.await;
            if made.is_ok() {
                progress.reach(CIPHER_PASS_DECIDED, String::new());
            }
            progress.miss(CIPHER_PASS_DECIDED);
            settled(Step::CipherPass, made.map(drop))
        };
        let key = async move {
            let made = self.access_key_step(ctx, payload, existing, (world, progress));
            let made = made.await;
            progress.settle(Step::AccessKey.name(), made.is_ok());
            self.proven_key(ctx, payload, made?, (world, progress))
                .await
        };
        (cipher_pass, key)
    }

    /// Once the key is recorded: its proof as soon as IAM can let it work (the policy is
    /// attached to the group, the user is in it, the bucket exists), while those steps record
    /// and the bucket's settings may still be going out: the check's probe needs none of that.
    async fn proven_key(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        (key, conf): (KeyOutput, S3Conf),
        (world, progress): (&World, &Progress),
    ) -> Result<ProvenKey, JobError> {
        // Built while IAM's calls are out: a client costs its configuration's set-up.
        let client = self.key_client(payload, &conf);
        let ready = tokio::join!(
            progress.reached(GROUP_READY),
            progress.reached(USER_READY),
            progress.reached(BUCKET_EXISTS)
        );
        if !matches!(ready, (Some(_), Some(_), Some(_))) {
            let waited = "the bucket, policy, group or user step did not finish in this attempt";
            return Err(JobError::Retryable(waited.into()));
        }
        let probe = self
            .prove_key(ctx, payload, (&key, &conf, &client), (world, progress))
            .await?;
        Ok(ProvenKey {
            key,
            conf,
            client,
            probe,
        })
    }

    /// The key's description tag alongside the credential check (recorded after it). Returns
    /// the probe object the check left for [`Self::deliver`] to delete (with its read probe).
    async fn prove_key(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        (key, conf, client): (&KeyOutput, &S3Conf, &aws_sdk_s3::Client),
        (world, progress): (&World, &Progress),
    ) -> Result<Option<String>, JobError> {
        let step = Step::AccessKeyDescription;
        let (iam, user) = (&self.aws.iam, payload.bucket.iam_user_name());
        // A key made by this attempt has no tag yet; otherwise the tags read at the start.
        let tags = match key.source {
            KeySource::Created => Some(Vec::new()),
            _ => world.user.tags().map(<[_]>::to_vec),
        };
        // Both are recorded after every step before them in the job's order (the cipher pass
        // and the key were recorded before the proof began).
        let made = [Step::Bucket, Step::Policy, Step::Group, Step::User].map(Step::name);
        let description = async {
            let target = (iam, user, key.access_key_id.as_str());
            let done = (step.name(), step.position());
            let recorded_after = progress.settled(made);
            let made =
                access_key::description_step_with(ctx, done, target, tags, recorded_after).await;
            progress.settle(step.name(), made.is_ok());
            made
        };
        let recorded_after = progress.settled([Step::AccessKeyDescription.name()]);
        let proving = (key, conf, client);
        let waits = (recorded_after, progress.reached(READ_PROBE));
        let check = self.credential_check_step(ctx, payload, proving, world, waits);
        // The check first (on the first poll): its probe's put is on the job's critical path,
        // the tag is not.
        let (check, description) = tokio::join!(Box::pin(check), Box::pin(description));
        first_failure_of([description, check.as_ref().map(drop).map_err(clone_error)])?;
        check
    }

    /// The Secret (written and read back), with the listing of the keys to retire alongside
    /// it, then the retirement of every other key; the probe objects' deletes alongside both.
    async fn deliver(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        (conf, existing): (&S3Conf, Option<&ExistingSecret>),
        (probe, client): (Option<String>, &aws_sdk_s3::Client),
        (world, key): (&World, &KeyOutput),
    ) -> Result<(), JobError> {
        let bucket = payload.bucket.as_str();
        let delete_probe = async {
            let Some(probe) = probe else { return Ok(()) };
            delete_probes(client, bucket, &probe).await
        };
        // Unchanged since the start when the key is the Secret's: no key was made since.
        let seen = world
            .keys
            .clone()
            .filter(|_| key.source == KeySource::InSecret);
        let listing = async {
            match seen {
                Some(keys) => Ok(keys),
                None => access_key::list(&self.aws.iam, payload.bucket.iam_user_name()).await,
            }
        };
        let delivered = async {
            let (written, listed) = tokio::join!(
                Box::pin(self.secret_step(ctx, payload, conf, existing)),
                Box::pin(listing)
            );
            written?;
            self.retire_step(ctx, payload, conf, &listed?).await
        };
        let (delivered, deleted) = tokio::join!(Box::pin(delivered), Box::pin(delete_probe));
        delivered?;
        deleted
    }

    fn key_client(&self, payload: &ProvisionPayload, conf: &S3Conf) -> aws_sdk_s3::Client {
        self.aws.s3_with_static_credentials(
            payload.region.as_str(),
            &conf.access_key_id,
            conf.secret_access_key.expose_secret(),
        )
    }

    async fn record_resources(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        patch: Resources,
    ) -> Result<(), JobError> {
        // Fenced like every other write of the job (a worker that lost its lease stays quiet),
        // in one statement: the job's row lock is held for one round trip.
        let patch = repository::resources_patch(&patch);
        let statement = repository::MERGE_RESOURCES_IF_LEASED;
        ctx.fenced_write(statement, |query| {
            query.bind(payload.repository_id).bind(patch)
        })
        .await
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
        (world, progress): (&World, &Progress),
    ) -> Result<String, JobError> {
        let (bucket, region) = (payload.bucket.as_str(), payload.region.as_str());
        let arn: String = ctx
            .step(Step::Bucket.name(), Step::Bucket.position(), async {
                progress.arrive(CREATES, Step::Bucket.name());
                progress.gather(CREATES, FIRST_WAVE).await;
                let repository = payload.repository.as_str();
                let (seen, target) = (world.bucket.clone(), (bucket, region, repository));
                let exists = async {
                    progress.reach(BUCKET_EXISTS, String::new());
                };
                let report = bucket::ensure_observed(s3, target, Mode::Apply, seen, exists).await?;
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

    /// The policy's ARN is known to the group step as soon as the policy exists.
    async fn policy_step(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        (world, progress): (&World, &Progress),
    ) -> Result<String, JobError> {
        let arn: String = ctx
            .step(Step::Policy.name(), Step::Policy.position(), async {
                progress.arrive(CREATES, Step::Policy.name());
                progress.gather(CREATES, FIRST_WAVE).await;
                let (iam, bucket, seen) =
                    (&self.aws.iam, payload.bucket.as_str(), world.policy.clone());
                let (report, arn) = policy::ensure_observed(iam, bucket, Mode::Apply, seen).await?;
                progress.reach(POLICY_ARN, arn.clone());
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

    /// Made alongside the policy; the policy is attached once it exists; recorded after the
    /// policy step.
    async fn group_step(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        world: &World,
        progress: &Progress,
    ) -> Result<(), JobError> {
        let group_name = payload.bucket.iam_group_name();
        let name: Result<String, JobError> = ctx
            .step(Step::Group.name(), Step::Group.position(), async {
                progress.arrive(CREATES, Step::Group.name());
                progress.gather(CREATES, FIRST_WAVE).await;
                let exists = || progress.reach(GROUP_EXISTS, String::new());
                let policy_arn = async {
                    let arn = progress.reached(POLICY_ARN).await;
                    progress.arrive(AFTER_CREATES, Step::Group.name());
                    progress.gather(AFTER_CREATES, SECOND_WAVE).await;
                    arn.ok_or_else(|| {
                        JobError::Retryable("the policy step did not finish in this attempt".into())
                    })
                };
                let (iam, bucket, seen) =
                    (&self.aws.iam, payload.bucket.as_str(), world.group.clone());
                let report =
                    group::ensure_observed(iam, bucket, Mode::Apply, seen, exists, policy_arn)
                        .await?;
                progress.reach(GROUP_READY, String::new());
                progress.settled([Step::Policy.name()]).await;
                Ok(done(group_name.to_owned(), report))
            })
            .await;
        if name.is_ok() {
            progress.reach(GROUP_EXISTS, String::new());
        }
        let resources = Resources {
            group: Some(name?),
            ..Default::default()
        };
        self.record_resources(ctx, payload, resources).await
    }

    /// Made alongside the group; added to it once it exists; recorded after the group step.
    async fn user_step(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        world: &World,
        progress: &Progress,
    ) -> Result<(), JobError> {
        let name: Result<String, JobError> = ctx
            .step(Step::User.name(), Step::User.position(), async {
                progress.arrive(CREATES, Step::User.name());
                progress.gather(CREATES, FIRST_WAVE).await;
                let (bucket, repository) = (payload.bucket.as_str(), payload.repository.as_str());
                let exists = |created: bool| {
                    let how = if created { "created" } else { "" };
                    progress.reach(USER_EXISTS, how.to_owned())
                };
                let group_exists = async {
                    let group = progress.reached(GROUP_EXISTS).await;
                    progress.arrive(AFTER_CREATES, Step::User.name());
                    progress.gather(AFTER_CREATES, SECOND_WAVE).await;
                    group.map(drop).ok_or_else(|| {
                        JobError::Retryable("the group step did not finish in this attempt".into())
                    })
                };
                let (iam, seen) = (&self.aws.iam, world.user.clone());
                let report = user::ensure_observed(
                    iam,
                    bucket,
                    repository,
                    Mode::Apply,
                    seen,
                    exists,
                    group_exists,
                )
                .await?;
                progress.reach(USER_READY, String::new());
                progress.settled([Step::Group.name()]).await;
                Ok(done(payload.bucket.iam_user_name().to_owned(), report))
            })
            .await;
        if name.is_ok() {
            progress.reach(USER_EXISTS, String::new());
        }
        let resources = Resources {
            user: Some(name?),
            ..Default::default()
        };
        self.record_resources(ctx, payload, resources).await
    }

    /// Settles which cipher pass the Secret will hold (see [`cipher_pass::decide`]); a newly
    /// generated one is sealed in the same transaction as the step's success, recorded as soon
    /// as it is decided (before the access key step records, which waits for it).
    async fn cipher_pass_step(
        &self,
        ctx: &JobContext,
        s3: &aws_sdk_s3::Client,
        payload: &ProvisionPayload,
        existing: Option<&ExistingSecret>,
        (world, progress): (&World, &Progress),
    ) -> Result<cipher_pass::Source, JobError> {
        let step = Step::CipherPass;
        let sealed = self.sealed(payload);
        ctx.step_with_own_commit(step.name(), step.position(), |attempt| async move {
            let copies = cipher_pass::Copies::find(existing, ctx.pool(), sealed).await?;
            let allow_new = payload.allow_new_cipher_pass;
            let (bucket, new) = (payload.bucket.as_str(), !world.bucket.exists());
            let has_objects = || bucket::has_objects_unless_new(s3, bucket, new);
            let decision =
                cipher_pass::decide(copies, allow_new, payload.secret(), has_objects).await?;
            progress.reach(CIPHER_PASS_DECIDED, String::new());
            // Recorded once the creates are out: its transaction holds the job's row lock,
            // which the other steps' begins need before their creates can go.
            progress.gather(CREATES, FIRST_WAVE).await;
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

    /// Reconciles the user's access keys once the user exists (see
    /// [`access_key::reconcile_access_key_with`], which also records the step's success, after
    /// the cipher pass step, and seals a new key's secret). Starts at once, so that its own
    /// bookkeeping is done by the time the user exists. Returns the key with the Secret's
    /// content built with it (alongside the record of the key's id).
    async fn access_key_step(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        existing: Option<&ExistingSecret>,
        (world, progress): (&World, &Progress),
    ) -> Result<(KeyOutput, S3Conf), JobError> {
        let step = Step::AccessKey;
        // A user this attempt made has no keys; otherwise the keys listed at the start. No key
        // is made for a bucket that could not be made (e.g. another account's), nor before
        // the cipher pass is settled.
        let listed = async {
            let (user, bucket, cipher_pass) = tokio::join!(
                progress.reached(USER_EXISTS),
                progress.reached(BUCKET_EXISTS),
                progress.reached(CIPHER_PASS_DECIDED)
            );
            let (Some(how), Some(_), Some(_)) = (user, bucket, cipher_pass) else {
                let waited = "the user, bucket or cipher pass step did not finish in this attempt";
                return Err(JobError::Retryable(waited.into()));
            };
            progress.arrive(AFTER_CREATES, Step::AccessKey.name());
            progress.gather(AFTER_CREATES, SECOND_WAVE).await;
            Ok(world.keys.clone().or((how == "created").then(Vec::new)))
        };
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
                let after = progress.settled([Step::CipherPass.name()]);
                let step = (step.name(), attempt);
                access_key::reconcile_access_key_with(ctx, step, &keys, referenced, listed, after)
            })
            .await?;
        let resources = Resources {
            access_key_id: Some(key.access_key_id.clone()),
            ..Default::default()
        };
        let conf = async {
            // The Secret's content holds the cipher pass: recorded, or this attempt stops here.
            if !progress.succeeded([Step::CipherPass.name()]).await {
                let waited = "the cipher pass step did not finish in this attempt";
                return Err(JobError::Retryable(waited.into()));
            }
            self.s3_conf(ctx, payload, existing, &key).await
        };
        let (recorded, conf) = tokio::join!(self.record_resources(ctx, payload, resources), conf);
        let failed = conf.as_ref().map(drop).map_err(clone_error);
        Ok((key, first_failure_of([recorded, failed]).and(conf)?))
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

    /// Proves the key works before the repository is `ready`: a new key writes the job's probe
    /// object and reads one back (the service's read probe when `read_probe` yields one, else
    /// its own); the probe is returned, deleted with its read probe alongside the Secret's
    /// write. A key already in the Secret is checked read-only (by the observation wave when
    /// it passed there), so a re-run of a ready repository makes no mutating call. Recorded
    /// once `recorded_after` is ready.
    async fn credential_check_step(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        (key, conf, client): (&KeyOutput, &S3Conf, &aws_sdk_s3::Client),
        world: &World,
        (recorded_after, read_probe): (
            impl Future<Output = ()>,
            impl Future<Output = Option<String>>,
        ),
    ) -> Result<Option<String>, JobError> {
        let step = Step::CredentialCheck;
        ctx.step(step.name(), step.position(), async {
            let bucket = payload.bucket.as_str();
            let timing = (self.credential_check_budget, self.credential_check_backoff);
            let seen = world.key_check.as_ref();
            let seen = seen
                .filter(|(id, _)| *id == conf.access_key_id)
                .map(|(_, r)| r.clone());
            let (report, probe) = match (key.source, seen) {
                (KeySource::InSecret, Some(report)) => (report, None),
                (KeySource::InSecret, None) => {
                    let (budget, backoff) = timing;
                    let report =
                        credential_check::verify_read_only(client, bucket, budget, backoff);
                    (report.await?, None)
                }
                (KeySource::Created | KeySource::Sealed, _) => {
                    let probe = credential_check::job_probe_key(ctx.job().id);
                    let read_probe = read_probe.await;
                    let probes = (probe.as_str(), read_probe.as_deref());
                    let checked =
                        credential_check::verify_leaving_probe(client, bucket, timing, probes);
                    (checked.await?, Some(probe))
                }
            };
            recorded_after.await;
            Ok(done(probe, report))
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
        // The repository's resources are recorded in the step's own transaction.
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
                repository::merge_resources(
                    &mut *tx,
                    payload.repository_id,
                    &Resources {
                        secret: Some(output.clone()),
                        ..Default::default()
                    },
                )
                .await?;
                tx.commit().await?;
                Ok(output)
            })
            .await?;
        drop(secret_ref);
        Ok(())
    }

    /// Deletes every key but the one the Secret now holds: the key it replaced goes only now,
    /// once the new one is proven and workloads can read it (make before break). `listed`: the
    /// user's keys, listed after the new key was made.
    async fn retire_step(
        &self,
        ctx: &JobContext,
        payload: &ProvisionPayload,
        conf: &S3Conf,
        listed: &[KeyInfo],
    ) -> Result<(), JobError> {
        let step = Step::RetireOldKeys;
        ctx.step(step.name(), step.position(), async {
            let user = payload.bucket.iam_user_name();
            let (db, id) = (ctx.pool(), payload.repository_id);
            let in_grace = super::rotate::retirements::keys_in_grace(db, id).await?;
            let (iam, key) = (&self.aws.iam, &conf.access_key_id);
            let report = access_key::retire_listed_keys(iam, user, key, &in_grace, listed).await?;
            Ok(done((), report))
        })
        .await
    }
}

/// The job's probe object when a key is to be made (no Secret holds one), else `None`: only
/// then does a check put probes (a key from the Secret is checked read-only).
fn probe_of_new_key(ctx: &JobContext, existing: Option<&ExistingSecret>) -> Option<String> {
    let key_to_make = existing.and_then(|s| s.conf.as_ref()).is_none();
    key_to_make.then(|| credential_check::job_probe_key(ctx.job().id))
}

/// Deletes the probe object `probe` and its read probe with `s3`, at once. Either may not
/// exist (e.g. the check read back its own probe, or failed before its put): S3's delete of a
/// missing object succeeds.
async fn delete_probes(s3: &aws_sdk_s3::Client, bucket: &str, probe: &str) -> Result<(), JobError> {
    let read_probe = credential_check::read_probe_key(probe);
    let (probe, read_probe) = tokio::join!(
        credential_check::delete_probe(s3, bucket, probe),
        credential_check::delete_probe(s3, bucket, &read_probe)
    );
    probe?;
    Ok(read_probe?)
}

/// A copy of a failure for [`first_failure_of`] (the original is returned by its branch).
fn clone_error(err: &JobError) -> JobError {
    match err {
        JobError::Permanent(m) => JobError::Permanent(m.clone()),
        JobError::Cancelled => JobError::Cancelled,
        JobError::LeaseLost => JobError::LeaseLost,
        other => JobError::Retryable(other.to_string()),
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
            first_failure_of([retryable(), permanent()]),
            Err(JobError::Permanent(_))
        ));
        assert!(matches!(
            first_failure_of([permanent(), retryable()]),
            Err(JobError::Permanent(_))
        ));
        assert!(matches!(
            first_failure_of([Ok(()), retryable(), Ok(())]),
            Err(JobError::Retryable(_))
        ));
        assert!(first_failure_of([Ok(()), Ok(())]).is_ok());
    }
}
