//! The s3.conf Secret step through the real kube client against the real kube-apiserver, as the
//! service's ServiceAccount with the Role of `deploy/base/rbac.yaml` (through the recording/fault
//! proxy of `support::kube_proxy`), in namespaces of each test's own.

use std::time::Duration;

use backup_provisioner::cloud::kube::client_from_config;
use backup_provisioner::cloud::{CloudError, Outcome};
use backup_provisioner::provision::secret::{self, FIELD_MANAGER, S3Conf};
use kube::api::{Patch, PatchParams};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use crate::support::kube_env::{KubeEnv, KubeOptions};
use crate::support::kube_proxy::{Fault, RequestRecord};
use crate::support::rbac::Rbac;

const NS: &str = "zitadel";
const BUCKET: &str = "holos-zitadel-backups";

fn conf(tag: &str) -> S3Conf {
    S3Conf {
        cipher_pass: SecretString::from(format!("CipherPass{tag}xyzABC0123456789")),
        access_key_id: format!("AKIATEST{tag}"),
        secret_access_key: SecretString::from(format!("SecretAccessKey/{tag}+abc")),
    }
}

fn expected_text(c: &S3Conf) -> String {
    let (p, k, s) = (
        c.cipher_pass.expose_secret(),
        &c.access_key_id,
        c.secret_access_key.expose_secret(),
    );
    format!(
        "[global]\nrepo2-cipher-pass={p}\nrepo2-s3-key={k}\nrepo2-s3-key-secret={s}\n\
         repo3-cipher-pass={p}\nrepo3-s3-key={k}\nrepo3-s3-key-secret={s}\n"
    )
}

async fn stored_text(k: &KubeEnv, ns: &str, name: &str) -> String {
    k.s3_conf(ns, name).await.expect("the secret holds s3.conf")
}

fn assert_no_secret_values(detail: &serde_json::Value, c: &S3Conf) {
    let text = detail.to_string();
    assert!(!text.contains(c.cipher_pass.expose_secret()), "{text}");
    assert!(
        !text.contains(c.secret_access_key.expose_secret()),
        "{text}"
    );
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn unmanaged_secret(text: &str) -> serde_json::Value {
    json!({
        "metadata": {"name": BUCKET, "labels": {"team": "identity"}},
        "data": {"s3.conf": b64(text), "notes.txt": b64("hand made")},
    })
}

/// The managers of a stored Secret's `managedFields`: (manager, operation, fields as JSON).
fn managers(secret: &Value) -> Vec<(String, String, Value)> {
    secret["metadata"]["managedFields"]
        .as_array()
        .expect("managedFields")
        .iter()
        .map(|m| {
            (
                m["manager"].as_str().unwrap_or_default().to_owned(),
                m["operation"].as_str().unwrap_or_default().to_owned(),
                m["fieldsV1"].clone(),
            )
        })
        .collect()
}

/// The fields `manager` owns in a stored Secret (empty when it owns none).
fn owned_by(secret: &Value, manager: &str) -> Value {
    managers(secret)
        .into_iter()
        .find(|(m, _, _)| m == manager)
        .map(|(_, _, fields)| fields)
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn create_writes_the_exact_s3_conf_and_labels() {
    let k = KubeEnv::start(&[NS]).await;
    let ns = k.ns(NS);
    let client = k.service_client();
    let c = conf("A");

    let report = secret::apply(&client, ns, BUCKET, &c, false).await.unwrap();
    assert_eq!(report.outcome, Outcome::Created);

    let stored = k.secret(ns, BUCKET).await.unwrap();
    assert_eq!(stored["type"], "Opaque");
    assert_eq!(
        stored["metadata"]["labels"],
        json!({"holos.run/secret.name": BUCKET, "app.kubernetes.io/managed-by": "backup-provisioner"})
    );
    let keys: Vec<&String> = stored["data"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["s3.conf"]);
    assert_eq!(stored_text(&k, ns, BUCKET).await, expected_text(&c));
    let managers = managers(&stored);
    assert_eq!(managers.len(), 1, "{managers:?}");
    assert_eq!(managers[0].0, FIELD_MANAGER);
    assert_eq!(managers[0].1, "Apply");
    let fields = &managers[0].2;
    assert!(fields["f:data"]["f:s3.conf"].is_object(), "{fields}");
    assert!(fields["f:type"].is_object(), "{fields}");
    assert!(
        fields["f:metadata"]["f:labels"]["f:app.kubernetes.io/managed-by"].is_object(),
        "{fields}"
    );

    assert_eq!(report.detail["namespace"], ns);
    assert_eq!(report.detail["name"], BUCKET);
    assert_eq!(report.detail["keys"], json!(["s3.conf"]));
    assert_eq!(
        report.detail["resource_version"],
        stored["metadata"]["resourceVersion"]
    );
    assert_no_secret_values(&report.detail, &c);

    let existing = secret::read(&client, ns, BUCKET).await.unwrap().unwrap();
    assert!(existing.managed_by_us);
    let read_conf = existing.conf.expect("s3.conf parses");
    assert_eq!(read_conf.render().expose_secret(), expected_text(&c));
    assert_eq!(
        existing.resource_version.as_deref(),
        stored["metadata"]["resourceVersion"].as_str()
    );
    assert!(secret::read(&client, ns, "absent").await.unwrap().is_none());
}

#[tokio::test]
async fn reapply_is_already_present_without_mutating_calls() {
    let k = KubeEnv::start(&[NS]).await;
    let ns = k.ns(NS);
    let client = k.service_client();
    let c = conf("B");
    secret::apply(&client, ns, BUCKET, &c, false).await.unwrap();
    let rv = k.secret(ns, BUCKET).await.unwrap()["metadata"]["resourceVersion"].clone();

    k.clear_requests();
    let report = secret::apply(&client, ns, BUCKET, &c, false).await.unwrap();
    assert_eq!(report.outcome, Outcome::AlreadyPresent);
    assert_eq!(k.mutating_count(), 0, "{:?}", k.requests());
    assert_eq!(k.requests().len(), 1, "{:?}", k.requests());
    assert_eq!(
        k.secret(ns, BUCKET).await.unwrap()["metadata"]["resourceVersion"],
        rv
    );
    assert_eq!(report.detail["resource_version"], rv);
    assert_no_secret_values(&report.detail, &c);
}

#[tokio::test]
async fn changed_credentials_update_the_secret() {
    let k = KubeEnv::start(&[NS]).await;
    let ns = k.ns(NS);
    let client = k.service_client();
    secret::apply(&client, ns, BUCKET, &conf("C1"), false)
        .await
        .unwrap();
    let rotated = conf("C2");
    let report = secret::apply(&client, ns, BUCKET, &rotated, false)
        .await
        .unwrap();
    assert_eq!(report.outcome, Outcome::Updated);
    assert_eq!(stored_text(&k, ns, BUCKET).await, expected_text(&rotated));
    assert_no_secret_values(&report.detail, &rotated);
}

#[tokio::test]
async fn unmanaged_secret_is_refused_and_left_untouched() {
    let k = KubeEnv::start(&[NS]).await;
    let ns = k.ns(NS);
    let client = k.service_client();
    let theirs = conf("OLD");
    let before = k
        .create_secret_as(
            "kubectl-create",
            ns,
            unmanaged_secret(&expected_text(&theirs)),
        )
        .await;

    let existing = secret::read(&client, ns, BUCKET).await.unwrap().unwrap();
    assert!(!existing.managed_by_us);
    assert_eq!(
        existing.conf.unwrap().cipher_pass.expose_secret(),
        theirs.cipher_pass.expose_secret()
    );

    k.clear_requests();
    let err = secret::apply(&client, ns, BUCKET, &conf("NEW"), false)
        .await
        .unwrap_err();
    assert!(!err.is_retryable());
    let message = err.to_string();
    assert!(message.contains(&format!("{ns}/{BUCKET}")), "{message}");
    assert!(message.contains("adopt_existing_secret: true"), "{message}");
    assert_eq!(k.mutating_count(), 0);
    assert_eq!(k.secret(ns, BUCKET).await.unwrap(), before);
}

#[tokio::test]
async fn adopt_takes_the_secret_over() {
    let k = KubeEnv::start(&[NS]).await;
    let ns = k.ns(NS);
    let client = k.service_client();
    k.create_secret_as(
        "kubectl-create",
        ns,
        unmanaged_secret(&expected_text(&conf("OLD"))),
    )
    .await;
    let ours = conf("ADOPT");

    let report = secret::apply(&client, ns, BUCKET, &ours, true)
        .await
        .unwrap();
    assert_eq!(report.outcome, Outcome::Updated);
    assert_eq!(report.detail["adopted"], true);
    assert_eq!(report.detail["removed_keys"], json!(["notes.txt"]));
    assert_eq!(report.detail["keys"], json!(["s3.conf"]));
    assert_no_secret_values(&report.detail, &ours);

    let stored = k.secret(ns, BUCKET).await.unwrap();
    assert_eq!(stored_text(&k, ns, BUCKET).await, expected_text(&ours));
    let keys: Vec<&String> = stored["data"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["s3.conf"]);
    let labels = &stored["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/managed-by"], "backup-provisioner");
    assert_eq!(labels["holos.run/secret.name"], BUCKET);
    assert_eq!(labels["team"], "identity", "labels of others are kept");
    assert!(
        secret::read(&client, ns, BUCKET)
            .await
            .unwrap()
            .unwrap()
            .managed_by_us
    );

    k.clear_requests();
    let again = secret::apply(&client, ns, BUCKET, &ours, false)
        .await
        .unwrap();
    assert_eq!(again.outcome, Outcome::AlreadyPresent);
    assert_eq!(k.mutating_count(), 0);
}

/// A Secret `kubectl apply --server-side` made (field manager `kubectl`, operation Apply): the
/// service refuses it; adopting it moves the fields the service writes to `backup-provisioner`
/// (its apply is forced), kubectl keeps the fields only it sets, and kubectl's next apply of its
/// old manifest conflicts on `s3.conf` instead of silently taking it back.
#[tokio::test]
async fn a_secret_applied_by_kubectl_is_refused_then_adopted_and_kubectl_conflicts_afterwards() {
    let k = KubeEnv::start(&[NS]).await;
    let ns = k.ns(NS);
    let client = k.service_client();
    let manifest = json!({
        "metadata": {"name": BUCKET, "labels": {"team": "identity"}},
        "type": "Opaque",
        "data": {"s3.conf": b64(&expected_text(&conf("KUBECTL"))), "notes.txt": b64("hand made")},
    });
    let before = k.apply_secret_as("kubectl", ns, manifest.clone()).await;
    assert_eq!(
        managers(&before)
            .iter()
            .map(|(m, op, _)| (m.as_str(), op.as_str()))
            .collect::<Vec<_>>(),
        [("kubectl", "Apply")]
    );

    let err = secret::apply(&client, ns, BUCKET, &conf("NEW"), false)
        .await
        .unwrap_err();
    assert!(!err.is_retryable());
    assert!(
        err.to_string()
            .contains("not managed by backup-provisioner"),
        "{err}"
    );
    assert_eq!(k.secret(ns, BUCKET).await.unwrap(), before);

    let ours = conf("ADOPTED");
    let report = secret::apply(&client, ns, BUCKET, &ours, true)
        .await
        .unwrap();
    assert_eq!(report.outcome, Outcome::Updated);
    assert_eq!(report.detail["removed_keys"], json!(["notes.txt"]));
    let after = k.secret(ns, BUCKET).await.unwrap();
    assert_eq!(stored_text(&k, ns, BUCKET).await, expected_text(&ours));
    assert_eq!(after["metadata"]["labels"]["team"], "identity");
    let ours_fields = owned_by(&after, FIELD_MANAGER);
    assert!(ours_fields["f:data"]["f:s3.conf"].is_object(), "{after:#}");
    let kubectl_fields = owned_by(&after, "kubectl");
    assert!(
        kubectl_fields["f:data"]["f:s3.conf"].is_null(),
        "the forced apply took s3.conf from kubectl: {after:#}"
    );
    assert!(
        kubectl_fields["f:metadata"]["f:labels"]["f:team"].is_object(),
        "kubectl still owns its own label: {after:#}"
    );

    // kubectl applies its old manifest again, without --force-conflicts.
    let conflict = k
        .secrets(ns)
        .patch(
            BUCKET,
            &PatchParams::apply("kubectl"),
            &Patch::Apply(&json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": manifest["metadata"], "type": "Opaque", "data": manifest["data"],
            })),
        )
        .await
        .expect_err("kubectl's stale apply conflicts");
    let kube::Error::Api(status) = &conflict else {
        panic!("{conflict:?}")
    };
    assert_eq!(status.code, 409, "{status:?}");
    assert!(
        status.message.contains(".data.s3.conf") && status.message.contains(FIELD_MANAGER),
        "{status:?}"
    );
    // The service's own error classification calls it a field conflict, not a retry.
    let classified = backup_provisioner::cloud::kube::classify("apply secret", conflict);
    assert!(!classified.is_retryable(), "{classified}");
    assert!(
        classified.to_string().contains("other field managers"),
        "{classified}"
    );
    assert_eq!(stored_text(&k, ns, BUCKET).await, expected_text(&ours));
}

/// Another controller (here field manager `external-secrets`, as an ExternalSecret's would be)
/// force-applies `s3.conf` of a Secret the service manages. The next run of the step puts the
/// service's `s3.conf` back (its apply is forced too) and owns the field again; the controller's
/// next unforced apply conflicts.
#[tokio::test]
async fn a_managed_secret_overwritten_by_another_controller_is_repaired() {
    let k = KubeEnv::start(&[NS]).await;
    let ns = k.ns(NS);
    let client = k.service_client();
    let ours = conf("OURS");
    secret::apply(&client, ns, BUCKET, &ours, false)
        .await
        .unwrap();

    let theirs = json!({
        "metadata": {"name": BUCKET},
        "data": {"s3.conf": b64(&expected_text(&conf("ESO")))},
    });
    let overwritten = k
        .secrets(ns)
        .patch(
            BUCKET,
            &PatchParams::apply("external-secrets").force(),
            &Patch::Apply(&json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": theirs["metadata"], "data": theirs["data"]})),
        )
        .await
        .expect("the controller's forced apply");
    let overwritten = serde_json::to_value(overwritten).unwrap();
    assert!(owned_by(&overwritten, "external-secrets")["f:data"]["f:s3.conf"].is_object());
    assert!(owned_by(&overwritten, FIELD_MANAGER)["f:data"]["f:s3.conf"].is_null());

    let existing = secret::read(&client, ns, BUCKET).await.unwrap().unwrap();
    assert!(existing.managed_by_us, "the labels are still ours");
    let report = secret::apply(&client, ns, BUCKET, &ours, false)
        .await
        .unwrap();
    assert_eq!(report.outcome, Outcome::Updated);
    assert_eq!(stored_text(&k, ns, BUCKET).await, expected_text(&ours));
    let repaired = k.secret(ns, BUCKET).await.unwrap();
    assert!(owned_by(&repaired, FIELD_MANAGER)["f:data"]["f:s3.conf"].is_object());
    assert!(owned_by(&repaired, "external-secrets")["f:data"]["f:s3.conf"].is_null());

    let conflict = k
        .secrets(ns)
        .patch(
            BUCKET,
            &PatchParams::apply("external-secrets"),
            &Patch::Apply(&json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": theirs["metadata"], "data": theirs["data"]})),
        )
        .await
        .expect_err("the controller's unforced apply conflicts");
    assert!(
        matches!(&conflict, kube::Error::Api(s) if s.code == 409),
        "{conflict:?}"
    );
}

#[tokio::test]
async fn adopting_a_secret_of_another_type_is_refused() {
    let k = KubeEnv::start(&[NS]).await;
    let ns = k.ns(NS);
    let client = k.service_client();
    k.create_secret_as(
        "kubectl-create",
        ns,
        json!({"metadata": {"name": BUCKET}, "type": "kubernetes.io/basic-auth",
               "stringData": {"username": "u"}}),
    )
    .await;
    let err = secret::apply(&client, ns, BUCKET, &conf("T"), true)
        .await
        .unwrap_err();
    assert!(!err.is_retryable());
    assert!(
        err.to_string().contains("kubernetes.io/basic-auth"),
        "{err}"
    );
}

/// With cluster-wide rights (the admin here) a missing namespace is named as such. The shipped
/// Role is namespaced, so the service itself cannot tell a missing namespace from one it was
/// not granted: it gets 403 for the namespace, and the message says to grant the Role there.
#[tokio::test]
async fn missing_namespace_is_permanent() {
    let k = KubeEnv::start(&[NS]).await;
    let nowhere = format!(
        "nowhere-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let admin = k.admin();
    assert!(
        secret::read(&admin, &nowhere, BUCKET)
            .await
            .unwrap()
            .is_none()
    );
    let err = secret::apply(&admin, &nowhere, BUCKET, &conf("N"), false)
        .await
        .unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("namespace \"{nowhere}\" does not exist")),
        "{err}"
    );

    let err = secret::read(&k.service_client(), &nowhere, BUCKET)
        .await
        .unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("\"get\" verb on \"secrets\"")
            && message.contains(&format!(
                "in namespace \"{nowhere}\" (a Role and RoleBinding there)"
            )),
        "{message}"
    );
}

#[tokio::test]
async fn forbidden_is_permanent_and_names_the_permission() {
    // The shipped Role bound in `elsewhere` only; in `zitadel` a Role allowing get and list.
    let rbac = Rbac::shipped();
    let k = KubeEnv::start_with(
        &[NS, "elsewhere", "readonly"],
        KubeOptions {
            bound_in: Some(vec!["elsewhere".into(), "readonly".into()]),
            rules: [(
                "readonly".to_owned(),
                serde_json::from_value(json!([
                    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}
                ]))
                .unwrap(),
            )]
            .into(),
        },
    )
    .await;
    let ns = k.ns(NS);
    let client = k.service_client();
    let err = secret::read(&client, ns, BUCKET).await.unwrap_err();
    assert!(!err.is_retryable());
    let message = err.to_string();
    assert!(message.contains("\"get\" verb on \"secrets\""), "{message}");
    assert!(
        message.contains(&format!("in namespace \"{ns}\"")),
        "{message}"
    );
    assert!(message.contains(&rbac.user()), "{message}");

    let readonly = k.ns("readonly");
    let err = secret::apply(&client, readonly, BUCKET, &conf("F"), false)
        .await
        .unwrap_err();
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("\"patch\" verb"), "{err}");
    assert!(k.secret(readonly, BUCKET).await.is_none());
}

/// Server-side apply of a Secret that does not exist yet is a create: kube-apiserver authorizes
/// it as `patch` and then as `create`. Without `create` the Secret cannot be made, but one that
/// exists can still be updated; without `patch` nothing can be written.
#[tokio::test]
async fn apply_needs_create_to_make_the_secret_and_patch_to_write_it() {
    let rbac = Rbac::shipped();
    let k = KubeEnv::start_with(
        &["nocreate", "nopatch"],
        KubeOptions {
            bound_in: None,
            rules: [
                ("nocreate".to_owned(), rbac.rules_without("create")),
                ("nopatch".to_owned(), rbac.rules_without("patch")),
            ]
            .into(),
        },
    )
    .await;
    let client = k.service_client();

    let nocreate = k.ns("nocreate");
    let err = secret::apply(&client, nocreate, BUCKET, &conf("C"), false)
        .await
        .unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("permission denied")
            && message.contains("\"create\" verb on \"secrets\"")
            && message.contains(&format!("in namespace \"{nocreate}\""))
            && message.contains(&rbac.user()),
        "{message}"
    );
    assert!(k.secret(nocreate, BUCKET).await.is_none());
    // Made by someone else (and labelled ours), it is updated without `create`.
    k.create_secret_as(
        "kubectl-create",
        nocreate,
        json!({"metadata": {"name": BUCKET, "labels": {"app.kubernetes.io/managed-by": "backup-provisioner"}},
               "data": {"s3.conf": b64("[global]\n")}}),
    )
    .await;
    let report = secret::apply(&client, nocreate, BUCKET, &conf("C"), false)
        .await
        .unwrap();
    assert_eq!(report.outcome, Outcome::Updated);
    assert_eq!(
        stored_text(&k, nocreate, BUCKET).await,
        expected_text(&conf("C"))
    );

    let nopatch = k.ns("nopatch");
    let err = secret::apply(&client, nopatch, BUCKET, &conf("P"), false)
        .await
        .unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    assert!(
        err.to_string().contains("\"patch\" verb on \"secrets\""),
        "{err}"
    );
    assert!(k.secret(nopatch, BUCKET).await.is_none());
}

#[tokio::test]
async fn bad_credentials_are_permanent() {
    let k = KubeEnv::start(&[NS]).await;
    let client = k.client_with_token(Some("wrong"));
    let err = secret::read(&client, k.ns(NS), BUCKET).await.unwrap_err();
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("credentials"), "{err}");
}

/// 500, 429 and 409 (stale resourceVersion) cannot be produced by a healthy kube-apiserver on
/// demand: the proxy in front of it answers them.
#[tokio::test]
async fn server_errors_and_stale_writes_are_retryable() {
    let k = KubeEnv::start(&[NS]).await;
    let ns = k.ns(NS);
    let client = k.service_client();
    k.inject_fault(Fault::status(500).method("GET"));
    let err = secret::read(&client, ns, BUCKET).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");

    // 429 reaches the service's classification on the first answer: kube's own retry
    // (`default_retry`, up to 15 tries backing off to minutes) is off, so throttling shows in
    // the job engine's backoff and audit log.
    k.inject_fault(Fault::status(429).method("GET"));
    let err = secret::read(&client, ns, BUCKET).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");

    k.inject_fault(Fault::status(409).method("PATCH"));
    let err = secret::apply(&client, ns, BUCKET, &conf("R"), false)
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(
        k.secret(ns, BUCKET).await.is_none(),
        "the fault answered, not the server"
    );
    // The next attempt goes through.
    let report = secret::apply(&client, ns, BUCKET, &conf("R"), false)
        .await
        .unwrap();
    assert_eq!(report.outcome, Outcome::Created);
    let injected: Vec<u16> = k
        .requests()
        .iter()
        .filter(|r| r.injected)
        .map(|r| r.status)
        .collect();
    assert_eq!(injected, [500, 429, 409]);
}

#[tokio::test]
async fn unreachable_api_is_retryable() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let config = kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
    let client = client_from_config(config).unwrap();
    let err = secret::read(&client, NS, BUCKET).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(matches!(err, CloudError::Retryable { .. }));
}

#[tokio::test]
async fn hung_api_times_out_as_retryable() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let mut config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    config.read_timeout = Some(Duration::from_millis(300));
    let client = client_from_config(config).unwrap();
    let err = secret::read(&client, NS, BUCKET).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
    holder.abort();
}

/// The TLS set-up the service relies on: the server's certificate is checked against the CA
/// (a client trusting no CA cannot connect, and says so as a retryable transport error).
#[tokio::test]
async fn a_server_certificate_the_client_does_not_trust_is_refused() {
    let k = KubeEnv::start(&[NS]).await;
    let mut config = kube::Config::new(k.proxy.url.parse().unwrap());
    config.auth_info.token = Some(SecretString::from(k.service_token.clone()));
    let client = client_from_config(config).unwrap();
    let err = secret::read(&client, k.ns(NS), BUCKET).await.unwrap_err();
    assert!(
        err.to_string().to_ascii_lowercase().contains("certificate"),
        "{err}"
    );
}

/// The proxy's count of mutating requests leaves out dry runs (the service's early dry-run
/// apply changes nothing).
#[test]
fn a_dry_run_is_not_mutating() {
    let record = |method: &str, query: &str| RequestRecord {
        method: method.into(),
        path: "/api/v1/namespaces/a/secrets/b".into(),
        query: query.into(),
        content_type: None,
        status: 200,
        injected: false,
    };
    assert!(record("PATCH", "fieldManager=x&force=true").is_mutating());
    assert!(!record("PATCH", "dryRun=All&fieldManager=x&force=true").is_mutating());
    assert!(!record("POST", "dryRun=All").is_mutating());
    assert!(!record("GET", "").is_mutating());
}
