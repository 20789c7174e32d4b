//! The runbook as a job: one module per runbook step, each observe -> act -> record.
//!
//! `../shared/runbook-postgrescluster-backups.md` order: bucket, IAM policy, IAM group, IAM user,
//! access key, cipher pass, Kubernetes Secret; plus a credential check before `ready`.

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
pub mod user;

/// The job kinds this service runs, with their AWS and Kubernetes clients built from
/// configuration.
pub async fn registry(
    worker: &crate::config::WorkerSettingsArgs,
) -> Result<crate::jobs::Registry, crate::startup::StartupError> {
    let _ = worker;
    Ok(crate::jobs::Registry::new())
}
