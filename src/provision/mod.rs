//! The runbook (`../shared/runbook-postgrescluster-backups.md`) as a job kind: one module per
//! runbook section, each observe -> act -> record.
//!
//! | runbook section            | module                                   |
//! |----------------------------|------------------------------------------|
//! | Create the Bucket          | [`bucket`]                               |
//! | Create an IAM Policy       | [`policy`]                               |
//! | Create an IAM Group        | [`group`]                                |
//! | Create the IAM User        | [`user`]                                 |
//! | Create an Access Key       | [`access_key`] (+ [`credential_check`])  |
//! | Create the Secret          | [`cipher_pass`], [`secret`]              |
//!
//! [`job`] runs those steps in order; [`request`] is the use case behind the HTTP API (store
//! the desired repository and queue its job in one transaction); [`wiring`] is what a
//! PostgresCluster needs once its repository is ready.

pub mod access_key;
pub mod bucket;
pub mod cipher_pass;
pub mod credential_check;
pub mod group;
pub mod job;
pub mod policy;
pub mod request;
pub mod sealed;
pub mod secret;
pub mod user;
pub mod wiring;

pub use job::{ProvisionPayload, ProvisionRepository, Provisioner};

use crate::cloud::CloudError;
use crate::jobs::JobError;

/// A failed AWS or Kubernetes call ends a step: retried when the cloud says a retry can help.
impl From<CloudError> for JobError {
    fn from(err: CloudError) -> Self {
        if err.is_retryable() {
            JobError::Retryable(err.to_string())
        } else {
            JobError::Permanent(err.to_string())
        }
    }
}
