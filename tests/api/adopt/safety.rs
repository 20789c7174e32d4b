//! Adoption never destroys credentials (issue 10 item 1, review): the rewrite `repair` makes is
//! refused while it would erase a setting the runbook's `s3.conf` does not keep; verify's
//! repair never labels a Secret adopted as it is; and a create without `adopt` never turns an
//! adopted repository into a provisioned one.

use std::time::Duration;

use serde_json::{Value, json};

use super::runbook_by_hand::{aws_by_hand, create_secret, runbook_s3_conf};
use super::{adopt, assert_permanent, env, proxy};
use crate::support::env::{Env, bucket_for, unique_name};

const SECRET: &str = "pgo-s3-creds";
const OTHER_PASS: &str = "An0therCipherPassOfRepo3";
const OTHER_TOKEN: &str = "gcs-private-key-of-another-system";

/// `POST /v1/backup-repositories?dry_run=true` with `body` (plus name, namespace, adopt).
async fn dry_run(env: &Env, name: &str, body: Value) -> reqwest::Response {
    let mut request = json!({ "name": name, "namespace": env.ns("zitadel"), "adopt": true });
    if let (Some(request), Some(extra)) = (request.as_object_mut(), body.as_object()) {
        request.extend(extra.clone());
    }
    let path = "/v1/backup-repositories?dry_run=true";
    env.app.post_json(path, &env.app.operator(), &request).await
}

fn assert_no_change(env: &Env) {
    let aws = proxy(env).mutating();
    assert!(aws.is_empty(), "AWS changed: {aws:?}");
    let kube = env.kube.mutating_requests();
    assert!(kube.is_empty(), "Kubernetes changed: {kube:?}");
}

fn assert_no_value(text: &str) {
    for value in [OTHER_PASS, OTHER_TOKEN] {
        assert!(!text.contains(value), "a value is shown: {text}");
    }
}

/// A Secret whose repo3 has another cipher pass than repo2, and a data key holding another
/// system's credential: adopt with repair (and its dry run, and a reconcile) refuse before any
/// change, naming both; without repair it is adopted as it is.
#[tokio::test]
async fn repair_never_erases_what_the_runbook_s3_conf_would_not_keep() {
    let env = env().await;
    let name = unique_name("adoptl");
    let bucket = bucket_for(&name);
    let made = aws_by_hand(&env, &bucket).await;
    let ours = format!("repo3-cipher-pass={}", made.cipher_pass);
    let conf = runbook_s3_conf(&made).replace(&ours, &format!("repo3-cipher-pass={OTHER_PASS}"));
    let token = format!("{{\"private_key\": \"{OTHER_TOKEN}\"}}");
    let files = [("s3.conf", conf.as_str()), ("gcs.json", token.as_str())];
    create_secret(&env, "zitadel", SECRET, &files).await;
    let before = env.secret("zitadel", SECRET).await.expect("the Secret");
    proxy(&env).reset_counts();
    env.kube.clear_requests();
    let named = ["repo3-cipher-pass", "gcs.json", "Move those settings"];

    let planned = dry_run(
        &env,
        &name,
        json!({ "secret_name": SECRET, "repair": true }),
    )
    .await;
    assert_eq!(
        planned.status(),
        422,
        "the dry run refuses as the job would"
    );
    let problem: Value = planned.json().await.unwrap();
    let detail = problem["detail"].as_str().expect("detail");
    named
        .iter()
        .for_each(|n| assert!(detail.contains(n), "{n}: {detail}"));
    assert_no_value(detail);

    let body = json!({ "secret_name": SECRET, "repair": true });
    let job = adopt(&env, &name, body).await;
    assert_permanent(&job, &named);
    assert_no_value(&job.to_string());
    assert_no_change(&env);
    assert_eq!(env.secret("zitadel", SECRET).await.unwrap(), before);

    let job = adopt(&env, &name, json!({ "secret_name": SECRET })).await;
    assert_eq!(job["state"], "succeeded", "without repair: {job:#}");
    proxy(&env).reset_counts();
    env.kube.clear_requests();
    let job = env.reconcile(&name).await;
    assert_permanent(&job, &named);
    assert_no_change(&env);
    assert_eq!(env.secret("zitadel", SECRET).await.unwrap(), before);
    verify_with_repair_leaves_the_labels(&env, &name, &before).await;
    env.app.stop().await;
}

/// Verify with repair on a repository adopted without repair: the Secret is not ours, its
/// labels are reported (`leave`), never written (rotation would then rewrite it).
async fn verify_with_repair_leaves_the_labels(env: &Env, name: &str, before: &Value) {
    env.kube.clear_requests();
    let path = format!("/v1/backup-repositories/{name}/verify");
    let body = json!({ "repair": true });
    let response = env.app.post_json(&path, &env.app.operator(), &body).await;
    assert_eq!(response.status(), 202);
    let queued: Value = response.json().await.unwrap();
    let job_id = queued["job"]["id"].as_str().expect("job id");
    let job = env.app.wait_for_job(job_id, Duration::from_secs(90)).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let kube = env.kube.mutating_requests();
    assert!(kube.is_empty(), "verify wrote the Secret: {kube:?}");
    assert_eq!(&env.secret("zitadel", SECRET).await.unwrap(), before);
    let repository = env.repository(name).await;
    let resources = repository["verification"]["resources"].as_array().unwrap();
    let secret = resources
        .iter()
        .find(|r| r["resource"]["kind"] == "kube-secret");
    let settings = secret
        .and_then(|s| s["settings"].as_array())
        .expect("settings");
    let labels = settings.iter().find(|s| s["setting"] == "labels").unwrap();
    assert_eq!(labels["action"], "leave", "{labels:#}");
    let reason = labels["reason"].as_str().unwrap();
    assert!(reason.contains("adopted as it is"), "{reason}");
}

/// Once adopted, the same create without `adopt` (or naming another Secret) is a 409 that says
/// why, for the request and its dry run; nothing is queued and the hand-made key stays. Before
/// anything was recorded (provisioning refused the hand-made set), switching to `adopt` is the
/// remedy and is allowed.
#[tokio::test]
async fn a_create_never_switches_an_adopted_repository_to_provisioning() {
    let env = env().await;
    let name = unique_name("adopts");
    let bucket = bucket_for(&name);
    let made = aws_by_hand(&env, &bucket).await;
    let conf = runbook_s3_conf(&made);
    create_secret(&env, "zitadel", SECRET, &[("s3.conf", &conf)]).await;
    // Provisioning refuses the hand-made set before recording anything: its remedy, the same
    // request with "adopt", is still allowed.
    let namespace = env.ns("zitadel");
    let job = env
        .provision(json!({ "name": name, "namespace": namespace }))
        .await;
    assert_permanent(&job, &["\"adopt\": true"]);
    let job = adopt(&env, &name, json!({ "secret_name": SECRET })).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    proxy(&env).reset_counts();
    env.kube.clear_requests();

    let switches = [
        (json!({ "name": name, "namespace": namespace }), "adopt"),
        (
            json!({ "name": name, "namespace": namespace, "adopt": true, "secret_name": bucket }),
            "secret_name",
        ),
    ];
    for (body, field) in switches {
        for path in [
            "/v1/backup-repositories",
            "/v1/backup-repositories?dry_run=true",
        ] {
            let response = env.app.post_json(path, &env.app.operator(), &body).await;
            assert_eq!(response.status(), 409, "{path} {body}");
            let kind = response.headers()["content-type"].to_str().unwrap();
            assert_eq!(kind, "application/problem+json");
            let problem: Value = response.json().await.unwrap();
            let detail = problem["detail"].as_str().expect("detail");
            for word in [field, "adopted", "cannot change", "deprovision"] {
                assert!(detail.contains(word), "{word}: {detail}");
            }
        }
    }
    let body = json!({ "name": name, "namespace": namespace, "adopt": true,
                       "secret_name": SECRET, "allow_new_cipher_pass": true });
    let operator = env.app.operator();
    let refused = env
        .app
        .post_json("/v1/backup-repositories", &operator, &body)
        .await;
    assert_eq!(refused.status(), 422, "provisioning's switches with adopt");

    assert_no_change(&env);
    let repository = env.repository(&name).await;
    assert_eq!(repository["options"]["adopt"], true, "{repository:#}");
    assert_eq!(repository["last_job"]["kind"], "adopt-repository");
    let keys = env.admin.iam.list_access_keys().user_name(&bucket);
    let keys = keys.send().await.unwrap();
    let ids: Vec<_> = keys
        .access_key_metadata()
        .iter()
        .filter_map(|k| k.access_key_id())
        .collect();
    assert_eq!(
        ids,
        [made.access_key_id.as_str()],
        "the hand-made key, kept"
    );
    env.app.stop().await;
}
