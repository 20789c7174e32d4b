//! Adoption (`POST /v1/backup-repositories` with `"adopt": true`): a repository made by hand
//! with the runbook is taken over without recreating anything. Never created or regenerated:
//! the bucket, the policy, the group, the user, the access key, the cipher pass.
//!
//! The job (`adopt-repository`), in order:
//! 1. `found_secret`: reads the Secret (by default named after the bucket; the request may
//!    name another, e.g. a hand-made `pgo-s3-creds`) and takes the access key id, its secret and
//!    the cipher pass from it, byte for byte, in the runbook's `s3.conf` or another layout
//!    ([`found_secret`] says which); reports how it differs from the runbook's Secret.
//! 2. `inspect`: every runbook resource, read-only ([`inspect`], the sections in plan mode);
//!    a missing one is a permanent error naming it (adopt does not make what the runbook
//!    requires: create the repository without `adopt`).
//! 3. `access_key_in_iam`: the key exists in the bucket-named user's keys and is active
//!    ([`key_check`]); else a permanent error naming it.
//! 4. `credential_check`: the key can list the bucket (read-only).
//! 5. with `"repair": true` only: `repair`, the safe differences converged (the sections in
//!    repair mode: settings of what exists, never a new resource), then `secret`, the Secret
//!    rewritten into the runbook's `s3.conf` with the same values (and our labels). Refused
//!    (permanent, in step 1, before any change; a dry run answers 422) when the rewrite would
//!    erase something: another repository's settings with other values, other settings or
//!    data keys ([`found_secret::Layout::lost_by_rewrite`]).
//!
//! Without `repair` nothing is changed and the job succeeds with the report in its steps: the
//! repository is `ready` (its key works against its bucket), the drift is in the `inspect`
//! step's audit entry and in the repository's latest verification. The repository records the
//! Secret's name (`resources.secret`) for the jobs that follow; its options say `adopt`, so a
//! reconcile adopts again (with repair) instead of provisioning, and the sweep never deletes its
//! keys (made by hand).
//!
//! Without `adopt`, provisioning refuses a hand-made set in its way ([`in_the_way`]).
//!
//! Once a repository recorded its resources, `adopt` and `secret_name` never change (409,
//! `request::refuse_adoption_switch`): an adopted repository is never provisioned (that would
//! make a new cipher pass, key and Secret and delete the hand-made key). Provisioning's own
//! switches (`allow_new_cipher_pass`, `adopt_existing_secret`) are refused with `adopt` (422).
//!
//! The cipher pass is never changed by any operation ([`CIPHER_PASS_NEVER_CHANGED`]).

pub mod found_secret;
pub mod in_the_way;
pub mod inspect;
pub mod key_check;

use std::time::Duration;

use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use self::found_secret::Found;
use self::inspect::{Inspection, Target};
use self::key_check::Checked;
use super::job::Provisioner;
use super::report::{Mode, done};
use super::{bucket, credential_check, secret};
use crate::cloud::StepReport;
use crate::cloud::aws::AwsClients;
use crate::domain::{BucketName, Namespace, Region, RepositoryName, ValidationError};
use crate::jobs::{JobContext, JobError, JobHandler, JobKind, Subject};
use crate::repository::{
    self, DesiredRepository, RepositoryOptions, RepositoryRow, Resources, SecretRef,
};

/// Why a request to set or change the cipher pass is refused (HTTP 409 / 422).
pub const CIPHER_PASS_NEVER_CHANGED: &str = "the cipher pass of a repository is never set or changed \
through the API: pgBackRest encrypts every backup with it and cannot re-encrypt an existing \
repository, so a new pass would make the backups already in the bucket unreadable. The only way \
to a new cipher pass is a new repository (a new bucket and a new stanza, e.g. the runbook's repo3 \
slot), made with POST /v1/backup-repositories, while the old one is kept until its backups \
expire; see the README, section \"The cipher pass is never rotated\"";

/// The adoption job kind.
pub struct AdoptRepository;

impl JobKind for AdoptRepository {
    /// Never rename: queued jobs carry it.
    const KIND: &'static str = "adopt-repository";
    type Payload = AdoptPayload;

    fn subject(payload: &AdoptPayload) -> Option<Subject> {
        Some(Subject {
            id: payload.repository_id,
            name: payload.repository.to_string(),
        })
    }
}

/// What an adoption is asked to do (the job payload; no secrets).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdoptPayload {
    pub repository: RepositoryName,
    pub repository_id: uuid::Uuid,
    pub namespace: Namespace,
    pub bucket: BucketName,
    pub region: Region,
    /// The Secret to read (validated by [`check_secret_name`]).
    pub secret_name: String,
    /// Converge the safe differences and rewrite a Secret in another layout.
    #[serde(default)]
    pub repair: bool,
}

/// The adoption of `row` with `options` (its Secret: `secret_name`, else the bucket's name).
/// The row's names were validated when it was stored; they are parsed again here.
pub fn payload_for(
    row: &RepositoryRow,
    options: &RepositoryOptions,
) -> Result<AdoptPayload, ValidationError> {
    let secret_name = options
        .secret_name
        .clone()
        .unwrap_or_else(|| row.bucket.clone());
    check_secret_name(&secret_name)?;
    Ok(AdoptPayload {
        repository: RepositoryName::parse(&row.name)?,
        repository_id: row.id,
        namespace: Namespace::try_from(row.namespace.clone())?,
        bucket: BucketName::try_from(row.bucket.clone())?,
        region: Region::parse(&row.region)?,
        secret_name,
        repair: options.repair,
    })
}

/// The adoption a create request asks for, before anything is stored (a dry run).
pub fn payload_for_desired(
    desired: &DesiredRepository,
    id: uuid::Uuid,
) -> Result<AdoptPayload, ValidationError> {
    let options = &desired.options;
    let secret_name = options.secret_name.clone();
    let secret_name = secret_name.unwrap_or_else(|| desired.bucket.as_str().to_owned());
    check_secret_name(&secret_name)?;
    Ok(AdoptPayload {
        repository: desired.name.clone(),
        repository_id: id,
        namespace: desired.namespace.clone(),
        bucket: desired.bucket.clone(),
        region: desired.region.clone(),
        secret_name,
        repair: options.repair,
    })
}

/// What is wrong with the adoption switches of a request: `secret_name` and `repair` only go
/// with `adopt` (without it the Secret is always the bucket's name and provisioning always
/// converges), `allow_new_cipher_pass` and `adopt_existing_secret` never do, and
/// `secret_name` must be a Secret's name.
pub fn check_options(options: &RepositoryOptions) -> Vec<ValidationError> {
    let mut errors = Vec::new();
    let only_with_adopt = "only applies with \"adopt\": true";
    if !options.adopt && options.secret_name.is_some() {
        errors.push(ValidationError::new("secret_name", only_with_adopt));
    }
    if !options.adopt && options.repair {
        errors.push(ValidationError::new("repair", only_with_adopt));
    }
    // Provisioning's switches: accepted with `adopt`, they would suggest an adopted
    // repository can get a new cipher pass or Secret.
    let not_with_adopt = "does not apply with \"adopt\": true: adoption keeps the cipher pass and \
                          the Secret it reads and never makes either";
    if options.adopt && options.allow_new_cipher_pass {
        errors.push(ValidationError::new(
            "allow_new_cipher_pass",
            not_with_adopt,
        ));
    }
    if options.adopt && options.adopt_existing_secret {
        errors.push(ValidationError::new(
            "adopt_existing_secret",
            not_with_adopt,
        ));
    }
    if let Some(name) = &options.secret_name
        && let Err(e) = check_secret_name(name)
    {
        errors.push(e);
    }
    errors
}

impl AdoptPayload {
    fn secret_full_name(&self) -> String {
        format!("{}/{}", self.namespace, self.secret_name)
    }
}

/// A Secret's name: a DNS-1123 subdomain (lowercase alphanumerics, `-` and `.`, at most 253
/// characters, starting and ending with an alphanumeric).
pub fn check_secret_name(name: &str) -> Result<(), ValidationError> {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.chars().all(|c| alnum(c) || c == '-' || c == '.')
        && name.starts_with(alnum)
        && name.ends_with(alnum)
        && name.split('.').all(|part| !part.is_empty());
    match valid {
        true => Ok(()),
        false => Err(ValidationError::new(
            "secret_name",
            "must be a Kubernetes Secret name: lowercase letters, digits, '-' and '.', at most 253 \
             characters, starting and ending with a letter or digit",
        )),
    }
}

/// What the adoption job needs from the outside world.
pub struct Adopter {
    pub aws: AwsClients,
    pub kube: kube::Client,
    /// How long the credential check retries a rejected key.
    pub credential_check_budget: Duration,
    pub credential_check_backoff: Duration,
}

impl Adopter {
    /// An adopter with the provisioning job's clients and credential check settings.
    pub fn like(provisioner: &Provisioner) -> Adopter {
        Adopter {
            aws: provisioner.aws.clone(),
            kube: provisioner.kube.clone(),
            credential_check_budget: provisioner.credential_check_budget,
            credential_check_backoff: provisioner.credential_check_backoff,
        }
    }
}

/// The steps of the adoption job, in order. Names are stored: never rename.
#[derive(Debug, Clone, Copy)]
enum Step {
    FoundSecret,
    Inspect,
    AccessKeyInIam,
    CredentialCheck,
    Repair,
    Secret,
}

impl Step {
    const fn name(self) -> &'static str {
        match self {
            Step::FoundSecret => "found_secret",
            Step::Inspect => "inspect",
            Step::AccessKeyInIam => "access_key_in_iam",
            Step::CredentialCheck => "credential_check",
            Step::Repair => "repair",
            Step::Secret => "secret",
        }
    }

    const fn position(self) -> i32 {
        self as i32 + 1
    }
}

#[async_trait::async_trait]
impl JobHandler for Adopter {
    fn kind(&self) -> &'static str {
        AdoptRepository::KIND
    }

    async fn run(&self, ctx: &JobContext) -> Result<(), JobError> {
        let payload: AdoptPayload = ctx.payload()?;
        let found = self.read_secret(&payload).await?;
        let mut secret = self.found_secret_step(ctx, &payload, &found).await?;
        let mut inspected = self.inspect_step(ctx, &payload, &found).await?;
        let key = self.key_step(ctx, &payload, &found).await?;
        self.credential_check_step(ctx, &payload, &found).await?;
        if payload.repair {
            inspected.resources = self.repair_step(ctx, &payload, &found).await?;
            secret = self.secret_step(ctx, &payload, &found).await?;
        }
        let mut resources = vec![secret];
        resources.append(&mut inspected.resources);
        resources.push(key);
        let verification = verification(payload.repair, resources);
        self.record(ctx, &payload, &found, inspected.policy_arn, verification)
            .await
    }

    async fn plan(&self, payload: Value) -> Option<Result<Value, JobError>> {
        Some(self.plan_adoption(payload).await)
    }
}

impl Adopter {
    /// The Secret and its credentials; a Secret that is missing or lacks one is permanent.
    async fn read_secret(&self, payload: &AdoptPayload) -> Result<Found, JobError> {
        let namespace = payload.namespace.as_str();
        let read = found_secret::read(&self.kube, namespace, &payload.secret_name).await?;
        read.map_err(|unusable| JobError::Permanent(unusable.to_string()))
    }

    fn target<'a>(&self, payload: &'a AdoptPayload, found: &'a Found) -> Target<'a> {
        Target {
            repository: payload.repository.as_str(),
            bucket: payload.bucket.as_str(),
            region: payload.region.as_str(),
            access_key_id: &found.conf.access_key_id,
        }
    }

    /// The Secret compared with the runbook's (labels, type, keys, `s3.conf`), plus its layout.
    /// A Secret that could not be rewritten (another type, immutable) is only an error when
    /// `repair` would have to rewrite it.
    async fn secret_report(
        &self,
        payload: &AdoptPayload,
        found: &Found,
    ) -> Result<Value, JobError> {
        let (namespace, name) = (payload.namespace.as_str(), payload.secret_name.as_str());
        let planned = secret::plan(&self.kube, namespace, name, Some(&found.conf), true).await;
        let mut report = match planned {
            Ok(report) => report.detail,
            Err(err) if !payload.repair && !err.is_retryable() => json!({
                "resource": { "kind": secret::KIND, "name": payload.secret_full_name(), "action": "none" },
                "settings": [],
                "not_rewritable": err.to_string(),
            }),
            Err(err) => return Err(err.into()),
        };
        report["layout"] = json!(found.layout);
        report["access_key_id"] = json!(found.conf.access_key_id);
        Ok(report)
    }

    async fn found_secret_step(
        &self,
        ctx: &JobContext,
        payload: &AdoptPayload,
        found: &Found,
    ) -> Result<Value, JobError> {
        let step = Step::FoundSecret;
        ctx.step(step.name(), step.position(), async {
            refuse_lossy_rewrite(payload, found)?;
            let report = self.secret_report(payload, found).await?;
            let outcome = crate::cloud::Outcome::AlreadyPresent;
            Ok(done(report.clone(), StepReport::new(outcome, report)))
        })
        .await
    }

    /// Every runbook resource, read-only; a missing one fails the job, naming all of them.
    async fn inspect(&self, payload: &AdoptPayload, found: &Found) -> Result<Inspection, JobError> {
        let inspection =
            inspect::resources(&self.aws, self.target(payload, found), Mode::Plan).await?;
        let missing = inspection.missing();
        if !missing.is_empty() {
            return Err(JobError::Permanent(format!(
                "adopt takes over what the runbook made and never creates anything, but these do not \
                 exist: {}. Make them by hand as the runbook says, or create the repository without \
                 \"adopt\" (it makes what is missing and a new access key)",
                missing.join(", ")
            )));
        }
        Ok(inspection)
    }

    async fn inspect_step(
        &self,
        ctx: &JobContext,
        payload: &AdoptPayload,
        found: &Found,
    ) -> Result<Inspected, JobError> {
        let step = Step::Inspect;
        ctx.step(step.name(), step.position(), async {
            let inspection = self.inspect(payload, found).await?;
            let detail = json!({
                "resources": inspection.reports,
                "drift": inspection.drift(),
                "repair": payload.repair,
            });
            let report = StepReport::new(crate::cloud::Outcome::AlreadyPresent, detail);
            let output = Inspected {
                policy_arn: inspection.policy_arn,
                resources: inspection.reports,
            };
            Ok(done(output, report))
        })
        .await
    }

    /// The key in the Secret against IAM (see [`key_check`]).
    async fn check_key(
        &self,
        payload: &AdoptPayload,
        found: &Found,
    ) -> Result<StepReport, JobError> {
        let (user, key) = (payload.bucket.iam_user_name(), &found.conf.access_key_id);
        let secret = payload.secret_full_name();
        match key_check::check(&self.aws.iam, user, key, &secret).await? {
            Checked::Usable(report) => Ok(report),
            Checked::Problem(problem) => Err(problem.into()),
        }
    }

    async fn key_step(
        &self,
        ctx: &JobContext,
        payload: &AdoptPayload,
        found: &Found,
    ) -> Result<Value, JobError> {
        let step = Step::AccessKeyInIam;
        ctx.step(step.name(), step.position(), async {
            let report = self.check_key(payload, found).await?;
            Ok(done(report.detail.clone(), report))
        })
        .await
    }

    /// The key from the Secret lists the bucket (read-only, retried within `budget`).
    async fn check_credentials(
        &self,
        payload: &AdoptPayload,
        found: &Found,
        budget: Duration,
    ) -> Result<StepReport, JobError> {
        let client = self.aws.s3_with_static_credentials(
            payload.region.as_str(),
            &found.conf.access_key_id,
            found.conf.secret_access_key.expose_secret(),
        );
        let (bucket, backoff) = (payload.bucket.as_str(), self.credential_check_backoff);
        credential_check::verify_read_only(&client, bucket, budget, backoff)
            .await
            .map_err(|err| match err.is_retryable() {
                true => JobError::Retryable(err.to_string()),
                false => JobError::Permanent(format!(
                    "access key {} from Secret {} cannot list bucket {bucket}: {err}",
                    found.conf.access_key_id,
                    payload.secret_full_name()
                )),
            })
    }

    async fn credential_check_step(
        &self,
        ctx: &JobContext,
        payload: &AdoptPayload,
        found: &Found,
    ) -> Result<(), JobError> {
        let step = Step::CredentialCheck;
        let budget = self.credential_check_budget;
        ctx.step(step.name(), step.position(), async {
            Ok(done(
                (),
                self.check_credentials(payload, found, budget).await?,
            ))
        })
        .await
    }

    /// The safe differences converged: settings of what exists, never a new resource.
    async fn repair_step(
        &self,
        ctx: &JobContext,
        payload: &AdoptPayload,
        found: &Found,
    ) -> Result<Vec<Value>, JobError> {
        let step = Step::Repair;
        ctx.step(step.name(), step.position(), async {
            let target = self.target(payload, found);
            let repaired = inspect::resources(&self.aws, target, Mode::Repair).await?;
            let detail = json!({ "resources": repaired.reports });
            let outcome = match repaired.drift() {
                0 => crate::cloud::Outcome::AlreadyPresent,
                _ => crate::cloud::Outcome::Updated,
            };
            Ok(done(repaired.reports, StepReport::new(outcome, detail)))
        })
        .await
    }

    /// The Secret rewritten into the runbook's `s3.conf` with the values it holds (and our
    /// labels); never over a Secret that changed since it was read.
    async fn secret_step(
        &self,
        ctx: &JobContext,
        payload: &AdoptPayload,
        found: &Found,
    ) -> Result<Value, JobError> {
        let step = Step::Secret;
        let (namespace, name) = (payload.namespace.as_str(), payload.secret_name.as_str());
        let basis = secret::Basis::Read(found.resource_version.as_deref());
        ctx.step(step.name(), step.position(), async {
            let report =
                secret::apply_built_from(&self.kube, namespace, name, &found.conf, true, basis)
                    .await?;
            Ok(done(report.detail.clone(), report))
        })
        .await
    }

    /// The repository records what it uses, the Secret's name first, and the adoption's
    /// report as its latest verification (shown by GET).
    async fn record(
        &self,
        ctx: &JobContext,
        payload: &AdoptPayload,
        found: &Found,
        policy_arn: String,
        verification: (Value, i32),
    ) -> Result<(), JobError> {
        let name = payload.bucket.as_str();
        let resources = Resources {
            bucket_arn: Some(bucket::arn(name)),
            policy_arn: Some(policy_arn),
            group: Some(payload.bucket.iam_group_name().to_owned()),
            user: Some(payload.bucket.iam_user_name().to_owned()),
            access_key_id: Some(found.conf.access_key_id.clone()),
            secret: Some(SecretRef {
                namespace: payload.namespace.to_string(),
                name: payload.secret_name.clone(),
            }),
        };
        let (id, (report, drift)) = (payload.repository_id, verification);
        let mut tx = ctx.fenced_tx().await?;
        repository::merge_resources(&mut *tx, id, &resources).await?;
        repository::record_verification(&mut *tx, id, &report, drift).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The dry run: what the job would find and do, with read calls only (the credential
    /// check is one ListObjectsV2 with the Secret's key, not retried).
    async fn plan_adoption(&self, payload: Value) -> Result<Value, JobError> {
        let payload: AdoptPayload = serde_json::from_value(payload)
            .map_err(|e| JobError::Permanent(format!("invalid payload: {e}")))?;
        let found = self.read_secret(&payload).await?;
        refuse_lossy_rewrite(&payload, &found)?;
        let secret = self.secret_report(&payload, &found).await?;
        let inspection = self.inspect(&payload, &found).await?;
        let key = self.check_key(&payload, &found).await?;
        let credentials = self
            .check_credentials(&payload, &found, Duration::ZERO)
            .await?;
        let mut plan = vec![secret];
        plan.extend(inspection.reports);
        plan.push(key.detail);
        plan.push(credential_check_report(
            payload.bucket.as_str(),
            credentials,
        ));
        Ok(Value::Array(match payload.repair {
            true => plan,
            false => inspect::report_only(plan),
        }))
    }
}

/// With `repair`, the Secret is rewritten into the runbook's `s3.conf`: refused, before any
/// change, when that would erase something in it (see [`found_secret::Layout::lost_by_rewrite`]).
/// The whole repair is refused, not only the Secret's rewrite: a repository half repaired
/// would look converged while its Secret is not the runbook's.
fn refuse_lossy_rewrite(payload: &AdoptPayload, found: &Found) -> Result<(), JobError> {
    match payload.repair {
        true => found
            .layout
            .refuse_lossy_rewrite(&payload.secret_full_name())
            .map_err(JobError::Permanent),
        false => Ok(()),
    }
}

/// What the inspect step keeps: the policy's ARN and the resources' reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Inspected {
    policy_arn: String,
    resources: Vec<Value>,
}

/// The adoption's report in the shape of a verification (`mode`, `resources`, `drift`) and
/// its drift: the settings whose action is not `none`.
fn verification(repair: bool, resources: Vec<Value>) -> (Value, i32) {
    let drift = resources
        .iter()
        .flat_map(|r| r["settings"].as_array().cloned().unwrap_or_default())
        .filter(|s| s["action"] != "none")
        .count();
    let drift = i32::try_from(drift).unwrap_or(i32::MAX);
    let mode = if repair { "repair" } else { "plan" };
    let report = json!({ "mode": mode, "resources": resources, "drift": drift, "by": "adopt" });
    (report, drift)
}

/// The credential check as a plan entry.
fn credential_check_report(bucket: &str, report: StepReport) -> Value {
    let mut detail = report.detail;
    detail["resource"] = json!({ "kind": "credential-check", "name": bucket, "action": "none" });
    detail["settings"] = json!([{
        "setting": "lists_bucket", "expected": true, "actual": true, "action": "none",
    }]);
    detail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names_are_dns_subdomains() {
        for ok in ["pgo-s3-creds", "holos-zitadel-backups", "a.b-c", "x"] {
            assert!(check_secret_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Pgo", "-a", "a-", "a..b", "a_b", &"a".repeat(254)] {
            assert!(check_secret_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn adoption_switches_go_with_adopt_only() {
        let options = |adopt, secret_name: Option<&str>, repair| RepositoryOptions {
            adopt,
            secret_name: secret_name.map(str::to_owned),
            repair,
            ..Default::default()
        };
        let fields = |o: &RepositoryOptions| -> Vec<String> {
            check_options(o).into_iter().map(|e| e.field).collect()
        };
        assert!(fields(&options(true, Some("pgo-s3-creds"), true)).is_empty());
        assert!(fields(&options(false, None, false)).is_empty());
        assert_eq!(
            fields(&options(false, Some("x"), true)),
            ["secret_name", "repair"]
        );
        assert_eq!(
            fields(&options(true, Some("Bad_Name"), false)),
            ["secret_name"]
        );
        let provisioning_switches = RepositoryOptions {
            adopt: true,
            allow_new_cipher_pass: true,
            adopt_existing_secret: true,
            ..Default::default()
        };
        assert_eq!(
            fields(&provisioning_switches),
            ["allow_new_cipher_pass", "adopt_existing_secret"]
        );
    }

    #[test]
    fn the_verification_counts_every_setting_that_is_not_none() {
        let resources = vec![
            json!({"settings": [{"action": "none"}, {"action": "update"}]}),
            json!({"settings": [{"action": "leave"}]}),
            json!({"resource": {}}),
        ];
        let (report, drift) = verification(false, resources);
        assert_eq!(drift, 2);
        assert_eq!(
            (report["mode"].as_str(), report["drift"].as_i64()),
            (Some("plan"), Some(2))
        );
        assert_eq!(verification(true, vec![]).0["mode"], "repair");
    }

    #[test]
    fn step_names_are_stored_and_ordered() {
        let steps = [
            Step::FoundSecret,
            Step::Inspect,
            Step::AccessKeyInIam,
            Step::CredentialCheck,
            Step::Repair,
            Step::Secret,
        ];
        let names: Vec<_> = steps.iter().map(|s| (s.name(), s.position())).collect();
        assert_eq!(
            names,
            [
                ("found_secret", 1),
                ("inspect", 2),
                ("access_key_in_iam", 3),
                ("credential_check", 4),
                ("repair", 5),
                ("secret", 6)
            ]
        );
    }
}
