//! Runbook step "Create the IAM User": a user named after the bucket, tagged as ours, member of
//! the bucket's group, without console access (no login profile).

use aws_sdk_iam::Client;
use aws_sdk_iam::error::ProvideErrorMetadata;
use aws_sdk_iam::types::Tag;
use serde_json::{Value, json};

use crate::cloud::aws::{classify, output_request_id};
use crate::cloud::{CloudError, Outcome, StepReport};
use crate::provision::bucket::{MANAGED_BY_KEY, MANAGED_BY_VALUE, REPOSITORY_TAG_KEY};

const IAM: &str = "iam";

/// Ensures user `bucket` exists with our tags, is in group `bucket`, and has no console
/// password. Group membership requires the group step to have run.
pub async fn ensure(
    iam: &Client,
    bucket: &str,
    repository: &str,
) -> Result<StepReport, CloudError> {
    let user = bucket;
    let group = bucket;
    let wanted_tags = [
        (MANAGED_BY_KEY, MANAGED_BY_VALUE),
        (REPOSITORY_TAG_KEY, repository),
    ];
    let mut differences: Vec<Value> = Vec::new();
    let mut request_id = None;
    let mut changed = false;

    let created = match iam.get_user().user_name(user).send().await {
        Ok(_) => false,
        Err(err) if err.code() == Some("NoSuchEntity") => {
            let out = iam
                .create_user()
                .user_name(user)
                .path("/")
                .set_tags(Some(tags(&wanted_tags)?))
                .send()
                .await
                .map_err(|e| classify(IAM, "CreateUser", e))?;
            request_id = output_request_id(&out);
            true
        }
        Err(err) => return Err(classify(IAM, "GetUser", err)),
    };

    if !created {
        // Tags.
        let current = list_tags(iam, user).await?;
        let missing: Vec<(&str, &str)> = wanted_tags
            .iter()
            .filter(|(k, v)| !current.iter().any(|(ck, cv)| ck == k && cv == v))
            .copied()
            .collect();
        if !missing.is_empty() {
            let found: serde_json::Map<String, Value> = missing
                .iter()
                .map(|(k, _)| {
                    let value = current
                        .iter()
                        .find(|(ck, _)| ck == k)
                        .map(|(_, v)| v.clone());
                    ((*k).to_owned(), json!(value))
                })
                .collect();
            let expected: serde_json::Map<String, Value> = missing
                .iter()
                .map(|(k, v)| ((*k).to_owned(), json!(v)))
                .collect();
            let out = iam
                .tag_user()
                .user_name(user)
                .set_tags(Some(tags(&missing)?))
                .send()
                .await
                .map_err(|e| classify(IAM, "TagUser", e))?;
            request_id = output_request_id(&out);
            changed = true;
            differences.push(json!({
                "setting": "tags",
                "found": found,
                "expected": expected,
                "action": "repaired",
            }));
        }
    }

    // Group membership (a new user is in no group).
    let member = !created && groups_for_user(iam, user).await?.iter().any(|g| g == group);
    if !member {
        let out = iam
            .add_user_to_group()
            .group_name(group)
            .user_name(user)
            .send()
            .await
            .map_err(|e| classify(IAM, "AddUserToGroup", e))?;
        request_id = output_request_id(&out);
        if !created {
            changed = true;
            differences.push(json!({
                "setting": "group_membership",
                "found": null,
                "expected": group,
                "action": "repaired",
            }));
        }
    }

    // No console access (a new user has no login profile).
    if !created {
        match iam.get_login_profile().user_name(user).send().await {
            Ok(_) => {
                match iam.delete_login_profile().user_name(user).send().await {
                    Ok(out) => request_id = output_request_id(&out),
                    Err(err) if err.code() == Some("NoSuchEntity") => {}
                    Err(err) => return Err(classify(IAM, "DeleteLoginProfile", err)),
                }
                changed = true;
                differences.push(json!({
                    "setting": "login_profile",
                    "found": "present",
                    "expected": "absent",
                    "action": "repaired",
                }));
            }
            Err(err) if err.code() == Some("NoSuchEntity") => {}
            Err(err) => return Err(classify(IAM, "GetLoginProfile", err)),
        }
    }

    let outcome = if created {
        Outcome::Created
    } else if changed {
        Outcome::Updated
    } else {
        Outcome::AlreadyPresent
    };
    let mut report = StepReport::new(
        outcome,
        json!({
            "user_name": user,
            "group_name": group,
            "repository": repository,
            "differences": differences,
        }),
    );
    report.upstream_request_id = request_id;
    Ok(report)
}

/// The user's tags as (key, value) pairs (paginated).
pub async fn list_tags(iam: &Client, user: &str) -> Result<Vec<(String, String)>, CloudError> {
    let mut all = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let out = iam
            .list_user_tags()
            .user_name(user)
            .set_marker(marker.take())
            .send()
            .await
            .map_err(|e| classify(IAM, "ListUserTags", e))?;
        all.extend(
            out.tags()
                .iter()
                .map(|t| (t.key().to_owned(), t.value().to_owned())),
        );
        match out.marker() {
            Some(next) if out.is_truncated() => marker = Some(next.to_owned()),
            _ => return Ok(all),
        }
    }
}

/// Names of the groups the user belongs to (paginated).
pub async fn groups_for_user(iam: &Client, user: &str) -> Result<Vec<String>, CloudError> {
    let mut all = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let out = iam
            .list_groups_for_user()
            .user_name(user)
            .set_marker(marker.take())
            .send()
            .await
            .map_err(|e| classify(IAM, "ListGroupsForUser", e))?;
        all.extend(out.groups().iter().map(|g| g.group_name().to_owned()));
        match out.marker() {
            Some(next) if out.is_truncated() => marker = Some(next.to_owned()),
            _ => return Ok(all),
        }
    }
}

pub(crate) fn tags(pairs: &[(&str, &str)]) -> Result<Vec<Tag>, CloudError> {
    pairs
        .iter()
        .map(|(k, v)| {
            Tag::builder()
                .key(*k)
                .value(*v)
                .build()
                .map_err(|e| CloudError::permanent(IAM, "TagUser", format!("invalid tag: {e}")))
        })
        .collect()
}
