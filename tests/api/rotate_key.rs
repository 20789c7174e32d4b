//! Access key rotation without downtime (issue 10, item 3), end to end through the API: moto for
//! S3/IAM (which records each key's last use, so a consumer that did not move is a real use of
//! the old key), the real kube-apiserver for the Secret, real workers, and the key schedule
//! (`provision::key_schedule`) run round by round by the test. Grace periods are seconds here.

use std::time::Duration;

use backup_provisioner::crypto::EncryptionKey;
use backup_provisioner::provision::access_key::{self, KeyInfo};
use backup_provisioner::provision::key_schedule::KeySchedule;
use backup_provisioner::provision::sweep::{Sweeper, Swept};
use backup_provisioner::provision::user;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::app::eventually;
use crate::support::aws_realism::AwsRealism;
use crate::support::env::{Env, bucket_for, conf_value, unique_name};

const NS: &str = "rotate";
const GRACE: Duration = Duration::from_secs(3);
const DEADLINE: Duration = Duration::from_secs(60);

/// An environment whose rotations keep the old key active for [`GRACE`], then inactive for
/// [`GRACE`].
async fn env_with_short_grace() -> Env {
    Env::builder(&[NS])
        .map_worker(|w| {
            w.key_rotation.key_grace = GRACE;
            w.key_rotation.key_delete_grace = GRACE;
        })
        .start()
        .await
}

/// A ready repository; returns its name, bucket and s3.conf.
async fn ready_repository(env: &Env, prefix: &str) -> (String, String, String) {
    let name = unique_name(prefix);
    let bucket = bucket_for(&name);
    let job = env
        .provision(json!({"name": name, "namespace": env.ns(NS)}))
        .await;
    assert_eq!(job["state"], "succeeded", "provisioning: {job:#}");
    let conf = env.s3_conf(NS, &bucket).await.expect("s3.conf");
    (name, bucket, conf)
}

/// `POST .../rotate-key` (with `query`) as an operator.
async fn post_rotate(env: &Env, name: &str, query: &str) -> (u16, Value) {
    let path = format!("/v1/backup-repositories/{name}/rotate-key{query}");
    let response = env
        .app
        .post_json(&path, &env.app.operator(), &json!({}))
        .await;
    let status = response.status().as_u16();
    let location = response.headers().get("location").cloned();
    let body: Value = response.json().await.expect("json");
    if status == 202 {
        let expected = format!(
            "/v1/jobs/{}",
            body["job"]["id"].as_str().unwrap_or_default()
        );
        assert_eq!(
            location.as_ref().and_then(|l| l.to_str().ok()),
            Some(expected.as_str())
        );
    }
    (status, body)
}

/// Queues a rotation (202 with `Location`) and waits for its job.
async fn rotate(env: &Env, name: &str) -> Value {
    let (status, body) = post_rotate(env, name, "").await;
    assert_eq!(status, 202, "rotate-key: {body:#}");
    assert_eq!(body["job"]["kind"], "rotate-access-key", "{body:#}");
    let job_id = body["job"]["id"].as_str().expect("job id").to_owned();
    env.app.wait_for_job(&job_id, Duration::from_secs(90)).await
}

async fn keys(env: &Env, bucket: &str) -> Vec<KeyInfo> {
    access_key::list(&env.admin.iam, bucket)
        .await
        .expect("list keys")
}

async fn status_of(env: &Env, bucket: &str, key: &str) -> Option<String> {
    let listed = keys(env, bucket).await;
    listed.into_iter().find(|k| k.id == key).map(|k| k.status)
}

fn schedule(env: &Env, max_age: Option<Duration>) -> KeySchedule {
    KeySchedule {
        db: env.app.db.clone(),
        iam: env.admin.iam.clone(),
        max_age,
        max_attempts: 5,
    }
}

/// Runs schedule rounds until `key` has `status` (`None`: deleted).
async fn schedule_until(env: &Env, bucket: &str, key: &str, status: Option<&str>) {
    let schedule = schedule(env, None);
    let what = format!("access key {key} to be {status:?}");
    eventually(DEADLINE, &what, || async {
        schedule.round().await.expect("schedule round");
        let now = status_of(env, bucket, key).await;
        // ... and the retirement job that made it so has recorded it.
        let active: i64 =
            sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')")
                .fetch_one(&env.app.db)
                .await
                .unwrap();
        (now.as_deref() == status && active == 0).then_some(())
    })
    .await;
}

/// s3.conf without its key lines: what a rotation must leave byte for byte.
fn without_key_lines(conf: &str) -> String {
    conf.lines()
        .filter(|l| !l.contains("-s3-key=") && !l.contains("-s3-key-secret="))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The output of `step` of the latest job of `kind` for repository `name`.
async fn step_output(env: &Env, name: &str, kind: &str, step: &str) -> Value {
    sqlx::query_scalar(
        "SELECT s.output FROM job_steps s JOIN jobs j ON j.id = s.job_id
          WHERE j.subject_name = $1 AND j.kind = $2 AND s.step = $3 AND s.state = 'succeeded'
          ORDER BY j.created_at DESC LIMIT 1",
    )
    .bind(name)
    .bind(kind)
    .bind(step)
    .fetch_optional(&env.app.db)
    .await
    .unwrap()
    .flatten()
    .unwrap_or_else(|| panic!("no succeeded step {kind}.{step} for {name}"))
}

/// Uses the old key against the bucket (a consumer that did not move) until IAM records a use
/// after the Secret changed.
async fn use_old_key(
    env: &Env,
    bucket: &str,
    conf: &str,
    changed_at: chrono::DateTime<chrono::Utc>,
) {
    let (id, secret) = (
        conf_value(conf, "repo2-s3-key"),
        conf_value(conf, "repo2-s3-key-secret"),
    );
    let s3 = env
        .admin
        .s3_with_static_credentials(&env.region, &id, &secret);
    eventually(DEADLINE, "moto to record a use of the old key", || async {
        s3.list_objects_v2()
            .bucket(bucket)
            .send()
            .await
            .expect("list with the old key");
        let used = env
            .admin
            .iam
            .get_access_key_last_used()
            .access_key_id(&id)
            .send()
            .await;
        let at = used
            .ok()?
            .access_key_last_used()?
            .last_used_date()
            .copied()?;
        let at = chrono::DateTime::from_timestamp(at.secs(), at.subsec_nanos())?;
        (at > changed_at).then_some(())
    })
    .await;
}

/// The timeline of one rotation: the Secret moves to a new key with the cipher pass unchanged,
/// the old key stays active through a reconcile during its grace period, is reported as used
/// after the Secret changed, then deactivated, then deleted; the Secret always references an
/// active key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_moves_the_secret_to_a_new_key_and_retires_the_old_one() {
    let env = env_with_short_grace().await;
    let (name, bucket, before) = ready_repository(&env, "rot").await;
    let old = conf_value(&before, "repo2-s3-key");

    let job = rotate(&env, &name).await;
    assert_eq!(job["state"], "succeeded", "rotation: {job:#}");
    let (after, new) = assert_rotated(&env, &name, &bucket, &before).await;

    // A reconcile during the grace period keeps the old key (consumers may still use it).
    let job = env.reconcile(&name).await;
    assert_eq!(job["state"], "succeeded", "reconcile: {job:#}");
    let active = Some("Active");
    assert_eq!(status_of(&env, &bucket, &old).await.as_deref(), active);
    assert_eq!(env.s3_conf(NS, &bucket).await, Some(after.clone()));

    let retirement = deactivate_after_a_late_use(&env, &name, &bucket, &before).await;
    assert_eq!(status_of(&env, &bucket, &new).await.as_deref(), active);

    schedule_until(&env, &bucket, &old, None).await;
    assert_timeline_recorded(&env, retirement).await;
    assert_eq!(env.s3_conf(NS, &bucket).await, Some(after));
    let ids: Vec<String> = keys(&env, &bucket)
        .await
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(ids, vec![new], "only the key the Secret references is left");
    let tags = user::list_tags(&env.admin.iam, &bucket).await.unwrap();
    let old_tag = tags.iter().any(|(k, _)| k == &old);
    assert!(!old_tag, "the old key's description tag: {tags:?}");
    assert_eq!(env.repository(&name).await["state"], "ready");
    env.app.stop().await;
}

/// Right after a rotation: the Secret references a new key (repo2 and repo3), everything else
/// in s3.conf (the cipher pass) is byte for byte as `before`; both keys are active; the new key
/// is recorded, described, and its sealed secret wiped. Returns the s3.conf and the new key.
async fn assert_rotated(env: &Env, name: &str, bucket: &str, before: &str) -> (String, String) {
    let old = conf_value(before, "repo2-s3-key");
    let after = env.s3_conf(NS, bucket).await.expect("s3.conf");
    let new = conf_value(&after, "repo2-s3-key");
    assert_ne!(new, old, "the Secret references a new key");
    assert_eq!(conf_value(&after, "repo3-s3-key"), new);
    let (kept, was) = (without_key_lines(&after), without_key_lines(before));
    assert_eq!(kept, was, "cipher pass and layout");
    let pass = "repo2-cipher-pass";
    assert_eq!(conf_value(&after, pass), conf_value(before, pass));
    for key in [&old, &new] {
        assert_eq!(status_of(env, bucket, key).await.as_deref(), Some("Active"));
    }
    let resources = env.repository(name).await["resources"].clone();
    assert_eq!(resources["access_key_id"], new.as_str());
    let sealed: i64 = sqlx::query_scalar("SELECT count(*) FROM secret_material")
        .fetch_one(&env.app.db)
        .await
        .unwrap();
    assert_eq!(
        sealed, 0,
        "the sealed key secret is wiped once the Secret holds it"
    );
    let tags = user::list_tags(&env.admin.iam, bucket).await.unwrap();
    let described = tags
        .iter()
        .any(|(k, v)| k == &new && v == access_key::DESCRIPTION);
    assert!(described, "{tags:?}");
    (after, new)
}

/// A consumer still on the old key after the Secret changed is reported before the key is
/// deactivated (once its grace passed). Returns the retirement's id.
async fn deactivate_after_a_late_use(env: &Env, name: &str, bucket: &str, before: &str) -> Uuid {
    let old = conf_value(before, "repo2-s3-key");
    let (retirement, changed_at): (Uuid, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT id, secret_changed_at FROM key_retirements WHERE old_key_id = $1")
            .bind(&old)
            .fetch_one(&env.app.db)
            .await
            .expect("the retirement is scheduled");
    use_old_key(env, bucket, before, changed_at).await;
    schedule_until(env, bucket, &old, Some("Inactive")).await;
    let last_used = step_output(env, name, "retire-access-key", "last_used").await;
    assert_eq!(
        last_used["used_after_secret_changed"], true,
        "{last_used:#}"
    );
    let warning = last_used["warning"].as_str().unwrap_or_default();
    assert!(warning.contains("a consumer did not move"), "{last_used:#}");
    assert_consumer_report_audited(env, name).await;
    retirement
}

async fn assert_consumer_report_audited(env: &Env, name: &str) {
    let details: Vec<Value> = sqlx::query_scalar(
        "SELECT detail FROM audit_events WHERE repository = $1
            AND action = 'retire-access-key.last_used'",
    )
    .bind(name)
    .fetch_all(&env.app.db)
    .await
    .unwrap();
    assert!(
        details
            .iter()
            .any(|d| d["used_after_secret_changed"] == true),
        "the audit entry of the last_used step reports the late use: {details:#?}"
    );
}

async fn assert_timeline_recorded(env: &Env, retirement: Uuid) {
    let row: (
        Option<chrono::DateTime<chrono::Utc>>,
        Option<chrono::DateTime<chrono::Utc>>,
        Option<Value>,
    ) = sqlx::query_as(
        "SELECT deactivated_at, deleted_at, last_used FROM key_retirements WHERE id = $1",
    )
    .bind(retirement)
    .fetch_one(&env.app.db)
    .await
    .unwrap();
    let (deactivated, deleted, last_used) = row;
    assert!(
        deactivated.is_some() && deleted.is_some(),
        "{row:?}",
        row = (deactivated, deleted)
    );
    assert!(deleted > deactivated, "deleted after it was deactivated");
    assert!(deleted.unwrap() - deactivated.unwrap() >= chrono::Duration::from_std(GRACE).unwrap());
    assert_eq!(
        last_used.expect("last use recorded")["used_after_secret_changed"],
        true
    );
}

/// IAM allows two keys: a key made by hand (the Secret does not reference it) is deleted to make
/// room; the dry run before says so and changes nothing; the sweep keeps the old key in its
/// grace period; a second rotation meanwhile is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_keys_the_unreferenced_one_is_deleted_first_and_the_dry_run_changes_nothing() {
    let env = env_with_short_grace().await;
    let (name, bucket, before) = ready_repository(&env, "rot2").await;
    let old = conf_value(&before, "repo2-s3-key");
    let iam = &env.admin.iam;
    let by_hand = iam.create_access_key().user_name(&bucket).send().await;
    let by_hand = by_hand
        .unwrap()
        .access_key()
        .unwrap()
        .access_key_id()
        .to_owned();

    assert_dry_run_changes_nothing(&env, &name, &bucket, &by_hand, &old).await;
    assert_eq!(keys(&env, &bucket).await.len(), 2);

    let job = rotate(&env, &name).await;
    assert_eq!(job["state"], "succeeded", "rotation: {job:#}");
    let room = step_output(&env, &name, "rotate-access-key", "make_room").await;
    assert_eq!(room["deleted"], json!([by_hand]), "{room:#}");
    assert_eq!(room["old_key_id"], old.as_str());
    let new = conf_value(&env.s3_conf(NS, &bucket).await.unwrap(), "repo2-s3-key");
    let mut ids: Vec<String> = keys(&env, &bucket)
        .await
        .into_iter()
        .map(|k| k.id)
        .collect();
    ids.sort();
    let mut expected = vec![old.clone(), new];
    expected.sort();
    assert_eq!(
        ids, expected,
        "the hand-made key is gone, the old one stays for its grace"
    );

    assert_the_sweep_keeps(&env, &bucket, &old).await;
    assert_refusals(&env, &name).await;
    env.app.stop().await;
}

/// `?dry_run=true` answers the plan with zero mutating AWS calls, no Kubernetes write and no job.
async fn assert_dry_run_changes_nothing(
    env: &Env,
    name: &str,
    bucket: &str,
    by_hand: &str,
    old: &str,
) {
    env.counter.reset();
    env.kube.clear_requests();
    let jobs_before = job_count(env).await;
    let (status, plan) = post_rotate(env, name, "?dry_run=true").await;
    assert_eq!(status, 200, "dry run: {plan:#}");
    let kind = (plan["dry_run"].clone(), plan["kind"].clone());
    assert_eq!(kind, (json!(true), json!("rotate-access-key")));
    assert_dry_run_plan(&plan["plan"], bucket, by_hand, old);
    let mutating = env.counter.mutating();
    assert_eq!(
        env.counter.mutating_count(),
        0,
        "mutating AWS calls: {mutating:?}"
    );
    let writes = env.kube.mutating_requests();
    assert_eq!(
        env.kube.mutating_count(),
        0,
        "Kubernetes writes: {writes:?}"
    );
    assert_eq!(
        job_count(env).await,
        jobs_before,
        "a dry run queues nothing"
    );
}

/// The sweep of what failed jobs left keeps the old key (neither referenced nor sealed, but in
/// its grace period).
async fn assert_the_sweep_keeps(env: &Env, bucket: &str, old: &str) {
    let sweeper = Sweeper {
        db: env.app.db.clone(),
        iam: env.admin.iam.clone(),
        kube: env.kube.service_client(),
        keys: EncryptionKey::from_base64(&env.encryption_key)
            .unwrap()
            .into(),
        grace: Duration::ZERO,
    };
    let swept = sweeper.sweep_once().await.expect("sweep");
    let looked = matches!(&swept, Swept::Done(report) if report.failed.is_empty());
    assert!(looked, "the sweep looked at the repository: {swept:?}");
    let status = status_of(env, bucket, old).await;
    assert_eq!(status.as_deref(), Some("Active"), "{swept:?}");
}

/// While the old key is active in its grace period another rotation (and its dry run) is 409;
/// an unknown repository 404, a viewer 403; only the one accepted request is audited.
async fn assert_refusals(env: &Env, name: &str) {
    for query in ["", "?dry_run=true"] {
        let (status, problem) = post_rotate(env, name, query).await;
        assert_eq!(status, 409, "{query}: {problem:#}");
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("grace period"), "{problem:#}");
    }
    let (status, _) = post_rotate(env, "no-such-repository", "").await;
    assert_eq!(status, 404);
    let path = format!("/v1/backup-repositories/{name}/rotate-key");
    let viewer = env
        .app
        .post_json(&path, &env.app.viewer(), &json!({}))
        .await;
    assert_eq!(viewer.status(), 403);
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE repository = $1 AND action = 'repository.rotate-key'",
    )
    .bind(name)
    .fetch_one(&env.app.db)
    .await
    .unwrap();
    let why = "one rotation was requested (the dry run and refusals are not audited)";
    assert_eq!(audited, 1, "{why}");
}

async fn job_count(env: &Env) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&env.app.db)
        .await
        .unwrap()
}

/// The plan: the hand-made key deleted, a key created, the Secret updated with the cipher pass
/// unchanged, the old key deactivated then deleted.
fn assert_dry_run_plan(plan: &Value, bucket: &str, by_hand: &str, old: &str) {
    let resources: Vec<(String, String, String)> = plan
        .as_array()
        .expect("a plan is an array")
        .iter()
        .map(|r| {
            let res = &r["resource"];
            let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
            (s(&res["kind"]), s(&res["name"]), s(&res["action"]))
        })
        .collect();
    let key = |id: &str| format!("{bucket}/{id}");
    assert!(
        resources.contains(&("iam-access-key".into(), key(by_hand), "delete".into())),
        "{plan:#}"
    );
    assert!(
        resources.contains(&("iam-access-key".into(), key("(new)"), "create".into())),
        "{plan:#}"
    );
    assert!(
        resources.contains(&("iam-access-key".into(), key(old), "update".into())),
        "{plan:#}"
    );
    let secret = plan
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resource"]["kind"] == "kube-secret")
        .expect("the Secret is in the plan");
    let cipher = secret["settings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["setting"] == "s3.conf cipher pass")
        .expect("the cipher pass setting");
    assert_eq!(
        (cipher["expected"].clone(), cipher["action"].clone()),
        (json!("unchanged"), json!("none"))
    );
}

/// With `BP_KEY_MAX_AGE`, the schedule rotates a key older than that on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_rotates_a_key_older_than_the_maximum_age() {
    let env = env_with_short_grace().await;
    let (name, bucket, before) = ready_repository(&env, "rotage").await;
    let old = conf_value(&before, "repo2-s3-key");
    let young = schedule(&env, Some(Duration::from_secs(3600)));
    let round = young.round().await.expect("round");
    assert!(
        round.rotations.is_empty(),
        "a key younger than the maximum age stays: {round:?}"
    );
    // Once the key is a second old (moto's CreateDate has a resolution of a second), a round
    // with a one-second maximum queues its rotation.
    let aged = schedule(&env, Some(Duration::from_secs(1)));
    let rotated = eventually(DEADLINE, "the schedule to queue a rotation", || async {
        let round = aged.round().await.expect("round");
        (!round.rotations.is_empty()).then_some(round.rotations)
    })
    .await;
    assert_eq!(rotated, vec![name.clone()]);
    let job_id: Uuid = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE subject_name = $1 AND kind = 'rotate-access-key'",
    )
    .bind(&name)
    .fetch_one(&env.app.db)
    .await
    .unwrap();
    let job = env
        .app
        .wait_for_job(&job_id.to_string(), Duration::from_secs(90))
        .await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["created_by"], "backup-provisioner", "{job:#}");
    let after = env.s3_conf(NS, &bucket).await.unwrap();
    assert_ne!(conf_value(&after, "repo2-s3-key"), old);
    // The old key is now in its grace period: no second rotation is queued for it.
    let round = aged.round().await.expect("round");
    assert!(round.rotations.is_empty(), "{round:?}");
    env.app.stop().await;
}

/// Changes the Secret as an administrator would (a merge patch).
async fn patch_secret(env: &Env, bucket: &str, patch: Value) {
    use kube::api::{Patch, PatchParams};
    env.kube
        .secrets(env.ns(NS))
        .patch(bucket, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch the Secret");
}

/// A rotation that fails before the Secret holds its new key (here the Secret was made
/// immutable) deletes that key: left sealed, a later reconcile would deliver it and delete the
/// old key at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_that_cannot_write_the_secret_deletes_its_new_key() {
    let env = env_with_short_grace().await;
    let (name, bucket, before) = ready_repository(&env, "rotfail").await;
    let old = conf_value(&before, "repo2-s3-key");
    patch_secret(&env, &bucket, json!({"immutable": true})).await;

    let job = rotate(&env, &name).await;
    assert_eq!(job["state"], "failed", "{job:#}");
    assert!(
        job["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("immutable"),
        "{job:#}"
    );
    let ids: Vec<String> = keys(&env, &bucket)
        .await
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(
        ids,
        vec![old],
        "the new key is deleted, the Secret's key kept"
    );
    assert_eq!(
        env.s3_conf(NS, &bucket).await.as_deref(),
        Some(before.as_str())
    );
    let sealed: i64 = sqlx::query_scalar("SELECT count(*) FROM secret_material")
        .fetch_one(&env.app.db)
        .await
        .unwrap();
    assert_eq!(sealed, 0, "its sealed secret is forgotten");
    let abandoned: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE repository = $1
            AND action = 'rotate-access-key.abandon' AND outcome = 'deleted'",
    )
    .bind(&name)
    .fetch_one(&env.app.db)
    .await
    .unwrap();
    assert_eq!(abandoned, 1);
    env.app.stop().await;
}

/// When the retirement is due but the Secret references the old key again (restored by hand),
/// the key is kept: the retirement halts with the reason and is not queued again. Rotating
/// again is refused while the key the first rotation moved consumers to is active (they may
/// use it); once an operator deactivated it, rotating moves the Secret off the old key and
/// schedules its retirement afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_referencing_the_old_key_again_halts_its_retirement() {
    let env = env_with_short_grace().await;
    let (name, bucket, before) = ready_repository(&env, "rothalt").await;
    let old = conf_value(&before, "repo2-s3-key");
    assert_eq!(rotate(&env, &name).await["state"], "succeeded");
    let moved_to = conf_value(&env.s3_conf(NS, &bucket).await.unwrap(), "repo2-s3-key");
    patch_secret(&env, &bucket, json!({"stringData": {"s3.conf": before}})).await;
    assert_retirement_halts(&env, &name, &bucket, &old).await;

    let refused = rotate(&env, &name).await;
    assert_eq!(refused["state"], "failed", "{refused:#}");
    let error = refused["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!(
            "access key {moved_to} is the key an earlier rotation moved the Secret to"
        )),
        "{error}"
    );
    let status = status_of(&env, &bucket, &moved_to).await;
    assert_eq!(status.as_deref(), Some("Active"), "consumers' key kept");
    let iam = &env.admin.iam;
    let deactivate = iam
        .update_access_key()
        .user_name(&bucket)
        .access_key_id(&moved_to);
    let inactive = aws_sdk_iam::types::StatusType::Inactive;
    deactivate.status(inactive).send().await.unwrap();

    let job = rotate(&env, &name).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let newest = conf_value(&env.s3_conf(NS, &bucket).await.unwrap(), "repo2-s3-key");
    let mut ids: Vec<String> = keys(&env, &bucket)
        .await
        .into_iter()
        .map(|k| k.id)
        .collect();
    ids.sort();
    let mut expected = vec![old.clone(), newest];
    expected.sort();
    assert_eq!(ids, expected, "the first rotation's unused key made room");
    let open: Vec<(bool, bool)> = sqlx::query_as(
        "SELECT halted_at IS NOT NULL, superseded_at IS NOT NULL FROM key_retirements
          WHERE old_key_id = $1 ORDER BY created_at",
    )
    .bind(&old)
    .fetch_all(&env.app.db)
    .await
    .unwrap();
    let superseded = vec![(true, true), (false, false)];
    assert_eq!(open, superseded, "the halted one is superseded");
    env.app.stop().await;
}

/// The schedule's retirement of `old` halts: the key stays active, the retire job failed
/// saying why, and the retirement is not queued again.
async fn assert_retirement_halts(env: &Env, name: &str, bucket: &str, old: &str) {
    let schedule = schedule(env, None);
    let halted = eventually(DEADLINE, "the retirement to halt", || async {
        schedule.round().await.expect("round");
        let reason: Option<Option<String>> =
            sqlx::query_scalar("SELECT halt_reason FROM key_retirements WHERE old_key_id = $1")
                .bind(old)
                .fetch_optional(&env.app.db)
                .await
                .unwrap();
        reason.flatten()
    })
    .await;
    assert!(halted.contains("references access key"), "{halted}");
    assert_eq!(status_of(env, bucket, old).await.as_deref(), Some("Active"));
    // The halt is recorded by the job's step; the job itself fails a moment later.
    let failed = eventually(DEADLINE, "the retire job to fail", || async {
        let failed: Option<Option<String>> = sqlx::query_scalar(
            "SELECT last_error FROM jobs WHERE subject_name = $1 AND kind = 'retire-access-key'
                AND state = 'failed'",
        )
        .bind(name)
        .fetch_optional(&env.app.db)
        .await
        .unwrap();
        failed.map(Option::unwrap_or_default)
    })
    .await;
    assert!(
        failed.contains("was kept"),
        "the retire job failed, saying why: {failed}"
    );
    let round = schedule.round().await.expect("round");
    let queued = &round.retirements;
    assert!(
        queued.is_empty(),
        "a halted retirement is not queued: {round:?}"
    );
}

/// Three rotations in a row behind realistic AWS (a 2 s consistency window for new keys, half
/// of the create answers lost, a tenth of all calls failing): each converges, the old key is
/// retired before the next, the user never holds more than two keys, and the Secret ends with
/// a key that works and the original cipher pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_behind_realistic_aws_converge_within_two_keys() {
    let realism = AwsRealism::builder()
        .lost_response_rate(0.5)
        .fault_rate(0.1)
        .seed(7);
    let env = Env::builder(&[NS])
        .aws_realism(realism)
        .map_worker(|w| {
            w.key_rotation.key_grace = Duration::from_secs(1);
            w.key_rotation.key_delete_grace = Duration::from_secs(1);
            w.max_attempts = 25;
            w.retry_base = Duration::from_millis(100);
        })
        .start()
        .await;
    let (name, bucket, before) = ready_repository(&env, "rotreal").await;
    let most = KeyCount::start(&env, &bucket);
    let mut conf = before.clone();
    for _ in 0..3 {
        let job = rotate(&env, &name).await;
        assert_eq!(job["state"], "succeeded", "rotation: {job:#}");
        let after = env.s3_conf(NS, &bucket).await.expect("s3.conf");
        let old = conf_value(&conf, "repo2-s3-key");
        assert_ne!(conf_value(&after, "repo2-s3-key"), old);
        assert_eq!(without_key_lines(&after), without_key_lines(&before));
        schedule_until(&env, &bucket, &old, Some("Inactive")).await;
        conf = after;
    }
    let most = most.stop().await;
    assert!(most <= 2, "the user held {most} keys at once");
    let (id, secret) = (
        conf_value(&conf, "repo2-s3-key"),
        conf_value(&conf, "repo2-s3-key-secret"),
    );
    assert_eq!(
        status_of(&env, &bucket, &id).await.as_deref(),
        Some("Active")
    );
    let s3 = env
        .admin
        .s3_with_static_credentials(&env.region, &id, &secret);
    s3.list_objects_v2()
        .bucket(&bucket)
        .send()
        .await
        .expect("the key works");
    if let Some(proxy) = &env.realism {
        eprintln!("behind realistic AWS: {}", proxy.summary());
    }
    env.app.stop().await;
}

/// The most access keys the user held at once while it ran (ListAccessKeys every 100 ms).
struct KeyCount {
    stop: tokio_util::sync::CancellationToken,
    handle: tokio::task::JoinHandle<usize>,
}

impl KeyCount {
    fn start(env: &Env, user: &str) -> KeyCount {
        let stop = tokio_util::sync::CancellationToken::new();
        let (stopped, iam, user) = (stop.clone(), env.admin.iam.clone(), user.to_owned());
        let handle = tokio::spawn(async move {
            let mut most = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => return most,
                    _ = tick.tick() => {}
                }
                if let Ok(keys) = access_key::list(&iam, &user).await {
                    most = most.max(keys.len());
                }
            }
        });
        KeyCount { stop, handle }
    }

    async fn stop(self) -> usize {
        self.stop.cancel();
        self.handle.await.expect("key count")
    }
}

/// The runbook done by hand (the adoption tests' script, private to `adopt`), for an adopted
/// repository.
#[allow(dead_code, clippy::duplicate_mod)]
#[path = "adopt/runbook_by_hand.rs"]
mod runbook_by_hand;

/// An adopted repository whose Secret has its own name (`pgo-s3-creds`, repaired into the
/// runbook's s3.conf) rotates in that Secret: the same name, the cipher pass of the person who
/// made it, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_repository_rotates_in_its_own_secret() {
    let env = env_with_short_grace().await;
    let name = unique_name("rotadopt");
    let bucket = bucket_for(&name);
    let made = runbook_by_hand::aws_by_hand(&env, &bucket).await;
    let text = runbook_by_hand::runbook_s3_conf(&made);
    runbook_by_hand::create_secret(&env, NS, "pgo-s3-creds", &[("s3.conf", &text)]).await;
    let body = json!({
        "name": name, "namespace": env.ns(NS), "bucket": bucket,
        "adopt": true, "secret_name": "pgo-s3-creds", "repair": true,
    });
    let job = env.provision(body).await;
    assert_eq!(job["state"], "succeeded", "adoption: {job:#}");

    let job = rotate(&env, &name).await;
    assert_eq!(job["state"], "succeeded", "rotation: {job:#}");
    let after = env.s3_conf(NS, "pgo-s3-creds").await.expect("s3.conf");
    assert_ne!(conf_value(&after, "repo2-s3-key"), made.access_key_id);
    assert_eq!(conf_value(&after, "repo2-cipher-pass"), made.cipher_pass);
    assert_eq!(without_key_lines(&after), without_key_lines(&text));
    assert!(
        env.s3_conf(NS, &bucket).await.is_none(),
        "no Secret named after the bucket"
    );
    let old = status_of(&env, &bucket, &made.access_key_id).await;
    assert_eq!(
        old.as_deref(),
        Some("Active"),
        "the hand-made key stays for its grace"
    );
    env.app.stop().await;
}

/// An automatic rotation that fails (here: an immutable Secret) is not queued again at every
/// round of the schedule, only once the maximum age has passed again since it ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_automatic_rotation_is_not_queued_again_at_once() {
    let env = env_with_short_grace().await;
    let (name, bucket, _) = ready_repository(&env, "rotloop").await;
    patch_secret(&env, &bucket, json!({"immutable": true})).await;
    let aged = schedule(&env, Some(Duration::from_secs(2)));
    eventually(DEADLINE, "the schedule to queue a rotation", || async {
        let round = aged.round().await.expect("round");
        (!round.rotations.is_empty()).then_some(())
    })
    .await;
    let job_id: Uuid = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE subject_name = $1 AND kind = 'rotate-access-key'",
    )
    .bind(&name)
    .fetch_one(&env.app.db)
    .await
    .unwrap();
    let job = env
        .app
        .wait_for_job(&job_id.to_string(), Duration::from_secs(90))
        .await;
    assert_eq!(job["state"], "failed", "{job:#}");
    let round = aged.round().await.expect("round");
    assert!(
        round.rotations.is_empty(),
        "a rotation that just failed waits a maximum age: {round:?}"
    );
    env.app.stop().await;
}
