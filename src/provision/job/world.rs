//! What a provisioning attempt reads before it changes anything, in one concurrent wave: the
//! bucket and its settings, the policy (then its description and document), the group, the
//! user, its access keys, and the key the Secret holds checked read-only. Each step starts from
//! its part instead of reading again, so a re-run of a ready repository is this wave and
//! nothing after it (the policy's second read excepted), and a first run's reads cost one
//! round trip (the bucket, group and user a repository never recorded are read existence
//! first: two or three when one exists after all). The wave is bounded by construction: a
//! fixed set of at most 14 reads per job (plus pagination), under the process-wide AWS rate
//! limit (`cloud::rate_limit`).

use std::time::Duration;

use secrecy::ExposeSecret;

use crate::cloud::aws::AwsClients;
use crate::cloud::{CloudError, StepReport};
use crate::provision::access_key::{self, KeyInfo};
use crate::provision::secret::S3Conf;
use crate::provision::{bucket, credential_check, group, policy, user};

/// One attempt's observation.
pub struct World {
    pub bucket: bucket::Observed,
    pub policy: policy::Observed,
    pub group: group::Observed,
    pub user: user::Observed,
    /// The user's access keys; `None` when they could not be listed (no user yet, or a read
    /// that failed): the access key step lists them itself.
    pub keys: Option<Vec<KeyInfo>>,
    /// The key the Secret holds, checked read-only with one ListObjectsV2 (`None`: no Secret,
    /// or the check did not pass at once; the credential check step retries it then).
    pub key_check: Option<(String, StepReport)>,
}

/// Where the wave reads.
pub struct Target<'a> {
    pub aws: &'a AwsClients,
    pub s3: &'a aws_sdk_s3::Client,
    pub bucket: &'a str,
    pub region: &'a str,
    /// The repository recorded the bucket: it exists, read all its settings at once.
    pub bucket_known: bool,
    /// The repository recorded its IAM group and user: read all of theirs at once.
    pub iam_known: bool,
    /// The policy's ARN as the repository recorded it: read it there, without a listing.
    pub policy_arn: Option<&'a str>,
    /// The existing Secret's `s3.conf`.
    pub conf: Option<&'a S3Conf>,
}

/// Reads everything at once. A failed read fails the wave (the attempt retries), except the
/// access key listing and the key check, which the steps redo.
pub async fn observe(target: Target<'_>) -> Result<World, CloudError> {
    let Target {
        aws, s3, bucket, ..
    } = target;
    let iam = &aws.iam;
    // Boxed: together they are too large for a worker thread's stack in a debug build.
    let (bucket_seen, policy, group, (user, keys), key_check) = tokio::join!(
        Box::pin(bucket::observe(
            s3,
            bucket,
            target.region,
            target.bucket_known
        )),
        Box::pin(policy::observe_at(iam, bucket, target.policy_arn)),
        Box::pin(group::observe_expecting(iam, bucket, target.iam_known)),
        Box::pin(user_and_keys(iam, bucket, target.iam_known)),
        Box::pin(check_key(aws, bucket, target.region, target.conf)),
    );
    // The user first: the hand-made-set check reads it, and it comes first among the preflights;
    // then in the order the failures were reported before the group's members were read here.
    let (user, bucket_seen, policy, group) = (user?, bucket_seen?, policy?, group?);
    // The group is the bucket's name, as is the user.
    let user = user.in_group(bucket, group.has_member(bucket));
    Ok(World {
        bucket: bucket_seen,
        policy,
        group,
        user,
        keys: keys.ok(),
        key_check,
    })
}

/// The user and its access keys, at once when the repository recorded the user; else GetUser
/// alone first (a missing user: one read), the rest once it is found.
async fn user_and_keys(
    iam: &aws_sdk_iam::Client,
    user: &str,
    known: bool,
) -> (
    Result<user::Observed, CloudError>,
    Result<Vec<KeyInfo>, CloudError>,
) {
    if known {
        return tokio::join!(
            Box::pin(user::observe_without_groups(iam, user)),
            Box::pin(access_key::list(iam, user))
        );
    }
    let observed = user::observe_unexpected(iam, user).await;
    let exists = observed.as_ref().is_ok_and(|o| o.tags().is_some());
    let keys = match exists {
        true => access_key::list(iam, user).await,
        // No user, no keys: the access key step lists them itself once the user exists.
        false => Err(CloudError::retryable(
            "iam",
            "ListAccessKeys",
            "no user to list the keys of yet",
        )),
    };
    (observed, keys)
}

/// The Secret's key lists the bucket (read-only), once.
async fn check_key(
    aws: &AwsClients,
    bucket: &str,
    region: &str,
    conf: Option<&S3Conf>,
) -> Option<(String, StepReport)> {
    let conf = conf?;
    let secret = conf.secret_access_key.expose_secret();
    let client = aws.s3_with_static_credentials(region, &conf.access_key_id, secret);
    let once = Duration::ZERO;
    let report = credential_check::verify_read_only(&client, bucket, once, once).await;
    Some((conf.access_key_id.clone(), report.ok()?))
}
