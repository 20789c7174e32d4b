//! `/v1/backup-repositories`: create (queues the provisioning job), list, get.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::extract::{ApiJson, ApiQuery, Caller};
use super::jobs::JobSummary;
use super::{ApiError, AppState, Problem};
use crate::audit::{self, AuditEntry};
use crate::auth::Role;
use crate::domain::{
    BucketName, DEFAULT_REGION, Labels, Region, RepositoryName, ValidationError, default_bucket_for,
};
use crate::jobs::queue::{self, NewJob};
use crate::provision::{self, ProvisionPayload};
use crate::repository::{self, DesiredRepository, RepositoryOptions, RepositoryRow, Resources};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_repository, list_repositories))
        .routes(routes!(get_repository))
        .routes(routes!(reconcile_repository))
}

/// A request for a pgBackRest S3 repository.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRepository {
    /// Repository name, usually the PostgresCluster's (a DNS-1123 label), e.g. `zitadel`.
    #[schema(example = "zitadel")]
    pub name: String,
    /// Namespace of the Secret in the management cluster.
    #[schema(example = "zitadel")]
    pub namespace: String,
    /// S3 bucket; defaults to `holos-{name}-backups`.
    #[schema(example = "holos-zitadel-backups")]
    pub bucket: Option<String>,
    /// AWS region of the bucket; defaults to `us-east-1`.
    #[schema(example = "us-east-1")]
    pub region: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Make a new cipher pass even though the bucket already holds (encrypted) objects.
    #[serde(default)]
    pub allow_new_cipher_pass: bool,
    /// Take over an existing Secret of the same name not created by backup-provisioner.
    #[serde(default)]
    pub adopt_existing_secret: bool,
}

impl CreateRepository {
    /// Validates every field, collecting every violation (not just the first).
    pub fn validate(&self, state: &AppState) -> Result<DesiredRepository, ApiError> {
        let mut errors: Vec<ValidationError> = Vec::new();
        let name = RepositoryName::parse(&self.name)
            .map_err(|e| errors.push(e.with_field("name")))
            .ok();
        let namespace = state
            .policy
            .namespace(&self.namespace)
            .map_err(|e| errors.push(e.with_field("namespace")))
            .ok();
        let bucket_input = match (&self.bucket, &name) {
            (Some(bucket), _) => Some(bucket.clone()),
            (None, Some(name)) => Some(default_bucket_for(name)),
            (None, None) => None,
        };
        let bucket = bucket_input.and_then(|b| {
            BucketName::parse(&b, &state.policy.bucket_pattern)
                .map_err(|e| errors.push(e.with_field("bucket")))
                .ok()
        });
        let region = Region::parse(self.region.as_deref().unwrap_or(DEFAULT_REGION))
            .map_err(|e| errors.push(e.with_field("region")))
            .ok();
        let labels = Labels::parse(self.labels.clone())
            .map_err(|e| errors.push(e.with_field("labels")))
            .ok();
        match (name, namespace, bucket, region, labels) {
            (Some(name), Some(namespace), Some(bucket), Some(region), Some(labels))
                if errors.is_empty() =>
            {
                Ok(DesiredRepository {
                    name,
                    namespace,
                    bucket,
                    region,
                    labels,
                    options: RepositoryOptions {
                        allow_new_cipher_pass: self.allow_new_cipher_pass,
                        adopt_existing_secret: self.adopt_existing_secret,
                    },
                })
            }
            _ => Err(ApiError::Validation(errors)),
        }
    }
}

/// A repository as clients see it. Never holds a secret value.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RepositoryView {
    pub name: String,
    pub namespace: String,
    pub bucket: String,
    pub region: String,
    pub labels: BTreeMap<String, String>,
    pub options: RepositoryOptions,
    /// `pending`, `provisioning`, `ready`, `failed` or `cancelled`.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub resources: Resources,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_job: Option<JobSummary>,
    /// For wiring up the PostgresCluster once ready: the `spec.backups.pgbackrest` fragment
    /// and the ExternalSecret that syncs the Secret into the workload cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub pgbackrest: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub external_secret: Option<serde_json::Value>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl RepositoryView {
    pub fn new(row: RepositoryRow, last_job: Option<JobSummary>) -> Self {
        let ready = row.state == "ready";
        let wiring = ready.then(|| provision::wiring::Wiring::for_repository(&row));
        RepositoryView {
            pgbackrest: wiring.as_ref().map(|w| w.pgbackrest.clone()),
            external_secret: wiring.map(|w| w.external_secret),
            name: row.name,
            namespace: row.namespace,
            bucket: row.bucket,
            region: row.region,
            labels: row.labels.0,
            options: row.options.0,
            state: row.state,
            last_error: row.last_error,
            resources: row.resources.0,
            last_job,
            created_by: row.created_by,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedRepository {
    pub repository: RepositoryView,
    pub job: JobSummary,
}

/// Create a backup repository and queue its provisioning.
///
/// The same request for an existing repository with the same desired state returns it (200)
/// without queueing a duplicate; a different desired state is a 409 naming the differing fields.
/// The same desired state with other safety switches (`allow_new_cipher_pass`,
/// `adopt_existing_secret`) stores them and queues provisioning again (202).
#[utoipa::path(
    post, path = "/v1/backup-repositories", tag = "repositories",
    request_body = CreateRepository,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for a retried request (24 h)")),
    responses(
        (status = 202, description = "Created, or its safety switches changed; provisioning queued. `Location` names the job.", body = CreatedRepository),
        (status = 200, description = "Already exists with this desired state", body = CreatedRepository),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Exists with a different desired state, or the bucket is taken", body = Problem, content_type = "application/problem+json"),
        (status = 413, body = Problem, content_type = "application/problem+json"),
        (status = 415, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn create_repository(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<ApiJson<CreateRepository>, ApiError>,
) -> Result<Response, ApiError> {
    // Authorization comes before body validation: a viewer learns nothing about the body.
    caller.require(Role::Operator)?;
    let ApiJson(request) = body?;
    let desired = request.validate(&state)?;
    let mut tx = state.db.begin().await?;
    let inserted = match repository::insert_if_absent(&mut tx, &desired, &caller.principal.subject)
        .await
    {
        Ok(inserted) => inserted,
        // Two identical creates racing can trip the bucket constraint before the name's:
        // answer from the repository of that name when there is one.
        Err(e) if crate::db::violated_constraint(&e) == Some("backup_repositories_bucket_key") => {
            drop(tx);
            return match repository::by_name(&state.db, desired.name.as_str()).await? {
                Some(row) => existing_repository(&state, row, &desired, &caller).await,
                None => Err(bucket_taken(&state, desired.bucket.as_str()).await),
            };
        }
        Err(e) => return Err(e.into()),
    };
    let Some(row) = inserted else {
        drop(tx);
        let row = repository::by_name(&state.db, desired.name.as_str())
            .await?
            .ok_or_else(|| {
                ApiError::Conflict("the repository was deleted concurrently; retry".into())
            })?;
        return existing_repository(&state, row, &desired, &caller).await;
    };
    let detail = serde_json::json!({
        "namespace": row.namespace, "bucket": row.bucket, "region": row.region,
        "labels": desired.labels.as_map(), "options": desired.options,
    });
    let payload = provision_payload(&row, &desired.options);
    queue_provisioning(&state, tx, &payload, &caller, "repository.create", detail).await
}

/// The job payload provisioning `row` with `options`.
fn provision_payload(row: &RepositoryRow, options: &RepositoryOptions) -> ProvisionPayload {
    ProvisionPayload {
        repository: row.name.clone(),
        repository_id: row.id,
        namespace: row.namespace.clone(),
        bucket: row.bucket.clone(),
        region: row.region.clone(),
        allow_new_cipher_pass: options.allow_new_cipher_pass,
        adopt_existing_secret: options.adopt_existing_secret,
    }
}

/// Queues provisioning in `tx` (audited as `action`), commits, and answers 202 with the
/// repository as it now is and `Location` of the job.
async fn queue_provisioning(
    state: &AppState,
    mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
    payload: &ProvisionPayload,
    caller: &Caller,
    action: &str,
    detail: serde_json::Value,
) -> Result<Response, ApiError> {
    let job_id = enqueue_job(
        &mut tx,
        payload,
        caller,
        state.policy.max_attempts,
        action,
        detail,
    )
    .await?;
    tx.commit().await?;
    // Re-read: enqueueing moved the repository's state.
    let row = repository::by_id(&state.db, payload.repository_id)
        .await?
        .ok_or_else(|| ApiError::Internal("repository vanished".into()))?;
    let job = JobSummary::load(&state.db, job_id).await?;
    Ok(created_response(StatusCode::ACCEPTED, row, job))
}

/// Queues a provisioning job and records the API mutation in the audit log.
async fn enqueue_job(
    tx: &mut sqlx::PgConnection,
    payload: &ProvisionPayload,
    caller: &Caller,
    max_attempts: i32,
    action: &str,
    detail: serde_json::Value,
) -> Result<Uuid, ApiError> {
    let job = NewJob {
        kind: provision::JOB_KIND,
        repository_id: Some(payload.repository_id),
        payload: serde_json::to_value(payload).map_err(|e| ApiError::Internal(e.to_string()))?,
        max_attempts,
        created_by: &caller.principal.subject,
    };
    let job_id = match queue::enqueue(&mut *tx, job).await {
        Err(e) if crate::db::violated_constraint(&e) == Some("jobs_one_active_per_repository") => {
            return Err(ApiError::Conflict(format!(
                "repository '{}' already has a queued or running job; follow it, or cancel it first",
                payload.repository
            )));
        }
        other => other?,
    };
    let entry = AuditEntry {
        actor: caller.principal.subject.clone(),
        request_id: caller.request_id.clone(),
        repository: Some(payload.repository.clone()),
        job_id: Some(job_id),
        action: action.into(),
        outcome: "created".into(),
        detail,
        ..Default::default()
    };
    audit::record(&mut *tx, &entry).await?;
    Ok(job_id)
}

/// Run provisioning again for an existing repository: it converges to the runbook's state,
/// repairing drift, and changes nothing when nothing drifted.
#[utoipa::path(
    post, path = "/v1/backup-repositories/{name}/reconcile", tag = "repositories",
    params(("name" = String, Path, description = "Repository name")),
    responses(
        (status = 202, description = "Provisioning queued. `Location` names the job.", body = CreatedRepository),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A job for this repository is already queued or running", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn reconcile_repository(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Role::Operator)?;
    let row = repository::by_name(&state.db, &name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no backup repository named '{name}'")))?;
    let payload = provision_payload(&row, &row.options.0);
    let tx = state.db.begin().await?;
    queue_provisioning(
        &state,
        tx,
        &payload,
        &caller,
        "repository.reconcile",
        serde_json::json!({}),
    )
    .await
}

async fn existing_repository(
    state: &AppState,
    row: RepositoryRow,
    desired: &DesiredRepository,
    caller: &Caller,
) -> Result<Response, ApiError> {
    let differences = row.differences(desired);
    if !differences.is_empty() {
        return Err(ApiError::Conflict(format!(
            "repository '{}' already exists with a different desired state: {} differ{}",
            row.name,
            differences.join(", "),
            if differences.len() == 1 { "s" } else { "" }
        )));
    }
    if row.options.0 != desired.options {
        return change_options(state, row, desired, caller).await;
    }
    let job = latest_job(state, row.id)
        .await?
        .ok_or_else(|| ApiError::Internal("repository without a job".into()))?;
    Ok(created_response(StatusCode::OK, row, job))
}

/// The same repository with other safety switches (`allow_new_cipher_pass`,
/// `adopt_existing_secret`): the remedy a failed job's message points at. The switches are
/// stored and provisioning runs again with them.
async fn change_options(
    state: &AppState,
    row: RepositoryRow,
    desired: &DesiredRepository,
    caller: &Caller,
) -> Result<Response, ApiError> {
    let mut tx = state.db.begin().await?;
    repository::set_options(&mut *tx, row.id, &desired.options).await?;
    let detail =
        serde_json::json!({ "options": desired.options, "previous_options": row.options.0 });
    let payload = provision_payload(&row, &desired.options);
    queue_provisioning(
        state,
        tx,
        &payload,
        caller,
        "repository.update-options",
        detail,
    )
    .await
}

async fn bucket_taken(state: &AppState, bucket: &str) -> ApiError {
    match repository::by_bucket(&state.db, bucket).await {
        Ok(Some(other)) => ApiError::Conflict(format!(
            "bucket '{bucket}' is already used by repository '{}'",
            other.name
        )),
        Ok(None) => ApiError::Conflict(format!(
            "bucket '{bucket}' is already used by another repository"
        )),
        Err(e) => e.into(),
    }
}

fn created_response(status: StatusCode, row: RepositoryRow, job: JobSummary) -> Response {
    let location = format!("/v1/jobs/{}", job.id);
    let body = CreatedRepository {
        repository: RepositoryView::new(row, Some(job.clone())),
        job,
    };
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(&location) {
        headers.insert(header::LOCATION, value);
    }
    (status, headers, axum::Json(body)).into_response()
}

async fn latest_job(state: &AppState, repository_id: Uuid) -> Result<Option<JobSummary>, ApiError> {
    let jobs = repository::latest_jobs(&state.db, &[repository_id]).await?;
    Ok(jobs.into_iter().next().map(JobSummary::from))
}

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only repositories in this state.
    pub state: Option<String>,
    /// Only repositories whose Secret lives in this namespace.
    pub namespace: Option<String>,
    /// Opaque cursor from the previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Page size, 1 to 200 (default 50).
    pub limit: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RepositoryPage {
    pub items: Vec<RepositoryView>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

pub const REPOSITORY_STATES: [&str; 5] =
    ["pending", "provisioning", "ready", "failed", "cancelled"];

/// List backup repositories.
#[utoipa::path(
    get, path = "/v1/backup-repositories", tag = "repositories",
    params(ListQuery),
    responses(
        (status = 200, body = RepositoryPage),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn list_repositories(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<axum::Json<RepositoryPage>, ApiError> {
    caller.require(Role::Viewer)?;
    if let Some(s) = &query.state
        && !REPOSITORY_STATES.contains(&s.as_str())
    {
        return Err(ApiError::BadRequest(format!(
            "state must be one of {}",
            REPOSITORY_STATES.join(", ")
        )));
    }
    let limit = page_limit(query.limit)?;
    let filter = repository::ListFilter {
        state: query.state,
        namespace: query.namespace,
        after: query.cursor.as_deref().map(decode_cursor).transpose()?,
        limit: limit + 1,
    };
    let mut rows = repository::list(&state.db, &filter).await?;
    let next_cursor = (rows.len() as i64 > limit).then(|| {
        rows.truncate(limit as usize);
        encode_cursor(&rows.last().expect("a full page").name)
    });
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let jobs = repository::latest_jobs(&state.db, &ids).await?;
    let items = rows
        .into_iter()
        .map(|row| {
            let job = jobs
                .iter()
                .find(|j| j.repository_id == Some(row.id))
                .cloned()
                .map(JobSummary::from);
            RepositoryView::new(row, job)
        })
        .collect();
    Ok(axum::Json(RepositoryPage { items, next_cursor }))
}

/// Get one backup repository: state, last job, resource identifiers, wiring once ready.
#[utoipa::path(
    get, path = "/v1/backup-repositories/{name}", tag = "repositories",
    params(("name" = String, Path, description = "Repository name")),
    responses(
        (status = 200, body = RepositoryView),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn get_repository(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<axum::Json<RepositoryView>, ApiError> {
    caller.require(Role::Viewer)?;
    let row = repository::by_name(&state.db, &name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no backup repository named '{name}'")))?;
    let job = latest_job(&state, row.id).await?;
    Ok(axum::Json(RepositoryView::new(row, job)))
}

pub fn page_limit(requested: Option<i64>) -> Result<i64, ApiError> {
    match requested.unwrap_or(50) {
        n @ 1..=200 => Ok(n),
        n => Err(ApiError::BadRequest(format!(
            "limit must be between 1 and 200 (got {n})"
        ))),
    }
}

pub fn encode_cursor(value: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value)
}

pub fn decode_cursor(cursor: &str) -> Result<String, ApiError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| ApiError::BadRequest("cursor is not one this server issued".into()))
}
