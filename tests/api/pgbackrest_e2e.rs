//! The proof: provision through the service's API against moto with IAM authorization
//! enforced and the real kube-apiserver (the service as the ServiceAccount and Role of
//! `deploy/base/rbac.yaml`), take `s3.conf` from the Secret it wrote and repo2's settings from
//! the PostgresCluster fragment of `GET .../manifests` (`repo2-path`, bucket, region,
//! `repo2-cipher-type`, retention; only the endpoint is moto's, behind a TLS proxy, since the
//! fragment's dual-stack AWS endpoint is not reachable from the tests), and let pgBackRest
//! back up (archiving WAL) and restore a throwaway cluster into the bucket with nothing else.
//! Then the backup freshness check (`provision::freshness`, as the service's identity) finds
//! that backup and that WAL: stored, on GET, and as gauges on /metrics.
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
use crate::support::pgbackrest::{
    RepoSettings, create_bucket, object_heads, round_trip_with_async, tail,
};

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
    let settings = settings_from_manifests(&env, &name).await;
    assert_eq!(settings.bucket, bucket);
    let backup_started = chrono::Utc::now();
    let report = round_trip_with_async(conf.clone(), settings, moto.endpoint.clone())
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

    assert_fresh(&env, &admin, &name, backup_started).await;

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

/// repo2's settings from the PostgresCluster fragment the service serves for `name`: bucket and
/// region from `repos[repo2].s3`, `repo2-path` and every other option from `global` (the
/// endpoint is not taken: the tests reach moto through a TLS proxy instead of AWS's dual-stack
/// endpoint).
async fn settings_from_manifests(env: &Env, name: &str) -> RepoSettings {
    let response = env
        .app
        .get(
            &format!("/v1/backup-repositories/{name}/manifests"),
            &env.app.viewer(),
        )
        .await;
    assert_eq!(response.status(), 200);
    let manifests: serde_json::Value = response.json().await.expect("manifests");
    let pgbackrest = &manifests["postgres_cluster"]["spec"]["backups"]["pgbackrest"];
    let repo = pgbackrest["repos"]
        .as_array()
        .and_then(|repos| repos.iter().find(|r| r["name"] == "repo2"))
        .expect("repo2 in the fragment");
    let global = pgbackrest["global"].as_object().expect("global");
    let text = |v: &serde_json::Value| v.as_str().expect("a string").to_owned();
    let options: Vec<(String, String)> = global
        .iter()
        .filter(|(k, _)| *k != "repo2-path")
        .map(|(k, v)| (k.clone(), text(v)))
        .collect();
    for expected in [
        "repo2-cipher-type",
        "repo2-retention-full",
        "repo2-retention-full-type",
    ] {
        assert!(options.iter().any(|(k, _)| k == expected), "{expected}");
    }
    RepoSettings {
        bucket: text(&repo["s3"]["bucket"]),
        region: text(&repo["s3"]["region"]),
        path: text(&global["repo2-path"]),
        options,
    }
}

/// The freshness check of the service's identity finds the backup just made and the WAL it
/// archived: dated since the backup started, on GET and on /metrics.
async fn assert_fresh(
    env: &Env,
    identity: &AwsClients,
    name: &str,
    backup_started: chrono::DateTime<chrono::Utc>,
) {
    let checker = backup_provisioner::provision::freshness::FreshnessChecker {
        aws: identity.clone(),
        ..crate::freshness::checker(env, std::time::Duration::ZERO)
    };
    let checked = crate::freshness::refresh(&checker).await;
    let found = checked[0].outcome.clone().expect("the check succeeds");
    // moto dates objects to the second.
    let since = backup_started - chrono::Duration::seconds(1);
    for (what, at) in [
        ("backup", found.newest_backup_at),
        ("full backup", found.newest_full_backup_at),
        ("WAL", found.newest_wal_at),
    ] {
        assert!(at.is_some_and(|at| at >= since), "{what}: {found:?}");
    }
    assert_eq!(found.newest_backup_at, found.newest_full_backup_at);
    let view = env.repository(name).await;
    for field in ["newest_backup_at", "newest_full_backup_at", "newest_wal_at"] {
        assert!(view["freshness"][field].is_string(), "{field}: {view:#}");
    }
    for gauge in [
        "newest_backup_age_seconds",
        "newest_full_backup_age_seconds",
        "newest_wal_age_seconds",
    ] {
        let age = crate::freshness::metric(env, gauge, name).await;
        assert!(age.is_some_and(|a| a >= 0.0), "{gauge}: {age:?}");
    }
}
