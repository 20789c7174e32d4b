//! Defects found running the service day to day against real AWS, Kubernetes and Postgres
//! (issue "Behave on real AWS, Kubernetes and Postgres"), each pinned by a test that failed
//! before its fix.

use std::time::Duration;

use backup_provisioner::cloud::aws::CallCounter;
use backup_provisioner::crypto::{EncryptionKey, Keyring};
use backup_provisioner::jobs::{Registry, WorkerConfig, WorkerPool, queue};
use backup_provisioner::provision::job::Provisioner;
use backup_provisioner::provision::sealed;
use backup_provisioner::provision::sweep::{SWEEP_LOCK, SweepReport, Sweeper, Swept};
use base64::Engine as _;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::http_common::{REPOSITORIES, assert_problem, create_repository, job_id};
use crate::support::app::{TestApp, eventually, migrated_db, spawn_app};
use crate::support::env::{Env, bucket_for, conf_value, unique_name};
use crate::support::kube_env::KubeEnv;
use crate::support::moto::Moto;
use crate::support::test_jobs as tj;

async fn post(app: &TestApp, path: &str, token: &str) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .expect("request")
}

async fn get_json(app: &TestApp, path: &str) -> Value {
    app.get(path, &app.viewer())
        .await
        .json()
        .await
        .expect("json")
}

/// #11: a superseded job (a newer job exists for its repository) is not run again with its old
/// options; the refusal changes nothing, and the repository keeps showing its latest job.
#[tokio::test]
async fn retrying_a_superseded_job_is_refused_and_changes_nothing() {
    let app = spawn_app().await;
    let token = app.operator();
    let body = json!({"name": "zitadel", "namespace": "zitadel", "allow_new_cipher_pass": true});
    let old = job_id(&create_repository(&app, &token, &body).await);
    assert_eq!(
        post(&app, &format!("/v1/jobs/{old}/cancel"), &token)
            .await
            .status(),
        202
    );
    // The switch goes off again: a newer job, with the new options, is queued; then cancelled.
    let body = json!({"name": "zitadel", "namespace": "zitadel", "allow_new_cipher_pass": false});
    let newer = job_id(&create_repository(&app, &token, &body).await);
    assert_ne!(old, newer);
    assert_eq!(
        post(&app, &format!("/v1/jobs/{newer}/cancel"), &token)
            .await
            .status(),
        202
    );
    let before = get_json(&app, &format!("{REPOSITORIES}/zitadel")).await;
    assert_eq!(before["last_job"]["id"], newer.as_str(), "{before}");

    let problem = assert_problem(
        post(&app, &format!("/v1/jobs/{old}/retry"), &token).await,
        409,
    )
    .await;
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("a newer job") && detail.contains(&newer),
        "the refusal names the newer job: {problem}"
    );

    let old_view = get_json(&app, &format!("/v1/jobs/{old}")).await;
    assert_eq!(old_view["state"], "cancelled", "{old_view}");
    let after = get_json(&app, &format!("{REPOSITORIES}/zitadel")).await;
    assert_eq!(after["state"], "cancelled", "{after}");
    assert_eq!(after["last_job"]["id"], newer.as_str(), "{after}");
    let retries: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE action = 'job.retry'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(retries, 0, "a refused retry leaves no audit entry");

    // The newer job itself can still be retried.
    let response = post(&app, &format!("/v1/jobs/{newer}/retry"), &token).await;
    assert_eq!(response.status(), 202);
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// #6: BP_ENCRYPTION_KEY can be rotated (BP_PREVIOUS_ENCRYPTION_KEYS).

/// A keyring of `current` and `previous` keys.
fn ring(current: &EncryptionKey, previous: &[&EncryptionKey]) -> Keyring {
    Keyring::new(
        current.clone(),
        previous.iter().map(|k| (*k).clone()).collect(),
    )
}

fn new_key() -> EncryptionKey {
    EncryptionKey::from_base64(&EncryptionKey::generate_base64()).expect("key")
}

async fn sealing_key_id(db: &PgPool, repository_id: Uuid, kind: &str) -> Option<String> {
    sqlx::query_scalar(
        "SELECT encryption_key_id FROM secret_material WHERE repository_id = $1 AND kind = $2",
    )
    .bind(repository_id)
    .bind(kind)
    .fetch_one(db)
    .await
    .expect("sealed row")
}

/// A cipher pass, once sealed, is never replaced, whatever a caller asks: the second one is
/// refused by the database statement itself and the first one stays.
#[tokio::test]
async fn a_sealed_cipher_pass_is_never_replaced() {
    let db = migrated_db().await;
    let repository = tj::insert_repository(&db.pool, "first-pass").await;
    let keys = ring(&new_key(), &[]);
    let kind = sealed::Kind::CipherPass;
    for (pass, accepted) in [("the-first-pass", true), ("a-second-pass", false)] {
        let mut tx = db.pool.begin().await.unwrap();
        let secret = SecretString::from(pass.to_owned());
        let stored = sealed::put(&mut tx, &keys, repository, kind, "cipher-pass", &secret).await;
        assert_eq!(stored.is_ok(), accepted, "{pass}: {stored:?}");
        tx.commit().await.unwrap();
    }
    let held = sealed::get(&db.pool, &keys, repository, kind)
        .await
        .unwrap()
        .expect("a pass is held");
    assert_eq!(held.secret.expose_secret(), "the-first-pass");
}

#[tokio::test]
async fn sealed_material_opens_with_a_previous_key_and_is_resealed_under_the_current_one() {
    let db = migrated_db().await;
    let repository = tj::insert_repository(&db.pool, "rotation").await;
    let (a, b, c) = (new_key(), new_key(), new_key());
    let mut tx = db.pool.begin().await.unwrap();
    for (kind, key_id, secret) in [
        (sealed::Kind::AccessKey, "AKIAROTATION", "key-secret"),
        (sealed::Kind::CipherPass, "cipher-pass", "the-pass"),
    ] {
        let secret = SecretString::from(secret.to_owned());
        sealed::put(&mut tx, &ring(&a, &[]), repository, kind, key_id, &secret)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    assert_eq!(
        sealing_key_id(&db.pool, repository, "cipher-pass").await,
        Some(a.id()),
        "each row names the key that sealed it"
    );

    // Restarted with B as the current key and A as a previous one: opens, re-sealed under B.
    let rotated = ring(&b, &[&a]);
    let pass = sealed::get(&db.pool, &rotated, repository, sealed::Kind::CipherPass)
        .await
        .expect("opens with the previous key")
        .expect("held");
    assert_eq!(pass.secret.expose_secret(), "the-pass");
    assert_eq!(
        sealing_key_id(&db.pool, repository, "cipher-pass").await,
        Some(b.id())
    );
    let only_b = ring(&b, &[]);
    let pass = sealed::get(&db.pool, &only_b, repository, sealed::Kind::CipherPass)
        .await
        .expect("re-sealed under the current key")
        .expect("held");
    assert_eq!(pass.secret.expose_secret(), "the-pass");

    // A row sealed before key ids were recorded is tried with every key.
    sqlx::query("UPDATE secret_material SET encryption_key_id = NULL WHERE kind = 'access-key'")
        .execute(&db.pool)
        .await
        .unwrap();
    let key = sealed::get(&db.pool, &rotated, repository, sealed::Kind::AccessKey)
        .await
        .unwrap()
        .expect("held");
    assert_eq!(
        (key.key_id.as_str(), key.secret.expose_secret()),
        ("AKIAROTATION", "key-secret")
    );
    assert_eq!(
        sealing_key_id(&db.pool, repository, "access-key").await,
        Some(b.id())
    );

    // Restarted with only C: the access key counts as absent, the cipher pass is an error.
    let only_c = ring(&c, &[]);
    let key = sealed::get(&db.pool, &only_c, repository, sealed::Kind::AccessKey).await;
    assert!(
        matches!(key, Ok(None)),
        "an unopenable access key is absent"
    );
    let pass = sealed::get(&db.pool, &only_c, repository, sealed::Kind::CipherPass).await;
    let message = pass.err().expect("an unopenable cipher pass").to_string();
    assert!(
        message.contains("BP_PREVIOUS_ENCRYPTION_KEYS") && !message.contains("the-pass"),
        "{message}"
    );
}

const ROTATION_NS: &str = "rotation";

/// A repository whose first job, run with key `a`, failed at the Secret step (a Secret of
/// another type was in the way; it is deleted afterwards, as the job's error says): its access
/// key's secret and its new cipher pass stay sealed under `a`.
async fn failed_at_the_secret_step(env: &Env, name: &str, a: &EncryptionKey) -> SealedJob {
    let bucket = bucket_for(name);
    let in_the_way = json!({
        "apiVersion": "v1", "kind": "Secret", "type": "holos.run/not-opaque",
        "metadata": {"name": bucket, "namespace": ROTATION_NS,
                     "labels": {"app.kubernetes.io/managed-by": "backup-provisioner"}},
    });
    let namespace = env.ns(ROTATION_NS);
    env.kube
        .create_secret_as("kubectl-create", namespace, in_the_way)
        .await;
    let body = json!({"name": name, "namespace": namespace});
    let job = job_id(&create_repository(&env.app, &env.app.operator(), &body).await);
    let repository_id: Uuid =
        sqlx::query_scalar("SELECT id FROM backup_repositories WHERE name = $1")
            .bind(name)
            .fetch_one(&env.app.db)
            .await
            .expect("repository id");
    let view = run_jobs_until_ended(env, ring(a, &[]), &job).await;
    let error = view["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("type"), "failed at the Secret: {view}");
    assert!(env.kube.delete_secret(namespace, &bucket).await);
    let keys = ring(a, &[]);
    let db = &env.app.db;
    let key = sealed::get(db, &keys, repository_id, sealed::Kind::AccessKey);
    let key = key.await.unwrap().expect("the access key is sealed");
    let pass = sealed::get(db, &keys, repository_id, sealed::Kind::CipherPass);
    let pass = pass.await.unwrap().expect("the cipher pass is sealed");
    SealedJob {
        job,
        access_key_id: key.key_id,
        cipher_pass: pass.secret.expose_secret().to_owned(),
    }
}

struct SealedJob {
    job: String,
    access_key_id: String,
    cipher_pass: String,
}

/// Runs an in-process worker pool whose provisioner seals with `keys` until job `job` ends.
async fn run_jobs_until_ended(env: &Env, keys: Keyring, job: &str) -> Value {
    let mut provisioner = env.provisioner(Moto::shared(), CallCounter::new()).await;
    provisioner.encryption_key = keys;
    run_until_ended(env, provisioner, job).await
}

/// Runs an in-process worker pool with `provisioner` until job `job` ends; returns its view.
async fn run_until_ended(env: &Env, provisioner: Provisioner, job: &str) -> Value {
    let config = WorkerConfig {
        concurrency: 1,
        lease: Duration::from_secs(5),
        poll_interval: Duration::from_millis(100),
        retry_base: Duration::from_millis(50),
        shutdown_grace: Duration::from_secs(5),
        worker_id: format!("day-to-day-{}", Uuid::new_v4().simple()),
    };
    let registry = Registry::new().register(provisioner);
    let shutdown = CancellationToken::new();
    let pool = WorkerPool::new(env.app.db.clone(), registry, config);
    let workers = tokio::spawn(pool.run(shutdown.clone()));
    let view = env.app.wait_for_job(job, Duration::from_secs(90)).await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), workers).await;
    view
}

async fn user_key_ids(env: &Env, bucket: &str) -> Vec<String> {
    let listed = env
        .admin
        .iam
        .list_access_keys()
        .user_name(bucket)
        .send()
        .await
        .expect("list access keys");
    let mut ids: Vec<String> = listed
        .access_key_metadata()
        .iter()
        .filter_map(|k| k.access_key_id().map(str::to_owned))
        .collect();
    ids.sort();
    ids
}

async fn retry(env: &Env, job: &str) {
    let path = format!("/v1/jobs/{job}/retry");
    let response = post(&env.app, &path, &env.app.operator()).await;
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
}

#[tokio::test]
async fn after_a_rotation_the_previous_key_still_delivers_what_it_sealed() {
    let env = Env::builder(&[ROTATION_NS]).workers(0).start().await;
    let (a, b) = (new_key(), new_key());
    let name = unique_name("rotated");
    let sealed = failed_at_the_secret_step(&env, &name, &a).await;

    retry(&env, &sealed.job).await;
    let view = run_jobs_until_ended(&env, ring(&b, &[&a]), &sealed.job).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let conf = env
        .s3_conf(ROTATION_NS, &bucket_for(&name))
        .await
        .expect("the Secret is written");
    assert_eq!(conf_value(&conf, "repo2-s3-key"), sealed.access_key_id);
    assert_eq!(conf_value(&conf, "repo2-cipher-pass"), sealed.cipher_pass);
    let keys = user_key_ids(&env, &bucket_for(&name)).await;
    assert_eq!(keys, std::slice::from_ref(&sealed.access_key_id));
    env.app.stop().await;
}

#[tokio::test]
async fn an_access_key_no_key_opens_is_replaced_and_the_secrets_cipher_pass_is_used() {
    let env = Env::builder(&[ROTATION_NS]).workers(0).start().await;
    let (a, c) = (new_key(), new_key());
    let name = unique_name("lostkey");
    let bucket = bucket_for(&name);
    let sealed = failed_at_the_secret_step(&env, &name, &a).await;
    // Meanwhile the Secret holds the cipher pass (e.g. restored by hand), not the key.
    let conf = format!("[global]\nrepo2-cipher-pass={}\n", sealed.cipher_pass);
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": bucket, "namespace": ROTATION_NS,
                     "labels": {"app.kubernetes.io/managed-by": "backup-provisioner"}},
        "data": {"s3.conf": base64::engine::general_purpose::STANDARD.encode(conf)},
    });
    env.kube
        .create_secret_as("kubectl-create", env.ns(ROTATION_NS), secret)
        .await;

    // Restarted with only key C: nothing sealed under A opens.
    retry(&env, &sealed.job).await;
    let view = run_jobs_until_ended(&env, ring(&c, &[]), &sealed.job).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let conf = env.s3_conf(ROTATION_NS, &bucket).await.expect("the Secret");
    let key = conf_value(&conf, "repo2-s3-key");
    assert_ne!(
        key, sealed.access_key_id,
        "a new key replaces the unopenable one"
    );
    assert_eq!(
        user_key_ids(&env, &bucket).await,
        [key],
        "the old key is deleted"
    );
    assert_eq!(conf_value(&conf, "repo2-cipher-pass"), sealed.cipher_pass);
    env.app.stop().await;
}

#[test]
fn an_invalid_previous_encryption_key_exits_2_naming_the_variable() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_backup-provisioner"))
        .arg("worker")
        .env_clear()
        .env("RUST_LOG", "off")
        .env(
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        )
        .env("BP_ENCRYPTION_KEY", EncryptionKey::generate_base64())
        .env(
            "BP_PREVIOUS_ENCRYPTION_KEYS",
            format!("{},c2hvcnQ=", EncryptionKey::generate_base64()),
        )
        .output()
        .expect("run backup-provisioner");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("BP_PREVIOUS_ENCRYPTION_KEYS") && stderr.contains("key 2"),
        "{stderr}"
    );
    assert!(!stderr.contains("c2hvcnQ="), "no key material: {stderr}");
}

// ---------------------------------------------------------------------------------------------
// #5: a cancel during the Secret's apply must not leave sealed material behind; a periodic sweep
// removes what failed or cancelled jobs left.

/// A Kubernetes client that requests a cancel of job `job` when the Secret at `secret_path` is
/// written (not in a dry run), before the write reaches the server: the cancel lands during the
/// Secret's apply.
fn cancelling_client(
    inner: kube::Client,
    db: PgPool,
    job: Uuid,
    secret_path: String,
) -> kube::Client {
    use axum::http::{Method, Request};
    let service = tower::service_fn(move |request: Request<kube::client::Body>| {
        let (inner, db, secret_path) = (inner.clone(), db.clone(), secret_path.clone());
        async move {
            let dry_run = request.uri().query().is_some_and(|q| q.contains("dryRun"));
            let write = request.method() == Method::PATCH && request.uri().path() == secret_path;
            if write && !dry_run {
                queue::cancel(&db, job).await.expect("request the cancel");
            }
            inner.send(request).await
        }
    });
    kube::Client::new(service, "default")
}

async fn sealed_rows(db: &PgPool, repository: &str) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT m.kind, m.key_id FROM secret_material m
           JOIN backup_repositories r ON r.id = m.repository_id
          WHERE r.name = $1 ORDER BY m.kind",
    )
    .bind(repository)
    .fetch_all(db)
    .await
    .expect("sealed rows")
}

#[tokio::test]
async fn a_cancel_during_the_secrets_apply_leaves_no_sealed_material() {
    const NS: &str = "cancelled";
    let env = Env::builder(&[NS]).workers(0).start().await;
    let name = unique_name("cancelled");
    let bucket = bucket_for(&name);
    let body = json!({"name": name, "namespace": env.ns(NS)});
    let job = job_id(&create_repository(&env.app, &env.app.operator(), &body).await);
    let mut provisioner = env.provisioner(Moto::shared(), CallCounter::new()).await;
    let path = format!("/api/v1/namespaces/{}/secrets/{bucket}", env.ns(NS));
    let job_uuid: Uuid = job.parse().expect("job id");
    provisioner.kube = cancelling_client(
        env.kube.service_client(),
        env.app.db.clone(),
        job_uuid,
        path,
    );

    let view = run_until_ended(&env, provisioner, &job).await;
    assert!(view["cancel_requested"] == true, "{view}");
    let conf = env
        .s3_conf(NS, &bucket)
        .await
        .expect("the Secret was written");
    let secret_step = view["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|s| s["name"] == "secret"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        secret_step["state"], "succeeded",
        "the write is recorded: {view}"
    );
    assert_eq!(
        sealed_rows(&env.app.db, &name).await,
        Vec::<(String, String)>::new(),
        "the Secret holds {} and the cipher pass: nothing may stay sealed",
        conf_value(&conf, "repo2-s3-key")
    );
    env.app.stop().await;
}

/// The sweep over the test's database, with the service's IAM and Kubernetes identities and no
/// grace period.
async fn sweeper(env: &Env) -> Sweeper {
    Sweeper {
        db: env.app.db.clone(),
        iam: Moto::shared().clients(&env.region, None).await.iam,
        kube: env.kube.service_client(),
        keys: EncryptionKey::from_base64(&env.encryption_key)
            .expect("key")
            .into(),
        grace: Duration::ZERO,
    }
}

async fn sweep(env: &Env) -> SweepReport {
    match sweeper(env).await.sweep_once().await.expect("sweep") {
        Swept::Done(report) => report,
        Swept::Skipped => panic!("nobody else holds this database's sweep lock"),
    }
}

async fn sweep_audit(env: &Env, action: &str) -> Vec<(String, Value)> {
    sqlx::query_as("SELECT outcome, detail FROM audit_events WHERE action = $1 ORDER BY id")
        .bind(action)
        .fetch_all(&env.app.db)
        .await
        .expect("audit entries")
}

#[tokio::test]
async fn the_sweep_deletes_an_orphan_key_and_keeps_the_referenced_one() {
    const NS: &str = "sweep";
    let env = Env::start(&[NS]).await;
    let name = unique_name("orphan");
    let bucket = bucket_for(&name);
    let view = env
        .provision(json!({"name": name, "namespace": env.ns(NS)}))
        .await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let conf = env.s3_conf(NS, &bucket).await.expect("the Secret");
    let referenced = conf_value(&conf, "repo2-s3-key");
    // A key left by a job that died before sealing its secret: nobody can use it.
    let orphan = env
        .admin
        .iam
        .create_access_key()
        .user_name(&bucket)
        .send()
        .await
        .expect("create a key")
        .access_key()
        .map(|k| k.access_key_id().to_owned())
        .expect("key id");

    // The periodic sweep (one worker wins the lock) deletes it.
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(
        sweeper(&env)
            .await
            .run(Duration::from_millis(50), shutdown.clone()),
    );
    let keys = eventually(
        Duration::from_secs(30),
        "the orphan key deleted",
        || async {
            let keys = user_key_ids(&env, &bucket).await;
            (!keys.contains(&orphan)).then_some(keys)
        },
    )
    .await;
    shutdown.cancel();
    running.await.expect("the sweep stopped");
    assert_eq!(
        keys,
        std::slice::from_ref(&referenced),
        "the key the Secret references is kept"
    );
    let audited = sweep_audit(&env, "sweep.access-key").await;
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert_eq!(audited[0].0, "deleted");
    assert_eq!(audited[0].1["access_key_id"], orphan.as_str());

    // Someone edits the Secret and leaves its s3.conf incomplete (the key's secret line gone):
    // the key it still names may be used by the Secret's copies, so the sweep keeps it.
    let incomplete = format!("[global]\nrepo2-s3-key={referenced}\n");
    let secret = json!({
        "type": "Opaque",
        "metadata": {"name": bucket,
                     "labels": {"app.kubernetes.io/managed-by": "backup-provisioner"}},
        "data": {"s3.conf": base64::engine::general_purpose::STANDARD.encode(incomplete)},
    });
    assert!(env.kube.delete_secret(env.ns(NS), &bucket).await);
    env.kube
        .create_secret_as("kubectl-create", env.ns(NS), secret)
        .await;
    let report = sweep(&env).await;
    assert_eq!(report.keys_deleted, [], "{report:?}");
    assert_eq!(user_key_ids(&env, &bucket).await, [referenced]);
    env.app.stop().await;
}

#[tokio::test]
async fn the_sweep_keeps_sealed_material_the_secret_does_not_hold() {
    let env = Env::builder(&[ROTATION_NS]).workers(0).start().await;
    let key = EncryptionKey::from_base64(&env.encryption_key).expect("key");
    let name = unique_name("kept");
    let bucket = bucket_for(&name);
    let sealed = failed_at_the_secret_step(&env, &name, &key).await;
    let both = vec![
        ("access-key".to_owned(), sealed.access_key_id.clone()),
        ("cipher-pass".to_owned(), "cipher-pass".to_owned()),
    ];

    // No Secret: nothing it could hold; both kept, reported once, and the sealed key kept.
    let report = sweep(&env).await;
    assert_eq!(report.sealed_deleted, []);
    assert_eq!(report.sealed_kept.len(), 2, "{report:?}");
    assert_eq!(
        report.keys_deleted,
        [],
        "a key whose secret is sealed is kept"
    );
    assert_eq!(sealed_rows(&env.app.db, &name).await, both);
    sweep(&env).await;
    let audited = sweep_audit(&env, "sweep.sealed-material").await;
    assert_eq!(
        audited.len(),
        1,
        "kept material is reported once: {audited:?}"
    );
    assert_eq!(audited[0].0, "kept");
    assert_eq!(audited[0].1["kept"].as_array().map(Vec::len), Some(2));

    // The Secret holds another cipher pass (restored by hand, written by another controller):
    // the sealed one may be the only copy of what encrypted the backups, so it stays.
    let stranger = format!(
        "[global]\nrepo2-cipher-pass={}\nrepo2-s3-key=AKIAOTHER\nrepo2-s3-key-secret=x\n",
        "Z".repeat(64)
    );
    write_secret(&env, &bucket, &stranger).await;
    let report = sweep(&env).await;
    assert_eq!(report.sealed_deleted, [], "{report:?}");
    assert_eq!(sealed_rows(&env.app.db, &name).await, both);
    let audited = sweep_audit(&env, "sweep.sealed-material").await;
    let last_kept = audited.last().map(|(_, detail)| detail["kept"].to_string());
    assert!(
        last_kept.is_some_and(|kept| kept.contains("a different cipher pass")),
        "{audited:?}"
    );

    // The Secret holds the cipher pass but another key: only the pass goes.
    let other = format!(
        "[global]\nrepo2-cipher-pass={}\nrepo2-s3-key=AKIAOTHER\nrepo2-s3-key-secret=x\n",
        sealed.cipher_pass
    );
    write_secret(&env, &bucket, &other).await;
    let report = sweep(&env).await;
    assert_eq!(
        report.sealed_deleted,
        [(name.clone(), "cipher-pass".to_owned())]
    );
    assert_eq!(sealed_rows(&env.app.db, &name).await, both[..1]);
    let keys = user_key_ids(&env, &bucket).await;
    assert_eq!(keys, std::slice::from_ref(&sealed.access_key_id));

    // The Secret references the sealed key: its sealed secret goes too.
    let held = format!(
        "[global]\nrepo2-cipher-pass={}\nrepo2-s3-key={}\nrepo2-s3-key-secret=x\n",
        sealed.cipher_pass, sealed.access_key_id
    );
    write_secret(&env, &bucket, &held).await;
    let report = sweep(&env).await;
    assert_eq!(
        report.sealed_deleted,
        [(name.clone(), "access-key".to_owned())]
    );
    assert_eq!(sealed_rows(&env.app.db, &name).await, []);
    assert_eq!(user_key_ids(&env, &bucket).await, [sealed.access_key_id]);
    env.app.stop().await;
}

/// Writes the managed Secret of `bucket` in the rotation namespace holding `conf`.
async fn write_secret(env: &Env, bucket: &str, conf: &str) {
    let secret = json!({
        "type": "Opaque",
        "metadata": {"name": bucket,
                     "labels": {"app.kubernetes.io/managed-by": "backup-provisioner"}},
        "data": {"s3.conf": base64::engine::general_purpose::STANDARD.encode(conf)},
    });
    let namespace = env.ns(ROTATION_NS);
    env.kube.apply_secret_as("kubectl", namespace, secret).await;
}

#[tokio::test]
async fn one_worker_sweeps_at_a_time() {
    let db = migrated_db().await;
    let mut other_worker = db.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(SWEEP_LOCK)
        .execute(&mut *other_worker)
        .await
        .unwrap();
    let kube_env = KubeEnv::start(&[]).await;
    let sweeper = Sweeper {
        db: db.pool.clone(),
        iam: Moto::shared().clients("us-east-1", None).await.iam,
        kube: kube_env.service_client(),
        keys: EncryptionKey::from_base64(&EncryptionKey::generate_base64())
            .expect("key")
            .into(),
        grace: Duration::ZERO,
    };
    assert_eq!(sweeper.sweep_once().await.unwrap(), Swept::Skipped);
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(SWEEP_LOCK)
        .execute(&mut *other_worker)
        .await
        .unwrap();
    let swept = sweeper.sweep_once().await.unwrap();
    assert_eq!(swept, Swept::Done(SweepReport::default()));
}

// ---------------------------------------------------------------------------------------------
// #12: `make demo`'s read-back fails the run when a bucket or a Secret is missing.

/// Runs `scripts/<script>` with the repository's Python (the venv of `scripts/install-deps.sh`)
/// and only the environment given.
fn demo_script(script: &str, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    // kubectl keeps a discovery cache under $HOME/.kube: give it a home of its own, not the
    // clone (without HOME it writes ./.kube into the working directory).
    let home = tempfile::tempdir().expect("a home for kubectl");
    let mut command = std::process::Command::new(root.join(".venv/bin/python"));
    command
        .arg(root.join("scripts").join(script))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .current_dir(home.path());
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("run the script")
}

#[tokio::test]
async fn show_bucket_exits_1_when_a_bucket_is_missing() {
    let moto = Moto::shared();
    let present = bucket_for(&unique_name("shown"));
    let missing = bucket_for(&unique_name("missing"));
    let admin = moto.clients("us-east-1", None).await;
    admin
        .s3
        .create_bucket()
        .bucket(&present)
        .send()
        .await
        .expect("create bucket");
    let env = [
        ("AWS_ENDPOINT_URL", moto.endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ];
    let shown = demo_script("show_bucket.py", &[&present], &env);
    let stdout = String::from_utf8_lossy(&shown.stdout);
    assert_eq!(shown.status.code(), Some(0), "{stdout}{:?}", shown.stderr);
    assert!(stdout.contains(&present), "{stdout}");

    let output = demo_script("show_bucket.py", &[&present, &missing], &env);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("{missing}: MISSING")),
        "the missing bucket is named: {stdout}"
    );
}

#[tokio::test]
async fn show_secret_exits_1_when_a_secret_is_missing() {
    let kube = KubeEnv::start(&["demo"]).await;
    let namespace = kube.ns("demo").to_owned();
    let conf = "[global]\nrepo2-cipher-pass=do-not-print-me\nrepo2-s3-key=AKIASHOWN\n";
    let secret = json!({
        "type": "Opaque",
        "metadata": {"name": "holos-shown-backups"},
        "data": {"s3.conf": base64::engine::general_purpose::STANDARD.encode(conf)},
    });
    kube.create_secret_as("kubectl-create", &namespace, secret)
        .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, kube.service_kubeconfig("demo")).expect("write kubeconfig");
    let env = [("KUBECONFIG", kubeconfig.to_str().expect("utf-8 path"))];
    let present = format!("{namespace}/holos-shown-backups");
    let missing = format!("{namespace}/holos-missing-backups");

    let shown = demo_script("show_secret.py", &[&present], &env);
    let stdout = String::from_utf8_lossy(&shown.stdout);
    assert_eq!(shown.status.code(), Some(0), "{stdout}{:?}", shown.stderr);
    assert!(stdout.contains("'s3.conf'"), "{stdout}");
    assert!(
        !stdout.contains("do-not-print-me"),
        "values are redacted: {stdout}"
    );

    let output = demo_script("show_secret.py", &[&present, &missing], &env);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains(&format!("{missing}: MISSING")), "{stdout}");
}
