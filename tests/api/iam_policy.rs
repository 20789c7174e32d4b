//! The service's own IAM policy (`deploy/aws/provisioner-iam-policy.json`, issue 11 item 3) is
//! enough, and every part of it is needed.
//!
//! moto runs with IAM authorization enforced and AWS's action names and resource ARNs
//! (`support/moto_authz.py`: moto alone checks IAM calls against `*` and names many S3 calls
//! after the wrong action). A bootstrap administrator makes a service user whose only
//! permission is the policy; the service (its API, workers and real job kinds, the shipped
//! Kubernetes Role) runs as that user through every day-2 flow of one repository
//! ([`flows::run`]): provisioning, verification repairing drift, key rotation, the old key's
//! retirement and deprovisioning with the bucket. The credential checks keep using the new
//! key of the repository's user, which holds the runbook's per-bucket policy.
//!
//! - [`the_service_runs_every_flow_with_only_its_policy`]: everything passes, and the service
//!   cannot touch a bucket, user or policy not named like a backup bucket.
//! - [`removing_any_statement_or_action_breaks_a_flow`]: the same flows for a new repository
//!   once per removal (each statement, then each action), on one moto and one service, with
//!   the service user's policy replaced: some flow must fail with an access denial. Actions
//!   moto cannot show to be needed are in [`NOT_PROVABLE`], with the reason; for them the test
//!   checks that the flows indeed pass without them (so the list cannot go stale). The flow
//!   that failed for each action must be the one `deploy/aws/README.md` names for it.
//!
//! The service runs in this process (`support::app`), its jobs on its own workers; one run of
//! every flow takes under 2 s, all 60 removals about 40 s.

mod flows;
mod identities;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use self::identities::{POLICY, Removal, ServiceUser, admin, clients_as, moto, removals};
use crate::support::env::{Env, REGION, bucket_for, unique_name};
use crate::support::moto::iam_for_enforced_moto;

/// Actions of the policy no flow against moto can show to be needed, each with the reason it
/// stays.
pub const NOT_PROVABLE: &[(&str, &str)] = &[
    (
        "s3:GetBucketLocation",
        "the region check's fallback for a HeadBucket answer without x-amz-bucket-region, which \
         S3 and moto always send",
    ),
    (
        "s3:PutObject",
        "the read probe saves a first provisioning one AWS round trip; without it the new key's \
         check reads back its own probe (tests/api/critical_path.rs counts the round trips)",
    ),
];

/// The documentation of the policy, whose tables name the flow proving each action needed.
const README: &str = include_str!("../../deploy/aws/README.md");

/// Action -> the last column ("proven by") of its row in [`README`].
fn documented_flows() -> BTreeMap<String, String> {
    README
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let action = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            let flow = cells.get(cells.len().checked_sub(2)?)?;
            (action.starts_with("s3:") || action.starts_with("iam:"))
                .then(|| (action.to_owned(), (*flow).to_owned()))
        })
        .collect()
}

/// The service as `service`, its rotated-out keys retired without grace periods.
async fn env_as(service: &ServiceUser) -> Env {
    Env::builder(&[flows::NS])
        .moto(moto())
        .aws_identity(&service.key.0, &service.key.1)
        .map_service_aws(|mut aws| {
            aws.iam = iam_for_enforced_moto(&aws.iam);
            aws
        })
        .map_worker(|worker| {
            worker.key_rotation.key_grace = Duration::ZERO;
            worker.key_rotation.key_delete_grace = Duration::ZERO;
        })
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_runs_every_flow_with_only_its_policy() {
    let admin = admin().await;
    let service = ServiceUser::create(&admin).await;
    let env = env_as(&service).await;
    let name = unique_name("iam");
    let ran = flows::run(&env, &admin, &name)
        .await
        .unwrap_or_else(|stopped| panic!("with the shipped policy: {stopped:#?}"));
    eprintln!("flows with the shipped policy: {:?}", ran.timings);
    read_probe_used(&env, &ran.provision).await;
    assert_all_gone(&admin, &bucket_for(&name)).await;
    outside_the_pattern_is_denied(&admin, &service).await;
    env.app.stop().await;
}

/// The provisioning's credential check read back the read probe the service wrote: the
/// statement `CredentialCheckReadProbes` works (without it the check falls back, see
/// [`NOT_PROVABLE`]).
async fn read_probe_used(env: &Env, job: &Value) {
    let check = env.step_detail(job, "credential_check").await;
    assert!(
        check["read_probe_key"].is_string(),
        "the credential check read the service's read probe: {check:#}"
    );
}

/// Deprovisioning left nothing of the repository in AWS.
async fn assert_all_gone(admin: &backup_provisioner::cloud::aws::AwsClients, bucket: &str) {
    let iam = &admin.iam;
    assert!(
        iam.get_user().user_name(bucket).send().await.is_err(),
        "user"
    );
    assert!(
        iam.get_group().group_name(bucket).send().await.is_err(),
        "group"
    );
    let policy = backup_provisioner::provision::policy::find(iam, bucket).await;
    assert!(policy.expect("list policies").is_none(), "policy");
    let s3 = admin.s3_for_region(REGION);
    assert!(
        s3.head_bucket().bucket(bucket).send().await.is_err(),
        "bucket"
    );
}

/// The policy's resources are scoped: buckets, users, groups and policies not named like a
/// backup bucket (`holos-*-backups`) are out of the service's reach.
async fn outside_the_pattern_is_denied(
    admin: &backup_provisioner::cloud::aws::AwsClients,
    service: &ServiceUser,
) {
    let theirs = unique_name("team-data");
    let s3 = admin.s3_for_region(REGION);
    s3.create_bucket()
        .bucket(&theirs)
        .send()
        .await
        .expect("a bucket of others");
    let own = clients_as(&service.key).await;
    let own_s3 = own.s3_for_region(REGION);
    let denied = |what: &str, status: Option<u16>| {
        assert_eq!(status, Some(403), "{what} must be denied");
    };
    let head = own_s3.head_bucket().bucket(&theirs).send().await;
    denied(
        "HeadBucket of another bucket",
        head.err().and_then(|e| status(&e)),
    );
    let tags = own_s3.get_bucket_tagging().bucket(&theirs).send().await;
    denied(
        "GetBucketTagging of another bucket",
        tags.err().and_then(|e| status(&e)),
    );
    let create = own_s3
        .create_bucket()
        .bucket(unique_name("holos-data"))
        .send()
        .await;
    denied(
        "CreateBucket not ending -backups",
        create.err().and_then(|e| status(&e)),
    );
    let user = own
        .iam
        .create_user()
        .user_name(unique_name("alice"))
        .send()
        .await;
    denied(
        "CreateUser of another name",
        user.err().and_then(|e| status(&e)),
    );
    let admin_user = own.iam.get_user().user_name("root-admin").send().await;
    denied(
        "GetUser of the administrator",
        admin_user.err().and_then(|e| status(&e)),
    );
    let itself = own
        .iam
        .list_access_keys()
        .user_name(&service.name)
        .send()
        .await;
    denied(
        "ListAccessKeys of its own user",
        itself.err().and_then(|e| status(&e)),
    );
    let policy = own.iam.create_policy().policy_name(unique_name("admin")).policy_document(
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#,
    );
    denied(
        "CreatePolicy of another name",
        policy.send().await.err().and_then(|e| status(&e)),
    );
    groups_and_objects_outside_the_pattern_are_denied(admin, &own, &theirs).await;
}

/// The group and object statements are scoped too: another group cannot be made, an object of
/// another bucket cannot be deleted, and a backup bucket's objects cannot be written outside
/// the read probes' prefix.
async fn groups_and_objects_outside_the_pattern_are_denied(
    admin: &backup_provisioner::cloud::aws::AwsClients,
    own: &backup_provisioner::cloud::aws::AwsClients,
    theirs: &str,
) {
    admin
        .s3_for_region(REGION)
        .put_object()
        .bucket(theirs)
        .key("data")
        .body(b"theirs".to_vec().into())
        .send()
        .await
        .expect("an object of others");
    let delete = own
        .s3_for_region(REGION)
        .delete_object()
        .bucket(theirs)
        .key("data")
        .send()
        .await;
    let delete = delete.err().and_then(|e| status(&e));
    assert_eq!(
        delete,
        Some(403),
        "DeleteObject in another bucket must be denied"
    );
    let backups = bucket_for(&unique_name("objects"));
    let admin_s3 = admin.s3_for_region(REGION);
    let made = admin_s3.create_bucket().bucket(&backups).send().await;
    made.expect("a backup bucket");
    let put = own.s3_for_region(REGION).put_object().bucket(&backups);
    let put = put
        .key("archive/000000010000000000000001")
        .body(b"wal".to_vec().into());
    let put = put.send().await.err().and_then(|e| status(&e));
    assert_eq!(
        put,
        Some(403),
        "PutObject in a backup bucket outside backup-provisioner/probe-* must be denied"
    );
    let group = own
        .iam
        .create_group()
        .group_name(unique_name("admins"))
        .send()
        .await;
    let group = group.err().and_then(|e| status(&e));
    assert_eq!(
        group,
        Some(403),
        "CreateGroup of another name must be denied"
    );
}

fn status<E, R: 'static>(err: &aws_sdk_s3::error::SdkError<E, R>) -> Option<u16> {
    backup_provisioner::cloud::aws::http_status(err)
}

/// What one removal did to the flows.
enum Verdict {
    /// Proven needed: this flow failed with an access denial.
    Needed(&'static str),
    /// Listed in [`NOT_PROVABLE`], and the flows pass without it.
    NotProvable,
    /// A failure of the proof.
    Missed(String),
}

fn verdict(removal: &Removal, outcome: Result<flows::Ran, flows::Stopped>) -> Verdict {
    let exception = removal
        .action
        .as_deref()
        .and_then(|a| NOT_PROVABLE.iter().find(|(listed, _)| *listed == a));
    match (outcome, exception) {
        (Err(stopped), None) if stopped.is_access_denied() => Verdict::Needed(stopped.flow),
        (Err(stopped), None) => Verdict::Missed(format!(
            "{}: {} failed, but not with an access denial: {}",
            removal.label, stopped.flow, stopped.error
        )),
        (Err(stopped), Some(_)) => Verdict::Missed(format!(
            "{}: listed as not provable, but {} failed without it ({}): take it off \
             NOT_PROVABLE",
            removal.label, stopped.flow, stopped.error
        )),
        (Ok(_), Some(_)) => Verdict::NotProvable,
        (Ok(_), None) => Verdict::Missed(format!(
            "{}: every flow passed without it (not needed, or a flow misses the step that \
             uses it)",
            removal.label
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_any_statement_or_action_breaks_a_flow() {
    let started = Instant::now();
    let admin = admin().await;
    let service = ServiceUser::create(&admin).await;
    let env = env_as(&service).await;
    let policy: Value = serde_json::from_str(POLICY).expect("policy");
    let (mut proven, mut missed) = (BTreeMap::new(), Vec::new());
    for removal in removals(&policy) {
        service.holds(&admin, &removal.document).await;
        let outcome = flows::run(&env, &admin, &unique_name("rm")).await;
        let key = removal.action.clone().unwrap_or(removal.label.clone());
        match verdict(&removal, outcome) {
            Verdict::Needed(flow) => proven.insert(key, flow.to_owned()),
            Verdict::NotProvable => proven.insert(key, "(not provable)".to_owned()),
            Verdict::Missed(why) => {
                missed.push(why);
                continue;
            }
        };
    }
    eprintln!("removals ({:?}):\n{proven:#?}", started.elapsed());
    assert!(missed.is_empty(), "not proven:\n{}", missed.join("\n"));
    proven.retain(|key, _| !key.starts_with("statement "));
    assert_eq!(
        proven,
        documented_flows(),
        "the \"proven by\" column of deploy/aws/README.md (right) must name the flow that \
         fails without each action (left)"
    );
    env.app.stop().await;
}
