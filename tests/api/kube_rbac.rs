//! The service's Kubernetes permissions as shipped in `deploy/base/rbac.yaml`, proven on the real
//! kube-apiserver: the ServiceAccount can do with Secrets exactly what provisioning (and
//! deprovisioning: delete) needs (every
//! other provisioning test runs as it), nothing cluster-wide and nothing outside the namespaces
//! its Role is bound in, and a Role missing any one of its verbs fails provisioning with the
//! service's permission-denied message naming that verb.

use std::time::Duration;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{ListParams, ObjectMeta, PostParams};
use serde_json::json;

use crate::support::env::{Env, bucket_for, unique_name};
use crate::support::kube_env::KubeEnv;
use crate::support::rbac::{Rbac, manifest_path};

#[test]
fn the_shipped_manifest_grants_get_create_patch_delete_on_secrets_and_nothing_else() {
    let rbac = Rbac::shipped();
    assert_eq!(
        rbac.user(),
        "system:serviceaccount:backup-provisioner:backup-provisioner"
    );
    let rules = rbac.rules();
    // Secrets (provisioning), then the PostgresCluster controller's (tests/api/controller.rs):
    // PostgresClusters to watch and annotate, Events to report on them.
    let granted: Vec<(Vec<String>, Vec<String>, Vec<String>)> = rules
        .iter()
        .map(|r| {
            (
                r.api_groups.clone().unwrap_or_default(),
                r.resources.clone().unwrap_or_default(),
                r.verbs.clone(),
            )
        })
        .collect();
    let strings = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        granted,
        [
            (
                strings(&[""]),
                strings(&["secrets"]),
                strings(&["get", "create", "patch", "delete"])
            ),
            (
                strings(&["postgres-operator.crunchydata.com"]),
                strings(&["postgresclusters"]),
                strings(&["get", "list", "watch", "patch"])
            ),
            (
                strings(&["events.k8s.io"]),
                strings(&["events"]),
                strings(&["create", "patch"])
            ),
        ]
    );
    assert!(rules.iter().all(|r| r.resource_names.is_none()));
    let mut verbs = rbac.secret_verbs();
    verbs.sort();
    assert_eq!(verbs, ["create", "delete", "get", "patch"]);
    assert_eq!(rbac.namespaces, ["zitadel", "holos"]);
}

#[test]
fn a_manifest_whose_roles_differ_or_that_grants_cluster_wide_is_rejected() {
    let text = std::fs::read_to_string(manifest_path()).unwrap();
    let widened = text.replacen(
        "verbs: [\"get\", \"create\", \"patch\", \"delete\"]",
        "verbs: [\"get\", \"create\", \"patch\", \"delete\", \"list\"]",
        1,
    );
    assert_ne!(widened, text);
    let err = Rbac::parse(&widened).unwrap_err();
    assert!(err.contains("differs"), "{err}");
    let cluster = format!(
        "{text}---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: x\n"
    );
    let err = Rbac::parse(&cluster).unwrap_err();
    assert!(err.contains("ClusterRole"), "{err}");
}

async fn allowed(admin: &kube::Client, user: &str, verb: &str, namespace: Option<&str>) -> bool {
    let review = SubjectAccessReview {
        metadata: ObjectMeta::default(),
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_owned()),
            resource_attributes: Some(ResourceAttributes {
                namespace: namespace.map(str::to_owned),
                verb: Some(verb.to_owned()),
                resource: Some("secrets".to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        },
        status: None,
    };
    Api::<SubjectAccessReview>::all(admin.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SubjectAccessReview")
        .status
        .is_some_and(|s| s.allowed)
}

/// Asked of the real authorizer (SubjectAccessReview) and tried with the token.
#[tokio::test]
async fn the_service_account_may_only_get_create_patch_and_delete_secrets_in_its_namespaces() {
    let k = KubeEnv::start_with(
        &["zitadel", "unbound"],
        crate::support::kube_env::KubeOptions {
            bound_in: Some(vec!["zitadel".into()]),
            ..Default::default()
        },
    )
    .await;
    let (admin, user) = (k.admin(), k.service_user.clone());
    let bound = k.ns("zitadel");
    for verb in ["get", "create", "patch", "delete"] {
        assert!(
            allowed(&admin, &user, verb, Some(bound)).await,
            "{verb} in {bound}"
        );
    }
    for verb in ["list", "watch", "update", "deletecollection"] {
        assert!(
            !allowed(&admin, &user, verb, Some(bound)).await,
            "{verb} in {bound}"
        );
    }
    for verb in ["get", "create", "patch", "list"] {
        assert!(
            !allowed(&admin, &user, verb, Some(k.ns("unbound"))).await,
            "{verb} in a namespace without the RoleBinding"
        );
        assert!(
            !allowed(&admin, &user, verb, None).await,
            "{verb} cluster-wide"
        );
    }

    // The same through the service's own client.
    let service = k.service_client();
    let denied = Api::<Secret>::all(service.clone())
        .list(&ListParams::default())
        .await
        .expect_err("listing every Secret is denied");
    assert!(
        matches!(&denied, kube::Error::Api(s) if s.code == 403),
        "{denied:?}"
    );
    let denied = Api::<Secret>::namespaced(service, bound)
        .list(&ListParams::default())
        .await
        .expect_err("listing is not granted");
    assert!(
        matches!(&denied, kube::Error::Api(s) if s.code == 403),
        "{denied:?}"
    );
}

/// For each verb of the shipped Role that provisioning uses (all but `delete`, which only
/// deprovisioning needs: `tests/api/deprovision.rs`), a copy of the Role without it: provisioning a repository
/// in that namespace fails at once (no retries, before any AWS change) with the service's
/// message naming the verb, the ServiceAccount and the namespace, and no Secret is left.
#[tokio::test]
async fn provisioning_fails_with_a_clear_403_naming_any_verb_the_role_lacks() {
    let rbac = Rbac::shipped();
    let mut verbs = rbac.secret_verbs();
    verbs.retain(|verb| verb != "delete");
    let logical: Vec<String> = verbs.iter().map(|v| format!("no{v}")).collect();
    let logical_refs: Vec<&str> = logical.iter().map(String::as_str).collect();
    let mut builder = Env::builder(&logical_refs);
    for verb in &verbs {
        builder = builder.service_rules(&format!("no{verb}"), rbac.rules_without(verb));
    }
    let env = builder.start().await;

    let mut jobs = Vec::new();
    for verb in &verbs {
        let name = unique_name(&format!("no{verb}"));
        let namespace = env.ns(&format!("no{verb}")).to_owned();
        let response = env
            .app
            .post_json(
                "/v1/backup-repositories",
                &env.app.operator(),
                &json!({"name": name, "namespace": namespace}),
            )
            .await;
        assert_eq!(response.status(), 202);
        let created: serde_json::Value = response.json().await.unwrap();
        let job = created["job"]["id"].as_str().unwrap().to_owned();
        jobs.push((verb.clone(), name, namespace, job));
    }
    for (verb, name, namespace, job) in jobs {
        let job = env.app.wait_for_job(&job, Duration::from_secs(120)).await;
        assert_eq!(job["state"], "failed", "without {verb}: {job:#}");
        assert_eq!(job["attempts"], 1, "a 403 is not retried: {job:#}");
        let error = job["last_error"].as_str().unwrap_or_default();
        eprintln!("without {verb}: {error}");
        assert!(
            error.contains("permission denied")
                && error.contains(&format!(
                    "grant \"{}\" the \"{verb}\" verb on \"secrets\"",
                    rbac.user()
                ))
                && error.contains(&format!(
                    "in namespace \"{namespace}\" (a Role and RoleBinding there)"
                )),
            "without {verb}: {error}"
        );
        assert!(
            env.kube
                .secret(&namespace, &bucket_for(&name))
                .await
                .is_none(),
            "without {verb} no Secret is made"
        );
        assert_eq!(env.repository(&name).await["state"], "failed");
    }
    // The Secret is checked (read, then applied as a dry run) before the first AWS change.
    assert_eq!(
        env.counter.mutating_count(),
        0,
        "{:?}",
        env.counter.mutating()
    );
    assert_eq!(env.kube.mutating_count(), 0, "{:?}", env.kube.requests());
    env.app.stop().await;
}
