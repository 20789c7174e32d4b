//! The use case behind `POST /v1/backup-repositories` and `.../reconcile`: store what the
//! caller wants and queue the provisioning job in the same transaction, audited.
//!
//! The same desired state asked again changes nothing (no duplicate job); a different desired
//! state is a conflict naming the fields; the same desired state with other safety switches
//! stores the switches and provisions again with them, except `adopt` and `secret_name`,
//! which never change once the repository recorded a resource
//! ([`refuse_adoption_switch`]): an adopted repository is never provisioned.

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::adopt::{self, AdoptRepository};
use super::job::{ProvisionPayload, ProvisionRepository};
use crate::audit::{self, Actor, AuditEntry};
use crate::domain::ValidationError;
use crate::jobs::{self, EnqueueOptions, Job, JobKind, queue};
use crate::repository::{self, DesiredRepository, RepositoryOptions, RepositoryRow, Resources};

/// A repository whose provisioning was just queued.
#[derive(Debug)]
pub struct Queued {
    /// As it is after queueing (its state moved to `pending`).
    pub repository: RepositoryRow,
    pub job: Job,
}

/// What a create request did.
#[derive(Debug)]
pub enum Requested {
    /// A new repository; its provisioning is queued.
    Created(Queued),
    /// The repository existed with other safety switches: stored, provisioning queued again.
    OptionsChanged(Queued),
    /// The repository exists exactly as asked; nothing was queued.
    Unchanged {
        repository: RepositoryRow,
        latest_job: Option<Job>,
    },
}

/// Why a request was refused. The messages are for the caller and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("repository '{name}' already exists with a different desired state: {} differ{}", .fields.join(", "), if .fields.len() == 1 { "s" } else { "" })]
    DifferentDesiredState {
        name: String,
        fields: Vec<&'static str>,
    },
    #[error(
        "repository '{name}' exists {how}; \"adopt\" and \"secret_name\" cannot change on an \
         existing repository that has made or adopted its resources ({} differ{}). Send the \
         request as it was created, or reconcile it; to manage it the other way, deprovision it \
         and create it again", .fields.join(", "), if .fields.len() == 1 { "s" } else { "" }
    )]
    AdoptionSwitched {
        name: String,
        /// How it is managed now.
        how: &'static str,
        fields: Vec<&'static str>,
    },
    #[error("bucket '{bucket}' is already used by {}", .by.as_ref().map_or("another repository".to_owned(), |name| format!("repository '{name}'")))]
    BucketTaken { bucket: String, by: Option<String> },
    #[error("repository '{0}' already has a queued or running job; follow it, or cancel it first")]
    Busy(String),
    #[error("no backup repository named '{0}'")]
    NotFound(String),
    #[error("the repository was deleted concurrently; retry")]
    DeletedConcurrently,
    /// A stored repository no longer passes validation (only a hand-edited row can do that).
    #[error("stored repository is invalid: {0}")]
    InvalidStored(#[from] ValidationError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// How the job a request queues is queued: its attempts, and the URL its end is reported to
/// (`callback_url`, already checked against `BP_WEBHOOK_ALLOWED_HOSTS`). A bare attempt count
/// converts into it (no callback).
#[derive(Debug, Clone, Copy)]
pub struct Queueing<'a> {
    pub max_attempts: i32,
    pub callback_url: Option<&'a str>,
}

impl From<i32> for Queueing<'_> {
    fn from(max_attempts: i32) -> Self {
        Queueing {
            max_attempts,
            callback_url: None,
        }
    }
}

/// Creates the repository `desired` and queues its provisioning, or answers from the existing
/// repository of that name (see the module doc). An answer from the existing repository that
/// queues nothing reports nothing to the callback.
pub async fn request<'a>(
    db: &PgPool,
    desired: &DesiredRepository,
    actor: Actor<'_>,
    queueing: impl Into<Queueing<'a>>,
) -> Result<Requested, RequestError> {
    let queueing: Queueing = queueing.into();
    let mut tx = db.begin().await?;
    let inserted = match repository::insert_if_absent(&mut tx, desired, actor.subject).await {
        Ok(inserted) => inserted,
        // Two identical creates racing can trip the bucket constraint before the name's:
        // answer from the repository of that name when there is one.
        Err(e) if crate::db::violated_constraint(&e) == Some("backup_repositories_bucket_key") => {
            drop(tx);
            return match repository::by_name(db, desired.name.as_str()).await? {
                Some(row) => answer_existing(db, row, desired, actor, queueing).await,
                None => Err(bucket_taken(db, desired.bucket.as_str()).await?),
            };
        }
        Err(e) => return Err(e.into()),
    };
    let Some(row) = inserted else {
        drop(tx);
        let row = repository::by_name(db, desired.name.as_str())
            .await?
            .ok_or(RequestError::DeletedConcurrently)?;
        return answer_existing(db, row, desired, actor, queueing).await;
    };
    let detail = serde_json::json!({
        "namespace": row.namespace, "bucket": row.bucket, "region": row.region,
        "labels": desired.labels.as_map(), "options": desired.options,
    });
    let action = match desired.options.adopt {
        true => "repository.adopt",
        false => "repository.create",
    };
    let audit = Audited::new(actor, action, detail).with_callback(queueing.callback_url);
    let max_attempts = queueing.max_attempts;
    let queued = queue_provisioning(db, tx, &row, &desired.options, audit, max_attempts).await?;
    Ok(Requested::Created(queued))
}

/// Queues provisioning of an existing repository again: it converges to the runbook's state,
/// repairing drift, and changes nothing when nothing drifted.
pub async fn reconcile<'a>(
    db: &PgPool,
    name: &str,
    actor: Actor<'_>,
    queueing: impl Into<Queueing<'a>>,
) -> Result<Queued, RequestError> {
    let queueing: Queueing = queueing.into();
    let row = repository::by_name(db, name)
        .await?
        .ok_or_else(|| RequestError::NotFound(name.to_owned()))?;
    let mut options = row.options.0.clone();
    // An adopted repository converges by adoption with repair: nothing is made.
    options.repair |= options.adopt;
    let audit = Audited::new(actor, "repository.reconcile", serde_json::json!({}))
        .with_callback(queueing.callback_url);
    let tx = db.begin().await?;
    queue_provisioning(db, tx, &row, &options, audit, queueing.max_attempts).await
}

async fn answer_existing(
    db: &PgPool,
    row: RepositoryRow,
    desired: &DesiredRepository,
    actor: Actor<'_>,
    queueing: Queueing<'_>,
) -> Result<Requested, RequestError> {
    // Being deleted: the name is free again once its deprovision job succeeded.
    if row.state == "deprovisioning" {
        return Err(RequestError::Busy(row.name));
    }
    let fields = row.differences(desired);
    if !fields.is_empty() {
        return Err(RequestError::DifferentDesiredState {
            name: row.name,
            fields,
        });
    }
    refuse_adoption_switch(&row, &desired.options)?;
    if row.options.0 != desired.options {
        let queued = change_options(db, row, &desired.options, actor, queueing).await?;
        return Ok(Requested::OptionsChanged(queued));
    }
    let latest_job = queue::latest_per_subject(db, &[row.id]).await?.pop();
    if let (Some(url), Some(job)) = (queueing.callback_url, &latest_job) {
        attach_callback(db, job.id, url).await?;
    }
    Ok(Requested::Unchanged {
        repository: row,
        latest_job,
    })
}

/// A create answered from the existing repository queues nothing, so its `callback_url` goes to
/// the repository's active job if that job has none: its end is then delivered there. A job that
/// already ended, or reports to another callback, keeps as it is (the URL is not registered;
/// README "Webhooks"). One statement: the job's end (which writes the delivery from the row it
/// updates) either sees the URL or makes the `WHERE` miss. Whether it was attached.
async fn attach_callback(db: &PgPool, job: Uuid, url: &str) -> Result<bool, sqlx::Error> {
    let attached = sqlx::query(
        "UPDATE jobs SET callback_url = $2
          WHERE id = $1 AND callback_url IS NULL AND state IN ('queued', 'running')",
    )
    .bind(job)
    .bind(url)
    .execute(db)
    .await?;
    Ok(attached.rows_affected() == 1)
}

/// `adopt` and `secret_name` never change once the repository recorded a resource (made or
/// adopted): an adopted repository provisioned would get a new cipher pass, key and Secret
/// and lose its hand-made key; a provisioned one adopted would stop being swept. Before that
/// (its first job failed before recording anything, e.g. provisioning refused a hand-made set
/// in its way) they may change: each job's own guards still apply.
pub fn refuse_adoption_switch(
    row: &RepositoryRow,
    options: &RepositoryOptions,
) -> Result<(), RequestError> {
    let stored = &row.options.0;
    let secret_of = |o: &RepositoryOptions| o.secret_name.clone().unwrap_or(row.bucket.clone());
    let mut fields = Vec::new();
    if stored.adopt != options.adopt {
        fields.push("adopt");
    }
    if stored.adopt && options.adopt && secret_of(stored) != secret_of(options) {
        fields.push("secret_name");
    }
    if fields.is_empty() || row.resources.0 == Resources::default() {
        return Ok(());
    }
    Err(RequestError::AdoptionSwitched {
        name: row.name.clone(),
        how: match stored.adopt {
            true => "adopted (its resources were made by hand; adoption keeps them)",
            false => "provisioned by backup-provisioner",
        },
        fields,
    })
}

/// The same repository with other safety switches (`allow_new_cipher_pass`,
/// `adopt_existing_secret`): the remedy a failed job's message points at.
async fn change_options(
    db: &PgPool,
    row: RepositoryRow,
    options: &RepositoryOptions,
    actor: Actor<'_>,
    queueing: Queueing<'_>,
) -> Result<Queued, RequestError> {
    let mut tx = db.begin().await?;
    repository::set_options(&mut *tx, row.id, options).await?;
    let detail = serde_json::json!({ "options": options, "previous_options": row.options.0 });
    let audit = Audited::new(actor, "repository.update-options", detail)
        .with_callback(queueing.callback_url);
    queue_provisioning(db, tx, &row, options, audit, queueing.max_attempts).await
}

/// The audit entry of a request, written with the job it queues.
pub struct Audited<'a> {
    pub actor: Actor<'a>,
    pub action: &'static str,
    pub detail: serde_json::Value,
    /// Where the job's end is reported; stored on the job and recorded in the entry's detail.
    pub callback_url: Option<&'a str>,
}

impl<'a> Audited<'a> {
    pub fn new(actor: Actor<'a>, action: &'static str, detail: serde_json::Value) -> Self {
        Audited {
            actor,
            action,
            detail,
            callback_url: None,
        }
    }

    /// The job's end is reported to `callback_url` (when given).
    pub fn with_callback(mut self, callback_url: Option<&'a str>) -> Self {
        self.callback_url = callback_url;
        self
    }
}

/// Queues provisioning of `row` with `options` in `tx` (audited), commits, and reads back the
/// repository and the job as they now are.
async fn queue_provisioning(
    db: &PgPool,
    mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
    row: &RepositoryRow,
    options: &RepositoryOptions,
    audit: Audited<'_>,
    max_attempts: i32,
) -> Result<Queued, RequestError> {
    let name = row.name.as_str();
    let job_id = match options.adopt {
        true => {
            let payload = adopt::payload_for(row, options)?;
            enqueue_audited::<AdoptRepository>(&mut tx, &payload, name, audit, max_attempts).await?
        }
        false => {
            let payload = payload_for(row, options)?;
            enqueue_audited::<ProvisionRepository>(&mut tx, &payload, name, audit, max_attempts)
                .await?
        }
    }
    .ok_or_else(|| RequestError::Busy(row.name.clone()))?;
    tx.commit().await?;
    read_back(db, row.id, job_id).await
}

/// The repository `repository_id` and its job `job_id` as they are once the job is queued.
pub async fn read_back(
    db: &PgPool,
    repository_id: Uuid,
    job_id: Uuid,
) -> Result<Queued, RequestError> {
    let repository = repository::by_id(db, repository_id)
        .await?
        .ok_or(RequestError::DeletedConcurrently)?;
    let job = queue::get(db, job_id)
        .await?
        .ok_or(RequestError::DeletedConcurrently)?;
    Ok(Queued { repository, job })
}

/// The job payload provisioning `row` with `options`. The row's names were validated when it
/// was stored; they are parsed again into their domain types here.
fn payload_for(
    row: &RepositoryRow,
    options: &RepositoryOptions,
) -> Result<ProvisionPayload, RequestError> {
    Ok(ProvisionPayload {
        allow_new_cipher_pass: options.allow_new_cipher_pass,
        adopt_existing_secret: options.adopt_existing_secret,
        ..ProvisionPayload::for_row(row)?
    })
}

/// Locks the row of the repository `id` in `tx`; `false` when it is gone or deleted (its name
/// and bucket may already belong to a new repository).
pub async fn lock_live(tx: &mut PgConnection, id: Uuid) -> Result<bool, sqlx::Error> {
    let state = repository::lock_state(tx, id).await?;
    Ok(state.is_some_and(|state| state != repository::DELETED))
}

/// Queues the job `payload` of the repository `name` in `tx`, with the audit entry of its
/// request (`created`); `None` when the repository already has a queued or running job.
pub async fn enqueue_audited<K: JobKind>(
    tx: &mut PgConnection,
    payload: &K::Payload,
    name: &str,
    audit: Audited<'_>,
    max_attempts: i32,
) -> Result<Option<Uuid>, sqlx::Error> {
    let options = EnqueueOptions {
        created_by: audit.actor.subject,
        max_attempts,
        callback_url: audit.callback_url,
    };
    let job_id = match jobs::enqueue::<K>(&mut *tx, payload, options).await {
        Err(e) if queue::is_subject_busy(&e) => return Ok(None),
        other => other?,
    };
    let mut detail = audit.detail;
    if let (Some(url), Some(fields)) = (audit.callback_url, detail.as_object_mut()) {
        fields.insert("callback_url".into(), url.into());
    }
    let entry = AuditEntry {
        actor: audit.actor.subject.to_owned(),
        request_id: audit.actor.request_id.map(str::to_owned),
        client_request_id: audit.actor.client_request_id.map(str::to_owned),
        subject: Some(name.to_owned()),
        job_id: Some(job_id),
        action: audit.action.into(),
        outcome: "created".into(),
        detail,
        ..Default::default()
    };
    audit::record(&mut *tx, &entry).await?;
    Ok(Some(job_id))
}

async fn bucket_taken(db: &PgPool, bucket: &str) -> Result<RequestError, sqlx::Error> {
    let by = repository::by_bucket(db, bucket)
        .await?
        .map(|other| other.name);
    Ok(RequestError::BucketTaken {
        bucket: bucket.to_owned(),
        by,
    })
}
