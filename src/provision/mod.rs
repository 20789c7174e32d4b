//! The runbook as a job: one module per runbook step, each observe -> act -> record.
//!
//! `../shared/runbook-postgrescluster-backups.md` order: bucket, IAM policy, IAM group, IAM user,
//! access key, cipher pass, Kubernetes Secret; plus a credential check before `ready`.

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
