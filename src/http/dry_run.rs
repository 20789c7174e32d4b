//! `?dry_run=true` on every mutating operation: the job kind's plan, made with read calls only,
//! instead of a queued job. Nothing is stored and nothing is audited.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, AppState};
use crate::jobs::{JobError, JobKind};

/// The query switch shared by every mutating operation.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DryRunQuery {
    /// Answer with the plan (per resource and setting: expected, actual, action) and change
    /// nothing: no job, no mutating AWS or Kubernetes call.
    #[serde(default)]
    pub dry_run: bool,
}

/// The answer to a dry run.
#[derive(Debug, Serialize, ToSchema)]
pub struct DryRunPlan {
    /// Always true: nothing was changed or queued.
    pub dry_run: bool,
    /// The job kind that would run.
    pub kind: &'static str,
    /// What the job would do, resource by resource (`resource`, `settings`: expected, actual,
    /// action).
    #[schema(value_type = Object)]
    pub plan: serde_json::Value,
}

/// Asks the job kind `K` for its plan of `payload` and answers 200 with it.
pub async fn answer<K: JobKind>(
    state: &AppState,
    payload: &K::Payload,
) -> Result<Response, ApiError> {
    let plan = match state.job_kinds.plan::<K>(payload).await {
        None => {
            return Err(ApiError::Unavailable(format!(
                "this replica cannot plan '{}' jobs (it runs no workers); retry against one that does",
                K::KIND
            )));
        }
        Some(result) => result.map_err(plan_error)?,
    };
    let body = DryRunPlan {
        dry_run: true,
        kind: K::KIND,
        plan,
    };
    Ok((StatusCode::OK, Json(body)).into_response())
}

/// A plan that cannot be made: a permanent finding (a resource in the way, a refused change) is
/// the caller's to fix (422); anything else is worth retrying (503).
fn plan_error(err: JobError) -> ApiError {
    match err {
        JobError::Permanent(message) => ApiError::Unprocessable(message),
        JobError::Database(e) => ApiError::Database(e),
        other => ApiError::Unavailable(format!("the plan could not be made now: {other}")),
    }
}
