//! The s3.conf Secret step through the real kube client against the Kubernetes emulator.

use std::time::Duration;

use backup_provisioner::cloud::kube::client_from_config;
use backup_provisioner::cloud::{CloudError, Outcome};
use backup_provisioner::provision::secret::{self, FIELD_MANAGER, S3Conf};
use kube_emulator::Fault;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use crate::support::kube::KubeEmulator;

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

fn stored_text(k: &KubeEmulator, ns: &str, name: &str) -> String {
    let data = k.emulator.secret_data(ns, name).expect("the secret exists");
    String::from_utf8(data["s3.conf"].clone()).unwrap()
}

fn assert_no_secret_values(detail: &serde_json::Value, c: &S3Conf) {
    let text = detail.to_string();
    assert!(!text.contains(c.cipher_pass.expose_secret()), "{text}");
    assert!(
        !text.contains(c.secret_access_key.expose_secret()),
        "{text}"
    );
}

fn unmanaged_secret(text: &str) -> serde_json::Value {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    json!({
        "metadata": {"name": BUCKET, "labels": {"team": "identity"}},
        "data": {"s3.conf": b64(text), "notes.txt": b64("hand made")},
    })
}

#[tokio::test]
async fn create_writes_the_exact_s3_conf_and_labels() {
    let k = KubeEmulator::start(&[NS]);
    let client = k.client();
    let c = conf("A");

    let report = secret::apply(&client, NS, BUCKET, &c, false).await.unwrap();
    assert_eq!(report.outcome, Outcome::Created);

    let stored = k.emulator.get_secret(NS, BUCKET).unwrap();
    assert_eq!(stored["type"], "Opaque");
    assert_eq!(
        stored["metadata"]["labels"],
        json!({"holos.run/secret.name": BUCKET, "app.kubernetes.io/managed-by": "backup-provisioner"})
    );
    let keys: Vec<&String> = stored["data"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["s3.conf"]);
    assert_eq!(stored_text(&k, NS, BUCKET), expected_text(&c));
    let managers = stored["metadata"]["managedFields"].as_array().unwrap();
    assert_eq!(managers.len(), 1);
    assert_eq!(managers[0]["manager"], FIELD_MANAGER);
    assert_eq!(managers[0]["operation"], "Apply");

    assert_eq!(report.detail["namespace"], NS);
    assert_eq!(report.detail["name"], BUCKET);
    assert_eq!(report.detail["keys"], json!(["s3.conf"]));
    assert_eq!(
        report.detail["resource_version"],
        stored["metadata"]["resourceVersion"]
    );
    assert_no_secret_values(&report.detail, &c);

    let existing = secret::read(&client, NS, BUCKET).await.unwrap().unwrap();
    assert!(existing.managed_by_us);
    let read_conf = existing.conf.expect("s3.conf parses");
    assert_eq!(read_conf.render().expose_secret(), expected_text(&c));
    assert_eq!(
        existing.resource_version.as_deref(),
        stored["metadata"]["resourceVersion"].as_str()
    );
    assert!(secret::read(&client, NS, "absent").await.unwrap().is_none());
}

#[tokio::test]
async fn reapply_is_already_present_without_mutating_calls() {
    let k = KubeEmulator::start(&[NS]);
    let client = k.client();
    let c = conf("B");
    secret::apply(&client, NS, BUCKET, &c, false).await.unwrap();
    let rv = k.emulator.get_secret(NS, BUCKET).unwrap()["metadata"]["resourceVersion"].clone();

    k.emulator.clear_requests();
    let report = secret::apply(&client, NS, BUCKET, &c, false).await.unwrap();
    assert_eq!(report.outcome, Outcome::AlreadyPresent);
    assert_eq!(k.mutating_count(), 0, "{:?}", k.emulator.requests());
    assert_eq!(k.emulator.requests().len(), 1);
    assert_eq!(
        k.emulator.get_secret(NS, BUCKET).unwrap()["metadata"]["resourceVersion"],
        rv
    );
    assert_eq!(report.detail["resource_version"], rv);
    assert_no_secret_values(&report.detail, &c);
}

#[tokio::test]
async fn changed_credentials_update_the_secret() {
    let k = KubeEmulator::start(&[NS]);
    let client = k.client();
    secret::apply(&client, NS, BUCKET, &conf("C1"), false)
        .await
        .unwrap();
    let rotated = conf("C2");
    let report = secret::apply(&client, NS, BUCKET, &rotated, false)
        .await
        .unwrap();
    assert_eq!(report.outcome, Outcome::Updated);
    assert_eq!(stored_text(&k, NS, BUCKET), expected_text(&rotated));
    assert_no_secret_values(&report.detail, &rotated);
}

#[tokio::test]
async fn unmanaged_secret_is_refused_and_left_untouched() {
    let k = KubeEmulator::start(&[NS]);
    let client = k.client();
    let theirs = conf("OLD");
    let before = k
        .emulator
        .insert_secret_as(
            "kubectl-create",
            NS,
            unmanaged_secret(&expected_text(&theirs)),
        )
        .unwrap();

    let existing = secret::read(&client, NS, BUCKET).await.unwrap().unwrap();
    assert!(!existing.managed_by_us);
    assert_eq!(
        existing.conf.unwrap().cipher_pass.expose_secret(),
        theirs.cipher_pass.expose_secret()
    );

    k.emulator.clear_requests();
    let err = secret::apply(&client, NS, BUCKET, &conf("NEW"), false)
        .await
        .unwrap_err();
    assert!(!err.is_retryable());
    let message = err.to_string();
    assert!(message.contains(&format!("{NS}/{BUCKET}")), "{message}");
    assert!(message.contains("adopt_existing_secret: true"), "{message}");
    assert_eq!(k.mutating_count(), 0);
    assert_eq!(k.emulator.get_secret(NS, BUCKET).unwrap(), before);
}

#[tokio::test]
async fn adopt_takes_the_secret_over() {
    let k = KubeEmulator::start(&[NS]);
    let client = k.client();
    k.emulator
        .insert_secret_as(
            "kubectl-create",
            NS,
            unmanaged_secret(&expected_text(&conf("OLD"))),
        )
        .unwrap();
    let ours = conf("ADOPT");

    let report = secret::apply(&client, NS, BUCKET, &ours, true)
        .await
        .unwrap();
    assert_eq!(report.outcome, Outcome::Updated);
    assert_eq!(report.detail["adopted"], true);
    assert_eq!(report.detail["removed_keys"], json!(["notes.txt"]));
    assert_eq!(report.detail["keys"], json!(["s3.conf"]));
    assert_no_secret_values(&report.detail, &ours);

    let stored = k.emulator.get_secret(NS, BUCKET).unwrap();
    assert_eq!(stored_text(&k, NS, BUCKET), expected_text(&ours));
    let keys: Vec<&String> = stored["data"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["s3.conf"]);
    let labels = &stored["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/managed-by"], "backup-provisioner");
    assert_eq!(labels["holos.run/secret.name"], BUCKET);
    assert_eq!(labels["team"], "identity", "labels of others are kept");
    assert!(
        secret::read(&client, NS, BUCKET)
            .await
            .unwrap()
            .unwrap()
            .managed_by_us
    );

    k.emulator.clear_requests();
    let again = secret::apply(&client, NS, BUCKET, &ours, false)
        .await
        .unwrap();
    assert_eq!(again.outcome, Outcome::AlreadyPresent);
    assert_eq!(k.mutating_count(), 0);
}

#[tokio::test]
async fn adopting_a_secret_of_another_type_is_refused() {
    let k = KubeEmulator::start(&[NS]);
    let client = k.client();
    k.emulator
        .insert_secret(
            NS,
            json!({"metadata": {"name": BUCKET}, "type": "kubernetes.io/basic-auth",
                   "stringData": {"username": "u"}}),
        )
        .unwrap();
    let err = secret::apply(&client, NS, BUCKET, &conf("T"), true)
        .await
        .unwrap_err();
    assert!(!err.is_retryable());
    assert!(
        err.to_string().contains("kubernetes.io/basic-auth"),
        "{err}"
    );
}

#[tokio::test]
async fn missing_namespace_is_permanent() {
    let k = KubeEmulator::start(&[NS]);
    let client = k.client();
    assert!(
        secret::read(&client, "nowhere", BUCKET)
            .await
            .unwrap()
            .is_none()
    );
    let err = secret::apply(&client, "nowhere", BUCKET, &conf("N"), false)
        .await
        .unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    assert!(
        err.to_string()
            .contains("namespace \"nowhere\" does not exist"),
        "{err}"
    );
}

#[tokio::test]
async fn forbidden_is_permanent_and_names_the_permission() {
    let k = KubeEmulator::start(&[NS, "elsewhere"]);
    let user = "system:serviceaccount:elsewhere:bp";
    let other_ns = k.restricted_client(user, &["elsewhere"], None);
    let err = secret::read(&other_ns, NS, BUCKET).await.unwrap_err();
    assert!(!err.is_retryable());
    let message = err.to_string();
    assert!(message.contains("\"get\" verb on \"secrets\""), "{message}");
    assert!(
        message.contains(&format!("in namespace \"{NS}\"")),
        "{message}"
    );
    assert!(message.contains(user), "{message}");

    let read_only = k.restricted_client("reader", &[NS], Some(&["get", "list"]));
    let err = secret::apply(&read_only, NS, BUCKET, &conf("F"), false)
        .await
        .unwrap_err();
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("\"patch\" verb"), "{err}");
    assert!(k.emulator.get_secret(NS, BUCKET).is_none());
}

#[tokio::test]
async fn bad_credentials_are_permanent() {
    let k = KubeEmulator::start(&[NS]);
    let client = k.client_with_token(Some("wrong"));
    let err = secret::read(&client, NS, BUCKET).await.unwrap_err();
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("credentials"), "{err}");
}

#[tokio::test]
async fn server_errors_and_stale_writes_are_retryable() {
    let k = KubeEmulator::start(&[NS]);
    let client = k.client();
    k.emulator.inject_fault(Fault::status(500).method("GET"));
    let err = secret::read(&client, NS, BUCKET).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");

    k.emulator.inject_fault(Fault::status(409).method("PATCH"));
    let err = secret::apply(&client, NS, BUCKET, &conf("R"), false)
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    // The next attempt goes through.
    let report = secret::apply(&client, NS, BUCKET, &conf("R"), false)
        .await
        .unwrap();
    assert_eq!(report.outcome, Outcome::Created);
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
