//! Probes and metrics, open without a token.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::responses::Unavailable;
use super::{ApiError, AppState};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = String)))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// The database is reachable and every migration is applied.
#[utoipa::path(
    get, path = "/readyz", tag = "operations",
    responses((status = 200, body = String), Unavailable)
)]
pub async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    match crate::db::migrations_applied(&state.db).await {
        Ok(true) => Ok("ready"),
        Ok(false) => Err(ApiError::Unavailable(
            "database migrations are not fully applied".into(),
        )),
        Err(e) => Err(ApiError::Unavailable(format!(
            "database unreachable: {}",
            short(&e)
        ))),
    }
}

fn short(e: &sqlx::Error) -> &'static str {
    match e {
        sqlx::Error::PoolTimedOut => "connection pool timed out",
        sqlx::Error::Io(_) => "connection failed",
        _ => "query failed",
    }
}

/// Prometheus metrics: jobs by state, job and step durations, queue lag, HTTP requests.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, body = String, content_type = "application/openmetrics-text")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    match crate::jobs::queue::stats(&state.db).await {
        Ok((counts, lag)) => state.metrics.set_job_states(&counts, lag),
        Err(e) => tracing::warn!(error = %e, "could not refresh job gauges"),
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
