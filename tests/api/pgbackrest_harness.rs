//! The pgBackRest harness on its own, without the service: with moto enforcing IAM
//! authorization, an admin identity creates the runbook's resources by hand (bucket, policy,
//! group, user, access key), and pgBackRest backs up and restores a throwaway cluster with
//! nothing but the resulting `s3.conf`. Checks that every stored object is client-side
//! encrypted and that the runbook key is denied on another bucket.

use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
use backup_provisioner::cloud::aws::{self, AwsClients};
use backup_provisioner::domain::CipherPass;
use backup_provisioner::provision::policy;
use futures::StreamExt;

use crate::support::moto::Moto;
use crate::support::pgbackrest::{self, round_trip_async};

const REGION: &str = "eu-west-1";
const NAMESPACE: &str = "zitadel";
const NAME: &str = "zitadel";
/// Requests moto lets through unauthenticated: CreateUser, PutUserPolicy, CreateAccessKey.
const NO_AUTH_REQUESTS: u32 = 3;
const ADMIN: &str = "harness-admin";

fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("bp-{prefix}-{}", &id[..12])
}

/// Uses moto's unauthenticated budget to make an admin user with an inline `*` policy;
/// returns clients signing as that admin.
async fn admin_clients(moto: &Moto) -> AwsClients {
    let bootstrap = moto.clients(REGION, None).await;
    bootstrap
        .iam
        .create_user()
        .user_name(ADMIN)
        .send()
        .await
        .expect("create admin user");
    bootstrap
        .iam
        .put_user_policy()
        .user_name(ADMIN)
        .policy_name("admin")
        .policy_document(
            serde_json::json!({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]
            })
            .to_string(),
        )
        .send()
        .await
        .expect("admin inline policy");
    let key = bootstrap
        .iam
        .create_access_key()
        .user_name(ADMIN)
        .send()
        .await
        .expect("admin access key")
        .access_key
        .expect("access key in response");

    // The budget is spent: the bootstrap identity is now rejected.
    let denied = bootstrap.iam.list_users().send().await;
    let err = denied.expect_err("IAM authorization must be enforced after the bootstrap");
    assert_eq!(aws::http_status(&err), Some(403), "{err:?}");

    moto.clients_as(REGION, None, key.access_key_id(), key.secret_access_key())
        .await
}

async fn create_bucket(s3: &aws_sdk_s3::Client, bucket: &str) {
    s3.create_bucket()
        .bucket(bucket)
        .create_bucket_configuration(
            CreateBucketConfiguration::builder()
                .location_constraint(BucketLocationConstraint::from(REGION))
                .build(),
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("create bucket {bucket}: {e:?}"));
}

/// The runbook by hand: bucket, policy, group (policy attached), user (in the group), access
/// key. Returns (access key id, secret access key).
async fn runbook_by_hand(moto: &Moto, admin: &AwsClients, bucket: &str) -> (String, String) {
    let s3 = admin.s3_for_region(REGION);
    create_bucket(&s3, bucket).await;
    let iam = &admin.iam;
    // moto limitation: it re-encodes a form-encoded (IAM query protocol) body before checking
    // the SigV4 signature, writing spaces as `+` where the Rust SDK sent `%20`, so any IAM call
    // with a space in a parameter (the runbook's policy description) gets SignatureDoesNotMatch
    // under enforced authorization. Let exactly this one request through unchecked.
    moto.reset_auth(1).await;
    let policy_arn = iam
        .create_policy()
        .policy_name(bucket)
        .description(policy::DESCRIPTION)
        .policy_document(policy::document(bucket).to_string())
        .send()
        .await
        .expect("create policy")
        .policy
        .and_then(|p| p.arn)
        .expect("policy arn");
    iam.create_group()
        .group_name(bucket)
        .send()
        .await
        .expect("create group");
    iam.attach_group_policy()
        .group_name(bucket)
        .policy_arn(&policy_arn)
        .send()
        .await
        .expect("attach group policy");
    iam.create_user()
        .user_name(bucket)
        .send()
        .await
        .expect("create user");
    iam.add_user_to_group()
        .group_name(bucket)
        .user_name(bucket)
        .send()
        .await
        .expect("add user to group");
    let key = iam
        .create_access_key()
        .user_name(bucket)
        .send()
        .await
        .expect("create access key")
        .access_key
        .expect("access key in response");
    (
        key.access_key_id().to_owned(),
        key.secret_access_key().to_owned(),
    )
}

/// Every object under `prefix` with its first bytes (at most 8), fetched by the admin.
async fn object_heads(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
) -> Vec<(String, i64, Vec<u8>)> {
    let mut keys = Vec::new();
    let mut pages = s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.expect("list objects");
        for object in page.contents() {
            keys.push((
                object.key().expect("object key").to_owned(),
                object.size().unwrap_or_default(),
            ));
        }
    }
    futures::stream::iter(keys)
        .map(|(key, size)| async move {
            if size == 0 {
                return (key, size, Vec::new());
            }
            let object = s3
                .get_object()
                .bucket(bucket)
                .key(&key)
                .range("bytes=0-7")
                .send()
                .await
                .unwrap_or_else(|e| panic!("get {key}: {e:?}"));
            let bytes = object
                .body
                .collect()
                .await
                .unwrap_or_else(|e| panic!("read {key}: {e:?}"))
                .into_bytes();
            (key, size, bytes[..bytes.len().min(8)].to_vec())
        })
        .buffer_unordered(8)
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbackrest_round_trip_with_runbook_credentials_under_enforced_iam() {
    let started = Instant::now();
    let moto = Moto::with_iam_auth(NO_AUTH_REQUESTS);
    let admin = admin_clients(&moto).await;
    let bucket = unique("pgbr");
    let (key_id, secret) = runbook_by_hand(&moto, &admin, &bucket).await;
    let setup = started.elapsed();

    let cipher_pass = CipherPass::generate();
    let s3_conf = pgbackrest::s3_conf(cipher_pass.expose(), &key_id, &secret);
    let report = round_trip_async(
        s3_conf,
        bucket.clone(),
        REGION.to_owned(),
        NAMESPACE.to_owned(),
        NAME.to_owned(),
        moto.endpoint.clone(),
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "round trip failed: {e:#}\n--- moto log (tail) ---\n{}",
            tail(&moto.log(), 40)
        )
    });

    assert_eq!(report.restored_marker, report.marker);
    assert_eq!(
        report.repo_path,
        format!("/pgbackrest/{NAMESPACE}/{NAME}/repo2")
    );

    // Every stored object is client-side encrypted.
    let check = Instant::now();
    let s3 = admin.s3_for_region(REGION);
    let objects = object_heads(&s3, &bucket, "").await;
    let outside: Vec<_> = objects
        .iter()
        .filter(|(key, _, _)| !key.starts_with(&report.key_prefix))
        .map(|(key, _, _)| key)
        .collect();
    assert!(
        outside.is_empty(),
        "objects outside {}: {outside:?}",
        report.key_prefix
    );
    let stored: Vec<_> = objects.iter().filter(|(_, size, _)| *size > 0).collect();
    assert!(
        stored.len() > 10,
        "expected a full backup and WAL under {}, found {} objects",
        report.key_prefix,
        objects.len()
    );
    let plain: Vec<_> = stored
        .iter()
        .filter(|(_, _, head)| !head.starts_with(b"Salted__"))
        .map(|(key, _, head)| format!("{key}: {:?}", String::from_utf8_lossy(head)))
        .collect();
    assert!(
        plain.is_empty(),
        "objects not encrypted by pgBackRest: {plain:#?}"
    );
    assert!(
        stored
            .iter()
            .any(|(key, _, _)| key.contains("/backup/demo/") && key.ends_with("backup.info")),
        "no backup.info under {}",
        report.key_prefix
    );
    assert!(
        stored
            .iter()
            .any(|(key, _, _)| key.contains("/archive/demo/")),
        "no archived WAL under {}",
        report.key_prefix
    );
    let encryption_check = check.elapsed();

    // The runbook key is confined to its bucket.
    let other = unique("other");
    create_bucket(&s3, &other).await;
    let runbook = admin.s3_with_static_credentials(REGION, &key_id, &secret);
    let list = runbook
        .list_objects_v2()
        .bucket(&other)
        .send()
        .await
        .expect_err("runbook key must not list another bucket");
    assert_eq!(aws::http_status(&list), Some(403), "{list:?}");
    assert_eq!(aws::error_code(&list), Some("AccessDenied"), "{list:?}");
    let put = runbook
        .put_object()
        .bucket(&other)
        .key("intruder")
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .expect_err("runbook key must not write another bucket");
    assert_eq!(aws::http_status(&put), Some(403), "{put:?}");
    assert_eq!(aws::error_code(&put), Some("AccessDenied"), "{put:?}");
    // ...while it does work on its own bucket (positive control for the 403s).
    runbook
        .list_objects_v2()
        .bucket(&bucket)
        .max_keys(1)
        .send()
        .await
        .expect("runbook key lists its own bucket");

    let total = started.elapsed();
    eprintln!(
        "pgbackrest harness timings: setup (moto + runbook by hand) {setup:.2?}; {report}; \
         encryption check of {} objects {encryption_check:.2?}; test total {total:.2?}",
        stored.len()
    );
    assert!(
        total < Duration::from_secs(120),
        "the pgBackRest round trip took {total:?}"
    );
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
