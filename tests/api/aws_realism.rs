//! The AWS realism proxy (`support::aws_realism`): first the proxy itself, driven with the real
//! AWS SDK clients, then provisioning through the API behind it (eventual consistency, lost
//! create responses, throttling, 5xx, resets, latency), which must still end in the runbook's
//! exact state with one access key per user, while permanent errors still fail at once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aws_sdk_iam::config::retry::RetryConfig;
use aws_sdk_iam::types::Tag;
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
use backup_provisioner::cloud::aws::{AwsClients, CallCounter, error_code, http_status};
use backup_provisioner::provision::{access_key, policy};
use serde_json::{Value, json};

use crate::support::app::eventually;
use crate::support::aws_realism::{
    AwsProxy, AwsRealism, Canned, Fault, FaultMix, Latency, LostResponse,
};
use crate::support::env::{Env, REGION, bucket_for, conf_value, unique_name};
use crate::support::moto::Moto;

/// The window of the proxy-level tests: long enough for the calls made inside it on a loaded
/// machine.
const WINDOW: Duration = Duration::from_secs(3);

/// Clients whose SDK retries `attempts` times with a 10 ms backoff (instead of 1 s).
fn quick_retries(aws: &AwsClients, attempts: u32) -> (aws_sdk_iam::Client, aws_sdk_s3::Client) {
    let retry = if attempts <= 1 {
        RetryConfig::disabled()
    } else {
        RetryConfig::standard()
            .with_max_attempts(attempts)
            .with_initial_backoff(Duration::from_millis(10))
    };
    let iam = aws_sdk_iam::Client::from_conf(
        aws.iam
            .config()
            .to_builder()
            .retry_config(retry.clone())
            .build(),
    );
    let s3 =
        aws_sdk_s3::Client::from_conf(aws.s3.config().to_builder().retry_config(retry).build());
    (iam, s3)
}

fn tag(key: &str, value: &str) -> Tag {
    Tag::builder().key(key).value(value).build().expect("tag")
}

#[tokio::test]
async fn a_new_user_is_invisible_for_the_window_then_visible() {
    let moto = Moto::shared();
    let proxy = AwsRealism::off().consistency_window(WINDOW).start(moto);
    let aws = proxy.clients(REGION, None).await;
    let admin = moto.clients(REGION, None).await;
    let user = unique_name("rl-user");
    let group = unique_name("rl-group");
    let path = format!("/{}/", unique_name("realism"));
    admin
        .iam
        .create_group()
        .group_name(&group)
        .send()
        .await
        .expect("group");

    let started = Instant::now();
    aws.iam
        .create_user()
        .user_name(&user)
        .path(&path)
        .send()
        .await
        .expect("create user");
    admin
        .iam
        .get_user()
        .user_name(&user)
        .send()
        .await
        .expect("moto has the user at once");
    let err = aws.iam.get_user().user_name(&user).send().await;
    let err = err.expect_err("not visible yet");
    assert_eq!(error_code(&err), Some("NoSuchEntity"), "{err:?}");
    assert_eq!(http_status(&err), Some(404));
    let listed = aws
        .iam
        .list_users()
        .path_prefix(&path)
        .send()
        .await
        .expect("list");
    assert!(listed.users().is_empty(), "{listed:?}");
    let err = aws
        .iam
        .add_user_to_group()
        .group_name(&group)
        .user_name(&user)
        .send()
        .await
        .expect_err("AddUserToGroup on an invisible user");
    assert_eq!(error_code(&err), Some("NoSuchEntity"), "{err:?}");
    let err = aws
        .iam
        .tag_user()
        .user_name(&user)
        .tags(tag("k", "v"))
        .send()
        .await
        .expect_err("TagUser on an invisible user");
    assert_eq!(error_code(&err), Some("NoSuchEntity"), "{err:?}");
    let again = aws.iam.create_user().user_name(&user).send().await;
    let again = again.expect_err("it exists, unseen");
    assert_eq!(error_code(&again), Some("EntityAlreadyExists"));

    let visible_after = eventually(Duration::from_secs(10), "the user becomes visible", || {
        let iam = aws.iam.clone();
        let user = user.clone();
        async move {
            let found = iam.get_user().user_name(&user).send().await.ok();
            found.map(|_| started.elapsed())
        }
    })
    .await;
    assert!(visible_after >= WINDOW, "visible after {visible_after:?}");
    let listed = aws
        .iam
        .list_users()
        .path_prefix(&path)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.users().len(), 1);
    aws.iam
        .add_user_to_group()
        .group_name(&group)
        .user_name(&user)
        .send()
        .await
        .expect("AddUserToGroup once visible");

    assert_eq!(proxy.forwarded("GetUser"), 1, "{}", proxy.summary());
    assert!(proxy.count("GetUser") >= 2, "{}", proxy.summary());
    let injected = proxy.injected();
    assert_eq!(injected.get("hidden-member iam:ListUsers"), Some(&1));
    assert_eq!(injected.get("hidden iam:AddUserToGroup"), Some(&1));
    assert_eq!(injected.get("hidden iam:TagUser"), Some(&1));
    assert_eq!(
        injected.get("hidden iam:GetUser").copied(),
        Some(proxy.count("GetUser") - 1)
    );
}

#[tokio::test]
async fn a_lost_create_response_makes_the_sdks_retry_meet_what_moto_created() {
    let moto = Moto::shared();
    let proxy = AwsRealism::off().lost_response_rate(1.0).start(moto);
    let aws = proxy.clients(REGION, None).await;
    let (iam, _) = quick_retries(&aws, 3);
    let admin = moto.clients(REGION, None).await;
    let user = unique_name("rl-lost");

    let err = iam.create_user().user_name(&user).send().await;
    let err = err.expect_err("the retry finds the user made by the lost attempt");
    assert_eq!(error_code(&err), Some("EntityAlreadyExists"), "{err:?}");
    admin
        .iam
        .get_user()
        .user_name(&user)
        .send()
        .await
        .expect("moto made the user");
    assert_eq!(proxy.count("iam:CreateUser"), 2, "{}", proxy.summary());
    assert_eq!(proxy.forwarded("iam:CreateUser"), 2);
    assert_eq!(
        proxy.injected().get("lost-response iam:CreateUser"),
        Some(&1)
    );

    // CreateAccessKey is not idempotent: the retry makes a second key, as IAM does. (At rate 1
    // the retry's answer would be lost too; one scripted loss instead.)
    let proxy = AwsRealism::off().start(moto);
    let (iam, _) = quick_retries(&proxy.clients(REGION, None).await, 3);
    proxy.inject_next("CreateAccessKey", Fault::LoseResponse);
    let key = iam
        .create_access_key()
        .user_name(&user)
        .send()
        .await
        .expect("the retry's key");
    let key_id = key.access_key().expect("key").access_key_id().to_owned();
    let listed = admin
        .iam
        .list_access_keys()
        .user_name(&user)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.access_key_metadata().len(), 2, "{listed:?}");
    let made = proxy.access_keys_created();
    assert_eq!(made.len(), 2);
    assert_eq!(made[1], key_id, "the caller holds the second key only");
    assert_eq!(proxy.count("CreateAccessKey"), 2);

    let proxy = AwsRealism::off().lost_response_rate(1.0).start(moto);

    // S3: the retried CreateBucket (outside us-east-1) finds the bucket it made.
    let bucket = bucket_for(&unique_name("rl-lost"));
    let region = "eu-west-1";
    let (_, s3) = quick_retries(&proxy.clients(region, None).await, 3);
    let err = s3
        .create_bucket()
        .bucket(&bucket)
        .create_bucket_configuration(
            CreateBucketConfiguration::builder()
                .location_constraint(BucketLocationConstraint::from(region))
                .build(),
        )
        .send()
        .await
        .expect_err("the retry finds the bucket");
    assert_eq!(error_code(&err), Some("BucketAlreadyOwnedByYou"), "{err:?}");
    assert_eq!(proxy.count("s3:CreateBucket"), 2, "{}", proxy.summary());

    // A stall past the client's attempt timeout instead of a reset: the same retry.
    let proxy = AwsRealism::off()
        .lost_response(LostResponse::Stall(Duration::from_secs(2)))
        .start(moto);
    proxy.inject_next("CreateGroup", Fault::LoseResponse);
    let (iam, _) = quick_retries(&proxy.clients(REGION, None).await, 3);
    let impatient = iam
        .config()
        .to_builder()
        .timeout_config(
            aws_sdk_iam::config::timeout::TimeoutConfig::builder()
                .operation_attempt_timeout(Duration::from_millis(300))
                .build(),
        )
        .build();
    let group = unique_name("rl-stall");
    let err = aws_sdk_iam::Client::from_conf(impatient)
        .create_group()
        .group_name(&group)
        .send()
        .await
        .expect_err("the retry finds the group");
    assert_eq!(error_code(&err), Some("EntityAlreadyExists"), "{err:?}");
    assert_eq!(proxy.count("CreateGroup"), 2, "{}", proxy.summary());
}

#[tokio::test]
async fn throttling_is_answered_without_reaching_moto_and_counted() {
    let proxy = AwsRealism::off()
        .fault_rate(1.0)
        .fault_mix(FaultMix::only(Fault::Throttle))
        .start(Moto::shared());
    let (iam, s3) = quick_retries(&proxy.clients(REGION, None).await, 3);

    let err = iam.get_user().user_name("anyone").send().await;
    let err = err.expect_err("throttled");
    assert_eq!(error_code(&err), Some("Throttling"), "{err:?}");
    assert_eq!(http_status(&err), Some(400));
    assert_eq!(proxy.count("GetUser"), 3, "the SDK tried three times");
    assert_eq!(proxy.forwarded("GetUser"), 0);

    let err = s3.list_buckets().send().await.expect_err("slowed down");
    assert_eq!(error_code(&err), Some("SlowDown"), "{err:?}");
    assert_eq!(http_status(&err), Some(503));
    assert_eq!(proxy.count("s3:ListBuckets"), 3);
    assert_eq!(
        proxy.injected(),
        BTreeMap::from([
            ("throttle iam:GetUser".to_owned(), 3),
            ("throttle s3:ListBuckets".to_owned(), 3),
        ])
    );

    // The other faults, one request each (no SDK retry).
    let proxy = AwsRealism::off().start(Moto::shared());
    let (iam, _) = quick_retries(&proxy.clients(REGION, None).await, 1);
    for (fault, code, status) in [
        (Fault::ServerError, Some("ServiceFailure"), Some(500)),
        (Fault::Unavailable, Some("ServiceUnavailable"), Some(503)),
        (Fault::Reset, None, None),
    ] {
        proxy.inject_next("GetUser", fault);
        let err = iam.get_user().user_name("anyone").send().await;
        let err = err.expect_err("faulted");
        assert_eq!(error_code(&err), code, "{fault:?}: {err:?}");
        assert_eq!(http_status(&err), status, "{fault:?}");
    }
    assert_eq!(proxy.forwarded("GetUser"), 0);
    assert_eq!(proxy.injected_count("reset"), 1);
}

#[tokio::test]
async fn the_same_seed_draws_the_same_faults_however_requests_interleave() {
    async fn outcomes(proxy: &AwsProxy, concurrent: bool) -> Vec<String> {
        let (iam, _) = quick_retries(&proxy.clients(REGION, None).await, 1);
        let one = |i: usize| {
            let iam = iam.clone();
            async move {
                let got = iam
                    .get_user()
                    .user_name(format!("realism-seed-probe-{i}"))
                    .send()
                    .await;
                match got {
                    Ok(_) => "ok".to_owned(),
                    Err(e) => error_code(&e).unwrap_or("no-answer").to_owned(),
                }
            }
        };
        if concurrent {
            futures::future::join_all((0..40).map(one)).await
        } else {
            let mut all = Vec::new();
            for i in 0..40 {
                all.push(one(i).await);
            }
            all
        }
    }
    let realism = AwsRealism::off().fault_rate(0.5).seed(42);
    let first = outcomes(&realism.clone().start(Moto::shared()), false).await;
    let second = outcomes(&realism.start(Moto::shared()), true).await;
    assert_eq!(first, second);
    let faulted = first.iter().filter(|o| *o != "NoSuchEntity").count();
    assert!((8..=32).contains(&faulted), "{faulted} of 40: {first:?}");
    let other = outcomes(
        &AwsRealism::off()
            .fault_rate(0.5)
            .seed(7)
            .start(Moto::shared()),
        false,
    )
    .await;
    assert_ne!(first, other, "another seed, other draws");
}

#[tokio::test]
async fn a_new_keys_s3_calls_are_rejected_inside_the_window() {
    let moto = Moto::shared();
    let proxy = AwsRealism::off().consistency_window(WINDOW).start(moto);
    let aws = proxy.clients(REGION, None).await;
    let admin = moto.clients(REGION, None).await;
    let user = unique_name("rl-key");
    let bucket = bucket_for(&user);
    admin
        .iam
        .create_user()
        .user_name(&user)
        .send()
        .await
        .expect("user");
    admin
        .s3
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .expect("bucket");

    let started = Instant::now();
    let made = aws
        .iam
        .create_access_key()
        .user_name(&user)
        .send()
        .await
        .expect("key");
    let key = made.access_key().expect("key");
    let with_key =
        aws.s3_with_static_credentials(REGION, key.access_key_id(), key.secret_access_key());
    let err = with_key.list_objects_v2().bucket(&bucket).send().await;
    let err = err.expect_err("a new key is unknown for a while");
    assert_eq!(error_code(&err), Some("InvalidAccessKeyId"), "{err:?}");
    assert_eq!(http_status(&err), Some(403));
    // IAM does not list it yet either (the user is old, so the list itself answers).
    let listed = aws
        .iam
        .list_access_keys()
        .user_name(&user)
        .send()
        .await
        .unwrap();
    assert!(listed.access_key_metadata().is_empty(), "{listed:?}");

    let works_after = eventually(Duration::from_secs(10), "the key works", || {
        let s3 = with_key.clone();
        let bucket = bucket.clone();
        async move {
            let listed = s3.list_objects_v2().bucket(&bucket).send().await.ok();
            listed.map(|_| started.elapsed())
        }
    })
    .await;
    assert!(works_after >= WINDOW, "worked after {works_after:?}");
    let listed = aws
        .iam
        .list_access_keys()
        .user_name(&user)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.access_key_metadata().len(), 1);
    assert!(
        proxy.injected_count("invalid-key") >= 1,
        "{}",
        proxy.summary()
    );
    assert_eq!(
        proxy.injected().get("hidden-member iam:ListAccessKeys"),
        Some(&1)
    );
}

/// `AwsRealism::off()` forwards everything and counts exactly what the service's
/// `CallCounter` counts, so tests can count at the proxy instead.
#[tokio::test]
async fn the_pass_through_proxy_counts_what_the_call_counter_counts() {
    let env = Env::builder(&["zitadel"])
        .aws_realism(AwsRealism::off())
        .start()
        .await;
    let proxy = env.realism.as_ref().expect("proxy");
    let name = unique_name("rl-off");
    let job = env
        .provision(json!({"name": name, "namespace": env.ns("zitadel")}))
        .await;
    assert_eq!(job["state"], "succeeded", "job: {job:#}");
    assert_eq!(proxy.calls(), env.counter.snapshot());
    assert_eq!(proxy.forwarded_calls(), env.counter.snapshot());
    assert_eq!(proxy.mutating(), env.counter.mutating());
    assert!(proxy.injected().is_empty(), "{:?}", proxy.injected());
    eprintln!(
        "one clean provisioning: {} calls ({} mutating): {:?}",
        proxy.total(),
        proxy.mutating_count(),
        proxy.calls()
    );
    env.app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Provisioning behind the realism layer
// ---------------------------------------------------------------------------------------------

const REPOSITORIES: usize = 20;
const NAMESPACE: &str = "zitadel";

/// Realism at its defaults plus 20 % faults and some latency.
fn realistic() -> AwsRealism {
    AwsRealism::builder()
        .fault_rate(0.2)
        .latency(0.2, Latency::UpTo(Duration::from_millis(100)))
}

/// Workers that retry quickly and often enough to outlast faults.
fn patient_workers(worker: &mut backup_provisioner::config::WorkerSettingsArgs) {
    worker.max_attempts = 25;
    worker.retry_base = Duration::from_millis(100);
}

/// What one repository ended as.
struct Ended {
    name: String,
    job: Value,
    keys: usize,
    differences: Vec<String>,
}

impl Ended {
    fn ok(&self) -> bool {
        self.job["state"] == "succeeded" && self.differences.is_empty()
    }

    fn attempts(&self) -> i64 {
        self.job["attempts"].as_i64().unwrap_or(0)
    }
}

/// Creates every repository through the API at once and waits for all jobs.
async fn provision_all(env: &Env, names: &[String]) -> Vec<Value> {
    let mut job_ids = Vec::new();
    for name in names {
        let response = env
            .app
            .post_json(
                "/v1/backup-repositories",
                &env.app.operator(),
                &json!({"name": name, "namespace": env.ns(NAMESPACE)}),
            )
            .await;
        let status = response.status();
        let created: Value = response.json().await.expect("json");
        assert_eq!(status, 202, "create {name}: {created}");
        job_ids.push(created["job"]["id"].as_str().expect("job id").to_owned());
    }
    let waits = job_ids
        .iter()
        .map(|id| env.app.wait_for_job(id, Duration::from_secs(240)));
    futures::future::join_all(waits).await
}

async fn provision_and_check(env: &Env, names: &[String]) -> Vec<Ended> {
    let jobs = provision_all(env, names).await;
    let mut ended = Vec::new();
    for (name, job) in names.iter().zip(jobs) {
        let (keys, differences) = runbook_differences(env, name).await;
        ended.push(Ended {
            name: name.clone(),
            job,
            keys,
            differences,
        });
    }
    ended
}

/// How the repositories ended, one line each, and the totals; for a repository that did not
/// end well, the proxy's journal of its creates, key calls and injections.
fn report(ended: &[Ended], proxy: &AwsProxy) -> String {
    let mut lines = Vec::new();
    for e in ended {
        if !e.ok() {
            let steps: Vec<String> = e.job["steps"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| format!("{}:{}x{}", s["name"], s["state"], s["attempts"]).replace('"', ""))
                .collect();
            let interesting = |line: &String| {
                line.contains("Create") || line.contains("AccessKey") || !line.contains(" moto 2")
            };
            let journal: Vec<String> = proxy
                .journal(&bucket_for(&e.name))
                .into_iter()
                .filter(interesting)
                .collect();
            lines.push(format!(
                "  {} steps {}\n    {}",
                e.name,
                steps.join(" "),
                journal.join("\n    ")
            ));
        }
        lines.push(format!(
            "{}: job {} after {} attempt(s), {} key(s){}{}",
            e.name,
            e.job["state"],
            e.attempts(),
            e.keys,
            e.job["last_error"]
                .as_str()
                .map(|err| format!(", last error: {err}"))
                .unwrap_or_default(),
            if e.differences.is_empty() {
                String::new()
            } else {
                format!(", differs: {}", e.differences.join("; "))
            }
        ));
    }
    let ready = ended.iter().filter(|e| e.ok()).count();
    let retries: i64 = ended.iter().map(|e| (e.attempts() - 1).max(0)).sum();
    lines.push(format!(
        "{ready}/{} ready with the runbook's state; {retries} job retries",
        ended.len()
    ));
    lines.join("\n")
}

/// The first error code of an SDK result, for a difference message.
fn code_of<T, E: aws_sdk_s3::error::ProvideErrorMetadata, R>(
    result: &Result<T, aws_sdk_s3::error::SdkError<E, R>>,
) -> String {
    match result {
        Ok(_) => "ok".to_owned(),
        Err(e) => error_code(e).unwrap_or("no code").to_owned(),
    }
}

/// The number of access keys of the repository's user and every way its state differs from
/// the runbook's (read back through moto directly and the real kube-apiserver).
async fn runbook_differences(env: &Env, name: &str) -> (usize, Vec<String>) {
    let bucket = bucket_for(name);
    let mut diffs = Vec::new();
    let repo = env.repository(name).await;
    if repo["state"] != "ready" {
        diffs.push(format!("repository state {}", repo["state"]));
    }
    let s3 = &env.admin.s3;
    let iam = &env.admin.iam;

    let ownership = s3
        .get_bucket_ownership_controls()
        .bucket(&bucket)
        .send()
        .await;
    let rules: Vec<String> = ownership
        .as_ref()
        .ok()
        .and_then(|o| o.ownership_controls())
        .map(|c| {
            c.rules()
                .iter()
                .map(|r| r.object_ownership().as_str().to_owned())
                .collect()
        })
        .unwrap_or_default();
    if rules != ["BucketOwnerEnforced"] {
        diffs.push(format!("ownership {rules:?} ({})", code_of(&ownership)));
    }
    let pab = s3.get_public_access_block().bucket(&bucket).send().await;
    let blocked = pab
        .as_ref()
        .ok()
        .and_then(|p| p.public_access_block_configuration())
        .map(|p| {
            [
                p.block_public_acls(),
                p.ignore_public_acls(),
                p.block_public_policy(),
                p.restrict_public_buckets(),
            ]
        });
    if blocked != Some([Some(true); 4]) {
        diffs.push(format!(
            "public access block {blocked:?} ({})",
            code_of(&pab)
        ));
    }
    let enc = s3.get_bucket_encryption().bucket(&bucket).send().await;
    let rule = enc
        .as_ref()
        .ok()
        .and_then(|e| e.server_side_encryption_configuration())
        .and_then(|c| c.rules().first())
        .map(|r| {
            (
                r.apply_server_side_encryption_by_default()
                    .map(|d| d.sse_algorithm().as_str().to_owned()),
                r.bucket_key_enabled(),
            )
        });
    if rule != Some((Some("AES256".to_owned()), Some(true))) {
        diffs.push(format!("encryption {rule:?} ({})", code_of(&enc)));
    }
    match backup_provisioner::provision::bucket::versioning_status(s3, &bucket).await {
        Ok(None) => {}
        other => diffs.push(format!("versioning {other:?}")),
    }
    let tags = s3.get_bucket_tagging().bucket(&bucket).send().await;
    let bucket_tags: Vec<(String, String)> = tags
        .as_ref()
        .map(|t| {
            t.tag_set()
                .iter()
                .map(|t| (t.key().to_owned(), t.value().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    for wanted in [
        ("managed-by", "backup-provisioner"),
        ("backup-provisioner/repository", name),
    ] {
        if !bucket_tags
            .iter()
            .any(|(k, v)| (k.as_str(), v.as_str()) == wanted)
        {
            diffs.push(format!(
                "bucket tag {wanted:?} missing ({})",
                code_of(&tags)
            ));
        }
    }

    // IAM: the policy's document and description, the group's attachment, the user.
    let policy_arn = repo["resources"]["policy_arn"].as_str().unwrap_or_default();
    let got = iam.get_policy().policy_arn(policy_arn).send().await;
    match got.as_ref().ok().and_then(|p| p.policy()) {
        Some(found) => {
            if found.description() != Some(policy::DESCRIPTION) {
                diffs.push(format!("policy description {:?}", found.description()));
            }
            let version = iam
                .get_policy_version()
                .policy_arn(policy_arn)
                .version_id(found.default_version_id().unwrap_or_default())
                .send()
                .await;
            let document = version
                .as_ref()
                .ok()
                .and_then(|v| v.policy_version())
                .and_then(|v| v.document())
                .and_then(policy::parse_document);
            if document != Some(policy::document(&bucket)) {
                diffs.push(format!("policy document {document:?}"));
            }
        }
        None => diffs.push(format!("policy {policy_arn:?}: {}", code_of(&got))),
    }
    let attached = iam
        .list_attached_group_policies()
        .group_name(&bucket)
        .send()
        .await;
    let arns: Vec<&str> = attached
        .as_ref()
        .map(|a| {
            a.attached_policies()
                .iter()
                .filter_map(|p| p.policy_arn())
                .collect()
        })
        .unwrap_or_default();
    if arns != [policy_arn] {
        diffs.push(format!("group policies {arns:?} ({})", code_of(&attached)));
    }
    let groups = iam.list_groups_for_user().user_name(&bucket).send().await;
    let names: Vec<&str> = groups
        .as_ref()
        .map(|g| g.groups().iter().map(|g| g.group_name()).collect())
        .unwrap_or_default();
    if names != [bucket.as_str()] {
        diffs.push(format!("user groups {names:?} ({})", code_of(&groups)));
    }
    let login = iam.get_login_profile().user_name(&bucket).send().await;
    if code_of(&login) != "NoSuchEntity" {
        diffs.push(format!("login profile: {}", code_of(&login)));
    }
    let user_tags = iam.list_user_tags().user_name(&bucket).send().await;
    let user_tags: Vec<(String, String)> = user_tags
        .map(|t| {
            t.tags()
                .iter()
                .map(|t| (t.key().to_owned(), t.value().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let user_tag = |k: &str| {
        user_tags
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    if user_tag("managed-by").as_deref() != Some("backup-provisioner") {
        diffs.push("user tag managed-by missing".to_owned());
    }

    // Exactly one key: the one the repository and the Secret name, with its description tag.
    let keys = iam.list_access_keys().user_name(&bucket).send().await;
    let key_ids: Vec<String> = keys
        .as_ref()
        .map(|k| {
            k.access_key_metadata()
                .iter()
                .filter_map(|m| m.access_key_id().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let recorded = repo["resources"]["access_key_id"]
        .as_str()
        .unwrap_or_default();
    if key_ids != [recorded] {
        diffs.push(format!(
            "access keys {key_ids:?}, repository names {recorded:?}"
        ));
    }
    if user_tag(recorded).as_deref() != Some(access_key::DESCRIPTION) {
        diffs.push(format!("no description tag for key {recorded:?}"));
    }
    match env.s3_conf(NAMESPACE, &bucket).await {
        Some(conf) => {
            let pass = conf_value(&conf, "repo2-cipher-pass");
            let secret = conf_value(&conf, "repo2-s3-key-secret");
            let expected = format!(
                "[global]\nrepo2-cipher-pass={pass}\nrepo2-s3-key={recorded}\n\
                 repo2-s3-key-secret={secret}\nrepo3-cipher-pass={pass}\n\
                 repo3-s3-key={recorded}\nrepo3-s3-key-secret={secret}\n"
            );
            if conf != expected || pass.len() != 64 {
                diffs.push("s3.conf differs from the runbook's format".to_owned());
            }
        }
        None => diffs.push("no Secret".to_owned()),
    }
    (key_ids.len(), diffs)
}

/// The scenario: realism at its defaults plus 20 % faults; 20 provisionings through
/// the API all end `ready` with the runbook's exact state and one access key each. Compared
/// with the same 20 provisionings through a pass-through proxy.
#[tokio::test]
async fn twenty_provisionings_end_ready_behind_realistic_aws() {
    let moto = Moto::start();
    let clean_names: Vec<String> = (0..REPOSITORIES).map(|i| format!("clean-{i:02}")).collect();
    let names: Vec<String> = (0..REPOSITORIES).map(|i| format!("real-{i:02}")).collect();

    let clean = Env::builder(&[NAMESPACE])
        .moto(&moto)
        .workers(4)
        .map_worker(patient_workers)
        .aws_realism(AwsRealism::off())
        .start()
        .await;
    let started = Instant::now();
    let clean_ended = provision_and_check(&clean, &clean_names).await;
    let clean_time = started.elapsed();
    let clean_proxy = clean.realism.as_ref().expect("proxy");
    let clean_calls = clean_proxy.total();
    let clean_mutating = clean_proxy.mutating_count();
    eprintln!(
        "clean run ({clean_time:.1?}): {}\n{clean_calls} AWS calls ({clean_mutating} mutating)",
        report(&clean_ended, clean_proxy)
    );
    assert!(
        clean_ended.iter().all(Ended::ok),
        "{}",
        report(&clean_ended, clean_proxy)
    );
    clean.app.stop().await;

    let env = Env::builder(&[NAMESPACE])
        .moto(&moto)
        .workers(4)
        .map_worker(patient_workers)
        .aws_realism(realistic())
        .start()
        .await;
    let proxy = env.realism.as_ref().expect("proxy");
    let started = Instant::now();
    let ended = provision_and_check(&env, &names).await;
    let injected: Vec<String> = [
        "throttle",
        "unavailable",
        "server-error",
        "reset",
        "latency",
        "lost-response",
        "hidden",
        "hidden-member",
        "invalid-key",
    ]
    .iter()
    .map(|label| format!("{label} {}", proxy.injected_count(label)))
    .collect();
    let summary = format!(
        "realistic run ({:.1?}): {}\n{} AWS calls ({} mutating) vs {clean_calls} ({clean_mutating}) \
         clean: {} extra; keys made {}; injected: {}\n{}",
        started.elapsed(),
        report(&ended, proxy),
        proxy.total(),
        proxy.mutating_count(),
        proxy.total() as i64 - clean_calls as i64,
        proxy.access_keys_created().len(),
        injected.join(", "),
        proxy.summary()
    );
    eprintln!("{summary}");
    assert!(ended.iter().all(Ended::ok), "{summary}");
    assert!(ended.iter().all(|e| e.keys == 1), "{summary}");
    env.app.stop().await;
}

/// moto with IAM authorization enforced: the service's identity may do everything but
/// `iam:CreateUser` (as in `provisioning_cases`). The job must fail on CreateUser's
/// AccessDenied, and CreateUser must reach moto once: no retry, at the SDK or the job level.
async fn access_denied_fails_at_once(realism: AwsRealism) {
    const BOOTSTRAP_REQUESTS: u32 = 4;
    let moto = Moto::with_iam_auth(BOOTSTRAP_REQUESTS);
    let bootstrap = moto.clients(REGION, None).await;
    bootstrap
        .iam
        .create_user()
        .user_name("bp-service")
        .send()
        .await
        .expect("service user");
    bootstrap
        .iam
        .put_user_policy()
        .user_name("bp-service")
        .policy_name("all-but-create-user")
        .policy_document(
            json!({"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "*", "Resource": "*"},
                {"Effect": "Deny", "Action": "iam:CreateUser", "Resource": "*"},
            ]})
            .to_string(),
        )
        .send()
        .await
        .expect("service policy");
    let key = bootstrap
        .iam
        .create_access_key()
        .user_name("bp-service")
        .send()
        .await
        .expect("service key")
        .access_key
        .expect("key");
    let name = unique_name("rl-den");
    let bucket = bucket_for(&name);
    // Made during the bootstrap: moto's signature check fails on the description's spaces.
    bootstrap
        .iam
        .create_policy()
        .policy_name(&bucket)
        .description(policy::DESCRIPTION)
        .policy_document(policy::document(&bucket).to_string())
        .send()
        .await
        .expect("the runbook policy");

    let env = Env::builder(&[NAMESPACE])
        .moto(&moto)
        .aws_identity(key.access_key_id(), key.secret_access_key())
        .map_worker(patient_workers)
        .aws_realism(realism)
        .start()
        .await;
    let proxy = env.realism.as_ref().expect("proxy");
    let job = env
        .provision(json!({"name": name, "namespace": env.ns(NAMESPACE)}))
        .await;
    let summary = format!("job: {job:#}\nproxy: {}", proxy.summary());
    eprintln!("{summary}");
    assert_eq!(job["state"], "failed", "{summary}");
    let error = job["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("iam:CreateUser") && error.contains("access denied"),
        "{summary}"
    );
    assert_eq!(proxy.forwarded("CreateUser"), 1, "{summary}");
    assert_eq!(proxy.count("CreateAccessKey"), 0, "{summary}");
    assert_eq!(env.kube.mutating_count(), 0);
    env.app.stop().await;
}

/// moto cannot answer BucketAlreadyExists (another account's bucket); the proxy does, for
/// the CreateBucket of one bucket. The job must fail on it at once: CreateBucket is answered
/// once, never retried.
async fn bucket_already_exists_fails_at_once(realism: AwsRealism) {
    let env = Env::builder(&[NAMESPACE])
        .map_worker(patient_workers)
        .aws_realism(realism)
        .start()
        .await;
    let proxy = env.realism.as_ref().expect("proxy");
    let name = unique_name("rl-taken");
    let bucket = bucket_for(&name);
    proxy.answer(
        "s3:CreateBucket",
        Some(&bucket),
        Canned::bucket_already_exists(),
    );
    let job = env
        .provision(json!({"name": name, "namespace": env.ns(NAMESPACE)}))
        .await;
    let summary = format!("job: {job:#}\nproxy: {}", proxy.summary());
    eprintln!("{summary}");
    assert_eq!(job["state"], "failed", "{summary}");
    let error = job["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("owned by another AWS account") && error.contains(&bucket),
        "{summary}"
    );
    assert_eq!(
        proxy.injected().get("canned s3:CreateBucket"),
        Some(&1),
        "{summary}"
    );
    assert_eq!(proxy.count("CreateAccessKey"), 0, "{summary}");
    assert!(env.secret(NAMESPACE, &bucket).await.is_none());
    env.app.stop().await;
}

/// Faults only (20 %, latency; no consistency window, no lost responses).
fn faults_only() -> AwsRealism {
    AwsRealism::off()
        .fault_rate(0.2)
        .latency(0.2, Latency::UpTo(Duration::from_millis(100)))
}

#[tokio::test]
async fn access_denied_fails_at_once_under_faults() {
    access_denied_fails_at_once(faults_only()).await;
}

#[tokio::test]
async fn bucket_already_exists_fails_at_once_under_faults() {
    bucket_already_exists_fails_at_once(faults_only()).await;
}

#[tokio::test]
async fn access_denied_fails_at_once_behind_realistic_aws() {
    access_denied_fails_at_once(realistic()).await;
}

#[tokio::test]
async fn bucket_already_exists_fails_at_once_behind_realistic_aws() {
    bucket_already_exists_fails_at_once(realistic()).await;
}

/// Two CreateAccessKey answers in a row are lost (as with `AWS_REALISM_SEED=5` in
/// `twenty_provisionings_end_ready_behind_realistic_aws`, repository real-12): IAM made both
/// keys, so the SDK's third try meets LimitExceeded although the step had found no key. That is
/// not the quota: the job retries, deletes the two keys it holds no secret for, makes one.
#[tokio::test]
async fn two_lost_create_access_key_answers_fill_the_quota_and_the_job_recovers() {
    let env = Env::builder(&[NAMESPACE])
        .map_worker(patient_workers)
        .aws_realism(AwsRealism::off())
        .start()
        .await;
    let proxy = env.realism.as_ref().expect("proxy");
    proxy.inject_next("CreateAccessKey", Fault::LoseResponse);
    proxy.inject_next("CreateAccessKey", Fault::LoseResponse);
    let name = unique_name("rl-2lost");
    let job = env
        .provision(json!({"name": name, "namespace": env.ns(NAMESPACE)}))
        .await;
    let (keys, differences) = runbook_differences(&env, &name).await;
    let summary = format!(
        "job: {job:#}\nkeys {keys}, differences {differences:?}\njournal: {:#?}\nproxy: {}",
        proxy.journal(&bucket_for(&name)),
        proxy.summary()
    );
    assert_eq!(job["state"], "succeeded", "{summary}");
    assert_eq!(job["attempts"], 2, "{summary}");
    assert_eq!(keys, 1, "{summary}");
    assert!(differences.is_empty(), "{summary}");
    assert_eq!(proxy.access_keys_created().len(), 3, "{summary}");
    assert_eq!(proxy.count("CreateAccessKey"), 4, "{summary}");
    assert_eq!(proxy.forwarded("DeleteAccessKey"), 2, "{summary}");
    env.app.stop().await;
}

/// The counter the tests used so far and the proxy's agree on a throttled run too: both
/// count SDK attempts.
#[tokio::test]
async fn the_call_counter_and_the_proxy_count_retried_attempts_alike() {
    let proxy = AwsRealism::off()
        .fault_rate(1.0)
        .fault_mix(FaultMix::only(Fault::ServerError))
        .start(Moto::shared());
    let counter = CallCounter::new();
    let aws = proxy.clients(REGION, Some(counter.clone())).await;
    let (iam, _) = quick_retries(&aws, 3);
    let err = iam.list_users().send().await.expect_err("500s");
    assert_eq!(error_code(&err), Some("ServiceFailure"));
    assert_eq!(proxy.calls(), counter.snapshot());
    assert_eq!(proxy.count("ListUsers"), 3);
}
