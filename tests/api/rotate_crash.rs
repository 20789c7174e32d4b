//! Crash safety of key rotation: for every step of the `rotate-access-key` job and of the
//! `retire-access-key` job, a real worker process (this test binary re-executed, see
//! `support::crash_child`) is killed with SIGKILL right after the step's external change and
//! before it records success. A fresh in-process worker then rescues the job once the dead
//! worker's lease expires. Throughout, a monitor checks that the Secret references an access
//! key that exists and is active, and that the user never holds more than IAM's two keys; at
//! the end the Secret references a new key that works, with the cipher pass it had before.

use std::collections::BTreeMap;
use std::time::Duration;

use backup_provisioner::cloud::aws::CallCounter;
use backup_provisioner::jobs::{Job, Registry, WorkerConfig, WorkerPool, queue};
use backup_provisioner::provision::access_key;
use backup_provisioner::provision::key_schedule::KeySchedule;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::app::{eventually, worker_args};
use crate::support::crash_child::{self, ChildSpec};
use crate::support::env::{Env, bucket_for, conf_value, rotation_kinds, unique_name};
use crate::support::moto::Moto;

const CHILD_TEST: &str = "rotate_crash::rotation_crash_child_worker";
const NS: &str = "rotcrash";
const DEADLINE: Duration = Duration::from_secs(90);
/// The rotation job's steps, in order (`src/provision/rotate.rs`).
const STEPS: [&str; 6] = [
    "make_room",
    "new_key",
    "new_key_description",
    "prove",
    "secret",
    "schedule_retirement",
];

/// Not a test on its own: the worker process the tests below start and see die of SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of the rotate_crash tests; does nothing when run directly"]
async fn rotation_crash_child_worker() {
    let Some(spec) = ChildSpec::from_env() else {
        eprintln!("the crash child's environment is not set: this test only runs as a child");
        return;
    };
    crash_child::run(spec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_making_room_then_recovery() {
    crash_rotation("make_room", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_creating_the_new_key_then_recovery() {
    crash_rotation("new_key", 1).await;
}

/// Two workers in a row die right after CreateAccessKey: each key nobody holds a secret for is
/// deleted before the next is made, so the user never holds more than two keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_twice_after_creating_the_new_key_then_recovery() {
    crash_rotation("new_key", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_the_new_key_description_then_recovery() {
    crash_rotation("new_key_description", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_proving_the_new_key_then_recovery() {
    crash_rotation("prove", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_writing_the_secret_then_recovery() {
    crash_rotation("secret", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_scheduling_the_retirement_then_recovery() {
    crash_rotation("schedule_retirement", 1).await;
}

/// The retirement: killed after UpdateAccessKey (Inactive), then after DeleteAccessKey.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_deactivating_and_after_deleting_the_old_key_then_recovery() {
    let s = Scenario::start("retire").await;
    let monitor = Monitor::start(&s);
    let job = s.queue_rotation().await;
    assert_eq!(s.run_in_process(job).await.state, "succeeded");
    let old = s.old_key.clone();
    // The deactivation's job is killed twice: after reading the last use, then after
    // UpdateAccessKey.
    let phases: [(&str, &str, &[&str], Option<&str>); 2] = [
        (
            "deactivate",
            "deactivate_after",
            &["last_used", "deactivate"],
            Some("Inactive"),
        ),
        ("delete", "delete_after", &["delete"], None),
    ];
    for (phase, column, kill_steps, status) in phases {
        let job = s.make_retirement_due(column).await;
        for (kill, step) in (1..).zip(kill_steps) {
            s.kill_child_at(&format!("{step}:before-record"), kill)
                .await;
        }
        let job = s.run_in_process(job).await;
        assert_eq!(job.state, "succeeded", "{phase}: {:?}", job.last_error);
        assert_eq!(
            s.status_of(&old).await.as_deref(),
            status,
            "the old key after {phase}"
        );
    }
    let (max_keys, violations) = monitor.stop().await;
    assert!(
        violations.is_empty(),
        "the Secret referenced a key that did not work: {violations:?}"
    );
    assert!(max_keys <= 2, "the user held {max_keys} keys at once");
    s.assert_new_key_works().await;
    let keys = access_key::list(&s.env.admin.iam, &s.bucket).await.unwrap();
    assert_eq!(
        keys.len(),
        1,
        "only the key the Secret references is left: {keys:?}"
    );
    s.env.app.stop().await;
}

/// A worker killed after reading the old key's last use, before recording the step, wrote
/// nothing: the last use is recorded in the step's fenced transaction, not on the side (a
/// worker that lost its lease could otherwise still write it). The rescuer records it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_after_reading_the_last_use_recorded_nothing() {
    let s = Scenario::start("lastused").await;
    let job = s.queue_rotation().await;
    assert_eq!(s.run_in_process(job).await.state, "succeeded");
    let job = s.make_retirement_due("deactivate_after").await;
    s.kill_child_at("last_used:before-record", 1).await;
    s.assert_killed_before_record(job, "last_used", 1).await;
    let last_used = || async {
        let recorded: Option<serde_json::Value> =
            sqlx::query_scalar("SELECT last_used FROM key_retirements")
                .fetch_one(&s.env.app.db)
                .await
                .unwrap();
        recorded
    };
    assert_eq!(last_used().await, None, "written outside the step's record");
    let ended = s.run_in_process(job).await;
    assert_eq!(ended.state, "succeeded", "{:?}", ended.last_error);
    assert!(last_used().await.is_some(), "recorded with the step");
    s.env.app.stop().await;
}

/// A worker dies after writing the Secret, and the rotation is cancelled before another worker
/// records it: the job ends cancelled, but the Secret holds the new key, so the old key's
/// retirement is scheduled anyway (else the sweep would delete it without a grace period).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_writing_the_secret_then_a_cancel_still_schedules_the_retirement() {
    let s = Scenario::start("secret-cancel").await;
    let monitor = Monitor::start(&s);
    let job = s.queue_rotation().await;
    s.kill_child_at("secret:before-record", 1).await;
    let path = format!("/v1/jobs/{job}/cancel");
    let cancel = s
        .env
        .app
        .post_json(&path, &s.env.app.operator(), &json!({}))
        .await;
    assert!(cancel.status().is_success(), "cancel: {}", cancel.status());
    let ended = s.run_in_process(job).await;
    let (max_keys, violations) = monitor.stop().await;
    assert_eq!(ended.state, "cancelled", "{:?}", ended.last_error);
    assert!(violations.is_empty(), "{violations:?}");
    assert!(max_keys <= 2, "the user held {max_keys} keys at once");
    let new = s.assert_new_key_works().await;
    s.assert_rotated_once(&new, "no key made by hand").await;
    let recorded = s.env.repository(&s.name).await["resources"]["access_key_id"].clone();
    assert_eq!(recorded, new.as_str());
    s.env.app.stop().await;
}

/// Queues a rotation of a ready repository (whose user also holds a key made by hand, for
/// `make_room` to delete), lets `kills` children die at `"<step>:before-record"`, then lets an
/// in-process worker finish the job, and checks the end state.
async fn crash_rotation(step: &'static str, kills: i32) {
    assert!(STEPS.contains(&step), "unknown step {step}");
    let s = Scenario::start(step).await;
    let by_hand = s.key_made_by_hand().await;
    let monitor = Monitor::start(&s);
    let job = s.queue_rotation().await;
    for kill in 1..=kills {
        s.kill_child_at(&format!("{step}:before-record"), kill)
            .await;
        s.assert_killed_before_record(job, step, kill).await;
    }
    let ended = s.run_in_process(job).await;
    let (max_keys, violations) = monitor.stop().await;
    assert_eq!(
        ended.state, "succeeded",
        "the rescued rotation: {:?}",
        ended.last_error
    );
    assert_eq!(
        ended.attempts,
        kills + 1,
        "{kills} killed worker(s), then the rescuer"
    );
    assert!(
        violations.is_empty(),
        "the Secret referenced a key that did not work: {violations:?}"
    );
    assert!(
        max_keys <= 2,
        "the user held {max_keys} access keys at once (IAM allows 2)"
    );

    let new = s.assert_new_key_works().await;
    s.assert_rotated_once(&new, &by_hand).await;
    s.assert_audit_trail(job, step, kills).await;
    s.env.app.stop().await;
}

/// One repository, made ready by an in-process worker; the API has no workers of its own.
struct Scenario {
    env: Env,
    name: String,
    bucket: String,
    /// The key and the whole s3.conf before the rotation.
    old_key: String,
    conf_before: String,
}

impl Scenario {
    async fn start(label: &str) -> Scenario {
        let env = Env::builder(&[NS]).workers(0).start().await;
        let name = unique_name(&format!("rc-{}", label.replace('_', "-")));
        let bucket = bucket_for(&name);
        let path = "/v1/backup-repositories";
        let body = json!({"name": name, "namespace": env.ns(NS)});
        let created = env.app.post_json(path, &env.app.operator(), &body).await;
        assert_eq!(created.status(), 202);
        let created: serde_json::Value = created.json().await.unwrap();
        let job = Uuid::parse_str(created["job"]["id"].as_str().unwrap()).unwrap();
        let mut s = Scenario {
            env,
            name,
            bucket,
            old_key: String::new(),
            conf_before: String::new(),
        };
        let provisioned = s.run_in_process(job).await;
        assert_eq!(
            provisioned.state, "succeeded",
            "{:?}",
            provisioned.last_error
        );
        s.conf_before = s.s3_conf().await.expect("s3.conf after provisioning");
        s.old_key = conf_value(&s.conf_before, "repo2-s3-key");
        s
    }

    async fn s3_conf(&self) -> Option<String> {
        self.env.s3_conf(NS, &self.bucket).await
    }

    async fn key_made_by_hand(&self) -> String {
        let iam = &self.env.admin.iam;
        let made = iam.create_access_key().user_name(&self.bucket).send().await;
        made.unwrap()
            .access_key()
            .unwrap()
            .access_key_id()
            .to_owned()
    }

    async fn queue_rotation(&self) -> Uuid {
        let path = format!("/v1/backup-repositories/{}/rotate-key", self.name);
        let response = self
            .env
            .app
            .post_json(&path, &self.env.app.operator(), &json!({}))
            .await;
        assert_eq!(response.status(), 202);
        let body: serde_json::Value = response.json().await.unwrap();
        Uuid::parse_str(body["job"]["id"].as_str().unwrap()).unwrap()
    }

    async fn status_of(&self, key: &str) -> Option<String> {
        let keys = access_key::list(&self.env.admin.iam, &self.bucket)
            .await
            .unwrap();
        keys.into_iter().find(|k| k.id == key).map(|k| k.status)
    }

    /// Makes the retirement due now (`column`: its deadline) and queues its job.
    async fn make_retirement_due(&self, column: &str) -> Uuid {
        let update = format!("UPDATE key_retirements SET {column} = now() - interval '1 second'");
        sqlx::query(sqlx::AssertSqlSafe(update))
            .execute(&self.env.app.db)
            .await
            .unwrap();
        let schedule = KeySchedule {
            db: self.env.app.db.clone(),
            iam: self.env.admin.iam.clone(),
            max_age: None,
            max_attempts: 5,
        };
        let round = schedule.round().await.expect("schedule round");
        assert_eq!(round.retirements.len(), 1, "{round:?}");
        sqlx::query_scalar(
            "SELECT id FROM jobs WHERE kind = 'retire-access-key' AND state = 'queued'",
        )
        .fetch_one(&self.env.app.db)
        .await
        .unwrap()
    }

    /// Starts a child worker that dies at `kill_at`, and waits for its SIGKILL.
    async fn kill_child_at(&self, kill_at: &str, kill: i32) {
        let spec = ChildSpec {
            database_url: self.env.app.database_url.clone(),
            moto_endpoint: self.env.moto_endpoint.clone(),
            region: self.env.region.clone(),
            kube_url: self.env.kube.proxy.url.clone(),
            kube_ca_pem: self.env.kube.server.ca_pem.clone(),
            kube_token: self.env.kube.service_token.clone(),
            encryption_key: self.env.encryption_key.clone(),
            kill_at: kill_at.to_owned(),
            worker_id: format!("rotation-crash-child-{kill}"),
        };
        crash_child::spawn(CHILD_TEST, &spec)
            .expect_sigkill(DEADLINE)
            .await;
    }

    /// The step started and recorded nothing: no success, no audit entry of this attempt.
    async fn assert_killed_before_record(&self, job: Uuid, step: &str, kill: i32) {
        let rows = queue::steps(&self.env.app.db, job).await.unwrap();
        let row = rows
            .iter()
            .find(|r| r.step == step)
            .expect("the step started");
        assert_eq!(
            (row.state.as_str(), row.attempts),
            ("running", kill),
            "{step} after kill {kill}"
        );
        let audited: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM audit_events WHERE job_id = $1 AND step = $2 AND outcome <> 'failed'",
        )
        .bind(job)
        .bind(step)
        .fetch_one(&self.env.app.db)
        .await
        .unwrap();
        assert_eq!(audited, 0, "{step} was killed before recording");
    }

    /// An in-process worker (same encryption key) runs until `job` ends; the rescuer re-queues
    /// a job whose killed worker's lease expired.
    async fn run_in_process(&self, job: Uuid) -> Job {
        let provisioner = self
            .env
            .provisioner(Moto::shared(), CallCounter::new())
            .await;
        let (rotator, retirer) = rotation_kinds(&provisioner, &worker_args(1));
        let registry = Registry::new()
            .register(rotator)
            .register(retirer)
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
        let workers = tokio::spawn(
            WorkerPool::new(self.env.app.db.clone(), registry, config).run(shutdown.clone()),
        );
        let ended = eventually(DEADLINE, "the job to end", || async {
            let job = queue::get(&self.env.app.db, job).await.unwrap().unwrap();
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

    /// The Secret references a new, active key that lists the bucket; the cipher pass and the
    /// rest of s3.conf are as before. Returns the new key.
    async fn assert_new_key_works(&self) -> String {
        let conf = self.s3_conf().await.expect("s3.conf");
        let new = conf_value(&conf, "repo2-s3-key");
        assert_ne!(new, self.old_key, "the Secret references a new key");
        assert_eq!(conf_value(&conf, "repo3-s3-key"), new);
        for setting in ["repo2-cipher-pass", "repo3-cipher-pass"] {
            let before = conf_value(&self.conf_before, setting);
            assert_eq!(conf_value(&conf, setting), before, "{setting} is unchanged");
        }
        assert_eq!(self.status_of(&new).await.as_deref(), Some("Active"));
        let secret = conf_value(&conf, "repo2-s3-key-secret");
        let s3 = self
            .env
            .admin
            .s3_with_static_credentials(&self.env.region, &new, &secret);
        s3.list_objects_v2()
            .bucket(&self.bucket)
            .send()
            .await
            .expect("the new key works");
        new
    }

    /// The user holds the old key (active, in its grace period) and `new`, not the key made by
    /// hand; one retirement is scheduled; the sealed key secret is wiped.
    async fn assert_rotated_once(&self, new: &str, by_hand: &str) {
        let listed = access_key::list(&self.env.admin.iam, &self.bucket).await;
        let mut keys: Vec<(String, String)> = listed
            .unwrap()
            .into_iter()
            .map(|k| (k.id, k.status))
            .collect();
        keys.sort();
        let active = "Active".to_owned();
        let mut expected = vec![
            (self.old_key.clone(), active.clone()),
            (new.to_owned(), active),
        ];
        expected.sort();
        assert_eq!(keys, expected, "the old key and the new one; not {by_hand}");
        let retirements: Vec<(String, String)> =
            sqlx::query_as("SELECT old_key_id, new_key_id FROM key_retirements")
                .fetch_all(&self.env.app.db)
                .await
                .unwrap();
        let one = vec![(self.old_key.clone(), new.to_owned())];
        assert_eq!(retirements, one, "one retirement scheduled");
        let sealed: i64 = sqlx::query_scalar("SELECT count(*) FROM secret_material")
            .fetch_one(&self.env.app.db)
            .await
            .unwrap();
        assert_eq!(
            sealed, 0,
            "the sealed key secret is wiped once the Secret holds it"
        );
    }

    /// One success entry per step, the crashed one on the attempt after the last kill; no
    /// duplicate entries.
    async fn assert_audit_trail(&self, job: Uuid, step: &str, kills: i32) {
        let rows: Vec<(Option<String>, Option<i32>, String, String)> = sqlx::query_as(
            "SELECT step, attempt, action, outcome FROM audit_events WHERE job_id = $1 ORDER BY id",
        )
        .bind(job)
        .fetch_all(&self.env.app.db)
        .await
        .unwrap();
        let mut successes: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        for (s, attempt, action, outcome) in &rows {
            let Some(s) = s else { continue };
            assert_eq!(action, &format!("rotate-access-key.{s}"));
            if outcome != "failed" {
                successes
                    .entry(s.clone())
                    .or_default()
                    .push(attempt.unwrap());
            }
        }
        for expected in STEPS {
            let attempts = successes.get(expected).cloned().unwrap_or_default();
            assert_eq!(attempts.len(), 1, "step {expected}: {rows:#?}");
        }
        assert_eq!(successes[step], vec![kills + 1], "{rows:#?}");
    }
}

/// Polls the Secret and the user's keys while a scenario runs: the most keys seen at once, and
/// every moment the Secret referenced a key that was missing or inactive.
struct Monitor {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl Monitor {
    fn start(s: &Scenario) -> Monitor {
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let iam = s.env.admin.iam.clone();
        let secrets = s.env.kube.secrets(s.env.ns(NS));
        let bucket = s.bucket.clone();
        let handle = tokio::spawn(async move {
            let (mut most, mut violations) = (0, Vec::new());
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => return (most, violations),
                    _ = tick.tick() => {}
                }
                // The Secret first: the key it references must still be there right after.
                let Ok(Some(secret)) = secrets.get_opt(&bucket).await else {
                    continue;
                };
                let referenced = referenced_key(&secret);
                let Ok(keys) = access_key::list(&iam, &bucket).await else {
                    continue;
                };
                most = most.max(keys.len());
                if !keys
                    .iter()
                    .any(|k| Some(&k.id) == referenced.as_ref() && k.is_active())
                {
                    violations.push(format!("{referenced:?} not active among {keys:?}"));
                }
            }
        });
        Monitor { stop, handle }
    }

    async fn stop(self) -> (usize, Vec<String>) {
        self.stop.cancel();
        self.handle.await.expect("monitor")
    }
}

fn referenced_key(secret: &k8s_openapi::api::core::v1::Secret) -> Option<String> {
    let data = secret.data.as_ref()?.get("s3.conf")?;
    let text = std::str::from_utf8(&data.0).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("repo2-s3-key="))
        .map(str::to_owned)
}
