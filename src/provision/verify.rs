//! Verify and repair drift (issue 10 item 2): the `verify-repository` job kind checks every
//! runbook setting of a repository read-only, in the sections' plan mode (see
//! [`super::report::Mode`]), one job step and audit entry per resource:
//!
//! | step         | what is checked                                                          |
//! |--------------|--------------------------------------------------------------------------|
//! | `bucket`     | ownership, public access block, encryption and bucket key, versioning,   |
//! |              | Object Lock, tags                                                        |
//! | `policy`     | document (default version), description, path                            |
//! | `group`      | exists, the policy attached                                              |
//! | `user`       | exists, tags, member of the group, no login profile                      |
//! | `access_key` | the key the Secret references exists for the user, is `Active`; its      |
//! |              | description tag                                                          |
//! | `credential` | that key can list the bucket (read-only)                                 |
//! | `secret`     | exists, is ours (labels), `Opaque`, one key `s3.conf`, which parses and  |
//! |              | has repo3 equal to repo2                                                 |
//!
//! With `repair: true` the sections run in [`Mode::Repair`]: settings of what exists converge
//! (bucket settings and tags, the policy document, the group's attachment, the user's tags,
//! membership and login profile, the key's description tag, the Secret's labels, except on the
//! Secret of a repository adopted without `repair`, which is not ours: reported only). A missing
//! resource is reported, never made, and neither the cipher pass nor the access key is ever
//! touched: a missing or inactive key is reported as needing `rotate-key` or `reconcile`.
//!
//! The report is stored on the repository (`verified_at`, `verification`, `drift_count`) in the
//! transaction of the job's last step; the job does not change the repository's state.
//! [`inspect`] is the same verification without a job (adoption, dry runs).

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use super::job::Provisioner;
use super::report::{Action, Mode, Report, done};
use super::request::{Audited, Queued, Queueing, RequestError, enqueue_audited, lock_live};
use super::secret::{self, S3Conf};
use super::{access_key, bucket, credential_check, group, policy, user};
use crate::audit::Actor;
use crate::cloud::aws::{AwsClients, classify};
use crate::cloud::{CloudError, StepReport};
use crate::domain::{BucketName, Namespace, Region, RepositoryName, ValidationError};
use crate::jobs::{self, JobContext, JobError, JobHandler, JobKind, Subject, queue};
use crate::repository::{self, RepositoryRow};

/// The verification job kind.
pub struct VerifyRepository;

impl JobKind for VerifyRepository {
    /// Never rename: queued jobs carry it.
    const KIND: &'static str = "verify-repository";
    type Payload = VerifyPayload;

    fn subject(payload: &VerifyPayload) -> Option<Subject> {
        Some(Subject {
            id: payload.repository_id,
            name: payload.repository.to_string(),
        })
    }
}

/// What a verification job is asked to do (stored as the job payload).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VerifyPayload {
    pub repository: RepositoryName,
    pub repository_id: Uuid,
    pub namespace: Namespace,
    pub bucket: BucketName,
    pub region: Region,
    /// Converge what is safe to converge (never the cipher pass or the key).
    #[serde(default)]
    pub repair: bool,
}

/// What a verification looks at: one repository's resources and its Secret.
#[derive(Debug, Clone)]
pub struct Target {
    pub repository: RepositoryName,
    pub namespace: Namespace,
    pub bucket: BucketName,
    pub region: Region,
    /// The Secret's name (by default the bucket's).
    pub secret_name: String,
    /// The repository was adopted: a Secret of it without our label was not taken over
    /// (adopted without `repair`), and only adoption with `repair` takes it over.
    pub adopted: bool,
    /// The policy's ARN as the repository recorded it (read there, without a listing).
    pub policy_arn: Option<String>,
}

impl Target {
    /// A target whose Secret is named after its bucket.
    pub fn new(
        repository: RepositoryName,
        namespace: Namespace,
        bucket: BucketName,
        region: Region,
    ) -> Self {
        let secret_name = bucket.as_str().to_owned();
        Target {
            repository,
            namespace,
            bucket,
            region,
            secret_name,
            adopted: false,
            policy_arn: None,
        }
    }
}

/// The clients a verification uses.
#[derive(Clone, Copy)]
pub struct Clients<'a> {
    pub aws: &'a AwsClients,
    pub kube: &'a kube::Client,
    /// How long the credential check retries a rejected key (a key in use needs no wait for
    /// IAM's consistency; a short budget is enough).
    pub credential_check_budget: Duration,
    pub credential_check_backoff: Duration,
}

/// The result of a verification: one report per resource and the number of settings whose
/// action is not `none`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Verification {
    /// `plan` (read-only) or `repair`.
    pub mode: String,
    pub resources: Vec<Value>,
    pub drift: i32,
}

impl Verification {
    fn of(mode: Mode, resources: Vec<Value>) -> Self {
        let drift = resources.iter().map(drift_of).sum();
        let mode = serde_json::to_value(mode)
            .ok()
            .and_then(|m| m.as_str().map(str::to_owned))
            .unwrap_or_default();
        Verification {
            mode,
            resources,
            drift,
        }
    }
}

/// Settings of one resource report whose action is not `none`.
fn drift_of(resource: &Value) -> i32 {
    let settings = resource["settings"].as_array().map(Vec::as_slice);
    let count = settings
        .unwrap_or_default()
        .iter()
        .filter(|s| s["action"] != "none")
        .count();
    i32::try_from(count).unwrap_or(i32::MAX)
}

/// The checks, in order; each is one job step. Names are stored: never rename.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Bucket,
    Policy,
    Group,
    User,
    AccessKey,
    Credential,
    Secret,
}

impl Check {
    pub const ALL: [Check; 7] = [
        Check::Bucket,
        Check::Policy,
        Check::Group,
        Check::User,
        Check::AccessKey,
        Check::Credential,
        Check::Secret,
    ];

    /// Stored in `job_steps.step`; never rename.
    pub const fn name(self) -> &'static str {
        match self {
            Check::Bucket => "bucket",
            Check::Policy => "policy",
            Check::Group => "group",
            Check::User => "user",
            Check::AccessKey => "access_key",
            Check::Credential => "credential",
            Check::Secret => "secret",
        }
    }

    pub const fn position(self) -> i32 {
        self as i32 + 1
    }
}

/// Verifies every resource of `target` in `mode` ([`Mode::Plan`]: read-only; [`Mode::Repair`]:
/// converge what is safe) without a job: the same checks, in the same order, as the job.
pub async fn inspect(
    clients: &Clients<'_>,
    target: &Target,
    mode: Mode,
) -> Result<Verification, JobError> {
    let found = Found::read(clients, target).await?;
    let mut resources = Vec::new();
    for check in Check::ALL {
        let report = run_check(check, clients, target, mode, &found, &resources).await?;
        resources.push(report.detail);
    }
    Ok(Verification::of(mode, resources))
}

/// The Secret as read at the start of a verification, and its `s3.conf`.
pub struct Found {
    secret: Option<Secret>,
    conf: Option<S3Conf>,
}

impl Found {
    async fn read(clients: &Clients<'_>, target: &Target) -> Result<Found, CloudError> {
        let api: kube::Api<Secret> =
            kube::Api::namespaced(clients.kube.clone(), target.namespace.as_str());
        let secret = api
            .get_opt(&target.secret_name)
            .await
            .map_err(|e| crate::cloud::kube::classify("get secret", e))?;
        let conf = secret
            .as_ref()
            .and_then(s3_conf_text)
            .and_then(|text| S3Conf::parse(&text).ok());
        Ok(Found { secret, conf })
    }
}

fn s3_conf_text(secret: &Secret) -> Option<String> {
    let data = secret.data.as_ref()?.get(secret::S3_CONF_KEY)?;
    String::from_utf8(data.0.clone()).ok()
}

/// One check; `prior` holds the reports of the checks before it (the policy's ARN, whether
/// the user exists, the key's state).
async fn run_check(
    check: Check,
    clients: &Clients<'_>,
    target: &Target,
    mode: Mode,
    found: &Found,
    prior: &[Value],
) -> Result<StepReport, JobError> {
    let (iam, name) = (&clients.aws.iam, target.bucket.as_str());
    let repository = target.repository.as_str();
    let report = match check {
        Check::Bucket => {
            let s3 = clients.aws.s3_for_region(target.region.as_str());
            let region = target.region.as_str();
            bucket::ensure_with(&s3, name, region, repository, mode).await?
        }
        Check::Policy => {
            let known = target.policy_arn.as_deref();
            policy::ensure_with_known(iam, name, mode, known).await?.0
        }
        Check::Group => {
            let arn = prior_field(prior, Check::Policy, "policy_arn");
            let arn = arn.unwrap_or_else(|| policy::planned_arn(name));
            // Nothing can be attached while the policy is missing: only reported.
            let mode = unless_missing(prior, Check::Policy, mode);
            group::ensure_with(iam, name, &arn, mode).await?
        }
        Check::User => {
            let mode = unless_missing(prior, Check::Group, mode);
            user::ensure_with(iam, name, repository, mode).await?
        }
        Check::AccessKey => check_access_key(clients, target, mode, found, prior).await?,
        Check::Credential => check_credential(clients, target, found, prior).await?,
        Check::Secret => check_secret(clients, target, mode, found).await?,
    };
    Ok(report)
}

/// `mode`, or plan mode when the resource of the earlier check `needed` is missing (a repair
/// that depends on it, such as attaching a policy that does not exist, cannot be made).
fn unless_missing(prior: &[Value], needed: Check, mode: Mode) -> Mode {
    if prior_missing(prior, needed) {
        Mode::Plan
    } else {
        mode
    }
}

/// A string field of the report of an earlier check.
fn prior_field(prior: &[Value], check: Check, field: &str) -> Option<String> {
    let index = Check::ALL.iter().position(|c| *c == check)?;
    prior.get(index)?[field].as_str().map(str::to_owned)
}

/// Whether the report of an earlier check says its resource is missing.
fn prior_missing(prior: &[Value], check: Check) -> bool {
    let index = Check::ALL.iter().position(|c| *c == check);
    index
        .and_then(|i| prior.get(i))
        .is_some_and(|r| r["resource"]["action"] == "create")
}

const ROTATE: &str = "verify never replaces or reactivates an access key: rotate it \
                      (POST /v1/backup-repositories/{name}/rotate-key) or reconcile";

/// The key the Secret references: it exists for the user and is `Active`; its description tag.
async fn check_access_key(
    clients: &Clients<'_>,
    target: &Target,
    mode: Mode,
    found: &Found,
    prior: &[Value],
) -> Result<StepReport, CloudError> {
    let iam = &clients.aws.iam;
    let user = target.bucket.iam_user_name();
    let Some(conf) = &found.conf else {
        let mut report = Report::with_mode("iam-access-key", user, mode);
        let why = "the Secret holds no complete s3.conf, so no key is referenced";
        report.left("referenced", Value::Null, json!("a key of the user"), why);
        return Ok(report.into_step_report(json!({ "user_name": user })));
    };
    let key_id = conf.access_key_id.as_str();
    let listed = match prior_missing(prior, Check::User) {
        true => Vec::new(),
        false => access_key::list(iam, user).await?,
    };
    let mut report = Report::with_mode("iam-access-key", format!("{user}/{key_id}"), mode);
    let key = listed.iter().find(|k| k.id == key_id);
    let Some(key) = key else {
        report.left("exists", json!(false), json!(true), ROTATE);
        let identifiers = json!({ "user_name": user, "access_key_id": key_id, "listed": listed });
        return Ok(report.into_step_report(identifiers));
    };
    report.unchanged("exists", json!(true));
    match key.status.as_str() {
        "Active" => report.unchanged("status", json!("Active")),
        other => report.left("status", json!(other), json!("Active"), ROTATE),
    }
    access_key::check_description_tag(iam, user, key_id, &mut report).await?;
    let ids = listed.iter().map(|k| k.id.as_str());
    let others: Vec<&str> = ids.filter(|id| *id != key_id).collect();
    let last_used = last_used(iam, key_id).await?;
    let identifiers = json!({
        "user_name": user, "access_key_id": key_id, "other_keys": others,
        "last_used": last_used,
    });
    Ok(report.into_step_report(identifiers))
}

/// GetAccessKeyLastUsed: when and where the key was last used (`null`: never).
async fn last_used(iam: &aws_sdk_iam::Client, key_id: &str) -> Result<Value, CloudError> {
    let out = iam
        .get_access_key_last_used()
        .access_key_id(key_id)
        .send()
        .await
        .map_err(|e| classify("iam", "GetAccessKeyLastUsed", e))?;
    let Some(used) = out.access_key_last_used() else {
        return Ok(Value::Null);
    };
    let date = used.last_used_date().map(|d| d.to_string());
    Ok(json!({
        "date": date,
        "service": used.service_name(),
        "region": used.region(),
    }))
}

/// The referenced key lists the bucket (ListObjectsV2, read-only). Skipped, with no setting,
/// when the access key check already found the key unusable.
async fn check_credential(
    clients: &Clients<'_>,
    target: &Target,
    found: &Found,
    prior: &[Value],
) -> Result<StepReport, JobError> {
    let name = target.bucket.as_str();
    let mut report = Report::with_mode("credential-check", name, Mode::Plan);
    let key_report = prior.get(Check::AccessKey.position() as usize - 1);
    let usable = key_report.is_some_and(|r| drift_of_key(r) == 0);
    let (Some(conf), true) = (&found.conf, usable) else {
        let skipped = "no usable access key in the Secret (see the access_key check)";
        return Ok(report.into_step_report(json!({ "bucket": name, "skipped": skipped })));
    };
    let client = clients.aws.s3_with_static_credentials(
        target.region.as_str(),
        &conf.access_key_id,
        conf.secret_access_key.expose_secret(),
    );
    let (budget, backoff) = (
        clients.credential_check_budget,
        clients.credential_check_backoff,
    );
    let checked = credential_check::verify_read_only(&client, name, budget, backoff).await;
    let identifiers = json!({ "bucket": name, "access_key_id": conf.access_key_id });
    match checked {
        Ok(_) => report.unchanged("lists_bucket", json!(true)),
        Err(err) if err.is_retryable() => return Err(err.into()),
        Err(err) => {
            let why = "the key the Secret references cannot list the bucket";
            let setting = report.repaired(
                "lists_bucket",
                json!(false),
                json!(true),
                Action::Leave,
                None,
            );
            setting.reason = Some(why);
            setting.facts.insert("error".into(), json!(err.to_string()));
        }
    }
    Ok(report.into_step_report(identifiers))
}

/// Whether the access key check found the key missing or inactive.
fn drift_of_key(report: &Value) -> i32 {
    let settings = report["settings"].as_array().map(Vec::as_slice);
    let unusable = settings.unwrap_or_default().iter().any(|s| {
        matches!(
            s["setting"].as_str(),
            Some("exists" | "status" | "referenced")
        ) && s["action"] != "none"
    });
    i32::from(unusable)
}

const RESTORE_SECRET: &str = "the Secret holds the cipher pass that encrypts the backups: \
                              restore it from a copy (e.g. the workload cluster's synced \
                              Secret); verify never makes it";
const REWRITE_S3_CONF: &str = "s3.conf holds the cipher pass: verify never rewrites it \
                               (reconcile or rotate-key writes it whole)";

/// The Secret: exists, ours (labels, repaired), `Opaque`, one data key `s3.conf` that parses
/// and has repo3 equal to repo2 (reported only: never rewritten here).
async fn check_secret(
    clients: &Clients<'_>,
    target: &Target,
    mode: Mode,
    found: &Found,
) -> Result<StepReport, CloudError> {
    let (namespace, name) = (target.namespace.as_str(), target.secret_name.as_str());
    let mut report = Report::with_mode(secret::KIND, format!("{namespace}/{name}"), mode);
    let identifiers = json!({ "namespace": namespace, "name": name });
    let Some(existing) = &found.secret else {
        report.left("exists", json!(false), json!(true), RESTORE_SECRET);
        return Ok(report.into_step_report(identifiers));
    };
    report.unchanged("exists", json!(true));
    if target.adopted && !managed_by_us(existing) {
        leave_labels(existing, &mut report);
    } else {
        secret::compare_labels(existing, name, &mut report);
    }
    let labels_drift = report.settings().last().is_some_and(|s| s.action.changes());
    if labels_drift {
        let version = existing.metadata.resource_version.clone();
        let restore = secret::restore_labels(clients.kube, namespace, name, version);
        report.perform(restore).await?;
    }
    secret::compare_type(existing, &mut report);
    check_data_keys(existing, &mut report);
    check_s3_conf(existing, &mut report);
    Ok(report.into_step_report(identifiers))
}

const NOT_TAKEN_OVER: &str = "the Secret of an adopted repository was adopted as it is (without \
                              \"repair\") and is not ours: verify never labels it (rotation \
                              would then rewrite it); adopt it with \"repair\" (or reconcile), \
                              which checks that the rewrite erases nothing, to take it over";

fn managed_by_us(existing: &Secret) -> bool {
    let labels = existing.metadata.labels.as_ref();
    let label = labels.and_then(|l| l.get(secret::MANAGED_BY_LABEL));
    label.is_some_and(|v| v == secret::FIELD_MANAGER)
}

/// The labels of a Secret not taken over: reported, never written.
fn leave_labels(existing: &Secret, report: &mut Report) {
    let labels = existing.metadata.labels.as_ref();
    let found = labels.and_then(|l| l.get(secret::MANAGED_BY_LABEL));
    let actual = json!({ secret::MANAGED_BY_LABEL: found });
    let expected = json!({ secret::MANAGED_BY_LABEL: secret::FIELD_MANAGER });
    report.left("labels", actual, expected, NOT_TAKEN_OVER);
}

/// "a secret with a single key, `s3.conf`": other keys are reported (reconcile removes them).
fn check_data_keys(existing: &Secret, report: &mut Report) {
    let keys: Vec<&String> = existing.data.iter().flat_map(|d| d.keys()).collect();
    let expected = json!([secret::S3_CONF_KEY]);
    if keys == [secret::S3_CONF_KEY] {
        return report.unchanged("keys", expected);
    }
    let why = "other data keys are removed by reconcile, never by verify";
    report.left("keys", json!(keys), expected, why);
}

/// `s3.conf` has every repo2 setting, and repo3 holds the same values (names only reported).
fn check_s3_conf(existing: &Secret, report: &mut Report) {
    let expected = json!("repo2-cipher-pass, repo2-s3-key, repo2-s3-key-secret");
    let Some(text) = s3_conf_text(existing) else {
        return report.left(secret::S3_CONF_KEY, Value::Null, expected, REWRITE_S3_CONF);
    };
    match S3Conf::parse(&text) {
        Ok(_) => report.unchanged(secret::S3_CONF_KEY, expected),
        Err(err) => {
            let found = json!(format!("no value for {}", err.missing.join(", ")));
            report.left(secret::S3_CONF_KEY, found, expected, REWRITE_S3_CONF);
        }
    }
    let differing = repo3_differences(&text);
    let same = json!("the same values as repo2");
    if differing.is_empty() {
        report.unchanged("repo3", same);
    } else {
        report.left("repo3", json!(differing), same, REWRITE_S3_CONF);
    }
}

/// The repo3 settings of an `s3.conf` whose value differs from repo2's (names, never values).
pub fn repo3_differences(text: &str) -> Vec<String> {
    let values: std::collections::BTreeMap<&str, &str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.starts_with(['#', ';', '[']))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim(), value.trim()))
        .collect();
    ["cipher-pass", "s3-key", "s3-key-secret"]
        .into_iter()
        .filter(|setting| {
            let repo2 = values.get(format!("repo2-{setting}").as_str());
            repo2 != values.get(format!("repo3-{setting}").as_str())
        })
        .map(|setting| format!("repo3-{setting}"))
        .collect()
}

/// What the verification job needs from the outside world.
pub struct Verifier {
    pub aws: AwsClients,
    pub kube: kube::Client,
    pub credential_check_budget: Duration,
    pub credential_check_backoff: Duration,
}

impl Verifier {
    /// A verifier with the provisioning job's clients and credential check settings.
    pub fn like(provisioner: &Provisioner) -> Verifier {
        Verifier {
            aws: provisioner.aws.clone(),
            kube: provisioner.kube.clone(),
            credential_check_budget: provisioner.credential_check_budget,
            credential_check_backoff: provisioner.credential_check_backoff,
        }
    }

    pub fn clients(&self) -> Clients<'_> {
        Clients {
            aws: &self.aws,
            kube: &self.kube,
            credential_check_budget: self.credential_check_budget,
            credential_check_backoff: self.credential_check_backoff,
        }
    }
}

fn mode_of(repair: bool) -> Mode {
    if repair { Mode::Repair } else { Mode::Plan }
}

#[async_trait::async_trait]
impl JobHandler for Verifier {
    fn kind(&self) -> &'static str {
        VerifyRepository::KIND
    }

    /// One step per check; the last one stores the verification on the repository.
    async fn run(&self, ctx: &JobContext) -> Result<(), JobError> {
        let payload: VerifyPayload = ctx.payload()?;
        let target = target_of(ctx.pool(), &payload).await?;
        let (clients, mode) = (self.clients(), mode_of(payload.repair));
        let found = Found::read(&clients, &target).await?;
        let mut resources: Vec<Value> = Vec::new();
        for check in &Check::ALL[..Check::ALL.len() - 1] {
            let work = async {
                let report = run_check(*check, &clients, &target, mode, &found, &resources).await?;
                Ok(finished(report))
            };
            let detail: Value = ctx.step(check.name(), check.position(), work).await?;
            resources.push(detail);
        }
        let last = Last {
            clients,
            target: &target,
            mode,
            found: &found,
            repository_id: payload.repository_id,
        };
        last.run(ctx, resources).await
    }

    /// The verification done now, read-only, without a job (see [`inspect`]).
    async fn plan(&self, payload: Value) -> Option<Result<Value, JobError>> {
        Some(self.plan_verification(payload).await)
    }
}

impl Verifier {
    async fn plan_verification(&self, payload: Value) -> Result<Value, JobError> {
        let asked: VerifyDryRunPayload = serde_json::from_value(payload)
            .map_err(|e| JobError::Permanent(format!("invalid payload: {e}")))?;
        let p = asked.payload;
        let mut target = Target::new(p.repository, p.namespace, p.bucket, p.region);
        if let Some(name) = asked.secret_name {
            target.secret_name = name;
        }
        target.adopted = asked.adopted;
        let verification = inspect(&self.clients(), &target, Mode::Plan).await?;
        Ok(Value::Array(verification.resources))
    }
}

/// A verification step's result: its output and audit detail are the resource's report; its
/// audit outcome says what verify found or did (`verified`: as the runbook wants, `drift`:
/// differences found and left, `repaired`: something was changed).
fn finished(report: StepReport) -> jobs::StepDone<Value> {
    let outcome = if report.outcome == crate::cloud::Outcome::Updated {
        "repaired"
    } else if drift_of(&report.detail) > 0 {
        "drift"
    } else {
        "verified"
    };
    let mut finished = done(report.detail.clone(), report);
    finished.outcome = outcome;
    finished
}

/// The last step: the Secret's check, recorded together with the verification it completes.
struct Last<'a> {
    clients: Clients<'a>,
    target: &'a Target,
    mode: Mode,
    found: &'a Found,
    repository_id: Uuid,
}

impl Last<'_> {
    async fn run(&self, ctx: &JobContext, mut resources: Vec<Value>) -> Result<(), JobError> {
        let check = Check::Secret;
        let (clients, target, found) = (&self.clients, self.target, self.found);
        let _: Value = ctx
            .step_with_own_commit(check.name(), check.position(), |attempt| async move {
                let report =
                    run_check(check, clients, target, self.mode, found, &resources).await?;
                resources.push(report.detail.clone());
                let verification = Verification::of(self.mode, resources);
                let mut tx = ctx.fenced_tx().await?;
                let stored = serde_json::to_value(&verification).unwrap_or_default();
                let drift = verification.drift;
                repository::record_verification(&mut *tx, self.repository_id, &stored, drift)
                    .await?;
                let finished = finished(report);
                ctx.finish_step(&mut tx, check.name(), attempt, &finished)
                    .await?;
                tx.commit().await?;
                Ok(finished.output)
            })
            .await?;
        Ok(())
    }
}

/// The target of a job: the repository's Secret is the one its record names (an adopted
/// repository's may have another name), else the bucket's.
async fn target_of(db: &sqlx::PgPool, payload: &VerifyPayload) -> Result<Target, JobError> {
    let p = payload.clone();
    let mut target = Target::new(p.repository, p.namespace, p.bucket, p.region);
    if let Some(row) = repository::by_id(db, payload.repository_id).await? {
        target.adopted = row.options.0.adopt;
        target.policy_arn = row.resources.0.policy_arn.clone();
        let named = row.resources.0.secret.map(|s| s.name);
        if let Some(name) = named.or(row.options.0.secret_name) {
            target.secret_name = name;
        }
    }
    Ok(target)
}

/// The payload of a dry run (`?dry_run=true`): the job's, and the Secret's name when it is not
/// the bucket's (a job reads it from the repository's record instead).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyDryRunPayload {
    #[serde(flatten)]
    pub payload: VerifyPayload,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// The repository was adopted (see [`Target::adopted`]).
    #[serde(default)]
    pub adopted: bool,
}

/// The dry run of `verify-repository` (`http::dry_run::answer::<VerifyDryRun>`): never queued,
/// it only names the kind whose plan answers.
pub struct VerifyDryRun;

impl JobKind for VerifyDryRun {
    const KIND: &'static str = VerifyRepository::KIND;
    type Payload = VerifyDryRunPayload;

    fn subject(payload: &VerifyDryRunPayload) -> Option<Subject> {
        VerifyRepository::subject(&payload.payload)
    }
}

impl VerifyPayload {
    /// The verification of the stored repository `row` (its names parsed again).
    pub fn for_row(row: &RepositoryRow, repair: bool) -> Result<Self, ValidationError> {
        Ok(VerifyPayload {
            repository: RepositoryName::parse(&row.name)?,
            repository_id: row.id,
            namespace: Namespace::try_from(row.namespace.clone())?,
            bucket: BucketName::try_from(row.bucket.clone())?,
            region: Region::parse(&row.region)?,
            repair,
        })
    }
}

/// A dry run (of verify, or of reconcile) of a repository whose job is queued or running
/// answers as the request would: busy (and a replica without workers, where every repository's job stays queued, says so
/// rather than that it cannot plan).
pub async fn refuse_busy(db: &sqlx::PgPool, row: &RepositoryRow) -> Result<(), RequestError> {
    let latest = queue::latest_per_subject(db, &[row.id]).await?;
    match latest.first() {
        Some(job) if matches!(job.state.as_str(), "queued" | "running") => {
            Err(RequestError::Busy(row.name.clone()))
        }
        _ => Ok(()),
    }
}

/// The dry run's payload for `row`: its Secret's name when its record names one.
pub fn dry_run_payload(row: &RepositoryRow) -> Result<VerifyDryRunPayload, ValidationError> {
    let named = row.resources.0.secret.as_ref().map(|s| s.name.clone());
    Ok(VerifyDryRunPayload {
        payload: VerifyPayload::for_row(row, false)?,
        secret_name: named.or_else(|| row.options.0.secret_name.clone()),
        adopted: row.options.0.adopt,
    })
}

/// `POST /v1/backup-repositories/{name}/verify`: queues a verification of the repository
/// `name`, audited as `repository.verify`, in one transaction.
pub async fn request<'a>(
    db: &sqlx::PgPool,
    name: &str,
    repair: bool,
    actor: Actor<'_>,
    queueing: impl Into<Queueing<'a>>,
) -> Result<Queued, RequestError> {
    let Queueing {
        max_attempts,
        callback_url,
    } = queueing.into();
    let row = repository::by_name(db, name)
        .await?
        .ok_or_else(|| RequestError::NotFound(name.to_owned()))?;
    let payload = VerifyPayload::for_row(&row, repair)?;
    let mut tx = db.begin().await?;
    // Locked and checked again: a repository deleted since it was read gets no verification.
    if !lock_live(&mut tx, row.id).await? {
        return Err(RequestError::NotFound(row.name));
    }
    let audit = Audited::new(actor, "repository.verify", json!({ "repair": repair }))
        .with_callback(callback_url);
    let job_id =
        enqueue_audited::<VerifyRepository>(&mut tx, &payload, &row.name, audit, max_attempts)
            .await?
            .ok_or_else(|| RequestError::Busy(row.name.clone()))?;
    tx.commit().await?;
    let job = queue::get(db, job_id)
        .await?
        .ok_or(RequestError::DeletedConcurrently)?;
    Ok(Queued {
        repository: row,
        job,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo3_is_compared_with_repo2_by_name_only() {
        let same = "[global]\nrepo2-cipher-pass=p\nrepo2-s3-key=K\nrepo2-s3-key-secret=s\n\
                    repo3-cipher-pass=p\nrepo3-s3-key=K\nrepo3-s3-key-secret=s\n";
        assert!(repo3_differences(same).is_empty());
        let spaced = same.replace("repo3-s3-key=K", "repo3-s3-key = K ");
        assert!(
            repo3_differences(&spaced).is_empty(),
            "spacing is not drift"
        );
        let edited = same.replace("repo3-s3-key-secret=s", "repo3-s3-key-secret=other");
        assert_eq!(repo3_differences(&edited), ["repo3-s3-key-secret"]);
        let no_repo3 = "[global]\nrepo2-cipher-pass=p\nrepo2-s3-key=K\nrepo2-s3-key-secret=s\n";
        assert_eq!(repo3_differences(no_repo3).len(), 3);
        assert!(!format!("{:?}", repo3_differences(&edited)).contains("other"));
    }

    #[test]
    fn drift_counts_settings_whose_action_is_not_none() {
        let resources = vec![
            json!({"settings": [{"action": "none"}, {"action": "update"}]}),
            json!({"settings": [{"action": "leave"}, {"action": "create"}]}),
            json!({"skipped": "no key"}),
        ];
        let verification = Verification::of(Mode::Repair, resources);
        assert_eq!(verification.drift, 3);
        assert_eq!(verification.mode, "repair");
        assert_eq!(Verification::of(Mode::Plan, vec![]).mode, "plan");
    }

    #[test]
    fn check_names_and_positions_are_stable() {
        let names: Vec<&str> = Check::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(
            names,
            [
                "bucket",
                "policy",
                "group",
                "user",
                "access_key",
                "credential",
                "secret"
            ]
        );
        assert_eq!(Check::Secret.position(), 7);
    }
}
