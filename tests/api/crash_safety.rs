//! Crash safety of the provisioning job: for every step, a real worker process (this test binary
//! re-executed, see `support::crash_child`) is killed with SIGKILL right after the step's
//! external call and before it records success. A fresh worker then rescues the job once the
//! dead worker's lease expires, and the repository must end `ready` with exactly one access key
//! (the one the Secret references), the cipher pass that existed before the crash, one success
//! audit entry per step and no duplicate audit entries.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use backup_provisioner::cloud::aws::CallCounter;
use backup_provisioner::crypto::EncryptionKey;
use backup_provisioner::jobs::{Job, Registry, WorkerConfig, WorkerPool, queue};
use backup_provisioner::provision::{access_key, credential_check, group, policy, sealed, user};
use secrecy::ExposeSecret;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::app::eventually;
use crate::support::crash_child::{self, ChildSpec};
use crate::support::env::{Env, bucket_for, conf_value, unique_name};
use crate::support::moto::Moto;

const CHILD_TEST: &str = "crash_safety::crash_child_worker";
const NAMESPACE: &str = "crash";
const REGION: &str = "us-east-1";
const DEADLINE: Duration = Duration::from_secs(90);
/// The provisioning job's steps, in order (`src/provision/job.rs`).
const STEPS: [&str; 10] = [
    "bucket",
    "policy",
    "group",
    "user",
    "cipher_pass",
    "access_key",
    "access_key_description",
    "credential_check",
    "secret",
    "retire_old_keys",
];

/// The earlier steps (in [`STEPS`]' order) that run alongside `step` and may not be recorded
/// yet when its kill point fires: the bucket runs alongside the IAM chain (policy, group,
/// user); the cipher pass is recorded as soon as the creates are out, and the key as soon as
/// it is made (its secret is sealed first of all). The key's proof (its description tag and
/// the credential check) records after all of them.
fn runs_alongside(step: &str) -> &'static [&'static str] {
    match step {
        "policy" | "group" | "user" => &["bucket"],
        "cipher_pass" | "access_key" => &["bucket", "policy", "group", "user"],
        _ => &[],
    }
}

/// Not a test on its own: the worker process the tests below start and see die of SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of the crash_safety tests; does nothing when run directly"]
async fn crash_child_worker() {
    let Some(spec) = ChildSpec::from_env() else {
        eprintln!(
            "the crash child's environment is not set: this test only runs as a child of another test"
        );
        return;
    };
    crash_child::run(spec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_bucket_call_then_recovery() {
    crash_and_recover("bucket", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_policy_call_then_recovery() {
    crash_and_recover("policy", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_group_call_then_recovery() {
    crash_and_recover("group", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_user_call_then_recovery() {
    crash_and_recover("user", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_cipher_pass_generation_then_recovery() {
    crash_and_recover("cipher_pass", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_access_key_call_then_recovery() {
    crash_and_recover("access_key", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_access_key_description_call_then_recovery() {
    crash_and_recover("access_key_description", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_credential_check_then_recovery() {
    crash_and_recover("credential_check", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_secret_write_then_recovery() {
    crash_and_recover("secret", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_retiring_old_keys_then_recovery() {
    crash_and_recover("retire_old_keys", 1).await;
}

/// Two workers in a row die right after CreateAccessKey: each orphaned key is deleted before
/// the next is made, so the user never holds more than IAM's two keys and ends with one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_twice_after_access_key_call_then_recovery() {
    crash_and_recover("access_key", 2).await;
}

/// The parent's view of one scenario: the API without workers (`env`), and one repository.
struct Scenario {
    env: Env,
    bucket: String,
    repository_id: Uuid,
    job_id: Uuid,
}

/// Queues a repository, lets `kills` child workers in turn die of SIGKILL at
/// `"<step>:before-record"`, then lets an in-process worker finish the job, and checks the end
/// state.
async fn crash_and_recover(step: &'static str, kills: i32) {
    assert!(STEPS.contains(&step), "unknown step {step}");
    let started = Instant::now();
    let s = Scenario::start(step).await;
    let monitor = KeyMonitor::start(s.env.admin.iam.clone(), s.bucket.clone());
    let kill_at = format!("{step}:before-record");

    let mut pass_before_crash: Option<String> = None;
    let mut orphaned_keys: Vec<String> = Vec::new();
    for kill in 1..=kills {
        let spec = ChildSpec {
            database_url: s.env.app.database_url.clone(),
            moto_endpoint: s.env.moto_endpoint.clone(),
            region: s.env.region.clone(),
            kube_url: s.env.kube.proxy.url.clone(),
            kube_ca_pem: s.env.kube.server.ca_pem.clone(),
            kube_token: s.env.kube.service_token.clone(),
            encryption_key: s.env.encryption_key.clone(),
            kill_at: kill_at.clone(),
            worker_id: format!("crash-child-{kill}"),
        };
        crash_child::spawn(CHILD_TEST, &spec)
            .expect_sigkill(DEADLINE)
            .await;
        s.assert_killed_before_record(step, kill, &spec.worker_id)
            .await;
        if let Some(id) = s.assert_external_call_happened(step).await {
            assert!(
                !orphaned_keys.contains(&id),
                "kill {kill} left the key of an earlier kill: {id}"
            );
            orphaned_keys.push(id);
        }
        let visible = s.visible_cipher_pass().await;
        assert_eq!(
            visible.is_some(),
            s.step_succeeded("cipher_pass").await,
            "a cipher pass is held after kill {kill} exactly when the cipher_pass step recorded it"
        );
        if let (Some(before), Some(now)) = (&pass_before_crash, &visible) {
            assert_eq!(
                before, now,
                "the cipher pass changed between two crashed attempts"
            );
        }
        pass_before_crash = visible.or(pass_before_crash);
    }
    let crashed_at = started.elapsed();

    let job = s.recover().await;
    let recovered_at = started.elapsed();
    let max_keys = monitor.stop().await;

    assert_eq!(
        job.state, "succeeded",
        "the rescued job failed: {:?}",
        job.last_error
    );
    assert_eq!(
        job.attempts,
        kills + 1,
        "attempts: {kills} killed worker(s), then the rescuer"
    );
    let (repo_state, resources): (String, serde_json::Value) =
        sqlx::query_as("SELECT state, resources FROM backup_repositories WHERE id = $1")
            .bind(s.repository_id)
            .fetch_one(&s.env.app.db)
            .await
            .unwrap();
    assert_eq!(repo_state, "ready");

    // Exactly one access key: the one the Secret references; only its description tag is left.
    let conf = s.s3_conf().await.expect("the Secret holds s3.conf");
    let keys = access_key::list(&s.env.admin.iam, &s.bucket).await.unwrap();
    let key_ids: Vec<&str> = keys.iter().map(|k| k.id.as_str()).collect();
    let referenced = conf_value(&conf, "repo2-s3-key");
    assert_eq!(
        key_ids,
        vec![referenced.as_str()],
        "IAM keys vs the key in s3.conf"
    );
    assert_eq!(conf_value(&conf, "repo3-s3-key"), referenced);
    assert_eq!(resources["access_key_id"], referenced.as_str());
    for orphan in &orphaned_keys {
        assert_ne!(
            orphan, &referenced,
            "a key created by a killed worker was kept without its secret"
        );
    }
    let description_tags: Vec<String> = user::list_tags(&s.env.admin.iam, &s.bucket)
        .await
        .unwrap()
        .into_iter()
        .filter(|(_, value)| value == access_key::DESCRIPTION)
        .map(|(key, _)| key)
        .collect();
    assert_eq!(
        description_tags,
        vec![referenced.clone()],
        "access key description tags"
    );
    assert!(
        max_keys <= 2,
        "the user held {max_keys} access keys at once (IAM allows 2)"
    );

    // The cipher pass that existed before the crash is the one delivered.
    let pass = conf_value(&conf, "repo2-cipher-pass");
    assert_eq!(pass.len(), 64);
    assert_eq!(conf_value(&conf, "repo3-cipher-pass"), pass);
    if let Some(before) = &pass_before_crash {
        assert_eq!(
            &pass, before,
            "the cipher pass was regenerated after the crash"
        );
    }

    s.assert_audit_trail(step, kills).await;
    let sealed: i64 = sqlx::query_scalar("SELECT count(*) FROM secret_material")
        .fetch_one(&s.env.app.db)
        .await
        .unwrap();
    assert_eq!(
        sealed, 0,
        "sealed material must be wiped once the Secret holds it"
    );
    // The probes a killed attempt wrote have the job's names: the rescuer deleted them.
    let objects = s.objects().await;
    assert!(objects.is_empty(), "the bucket holds {objects:?}");

    eprintln!(
        "crash safety at {kill_at} x{kills}: killed after {crashed_at:?}, ready after {recovered_at:?}; \
         at most {max_keys} access key(s) seen at once"
    );
    s.env.app.stop().await;
}

impl Scenario {
    /// The API (no workers) on a fresh database, namespaces on the real kube-apiserver, and a
    /// queued repository.
    async fn start(step: &str) -> Scenario {
        let env = Env::builder(&[NAMESPACE])
            .region(REGION)
            .workers(0)
            .start()
            .await;
        let app = &env.app;
        let name = unique_name(&format!("crash-{}", step.replace('_', "-")));
        let bucket = bucket_for(&name);
        let response = app
            .post_json(
                "/v1/backup-repositories",
                &app.operator(),
                &json!({"name": name, "namespace": env.ns(NAMESPACE)}),
            )
            .await;
        let status = response.status();
        let created: serde_json::Value = response.json().await.expect("json");
        assert_eq!(status, 202, "create failed: {created}");
        let job_id =
            Uuid::parse_str(created["job"]["id"].as_str().expect("job id")).expect("job uuid");
        let repository_id: Uuid =
            sqlx::query_scalar("SELECT id FROM backup_repositories WHERE name = $1")
                .bind(&name)
                .fetch_one(&app.db)
                .await
                .expect("repository row");
        Scenario {
            env,
            bucket,
            repository_id,
            job_id,
        }
    }

    async fn s3_conf(&self) -> Option<String> {
        self.env.s3_conf(NAMESPACE, &self.bucket).await
    }

    async fn job(&self) -> Job {
        queue::get(&self.env.app.db, self.job_id)
            .await
            .expect("read job")
            .expect("job exists")
    }

    /// The dead worker still holds the job, the step started but recorded nothing.
    async fn assert_killed_before_record(&self, step: &str, kill: i32, worker: &str) {
        let job = self.job().await;
        assert_eq!(
            (job.state.as_str(), job.attempts),
            ("running", kill),
            "the job after kill {kill}"
        );
        let locked_by: Option<String> =
            sqlx::query_scalar("SELECT locked_by FROM jobs WHERE id = $1")
                .bind(self.job_id)
                .fetch_one(&self.env.app.db)
                .await
                .unwrap();
        assert_eq!(
            locked_by.as_deref(),
            Some(worker),
            "the killed worker still holds the lease"
        );
        let rows = queue::steps(&self.env.app.db, self.job_id).await.unwrap();
        let row = rows
            .iter()
            .find(|r| r.step == step)
            .unwrap_or_else(|| panic!("step {step} never started"));
        assert_eq!(
            (row.state.as_str(), row.attempts),
            ("running", kill),
            "step {step} after kill {kill}"
        );
        let audited: i64 =
            sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE job_id = $1 AND step = $2")
                .bind(self.job_id)
                .bind(step)
                .fetch_one(&self.env.app.db)
                .await
                .unwrap();
        assert_eq!(
            audited, 0,
            "step {step} left an audit entry although it was killed before recording"
        );
        // Every earlier step was recorded, except those running alongside it.
        for earlier in STEPS.iter().take_while(|n| **n != step) {
            if runs_alongside(step).contains(earlier) {
                continue;
            }
            let state = rows
                .iter()
                .find(|r| r.step == *earlier)
                .map(|r| r.state.as_str());
            assert_eq!(
                state,
                Some("succeeded"),
                "step {earlier} before the kill at {step}"
            );
        }
    }

    /// Proves the kill came after the step's external call: its effect is visible. Returns the
    /// id of the key a killed `access_key` step created.
    async fn assert_external_call_happened(&self, step: &str) -> Option<String> {
        let (iam, bucket) = (&self.env.admin.iam, self.bucket.as_str());
        match step {
            "bucket" => {
                self.env
                    .admin
                    .s3
                    .head_bucket()
                    .bucket(bucket)
                    .send()
                    .await
                    .expect("the bucket exists");
            }
            "policy" => {
                policy::find(iam, bucket)
                    .await
                    .unwrap()
                    .expect("the policy exists");
            }
            "group" => {
                let attached = group::attached_policies(iam, bucket)
                    .await
                    .expect("the group exists");
                assert_eq!(
                    attached.len(),
                    1,
                    "the group has the policy attached: {attached:?}"
                );
            }
            "user" => {
                let groups = user::groups_for_user(iam, bucket)
                    .await
                    .expect("the user exists");
                assert_eq!(groups, vec![bucket.to_owned()]);
            }
            "cipher_pass" => {
                // The generated pass is sealed in the transaction that records the step: the
                // kill rolled both back.
                assert_eq!(self.sealed_kinds().await, Vec::<String>::new());
            }
            "access_key" => {
                let keys = access_key::list(iam, bucket).await.unwrap();
                assert_eq!(
                    keys.len(),
                    1,
                    "CreateAccessKey ran before the kill: {keys:?}"
                );
                // Its secret was to be sealed with the step's record: lost with the process.
                assert_eq!(self.sealed_kinds().await, vec!["cipher-pass".to_owned()]);
                return Some(keys[0].id.clone());
            }
            "access_key_description" => {
                let keys = access_key::list(iam, bucket).await.unwrap();
                assert_eq!(keys.len(), 1);
                let tags = user::list_tags(iam, bucket).await.unwrap();
                assert!(
                    tags.iter()
                        .any(|(k, v)| k == &keys[0].id && v == access_key::DESCRIPTION),
                    "the description tag was written before the kill: {tags:?}"
                );
            }
            "credential_check" => {
                // The probes are written, not yet deleted: the rescuer's attempt, which writes
                // the same names, deletes them (checked once it has run).
                assert_eq!(
                    self.sealed_kinds().await,
                    vec!["access-key".to_owned(), "cipher-pass".to_owned()]
                );
                let probe = credential_check::job_probe_key(self.job_id);
                let read_probe = credential_check::read_probe_key(&probe);
                assert_eq!(self.objects().await, vec![probe, read_probe]);
            }
            "secret" => {
                assert!(
                    self.s3_conf().await.is_some(),
                    "the Secret was written before the kill"
                );
                // Not wiped yet: wiping belongs to the step's record.
                assert_eq!(
                    self.sealed_kinds().await,
                    vec!["access-key".to_owned(), "cipher-pass".to_owned()]
                );
            }
            "retire_old_keys" => {
                // The Secret holds the new key (its step wiped the sealed material); the step
                // listed the keys and found none to retire.
                assert!(self.s3_conf().await.is_some(), "the Secret was written");
                assert_eq!(self.sealed_kinds().await, Vec::<String>::new());
                let keys = access_key::list(iam, bucket).await.unwrap();
                assert_eq!(keys.len(), 1, "{keys:?}");
            }
            other => panic!("unknown step {other}"),
        }
        None
    }

    /// The keys of the objects in the bucket, in S3's (lexicographic) order.
    async fn objects(&self) -> Vec<String> {
        let listed = self.env.admin.s3_for_region(&self.env.region);
        let listed = listed.list_objects_v2().bucket(&self.bucket).send().await;
        let listed = listed.expect("list the bucket");
        let keys = listed.contents().iter().filter_map(|o| o.key());
        keys.map(str::to_owned).collect()
    }

    async fn sealed_kinds(&self) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT kind FROM secret_material WHERE repository_id = $1 ORDER BY kind",
        )
        .bind(self.repository_id)
        .fetch_all(&self.env.app.db)
        .await
        .unwrap()
    }

    async fn step_succeeded(&self, step: &str) -> bool {
        let rows = queue::steps(&self.env.app.db, self.job_id).await.unwrap();
        rows.iter()
            .any(|r| r.step == step && r.state == "succeeded")
    }

    /// The cipher pass a crash must not lose: the Secret's, else the one sealed in Postgres.
    async fn visible_cipher_pass(&self) -> Option<String> {
        if let Some(conf) = self.s3_conf().await {
            return Some(conf_value(&conf, "repo2-cipher-pass"));
        }
        let key = EncryptionKey::from_base64(&self.env.encryption_key).expect("key");
        sealed::get(
            &self.env.app.db,
            &key.into(),
            self.repository_id,
            sealed::Kind::CipherPass,
        )
        .await
        .unwrap_or_else(|e| panic!("reading the sealed cipher pass: {e}"))
        .map(|held| held.secret.expose_secret().to_owned())
    }

    /// Runs an in-process worker (same encryption key) until the job ends; the rescuer
    /// re-queues it once the killed worker's lease expires.
    async fn recover(&self) -> Job {
        let registry = Registry::new().register(
            self.env
                .provisioner(Moto::shared(), CallCounter::new())
                .await,
        );
        let config = WorkerConfig {
            concurrency: 1,
            lease: Duration::from_secs(5),
            poll_interval: Duration::from_millis(100),
            retry_base: Duration::from_millis(50),
            shutdown_grace: Duration::from_secs(5),
            worker_id: "rescuer".to_owned(),
        };
        let shutdown = CancellationToken::new();
        let workers = tokio::spawn(
            WorkerPool::new(self.env.app.db.clone(), registry, config).run(shutdown.clone()),
        );
        let job = eventually(DEADLINE, "the rescued job to end", || async {
            let job = self.job().await;
            job.state().is_terminal().then_some(job)
        })
        .await;
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), workers)
            .await
            .expect("the rescuer stopped")
            .expect("the rescuer did not panic")
            .expect("the rescuer ran without a database error");
        job
    }

    /// No two audit entries for the same (job, step, attempt, action); one success per step,
    /// the crashed step's on the attempt after the last kill.
    async fn assert_audit_trail(&self, step: &str, kills: i32) {
        let rows: Vec<(Option<String>, Option<i32>, String, String)> = sqlx::query_as(
            "SELECT step, attempt, action, outcome FROM audit_events WHERE job_id = $1 ORDER BY id",
        )
        .bind(self.job_id)
        .fetch_all(&self.env.app.db)
        .await
        .unwrap();
        let mut seen = BTreeMap::new();
        for (s, attempt, action, _) in &rows {
            *seen
                .entry((s.clone(), *attempt, action.clone()))
                .or_insert(0) += 1;
        }
        let duplicates: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            duplicates.is_empty(),
            "duplicate audit entries {duplicates:?} in {rows:#?}"
        );

        let mut successes: BTreeMap<&str, Vec<i32>> =
            STEPS.iter().map(|s| (*s, Vec::new())).collect();
        for (s, attempt, action, outcome) in &rows {
            let Some(s) = s else { continue };
            assert!(
                successes.contains_key(s.as_str()),
                "audit entry for an unknown step {s}: {action}"
            );
            assert_eq!(action, &format!("provision-repository.{s}"));
            if outcome != "failed" {
                successes
                    .get_mut(s.as_str())
                    .unwrap()
                    .push(attempt.expect("step entries carry the attempt"));
            }
        }
        for (s, attempts) in &successes {
            assert_eq!(
                attempts.len(),
                1,
                "step {s} has {} success entries in {rows:#?}",
                attempts.len()
            );
        }
        assert_eq!(
            successes[step],
            vec![kills + 1],
            "the crashed step {step} succeeded on the attempt after the last kill"
        );
    }
}

/// Polls ListAccessKeys while the scenario runs and remembers the most keys seen at once.
struct KeyMonitor {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<usize>,
}

impl KeyMonitor {
    fn start(iam: aws_sdk_iam::Client, user: String) -> KeyMonitor {
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let handle = tokio::spawn(async move {
            let mut most = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => return most,
                    _ = tick.tick() => {}
                }
                // NoSuchEntity until the user exists.
                if let Ok(out) = iam.list_access_keys().user_name(&user).send().await {
                    most = most.max(out.access_key_metadata().len());
                }
            }
        });
        KeyMonitor { stop, handle }
    }

    async fn stop(self) -> usize {
        self.stop.cancel();
        self.handle.await.expect("key monitor")
    }
}
