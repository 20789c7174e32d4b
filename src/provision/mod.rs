//! The runbook as a job: one module per runbook step, each observe -> act -> record.
//!
//! `../shared/runbook-postgrescluster-backups.md` order: bucket, IAM policy, IAM group, IAM user,
//! access key, cipher pass, Kubernetes Secret; plus a credential check before `ready`.

pub mod cipher_pass;
pub mod job;
pub mod sealed;
pub mod wiring;

use serde::{Deserialize, Serialize};

/// `jobs.kind` of the provisioning job. Never rename: queued jobs carry it.
pub const JOB_KIND: &str = "provision-repository";

/// What a provisioning job is asked to do (stored as the job payload; no secrets).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProvisionPayload {
    pub repository: String,
    pub repository_id: uuid::Uuid,
    pub namespace: String,
    pub bucket: String,
    pub region: String,
    #[serde(default)]
    pub allow_new_cipher_pass: bool,
    #[serde(default)]
    pub adopt_existing_secret: bool,
}

pub mod access_key;
pub mod bucket;
pub mod credential_check;
pub mod group;
pub mod policy;
pub mod secret;
pub mod user;

/// The job kinds this service runs, with AWS clients from the standard credential chain
/// (`AWS_*`, profiles, web identity) and Kubernetes from `KUBECONFIG` or in-cluster config.
pub async fn registry(
    worker: &crate::config::WorkerSettingsArgs,
) -> Result<crate::jobs::Registry, crate::startup::StartupError> {
    use crate::config::ConfigError;
    if worker.workers == 0 {
        return Ok(crate::jobs::Registry::new());
    }
    let encryption_key = worker.encryption_key()?;
    let settings = crate::cloud::aws::AwsSettings {
        endpoint_url: worker.aws_endpoint_url.clone(),
        region: None,
    };
    let aws = crate::cloud::aws::clients(&settings, None).await;
    let kube = crate::cloud::kube::client_from_env().await.map_err(|e| {
        ConfigError::new(
            "KUBECONFIG",
            format!("no usable Kubernetes configuration: {e}"),
        )
    })?;
    let provisioner = job::Provisioner {
        aws,
        kube,
        encryption_key,
        credential_check_budget: worker.credential_check_budget,
        credential_check_backoff: std::time::Duration::from_millis(500),
    };
    Ok(crate::jobs::Registry::new().register(provisioner))
}
