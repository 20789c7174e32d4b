//! Plan mode (`report::Mode::Plan`): every section reads and reports the action it would take,
//! with zero mutating calls, and the apply that follows takes exactly those actions. Repair mode
//! changes settings of what exists but never creates a missing resource.

use backup_provisioner::provision::report::Mode;
use backup_provisioner::provision::{access_key, bucket, group, policy, user};
use serde_json::Value;

use super::{EU, Env, unique};

/// `setting:action` of every setting of a resource report.
fn actions(detail: &Value) -> Vec<String> {
    detail["settings"]
        .as_array()
        .expect("settings")
        .iter()
        .map(|s| {
            format!(
                "{}:{}",
                s["setting"].as_str().unwrap(),
                s["action"].as_str().unwrap()
            )
        })
        .collect()
}

/// `setting`, `expected`, `actual` and `action` of every setting (not the facts of a change
/// made, such as a new policy version's id).
fn core(detail: &Value) -> Vec<Value> {
    let fields = ["setting", "expected", "actual", "action"];
    let settings = detail["settings"].as_array().expect("settings");
    settings
        .iter()
        .map(|s| {
            fields
                .iter()
                .map(|f| (f.to_string(), s[f].clone()))
                .collect()
        })
        .collect()
}

/// Every section of the runbook's AWS part for `name`, in `mode`; their reports' details.
async fn sections(env: &Env, name: &str, mode: Mode) -> Vec<Value> {
    let s3 = env.s3(EU);
    let b = bucket::ensure_with(&s3, name, EU, "zitadel", mode)
        .await
        .unwrap();
    let (p, arn) = policy::ensure_with(env.iam(), name, mode).await.unwrap();
    let g = group::ensure_with(env.iam(), name, &arn, mode)
        .await
        .unwrap();
    let u = user::ensure_with(env.iam(), name, "zitadel", mode)
        .await
        .unwrap();
    vec![b.detail, p.detail, g.detail, u.detail]
}

#[tokio::test]
async fn a_plan_of_nothing_plans_every_resource_as_create_without_a_call_that_changes() {
    let env = Env::new(EU).await;
    let name = unique("plan-new");
    let plan = sections(&env, &name, Mode::Plan).await;
    env.assert_no_mutations("plan of new resources");
    for resource in &plan {
        assert_eq!(resource["resource"]["action"], "create", "{resource}");
        assert!(
            actions(resource)
                .iter()
                .all(|a| a.ends_with(":create") || a == "login_profile:none"),
            "{resource}"
        );
    }
    assert_eq!(
        plan[0]["settings"].as_array().unwrap().len(),
        6,
        "{}",
        plan[0]
    );
    // Repair mode does not create either.
    sections(&env, &name, Mode::Repair).await;
    env.assert_no_mutations("repair of missing resources");
    assert!(bucket::preflight(&env.s3(EU), &name, EU).await.is_ok());
    assert!(env.s3(EU).head_bucket().bucket(&name).send().await.is_err());
}

/// Drift on every repairable setting of the bucket, the group and the user, and a new policy
/// document.
async fn inject_drift(env: &Env, name: &str, policy_arn: &str) {
    let s3 = env.s3(EU);
    s3.delete_public_access_block()
        .bucket(name)
        .send()
        .await
        .unwrap();
    s3.delete_bucket_encryption()
        .bucket(name)
        .send()
        .await
        .unwrap();
    s3.delete_bucket_tagging()
        .bucket(name)
        .send()
        .await
        .unwrap();
    let iam = env.iam();
    let other = policy::document("someone-else").to_string();
    iam.create_policy_version()
        .policy_arn(policy_arn)
        .policy_document(other)
        .set_as_default(true)
        .send()
        .await
        .unwrap();
    iam.detach_group_policy()
        .group_name(name)
        .policy_arn(policy_arn)
        .send()
        .await
        .unwrap();
    iam.remove_user_from_group()
        .group_name(name)
        .user_name(name)
        .send()
        .await
        .unwrap();
    iam.create_login_profile()
        .user_name(name)
        .password("Passw0rd-drift!")
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn a_plan_reports_the_drift_the_apply_then_repairs_and_changes_nothing() {
    let env = Env::new(EU).await;
    let name = unique("plan-drift");
    let created = sections(&env, &name, Mode::Apply).await;
    let arn = created[1]["policy_arn"].as_str().unwrap().to_owned();
    let key = access_key::create(env.iam(), &name).await.unwrap();
    inject_drift(&env, &name, &arn).await;
    env.counter.reset();

    let mut plan = sections(&env, &name, Mode::Plan).await;
    let tag = access_key::ensure_description_tag_with(env.iam(), &name, &key.id, Mode::Plan);
    plan.push(tag.await.unwrap().detail);
    env.assert_no_mutations("plan of drift");
    let planned: Vec<Vec<String>> = plan.iter().map(actions).collect();
    for expected in [
        "public_access_block:create",
        "default_encryption:create",
        "tags:create",
        "document:update",
        "attached_policy:create",
        "group_membership:create",
        "login_profile:delete",
        "description_tag:create",
    ] {
        assert!(
            planned.concat().contains(&expected.to_owned()),
            "{expected}: {planned:?}"
        );
    }

    let mut applied = sections(&env, &name, Mode::Apply).await;
    let tag = access_key::ensure_description_tag(env.iam(), &name, &key.id);
    applied.push(tag.await.unwrap().detail);
    assert_eq!(applied.iter().map(actions).collect::<Vec<_>>(), planned);
    for (plan, apply) in plan.iter().zip(&applied) {
        assert_eq!(plan["resource"], apply["resource"]);
        assert_eq!(core(plan), core(apply), "expected/actual agree");
    }
    env.counter.reset();
    let again = sections(&env, &name, Mode::Plan).await;
    assert!(
        again.iter().flat_map(actions).all(|a| a.ends_with(":none")),
        "{again:?}"
    );
    env.assert_no_mutations("plan after the apply");
}

#[tokio::test]
async fn repair_mode_changes_settings_of_what_exists() {
    let env = Env::new(EU).await;
    let name = unique("repair");
    let created = sections(&env, &name, Mode::Apply).await;
    let arn = created[1]["policy_arn"].as_str().unwrap().to_owned();
    inject_drift(&env, &name, &arn).await;
    sections(&env, &name, Mode::Repair).await;
    env.counter.reset();
    let again = sections(&env, &name, Mode::Plan).await;
    assert!(
        again.iter().flat_map(actions).all(|a| a.ends_with(":none")),
        "{again:?}"
    );
    env.assert_no_mutations("plan after the repair");
}
