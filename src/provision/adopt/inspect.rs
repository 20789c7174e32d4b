//! Every runbook resource of an adopted repository, through the sections' own code
//! (`bucket`, `policy`, `group`, `user`, the access key's description tag) in a
//! [`Mode`]: [`Mode::Plan`] reads and reports, [`Mode::Repair`] changes the settings of what
//! exists. Neither ever creates a resource: a missing one is reported as `create` by the
//! section, and [`Inspection::missing`] names it, for the adoption to refuse.

use serde_json::Value;

use crate::cloud::aws::AwsClients;
use crate::cloud::{CloudError, StepReport};
use crate::provision::report::Mode;
use crate::provision::{access_key, bucket, group, policy, user};

/// What adoption looks at: the repository's names and the access key from its Secret.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub repository: &'a str,
    /// The bucket, and the name of its policy, group and user.
    pub bucket: &'a str,
    pub region: &'a str,
    pub access_key_id: &'a str,
}

/// The resources' reports, in runbook order.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// One report per resource (`resource`, `settings`, `differences`), as the steps record them.
    pub reports: Vec<Value>,
    /// The policy's ARN (the planned one when it is missing).
    pub policy_arn: String,
}

impl Inspection {
    /// The resources that do not exist, as `<kind> <name>`.
    pub fn missing(&self) -> Vec<String> {
        self.reports
            .iter()
            .filter(|r| r["resource"]["action"] == "create")
            .map(|r| {
                let (kind, name) = (&r["resource"]["kind"], &r["resource"]["name"]);
                format!(
                    "{} {}",
                    kind.as_str().unwrap_or("?"),
                    name.as_str().unwrap_or("?")
                )
            })
            .collect()
    }

    /// Settings that differ from the runbook (every action but `none`), over all resources.
    pub fn drift(&self) -> usize {
        self.reports
            .iter()
            .flat_map(|r| r["settings"].as_array().cloned().unwrap_or_default())
            .filter(|s| s["action"] != "none")
            .count()
    }
}

/// Runs every section in `mode` (never [`Mode::Apply`], which would create what is missing).
pub async fn resources(
    aws: &AwsClients,
    target: Target<'_>,
    mode: Mode,
) -> Result<Inspection, CloudError> {
    debug_assert!(!mode.creates(), "adoption never creates a resource");
    let (name, iam) = (target.bucket, &aws.iam);
    let s3 = aws.s3_for_region(target.region);
    let bucket = bucket::ensure_with(&s3, name, target.region, target.repository, mode).await?;
    let (policy, policy_arn) = policy::ensure_with(iam, name, mode).await?;
    let group = group::ensure_with(iam, name, &policy_arn, mode).await?;
    let user = user::ensure_with(iam, name, target.repository, mode).await?;
    let user_exists = user.detail["resource"]["action"] != "create";
    let mut reports: Vec<Value> = [bucket, policy, group, user]
        .into_iter()
        .map(|r: StepReport| r.detail)
        .collect();
    if user_exists {
        let key = target.access_key_id;
        let tag = access_key::ensure_description_tag_with(iam, name, key, mode).await?;
        reports.push(tag.detail);
    }
    Ok(Inspection {
        reports,
        policy_arn,
    })
}

/// A plan's reports as an adoption without `repair` carries them out: every change becomes
/// `leave` (reported, not made), with the reason.
pub fn report_only(mut reports: Vec<Value>) -> Vec<Value> {
    const REASON: &str = "adopt without \"repair\" reports differences and changes nothing";
    for report in &mut reports {
        if let Some(settings) = report["settings"].as_array_mut() {
            for setting in settings.iter_mut().filter(|s| s["action"] != "none") {
                if setting["action"] != "leave" {
                    setting["action"] = Value::from("leave");
                    setting["reason"] = Value::from(REASON);
                }
            }
        }
        if report["resource"]["action"] == "update" {
            report["resource"]["action"] = Value::from("none");
        }
    }
    reports
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn missing_resources_and_drift_are_counted_and_report_only_changes_nothing() {
        let reports = vec![
            json!({"resource": {"kind": "s3-bucket", "name": "b", "action": "update"},
                   "settings": [{"setting": "tags", "action": "update"},
                                {"setting": "versioning", "action": "none"}]}),
            json!({"resource": {"kind": "iam-user", "name": "b", "action": "create"},
                   "settings": [{"setting": "tags", "action": "create"}]}),
        ];
        let inspection = Inspection {
            reports: reports.clone(),
            policy_arn: String::new(),
        };
        assert_eq!(inspection.missing(), vec!["iam-user b"]);
        assert_eq!(inspection.drift(), 2);
        let only = report_only(reports);
        assert_eq!(only[0]["resource"]["action"], "none");
        assert_eq!(only[0]["settings"][0]["action"], "leave");
        assert_eq!(only[0]["settings"][1]["action"], "none");
    }
}
