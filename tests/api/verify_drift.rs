//! Verify and repair drift (issue 10 item 2), against moto behind the AWS realism proxy
//! (pass-through, counting) and the real kube-apiserver: a provisioned repository gets drift
//! injected out of band for every checked setting (a table of cases); a read-only verify
//! reports each with expected and actual and makes no mutating AWS call and no Kubernetes
//! write; `repair` fixes the repairable ones and leaves the others reported; a key or Secret
//! that is gone is reported, never made. The dry runs of create, reconcile and verify change
//! and store nothing.

use std::time::{Duration, Instant};

use aws_sdk_iam::types::StatusType;
use aws_sdk_s3::types::{
    BucketVersioningStatus, ObjectOwnership, OwnershipControls, OwnershipControlsRule,
    ServerSideEncryption, ServerSideEncryptionByDefault, ServerSideEncryptionConfiguration,
    ServerSideEncryptionRule, Tag, Tagging, VersioningConfiguration,
};
use backup_provisioner::provision::policy;
use serde_json::{Value, json};

use crate::http_common::{REPOSITORIES, assert_problem, count_rows};
use crate::support::app::spawn_app;
use crate::support::aws_realism::AwsRealism;
use crate::support::env::{Env, bucket_for, conf_value, unique_name};

const NS: &str = "zitadel";

/// An environment whose AWS calls are counted at the realism proxy, with one provisioned
/// repository; returns it and the repository's name.
async fn provisioned(prefix: &str) -> (Env, String) {
    let env = Env::builder(&[NS])
        .aws_realism(AwsRealism::off())
        .start()
        .await;
    let name = unique_name(prefix);
    let job = env
        .provision(json!({"name": name, "namespace": env.ns(NS)}))
        .await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    (env, name)
}

/// What one verification did, counted where the calls leave the service.
struct Verified {
    job: Value,
    repository: Value,
    mutating_aws: u64,
    aws_calls: u64,
    kube_writes: usize,
    took: Duration,
}

impl Verified {
    fn verification(&self) -> &Value {
        &self.repository["verification"]
    }

    /// The setting `setting` of the first resource of `kind` in the stored report.
    fn setting(&self, kind: &str, setting: &str) -> &Value {
        setting_in(&self.verification()["resources"], kind, setting)
    }
}

fn setting_in<'a>(resources: &'a Value, kind: &str, setting: &str) -> &'a Value {
    let resources = resources.as_array().expect("resources");
    resources
        .iter()
        .filter(|r| r["resource"]["kind"] == kind)
        .flat_map(|r| r["settings"].as_array().into_iter().flatten())
        .find(|s| s["setting"] == setting)
        .unwrap_or_else(|| panic!("no setting {kind}/{setting} in {resources:#?}"))
}

/// `POST .../verify` (with `repair`), waits for the job, reads the repository back.
async fn verify(env: &Env, name: &str, repair: bool) -> Verified {
    let proxy = env.realism.as_ref().expect("realism proxy");
    proxy.reset_counts();
    env.kube.clear_requests();
    let started = Instant::now();
    let path = format!("{REPOSITORIES}/{name}/verify");
    let body = json!({ "repair": repair });
    let response = env.app.post_json(&path, &env.app.operator(), &body).await;
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let queued: Value = response.json().await.unwrap();
    assert_eq!(
        location,
        format!("/v1/jobs/{}", queued["job"]["id"].as_str().unwrap())
    );
    let job_id = queued["job"]["id"].as_str().unwrap();
    let job = env.app.wait_for_job(job_id, Duration::from_secs(60)).await;
    let took = started.elapsed();
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["kind"], "verify-repository", "{job:#}");
    Verified {
        repository: env.repository(name).await,
        job,
        mutating_aws: proxy.mutating_count(),
        aws_calls: proxy.total(),
        kube_writes: env.kube.mutating_count(),
        took,
    }
}

/// One kind of drift, made out of band by an administrator.
#[derive(Debug, Clone, Copy)]
enum Drift {
    PublicAccessBlockDeleted,
    BucketKeyDisabled,
    VersioningEnabled,
    TagsChanged,
    OwnershipChanged,
    PolicyDocumentChanged,
    GroupDetached,
    UserNotInGroup,
    LoginProfileAdded,
    KeyDescriptionChanged,
    KeyDeactivated,
    SecretLabelRemoved,
    Repo3Differs,
}

/// A case: the drift, where the verification reports it (resource kind, setting), the action
/// a read-only verify reports, what it finds, and whether `repair` fixes it.
struct Case {
    drift: Drift,
    kind: &'static str,
    setting: &'static str,
    action: &'static str,
    actual: Value,
    repaired: bool,
}

fn case(
    drift: Drift,
    at: (&'static str, &'static str),
    action: &'static str,
    actual: Value,
) -> Case {
    let repaired = action != "leave";
    let (kind, setting) = at;
    Case {
        drift,
        kind,
        setting,
        action,
        actual,
        repaired,
    }
}

fn cases(name: &str) -> Vec<Case> {
    let bucket = bucket_for(name);
    vec![
        case(
            Drift::PublicAccessBlockDeleted,
            ("s3-bucket", "public_access_block"),
            "create",
            Value::Null,
        ),
        case(
            Drift::BucketKeyDisabled,
            ("s3-bucket", "default_encryption"),
            "update",
            json!([{"sse_algorithm": "AES256", "kms_master_key_id": null, "bucket_key_enabled": false}]),
        ),
        case(
            Drift::VersioningEnabled,
            ("s3-bucket", "versioning"),
            "leave",
            json!("Enabled"),
        ),
        case(
            Drift::TagsChanged,
            ("s3-bucket", "tags"),
            "update",
            json!({"managed-by": null, "backup-provisioner/repository": "someone-else"}),
        ),
        case(
            Drift::OwnershipChanged,
            ("s3-bucket", "object_ownership"),
            "update",
            json!(["BucketOwnerPreferred"]),
        ),
        case(
            Drift::PolicyDocumentChanged,
            ("iam-policy", "document"),
            "update",
            policy::document("someone-else"),
        ),
        case(
            Drift::GroupDetached,
            ("iam-group", "attached_policy"),
            "create",
            Value::Null,
        ),
        case(
            Drift::UserNotInGroup,
            ("iam-user", "group_membership"),
            "create",
            Value::Null,
        ),
        case(
            Drift::LoginProfileAdded,
            ("iam-user", "login_profile"),
            "delete",
            json!("present"),
        ),
        case(
            Drift::KeyDescriptionChanged,
            ("iam-access-key", "description_tag"),
            "update",
            json!("changed by hand"),
        ),
        case(
            Drift::KeyDeactivated,
            ("iam-access-key", "status"),
            "leave",
            json!("Inactive"),
        ),
        case(
            Drift::SecretLabelRemoved,
            ("kube-secret", "labels"),
            "update",
            json!({"app.kubernetes.io/managed-by": null, "holos.run/secret.name": bucket}),
        ),
        case(
            Drift::Repo3Differs,
            ("kube-secret", "repo3"),
            "leave",
            json!(["repo3-s3-key-secret"]),
        ),
    ]
}

/// The repository's names as the drift needs them.
struct Names {
    bucket: String,
    ns: String,
    key_id: String,
    policy_arn: String,
}

async fn names(env: &Env, name: &str) -> Names {
    let repository = env.repository(name).await;
    let resources = &repository["resources"];
    Names {
        bucket: bucket_for(name),
        ns: env.ns(NS).to_owned(),
        key_id: resources["access_key_id"].as_str().expect("key").to_owned(),
        policy_arn: resources["policy_arn"].as_str().expect("policy").to_owned(),
    }
}

async fn inject(env: &Env, n: &Names, drift: Drift) {
    let (s3, iam, b) = (
        env.admin.s3_for_region(&env.region),
        &env.admin.iam,
        n.bucket.as_str(),
    );
    match drift {
        Drift::PublicAccessBlockDeleted => drop(
            s3.delete_public_access_block()
                .bucket(b)
                .send()
                .await
                .unwrap(),
        ),
        Drift::BucketKeyDisabled => put_encryption_without_bucket_key(&s3, b).await,
        Drift::VersioningEnabled => {
            let enabled = VersioningConfiguration::builder()
                .status(BucketVersioningStatus::Enabled)
                .build();
            s3.put_bucket_versioning()
                .bucket(b)
                .versioning_configuration(enabled)
                .send()
                .await
                .unwrap();
        }
        Drift::TagsChanged => {
            let tag = Tag::builder()
                .key("backup-provisioner/repository")
                .value("someone-else")
                .build()
                .unwrap();
            let tagging = Tagging::builder().tag_set(tag).build().unwrap();
            s3.put_bucket_tagging()
                .bucket(b)
                .tagging(tagging)
                .send()
                .await
                .unwrap();
        }
        Drift::OwnershipChanged => {
            let rule = OwnershipControlsRule::builder()
                .object_ownership(ObjectOwnership::BucketOwnerPreferred)
                .build()
                .unwrap();
            let controls = OwnershipControls::builder().rules(rule).build().unwrap();
            s3.put_bucket_ownership_controls()
                .bucket(b)
                .ownership_controls(controls)
                .send()
                .await
                .unwrap();
        }
        Drift::PolicyDocumentChanged => {
            let document = policy::document("someone-else").to_string();
            let version = iam
                .create_policy_version()
                .policy_arn(&n.policy_arn)
                .policy_document(document);
            version.set_as_default(true).send().await.unwrap();
        }
        Drift::GroupDetached => drop(
            iam.detach_group_policy()
                .group_name(b)
                .policy_arn(&n.policy_arn)
                .send()
                .await
                .unwrap(),
        ),
        Drift::UserNotInGroup => drop(
            iam.remove_user_from_group()
                .group_name(b)
                .user_name(b)
                .send()
                .await
                .unwrap(),
        ),
        Drift::LoginProfileAdded => drop(
            iam.create_login_profile()
                .user_name(b)
                .password("Drift-by-hand-1!")
                .send()
                .await
                .unwrap(),
        ),
        Drift::KeyDescriptionChanged => {
            let tag = aws_sdk_iam::types::Tag::builder()
                .key(&n.key_id)
                .value("changed by hand")
                .build()
                .unwrap();
            iam.tag_user().user_name(b).tags(tag).send().await.unwrap();
        }
        Drift::KeyDeactivated => set_key_status(env, n, StatusType::Inactive).await,
        Drift::SecretLabelRemoved => remove_managed_by_label(env, n).await,
        Drift::Repo3Differs => make_repo3_differ(env, n).await,
    }
}

async fn put_encryption_without_bucket_key(s3: &aws_sdk_s3::Client, bucket: &str) {
    let by_default = ServerSideEncryptionByDefault::builder()
        .sse_algorithm(ServerSideEncryption::Aes256)
        .build()
        .unwrap();
    let rule = ServerSideEncryptionRule::builder()
        .apply_server_side_encryption_by_default(by_default)
        .bucket_key_enabled(false)
        .build();
    let configuration = ServerSideEncryptionConfiguration::builder()
        .rules(rule)
        .build()
        .unwrap();
    s3.put_bucket_encryption()
        .bucket(bucket)
        .server_side_encryption_configuration(configuration)
        .send()
        .await
        .unwrap();
}

async fn set_key_status(env: &Env, n: &Names, status: StatusType) {
    env.admin
        .iam
        .update_access_key()
        .user_name(&n.bucket)
        .access_key_id(&n.key_id)
        .status(status)
        .send()
        .await
        .unwrap();
}

async fn remove_managed_by_label(env: &Env, n: &Names) {
    let patch = json!({"metadata": {"labels": {"app.kubernetes.io/managed-by": null}}});
    let params = kube::api::PatchParams::default();
    env.kube
        .secrets(&n.ns)
        .patch(&n.bucket, &params, &kube::api::Patch::Merge(&patch))
        .await
        .unwrap();
}

/// repo3's key secret no longer matches repo2's (a hand edit of s3.conf).
async fn make_repo3_differ(env: &Env, n: &Names) {
    let conf = env.kube.s3_conf(&n.ns, &n.bucket).await.expect("s3.conf");
    let secret = conf_value(&conf, "repo3-s3-key-secret");
    let edited = conf.replace(
        &format!("repo3-s3-key-secret={secret}"),
        "repo3-s3-key-secret=edited-by-hand",
    );
    let encoded = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, edited);
    let patch = json!({"data": {"s3.conf": encoded}});
    let params = kube::api::PatchParams::default();
    env.kube
        .secrets(&n.ns)
        .patch(&n.bucket, &params, &kube::api::Patch::Merge(&patch))
        .await
        .unwrap();
}

fn assert_read_only(verified: &Verified, what: &str) {
    assert_eq!(verified.mutating_aws, 0, "{what}: mutating AWS calls");
    assert_eq!(verified.kube_writes, 0, "{what}: Kubernetes writes");
    assert_eq!(
        verified.repository["state"], "ready",
        "{what}: the state is kept"
    );
    assert!(verified.repository["verified_at"].is_string(), "{what}");
    let drift = verified.verification()["drift"].clone();
    assert_eq!(verified.repository["drift_count"], drift, "{what}");
}

#[tokio::test]
async fn every_drift_is_reported_and_the_safe_ones_are_repaired() {
    let (env, name) = provisioned("verify").await;
    let clean = verify(&env, &name, false).await;
    assert_read_only(&clean, "a clean verify");
    assert_eq!(
        clean.repository["drift_count"],
        0,
        "{:#}",
        clean.verification()
    );
    let steps: Vec<&str> = clean.job["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "bucket",
            "policy",
            "group",
            "user",
            "access_key",
            "credential",
            "secret"
        ]
    );
    let at = |field: &str| {
        let text = clean.job[field].as_str().expect(field);
        chrono::DateTime::parse_from_rfc3339(text).expect("a time")
    };
    let job_ms = (at("finished_at") - at("started_at")).num_milliseconds();
    eprintln!(
        "one verify of a clean repository against moto: the job ran {job_ms} ms ({:?} from the \
         request to its end), {} AWS calls ({} mutating), {} Kubernetes writes",
        clean.took, clean.aws_calls, clean.mutating_aws, clean.kube_writes
    );

    let n = names(&env, &name).await;
    let cases = cases(&name);
    for case in &cases {
        inject(&env, &n, case.drift).await;
    }
    let found = verify(&env, &name, false).await;
    assert_read_only(&found, "a verify of drift");
    for case in &cases {
        let setting = found.setting(case.kind, case.setting);
        assert_eq!(
            setting["action"], case.action,
            "{:?}: {setting:#}",
            case.drift
        );
        assert_eq!(
            setting["actual"], case.actual,
            "{:?}: {setting:#}",
            case.drift
        );
        assert!(
            !setting["expected"].is_null(),
            "{:?}: {setting:#}",
            case.drift
        );
    }
    let credential = &found.verification()["resources"][5];
    assert!(
        credential["skipped"].is_string(),
        "an inactive key is not tried: {credential:#}"
    );
    assert_repair(&env, &name, &cases).await;
}

/// `repair` fixes what is safe; a verify after it finds only what repair leaves.
async fn assert_repair(env: &Env, name: &str, cases: &[Case]) {
    let repaired = verify(env, name, true).await;
    assert_eq!(repaired.repository["state"], "ready");
    assert!(
        repaired.mutating_aws > 0 && repaired.kube_writes == 1,
        "repair wrote the labels only"
    );
    let after = verify(env, name, false).await;
    assert_read_only(&after, "a verify after the repair");
    for case in cases {
        let setting = after.setting(case.kind, case.setting);
        let expected = if case.repaired { "none" } else { case.action };
        assert_eq!(setting["action"], expected, "{:?}: {setting:#}", case.drift);
    }
    let left = cases.iter().filter(|c| !c.repaired).count();
    assert_eq!(
        after.repository["drift_count"],
        left,
        "{:#}",
        after.verification()
    );
}

#[tokio::test]
async fn a_deleted_key_and_a_deleted_secret_are_reported_and_never_made_again() {
    let (env, name) = provisioned("verify-gone").await;
    let n = names(&env, &name).await;
    let iam = &env.admin.iam;
    let delete = iam
        .delete_access_key()
        .user_name(&n.bucket)
        .access_key_id(&n.key_id);
    delete.send().await.unwrap();
    let verified = verify(&env, &name, true).await;
    assert_eq!(verified.mutating_aws, 0, "repair never makes a key");
    let exists = verified.setting("iam-access-key", "exists");
    assert_eq!(
        (&exists["actual"], &exists["action"]),
        (&json!(false), &json!("leave"))
    );
    assert!(
        exists["reason"].as_str().unwrap().contains("rotate-key"),
        "{exists:#}"
    );
    assert_eq!(
        verified.repository["drift_count"],
        1,
        "{:#}",
        verified.verification()
    );

    assert!(env.kube.delete_secret(&n.ns, &n.bucket).await);
    let verified = verify(&env, &name, true).await;
    assert_eq!(
        (verified.mutating_aws, verified.kube_writes),
        (0, 0),
        "nothing is made"
    );
    let secret = verified.setting("kube-secret", "exists");
    assert_eq!(
        (&secret["actual"], &secret["action"]),
        (&json!(false), &json!("leave"))
    );
    assert_eq!(
        verified.setting("iam-access-key", "referenced")["action"],
        "leave"
    );
    assert!(env.kube.secret(&n.ns, &n.bucket).await.is_none());
    assert_eq!(verified.repository["state"], "ready");
    assert_audited(&env, &name, verified.job["id"].as_str().unwrap()).await;
}

/// The request is audited as `repository.verify` (with `repair`), each step of its job too.
async fn assert_audited(env: &Env, name: &str, job_id: &str) {
    let path = format!("/v1/audit?repository={name}&limit=200");
    let page: Value = env
        .app
        .get(&path, &env.app.viewer())
        .await
        .json()
        .await
        .unwrap();
    let of_job: Vec<&Value> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["job_id"] == job_id)
        .collect();
    let request = of_job.iter().find(|e| e["action"] == "repository.verify");
    let request = request.unwrap_or_else(|| panic!("no repository.verify entry: {of_job:#?}"));
    assert_eq!(request["detail"]["repair"], true, "{request:#}");
    let steps: Vec<&str> = of_job.iter().filter_map(|e| e["step"].as_str()).collect();
    for step in [
        "bucket",
        "policy",
        "group",
        "user",
        "access_key",
        "credential",
        "secret",
    ] {
        assert!(
            steps.contains(&step),
            "no audit entry of step {step}: {steps:?}"
        );
    }
    let outcome = |step: &str| {
        let entry = of_job.iter().find(|e| e["step"] == step).expect("an entry");
        entry["outcome"].as_str().unwrap().to_owned()
    };
    assert_eq!(outcome("bucket"), "verified");
    assert_eq!(outcome("secret"), "drift", "the Secret is gone");
}

/// A dry run: 200 with the plan of `kind`.
async fn dry_run(env: &Env, path: &str, body: &Value, kind: &str) -> Value {
    let proxy = env.realism.as_ref().expect("realism proxy");
    proxy.reset_counts();
    env.kube.clear_requests();
    let response = env.app.post_json(path, &env.app.operator(), body).await;
    let status = response.status();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{path}: {answer:#}");
    assert_eq!(
        (&answer["dry_run"], &answer["kind"]),
        (&json!(true), &json!(kind))
    );
    assert_eq!(
        proxy.mutating(),
        Default::default(),
        "{path}: mutating AWS calls"
    );
    assert_eq!(env.kube.mutating_count(), 0, "{path}: Kubernetes writes");
    answer["plan"].clone()
}

/// `kind/setting:action` of every setting of a plan.
fn plan_actions(plan: &Value) -> Vec<String> {
    let resources = plan.as_array().expect("a plan is a list of resources");
    resources
        .iter()
        .flat_map(|r| {
            let kind = r["resource"]["kind"].as_str().unwrap().to_owned();
            let settings = r["settings"].as_array().cloned().unwrap_or_default();
            settings.into_iter().map(move |s| {
                format!(
                    "{kind}/{}:{}",
                    s["setting"].as_str().unwrap(),
                    s["action"].as_str().unwrap()
                )
            })
        })
        .collect()
}

#[tokio::test]
async fn dry_runs_of_create_reconcile_and_verify_change_and_store_nothing() {
    let (env, name) = provisioned("dry-run").await;
    let fresh = unique_name("dry-new");
    let body = json!({"name": fresh, "namespace": env.ns(NS)});
    let plan = dry_run(
        &env,
        &format!("{REPOSITORIES}?dry_run=true"),
        &body,
        "provision-repository",
    )
    .await;
    let kinds: Vec<&str> = plan
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["resource"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "s3-bucket",
            "iam-policy",
            "iam-group",
            "iam-user",
            "cipher-pass",
            "iam-access-key",
            "iam-user-tag",
            "credential-check",
            "kube-secret",
            "iam-access-key"
        ]
    );
    for resource in &plan.as_array().unwrap()[..7] {
        assert_eq!(resource["resource"]["action"], "create", "{resource:#}");
    }
    assert_eq!(
        plan[8]["resource"]["action"], "create",
        "the Secret: {:#}",
        plan[8]
    );
    assert!(plan[7]["skipped"].is_string());
    let missing = env
        .app
        .get(&format!("{REPOSITORIES}/{fresh}"), &env.app.viewer())
        .await;
    assert_eq!(missing.status(), 404, "a dry run stores no repository");
    assert_eq!(count_rows(&env.app, "jobs").await, 1, "and no job");
    // What would fail the job fails its plan: a namespace that does not exist.
    let nowhere = json!({"name": unique_name("dry-nowhere"), "namespace": "no-such-namespace"});
    let path = format!("{REPOSITORIES}?dry_run=true");
    let refused = env
        .app
        .post_json(&path, &env.app.operator(), &nowhere)
        .await;
    let problem = assert_problem(refused, 422).await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("no-such-namespace"),
        "{problem}"
    );

    let n = names(&env, &name).await;
    inject(&env, &n, Drift::PublicAccessBlockDeleted).await;
    inject(&env, &n, Drift::UserNotInGroup).await;
    let reconcile = format!("{REPOSITORIES}/{name}/reconcile?dry_run=true");
    let plan = dry_run(&env, &reconcile, &json!({}), "provision-repository").await;
    let drift: Vec<String> = plan_actions(&plan)
        .into_iter()
        .filter(|a| !a.ends_with(":none"))
        .collect();
    assert_eq!(
        drift,
        [
            "s3-bucket/public_access_block:create",
            "iam-user/group_membership:create"
        ],
        "{plan:#}"
    );
    let verify = format!("{REPOSITORIES}/{name}/verify?dry_run=true");
    let plan = dry_run(&env, &verify, &json!({"repair": true}), "verify-repository").await;
    let drift: Vec<String> = plan_actions(&plan)
        .into_iter()
        .filter(|a| !a.ends_with(":none"))
        .collect();
    assert_eq!(
        drift,
        [
            "s3-bucket/public_access_block:create",
            "iam-user/group_membership:create"
        ],
        "{plan:#}"
    );
    assert_eq!(count_rows(&env.app, "jobs").await, 1, "no job was queued");
    assert!(
        env.repository(&name).await["verified_at"].is_null(),
        "nothing was stored"
    );
}

#[tokio::test]
async fn verify_answers_404_409_403_and_503_for_a_dry_run_without_workers() {
    let app = spawn_app().await;
    let body = json!({"name": "zitadel", "namespace": "zitadel"});
    let created = app.post_json(REPOSITORIES, &app.operator(), &body).await;
    assert_eq!(created.status(), 202);
    let created: Value = created.json().await.unwrap();
    let verify = format!("{REPOSITORIES}/zitadel/verify");
    let busy = app.post_json(&verify, &app.operator(), &json!({})).await;
    let problem = assert_problem(busy, 409).await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("queued or running"),
        "{problem}"
    );
    let unknown = app
        .post_json(
            &format!("{REPOSITORIES}/nope/verify"),
            &app.operator(),
            &json!({}),
        )
        .await;
    assert_problem(unknown, 404).await;
    assert_problem(app.post_json(&verify, &app.viewer(), &json!({})).await, 403).await;
    let wrong = app
        .post_json(&verify, &app.operator(), &json!({"repair": "yes"}))
        .await;
    assert_problem(wrong, 422).await;
    let dry_run = format!("{verify}?dry_run=true");
    let plan = app.post_json(&dry_run, &app.operator(), &json!({})).await;
    assert_problem(plan, 409).await;
    let no_body = app
        .client
        .post(app.url(&verify))
        .bearer_auth(app.operator())
        .send()
        .await
        .unwrap();
    assert_problem(no_body, 409).await;
    // Once the repository is idle, a replica without workers cannot plan (503); the request
    // itself (no body) queues the verification.
    let job = created["job"]["id"].as_str().unwrap();
    let cancel = format!("/v1/jobs/{job}/cancel");
    let cancelled = app.post_json(&cancel, &app.operator(), &json!({})).await;
    assert!(cancelled.status().is_success(), "{}", cancelled.status());
    let plan = app.post_json(&dry_run, &app.operator(), &json!({})).await;
    assert_problem(plan, 503).await;
    let queued = app
        .client
        .post(app.url(&verify))
        .bearer_auth(app.operator())
        .send()
        .await
        .unwrap();
    assert_eq!(queued.status(), 202);
    let queued: Value = queued.json().await.unwrap();
    assert_eq!(queued["job"]["kind"], "verify-repository", "{queued:#}");
    assert_eq!(count_rows(&app, "jobs").await, 2);
}

/// `verify::inspect` (what adoption reuses) on a repository of which nothing exists, in repair
/// mode: every resource is reported missing and nothing is made.
#[tokio::test]
async fn inspect_reports_what_is_missing_and_repair_makes_nothing() {
    use backup_provisioner::cloud::aws::CallCounter;
    use backup_provisioner::provision::report::Mode;
    use backup_provisioner::provision::verify::{Clients, Target, inspect};

    let kube = crate::support::kube_env::KubeEnv::start(&[NS]).await;
    let counter = CallCounter::new();
    let region = crate::support::env::REGION;
    let aws = crate::support::moto::Moto::shared()
        .clients(region, Some(counter.clone()))
        .await;
    let name = unique_name("inspect");
    let target = Target::new(
        name.clone().try_into().unwrap(),
        kube.ns(NS).to_owned().try_into().unwrap(),
        bucket_for(&name).try_into().unwrap(),
        region.to_owned().try_into().unwrap(),
    );
    let service_kube = kube.service_client();
    let clients = Clients {
        aws: &aws,
        kube: &service_kube,
        credential_check_budget: Duration::from_secs(1),
        credential_check_backoff: Duration::from_millis(50),
    };
    let verification = inspect(&clients, &target, Mode::Repair).await.unwrap();
    assert_eq!(counter.mutating_count(), 0, "{:?}", counter.mutating());
    assert_eq!(kube.mutating_count(), 0);
    let resources = json!(verification.resources);
    let actions: Vec<&Value> = (0..4)
        .map(|i| &resources[i]["resource"]["action"])
        .collect();
    assert_eq!(actions, [&json!("create"); 4], "{resources:#}");
    assert_eq!(
        setting_in(&resources, "iam-access-key", "referenced")["action"],
        "leave"
    );
    assert!(resources[5]["skipped"].is_string());
    assert_eq!(
        setting_in(&resources, "kube-secret", "exists")["action"],
        "leave"
    );
    assert_eq!(verification.mode, "repair");
    assert!(verification.drift > 10, "{}", verification.drift);
}
