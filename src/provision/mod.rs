//! The runbook (`../shared/runbook-postgrescluster-backups.md`) as a job kind: one module per
//! runbook section, each quoting its section and doing observe -> act -> record, one function
//! per runbook setting.
//!
//! | runbook section            | module                                                   |
//! |----------------------------|----------------------------------------------------------|
//! | Create the Bucket          | [`bucket`]                                               |
//! | Create an IAM Policy       | [`policy`]                                               |
//! | Create an IAM Group        | [`group`]                                                |
//! | Create the IAM User        | [`user`]                                                 |
//! | Create an Access Key       | [`access_key`] (then [`credential_check`], our addition) |
//! | Create the Secret          | [`secret`] (`s3.conf`), [`cipher_pass`] (its pass)       |
//!
//! [`job`] is the job kind and its step sequence: thin wrappers that call those modules and
//! record what they made. [`report`] is what every step found and did, setting by setting
//! (expected / actual / action), carried in its audit entry. [`sealed`] keeps an access key's
//! secret and a new cipher pass encrypted in Postgres until the Secret holds them.
//! [`request`] is the use case behind the HTTP API (store the desired repository and queue its
//! job in one transaction); [`manifests`] is what a PostgresCluster needs once its repository
//! is ready; [`overview`] reads a repository's page in one query; [`freshness`] dates each ready repository's newest backup and WAL. [`sweep`]
//! cleans up what failed or cancelled jobs left (sealed material the Secret holds, access keys
//! nobody can use). [`rotate`] replaces a ready repository's access key
//! without downtime (the old key retired after a grace period); [`key_schedule`] queues the
//! old keys' retirements and, optionally, rotations of old keys.

pub mod access_key;
pub mod adopt;
pub mod bucket;
pub mod cipher_pass;
pub mod credential_check;
pub mod deprovision;
pub mod freshness;
pub mod group;
pub mod job;
pub mod key_schedule;
pub mod manifests;
pub mod overview;
pub mod plan;
pub mod policy;
pub mod report;
pub mod request;
pub mod rotate;
pub mod sealed;
pub mod secret;
pub mod sweep;
pub mod user;
pub mod verify;
pub mod verify_sweep;

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
