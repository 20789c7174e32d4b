//! Runbook section "Create an IAM Group":
//!
//! > Create an IAM Group to attach the policy granting access to the bucket.
//! > Name: `holos-zitadel-backups` for `zitadel`
//! > Attach permission policies: `holos-zitadel-backups`
//!
//! A group named after the bucket (`ensure_exists`) with the bucket's policy attached
//! (`ensure_attached`); policies someone else attached are reported and left alone
//! (`check_other_policies`).

use aws_sdk_iam::Client;
use aws_sdk_iam::error::ProvideErrorMetadata;
use serde_json::json;

use super::report::{Action, Mode, Report};
use crate::cloud::aws::{ENTITY_ALREADY_EXISTS, classify, output_request_id};
use crate::cloud::{CloudError, StepReport};

const IAM: &str = "iam";
/// The resource kind in the step's report.
const KIND: &str = "iam-group";

/// Ensures group `bucket` exists and has `policy_arn` attached. Other attached policies are
/// reported under `differences` and left alone.
pub async fn ensure(
    iam: &Client,
    bucket: &str,
    policy_arn: &str,
) -> Result<StepReport, CloudError> {
    ensure_with(iam, bucket, policy_arn, Mode::Apply).await
}

/// [`ensure`] in `mode`; a missing group that is not made is planned as `create` with the
/// policy attached.
pub async fn ensure_with(
    iam: &Client,
    bucket: &str,
    policy_arn: &str,
    mode: Mode,
) -> Result<StepReport, CloudError> {
    let group = bucket;
    let mut report = Report::with_mode(KIND, group, mode);
    let identifiers = json!({
        "group_name": group,
        "policy_arn": policy_arn,
    });
    if !ensure_exists(iam, group, &mut report).await? {
        report.planned_new(&[("attached_policy", json!(policy_arn))]);
        return Ok(report.into_step_report(identifiers));
    }
    let attached = if report.was_created() {
        Vec::new()
    } else {
        attached_policies(iam, group).await?
    };
    check_other_policies(&attached, policy_arn, &mut report);
    ensure_attached(iam, group, policy_arn, &attached, &mut report).await?;
    Ok(report.into_step_report(identifiers))
}

/// Name: the bucket's name. Returns whether the group exists now (a missing one is made only
/// in apply mode).
async fn ensure_exists(iam: &Client, group: &str, report: &mut Report) -> Result<bool, CloudError> {
    match iam.get_group().group_name(group).max_items(1).send().await {
        Ok(_) => Ok(true),
        Err(err) if err.code() == Some("NoSuchEntity") && !report.creates() => Ok(false),
        Err(err) if err.code() == Some("NoSuchEntity") => {
            create(iam, group, report).await.map(|()| true)
        }
        Err(err) => Err(classify(IAM, "GetGroup", err)),
    }
}

/// Creates the group. `EntityAlreadyExists` (a resent request whose first answer was lost, or
/// a read that lagged behind an earlier create) leaves the group to be checked like any
/// existing one; reading it while it is not visible yet fails retryably.
async fn create(iam: &Client, group: &str, report: &mut Report) -> Result<(), CloudError> {
    match iam.create_group().group_name(group).path("/").send().await {
        Ok(out) => report.created(output_request_id(&out)),
        Err(err) if err.code() == Some(ENTITY_ALREADY_EXISTS) => {}
        Err(err) => return Err(classify(IAM, "CreateGroup", err)),
    }
    Ok(())
}

/// Policies attached by someone else are not removed automatically.
fn check_other_policies(attached: &[String], policy_arn: &str, report: &mut Report) {
    let others: Vec<&String> = attached.iter().filter(|arn| *arn != policy_arn).collect();
    if others.is_empty() {
        report.unchanged("other_attached_policies", json!([]));
    } else {
        report.left(
            "other_attached_policies",
            json!(others),
            json!([]),
            "policies attached by someone else are not removed automatically",
        );
    }
}

/// Attach permission policies: the bucket's policy.
async fn ensure_attached(
    iam: &Client,
    group: &str,
    policy_arn: &str,
    attached: &[String],
    report: &mut Report,
) -> Result<(), CloudError> {
    const SETTING: &str = "attached_policy";
    if attached.iter().any(|arn| arn == policy_arn) {
        report.unchanged(SETTING, json!(policy_arn));
        return Ok(());
    }
    let attach = async {
        let out = iam
            .attach_group_policy()
            .group_name(group)
            .policy_arn(policy_arn)
            .send()
            .await
            .map_err(|e| classify(IAM, "AttachGroupPolicy", e))?;
        Ok(output_request_id(&out))
    };
    let request_id = report.perform(attach).await?;
    if report.was_created() {
        report.made(SETTING, json!(policy_arn), request_id);
    } else {
        let expected = json!(policy_arn);
        report.repaired(SETTING, json!(null), expected, Action::Create, request_id);
    }
    Ok(())
}

/// ARNs of the managed policies attached to a group (paginated).
pub async fn attached_policies(iam: &Client, group: &str) -> Result<Vec<String>, CloudError> {
    let mut arns = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let out = iam
            .list_attached_group_policies()
            .group_name(group)
            .set_marker(marker.take())
            .send()
            .await
            .map_err(|e| classify(IAM, "ListAttachedGroupPolicies", e))?;
        arns.extend(
            out.attached_policies()
                .iter()
                .filter_map(|p| p.policy_arn().map(str::to_owned)),
        );
        match out.marker() {
            Some(next) if out.is_truncated() => marker = Some(next.to_owned()),
            _ => return Ok(arns),
        }
    }
}
