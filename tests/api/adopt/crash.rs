//! Crash safety of adoption with repair: a real worker process is killed with SIGKILL right
//! after the `repair` step's changes, or right after the `secret` step rewrote the Secret, and
//! before either records success. A fresh worker then finishes the job once the dead worker's
//! lease expires: the repository ends `ready`, the Secret holds the hand-made key and cipher
//! pass byte for byte, the user still has only the hand-made key, and every step has one
//! success audit entry.

use std::time::Duration;

use backup_provisioner::cloud::aws::CallCounter;
use backup_provisioner::jobs::{Job, Registry, WorkerConfig, WorkerPool, queue};
use backup_provisioner::provision::adopt::Adopter;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::runbook_by_hand::{HandMade, aws_by_hand, create_secret};
use super::{
    conf_values, made_values, pgo_s3_conf, public_access_block_exists, public_access_block_off,
};
use crate::support::app::eventually;
use crate::support::crash_child::{self, ChildSpec};
use crate::support::env::{Env, bucket_for, unique_name};
use crate::support::moto::Moto;

/// The entry test the crash child runs (it registers the adoption kind too).
const CHILD_TEST: &str = "crash_safety::crash_child_worker";
const DEADLINE: Duration = Duration::from_secs(90);
const SECRET: &str = "pgo-s3-creds";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_the_repair_then_recovery() {
    crash_and_recover("repair").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_the_secret_rewrite_then_recovery() {
    crash_and_recover("secret").await;
}

/// A hand-made set (public access block off, the Secret in PGO's layout under another name),
/// its adoption with repair queued on an API without workers: the repository's name, what was
/// made by hand, the job.
async fn queue_adoption(env: &Env) -> (String, HandMade, Uuid) {
    let name = unique_name("adoptc");
    let bucket = bucket_for(&name);
    let made = aws_by_hand(env, &bucket).await;
    public_access_block_off(env, &bucket).await;
    create_secret(env, "zitadel", SECRET, &[("s3.conf", &pgo_s3_conf(&made))]).await;
    let body = json!({
        "name": name, "namespace": env.ns("zitadel"),
        "adopt": true, "secret_name": SECRET, "repair": true,
    });
    let response = env
        .app
        .post_json("/v1/backup-repositories", &env.app.operator(), &body)
        .await;
    assert_eq!(response.status(), 202);
    let created: serde_json::Value = response.json().await.unwrap();
    let job_id = Uuid::parse_str(created["job"]["id"].as_str().unwrap()).unwrap();
    (name, made, job_id)
}

async fn crash_and_recover(step: &str) {
    let env = Env::builder(&["zitadel"]).workers(0).start().await;
    let (name, made, job_id) = queue_adoption(&env).await;
    let bucket = bucket_for(&name);
    let spec = ChildSpec {
        database_url: env.app.database_url.clone(),
        moto_endpoint: env.moto_endpoint.clone(),
        region: env.region.clone(),
        kube_url: env.kube.proxy.url.clone(),
        kube_ca_pem: env.kube.server.ca_pem.clone(),
        kube_token: env.kube.service_token.clone(),
        encryption_key: env.encryption_key.clone(),
        kill_at: format!("{step}:before-record"),
        worker_id: "adopt-crash-child".to_owned(),
    };
    crash_child::spawn(CHILD_TEST, &spec)
        .expect_sigkill(DEADLINE)
        .await;
    assert!(
        public_access_block_exists(&env, &bucket).await,
        "repaired before the kill"
    );
    if step == "secret" {
        let conf = env
            .s3_conf("zitadel", SECRET)
            .await
            .expect("rewritten before the kill");
        assert_eq!(conf_values(&conf), made_values(&made));
    }

    let job = recover(&env, job_id).await;
    assert_eq!(
        job.state, "succeeded",
        "the rescued job failed: {:?}",
        job.last_error
    );
    assert_eq!(job.attempts, 2, "the killed worker, then the rescuer");
    assert_eq!(env.repository(&name).await["state"], "ready");
    let conf = env.s3_conf("zitadel", SECRET).await.expect("s3.conf");
    assert_eq!(conf_values(&conf), made_values(&made), "byte for byte");
    let keys = env
        .admin
        .iam
        .list_access_keys()
        .user_name(&bucket)
        .send()
        .await
        .unwrap();
    let ids: Vec<_> = keys
        .access_key_metadata()
        .iter()
        .filter_map(|k| k.access_key_id())
        .collect();
    assert_eq!(ids, [made.access_key_id.as_str()], "only the hand-made key");
    assert_one_success_per_step(&env, job_id).await;
    env.app.stop().await;
}

/// An in-process worker (the service's identity) finishes the job after the lease expires.
async fn recover(env: &Env, job_id: Uuid) -> Job {
    let provisioner = env.provisioner(Moto::shared(), CallCounter::new()).await;
    let registry = Registry::new().register(Adopter::like(&provisioner));
    let config = WorkerConfig {
        concurrency: 1,
        lease: Duration::from_secs(5),
        poll_interval: Duration::from_millis(100),
        retry_base: Duration::from_millis(50),
        shutdown_grace: Duration::from_secs(5),
        worker_id: "rescuer".to_owned(),
    };
    let shutdown = CancellationToken::new();
    let pool = WorkerPool::new(env.app.db.clone(), registry, config);
    let workers = tokio::spawn(pool.run(shutdown.clone()));
    let job = eventually(DEADLINE, "the rescued job to end", || async {
        let job = queue::get(&env.app.db, job_id).await.unwrap().expect("job");
        job.state().is_terminal().then_some(job)
    })
    .await;
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(30), workers).await;
    stopped
        .expect("the rescuer stopped")
        .expect("no panic")
        .expect("no database error");
    job
}

/// Every step that ran has exactly one success entry, and no (step, attempt, action) twice.
async fn assert_one_success_per_step(env: &Env, job_id: Uuid) {
    let rows: Vec<(Option<String>, Option<i32>, String, String)> = sqlx::query_as(
        "SELECT step, attempt, action, outcome FROM audit_events WHERE job_id = $1 ORDER BY id",
    )
    .bind(job_id)
    .fetch_all(&env.app.db)
    .await
    .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for row in &rows {
        assert!(
            seen.insert(row.clone()),
            "duplicate audit entry {row:?} in {rows:#?}"
        );
    }
    let steps = [
        "found_secret",
        "inspect",
        "access_key_in_iam",
        "credential_check",
        "repair",
        "secret",
    ];
    for step in steps {
        let successes = rows
            .iter()
            .filter(|(s, _, _, outcome)| s.as_deref() == Some(step) && outcome != "failed")
            .count();
        assert_eq!(successes, 1, "{step}: {rows:#?}");
    }
}
