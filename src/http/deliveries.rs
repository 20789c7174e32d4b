//! `GET /v1/jobs/{id}/deliveries`: the webhook deliveries of a job that carried a
//! `callback_url`, each with every attempt (`webhooks`).

use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::extract::{ApiPath, Caller};
use super::responses::{BadRequest, NotFound, Unauthorized};
use super::{ApiError, AppState};
use crate::auth::Role;
use crate::jobs::queue;
use crate::webhooks::outbox::{self, AttemptRow, DeliveryRow};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(job_deliveries))
}

/// One attempt at a delivery.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeliveryAttemptView {
    /// From 1.
    pub attempt: i32,
    pub attempted_at: DateTime<Utc>,
    pub duration_ms: i32,
    /// The receiver's HTTP status, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_code: Option<i32>,
    /// Why the attempt did not deliver (a non-2xx answer, a timeout, a refused connection);
    /// absent when it delivered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A webhook delivery: one event of the job's end, sent to its `callback_url`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeliveryView {
    /// Sent as `webhook-id`; the same on every attempt.
    pub id: Uuid,
    /// `job.succeeded`, `job.failed` or `job.cancelled`.
    pub event_type: String,
    pub url: String,
    /// `pending` (being retried), `delivered` or `failed` (given up).
    pub state: String,
    /// When the next attempt is due (pending only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    /// When it was delivered or given up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// The event exactly as sent (the signed body): `type`, `timestamp`, `data`.
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    pub attempts: Vec<DeliveryAttemptView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeliveryList {
    /// Oldest first; empty when the job had no `callback_url` or has not ended.
    pub items: Vec<DeliveryView>,
}

impl DeliveryView {
    fn new(row: DeliveryRow, attempts: &[AttemptRow]) -> Self {
        let attempts = attempts
            .iter()
            .filter(|a| a.delivery_id == row.id)
            .map(|a| DeliveryAttemptView {
                attempt: a.attempt,
                attempted_at: a.attempted_at,
                duration_ms: a.duration_ms,
                status_code: a.status_code,
                error: a.error.clone(),
            })
            .collect();
        DeliveryView {
            next_attempt_at: (row.state == "pending").then_some(row.next_attempt_at),
            payload: serde_json::from_str(&row.body).unwrap_or(serde_json::Value::Null),
            id: row.id,
            event_type: row.event_type,
            url: row.url,
            state: row.state,
            last_error: row.last_error,
            created_at: row.created_at,
            finished_at: row.finished_at,
            attempts,
        }
    }
}

/// The webhook deliveries of a job (its `callback_url` told where), each with every attempt:
/// status code or error, duration, time. Deliveries are at least once; receivers drop
/// duplicates by `webhook-id`.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/deliveries", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses(
        (status = 200, body = DeliveryList),
        BadRequest, Unauthorized, NotFound,
    ),
    security(("bearer" = []))
)]
pub async fn job_deliveries(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<axum::Json<DeliveryList>, ApiError> {
    caller.require(Role::Viewer)?;
    queue::get(&state.db, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    let (deliveries, attempts) = outbox::of_job(&state.db, id).await?;
    let items = deliveries
        .into_iter()
        .map(|row| DeliveryView::new(row, &attempts))
        .collect();
    Ok(axum::Json(DeliveryList { items }))
}
