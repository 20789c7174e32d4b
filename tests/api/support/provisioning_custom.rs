//! Variations of [`Env`](super::provisioning::Env) for failure cases: the service with its own
//! AWS identity or Kubernetes credentials.
#![allow(dead_code)]

use std::time::Duration;

use backup_provisioner::cloud::aws::{AwsClients, CallCounter};
use backup_provisioner::crypto::EncryptionKey;
use backup_provisioner::jobs::Registry;
use backup_provisioner::provision::job::Provisioner;
use secrecy::ExposeSecret;

use super::app::{AppOptions, spawn_app_with, worker_args};
use super::kube::KubeEmulator;
use super::moto::Moto;
use super::provisioning::Env;

pub const REGION: &str = "us-east-1";

/// Starts the service (2 workers) whose provisioner uses `service_aws` (which should carry
/// `counter`) and `service_kube`; `admin` is kept for assertions.
pub async fn start_env(
    kube: KubeEmulator,
    service_aws: AwsClients,
    service_kube: kube::Client,
    admin: AwsClients,
    counter: CallCounter,
) -> Env {
    backup_provisioner::install_crypto_provider();
    let worker = worker_args(2);
    let key = worker
        .encryption_key
        .as_ref()
        .expect("key")
        .expose_secret()
        .to_owned();
    let provisioner = Provisioner {
        aws: service_aws,
        kube: service_kube,
        encryption_key: EncryptionKey::from_base64(&key).expect("key"),
        credential_check_budget: Duration::from_secs(20),
        credential_check_backoff: Duration::from_millis(100),
    };
    let registry = Registry::new().register(provisioner);
    let app = spawn_app_with(AppOptions {
        worker,
        registry,
        ..Default::default()
    })
    .await;
    Env {
        app,
        kube,
        admin,
        counter,
        region: REGION.to_owned(),
    }
}

/// The shared moto and the admin Kubernetes identity, but the service's Kubernetes client is
/// `service_kube(&emulator)` (e.g. a token without rights in the repository's namespace).
pub async fn start_with_kube_client(
    namespaces: &[&str],
    service_kube: impl FnOnce(&KubeEmulator) -> kube::Client,
) -> Env {
    backup_provisioner::install_crypto_provider();
    let kube = KubeEmulator::start(namespaces);
    let client = service_kube(&kube);
    let counter = CallCounter::new();
    let moto = Moto::shared();
    let service_aws = moto.clients(REGION, Some(counter.clone())).await;
    let admin = moto.clients(REGION, None).await;
    start_env(kube, service_aws, client, admin, counter).await
}

/// A port nobody listens on right now (for a child process to bind).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}
