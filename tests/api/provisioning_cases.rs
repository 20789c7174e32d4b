//! The provisioning job's safety cases, through the API with real workers, moto and the real
//! kube-apiserver: an existing Secret's cipher pass is reused; a bucket with objects and no
//! cipher pass, an unmanaged Secret in the way, a bucket owned by another account and permission
//! denied (AWS or Kubernetes) are permanent failures that say what to fix.

use std::time::Instant;

use aws_sdk_s3::primitives::ByteStream;
use backup_provisioner::domain::CipherPass;
use backup_provisioner::provision::policy;
use base64::Engine as _;
use serde_json::{Value, json};

use crate::support::env::{Env, REGION, bucket_for, conf_value, unique_name};
use crate::support::moto::Moto;

/// Creates a Secret in the test's `zitadel` namespace as `kubectl create` would (field manager
/// `kubectl-create`); returns it as stored.
async fn kubectl_create(env: &Env, secret: Value) -> Value {
    env.kube
        .create_secret_as("kubectl-create", env.ns("zitadel"), secret)
        .await
}

const MANAGED_BY: &str = "app.kubernetes.io/managed-by";

fn s3_conf_text(pass: &str, key_id: &str, secret: &str) -> String {
    format!(
        "[global]\nrepo2-cipher-pass={pass}\nrepo2-s3-key={key_id}\nrepo2-s3-key-secret={secret}\n\
         repo3-cipher-pass={pass}\nrepo3-s3-key={key_id}\nrepo3-s3-key-secret={secret}\n"
    )
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn new_pass() -> String {
    CipherPass::generate().expose().to_owned()
}

/// Asserts the job failed permanently (one attempt) and returns its `last_error`.
fn permanent_failure(job: &Value) -> String {
    assert_eq!(job["state"], "failed", "job: {job:#}");
    assert_eq!(
        job["attempts"], 1,
        "a permanent failure is not retried: {job:#}"
    );
    let error = job["last_error"]
        .as_str()
        .unwrap_or_else(|| panic!("no last_error: {job:#}"))
        .to_owned();
    eprintln!("permanent failure, as reported: {error}");
    error
}

async fn key_ids(env: &Env, user: &str) -> Vec<String> {
    env.admin
        .iam
        .list_access_keys()
        .user_name(user)
        .send()
        .await
        .expect("list access keys")
        .access_key_metadata()
        .iter()
        .filter_map(|k| k.access_key_id().map(str::to_owned))
        .collect()
}

/// Proves a key works by listing the bucket with it.
async fn assert_key_works(env: &Env, bucket: &str, key_id: &str, secret: &str) {
    env.admin
        .s3_with_static_credentials(&env.region, key_id, secret)
        .list_objects_v2()
        .bucket(bucket)
        .max_keys(1)
        .send()
        .await
        .unwrap_or_else(|e| panic!("the key in the Secret does not work: {e:?}"));
}

async fn bucket_with_an_object(env: &Env, bucket: &str) {
    let s3 = env.admin.s3_for_region(&env.region);
    s3.create_bucket()
        .bucket(bucket)
        .send()
        .await
        .unwrap_or_else(|e| panic!("create bucket {bucket}: {e:?}"));
    s3.put_object()
        .bucket(bucket)
        .key("archive/db/000000010000000000000001")
        .body(ByteStream::from_static(b"Salted__someone else's backup"))
        .send()
        .await
        .expect("put object");
}

/// The cipher pass step's audit detail `source` for a job.
async fn cipher_pass_source(env: &Env, job_id: &str) -> Value {
    let events: Value = env
        .app
        .get(
            &format!("/v1/jobs/{job_id}/events?limit=200"),
            &env.app.viewer(),
        )
        .await
        .json()
        .await
        .expect("events json");
    events["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|e| e["step"] == "cipher_pass" && e["outcome"] != "failed")
        .map(|e| e["detail"]["source"].clone())
        .unwrap_or_else(|| panic!("no cipher_pass event: {events:#}"))
}

#[tokio::test]
async fn an_existing_managed_secret_keeps_its_cipher_pass_and_gets_a_new_key() {
    let started = Instant::now();
    let env = Env::start(&["zitadel"]).await;
    let name = unique_name("exs");
    let bucket = bucket_for(&name);
    let pass = new_pass();
    let old_key = "AKIAOLDKEYNOTINIAM01";
    let old_secret = "oldSecretAccessKey/xyz+0123456789abcdefghij";
    kubectl_create(
        &env,
        json!({
            "metadata": {"name": bucket, "labels": {
                MANAGED_BY: "backup-provisioner",
                "holos.run/secret.name": bucket,
            }},
            "type": "Opaque",
            "data": {"s3.conf": b64(&s3_conf_text(&pass, old_key, old_secret))},
        }),
    )
    .await;

    let job = env
        .provision(json!({"name": name, "namespace": env.ns("zitadel")}))
        .await;
    assert_eq!(job["state"], "succeeded", "job: {job:#}");
    assert_eq!(env.repository(&name).await["state"], "ready");

    let conf = env.s3_conf("zitadel", &bucket).await.expect("the secret");
    assert_eq!(
        conf_value(&conf, "repo2-cipher-pass"),
        pass,
        "the cipher pass must be reused"
    );
    assert_eq!(conf_value(&conf, "repo3-cipher-pass"), pass);
    let key_id = conf_value(&conf, "repo2-s3-key");
    let secret = conf_value(&conf, "repo2-s3-key-secret");
    assert_ne!(key_id, old_key);
    assert_ne!(secret, old_secret);
    assert_eq!(
        key_ids(&env, &bucket).await,
        vec![key_id.clone()],
        "exactly the new key"
    );
    assert_key_works(&env, &bucket, &key_id, &secret).await;
    let job_id = job["id"].as_str().unwrap();
    assert_eq!(cipher_pass_source(&env, job_id).await, "secret");
    eprintln!(
        "existing managed secret: ready in {:.2?}",
        started.elapsed()
    );
    env.app.stop().await;
}

#[tokio::test]
async fn a_bucket_with_objects_and_no_cipher_pass_fails_unless_allowed() {
    let env = Env::start(&["zitadel"]).await;
    let name = unique_name("obj");
    let bucket = bucket_for(&name);
    bucket_with_an_object(&env, &bucket).await;

    let job = env
        .provision(json!({"name": name, "namespace": env.ns("zitadel")}))
        .await;
    let error = permanent_failure(&job);
    assert!(
        error.contains("allow_new_cipher_pass") && error.contains(&bucket),
        "{error}"
    );
    let repo = env.repository(&name).await;
    assert_eq!(repo["state"], "failed", "{repo:#}");
    assert_eq!(
        env.kube.mutating_count(),
        0,
        "nothing may be written to Kubernetes: {:?}",
        env.kube.mutating_requests()
    );
    assert!(env.secret("zitadel", &bucket).await.is_none());
    assert!(
        key_ids(&env, &bucket).await.is_empty(),
        "no access key is made before the cipher pass is settled"
    );
    assert_eq!(
        env.counter.mutating().get("iam:CreateAccessKey"),
        None,
        "{:?}",
        env.counter.mutating()
    );

    // Same situation, but the request explicitly allows a new cipher pass.
    let allowed = unique_name("obj");
    let allowed_bucket = bucket_for(&allowed);
    bucket_with_an_object(&env, &allowed_bucket).await;
    let job = env
        .provision(
            json!({"name": allowed, "namespace": env.ns("zitadel"), "allow_new_cipher_pass": true}),
        )
        .await;
    assert_eq!(job["state"], "succeeded", "job: {job:#}");
    assert_eq!(env.repository(&allowed).await["state"], "ready");
    let conf = env
        .s3_conf("zitadel", &allowed_bucket)
        .await
        .expect("the secret");
    let pass = conf_value(&conf, "repo2-cipher-pass");
    assert_eq!(pass.len(), 64);
    assert_eq!(
        cipher_pass_source(&env, job["id"].as_str().unwrap()).await,
        "generated"
    );
    // The existing objects are left alone.
    let listed = env
        .admin
        .s3
        .list_objects_v2()
        .bucket(&allowed_bucket)
        .send()
        .await
        .expect("list");
    assert_eq!(listed.key_count(), Some(1));
    env.app.stop().await;
}

#[tokio::test]
async fn an_unmanaged_secret_is_refused_before_any_aws_call_unless_adopted() {
    let env = Env::start(&["zitadel"]).await;
    let name = unique_name("unm");
    let bucket = bucket_for(&name);
    let theirs = kubectl_create(
        &env,
        json!({
            "metadata": {"name": bucket, "labels": {"team": "someone-else"}},
            "type": "Opaque",
            "data": {"password": b64("not ours")},
        }),
    )
    .await;
    env.kube.clear_requests();

    let job = env
        .provision(json!({"name": name, "namespace": env.ns("zitadel")}))
        .await;
    let error = permanent_failure(&job);
    assert!(
        error.contains(&format!("{}/{bucket}", env.ns("zitadel")))
            && error.contains("not managed by backup-provisioner")
            && error.contains("adopt_existing_secret"),
        "{error}"
    );
    let after = env.secret("zitadel", &bucket).await.expect("still there");
    assert_eq!(
        after["metadata"]["resourceVersion"],
        theirs["metadata"]["resourceVersion"]
    );
    assert_eq!(after["data"], theirs["data"]);
    assert_eq!(after["metadata"]["labels"], theirs["metadata"]["labels"]);
    assert_eq!(env.kube.mutating_count(), 0);
    assert_eq!(
        env.counter.mutating_count(),
        0,
        "the Secret is checked before AWS is touched: {:?}",
        env.counter.mutating()
    );
    assert_eq!(
        env.counter.read_count(),
        0,
        "no AWS call at all: {:?}",
        env.counter.reads()
    );

    // Another repository in the same situation asks to adopt the Secret, which holds an
    // s3.conf (with a key IAM does not know) and an extra key.
    let adopt = unique_name("adp");
    let adopt_bucket = bucket_for(&adopt);
    let pass = new_pass();
    kubectl_create(
        &env,
        json!({
            "metadata": {"name": adopt_bucket},
            "type": "Opaque",
            "data": {
                "s3.conf": b64(&s3_conf_text(&pass, "AKIAHANDMADE00000001", "handmade/secret")),
                "notes": b64("written by hand"),
            },
        }),
    )
    .await;
    let job = env
        .provision(
            json!({"name": adopt, "namespace": env.ns("zitadel"), "adopt_existing_secret": true}),
        )
        .await;
    assert_eq!(job["state"], "succeeded", "job: {job:#}");
    assert_eq!(env.repository(&adopt).await["state"], "ready");
    let secret = env.secret("zitadel", &adopt_bucket).await.expect("secret");
    assert_eq!(
        secret["metadata"]["labels"][MANAGED_BY],
        "backup-provisioner"
    );
    assert_eq!(
        secret["metadata"]["labels"]["holos.run/secret.name"],
        adopt_bucket.as_str()
    );
    let keys: Vec<&String> = secret["data"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["s3.conf"], "only s3.conf remains");
    let conf = env.s3_conf("zitadel", &adopt_bucket).await.unwrap();
    assert_eq!(
        conf_value(&conf, "repo2-cipher-pass"),
        pass,
        "the adopted cipher pass is kept"
    );
    let key_id = conf_value(&conf, "repo2-s3-key");
    assert_eq!(key_ids(&env, &adopt_bucket).await, vec![key_id.clone()]);
    assert_key_works(
        &env,
        &adopt_bucket,
        &key_id,
        &conf_value(&conf, "repo2-s3-key-secret"),
    )
    .await;
    env.app.stop().await;
}

/// moto lets every account use every bucket unless `MOTO_S3_ALLOW_CROSSACCOUNT_ACCESS=false`;
/// with it, another account's bucket answers 403 as on AWS. The other account is selected with
/// moto's `x-moto-account-id` header.
#[tokio::test]
async fn a_bucket_owned_by_another_account_is_a_permanent_failure() {
    let moto = Moto::with_env(&[("MOTO_S3_ALLOW_CROSSACCOUNT_ACCESS", "false")]);
    let name = unique_name("oth");
    let bucket = bucket_for(&name);
    let admin = moto.clients(REGION, None).await;
    admin
        .s3
        .create_bucket()
        .bucket(&bucket)
        .customize()
        .mutate_request(|request| {
            request
                .headers_mut()
                .insert("x-moto-account-id", "111111111111");
        })
        .send()
        .await
        .expect("the other account creates the bucket");
    // Our account sees it as someone else's.
    let head = admin.s3.head_bucket().bucket(&bucket).send().await;
    let head = head.expect_err("another account's bucket is not readable");
    assert_eq!(
        backup_provisioner::cloud::aws::http_status(&head),
        Some(403)
    );
    // (AWS answers CreateBucket with 409 BucketAlreadyExists here; this moto mode answers 403.)
    let create = admin.s3.create_bucket().bucket(&bucket).send().await;
    create.expect_err("the name is taken");

    let env = Env::builder(&["zitadel"]).moto(&moto).start().await;
    let job = env
        .provision(json!({"name": name, "namespace": env.ns("zitadel")}))
        .await;
    let error = permanent_failure(&job);
    assert!(
        error.contains(&bucket) && error.contains("owned by another AWS account"),
        "{error}\n--- moto log ---\n{}",
        moto.log()
    );
    assert!(
        !env.counter.mutating().contains_key("s3:CreateBucket"),
        "{:?}",
        env.counter.mutating()
    );
    assert!(env.secret("zitadel", &bucket).await.is_none());
    assert_eq!(env.repository(&name).await["state"], "failed");
    env.app.stop().await;
}

/// moto with IAM authorization enforced: the bootstrap (unauthenticated) requests make the
/// service's identity, allowed everything but `iam:CreateUser`.
///
/// moto's signature check fails for form parameters containing spaces (the SDK encodes them as
/// `%20`, moto recomputes the signature differently), so CreatePolicy with the runbook's
/// description is rejected with SignatureDoesNotMatch under enforced auth. The policy is
/// therefore made during the bootstrap; the job finds it as already present.
#[tokio::test]
async fn aws_access_denied_is_a_permanent_failure_naming_the_operation() {
    const BOOTSTRAP_REQUESTS: u32 = 4;
    const SERVICE_USER: &str = "bp-service";
    let moto = Moto::with_iam_auth(BOOTSTRAP_REQUESTS);
    let bootstrap = moto.clients(REGION, None).await;
    bootstrap
        .iam
        .create_user()
        .user_name(SERVICE_USER)
        .send()
        .await
        .expect("create the service user");
    bootstrap
        .iam
        .put_user_policy()
        .user_name(SERVICE_USER)
        .policy_name("all-but-create-user")
        .policy_document(
            json!({
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Action": "*", "Resource": "*"},
                    {"Effect": "Deny", "Action": "iam:CreateUser", "Resource": "*"},
                ]
            })
            .to_string(),
        )
        .send()
        .await
        .expect("service policy");
    let key = bootstrap
        .iam
        .create_access_key()
        .user_name(SERVICE_USER)
        .send()
        .await
        .expect("service key")
        .access_key
        .expect("access key");
    let (id, secret) = (key.access_key_id(), key.secret_access_key());
    let name = unique_name("den");
    let bucket = bucket_for(&name);
    bootstrap
        .iam
        .create_policy()
        .policy_name(&bucket)
        .description(policy::DESCRIPTION)
        .policy_document(policy::document(&bucket).to_string())
        .send()
        .await
        .expect("the runbook policy");

    let env = Env::builder(&["zitadel"])
        .moto(&moto)
        .aws_identity(id, secret)
        .start()
        .await;
    let job = env
        .provision(json!({"name": name, "namespace": env.ns("zitadel")}))
        .await;
    let error = permanent_failure(&job);
    assert!(
        error.contains("iam:CreateUser") && error.contains("access denied"),
        "{error}\n--- moto log (tail) ---\n{}",
        tail(&moto.log(), 30)
    );
    // The steps before it did their work under the enforced policy.
    let steps = job["steps"].as_array().expect("steps");
    let state = |step: &str| {
        steps
            .iter()
            .find(|s| s["name"] == step)
            .map(|s| s["state"].clone())
    };
    assert_eq!(state("bucket"), Some(json!("succeeded")), "{job:#}");
    assert_eq!(state("policy"), Some(json!("succeeded")), "{job:#}");
    assert_eq!(state("group"), Some(json!("succeeded")), "{job:#}");
    assert_eq!(state("user"), Some(json!("failed")), "{job:#}");
    assert_eq!(env.kube.mutating_count(), 0);
    let user = env.admin.iam.get_user().user_name(&bucket).send().await;
    assert!(user.is_err(), "the user must not exist");
    env.app.stop().await;
}

#[tokio::test]
async fn kubernetes_permission_denied_is_a_permanent_failure_naming_the_permission() {
    // The shipped Role is bound in `elsewhere` only: the ServiceAccount may not touch Secrets
    // in `zitadel`.
    let env = Env::builder(&["zitadel", "elsewhere"])
        .service_bound_in(&["elsewhere"])
        .start()
        .await;
    let name = unique_name("rbac");
    let job = env
        .provision(json!({"name": name, "namespace": env.ns("zitadel")}))
        .await;
    let error = permanent_failure(&job);
    assert!(
        error.contains("permission denied")
            && error.contains(&env.kube.service_user)
            && error.contains("\"get\" verb on \"secrets\"")
            && error.contains(&format!("in namespace \"{}\"", env.ns("zitadel"))),
        "{error}"
    );
    assert_eq!(
        env.counter.mutating_count(),
        0,
        "{:?}",
        env.counter.mutating()
    );
    assert_eq!(env.kube.mutating_count(), 0);
    assert_eq!(env.repository(&name).await["state"], "failed");
    env.app.stop().await;
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
