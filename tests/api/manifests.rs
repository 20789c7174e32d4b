//! `GET /v1/backup-repositories/{name}/manifests` (`provision::manifests`): the PostgresCluster
//! fragment and the ExternalSecret of a provisioned repository, as JSON and as YAML (the same
//! two objects), naming the Secret the service wrote and holding none of its values; 404 for an
//! unknown repository, 409 for one not ready, both problem+json; and the ExternalSecret passes
//! a strict server-side dry run on the real kube-apiserver (against the ExternalSecret CRD the
//! deploy tests use, `tests/fixtures/deploy/externalsecret-crd.yaml`).

use std::path::Path;

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::pinned_kind;
use serde_json::{Value, json};

use crate::support::app::eventually;
use crate::support::env::{Env, conf_value, unique_name};

const NAMESPACE: &str = "zitadel";
const MANAGER: &str = "manifests-test";

async fn manifests(env: &Env, name: &str, accept: Option<&str>) -> reqwest::Response {
    let mut request = env
        .app
        .client
        .get(
            env.app
                .url(&format!("/v1/backup-repositories/{name}/manifests")),
        )
        .bearer_auth(env.app.viewer());
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    request.send().await.expect("request")
}

fn content_type(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_ready_repository_has_its_fragment_and_external_secret_as_json_and_as_yaml() {
    let env = Env::start(&[NAMESPACE]).await;
    let name = unique_name("wired");
    let ns = env.ns(NAMESPACE).to_owned();
    let job = env.provision(json!({"name": name, "namespace": ns})).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let repo = env.repository(&name).await;
    let (bucket, region) = (
        repo["bucket"].as_str().unwrap(),
        repo["region"].as_str().unwrap(),
    );

    let response = manifests(&env, &name, None).await;
    assert_eq!(response.status(), 200);
    assert!(content_type(&response).starts_with("application/json"));
    let json_text = response.text().await.expect("body");
    let body: Value = serde_json::from_str(&json_text).expect("json");
    let cluster = &body["postgres_cluster"];
    assert_eq!(
        cluster["apiVersion"],
        "postgres-operator.crunchydata.com/v1beta1"
    );
    assert_eq!(cluster["kind"], "PostgresCluster");
    assert_eq!(cluster["metadata"], json!({"name": name, "namespace": ns}));
    let pgbackrest = &cluster["spec"]["backups"]["pgbackrest"];
    assert_eq!(
        pgbackrest["global"],
        json!({
            "repo2-path": format!("/pgbackrest/{ns}/{name}/repo2"),
            "repo2-cipher-type": "aes-256-cbc",
            "repo2-retention-full": "14",
            "repo2-retention-full-type": "time",
        })
    );
    assert_eq!(
        pgbackrest["repos"],
        json!([{
            "name": "repo2",
            "s3": {
                "bucket": bucket,
                "endpoint": format!("s3.dualstack.{region}.amazonaws.com"),
                "region": region,
            },
            "schedules": {"full": "0 1 * * 0", "differential": "0 1 * * 1-6"},
        }])
    );
    assert_eq!(
        pgbackrest["configuration"],
        json!([{"secret": {"name": bucket, "items": [{"key": "s3.conf", "path": "s3.conf"}]}}])
    );
    let external = &body["external_secret"];
    assert_eq!(external["apiVersion"], "external-secrets.io/v1");
    assert_eq!(external["kind"], "ExternalSecret");
    assert_eq!(
        external["metadata"],
        json!({"name": bucket, "namespace": ns})
    );
    assert_eq!(
        external["spec"],
        json!({
            "refreshInterval": "1h",
            "secretStoreRef": {"kind": "SecretStore", "name": "default"},
            "target": {"name": bucket, "creationPolicy": "Owner"},
            "dataFrom": [{"extract": {"key": bucket}}],
        })
    );

    // YAML: the same two objects, as two documents; "14" stays a string.
    let response = manifests(&env, &name, Some("application/yaml")).await;
    assert_eq!(response.status(), 200);
    assert!(content_type(&response).starts_with("application/yaml"));
    let yaml_text = response.text().await.expect("body");
    let documents: Vec<Value> = serde_saphyr::from_multiple(&yaml_text).expect("YAML");
    assert_eq!(
        documents,
        vec![cluster.clone(), external.clone()],
        "{yaml_text}"
    );

    // No secret value in either form.
    let conf = env.s3_conf(NAMESPACE, bucket).await.expect("s3.conf");
    for key in ["repo2-cipher-pass", "repo2-s3-key-secret"] {
        let value = conf_value(&conf, key);
        assert!(
            !json_text.contains(&value) && !yaml_text.contains(&value),
            "{key} leaked"
        );
    }

    assert_external_secret_applies(&env, external).await;
    env.app.stop().await;
}

#[tokio::test]
async fn an_unknown_or_unready_repository_has_no_manifests() {
    let env = Env::builder(&[NAMESPACE]).workers(0).start().await;
    let response = manifests(&env, "nosuch", Some("application/yaml")).await;
    assert_eq!(response.status(), 404);
    assert_eq!(content_type(&response), "application/problem+json");
    let name = unique_name("pending");
    let created = env
        .app
        .post_json(
            "/v1/backup-repositories",
            &env.app.operator(),
            &json!({"name": name, "namespace": env.ns(NAMESPACE)}),
        )
        .await;
    assert_eq!(created.status(), 202);
    let response = manifests(&env, &name, None).await;
    assert_eq!(response.status(), 409);
    assert_eq!(content_type(&response), "application/problem+json");
    let problem: Value = response.json().await.expect("problem");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("not ready"),
        "{problem}"
    );
    let anonymous = env
        .app
        .client
        .get(
            env.app
                .url(&format!("/v1/backup-repositories/{name}/manifests")),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(anonymous.status(), 401);
    env.app.stop().await;
}

/// Server-side apply (dry run, strict field validation) of the ExternalSecret in its namespace
/// of the shared kube-apiserver, after installing the ExternalSecret CRD of the deploy tests.
async fn assert_external_secret_applies(env: &Env, external: &Value) {
    let client = env.kube.admin();
    let crd_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deploy/externalsecret-crd.yaml");
    let crd: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(crd_path).expect("CRD")).expect("CRD YAML");
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    crds.patch(
        crd["metadata"]["name"].as_str().expect("name"),
        &PatchParams::apply(MANAGER),
        &Patch::Apply(&crd),
    )
    .await
    .expect("installing the ExternalSecret CRD");
    let gvk = GroupVersionKind::gvk("external-secrets.io", "v1", "ExternalSecret");
    let (resource, _) = eventually(
        std::time::Duration::from_secs(30),
        "ExternalSecret served",
        || {
            let client = client.clone();
            let gvk = gvk.clone();
            async move { pinned_kind(&client, &gvk).await.ok() }
        },
    )
    .await;
    let namespace = external["metadata"]["namespace"]
        .as_str()
        .expect("namespace");
    let api: Api<DynamicObject> = Api::namespaced_with(client, namespace, &resource);
    let params = PatchParams::apply(MANAGER).validation_strict().dry_run();
    let name = external["metadata"]["name"].as_str().expect("name");
    api.patch(name, &params, &Patch::Apply(external))
        .await
        .unwrap_or_else(|e| panic!("the ExternalSecret is refused: {e}"));
    let mut misspelt = external.clone();
    misspelt["spec"]["dataFrom"][0]["extract"]["kee"] = json!("x");
    let refused = api.patch(name, &params, &Patch::Apply(&misspelt)).await;
    assert!(refused.is_err(), "strict validation is on");
}

/// The fragment merged into a PostgresCluster manifest (repo1 kept, repo2 and its settings
/// added, as the README says to) is created by the real kube-apiserver with strict field
/// validation, against PGO's PostgresCluster CRD of the controller tests
/// (`tests/fixtures/pgo/postgresclusters-crd.yaml`: `spec.backups` keeps what it is given, so
/// this proves the object around the fragment, not pgBackRest's fields, which the pgBackRest
/// end-to-end run takes from the fragment).
#[tokio::test]
async fn the_fragment_merged_into_a_postgres_cluster_is_accepted_by_the_api_server() {
    let env = Env::start(&[NAMESPACE]).await;
    let name = unique_name("merged");
    let ns = env.ns(NAMESPACE).to_owned();
    let job = env.provision(json!({"name": name, "namespace": ns})).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let body: Value = manifests(&env, &name, None)
        .await
        .json()
        .await
        .expect("json");
    let fragment = &body["postgres_cluster"];
    let pgbackrest = &fragment["spec"]["backups"]["pgbackrest"];
    let mut repos = vec![json!({"name": "repo1", "volume": {"volumeClaimSpec": {}}})];
    repos.extend(
        pgbackrest["repos"]
            .as_array()
            .expect("repos")
            .iter()
            .cloned(),
    );
    let mut cluster = json!({
        "apiVersion": fragment["apiVersion"],
        "kind": fragment["kind"],
        "metadata": fragment["metadata"],
        "spec": {
            "postgresVersion": 16,
            "instances": [{"name": "pgha1", "replicas": 1}],
            "backups": {"pgbackrest": pgbackrest.clone()},
        },
    });
    cluster["spec"]["backups"]["pgbackrest"]["repos"] = Value::Array(repos);

    let client = env.kube.admin();
    let crd_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pgo/postgresclusters-crd.yaml");
    let crd: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(crd_path).expect("CRD")).expect("CRD YAML");
    let crds: Api<
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    > = Api::all(client.clone());
    crds.patch(
        crd["metadata"]["name"].as_str().expect("name"),
        &PatchParams::apply("test-harness").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("installing the PostgresCluster CRD");
    let gvk = GroupVersionKind::gvk(
        "postgres-operator.crunchydata.com",
        "v1beta1",
        "PostgresCluster",
    );
    let (resource, _) = eventually(
        std::time::Duration::from_secs(30),
        "PostgresCluster served",
        || {
            let client = client.clone();
            let gvk = gvk.clone();
            async move { pinned_kind(&client, &gvk).await.ok() }
        },
    )
    .await;
    let api: Api<DynamicObject> = Api::namespaced_with(client, &ns, &resource);
    let applied = api
        .patch(
            &name,
            &PatchParams::apply(MANAGER).validation_strict(),
            &Patch::Apply(&cluster),
        )
        .await
        .unwrap_or_else(|e| panic!("the PostgresCluster is refused: {e}"));
    let stored = serde_json::to_value(&applied).expect("json");
    let backups = &stored["spec"]["backups"]["pgbackrest"];
    assert_eq!(backups["repos"][1], pgbackrest["repos"][0], "{stored:#}");
    assert_eq!(backups["global"], pgbackrest["global"]);
    assert_eq!(backups["configuration"], pgbackrest["configuration"]);
    env.app.stop().await;
}
