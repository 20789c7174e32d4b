//! A full provisioning environment: moto (S3 + IAM), the Kubernetes emulator, and the service
//! with workers running the real provisioning job through the real AWS SDK and kube clients.

use std::time::Duration;

use backup_provisioner::cloud::aws::{AwsClients, CallCounter};
use backup_provisioner::crypto::EncryptionKey;
use backup_provisioner::jobs::Registry;
use backup_provisioner::provision::job::Provisioner;
use secrecy::ExposeSecret;

use super::app::{AppOptions, TestApp, spawn_app_with, worker_args};
use super::kube::KubeEmulator;
use super::moto::Moto;

pub struct Env {
    pub app: TestApp,
    pub kube: KubeEmulator,
    /// Admin clients for assertions (not counted).
    pub admin: AwsClients,
    /// Counts every AWS call the service makes.
    pub counter: CallCounter,
    pub region: String,
}

/// A repository name unique to this test (the shared moto is used by every test).
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

pub fn bucket_for(name: &str) -> String {
    format!("holos-{name}-backups")
}

pub async fn provisioner(
    moto: &Moto,
    kube: &KubeEmulator,
    region: &str,
    counter: CallCounter,
    key: &str,
) -> Provisioner {
    Provisioner {
        aws: moto.clients(region, Some(counter)).await,
        kube: kube.client(),
        encryption_key: EncryptionKey::from_base64(key).expect("key"),
        credential_check_budget: Duration::from_secs(20),
        credential_check_backoff: Duration::from_millis(100),
    }
}

impl Env {
    pub async fn start(namespaces: &[&str]) -> Env {
        Self::start_on(Moto::shared(), namespaces).await
    }

    pub async fn start_on(moto: &Moto, namespaces: &[&str]) -> Env {
        backup_provisioner::install_crypto_provider();
        let region = "us-east-1".to_owned();
        let kube = KubeEmulator::start(namespaces);
        let counter = CallCounter::new();
        let worker = worker_args(2);
        let key = worker
            .encryption_key
            .as_ref()
            .expect("key")
            .expose_secret()
            .to_owned();
        let registry = Registry::new()
            .register(provisioner(moto, &kube, &region, counter.clone(), &key).await);
        let app = spawn_app_with(AppOptions {
            worker,
            registry,
            ..Default::default()
        })
        .await;
        let admin = moto.clients(&region, None).await;
        Env {
            app,
            kube,
            admin,
            counter,
            region,
        }
    }

    /// Creates a repository through the API and waits for its job to end; returns the job view.
    pub async fn provision(&self, body: serde_json::Value) -> serde_json::Value {
        let response = self
            .app
            .post_json("/v1/backup-repositories", &self.app.operator(), &body)
            .await;
        let status = response.status();
        let created: serde_json::Value = response.json().await.expect("json");
        assert!(
            status == 202 || status == 200,
            "create failed: {status} {created}"
        );
        let job_id = created["job"]["id"].as_str().expect("job id").to_owned();
        self.app
            .wait_for_job(&job_id, Duration::from_secs(90))
            .await
    }

    /// Queues provisioning again for an existing repository and waits for it.
    pub async fn reconcile(&self, name: &str) -> serde_json::Value {
        let path = format!("/v1/backup-repositories/{name}/reconcile");
        let response = self
            .app
            .post_json(&path, &self.app.operator(), &serde_json::json!({}))
            .await;
        let status = response.status();
        let created: serde_json::Value = response.json().await.expect("json");
        assert_eq!(status, 202, "reconcile failed: {created}");
        let job_id = created["job"]["id"].as_str().expect("job id").to_owned();
        self.app
            .wait_for_job(&job_id, Duration::from_secs(90))
            .await
    }

    pub async fn repository(&self, name: &str) -> serde_json::Value {
        self.app
            .get(
                &format!("/v1/backup-repositories/{name}"),
                &self.app.viewer(),
            )
            .await
            .json()
            .await
            .expect("json")
    }

    /// The Secret's `s3.conf` text, as stored in the emulator.
    pub fn s3_conf(&self, namespace: &str, name: &str) -> Option<String> {
        let data = self.kube.emulator.secret_data(namespace, name)?;
        data.get("s3.conf")
            .map(|v| String::from_utf8(v.clone()).expect("utf8"))
    }
}

/// The value of `key=` in an s3.conf text.
pub fn conf_value(conf: &str, key: &str) -> String {
    conf.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} missing from s3.conf"))
        .to_owned()
}
