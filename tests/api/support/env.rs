//! The one test-environment builder: moto (S3 + IAM), the real kube-apiserver (namespaces of
//! the test's own, the service running as the ServiceAccount and Role of `deploy/base/rbac.yaml`,
//! through a recording/fault proxy: `support::kube_env`), and the service with workers running
//! the real provisioning job through the real AWS SDK and kube clients.
//!
//! `Env::start(namespaces)` is the common case; `Env::builder(namespaces)` varies it: another
//! moto server, region or worker count, the service's own AWS identity, or its Kubernetes
//! permissions (the Role bound in fewer namespaces, or with other rules). Namespaces are named
//! as in production (`zitadel`); [`Env::ns`] gives the test's real one. [`provisioner`] is the
//! only place the tests construct the provisioning job's handler.

use std::time::Duration;

use backup_provisioner::cloud::aws::{AwsClients, CallCounter};
use backup_provisioner::config::WorkerSettingsArgs;
use backup_provisioner::crypto::EncryptionKey;
use backup_provisioner::jobs::Registry;
use backup_provisioner::provision::adopt::Adopter;
use backup_provisioner::provision::deprovision::Deprovisioner;
use backup_provisioner::provision::job::Provisioner;
use k8s_openapi::api::rbac::v1::PolicyRule;
use secrecy::ExposeSecret;

use super::app::{AppOptions, TestApp, TestDb, spawn_app_on, spawn_app_with, worker_args};
use super::aws_realism::{AwsProxy, AwsRealism};
use super::kube_env::{KubeEnv, KubeOptions};
use super::moto::Moto;

/// The region an environment uses unless told otherwise.
pub const REGION: &str = "us-east-1";

/// The provisioning job's handler as the tests run it (credential check: 20 s budget, 100 ms
/// backoff). `encryption_key` is base64, as in the service's settings.
pub fn provisioner(aws: AwsClients, kube: kube::Client, encryption_key: &str) -> Provisioner {
    Provisioner {
        aws,
        kube,
        encryption_key: EncryptionKey::from_base64(encryption_key)
            .expect("encryption key")
            .into(),
        credential_check_budget: Duration::from_secs(20),
        credential_check_backoff: Duration::from_millis(100),
    }
}

/// A running environment; dropping it (or [`TestApp::stop`]) ends the service and drops its
/// database.
pub struct Env {
    pub app: TestApp,
    pub kube: KubeEnv,
    /// Admin clients for assertions (not counted).
    pub admin: AwsClients,
    /// Counts every AWS call the service makes.
    pub counter: CallCounter,
    pub region: String,
    /// The moto server the service talks to.
    pub moto_endpoint: String,
    /// The service's encryption key (base64), for a second worker or a crash child.
    pub encryption_key: String,
    /// The AWS realism proxy between the service and moto, when the builder asked for one.
    pub realism: Option<AwsProxy>,
}

type ServiceAws<'a> = Box<dyn FnOnce(AwsClients) -> AwsClients + 'a>;
type MapWorker<'a> = Box<dyn FnOnce(&mut WorkerSettingsArgs) + 'a>;

/// How to start an [`Env`]; every setting has the default of [`Env::start`].
pub struct EnvBuilder<'a> {
    moto: &'a Moto,
    namespaces: Vec<String>,
    region: String,
    workers: usize,
    identity: Option<(String, String)>,
    service_aws: Option<ServiceAws<'a>>,
    kube: KubeOptions,
    realism: Option<AwsRealism>,
    worker: Option<MapWorker<'a>>,
    database: Option<TestDb>,
}

impl<'a> EnvBuilder<'a> {
    /// The moto server (default: the shared one).
    pub fn moto(mut self, moto: &'a Moto) -> Self {
        self.moto = moto;
        self
    }

    /// The region of the service's and the admin's AWS clients (default [`REGION`]).
    pub fn region(mut self, region: &str) -> Self {
        self.region = region.to_owned();
        self
    }

    /// Worker slots of the service (default 2; 0 for an API without workers).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// The service and the admin clients sign with this access key instead of moto's default
    /// test credentials (e.g. an identity under enforced IAM authorization).
    pub fn aws_identity(mut self, access_key_id: &str, secret: &str) -> Self {
        self.identity = Some((access_key_id.to_owned(), secret.to_owned()));
        self
    }

    /// Adjusts the service's AWS clients (they already carry the call counter).
    pub fn map_service_aws(mut self, map: impl FnOnce(AwsClients) -> AwsClients + 'a) -> Self {
        self.service_aws = Some(Box::new(map));
        self
    }

    /// Binds the service's Role only in these namespaces (default: in every one).
    pub fn service_bound_in(mut self, namespaces: &[&str]) -> Self {
        self.kube.bound_in = Some(namespaces.iter().map(|n| (*n).to_owned()).collect());
        self
    }

    /// The service's Role in `namespace` has these rules instead of the shipped ones.
    pub fn service_rules(mut self, namespace: &str, rules: Vec<PolicyRule>) -> Self {
        self.kube.rules.insert(namespace.to_owned(), rules);
        self
    }

    /// The service's AWS calls go through an AWS realism proxy in front of the moto server
    /// (`Env::realism`); the admin clients still talk to moto directly.
    pub fn aws_realism(mut self, realism: AwsRealism) -> Self {
        self.realism = Some(realism);
        self
    }

    /// Adjusts the workers' settings (retries, backoff, lease) after `worker_args`.
    pub fn map_worker(mut self, map: impl FnOnce(&mut WorkerSettingsArgs) + 'a) -> Self {
        self.worker = Some(Box::new(map));
        self
    }

    /// The service runs on this database and pool (e.g. connected as a runtime role) instead
    /// of a fresh database of its own.
    pub fn database(mut self, database: TestDb) -> Self {
        self.database = Some(database);
        self
    }

    pub async fn start(self) -> Env {
        backup_provisioner::install_crypto_provider();
        let namespaces: Vec<&str> = self.namespaces.iter().map(String::as_str).collect();
        let kube = KubeEnv::start_with(&namespaces, self.kube).await;
        let counter = CallCounter::new();
        let (service_aws, admin) = match &self.identity {
            Some((id, secret)) => (
                self.moto
                    .clients_as(&self.region, Some(counter.clone()), id, secret)
                    .await,
                self.moto.clients_as(&self.region, None, id, secret).await,
            ),
            None => (
                self.moto.clients(&self.region, Some(counter.clone())).await,
                self.moto.clients(&self.region, None).await,
            ),
        };
        let realism = self.realism.map(|realism| realism.start(self.moto));
        let service_aws = match &realism {
            Some(proxy) => proxy.reroute(service_aws),
            None => service_aws,
        };
        let service_aws = match self.service_aws {
            Some(map) => map(service_aws),
            None => service_aws,
        };
        let service_kube = kube.service_client();
        let mut worker = worker_args(self.workers);
        if let Some(map) = self.worker {
            map(&mut worker);
        }
        let encryption_key = worker
            .encryption_key
            .as_ref()
            .expect("key")
            .expose_secret()
            .to_owned();
        let provisioner = provisioner(service_aws, service_kube, &encryption_key);
        let (rotator, retirer) = rotation_kinds(&provisioner, &worker);
        let registry = Registry::new()
            .register(rotator)
            .register(retirer)
            .register(Deprovisioner::like(&provisioner))
            .register(Adopter::like(&provisioner))
            .register(backup_provisioner::provision::verify::Verifier::like(
                &provisioner,
            ))
            .register(provisioner);
        let options = AppOptions {
            worker,
            registry,
            ..Default::default()
        };
        let app = match self.database {
            Some(database) => spawn_app_on(database, options).await,
            None => spawn_app_with(options).await,
        };
        Env {
            app,
            kube,
            admin,
            counter,
            region: self.region,
            moto_endpoint: self.moto.endpoint.clone(),
            encryption_key,
            realism,
        }
    }
}

impl Env {
    /// An environment on the shared moto with 2 workers and the shipped Role everywhere.
    pub async fn start(namespaces: &[&str]) -> Env {
        Self::builder(namespaces).start().await
    }

    pub fn builder<'a>(namespaces: &[&str]) -> EnvBuilder<'a> {
        EnvBuilder {
            moto: Moto::shared(),
            namespaces: namespaces.iter().map(|n| (*n).to_owned()).collect(),
            region: REGION.to_owned(),
            workers: 2,
            identity: None,
            service_aws: None,
            kube: KubeOptions::default(),
            realism: None,
            worker: None,
            database: None,
        }
    }

    /// A handler like the service's (same key, same Kubernetes identity) with `moto`'s default
    /// credentials, for a worker pool the test runs itself.
    pub async fn provisioner(&self, moto: &Moto, counter: CallCounter) -> Provisioner {
        provisioner(
            moto.clients(&self.region, Some(counter)).await,
            self.kube.service_client(),
            &self.encryption_key,
        )
    }

    /// The real name of the test's namespace `logical` (what requests must name).
    pub fn ns(&self, logical: &str) -> &str {
        self.kube.ns(logical)
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

    /// The detail of the last audit entry of `job` (a job view) for `step`, from the job's
    /// events.
    pub async fn step_detail(&self, job: &serde_json::Value, step: &str) -> serde_json::Value {
        let path = format!("/v1/jobs/{}/events?limit=200", job["id"].as_str().unwrap());
        let response = self.app.get(&path, &self.app.viewer()).await;
        let events: serde_json::Value = response.json().await.expect("events json");
        let items = events["items"].as_array().expect("items");
        items
            .iter()
            .rev()
            .find(|e| e["step"] == step)
            .map(|e| e["detail"].clone())
            .unwrap_or_else(|| panic!("no {step} event: {events:#}"))
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

    /// The `s3.conf` text of the Secret `name` in the test's namespace `logical`, as stored.
    pub async fn s3_conf(&self, logical: &str, name: &str) -> Option<String> {
        self.kube.s3_conf(self.ns(logical), name).await
    }

    /// The Secret `name` in the test's namespace `logical`, as the API returns it.
    pub async fn secret(&self, logical: &str, name: &str) -> Option<serde_json::Value> {
        self.kube.secret(self.ns(logical), name).await
    }
}

/// The rotation and retirement job kinds like the service's, with `worker`'s grace periods.
pub fn rotation_kinds(
    provisioner: &Provisioner,
    worker: &WorkerSettingsArgs,
) -> (
    backup_provisioner::provision::rotate::Rotator,
    backup_provisioner::provision::rotate::retire::Retirer,
) {
    let timeline = backup_provisioner::provision::rotate::Timeline {
        grace: worker.key_rotation.key_grace,
        delete_grace: worker.key_rotation.key_delete_grace,
    };
    backup_provisioner::provision::rotate::job_kinds(provisioner, timeline)
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

/// The value of `key=` in an s3.conf text.
pub fn conf_value(conf: &str, key: &str) -> String {
    conf.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} missing from s3.conf"))
        .to_owned()
}
