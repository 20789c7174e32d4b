//! The AWS runbook steps (bucket, policy, group, user, access key, credential check) against
//! moto through the real SDK: first run creates, state read back exactly, second run makes zero
//! mutating calls, drift is repaired, and errors are classified.

use std::time::Duration;

use aws_sdk_iam::types::PolicyVersion;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ConnectorError, ErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, SdkBody};
use aws_sdk_s3::types::{
    BucketLocationConstraint, BucketVersioningStatus, CreateBucketConfiguration,
    PublicAccessBlockConfiguration, Tag, Tagging, VersioningConfiguration,
};
use backup_provisioner::cloud::aws::{self, AwsClients, CallCounter};
use backup_provisioner::cloud::{CloudError, Outcome};
use backup_provisioner::provision::{access_key, bucket, credential_check, group, policy, user};
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use crate::support::moto::Moto;

const EU: &str = "eu-west-1";
const US: &str = "us-east-1";

/// A unique, valid bucket (and IAM) name.
fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("bp-{prefix}-{}", &id[..12])
}

struct Env {
    clients: AwsClients,
    counter: CallCounter,
}

impl Env {
    async fn new(region: &str) -> Env {
        let counter = CallCounter::new();
        let clients = Moto::shared().clients(region, Some(counter.clone())).await;
        Env { clients, counter }
    }

    fn s3(&self, region: &str) -> aws_sdk_s3::Client {
        self.clients.s3_for_region(region)
    }

    fn iam(&self) -> &aws_sdk_iam::Client {
        &self.clients.iam
    }

    fn assert_no_mutations_except(&self, allowed: &[&str]) {
        let unexpected: Vec<String> = self
            .counter
            .mutating()
            .into_keys()
            .filter(|k| !allowed.contains(&k.as_str()))
            .collect();
        assert!(
            unexpected.is_empty(),
            "unexpected mutating calls {unexpected:?}"
        );
    }

    fn assert_no_mutations(&self, what: &str) {
        assert!(
            self.counter.mutating().is_empty(),
            "{what}: expected no mutating calls, got {:?}",
            self.counter.mutating()
        );
    }
}

fn differences(detail: &Value) -> Vec<String> {
    detail["differences"]
        .as_array()
        .map(|d| {
            d.iter()
                .map(|d| {
                    format!(
                        "{}:{}",
                        d["setting"].as_str().unwrap_or("?"),
                        d["action"].as_str().unwrap_or("?")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn expect_permanent(result: Result<impl std::fmt::Debug, CloudError>) -> String {
    match result {
        Err(err @ CloudError::Permanent { .. }) => err.to_string(),
        other => panic!("expected a permanent error, got {other:?}"),
    }
}

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

// ---------------------------------------------------------------------------------------------
// Bucket
// ---------------------------------------------------------------------------------------------

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

#[tokio::test]
async fn bucket_with_object_lock_is_reported_not_changed() {
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
    let report = bucket::ensure(&s3, &name, EU, "zitadel").await.unwrap();
    let found = differences(&report.detail);
    assert!(
        found.contains(&"object_lock:left unchanged".to_owned()),
        "{found:?}"
    );
    // Object lock implies versioning.
    assert!(
        found.contains(&"versioning:left unchanged".to_owned()),
        "{found:?}"
    );
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

// ---------------------------------------------------------------------------------------------
// Policy
// ---------------------------------------------------------------------------------------------

async fn default_document(iam: &aws_sdk_iam::Client, arn: &str) -> (String, Value) {
    let policy = iam.get_policy().policy_arn(arn).send().await.unwrap();
    let version_id = policy
        .policy()
        .unwrap()
        .default_version_id()
        .unwrap()
        .to_owned();
    let version = iam
        .get_policy_version()
        .policy_arn(arn)
        .version_id(&version_id)
        .send()
        .await
        .unwrap();
    let raw = version.policy_version().unwrap().document().unwrap();
    (
        version_id,
        policy::parse_document(raw).expect("document parses"),
    )
}

async fn versions(iam: &aws_sdk_iam::Client, arn: &str) -> Vec<PolicyVersion> {
    policy::list_versions(iam, arn).await.unwrap()
}

#[tokio::test]
async fn policy_is_created_exactly_and_rerun_is_read_only() {
    let env = Env::new(EU).await;
    let name = unique("policy");
    let (report, arn) = policy::ensure(env.iam(), &name).await.unwrap();
    assert_eq!(report.outcome, Outcome::Created);
    assert!(arn.ends_with(&format!(":policy/{name}")), "{arn}");
    assert_eq!(report.detail["policy_arn"], json!(arn));

    let got = env
        .iam()
        .get_policy()
        .policy_arn(&arn)
        .send()
        .await
        .unwrap();
    let got = got.policy().unwrap();
    assert_eq!(
        got.description(),
        Some(
            "Read and write access to a specific bucket for pgrest operating within a pgo PostgresCluster."
        )
    );
    assert_eq!(got.path(), Some("/"));
    assert_eq!(got.policy_name(), Some(name.as_str()));
    let (_, doc) = default_document(env.iam(), &arn).await;
    assert_eq!(
        doc,
        json!({
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": ["s3:GetBucketLocation", "s3:ListAllMyBuckets"],
                    "Resource": "arn:aws:s3:::*"
                },
                {
                    "Effect": "Allow",
                    "Action": "s3:*",
                    "Resource": [format!("arn:aws:s3:::{name}"), format!("arn:aws:s3:::{name}/*")]
                }
            ]
        })
    );

    env.counter.reset();
    let (second, arn2) = policy::ensure(env.iam(), &name).await.unwrap();
    assert_eq!(second.outcome, Outcome::AlreadyPresent, "{}", second.detail);
    assert_eq!(arn2, arn);
    env.assert_no_mutations("second policy run");
}

#[tokio::test]
async fn policy_document_drift_becomes_a_new_default_version() {
    let env = Env::new(EU).await;
    let name = unique("poldrift");
    let (_, arn) = policy::ensure(env.iam(), &name).await.unwrap();
    let tampered = json!({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::*"}]
    });
    env.iam()
        .create_policy_version()
        .policy_arn(&arn)
        .policy_document(tampered.to_string())
        .set_as_default(true)
        .send()
        .await
        .unwrap();

    let (report, _) = policy::ensure(env.iam(), &name).await.unwrap();
    assert_eq!(report.outcome, Outcome::Updated);
    assert_eq!(differences(&report.detail), vec!["document:repaired"]);
    assert_eq!(report.detail["differences"][0]["found"], tampered);
    let (version_id, doc) = default_document(env.iam(), &arn).await;
    assert_eq!(version_id, "v3");
    assert!(policy::documents_equivalent(&doc, &policy::document(&name)));
    assert_eq!(versions(env.iam(), &arn).await.len(), 3);
}

#[tokio::test]
async fn policy_with_five_versions_drops_the_oldest_non_default() {
    let env = Env::new(EU).await;
    let name = unique("polfive");
    let (_, arn) = policy::ensure(env.iam(), &name).await.unwrap();
    // v2..v5, with v5 (not the runbook document) as default.
    for n in 2..=5 {
        let doc = json!({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:GetObject",
                           "Resource": format!("arn:aws:s3:::other-{n}/*")}]
        });
        env.iam()
            .create_policy_version()
            .policy_arn(&arn)
            .policy_document(doc.to_string())
            .set_as_default(n == 5)
            .send()
            .await
            .unwrap();
    }
    assert_eq!(versions(env.iam(), &arn).await.len(), 5);

    env.counter.reset();
    let (report, _) = policy::ensure(env.iam(), &name).await.unwrap();
    assert_eq!(report.outcome, Outcome::Updated);
    assert_eq!(
        report.detail["differences"][0]["deleted_version_id"],
        json!("v1")
    );
    assert_eq!(
        env.counter.mutating().keys().cloned().collect::<Vec<_>>(),
        vec!["iam:CreatePolicyVersion", "iam:DeletePolicyVersion"]
    );
    let mut ids: Vec<String> = versions(env.iam(), &arn)
        .await
        .iter()
        .map(|v| v.version_id().unwrap().to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["v2", "v3", "v4", "v5", "v6"]);
    let (default_id, doc) = default_document(env.iam(), &arn).await;
    assert_eq!(default_id, "v6");
    assert!(policy::documents_equivalent(&doc, &policy::document(&name)));
}

#[tokio::test]
async fn policy_description_difference_is_reported_not_fatal() {
    let env = Env::new(EU).await;
    let name = unique("poldesc");
    env.iam()
        .create_policy()
        .policy_name(&name)
        .description("made by hand")
        .policy_document(policy::document(&name).to_string())
        .send()
        .await
        .unwrap();
    env.counter.reset();
    let (report, _) = policy::ensure(env.iam(), &name).await.unwrap();
    assert_eq!(report.outcome, Outcome::AlreadyPresent);
    assert_eq!(
        differences(&report.detail),
        vec!["description:left unchanged"]
    );
    assert_eq!(
        report.detail["differences"][0]["found"],
        json!("made by hand")
    );
    env.assert_no_mutations("description difference");
}

// ---------------------------------------------------------------------------------------------
// Group and user
// ---------------------------------------------------------------------------------------------

async fn assert_group_and_user(
    iam: &aws_sdk_iam::Client,
    name: &str,
    policy_arn: &str,
    repository: &str,
) {
    assert_eq!(
        group::attached_policies(iam, name).await.unwrap(),
        vec![policy_arn.to_owned()]
    );
    assert_eq!(
        user::groups_for_user(iam, name).await.unwrap(),
        vec![name.to_owned()]
    );
    let login = iam.get_login_profile().user_name(name).send().await;
    assert_eq!(
        aws::error_code(&login.expect_err("no login profile")),
        Some("NoSuchEntity")
    );
    let mut tags = user::list_tags(iam, name).await.unwrap();
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
    let got = iam.get_user().user_name(name).send().await.unwrap();
    assert_eq!(got.user().unwrap().path(), "/");
}

#[tokio::test]
async fn group_and_user_are_created_and_rerun_is_read_only() {
    let env = Env::new(EU).await;
    let name = unique("iam");
    let (_, arn) = policy::ensure(env.iam(), &name).await.unwrap();

    let g = group::ensure(env.iam(), &name, &arn).await.unwrap();
    assert_eq!(g.outcome, Outcome::Created);
    let u = user::ensure(env.iam(), &name, "zitadel").await.unwrap();
    assert_eq!(u.outcome, Outcome::Created);
    assert!(u.upstream_request_id.is_some());
    assert_group_and_user(env.iam(), &name, &arn, "zitadel").await;

    env.counter.reset();
    let g = group::ensure(env.iam(), &name, &arn).await.unwrap();
    let u = user::ensure(env.iam(), &name, "zitadel").await.unwrap();
    assert_eq!(g.outcome, Outcome::AlreadyPresent, "{}", g.detail);
    assert_eq!(u.outcome, Outcome::AlreadyPresent, "{}", u.detail);
    env.assert_no_mutations("second group/user run");
}

#[tokio::test]
async fn group_and_user_drift_is_repaired() {
    let env = Env::new(EU).await;
    let name = unique("iamdrift");
    let (_, arn) = policy::ensure(env.iam(), &name).await.unwrap();
    group::ensure(env.iam(), &name, &arn).await.unwrap();
    user::ensure(env.iam(), &name, "zitadel").await.unwrap();

    let iam = env.iam();
    iam.detach_group_policy()
        .group_name(&name)
        .policy_arn(&arn)
        .send()
        .await
        .unwrap();
    iam.remove_user_from_group()
        .group_name(&name)
        .user_name(&name)
        .send()
        .await
        .unwrap();
    iam.untag_user()
        .user_name(&name)
        .tag_keys("managed-by")
        .send()
        .await
        .unwrap();
    iam.create_login_profile()
        .user_name(&name)
        .password("Sup3r-secret-Passw0rd!")
        .send()
        .await
        .unwrap();

    let g = group::ensure(iam, &name, &arn).await.unwrap();
    assert_eq!(g.outcome, Outcome::Updated);
    assert_eq!(differences(&g.detail), vec!["attached_policy:repaired"]);
    let u = user::ensure(iam, &name, "zitadel").await.unwrap();
    assert_eq!(u.outcome, Outcome::Updated);
    assert_eq!(
        differences(&u.detail),
        vec![
            "tags:repaired",
            "group_membership:repaired",
            "login_profile:repaired"
        ]
    );
    assert!(
        !u.detail.to_string().contains("Sup3r"),
        "no secrets in the detail"
    );
    assert_group_and_user(iam, &name, &arn, "zitadel").await;
}

// ---------------------------------------------------------------------------------------------
// Access keys
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn access_key_lifecycle_and_description_tag() {
    let env = Env::new(EU).await;
    let name = unique("keys");
    let (_, arn) = policy::ensure(env.iam(), &name).await.unwrap();
    group::ensure(env.iam(), &name, &arn).await.unwrap();
    user::ensure(env.iam(), &name, "zitadel").await.unwrap();
    let iam = env.iam();

    assert!(access_key::list(iam, &name).await.unwrap().is_empty());
    let key = access_key::create(iam, &name).await.unwrap();
    assert!(!key.id.is_empty() && !key.secret.expose_secret().is_empty());
    assert!(!format!("{key:?}").contains(key.secret.expose_secret()));
    let keys = access_key::list(iam, &name).await.unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].id, key.id);
    assert!(keys[0].is_active());
    assert!(keys[0].created.is_some());

    let tagged = access_key::ensure_description_tag(iam, &name, &key.id)
        .await
        .unwrap();
    assert_eq!(tagged.outcome, Outcome::Created);
    assert_eq!(tagged.detail["truncated"], json!(false));
    let tags = user::list_tags(iam, &name).await.unwrap();
    assert!(
        tags.iter()
            .any(|(k, v)| k == &key.id && v == access_key::DESCRIPTION),
        "{tags:?}"
    );

    env.counter.reset();
    let again = access_key::ensure_description_tag(iam, &name, &key.id)
        .await
        .unwrap();
    assert_eq!(again.outcome, Outcome::AlreadyPresent);
    access_key::list(iam, &name).await.unwrap();
    env.assert_no_mutations("second key tag run");

    // Two keys is IAM's limit: the third is a permanent error that says what to do.
    let second = access_key::create(iam, &name).await.unwrap();
    let message = expect_permanent(access_key::create(iam, &name).await);
    assert!(
        message.contains("LimitExceeded") && message.contains("delete unused keys"),
        "{message}"
    );

    let deleted = access_key::delete(iam, &name, &key.id).await.unwrap();
    assert_eq!(deleted.outcome, Outcome::Deleted);
    let gone = access_key::delete(iam, &name, &key.id).await.unwrap();
    assert_eq!(gone.outcome, Outcome::AlreadyPresent);
    assert_eq!(gone.detail["already_absent"], json!(true));
    let removed = access_key::remove_description_tag(iam, &name, &key.id)
        .await
        .unwrap();
    assert_eq!(removed.outcome, Outcome::Deleted);
    let removed = access_key::remove_description_tag(iam, &name, &key.id)
        .await
        .unwrap();
    assert_eq!(removed.outcome, Outcome::AlreadyPresent);
    let ids: Vec<String> = access_key::list(iam, &name)
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(ids, vec![second.id.clone()]);
    assert!(
        !user::list_tags(iam, &name)
            .await
            .unwrap()
            .iter()
            .any(|(k, _)| k == &key.id)
    );
}

#[test]
fn access_key_description_is_the_runbook_text() {
    assert_eq!(
        access_key::DESCRIPTION,
        "Used by pgbackrest associated with the PostgresCluster resource.  Refer to the \
         PostgresCluster resource pgbackrest.cofiguration.secret.name for the stored location \
         of the access key.  Synced from the Management Cluster using an ExternalSecret."
    );
    assert!(access_key::DESCRIPTION.chars().count() <= access_key::MAX_TAG_VALUE_CHARS);
}

// ---------------------------------------------------------------------------------------------
// All steps: call counts of a first and a second run
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn all_steps_second_run_makes_no_mutating_calls() {
    let env = Env::new(EU).await;
    let name = unique("all");
    let s3 = env.s3(EU);

    async fn idempotent_steps(env: &Env, s3: &aws_sdk_s3::Client, name: &str) -> Vec<Outcome> {
        let b = bucket::ensure(s3, name, EU, "zitadel").await.unwrap();
        let (p, arn) = policy::ensure(env.iam(), name).await.unwrap();
        let g = group::ensure(env.iam(), name, &arn).await.unwrap();
        let u = user::ensure(env.iam(), name, "zitadel").await.unwrap();
        vec![b.outcome, p.outcome, g.outcome, u.outcome]
    }

    // First run: every step, a new key, its description tag and the credential check.
    let outcomes = idempotent_steps(&env, &s3, &name).await;
    assert_eq!(outcomes, vec![Outcome::Created; 4]);
    assert!(access_key::list(env.iam(), &name).await.unwrap().is_empty());
    let key = access_key::create(env.iam(), &name).await.unwrap();
    access_key::ensure_description_tag(env.iam(), &name, &key.id)
        .await
        .unwrap();
    let first = env.counter.clone().snapshot();
    let (first_mut, first_reads) = (env.counter.mutating_count(), env.counter.read_count());
    let checker = env
        .clients
        .s3_with_static_credentials(EU, &key.id, key.secret.expose_secret());
    let check = credential_check::verify(
        &checker,
        &name,
        Duration::from_secs(5),
        Duration::from_millis(20),
    )
    .await
    .unwrap();
    assert_eq!(check.outcome, Outcome::Created);
    let with_check = env.counter.snapshot();

    // Second run: same steps; the key is kept (listed) and its tag checked.
    env.counter.reset();
    let outcomes = idempotent_steps(&env, &s3, &name).await;
    assert_eq!(outcomes, vec![Outcome::AlreadyPresent; 4]);
    assert_eq!(access_key::list(env.iam(), &name).await.unwrap().len(), 1);
    let tag = access_key::ensure_description_tag(env.iam(), &name, &key.id)
        .await
        .unwrap();
    assert_eq!(tag.outcome, Outcome::AlreadyPresent);
    env.assert_no_mutations("second run of all steps");
    eprintln!(
        "first run (without credential check): {first_mut} mutating, {first_reads} reads: {first:?}\n\
         credential check adds: {:?}\n\
         second run: {} mutating, {} reads: {:?}",
        with_check
            .iter()
            .filter(|(k, v)| first.get(*k) != Some(*v))
            .collect::<Vec<_>>(),
        env.counter.mutating_count(),
        env.counter.read_count(),
        env.counter.snapshot()
    );
}

// ---------------------------------------------------------------------------------------------
// Credential check with IAM authorization enforced
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn credential_check_passes_with_new_key_and_fails_permanently_with_bogus_key() {
    // Provision with authorization off, then enforce it for every later request. (Under moto's
    // IAM auth the Rust SDK cannot send IAM parameters containing spaces, such as the policy
    // description: moto re-encodes the form body and the signature no longer matches.)
    let moto = Moto::with_iam_auth(100_000);
    let counter = CallCounter::new();
    let admin = moto.clients(EU, Some(counter.clone())).await;
    let name = unique("auth");
    let other = unique("auth-other");
    let s3 = admin.s3_for_region(EU);
    bucket::ensure(&s3, &name, EU, "zitadel").await.unwrap();
    bucket::ensure(&s3, &other, EU, "server").await.unwrap();
    let (_, arn) = policy::ensure(&admin.iam, &name).await.unwrap();
    group::ensure(&admin.iam, &name, &arn).await.unwrap();
    user::ensure(&admin.iam, &name, "zitadel").await.unwrap();
    let key = access_key::create(&admin.iam, &name).await.unwrap();
    moto.reset_auth(0).await;

    // From here on every call is authorized against IAM policies: `test` is nobody.
    let denied = admin.iam.list_users().send().await;
    assert!(denied.is_err(), "moto must now enforce IAM auth");

    let with_key = admin.s3_with_static_credentials(EU, &key.id, key.secret.expose_secret());
    let report = credential_check::verify(
        &with_key,
        &name,
        Duration::from_secs(10),
        Duration::from_millis(20),
    )
    .await
    .unwrap();
    assert_eq!(report.outcome, Outcome::Created);
    let probe = report.detail["probe_key"].as_str().unwrap();
    assert!(probe.starts_with("backup-provisioner/probe-"), "{probe}");
    assert!(
        !bucket::has_objects(&with_key, &name).await.unwrap(),
        "probe object deleted"
    );
    assert!(
        !report
            .detail
            .to_string()
            .contains(key.secret.expose_secret())
    );

    // A key already in use is checked without writing.
    counter.reset();
    let read_only = credential_check::verify_read_only(
        &with_key,
        &name,
        Duration::from_secs(10),
        Duration::from_millis(20),
    )
    .await
    .unwrap();
    assert_eq!(read_only.outcome, Outcome::AlreadyPresent);
    assert!(counter.mutating().is_empty(), "{:?}", counter.mutating());

    // The runbook key cannot touch another bucket.
    let started = std::time::Instant::now();
    let err = credential_check::verify(
        &with_key,
        &other,
        Duration::from_millis(300),
        Duration::from_millis(20),
    )
    .await
    .expect_err("no access to another bucket");
    assert!(!err.is_retryable(), "{err:?}");
    assert!(err.to_string().contains("AccessDenied"), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(300));

    // A bogus key is rejected until the budget is spent, then the error is permanent.
    let bogus = admin.s3_with_static_credentials(EU, "AKIAIOSFODNN7BOGUS00", "not-a-real-secret");
    let started = std::time::Instant::now();
    let err = credential_check::verify(
        &bogus,
        &name,
        Duration::from_millis(300),
        Duration::from_millis(20),
    )
    .await
    .expect_err("bogus key must fail");
    let elapsed = started.elapsed();
    assert!(!err.is_retryable(), "{err:?}");
    assert!(
        err.to_string()
            .contains("still rejected by S3 (InvalidAccessKeyId)"),
        "{err}"
    );
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(10),
        "{elapsed:?}"
    );
    let err = credential_check::verify_read_only(
        &bogus,
        &name,
        Duration::from_millis(100),
        Duration::from_millis(20),
    )
    .await
    .expect_err("bogus key must fail the read-only check too");
    assert!(!err.is_retryable(), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// Error classification
// ---------------------------------------------------------------------------------------------

fn response(status: u16) -> HttpResponse {
    HttpResponse::new(status.try_into().unwrap(), SdkBody::empty())
}

fn iam_error(
    code: &str,
    status: u16,
) -> SdkError<aws_sdk_iam::operation::create_user::CreateUserError, HttpResponse> {
    SdkError::service_error(
        aws_sdk_iam::operation::create_user::CreateUserError::generic(
            ErrorMetadata::builder()
                .code(code)
                .message("upstream says no")
                .custom("aws_request_id", "req-42")
                .build(),
        ),
        response(status),
    )
}

#[test]
fn classify_throttling_and_server_errors_as_retryable() {
    for code in [
        "Throttling",
        "ThrottlingException",
        "SlowDown",
        "RequestLimitExceeded",
        "TooManyRequests",
    ] {
        let err = aws::classify("iam", "CreateUser", iam_error(code, 400));
        assert!(err.is_retryable(), "{code}: {err:?}");
        assert_eq!(err.request_id(), Some("req-42"));
    }
    for status in [500, 502, 503] {
        let err = aws::classify("iam", "CreateUser", iam_error("SomethingOdd", status));
        assert!(err.is_retryable(), "{status}");
    }
    let timeout: SdkError<aws_sdk_iam::operation::create_user::CreateUserError, HttpResponse> =
        SdkError::timeout_error("operation timed out");
    assert!(aws::classify("iam", "CreateUser", timeout).is_retryable());
    let refused: SdkError<aws_sdk_iam::operation::create_user::CreateUserError, HttpResponse> =
        SdkError::dispatch_failure(ConnectorError::io("connection refused".into()));
    assert!(aws::classify("iam", "CreateUser", refused).is_retryable());
}

#[test]
fn classify_client_errors_as_permanent_with_remedy() {
    let cases = [
        ("AccessDenied", 403, "grant the provisioner"),
        ("InvalidBucketName", 400, "lowercase letters"),
        ("BucketAlreadyExists", 409, "choose another bucket name"),
        ("ValidationError", 400, "check the names"),
        (
            "LimitExceeded",
            409,
            "delete unused keys or policy versions",
        ),
        ("MalformedPolicyDocument", 400, "fix the policy template"),
        ("InvalidAccessKeyId", 403, "credentials"),
    ];
    for (code, status, remedy) in cases {
        let err = aws::classify("iam", "CreateUser", iam_error(code, status));
        assert!(!err.is_retryable(), "{code}");
        assert_eq!(err.request_id(), Some("req-42"), "{code}");
        let text = err.to_string();
        assert!(text.starts_with("iam CreateUser: "), "{text}");
        assert!(
            text.contains(remedy) && text.contains(code),
            "{code}: {text}"
        );
    }
}

#[tokio::test]
async fn classify_real_moto_responses() {
    let env = Env::new(EU).await;
    // NoSuchEntity from moto keeps its request id and is retryable (IAM eventual consistency).
    let missing = env
        .iam()
        .get_group()
        .group_name(unique("missing"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(aws::error_code(&missing), Some("NoSuchEntity"));
    let err = aws::classify("iam", "GetGroup", missing);
    assert!(err.is_retryable(), "{err:?}");

    // Nothing listens on port 9: a connection failure is retryable.
    let dead = aws::clients_with_credentials(
        &aws::AwsSettings {
            endpoint_url: Some("http://127.0.0.1:9".to_owned()),
            region: Some(EU.to_owned()),
        },
        None,
        aws_sdk_s3::config::Credentials::new("test", "test", None, None, "test"),
    )
    .await;
    let err = dead.s3.list_buckets().send().await.unwrap_err();
    let err = aws::classify("s3", "ListBuckets", err);
    assert!(err.is_retryable(), "{err:?}");
}

#[tokio::test]
async fn call_counter_splits_mutating_from_reads() {
    let env = Env::new(EU).await;
    let name = unique("counter");
    env.iam()
        .create_group()
        .group_name(&name)
        .send()
        .await
        .unwrap();
    env.iam()
        .get_group()
        .group_name(&name)
        .send()
        .await
        .unwrap();
    env.iam()
        .get_group()
        .group_name(&name)
        .send()
        .await
        .unwrap();
    env.s3(EU).list_buckets().send().await.unwrap();
    let snapshot = env.counter.snapshot();
    assert_eq!(snapshot.get("iam:CreateGroup"), Some(&1));
    assert_eq!(snapshot.get("iam:GetGroup"), Some(&2));
    assert_eq!(snapshot.get("s3:ListBuckets"), Some(&1));
    assert_eq!(env.counter.mutating_count(), 1);
    assert_eq!(env.counter.read_count(), 3);
    env.counter.reset();
    assert!(env.counter.snapshot().is_empty());
}

#[tokio::test]
async fn private_moto_resets_and_stops_on_drop() {
    let moto = Moto::start();
    let clients = moto.clients(EU, None).await;
    let s3 = clients.s3_for_region(EU);
    let name = unique("reset");
    bucket::ensure(&s3, &name, EU, "zitadel").await.unwrap();
    moto.reset().await;
    assert!(
        s3.head_bucket().bucket(&name).send().await.is_err(),
        "reset wipes buckets"
    );
    assert!(moto.log().contains("PUT /"), "moto's log is captured");

    let port = moto.port;
    drop(moto);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err(),
        "moto stopped"
    );
}
