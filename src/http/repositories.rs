//! `/v1/backup-repositories`: create (queues the provisioning job), list, get.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::dry_run::DryRunQuery;
use super::error::{PROBLEM_JSON, Problem};
use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::jobs::JobSummary;
use super::responses::{
    BadRequest, Forbidden, NotFound, PayloadTooLarge, TooManyRequests, Unauthorized, Unavailable,
    Unprocessable, UnsupportedMediaType,
};
use super::{ApiError, AppState, dry_run, pagination};
use crate::auth::Role;
use crate::domain::{
    BucketName, DEFAULT_REGION, Labels, Region, RepositoryName, ValidationError, default_bucket_for,
};
use crate::jobs::queue;
use crate::provision::adopt::AdoptRepository;
use crate::provision::deprovision::DeprovisionRepository;
use crate::provision::{self, request::Queued, request::Requested};
use crate::repository::{self, DesiredRepository, RepositoryOptions, RepositoryRow, Resources};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_repository, list_repositories))
        .routes(routes!(get_repository, deprovision_repository))
        .routes(routes!(reconcile_repository))
        .routes(routes!(verify_repository))
        .routes(routes!(rotate_access_key))
        .routes(routes!(rotate_cipher_pass))
        .routes(routes!(super::manifests::get_manifests))
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
    /// Adopt a repository made by hand with the runbook: nothing is created; the access key
    /// and cipher pass are read from the existing Secret and checked against IAM and the
    /// bucket; differences from the runbook are reported (repaired only with `repair`).
    #[serde(default)]
    pub adopt: bool,
    /// With `adopt`: the Secret to read, in the repository's namespace (default: the bucket's
    /// name), e.g. a hand-made `pgo-s3-creds`.
    #[schema(example = "pgo-s3-creds")]
    pub secret_name: Option<String>,
    /// With `adopt`: converge the safe differences and rewrite a Secret in another layout into
    /// the runbook's `s3.conf` (same values).
    #[serde(default)]
    pub repair: bool,
    /// Never accepted: a cipher pass is never set or changed through the API (422, with why).
    #[serde(default, skip_serializing)]
    #[schema(ignore)]
    pub cipher_pass: Option<serde_json::Value>,
    /// Where the end of the queued job is reported: a signed webhook (Standard Webhooks) POSTed
    /// when it succeeds, fails or is cancelled. An absolute `https` URL whose host is in
    /// `BP_WEBHOOK_ALLOWED_HOSTS`; nothing is sent when nothing is queued (200).
    #[schema(example = "https://holos.example.com/hooks/backup-provisioner")]
    pub callback_url: Option<String>,
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
        let options = self.options();
        errors.extend(provision::adopt::check_options(&options));
        errors.extend(check_callback(state, self.callback_url.as_deref()).err());
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
                    options,
                })
            }
            _ => Err(ApiError::Validation(errors)),
        }
    }

    fn options(&self) -> RepositoryOptions {
        RepositoryOptions {
            allow_new_cipher_pass: self.allow_new_cipher_pass,
            adopt_existing_secret: self.adopt_existing_secret,
            adopt: self.adopt,
            secret_name: self.secret_name.clone(),
            repair: self.repair,
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
    /// `pending`, `provisioning`, `ready`, `failed`, `cancelled`, `deprovisioning` or
    /// `deleted`.
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
    /// When the last verification (`POST .../verify`, or the periodic one) finished; null
    /// before the first.
    pub verified_at: Option<DateTime<Utc>>,
    /// How many settings the last verification found different from the runbook (after
    /// `repair`: how many it found, repaired or not).
    pub drift_count: Option<i32>,
    /// The last verification's report: `mode` (`plan` or `repair`), `drift`, and `resources`,
    /// each `{resource: {kind, name, action}, settings: [{setting, expected, actual, action}]}`.
    #[schema(value_type = Option<Object>)]
    pub verification: Option<serde_json::Value>,
    /// What the last backup freshness check found in the repository's prefix (newest backup,
    /// full backup and WAL, when checked, why it failed); on `GET .../{name}` and in the
    /// listing, for a repository checked at least once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freshness: Option<provision::freshness::Freshness>,
}

impl RepositoryView {
    pub fn new(row: RepositoryRow, last_job: Option<JobSummary>) -> Self {
        let ready = row.state == "ready";
        // The same objects as `GET .../manifests` (one source: `provision::manifests`).
        let wiring = ready.then(|| provision::manifests::Manifests::for_repository(&row));
        RepositoryView {
            pgbackrest: wiring.as_ref().and_then(|m| {
                serde_json::to_value(&m.postgres_cluster.spec.backups.pgbackrest).ok()
            }),
            external_secret: wiring.and_then(|m| serde_json::to_value(m.external_secret).ok()),
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
            verified_at: row.verified_at,
            drift_count: row.drift_count,
            verification: row.verification.map(|v| v.0),
            freshness: None,
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
/// `adopt_existing_secret`, `repair`) stores them and queues provisioning (or adoption) again
/// (202); `adopt` and `secret_name` cannot change once the repository made or adopted its
/// resources (409).
#[utoipa::path(
    post, path = "/v1/backup-repositories", tag = "repositories",
    request_body = CreateRepository,
    params(DryRunQuery, ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, pattern = "^[!-~]+$", description = "Replays the first response for a retried request (24 h); 1 to 255 visible ASCII characters")),
    responses(
        (status = 202, description = "Created, or its safety switches changed; provisioning queued. `Location` names the job.", body = CreatedRepository),
        (status = 200, description = "Already exists with this desired state; or, with `?dry_run=true`, the plan (nothing changed or queued)", body = CreatedRepository),
        BadRequest, Unauthorized, Forbidden,
        (status = 409, description = "Exists with a different desired state or other adoption switches (`adopt`, `secret_name`), or the bucket is taken", body = Problem, content_type = PROBLEM_JSON),
        PayloadTooLarge, UnsupportedMediaType, Unprocessable, TooManyRequests, Unavailable,
    ),
    security(("bearer" = []))
)]
pub async fn create_repository(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<DryRunQuery>,
    body: Result<ApiJson<CreateRepository>, ApiError>,
) -> Result<Response, ApiError> {
    // Authorization comes before body validation: a viewer learns nothing about the body.
    caller.require(Role::Operator)?;
    let ApiJson(request) = body?;
    if request.cipher_pass.is_some() {
        let why = provision::adopt::CIPHER_PASS_NEVER_CHANGED;
        return Err(ApiError::Unprocessable(format!(
            "\"cipher_pass\" is refused: {why}"
        )));
    }
    let desired = request.validate(&state)?;
    if query.dry_run {
        return plan_create(&state, &desired).await;
    }
    let queueing = queueing(&state, request.callback_url.as_deref());
    match provision::request::request(&state.db, &desired, caller.actor(), queueing).await? {
        Requested::Created(queued) | Requested::OptionsChanged(queued) => Ok(accepted(queued)),
        Requested::Unchanged {
            repository,
            latest_job,
        } => {
            let job =
                latest_job.ok_or_else(|| ApiError::Internal("repository without a job".into()))?;
            Ok(created_response(StatusCode::OK, repository, job.into()))
        }
    }
}

/// The plan of the job a create would queue (adoption or provisioning), for the repository of
/// that name when it exists; nothing is stored.
async fn plan_create(state: &AppState, desired: &DesiredRepository) -> Result<Response, ApiError> {
    let existing = repository::by_name(&state.db, desired.name.as_str()).await?;
    if let Some(row) = &existing {
        provision::request::refuse_adoption_switch(row, &desired.options)?;
    }
    let id = existing.map_or_else(Uuid::new_v4, |row| row.id);
    if desired.options.adopt {
        let payload = provision::adopt::payload_for_desired(desired, id)
            .map_err(|e| ApiError::Validation(vec![e]))?;
        return dry_run::answer::<AdoptRepository>(state, &payload).await;
    }
    let payload = provision::ProvisionPayload::for_desired(desired, id);
    dry_run::answer::<provision::ProvisionRepository>(state, &payload).await
}

/// Run provisioning again for an existing repository: it converges to the runbook's state,
/// repairing drift, and changes nothing when nothing drifted.
#[utoipa::path(
    post, path = "/v1/backup-repositories/{name}/reconcile", tag = "repositories",
    params(("name" = String, Path, description = "Repository name"), DryRunQuery),
    request_body(content = Option<CallbackRequest>, description = "Optional: `{\"callback_url\": \"https://…\"}`"),
    responses(
        (status = 202, description = "Provisioning queued. `Location` names the job.", body = CreatedRepository),
        (status = 200, description = "Dry run: the plan; nothing changed or queued", body = crate::http::dry_run::DryRunPlan),
        BadRequest, Unauthorized, Forbidden, NotFound, PayloadTooLarge, UnsupportedMediaType, TooManyRequests,
        (status = 409, description = "A job for this repository is already queued or running", body = Problem, content_type = PROBLEM_JSON),
        Unprocessable, Unavailable,
    ),
    security(("bearer" = []))
)]
pub async fn reconcile_repository(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<DryRunQuery>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Operator)?;
    let request: CallbackRequest = optional_json_body(&headers, body)?;
    let callback_url = request.checked_callback(&state)?;
    if query.dry_run {
        return plan_reconcile(&state, &name).await;
    }
    let queueing = queueing(&state, callback_url);
    let queued = provision::request::reconcile(&state.db, &name, caller.actor(), queueing).await?;
    Ok(accepted(queued))
}

/// The optional body of a request that starts a job and has nothing else to say
/// (`reconcile`, `rotate-key`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CallbackRequest {
    /// Where the end of the queued job is reported (a signed webhook): an absolute `https` URL
    /// whose host is in `BP_WEBHOOK_ALLOWED_HOSTS`.
    #[schema(example = "https://holos.example.com/hooks/backup-provisioner")]
    pub callback_url: Option<String>,
}

impl CallbackRequest {
    fn checked_callback(&self, state: &AppState) -> Result<Option<&str>, ApiError> {
        check_callback(state, self.callback_url.as_deref())
            .map_err(|e| ApiError::Validation(vec![e]))
    }
}

/// A request's `callback_url`, if any, checked against `BP_WEBHOOK_*` (422 naming the field).
fn check_callback<'a>(
    state: &AppState,
    callback_url: Option<&'a str>,
) -> Result<Option<&'a str>, ValidationError> {
    if let Some(url) = callback_url {
        state.policy.webhooks.check(url)?;
    }
    Ok(callback_url)
}

/// How a request's job is queued: the configured attempts, and its checked `callback_url`.
fn queueing<'a>(
    state: &AppState,
    callback_url: Option<&'a str>,
) -> provision::request::Queueing<'a> {
    provision::request::Queueing {
        max_attempts: state.policy.max_attempts,
        callback_url,
    }
}

/// The plan of the job a reconcile would queue (adoption with repair for an adopted
/// repository, else provisioning); nothing is stored.
async fn plan_reconcile(state: &AppState, name: &str) -> Result<Response, ApiError> {
    let row = repository::by_name(&state.db, name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no backup repository named '{name}'")))?;
    provision::verify::refuse_busy(&state.db, &row).await?;
    let mut options = row.options.0.clone();
    if options.adopt {
        options.repair = true;
        let payload = provision::adopt::payload_for(&row, &options)?;
        return dry_run::answer::<AdoptRepository>(state, &payload).await;
    }
    let payload = provision::ProvisionPayload::for_row(&row)?;
    dry_run::answer::<provision::ProvisionRepository>(state, &payload).await
}

/// The optional body of a verify request.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// Converge what is safe to converge: bucket settings and tags, the policy document, the
    /// group's attachment, the user's tags, membership and login profile, the access key's
    /// description tag, the Secret's labels. Never the cipher pass or the access key, and
    /// nothing missing is made.
    #[serde(default)]
    pub repair: bool,
    /// Where the end of the queued job is reported (a signed webhook): an absolute `https` URL
    /// whose host is in `BP_WEBHOOK_ALLOWED_HOSTS`.
    #[schema(example = "https://holos.example.com/hooks/backup-provisioner")]
    pub callback_url: Option<String>,
}

/// Verify a repository against the runbook: every setting is checked read-only (with
/// `"repair": true`, what is safe to converge is converged) and the report is stored on the
/// repository (`verified_at`, `drift_count`, `verification`). `?dry_run=true` answers with the
/// verification made now, read-only, and stores nothing.
#[utoipa::path(
    post, path = "/v1/backup-repositories/{name}/verify", tag = "repositories",
    params(("name" = String, Path, description = "Repository name"), DryRunQuery),
    request_body(content = Option<VerifyRequest>, description = "Optional: `{\"repair\": true}`"),
    responses(
        (status = 202, description = "Verification queued. `Location` names the job.", body = CreatedRepository),
        (status = 200, description = "Dry run: the verification, read-only; nothing stored", body = crate::http::dry_run::DryRunPlan),
        BadRequest, Unauthorized, Forbidden, NotFound, PayloadTooLarge, UnsupportedMediaType,
        (status = 409, description = "A job for this repository is already queued or running", body = Problem, content_type = PROBLEM_JSON),
        Unprocessable, TooManyRequests, Unavailable,
    ),
    security(("bearer" = []))
)]
pub async fn verify_repository(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<DryRunQuery>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Operator)?;
    let request: VerifyRequest = optional_json_body(&headers, body)?;
    let callback_url = check_callback(&state, request.callback_url.as_deref())
        .map_err(|e| ApiError::Validation(vec![e]))?;
    if query.dry_run {
        let row = repository::by_name(&state.db, &name)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no backup repository named '{name}'")))?;
        provision::verify::refuse_busy(&state.db, &row).await?;
        let payload = provision::verify::dry_run_payload(&row)?;
        return dry_run::answer::<provision::verify::VerifyDryRun>(&state, &payload).await;
    }
    let queueing = queueing(&state, callback_url);
    let actor = caller.actor();
    let queued =
        provision::verify::request(&state.db, &name, request.repair, actor, queueing).await?;
    Ok(accepted(queued))
}

/// An optional JSON body: none (or only whitespace) is the default.
fn optional_json_body<T: Default + serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::PayloadTooLarge("request body is larger than the configured limit".into())
        }
        _ => ApiError::BadRequest(e.body_text()),
    })?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return Err(ApiError::UnsupportedMediaType(
            "request body must be JSON: set Content-Type: application/json".into(),
        ));
    }
    serde_json::from_slice(&body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::Unprocessable(e.to_string()),
        _ => ApiError::BadRequest(format!("malformed JSON: {e}")),
    })
}

/// 202 with the repository as it now is and `Location` of the queued job.
fn accepted(queued: Queued) -> Response {
    created_response(StatusCode::ACCEPTED, queued.repository, queued.job.into())
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

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only repositories in this state. Deleted repositories are listed only with
    /// `state=deleted`.
    #[param(pattern = "^(pending|provisioning|ready|failed|cancelled|deprovisioning|deleted)$")]
    pub state: Option<String>,
    /// Only repositories whose Secret lives in this namespace.
    pub namespace: Option<String>,
    /// Opaque cursor from the previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RepositoryPage {
    pub items: Vec<RepositoryView>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// List backup repositories.
#[utoipa::path(
    get, path = "/v1/backup-repositories", tag = "repositories",
    params(ListQuery),
    responses(
        (status = 200, body = RepositoryPage),
        BadRequest, Unauthorized, Unprocessable,
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
        && !repository::STATES.contains(&s.as_str())
    {
        return Err(ApiError::Unprocessable(format!(
            "state must be one of {}",
            repository::STATES.join(", ")
        )));
    }
    let limit = pagination::page_limit(query.limit)?;
    let (after, after_id) = repository_cursor(query.cursor.as_deref())?;
    let filter = repository::ListFilter {
        state: query.state,
        namespace: query.namespace,
        after,
        after_id,
        limit: limit + 1,
    };
    let rows = repository::list(&state.db, &filter).await?;
    let (rows, next_cursor) =
        pagination::split_keyed_page(rows, limit, |row| (row.name.clone(), row.id.to_string()));
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let jobs = queue::latest_per_subject(&state.db, &ids).await?;
    let mut freshness = provision::freshness::store::of_repositories(&state.db, &ids).await?;
    let items = rows
        .into_iter()
        .map(|row| {
            let job = jobs
                .iter()
                .find(|j| j.subject_id == Some(row.id))
                .cloned()
                .map(JobSummary::from);
            let checked = freshness.iter().position(|(id, _)| *id == row.id);
            RepositoryView {
                freshness: checked.map(|i| freshness.swap_remove(i).1),
                ..RepositoryView::new(row, job)
            }
        })
        .collect();
    Ok(axum::Json(RepositoryPage { items, next_cursor }))
}

/// The name and id after which a page of repositories starts (deleted repositories can share a
/// name; a cursor of an earlier version holds the name alone).
fn repository_cursor(cursor: Option<&str>) -> Result<(Option<String>, Option<Uuid>), ApiError> {
    let Some(cursor) = cursor else {
        return Ok((None, None));
    };
    let (name, id) = pagination::decode_keyed_cursor(cursor)?;
    let id = id.map(|id| pagination::cursor_uuid(&id)).transpose()?;
    Ok((Some(name), id))
}

/// Get one backup repository: state, last job, resource identifiers, wiring once ready. A
/// deleted repository (no live one of that name) is shown with state `deleted`.
#[utoipa::path(
    get, path = "/v1/backup-repositories/{name}", tag = "repositories",
    params(("name" = String, Path, description = "Repository name")),
    responses(
        (status = 200, body = RepositoryView),
        Unauthorized, NotFound,
    ),
    security(("bearer" = []))
)]
pub async fn get_repository(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<axum::Json<RepositoryView>, ApiError> {
    caller.require(Role::Viewer)?;
    let found = provision::overview::by_name(&state.db, &name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no backup repository named '{name}'")))?;
    let job = found.latest_job.map(JobSummary::from);
    Ok(axum::Json(RepositoryView {
        freshness: found.freshness,
        ..RepositoryView::new(found.row, job)
    }))
}

#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeprovisionQuery {
    /// Delete the bucket too (kept by default). Refused while it holds objects unless the body
    /// confirms: `{"confirm": "<bucket>", "force": true}`.
    #[serde(default)]
    pub delete_bucket: bool,
    /// Answer with the plan (per resource: `delete`, `none`, `leave`) and change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// The optional body of a deprovision request: the confirmation that deletes a bucket with its
/// objects.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeprovisionRequest {
    /// The bucket's name, repeated: required with `force`.
    #[schema(example = "holos-zitadel-backups")]
    pub confirm: Option<String>,
    /// Delete the bucket's objects (every backup) with it. Only with `?delete_bucket=true` and
    /// `confirm`.
    #[serde(default)]
    pub force: bool,
    /// Where the end of the queued job is reported (a signed webhook): an absolute `https` URL
    /// whose host is in `BP_WEBHOOK_ALLOWED_HOSTS`.
    #[schema(example = "https://holos.example.com/hooks/backup-provisioner")]
    pub callback_url: Option<String>,
}

impl DeprovisionRequest {
    /// The body of a DELETE: none (or JSON `null`), or JSON.
    fn from_body(headers: &HeaderMap, body: &[u8]) -> Result<Self, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !json {
            return Err(ApiError::UnsupportedMediaType(
                "request body must be JSON: set Content-Type: application/json".into(),
            ));
        }
        let parsed: Option<Self> =
            serde_json::from_slice(body).map_err(|e| match e.classify() {
                serde_json::error::Category::Data => ApiError::Unprocessable(e.to_string()),
                _ => ApiError::BadRequest(format!("malformed JSON: {e}")),
            })?;
        Ok(parsed.unwrap_or_default())
    }

    /// The job's switches, or why the confirmation does not fit the request.
    fn options(
        &self,
        query: &DeprovisionQuery,
        bucket: &str,
    ) -> Result<provision::deprovision::request::Options, ApiError> {
        let asked = self.force || self.confirm.is_some();
        if asked && !query.delete_bucket {
            return Err(ApiError::Unprocessable(
                "confirm and force apply only to ?delete_bucket=true; without it the bucket and \
                 its objects are kept"
                    .into(),
            ));
        }
        if asked && self.confirm.as_deref() != Some(bucket) {
            return Err(ApiError::Unprocessable(format!(
                "to delete bucket {bucket} with its objects send {{\"confirm\": \"{bucket}\", \
                 \"force\": true}} (confirm must be the bucket's name)"
            )));
        }
        Ok(provision::deprovision::request::Options {
            delete_bucket: query.delete_bucket,
            force: self.force,
        })
    }
}

/// Deprovision a repository: deactivate its access keys, remove its Secret (only if ours),
/// delete the keys, the IAM user, group and policy. The bucket and its backups are kept unless
/// `?delete_bucket=true`; a bucket that holds objects is deleted only when the body confirms
/// `{"confirm": "<bucket>", "force": true}` (otherwise 422 before anything is queued, when this
/// replica can read the bucket, or the job fails before any change). The record and the audit
/// log stay: the repository ends `deleted`, and the name can be created again (a new
/// repository). `?dry_run=true` answers with the plan and changes nothing.
#[utoipa::path(
    delete, path = "/v1/backup-repositories/{name}", tag = "repositories",
    params(("name" = String, Path, description = "Repository name"), DeprovisionQuery),
    request_body(content = Option<DeprovisionRequest>, description = "Optional: the confirmation deleting a bucket that holds objects"),
    responses(
        (status = 202, description = "Deprovisioning queued. `Location` names the job.", body = CreatedRepository),
        (status = 200, description = "Dry run: the plan; nothing changed", body = crate::http::dry_run::DryRunPlan),
        BadRequest, Unauthorized, Forbidden, NotFound, PayloadTooLarge, UnsupportedMediaType,
        (status = 409, description = "A job for this repository is already queued or running", body = Problem, content_type = PROBLEM_JSON),
        Unprocessable, TooManyRequests, Unavailable,
    ),
    security(("bearer" = []))
)]
pub async fn deprovision_repository(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<DeprovisionQuery>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::PayloadTooLarge("request body is larger than the configured limit".into())
        }
        _ => ApiError::BadRequest(e.body_text()),
    })?;
    let request = DeprovisionRequest::from_body(&headers, &body)?;
    let callback_url = check_callback(&state, request.callback_url.as_deref())
        .map_err(|e| ApiError::Validation(vec![e]))?;
    let row = repository::by_name(&state.db, &name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no backup repository named '{name}'")))?;
    let options = request.options(&query, &row.bucket)?;
    let payload = provision::deprovision::request::payload_for(&row, options)?;
    if query.dry_run {
        return dry_run::answer::<DeprovisionRepository>(&state, &payload).await;
    }
    if options.delete_bucket && !options.force {
        refuse_non_empty_bucket(&state, &payload).await?;
    }
    let queued = provision::deprovision::request::queue_deprovisioning(
        &state.db,
        &payload,
        caller.actor(),
        queueing(&state, callback_url),
    )
    .await?;
    Ok(accepted(queued))
}

/// `delete_bucket` without `force`: the plan (read calls only) refuses a bucket that holds
/// objects, answered as a 422 before anything is queued. A replica that cannot plan (no
/// workers) or a plan that fails for another reason queues the job, whose first check refuses
/// such a bucket before any change.
async fn refuse_non_empty_bucket(
    state: &AppState,
    payload: &<DeprovisionRepository as crate::jobs::JobKind>::Payload,
) -> Result<(), ApiError> {
    match state.job_kinds.plan::<DeprovisionRepository>(payload).await {
        Some(Err(crate::jobs::JobError::Permanent(message))) => {
            Err(ApiError::Unprocessable(message))
        }
        _ => Ok(()),
    }
}

/// Refused, always: a repository's cipher pass is never changed in place.
///
/// pgBackRest encrypts every backup with the cipher pass and cannot re-encrypt an existing
/// repository; a new pass would make the backups already in the bucket unreadable. A new
/// cipher pass means a new repository (a new bucket and stanza). Answers 409 with the
/// explanation for every existing repository, 404 for an unknown name.
#[utoipa::path(
    post, path = "/v1/backup-repositories/{name}/rotate-cipher-pass", tag = "repositories",
    params(("name" = String, Path, description = "Repository name")),
    responses(
        (status = 409, description = "Always: the cipher pass is never rotated in place; the problem says why and what to do instead", body = Problem, content_type = PROBLEM_JSON),
        Unauthorized, Forbidden, NotFound, TooManyRequests,
    ),
    security(("bearer" = []))
)]
pub async fn rotate_cipher_pass(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    caller.require(Role::Operator)?;
    repository::by_name(&state.db, &name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no backup repository named '{name}'")))?;
    let why = provision::adopt::CIPHER_PASS_NEVER_CHANGED;
    Err(ApiError::Conflict(format!(
        "the cipher pass of repository '{name}' cannot be rotated: {why}"
    )))
}

/// Rotate the repository's access key without downtime: make room (delete a key the Secret
/// does not reference), create a key, prove it against the bucket, write the Secret with it
/// and the unchanged cipher pass, then keep the old key active for `BP_KEY_GRACE`, deactivate
/// it (its last use after the Secret changed is reported), and delete it `BP_KEY_DELETE_GRACE`
/// later. `?dry_run=true` answers with the plan and changes nothing.
#[utoipa::path(
    post, path = "/v1/backup-repositories/{name}/rotate-key", tag = "repositories",
    params(("name" = String, Path, description = "Repository name"), DryRunQuery),
    request_body(content = Option<CallbackRequest>, description = "Optional: `{\"callback_url\": \"https://…\"}`"),
    responses(
        (status = 202, description = "Rotation queued. `Location` names the job.", body = CreatedRepository),
        (status = 200, description = "Dry run: the plan; nothing changed", body = crate::http::dry_run::DryRunPlan),
        BadRequest, Unauthorized, Forbidden, NotFound, PayloadTooLarge, UnsupportedMediaType,
        (status = 409, description = "The repository is not ready, a job for it is queued or running, or the key of an earlier rotation is still active in its grace period", body = Problem, content_type = PROBLEM_JSON),
        Unprocessable, TooManyRequests, Unavailable,
    ),
    security(("bearer" = []))
)]
pub async fn rotate_access_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<DryRunQuery>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    use provision::rotate::request::{self as rotation, RotateRequestError as E};
    caller.require(Role::Operator)?;
    let request: CallbackRequest = optional_json_body(&headers, body)?;
    let callback_url = request.checked_callback(&state)?;
    let refused = |e: E| match e {
        E::NotFound(_) => ApiError::NotFound(e.to_string()),
        E::NotReady { .. } | E::Busy(_) | E::InGrace(_) => ApiError::Conflict(e.to_string()),
        E::InvalidStored(_) => ApiError::Internal(e.to_string()),
        E::Database(e) => e.into(),
    };
    if query.dry_run {
        let row = rotation::rotatable(&state.db, &name)
            .await
            .map_err(refused)?;
        let payload = rotation::payload_for(&row).map_err(|e| refused(e.into()))?;
        return dry_run::answer::<provision::rotate::RotateAccessKey>(&state, &payload).await;
    }
    let queueing = queueing(&state, callback_url);
    let queued = rotation::rotate(&state.db, &name, caller.actor(), queueing)
        .await
        .map_err(refused)?;
    let (repository, job) = (queued.repository, queued.job.into());
    Ok(created_response(StatusCode::ACCEPTED, repository, job))
}
