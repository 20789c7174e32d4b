//! The runbook (`runbook-postgrescluster-backups.md`) done by hand, literally, one call per
//! console or command-line action, with the AWS SDK and the Kubernetes API as an administrator
//! (none of backup-provisioner's own code): what `holos-zitadel-backups` and
//! `holos-server-backups` were made with. Adoption tests start from it.
//!
//! | runbook section        | what a person did                                              |
//! |------------------------|----------------------------------------------------------------|
//! | Create the Bucket      | CreateBucket with "ACLs disabled" (ObjectOwnership             |
//! |                        | BucketOwnerEnforced); Block all public access; versioning left |
//! |                        | disabled; SSE-S3 with Bucket Key; Object Lock left disabled     |
//! | Create an IAM Policy   | CreatePolicy: the name, the description and the JSON, verbatim  |
//! | Create an IAM Group    | CreateGroup; AttachGroupPolicy                                  |
//! | Create the IAM User    | CreateUser (no console access: no login profile);               |
//! |                        | AddUserToGroup                                                  |
//! | Create an Access Key   | CreateAccessKey; its description as the console stores it: the  |
//! |                        | user tag `<access key id> = description`                        |
//! | Create the Secret      | the cipher pass from `tr -dc A-Za-z0-9 </dev/urandom \| head -c |
//! |                        | 64` (run as is); a directory with the one file `s3.conf` in the |
//! |                        | runbook's format (repo2 and repo3 the same); `holos create      |
//! |                        | secret --append-hash=false --from-file .`: an Opaque Secret     |
//! |                        | whose data key is the file's name, labelled                     |
//! |                        | `holos.run/secret.name` (field manager `holos`)                 |
//!
//! Nothing is tagged: the runbook tags nothing.

use aws_sdk_iam::types::Tag as IamTag;
use aws_sdk_s3::types::{
    ObjectOwnership, PublicAccessBlockConfiguration, ServerSideEncryption,
    ServerSideEncryptionByDefault, ServerSideEncryptionConfiguration, ServerSideEncryptionRule,
};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::support::env::Env;

/// The policy's description, verbatim.
const POLICY_DESCRIPTION: &str =
    "Read and write access to a specific bucket for pgrest operating within a pgo PostgresCluster.";

/// The access key's description, verbatim (typo included).
const KEY_DESCRIPTION: &str = "Used by pgbackrest associated with the PostgresCluster resource.  \
Refer to the PostgresCluster resource pgbackrest.cofiguration.secret.name for the stored location \
of the access key.  Synced from the Management Cluster using an ExternalSecret.";

/// The policy JSON as the runbook prints it for `holos-zitadel-backups`.
const POLICY_FOR_ZITADEL: &str = r#"{
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": [
                "s3:GetBucketLocation",
                "s3:ListAllMyBuckets"
            ],
            "Resource": "arn:aws:s3:::*"
        },
        {
            "Effect": "Allow",
            "Action": "s3:*",
            "Resource": [
                "arn:aws:s3:::holos-zitadel-backups",
                "arn:aws:s3:::holos-zitadel-backups/*"
            ]
        }
    ]
}"#;

/// What the person made, and what they would have kept in their password manager.
#[derive(Debug, Clone)]
pub struct HandMade {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub cipher_pass: String,
    /// The `s3.conf` text, exactly as written to the file.
    pub s3_conf: String,
}

/// Does the runbook for `bucket` (its policy, group and user share the name) and stores the
/// Secret `secret_name` in the test's namespace `namespace` (logical name) holding `s3.conf`
/// as the runbook says.
pub async fn runbook_by_hand(env: &Env, bucket: &str, namespace: &str) -> HandMade {
    let made = aws_by_hand(env, bucket).await;
    let text = runbook_s3_conf(&made);
    create_secret(env, namespace, bucket, &[("s3.conf", &text)]).await;
    HandMade {
        s3_conf: text,
        ..made
    }
}

/// The AWS half of the runbook and the cipher pass; the caller writes the Secret.
pub async fn aws_by_hand(env: &Env, bucket: &str) -> HandMade {
    create_the_bucket(env, bucket).await;
    let policy_arn = create_the_policy(env, bucket).await;
    create_the_group(env, bucket, &policy_arn).await;
    create_the_user(env, bucket).await;
    let (access_key_id, secret_access_key) = create_the_access_key(env, bucket).await;
    HandMade {
        access_key_id,
        secret_access_key,
        cipher_pass: generate_cipher_pass(),
        s3_conf: String::new(),
    }
}

/// "Create the Bucket", the console's defaults as the runbook lists them.
async fn create_the_bucket(env: &Env, bucket: &str) {
    let s3 = &env.admin.s3;
    s3.create_bucket()
        .bucket(bucket)
        .object_ownership(ObjectOwnership::BucketOwnerEnforced)
        .send()
        .await
        .expect("CreateBucket");
    let block_all = PublicAccessBlockConfiguration::builder()
        .block_public_acls(true)
        .ignore_public_acls(true)
        .block_public_policy(true)
        .restrict_public_buckets(true)
        .build();
    s3.put_public_access_block()
        .bucket(bucket)
        .public_access_block_configuration(block_all)
        .send()
        .await
        .expect("PutPublicAccessBlock");
    let sse_s3 = ServerSideEncryptionByDefault::builder()
        .sse_algorithm(ServerSideEncryption::Aes256)
        .build()
        .expect("sse");
    let rule = ServerSideEncryptionRule::builder()
        .apply_server_side_encryption_by_default(sse_s3)
        .bucket_key_enabled(true)
        .build();
    let config = ServerSideEncryptionConfiguration::builder()
        .rules(rule)
        .build()
        .expect("sse config");
    s3.put_bucket_encryption()
        .bucket(bucket)
        .server_side_encryption_configuration(config)
        .send()
        .await
        .expect("PutBucketEncryption");
}

/// "Create an IAM Policy": the runbook's JSON with the bucket's name in place of zitadel's.
async fn create_the_policy(env: &Env, bucket: &str) -> String {
    let document = POLICY_FOR_ZITADEL.replace("holos-zitadel-backups", bucket);
    let created = env
        .admin
        .iam
        .create_policy()
        .policy_name(bucket)
        .description(POLICY_DESCRIPTION)
        .policy_document(document)
        .send()
        .await
        .expect("CreatePolicy");
    let policy = created.policy().expect("policy");
    policy.arn().expect("arn").to_owned()
}

/// "Create an IAM Group" and attach the policy.
async fn create_the_group(env: &Env, name: &str, policy_arn: &str) {
    let iam = &env.admin.iam;
    iam.create_group()
        .group_name(name)
        .send()
        .await
        .expect("CreateGroup");
    iam.attach_group_policy()
        .group_name(name)
        .policy_arn(policy_arn)
        .send()
        .await
        .expect("AttachGroupPolicy");
}

/// "Create the IAM User" (no console access) in its group.
async fn create_the_user(env: &Env, name: &str) {
    let iam = &env.admin.iam;
    iam.create_user()
        .user_name(name)
        .send()
        .await
        .expect("CreateUser");
    iam.add_user_to_group()
        .user_name(name)
        .group_name(name)
        .send()
        .await
        .expect("AddUserToGroup");
}

/// "Create an Access Key" with its description (the console's user tag).
async fn create_the_access_key(env: &Env, user: &str) -> (String, String) {
    let iam = &env.admin.iam;
    let created = iam
        .create_access_key()
        .user_name(user)
        .send()
        .await
        .expect("CreateAccessKey");
    let key = created.access_key().expect("access key");
    let id = key.access_key_id().to_owned();
    let tag = IamTag::builder()
        .key(&id)
        .value(KEY_DESCRIPTION)
        .build()
        .expect("tag");
    iam.tag_user()
        .user_name(user)
        .tags(tag)
        .send()
        .await
        .expect("TagUser (the key's description)");
    (id, key.secret_access_key().to_owned())
}

/// `tr -dc A-Za-z0-9 </dev/urandom | head -c 64`, run as the runbook prints it.
pub fn generate_cipher_pass() -> String {
    let out = std::process::Command::new("bash")
        .args(["-c", "tr -dc A-Za-z0-9 </dev/urandom | head -c 64"])
        .output()
        .expect("bash");
    let pass = String::from_utf8(out.stdout).expect("ascii");
    assert_eq!(pass.len(), 64, "the runbook's command makes 64 characters");
    pass
}

/// The runbook's `s3.conf`: `[global]`, then repo2 and repo3 with the same values.
pub fn runbook_s3_conf(made: &HandMade) -> String {
    let (pass, key, secret) = (
        &made.cipher_pass,
        &made.access_key_id,
        &made.secret_access_key,
    );
    format!(
        "[global]\nrepo2-cipher-pass={pass}\nrepo2-s3-key={key}\nrepo2-s3-key-secret={secret}\n\
         repo3-cipher-pass={pass}\nrepo3-s3-key={key}\nrepo3-s3-key-secret={secret}\n"
    )
}

/// `holos create secret --namespace <ns> <name> --append-hash=false --from-file .` in a
/// directory holding `files`.
pub async fn create_secret(
    env: &Env,
    namespace: &str,
    name: &str,
    files: &[(&str, &str)],
) -> Value {
    let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    let data: serde_json::Map<String, Value> = files
        .iter()
        .map(|(file, text)| ((*file).to_owned(), json!(b64(text))))
        .collect();
    let secret = json!({
        "metadata": {"name": name, "labels": {"holos.run/secret.name": name}},
        "type": "Opaque",
        "data": data,
    });
    env.kube
        .create_secret_as("holos", env.ns(namespace), secret)
        .await
}
