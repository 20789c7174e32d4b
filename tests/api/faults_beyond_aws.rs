//! Issue 8, part 3, "Faults beyond AWS": the Kubernetes API answering 500/429/409 on a share of
//! requests (and another writer changing the Secret between the service's read and its write),
//! a Postgres restart while jobs run, a worker whose database connection is black-holed, and
//! three worker processes on one database with 100 repositories.
//!
//! Every scenario prints what it measured (repositories ready of total, job retries, AWS calls
//! against a clean run) as `faults:` lines.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use backup_provisioner::auth::{Role, mint_hs256};
use backup_provisioner::provision::access_key;
use kube::api::{Patch, PatchParams};
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::support::app::{AUDIENCE, HS256_SECRET, eventually, fresh_database};
use crate::support::aws_realism::{AwsProxy, AwsRealism, Received};
use crate::support::env::{Env, REGION, bucket_for, conf_value, unique_name};
use crate::support::kube_env::KubeEnv;
use crate::support::kube_proxy::{FaultShare, Hold};
use crate::support::moto::Moto;
use crate::support::private_postgres::PrivatePostgres;
use crate::support::service_process::{ServiceProcess, ServiceSpec};

const NS: &str = "zitadel";
const JOB_DEADLINE: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------------
// Shared helpers: the API as a client sees it, and how repositories ended
// ---------------------------------------------------------------------------------------------

/// The service's API at `base` (a `TestApp` or a `serve` process), as operator and viewer.
struct Api {
    base: String,
    http: reqwest::Client,
    operator: String,
    viewer: String,
}

impl Api {
    fn new(base: &str) -> Api {
        let token = |sub: &str, role: Role| {
            mint_hs256(
                &SecretString::from(HS256_SECRET),
                sub,
                &[role],
                Duration::from_secs(3600),
                AUDIENCE,
            )
            .expect("token")
        };
        Api {
            base: base.to_owned(),
            http: reqwest::Client::new(),
            operator: token("operator@faults", Role::Operator),
            viewer: token("viewer@faults", Role::Viewer),
        }
    }

    /// Creates a repository; returns its job id. A 429 is retried after its `Retry-After`, as
    /// a client should.
    async fn create(&self, name: &str, namespace: &str) -> String {
        let until = Instant::now() + JOB_DEADLINE;
        let response = loop {
            let response = self
                .http
                .post(format!("{}/v1/backup-repositories", self.base))
                .bearer_auth(&self.operator)
                .json(&json!({"name": name, "namespace": namespace}))
                .send()
                .await
                .expect("create request");
            if response.status() != 429 || Instant::now() >= until {
                break response;
            }
            let after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            // The server's back-off, not a synchronisation.
            tokio::time::sleep(Duration::from_secs(after)).await;
        };
        let status = response.status();
        let created: Value = response.json().await.expect("json");
        assert_eq!(status, 202, "create {name}: {created}");
        created["job"]["id"].as_str().expect("job id").to_owned()
    }

    async fn get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.viewer)
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json")
    }

    /// Long-polls the job until it ends or `deadline` passes; its last view.
    async fn wait_for_job(&self, job_id: &str, deadline: Duration) -> Value {
        let until = Instant::now() + deadline;
        loop {
            let view = self.get(&format!("/v1/jobs/{job_id}?wait=5s")).await;
            let state = view["state"].as_str().unwrap_or_default();
            if ["succeeded", "failed", "cancelled"].contains(&state) || Instant::now() >= until {
                return view;
            }
        }
    }

    async fn wait_for_jobs(&self, job_ids: &[String]) -> Vec<Value> {
        let waits = job_ids.iter().map(|id| self.wait_for_job(id, JOB_DEADLINE));
        futures::future::join_all(waits).await
    }

    async fn repository(&self, name: &str) -> Value {
        self.get(&format!("/v1/backup-repositories/{name}")).await
    }
}

/// How one repository ended: its job, its state, its user's keys in IAM and the key and cipher
/// pass in its Secret (read as admin from the real kube-apiserver).
#[derive(Debug)]
struct Ended {
    name: String,
    job_state: String,
    attempts: i64,
    /// Shown in failure messages.
    #[allow(dead_code)]
    last_error: Option<String>,
    repository_state: String,
    keys: Vec<String>,
    secret_key: Option<String>,
    cipher_pass: Option<String>,
}

impl Ended {
    fn ok(&self) -> bool {
        self.job_state == "succeeded"
            && self.repository_state == "ready"
            && self.keys.len() == 1
            && self.secret_key.as_deref() == self.keys.first().map(String::as_str)
            && self.cipher_pass.as_ref().is_some_and(|p| p.len() == 64)
    }
}

async fn ended(
    api: &Api,
    iam: &aws_sdk_iam::Client,
    kube: &KubeEnv,
    name: &str,
    job: &Value,
) -> Ended {
    let bucket = bucket_for(name);
    let repository = api.repository(name).await;
    let keys = access_key::list(iam, &bucket)
        .await
        .map(|keys| keys.into_iter().map(|k| k.id).collect())
        .unwrap_or_default();
    let conf = kube.s3_conf(kube.ns(NS), &bucket).await;
    Ended {
        name: name.to_owned(),
        job_state: job["state"].as_str().unwrap_or_default().to_owned(),
        attempts: job["attempts"].as_i64().unwrap_or(0),
        last_error: job["last_error"].as_str().map(str::to_owned),
        repository_state: repository["state"].as_str().unwrap_or_default().to_owned(),
        keys,
        secret_key: conf.as_deref().map(|c| conf_value(c, "repo2-s3-key")),
        cipher_pass: conf.as_deref().map(|c| conf_value(c, "repo2-cipher-pass")),
    }
}

async fn all_ended(
    api: &Api,
    iam: &aws_sdk_iam::Client,
    kube: &KubeEnv,
    names: &[String],
    jobs: &[Value],
) -> Vec<Ended> {
    let mut all = Vec::new();
    for (name, job) in names.iter().zip(jobs) {
        all.push(ended(api, iam, kube, name, job).await);
    }
    all
}

/// `ready/total`, job retries, and a line for each repository that did not end well.
fn tally(ended: &[Ended]) -> (usize, i64, String) {
    let ready = ended.iter().filter(|e| e.ok()).count();
    let retries = ended.iter().map(|e| (e.attempts - 1).max(0)).sum();
    let bad: Vec<String> = ended
        .iter()
        .filter(|e| !e.ok())
        .map(|e| format!("  {e:?}"))
        .collect();
    (ready, retries, bad.join("\n"))
}

// ---------------------------------------------------------------------------------------------
// Kubernetes: 500/429/409 on a share of requests
// ---------------------------------------------------------------------------------------------

/// The seed of the Kubernetes faults unless `KUBE_FAULT_SEED` is set: it draws each of 500,
/// 429 and 409 for these names.
const KUBE_FAULT_SEED: u64 = 8;
const KUBE_FAULT_RATE: f64 = 0.2;
const KUBE_REPOSITORIES: usize = 8;

/// Workers that retry quickly and often enough to outlast a fault on a share of requests.
fn patient_workers(worker: &mut backup_provisioner::config::WorkerSettingsArgs) {
    worker.max_attempts = 30;
    worker.retry_base = Duration::from_millis(20);
}

/// Provisions `names` through the API (all queued at once); how they ended.
async fn provision_batch(env: &Env, names: &[String]) -> Vec<Ended> {
    let api = Api::new(&env.app.url(""));
    let mut job_ids = Vec::new();
    for name in names {
        job_ids.push(api.create(name, env.ns(NS)).await);
    }
    let jobs = api.wait_for_jobs(&job_ids).await;
    all_ended(&api, &env.admin.iam, &env.kube, names, &jobs).await
}

/// A fifth of the service's requests to the real kube-apiserver are answered 500, 429 or (for
/// writes) 409 by the proxy in front of it, from a seeded draw. Every job converges: all
/// repositories end `ready` with one key each and the Secret referencing it; the faults cost
/// job retries (Kubernetes errors retry at the job level) and the AWS reads those retries
/// repeat, compared with the same batch without faults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_errors_on_a_share_of_requests_jobs_converge() {
    let started = Instant::now();
    let moto = Moto::start();
    let env = Env::builder(&[NS])
        .moto(&moto)
        .workers(4)
        .map_worker(patient_workers)
        .aws_realism(AwsRealism::off())
        .start()
        .await;
    let aws = env.realism.as_ref().expect("proxy");
    let clean_names: Vec<String> = (0..KUBE_REPOSITORIES)
        .map(|i| format!("kf-clean-{i:02}"))
        .collect();
    let names: Vec<String> = (0..KUBE_REPOSITORIES)
        .map(|i| format!("kf-{i:02}"))
        .collect();

    let clean = provision_batch(&env, &clean_names).await;
    let (clean_ready, clean_retries, bad) = tally(&clean);
    assert_eq!(clean_ready, clean.len(), "the clean batch:\n{bad}");
    let (clean_aws, clean_aws_mutating) = (aws.total(), aws.mutating_count());
    let clean_kube = env.kube.requests().len();
    let clean_kube_writes = env.kube.mutating_count();

    aws.reset_counts();
    env.kube.clear_requests();
    let share = match std::env::var("KUBE_FAULT_SEED") {
        Ok(_) => FaultShare::new(KUBE_FAULT_RATE),
        Err(_) => FaultShare::new(KUBE_FAULT_RATE).seed(KUBE_FAULT_SEED),
    };
    let seed = share.seed;
    env.kube.proxy.fault_share(Some(share));
    let faulty = provision_batch(&env, &names).await;
    env.kube.proxy.fault_share(None);

    let requests = env.kube.requests();
    let writes = requests
        .iter()
        .filter(|r| r.is_mutating() && !r.injected)
        .count();
    let mut injected: BTreeMap<u16, usize> = BTreeMap::new();
    for r in requests.iter().filter(|r| r.injected) {
        *injected.entry(r.status).or_default() += 1;
    }
    let (ready, retries, bad) = tally(&faulty);
    let summary = format!(
        "faults: kubernetes {:.0} % errors (seed {seed}): {ready}/{} ready, {retries} job \
         retries (clean: {clean_ready}/{} ready, {clean_retries} retries); kube requests {} \
         ({writes} writes reached the server) vs {clean_kube} ({clean_kube_writes}) clean, \
         injected {injected:?}; AWS calls {} ({} mutating) vs {clean_aws} \
         ({clean_aws_mutating}) clean: {} extra ({} mutating); {:.1?}",
        KUBE_FAULT_RATE * 100.0,
        faulty.len(),
        clean.len(),
        requests.len(),
        aws.total(),
        aws.mutating_count(),
        aws.total() as i64 - clean_aws as i64,
        aws.mutating_count() as i64 - clean_aws_mutating as i64,
        started.elapsed(),
    );
    eprintln!("{summary}");
    assert_eq!(ready, faulty.len(), "{summary}\n{bad}");
    assert!(retries > 0, "the faults cost retries: {summary}");
    assert_eq!(
        writes, KUBE_REPOSITORIES,
        "each Secret was written once, never again over itself: {summary}"
    );
    if seed == KUBE_FAULT_SEED {
        for status in [500, 429, 409] {
            assert!(
                injected.contains_key(&status),
                "no {status} drawn: {summary}"
            );
        }
    }
    env.app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Kubernetes: another writer changes the Secret between the service's read and its write
// ---------------------------------------------------------------------------------------------

/// The `s3.conf` text the runbook prescribes.
fn s3_conf_text(pass: &str, key: &str, secret: &str) -> String {
    format!(
        "[global]\nrepo2-cipher-pass={pass}\nrepo2-s3-key={key}\nrepo2-s3-key-secret={secret}\n\
         repo3-cipher-pass={pass}\nrepo3-s3-key={key}\nrepo3-s3-key-secret={secret}\n"
    )
}

fn b64(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// What happened in one race (see [`race_a_newer_secret`]).
struct Race {
    job: Value,
    newer_pass: String,
    /// The cipher pass the Secret held before.
    older_pass: String,
    older_key: String,
    conf_after: String,
    keys_after: Vec<String>,
    /// The service's Secret writes that reached the server, with the server's answer.
    writes: Vec<u16>,
}

/// Runs `job` to its end while the proxy holds the service's request matching `hold`; while it
/// is held, another field manager ("ops-restore") applies `secret`. Panics if nothing was held.
async fn while_another_writer_applies(
    env: &Env,
    job: impl std::future::Future<Output = Value>,
    hold: Hold,
    ns: &str,
    secret: &Value,
) -> Value {
    let name = secret["metadata"]["name"]
        .as_str()
        .expect("the Secret's name");
    let mut held = env.kube.proxy.hold(hold);
    let mut raced = false;
    let mut job = std::pin::pin!(job);
    let job = loop {
        tokio::select! {
            job = &mut job => break job,
            Some(request) = held.recv() => {
                let params = PatchParams::apply("ops-restore").force();
                let applied = env.kube.secrets(ns).patch(name, &params, &Patch::Apply(secret)).await;
                applied.expect("the other writer's apply");
                raced = true;
                drop(request);
            }
        }
    };
    assert!(raced, "the held request never came: {job:#}");
    job
}

/// Deactivates the repository's key (so a reconcile must write the Secret), reconciles, and
/// while the service's request matching `hold` waits at the proxy, another field manager
/// (`ops-restore`, forced server-side apply) writes an `s3.conf` with a new cipher pass into
/// the Secret.
async fn race_a_newer_secret(env: &Env, name: &str, hold: Hold) -> Race {
    let bucket = bucket_for(name);
    let ns = env.ns(NS).to_owned();
    let before = env.s3_conf(NS, &bucket).await.expect("s3.conf");
    let (older_pass, older_key, older_secret) = (
        conf_value(&before, "repo2-cipher-pass"),
        conf_value(&before, "repo2-s3-key"),
        conf_value(&before, "repo2-s3-key-secret"),
    );
    env.admin
        .iam
        .update_access_key()
        .user_name(&bucket)
        .access_key_id(&older_key)
        .status(aws_sdk_iam::types::StatusType::Inactive)
        .send()
        .await
        .expect("deactivate the key");
    let newer_pass = backup_provisioner::domain::CipherPass::generate()
        .expose()
        .to_owned();
    let newer = json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": bucket},
        "data": {"s3.conf": b64(&s3_conf_text(&newer_pass, &older_key, &older_secret))},
    });
    env.kube.clear_requests();
    let job = while_another_writer_applies(env, env.reconcile(name), hold, &ns, &newer).await;
    let writes = env
        .kube
        .requests()
        .iter()
        .filter(|r| r.is_mutating() && !r.injected)
        .map(|r| r.status)
        .collect();
    Race {
        job,
        newer_pass,
        older_pass,
        older_key,
        conf_after: env.s3_conf(NS, &bucket).await.expect("s3.conf"),
        keys_after: access_key::list(&env.admin.iam, &bucket)
            .await
            .expect("keys")
            .into_iter()
            .map(|k| k.id)
            .collect(),
        writes,
    }
}

/// The service owns `s3.conf` and repairs it when it drifts, but builds it from the Secret it
/// read (the cipher pass in the Secret is always reused): a Secret another writer changed after
/// that read is newer than what the service would write. The guarantee: the service's write
/// never lands on a version of the Secret it did not read. A change between the service's read
/// and its apply makes the apply fail (the server answers 409: the apply carries the
/// resourceVersion read), a change between the attempt's first read and the apply's read is
/// noticed before writing; either way the next attempt builds `s3.conf` from the newer Secret,
/// so its cipher pass is kept, and the job still ends with one new key in the Secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_changed_after_the_service_read_it_is_not_overwritten() {
    let env = Env::builder(&[NS])
        .workers(1)
        .map_worker(|w| w.retry_base = Duration::from_millis(50))
        .start()
        .await;
    let name = unique_name("newer");
    let bucket = bucket_for(&name);
    let job = env
        .provision(json!({"name": name, "namespace": env.ns(NS)}))
        .await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let path = format!("/api/v1/namespaces/{}/secrets/{bucket}", env.ns(NS));

    // Between the apply's read and its write: hold the apply itself.
    let between_read_and_apply = race_a_newer_secret(&env, &name, Hold::next("PATCH", &path)).await;
    // Between the attempt's first read (the job's start) and the apply's read: hold the second
    // read of the attempt.
    let between_reads = race_a_newer_secret(&env, &name, Hold::next("GET", &path).skip(1)).await;

    let mut failures = Vec::new();
    for (window, race) in [
        ("read -> apply", &between_read_and_apply),
        ("first read -> apply's read", &between_reads),
    ] {
        let pass = conf_value(&race.conf_after, "repo2-cipher-pass");
        let key = conf_value(&race.conf_after, "repo2-s3-key");
        let kept = if pass == race.newer_pass {
            "the newer cipher pass"
        } else if pass == race.older_pass {
            "the OLDER cipher pass (the newer Secret was overwritten)"
        } else {
            "another cipher pass"
        };
        let summary = format!(
            "faults: newer Secret ({window}): job {} after {} attempt(s), the service's Secret \
             writes answered {:?}, the Secret holds {kept}, keys {:?} (Secret: {key})",
            race.job["state"], race.job["attempts"], race.writes, race.keys_after
        );
        eprintln!("{summary}");
        let ok = race.job["state"] == "succeeded"
            && pass == race.newer_pass
            && key != race.older_key
            && race.keys_after == [key]
            && race.job["attempts"].as_i64() >= Some(2);
        if !ok {
            failures.push(summary);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        between_read_and_apply.writes.contains(&409),
        "the server refused the stale apply: {:?}",
        between_read_and_apply.writes
    );
    env.app.stop().await;
}

/// The Secret did not exist when the attempt read it, and someone creates one (an operator
/// restoring it from a backup, with the cipher pass the backups need) before the service's
/// write: the write must not take its `s3.conf` over. The apply that creates is unforced, so the
/// server answers 409; the next attempt reads the Secret, finds it is not managed by the
/// service, and stops, leaving it as it is.
#[tokio::test]
async fn a_secret_created_after_the_service_found_none_is_not_overwritten() {
    let env = Env::builder(&[NS])
        .workers(1)
        .map_worker(|w| w.retry_base = Duration::from_millis(50))
        .start()
        .await;
    let name = unique_name("created");
    let bucket = bucket_for(&name);
    let ns = env.ns(NS).to_owned();
    let path = format!("/api/v1/namespaces/{ns}/secrets/{bucket}");
    let restored_pass = backup_provisioner::domain::CipherPass::generate()
        .expose()
        .to_owned();
    let restored = json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": bucket},
        "data": {"s3.conf": b64(&s3_conf_text(&restored_pass, "AKIARESTORED", "restored"))},
    });
    let provisioned = env.provision(json!({"name": name, "namespace": ns}));
    let hold = Hold::next("PATCH", &path);
    let job = while_another_writer_applies(&env, provisioned, hold, &ns, &restored).await;
    let conf = env.s3_conf(NS, &bucket).await.expect("s3.conf");
    assert_eq!(
        conf_value(&conf, "repo2-cipher-pass"),
        restored_pass,
        "the restored cipher pass was overwritten: {job:#}"
    );
    assert_eq!(job["state"], "failed", "{job:#}");
    let error = job["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("not managed by backup-provisioner"),
        "{job:#}"
    );
    env.app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// A worker whose database connection is black-holed
// ---------------------------------------------------------------------------------------------

/// A worker pool of the test's own running the real provisioning job, on the service's real
/// pool (`db::connect`, its session settings, a heartbeat pool of its own) at `database_url`,
/// its AWS calls through an AWS realism proxy of its own (counted with their times).
struct TestWorker {
    aws: AwsProxy,
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<(), sqlx::Error>>,
}

impl TestWorker {
    async fn start(
        env: &Env,
        moto: &Moto,
        id: &str,
        database_url: &str,
        lease: Duration,
        realism: AwsRealism,
    ) -> TestWorker {
        use backup_provisioner::jobs::{Registry, WorkerConfig, WorkerPool};
        let aws = realism.start(moto);
        let provisioner = crate::support::env::provisioner(
            aws.clients(&env.region, None).await,
            env.kube.service_client(),
            &env.encryption_key,
        );
        let options = backup_provisioner::db::options(&SecretString::from(database_url))
            .expect("database url");
        let pool = backup_provisioner::db::connect(options, 1)
            .await
            .expect("the worker's pool");
        let heartbeats = backup_provisioner::db::heartbeat_pool(&pool);
        let config = WorkerConfig {
            concurrency: 1,
            lease,
            poll_interval: Duration::from_millis(200),
            retry_base: Duration::from_millis(50),
            shutdown_grace: Duration::from_secs(1),
            worker_id: id.to_owned(),
        };
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(
            WorkerPool::new(pool, Registry::new().register(provisioner), config)
                .with_heartbeat_pool(heartbeats)
                .run(shutdown.clone()),
        );
        TestWorker {
            aws,
            shutdown,
            task,
        }
    }

    /// Stops the pool (graceful) and waits for it.
    async fn stop(self) -> AwsProxy {
        self.shutdown.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(30), self.task).await;
        assert!(
            matches!(stopped, Ok(Ok(Ok(())))),
            "the worker pool stopped: {stopped:?}"
        );
        self.aws
    }
}

/// Records every lease a job is given or renewed to (the claim and each heartbeat), with the
/// worker, into `lease_log` of the test's database.
async fn log_leases(db: &sqlx::PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE lease_log (job_id uuid, locked_by text, lease_expires_at timestamptz,
                                 at timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE FUNCTION log_lease() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.lease_expires_at IS NOT NULL THEN
             INSERT INTO lease_log (job_id, locked_by, lease_expires_at)
             VALUES (NEW.id, NEW.locked_by, NEW.lease_expires_at);
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER jobs_lease_log AFTER UPDATE ON jobs
           FOR EACH ROW EXECUTE FUNCTION log_lease();",
    )
    .execute(db)
    .await
    .expect("lease log");
}

/// Worker 1's connections to Postgres (jobs and heartbeats) pass a TCP forwarder that stops
/// forwarding while it provisions a repository (its AWS calls slowed to 400 ms, so it is in the
/// middle of them). It cannot renew its lease, so it must stop before the lease expires:
/// worker 2 takes the job once the lease has expired and finishes it, and worker 1's AWS
/// realism proxy (its own) receives no call after the last lease worker 1 was given (from a
/// trigger on `jobs`). Once the forwarder passes bytes again, what worker 1 had sent arrives
/// late and changes nothing (fenced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_postgres_stops_before_its_lease_expires_and_another_finishes() {
    let started = Instant::now();
    let lease = Duration::from_secs(6);
    let moto = Moto::shared();
    let env = Env::builder(&[NS]).workers(0).start().await;
    log_leases(&env.app.db).await;
    let api = Api::new(&env.app.url(""));

    // A clean run, for the call count.
    let clean_worker = TestWorker::start(
        &env,
        moto,
        "clean",
        &env.app.database_url,
        lease,
        AwsRealism::off(),
    )
    .await;
    let clean_name = unique_name("cut-clean");
    let clean_job = api.create(&clean_name, env.ns(NS)).await;
    let job = api.wait_for_job(&clean_job, JOB_DEADLINE).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let clean_received = clean_worker.stop().await.received();
    let clean_calls = clean_received.len();
    let mutating = |calls: &[Received]| calls.iter().filter(|c| c.is_mutating()).count();
    let clean_mutating = mutating(&clean_received);

    let (forwarder, cut_url) =
        crate::support::tcp_proxy::Forwarder::for_database(&env.app.database_url).await;
    let slow = AwsRealism::off().latency(
        1.0,
        crate::support::aws_realism::Latency::Fixed(Duration::from_millis(400)),
    );
    let cut = TestWorker::start(&env, moto, "cut-off", &cut_url, lease, slow).await;
    let name = unique_name("cut");
    let job_id = api.create(&name, env.ns(NS)).await;
    // Worker 1 renewed its lease once (so the deadline comes from a heartbeat) and is inside
    // the job's AWS calls.
    eventually(JOB_DEADLINE, "worker 1 to renew its lease", || async {
        let leases: i64 =
            sqlx::query_scalar("SELECT count(*) FROM lease_log WHERE locked_by = 'cut-off'")
                .fetch_one(&env.app.db)
                .await
                .expect("lease log");
        (leases >= 2 && cut.aws.received().len() >= 3).then_some(())
    })
    .await;
    forwarder.pause(true);
    let paused_at = chrono::Utc::now();
    let calls_before_pause = cut.aws.received().len();
    let rescuer = TestWorker::start(
        &env,
        moto,
        "rescuer",
        &env.app.database_url,
        lease,
        AwsRealism::off(),
    )
    .await;
    let job = api.wait_for_job(&job_id, JOB_DEADLINE).await;

    let leases: Vec<(String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT locked_by, lease_expires_at FROM lease_log WHERE job_id = $1::uuid ORDER BY at",
    )
    .bind(&job_id)
    .fetch_all(&env.app.db)
    .await
    .expect("lease log");
    let deadline = leases
        .iter()
        .filter(|(by, _)| by == "cut-off")
        .map(|(_, until)| *until)
        .max()
        .expect("worker 1 held the job");
    let cut_calls = cut.aws.received();
    let late = |calls: &[Received]| -> Vec<String> {
        calls
            .iter()
            .filter(|c| c.at >= deadline)
            .map(|c| format!("{} {} at {}", c.operation, c.subject, c.at))
            .collect()
    };
    let last_call = cut_calls.iter().map(|c| c.at).max().expect("calls");
    let after_pause = cut_calls.iter().filter(|c| c.at > paused_at).count();
    let rescuer_received = rescuer.aws.received();
    let rescuer_calls = rescuer_received.len();
    let both_mutating = mutating(&cut_calls) + mutating(&rescuer_received);
    let result = ended(&api, &env.admin.iam, &env.kube, &name, &job).await;
    let summary = format!(
        "faults: black-holed worker (lease {lease:?}): {}/1 ready after {} attempt(s) ({} \
         retry); worker 1 made {} AWS calls ({calls_before_pause} before the cut, {after_pause} \
         after), its last {:.2} s before its lease expired, {} at or after; worker 2 made \
         {rescuer_calls}; {} AWS calls vs {clean_calls} clean: {} extra ({} mutating: \
         {both_mutating} vs {clean_mutating}); leases {:?}; {:.1?}",
        usize::from(result.ok()),
        result.attempts,
        (result.attempts - 1).max(0),
        cut_calls.len(),
        (deadline - last_call).as_seconds_f64(),
        late(&cut_calls).len(),
        cut_calls.len() + rescuer_calls,
        (cut_calls.len() + rescuer_calls) as i64 - clean_calls as i64,
        both_mutating as i64 - clean_mutating as i64,
        leases
            .iter()
            .map(|(by, until)| format!("{by} until {}", until.format("%H:%M:%S%.3f")))
            .collect::<Vec<_>>(),
        started.elapsed(),
    );
    eprintln!("{summary}");
    assert!(result.ok(), "{summary}\n{result:?}");
    assert_eq!(result.attempts, 2, "{summary}");
    assert!(
        late(&cut_calls).is_empty(),
        "worker 1 called AWS after its lease expired: {:?}\n{summary}",
        late(&cut_calls)
    );
    assert!(
        leases.last().is_some_and(|(by, _)| by == "rescuer"),
        "{summary}"
    );

    // The forwarder passes again: what worker 1 sent meanwhile arrives late and changes nothing.
    forwarder.pause(false);
    let cut_aws = cut.stop().await;
    rescuer.stop().await;
    let job = api.wait_for_job(&job_id, JOB_DEADLINE).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert!(late(&cut_aws.received()).is_empty(), "{summary}");
    assert_eq!(
        ended(&api, &env.admin.iam, &env.kube, &name, &job)
            .await
            .keys,
        result.keys,
        "{summary}"
    );
    env.app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Processes of the real binary
// ---------------------------------------------------------------------------------------------

/// Writes the service's kubeconfig (the proxy, the CA, the ServiceAccount's token) into `dir`.
fn write_kubeconfig(dir: &Path, kube: &KubeEnv) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(&path, kube.service_kubeconfig(NS)).expect("kubeconfig");
    path
}

/// Steps that succeeded more than once for one job, from the audit log (a step's success is
/// audited once per attempt that made it): `job step count`.
async fn steps_finished_twice(db: &sqlx::PgPool) -> Vec<String> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT job_id::text, step, count(*) FROM audit_events
          WHERE job_id IS NOT NULL AND step IS NOT NULL AND outcome <> 'failed'
          GROUP BY job_id, step HAVING count(*) > 1",
    )
    .fetch_all(db)
    .await
    .expect("audit log");
    rows.into_iter()
        .map(|(job, step, n)| format!("{job} {step} {n}"))
        .collect()
}

/// Jobs whose last step (`retire_old_keys`) did not succeed exactly once in the audit log.
async fn jobs_not_finished_once(db: &sqlx::PgPool, job_ids: &[String]) -> Vec<String> {
    let mut wrong = Vec::new();
    for id in job_ids {
        let finished: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM audit_events
              WHERE job_id = $1::uuid AND step = 'retire_old_keys' AND outcome <> 'failed'",
        )
        .bind(id)
        .fetch_one(db)
        .await
        .expect("audit log");
        if finished != 1 {
            wrong.push(format!("{id}: {finished}"));
        }
    }
    wrong
}

/// One `GET` with its status, content type, body and how long the answer took.
async fn probe(url: &str) -> (u16, String, String, Duration) {
    let asked = Instant::now();
    let answer = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(30))
        .send()
        .await;
    match answer {
        Ok(answer) => {
            let status = answer.status().as_u16();
            let content_type = answer
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let body = answer.text().await.unwrap_or_default();
            (status, content_type, body, asked.elapsed())
        }
        Err(e) => (0, String::new(), e.to_string(), asked.elapsed()),
    }
}

const RESTART_CLEAN: usize = 2;
const RESTART_REPOSITORIES: usize = 8;

/// The real `serve` process (4 workers, 6 s lease) on a Postgres cluster of the test's own,
/// its AWS calls slowed to 100 ms so several jobs are mid-way when the server stops (`pg_ctl
/// stop -m fast`: every session ends). While it is down `/readyz` answers 503 problem+json
/// (`/healthz` stays 200); once it is back the service reconnects by itself, `/readyz` is 200
/// again, every job ends `succeeded` and every repository `ready` with one key, and the audit
/// log shows no step (and so no job) finished twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_while_jobs_run_loses_no_job_and_finishes_none_twice() {
    let started = Instant::now();
    let pg = PrivatePostgres::start();
    let database_url = pg.create_database("bp").await;
    let kube = KubeEnv::start(&[NS]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = write_kubeconfig(dir.path(), &kube);
    let moto = Moto::shared();
    let admin = moto.clients(REGION, None).await;
    let aws = AwsRealism::off()
        .latency(
            1.0,
            crate::support::aws_realism::Latency::Fixed(Duration::from_millis(100)),
        )
        .start(moto);
    let key = backup_provisioner::crypto::EncryptionKey::generate_base64();
    let spec = ServiceSpec::new(
        "restart",
        &["serve", "--workers", "4"],
        &database_url,
        &key,
        &aws.endpoint,
        &kubeconfig,
    )
    .env("BP_JOB_LEASE", "6s")
    .env("BP_JOB_MAX_ATTEMPTS", "10");
    let mut service = ServiceProcess::spawn(dir.path(), &spec).await;
    let api = Api::new(service.base_url.as_deref().expect("serve"));
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url)
        .await
        .expect("the test's own connection");

    let clean_names: Vec<String> = (0..RESTART_CLEAN)
        .map(|_| unique_name("pg-clean"))
        .collect();
    let mut clean_jobs = Vec::new();
    for name in &clean_names {
        clean_jobs.push(api.create(name, kube.ns(NS)).await);
    }
    let jobs = api.wait_for_jobs(&clean_jobs).await;
    let clean = all_ended(&api, &admin.iam, &kube, &clean_names, &jobs).await;
    let (clean_ready, _, bad) = tally(&clean);
    assert_eq!(clean_ready, RESTART_CLEAN, "{bad}\n{}", service.log());
    let clean_per_repository = aws.total() as f64 / RESTART_CLEAN as f64;
    aws.reset_counts();

    let names: Vec<String> = (0..RESTART_REPOSITORIES)
        .map(|_| unique_name("pg-restart"))
        .collect();
    let mut job_ids = Vec::new();
    for name in &names {
        job_ids.push(api.create(name, kube.ns(NS)).await);
    }
    // Four jobs running, inside their AWS calls.
    let running_at_stop = eventually(JOB_DEADLINE, "jobs to be running", || async {
        let running: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'running'")
            .fetch_one(&db)
            .await
            .expect("jobs");
        (running >= 4 && aws.total() >= 20).then_some(running)
    })
    .await;
    db.close().await;
    let stopping = Instant::now();
    pg.stop();
    let stopped = Instant::now();

    let readyz = service.url("/readyz");
    let (status, content_type, body, took) =
        eventually(JOB_DEADLINE, "/readyz to report the outage", || async {
            let answer = probe(&readyz).await;
            (answer.0 != 200).then_some(answer)
        })
        .await;
    let reported_after = stopped.elapsed();
    let healthz = probe(&service.url("/healthz")).await;
    pg.start_again();
    let restarted = Instant::now();
    let (_, _, _, recovered_took) = eventually(JOB_DEADLINE, "/readyz to recover", || async {
        let answer = probe(&readyz).await;
        (answer.0 == 200).then_some(answer)
    })
    .await;
    let recovered_after = restarted.elapsed();

    let jobs = api.wait_for_jobs(&job_ids).await;
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url)
        .await
        .expect("the test's own connection");
    let ended = all_ended(&api, &admin.iam, &kube, &names, &jobs).await;
    let (ready, retries, bad) = tally(&ended);
    let twice = steps_finished_twice(&db).await;
    let mut all_jobs = clean_jobs.clone();
    all_jobs.extend(job_ids.iter().cloned());
    let not_once = jobs_not_finished_once(&db, &all_jobs).await;
    let job_count: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&db)
        .await
        .expect("jobs");
    let clean_calls = clean_per_repository * RESTART_REPOSITORIES as f64;
    let log = service.log();
    let lines_with = |level: &str| log.lines().filter(|l| l.contains(level)).count();
    let (warnings, errors) = (lines_with("WARN"), lines_with("ERROR"));
    let summary = format!(
        "faults: postgres restart ({running_at_stop} jobs running at the stop, down for \
         {:.1?}): {ready}/{} ready, {retries} job retries; /readyz answered {status} \
         ({content_type}) {:.1?} after the stop (in {took:.1?}), /healthz {}; 200 again \
         {recovered_after:.1?} after the start (in {recovered_took:.1?}); steps finished twice \
         {twice:?}, jobs not finished once {not_once:?}; {} AWS calls ({} mutating) vs {:.0} \
         clean: {:.0} extra; the service logged {warnings} warnings and {errors} errors; \
         {:.1?}",
        restarted - stopping,
        ended.len(),
        reported_after,
        healthz.0,
        aws.total(),
        aws.mutating_count(),
        clean_calls,
        aws.total() as f64 - clean_calls,
        started.elapsed(),
    );
    eprintln!("{summary}");
    assert_eq!(status, 503, "{summary}\n{body}");
    assert!(
        content_type.starts_with("application/problem+json"),
        "{summary}\n{body}"
    );
    let problem: Value = serde_json::from_str(&body).expect("problem json");
    assert_eq!(problem["status"], 503, "{body}");
    assert!(
        took < Duration::from_secs(1),
        "/readyz answers within a probe's 1 s timeout during the outage: {summary}"
    );
    assert_eq!(healthz.0, 200, "{summary}");
    assert_eq!(
        ready,
        RESTART_REPOSITORIES,
        "{summary}\n{bad}\n{}",
        service.log()
    );
    assert!(twice.is_empty(), "{summary}");
    assert!(not_once.is_empty(), "{summary}");
    assert_eq!(
        job_count,
        (RESTART_CLEAN + RESTART_REPOSITORIES) as i64,
        "no job lost or added"
    );
    assert!(service.is_running(), "{summary}\n{log}");
    if std::env::var_os("FAULTS_SHOW_LOG").is_some() {
        eprintln!("{log}");
    }
    db.close().await;
    let exit = service.terminate(Duration::from_secs(20)).await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "{exit:?}\n{}",
        service.log()
    );
}

const FLEET_REPOSITORIES: usize = 100;
const FLEET_WORKERS: usize = 3;

/// Three `backup-provisioner worker` processes (4 jobs each) and one API-only `serve` on one
/// database; 100 repositories queued through the API at once. All end `ready` with exactly one
/// access key per user and the Secret referencing it, and no mutating AWS call (operation,
/// entity or bucket, parameters) reached AWS more often than its job had attempts, counted by a
/// pass-through AWS realism proxy in front of each worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_worker_processes_provision_100_repositories_without_repeating_a_change() {
    let started = Instant::now();
    let database = fresh_database().await;
    let kube = KubeEnv::start(&[NS]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = write_kubeconfig(dir.path(), &kube);
    let moto = Moto::start();
    let admin = moto.clients(REGION, None).await;
    let key = backup_provisioner::crypto::EncryptionKey::generate_base64();
    // One operator onboards 100 repositories at once: no per-subject rate limit.
    let api_spec = ServiceSpec::new(
        "api",
        &["serve", "--workers", "0"],
        &database.url,
        &key,
        &moto.endpoint,
        &kubeconfig,
    )
    .env("BP_RATE_LIMIT_PER_SUBJECT", "off");
    let mut api_process = ServiceProcess::spawn(dir.path(), &api_spec).await;
    let proxies: Vec<AwsProxy> = (0..FLEET_WORKERS)
        .map(|_| AwsRealism::off().start(&moto))
        .collect();
    let mut workers = Vec::new();
    for (i, proxy) in proxies.iter().enumerate() {
        let spec = ServiceSpec::new(
            &format!("worker-{}", i + 1),
            &["worker"],
            &database.url,
            &key,
            &proxy.endpoint,
            &kubeconfig,
        );
        workers.push(ServiceProcess::spawn(dir.path(), &spec).await);
    }
    let api = Api::new(api_process.base_url.as_deref().expect("serve"));
    let names: Vec<String> = (0..FLEET_REPOSITORIES)
        .map(|i| format!("fleet-{i:03}"))
        .collect();
    let queued = Instant::now();
    let mut job_ids = Vec::new();
    for name in &names {
        job_ids.push(api.create(name, kube.ns(NS)).await);
    }
    let queueing = queued.elapsed();
    eventually(JOB_DEADLINE, "every job to end", || async {
        let ended: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled')",
        )
        .fetch_one(&database.pool)
        .await
        .expect("jobs");
        (ended as usize == FLEET_REPOSITORIES).then_some(())
    })
    .await;
    let all_done = queued.elapsed();
    let mut jobs = Vec::new();
    for id in &job_ids {
        jobs.push(api.get(&format!("/v1/jobs/{id}")).await);
    }
    let ended = all_ended(&api, &admin.iam, &kube, &names, &jobs).await;
    let (ready, retries, bad) = tally(&ended);

    // Mutating calls by (operation, subject, parameters), against their job's attempts.
    let attempts: HashMap<String, i64> = ended
        .iter()
        .map(|e| (bucket_for(&e.name), e.attempts))
        .collect();
    let mut changes: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    let mut per_worker = Vec::new();
    for proxy in &proxies {
        let received = proxy.received();
        let subjects: std::collections::BTreeSet<&str> =
            received.iter().map(|r| r.subject.as_str()).collect();
        per_worker.push(format!(
            "{} calls ({} mutating) for {} buckets/users",
            received.len(),
            received.iter().filter(|r| r.is_mutating()).count(),
            subjects.len()
        ));
        for r in received.iter().filter(|r| r.is_mutating()) {
            *changes
                .entry((r.operation.clone(), r.subject.clone(), r.parameters.clone()))
                .or_default() += 1;
        }
    }
    let repeated: Vec<String> = changes
        .iter()
        .filter(|((_, subject, _), n)| **n as i64 > attempts.get(subject).copied().unwrap_or(1))
        .map(|((op, subject, params), n)| format!("{op} {subject} [{params}] x{n}"))
        .collect();
    let total_calls: usize = proxies.iter().map(|p| p.received().len()).sum();
    let mutating: u64 = changes.values().sum();
    let summary = format!(
        "faults: {FLEET_WORKERS} worker processes: {ready}/{} ready, {retries} job retries, \
         queued in {queueing:.1?}, all ended {all_done:.1?} after the first create; {total_calls} \
         AWS calls ({mutating} mutating, {} distinct changes, {} repeated beyond their job's \
         attempts: {repeated:?}); per worker: {per_worker:?}; {:.1?}",
        ended.len(),
        changes.len(),
        repeated.len(),
        started.elapsed(),
    );
    eprintln!("{summary}");
    assert_eq!(ready, FLEET_REPOSITORIES, "{summary}\n{bad}");
    assert!(repeated.is_empty(), "{summary}");
    for (proxy, worker) in proxies.iter().zip(&workers) {
        assert!(
            !proxy.received().is_empty(),
            "{} took no job: {summary}",
            worker.name
        );
    }
    for worker in workers.iter_mut().chain(std::iter::once(&mut api_process)) {
        let exit = worker.terminate(Duration::from_secs(20)).await;
        assert!(
            exit.is_some_and(|s| s.success()),
            "{} exited with {exit:?}:\n{}",
            worker.name,
            worker.log()
        );
    }
}
