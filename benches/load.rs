//! `cargo bench --bench load` (part of `make bench`): the service under load next to its peers
//! (issue 12), on the real Postgres (127.0.0.1:5432), in one run:
//!
//! 1. the job queue against graphile-worker (npm, `benches/graphile/`) on the same Postgres,
//!    each in scratch databases, at the same concurrency (4 and 16) with the same poll interval
//!    and pool size: a batch of no-op jobs added in one transaction (commit → all done) and
//!    pickup latency (commit of one job → its handler starts, idle workers). Ours twice: a bare
//!    kind (the handler does nothing) and the audited kind (one no-op `ctx.step`);
//! 2. the HTTP API of the release binary (`backup-provisioner serve --workers 0`, a process of
//!    its own, rate limits off) under `wrk` at 32 connections: GET a job, GET a repository,
//!    POST a repository (unique names from a Lua script); three rounds;
//! 3. memory (VmRSS idle, after each round) and start-up time (spawn → `/readyz` 200 on a
//!    migrated database, several starts).
//!
//! Results are printed as a table; BENCHMARKS.md records a run. Nothing here asserts timings.
//! Every database the run creates is dropped at the end. Sizes can be shrunk for a smoke run:
//! BENCH_QUEUE_JOBS (2000), BENCH_PICKUP_SAMPLES (100), BENCH_LOAD_SECONDS (10),
//! BENCH_LOAD_ROUNDS (3), BENCH_STARTS (7). BENCH_SECTIONS (`queue,service`, the default) runs
//! only the sections named.

#[allow(dead_code)]
#[path = "../tests/api/support/app.rs"]
mod app;
#[allow(dead_code)]
#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backup_provisioner::auth::{Role, mint_hs256};
use backup_provisioner::jobs::queue::{self, NewJob};
use backup_provisioner::jobs::{
    JobContext, JobError, JobHandler, Registry, StepDone, WorkerConfig, WorkerPool,
};
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use common::{Databases, ms, percentile, setting};

/// Long, so that only LISTEN/NOTIFY (or a finishing job) wakes an idle worker; the same for
/// graphile-worker.
const POLL_INTERVAL: Duration = Duration::from_secs(30);
const SLOTS: [usize; 2] = [4, 16];
const PICKUP_SLOTS: usize = 4;
const CONNECTIONS: usize = 32;
const WRK_THREADS: usize = 2;

fn main() {
    common::main_of("load", async {
        let mut databases = Databases::default();
        if common::section_wanted("queue") {
            let queue = queue_bench(&mut databases).await;
            print_queue(&queue);
        }
        if common::section_wanted("service") {
            let service = service_bench(&mut databases).await;
            print_service(&service);
        }
        databases.drop_all().await;
    });
}

// ---------------------------------------------------------------------------------------------
// 1. The queue against graphile-worker
// ---------------------------------------------------------------------------------------------

/// Which of our job kinds: `bare` does nothing, `audited` runs one no-op step (a step row, its
/// start and result, an audit entry), as every real kind's steps do.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Flavour {
    Bare,
    Audited,
}

impl Flavour {
    fn kind(self) -> &'static str {
        match self {
            Flavour::Bare => "bench-bare",
            Flavour::Audited => "bench-audited",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Flavour::Bare => "ours, bare kind",
            Flavour::Audited => "ours, audited kind (1 step)",
        }
    }
}

/// Records when each job's handler started and how many ran.
#[derive(Clone)]
struct NoopJob {
    flavour: Flavour,
    started: Arc<Mutex<HashMap<Uuid, Instant>>>,
    ran: Arc<AtomicUsize>,
}

impl NoopJob {
    fn new(flavour: Flavour) -> Self {
        NoopJob {
            flavour,
            started: Arc::default(),
            ran: Arc::default(),
        }
    }
}

#[async_trait::async_trait]
impl JobHandler for NoopJob {
    fn kind(&self) -> &'static str {
        self.flavour.kind()
    }

    async fn run(&self, ctx: &JobContext) -> Result<(), JobError> {
        let now = Instant::now();
        self.started.lock().expect("lock").insert(ctx.job().id, now);
        if self.flavour == Flavour::Audited {
            ctx.step("noop", 0, async {
                Ok(StepDone::new((), "noop", json!({})))
            })
            .await?;
        }
        self.ran.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// One batch: who, how many slots, adding the batch in one transaction, commit → all done.
struct Batch {
    who: String,
    slots: usize,
    jobs: usize,
    enqueue: Duration,
    drain: Duration,
}

impl Batch {
    fn jobs_per_second(&self) -> f64 {
        self.jobs as f64 / self.drain.as_secs_f64()
    }
}

struct QueueResults {
    batches: Vec<Batch>,
    /// (who, commit → handler start)
    pickup: Vec<(String, Vec<Duration>)>,
    graphile_version: String,
}

async fn queue_bench(databases: &mut Databases) -> QueueResults {
    let jobs: usize = setting("BENCH_QUEUE_JOBS", 2000);
    let samples: usize = setting("BENCH_PICKUP_SAMPLES", 100);
    let graphile = Graphile::install();
    let mut batches = Vec::new();
    let mut graphile_version = String::new();
    for slots in SLOTS {
        eprintln!("[queue] {jobs} no-op jobs in one transaction, {slots} slots …");
        for flavour in [Flavour::Bare, Flavour::Audited] {
            batches.push(our_batch(databases, flavour, slots, jobs).await);
        }
        let (batch, version) = graphile.batch(databases, slots, jobs).await;
        batches.push(batch);
        graphile_version = version;
    }
    eprintln!("[queue] pickup latency, {samples} jobs one at a time, {PICKUP_SLOTS} slots …");
    let mut pickup = Vec::new();
    for flavour in [Flavour::Bare, Flavour::Audited] {
        let samples = our_pickup(databases, flavour, samples).await;
        pickup.push((flavour.label().to_owned(), samples));
    }
    let samples = graphile.pickup(databases, samples).await;
    pickup.push((format!("graphile-worker {graphile_version}"), samples));
    QueueResults {
        batches,
        pickup,
        graphile_version,
    }
}

/// A fresh migrated database and a pool sized as the service sizes it for `slots` workers.
async fn queue_database(databases: &mut Databases, slots: usize) -> PgPool {
    let app::TestDb {
        pool: setup,
        url,
        guard,
    } = app::migrated_db().await;
    databases.keep(guard);
    setup.close().await;
    let options = backup_provisioner::db::options(&SecretString::from(url)).expect("url");
    backup_provisioner::db::connect(options, slots)
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
        poll_interval: POLL_INTERVAL,
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

fn new_job(kind: &str) -> NewJob<'_> {
    NewJob {
        kind,
        subject: None,
        payload: json!({}),
        max_attempts: 1,
        created_by: "bench",
    }
}

async fn succeeded(db: &PgPool) -> usize {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'succeeded'")
        .fetch_one(db)
        .await
        .expect("count");
    n as usize
}

/// Waits (2 ms polls, 120 s at most) until `done` holds.
async fn wait_until<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn our_batch(
    databases: &mut Databases,
    flavour: Flavour,
    slots: usize,
    jobs: usize,
) -> Batch {
    let db = queue_database(databases, slots).await;
    let handler = NoopJob::new(flavour);
    let (stop, task) = start_workers(&db, &handler, slots);
    tokio::time::sleep(Duration::from_millis(300)).await; // listener up, workers idle
    let began = Instant::now();
    let mut tx = db.begin().await.expect("begin");
    for _ in 0..jobs {
        queue::enqueue(&mut tx, new_job(flavour.kind()))
            .await
            .expect("enqueue");
    }
    let committing = Instant::now();
    tx.commit().await.expect("commit");
    let (ran, pool) = (&handler.ran, &db);
    wait_until("every handler", || async move {
        ran.load(Ordering::SeqCst) >= jobs
    })
    .await;
    wait_until("every job to succeed", || async move {
        succeeded(pool).await >= jobs
    })
    .await;
    let done = Instant::now();
    stop.cancel();
    let _ = task.await;
    db.close().await;
    Batch {
        who: flavour.label().to_owned(),
        slots,
        jobs,
        enqueue: committing - began,
        drain: done - committing,
    }
}

async fn our_pickup(databases: &mut Databases, flavour: Flavour, samples: usize) -> Vec<Duration> {
    let db = queue_database(databases, PICKUP_SLOTS).await;
    let handler = NoopJob::new(flavour);
    let (stop, task) = start_workers(&db, &handler, PICKUP_SLOTS);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut pickup = Vec::with_capacity(samples);
    for i in 0..samples {
        let mut tx = db.begin().await.expect("begin");
        let id = queue::enqueue(&mut tx, new_job(flavour.kind()))
            .await
            .expect("enqueue");
        let committing = Instant::now();
        tx.commit().await.expect("commit");
        let pool = &db;
        wait_until(
            "the job to succeed",
            || async move { succeeded(pool).await > i },
        )
        .await;
        let start = handler.started.lock().expect("lock")[&id];
        pickup.push(start.duration_since(committing));
        // Let the workers go back to waiting.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let _ = task.await;
    db.close().await;
    pickup
}

/// graphile-worker, run by `benches/graphile/runner.js` in a node process of its own.
struct Graphile {
    node_modules: String,
    runner: PathBuf,
}

impl Graphile {
    /// Installs graphile-worker if needed (`benches/graphile/install.sh`).
    fn install() -> Graphile {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/graphile");
        let output = Command::new("bash")
            .arg(dir.join("install.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run benches/graphile/install.sh (needs node and npm)");
        assert!(
            output.status.success(),
            "benches/graphile/install.sh failed"
        );
        Graphile {
            node_modules: String::from_utf8_lossy(&output.stdout).trim().to_owned(),
            runner: dir.join("runner.js"),
        }
    }

    /// Runs the runner against a fresh, empty database (graphile-worker migrates it).
    async fn run(&self, databases: &mut Databases, settings: &[(&str, String)]) -> Value {
        let app::TestDb { pool, url, guard } = app::fresh_database().await;
        pool.close().await;
        databases.keep(guard);
        let output = tokio::process::Command::new("node")
            .arg(&self.runner)
            .env("NODE_PATH", &self.node_modules)
            .env("DATABASE_URL", &url)
            .env("POLL_INTERVAL_MS", POLL_INTERVAL.as_millis().to_string())
            .envs(settings.iter().map(|(k, v)| (*k, v.as_str())))
            .stderr(Stdio::inherit())
            .output()
            .await
            .expect("run node benches/graphile/runner.js");
        assert!(output.status.success(), "graphile runner failed");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout.lines().last().expect("the runner's result line");
        serde_json::from_str(line).expect("the runner prints JSON")
    }

    async fn batch(&self, databases: &mut Databases, slots: usize, jobs: usize) -> (Batch, String) {
        let settings = [
            ("BENCH_MODE", "throughput".to_owned()),
            ("CONCURRENCY", slots.to_string()),
            (
                "MAX_POOL_SIZE",
                backup_provisioner::db::pool_size(slots).to_string(),
            ),
            ("JOBS", jobs.to_string()),
        ];
        let result = self.run(databases, &settings).await;
        let version = result["version"].as_str().unwrap_or("?").to_owned();
        let batch = Batch {
            who: format!("graphile-worker {version}"),
            slots,
            jobs,
            enqueue: millis(&result["enqueue_ms"]),
            drain: millis(&result["drain_ms"]),
        };
        (batch, version)
    }

    async fn pickup(&self, databases: &mut Databases, samples: usize) -> Vec<Duration> {
        let settings = [
            ("BENCH_MODE", "pickup".to_owned()),
            ("CONCURRENCY", PICKUP_SLOTS.to_string()),
            (
                "MAX_POOL_SIZE",
                backup_provisioner::db::pool_size(PICKUP_SLOTS).to_string(),
            ),
            ("SAMPLES", samples.to_string()),
        ];
        let result = self.run(databases, &settings).await;
        result["pickup_ms"]
            .as_array()
            .expect("pickup_ms")
            .iter()
            .map(millis)
            .collect()
    }
}

fn millis(value: &Value) -> Duration {
    Duration::from_secs_f64(value.as_f64().expect("a number of milliseconds") / 1000.0)
}

fn print_queue(results: &QueueResults) {
    println!(
        "== 1. Job queue vs graphile-worker {} (no-op jobs, poll interval {} s, LISTEN/NOTIFY) ==",
        results.graphile_version,
        POLL_INTERVAL.as_secs()
    );
    println!(
        "{:<34} {:>5} {:>6} {:>14} {:>16} {:>10} {:>9}",
        "", "slots", "jobs", "enqueue (1 tx)", "commit → done", "jobs/s", "× peer"
    );
    for batch in &results.batches {
        let peer = results
            .batches
            .iter()
            .find(|b| b.slots == batch.slots && b.who.starts_with("graphile"))
            .map(Batch::jobs_per_second)
            .unwrap_or(f64::NAN);
        println!(
            "{:<34} {:>5} {:>6} {:>14} {:>16} {:>10.0} {:>8.2}×",
            batch.who,
            batch.slots,
            batch.jobs,
            ms(batch.enqueue),
            ms(batch.drain),
            batch.jobs_per_second(),
            batch.jobs_per_second() / peer
        );
    }
    println!();
    println!(
        "{:<44} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9}",
        format!("pickup, commit → handler start ({PICKUP_SLOTS} slots)"),
        "n",
        "min",
        "p50",
        "p90",
        "p99",
        "max"
    );
    for (who, samples) in &results.pickup {
        println!(
            "{:<44} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9}",
            who,
            samples.len(),
            ms(percentile(samples, 0.0)),
            ms(percentile(samples, 50.0)),
            ms(percentile(samples, 90.0)),
            ms(percentile(samples, 99.0)),
            ms(percentile(samples, 100.0)),
        );
    }
    println!();
}

// ---------------------------------------------------------------------------------------------
// 2 + 3. The release binary: start-up, memory, HTTP under wrk
// ---------------------------------------------------------------------------------------------

/// `backup-provisioner serve --workers 0` as deployed, configured through its environment.
struct Service {
    child: Child,
    base_url: String,
}

impl Service {
    /// Spawns the binary and returns it with the time from spawn to `/readyz` 200.
    async fn start(database_url: &str, log: &Path) -> (Service, Duration) {
        let port = app::free_port();
        let log = std::fs::File::create(log).expect("log file");
        let began = Instant::now();
        let child = Command::new(service_binary())
            .args(["serve", "--workers", "0"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", database_url)
            .env("BP_JWT_HS256_SECRET", app::HS256_SECRET)
            .env("BP_LISTEN_ADDR", format!("127.0.0.1:{port}"))
            // The per-subject and global limits on mutations (60/min and 600/min by default)
            // would answer most of the benchmark's POSTs 429: off, as for reads by default.
            .env("BP_RATE_LIMIT_PER_SUBJECT", "off")
            .env("BP_RATE_LIMIT_GLOBAL", "off")
            .env("BP_RATE_LIMIT_READS_PER_SUBJECT", "off")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn backup-provisioner");
        let mut service = Service {
            child,
            base_url: format!("http://127.0.0.1:{port}"),
        };
        service.wait_ready().await;
        (service, began.elapsed())
    }

    async fn wait_ready(&mut self) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("backup-provisioner exited early with {status}");
            }
            let ready = client
                .get(format!("{}/readyz", self.base_url))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "backup-provisioner not ready in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// VmRSS and VmHWM (peak) from /proc, in bytes.
    fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc/<pid>/status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kb| kb * 1024)
                .expect("a memory field")
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// SIGTERM, then the exit (SIGKILL after 10 s).
    async fn stop(mut self) {
        use nix::sys::signal::{Signal, kill};
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The release binary cargo built with this bench, or BENCH_SERVICE_BIN (a copy that other
/// builds in the same target directory cannot replace during the run).
fn service_binary() -> String {
    std::env::var("BENCH_SERVICE_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_backup-provisioner").to_owned())
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One wrk run's numbers.
struct WrkResult {
    endpoint: &'static str,
    round: usize,
    requests: u64,
    per_second: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    non_2xx: u64,
    socket_errors: u64,
}

struct ServiceResults {
    /// (how the service reaches Postgres, spawn → /readyz 200 of each start)
    starts: Vec<(&'static str, Vec<Duration>)>,
    /// VmRSS of each start-up measurement's process, 1 s after it became ready.
    idle_rss: Vec<u64>,
    /// (after round, VmRSS, VmHWM)
    rss_after: Vec<(usize, u64, u64)>,
    wrk: Vec<WrkResult>,
    wrk_version: String,
}

async fn service_bench(databases: &mut Databases) -> ServiceResults {
    let database = app::migrated_db().await;
    database.pool.close().await;
    let url = database.url.clone();
    databases.keep(database.guard);
    let dir = tempfile::tempdir().expect("temporary directory");
    let starts_n: usize = setting("BENCH_STARTS", 7);
    eprintln!("[start] 2 × {starts_n} starts of the release binary on a migrated database …");
    let mut starts = Vec::new();
    let mut idle_rss = Vec::new();
    // The test URL leaves sslmode at `prefer`: every connection makes a TLS handshake with the
    // local server, and start-up opens two before it is ready.
    let plain = format!("{url}?sslmode=disable");
    for (how, url) in [
        ("TLS (sslmode=prefer)", &url),
        ("no TLS (sslmode=disable)", &plain),
    ] {
        let mut took = Vec::new();
        for i in 0..starts_n {
            let log = dir.path().join(format!("start-{}-{i}.log", starts.len()));
            let (service, time) = Service::start(url, &log).await;
            took.push(time);
            tokio::time::sleep(Duration::from_secs(1)).await;
            idle_rss.push(service.memory().0);
            service.stop().await;
        }
        starts.push((how, took));
    }
    let (service, _) = Service::start(&url, &dir.path().join("load.log")).await;
    let (rss_after, wrk) = load_rounds(&service, dir.path()).await;
    service.stop().await;
    ServiceResults {
        starts,
        idle_rss,
        rss_after,
        wrk,
        wrk_version: wrk_version(),
    }
}

fn wrk_version() -> String {
    let output = Command::new("wrk")
        .arg("-v")
        .output()
        .expect("run wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    text.lines().next().unwrap_or("wrk ?").to_owned()
}

fn token(subject: &str, role: Role) -> String {
    mint_hs256(
        &SecretString::from(app::HS256_SECRET),
        subject,
        &[role],
        Duration::from_secs(3600),
        app::AUDIENCE,
    )
    .expect("mint token")
}

/// One repository and its job to GET, made through the API.
async fn seed(service: &Service, operator: &str) -> (String, String) {
    let name = format!("seed-{}", &Uuid::new_v4().simple().to_string()[..8]);
    let response = reqwest::Client::new()
        .post(format!("{}/v1/backup-repositories", service.base_url))
        .bearer_auth(operator)
        .json(&json!({"name": name, "namespace": "bench"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 202, "seed POST");
    let view: Value = response.json().await.expect("job view");
    let job = view["job"]["id"].as_str().expect("job id").to_owned();
    (name, job)
}

/// Each POST names a new repository: `l<run>-<round>-<thread>-<n>`.
const POST_SCRIPT: &str = r#"
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  prefix = args[1]
  auth = "Bearer " .. args[2]
  n = 0
end
function request()
  n = n + 1
  local body = string.format('{"name":"%s-%d-%d","namespace":"bench"}', prefix, tid, n)
  return wrk.format("POST", "/v1/backup-repositories",
    {["Content-Type"] = "application/json", ["Authorization"] = auth}, body)
end
"#;

async fn load_rounds(service: &Service, dir: &Path) -> (Vec<(usize, u64, u64)>, Vec<WrkResult>) {
    let operator = token("operator@bench", Role::Operator);
    let viewer = token("viewer@bench", Role::Viewer);
    let (name, job) = seed(service, &operator).await;
    let script = dir.join("post.lua");
    std::fs::write(&script, POST_SCRIPT).expect("write post.lua");
    let run_id = &Uuid::new_v4().simple().to_string()[..6];
    let rounds: usize = setting("BENCH_LOAD_ROUNDS", 3);
    let seconds: u64 = setting("BENCH_LOAD_SECONDS", 10);
    // Not measured: the pool opens its connections (a TLS handshake each) and the caches fill.
    let warm_up = [
        "-H".to_owned(),
        format!("Authorization: Bearer {viewer}"),
        format!("{}/v1/jobs/{job}", service.base_url),
    ];
    wrk(2, &warm_up).await;
    let mut rss_after = Vec::new();
    let mut results = Vec::new();
    for round in 1..=rounds {
        eprintln!(
            "[http] round {round}/{rounds}: wrk -t{WRK_THREADS} -c{CONNECTIONS} -d{seconds}s × 3 endpoints …"
        );
        let auth = format!("Authorization: Bearer {viewer}");
        let job_url = format!("{}/v1/jobs/{job}", service.base_url);
        let repo_url = format!("{}/v1/backup-repositories/{name}", service.base_url);
        let post_url = format!("{}/v1/backup-repositories", service.base_url);
        let prefix = format!("l{run_id}-{round}");
        let runs: [(&'static str, Vec<String>); 3] = [
            (
                "GET /v1/jobs/{id}",
                vec!["-H".into(), auth.clone(), job_url],
            ),
            (
                "GET /v1/backup-repositories/{name}",
                vec!["-H".into(), auth.clone(), repo_url],
            ),
            (
                "POST /v1/backup-repositories",
                vec![
                    "-s".into(),
                    script.display().to_string(),
                    post_url,
                    "--".into(),
                    prefix,
                    operator.clone(),
                ],
            ),
        ];
        for (endpoint, args) in runs {
            let output = wrk(seconds, &args).await;
            results.push(parse_wrk(endpoint, round, &output));
        }
        let (rss, hwm) = service.memory();
        rss_after.push((round, rss, hwm));
    }
    (rss_after, results)
}

async fn wrk(seconds: u64, args: &[String]) -> String {
    let output = tokio::process::Command::new("wrk")
        .args([
            format!("-t{WRK_THREADS}"),
            format!("-c{CONNECTIONS}"),
            format!("-d{seconds}s"),
            "--latency".to_owned(),
        ])
        .args(args)
        .output()
        .await
        .expect("run wrk (apt-get install wrk)");
    assert!(
        output.status.success(),
        "wrk failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Reads wrk's `--latency` report.
fn parse_wrk(endpoint: &'static str, round: usize, output: &str) -> WrkResult {
    let words_after = |prefix: &str| -> Vec<String> {
        output
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(|rest| rest.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let requests = output
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("wrk: requests");
    let socket_errors = words_after("Socket errors:")
        .iter()
        .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
        .sum();
    WrkResult {
        endpoint,
        round,
        requests,
        per_second: words_after("Requests/sec:")[0]
            .parse()
            .expect("wrk: Requests/sec"),
        p50: wrk_duration(&words_after("50%")[0]),
        p99: wrk_duration(&words_after("99%")[0]),
        max: wrk_duration(&words_after("Latency")[2]),
        non_2xx: words_after("Non-2xx or 3xx responses:")
            .first()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        socket_errors,
    }
}

/// `812.00us`, `1.23ms`, `2.01s`.
fn wrk_duration(text: &str) -> Duration {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (value, unit) = text.split_at(split);
    let value: f64 = value.parse().unwrap_or(f64::NAN);
    let seconds = match unit {
        "us" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        _ => f64::NAN,
    };
    Duration::from_secs_f64(seconds.max(0.0))
}

fn print_service(results: &ServiceResults) {
    println!(
        "== 2. HTTP under load ({}, -t{WRK_THREADS} -c{CONNECTIONS}; serve --workers 0, rate limits off) ==",
        results.wrk_version
    );
    println!(
        "{:<38} {:>5} {:>9} {:>10} {:>9} {:>9} {:>9} {:>8} {:>7}",
        "", "round", "requests", "req/s", "p50", "p99", "max", "non-2xx", "socket"
    );
    for r in &results.wrk {
        println!(
            "{:<38} {:>5} {:>9} {:>10.0} {:>9} {:>9} {:>9} {:>8} {:>7}",
            r.endpoint,
            r.round,
            r.requests,
            r.per_second,
            ms(r.p50),
            ms(r.p99),
            ms(r.max),
            r.non_2xx,
            r.socket_errors
        );
    }
    println!();
    println!("== 3. Memory and start-up (release binary, serve --workers 0) ==");
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0));
    let idle: Vec<String> = results.idle_rss.iter().map(|b| mib(*b)).collect();
    println!(
        "idle VmRSS, 1 s after ready (each start): {}",
        idle.join(", ")
    );
    for (round, rss, hwm) in &results.rss_after {
        println!(
            "after load round {round}: VmRSS {}, VmHWM (peak) {}",
            mib(*rss),
            mib(*hwm)
        );
    }
    println!(
        "{:<44} {:>5} {:>9} {:>9} {:>9}",
        "spawn → /readyz 200 (migrated database)", "n", "min", "median", "max"
    );
    for (how, starts) in &results.starts {
        println!(
            "{:<44} {:>5} {:>9} {:>9} {:>9}",
            format!("  {how}"),
            starts.len(),
            ms(percentile(starts, 0.0)),
            ms(percentile(starts, 50.0)),
            ms(percentile(starts, 100.0)),
        );
    }
}
