//! The dry run of the provisioning job ([`Provisioner`]'s [`crate::jobs::JobHandler::plan`]):
//! the job's step sequence with every section in [`Mode::Plan`], which reads everything and
//! records the action each step would take (expected, actual, action) without any mutating
//! AWS or Kubernetes call.
//!
//! Like the job, the plan first proves the Secret can be written with a server-side dry run
//! (`dryRun=All`, which changes nothing). What a plan cannot know, and says so: the values of
//! secrets (never revealed: the cipher pass is "reused" or "generated", the key "reused" or
//! "created"); whether an unfinished earlier job sealed a cipher pass or a key in Postgres (the
//! plan consults the Secret and IAM only); the credential check, which needs the key's secret
//! and is skipped.

use serde_json::{Value, json};

use super::access_key::{self, KeyPlan, KeySource};
use super::adopt::in_the_way;
use super::job::{ProvisionPayload, Provisioner};
use super::report::{Mode, Report};
use super::secret::{self, ExistingSecret, S3Conf};
use super::{bucket, cipher_pass, group, policy, user};
use crate::cloud::StepReport;
use crate::jobs::JobError;

const PLAN: Mode = Mode::Plan;

impl Provisioner {
    /// The plan of a `provision-repository` job for `payload`: one resource report per step,
    /// in the job's order. A permanent finding (an unmanaged Secret, a bucket that cannot be
    /// used, a cipher pass that would be refused) is the job's own error.
    pub async fn plan_provisioning(&self, payload: Value) -> Result<Value, JobError> {
        let payload: ProvisionPayload = serde_json::from_value(payload)
            .map_err(|e| JobError::Permanent(format!("invalid payload: {e}")))?;
        let (namespace, name) = (payload.namespace.as_str(), payload.bucket.as_str());
        let existing = secret::read(&self.kube, namespace, name).await?;
        let adopt = payload.adopt_existing_secret;
        secret::refuse_unmanaged(existing.as_ref(), payload.secret(), adopt)?;
        // The job's own first check that the Secret can be written (a server-side dry run:
        // nothing is changed), so a missing namespace or permission fails the plan as it would
        // fail the job.
        secret::preflight(&self.kube, namespace, name).await?;
        if !adopt {
            let region = payload.region.as_str();
            in_the_way::refuse_hand_made(&self.aws, name, region).await?;
        }
        let mut plan = self.plan_aws_resources(&payload).await?;
        let new_bucket = plan[0]["resource"]["action"] == "create";
        plan.push(
            self.plan_cipher_pass(&payload, existing.as_ref(), new_bucket)
                .await?,
        );
        let new_user = plan[3]["resource"]["action"] == "create";
        let (key, key_plan) = self
            .plan_access_key(&payload, existing.as_ref(), new_user)
            .await?;
        plan.extend(key);
        plan.push(credential_check_skipped(name));
        let conf = kept_conf(&key_plan, existing.as_ref());
        let report = secret::plan(&self.kube, namespace, name, conf, adopt).await?;
        plan.push(report.detail);
        plan.push(plan_retire(name, &key_plan));
        Ok(Value::Array(plan))
    }

    /// Bucket, policy, group and user, as their steps would find and change them.
    async fn plan_aws_resources(&self, payload: &ProvisionPayload) -> Result<Vec<Value>, JobError> {
        let (name, region) = (payload.bucket.as_str(), payload.region.as_str());
        let repository = payload.repository.as_str();
        let s3 = self.aws.s3_for_region(region);
        bucket::preflight(&s3, name, region).await?;
        let bucket = bucket::ensure_with(&s3, name, region, repository, PLAN).await?;
        let (policy, arn) = policy::ensure_with(&self.aws.iam, name, PLAN).await?;
        let group = group::ensure_with(&self.aws.iam, name, &arn, PLAN).await?;
        let user = user::ensure_with(&self.aws.iam, name, repository, PLAN).await?;
        Ok([bucket, policy, group, user]
            .into_iter()
            .map(|r: StepReport| r.detail)
            .collect())
    }

    /// Whether the cipher pass would be reused (the Secret holds one) or generated; a new pass
    /// for a bucket that holds objects is refused as the job would refuse it.
    async fn plan_cipher_pass(
        &self,
        payload: &ProvisionPayload,
        existing: Option<&ExistingSecret>,
        new_bucket: bool,
    ) -> Result<Value, JobError> {
        let copies = cipher_pass::Copies {
            in_secret: existing.and_then(|s| s.cipher_pass.as_ref()).is_some(),
            sealed: false,
        };
        let s3 = self.aws.s3_for_region(payload.region.as_str());
        let has_objects = || async {
            match new_bucket {
                true => Ok(false),
                false => bucket::has_objects(&s3, payload.bucket.as_str()).await,
            }
        };
        let allow_new = payload.allow_new_cipher_pass;
        let decision =
            cipher_pass::decide(copies, allow_new, payload.secret(), has_objects).await?;
        let mut report = Report::with_mode("cipher-pass", payload.bucket.as_str(), PLAN);
        match decision.source() {
            cipher_pass::Source::Generated => report.planned_new(&[(
                "cipher_pass",
                json!("64 characters of [A-Za-z0-9], generated"),
            )]),
            _ => report.unchanged("cipher_pass", json!("the one in the Secret, reused")),
        }
        let detail = json!({ "source": decision.source() });
        Ok(report.into_step_report(detail).detail)
    }

    /// The access key step (keep the key the Secret references when it is active, else create
    /// one; delete keys nobody can use first) and its description tag.
    async fn plan_access_key(
        &self,
        payload: &ProvisionPayload,
        existing: Option<&ExistingSecret>,
        new_user: bool,
    ) -> Result<(Vec<Value>, KeyPlan), JobError> {
        let user = payload.bucket.iam_user_name();
        // A user that does not exist yet has no keys (and cannot be asked for them).
        let listed = match new_user {
            true => Vec::new(),
            false => access_key::list(&self.aws.iam, user).await?,
        };
        let referenced = existing.and_then(|s| s.conf.as_ref());
        let referenced = referenced.map(|c| c.access_key_id.as_str());
        let key_plan = access_key::plan_keys(&listed, None, referenced);
        let mut report = Report::with_mode("iam-access-key", user, PLAN);
        if !key_plan.orphans.is_empty() {
            let orphans = json!(key_plan.orphans);
            let setting = report.repaired("unusable_keys", orphans, json!([]), delete(), None);
            setting.reason = Some("no secret is held for them and the Secret does not use them");
        }
        let description = match &key_plan.keep {
            Some(key) => {
                report.unchanged("access_key", json!(key.access_key_id));
                let iam = &self.aws.iam;
                let tag =
                    access_key::ensure_description_tag_with(iam, user, &key.access_key_id, PLAN);
                tag.await?.detail
            }
            None => {
                report.planned_new(&[("access_key", json!("a new access key"))]);
                let mut tag = Report::with_mode("iam-user-tag", format!("{user}/(new key)"), PLAN);
                tag.planned_new(&[("description_tag", json!(access_key::DESCRIPTION))]);
                tag.into_step_report(json!({ "user_name": user })).detail
            }
        };
        let key = report.into_step_report(json!({ "user_name": user, "listed": listed }));
        Ok((vec![key.detail, description], key_plan))
    }
}

fn delete() -> super::report::Action {
    super::report::Action::Delete
}

/// The Secret's content when the job would reuse the key and cipher pass it holds.
fn kept_conf<'a>(plan: &KeyPlan, existing: Option<&'a ExistingSecret>) -> Option<&'a S3Conf> {
    let kept = plan
        .keep
        .as_ref()
        .filter(|k| k.source == KeySource::InSecret)?;
    existing
        .and_then(|s| s.conf.as_ref())
        .filter(|c| c.access_key_id == kept.access_key_id)
}

/// The credential check needs the key's secret and proves it with calls of its own: skipped.
fn credential_check_skipped(bucket: &str) -> Value {
    json!({
        "resource": { "kind": "credential-check", "name": bucket, "action": "none" },
        "settings": [],
        "skipped": "a dry run makes no call with the repository's access key; the job proves \
                    the key against the bucket before the Secret is written",
    })
}

/// The retire step: every key but the one the Secret will hold is deleted (the key it
/// replaces goes only once the new one is in the Secret).
fn plan_retire(user: &str, plan: &KeyPlan) -> Value {
    let kept = plan.keep.as_ref().map(|k| k.access_key_id.as_str());
    let retired: Vec<&String> = plan
        .in_use
        .iter()
        .filter(|id| Some(id.as_str()) != kept)
        .collect();
    let mut report = Report::with_mode("iam-access-key", user, PLAN);
    if retired.is_empty() {
        report.unchanged("retired_keys", json!([]));
    } else {
        let setting = report.repaired("retired_keys", json!(retired), json!([]), delete(), None);
        setting.reason = Some("replaced: deleted once the new key is in the Secret");
    }
    report.into_step_report(json!({ "user_name": user })).detail
}
