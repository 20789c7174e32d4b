//! The IAM steps: the policy (document, versions, description), the group and the user.

use aws_sdk_iam::types::PolicyVersion;
use backup_provisioner::cloud::Outcome;
use backup_provisioner::cloud::aws;
use backup_provisioner::provision::{group, policy, user};
use serde_json::{Value, json};

use super::{EU, Env, differences, unique};

// ---------------------------------------------------------------------------------------------
// Policy
// ---------------------------------------------------------------------------------------------

async fn default_document(iam: &aws_sdk_iam::Client, arn: &str) -> (String, Value) {
    let policy = iam.get_policy().policy_arn(arn).send().await.unwrap();
    let version_id = policy
        .policy()
        .unwrap()
        .default_version_id()
        .unwrap()
        .to_owned();
    let version = iam
        .get_policy_version()
        .policy_arn(arn)
        .version_id(&version_id)
        .send()
        .await
        .unwrap();
    let raw = version.policy_version().unwrap().document().unwrap();
    (
        version_id,
        policy::parse_document(raw).expect("document parses"),
    )
}

async fn versions(iam: &aws_sdk_iam::Client, arn: &str) -> Vec<PolicyVersion> {
    policy::list_versions(iam, arn).await.unwrap()
}

#[tokio::test]
async fn policy_is_created_exactly_and_rerun_is_read_only() {
    let env = Env::new(EU).await;
    let name = unique("policy");
    let (report, arn) = policy::ensure(env.iam(), &name).await.unwrap();
    assert_eq!(report.outcome, Outcome::Created);
    assert!(arn.ends_with(&format!(":policy/{name}")), "{arn}");
    assert_eq!(report.detail["policy_arn"], json!(arn));

    let got = env
        .iam()
        .get_policy()
        .policy_arn(&arn)
        .send()
        .await
        .unwrap();
    let got = got.policy().unwrap();
    assert_eq!(
        got.description(),
        Some(
            "Read and write access to a specific bucket for pgrest operating within a pgo PostgresCluster."
        )
    );
    assert_eq!(got.path(), Some("/"));
    assert_eq!(got.policy_name(), Some(name.as_str()));
    let (_, doc) = default_document(env.iam(), &arn).await;
    assert_eq!(
        doc,
        json!({
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": ["s3:GetBucketLocation", "s3:ListAllMyBuckets"],
                    "Resource": "arn:aws:s3:::*"
                },
                {
                    "Effect": "Allow",
                    "Action": "s3:*",
                    "Resource": [format!("arn:aws:s3:::{name}"), format!("arn:aws:s3:::{name}/*")]
                }
            ]
        })
    );

    env.counter.reset();
    let (second, arn2) = policy::ensure(env.iam(), &name).await.unwrap();
    assert_eq!(second.outcome, Outcome::AlreadyPresent, "{}", second.detail);
    assert_eq!(arn2, arn);
    env.assert_no_mutations("second policy run");
}

#[tokio::test]
async fn policy_document_drift_becomes_a_new_default_version() {
    let env = Env::new(EU).await;
    let name = unique("poldrift");
    let (_, arn) = policy::ensure(env.iam(), &name).await.unwrap();
    let tampered = json!({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::*"}]
    });
    env.iam()
        .create_policy_version()
        .policy_arn(&arn)
        .policy_document(tampered.to_string())
        .set_as_default(true)
        .send()
        .await
        .unwrap();

    let (report, _) = policy::ensure(env.iam(), &name).await.unwrap();
    assert_eq!(report.outcome, Outcome::Updated);
    assert_eq!(differences(&report.detail), vec!["document:repaired"]);
    assert_eq!(report.detail["differences"][0]["found"], tampered);
    let (version_id, doc) = default_document(env.iam(), &arn).await;
    assert_eq!(version_id, "v3");
    assert!(policy::documents_equivalent(&doc, &policy::document(&name)));
    assert_eq!(versions(env.iam(), &arn).await.len(), 3);
}

#[tokio::test]
async fn policy_with_five_versions_drops_the_oldest_non_default() {
    let env = Env::new(EU).await;
    let name = unique("polfive");
    let (_, arn) = policy::ensure(env.iam(), &name).await.unwrap();
    // v2..v5, with v5 (not the runbook document) as default.
    for n in 2..=5 {
        let doc = json!({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:GetObject",
                           "Resource": format!("arn:aws:s3:::other-{n}/*")}]
        });
        env.iam()
            .create_policy_version()
            .policy_arn(&arn)
            .policy_document(doc.to_string())
            .set_as_default(n == 5)
            .send()
            .await
            .unwrap();
    }
    assert_eq!(versions(env.iam(), &arn).await.len(), 5);

    env.counter.reset();
    let (report, _) = policy::ensure(env.iam(), &name).await.unwrap();
    assert_eq!(report.outcome, Outcome::Updated);
    assert_eq!(
        report.detail["differences"][0]["deleted_version_id"],
        json!("v1")
    );
    assert_eq!(
        env.counter.mutating().keys().cloned().collect::<Vec<_>>(),
        vec!["iam:CreatePolicyVersion", "iam:DeletePolicyVersion"]
    );
    let mut ids: Vec<String> = versions(env.iam(), &arn)
        .await
        .iter()
        .map(|v| v.version_id().unwrap().to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["v2", "v3", "v4", "v5", "v6"]);
    let (default_id, doc) = default_document(env.iam(), &arn).await;
    assert_eq!(default_id, "v6");
    assert!(policy::documents_equivalent(&doc, &policy::document(&name)));
}

#[tokio::test]
async fn policy_description_difference_is_reported_not_fatal() {
    let env = Env::new(EU).await;
    let name = unique("poldesc");
    env.iam()
        .create_policy()
        .policy_name(&name)
        .description("made by hand")
        .policy_document(policy::document(&name).to_string())
        .send()
        .await
        .unwrap();
    env.counter.reset();
    let (report, _) = policy::ensure(env.iam(), &name).await.unwrap();
    assert_eq!(report.outcome, Outcome::AlreadyPresent);
    assert_eq!(
        differences(&report.detail),
        vec!["description:left unchanged"]
    );
    assert_eq!(
        report.detail["differences"][0]["found"],
        json!("made by hand")
    );
    env.assert_no_mutations("description difference");
}

// ---------------------------------------------------------------------------------------------
// Group and user
// ---------------------------------------------------------------------------------------------

async fn assert_group_and_user(
    iam: &aws_sdk_iam::Client,
    name: &str,
    policy_arn: &str,
    repository: &str,
) {
    assert_eq!(
        group::attached_policies(iam, name).await.unwrap(),
        vec![policy_arn.to_owned()]
    );
    assert_eq!(
        user::groups_for_user(iam, name).await.unwrap(),
        vec![name.to_owned()]
    );
    let login = iam.get_login_profile().user_name(name).send().await;
    assert_eq!(
        aws::error_code(&login.expect_err("no login profile")),
        Some("NoSuchEntity")
    );
    let mut tags = user::list_tags(iam, name).await.unwrap();
    tags.sort();
    assert_eq!(
        tags,
        vec![
            (
                "backup-provisioner/repository".to_owned(),
                repository.to_owned()
            ),
            ("managed-by".to_owned(), "backup-provisioner".to_owned()),
        ]
    );
    let got = iam.get_user().user_name(name).send().await.unwrap();
    assert_eq!(got.user().unwrap().path(), "/");
}

#[tokio::test]
async fn group_and_user_are_created_and_rerun_is_read_only() {
    let env = Env::new(EU).await;
    let name = unique("iam");
    let (_, arn) = policy::ensure(env.iam(), &name).await.unwrap();

    let g = group::ensure(env.iam(), &name, &arn).await.unwrap();
    assert_eq!(g.outcome, Outcome::Created);
    let u = user::ensure(env.iam(), &name, "zitadel").await.unwrap();
    assert_eq!(u.outcome, Outcome::Created);
    assert!(u.upstream_request_id.is_some());
    assert_group_and_user(env.iam(), &name, &arn, "zitadel").await;

    env.counter.reset();
    let g = group::ensure(env.iam(), &name, &arn).await.unwrap();
    let u = user::ensure(env.iam(), &name, "zitadel").await.unwrap();
    assert_eq!(g.outcome, Outcome::AlreadyPresent, "{}", g.detail);
    assert_eq!(u.outcome, Outcome::AlreadyPresent, "{}", u.detail);
    env.assert_no_mutations("second group/user run");
}

#[tokio::test]
async fn group_and_user_drift_is_repaired() {
    let env = Env::new(EU).await;
    let name = unique("iamdrift");
    let (_, arn) = policy::ensure(env.iam(), &name).await.unwrap();
    group::ensure(env.iam(), &name, &arn).await.unwrap();
    user::ensure(env.iam(), &name, "zitadel").await.unwrap();

    let iam = env.iam();
    iam.detach_group_policy()
        .group_name(&name)
        .policy_arn(&arn)
        .send()
        .await
        .unwrap();
    iam.remove_user_from_group()
        .group_name(&name)
        .user_name(&name)
        .send()
        .await
        .unwrap();
    iam.untag_user()
        .user_name(&name)
        .tag_keys("managed-by")
        .send()
        .await
        .unwrap();
    iam.create_login_profile()
        .user_name(&name)
        .password("Sup3r-secret-Passw0rd!")
        .send()
        .await
        .unwrap();

    let g = group::ensure(iam, &name, &arn).await.unwrap();
    assert_eq!(g.outcome, Outcome::Updated);
    assert_eq!(differences(&g.detail), vec!["attached_policy:repaired"]);
    let u = user::ensure(iam, &name, "zitadel").await.unwrap();
    assert_eq!(u.outcome, Outcome::Updated);
    assert_eq!(
        differences(&u.detail),
        vec![
            "tags:repaired",
            "group_membership:repaired",
            "login_profile:repaired"
        ]
    );
    assert!(
        !u.detail.to_string().contains("Sup3r"),
        "no secrets in the detail"
    );
    assert_group_and_user(iam, &name, &arn, "zitadel").await;
}
