//! `GET /v1/me`: who the bearer token names and what it may do. The console (`/ui`) asks it
//! which buttons to show: the roles claim's name and shape are configured server-side
//! (`BP_JWT_ROLES_CLAIM`, ZITADEL's object form), so the browser cannot read them reliably.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::extract::Caller;
use super::responses::Unauthorized;
use super::{ApiError, AppState};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(whoami))
}

/// The caller as the service sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Me {
    /// The token's `sub`.
    pub subject: String,
    /// The known roles the token grants, lowest first (`viewer`, `operator`, `admin`).
    pub roles: Vec<String>,
    /// The highest of `roles`; null when the token grants none.
    pub role: Option<String>,
}

/// Who the token names and its roles; any valid token may ask, with or without a role.
#[utoipa::path(
    get, path = "/v1/me", tag = "auth",
    responses((status = 200, body = Me), Unauthorized),
    security(("bearer" = []))
)]
pub async fn whoami(caller: Caller) -> Result<axum::Json<Me>, ApiError> {
    let principal = caller.principal;
    Ok(axum::Json(Me {
        role: principal.highest_role().map(|r| r.as_str().to_owned()),
        roles: principal
            .roles
            .iter()
            .map(|r| r.as_str().to_owned())
            .collect(),
        subject: principal.subject,
    }))
}
