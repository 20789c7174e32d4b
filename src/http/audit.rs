//! `GET /v1/audit`: the append-only audit log, filtered and paginated.

use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::extract::{ApiQuery, Caller};
use super::jobs::{AuditPage, audit_page};
use super::{ApiError, AppState, Problem};
use crate::audit::AuditFilter;
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
    pub limit: Option<i64>,
}

/// Read the audit log, oldest first.
#[utoipa::path(
    get, path = "/v1/audit", tag = "audit",
    params(AuditQuery),
    responses(
        (status = 200, body = AuditPage),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
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
