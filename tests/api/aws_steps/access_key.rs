//! The access key step: lifecycle and the description tag.

use backup_provisioner::cloud::Outcome;
use backup_provisioner::provision::{access_key, group, policy, user};
use secrecy::ExposeSecret;
use serde_json::json;

use super::{EU, Env, expect_permanent, unique};

#[tokio::test]
async fn access_key_lifecycle_and_description_tag() {
    let env = Env::new(EU).await;
    let name = unique("keys");
    let (_, arn) = policy::ensure(env.iam(), &name).await.unwrap();
    group::ensure(env.iam(), &name, &arn).await.unwrap();
    user::ensure(env.iam(), &name, "zitadel").await.unwrap();
    let iam = env.iam();

    assert!(access_key::list(iam, &name).await.unwrap().is_empty());
    let key = access_key::create(iam, &name).await.unwrap();
    assert!(!key.id.is_empty() && !key.secret.expose_secret().is_empty());
    assert!(!format!("{key:?}").contains(key.secret.expose_secret()));
    let keys = access_key::list(iam, &name).await.unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].id, key.id);
    assert!(keys[0].is_active());
    assert!(keys[0].created.is_some());

    let tagged = access_key::ensure_description_tag(iam, &name, &key.id)
        .await
        .unwrap();
    assert_eq!(tagged.outcome, Outcome::Created);
    assert_eq!(tagged.detail["truncated"], json!(false));
    let tags = user::list_tags(iam, &name).await.unwrap();
    assert!(
        tags.iter()
            .any(|(k, v)| k == &key.id && v == access_key::DESCRIPTION),
        "{tags:?}"
    );

    env.counter.reset();
    let again = access_key::ensure_description_tag(iam, &name, &key.id)
        .await
        .unwrap();
    assert_eq!(again.outcome, Outcome::AlreadyPresent);
    access_key::list(iam, &name).await.unwrap();
    env.assert_no_mutations("second key tag run");

    // Two keys is IAM's limit: the third is a permanent error that says what to do.
    let second = access_key::create(iam, &name).await.unwrap();
    let message = expect_permanent(access_key::create(iam, &name).await);
    assert!(
        message.contains("LimitExceeded") && message.contains("delete unused keys"),
        "{message}"
    );

    let deleted = access_key::delete(iam, &name, &key.id).await.unwrap();
    assert_eq!(deleted.outcome, Outcome::Deleted);
    let gone = access_key::delete(iam, &name, &key.id).await.unwrap();
    assert_eq!(gone.outcome, Outcome::AlreadyPresent);
    assert_eq!(gone.detail["already_absent"], json!(true));
    let removed = access_key::remove_description_tag(iam, &name, &key.id)
        .await
        .unwrap();
    assert_eq!(removed.outcome, Outcome::Deleted);
    let removed = access_key::remove_description_tag(iam, &name, &key.id)
        .await
        .unwrap();
    assert_eq!(removed.outcome, Outcome::AlreadyPresent);
    let ids: Vec<String> = access_key::list(iam, &name)
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(ids, vec![second.id.clone()]);
    assert!(
        !user::list_tags(iam, &name)
            .await
            .unwrap()
            .iter()
            .any(|(k, _)| k == &key.id)
    );
}

#[test]
fn access_key_description_is_the_runbook_text() {
    assert_eq!(
        access_key::DESCRIPTION,
        "Used by pgbackrest associated with the PostgresCluster resource.  Refer to the \
         PostgresCluster resource pgbackrest.cofiguration.secret.name for the stored location \
         of the access key.  Synced from the Management Cluster using an ExternalSecret."
    );
    assert!(access_key::DESCRIPTION.chars().count() <= access_key::MAX_TAG_VALUE_CHARS);
}
