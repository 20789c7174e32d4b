//! The AWS request-rate limit (`BP_AWS_MAX_RPS`, `cloud::rate_limit`) counted at the AWS
//! realism proxy, and the periodic verification (`provision::verify_sweep`): every ready
//! repository verified with `verified_at` stored, never more verify jobs at once than
//! `BP_VERIFY_CONCURRENCY`, the rate limit held while it runs, drift shown on /metrics.

use std::time::Duration;

use backup_provisioner::cloud::rate_limit::{AwsRateLimit, burst_for};
use backup_provisioner::provision::verify_sweep::{TopUp, VerifySweeper};
use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::support::app::eventually;
use crate::support::aws_realism::AwsRealism;
use crate::support::env::{Env, bucket_for, unique_name};

const NAMESPACE: &str = "zitadel";
/// The limit of the rate tests: low enough that a few repositories take several seconds.
const RPS: u32 = 5;

/// The most requests the proxy may see in any sliding second under `RPS`: the rate plus the
/// limiter's burst (`cloud::rate_limit::burst_for`) plus one. Permits in a half-open second
/// are at most the rate plus the burst minus one (GCRA); a request that waited for its
/// connection arrives late, next to its successor, so two arrival jitters are allowed.
fn most_per_second() -> usize {
    let rate = std::num::NonZeroU32::new(RPS).expect("rate");
    (RPS + burst_for(rate).get() + 1) as usize
}

/// An environment whose service clients go through the realism proxy (pass-through) under a
/// limit of `RPS` requests a second.
async fn rate_limited_env(workers: usize) -> Env {
    Env::builder(&[NAMESPACE])
        .workers(workers)
        .aws_realism(AwsRealism::off())
        .map_service_aws(|aws| aws.with_rate_limit(&AwsRateLimit::per_second(RPS)))
        .start()
        .await
}

/// Under 5 requests a second, three provisionings at once, then the sweep verifying the three
/// repositories at once: the proxy never sees more than the rate plus the burst in any
/// second, and each run lasts at least what the rate allows. Prints the AWS requests of one
/// verification (for the sweep's duration at the default rate, see the README).
#[tokio::test]
async fn provisioning_and_the_sweep_stay_under_the_aws_rate_limit_in_every_second() {
    let env = rate_limited_env(3).await;
    let proxy = env.realism.as_ref().expect("proxy");
    let started = std::time::Instant::now();
    let names = provision_all(&env, "rate-", 3).await;
    assert_paced(proxy, started.elapsed(), "3 provisionings");
    proxy.reset_counts();
    make_due(&env.app.db, &names).await;
    let started = std::time::Instant::now();
    let stop = start_sweep(&env, 3);
    wait_all_verified(&env.app.db, Duration::from_secs(120)).await;
    stop.cancel();
    assert_paced(proxy, started.elapsed(), "3 verifications");
    let jobs = verify_jobs(&env.app.db).await;
    assert_eq!(jobs.len(), 3, "{jobs:?}");
    eprintln!(
        "one verification: {} AWS requests ({} mutating): {:?}",
        proxy.total() / 3,
        proxy.mutating_count(),
        proxy.calls()
    );
    assert_eq!(proxy.mutating_count(), 0, "{:?}", proxy.mutating());
    env.app.stop().await;
}

/// The proxy's requests so far were paced: no sliding second above [`most_per_second`], and
/// `elapsed` at least what the rate allows for their number after the burst.
fn assert_paced(proxy: &crate::support::aws_realism::AwsProxy, elapsed: Duration, what: &str) {
    let total = proxy.total() as usize;
    let busiest = proxy.busiest(Duration::from_secs(1));
    eprintln!("{what} at {RPS}/s: {total} AWS requests in {elapsed:?}, busiest second {busiest}");
    assert!(
        busiest <= most_per_second(),
        "{what}: busiest second {busiest}"
    );
    let paced = total.saturating_sub(most_per_second()) as f64 / f64::from(RPS);
    assert!(
        elapsed.as_secs_f64() >= paced,
        "{what}: {total} requests in {elapsed:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The periodic verification
// ---------------------------------------------------------------------------------------------

/// The sweep's interval in these tests: long, so each repository is due once (the tests make
/// them due by dating their last change back, see [`make_due`]).
const INTERVAL: Duration = Duration::from_secs(3600);

/// Provisions `n` repositories at once; their names, in creation order.
async fn provision_all(env: &Env, prefix: &str, n: usize) -> Vec<String> {
    let names: Vec<String> = (0..n)
        .map(|i| unique_name(&format!("{prefix}{i}")))
        .collect();
    let jobs = futures::future::join_all(names.iter().map(|name| {
        let body = json!({"name": name, "namespace": env.ns(NAMESPACE)});
        env.provision(body)
    }))
    .await;
    for job in &jobs {
        assert_eq!(job["state"], "succeeded", "job: {job:#}");
    }
    names
}

/// Makes every repository due, the first of `names` the longest (hours ago, one apart).
async fn make_due(db: &PgPool, names: &[String]) {
    for (i, name) in names.iter().enumerate() {
        let hours = (names.len() - i + 1) as f64;
        sqlx::query(
            "UPDATE backup_repositories SET updated_at = now() - make_interval(hours => $2)
              WHERE name = $1",
        )
        .bind(name)
        .bind(hours as i32)
        .execute(db)
        .await
        .expect("date back");
    }
}

/// Runs the sweep on the service's database, topping up every 50 ms, until the token fires.
fn start_sweep(env: &Env, concurrency: u32) -> CancellationToken {
    let sweeper = VerifySweeper {
        db: env.app.db.clone(),
        interval: INTERVAL,
        concurrency,
        max_attempts: 3,
    };
    let stop = CancellationToken::new();
    tokio::spawn(sweeper.run(Duration::from_millis(50), stop.clone()));
    stop
}

/// The stored verification of a repository.
#[derive(Debug, sqlx::FromRow)]
struct Stored {
    name: String,
    verified_at: Option<DateTime<Utc>>,
    drift_count: Option<i32>,
}

async fn stored(db: &PgPool) -> Vec<Stored> {
    sqlx::query_as("SELECT name, verified_at, drift_count FROM backup_repositories ORDER BY name")
        .fetch_all(db)
        .await
        .expect("repositories")
}

/// Waits until every repository holds a verification and no verify job is active.
async fn wait_all_verified(db: &PgPool, deadline: Duration) -> Vec<Stored> {
    eventually(deadline, "every repository verified", || async {
        let active: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE kind = 'verify-repository'
                AND state IN ('queued', 'running')",
        )
        .fetch_one(db)
        .await
        .expect("active");
        let rows = stored(db).await;
        (active == 0 && rows.iter().all(|r| r.verified_at.is_some())).then_some(rows)
    })
    .await
}

/// The verify jobs: (repository, created, finished, state, created_by), oldest first.
type VerifyJob = (String, DateTime<Utc>, Option<DateTime<Utc>>, String, String);

async fn verify_jobs(db: &PgPool) -> Vec<VerifyJob> {
    sqlx::query_as(
        "SELECT subject_name, created_at, finished_at, state, created_by FROM jobs
          WHERE kind = 'verify-repository' ORDER BY created_at",
    )
    .fetch_all(db)
    .await
    .expect("verify jobs")
}

/// The most verify jobs queued or running at one time (from their creation to their end; one
/// that ended when another was created does not overlap it).
fn most_at_once(jobs: &[VerifyJob]) -> usize {
    let mut events: Vec<(DateTime<Utc>, i32)> = Vec::new();
    for (_, created, finished, _, _) in jobs {
        events.push((*created, 1));
        events.push((finished.expect("finished"), -1));
    }
    events.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, change) in events {
        now += change;
        most = most.max(now);
    }
    most as usize
}

/// Five ready repositories, one with drift injected out of band (its public access block
/// removed), concurrency 2: the sweep verifies each once, oldest first, never more than two
/// at a time, stores verified_at and the drift, audits what it queued, and /metrics shows the
/// drift.
#[tokio::test]
async fn the_sweep_verifies_every_ready_repository_two_at_a_time_oldest_first() {
    let env = Env::builder(&[NAMESPACE]).workers(4).start().await;
    let names = provision_all(&env, "sweep-", 5).await;
    env.admin
        .s3
        .delete_public_access_block()
        .bucket(bucket_for(&names[2]))
        .send()
        .await
        .expect("drift injected");
    make_due(&env.app.db, &names).await;
    let stop = start_sweep(&env, 2);
    let rows = wait_all_verified(&env.app.db, Duration::from_secs(120)).await;
    stop.cancel();
    let jobs = verify_jobs(&env.app.db).await;
    let order: Vec<&str> = jobs.iter().map(|j| j.0.as_str()).collect();
    assert_eq!(
        order, names,
        "one verification each, oldest first: {jobs:?}"
    );
    assert!(
        jobs.iter()
            .all(|j| j.3 == "succeeded" && j.4 == "backup-provisioner"),
        "{jobs:?}"
    );
    assert_eq!(most_at_once(&jobs), 2, "{jobs:?}");
    for row in &rows {
        let drifted = row.name == names[2];
        assert_eq!(row.drift_count.map(|n| n > 0), Some(drifted), "{row:?}");
    }
    assert_sweep_audited(&env, &names).await;
    assert_drift_metrics(&env).await;
    let seconds: f64 = sqlx::query_scalar(
        "SELECT avg(extract(epoch FROM finished_at - started_at))::float8 FROM jobs
          WHERE kind = 'verify-repository'",
    )
    .fetch_one(&env.app.db)
    .await
    .expect("durations");
    eprintln!("one verification against moto, no rate limit: {seconds:.2} s on average");
    env.app.stop().await;
}

async fn assert_sweep_audited(env: &Env, names: &[String]) {
    let audited: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT repository, actor, outcome FROM audit_events WHERE action = 'sweep.verify'
          ORDER BY id",
    )
    .fetch_all(&env.app.db)
    .await
    .expect("audit");
    let expected: Vec<(String, String, String)> = names
        .iter()
        .map(|n| (n.clone(), "backup-provisioner".into(), "queued".into()))
        .collect();
    assert_eq!(audited, expected);
}

/// /metrics: one repository with drift, at least one setting, verifications of this test's age.
async fn assert_drift_metrics(env: &Env) {
    let text = env
        .app
        .get("/metrics", "")
        .await
        .text()
        .await
        .expect("metrics");
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("backup_provisioner_{name} ")))
            .unwrap_or_else(|| panic!("{name} missing from {text}"))
            .parse()
            .expect("number")
    };
    assert_eq!(value("repositories_with_drift"), 1.0, "{text}");
    assert!(value("drift_settings") >= 1.0, "{text}");
    assert_eq!(value("repositories_never_verified"), 0.0, "{text}");
    let age = value("oldest_verification_age_seconds");
    assert!((0.0..600.0).contains(&age), "{text}");
}

/// A ready repository row made directly in the database (no AWS resources: the top-up only
/// reads rows), its last change `hours` ago.
async fn ready_row(db: &PgPool, hours: i32) -> (uuid::Uuid, String) {
    let id = uuid::Uuid::new_v4();
    let name = unique_name("row");
    sqlx::query(
        "INSERT INTO backup_repositories (id, name, namespace, bucket, region, state, created_by,
                                          updated_at)
         VALUES ($1, $2, 'zitadel', $3, 'us-east-1', 'ready', 'test',
                 now() - make_interval(hours => $4))",
    )
    .bind(id)
    .bind(&name)
    .bind(bucket_for(&name))
    .bind(hours)
    .execute(db)
    .await
    .expect("row");
    (id, name)
}

async fn active_verify_jobs(db: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT subject_name FROM jobs WHERE kind = 'verify-repository'
            AND state IN ('queued', 'running') ORDER BY created_at",
    )
    .fetch_all(db)
    .await
    .expect("active")
}

/// Without workers, top-ups fill the free slots only, oldest first; a slot freed is filled by
/// the next one; a repository not ready, verified within the interval, or with another active
/// job is never queued; while another session holds the lock, nothing is done.
#[tokio::test]
async fn top_ups_fill_free_slots_only_oldest_first() {
    let app = crate::support::app::spawn_app().await;
    let db = &app.db;
    let (_, oldest) = ready_row(db, 9).await;
    let (_, second) = ready_row(db, 8).await;
    let (_, third) = ready_row(db, 7).await;
    let (busy_id, _) = ready_row(db, 20).await;
    let (_, not_ready) = ready_row(db, 20).await;
    let (_, fresh) = ready_row(db, 20).await;
    sqlx::query("UPDATE backup_repositories SET state = 'failed' WHERE name = $1")
        .bind(&not_ready)
        .execute(db)
        .await
        .expect("failed");
    sqlx::query("UPDATE backup_repositories SET verified_at = now() - interval '10 minutes' WHERE name = $1")
        .bind(&fresh)
        .execute(db)
        .await
        .expect("verified");
    let busy_job = queue_other_job(db, busy_id).await;
    let sweeper = VerifySweeper {
        db: db.clone(),
        interval: INTERVAL,
        concurrency: 2,
        max_attempts: 3,
    };
    let top_up = || async { sweeper.top_up_once().await.expect("top up") };
    assert_eq!(
        top_up().await,
        TopUp::Queued(vec![oldest.clone(), second.clone()])
    );
    assert_eq!(top_up().await, TopUp::Queued(vec![]));
    finish_verify_of(db, &oldest).await;
    assert_eq!(top_up().await, TopUp::Queued(vec![third.clone()]));
    assert_eq!(active_verify_jobs(db).await, vec![second.clone(), third]);
    finish_verify_of(db, &second).await;
    assert_eq!(top_up().await, TopUp::Queued(vec![]), "busy {busy_job}");
    let mut holder = db.acquire().await.expect("connection");
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(backup_provisioner::provision::verify_sweep::VERIFY_SWEEP_LOCK)
        .execute(&mut *holder)
        .await
        .expect("lock");
    assert_eq!(top_up().await, TopUp::Skipped);
    holder.close().await.expect("close");
    app.stop().await;
}

/// Queues a provisioning job for `id` (its state follows: no longer ready), then sets it back
/// to ready, so only the active job keeps the sweep away.
async fn queue_other_job(db: &PgPool, id: uuid::Uuid) -> uuid::Uuid {
    let job = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO jobs (id, kind, subject_id, subject_name, payload, created_by, run_at)
         VALUES ($1, 'provision-repository', $2, 'busy', '{}', 'test', now() + interval '1 day')",
    )
    .bind(job)
    .bind(id)
    .execute(db)
    .await
    .expect("job");
    sqlx::query("UPDATE backup_repositories SET state = 'ready' WHERE id = $1")
        .bind(id)
        .execute(db)
        .await
        .expect("ready");
    job
}

/// Ends the active verify job of `name` as a worker would (verified now).
async fn finish_verify_of(db: &PgPool, name: &str) {
    sqlx::query(
        "UPDATE jobs SET state = 'succeeded', finished_at = now()
          WHERE kind = 'verify-repository' AND subject_name = $1 AND state = 'queued'",
    )
    .bind(name)
    .execute(db)
    .await
    .expect("finish");
    sqlx::query("UPDATE backup_repositories SET verified_at = now() WHERE name = $1")
        .bind(name)
        .execute(db)
        .await
        .expect("verified");
}

/// Measures (ignored in CI; `cargo test --test api sweep_pace -- --ignored --nocapture`): 12
/// repositories verified by the sweep at the default rate and concurrency, against the rate
/// bound (requests / rate), for the README's figure of 1,000 repositories.
#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn sweep_pace_at_the_default_rate() {
    use backup_provisioner::cloud::rate_limit::DEFAULT_AWS_MAX_RPS;
    let env = Env::builder(&[NAMESPACE])
        .workers(4)
        .aws_realism(AwsRealism::off())
        .map_service_aws(|aws| aws.with_rate_limit(&AwsRateLimit::per_second(DEFAULT_AWS_MAX_RPS)))
        .start()
        .await;
    let proxy = env.realism.as_ref().expect("proxy");
    let names = provision_all(&env, "pace-", 12).await;
    proxy.reset_counts();
    make_due(&env.app.db, &names).await;
    let started = std::time::Instant::now();
    let stop = start_sweep(&env, 4);
    wait_all_verified(&env.app.db, Duration::from_secs(300)).await;
    stop.cancel();
    let (total, elapsed) = (proxy.total(), started.elapsed());
    let bound = total as f64 / f64::from(DEFAULT_AWS_MAX_RPS);
    eprintln!(
        "12 verifications at {DEFAULT_AWS_MAX_RPS}/s, 4 at once: {total} requests in {elapsed:?} \
         (rate bound {bound:.1} s, busiest second {})",
        proxy.busiest(Duration::from_secs(1))
    );
    env.app.stop().await;
}

/// Bad values of the settings stop the worker with exit code 2 and one line naming them.
#[test]
fn bad_verify_and_rate_settings_exit_2_naming_the_variable() {
    use backup_provisioner::crypto::EncryptionKey;
    for (variable, value) in [
        ("BP_VERIFY_CONCURRENCY", "0"),
        ("BP_VERIFY_CONCURRENCY", "-1"),
        ("BP_VERIFY_INTERVAL", "sometimes"),
        ("BP_AWS_MAX_RPS", "-5"),
        ("BP_AWS_MAX_RPS", "fast"),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_backup-provisioner"))
            .arg("worker")
            .env_clear()
            .env("RUST_LOG", "off")
            .env(
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
            )
            .env("BP_ENCRYPTION_KEY", EncryptionKey::generate_base64())
            .env(variable, value)
            .output()
            .expect("run backup-provisioner");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{variable}={value}: {stderr}"
        );
        assert!(stderr.contains(variable), "{variable}={value}: {stderr}");
    }
}
