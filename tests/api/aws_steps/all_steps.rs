//! All steps: call counts of a first and a second run.

use std::time::Duration;

use backup_provisioner::cloud::Outcome;
use backup_provisioner::provision::{access_key, bucket, credential_check, group, policy, user};
use secrecy::ExposeSecret;

use super::{EU, Env, unique};

#[tokio::test]
async fn all_steps_second_run_makes_no_mutating_calls() {
    let env = Env::new(EU).await;
    let name = unique("all");
    let s3 = env.s3(EU);

    async fn idempotent_steps(env: &Env, s3: &aws_sdk_s3::Client, name: &str) -> Vec<Outcome> {
        let b = bucket::ensure(s3, name, EU, "zitadel").await.unwrap();
        let (p, arn) = policy::ensure(env.iam(), name).await.unwrap();
        let g = group::ensure(env.iam(), name, &arn).await.unwrap();
        let u = user::ensure(env.iam(), name, "zitadel").await.unwrap();
        vec![b.outcome, p.outcome, g.outcome, u.outcome]
    }

    // First run: every step, a new key, its description tag and the credential check.
    let outcomes = idempotent_steps(&env, &s3, &name).await;
    assert_eq!(outcomes, vec![Outcome::Created; 4]);
    assert!(access_key::list(env.iam(), &name).await.unwrap().is_empty());
    let key = access_key::create(env.iam(), &name).await.unwrap();
    access_key::ensure_description_tag(env.iam(), &name, &key.id)
        .await
        .unwrap();
    let first = env.counter.clone().snapshot();
    let (first_mut, first_reads) = (env.counter.mutating_count(), env.counter.read_count());
    let checker = env
        .clients
        .s3_with_static_credentials(EU, &key.id, key.secret.expose_secret());
    let check = credential_check::verify(
        &checker,
        &name,
        Duration::from_secs(5),
        Duration::from_millis(20),
    )
    .await
    .unwrap();
    assert_eq!(check.outcome, Outcome::Created);
    let with_check = env.counter.snapshot();

    // Second run: same steps; the key is kept (listed) and its tag checked.
    env.counter.reset();
    let outcomes = idempotent_steps(&env, &s3, &name).await;
    assert_eq!(outcomes, vec![Outcome::AlreadyPresent; 4]);
    assert_eq!(access_key::list(env.iam(), &name).await.unwrap().len(), 1);
    let tag = access_key::ensure_description_tag(env.iam(), &name, &key.id)
        .await
        .unwrap();
    assert_eq!(tag.outcome, Outcome::AlreadyPresent);
    env.assert_no_mutations("second run of all steps");
    eprintln!(
        "first run (without credential check): {first_mut} mutating, {first_reads} reads: {first:?}\n\
         credential check adds: {:?}\n\
         second run: {} mutating, {} reads: {:?}",
        with_check
            .iter()
            .filter(|(k, v)| first.get(*k) != Some(*v))
            .collect::<Vec<_>>(),
        env.counter.mutating_count(),
        env.counter.read_count(),
        env.counter.snapshot()
    );
}
