//! The emulator driven by the real `kube` client over plain HTTP.

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, Config};
use kube_emulator::{Emulator, RunningEmulator};
use serde_json::json;

const ADMIN: &str = "admin-token";

fn client(url: &str, token: Option<&str>) -> Client {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut config = Config::new(url.parse().expect("url"));
    config.auth_info.token = token.map(|t| secrecy::SecretString::from(t.to_string()));
    Client::try_from(config).expect("client")
}

async fn setup() -> (RunningEmulator, Client) {
    let emulator = Emulator::new();
    emulator.create_namespace("ns").unwrap();
    emulator.add_token(ADMIN);
    let running = kube_emulator::start(emulator).await.expect("start");
    let client = client(&running.url(), Some(ADMIN));
    (running, client)
}

fn secret(name: &str, data: &[(&str, &str)], labels: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: (!labels.is_empty()).then(|| {
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    }
}

fn api_error(err: kube::Error) -> kube::core::Status {
    match err {
        kube::Error::Api(status) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn data_of(s: &Secret, key: &str) -> String {
    String::from_utf8(s.data.as_ref().unwrap()[key].0.clone()).unwrap()
}

#[tokio::test]
async fn get_opt_none_then_create_and_get() {
    let (running, client) = setup().await;
    let api: Api<Secret> = Api::namespaced(client, "ns");
    assert!(api.get_opt("a").await.unwrap().is_none());

    let created = api
        .create(
            &PostParams::default(),
            &secret("a", &[("k", "v")], &[("app", "x")]),
        )
        .await
        .unwrap();
    let meta = &created.metadata;
    assert_eq!(meta.namespace.as_deref(), Some("ns"));
    assert!(meta.uid.as_deref().is_some_and(|u| u.len() == 36));
    assert!(meta.creation_timestamp.is_some());
    let rv: u64 = meta.resource_version.as_deref().unwrap().parse().unwrap();
    assert!(rv > 0);
    assert_eq!(created.type_.as_deref(), Some("Opaque"));

    let got = api.get("a").await.unwrap();
    assert_eq!(data_of(&got, "k"), "v");
    assert_eq!(got.metadata.uid, meta.uid);
    assert_eq!(got.metadata.resource_version, meta.resource_version);
    assert_eq!(
        running.emulator.secret_data("ns", "a").unwrap()["k"],
        b"v".to_vec()
    );
}

#[tokio::test]
async fn create_twice_is_already_exists() {
    let (_running, client) = setup().await;
    let api: Api<Secret> = Api::namespaced(client, "ns");
    api.create(&PostParams::default(), &secret("a", &[], &[]))
        .await
        .unwrap();
    let status = api_error(
        api.create(&PostParams::default(), &secret("a", &[], &[]))
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code, 409);
    assert_eq!(status.reason, "AlreadyExists");
    assert!(status.is_already_exists());
    assert_eq!(status.message, "secrets \"a\" already exists");
    assert_eq!(status.details.unwrap().kind, "secrets");
}

#[tokio::test]
async fn string_data_becomes_data() {
    let (_running, client) = setup().await;
    let api: Api<Secret> = Api::namespaced(client, "ns");
    let mut s = secret("sd", &[], &[]);
    s.string_data = Some(BTreeMap::from([("conf".to_string(), "a=b\n".to_string())]));
    let created = api.create(&PostParams::default(), &s).await.unwrap();
    assert!(created.string_data.is_none());
    assert_eq!(data_of(&created, "conf"), "a=b\n");
}

#[tokio::test]
async fn update_with_stale_resource_version_conflicts() {
    let (_running, client) = setup().await;
    let api: Api<Secret> = Api::namespaced(client, "ns");
    let created = api
        .create(&PostParams::default(), &secret("a", &[("k", "1")], &[]))
        .await
        .unwrap();

    let mut first = created.clone();
    first.data = secret("a", &[("k", "2")], &[]).data;
    let updated = api
        .replace("a", &PostParams::default(), &first)
        .await
        .unwrap();
    assert_ne!(
        updated.metadata.resource_version,
        created.metadata.resource_version
    );
    assert_eq!(data_of(&updated, "k"), "2");

    // `created` still carries the old resourceVersion.
    let mut stale = created.clone();
    stale.data = secret("a", &[("k", "3")], &[]).data;
    let status = api_error(
        api.replace("a", &PostParams::default(), &stale)
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code, 409);
    assert_eq!(status.reason, "Conflict");
    assert!(status.message.contains("the object has been modified"));
    assert_eq!(data_of(&api.get("a").await.unwrap(), "k"), "2");

    // Replacing a missing object is NotFound (secrets do not allow create-on-update).
    let status = api_error(
        api.replace(
            "missing",
            &PostParams::default(),
            &secret("missing", &[], &[]),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(status.code, 404);
}

#[tokio::test]
async fn type_is_immutable() {
    let (_running, client) = setup().await;
    let api: Api<Secret> = Api::namespaced(client, "ns");
    let mut created = api
        .create(&PostParams::default(), &secret("a", &[], &[]))
        .await
        .unwrap();
    created.type_ = Some("kubernetes.io/tls".into());
    let status = api_error(
        api.replace("a", &PostParams::default(), &created)
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code, 422);
    assert_eq!(status.reason, "Invalid");
    assert!(status.message.starts_with("Secret \"a\" is invalid: type"));
}

#[tokio::test]
async fn invalid_names_and_keys_are_invalid() {
    let (_running, client) = setup().await;
    let api: Api<Secret> = Api::namespaced(client, "ns");
    let status = api_error(
        api.create(&PostParams::default(), &secret("Bad_Name", &[], &[]))
            .await
            .unwrap_err(),
    );
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    assert!(status.message.contains("metadata.name"));
    let status = api_error(
        api.create(
            &PostParams::default(),
            &secret("ok", &[("bad key", "x")], &[]),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(status.code, 422);
    assert!(status.message.contains("data[bad key]"));
    let status = api_error(
        api.create(
            &PostParams::default(),
            &secret("ok", &[], &[("bad label", "x")]),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(status.code, 422);
}

#[tokio::test]
async fn list_with_label_selectors() {
    let (running, client) = setup().await;
    running.emulator.create_namespace("other").unwrap();
    let api: Api<Secret> = Api::namespaced(client.clone(), "ns");
    let other: Api<Secret> = Api::namespaced(client.clone(), "other");
    api.create(
        &PostParams::default(),
        &secret("a", &[], &[("app", "x"), ("tier", "db")]),
    )
    .await
    .unwrap();
    api.create(&PostParams::default(), &secret("b", &[], &[("app", "y")]))
        .await
        .unwrap();
    api.create(&PostParams::default(), &secret("c", &[], &[]))
        .await
        .unwrap();
    other
        .create(&PostParams::default(), &secret("d", &[], &[("app", "x")]))
        .await
        .unwrap();

    let names = |list: kube::core::ObjectList<Secret>| -> Vec<String> {
        list.items
            .into_iter()
            .map(|s| s.metadata.name.unwrap())
            .collect()
    };
    let lp = |sel: &str| ListParams::default().labels(sel);
    assert_eq!(
        names(api.list(&ListParams::default()).await.unwrap()),
        ["a", "b", "c"]
    );
    assert_eq!(names(api.list(&lp("app=x")).await.unwrap()), ["a"]);
    assert_eq!(names(api.list(&lp("app!=x")).await.unwrap()), ["b", "c"]);
    assert_eq!(names(api.list(&lp("app")).await.unwrap()), ["a", "b"]);
    assert_eq!(names(api.list(&lp("!app")).await.unwrap()), ["c"]);
    assert_eq!(names(api.list(&lp("app=x,tier=db")).await.unwrap()), ["a"]);
    assert_eq!(
        names(api.list(&lp("app in (x,y)")).await.unwrap()),
        ["a", "b"]
    );
    assert_eq!(
        names(
            api.list(&ListParams::default().fields("metadata.name=b"))
                .await
                .unwrap()
        ),
        ["b"]
    );

    let all: Api<Secret> = Api::all(client);
    assert_eq!(names(all.list(&lp("app=x")).await.unwrap()), ["a", "d"]);

    let page = api.list(&ListParams::default().limit(2)).await.unwrap();
    let token = page.metadata.continue_.clone().unwrap();
    assert_eq!(names(page), ["a", "b"]);
    let rest = api
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert!(rest.metadata.continue_.as_deref().unwrap_or("").is_empty());
    assert_eq!(names(rest), ["c"]);

    let status = api_error(api.list(&lp("a b")).await.unwrap_err());
    assert_eq!(status.code, 400);
}

fn managers(s: &Secret) -> Vec<(String, String)> {
    s.metadata
        .managed_fields
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| (m.manager.clone().unwrap(), m.operation.clone().unwrap()))
        .collect()
}

#[tokio::test]
async fn server_side_apply_create_update_conflict_force() {
    let (_running, client) = setup().await;
    let api: Api<Secret> = Api::namespaced(client, "ns");
    let config = |value: &str| {
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s", "labels": {"owner": "a"}},
            "type": "Opaque",
            "stringData": {"conf": value},
        })
    };

    // Apply creates.
    let created = api
        .patch(
            "s",
            &PatchParams::apply("mgr-a"),
            &Patch::Apply(config("one")),
        )
        .await
        .unwrap();
    assert_eq!(data_of(&created, "conf"), "one");
    assert_eq!(managers(&created), [("mgr-a".into(), "Apply".into())]);
    let fields = created.metadata.managed_fields.as_ref().unwrap()[0]
        .fields_v1
        .as_ref()
        .unwrap()
        .0
        .clone();
    assert_eq!(
        fields,
        json!({"f:data": {".": {}, "f:conf": {}},
               "f:metadata": {"f:labels": {".": {}, "f:owner": {}}},
               "f:type": {}})
    );
    let created_rv = created.metadata.resource_version.clone();

    // The same apply again changes nothing, not even the resourceVersion.
    let again = api
        .patch(
            "s",
            &PatchParams::apply("mgr-a"),
            &Patch::Apply(config("one")),
        )
        .await
        .unwrap();
    assert_eq!(again.metadata.resource_version, created_rv);

    // An apply by the same manager updates.
    let updated = api
        .patch(
            "s",
            &PatchParams::apply("mgr-a"),
            &Patch::Apply(config("two")),
        )
        .await
        .unwrap();
    assert_eq!(data_of(&updated, "conf"), "two");
    assert_ne!(updated.metadata.resource_version, created_rv);

    // Another manager changing an owned field conflicts without force.
    let status = api_error(
        api.patch(
            "s",
            &PatchParams::apply("mgr-b"),
            &Patch::Apply(config("three")),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(status.code, 409);
    assert_eq!(status.reason, "Conflict");
    assert_eq!(
        status.message,
        "Apply failed with 1 conflict: conflict with \"mgr-a\" using v1: .data.conf"
    );
    assert_eq!(data_of(&api.get("s").await.unwrap(), "conf"), "two");

    // Applying the same values is shared ownership, not a conflict.
    let shared = api
        .patch(
            "s",
            &PatchParams::apply("mgr-b"),
            &Patch::Apply(config("two")),
        )
        .await
        .unwrap();
    assert_eq!(managers(&shared).len(), 2);

    // With force, the other manager takes the field.
    let forced = api
        .patch(
            "s",
            &PatchParams::apply("mgr-c").force(),
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "s"},
                "data": {"conf": "Zm9yY2Vk"},
            })),
        )
        .await
        .unwrap();
    assert_eq!(data_of(&forced, "conf"), "forced");
    let owners: Vec<String> = forced
        .metadata
        .managed_fields
        .unwrap()
        .iter()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .unwrap()
                .0
                .pointer("/f:data/f:conf")
                .is_some()
        })
        .map(|m| m.manager.clone().unwrap())
        .collect();
    assert_eq!(owners, ["mgr-c"]);

    // Fields an applier stops applying are removed when nobody else owns them.
    let trimmed = api
        .patch(
            "s",
            &PatchParams::apply("mgr-c"),
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "s"},
                "data": {"other": "eA=="},
            })),
        )
        .await
        .unwrap();
    let keys: Vec<&String> = trimmed.data.as_ref().unwrap().keys().collect();
    assert_eq!(keys, ["other"]);
}

#[tokio::test]
async fn apply_needs_field_manager_and_a_namespace() {
    let (_running, client) = setup().await;
    // kube refuses to send an apply without a field manager, so send it by hand.
    let request = http::Request::patch("/api/v1/namespaces/ns/secrets/s")
        .header("content-type", "application/apply-patch+yaml")
        .body(
            serde_json::to_vec(
                &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}),
            )
            .unwrap(),
        )
        .unwrap();
    let status = api_error(
        client
            .request::<serde_json::Value>(request)
            .await
            .unwrap_err(),
    );
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    assert!(status.message.contains("fieldManager: Required value"));

    let missing: Api<Secret> = Api::namespaced(client, "nope");
    let status = api_error(
        missing
            .patch(
                "s",
                &PatchParams::apply("m").force(),
                &Patch::Apply(
                    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}),
                ),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code, 404);
    assert_eq!(status.message, "namespaces \"nope\" not found");
    assert_eq!(status.details.unwrap().kind, "namespaces");
}

#[tokio::test]
async fn merge_and_json_patch() {
    let (_running, api_client) = setup().await;
    let api: Api<Secret> = Api::namespaced(api_client.clone(), "ns");
    api.create(
        &PostParams::default(),
        &secret("a", &[("k", "1"), ("j", "2")], &[]),
    )
    .await
    .unwrap();
    let patched = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"data": {"j": null, "n": "Mw=="}, "metadata": {"labels": {"l": "v"}}}),
            ),
        )
        .await
        .unwrap();
    let keys: Vec<&String> = patched.data.as_ref().unwrap().keys().collect();
    assert_eq!(keys, ["k", "n"]);
    assert_eq!(patched.metadata.labels.unwrap()["l"], "v");

    let stale = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"resourceVersion": "1"}, "data": {"k": "OQ=="}})),
        )
        .await
        .unwrap_err();
    assert_eq!(api_error(stale).reason, "Conflict");

    // kube's `Patch::Json` needs its `jsonpatch` feature; send the JSON patch by hand.
    let request = http::Request::patch("/api/v1/namespaces/ns/secrets/a")
        .header("content-type", "application/json-patch+json")
        .body(
            serde_json::to_vec(&json!([{"op": "replace", "path": "/data/k", "value": "NA=="}]))
                .unwrap(),
        )
        .unwrap();
    let patched: Secret = api_client.request(request).await.unwrap();
    assert_eq!(data_of(&patched, "k"), "4");
}

#[tokio::test]
async fn delete_then_not_found() {
    let (running, client) = setup().await;
    let api: Api<Secret> = Api::namespaced(client, "ns");
    api.create(&PostParams::default(), &secret("a", &[], &[]))
        .await
        .unwrap();
    let deleted = api.delete("a", &DeleteParams::default()).await.unwrap();
    let status = deleted.right().expect("a Status for a deleted secret");
    assert!(status.is_success());
    assert!(api.get_opt("a").await.unwrap().is_none());
    assert!(running.emulator.get_secret("ns", "a").is_none());
    let status = api_error(api.delete("a", &DeleteParams::default()).await.unwrap_err());
    assert!(status.is_not_found());
    assert_eq!(status.message, "secrets \"a\" not found");
}

#[tokio::test]
async fn missing_namespace() {
    let (_running, client) = setup().await;
    let api: Api<Secret> = Api::namespaced(client, "nope");
    // As on a real cluster: a get is just NotFound, a list is empty, a create names the namespace.
    assert!(api.get_opt("a").await.unwrap().is_none());
    assert!(
        api.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let status = api_error(
        api.create(&PostParams::default(), &secret("a", &[], &[]))
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code, 404);
    assert_eq!(status.reason, "NotFound");
    assert_eq!(status.message, "namespaces \"nope\" not found");
}

#[tokio::test]
async fn namespaces_api() {
    let (running, client) = setup().await;
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some("fresh".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let created = api.create(&PostParams::default(), &ns).await.unwrap();
    assert_eq!(created.status.unwrap().phase.as_deref(), Some("Active"));
    assert_eq!(
        created.metadata.labels.unwrap()["kubernetes.io/metadata.name"],
        "fresh"
    );
    let names: Vec<String> = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|n| n.metadata.name.unwrap())
        .collect();
    assert_eq!(names, ["default", "fresh", "ns"]);

    let secrets: Api<Secret> = Api::namespaced(client, "fresh");
    secrets
        .create(&PostParams::default(), &secret("a", &[], &[]))
        .await
        .unwrap();
    let deleted = api.delete("fresh", &DeleteParams::default()).await.unwrap();
    let ns = deleted.left().expect("the namespace object");
    assert_eq!(ns.status.unwrap().phase.as_deref(), Some("Terminating"));
    assert!(api.get_opt("fresh").await.unwrap().is_none());
    assert!(!running.emulator.namespace_exists("fresh"));
    assert!(running.emulator.get_secret("fresh", "a").is_none());
}

#[tokio::test]
async fn unauthorized_without_a_valid_token() {
    let (running, _client) = setup().await;
    for token in [None, Some("wrong")] {
        let api: Api<Secret> = Api::namespaced(client(&running.url(), token), "ns");
        let status = api_error(api.get_opt("a").await.unwrap_err());
        assert_eq!(status.code, 401);
        assert_eq!(status.reason, "Unauthorized");
    }
    // /version is public.
    let info = client(&running.url(), None)
        .apiserver_version()
        .await
        .unwrap();
    assert_eq!(info.major, "1");
}

#[tokio::test]
async fn kubeconfig_works_with_the_kube_client() {
    let (running, _client) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, running.kubeconfig(Some(ADMIN), "ns")).unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    assert_eq!(config.default_namespace, "ns");
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let client = Client::try_from(config).unwrap();
    let api: Api<Secret> = Api::default_namespaced(client);
    assert!(api.get_opt("a").await.unwrap().is_none());
}

/// Reads one line from the child's stdout, with a deadline.
fn first_line(child: &mut std::process::Child, deadline: Duration) -> String {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(deadline)
        .expect("the emulator printed its address")
}

#[tokio::test]
async fn binary_prints_its_address_and_writes_a_kubeconfig() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kube-emulator"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--namespace",
            "zitadel",
            "--namespace",
            "holos",
        ])
        .args(["--token", "t0k3n", "--kubeconfig-out"])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let addr = first_line(&mut child, Duration::from_secs(20));
    let addr = addr.trim();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");

    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    assert_eq!(config.cluster_url.to_string(), format!("http://{addr}/"));
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let client = Client::try_from(config).unwrap();
    let api: Api<Secret> = Api::namespaced(client.clone(), "holos");
    api.create(&PostParams::default(), &secret("a", &[("k", "v")], &[]))
        .await
        .unwrap();
    assert!(
        Api::<Namespace>::all(client)
            .get_opt("zitadel")
            .await
            .unwrap()
            .is_some()
    );
    let unauthorized: Api<Secret> =
        Api::namespaced(self::client(&format!("http://{addr}"), None), "holos");
    assert_eq!(
        api_error(unauthorized.get_opt("a").await.unwrap_err()).code,
        401
    );
    assert!(started.elapsed() < Duration::from_secs(60));

    child.kill().unwrap();
    child.wait().unwrap();
}
