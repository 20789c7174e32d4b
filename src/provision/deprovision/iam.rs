//! The IAM half of deprovisioning, in the order the job runs it: deactivate the user's access
//! keys, delete them, take the user out of its group, delete the user (with whatever would block
//! `DeleteUser`), detach the group's policies and delete the group, delete the policy (its
//! non-default versions first).
//!
//! Every function reads first and, in [`Mode::Apply`], changes only what it found; in
//! [`Mode::Plan`] it makes read calls only and reports what it would do. An entity that is
//! already gone (`NoSuchEntity`, on the read or on the delete) counts as done, so a re-run after
//! a crash converges.

use std::error::Error;
use std::fmt::Debug;

use aws_sdk_iam::Client;
use aws_sdk_iam::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_iam::operation::RequestId;
use aws_sdk_iam::types::StatusType;
use serde_json::json;

use super::teardown::{Mode, Teardown};
use crate::cloud::CloudError;
use crate::cloud::aws::{classify, error_request_id, output_request_id};
use crate::provision::bucket::{MANAGED_BY_KEY, MANAGED_BY_VALUE};
use crate::provision::policy;
use crate::provision::report::Action;

const IAM: &str = "iam";
const NO_SUCH_ENTITY: &str = "NoSuchEntity";

fn is_gone<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> bool {
    err.code() == Some(NO_SUCH_ENTITY)
}

/// The result of a deleting call: its request id, or `None` when the entity was already gone.
/// `DeleteConflict` is retryable here: IAM may not show a detachment or removal made moments
/// ago yet; when something not ours keeps the entity in use, the attempts run out with this
/// message.
fn deleted<T, E, R>(
    operation: &'static str,
    sent: Result<T, SdkError<E, R>>,
) -> Result<Option<String>, CloudError>
where
    T: RequestId,
    E: ProvideErrorMetadata + Error + Send + Sync + 'static,
    R: Debug + 'static,
{
    match sent {
        Ok(out) => Ok(output_request_id(&out)),
        Err(err) if is_gone(&err) => Ok(None),
        Err(err) if err.code() == Some("DeleteConflict") => Err(CloudError::Retryable {
            service: IAM,
            operation,
            message: format!(
                "the IAM entity is still in use{}; an attachment or membership removed moments \
                 ago may not be visible yet; if this persists, detach or remove what backup-provisioner \
                 did not make",
                err.message().map(|m| format!(" ({m})")).unwrap_or_default()
            ),
            request_id: error_request_id(&err),
        }),
        Err(err) => Err(classify(IAM, operation, err)),
    }
}

/// Sends the deleting call `operation` (made by `send`) for each of `items`, in order, each
/// recorded in `report`; the first that fails stops the rest.
async fn delete_each<I, T, E, R, F, Fut>(
    items: I,
    operation: &'static str,
    report: &mut Teardown,
    mut send: F,
) -> Result<(), CloudError>
where
    I: IntoIterator,
    F: FnMut(I::Item) -> Fut,
    Fut: Future<Output = Result<T, SdkError<E, R>>>,
    T: RequestId,
    E: ProvideErrorMetadata + Error + Send + Sync + 'static,
    R: Debug + 'static,
{
    for item in items {
        report.request(deleted(operation, send(item).await)?);
    }
    Ok(())
}

/// `Delete` when something was found to delete, else `None`.
fn delete_if_any<T>(found: &[T]) -> Action {
    if found.is_empty() {
        Action::None
    } else {
        Action::Delete
    }
}

/// A read that may meet an entity that is gone: `None` then.
fn found<T, E, R>(
    operation: &'static str,
    read: Result<T, SdkError<E, R>>,
) -> Result<Option<T>, CloudError>
where
    E: ProvideErrorMetadata + Error + Send + Sync + 'static,
    R: Debug + 'static,
{
    match read {
        Ok(out) => Ok(Some(out)),
        Err(err) if is_gone(&err) => Ok(None),
        Err(err) => Err(classify(IAM, operation, err)),
    }
}

/// Whether the user is tagged `managed-by: backup-provisioner`; `None` when it does not exist.
pub async fn user_tagged_ours(iam: &Client, user: &str) -> Result<Option<bool>, CloudError> {
    let read = iam
        .list_user_tags()
        .user_name(user)
        .max_items(100)
        .send()
        .await;
    Ok(found("ListUserTags", read)?.map(|out| {
        out.tags()
            .iter()
            .any(|t| t.key() == MANAGED_BY_KEY && t.value() == MANAGED_BY_VALUE)
    }))
}

/// The user's access keys as (id, status); none when the user is gone.
async fn keys(iam: &Client, user: &str) -> Result<Vec<(String, String)>, CloudError> {
    let read = iam.list_access_keys().user_name(user).send().await;
    let Some(out) = found("ListAccessKeys", read)? else {
        return Ok(Vec::new());
    };
    Ok(out
        .access_key_metadata()
        .iter()
        .filter_map(|k| {
            let status = k
                .status()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default();
            Some((k.access_key_id()?.to_owned(), status))
        })
        .collect())
}

/// What [`deactivate_keys`] found and did: its report, and the keys it made inactive (active
/// before), which [`reactivate_keys`] makes active again when the job ends before the Secret
/// was removed.
pub struct Deactivated {
    pub report: Teardown,
    pub keys: Vec<String>,
}

/// Deactivates every access key of the user first: whatever still uses one stops at once, and
/// a key can still be reactivated if that was a mistake (deleting it cannot be undone). When a
/// deactivation fails, those this call made are made active again before the error is
/// returned: the step changed all of its keys or none, so its record names every key it
/// deactivated.
pub async fn deactivate_keys(
    iam: &Client,
    user: &str,
    mode: Mode,
) -> Result<Deactivated, CloudError> {
    let mut report = Teardown::new("iam-access-keys", user);
    let keys = keys(iam, user).await?;
    if keys.is_empty() {
        report.absent();
    }
    let mut deactivated = Vec::new();
    for (id, status) in keys {
        let setting = format!("{id}.status");
        if status != StatusType::Active.as_str() {
            report.setting(&setting, json!("Inactive"), json!(status), Action::None);
            continue;
        }
        if mode.applies() {
            match set_status(iam, user, &id, StatusType::Inactive).await {
                Ok(request_id) => report.request(request_id),
                Err(err) => {
                    // Best effort: the error that stops the step is the one to report.
                    let _ = reactivate_keys(iam, user, &deactivated).await;
                    return Err(err);
                }
            }
            deactivated.push(id.clone());
        }
        report.setting(&setting, json!("Inactive"), json!(status), Action::Update);
    }
    Ok(Deactivated {
        report,
        keys: deactivated,
    })
}

/// Makes `keys` active again (a key that is gone counts as done): the undoing of
/// [`deactivate_keys`].
pub async fn reactivate_keys(
    iam: &Client,
    user: &str,
    keys: &[String],
) -> Result<Teardown, CloudError> {
    let mut report = Teardown::new("iam-access-keys", user);
    for id in keys {
        report.request(set_status(iam, user, id, StatusType::Active).await?);
        let setting = format!("{id}.status");
        report.setting(&setting, json!("Active"), json!("Inactive"), Action::Update);
    }
    Ok(report)
}

async fn set_status(
    iam: &Client,
    user: &str,
    id: &str,
    status: StatusType,
) -> Result<Option<String>, CloudError> {
    let sent = iam
        .update_access_key()
        .user_name(user)
        .access_key_id(id)
        .status(status)
        .send()
        .await;
    deleted("UpdateAccessKey", sent)
}

/// Deletes every access key of the user.
pub async fn delete_keys(iam: &Client, user: &str, mode: Mode) -> Result<Teardown, CloudError> {
    let mut report = Teardown::new("iam-access-keys", user);
    let keys = keys(iam, user).await?;
    if keys.is_empty() {
        report.absent();
        return Ok(report);
    }
    for (id, status) in keys {
        if mode.applies() {
            let sent = iam
                .delete_access_key()
                .user_name(user)
                .access_key_id(&id)
                .send()
                .await;
            report.request(deleted("DeleteAccessKey", sent)?);
        }
        report.setting(&id, json!("absent"), json!(status), Action::Delete);
    }
    report.deleted(None);
    Ok(report)
}

/// The groups the user is in; `None` when the user is gone.
async fn groups_of(iam: &Client, user: &str) -> Result<Option<Vec<String>>, CloudError> {
    let read = iam
        .list_groups_for_user()
        .user_name(user)
        .max_items(1000)
        .send()
        .await;
    Ok(found("ListGroupsForUser", read)?.map(|out| {
        out.groups()
            .iter()
            .map(|g| g.group_name().to_owned())
            .collect()
    }))
}

/// Takes the user out of the bucket's group.
pub async fn leave_group(
    iam: &Client,
    user: &str,
    group: &str,
    mode: Mode,
) -> Result<Teardown, CloudError> {
    let mut report = Teardown::new("iam-group-membership", format!("{user} in {group}"));
    let member = groups_of(iam, user)
        .await?
        .is_some_and(|g| g.iter().any(|g| g == group));
    if !member {
        report.absent();
        return Ok(report);
    }
    if mode.applies() {
        let sent = iam
            .remove_user_from_group()
            .user_name(user)
            .group_name(group)
            .send()
            .await;
        report.deleted(deleted("RemoveUserFromGroup", sent)?);
    } else {
        report.deleted(None);
    }
    Ok(report)
}

/// Deletes the user (its tags go with it), after what would make `DeleteUser` fail: a login
/// profile, inline and attached policies, other groups, keys made since the key step.
/// `bucket_group` is left to [`leave_group`] (a plan does not list it twice).
pub async fn delete_user(
    iam: &Client,
    user: &str,
    bucket_group: &str,
    mode: Mode,
) -> Result<Teardown, CloudError> {
    let mut report = Teardown::new("iam-user", user);
    let read = iam.get_user().user_name(user).send().await;
    if found("GetUser", read)?.is_none() {
        report.absent();
        return Ok(report);
    }
    remove_login_profile(iam, user, mode, &mut report).await?;
    remove_user_policies(iam, user, mode, &mut report).await?;
    remove_from_groups(iam, user, bucket_group, mode, &mut report).await?;
    if mode.applies() {
        let keys = keys(iam, user).await?;
        delete_each(keys, "DeleteAccessKey", &mut report, |(id, _)| {
            iam.delete_access_key()
                .user_name(user)
                .access_key_id(id)
                .send()
        })
        .await?;
        let sent = iam.delete_user().user_name(user).send().await;
        report.deleted(deleted("DeleteUser", sent)?);
    } else {
        report.deleted(None);
    }
    Ok(report)
}

async fn remove_login_profile(
    iam: &Client,
    user: &str,
    mode: Mode,
    report: &mut Teardown,
) -> Result<(), CloudError> {
    let read = iam.get_login_profile().user_name(user).send().await;
    if found("GetLoginProfile", read)?.is_none() {
        return Ok(());
    }
    if mode.applies() {
        let sent = iam.delete_login_profile().user_name(user).send().await;
        report.request(deleted("DeleteLoginProfile", sent)?);
    }
    report.setting(
        "login_profile",
        json!("absent"),
        json!("present"),
        Action::Delete,
    );
    Ok(())
}

/// Inline policies are deleted, managed ones detached (they are not ours to delete).
async fn remove_user_policies(
    iam: &Client,
    user: &str,
    mode: Mode,
    report: &mut Teardown,
) -> Result<(), CloudError> {
    remove_inline_user_policies(iam, user, mode, report).await?;
    let read = iam
        .list_attached_user_policies()
        .user_name(user)
        .max_items(1000)
        .send()
        .await;
    let attached: Vec<String> = found("ListAttachedUserPolicies", read)?
        .map(|out| {
            out.attached_policies()
                .iter()
                .filter_map(|p| p.policy_arn().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if attached.is_empty() {
        return Ok(());
    }
    if mode.applies() {
        delete_each(&attached, "DetachUserPolicy", report, |arn| {
            iam.detach_user_policy()
                .user_name(user)
                .policy_arn(arn)
                .send()
        })
        .await?;
    }
    let (expected, found) = (json!([]), json!(attached));
    report.setting("attached_policies", expected, found, Action::Delete);
    Ok(())
}

async fn remove_inline_user_policies(
    iam: &Client,
    user: &str,
    mode: Mode,
    report: &mut Teardown,
) -> Result<(), CloudError> {
    let read = iam
        .list_user_policies()
        .user_name(user)
        .max_items(1000)
        .send()
        .await;
    let inline: Vec<String> = found("ListUserPolicies", read)?
        .map(|out| out.policy_names().to_vec())
        .unwrap_or_default();
    if inline.is_empty() {
        return Ok(());
    }
    if mode.applies() {
        delete_each(&inline, "DeleteUserPolicy", report, |name| {
            iam.delete_user_policy()
                .user_name(user)
                .policy_name(name)
                .send()
        })
        .await?;
    }
    report.setting("inline_policies", json!([]), json!(inline), Action::Delete);
    Ok(())
}

async fn remove_from_groups(
    iam: &Client,
    user: &str,
    bucket_group: &str,
    mode: Mode,
    report: &mut Teardown,
) -> Result<(), CloudError> {
    let groups = groups_of(iam, user).await?.unwrap_or_default();
    let others: Vec<&String> = groups.iter().filter(|g| *g != bucket_group).collect();
    if mode.applies() {
        delete_each(&groups, "RemoveUserFromGroup", report, |group| {
            iam.remove_user_from_group()
                .user_name(user)
                .group_name(group)
                .send()
        })
        .await?;
    }
    if !others.is_empty() {
        report.setting("other_groups", json!([]), json!(others), Action::Delete);
    }
    Ok(())
}

/// Detaches the group's policies, removes its remaining members and inline policies, and
/// deletes the group.
pub async fn delete_group(iam: &Client, group: &str, mode: Mode) -> Result<Teardown, CloudError> {
    let mut report = Teardown::new("iam-group", group);
    let read = iam
        .get_group()
        .group_name(group)
        .max_items(1000)
        .send()
        .await;
    let Some(out) = found("GetGroup", read)? else {
        report.absent();
        return Ok(report);
    };
    let members: Vec<String> = out
        .users()
        .iter()
        .map(|u| u.user_name().to_owned())
        .collect();
    let attached = crate::provision::group::attached_policies(iam, group).await?;
    let read = iam
        .list_group_policies()
        .group_name(group)
        .max_items(1000)
        .send()
        .await;
    let inline: Vec<String> = found("ListGroupPolicies", read)?
        .map(|out| out.policy_names().to_vec())
        .unwrap_or_default();
    if mode.applies() {
        empty_group(iam, group, &members, &attached, &inline, &mut report).await?;
        let sent = iam.delete_group().group_name(group).send().await;
        report.deleted(deleted("DeleteGroup", sent)?);
    } else {
        report.deleted(None);
    }
    for (setting, found) in [
        ("members", &members),
        ("attached_policies", &attached),
        ("inline_policies", &inline),
    ] {
        report.setting(setting, json!([]), json!(found), delete_if_any(found));
    }
    Ok(report)
}

async fn empty_group(
    iam: &Client,
    group: &str,
    members: &[String],
    attached: &[String],
    inline: &[String],
    report: &mut Teardown,
) -> Result<(), CloudError> {
    delete_each(members, "RemoveUserFromGroup", report, |user| {
        iam.remove_user_from_group()
            .user_name(user)
            .group_name(group)
            .send()
    })
    .await?;
    delete_each(attached, "DetachGroupPolicy", report, |arn| {
        iam.detach_group_policy()
            .group_name(group)
            .policy_arn(arn)
            .send()
    })
    .await?;
    delete_each(inline, "DeleteGroupPolicy", report, |name| {
        iam.delete_group_policy()
            .group_name(group)
            .policy_name(name)
            .send()
    })
    .await
}

/// Deletes the bucket's policy: its non-default versions first (IAM refuses to delete a policy
/// that has any), then the policy.
pub async fn delete_policy(iam: &Client, name: &str, mode: Mode) -> Result<Teardown, CloudError> {
    let mut report = Teardown::new("iam-policy", name);
    let Some(arn) = policy::find(iam, name)
        .await?
        .and_then(|p| p.arn().map(str::to_owned))
    else {
        report.absent();
        return Ok(report);
    };
    let read = iam.list_policy_versions().policy_arn(&arn).send().await;
    let versions: Vec<String> = found("ListPolicyVersions", read)?
        .map(|out| {
            out.versions()
                .iter()
                .filter(|v| !v.is_default_version())
                .filter_map(|v| v.version_id().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if mode.applies() {
        delete_each(&versions, "DeletePolicyVersion", &mut report, |version| {
            iam.delete_policy_version()
                .policy_arn(&arn)
                .version_id(version)
                .send()
        })
        .await?;
        let sent = iam.delete_policy().policy_arn(&arn).send().await;
        report.deleted(deleted("DeletePolicy", sent)?);
    } else {
        report.deleted(None);
    }
    let action = delete_if_any(&versions);
    report.setting("non_default_versions", json!([]), json!(versions), action);
    Ok(report)
}
