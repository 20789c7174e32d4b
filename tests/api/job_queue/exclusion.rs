//! Each job runs on one worker at a time: concurrent pools, a SIGKILLed worker's job rescued,
//! and one active job per repository.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::support::app::{TestDb, eventually};
use crate::support::test_jobs::{self as tj, StepSpec};

use super::{DEADLINE, locked_by, setup, step_row};

// ---------------------------------------------------------------------------------------------
// Mutual exclusion and crash recovery
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_worker_pools_run_each_job_exactly_once() {
    let TestDb {
        pool: db,
        url,
        guard: _guard,
    } = setup().await;
    const JOBS: usize = 90;
    let mut ids = Vec::new();
    for _ in 0..JOBS {
        ids.push(
            tj::enqueue(
                &db,
                vec![StepSpec::new("work").sleep_ms(10), StepSpec::new("more")],
                3,
            )
            .await,
        );
    }
    let pools = futures::future::join_all(
        ["w1", "w2", "w3"].map(|w| tj::start_pool(&url, tj::worker_config(w, 3))),
    )
    .await;
    eventually(DEADLINE, "every job to succeed", || async {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'succeeded'")
            .fetch_one(&db)
            .await
            .unwrap();
        (done == JOBS as i64).then_some(())
    })
    .await;
    for pool in pools {
        pool.stop().await;
    }

    // Each job: one claim, one run of the handler, one execution of each step.
    let attempts: Vec<i32> = sqlx::query_scalar("SELECT attempts FROM jobs")
        .fetch_all(&db)
        .await
        .unwrap();
    assert!(
        attempts.iter().all(|&a| a == 1),
        "every job claimed once: {attempts:?}"
    );
    let runs_per_job: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT job_id, count(*) FROM test_job_runs GROUP BY job_id")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(runs_per_job.len(), JOBS);
    assert!(
        runs_per_job.iter().all(|(_, n)| *n == 1),
        "a job ran more than once: {runs_per_job:?}"
    );
    let step_runs: i64 = sqlx::query_scalar("SELECT count(*) FROM test_job_step_runs")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(step_runs, 2 * JOBS as i64);

    // No two runs of the same job ever overlapped in time (open-ended runs count as endless).
    let overlaps: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM test_job_runs a JOIN test_job_runs b ON a.job_id = b.job_id AND a.id < b.id
          WHERE tstzrange(a.started_at, coalesce(a.ended_at, 'infinity'))
             && tstzrange(b.started_at, coalesce(b.ended_at, 'infinity'))",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(overlaps, 0);
    let unfinished: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM test_job_runs WHERE ended_at IS NULL OR outcome <> 'ok'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(unfinished, 0);

    // The pools really competed for the same queue.
    let workers: i64 = sqlx::query_scalar("SELECT count(DISTINCT worker) FROM test_job_runs")
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(workers >= 2, "only {workers} pool(s) ran jobs");
}

const CHILD_TEST: &str = "job_queue::exclusion::sigkill_child_worker_process";
const CHILD_DATABASE_ENV: &str = "BP_TEST_CHILD_DATABASE_URL";
const CHILD_WORKER: &str = "child";

/// Not a test on its own: the worker process that `job_of_a_sigkilled_worker_is_rescued`
/// starts (this same test binary, run with `--exact --ignored`) and then kills with SIGKILL.
#[tokio::test]
#[ignore = "child process of job_of_a_sigkilled_worker_is_rescued; does nothing when run directly"]
async fn sigkill_child_worker_process() {
    let Ok(url) = std::env::var(CHILD_DATABASE_ENV) else {
        eprintln!(
            "{CHILD_DATABASE_ENV} is not set: this test only runs as a child of another test"
        );
        return;
    };
    let mut config = tj::worker_config(CHILD_WORKER, 1);
    config.lease = Duration::from_secs(2);
    let pool = tj::start_pool(&url, config).await;
    eprintln!("child worker running");
    // The parent kills this process; the cap only matters if the parent dies first.
    tokio::time::sleep(Duration::from_secs(120)).await;
    pool.stop().await;
}

#[tokio::test]
async fn job_of_a_sigkilled_worker_is_rescued() {
    use std::os::unix::process::ExitStatusExt;

    let TestDb {
        pool: db,
        url,
        guard: _guard,
    } = setup().await;
    let id = tj::enqueue(
        &db,
        vec![
            StepSpec::new("prepare"),
            StepSpec::new("hold").wait_for("release"),
        ],
        5,
    )
    .await;

    let log = tempfile::NamedTempFile::new().unwrap();
    let out = log.reopen().unwrap();
    let err = out.try_clone().unwrap();
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([CHILD_TEST, "--exact", "--ignored", "--nocapture"])
        .env(CHILD_DATABASE_ENV, &url)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the child worker");
    let child_log = || std::fs::read_to_string(log.path()).unwrap_or_default();

    // Wait until the child is inside step "hold" (it finished "prepare" and recorded it).
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    while tj::step_executions(&db, id, "hold").await == 0 {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "child worker exited early ({status}); its output:\n{}",
                child_log()
            );
        }
        assert!(
            tokio::time::Instant::now() < until,
            "child never started the job; its output:\n{}",
            child_log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let running = tj::job(&db, id).await;
    assert_eq!((running.state.as_str(), running.attempts), ("running", 1));
    assert_eq!(locked_by(&db, id).await.as_deref(), Some(CHILD_WORKER));

    let pid = nix::unistd::Pid::from_raw(child.id().expect("child pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("SIGKILL the child");
    let status = child.wait().await.unwrap();
    assert_eq!(
        status.signal(),
        Some(nix::sys::signal::Signal::SIGKILL as i32),
        "child died of SIGKILL"
    );

    // The dead worker still holds the lease: nothing released it.
    assert_eq!(tj::job(&db, id).await.state, "running");

    tj::set_flag(&db, "release").await;
    let mut config = tj::worker_config("rescuer", 1);
    config.lease = Duration::from_secs(2);
    let rescuer = tj::start_pool(&url, config).await;
    let done = tj::wait_for_job(&db, id, DEADLINE, "the rescued job to end", |j| {
        j.state().is_terminal()
    })
    .await;
    rescuer.stop().await;

    assert_eq!(done.state, "succeeded", "last error: {:?}", done.last_error);
    assert_eq!(done.attempts, 2);
    // It resumed: "prepare" ran only in the child, "hold" ran again in the rescuer.
    assert_eq!(tj::step_executions(&db, id, "prepare").await, 1);
    assert_eq!(tj::step_executions(&db, id, "hold").await, 2);
    assert_eq!(step_row(&db, id, "prepare").await.unwrap().attempts, 1);
    assert_eq!(step_row(&db, id, "hold").await.unwrap().attempts, 2);
    let runs = tj::runs(&db, id).await;
    assert_eq!(runs.len(), 2);
    assert_eq!(
        (runs[0].worker.as_str(), runs[0].ended_at),
        (CHILD_WORKER, None)
    );
    assert_eq!(
        (
            runs[1].worker.as_str(),
            runs[1].attempt,
            runs[1].outcome.as_deref()
        ),
        ("rescuer", 2, Some("ok"))
    );
}

// ---------------------------------------------------------------------------------------------
// One active job per repository
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_enqueues_for_one_repository_leave_one_active_job() {
    let TestDb {
        pool: db,
        url,
        guard: _guard,
    } = setup().await;
    let repo = tj::insert_repository(&db, "contended").await;
    const N: usize = 50;
    let start = Arc::new(tokio::sync::Barrier::new(N));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let (db, start) = (db.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                let step = StepSpec::new(&format!("from-{i}"));
                tj::enqueue_for(&db, vec![step], 5, Some((repo, "contended"))).await
            })
        })
        .collect();
    let mut accepted = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(id) => accepted.push(id),
            Err(e) => assert_eq!(
                backup_provisioner::db::violated_constraint(&e),
                Some("jobs_one_active_per_subject"),
                "unexpected error: {e}"
            ),
        }
    }
    assert_eq!(accepted.len(), 1, "exactly one enqueue wins");
    let jobs: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, state FROM jobs WHERE subject_id = $1")
            .bind(repo)
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(jobs, vec![(accepted[0], "queued".to_owned())]);

    // The constraint covers active jobs only: once the job ends, a new one may be queued.
    let pool = tj::start_pool(&url, tj::worker_config("w", 1)).await;
    tj::wait_for_state(&db, accepted[0], "succeeded", DEADLINE).await;
    pool.stop().await;
    let next = tj::enqueue_for(
        &db,
        vec![StepSpec::new("again")],
        5,
        Some((repo, "contended")),
    )
    .await;
    assert!(next.is_ok(), "{next:?}");
}
