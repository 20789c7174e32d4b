//! Backup freshness (`provision::freshness`) against moto: objects laid out as pgBackRest lays
//! them out, put into a provisioned repository's prefix in two batches a clock second apart
//! (moto dates an object when it is put, to the second), then a check: the newest *completed*
//! backup (its `backup.manifest`, not a running backup's `backup.manifest.copy`), the newest
//! *full* backup (label `…F`), the newest WAL (in the newest PostgreSQL version's archive),
//! nothing from outside the repository's prefix; stored, shown on GET, exported on /metrics.
//! A check that fails keeps what was found and says why; only the lock holder checks; a
//! repository checked within the interval, or not ready, is not checked.

use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use backup_provisioner::cloud::rate_limit::{AwsRateLimit, burst_for};
use backup_provisioner::provision::freshness::{
    FRESHNESS_LOCK, Found, FreshnessChecker, Refresh, key_prefix,
};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::support::app::eventually;
use crate::support::aws_realism::AwsRealism;
use crate::support::env::{Env, unique_name};
use crate::support::moto::{Moto, clients_at};

const NAMESPACE: &str = "zitadel";

/// A checker of every ready repository of `env`'s database, as the service's identity would
/// (the admin clients: moto's default credentials).
pub fn checker(env: &Env, interval: Duration) -> FreshnessChecker {
    FreshnessChecker {
        db: env.app.db.clone(),
        aws: env.admin.clone(),
        interval,
        concurrency: 2,
    }
}

/// One round that must have run (no other replica holds the lock in the tests).
pub async fn refresh(
    checker: &FreshnessChecker,
) -> Vec<backup_provisioner::provision::freshness::Checked> {
    match checker.refresh_once().await.expect("freshness round") {
        Refresh::Checked(checked) => checked,
        Refresh::Skipped => panic!("the freshness lock is free in the tests"),
    }
}

/// The value of the series `metric{repository="<repository>",…}` in /metrics, if present.
pub async fn metric(env: &Env, metric: &str, repository: &str) -> Option<f64> {
    let text = env
        .app
        .get("/metrics", "")
        .await
        .text()
        .await
        .expect("metrics");
    let wanted = format!("backup_provisioner_{metric}{{");
    let label = format!("repository=\"{repository}\"");
    text.lines()
        .find(|l| l.starts_with(&wanted) && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn put(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) {
    s3.put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from_static(b"Salted__"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e:?}"));
}

/// moto's LastModified of `key` (to the second).
async fn modified(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) -> DateTime<Utc> {
    let head = s3
        .head_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("head {key}: {e:?}"));
    let at = head.last_modified().expect("LastModified");
    DateTime::from_timestamp(at.secs(), at.subsec_nanos()).expect("date")
}

/// Waits until the clock is in a later second than `after`, so that the next object put is
/// dated after it.
async fn next_second(after: DateTime<Utc>) {
    eventually(
        Duration::from_secs(5),
        "the next clock second",
        || async move { (Utc::now().timestamp() > after.timestamp()).then_some(()) },
    )
    .await;
}

fn date(view: &Value, field: &str) -> Option<DateTime<Utc>> {
    view["freshness"][field]
        .as_str()
        .map(|s| s.parse().expect("RFC 3339"))
}

#[tokio::test]
async fn a_check_dates_completed_backups_full_backups_and_wal_as_pgbackrest_lays_them_out() {
    let env = Env::start(&[NAMESPACE]).await;
    let name = unique_name("fresh");
    let ns = env.ns(NAMESPACE).to_owned();
    let job = env.provision(json!({"name": name, "namespace": ns})).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let bucket = env.repository(&name).await["bucket"]
        .as_str()
        .expect("bucket")
        .to_owned();
    let check = checker(&env, Duration::ZERO);

    // Nothing backed up yet: checked, nothing found, no age series.
    let checked = refresh(&check).await;
    assert_eq!(checked.len(), 1, "{checked:?}");
    assert_eq!(checked[0].repository, name);
    assert_eq!(checked[0].outcome, Ok(Found::default()));
    let view = env.repository(&name).await;
    assert!(view["freshness"]["checked_at"].is_string(), "{view:#}");
    assert!(view["freshness"]["newest_backup_at"].is_null(), "{view:#}");
    assert!(view["freshness"]["error"].is_null(), "{view:#}");
    assert!(
        metric(&env, "freshness_checked_age_seconds", &name)
            .await
            .is_some()
    );
    assert_eq!(metric(&env, "newest_backup_age_seconds", &name).await, None);
    assert_eq!(
        metric(&env, "freshness_check_failing", &name).await,
        Some(0.0)
    );

    let s3 = env.admin.s3_for_region(&env.region);
    let p = key_prefix(&ns, &name);
    let wal = "0123456789abcdef0123456789abcdef01234567.gz";
    let full_manifest = format!("{p}backup/db/20261201-010000F/backup.manifest");
    for key in [
        format!("{p}backup/db/backup.info"),
        full_manifest.clone(),
        format!("{p}backup/db/20261201-010000F/pg_data/PG_VERSION.gz"),
        format!("{p}archive/db/archive.info"),
        format!("{p}archive/db/15-1/0000000100000000/000000010000000000000001-{wal}"),
    ] {
        put(&s3, &bucket, &key).await;
    }
    next_second(modified(&s3, &bucket, &full_manifest).await).await;
    let diff_manifest = format!("{p}backup/db/20261201-010000F_20261202-010000D/backup.manifest");
    let newest_segment =
        format!("{p}archive/db/15-1/0000000100000000/000000010000000000000002-{wal}");
    for key in [
        diff_manifest.clone(),
        // A full backup still running: only the manifest's copy exists.
        format!("{p}backup/db/20261203-010000F/backup.manifest.copy"),
        format!("{p}backup/db/backup.info"),
        newest_segment.clone(),
        // The archive of an older PostgreSQL version (before a stanza-upgrade).
        format!("{p}archive/db/9.6-0/0000000100000000/000000010000000000000009-{wal}"),
        // Another repository's backup, and another repo of this cluster, in the same bucket.
        format!("pgbackrest/{ns}/other/repo2/backup/db/20261204-010000F/backup.manifest"),
        format!("pgbackrest/{ns}/{name}/repo3/backup/db/20261204-010000F/backup.manifest"),
    ] {
        put(&s3, &bucket, &key).await;
    }

    let expected = Found {
        newest_backup_at: Some(modified(&s3, &bucket, &diff_manifest).await),
        newest_full_backup_at: Some(modified(&s3, &bucket, &full_manifest).await),
        newest_wal_at: Some(modified(&s3, &bucket, &newest_segment).await),
    };
    assert!(expected.newest_full_backup_at < expected.newest_backup_at);
    let checked = refresh(&check).await;
    assert_eq!(checked[0].outcome, Ok(expected), "{checked:?}");
    let view = env.repository(&name).await;
    assert_eq!(date(&view, "newest_backup_at"), expected.newest_backup_at);
    assert_eq!(
        date(&view, "newest_full_backup_at"),
        expected.newest_full_backup_at
    );
    // The listing carries the same.
    let page: Value = env
        .app
        .get("/v1/backup-repositories", &env.app.viewer())
        .await
        .json()
        .await
        .expect("page");
    let listed = page["items"]
        .as_array()
        .and_then(|items| items.iter().find(|i| i["name"] == name.as_str()))
        .expect("listed");
    assert_eq!(listed["freshness"], view["freshness"], "{page:#}");
    assert_eq!(date(&view, "newest_wal_at"), expected.newest_wal_at);
    for gauge in [
        "newest_backup_age_seconds",
        "newest_full_backup_age_seconds",
        "newest_wal_age_seconds",
    ] {
        let age = metric(&env, gauge, &name).await;
        assert!(age.is_some_and(|a| a >= 0.0), "{gauge}: {age:?}");
    }
    assert!(
        metric(&env, "newest_full_backup_age_seconds", &name).await
            > metric(&env, "newest_backup_age_seconds", &name).await
    );

    // A check that cannot reach S3 keeps the dates and says why.
    let unreachable = FreshnessChecker {
        aws: clients_at("http://127.0.0.1:9", &env.region, None, "AKIAX", "secret").await,
        ..check.clone()
    };
    let checked = refresh(&unreachable).await;
    assert!(checked[0].outcome.is_err(), "{checked:?}");
    let view = env.repository(&name).await;
    assert!(
        view["freshness"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("ListObjectsV2")),
        "{view:#}"
    );
    assert_eq!(date(&view, "newest_backup_at"), expected.newest_backup_at);
    assert_eq!(
        metric(&env, "freshness_check_failing", &name).await,
        Some(1.0)
    );
    assert!(
        metric(&env, "newest_wal_age_seconds", &name)
            .await
            .is_some()
    );

    // Checked just now: not due again within the interval.
    let hourly = checker(&env, Duration::from_secs(3600));
    assert_eq!(refresh(&hourly).await, vec![]);
    env.app.stop().await;
}

#[tokio::test]
async fn only_the_lock_holder_checks_and_only_ready_repositories() {
    let env = Env::builder(&[NAMESPACE]).workers(0).start().await;
    let name = unique_name("pending");
    let response = env
        .app
        .post_json(
            "/v1/backup-repositories",
            &env.app.operator(),
            &json!({"name": name, "namespace": env.ns(NAMESPACE)}),
        )
        .await;
    assert_eq!(response.status(), 202);
    let check = checker(&env, Duration::ZERO);
    // Pending (no workers): not checked, no freshness shown, no series.
    assert_eq!(refresh(&check).await, vec![]);
    assert!(env.repository(&name).await.get("freshness").is_none());
    assert_eq!(metric(&env, "freshness_check_failing", &name).await, None);

    let mut holder = env.app.db.acquire().await.expect("connection");
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(FRESHNESS_LOCK)
        .execute(&mut *holder)
        .await
        .expect("lock");
    assert_eq!(check.refresh_once().await.expect("round"), Refresh::Skipped);
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(FRESHNESS_LOCK)
        .execute(&mut *holder)
        .await
        .expect("unlock");
    assert_eq!(
        check.refresh_once().await.expect("round"),
        Refresh::Checked(vec![])
    );
    env.app.stop().await;
}

/// Under 5 requests a second (the process-wide limiter every AWS client of the service
/// carries), a round checking three repositories at once sends only ListObjectsV2, a few per
/// repository (counted at the AWS proxy), and never more in any second than the rate plus the
/// limiter's burst (plus one for a request's arrival jitter, as in `verify_sweep`).
#[tokio::test]
async fn a_round_only_lists_and_stays_under_the_aws_rate_limit() {
    const RPS: u32 = 5;
    let env = Env::start(&[NAMESPACE]).await;
    let ns = env.ns(NAMESPACE).to_owned();
    let s3 = env.admin.s3_for_region(&env.region);
    let mut names = Vec::new();
    for _ in 0..3 {
        let name = unique_name("paced");
        let job = env.provision(json!({"name": name, "namespace": ns})).await;
        assert_eq!(job["state"], "succeeded", "{job:#}");
        let bucket = env.repository(&name).await["bucket"]
            .as_str()
            .expect("bucket")
            .to_owned();
        let p = key_prefix(&ns, &name);
        for key in [
            "backup/db/20261201-010000F/backup.manifest",
            "backup/db/20261201-010000F_20261202-010000D/backup.manifest",
            "archive/db/15-1/0000000100000000/000000010000000000000001-ab.gz",
        ] {
            put(&s3, &bucket, &format!("{p}{key}")).await;
        }
        names.push(name);
    }
    let proxy = AwsRealism::off().start(Moto::shared());
    let limit = AwsRateLimit::per_second(RPS);
    let paced = FreshnessChecker {
        aws: proxy
            .reroute(Moto::shared().clients(&env.region, None).await)
            .with_rate_limit(&limit),
        concurrency: 3,
        ..checker(&env, Duration::ZERO)
    };
    let checked = refresh(&paced).await;
    assert_eq!(checked.len(), 3, "{checked:?}");
    for one in &checked {
        let found = one.outcome.as_ref().expect("checked");
        assert!(found.newest_backup_at.is_some() && found.newest_full_backup_at.is_some());
        assert!(found.newest_wal_at.is_some(), "{found:?}");
    }
    let calls = proxy.calls();
    assert_eq!(
        calls.keys().collect::<Vec<_>>(),
        ["s3:ListObjectsV2"],
        "{calls:?}"
    );
    assert_eq!(proxy.mutating_count(), 0);
    let rate = std::num::NonZeroU32::new(RPS).expect("rate");
    let most = (RPS + burst_for(rate).get() + 1) as usize;
    let busiest = proxy.busiest(Duration::from_secs(1));
    eprintln!(
        "freshness: {} requests for 3 repositories, busiest second {busiest} (at most {most})",
        proxy.total()
    );
    assert!(busiest <= most, "{busiest} requests in one second");
    env.app.stop().await;
}
