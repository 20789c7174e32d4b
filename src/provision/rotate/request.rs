//! Queueing rotations and retirements, each in the transaction of its audit entry: `POST
//! /v1/backup-repositories/{name}/rotate-key` ([`rotate`]), and the key schedule's automatic
//! rotations and due retirements ([`enqueue_rotation`], [`enqueue_retirement`]).

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::keys::InGrace;
use super::retire::{RetireAccessKey, RetirePayload};
use super::retirements::{self, Due};
use super::{RotateAccessKey, RotatePayload};
use crate::audit::Actor;
use crate::domain::{BucketName, Namespace, Region, RepositoryName, ValidationError};
use crate::jobs::{Job, queue};
use crate::provision::request::{Audited, Queueing, enqueue_audited};
use crate::repository::{self, RepositoryRow};

/// Who the schedule's entries and jobs name.
pub const SCHEDULE_ACTOR: &str = "backup-provisioner";
/// The audit action of a rotation request (by an operator or the schedule).
pub const ROTATE_ACTION: &str = "repository.rotate-key";
/// The audit action of a retirement the schedule queued.
pub const RETIRE_ACTION: &str = "repository.retire-key";

/// Why a rotation was not queued. The messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum RotateRequestError {
    #[error("no backup repository named '{0}'")]
    NotFound(String),
    #[error("repository '{name}' is {state}, not ready: only a ready repository's key is rotated")]
    NotReady { name: String, state: String },
    #[error("repository '{0}' already has a queued or running job; follow it, or cancel it first")]
    Busy(String),
    #[error(transparent)]
    InGrace(#[from] InGrace),
    #[error("stored repository is invalid: {0}")]
    InvalidStored(#[from] ValidationError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// A rotation just queued.
#[derive(Debug)]
pub struct QueuedRotation {
    pub repository: RepositoryRow,
    pub job: Job,
}

/// The rotation payload of a stored repository (its names are validated again).
pub fn payload_for(row: &RepositoryRow) -> Result<RotatePayload, ValidationError> {
    Ok(RotatePayload {
        repository: RepositoryName::parse(&row.name)?,
        repository_id: row.id,
        namespace: Namespace::try_from(row.namespace.clone())?,
        bucket: BucketName::try_from(row.bucket.clone())?,
        region: Region::parse(&row.region)?,
        secret_name: row.options.0.secret_name.clone(),
    })
}

/// The repository a rotation is asked for, checked: it exists, is ready, and no key of an
/// earlier rotation is still active in its grace period. What the dry run plans from too.
pub async fn rotatable(db: &PgPool, name: &str) -> Result<RepositoryRow, RotateRequestError> {
    let row = repository::by_name(db, name)
        .await?
        .ok_or_else(|| RotateRequestError::NotFound(name.to_owned()))?;
    if row.state != "ready" {
        return Err(RotateRequestError::NotReady {
            name: row.name,
            state: row.state,
        });
    }
    // A halted retirement is the job's to judge (its key may be the one the Secret references
    // again, which the rotation replaces).
    let active_in_grace = retirements::pending(db, row.id)
        .await?
        .into_iter()
        .find(|r| r.deactivated_at.is_none() && r.halted_at.is_none());
    if let Some(r) = active_in_grace {
        return Err(InGrace::grace(&r.old_key_id, r.deactivate_after).into());
    }
    Ok(row)
}

/// Queues a rotation of the repository `name` (audited as [`ROTATE_ACTION`]).
pub async fn rotate<'a>(
    db: &PgPool,
    name: &str,
    actor: Actor<'_>,
    queueing: impl Into<Queueing<'a>>,
) -> Result<QueuedRotation, RotateRequestError> {
    let row = rotatable(db, name).await?;
    let payload = payload_for(&row)?;
    let mut tx = db.begin().await?;
    let detail = serde_json::json!({ "reason": "requested" });
    let job_id = enqueue_rotation(&mut tx, &payload, actor, queueing, detail).await?;
    tx.commit().await?;
    let repository = repository::by_id(db, row.id)
        .await?
        .ok_or_else(|| RotateRequestError::NotFound(name.to_owned()))?;
    let job = queue::get(db, job_id)
        .await?
        .ok_or_else(|| RotateRequestError::NotFound(name.to_owned()))?;
    Ok(QueuedRotation { repository, job })
}

/// Queues a rotation in `tx` with its audit entry. A repository with an active job is
/// [`RotateRequestError::Busy`]; one that is no longer ready (or was deleted) since it was
/// read is refused: its row is locked and its state checked again in `tx`, so a deprovisioning
/// queued meanwhile is either seen here or queued after this rotation (and then busy).
pub async fn enqueue_rotation<'a>(
    tx: &mut PgConnection,
    payload: &RotatePayload,
    actor: Actor<'_>,
    queueing: impl Into<Queueing<'a>>,
    detail: serde_json::Value,
) -> Result<Uuid, RotateRequestError> {
    let Queueing {
        max_attempts,
        callback_url,
    } = queueing.into();
    let name = payload.repository.to_string();
    match repository::lock_state(&mut *tx, payload.repository_id).await? {
        Some(state) if state == "ready" => {}
        Some(state) if state != repository::DELETED => {
            return Err(RotateRequestError::NotReady { name, state });
        }
        _ => return Err(RotateRequestError::NotFound(name)),
    }
    let audit = Audited::new(actor, ROTATE_ACTION, detail).with_callback(callback_url);
    enqueue_audited::<RotateAccessKey>(tx, payload, &name, audit, max_attempts)
        .await?
        .ok_or(RotateRequestError::Busy(name))
}

/// Queues the retirement job of a due retirement in `tx`, audited as [`RETIRE_ACTION`].
pub async fn enqueue_retirement(
    tx: &mut PgConnection,
    due: &Due,
    max_attempts: i32,
) -> Result<Uuid, RotateRequestError> {
    let payload = RetirePayload {
        repository: RepositoryName::parse(&due.repository)?,
        repository_id: due.repository_id,
        namespace: Namespace::try_from(due.namespace.clone())?,
        bucket: BucketName::try_from(due.bucket.clone())?,
        region: Region::parse(&due.region)?,
        retirement_id: due.id,
        phase: due.phase(),
        secret_name: due.secret_name.clone(),
    };
    let actor = Actor {
        subject: SCHEDULE_ACTOR,
        request_id: None,
        client_request_id: None,
    };
    let detail = serde_json::json!({ "retirement_id": due.id, "phase": payload.phase });
    let audit = Audited::new(actor, RETIRE_ACTION, detail);
    let name = due.repository.as_str();
    enqueue_audited::<RetireAccessKey>(tx, &payload, name, audit, max_attempts)
        .await?
        .ok_or_else(|| RotateRequestError::Busy(name.to_owned()))
}
