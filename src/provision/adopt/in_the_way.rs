//! Provisioning (without `adopt`) never silently takes over a set made by hand: the IAM user
//! named after the bucket is the tell. backup-provisioner creates its users with its tags in
//! the same CreateUser call, so a user without the tag `managed-by: backup-provisioner` was made
//! by someone else (the runbook tags nothing). Provisioning would otherwise tag it, give it a new
//! key and delete the hand-made key its PostgresCluster uses. [`refuse_hand_made`] stops the
//! job before any change, naming what exists (user, bucket, policy, group) and pointing at
//! `adopt`. Read calls only.

use aws_sdk_iam::error::ProvideErrorMetadata;
use sqlx::PgPool;
use uuid::Uuid;

use crate::cloud::CloudError;
use crate::cloud::aws::{AwsClients, classify};
use crate::jobs::JobError;
use crate::provision::bucket::{MANAGED_BY_KEY, MANAGED_BY_VALUE};
use crate::provision::user::list_tags;
use crate::provision::{group, policy};
use crate::repository;

/// [`refuse_hand_made`], unless repository `repository_id` already recorded the user (our
/// user step made or adopted it: a tag removed by hand since is drift the user step repairs).
pub async fn refuse_hand_made_unless_known(
    aws: &AwsClients,
    db: &PgPool,
    repository_id: Uuid,
    bucket: &str,
    region: &str,
) -> Result<(), JobError> {
    let row = repository::by_id(db, repository_id).await?;
    if row.is_some_and(|row| row.resources.0.user.is_some()) {
        return Ok(());
    }
    refuse_hand_made(aws, bucket, region).await
}

/// A permanent error when the bucket-named IAM user exists without our tag.
pub async fn refuse_hand_made(
    aws: &AwsClients,
    bucket: &str,
    region: &str,
) -> Result<(), JobError> {
    let tags = user_tags(aws, bucket).await?;
    refuse_hand_made_found(aws, bucket, region, tags.as_deref()).await
}

/// [`refuse_hand_made`] on the user's `tags` as already read (`None`: no such user).
pub async fn refuse_hand_made_found(
    aws: &AwsClients,
    bucket: &str,
    region: &str,
    tags: Option<&[(String, String)]>,
) -> Result<(), JobError> {
    let Some(tags) = tags else {
        return Ok(());
    };
    let ours = tags
        .iter()
        .any(|(k, v)| k == MANAGED_BY_KEY && v == MANAGED_BY_VALUE);
    if ours {
        return Ok(());
    }
    let found = also_found(aws, bucket, region).await?;
    Err(JobError::Permanent(format!(
        "IAM user {bucket} exists and is not managed by backup-provisioner (no tag \
         {MANAGED_BY_KEY}={MANAGED_BY_VALUE}): a set made by hand is in the way ({}), and it was left \
         untouched. Take it over with \"adopt\": true (its access key and cipher pass are kept), or \
         remove it",
        found.join(", ")
    )))
}

/// The user's tags; `None` when there is no such user.
async fn user_tags(
    aws: &AwsClients,
    user: &str,
) -> Result<Option<Vec<(String, String)>>, CloudError> {
    match aws.iam.get_user().user_name(user).send().await {
        Ok(_) => Ok(Some(list_tags(&aws.iam, user).await?)),
        Err(err) if err.code() == Some("NoSuchEntity") => Ok(None),
        Err(err) => Err(classify("iam", "GetUser", err)),
    }
}

/// The hand-made set's resources that exist, the user first.
async fn also_found(aws: &AwsClients, name: &str, region: &str) -> Result<Vec<String>, CloudError> {
    let mut found = vec![format!("IAM user {name}")];
    let s3 = aws.s3_for_region(region);
    if s3.head_bucket().bucket(name).send().await.is_ok() {
        found.push(format!("bucket {name}"));
    }
    if policy::find(&aws.iam, name).await?.is_some() {
        found.push(format!("IAM policy {name}"));
    }
    if group::attached_policies(&aws.iam, name).await.is_ok() {
        found.push(format!("IAM group {name}"));
    }
    Ok(found)
}
