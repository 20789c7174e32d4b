//! Issue "Behave on real AWS, Kubernetes and Postgres": one test per defect, named after it,
//! each of which failed on the tree before its fix. AWS is moto, behind the AWS realism proxy
//! where AWS's own behaviour has to be reproduced (a lost create response, a read lagging
//! behind a create, an error moto never answers); Kubernetes is the real kube-apiserver, the
//! service running as the ServiceAccount and Role of `deploy/base/rbac.yaml`; the service runs with
//! real workers behind its HTTP API.

use std::time::Duration;

use aws_sdk_iam::config::retry::RetryConfig;
use backup_provisioner::cloud::aws::AwsClients;
use backup_provisioner::cloud::{CloudError, Outcome};
use backup_provisioner::provision::{bucket, group, policy, user};
use serde_json::{Value, json};

use crate::http_common::{REPOSITORIES, assert_problem, field_errors};
use crate::support::app::{eventually, spawn_app};
use crate::support::aws_realism::{AwsRealism, Canned, Fault};
use crate::support::env::{Env, REGION, bucket_for, unique_name};
use crate::support::moto::Moto;

const NAMESPACE: &str = "zitadel";
const REPOSITORY: &str = "zitadel";

/// IAM and S3 clients whose SDK retries 3 times with a 10 ms backoff (instead of about 1 s),
/// so a lost response is retried quickly.
fn quick_retries(aws: &AwsClients, region: &str) -> (aws_sdk_iam::Client, aws_sdk_s3::Client) {
    let retry = RetryConfig::standard()
        .with_max_attempts(3)
        .with_initial_backoff(Duration::from_millis(10));
    let iam = aws.iam.config().to_builder().retry_config(retry.clone());
    let s3 = aws
        .s3_for_region(region)
        .config()
        .to_builder()
        .retry_config(retry);
    (
        aws_sdk_iam::Client::from_conf(iam.build()),
        aws_sdk_s3::Client::from_conf(s3.build()),
    )
}

/// Asserts the job failed permanently (one attempt) and returns its `last_error`.
fn permanent_failure(job: &Value) -> String {
    assert_eq!(job["state"], "failed", "job: {job:#}");
    assert_eq!(
        job["attempts"], 1,
        "a permanent failure is not retried: {job:#}"
    );
    job["last_error"]
        .as_str()
        .unwrap_or_else(|| panic!("no last_error: {job:#}"))
        .to_owned()
}

/// Asserts moto holds none of the repository's AWS resources.
async fn assert_no_aws_resources(env: &Env, bucket: &str) {
    let head = env.admin.s3.head_bucket().bucket(bucket).send().await;
    assert!(head.is_err(), "the bucket {bucket} must not exist");
    assert_no_iam_entities(&env.admin, bucket).await;
}

/// Asserts moto holds no policy, group or user named `name`.
async fn assert_no_iam_entities(admin: &AwsClients, name: &str) {
    let policy = policy::find(&admin.iam, name).await.expect("list policies");
    assert!(policy.is_none(), "the policy {name} must not exist");
    let group = admin.iam.get_group().group_name(name).send().await;
    assert!(group.is_err(), "the group {name} must not exist");
    let user = admin.iam.get_user().user_name(name).send().await;
    assert!(user.is_err(), "the user {name} must not exist");
}

/// Asserts the policy, group and user `name` are in the runbook's state.
async fn assert_iam_chain(admin: &AwsClients, name: &str, policy_arn: &str) {
    let found = policy::find(&admin.iam, name).await.expect("list policies");
    assert_eq!(
        found.and_then(|p| p.arn().map(str::to_owned)).as_deref(),
        Some(policy_arn)
    );
    let attached = group::attached_policies(&admin.iam, name)
        .await
        .expect("attached policies");
    assert_eq!(attached, vec![policy_arn.to_owned()]);
    let groups = user::groups_for_user(&admin.iam, name)
        .await
        .expect("groups for user");
    assert_eq!(groups, vec![name.to_owned()]);
    let tags = user::list_tags(&admin.iam, name).await.expect("user tags");
    assert!(
        tags.contains(&(
            "backup-provisioner/repository".to_owned(),
            REPOSITORY.to_owned()
        )),
        "{tags:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Defect 1: EntityAlreadyExists from CreatePolicy/CreateGroup/CreateUser is not a failure;
// the step goes on down the existing-entity path. BucketAlreadyOwnedByYou likewise.
// ---------------------------------------------------------------------------------------------

/// A resent request: moto made the entity, its answer was lost, the SDK's retry meets
/// `EntityAlreadyExists`. Each step must read the entity and go on as for an existing one.
#[tokio::test]
async fn entity_already_exists_after_a_lost_create_response_goes_down_the_existing_path() {
    let proxy = AwsRealism::off().start(Moto::shared());
    let (iam, _) = quick_retries(&proxy.clients(REGION, None).await, REGION);
    let admin = Moto::shared().clients(REGION, None).await;
    let name = bucket_for(&unique_name("eae-lost"));
    for operation in ["CreatePolicy", "CreateGroup", "CreateUser"] {
        proxy.inject_next(operation, Fault::LoseResponse);
    }

    let (report, arn) = policy::ensure(&iam, &name)
        .await
        .unwrap_or_else(|e| panic!("policy: {e}\n{}", proxy.summary()));
    assert_eq!(
        report.outcome,
        Outcome::AlreadyPresent,
        "{:#}",
        report.detail
    );
    group::ensure(&iam, &name, &arn)
        .await
        .unwrap_or_else(|e| panic!("group: {e}\n{}", proxy.summary()));
    user::ensure(&iam, &name, REPOSITORY)
        .await
        .unwrap_or_else(|e| panic!("user: {e}\n{}", proxy.summary()));

    for operation in ["CreatePolicy", "CreateGroup", "CreateUser"] {
        let lost = proxy
            .injected()
            .get(&format!("lost-response iam:{operation}"))
            .copied();
        assert_eq!(lost, Some(1), "{}", proxy.summary());
        assert_eq!(proxy.count(operation), 2, "{}", proxy.summary());
    }
    assert_iam_chain(&admin, &name, &arn).await;
}

/// A read lagging behind a create (IAM's eventual consistency, or an earlier attempt that
/// made the entity and crashed before recording it): the read says absent, the create says
/// it exists. The step must not fail permanently; it is retried and converges once the
/// entity is visible.
#[tokio::test]
async fn entity_already_exists_while_the_read_lags_is_retried_then_converges() {
    const WINDOW: Duration = Duration::from_secs(5);
    let proxy = AwsRealism::off()
        .consistency_window(WINDOW)
        .start(Moto::shared());
    let aws = proxy.clients(REGION, None).await;
    let admin = Moto::shared().clients(REGION, None).await;
    let name = bucket_for(&unique_name("eae-lag"));
    // What an earlier attempt made before it crashed: invisible to reads for WINDOW.
    let made = aws
        .iam
        .create_policy()
        .policy_name(&name)
        .description(policy::DESCRIPTION)
        .policy_document(policy::document(&name).to_string())
        .send()
        .await
        .expect("create policy");
    let arn = made.policy().and_then(|p| p.arn()).expect("arn").to_owned();
    aws.iam
        .create_group()
        .group_name(&name)
        .send()
        .await
        .expect("group");
    aws.iam
        .create_user()
        .user_name(&name)
        .send()
        .await
        .expect("user");

    let policy = policy::ensure(&aws.iam, &name).await.map(drop);
    let group = group::ensure(&aws.iam, &name, &arn).await.map(drop);
    let user = user::ensure(&aws.iam, &name, REPOSITORY).await.map(drop);
    let still_hidden = proxy.is_hidden("user", &name);
    for (what, result) in [("policy", policy), ("group", group), ("user", user)] {
        match result {
            Err(CloudError::Permanent { .. }) | Ok(()) if still_hidden => panic!(
                "{what}: expected a retryable error while the entity is invisible, got \
                 {result:?}\n{}",
                proxy.summary()
            ),
            Err(e) if !e.is_retryable() => panic!("{what}: permanent: {e}"),
            _ => {}
        }
    }
    assert!(proxy.count("CreatePolicy") >= 2, "{}", proxy.summary());

    eventually(
        Duration::from_secs(30),
        "the steps converge once visible",
        || {
            let (iam, name, arn) = (aws.iam.clone(), name.clone(), arn.clone());
            async move {
                policy::ensure(&iam, &name).await.ok()?;
                group::ensure(&iam, &name, &arn).await.ok()?;
                user::ensure(&iam, &name, REPOSITORY).await.ok()
            }
        },
    )
    .await;
    assert_iam_chain(&admin, &name, &arn).await;
}

/// The bucket's counterpart: the SDK's retry of a CreateBucket whose answer was lost meets
/// `BucketAlreadyOwnedByYou` (outside us-east-1), which goes down the existing-bucket path.
#[tokio::test]
async fn bucket_already_owned_by_you_goes_down_the_existing_bucket_path() {
    const EU: &str = "eu-west-1";
    let proxy = AwsRealism::off().start(Moto::shared());
    let (_, s3) = quick_retries(&proxy.clients(EU, None).await, EU);
    let name = bucket_for(&unique_name("baoby"));
    proxy.inject_next("CreateBucket", Fault::LoseResponse);

    let report = bucket::ensure(&s3, &name, EU, REPOSITORY)
        .await
        .unwrap_or_else(|e| panic!("bucket: {e}\n{}", proxy.summary()));
    assert_eq!(proxy.count("s3:CreateBucket"), 2, "{}", proxy.summary());
    let again = bucket::ensure(&s3, &name, EU, REPOSITORY)
        .await
        .expect("re-run");
    assert_eq!(again.outcome, Outcome::AlreadyPresent, "{:#}", again.detail);
    assert_ne!(report.outcome, Outcome::Failed);
}

// ---------------------------------------------------------------------------------------------
// Defect 7: regions of other partitions are rejected at request validation.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn regions_of_other_partitions_are_rejected_with_422_naming_the_partition() {
    let app = spawn_app().await;
    let token = app.operator();
    let cases = [
        ("cn-north-1", "aws-cn"),
        ("cn-northwest-1", "aws-cn"),
        ("us-gov-west-1", "aws-us-gov"),
        ("us-iso-east-1", "aws-iso"),
        ("us-isob-east-1", "aws-iso-b"),
        ("eu-isoe-west-1", "aws-iso-e"),
        ("us-isof-south-1", "aws-iso-f"),
    ];
    for (region, partition) in cases {
        let body = json!({"name": "zitadel", "namespace": NAMESPACE, "region": region});
        let response = app.post_json(REPOSITORIES, &token, &body).await;
        let problem = assert_problem(response, 422).await;
        let errors = field_errors(&problem);
        assert_eq!(errors.len(), 1, "{region}: {problem}");
        let (field, message) = &errors[0];
        assert_eq!(field, "region", "{problem}");
        assert!(
            message.contains(region)
                && message.contains(&format!("partition {partition}"))
                && message.contains("only the aws partition is supported"),
            "{region}: {message}"
        );
    }
    // The commercial partition is still accepted.
    let body = json!({"name": "zitadel", "namespace": NAMESPACE, "region": "eu-central-2"});
    let response = app.post_json(REPOSITORIES, &token, &body).await;
    assert_eq!(response.status(), 202);
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Defect 8: the namespace and the permission to write the Secret are checked before the first
// AWS change.
// ---------------------------------------------------------------------------------------------

/// On the real kube-apiserver the service, whose Role is bound per namespace, cannot tell a
/// missing namespace from one it was not granted: both answer 403 for that namespace, and the
/// message names the Role and RoleBinding it needs there (which needs the namespace). An
/// identity with cluster-wide rights is told the namespace does not exist
/// (`kube_secret::missing_namespace_is_permanent`).
#[tokio::test]
async fn a_missing_namespace_fails_before_any_aws_change() {
    let env = Env::start(&[NAMESPACE]).await;
    let name = unique_name("nons");
    let bucket = bucket_for(&name);
    let missing = format!("gone-{name}");

    let job = env
        .provision(json!({"name": name, "namespace": missing}))
        .await;
    let error = permanent_failure(&job);
    assert!(
        error.contains("permission denied")
            && error.contains(&format!(
                "in namespace \"{missing}\" (a Role and RoleBinding there)"
            )),
        "{error}"
    );
    assert_eq!(
        env.counter.mutating_count(),
        0,
        "no AWS change before the namespace is known: {:?}",
        env.counter.mutating()
    );
    assert_no_aws_resources(&env, &bucket).await;
    assert_eq!(env.kube.mutating_count(), 0, "a dry run writes nothing");
    env.app.stop().await;
}

#[tokio::test]
async fn a_missing_permission_to_write_the_secret_fails_before_any_aws_change() {
    let read_only = serde_json::from_value(
        json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]),
    )
    .expect("rules");
    let env = Env::builder(&[NAMESPACE])
        .service_rules(NAMESPACE, read_only)
        .start()
        .await;
    let user = env.kube.service_user.clone();
    let name = unique_name("noperm");
    let bucket = bucket_for(&name);

    let job = env
        .provision(json!({"name": name, "namespace": env.ns(NAMESPACE)}))
        .await;
    let error = permanent_failure(&job);
    assert!(
        error.contains("permission denied") && error.contains(&user) && error.contains("\"patch\""),
        "{error}"
    );
    assert_eq!(
        env.counter.mutating_count(),
        0,
        "{:?}",
        env.counter.mutating()
    );
    assert_no_aws_resources(&env, &bucket).await;
    env.app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Defect 9: an existing bucket with object lock enabled is a permanent error.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_existing_bucket_with_object_lock_fails_permanently_before_any_iam_change() {
    let env = Env::start(&[NAMESPACE]).await;
    let name = unique_name("lock");
    let bucket = bucket_for(&name);
    env.admin
        .s3_for_region(REGION)
        .create_bucket()
        .bucket(&bucket)
        .object_lock_enabled_for_bucket(true)
        .send()
        .await
        .expect("a bucket with object lock");

    let job = env
        .provision(json!({"name": name, "namespace": env.ns(NAMESPACE)}))
        .await;
    let error = permanent_failure(&job);
    assert!(
        error.contains(&bucket) && error.contains("Object Lock") && error.contains("expire"),
        "{error}"
    );
    assert_eq!(
        env.counter.mutating_count(),
        0,
        "neither the bucket nor IAM is changed: {:?}",
        env.counter.mutating()
    );
    assert_no_iam_entities(&env.admin, &bucket).await;
    assert!(env.secret(NAMESPACE, &bucket).await.is_none());
    env.app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Defect 10: LimitExceeded from CreateAccessKey right after the step deleted keys is retried.
// ---------------------------------------------------------------------------------------------

/// The user holds IAM's two keys, neither usable: the step deletes them, then IAM (still
/// counting them) answers LimitExceeded. moto never does, so the proxy answers it for every
/// CreateAccessKey of this user. Every attempt is retried: the first deleted keys, and the later
/// ones listed at most one key, so IAM's count includes keys it does not list yet (a lost
/// CreateAccessKey answer, eventual consistency). The attempt budget, not the first answer,
/// ends the job, and only the first attempt had keys to delete.
#[tokio::test]
async fn limit_exceeded_right_after_deleting_keys_is_retried() {
    let env = Env::builder(&[NAMESPACE])
        .aws_realism(AwsRealism::off())
        .start()
        .await;
    let proxy = env.realism.as_ref().expect("proxy");
    let name = unique_name("limit");
    let bucket = bucket_for(&name);
    // Ours (tagged as the service tags its users), left with two orphan keys by earlier attempts.
    let ours = aws_sdk_iam::types::Tag::builder()
        .key(bucket::MANAGED_BY_KEY)
        .value(bucket::MANAGED_BY_VALUE)
        .build()
        .expect("tag");
    env.admin
        .iam
        .create_user()
        .user_name(&bucket)
        .tags(ours)
        .send()
        .await
        .expect("user");
    for _ in 0..2 {
        env.admin
            .iam
            .create_access_key()
            .user_name(&bucket)
            .send()
            .await
            .expect("an orphan key");
    }
    let quota = Canned::new(
        409,
        "LimitExceeded",
        "Cannot exceed quota for AccessKeysPerUser: 2",
    );
    proxy.answer("iam:CreateAccessKey", Some(&bucket), quota);

    let job = env
        .provision(json!({"name": name, "namespace": env.ns(NAMESPACE)}))
        .await;
    let summary = format!("job: {job:#}\nproxy: {}", proxy.summary());
    assert_eq!(job["state"], "failed", "{summary}");
    assert_eq!(
        job["attempts"], job["max_attempts"],
        "LimitExceeded with at most one key listed is retried until the budget ends: {summary}"
    );
    assert!(
        job["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("LimitExceeded"),
        "{summary}"
    );
    assert_eq!(proxy.count("DeleteAccessKey"), 2, "{summary}");
    let attempts = job["attempts"].as_u64().unwrap_or_default();
    assert_eq!(proxy.count("CreateAccessKey"), attempts, "{summary}");
    env.app.stop().await;
}
