//! The bucket step: runbook settings, drift repair, and what is reported but not changed.

use aws_sdk_s3::error::{ErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    BucketLocationConstraint, BucketVersioningStatus, CreateBucketConfiguration,
    PublicAccessBlockConfiguration, Tag, Tagging, VersioningConfiguration,
};
use backup_provisioner::cloud::Outcome;
use backup_provisioner::cloud::aws;
use backup_provisioner::provision::bucket;
use serde_json::json;

use super::{EU, Env, US, differences, expect_permanent, response, unique};

/// Reads every runbook setting of a bucket back and asserts it.
async fn assert_runbook_bucket(
    s3: &aws_sdk_s3::Client,
    name: &str,
    region: &str,
    repository: &str,
) {
    s3.head_bucket()
        .bucket(name)
        .send()
        .await
        .expect("bucket exists");
    let location = s3.get_bucket_location().bucket(name).send().await.unwrap();
    assert_eq!(
        bucket::location_to_region(location.location_constraint().map(|l| l.as_str())),
        region
    );

    let ownership = s3
        .get_bucket_ownership_controls()
        .bucket(name)
        .send()
        .await
        .unwrap();
    let rules = ownership.ownership_controls().unwrap().rules();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].object_ownership().as_str(), "BucketOwnerEnforced");

    let pab = s3
        .get_public_access_block()
        .bucket(name)
        .send()
        .await
        .unwrap();
    let pab = pab.public_access_block_configuration().unwrap();
    assert_eq!(pab.block_public_acls(), Some(true));
    assert_eq!(pab.ignore_public_acls(), Some(true));
    assert_eq!(pab.block_public_policy(), Some(true));
    assert_eq!(pab.restrict_public_buckets(), Some(true));

    let enc = s3
        .get_bucket_encryption()
        .bucket(name)
        .send()
        .await
        .unwrap();
    let rules = enc.server_side_encryption_configuration().unwrap().rules();
    assert_eq!(rules.len(), 1);
    let default = rules[0].apply_server_side_encryption_by_default().unwrap();
    assert_eq!(default.sse_algorithm().as_str(), "AES256");
    assert_eq!(default.kms_master_key_id(), None);
    assert_eq!(rules[0].bucket_key_enabled(), Some(true));

    let versioning = bucket::versioning_status(s3, name).await.unwrap();
    assert_eq!(versioning, None, "versioning must stay disabled");

    let lock = s3.get_object_lock_configuration().bucket(name).send().await;
    match lock {
        Err(err) => assert_eq!(
            aws::error_code(&err),
            Some("ObjectLockConfigurationNotFoundError")
        ),
        Ok(out) => assert!(
            out.object_lock_configuration()
                .and_then(|c| c.object_lock_enabled())
                .is_none()
        ),
    }

    let tags = s3.get_bucket_tagging().bucket(name).send().await.unwrap();
    let mut tags: Vec<(String, String)> = tags
        .tag_set()
        .iter()
        .map(|t| (t.key().to_owned(), t.value().to_owned()))
        .collect();
    tags.sort();
    assert_eq!(
        tags,
        vec![
            (
                "backup-provisioner/repository".to_owned(),
                repository.to_owned()
            ),
            ("managed-by".to_owned(), "backup-provisioner".to_owned()),
        ]
    );
}

#[tokio::test]
async fn bucket_is_created_with_runbook_settings_and_rerun_is_read_only() {
    let env = Env::new(EU).await;
    let name = unique("bucket");
    let s3 = env.s3(EU);

    let first = bucket::ensure(&s3, &name, EU, "zitadel").await.unwrap();
    assert_eq!(first.outcome, Outcome::Created);
    assert_eq!(first.detail["bucket"], json!(name));
    assert_eq!(first.detail["arn"], json!(format!("arn:aws:s3:::{name}")));
    assert!(first.upstream_request_id.is_some());
    assert!(env.counter.snapshot().contains_key("s3:CreateBucket"));
    assert_runbook_bucket(&s3, &name, EU, "zitadel").await;

    env.counter.reset();
    let second = bucket::ensure(&s3, &name, EU, "zitadel").await.unwrap();
    assert_eq!(second.outcome, Outcome::AlreadyPresent, "{}", second.detail);
    assert!(differences(&second.detail).is_empty(), "{}", second.detail);
    env.assert_no_mutations("second bucket run");
    assert!(env.counter.read_count() >= 7, "{:?}", env.counter.reads());
}

#[tokio::test]
async fn bucket_in_us_east_1_has_no_location_constraint() {
    let env = Env::new(US).await;
    let name = unique("use1");
    let s3 = env.s3(US);
    let first = bucket::ensure(&s3, &name, US, "server").await.unwrap();
    assert_eq!(first.outcome, Outcome::Created);
    let location = s3.get_bucket_location().bucket(&name).send().await.unwrap();
    assert!(
        location
            .location_constraint()
            .is_none_or(|l| l.as_str().is_empty()),
        "{location:?}"
    );
    assert_runbook_bucket(&s3, &name, US, "server").await;

    env.counter.reset();
    let second = bucket::ensure(&s3, &name, US, "server").await.unwrap();
    assert_eq!(second.outcome, Outcome::AlreadyPresent);
    env.assert_no_mutations("second us-east-1 run");
}

#[tokio::test]
async fn bucket_drift_is_repaired() {
    let env = Env::new(EU).await;
    let name = unique("drift");
    let s3 = env.s3(EU);
    bucket::ensure(&s3, &name, EU, "zitadel").await.unwrap();

    // Someone unticks one public access block flag, drops encryption and rewrites the tags.
    s3.put_public_access_block()
        .bucket(&name)
        .public_access_block_configuration(
            PublicAccessBlockConfiguration::builder()
                .block_public_acls(true)
                .ignore_public_acls(true)
                .block_public_policy(false)
                .restrict_public_buckets(true)
                .build(),
        )
        .send()
        .await
        .unwrap();
    s3.delete_bucket_encryption()
        .bucket(&name)
        .send()
        .await
        .unwrap();
    s3.put_bucket_tagging()
        .bucket(&name)
        .tagging(
            Tagging::builder()
                .tag_set(
                    Tag::builder()
                        .key("team")
                        .value("platform")
                        .build()
                        .unwrap(),
                )
                .tag_set(
                    Tag::builder()
                        .key("backup-provisioner/repository")
                        .value("other")
                        .build()
                        .unwrap(),
                )
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();

    env.counter.reset();
    let report = bucket::ensure(&s3, &name, EU, "zitadel").await.unwrap();
    assert_eq!(report.outcome, Outcome::Updated);
    assert_eq!(
        differences(&report.detail),
        vec![
            "public_access_block:repaired",
            "default_encryption:repaired",
            "tags:repaired"
        ],
        "{}",
        report.detail
    );
    let pab = &report.detail["differences"][0];
    assert_eq!(pab["found"]["block_public_policy"], json!(false));
    assert_eq!(
        report.detail["differences"][2]["found"]["backup-provisioner/repository"],
        json!("other")
    );
    assert!(report.upstream_request_id.is_some());
    assert_eq!(
        env.counter.mutating().keys().cloned().collect::<Vec<_>>(),
        vec![
            "s3:PutBucketEncryption",
            "s3:PutBucketTagging",
            "s3:PutPublicAccessBlock"
        ]
    );

    // Our settings are back; the foreign tag survives next to ours.
    let tags = s3.get_bucket_tagging().bucket(&name).send().await.unwrap();
    assert!(
        tags.tag_set()
            .iter()
            .any(|t| t.key() == "team" && t.value() == "platform")
    );
    let enc = s3
        .get_bucket_encryption()
        .bucket(&name)
        .send()
        .await
        .unwrap();
    assert_eq!(
        enc.server_side_encryption_configuration().unwrap().rules()[0].bucket_key_enabled(),
        Some(true)
    );
    let pab = s3
        .get_public_access_block()
        .bucket(&name)
        .send()
        .await
        .unwrap();
    assert_eq!(
        pab.public_access_block_configuration()
            .unwrap()
            .block_public_policy(),
        Some(true)
    );
}

#[tokio::test]
async fn bucket_with_versioning_enabled_is_reported_not_changed() {
    let env = Env::new(EU).await;
    let name = unique("versioned");
    let s3 = env.s3(EU);
    bucket::ensure(&s3, &name, EU, "zitadel").await.unwrap();
    s3.put_bucket_versioning()
        .bucket(&name)
        .versioning_configuration(
            VersioningConfiguration::builder()
                .status(BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .unwrap();

    env.counter.reset();
    let report = bucket::ensure(&s3, &name, EU, "zitadel").await.unwrap();
    assert_eq!(report.outcome, Outcome::AlreadyPresent);
    assert_eq!(
        differences(&report.detail),
        vec!["versioning:left unchanged"]
    );
    assert_eq!(report.detail["differences"][0]["found"], json!("Enabled"));
    env.assert_no_mutations("versioned bucket");
    let versioning = bucket::versioning_status(&s3, &name).await.unwrap();
    assert_eq!(versioning, Some(BucketVersioningStatus::Enabled));
}

/// Object Lock cannot be turned off, and under a default retention pgBackRest's expire cannot
/// delete: a permanent error before any setting of the bucket is changed.
#[tokio::test]
async fn bucket_with_object_lock_is_a_permanent_error() {
    let env = Env::new(EU).await;
    let name = unique("locked");
    let s3 = env.s3(EU);
    s3.create_bucket()
        .bucket(&name)
        .object_lock_enabled_for_bucket(true)
        .create_bucket_configuration(
            CreateBucketConfiguration::builder()
                .location_constraint(BucketLocationConstraint::EuWest1)
                .build(),
        )
        .send()
        .await
        .unwrap();
    env.counter.reset();
    let message = expect_permanent(bucket::ensure(&s3, &name, EU, "zitadel").await);
    assert!(
        message.contains(&name) && message.contains("Object Lock enabled"),
        "{message}"
    );
    env.assert_no_mutations("bucket with object lock");
    let message = expect_permanent(bucket::preflight(&s3, &name, EU).await);
    assert!(message.contains("Object Lock enabled"), "{message}");
}

#[tokio::test]
async fn bucket_in_another_region_is_a_permanent_error() {
    let env = Env::new(EU).await;
    let name = unique("elsewhere");
    bucket::ensure(&env.s3(EU), &name, EU, "zitadel")
        .await
        .unwrap();

    env.counter.reset();
    let message =
        expect_permanent(bucket::ensure(&env.s3("us-west-2"), &name, "us-west-2", "zitadel").await);
    assert!(
        message.contains("eu-west-1") && message.contains("us-west-2"),
        "{message}"
    );
    env.assert_no_mutations("wrong region");
}

#[tokio::test]
async fn bucket_name_errors_are_permanent() {
    let env = Env::new(EU).await;
    // Through moto: an invalid name (moto checks the length only).
    let result = bucket::ensure(&env.s3(EU), "ab", EU, "zitadel").await;
    let message = expect_permanent(result);
    assert!(
        message.contains("\"ab\" is not a valid S3 bucket name")
            && message.contains("InvalidBucketName"),
        "{message}"
    );
    env.assert_no_mutations_except(&["s3:CreateBucket"]);

    // BucketAlreadyExists (another account) cannot be produced by a single-account moto.
    let err = SdkError::service_error(
        aws_sdk_s3::operation::create_bucket::CreateBucketError::generic(
            ErrorMetadata::builder()
                .code("BucketAlreadyExists")
                .message("The requested bucket name is not available.")
                .custom("aws_request_id", "REQ-1")
                .build(),
        ),
        response(409),
    );
    let err = bucket::create_error("taken-name", EU, err);
    assert!(!err.is_retryable());
    assert_eq!(err.request_id(), Some("REQ-1"));
    assert!(
        err.to_string().contains(
            "bucket name taken-name is owned by another AWS account; choose another bucket name"
        ),
        "{err}"
    );
}

#[tokio::test]
async fn has_objects_sees_the_first_object() {
    let env = Env::new(EU).await;
    let name = unique("objects");
    let s3 = env.s3(EU);
    bucket::ensure(&s3, &name, EU, "zitadel").await.unwrap();
    assert!(!bucket::has_objects(&s3, &name).await.unwrap());
    s3.put_object()
        .bucket(&name)
        .key("archive/000000010000000000000001")
        .body(ByteStream::from_static(b"wal"))
        .send()
        .await
        .unwrap();
    assert!(bucket::has_objects(&s3, &name).await.unwrap());
}
