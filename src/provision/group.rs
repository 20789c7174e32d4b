//! Runbook section "Create an IAM Group":
//!
//! > Create an IAM Group to attach the policy granting access to the bucket.
//! > Name: `holos-zitadel-backups` for `zitadel`
//! > Attach permission policies: `holos-zitadel-backups`
//!
//! A group named after the bucket (`ensure_observed`) with the bucket's policy attached
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
    let observed = observe(iam, bucket).await?;
    let policy_arn = async { Ok::<_, CloudError>(policy_arn.to_owned()) };
    ensure_observed(iam, bucket, mode, observed, || {}, policy_arn).await
}

/// What one wave of reads found: whether the group exists, its members and its attached
/// policies.
#[derive(Debug, Clone)]
pub struct Observed {
    exists: bool,
    members: Vec<String>,
    attached: Vec<String>,
}

impl Observed {
    /// Whether `user` is in the group, as read (the user's observation takes it from here
    /// instead of asking IAM for the user's groups).
    pub fn has_member(&self, user: &str) -> bool {
        self.members.iter().any(|member| member == user)
    }
}

/// GetGroup (with its members) and ListAttachedGroupPolicies, concurrently.
pub async fn observe(iam: &Client, group: &str) -> Result<Observed, CloudError> {
    observe_expecting(iam, group, true).await
}

/// [`observe`]; when the group is not expected to exist (a repository that never recorded
/// it), GetGroup goes alone first, so that a missing group costs one read instead of two.
pub async fn observe_expecting(
    iam: &Client,
    group: &str,
    expect_exists: bool,
) -> Result<Observed, CloudError> {
    let absent = Observed {
        exists: false,
        members: Vec::new(),
        attached: Vec::new(),
    };
    if !expect_exists {
        let Some(members) = members(iam, group).await? else {
            return Ok(absent);
        };
        let attached = attached_policies(iam, group).await?;
        return Ok(Observed {
            exists: true,
            members,
            attached,
        });
    }
    let (members, attached) = tokio::join!(
        Box::pin(members(iam, group)),
        Box::pin(attached_policies(iam, group))
    );
    let Some(members) = members? else {
        return Ok(absent);
    };
    Ok(Observed {
        exists: true,
        members,
        attached: attached?,
    })
}

/// The group's members (GetGroup, paginated); None when there is no such group.
async fn members(iam: &Client, group: &str) -> Result<Option<Vec<String>>, CloudError> {
    let mut members = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let out = match iam
            .get_group()
            .group_name(group)
            .set_marker(marker.take())
            .send()
            .await
        {
            Ok(out) => out,
            Err(err) if err.code() == Some("NoSuchEntity") => return Ok(None),
            Err(err) => return Err(classify(IAM, "GetGroup", err)),
        };
        members.extend(out.users().iter().map(|u| u.user_name().to_owned()));
        match out.marker() {
            Some(next) if out.is_truncated() => marker = Some(next.to_owned()),
            _ => return Ok(Some(members)),
        }
    }
}

/// [`ensure_with`] on what [`observe`] read. The group is made (apply mode) before the policy's
/// ARN is awaited, so both can be made at once; `on_exists` is called once the group exists
/// (what adding the user to it waits for).
pub async fn ensure_observed<E: From<CloudError>>(
    iam: &Client,
    bucket: &str,
    mode: Mode,
    observed: Observed,
    on_exists: impl FnOnce(),
    policy_arn: impl Future<Output = Result<String, E>>,
) -> Result<StepReport, E> {
    let group = bucket;
    let mut report = Report::with_mode(KIND, group, mode);
    let exists = observed.exists || (report.creates() && create(iam, group, &mut report).await?);
    if exists {
        on_exists();
    }
    let policy_arn = policy_arn.await?;
    let identifiers = json!({
        "group_name": group,
        "policy_arn": policy_arn,
    });
    if !exists {
        report.planned_new(&[("attached_policy", json!(policy_arn))]);
        return Ok(report.into_step_report(identifiers));
    }
    let attached = observed.attached;
    check_other_policies(&attached, &policy_arn, &mut report);
    ensure_attached(iam, group, &policy_arn, &attached, &mut report).await?;
    Ok(report.into_step_report(identifiers))
}

/// Creates the group. `EntityAlreadyExists` (a resent request whose first answer was lost, or
/// a read that lagged behind an earlier create) leaves the group to be checked like any
/// existing one; reading it while it is not visible yet fails retryably. Returns `true`: the
/// group exists.
async fn create(iam: &Client, group: &str, report: &mut Report) -> Result<bool, CloudError> {
    match iam.create_group().group_name(group).path("/").send().await {
        Ok(out) => report.created(output_request_id(&out)),
        Err(err) if err.code() == Some(ENTITY_ALREADY_EXISTS) => {}
        Err(err) => return Err(classify(IAM, "CreateGroup", err)),
    }
    Ok(true)
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
