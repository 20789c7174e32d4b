//! The runbook as a job, end to end through the API: moto for S3/IAM, the real kube-apiserver
//! for the Secret (the service as the ServiceAccount and Role of `deploy/base/rbac.yaml`), the real
//! provisioning job on real workers.

use serde_json::json;

use crate::support::env::{Env, bucket_for, conf_value, unique_name};

const POLICY_DESCRIPTION: &str =
    "Read and write access to a specific bucket for pgrest operating within a pgo PostgresCluster.";

#[tokio::test]
async fn first_provisioning_produces_the_runbooks_state() {
    let env = Env::start(&["zitadel"]).await;
    let name = unique_name("zt");
    let bucket = bucket_for(&name);
    let job = env
        .provision(json!({"name": name, "namespace": env.ns("zitadel")}))
        .await;
    assert_eq!(job["state"], "succeeded", "job: {job:#}");
    let repo = env.repository(&name).await;
    assert_eq!(repo["state"], "ready");

    // Bucket settings, read back through the S3 API.
    let s3 = &env.admin.s3;
    let ownership = s3
        .get_bucket_ownership_controls()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    let rule = &ownership.ownership_controls().unwrap().rules()[0];
    assert_eq!(rule.object_ownership().as_str(), "BucketOwnerEnforced");
    let pab = s3
        .get_public_access_block()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    let pab = pab.public_access_block_configuration().unwrap();
    assert_eq!(
        (
            pab.block_public_acls(),
            pab.ignore_public_acls(),
            pab.block_public_policy(),
            pab.restrict_public_buckets()
        ),
        (Some(true), Some(true), Some(true), Some(true))
    );
    let enc = s3
        .get_bucket_encryption()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    let enc_rule = &enc.server_side_encryption_configuration().unwrap().rules()[0];
    assert_eq!(
        enc_rule
            .apply_server_side_encryption_by_default()
            .unwrap()
            .sse_algorithm()
            .as_str(),
        "AES256"
    );
    assert_eq!(enc_rule.bucket_key_enabled(), Some(true));
    // moto's GetBucketVersioning body does not parse in the SDK; the step's reader copes.
    let versioning = backup_provisioner::provision::bucket::versioning_status(s3, &bucket)
        .await
        .unwrap();
    assert!(versioning.is_none(), "versioning must stay disabled");
    let lock = s3
        .get_object_lock_configuration()
        .bucket(&bucket)
        .send()
        .await;
    let lock_enabled = lock.ok().and_then(|l| {
        l.object_lock_configuration()
            .and_then(|c| c.object_lock_enabled().cloned())
    });
    assert!(
        lock_enabled.is_none(),
        "object lock must stay off: {lock_enabled:?}"
    );
    let tags = s3
        .get_bucket_tagging()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    let tag = |k: &str| {
        tags.tag_set()
            .iter()
            .find(|t| t.key() == k)
            .map(|t| t.value().to_owned())
    };
    assert_eq!(tag("managed-by").as_deref(), Some("backup-provisioner"));
    assert_eq!(tag("backup-provisioner/repository"), Some(name.clone()));

    // IAM: policy (document and description), group attachment, user membership, no console.
    let iam = &env.admin.iam;
    let policy_arn = repo["resources"]["policy_arn"].as_str().unwrap();
    let policy = iam
        .get_policy()
        .policy_arn(policy_arn)
        .send()
        .await
        .unwrap();
    let policy = policy.policy().unwrap();
    assert_eq!(policy.policy_name(), Some(bucket.as_str()));
    assert_eq!(policy.description(), Some(POLICY_DESCRIPTION));
    let version = iam
        .get_policy_version()
        .policy_arn(policy_arn)
        .version_id(policy.default_version_id().unwrap())
        .send()
        .await
        .unwrap();
    let raw = version.policy_version().unwrap().document().unwrap();
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .unwrap();
    let document: serde_json::Value = serde_json::from_str(&decoded).unwrap();
    assert_eq!(
        document,
        backup_provisioner::provision::policy::document(&bucket)
    );
    let attached = iam
        .list_attached_group_policies()
        .group_name(&bucket)
        .send()
        .await
        .unwrap();
    assert_eq!(
        attached.attached_policies()[0].policy_arn(),
        Some(policy_arn)
    );
    let groups = iam
        .list_groups_for_user()
        .user_name(&bucket)
        .send()
        .await
        .unwrap();
    assert_eq!(
        groups
            .groups()
            .iter()
            .map(|g| g.group_name())
            .collect::<Vec<_>>(),
        vec![bucket.as_str()]
    );
    let login = iam.get_login_profile().user_name(&bucket).send().await;
    let login = login.expect_err("the user must have no console access");
    assert_eq!(
        backup_provisioner::cloud::aws::error_code(&login),
        Some("NoSuchEntity"),
        "{login:?}"
    );
    let user_tags = iam
        .list_user_tags()
        .user_name(&bucket)
        .send()
        .await
        .unwrap();
    let user_tag = |k: &str| {
        user_tags
            .tags()
            .iter()
            .find(|t| t.key() == k)
            .map(|t| t.value().to_owned())
    };
    assert_eq!(
        user_tag("managed-by").as_deref(),
        Some("backup-provisioner")
    );

    // Exactly one active key: the one the Secret holds, with the runbook's description tag.
    let keys = iam
        .list_access_keys()
        .user_name(&bucket)
        .send()
        .await
        .unwrap();
    let keys = keys.access_key_metadata();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].status().map(|s| s.as_str()), Some("Active"));
    let key_id = keys[0].access_key_id().unwrap();
    assert_eq!(repo["resources"]["access_key_id"], key_id);
    let tags = iam
        .list_user_tags()
        .user_name(&bucket)
        .send()
        .await
        .unwrap();
    let description = tags
        .tags()
        .iter()
        .find(|t| t.key() == key_id)
        .map(|t| t.value().to_owned());
    assert_eq!(
        description.as_deref(),
        Some(backup_provisioner::provision::access_key::DESCRIPTION)
    );

    // The Secret: exact s3.conf, labels, type, nothing else.
    let secret = env.secret("zitadel", &bucket).await.expect("secret");
    assert_eq!(secret["type"], "Opaque");
    assert_eq!(
        secret["metadata"]["labels"]["holos.run/secret.name"],
        bucket.as_str()
    );
    assert_eq!(
        secret["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "backup-provisioner"
    );
    assert_eq!(secret["data"].as_object().unwrap().len(), 1);
    let conf = env.s3_conf("zitadel", &bucket).await.unwrap();
    let pass = conf_value(&conf, "repo2-cipher-pass");
    let key_secret = conf_value(&conf, "repo2-s3-key-secret");
    assert_eq!(pass.len(), 64);
    assert!(pass.chars().all(|c| c.is_ascii_alphanumeric()));
    assert_eq!(
        conf,
        format!(
            "[global]\nrepo2-cipher-pass={pass}\nrepo2-s3-key={key_id}\nrepo2-s3-key-secret={key_secret}\n\
             repo3-cipher-pass={pass}\nrepo3-s3-key={key_id}\nrepo3-s3-key-secret={key_secret}\n"
        )
    );
    // Wiring for the PostgresCluster, and no sealed material left behind.
    assert_eq!(
        repo["pgbackrest"]["repos"][0]["s3"]["endpoint"],
        "s3.dualstack.us-east-1.amazonaws.com"
    );
    assert_eq!(repo["resources"]["secret"]["name"], bucket.as_str());
    let sealed: i64 = sqlx::query_scalar("SELECT count(*) FROM secret_material")
        .fetch_one(&env.app.db)
        .await
        .unwrap();
    assert_eq!(
        sealed, 0,
        "sealed material must be wiped once the Secret holds it"
    );
    let mutating = env.counter.mutating();
    eprintln!(
        "first run AWS calls: {} mutating {:?}, {} reads",
        env.counter.mutating_count(),
        mutating,
        env.counter.read_count()
    );
    env.app.stop().await;
}

#[tokio::test]
async fn rerunning_a_ready_repository_changes_nothing() {
    let env = Env::start(&["holos"]).await;
    let name = unique_name("hs");
    let bucket = bucket_for(&name);
    let job = env
        .provision(json!({"name": name, "namespace": env.ns("holos")}))
        .await;
    assert_eq!(job["state"], "succeeded", "job: {job:#}");
    let first_mutating = env.counter.mutating_count();
    let first_reads = env.counter.read_count();
    let conf_before = env.s3_conf("holos", &bucket).await.unwrap();
    let secret_before = env.secret("holos", &bucket).await.unwrap();
    env.counter.reset();
    env.kube.clear_requests();

    let job = env.reconcile(&name).await;
    assert_eq!(job["state"], "succeeded", "job: {job:#}");
    assert_eq!(
        env.counter.mutating_count(),
        0,
        "re-run mutated AWS: {:?}",
        env.counter.mutating()
    );
    assert_eq!(
        env.kube.mutating_count(),
        0,
        "re-run mutated Kubernetes: {:?}",
        env.kube.mutating_requests()
    );
    assert!(
        !env.kube.requests().is_empty(),
        "the re-run read the Secret through the proxy"
    );
    assert_eq!(env.s3_conf("holos", &bucket).await.unwrap(), conf_before);
    let secret_after = env.secret("holos", &bucket).await.unwrap();
    assert_eq!(
        secret_after["metadata"]["resourceVersion"],
        secret_before["metadata"]["resourceVersion"]
    );
    assert_eq!(
        secret_after["metadata"]["managedFields"],
        secret_before["metadata"]["managedFields"]
    );
    assert_eq!(env.repository(&name).await["state"], "ready");
    eprintln!(
        "AWS calls: first run {first_mutating} mutating / {first_reads} reads; re-run 0 mutating / {} reads",
        env.counter.read_count()
    );
    env.app.stop().await;
}

#[tokio::test]
async fn a_failed_repository_is_repaired_by_posting_it_again_with_the_switch_its_error_names() {
    let env = Env::start(&["zitadel"]).await;
    let name = unique_name("rm");
    let bucket = bucket_for(&name);
    // Backups exist but no cipher pass: the job must refuse to start a new pass.
    let s3 = &env.admin.s3;
    s3.create_bucket().bucket(&bucket).send().await.unwrap();
    let body = aws_sdk_s3::primitives::ByteStream::from_static(b"Salted__old-backup");
    s3.put_object()
        .bucket(&bucket)
        .key("backup/old")
        .body(body)
        .send()
        .await
        .unwrap();
    let job = env
        .provision(json!({"name": name, "namespace": env.ns("zitadel")}))
        .await;
    assert_eq!(job["state"], "failed", "job: {job:#}");
    assert!(
        job["last_error"]
            .as_str()
            .unwrap()
            .contains("allow_new_cipher_pass")
    );

    // The remedy the message names: the same request with the switch set.
    let request =
        json!({"name": name, "namespace": env.ns("zitadel"), "allow_new_cipher_pass": true});
    let response = env
        .app
        .post_json("/v1/backup-repositories", &env.app.operator(), &request)
        .await;
    assert_eq!(response.status(), 202);
    let created: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        created["repository"]["options"]["allow_new_cipher_pass"],
        true
    );
    let job_id = created["job"]["id"].as_str().unwrap();
    let job = env
        .app
        .wait_for_job(job_id, std::time::Duration::from_secs(60))
        .await;
    assert_eq!(job["state"], "succeeded", "job: {job:#}");
    assert_eq!(env.repository(&name).await["state"], "ready");
    // Posting it once more changes nothing.
    let again = env
        .app
        .post_json("/v1/backup-repositories", &env.app.operator(), &request)
        .await;
    assert_eq!(again.status(), 200);
    env.app.stop().await;
}
