//! `DELETE /v1/backup-repositories/{name}` end to end: moto for S3/IAM, the real kube-apiserver
//! for the Secret (the service as the ServiceAccount and Role of `deploy/base/rbac.yaml`), the real
//! deprovisioning job on real workers. What it removes (read back through the SDK and the
//! Kubernetes API), what it keeps (the bucket and its objects, the record, the audit log), the
//! refusals (a non-empty bucket without the confirmation, a Role without `delete`), dry runs
//! (zero mutating AWS calls at the realism proxy), a failure mid-way and its retry, and the same
//! name created again.

use std::time::Duration;

use backup_provisioner::auth::Role;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

use crate::http_common::{REPOSITORIES, assert_problem, create_repository, job_id};
use backup_provisioner::cloud::aws::CallCounter;
use backup_provisioner::crypto::EncryptionKey;
use backup_provisioner::jobs::{Job, Registry, WorkerConfig, WorkerPool, queue};
use backup_provisioner::provision::deprovision::Deprovisioner;
use backup_provisioner::provision::sweep::{Sweeper, Swept};
use tokio_util::sync::CancellationToken;

use crate::support::app::{TestApp, eventually, spawn_app};
use crate::support::aws_realism::{AwsRealism, Canned};
use crate::support::crash_child::{self, ChildSpec};
use crate::support::env::{Env, bucket_for, conf_value, unique_name};
use crate::support::kube_proxy::{Fault as KubeFault, Held, Hold};
use crate::support::moto::Moto;
use crate::support::rbac::Rbac;

const STEPS: [&str; 8] = [
    "deactivate_keys",
    "remove_secret",
    "delete_keys",
    "leave_group",
    "delete_user",
    "delete_group",
    "delete_policy",
    "bucket",
];

fn admin(app: &TestApp) -> String {
    app.token("admin@test", &[Role::Admin])
}

/// `DELETE /v1/backup-repositories/{name}{query}` as an admin, with an optional JSON body.
async fn delete(app: &TestApp, name: &str, query: &str, body: Option<Value>) -> reqwest::Response {
    let mut request = app
        .client
        .delete(app.url(&format!("{REPOSITORIES}/{name}{query}")))
        .bearer_auth(admin(app));
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.expect("request")
}

/// Deprovisions `name` (asserting 202 and the job's Location) and waits for the job.
async fn deprovision(env: &Env, name: &str, query: &str, body: Option<Value>) -> Value {
    let response = delete(&env.app, name, query, body).await;
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(location, format!("/v1/jobs/{}", job_id(&accepted)));
    assert_eq!(accepted["job"]["kind"], "deprovision-repository");
    assert_eq!(accepted["repository"]["state"], "deprovisioning");
    env.app
        .wait_for_job(&job_id(&accepted), Duration::from_secs(90))
        .await
}

/// The IAM entities of `bucket` that still exist: `user`, `group`, `policy`, `key:<id>`.
async fn iam_leftovers(env: &Env, bucket: &str) -> Vec<String> {
    let iam = &env.admin.iam;
    let mut left = Vec::new();
    if iam.get_user().user_name(bucket).send().await.is_ok() {
        left.push("user".to_owned());
        let keys = iam
            .list_access_keys()
            .user_name(bucket)
            .send()
            .await
            .unwrap();
        for key in keys.access_key_metadata() {
            left.push(format!("key:{}", key.access_key_id().unwrap_or_default()));
        }
    }
    if iam.get_group().group_name(bucket).send().await.is_ok() {
        left.push("group".to_owned());
    }
    let policies = iam
        .list_policies()
        .scope(aws_sdk_iam::types::PolicyScopeType::Local)
        .max_items(1000)
        .send()
        .await
        .unwrap();
    if policies
        .policies()
        .iter()
        .any(|p| p.policy_name() == Some(bucket))
    {
        left.push("policy".to_owned());
    }
    left
}

async fn put_object(env: &Env, bucket: &str, key: &str) {
    env.admin
        .s3
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(b"backup".to_vec().into())
        .send()
        .await
        .expect("put object");
}

/// The bucket's object keys, or None when the bucket does not exist.
async fn objects(env: &Env, bucket: &str) -> Option<Vec<String>> {
    let listed = env.admin.s3.list_objects_v2().bucket(bucket).send().await;
    listed.ok().map(|out| {
        out.contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_owned))
            .collect()
    })
}

/// Provisions `name` in the test's `zitadel` namespace and asserts it is ready.
async fn provisioned(env: &Env, name: &str) {
    let job = env
        .provision(json!({"name": name, "namespace": env.ns("zitadel")}))
        .await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
}

async fn audit_actions(app: &TestApp, name: &str) -> Vec<String> {
    let url = format!("/v1/audit?repository={name}&limit=200");
    let page: Value = app.get(&url, &app.viewer()).await.json().await.unwrap();
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect()
}

fn step_names(job: &Value) -> Vec<&str> {
    job["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn deprovision_removes_every_iam_entity_and_the_secret_and_keeps_the_bucket() {
    let env = Env::start(&["zitadel"]).await;
    let name = unique_name("dp");
    let bucket = bucket_for(&name);
    provisioned(&env, &name).await;
    put_object(&env, &bucket, "archive/db/000001.gz").await;
    assert_eq!(
        iam_leftovers(&env, &bucket).await.len(),
        4,
        "user, key, group, policy"
    );

    let job = deprovision(&env, &name, "", None).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(step_names(&job), STEPS);
    assert!(iam_leftovers(&env, &bucket).await.is_empty());
    assert!(
        env.secret("zitadel", &bucket).await.is_none(),
        "the Secret is gone"
    );
    assert_eq!(
        objects(&env, &bucket).await,
        Some(vec!["archive/db/000001.gz".to_owned()]),
        "the bucket and its backups are kept"
    );
    let repo = env.repository(&name).await;
    assert_eq!(repo["state"], "deleted", "{repo:#}");
    assert_eq!(repo["last_job"]["kind"], "deprovision-repository");
    let sealed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM secret_material m JOIN backup_repositories r ON r.id = m.repository_id
          WHERE r.name = $1",
    )
    .bind(&name)
    .fetch_one(&env.app.db)
    .await
    .unwrap();
    assert_eq!(sealed, 0);
    let actions = audit_actions(&env.app, &name).await;
    for action in ["repository.create", "repository.deprovision"] {
        assert!(actions.iter().any(|a| a == action), "{action}: {actions:?}");
    }
    for step in STEPS {
        let action = format!("deprovision-repository.{step}");
        assert!(actions.contains(&action), "{action}: {actions:?}");
    }

    // A deleted repository is gone for every operation but GET.
    let operator = env.app.operator();
    for operation in ["reconcile", "verify", "rotate-key"] {
        let path = format!("{REPOSITORIES}/{name}/{operation}");
        let response = env.app.post_json(&path, &operator, &json!({})).await;
        assert_problem(response, 404).await;
    }
    assert_problem(delete(&env.app, &name, "", None).await, 404).await;
}

#[tokio::test]
async fn a_non_empty_bucket_is_deleted_only_with_the_confirmation_and_force() {
    let env = Env::start(&["zitadel"]).await;
    let name = unique_name("dpb");
    let bucket = bucket_for(&name);
    provisioned(&env, &name).await;
    put_object(&env, &bucket, "backup.history/1").await;
    env.counter.reset();

    let refused = delete(&env.app, &name, "?delete_bucket=true", None).await;
    let problem = assert_problem(refused, 422).await;
    let detail = problem["detail"].as_str().unwrap();
    let confirmation = format!("{{\"confirm\": \"{bucket}\", \"force\": true}}");
    assert!(detail.contains(&confirmation), "{detail}");
    for (query, body) in [
        (
            "?delete_bucket=true",
            json!({"confirm": "another-bucket", "force": true}),
        ),
        ("?delete_bucket=true", json!({"force": true})),
        ("", json!({"confirm": bucket, "force": true})),
        (
            "?delete_bucket=true",
            json!({"confirm": bucket, "force": "yes"}),
        ),
    ] {
        let response = delete(&env.app, &name, query, Some(body.clone())).await;
        assert_problem(response, 422).await;
    }
    assert_eq!(
        env.counter.mutating_count(),
        0,
        "{:?}",
        env.counter.mutating()
    );
    assert_eq!(env.repository(&name).await["state"], "ready");
    let jobs: Value = env
        .app
        .get(&format!("/v1/jobs?repository={name}"), &env.app.viewer())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(jobs["items"].as_array().unwrap().len(), 1, "{jobs}");

    let body = json!({"confirm": bucket, "force": true});
    let job = deprovision(&env, &name, "?delete_bucket=true", Some(body)).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(objects(&env, &bucket).await, None, "the bucket is deleted");
    assert!(iam_leftovers(&env, &bucket).await.is_empty());
}

#[tokio::test]
async fn a_dry_run_makes_no_mutating_call_and_changes_nothing() {
    let env = Env::builder(&["zitadel"])
        .aws_realism(AwsRealism::off())
        .start()
        .await;
    let proxy = env.realism.as_ref().unwrap();
    let name = unique_name("dpd");
    let bucket = bucket_for(&name);
    provisioned(&env, &name).await;
    put_object(&env, &bucket, "backup.info").await;
    proxy.reset_counts();

    let response = delete(&env.app, &name, "?dry_run=true", None).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["dry_run"], true);
    assert_eq!(answer["kind"], "deprovision-repository");
    let plan = answer["plan"].as_array().unwrap();
    let actions: Vec<(&str, &str)> = plan
        .iter()
        .map(|r| {
            let resource = &r["resource"];
            (
                resource["kind"].as_str().unwrap(),
                resource["action"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("iam-access-keys", "update"),
            ("kube-secret", "delete"),
            ("iam-access-keys", "delete"),
            ("iam-group-membership", "delete"),
            ("iam-user", "delete"),
            ("iam-group", "delete"),
            ("iam-policy", "delete"),
            ("s3-bucket", "leave"),
        ],
        "{answer:#}"
    );
    assert_eq!(plan[0]["settings"][0]["expected"], "Inactive");
    assert_eq!(plan[0]["settings"][0]["actual"], "Active");

    let body = json!({"confirm": bucket, "force": true});
    let query = "?dry_run=true&delete_bucket=true";
    let response = delete(&env.app, &name, query, Some(body)).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    let last = &answer["plan"][7];
    assert_eq!(last["resource"]["action"], "delete", "{answer:#}");
    assert_eq!(last["settings"][0]["actual"], 1);
    let refused = delete(&env.app, &name, query, None).await;
    assert_problem(refused, 422).await;

    assert_eq!(proxy.mutating_count(), 0, "{:?}", proxy.mutating());
    assert!(proxy.read_count() > 0);
    assert_eq!(env.repository(&name).await["state"], "ready");
    assert!(env.secret("zitadel", &bucket).await.is_some());
    assert_eq!(iam_leftovers(&env, &bucket).await.len(), 4);
    let url = format!("/v1/jobs?repository={name}&kind=deprovision-repository");
    let jobs: Value = env
        .app
        .get(&url, &env.app.viewer())
        .await
        .json()
        .await
        .unwrap();
    assert!(jobs["items"].as_array().unwrap().is_empty(), "{jobs}");
}

#[tokio::test]
async fn the_same_name_created_again_after_deletion_is_a_new_repository() {
    let env = Env::start(&["zitadel"]).await;
    let name = unique_name("dpr");
    let bucket = bucket_for(&name);
    provisioned(&env, &name).await;
    // The bucket is empty: delete_bucket needs no confirmation.
    let job = deprovision(&env, &name, "?delete_bucket=true", None).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(objects(&env, &bucket).await, None);

    provisioned(&env, &name).await;
    let repo = env.repository(&name).await;
    assert_eq!(repo["state"], "ready", "{repo:#}");
    assert!(env.secret("zitadel", &bucket).await.is_some());
    let rows: Vec<(uuid::Uuid, String)> = sqlx::query_as(
        "SELECT id, state FROM backup_repositories WHERE name = $1 ORDER BY created_at",
    )
    .bind(&name)
    .fetch_all(&env.app.db)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_ne!(rows[0].0, rows[1].0);
    assert_eq!(
        (rows[0].1.as_str(), rows[1].1.as_str()),
        ("deleted", "ready")
    );
    let url = format!("{REPOSITORIES}?state=deleted");
    let deleted: Value = env
        .app
        .get(&url, &env.app.viewer())
        .await
        .json()
        .await
        .unwrap();
    assert!(
        deleted["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == name.as_str()),
        "{deleted}"
    );
    let actions = audit_actions(&env.app, &name).await;
    let creates = actions.iter().filter(|a| *a == "repository.create").count();
    assert_eq!(creates, 2, "one audit history for the name: {actions:?}");
}

#[tokio::test]
async fn a_failure_mid_way_fails_the_job_and_its_retry_converges() {
    let env = Env::builder(&["zitadel"])
        .aws_realism(AwsRealism::off())
        .start()
        .await;
    let proxy = env.realism.as_ref().unwrap();
    let name = unique_name("dpf");
    let bucket = bucket_for(&name);
    provisioned(&env, &name).await;
    proxy.answer("iam:DeleteGroup", Some(&bucket), Canned::access_denied());

    let job = deprovision(&env, &name, "", None).await;
    assert_eq!(job["state"], "failed", "{job:#}");
    let error = job["last_error"].as_str().unwrap();
    assert!(error.contains("iam:DeleteGroup"), "{error}");
    let repo = env.repository(&name).await;
    assert_eq!(repo["state"], "failed");
    assert_eq!(iam_leftovers(&env, &bucket).await, ["group", "policy"]);

    proxy.clear_answers();
    let id = job["id"].as_str().unwrap();
    let url = format!("/v1/jobs/{id}/retry");
    let response = env
        .app
        .post_json(&url, &env.app.operator(), &json!({}))
        .await;
    assert_eq!(response.status(), 202);
    let job = env.app.wait_for_job(id, Duration::from_secs(90)).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert!(iam_leftovers(&env, &bucket).await.is_empty());
    assert_eq!(env.repository(&name).await["state"], "deleted");
    assert_eq!(
        proxy.count("iam:DeleteUser"),
        1,
        "finished steps are not redone"
    );
    assert_eq!(proxy.count("iam:DeleteGroup"), 2);
}

/// A Secret that is not labelled as ours and that the repository did not record is left.
#[tokio::test]
async fn a_secret_that_is_not_ours_is_left_in_place() {
    let env = Env::start(&["zitadel"]).await;
    let name = unique_name("dps");
    let bucket = bucket_for(&name);
    provisioned(&env, &name).await;
    let secrets: Api<Secret> = Api::namespaced(env.kube.admin(), env.ns("zitadel"));
    let unlabel = json!({"metadata": {"labels": {"app.kubernetes.io/managed-by": null}}});
    secrets
        .patch(&bucket, &PatchParams::default(), &Patch::Merge(&unlabel))
        .await
        .unwrap();
    sqlx::query("UPDATE backup_repositories SET resources = resources - 'secret' WHERE name = $1")
        .bind(&name)
        .execute(&env.app.db)
        .await
        .unwrap();

    let job = deprovision(&env, &name, "", None).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert!(
        env.secret("zitadel", &bucket).await.is_some(),
        "left in place"
    );
    assert!(iam_leftovers(&env, &bucket).await.is_empty());
    let url = format!("/v1/jobs/{}/events", job["id"].as_str().unwrap());
    let events: Value = env
        .app
        .get(&url, &env.app.viewer())
        .await
        .json()
        .await
        .unwrap();
    let secret_step = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["step"] == "remove_secret")
        .expect("the Secret step's entry");
    assert_eq!(secret_step["outcome"], "left", "{secret_step:#}");
    assert_eq!(secret_step["detail"]["resource"]["action"], "leave");
}

/// A Role without `delete` fails the job at once, naming the verb, before any AWS change.
#[tokio::test]
async fn a_role_without_delete_fails_deprovisioning_before_any_change() {
    let rbac = Rbac::shipped();
    let env = Env::builder(&["zitadel"])
        .service_rules("zitadel", rbac.rules_without("delete"))
        .start()
        .await;
    let name = unique_name("dpk");
    let bucket = bucket_for(&name);
    provisioned(&env, &name).await;
    env.counter.reset();

    let job = deprovision(&env, &name, "", None).await;
    assert_eq!(job["state"], "failed", "{job:#}");
    assert_eq!(job["attempts"], 1, "a 403 is not retried");
    let error = job["last_error"].as_str().unwrap();
    assert!(
        error.contains("the \"delete\" verb on \"secrets\""),
        "{error}"
    );
    assert_eq!(
        env.counter.mutating_count(),
        0,
        "{:?}",
        env.counter.mutating()
    );
    assert!(env.secret("zitadel", &bucket).await.is_some());
    assert_eq!(iam_leftovers(&env, &bucket).await.len(), 4);
    let repo = env.repository(&name).await;
    assert_eq!(
        repo["state"], "ready",
        "refused before any change: {repo:#}"
    );
}

/// Without workers: roles, busy repositories, unknown names, a dry run this replica cannot make.
#[tokio::test]
async fn deprovision_requests_are_refused_when_they_cannot_run() {
    let app = spawn_app().await;
    let created = create_repository(
        &app,
        &app.operator(),
        &json!({"name": "zitadel", "namespace": "zitadel"}),
    )
    .await;
    let url = app.url(&format!("{REPOSITORIES}/zitadel"));
    for token in [app.viewer(), app.operator()] {
        let response = app
            .client
            .delete(&url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_problem(response, 403).await;
    }
    assert_problem(delete(&app, "nobody", "", None).await, 404).await;
    // Its provisioning job is queued: busy.
    assert_problem(delete(&app, "zitadel", "", None).await, 409).await;
    let cancel = format!("/v1/jobs/{}/cancel", job_id(&created));
    let response = app.post_json(&cancel, &app.operator(), &json!({})).await;
    assert_eq!(response.status(), 202);
    // No worker can plan here: 503, nothing queued.
    assert_problem(delete(&app, "zitadel", "?dry_run=true", None).await, 503).await;
    let bad = app
        .client
        .delete(&url)
        .bearer_auth(admin(&app))
        .header("content-type", "text/plain")
        .body("confirm")
        .send()
        .await
        .unwrap();
    assert_problem(bad, 415).await;
    assert_problem(delete(&app, "zitadel", "?bogus=1", None).await, 400).await;
    // As if provisioned (no worker here): a deprovision cancelled before its first step
    // leaves the repository ready, not cancelled.
    sqlx::query("UPDATE backup_repositories SET state = 'ready' WHERE name = 'zitadel'")
        .execute(&app.db)
        .await
        .unwrap();
    let response = delete(&app, "zitadel", "", None).await;
    assert_eq!(response.status(), 202);
    let cancel = format!(
        "/v1/jobs/{}/cancel",
        job_id(&response.json().await.unwrap())
    );
    let response = app.post_json(&cancel, &app.operator(), &json!({})).await;
    assert_eq!(response.status(), 202);
    let state: String =
        sqlx::query_scalar("SELECT state FROM backup_repositories WHERE name = 'zitadel'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(state, "ready", "the state it had before the deprovision");
    let response = delete(&app, "zitadel", "", None).await;
    assert_eq!(response.status(), 202);
    assert_problem(delete(&app, "zitadel", "", None).await, 409).await;
    // Created again while it is being deleted: busy too.
    let body = json!({"name": "zitadel", "namespace": "zitadel"});
    let response = app.post_json(REPOSITORIES, &app.operator(), &body).await;
    assert_problem(response, 409).await;
    app.stop().await;
}

/// An adopted repository: its Secret has another name (`pgo-s3-creds`, recorded by the
/// repository, no label of ours) and its user lacks our tags. A user neither tagged nor
/// recorded is refused before any change; once recorded, both are removed.
#[tokio::test]
async fn an_adopted_repository_loses_its_recorded_secret_and_user_but_nothing_unrecorded() {
    let env = Env::start(&["zitadel"]).await;
    let name = unique_name("dpa");
    let bucket = bucket_for(&name);
    provisioned(&env, &name).await;
    let namespace = env.ns("zitadel").to_owned();
    let conf = env.s3_conf("zitadel", &bucket).await.unwrap();
    let secret = json!({"metadata": {"name": "pgo-s3-creds"}, "stringData": {"s3.conf": conf}});
    env.kube
        .create_secret_as("kubectl", &namespace, secret)
        .await;
    assert!(env.kube.delete_secret(&namespace, &bucket).await);
    let iam = &env.admin.iam;
    iam.untag_user()
        .user_name(&bucket)
        .tag_keys("managed-by")
        .send()
        .await
        .unwrap();
    let recorded = json!({"secret": {"namespace": namespace, "name": "pgo-s3-creds"}});
    sqlx::query(
        "UPDATE backup_repositories SET resources = (resources - 'user') || $2 WHERE name = $1",
    )
    .bind(&name)
    .bind(&recorded)
    .execute(&env.app.db)
    .await
    .unwrap();
    env.counter.reset();

    let job = deprovision(&env, &name, "", None).await;
    assert_eq!(job["state"], "failed", "{job:#}");
    let error = job["last_error"].as_str().unwrap();
    assert!(error.contains("not made by backup-provisioner"), "{error}");
    assert_eq!(
        env.counter.mutating_count(),
        0,
        "{:?}",
        env.counter.mutating()
    );

    sqlx::query("UPDATE backup_repositories SET resources = resources || $2 WHERE name = $1")
        .bind(&name)
        .bind(json!({"user": bucket}))
        .execute(&env.app.db)
        .await
        .unwrap();
    let job = deprovision(&env, &name, "", None).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert!(env.secret("zitadel", "pgo-s3-creds").await.is_none());
    assert!(iam_leftovers(&env, &bucket).await.is_empty());
}

/// The status of access key `key` of user `bucket`.
async fn key_status(env: &Env, bucket: &str, key: &str) -> String {
    let listed = env
        .admin
        .iam
        .list_access_keys()
        .user_name(bucket)
        .send()
        .await;
    let listed = listed.expect("list keys");
    let found = listed
        .access_key_metadata()
        .iter()
        .find(|k| k.access_key_id() == Some(key));
    found
        .and_then(|k| k.status())
        .expect("the key")
        .as_str()
        .to_owned()
}

/// A deprovisioning job whose Secret DELETE (the real one, not the preflight's dry run) is held
/// at the kube proxy: the keys are deactivated by then. Returns the job's id, the key the
/// Secret references, the Secret's path and the held request.
async fn deprovision_held_at_the_secret(env: &Env, name: &str) -> (String, String, String, Held) {
    let bucket = bucket_for(name);
    provisioned(env, name).await;
    let conf = env.s3_conf("zitadel", &bucket).await.unwrap();
    let key = conf_value(&conf, "repo2-s3-key");
    let path = format!("/api/v1/namespaces/{}/secrets/{bucket}", env.ns("zitadel"));
    // The first DELETE is the preflight's dry run (kube-rs sends `dryRun` in the body).
    let mut held = env.kube.proxy.hold(Hold::next("DELETE", &path).skip(1));
    let response = delete(&env.app, name, "", None).await;
    assert_eq!(response.status(), 202);
    let job = job_id(&response.json().await.unwrap());
    let request = tokio::time::timeout(Duration::from_secs(60), held.recv()).await;
    let request = request.expect("the Secret's DELETE in time").expect("held");
    let status = key_status(env, &bucket, &key).await;
    assert_eq!(status, "Inactive", "deactivated before the Secret goes");
    (job, key, path, request)
}

/// The job fails for good after deactivating the keys and before removing the Secret (its
/// DELETE answered 403), which still references one: on its way out the job makes the keys
/// active again (audited), so the repository is ready again; a retry deactivates them again
/// and finishes the deprovisioning.
#[tokio::test]
async fn a_job_failing_before_the_secret_is_removed_reactivates_the_keys() {
    let env = Env::start(&["zitadel"]).await;
    let name = unique_name("dpu");
    let bucket = bucket_for(&name);
    let (job, key, path, request) = deprovision_held_at_the_secret(&env, &name).await;
    let forbidden = KubeFault::status(403).method("DELETE").path_prefix(&path);
    env.kube.proxy.inject_fault(forbidden);
    drop(request);
    let ended = env.app.wait_for_job(&job, Duration::from_secs(90)).await;
    assert_eq!(ended["state"], "failed", "{ended:#}");
    assert_eq!(key_status(&env, &bucket, &key).await, "Active");
    assert!(env.secret("zitadel", &bucket).await.is_some());
    let repo = env.repository(&name).await;
    assert_eq!(repo["state"], "ready", "nothing left changed: {repo:#}");
    let actions = audit_actions(&env.app, &name).await;
    let undo = "deprovision-repository.reactivate_keys".to_owned();
    assert!(actions.contains(&undo), "{actions:?}");

    let retry = format!("/v1/jobs/{job}/retry");
    let response = env
        .app
        .post_json(&retry, &env.app.operator(), &json!({}))
        .await;
    assert_eq!(response.status(), 202);
    let ended = env.app.wait_for_job(&job, Duration::from_secs(90)).await;
    assert_eq!(
        ended["state"], "succeeded",
        "the retry continues: {ended:#}"
    );
    assert!(iam_leftovers(&env, &bucket).await.is_empty());
    assert!(env.secret("zitadel", &bucket).await.is_none());
    assert_eq!(env.repository(&name).await["state"], "deleted");
}

/// Cancelled after deactivating the keys (the Secret's DELETE then fails, retryably): the next
/// attempt stops at its first step and makes the keys active again on its way out.
#[tokio::test]
async fn a_cancel_before_the_secret_is_removed_reactivates_the_keys() {
    let env = Env::start(&["zitadel"]).await;
    let name = unique_name("dpv");
    let bucket = bucket_for(&name);
    let (job, key, path, request) = deprovision_held_at_the_secret(&env, &name).await;
    let cancel = format!("/v1/jobs/{job}/cancel");
    let response = env
        .app
        .post_json(&cancel, &env.app.operator(), &json!({}))
        .await;
    assert_eq!(response.status(), 202);
    let unavailable = KubeFault::status(503).method("DELETE").path_prefix(&path);
    env.kube.proxy.inject_fault(unavailable);
    drop(request);
    let ended = env.app.wait_for_job(&job, Duration::from_secs(90)).await;
    assert_eq!(ended["state"], "cancelled", "{ended:#}");
    assert_eq!(key_status(&env, &bucket, &key).await, "Active");
    let repo = env.repository(&name).await;
    assert_eq!(repo["state"], "ready", "{repo:#}");
    let actions = audit_actions(&env.app, &name).await;
    let undo = "deprovision-repository.reactivate_keys".to_owned();
    assert!(actions.contains(&undo), "{actions:?}");
}

/// Cancelled while queued for its next attempt (no worker runs it to undo anything) after
/// deactivating the keys: the repository's last_error names the inactive keys and how to make
/// them active again; a retry finishes the deprovisioning.
#[tokio::test]
async fn a_cancel_while_queued_after_deactivating_names_the_inactive_keys() {
    let env = Env::builder(&["zitadel"])
        .map_worker(|w| w.retry_base = Duration::from_secs(60))
        .start()
        .await;
    let name = unique_name("dpw");
    let bucket = bucket_for(&name);
    let (job, key, path, request) = deprovision_held_at_the_secret(&env, &name).await;
    let unavailable = KubeFault::status(503).method("DELETE").path_prefix(&path);
    env.kube.proxy.inject_fault(unavailable);
    drop(request);
    let id = uuid::Uuid::parse_str(&job).unwrap();
    eventually(
        Duration::from_secs(60),
        "the job back in the queue",
        || async {
            let job = queue::get(&env.app.db, id).await.unwrap().unwrap();
            (job.state == "queued" && job.attempts == 1).then_some(())
        },
    )
    .await;
    let cancel = format!("/v1/jobs/{job}/cancel");
    let response = env
        .app
        .post_json(&cancel, &env.app.operator(), &json!({}))
        .await;
    assert_eq!(response.status(), 202);
    assert_eq!(key_status(&env, &bucket, &key).await, "Inactive");
    let repo = env.repository(&name).await;
    assert_eq!(repo["state"], "cancelled", "{repo:#}");
    let error = repo["last_error"].as_str().unwrap_or_default();
    assert!(error.contains(&key), "names the key: {error}");
    assert!(error.contains("--status Active"), "says how: {error}");

    let retry = format!("/v1/jobs/{job}/retry");
    let response = env
        .app
        .post_json(&retry, &env.app.operator(), &json!({}))
        .await;
    assert_eq!(response.status(), 202);
    let ended = env.app.wait_for_job(&job, Duration::from_secs(90)).await;
    assert_eq!(ended["state"], "succeeded", "{ended:#}");
    assert_eq!(env.repository(&name).await["state"], "deleted");
}

// ---------------------------------------------------------------------------------------------
// Crash safety: a worker killed with SIGKILL after each step's external change
// ---------------------------------------------------------------------------------------------

const CRASH_CHILD_TEST: &str = "deprovision::deprovision_crash_child_worker";
const CRASH_NS: &str = "dpcrash";
const CRASH_DEADLINE: Duration = Duration::from_secs(90);

/// Not a test on its own: the worker process the crash tests start and see die of SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of the deprovision crash tests; does nothing when run directly"]
async fn deprovision_crash_child_worker() {
    let Some(spec) = ChildSpec::from_env() else {
        eprintln!("the crash child's environment is not set: this test only runs as a child");
        return;
    };
    crash_child::run(spec).await;
}

/// For every step: a worker dies right after the step's external change, before recording it;
/// a fresh worker rescues the job, runs the step again (finding its work done) and the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_after_any_step_leaves_a_job_that_converges() {
    for step in STEPS {
        crash_deprovision(step).await;
    }
}

async fn crash_deprovision(step: &str) {
    let env = Env::builder(&[CRASH_NS]).workers(0).start().await;
    let name = unique_name(&format!("dc-{}", step.replace('_', "-")));
    let bucket = bucket_for(&name);
    let body = json!({"name": name, "namespace": env.ns(CRASH_NS)});
    let created = create_repository(&env.app, &env.app.operator(), &body).await;
    let provisioned = run_in_process(&env, &job_id(&created)).await;
    assert_eq!(
        provisioned.state, "succeeded",
        "{:?}",
        provisioned.last_error
    );

    let response = delete(&env.app, &name, "?delete_bucket=true", None).await;
    assert_eq!(response.status(), 202);
    let job = job_id(&response.json().await.unwrap());
    let spec = ChildSpec {
        database_url: env.app.database_url.clone(),
        moto_endpoint: env.moto_endpoint.clone(),
        region: env.region.clone(),
        kube_url: env.kube.proxy.url.clone(),
        kube_ca_pem: env.kube.server.ca_pem.clone(),
        kube_token: env.kube.service_token.clone(),
        encryption_key: env.encryption_key.clone(),
        kill_at: format!("{step}:before-record"),
        worker_id: format!("deprovision-crash-child-{step}"),
    };
    crash_child::spawn(CRASH_CHILD_TEST, &spec)
        .expect_sigkill(CRASH_DEADLINE)
        .await;
    let id = uuid::Uuid::parse_str(&job).unwrap();
    let steps = queue::steps(&env.app.db, id).await.unwrap();
    let row = steps
        .iter()
        .find(|r| r.step == step)
        .expect("the step started");
    assert_eq!((row.state.as_str(), row.attempts), ("running", 1), "{step}");

    let ended = run_in_process(&env, &job).await;
    assert_eq!(
        ended.state, "succeeded",
        "after a kill at {step}: {:?}",
        ended.last_error
    );
    assert_eq!(ended.attempts, 2, "the killed worker, then the rescuer");
    assert!(iam_leftovers(&env, &bucket).await.is_empty(), "{step}");
    assert!(env.secret(CRASH_NS, &bucket).await.is_none(), "{step}");
    assert_eq!(objects(&env, &bucket).await, None, "{step}");
    assert_eq!(env.repository(&name).await["state"], "deleted", "{step}");
    env.app.stop().await;
}

/// An in-process worker (the service's key and identity) runs until `job` ends; the rescuer
/// re-queues a job whose killed worker's lease expired.
async fn run_in_process(env: &Env, job: &str) -> Job {
    let provisioner = env.provisioner(Moto::shared(), CallCounter::new()).await;
    let registry = Registry::new()
        .register(Deprovisioner::like(&provisioner))
        .register(provisioner);
    let config = WorkerConfig {
        concurrency: 1,
        lease: Duration::from_secs(5),
        poll_interval: Duration::from_millis(100),
        retry_base: Duration::from_millis(50),
        shutdown_grace: Duration::from_secs(5),
        worker_id: "rescuer".to_owned(),
    };
    let shutdown = CancellationToken::new();
    let workers =
        tokio::spawn(WorkerPool::new(env.app.db.clone(), registry, config).run(shutdown.clone()));
    let id = uuid::Uuid::parse_str(job).unwrap();
    let ended = eventually(CRASH_DEADLINE, "the job to end", || async {
        let job = queue::get(&env.app.db, id).await.unwrap().unwrap();
        job.state().is_terminal().then_some(job)
    })
    .await;
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(30), workers).await;
    stopped
        .expect("stopped")
        .expect("no panic")
        .expect("no database error");
    ended
}

/// The sweep of leftovers never looks at a deleted repository: its names now belong to the
/// repository created again, whose in-flight key (here one made while it has an active job, as
/// a rotation would) the deleted row knows nothing about and would delete.
#[tokio::test]
async fn a_deleted_repository_is_never_swept() {
    let env = Env::start(&["zitadel"]).await;
    let name = unique_name("dpw");
    let bucket = bucket_for(&name);
    provisioned(&env, &name).await;
    let job = deprovision(&env, &name, "", None).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    provisioned(&env, &name).await;
    // The new repository is busy (a job in flight): its own sweep waits; its new key is made.
    sqlx::query(
        "INSERT INTO jobs (id, kind, subject_id, subject_name, payload, state, created_by)
         SELECT gen_random_uuid(), 'test-in-flight', id, name, '{}', 'running', 'test'
           FROM backup_repositories WHERE name = $1 AND state = 'ready'",
    )
    .bind(&name)
    .execute(&env.app.db)
    .await
    .unwrap();
    let made = env
        .admin
        .iam
        .create_access_key()
        .user_name(&bucket)
        .send()
        .await;
    let in_flight = made
        .unwrap()
        .access_key()
        .unwrap()
        .access_key_id()
        .to_owned();

    let sweeper = Sweeper {
        db: env.app.db.clone(),
        iam: env.admin.iam.clone(),
        kube: env.kube.service_client(),
        keys: EncryptionKey::from_base64(&env.encryption_key)
            .unwrap()
            .into(),
        grace: Duration::ZERO,
    };
    let Swept::Done(report) = sweeper.sweep_once().await.unwrap() else {
        panic!("nobody else holds this database's sweep lock");
    };
    assert!(report.keys_deleted.is_empty(), "{report:?}");
    assert!(report.failed.is_empty(), "{report:?}");
    let keys = env
        .admin
        .iam
        .list_access_keys()
        .user_name(&bucket)
        .send()
        .await
        .unwrap();
    let ids: Vec<&str> = keys
        .access_key_metadata()
        .iter()
        .filter_map(|k| k.access_key_id())
        .collect();
    assert!(ids.contains(&in_flight.as_str()), "{ids:?}");
}
