//! `make bench` (`cargo bench --bench provisioning`): end-to-end numbers for the service against
//! real Postgres (127.0.0.1:5432), moto (S3 + IAM) and the real kube-apiserver (the test
//! harness's, `tests/api/support/kube_apiserver.rs`; the service reaches it through the
//! recording proxy, which counts its requests).
//!
//! 1. provisioning wall time through the HTTP API: first runs and re-runs of ready repositories;
//! 2. AWS calls (CallCounter) and Kubernetes requests (proxy log) per first run / re-run;
//! 3. queue throughput (1000 no-op jobs, 4 and 16 slots) and idle claim latency (LISTEN/NOTIFY);
//! 4. HTTP latency of POST /v1/backup-repositories (workers 0) and GET of one repository.
//!
//! Results are printed as a table; BENCHMARKS.md records a run. Nothing here asserts timings.

#[allow(dead_code)]
#[path = "../tests/api/support/app.rs"]
mod app;
// Its unit tests (`#[test]`) are not built without the libtest harness: their imports would
// be unused.
#[allow(dead_code, unused_imports)]
#[path = "../tests/api/support/aws_realism/mod.rs"]
mod aws_realism;
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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backup_provisioner::auth::Role;
use backup_provisioner::jobs::queue::{self, NewJob};
use backup_provisioner::jobs::{
    JobContext, JobError, JobHandler, Registry, StepDone, WorkerConfig, WorkerPool,
};
use kube_proxy::RequestRecord;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const FIRST_RUNS: usize = 10;
const QUEUE_JOBS: usize = 1000;
const CLAIM_SAMPLES: usize = 50;
const HTTP_SAMPLES: usize = 300;
const MOTO_SAMPLES: usize = 30;
const BENCH_KIND: &str = "bench-noop";

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run());
}

async fn run() {
    let started = Instant::now();
    backup_provisioner::install_crypto_provider();
    let mut databases = Vec::new();
    println!(
        "backup-provisioner benchmarks (release build, {} CPUs)",
        cpus()
    );
    println!();

    let prov = provisioning_bench(&mut databases).await;
    let queue = queue_bench(&mut databases).await;
    let http = http_bench(&mut databases).await;

    print_report(&prov, &queue, &http);
    drop_databases(&databases).await;
    println!();
    println!("total bench time: {:.1} s", started.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------------
// 1 + 2: provisioning through the API
// ---------------------------------------------------------------------------------------------

struct RunSample {
    wall: Duration,
    /// created_at → started_at of the job (database clock).
    queue_wait: Duration,
    /// started_at → finished_at of the job (database clock).
    run: Duration,
    steps: Vec<(String, Duration)>,
    aws: BTreeMap<String, u64>,
    kube: Vec<RequestRecord>,
}

struct ProvisioningResults {
    first: Vec<RunSample>,
    rerun: Vec<RunSample>,
    moto_s3_head_bucket: Vec<Duration>,
    moto_iam_get_user: Vec<Duration>,
}

async fn provisioning_bench(databases: &mut Vec<String>) -> ProvisioningResults {
    let env = env::Env::start(&["zitadel"]).await;
    databases.push(db_name(&env.app.database_url));
    eprintln!("[1/4] provisioning {FIRST_RUNS} repositories, then re-running each …");

    // Warm-up (connections, SDK endpoint resolution); not measured.
    let warm = env::unique_name("warm");
    let view = env
        .provision(json!({"name": warm, "namespace": env.ns("zitadel")}))
        .await;
    assert_eq!(view["state"], "succeeded", "warm-up provisioning: {view}");

    let mut names = Vec::new();
    let mut first = Vec::new();
    for _ in 0..FIRST_RUNS {
        let name = env::unique_name("bench");
        env.counter.reset();
        env.kube.clear_requests();
        let t = Instant::now();
        let view = env
            .provision(json!({"name": name, "namespace": env.ns("zitadel")}))
            .await;
        let wall = t.elapsed();
        assert_eq!(view["state"], "succeeded", "first provisioning: {view}");
        first.push(sample(&env, &view, wall).await);
        names.push(name);
    }
    let mut rerun = Vec::new();
    for name in &names {
        env.counter.reset();
        env.kube.clear_requests();
        let t = Instant::now();
        let view = env.reconcile(name).await;
        let wall = t.elapsed();
        assert_eq!(view["state"], "succeeded", "re-run: {view}");
        rerun.push(sample(&env, &view, wall).await);
    }

    // Raw moto latency for a cheap read of each service (admin clients, not counted).
    let bucket = env::bucket_for(&names[0]);
    let mut moto_s3_head_bucket = Vec::new();
    let mut moto_iam_get_user = Vec::new();
    for _ in 0..MOTO_SAMPLES {
        let t = Instant::now();
        env.admin
            .s3
            .head_bucket()
            .bucket(&bucket)
            .send()
            .await
            .expect("HeadBucket");
        moto_s3_head_bucket.push(t.elapsed());
        let t = Instant::now();
        env.admin
            .iam
            .get_user()
            .user_name(&bucket)
            .send()
            .await
            .expect("GetUser");
        moto_iam_get_user.push(t.elapsed());
    }
    env.app.stop().await;
    ProvisioningResults {
        first,
        rerun,
        moto_s3_head_bucket,
        moto_iam_get_user,
    }
}

async fn sample(env: &env::Env, view: &Value, wall: Duration) -> RunSample {
    let job_id: Uuid = view["id"].as_str().expect("job id").parse().expect("uuid");
    let (queue_wait, run): (f64, f64) = sqlx::query_as(
        "SELECT extract(epoch FROM started_at - created_at)::float8,
                extract(epoch FROM finished_at - started_at)::float8
           FROM jobs WHERE id = $1",
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
    RunSample {
        wall,
        queue_wait: secs(queue_wait),
        run: secs(run),
        steps: steps.into_iter().map(|(s, d)| (s, secs(d))).collect(),
        aws: env.counter.snapshot(),
        kube: env.kube.requests(),
    }
}

// ---------------------------------------------------------------------------------------------
// 3: the queue
// ---------------------------------------------------------------------------------------------

/// A job kind with one no-op step; records when each job's handler started.
#[derive(Clone, Default)]
struct NoopJob {
    started: Arc<Mutex<HashMap<Uuid, Instant>>>,
    finished: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl JobHandler for NoopJob {
    fn kind(&self) -> &'static str {
        BENCH_KIND
    }

    async fn run(&self, ctx: &JobContext) -> Result<(), JobError> {
        let now = Instant::now();
        self.started.lock().expect("lock").insert(ctx.job().id, now);
        ctx.step("noop", 0, async {
            Ok(StepDone::new((), "noop", json!({})))
        })
        .await?;
        self.finished.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct QueueResults {
    /// (slots, enqueue time of the batch, time until all succeeded)
    throughput: Vec<(usize, Duration, Duration)>,
    claim: Vec<Duration>,
}

/// A fresh migrated database with a pool sized like production for the most slots measured
/// (`db::connect` with 16 workers).
async fn queue_database(databases: &mut Vec<String>) -> PgPool {
    let app::TestDb {
        pool: setup,
        url,
        guard,
    } = app::migrated_db().await;
    // Kept for the whole run: `drop_databases` drops it at the end.
    guard.keep();
    setup.close().await;
    databases.push(db_name(&url));
    let options = backup_provisioner::db::options(&secrecy::SecretString::from(url)).expect("url");
    backup_provisioner::db::connect(options, 16)
        .await
        .expect("connect")
}

fn start_workers(
    db: &PgPool,
    handler: &NoopJob,
    slots: usize,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let config = WorkerConfig {
        concurrency: slots,
        lease: Duration::from_secs(30),
        // Long, so that only LISTEN/NOTIFY (or a finishing job) wakes the worker.
        poll_interval: Duration::from_secs(30),
        retry_base: Duration::from_millis(50),
        shutdown_grace: Duration::from_secs(5),
        worker_id: "bench".into(),
    };
    let pool = WorkerPool::new(
        db.clone(),
        Registry::new().register(handler.clone()),
        config,
    );
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        pool.run(token).await.expect("worker pool");
    });
    (stop, task)
}

async fn enqueue_batch(db: &PgPool, count: usize) -> Vec<Uuid> {
    let mut tx = db.begin().await.expect("begin");
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        ids.push(
            queue::enqueue(
                &mut tx,
                NewJob {
                    kind: BENCH_KIND,
                    subject: None,
                    payload: json!({}),
                    max_attempts: 1,
                    created_by: "bench",
                },
            )
            .await
            .expect("enqueue"),
        );
    }
    tx.commit().await.expect("commit");
    ids
}

async fn succeeded(db: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'succeeded'")
        .fetch_one(db)
        .await
        .expect("count")
}

async fn queue_bench(databases: &mut Vec<String>) -> QueueResults {
    eprintln!("[2/4] queue throughput ({QUEUE_JOBS} no-op jobs) and claim latency …");
    let mut throughput = Vec::new();
    for slots in [4usize, 16] {
        let db = queue_database(databases).await;
        let handler = NoopJob::default();
        let (stop, task) = start_workers(&db, &handler, slots);
        tokio::time::sleep(Duration::from_millis(300)).await; // listener up, worker idle
        let t = Instant::now();
        enqueue_batch(&db, QUEUE_JOBS).await;
        let enqueued = t.elapsed();
        while handler.finished.load(Ordering::SeqCst) < QUEUE_JOBS {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        while succeeded(&db).await < QUEUE_JOBS as i64 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let all_done = t.elapsed();
        let failed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state <> 'succeeded'")
                .fetch_one(&db)
                .await
                .expect("count");
        assert_eq!(failed, 0, "every bench job succeeds");
        stop.cancel();
        let _ = task.await;
        db.close().await;
        throughput.push((slots, enqueued, all_done));
    }

    // Claim latency: one job at a time into an idle worker; the poll interval is 30 s, so the
    // wake-up can only come from the NOTIFY sent by the enqueueing transaction's commit.
    let db = queue_database(databases).await;
    let handler = NoopJob::default();
    let (stop, task) = start_workers(&db, &handler, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut claim = Vec::new();
    for i in 0..CLAIM_SAMPLES {
        let mut tx = db.begin().await.expect("begin");
        let id = queue::enqueue(
            &mut tx,
            NewJob {
                kind: BENCH_KIND,
                subject: None,
                payload: json!({}),
                max_attempts: 1,
                created_by: "bench",
            },
        )
        .await
        .expect("enqueue");
        let t = Instant::now();
        tx.commit().await.expect("commit");
        while succeeded(&db).await < (i + 1) as i64 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let start = handler.started.lock().expect("lock")[&id];
        claim.push(start.duration_since(t));
        // Let the worker go back to waiting.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let _ = task.await;
    db.close().await;
    QueueResults { throughput, claim }
}

// ---------------------------------------------------------------------------------------------
// 4: HTTP
// ---------------------------------------------------------------------------------------------

struct HttpResults {
    post: Vec<Duration>,
    get: Vec<Duration>,
}

async fn http_bench(databases: &mut Vec<String>) -> HttpResults {
    eprintln!("[3/4] HTTP: {HTTP_SAMPLES} × POST /v1/backup-repositories, GET … (workers 0)");
    let app = app::spawn_app().await;
    databases.push(db_name(&app.database_url));
    let operator = app.token("operator@bench", &[Role::Operator]);
    let viewer = app.token("viewer@bench", &[Role::Viewer]);
    let prefix = &Uuid::new_v4().simple().to_string()[..6];
    let create = |name: String| {
        app.client
            .post(app.url("/v1/backup-repositories"))
            .bearer_auth(&operator)
            .json(&json!({"name": name, "namespace": "zitadel"}))
            .send()
    };
    for i in 0..20 {
        let response = create(format!("warm-{prefix}-{i}")).await.expect("POST");
        assert_eq!(response.status(), 202, "warm-up POST");
        response.bytes().await.expect("body");
    }
    let mut names = Vec::new();
    let mut post = Vec::new();
    for i in 0..HTTP_SAMPLES {
        let name = format!("h-{prefix}-{i}");
        let t = Instant::now();
        let response = create(name.clone()).await.expect("POST");
        let status = response.status();
        response.bytes().await.expect("body");
        post.push(t.elapsed());
        assert_eq!(status, 202, "POST {name}");
        names.push(name);
    }
    let mut get = Vec::new();
    for name in &names {
        let t = Instant::now();
        let response = app
            .client
            .get(app.url(&format!("/v1/backup-repositories/{name}")))
            .bearer_auth(&viewer)
            .send()
            .await
            .expect("GET");
        let status = response.status();
        response.bytes().await.expect("body");
        get.push(t.elapsed());
        assert_eq!(status, 200, "GET {name}");
    }
    app.stop().await;
    HttpResults { post, get }
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn print_report(prov: &ProvisioningResults, queue: &QueueResults, http: &HttpResults) {
    eprintln!("[4/4] report");
    println!("== 1. Provisioning through the API (POST → job succeeded, long-poll ?wait=5s) ==");
    println!(
        "{:<44} {:>5} {:>9} {:>9} {:>9} {:>9}",
        "", "n", "min", "median", "p90", "max"
    );
    for (label, runs) in [
        ("first provisioning, wall", &prov.first),
        ("re-run of a ready repository, wall", &prov.rerun),
    ] {
        let walls: Vec<Duration> = runs.iter().map(|r| r.wall).collect();
        stats_row(label, &walls);
        let waits: Vec<Duration> = runs.iter().map(|r| r.queue_wait).collect();
        stats_row("  job queued → claimed (db clock)", &waits);
        let runs_: Vec<Duration> = runs.iter().map(|r| r.run).collect();
        stats_row("  job claimed → finished (db clock)", &runs_);
    }
    println!();
    println!("Per-step duration, median (bucket and policy run concurrently):");
    println!("{:<26} {:>12} {:>12}", "step", "first run", "re-run");
    for (step, _) in &prov.first[0].steps {
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
        println!(
            "{:<26} {:>12} {:>12}",
            step,
            of(&prov.first),
            of(&prov.rerun)
        );
    }
    for (label, runs) in [("first run", &prov.first), ("re-run", &prov.rerun)] {
        let outside: Vec<Duration> = runs.iter().map(between_steps).collect();
        stats_row(&format!("  {label}: time between steps"), &outside);
    }
    println!(
        "  (job run minus the steps' critical path, max(bucket, policy) + the rest: the Secret read,\n   \
         step and audit bookkeeping in Postgres, and the access_key step's AWS calls, whose step\n   \
         times are stamped inside its own transaction and so read near zero above)"
    );
    println!();
    stats_header("moto round trip (admin client)");
    stats_row("  s3 HeadBucket", &prov.moto_s3_head_bucket);
    stats_row("  iam GetUser", &prov.moto_iam_get_user);
    println!();

    println!("== 2. Calls per run ==");
    for (label, runs) in [("first run", &prov.first), ("re-run", &prov.rerun)] {
        let aws = &runs[0].aws;
        let same = runs.iter().all(|r| &r.aws == aws);
        let mutating: u64 = aws
            .iter()
            .filter(|(op, _)| backup_provisioner::cloud::aws::CallCounter::is_mutating(op))
            .map(|(_, n)| n)
            .sum();
        let total: u64 = aws.values().sum();
        let kube = &runs[0].kube;
        let kube_mut = kube.iter().filter(|r| r.is_mutating()).count();
        let kube_same = runs.iter().all(|r| {
            r.kube.len() == kube.len()
                && r.kube.iter().filter(|r| r.is_mutating()).count() == kube_mut
        });
        println!(
            "{label}: AWS {total} calls ({mutating} mutating, {} reads){}; Kubernetes {} requests ({kube_mut} mutating, {} reads){}",
            total - mutating,
            if same {
                ", identical in every run"
            } else {
                ", VARIES between runs"
            },
            kube.len(),
            kube.len() - kube_mut,
            if kube_same {
                ", identical in every run"
            } else {
                ", VARIES between runs"
            },
        );
        for (op, n) in aws {
            let kind = if backup_provisioner::cloud::aws::CallCounter::is_mutating(op) {
                "mutating"
            } else {
                "read"
            };
            println!("    {op:<40} {n:>3}  {kind}");
        }
        for r in kube {
            println!("    k8s {:<6} {} → {}", r.method, r.path, r.status);
        }
    }
    println!();

    println!("== 3. Job queue (no-op job with one step; pool of 16 connections) ==");
    for (slots, enqueued, all_done) in &queue.throughput {
        let drain = all_done.saturating_sub(*enqueued);
        println!(
            "{QUEUE_JOBS} jobs, {slots:>2} slots: enqueue in 1 tx {}; commit → all succeeded {} → {:.0} jobs/s",
            ms(*enqueued),
            ms(drain),
            QUEUE_JOBS as f64 / drain.as_secs_f64()
        );
    }
    stats_header("claim latency, idle worker (commit → handler start)");
    stats_row("  LISTEN/NOTIFY wake-up", &queue.claim);
    println!();

    println!("== 4. HTTP (workers 0, keep-alive client) ==");
    println!(
        "{:<44} {:>5} {:>9} {:>9} {:>9} {:>9}",
        "", "n", "median", "p90", "p99", "max"
    );
    for (label, samples) in [
        ("POST /v1/backup-repositories (202)", &http.post),
        ("GET /v1/backup-repositories/{name} (200)", &http.get),
    ] {
        println!(
            "{:<44} {:>5} {:>9} {:>9} {:>9} {:>9}",
            label,
            samples.len(),
            ms(percentile(samples, 50.0)),
            ms(percentile(samples, 90.0)),
            ms(percentile(samples, 99.0)),
            ms(percentile(samples, 100.0)),
        );
    }
}

/// The job's run time not covered by its steps' critical path (bucket and policy overlap).
fn between_steps(run: &RunSample) -> Duration {
    let of = |name: &str| {
        run.steps
            .iter()
            .find(|(s, _)| s == name)
            .map(|(_, d)| *d)
            .unwrap_or_default()
    };
    let rest: Duration = run
        .steps
        .iter()
        .filter(|(s, _)| s != "bucket" && s != "policy")
        .map(|(_, d)| *d)
        .sum();
    run.run
        .saturating_sub(of("bucket").max(of("policy")) + rest)
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

/// Nearest-rank percentile (0 = min, 100 = max).
fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1000.0;
    if v < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.0} ms")
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn db_name(url: &str) -> String {
    url.rsplit('/').next().unwrap_or_default().to_owned()
}

/// Drops the databases this run created (they are not needed afterwards).
async fn drop_databases(names: &[String]) {
    let Ok(admin) = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{}/postgres", app::postgres_base_url()))
        .await
    else {
        return;
    };
    let mut dropped = 0;
    for name in names.iter().filter(|n| n.starts_with("bp_test_")) {
        match sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&admin)
        .await
        {
            Ok(_) => dropped += 1,
            Err(e) => eprintln!("dropping {name}: {e}"),
        }
    }
    eprintln!("dropped the {dropped} databases this run created");
    admin.close().await;
}
