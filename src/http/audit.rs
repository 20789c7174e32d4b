//! `GET /v1/audit`: the append-only audit log, filtered and paginated.

use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::extract::{ApiQuery, Caller};
use super::responses::{BadRequest, Unauthorized};
use super::{ApiError, AppState, pagination};
use crate::audit::{self, AuditEvent, AuditFilter};
use crate::auth::Role;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_audit))
}

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only events of this repository (by name).
    pub repository: Option<String>,
    /// Only events by this actor (token subject).
    pub actor: Option<String>,
    /// Only events at or after this time (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// Opaque cursor from the previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
}

/// Read the audit log, oldest first.
#[utoipa::path(
    get, path = "/v1/audit", tag = "audit",
    params(AuditQuery),
    responses(
        (status = 200, body = AuditPage),
        BadRequest, Unauthorized,
    ),
    security(("bearer" = []))
)]
pub async fn list_audit(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> Result<axum::Json<AuditPage>, ApiError> {
    caller.require(Role::Viewer)?;
    let filter = AuditFilter {
        repository: query.repository,
        actor: query.actor,
        since: query.since,
        ..Default::default()
    };
    audit_page(&state, filter, query.cursor.as_deref(), query.limit)
        .await
        .map(axum::Json)
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    pub items: Vec<AuditEvent>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// One page of audit events; the cursor is the last event id of the previous page.
pub async fn audit_page(
    state: &AppState,
    mut filter: AuditFilter,
    cursor: Option<&str>,
    limit: Option<i64>,
) -> Result<AuditPage, ApiError> {
    let limit = pagination::page_limit(limit)?;
    filter.after = cursor.map(decode_event_cursor).transpose()?;
    filter.limit = limit + 1;
    let items = audit::list(&state.db, &filter).await?;
    let (items, next_cursor) = pagination::split_page(items, limit, |event| event.id.to_string());
    Ok(AuditPage { items, next_cursor })
}

fn decode_event_cursor(cursor: &str) -> Result<i64, ApiError> {
    pagination::decode_cursor(cursor)?
        .parse::<i64>()
        .map_err(|_| ApiError::BadRequest("cursor is not one this server issued".into()))
}
