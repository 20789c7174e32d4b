//! Adoption (issue 10 item 1) and the refused cipher pass change (item 4), through the API with
//! real workers, moto behind the AWS realism proxy (which counts every call) and the real
//! kube-apiserver. Every adopted set is made by `runbook_by_hand`, which follows the runbook
//! literally.

mod crash;
mod runbook_by_hand;
mod safety;

use serde_json::{Value, json};

use self::runbook_by_hand::{HandMade, aws_by_hand, create_secret, runbook_by_hand};
use crate::support::aws_realism::{AwsProxy, AwsRealism};
use crate::support::env::{Env, bucket_for, conf_value, unique_name};

/// Operations adoption must never send.
const CREATES: [&str; 5] = [
    "CreateBucket",
    "CreatePolicy",
    "CreateGroup",
    "CreateUser",
    "CreateAccessKey",
];

async fn env() -> Env {
    Env::builder(&["zitadel"])
        .aws_realism(AwsRealism::off())
        .start()
        .await
}

fn proxy(env: &Env) -> &AwsProxy {
    env.realism.as_ref().expect("the realism proxy")
}

fn assert_nothing_created(env: &Env) {
    for operation in CREATES {
        assert_eq!(
            proxy(env).count(operation),
            0,
            "adopt sent {operation}: {:?}",
            proxy(env).mutating()
        );
    }
}

/// `POST /v1/backup-repositories` with `body` (plus name and namespace), waiting for the job.
async fn adopt(env: &Env, name: &str, body: Value) -> Value {
    let mut request = json!({ "name": name, "namespace": env.ns("zitadel"), "adopt": true });
    if let (Some(request), Some(extra)) = (request.as_object_mut(), body.as_object()) {
        request.extend(extra.clone());
    }
    let job = env.provision(request).await;
    assert_eq!(job["kind"], "adopt-repository", "job: {job:#}");
    job
}

/// The settings of `kind` that differ, by name, in a list of resource reports.
fn differing(reports: &Value, kind: &str) -> Vec<String> {
    let report = reports
        .as_array()
        .expect("reports")
        .iter()
        .find(|r| r["resource"]["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} report in {reports:#}"));
    let settings = report["settings"].as_array().expect("settings");
    settings
        .iter()
        .filter(|s| s["action"] != "none")
        .map(|s| s["setting"].as_str().unwrap().to_owned())
        .collect()
}

/// The three values a Secret's `s3.conf` holds (repo2 and repo3 must be equal).
fn conf_values(conf: &str) -> (String, String, String) {
    for field in ["s3-key", "s3-key-secret", "cipher-pass"] {
        let (two, three) = (format!("repo2-{field}"), format!("repo3-{field}"));
        assert_eq!(conf_value(conf, &two), conf_value(conf, &three), "{field}");
    }
    (
        conf_value(conf, "repo2-s3-key"),
        conf_value(conf, "repo2-s3-key-secret"),
        conf_value(conf, "repo2-cipher-pass"),
    )
}

fn made_values(made: &HandMade) -> (String, String, String) {
    (
        made.access_key_id.clone(),
        made.secret_access_key.clone(),
        made.cipher_pass.clone(),
    )
}

async fn public_access_block_off(env: &Env, bucket: &str) {
    env.admin
        .s3
        .delete_public_access_block()
        .bucket(bucket)
        .send()
        .await
        .expect("DeletePublicAccessBlock");
}

async fn public_access_block_exists(env: &Env, bucket: &str) -> bool {
    let found = env
        .admin
        .s3
        .get_public_access_block()
        .bucket(bucket)
        .send()
        .await;
    found.is_ok_and(|out| out.public_access_block_configuration().is_some())
}

#[tokio::test]
async fn adopting_a_runbook_set_changes_nothing_and_reports_the_drift() {
    let env = env().await;
    let name = unique_name("adopt");
    let bucket = bucket_for(&name);
    let made = runbook_by_hand(&env, &bucket, "zitadel").await;
    public_access_block_off(&env, &bucket).await;
    let before = env.secret("zitadel", &bucket).await.expect("the Secret");
    proxy(&env).reset_counts();

    let job = adopt(&env, &name, json!({})).await;
    assert_eq!(job["state"], "succeeded", "job: {job:#}");
    let url = format!("/v1/audit?repository={name}&limit=200");
    let audit: Value = env
        .app
        .get(&url, &env.app.viewer())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(audit["items"][0]["action"], "repository.adopt", "{audit:#}");
    assert_eq!(
        proxy(&env).mutating_count(),
        0,
        "{:?}",
        proxy(&env).mutating()
    );
    assert_eq!(
        env.kube.mutating_count(),
        0,
        "{:?}",
        env.kube.mutating_requests()
    );
    let after = env.secret("zitadel", &bucket).await.expect("the Secret");
    assert_eq!(
        after, before,
        "without repair the Secret is left exactly as it was"
    );
    let inspect = env.step_detail(&job, "inspect").await;
    let bucket_drift = differing(&inspect["resources"], "s3-bucket");
    assert!(
        bucket_drift.contains(&"public_access_block".to_owned()),
        "{inspect:#}"
    );
    assert!(bucket_drift.contains(&"tags".to_owned()), "{inspect:#}");
    assert!(
        !public_access_block_exists(&env, &bucket).await,
        "reported, not repaired"
    );

    let repository = env.repository(&name).await;
    assert_eq!(repository["state"], "ready", "{repository:#}");
    assert!(repository["verified_at"].is_string(), "{repository:#}");
    assert!(
        repository["drift_count"].as_i64() > Some(0),
        "{repository:#}"
    );
    let verification = &repository["verification"]["resources"];
    assert!(differing(verification, "s3-bucket").contains(&"public_access_block".to_owned()));
    let resources = &repository["resources"];
    assert_eq!(resources["secret"]["name"], bucket.as_str());
    assert_eq!(resources["access_key_id"], made.access_key_id.as_str());
    env.app.stop().await;
}

#[tokio::test]
async fn adopting_with_repair_converges_and_keeps_the_key_and_cipher_pass_byte_for_byte() {
    let env = env().await;
    let name = unique_name("adoptr");
    let bucket = bucket_for(&name);
    let made = runbook_by_hand(&env, &bucket, "zitadel").await;
    public_access_block_off(&env, &bucket).await;
    proxy(&env).reset_counts();

    let job = adopt(&env, &name, json!({ "repair": true })).await;
    assert_eq!(job["state"], "succeeded", "job: {job:#}");
    assert_nothing_created(&env);
    assert!(public_access_block_exists(&env, &bucket).await, "repaired");
    let conf = env.s3_conf("zitadel", &bucket).await.expect("s3.conf");
    assert_eq!(conf_values(&conf), made_values(&made));
    assert_eq!(conf, made.s3_conf, "the runbook's s3.conf, byte for byte");
    let secret = env.secret("zitadel", &bucket).await.expect("the Secret");
    let labels = &secret["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/managed-by"], "backup-provisioner");
    let keys = env
        .admin
        .iam
        .list_access_keys()
        .user_name(&bucket)
        .send()
        .await
        .unwrap();
    let ids: Vec<_> = keys
        .access_key_metadata()
        .iter()
        .filter_map(|k| k.access_key_id())
        .collect();
    assert_eq!(
        ids,
        [made.access_key_id.as_str()],
        "the one hand-made key, kept"
    );

    // Adopted once, converged: a reconcile repairs by adoption and changes nothing more.
    proxy(&env).reset_counts();
    let again = env.reconcile(&name).await;
    assert_eq!(
        (again["kind"].as_str(), again["state"].as_str()),
        (Some("adopt-repository"), Some("succeeded"))
    );
    assert_eq!(
        proxy(&env).mutating_count(),
        0,
        "{:?}",
        proxy(&env).mutating()
    );
    env.app.stop().await;
}

/// PGO's documented `pgo-s3-creds`: `s3.conf` with repo1 settings.
fn pgo_s3_conf(made: &HandMade) -> String {
    format!(
        "[global]\nrepo1-s3-key={}\nrepo1-s3-key-secret={}\nrepo1-cipher-pass={}\n",
        made.access_key_id, made.secret_access_key, made.cipher_pass
    )
}

#[tokio::test]
async fn a_secret_in_another_layout_is_kept_without_repair_and_rewritten_with_it() {
    let env = env().await;
    let name = unique_name("adoptp");
    let bucket = bucket_for(&name);
    let made = aws_by_hand(&env, &bucket).await;
    let text = pgo_s3_conf(&made);
    create_secret(&env, "zitadel", "pgo-s3-creds", &[("s3.conf", &text)]).await;
    let before = env
        .secret("zitadel", "pgo-s3-creds")
        .await
        .expect("the Secret");

    let job = adopt(&env, &name, json!({ "secret_name": "pgo-s3-creds" })).await;
    assert_eq!(job["state"], "succeeded", "job: {job:#}");
    assert_eq!(env.secret("zitadel", "pgo-s3-creds").await.unwrap(), before);
    let found = env.step_detail(&job, "found_secret").await;
    assert_eq!(found["layout"]["runbook"], false, "{found:#}");
    assert_eq!(found["layout"]["repo"], 1, "{found:#}");
    let repository = env.repository(&name).await;
    assert_eq!(repository["resources"]["secret"]["name"], "pgo-s3-creds");
    assert!(
        env.secret("zitadel", &bucket).await.is_none(),
        "no Secret named after the bucket"
    );

    proxy(&env).reset_counts();
    let job = adopt(
        &env,
        &name,
        json!({ "secret_name": "pgo-s3-creds", "repair": true }),
    )
    .await;
    assert_eq!(job["state"], "succeeded", "job: {job:#}");
    assert_nothing_created(&env);
    let data = env
        .kube
        .secret_data(env.ns("zitadel"), "pgo-s3-creds")
        .await
        .unwrap();
    assert_eq!(data.keys().collect::<Vec<_>>(), ["s3.conf"]);
    let conf = env
        .s3_conf("zitadel", "pgo-s3-creds")
        .await
        .expect("s3.conf");
    assert_eq!(
        conf_values(&conf),
        made_values(&made),
        "the same values, byte for byte"
    );
    assert!(
        env.secret("zitadel", &bucket).await.is_none(),
        "nothing made under another name"
    );
    env.app.stop().await;
}

/// `POST /v1/backup-repositories?dry_run=true` adopting `name`; the 200 answer.
async fn adopt_dry_run(env: &Env, name: &str, repair: bool) -> Value {
    let namespace = env.ns("zitadel");
    let body = json!({ "name": name, "namespace": namespace, "adopt": true, "repair": repair });
    let path = "/v1/backup-repositories?dry_run=true";
    let response = env.app.post_json(path, &env.app.operator(), &body).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["kind"], "adopt-repository", "{answer:#}");
    answer
}

/// The setting `name` of the report of `kind` in a list of resource reports.
fn setting(reports: &Value, kind: &str, name: &str) -> Value {
    let report = reports
        .as_array()
        .expect("reports")
        .iter()
        .find(|r| r["resource"]["kind"] == kind);
    let settings = report
        .and_then(|r| r["settings"].as_array())
        .expect("settings");
    let found = settings.iter().find(|s| s["setting"] == name);
    found
        .cloned()
        .unwrap_or_else(|| panic!("no {kind} {name} in {reports:#}"))
}

#[tokio::test]
async fn an_adopt_dry_run_answers_the_plan_with_no_mutating_call() {
    let env = env().await;
    let name = unique_name("adoptd");
    let bucket = bucket_for(&name);
    runbook_by_hand(&env, &bucket, "zitadel").await;
    public_access_block_off(&env, &bucket).await;
    proxy(&env).reset_counts();
    env.kube.clear_requests();

    let answer = adopt_dry_run(&env, &name, true).await;
    let pab = setting(&answer["plan"], "s3-bucket", "public_access_block");
    assert_eq!(pab["action"], "create", "with repair: {answer:#}");
    let answer = adopt_dry_run(&env, &name, false).await;
    let pab = setting(&answer["plan"], "s3-bucket", "public_access_block");
    assert_eq!(pab["action"], "leave", "without repair: {answer:#}");
    assert_eq!(
        proxy(&env).mutating_count(),
        0,
        "{:?}",
        proxy(&env).mutating()
    );
    assert_eq!(
        env.kube.mutating_count(),
        0,
        "{:?}",
        env.kube.mutating_requests()
    );
    let stored = env
        .app
        .get(
            &format!("/v1/backup-repositories/{name}"),
            &env.app.viewer(),
        )
        .await;
    assert_eq!(stored.status(), 404, "a dry run stores nothing");
    eprintln!(
        "adopt dry run: {} read calls, 0 mutating",
        proxy(&env).read_count()
    );
    env.app.stop().await;
}

/// Asserts a permanent failure (one attempt) whose message contains every one of `words`.
fn assert_permanent(job: &Value, words: &[&str]) {
    assert_eq!(job["state"], "failed", "job: {job:#}");
    assert_eq!(job["attempts"], 1, "permanent: {job:#}");
    let error = job["last_error"].as_str().expect("last_error");
    for word in words {
        assert!(error.contains(word), "{word:?} not in: {error}");
    }
}

#[tokio::test]
async fn a_key_inactive_or_absent_in_iam_is_a_permanent_error_naming_it() {
    let env = env().await;
    let name = unique_name("adopti");
    let bucket = bucket_for(&name);
    let made = runbook_by_hand(&env, &bucket, "zitadel").await;
    let iam = &env.admin.iam;
    iam.update_access_key()
        .user_name(&bucket)
        .access_key_id(&made.access_key_id)
        .status(aws_sdk_iam::types::StatusType::Inactive)
        .send()
        .await
        .expect("UpdateAccessKey");
    let job = adopt(&env, &name, json!({ "repair": true })).await;
    assert_permanent(&job, &[&made.access_key_id, "Inactive"]);

    iam.delete_access_key()
        .user_name(&bucket)
        .access_key_id(&made.access_key_id)
        .send()
        .await
        .expect("DeleteAccessKey");
    proxy(&env).reset_counts();
    let job = env.reconcile(&name).await;
    assert_permanent(
        &job,
        &[&made.access_key_id, "is not a key of IAM user", &bucket],
    );
    assert_nothing_created(&env);
    env.app.stop().await;
}

#[tokio::test]
async fn missing_runbook_resources_are_a_permanent_error_naming_them() {
    let env = env().await;
    let name = unique_name("adoptm");
    let bucket = bucket_for(&name);
    let made = HandMade {
        access_key_id: "AKIAHANDMADENOTINIAM".into(),
        secret_access_key: "hand/made+secret".into(),
        cipher_pass: runbook_by_hand::generate_cipher_pass(),
        s3_conf: String::new(),
    };
    let text = runbook_by_hand::runbook_s3_conf(&made);
    create_secret(&env, "zitadel", &bucket, &[("s3.conf", &text)]).await;
    let job = adopt(&env, &name, json!({})).await;
    assert_permanent(
        &job,
        &["s3-bucket", "iam-policy", "iam-user", "never creates"],
    );
    assert_eq!(
        proxy(&env).mutating_count(),
        0,
        "{:?}",
        proxy(&env).mutating()
    );

    let missing = adopt(
        &env,
        &unique_name("adopts"),
        json!({ "secret_name": "nope" }),
    )
    .await;
    assert_permanent(&missing, &["nope", "does not exist"]);
    env.app.stop().await;
}

#[tokio::test]
async fn without_adopt_a_hand_made_set_is_a_permanent_error_naming_what_is_in_the_way() {
    let env = env().await;
    let name = unique_name("noadopt");
    let bucket = bucket_for(&name);
    let made = runbook_by_hand(&env, &bucket, "zitadel").await;
    proxy(&env).reset_counts();
    let job = env
        .provision(json!({ "name": name, "namespace": env.ns("zitadel") }))
        .await;
    assert_permanent(&job, &[&bucket, "not managed by backup-provisioner"]);
    assert_eq!(
        proxy(&env).mutating_count(),
        0,
        "{:?}",
        proxy(&env).mutating()
    );
    let conf = env.s3_conf("zitadel", &bucket).await.expect("s3.conf");
    assert_eq!(conf, made.s3_conf, "left untouched");
    env.app.stop().await;
}

/// The Secret under another name: the hand-made IAM user and what goes with it are named.
#[tokio::test]
async fn without_adopt_a_hand_made_user_is_a_permanent_error_naming_the_set() {
    let env = env().await;
    let name = unique_name("noadoptp");
    let bucket = bucket_for(&name);
    let made = aws_by_hand(&env, &bucket).await;
    create_secret(
        &env,
        "zitadel",
        "pgo-s3-creds",
        &[("s3.conf", &pgo_s3_conf(&made))],
    )
    .await;
    proxy(&env).reset_counts();
    let body = json!({ "name": name, "namespace": env.ns("zitadel") });
    let path = "/v1/backup-repositories?dry_run=true";
    let planned = env.app.post_json(path, &env.app.operator(), &body).await;
    assert_eq!(
        planned.status(),
        422,
        "the dry run refuses as the job would"
    );
    let problem: Value = planned.json().await.unwrap();
    let user = format!("IAM user {bucket}");
    assert!(
        problem["detail"].as_str().unwrap().contains(&user),
        "{problem:#}"
    );
    let job = env.provision(body).await;
    let bucket_named = format!("bucket {bucket}");
    let policy = format!("IAM policy {bucket}");
    let group = format!("IAM group {bucket}");
    assert_permanent(
        &job,
        &[&user, &bucket_named, &policy, &group, "\"adopt\": true"],
    );
    assert_eq!(
        proxy(&env).mutating_count(),
        0,
        "{:?}",
        proxy(&env).mutating()
    );
    let keys = env
        .admin
        .iam
        .list_access_keys()
        .user_name(&bucket)
        .send()
        .await
        .unwrap();
    assert_eq!(
        keys.access_key_metadata().len(),
        1,
        "the hand-made key, untouched"
    );
    env.app.stop().await;
}

#[tokio::test]
async fn a_cipher_pass_change_is_refused_with_the_reason() {
    let env = Env::builder(&["zitadel"]).workers(0).start().await;
    let operator = env.app.operator();
    let body = json!({ "name": "zitadel", "namespace": env.ns("zitadel"), "cipher_pass": "x" });
    let response = env
        .app
        .post_json("/v1/backup-repositories", &operator, &body)
        .await;
    assert_eq!(response.status(), 422);
    let problem: Value = response.json().await.unwrap();
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("cannot re-encrypt") && detail.contains("new repository"),
        "{detail}"
    );

    let body = json!({ "name": "zitadel", "namespace": env.ns("zitadel") });
    let created = env
        .app
        .post_json("/v1/backup-repositories", &operator, &body)
        .await;
    assert_eq!(created.status(), 202);
    let path = "/v1/backup-repositories/zitadel/rotate-cipher-pass";
    let response = env.app.post_json(path, &operator, &json!({})).await;
    assert_eq!(response.status(), 409);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let problem: Value = response.json().await.unwrap();
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("cannot re-encrypt") && detail.contains("README"),
        "{detail}"
    );
    let unknown = "/v1/backup-repositories/nobody/rotate-cipher-pass";
    assert_eq!(
        env.app
            .post_json(unknown, &operator, &json!({}))
            .await
            .status(),
        404
    );
    let viewer = env.app.post_json(path, &env.app.viewer(), &json!({})).await;
    assert_eq!(viewer.status(), 403);
    env.app.stop().await;
}

#[tokio::test]
async fn adopt_switches_are_validated() {
    let env = Env::builder(&["zitadel"]).workers(0).start().await;
    let namespace = env.ns("zitadel");
    let cases = [
        (json!({ "secret_name": "pgo-s3-creds" }), "secret_name"),
        (json!({ "repair": true }), "repair"),
        (
            json!({ "adopt": true, "secret_name": "Not_A_Name" }),
            "secret_name",
        ),
    ];
    for (extra, field) in cases {
        let mut body = json!({ "name": "zitadel", "namespace": namespace });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let response = env
            .app
            .post_json("/v1/backup-repositories", &env.app.operator(), &body)
            .await;
        assert_eq!(response.status(), 422, "{body}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["errors"][0]["field"], field, "{problem:#}");
    }
    env.app.stop().await;
}

/// A user this service made whose tag was removed by hand is drift, not a hand-made set: the
/// repository recorded it, and a reconcile puts the tag back.
#[tokio::test]
async fn a_managed_user_that_lost_its_tag_is_repaired_not_refused() {
    let env = env().await;
    let name = unique_name("untag");
    let bucket = bucket_for(&name);
    let job = env
        .provision(json!({ "name": name, "namespace": env.ns("zitadel") }))
        .await;
    assert_eq!(job["state"], "succeeded", "job: {job:#}");
    let iam = &env.admin.iam;
    iam.untag_user()
        .user_name(&bucket)
        .tag_keys("managed-by")
        .send()
        .await
        .expect("UntagUser");
    let job = env.reconcile(&name).await;
    assert_eq!(job["state"], "succeeded", "job: {job:#}");
    let tags = iam
        .list_user_tags()
        .user_name(&bucket)
        .send()
        .await
        .unwrap();
    let managed = tags.tags().iter().any(|t| t.key() == "managed-by");
    assert!(managed, "the tag is back: {:?}", tags.tags());
    env.app.stop().await;
}

/// The sweep deletes keys of a repository's user that its Secret does not reference and whose
/// secret nobody holds: for an adopted repository those are hand-made keys, maybe in use (the
/// Secret in another layout references none the sweep can read; a second key may serve
/// another consumer). They are never swept.
#[tokio::test]
async fn the_sweep_never_deletes_an_adopted_repositorys_keys() {
    let env = env().await;
    let name = unique_name("adoptsw");
    let bucket = bucket_for(&name);
    let made = aws_by_hand(&env, &bucket).await;
    let iam = &env.admin.iam;
    let other = iam
        .create_access_key()
        .user_name(&bucket)
        .send()
        .await
        .unwrap();
    let other = other.access_key().unwrap().access_key_id().to_owned();
    create_secret(
        &env,
        "zitadel",
        &bucket,
        &[("s3.conf", &pgo_s3_conf(&made))],
    )
    .await;
    let job = adopt(&env, &name, json!({})).await;
    assert_eq!(job["state"], "succeeded", "job: {job:#}");

    let sweeper = backup_provisioner::provision::sweep::Sweeper {
        db: env.app.db.clone(),
        iam: iam.clone(),
        kube: env.kube.service_client(),
        keys: backup_provisioner::crypto::EncryptionKey::from_base64(&env.encryption_key)
            .expect("key")
            .into(),
        grace: std::time::Duration::ZERO,
    };
    sweeper.sweep_once().await.expect("sweep");
    let keys = iam
        .list_access_keys()
        .user_name(&bucket)
        .send()
        .await
        .unwrap();
    let mut ids: Vec<_> = keys
        .access_key_metadata()
        .iter()
        .filter_map(|k| k.access_key_id())
        .collect();
    ids.sort_unstable();
    let mut expected = vec![made.access_key_id.as_str(), other.as_str()];
    expected.sort_unstable();
    assert_eq!(ids, expected, "both hand-made keys are kept");
    env.app.stop().await;
}

/// After adoption with repair, the repository is ours like any other: rotating its key writes
/// the new key into the adopted Secret (under its own name), with the cipher pass byte for byte.
#[tokio::test]
async fn an_adopted_secret_under_another_name_is_where_a_rotation_writes() {
    let env = env().await;
    let name = unique_name("adoptk");
    let bucket = bucket_for(&name);
    let made = aws_by_hand(&env, &bucket).await;
    create_secret(
        &env,
        "zitadel",
        SECRET_ELSEWHERE,
        &[("s3.conf", &pgo_s3_conf(&made))],
    )
    .await;
    let body = json!({ "secret_name": SECRET_ELSEWHERE, "repair": true });
    let job = adopt(&env, &name, body).await;
    assert_eq!(job["state"], "succeeded", "job: {job:#}");

    let path = format!("/v1/backup-repositories/{name}/rotate-key");
    let response = env
        .app
        .post_json(&path, &env.app.operator(), &json!({}))
        .await;
    assert_eq!(response.status(), 202);
    let queued: Value = response.json().await.unwrap();
    let job_id = queued["job"]["id"].as_str().expect("job id").to_owned();
    let job = env
        .app
        .wait_for_job(&job_id, std::time::Duration::from_secs(90))
        .await;
    assert_eq!(job["state"], "succeeded", "rotation: {job:#}");
    let conf = env
        .s3_conf("zitadel", SECRET_ELSEWHERE)
        .await
        .expect("s3.conf");
    let (key, _, pass) = conf_values(&conf);
    assert_ne!(key, made.access_key_id, "a new key");
    assert_eq!(pass, made.cipher_pass, "the cipher pass, byte for byte");
    assert!(
        env.secret("zitadel", &bucket).await.is_none(),
        "no Secret under the bucket's name"
    );
    env.app.stop().await;
}

const SECRET_ELSEWHERE: &str = "pgo-s3-creds";
