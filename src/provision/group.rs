//! Runbook step "Create an IAM Group": a group named after the bucket with the bucket's policy
//! attached.

use aws_sdk_iam::Client;
use aws_sdk_iam::error::ProvideErrorMetadata;
use serde_json::json;

use crate::cloud::aws::{classify, output_request_id};
use crate::cloud::{CloudError, Outcome, StepReport};

const IAM: &str = "iam";

/// Ensures group `bucket` exists and has `policy_arn` attached. Other attached policies are
/// reported under `differences` and left alone.
pub async fn ensure(
    iam: &Client,
    bucket: &str,
    policy_arn: &str,
) -> Result<StepReport, CloudError> {
    let group = bucket;
    let mut request_id = None;
    let created = match iam.get_group().group_name(group).max_items(1).send().await {
        Ok(_) => false,
        Err(err) if err.code() == Some("NoSuchEntity") => {
            let out = iam
                .create_group()
                .group_name(group)
                .path("/")
                .send()
                .await
                .map_err(|e| classify(IAM, "CreateGroup", e))?;
            request_id = output_request_id(&out);
            true
        }
        Err(err) => return Err(classify(IAM, "GetGroup", err)),
    };

    let attached = if created {
        Vec::new()
    } else {
        attached_policies(iam, group).await?
    };
    let mut differences = Vec::new();
    let others: Vec<&String> = attached.iter().filter(|arn| *arn != policy_arn).collect();
    if !others.is_empty() {
        differences.push(json!({
            "setting": "other_attached_policies",
            "found": others,
            "expected": [],
            "action": "left unchanged",
            "reason": "policies attached by someone else are not removed automatically",
        }));
    }
    let mut attached_now = false;
    if !attached.iter().any(|arn| arn == policy_arn) {
        let out = iam
            .attach_group_policy()
            .group_name(group)
            .policy_arn(policy_arn)
            .send()
            .await
            .map_err(|e| classify(IAM, "AttachGroupPolicy", e))?;
        request_id = output_request_id(&out);
        attached_now = true;
        if !created {
            differences.push(json!({
                "setting": "attached_policy",
                "found": null,
                "expected": policy_arn,
                "action": "repaired",
            }));
        }
    }

    let outcome = match (created, attached_now) {
        (true, _) => Outcome::Created,
        (false, true) => Outcome::Updated,
        (false, false) => Outcome::AlreadyPresent,
    };
    let mut report = StepReport::new(
        outcome,
        json!({
            "group_name": group,
            "policy_arn": policy_arn,
            "differences": differences,
        }),
    );
    report.upstream_request_id = request_id;
    Ok(report)
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
