//! The day-2 life of one repository, through the service's API and its workers (the real job
//! kinds), as the service identity of the test: provisioning, verification with repair of
//! drift an administrator made, key rotation and the old key's retirement (the key schedule run
//! round by round), and deprovisioning with the bucket's deletion. [`run`] stops at the first
//! flow that does not succeed and says which, and why.

use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{BucketVersioningStatus, VersioningConfiguration};
use backup_provisioner::auth::Role;
use backup_provisioner::cloud::aws::AwsClients;
use backup_provisioner::provision::bucket::MANAGED_BY_KEY;
use backup_provisioner::provision::key_schedule::KeySchedule;
use backup_provisioner::provision::policy;
use serde_json::{Value, json};

use crate::support::env::{Env, REGION, bucket_for, conf_value};

/// The namespace of the repositories (logical name).
pub const NS: &str = "iampolicy";
const JOB_DEADLINE: Duration = Duration::from_secs(90);

/// The flow that did not succeed, and the job's error (or what went wrong around it).
#[derive(Debug)]
pub struct Stopped {
    pub flow: &'static str,
    pub error: String,
}

impl Stopped {
    /// Whether AWS refused the service identity (the job's error names the denial).
    pub fn is_access_denied(&self) -> bool {
        let error = self.error.to_lowercase();
        error.contains("access denied") || error.contains("not accessible to the provisioner")
    }
}

/// How long each flow took.
pub type Timings = Vec<(&'static str, Duration)>;

/// What the flows did: each one's time, and the provisioning job's view.
pub struct Ran {
    pub timings: Timings,
    pub provision: Value,
}

/// Every flow for a new repository `name`; `admin` makes the drift and the hand-made extras.
pub async fn run(env: &Env, admin: &AwsClients, name: &str) -> Result<Ran, Stopped> {
    let bucket = bucket_for(name);
    let mut timings = Vec::new();
    let started = Instant::now();
    let provisioned = ended("provision", provision(env, name).await)?;
    timings.push(("provision", started.elapsed()));
    let started = Instant::now();
    drift(env, admin, &bucket).await;
    let body = json!({"repair": true});
    ended("verify-repair", queue(env, name, "verify", body).await)?;
    timings.push(("verify-repair", started.elapsed()));
    let started = Instant::now();
    ended(
        "rotate-key",
        queue(env, name, "rotate-key", json!({})).await,
    )?;
    timings.push(("rotate-key", started.elapsed()));
    let started = Instant::now();
    retire(env, name).await?;
    timings.push(("retire-access-key", started.elapsed()));
    let started = Instant::now();
    made_by_hand(admin, &bucket).await;
    ended("deprovision", deprovision(env, name, &bucket).await)?;
    timings.push(("deprovision", started.elapsed()));
    Ok(Ran {
        timings,
        provision: provisioned,
    })
}

/// `Ok` for a succeeded job view, else what stopped it.
fn ended(flow: &'static str, job: Result<Value, String>) -> Result<Value, Stopped> {
    match job {
        Ok(job) if job["state"] == "succeeded" => Ok(job),
        Ok(job) => Err(Stopped {
            flow,
            error: job["last_error"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| format!("job did not succeed: {job}")),
        }),
        Err(error) => Err(Stopped { flow, error }),
    }
}

async fn provision(env: &Env, name: &str) -> Result<Value, String> {
    Ok(env
        .provision(json!({"name": name, "namespace": env.ns(NS)}))
        .await)
}

/// `POST /v1/backup-repositories/{name}/{operation}` and the job it queued, once ended.
async fn queue(env: &Env, name: &str, operation: &str, body: Value) -> Result<Value, String> {
    let path = format!("/v1/backup-repositories/{name}/{operation}");
    let response = env.app.post_json(&path, &env.app.operator(), &body).await;
    let status = response.status();
    let answer: Value = response.json().await.map_err(|e| e.to_string())?;
    if status != 202 {
        return Err(format!("{operation} answered {status}: {answer}"));
    }
    let job_id = answer["job"]["id"].as_str().unwrap_or_default();
    Ok(env.app.wait_for_job(job_id, JOB_DEADLINE).await)
}

/// Deletes the repository and its bucket (which holds an object: emptied, confirmed).
async fn deprovision(env: &Env, name: &str, bucket: &str) -> Result<Value, String> {
    let app = &env.app;
    let response = app
        .client
        .delete(app.url(&format!(
            "/v1/backup-repositories/{name}?delete_bucket=true"
        )))
        .bearer_auth(app.token("admin@test", &[Role::Admin]))
        .json(&json!({"confirm": bucket, "force": true}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let answer: Value = response.json().await.map_err(|e| e.to_string())?;
    if status != 202 {
        return Err(format!("DELETE answered {status}: {answer}"));
    }
    let job_id = answer["job"]["id"].as_str().unwrap_or_default();
    Ok(app.wait_for_job(job_id, JOB_DEADLINE).await)
}

/// Drift on every setting verify repairs: the bucket's public access block, ownership,
/// encryption and tags; the policy's document; the group's attachment; the user's membership,
/// tags and console access; the key's description tag.
async fn drift(env: &Env, admin: &AwsClients, bucket: &str) {
    let s3 = admin.s3_for_region(REGION);
    s3.delete_public_access_block()
        .bucket(bucket)
        .send()
        .await
        .expect("drift");
    s3.delete_bucket_ownership_controls()
        .bucket(bucket)
        .send()
        .await
        .expect("drift");
    s3.delete_bucket_encryption()
        .bucket(bucket)
        .send()
        .await
        .expect("drift");
    s3.delete_bucket_tagging()
        .bucket(bucket)
        .send()
        .await
        .expect("drift");
    let iam = &admin.iam;
    let arn = policy::find(iam, bucket)
        .await
        .expect("find")
        .expect("policy");
    let arn = arn.arn().expect("arn");
    let mut other = policy::document(bucket);
    other["Statement"][1]["Action"] = json!("s3:GetObject");
    iam.create_policy_version()
        .policy_arn(arn)
        .policy_document(other.to_string())
        .set_as_default(true)
        .send()
        .await
        .expect("drift");
    iam.detach_group_policy()
        .group_name(bucket)
        .policy_arn(arn)
        .send()
        .await
        .expect("drift");
    iam.remove_user_from_group()
        .group_name(bucket)
        .user_name(bucket)
        .send()
        .await
        .expect("drift");
    let conf = env.s3_conf(NS, bucket).await.expect("s3.conf");
    let key = conf_value(&conf, "repo2-s3-key");
    iam.untag_user()
        .user_name(bucket)
        .tag_keys(MANAGED_BY_KEY)
        .tag_keys(key)
        .send()
        .await
        .expect("drift");
    iam.create_login_profile()
        .user_name(bucket)
        .password("Drift-by-hand-1")
        .send()
        .await
        .expect("drift");
}

/// What deprovisioning must take away beyond what the service made: an object in the bucket
/// (a real version: versioning turned on by hand, so emptying deletes a specific version), an
/// inline and an attached policy on the user, an inline policy on the group.
async fn made_by_hand(admin: &AwsClients, bucket: &str) {
    let s3 = admin.s3_for_region(REGION);
    let enabled = VersioningConfiguration::builder()
        .status(BucketVersioningStatus::Enabled)
        .build();
    s3.put_bucket_versioning()
        .bucket(bucket)
        .versioning_configuration(enabled)
        .send()
        .await
        .expect("versioning");
    s3.put_object()
        .bucket(bucket)
        .key("archive/db/archive.info")
        .body(ByteStream::from_static(b"backup"))
        .send()
        .await
        .expect("object");
    let iam = &admin.iam;
    let read = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
        "Action": "s3:GetObject", "Resource": format!("arn:aws:s3:::{bucket}/*")}]});
    let read = read.to_string();
    iam.put_user_policy()
        .user_name(bucket)
        .policy_name("by-hand")
        .policy_document(&read)
        .send()
        .await
        .expect("inline user policy");
    iam.put_group_policy()
        .group_name(bucket)
        .policy_name("by-hand")
        .policy_document(&read)
        .send()
        .await
        .expect("inline group policy");
    let managed = iam
        .create_policy()
        .policy_name(format!("by-hand-{bucket}"))
        .policy_document(&read)
        .send()
        .await
        .expect("managed policy");
    let arn = managed.policy().and_then(|p| p.arn()).expect("arn");
    iam.attach_user_policy()
        .user_name(bucket)
        .policy_arn(arn)
        .send()
        .await
        .expect("attach");
}

/// Runs key schedule rounds (as the service identity) until the rotated-out key is deleted,
/// each queued retirement job waited for.
async fn retire(env: &Env, name: &str) -> Result<(), Stopped> {
    let schedule = KeySchedule {
        db: env.app.db.clone(),
        iam: env.admin.iam.clone(),
        max_age: None,
        max_attempts: 5,
    };
    let stopped = |error: String| Stopped {
        flow: "retire-access-key",
        error,
    };
    for _ in 0..6 {
        schedule.round().await.map_err(|e| stopped(e.to_string()))?;
        for job_id in retirement_jobs(env, name).await {
            ended(
                "retire-access-key",
                Ok(env.app.wait_for_job(&job_id, JOB_DEADLINE).await),
            )?;
        }
        if retirement_done(env, name).await? {
            return Ok(());
        }
    }
    Err(stopped(
        "the old key was not deleted after 6 schedule rounds".into(),
    ))
}

async fn retirement_jobs(env: &Env, name: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT id::text FROM jobs WHERE subject_name = $1 AND kind = 'retire-access-key'
          ORDER BY created_at",
    )
    .bind(name)
    .fetch_all(&env.app.db)
    .await
    .expect("retirement jobs")
}

/// Whether the retirement deleted the old key (a halted retirement is a failure).
async fn retirement_done(env: &Env, name: &str) -> Result<bool, Stopped> {
    let (deleted, halted): (bool, bool) = sqlx::query_as(
        "SELECT coalesce(bool_or(k.deleted_at IS NOT NULL), false),
                coalesce(bool_or(k.halted_at IS NOT NULL), false)
           FROM key_retirements k JOIN backup_repositories r ON r.id = k.repository_id
          WHERE r.name = $1",
    )
    .bind(name)
    .fetch_one(&env.app.db)
    .await
    .expect("retirement");
    if halted {
        return Err(Stopped {
            flow: "retire-access-key",
            error: "the retirement halted".into(),
        });
    }
    Ok(deleted)
}
