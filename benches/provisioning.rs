//! `make bench` (`cargo bench --bench provisioning`): the service's provisioning against real
//! Postgres (127.0.0.1:5432), moto (S3 + IAM) behind the AWS realism proxy
//! (`tests/api/support/aws_realism`) and the real kube-apiserver (the test harness's, reached
//! through its recording proxy), side by side with what a user would otherwise run (issue 12):
//!
//! 1. **Provisioning vs the runbook script**: every AWS request delayed by 20 ms at the proxy
//!    (a real endpoint's round trip), then by 0 ms. `benches/runbook_script.py` (boto3, the
//!    runbook's calls one after another, then one Secret write, through the same proxy and the
//!    same Kubernetes proxy) timed inside itself, then the service's first provisionings and
//!    re-runs through the HTTP API. AWS calls and sequential round trips counted at the proxy.
//! 2. **IAM consistency**: the proxy hides every new access key for 2 s; POST → ready, after
//!    one warm-up provisioning as in 1 (reported apart: the first after the service started).
//! 3. **Fleet sweep**: `BENCH_FLEET` (default 1000) ready repositories verified by the periodic
//!    verification (`startup::verify_sweeper`) under `BP_AWS_MAX_RPS=100`; wall time against
//!    calls ÷ rate, the busiest second and throttling counted at the proxy.
//!
//! The job queue, the HTTP API under load, memory and start-up are `benches/load.rs`.
//! Results are printed as a table; BENCHMARKS.md records a run. Nothing here asserts timings.
//! Sizes for a smoke run: BENCH_RUNS (10), BENCH_SCRIPT_RUNS (5), BENCH_CONSISTENCY_RUNS (5),
//! BENCH_FLEET (1000; 0 skips the sweep), BENCH_FLEET_CONCURRENCY (32). BENCH_TIMELINE (unset)
//! prints each run's job, step and AWS request times in order.

#[allow(dead_code)]
#[path = "../tests/api/support/app.rs"]
mod app;
// Its unit tests (`#[test]`) are not built without the libtest harness: their imports would
// be unused.
#[allow(dead_code, unused_imports)]
#[path = "../tests/api/support/aws_realism/mod.rs"]
mod aws_realism;
#[allow(dead_code)]
#[path = "common/mod.rs"]
mod common;
#[allow(dead_code)]
#[path = "../tests/api/support/env.rs"]
mod env;
#[path = "../tests/api/support/kube_apiserver.rs"]
mod kube_apiserver;
#[path = "../tests/api/support/kube_env.rs"]
mod kube_env;
#[path = "../tests/api/support/kube_proxy.rs"]
mod kube_proxy;
#[path = "../tests/api/support/moto.rs"]
mod moto;
#[path = "../tests/api/support/rbac.rs"]
mod rbac;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aws_realism::{AwsProxy, AwsRealism, Latency, sequential_round_trips};
use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_runtime_api::shared::IntoShared;
use backup_provisioner::cloud::aws::{AwsClients, AwsSettings, CallCounter};
use backup_provisioner::cloud::rate_limit::{self, AwsRateLimit, burst_for};
use futures::StreamExt;
use kube_proxy::RequestRecord;
use serde_json::{Value, json};
use uuid::Uuid;

use common::{Databases, ms, percentile, setting};

const NAMESPACE: &str = "zitadel";
const LATENCIES_MS: [u64; 2] = [20, 0];
const MOTO_SAMPLES: usize = 30;
/// The consistency window of section 2 (the default of the realism proxy, as on AWS).
const KEY_WINDOW: Duration = aws_realism::DEFAULT_WINDOW;
/// `BP_AWS_MAX_RPS` of the fleet sweep.
const FLEET_RPS: u32 = 100;

fn main() {
    common::main_of("provisioning", async {
        let mut databases = Databases::default();
        let mut comparisons = Vec::new();
        for latency in LATENCIES_MS {
            comparisons.push(compare(Duration::from_millis(latency), &mut databases).await);
        }
        let consistency = consistency_bench(&mut databases).await;
        let fleet = match setting("BENCH_FLEET", 1000) {
            0 => None,
            n => Some(fleet_bench(n, &mut databases).await),
        };

        eprintln!("report");
        print_comparisons(&comparisons);
        print_consistency(&consistency);
        if let Some(fleet) = &fleet {
            print_fleet(fleet);
        }
        databases.drop_all().await;
    });
}

// ---------------------------------------------------------------------------------------------
// 1: provisioning vs the runbook script
// ---------------------------------------------------------------------------------------------

/// One run of the service, as seen by the API, Postgres and the two proxies.
struct RunSample {
    wall: Duration,
    /// created_at → started_at of the job (database clock).
    queue_wait: Duration,
    steps: Vec<(String, Duration)>,
    /// AWS requests at the proxy, by `service:Operation`.
    aws: BTreeMap<String, u64>,
    round_trips: usize,
    /// One longest chain of sequential requests.
    chain: Vec<String>,
    kube: Vec<RequestRecord>,
}

struct ScriptSample {
    /// As the script measured itself: clients built, calls made, Secret written.
    total: Duration,
    client_construction: Duration,
    aws_calls: u64,
    round_trips: usize,
    kube_requests: usize,
}

struct Comparison {
    /// The 1-minute load average before and after (the machine is shared).
    load: (String, String),
    latency: Duration,
    script: Vec<ScriptSample>,
    first: Vec<RunSample>,
    rerun: Vec<RunSample>,
    moto_s3_head_bucket: Vec<Duration>,
    moto_iam_get_user: Vec<Duration>,
}

async fn compare(latency: Duration, databases: &mut Databases) -> Comparison {
    let runs = setting("BENCH_RUNS", 10);
    let script_runs = setting("BENCH_SCRIPT_RUNS", 5);
    let realism = AwsRealism::off().latency(1.0, Latency::Fixed(latency));
    let env = env::Env::builder(&[NAMESPACE])
        .aws_realism(realism)
        .start()
        .await;
    databases.keep_url(&env.app.database_url);
    let proxy = env.realism.as_ref().expect("proxy");
    let load_before = load_average();
    eprintln!(
        "[1] {} ms per AWS request: {script_runs} script runs, {runs} first provisionings, \
         {runs} re-runs …",
        latency.as_millis()
    );

    // Warm-up of both (connections, SDK endpoint resolution, the interpreter's file cache).
    let warm = env::unique_name("warm");
    let view = env
        .provision(json!({"name": warm, "namespace": env.ns(NAMESPACE)}))
        .await;
    assert_eq!(view["state"], "succeeded", "warm-up provisioning: {view}");
    let ca = tempfile::NamedTempFile::new().expect("CA file");
    std::fs::write(ca.path(), &env.kube.server.ca_pem).expect("CA file");
    run_script(&env, proxy, ca.path()).await;

    let mut script = Vec::new();
    for _ in 0..script_runs {
        script.push(run_script(&env, proxy, ca.path()).await);
    }
    let mut names = Vec::new();
    let mut first = Vec::new();
    for _ in 0..runs {
        let name = env::unique_name("bench");
        reset(&env, proxy);
        let (t, at) = (Instant::now(), chrono::Utc::now());
        let view = env
            .provision(json!({"name": name, "namespace": env.ns(NAMESPACE)}))
            .await;
        let wall = t.elapsed();
        assert_eq!(view["state"], "succeeded", "first provisioning: {view}");
        first.push(sample(&env, proxy, &view, wall).await);
        if std::env::var_os("BENCH_TIMELINE").is_some() {
            print_timeline(&env, proxy, &view, (at, wall)).await;
        }
        names.push(name);
    }
    let mut rerun = Vec::new();
    for name in &names {
        reset(&env, proxy);
        let (t, at) = (Instant::now(), chrono::Utc::now());
        let view = env.reconcile(name).await;
        let wall = t.elapsed();
        assert_eq!(view["state"], "succeeded", "re-run: {view}");
        rerun.push(sample(&env, proxy, &view, wall).await);
        if std::env::var_os("BENCH_TIMELINE").is_some() {
            print_timeline(&env, proxy, &view, (at, wall)).await;
        }
    }
    let (moto_s3_head_bucket, moto_iam_get_user) = moto_round_trips(&env, &names[0]).await;
    env.app.stop().await;
    Comparison {
        load: (load_before, load_average()),
        latency,
        script,
        first,
        rerun,
        moto_s3_head_bucket,
        moto_iam_get_user,
    }
}

fn reset(env: &env::Env, proxy: &AwsProxy) {
    proxy.reset_counts();
    env.counter.reset();
    env.kube.clear_requests();
}

/// One run of `benches/runbook_script.py` through the AWS proxy and the Kubernetes proxy,
/// with the ServiceAccount's token (the Role the service has: it may create Secrets).
async fn run_script(env: &env::Env, proxy: &AwsProxy, ca: &std::path::Path) -> ScriptSample {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let name = format!("s-{}", &Uuid::new_v4().simple().to_string()[..8]);
    reset(env, proxy);
    let output = tokio::process::Command::new(root.join(".venv/bin/python3"))
        .arg(root.join("benches/runbook_script.py"))
        .args(["--endpoint", &proxy.endpoint, "--region", &env.region])
        .args(["--name", &name, "--namespace", env.ns(NAMESPACE)])
        .args(["--kube-url", &env.kube.proxy.url])
        .arg("--kube-ca")
        .arg(ca)
        .env("KUBE_TOKEN", &env.kube.service_token)
        .env("AWS_ACCESS_KEY_ID", moto::TEST_ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", moto::TEST_SECRET_ACCESS_KEY)
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .output()
        .await
        .expect("running benches/runbook_script.py");
    assert!(
        output.status.success(),
        "runbook script failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("the script's JSON");
    let seconds = |key: &str| secs(report[key].as_f64().expect("seconds"));
    ScriptSample {
        total: seconds("seconds"),
        client_construction: seconds("client_construction_seconds"),
        aws_calls: proxy.total(),
        round_trips: sequential_round_trips(&proxy.received()),
        kube_requests: env.kube.requests().len(),
    }
}

async fn sample(env: &env::Env, proxy: &AwsProxy, view: &Value, wall: Duration) -> RunSample {
    let job_id: Uuid = view["id"].as_str().expect("job id").parse().expect("uuid");
    let queue_wait: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM started_at - created_at)::float8 FROM jobs WHERE id = $1",
    )
    .bind(job_id)
    .fetch_one(&env.app.db)
    .await
    .expect("job times");
    let steps: Vec<(String, f64)> = sqlx::query_as(
        "SELECT step, extract(epoch FROM finished_at - started_at)::float8
           FROM job_steps WHERE job_id = $1 ORDER BY position",
    )
    .bind(job_id)
    .fetch_all(&env.app.db)
    .await
    .expect("step times");
    let received = proxy.received();
    RunSample {
        wall,
        queue_wait: secs(queue_wait),
        steps: steps.into_iter().map(|(s, d)| (s, secs(d))).collect(),
        aws: proxy.calls(),
        round_trips: sequential_round_trips(&received),
        chain: aws_realism::round_trip_chain(&received),
        kube: env.kube.requests(),
    }
}

type At = chrono::DateTime<chrono::Utc>;

/// With `BENCH_TIMELINE` set: one run's events in order, in ms from the request that queued
/// it (job and step times from the database's clock, AWS requests from the proxy's).
async fn print_timeline(
    env: &env::Env,
    proxy: &AwsProxy,
    view: &Value,
    (at, wall): (At, Duration),
) {
    let job_id: Uuid = view["id"].as_str().expect("job id").parse().expect("uuid");
    let off = |t: At| (t - at).num_microseconds().unwrap_or(0) as f64 / 1000.0;
    let mut events: Vec<(f64, String)> = Vec::new();
    let job: (At, Option<At>, Option<At>) =
        sqlx::query_as("SELECT created_at, started_at, finished_at FROM jobs WHERE id = $1")
            .bind(job_id)
            .fetch_one(&env.app.db)
            .await
            .expect("job times");
    events.push((off(job.0), "job created".into()));
    events.extend(job.1.map(|t| (off(t), "job claimed".into())));
    events.extend(job.2.map(|t| (off(t), "job finished".into())));
    let steps: Vec<(String, Option<At>, Option<At>)> =
        sqlx::query_as("SELECT step, started_at, finished_at FROM job_steps WHERE job_id = $1")
            .bind(job_id)
            .fetch_all(&env.app.db)
            .await
            .expect("step times");
    for (step, begun, ended) in steps {
        events.extend(begun.map(|t| (off(t), format!("step {step} begins"))));
        events.extend(ended.map(|t| (off(t), format!("step {step} ends"))));
    }
    for r in proxy.received() {
        let done = r
            .done_at
            .map(|d| format!(" → {:.1}", off(d)))
            .unwrap_or_default();
        events.push((off(r.at), format!("aws {}{done}", r.operation)));
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0));
    println!("timeline of job {job_id} (wall {} ms):", wall.as_millis());
    for (t, what) in events {
        println!("  {t:8.1} ms  {what}");
    }
}

/// moto's own round trip for a cheap read of each service (admin clients, no proxy).
async fn moto_round_trips(env: &env::Env, name: &str) -> (Vec<Duration>, Vec<Duration>) {
    let bucket = env::bucket_for(name);
    let mut s3 = Vec::new();
    let mut iam = Vec::new();
    for _ in 0..MOTO_SAMPLES {
        let t = Instant::now();
        env.admin
            .s3
            .head_bucket()
            .bucket(&bucket)
            .send()
            .await
            .expect("HeadBucket");
        s3.push(t.elapsed());
        let t = Instant::now();
        env.admin
            .iam
            .get_user()
            .user_name(&bucket)
            .send()
            .await
            .expect("GetUser");
        iam.push(t.elapsed());
    }
    (s3, iam)
}

// ---------------------------------------------------------------------------------------------
// 2: IAM consistency
// ---------------------------------------------------------------------------------------------

struct ConsistencyResults {
    walls: Vec<Duration>,
    /// The warm-up: the first provisioning after the service started (connections to make).
    cold: Duration,
    credential_check: Vec<Duration>,
    /// Requests the proxy refused because they used a key still inside the window.
    refused: Vec<u64>,
}

async fn consistency_bench(databases: &mut Databases) -> ConsistencyResults {
    let runs = setting("BENCH_CONSISTENCY_RUNS", 5);
    eprintln!(
        "[2] new access keys hidden for {KEY_WINDOW:?}: {runs} first provisionings, POST → ready …"
    );
    let realism = AwsRealism::off()
        .consistency_window(KEY_WINDOW)
        .window_for_keys_only();
    let env = env::Env::builder(&[NAMESPACE])
        .aws_realism(realism)
        .start()
        .await;
    databases.keep_url(&env.app.database_url);
    let proxy = env.realism.as_ref().expect("proxy");
    // Warm-up, as in section 1 (connections, SDK endpoint resolution); its wall is reported.
    let t = Instant::now();
    let view = env
        .provision(json!({"name": env::unique_name("iam-warm"), "namespace": env.ns(NAMESPACE)}))
        .await;
    assert_eq!(view["state"], "succeeded", "warm-up provisioning: {view}");
    let mut results = ConsistencyResults {
        walls: Vec::new(),
        cold: t.elapsed(),
        credential_check: Vec::new(),
        refused: Vec::new(),
    };
    for _ in 0..runs {
        let name = env::unique_name("iam");
        reset(&env, proxy);
        let t = Instant::now();
        let view = env
            .provision(json!({"name": name, "namespace": env.ns(NAMESPACE)}))
            .await;
        results.walls.push(t.elapsed());
        assert_eq!(view["state"], "succeeded", "provisioning: {view}");
        let repository = env.repository(&name).await;
        assert_eq!(repository["state"], "ready", "{repository}");
        let run = sample(&env, proxy, &view, Duration::ZERO).await;
        let check = run.steps.iter().find(|(s, _)| s == "credential_check");
        results
            .credential_check
            .push(check.map(|(_, d)| *d).unwrap_or_default());
        results.refused.push(proxy.injected_count("invalid-key"));
    }
    env.app.stop().await;
    results
}

// ---------------------------------------------------------------------------------------------
// 3: the fleet sweep
// ---------------------------------------------------------------------------------------------

/// `BP_AWS_MAX_RPS` that can be switched on: off while the fleet is seeded (so that seeding
/// 1,000 repositories takes a minute, not the rate's hour), on for the sweep. When on, it is
/// the service's own limiter (`AwsRateLimit`), applied where the service applies it: under the
/// SDK, to every attempt.
#[derive(Clone)]
struct Pacing {
    limit: AwsRateLimit,
    on: Arc<AtomicBool>,
}

impl Pacing {
    fn new(per_second: u32) -> Pacing {
        Pacing {
            limit: AwsRateLimit::per_second(per_second),
            on: Arc::new(AtomicBool::new(false)),
        }
    }

    fn set(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
    }

    /// The same clients (endpoint, credentials, counter) with every request paced when on.
    fn apply(&self, aws: AwsClients) -> AwsClients {
        let inner = aws
            .sdk_config
            .http_client()
            .unwrap_or_else(rate_limit::default_https_client);
        let client = PacedClient {
            inner,
            pacing: self.clone(),
        };
        let config = aws
            .sdk_config
            .to_builder()
            .http_client(IntoShared::<SharedHttpClient>::into_shared(client))
            .build();
        let settings = AwsSettings {
            endpoint_url: config.endpoint_url().map(str::to_owned),
            region: config.region().map(|r| r.as_ref().to_owned()),
        };
        AwsClients::from_sdk_config(config, &settings, aws.counter().cloned())
    }
}

#[derive(Clone)]
struct PacedClient {
    inner: SharedHttpClient,
    pacing: Pacing,
}

impl std::fmt::Debug for PacedClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacedClient").finish_non_exhaustive()
    }
}

impl HttpClient for PacedClient {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        SharedHttpConnector::new(PacedConnector {
            inner: self.inner.http_connector(settings, components),
            pacing: self.pacing.clone(),
        })
    }
}

#[derive(Clone)]
struct PacedConnector {
    inner: SharedHttpConnector,
    pacing: Pacing,
}

impl std::fmt::Debug for PacedConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacedConnector").finish_non_exhaustive()
    }
}

impl HttpConnector for PacedConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let inner = self.inner.clone();
        let pacing = self.pacing.clone();
        HttpConnectorFuture::new(async move {
            if pacing.on.load(Ordering::SeqCst) {
                pacing.limit.acquire().await;
            }
            inner.call(request).await
        })
    }
}

struct FleetResults {
    repositories: usize,
    concurrency: usize,
    seed_wall: Duration,
    seed_calls: u64,
    sweep_wall: Duration,
    calls: u64,
    mutating: u64,
    throttled: u64,
    busiest_second: usize,
    /// Requests the proxy received in each 10 s since the sweep started.
    per_ten_seconds: Vec<usize>,
    /// The 1-minute load average before and after the sweep (the machine is shared).
    load: (String, String),
    verify_jobs: i64,
    /// Median of a verify job's run (claimed → finished) and queue wait (queued → claimed).
    verify_job_run: Duration,
    verify_job_wait: Duration,
    verify_failed: i64,
    drifted: i64,
}

async fn fleet_bench(repositories: usize, databases: &mut Databases) -> FleetResults {
    // The sweep runs at the rate only with enough slots: at 100 requests/s and ~20 calls per
    // verification, 16 slots keep the limiter busy only while a verification takes at most
    // 3.2 s, its Postgres and Kubernetes work and moto's own latency included (the operators'
    // arithmetic for BP_VERIFY_CONCURRENCY, docs/operations.md). 32 leave that headroom.
    let concurrency = setting("BENCH_FLEET_CONCURRENCY", 32);
    eprintln!(
        "[3] fleet: seeding {repositories} repositories through the API (no rate limit), then \
         the verify sweep at {FLEET_RPS} AWS requests/s, {concurrency} at a time …"
    );
    // A moto of its own: the fleet's IAM entities do not slow the other sections' listings.
    let moto = moto::Moto::start();
    let pacing = Pacing::new(FLEET_RPS);
    let paced = pacing.clone();
    let env = env::Env::builder(&[NAMESPACE])
        .moto(&moto)
        .workers(concurrency)
        .aws_realism(AwsRealism::off())
        .map_service_aws(move |aws| paced.apply(aws))
        .start()
        .await;
    databases.keep_url(&env.app.database_url);
    let proxy = env.realism.as_ref().expect("proxy");

    let t = Instant::now();
    seed_fleet(&env, repositories).await;
    let seed_wall = t.elapsed();
    let seed_calls = proxy.total();

    // Due now: the sweep's interval is an hour, every repository last changed two hours ago.
    sqlx::query("UPDATE backup_repositories SET updated_at = now() - interval '2 hours'")
        .execute(&env.app.db)
        .await
        .expect("date back");
    proxy.reset_counts();
    pacing.set(true);
    let mut worker = app::worker_args(concurrency);
    worker.verify_interval = Duration::from_secs(3600);
    worker.verify_concurrency = concurrency as u32;
    worker.aws_max_rps = FLEET_RPS;
    let (sweeper, tick) =
        backup_provisioner::startup::verify_sweeper(&worker, &env.app.db).expect("the sweep");
    let stop = tokio_util::sync::CancellationToken::new();
    let load_before = load_average();
    let sweep_started = chrono::Utc::now();
    let t = Instant::now();
    tokio::spawn(sweeper.run(tick, stop.clone()));
    wait_fleet_verified(&env, repositories).await;
    let sweep_wall = t.elapsed();
    stop.cancel();
    pacing.set(false);

    let (verify_jobs, verify_failed, drifted): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM jobs WHERE kind = 'verify-repository'),
                (SELECT count(*) FROM jobs WHERE kind = 'verify-repository'
                    AND state <> 'succeeded'),
                (SELECT count(*) FROM backup_repositories WHERE drift_count > 0)",
    )
    .fetch_one(&env.app.db)
    .await
    .expect("verify outcome");
    let (job_run, job_wait): (f64, f64) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY
                    extract(epoch FROM finished_at - started_at))::float8,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY
                    extract(epoch FROM started_at - created_at))::float8
           FROM jobs WHERE kind = 'verify-repository'",
    )
    .fetch_one(&env.app.db)
    .await
    .expect("verify job times");
    let results = FleetResults {
        verify_job_run: secs(job_run),
        verify_job_wait: secs(job_wait),
        repositories,
        concurrency,
        seed_wall,
        seed_calls,
        sweep_wall,
        calls: proxy.total(),
        mutating: proxy.mutating_count(),
        throttled: proxy.injected_count("throttle"),
        busiest_second: proxy.busiest(Duration::from_secs(1)),
        per_ten_seconds: per_ten_seconds(&proxy.received(), sweep_started),
        load: (load_before, load_average()),
        verify_jobs,
        verify_failed,
        drifted,
    };
    env.app.stop().await;
    results
}

fn per_ten_seconds(
    received: &[aws_realism::Received],
    since: chrono::DateTime<chrono::Utc>,
) -> Vec<usize> {
    let mut buckets = Vec::new();
    for request in received {
        let slot = ((request.at - since).num_milliseconds().max(0) / 10_000) as usize;
        if buckets.len() <= slot {
            buckets.resize(slot + 1, 0);
        }
        buckets[slot] += 1;
    }
    buckets
}

/// The 1-minute load average (`/proc/loadavg`), to tell a slow run from a busy machine.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

/// Provisions `n` repositories through the API, 32 requests in flight, and waits until the
/// workers made every one ready.
async fn seed_fleet(env: &env::Env, n: usize) {
    let operator = env.app.operator();
    let prefix = &Uuid::new_v4().simple().to_string()[..4];
    let namespace = env.ns(NAMESPACE).to_owned();
    futures::stream::iter(0..n)
        .map(|i| {
            let body = json!({"name": format!("f{prefix}-{i}"), "namespace": namespace});
            let operator = operator.clone();
            async move {
                let response = env
                    .app
                    .post_json("/v1/backup-repositories", &operator, &body)
                    .await;
                assert_eq!(response.status(), 202, "POST {body}");
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    let mut last_report = Instant::now();
    loop {
        let (done, failed): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state = 'succeeded'),
                    count(*) FILTER (WHERE state IN ('failed', 'cancelled'))
               FROM jobs",
        )
        .fetch_one(&env.app.db)
        .await
        .expect("job states");
        assert_eq!(failed, 0, "a seeding provisioning failed");
        if done as usize >= n {
            return;
        }
        if last_report.elapsed() > Duration::from_secs(15) {
            eprintln!("    seeded {done} of {n}");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until every repository holds a verification and no verify job is active.
async fn wait_fleet_verified(env: &env::Env, n: usize) {
    let mut last_report = Instant::now();
    loop {
        let (verified, active): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM backup_repositories WHERE verified_at IS NOT NULL),
                    (SELECT count(*) FROM jobs WHERE kind = 'verify-repository'
                        AND state IN ('queued', 'running'))",
        )
        .fetch_one(&env.app.db)
        .await
        .expect("verified");
        if verified as usize >= n && active == 0 {
            return;
        }
        if last_report.elapsed() > Duration::from_secs(15) {
            eprintln!("    verified {verified} of {n}");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn print_comparisons(comparisons: &[Comparison]) {
    println!(
        "== 1. Provisioning vs the runbook script (every AWS request delayed at the proxy) =="
    );
    for c in comparisons {
        print_comparison(c);
    }
    // Steps and calls do not depend on the latency; the first comparison (20 ms) shows them.
    let c = &comparisons[0];
    print_steps(c);
    print_calls(c);
}

fn print_comparison(c: &Comparison) {
    println!();
    println!(
        "-- {} ms per AWS request (1-minute load average {} before, {} after) --",
        c.latency.as_millis(),
        c.load.0,
        c.load.1
    );
    stats_header("");
    let script: Vec<Duration> = c.script.iter().map(|s| s.total).collect();
    let construction: Vec<Duration> = c.script.iter().map(|s| s.client_construction).collect();
    let script_calls: Vec<Duration> = c
        .script
        .iter()
        .map(|s| s.total.saturating_sub(s.client_construction))
        .collect();
    stats_row("runbook script (boto3), total", &script);
    stats_row("  of which building the 2 clients", &construction);
    stats_row("  of which calls + Secret", &script_calls);
    for (label, runs) in [
        ("first provisioning, wall", &c.first),
        ("re-run of a ready repository, wall", &c.rerun),
    ] {
        let walls: Vec<Duration> = runs.iter().map(|r| r.wall).collect();
        stats_row(label, &walls);
        let waits: Vec<Duration> = runs.iter().map(|r| r.queue_wait).collect();
        stats_row("  job queued → claimed (db clock)", &waits);
    }
    let script_median = percentile(&script, 50.0);
    let calls_median = percentile(&script_calls, 50.0);
    for (label, runs, target) in [("first run", &c.first, 0.5), ("re-run", &c.rerun, 0.25)] {
        let walls: Vec<Duration> = runs.iter().map(|r| r.wall).collect();
        let median = percentile(&walls, 50.0);
        let ratio = median.as_secs_f64() / script_median.as_secs_f64();
        println!(
            "{label} / script, medians: {ratio:.2}× (target ≤ {target}×: {}); against the \
             script's calls alone: {:.2}×",
            verdict(ratio <= target),
            median.as_secs_f64() / calls_median.as_secs_f64()
        );
    }
    let script_trips: Vec<usize> = c.script.iter().map(|s| s.round_trips).collect();
    let script_calls_n: Vec<u64> = c.script.iter().map(|s| s.aws_calls).collect();
    let script_kube: Vec<usize> = c.script.iter().map(|s| s.kube_requests).collect();
    println!(
        "AWS calls per run (at the proxy): script {}, first run {}, re-run {}; Kubernetes \
         requests: script {}",
        spread(&script_calls_n),
        spread(&c.first.iter().map(total_calls).collect::<Vec<_>>()),
        spread(&c.rerun.iter().map(total_calls).collect::<Vec<_>>()),
        spread(&script_kube),
    );
    let first_trips: Vec<usize> = c.first.iter().map(|r| r.round_trips).collect();
    let rerun_trips: Vec<usize> = c.rerun.iter().map(|r| r.round_trips).collect();
    println!(
        "sequential AWS round trips (at the proxy; median, [min–max]): script {}, first run {} \
         (target ≤ 6: {}), re-run {} (target ≤ 2: {})",
        spread(&script_trips),
        spread(&first_trips),
        verdict(median_of(&first_trips) <= 6),
        spread(&rerun_trips),
        verdict(median_of(&rerun_trips) <= 2),
    );
    for (label, runs) in [("first run", &c.first), ("re-run", &c.rerun)] {
        if let Some(run) = runs.first() {
            println!("  a longest chain, {label}: {}", run.chain.join(" → "));
        }
    }
    stats_header("moto round trip (admin client, no proxy)");
    stats_row("  s3 HeadBucket", &c.moto_s3_head_bucket);
    stats_row("  iam GetUser", &c.moto_iam_get_user);
}

fn print_steps(c: &Comparison) {
    println!();
    println!(
        "Per-step duration at {} ms, median (steps may overlap):",
        c.latency.as_millis()
    );
    println!("{:<26} {:>12} {:>12}", "step", "first run", "re-run");
    let Some(first) = c.first.first() else {
        return;
    };
    for (step, _) in &first.steps {
        let of = |runs: &[RunSample]| {
            let d: Vec<Duration> = runs
                .iter()
                .filter_map(|r| r.steps.iter().find(|(s, _)| s == step).map(|(_, d)| *d))
                .collect();
            if d.is_empty() {
                "-".to_owned()
            } else {
                ms(percentile(&d, 50.0))
            }
        };
        println!("{:<26} {:>12} {:>12}", step, of(&c.first), of(&c.rerun));
    }
}

fn print_calls(c: &Comparison) {
    println!();
    println!("Calls per run (at the proxy / the recording Kubernetes proxy):");
    for (label, runs) in [("first run", &c.first), ("re-run", &c.rerun)] {
        let Some(run) = runs.first() else {
            continue;
        };
        let aws = &run.aws;
        let same = runs.iter().all(|r| &r.aws == aws);
        let mutating: u64 = aws
            .iter()
            .filter(|(op, _)| CallCounter::is_mutating(op))
            .map(|(_, n)| n)
            .sum();
        let total: u64 = aws.values().sum();
        let kube_mut = run.kube.iter().filter(|r| r.is_mutating()).count();
        println!(
            "{label}: AWS {total} ({mutating} mutating, {} reads){}; Kubernetes {} ({kube_mut} \
             mutating)",
            total - mutating,
            if same {
                ", identical in every run"
            } else {
                ", VARIES between runs"
            },
            run.kube.len(),
        );
        for (op, n) in aws {
            let kind = if CallCounter::is_mutating(op) {
                "mutating"
            } else {
                "read"
            };
            println!("    {op:<40} {n:>3}  {kind}");
        }
        for r in &run.kube {
            println!("    k8s {:<6} {} → {}", r.method, r.path, r.status);
        }
    }
}

fn print_consistency(r: &ConsistencyResults) {
    println!();
    println!(
        "== 2. IAM consistency: new access keys invisible for {} s at the proxy ==",
        KEY_WINDOW.as_secs_f64()
    );
    stats_header("");
    stats_row("POST → ready, wall", &r.walls);
    stats_row("  credential_check step", &r.credential_check);
    let median = percentile(&r.walls, 50.0);
    let ratio = median.as_secs_f64() / KEY_WINDOW.as_secs_f64();
    let worst = percentile(&r.walls, 100.0).as_secs_f64() / KEY_WINDOW.as_secs_f64();
    println!(
        "median {ratio:.2}× the window, worst {worst:.2}× (target ≤ 1.2×: {}); requests refused \
         with the hidden key per run: {}",
        verdict(worst <= 1.2),
        spread(&r.refused)
    );
    let walls: Vec<String> = r.walls.iter().map(|w| ms(*w)).collect();
    println!(
        "POST → ready per run, in order: {}; the warm-up before them (the first after the \
         service started, not counted): {}",
        walls.join(", "),
        ms(r.cold)
    );
}

fn print_fleet(f: &FleetResults) {
    println!();
    println!(
        "== 3. Fleet sweep: {} repositories verified at BP_AWS_MAX_RPS={FLEET_RPS}, \
         BP_VERIFY_CONCURRENCY={} (moto behind the proxy, 0 ms) ==",
        f.repositories, f.concurrency
    );
    println!(
        "seeding: {} provisionings through the API, no rate limit, {} workers: {:.1} s, {} AWS \
         calls",
        f.repositories,
        f.concurrency,
        f.seed_wall.as_secs_f64(),
        f.seed_calls
    );
    let ideal = f.calls as f64 / f64::from(FLEET_RPS);
    let ratio = f.sweep_wall.as_secs_f64() / ideal;
    let burst = burst_for(std::num::NonZeroU32::new(FLEET_RPS).expect("rate")).get();
    println!(
        "sweep: {:.1} s wall for {} AWS calls ({:.1} per repository, {} mutating); calls ÷ rate \
         = {ideal:.1} s; wall / (calls ÷ rate) = {ratio:.3} (target ≤ 1.1: {})",
        f.sweep_wall.as_secs_f64(),
        f.calls,
        f.calls as f64 / f.repositories as f64,
        f.mutating,
        verdict(ratio <= 1.1)
    );
    let paced = f.calls.saturating_sub(u64::from(burst)) as f64 / f64::from(FLEET_RPS);
    println!(
        "  (the limiter's burst of {burst} goes out at once: (calls − burst) ÷ rate = {paced:.1} \
         s, wall / that = {:.3})",
        f.sweep_wall.as_secs_f64() / paced.max(f64::EPSILON)
    );
    println!(
        "throttling answers: {} (target 0: {}); busiest second {} requests (the limit allows \
         {FLEET_RPS} + burst {burst}); verify jobs {} ({} not succeeded), repositories with drift \
         {}",
        f.throttled,
        verdict(f.throttled == 0),
        f.busiest_second,
        f.verify_jobs,
        f.verify_failed,
        f.drifted
    );
    println!(
        "a verify job, median: {} running (its calls paced by the limit), {} queued; {} slots \
         ÷ that run = {:.1} jobs/s, the rate needs {:.1}",
        ms(f.verify_job_run),
        ms(f.verify_job_wait),
        f.concurrency,
        f.concurrency as f64 / f.verify_job_run.as_secs_f64().max(f64::EPSILON),
        f64::from(FLEET_RPS) * f.repositories as f64 / f.calls.max(1) as f64
    );
    let timeline: Vec<String> = f.per_ten_seconds.iter().map(|n| n.to_string()).collect();
    println!(
        "AWS requests per 10 s during the sweep (1000 = the rate): {}",
        timeline.join(" ")
    );
    println!(
        "1-minute load average before / after the sweep: {} / {}",
        f.load.0, f.load.1
    );
}

fn total_calls(run: &RunSample) -> u64 {
    run.aws.values().sum()
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

/// `median [min–max]`, or the value alone when every run gave it.
fn spread<T: Ord + Copy + std::fmt::Display>(values: &[T]) -> String {
    let mut sorted = values.to_vec();
    sorted.sort();
    match (sorted.first(), sorted.last()) {
        (Some(min), Some(max)) if min == max => format!("{min}"),
        (Some(min), Some(max)) => format!("{} [{min}–{max}]", sorted[(sorted.len() - 1) / 2]),
        _ => "-".to_owned(),
    }
}

fn median_of(values: &[usize]) -> usize {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted
        .get((sorted.len().max(1) - 1) / 2)
        .copied()
        .unwrap_or(0)
}

fn stats_header(title: &str) {
    println!(
        "{:<44} {:>5} {:>9} {:>9} {:>9} {:>9}",
        title, "n", "min", "median", "p90", "max"
    );
}

fn stats_row(label: &str, samples: &[Duration]) {
    println!(
        "{:<44} {:>5} {:>9} {:>9} {:>9} {:>9}",
        label,
        samples.len(),
        ms(percentile(samples, 0.0)),
        ms(percentile(samples, 50.0)),
        ms(percentile(samples, 90.0)),
        ms(percentile(samples, 100.0)),
    );
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}
