//! The use case behind `DELETE /v1/backup-repositories/{name}`: queue the deprovisioning job
//! of a live repository and audit the request (`repository.deprovision`) in one transaction.

use serde_json::json;

use super::{DeprovisionPayload, DeprovisionRepository};
use crate::audit::Actor;
use crate::domain::{BucketName, Namespace, Region, RepositoryName};
use crate::provision::request::{
    Audited, Queued, Queueing, RequestError, enqueue_audited, lock_live, read_back,
};
use crate::repository::RepositoryRow;

/// What the caller asked for besides the repository.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Delete the bucket too.
    pub delete_bucket: bool,
    /// Delete it even though it holds objects (the caller confirmed the bucket's name).
    pub force: bool,
}

/// The job payload deprovisioning `row`. The row's names were validated when it was stored.
pub fn payload_for(
    row: &RepositoryRow,
    options: Options,
) -> Result<DeprovisionPayload, RequestError> {
    let resources = &row.resources.0;
    // An adopted repository may use a Secret of another name (e.g. `pgo-s3-creds`).
    let recorded_secret = resources
        .secret
        .as_ref()
        .filter(|s| s.namespace == row.namespace);
    Ok(DeprovisionPayload {
        repository: RepositoryName::parse(&row.name)?,
        repository_id: row.id,
        namespace: Namespace::try_from(row.namespace.clone())?,
        bucket: BucketName::try_from(row.bucket.clone())?,
        region: Region::parse(&row.region)?,
        delete_bucket: options.delete_bucket,
        force: options.force,
        recorded_user: resources.user.as_deref() == Some(row.bucket.as_str()),
        recorded_secret: recorded_secret.is_some(),
        secret_name: recorded_secret.map(|s| s.name.clone()),
    })
}

/// Queues the deprovisioning of the repository `payload` names, audited. A repository with an
/// active job is `Busy`; one deleted meanwhile is `NotFound`.
pub async fn queue_deprovisioning<'a>(
    db: &sqlx::PgPool,
    payload: &DeprovisionPayload,
    actor: Actor<'_>,
    queueing: impl Into<Queueing<'a>>,
) -> Result<Queued, RequestError> {
    let Queueing {
        max_attempts,
        callback_url,
    } = queueing.into();
    let name = payload.repository.to_string();
    let mut tx = db.begin().await?;
    // Locked, so that a repository deleted since it was read is not deprovisioned again.
    if !lock_live(&mut tx, payload.repository_id).await? {
        return Err(RequestError::NotFound(name));
    }
    let detail = json!({
        "namespace": payload.namespace, "bucket": payload.bucket,
        "delete_bucket": payload.delete_bucket, "force": payload.force,
    });
    let audit = Audited::new(actor, "repository.deprovision", detail).with_callback(callback_url);
    let job_id =
        enqueue_audited::<DeprovisionRepository>(&mut tx, payload, &name, audit, max_attempts)
            .await?
            .ok_or(RequestError::Busy(name))?;
    tx.commit().await?;
    read_back(db, payload.repository_id, job_id).await
}
