//! The credential check, with IAM authorization enforced.

use std::time::Duration;

use backup_provisioner::cloud::Outcome;
use backup_provisioner::cloud::aws::CallCounter;
use backup_provisioner::provision::{access_key, bucket, credential_check, group, policy, user};
use secrecy::ExposeSecret;

use crate::support::moto::Moto;

use super::{EU, unique};

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
