//! The proof: provision through the service's API against moto with IAM authorization
//! enforced and the real kube-apiserver (the service as the ServiceAccount and Role of
//! `deploy/base/rbac.yaml`), take `s3.conf` from the Secret it wrote, and let pgBackRest back up and
//! restore a throwaway cluster into the bucket with nothing else.
//!
//! moto checks every request against IAM policies after its first three (unauthenticated)
//! requests, which make the admin identity the service runs as. The service's IAM client sends
//! spaces in form bodies as `+` (see `support::moto::iam_for_enforced_moto`) because moto
//! re-encodes IAM bodies that way before checking signatures.

use std::time::Instant;

use aws_sdk_s3::primitives::ByteStream;
use backup_provisioner::cloud::aws::{self, AwsClients};
use serde_json::json;

use crate::support::env::{Env, bucket_for, conf_value, unique_name};
use crate::support::moto::{Moto, iam_for_enforced_moto};
use crate::support::pgbackrest::{create_bucket, object_heads, round_trip_async, tail};

const REGION: &str = "eu-west-1";
const NAMESPACE: &str = "pgdemo";
/// CreateUser, PutUserPolicy and CreateAccessKey for the admin; everything after is checked.
const UNAUTHENTICATED_REQUESTS: u32 = 3;

/// The admin identity (inline `*` policy) the service runs as: (clients, key id, secret).
async fn admin(moto: &Moto) -> (AwsClients, String, String) {
    let open = moto.clients(REGION, None).await;
    let name = unique_name("admin");
    open.iam
        .create_user()
        .user_name(&name)
        .send()
        .await
        .expect("admin user");
    let policy = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]});
    open.iam
        .put_user_policy()
        .user_name(&name)
        .policy_name("admin")
        .policy_document(policy.to_string())
        .send()
        .await
        .expect("admin policy");
    let key = open
        .iam
        .create_access_key()
        .user_name(&name)
        .send()
        .await
        .expect("admin key")
        .access_key
        .unwrap();
    let denied = open.iam.list_users().send().await;
    assert_eq!(
        aws::http_status(&denied.expect_err("authorization is enforced")),
        Some(403)
    );
    let (id, secret) = (
        key.access_key_id().to_owned(),
        key.secret_access_key().to_owned(),
    );
    (
        moto.clients_as(REGION, None, &id, &secret).await,
        id,
        secret,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbackrest_backs_up_and_restores_with_the_provisioned_secret() {
    let started = Instant::now();
    let moto = Moto::with_iam_auth(UNAUTHENTICATED_REQUESTS);
    let (admin, admin_id, admin_secret) = admin(&moto).await;
    let env = Env::builder(&[NAMESPACE])
        .moto(&moto)
        .region(REGION)
        .aws_identity(&admin_id, &admin_secret)
        .map_service_aws(|mut service| {
            service.iam = iam_for_enforced_moto(&service.iam);
            service
        })
        .start()
        .await;
    let name = unique_name("pg");
    let bucket = bucket_for(&name);
    let job = env
        .provision(json!({"name": name, "namespace": env.ns(NAMESPACE), "region": REGION}))
        .await;
    assert_eq!(
        job["state"],
        "succeeded",
        "job: {job:#}\n--- moto log ---\n{}",
        tail(&moto.log(), 30)
    );
    let provisioned = started.elapsed();

    let conf = env
        .s3_conf(NAMESPACE, &bucket)
        .await
        .expect("the Secret holds s3.conf");
    let report = round_trip_async(
        conf.clone(),
        bucket.clone(),
        REGION.into(),
        env.ns(NAMESPACE).to_owned(),
        name.clone(),
        moto.endpoint.clone(),
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "round trip failed: {e:#}\n--- moto log ---\n{}",
            tail(&moto.log(), 40)
        )
    });
    assert_eq!(report.restored_marker, report.marker);
    assert_eq!(
        report.repo_path,
        format!("/pgbackrest/{}/{name}/repo2", env.ns(NAMESPACE))
    );
    let repo = env.repository(&name).await;
    assert_eq!(
        repo["pgbackrest"]["global"]["repo2-path"],
        report.repo_path.as_str()
    );

    // Every stored object is encrypted client-side with the Secret's cipher pass.
    let s3 = admin.s3_for_region(REGION);
    let stored: Vec<_> = object_heads(&s3, &bucket, "")
        .await
        .into_iter()
        .filter(|(_, size, _)| *size > 0)
        .collect();
    assert!(
        stored.len() > 10,
        "expected a backup and WAL, found {} objects",
        stored.len()
    );
    let plain: Vec<_> = stored
        .iter()
        .filter(|(_, _, head)| !head.starts_with(b"Salted__"))
        .map(|(k, _, _)| k)
        .collect();
    assert!(
        plain.is_empty(),
        "objects not encrypted by pgBackRest: {plain:?}"
    );

    // The provisioned key is confined to its bucket.
    let other = unique_name("other");
    create_bucket(&s3, &bucket_for(&other), REGION).await;
    let key = admin.s3_with_static_credentials(
        REGION,
        &conf_value(&conf, "repo2-s3-key"),
        &conf_value(&conf, "repo2-s3-key-secret"),
    );
    let err = key
        .list_objects_v2()
        .bucket(bucket_for(&other))
        .send()
        .await
        .expect_err("denied");
    assert_eq!(aws::http_status(&err), Some(403), "{err:?}");
    let err = key
        .put_object()
        .bucket(bucket_for(&other))
        .key("x")
        .body(ByteStream::from_static(b"x"))
        .send()
        .await;
    assert_eq!(aws::http_status(&err.expect_err("denied")), Some(403));
    eprintln!(
        "pgbackrest e2e: provisioning through the API {provisioned:.2?}; {report}; total {:.2?}",
        started.elapsed()
    );
    env.app.stop().await;
}
