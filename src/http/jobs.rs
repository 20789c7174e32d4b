//! `/v1/jobs/{id}`: progress (with long polling), cancel, retry, and the job's audit events.

use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::sync::broadcast;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::audit::{AuditPage, audit_page};
use super::error::{PROBLEM_JSON, Problem};
use super::extract::{ApiPath, ApiQuery, Caller};
use super::responses::{
    BadRequest, Forbidden, NotFound, TooManyRequests, Unauthorized, Unprocessable,
};
use super::{ApiError, AppState, events, pagination};
use crate::audit::AuditFilter;
use crate::auth::Role;
use crate::domain::RepositoryName;
use crate::jobs::control;
use crate::jobs::queue::{self, CancelOutcome, Job, JobState, RetryOutcome};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_jobs))
        .routes(routes!(get_job))
        .routes(routes!(cancel_job))
        .routes(routes!(retry_job))
        .routes(routes!(job_events))
}

/// A job in a repository view.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobSummary {
    pub id: Uuid,
    pub kind: String,
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    pub state: String,
    pub attempts: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl From<Job> for JobSummary {
    fn from(job: Job) -> Self {
        JobSummary {
            id: job.id,
            kind: job.kind,
            state: job.state,
            attempts: job.attempts,
            last_error: job.last_error,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StepView {
    pub name: String,
    /// `pending`, `running`, `succeeded`, `failed` or `skipped`.
    pub state: String,
    pub attempts: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    pub id: Uuid,
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    pub state: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub cancel_requested: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When a queued job becomes runnable (the next retry).
    pub run_at: DateTime<Utc>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    pub steps: Vec<StepView>,
}

async fn load_view(db: &PgPool, id: Uuid) -> Result<Option<JobView>, ApiError> {
    let Some((job, steps)) = queue::get_with_steps(db, id).await? else {
        return Ok(None);
    };
    Ok(Some(JobView {
        id: job.id,
        kind: job.kind.clone(),
        repository: job.subject_name.clone(),
        state: job.state.clone(),
        attempts: job.attempts,
        max_attempts: job.max_attempts,
        cancel_requested: job.cancel_requested,
        last_error: job.last_error.clone(),
        run_at: job.run_at,
        created_by: job.created_by.clone(),
        created_at: job.created_at,
        started_at: job.started_at,
        finished_at: job.finished_at,
        steps: steps
            .into_iter()
            .map(|s| StepView {
                duration_ms: s
                    .started_at
                    .zip(s.finished_at)
                    .map(|(a, b)| (b - a).num_milliseconds()),
                name: s.step,
                state: s.state,
                attempts: s.attempts,
                started_at: s.started_at,
                finished_at: s.finished_at,
                last_error: s.last_error,
            })
            .collect(),
    }))
}

async fn view_or_404(db: &PgPool, id: Uuid) -> Result<JobView, ApiError> {
    load_view(db, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))
}

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Long poll: return as soon as the job ends, or after this long (max 30s), e.g. `30s`.
    pub wait: Option<String>,
}

pub const MAX_WAIT: Duration = Duration::from_secs(30);

fn parse_wait(wait: Option<&str>) -> Result<Duration, ApiError> {
    let Some(raw) = wait else {
        return Ok(Duration::ZERO);
    };
    let parsed = humantime::parse_duration(raw).map_err(|_| {
        ApiError::BadRequest(format!(
            "wait must be a duration like 30s or 500ms (got '{raw}')"
        ))
    })?;
    if parsed > MAX_WAIT {
        return Err(ApiError::BadRequest(format!(
            "wait must be at most 30s (got '{raw}')"
        )));
    }
    Ok(parsed)
}

/// Get a job's state and per-step progress; `?wait=30s` long-polls until it ends.
#[utoipa::path(
    get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id"), WaitQuery),
    responses(
        (status = 200, body = JobView),
        BadRequest, Unauthorized, NotFound,
    ),
    security(("bearer" = []))
)]
pub async fn get_job(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<WaitQuery>,
) -> Result<axum::Json<JobView>, ApiError> {
    caller.require(Role::Viewer)?;
    let wait = parse_wait(query.wait.as_deref())?;
    let deadline = tokio::time::Instant::now() + wait;
    let mut changes = state.job_state_changes.subscribe();
    loop {
        let view = view_or_404(&state.db, id).await?;
        let ended = JobState::parse(&view.state).is_some_and(JobState::is_terminal);
        if ended || tokio::time::Instant::now() >= deadline {
            return Ok(axum::Json(view));
        }
        wait_for_change(&mut changes, id, deadline).await;
    }
}

/// Waits until `id` changes state, the deadline passes, or notifications were lost (lagged).
async fn wait_for_change(
    changes: &mut broadcast::Receiver<Uuid>,
    id: Uuid,
    deadline: tokio::time::Instant,
) {
    loop {
        match tokio::time::timeout_at(deadline, changes.recv()).await {
            Ok(Ok(changed)) if changed != id => continue,
            _ => return,
        }
    }
}

/// Cancel a job: a queued job is cancelled at once, a running one at its next step boundary.
#[utoipa::path(
    post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 202, description = "Cancelled or cancel requested", body = JobView),
        Unauthorized, Forbidden, NotFound, TooManyRequests,
        (status = 409, description = "The job already ended", body = Problem, content_type = PROBLEM_JSON),
    ),
    security(("bearer" = []))
)]
pub async fn cancel_job(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<(axum::http::StatusCode, axum::Json<JobView>), ApiError> {
    caller.require(Role::Operator)?;
    match control::cancel(&state.db, id, caller.actor()).await? {
        CancelOutcome::NotFound => return Err(ApiError::NotFound(format!("no job {id}"))),
        CancelOutcome::AlreadyFinished(s) => {
            return Err(ApiError::Conflict(format!(
                "job {id} already ended ({}); nothing to cancel",
                s.as_str()
            )));
        }
        CancelOutcome::Cancelled | CancelOutcome::Requested => {}
    }
    Ok((
        axum::http::StatusCode::ACCEPTED,
        axum::Json(view_or_404(&state.db, id).await?),
    ))
}

/// Retry a failed or cancelled job; completed steps are not redone. A job superseded by a newer
/// job of its repository is not retried (its options may be stale): retry the newer one.
#[utoipa::path(
    post, path = "/v1/jobs/{id}/retry", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 202, description = "Queued again", body = JobView),
        Unauthorized, Forbidden, NotFound, TooManyRequests,
        (status = 409, description = "Not failed/cancelled, the repository has another active job, or a newer job superseded this one", body = Problem, content_type = PROBLEM_JSON),
    ),
    security(("bearer" = []))
)]
pub async fn retry_job(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<(axum::http::StatusCode, axum::Json<JobView>), ApiError> {
    caller.require(Role::Operator)?;
    match control::retry(&state.db, id, caller.actor()).await? {
        RetryOutcome::NotFound => return Err(ApiError::NotFound(format!("no job {id}"))),
        RetryOutcome::NotRetryable(s) => {
            return Err(ApiError::Conflict(format!(
                "job {id} is {}; only failed or cancelled jobs can be retried",
                s.as_str()
            )));
        }
        RetryOutcome::Conflict => {
            return Err(ApiError::Conflict(format!(
                "the repository of job {id} already has an active job"
            )));
        }
        RetryOutcome::Superseded { newer } => {
            return Err(ApiError::Conflict(format!(
                "a newer job {newer} exists for the repository of job {id}; retry that one or \
                 reconcile the repository"
            )));
        }
        RetryOutcome::Queued => {}
    }
    Ok((
        axum::http::StatusCode::ACCEPTED,
        axum::Json(view_or_404(&state.db, id).await?),
    ))
}

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Opaque cursor from the previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
}

/// The audit events of one job, oldest first, or its live event stream.
///
/// With `Accept: text/event-stream`: the job's and its steps' transitions as Server-Sent
/// Events, live until the job ends: `event: step` (data: `job_id`, `name`, `position`,
/// `state`, `attempts`, `started_at`, `finished_at`, `duration_ms`, `last_error`, `at`) and
/// `event: job` (data: `id`, `kind`, `state`, `attempts`, `last_error`, `started_at`,
/// `finished_at`, `at`), each with an `id:`; a reconnect with `Last-Event-ID` gets exactly
/// the events after it. Comments (`: keep-alive`) keep an idle stream open. The stream ends
/// after the `job` event of a terminal state (`succeeded`, `failed`, `cancelled`); a
/// reconnect that already has it is answered 204. Without `text/event-stream` in `Accept`,
/// the answer is the JSON audit page.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/events", tag = "jobs",
    params(
        ("id" = Uuid, Path, description = "Job id"),
        PageQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Event stream only: the `id:` of the last event received; the stream starts after it"),
    ),
    responses(
        (status = 200, description = "The job's audit events (JSON), or its event stream (`Accept: text/event-stream`)", content(
            (AuditPage = "application/json"),
            (String = "text/event-stream", example = "id: 42\nevent: step\ndata: {\"job_id\":\"…\",\"name\":\"bucket\",\"position\":1,\"state\":\"succeeded\",\"attempts\":1,\"duration_ms\":85,\"at\":\"…\"}\n\n"),
        )),
        (status = 204, description = "Event stream: the job ended and `Last-Event-ID` is its final event; nothing follows"),
        BadRequest, Unauthorized, NotFound,
    ),
    security(("bearer" = []))
)]
pub async fn job_events(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<Response, ApiError> {
    caller.require(Role::Viewer)?;
    if events::wants_event_stream(&headers) {
        return events::respond(&state, id, &headers).await;
    }
    if queue::get(&state.db, id).await?.is_none() {
        return Err(ApiError::NotFound(format!("no job {id}")));
    }
    let filter = AuditFilter {
        job_id: Some(id),
        ..Default::default()
    };
    audit_page(&state, filter, query.cursor.as_deref(), query.limit)
        .await
        .map(|page| axum::Json(page).into_response())
}

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct JobListQuery {
    /// Only jobs in this state.
    #[param(pattern = "^(queued|running|succeeded|failed|cancelled)$")]
    pub state: Option<String>,
    /// Only jobs of this kind, e.g. `provision-repository` or `deprovision-repository`.
    #[param(pattern = "^[a-z0-9][a-z0-9-]{0,62}$")]
    pub kind: Option<String>,
    /// Only jobs of the repository of this name (those of deleted repositories of that name
    /// too).
    pub repository: Option<String>,
    /// Opaque cursor from the previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
}

impl JobListQuery {
    /// The filter, or a 422 naming every filter that cannot match anything we store.
    fn filter(self, limit: i64) -> Result<queue::JobFilter, ApiError> {
        let mut problems = Vec::new();
        if let Some(state) = &self.state
            && JobState::parse(state).is_none()
        {
            problems.push(
                "state must be one of queued, running, succeeded, failed, cancelled".to_owned(),
            );
        }
        if let Some(kind) = &self.kind
            && !is_kind_name(kind)
        {
            problems.push(
                "kind must be a job kind's name: 1 to 63 lowercase letters, digits and hyphens"
                    .to_owned(),
            );
        }
        if let Some(Err(e)) = self.repository.as_deref().map(RepositoryName::parse) {
            problems.push(format!("repository: {e}"));
        }
        if !problems.is_empty() {
            return Err(ApiError::Unprocessable(problems.join("; ")));
        }
        let before = self.cursor.as_deref().map(decode_job_cursor).transpose()?;
        Ok(queue::JobFilter {
            state: self.state,
            kind: self.kind,
            subject_name: self.repository,
            before,
            limit: limit + 1,
        })
    }
}

fn is_kind_name(kind: &str) -> bool {
    (1..=63).contains(&kind.len())
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !kind.starts_with('-')
}

/// A job in the listing (its steps: `GET /v1/jobs/{id}`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobListItem {
    pub id: Uuid,
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    pub state: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub cancel_requested: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub run_at: DateTime<Utc>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<Job> for JobListItem {
    fn from(job: Job) -> Self {
        JobListItem {
            id: job.id,
            kind: job.kind,
            repository: job.subject_name,
            state: job.state,
            attempts: job.attempts,
            max_attempts: job.max_attempts,
            cancel_requested: job.cancel_requested,
            last_error: job.last_error,
            run_at: job.run_at,
            created_by: job.created_by,
            created_at: job.created_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobPage {
    pub items: Vec<JobListItem>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// List jobs, newest first, filtered by state, kind and repository.
#[utoipa::path(
    get, path = "/v1/jobs", tag = "jobs",
    params(JobListQuery),
    responses(
        (status = 200, body = JobPage),
        BadRequest, Unauthorized, Unprocessable,
    ),
    security(("bearer" = []))
)]
pub async fn list_jobs(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<JobListQuery>,
) -> Result<axum::Json<JobPage>, ApiError> {
    caller.require(Role::Viewer)?;
    let limit = pagination::page_limit(query.limit)?;
    let filter = query.filter(limit)?;
    let jobs = queue::list(&state.db, &filter).await?;
    let (jobs, next_cursor) = pagination::split_keyed_page(jobs, limit, |job| {
        let at = job
            .created_at
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        (at, job.id.to_string())
    });
    let items = jobs.into_iter().map(JobListItem::from).collect();
    Ok(axum::Json(JobPage { items, next_cursor }))
}

/// The `(created_at, id)` a job listing cursor names.
fn decode_job_cursor(cursor: &str) -> Result<(DateTime<Utc>, Uuid), ApiError> {
    let foreign = || ApiError::BadRequest("cursor is not one this server issued".into());
    let (at, id) = pagination::decode_keyed_cursor(cursor)?;
    let at = DateTime::parse_from_rfc3339(&at).map_err(|_| foreign())?;
    let id = pagination::cursor_uuid(&id.ok_or_else(foreign)?)?;
    Ok((at.with_timezone(&Utc), id))
}
