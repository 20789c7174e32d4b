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
    // A probe's own timeout is short (Kubernetes: 1 s): answer 503 within it instead of
    // waiting the pool's acquire timeout while the database is down.
    let check = crate::db::migrations_applied(&state.db);
    match tokio::time::timeout(READINESS_BUDGET, check).await {
        Ok(Ok(true)) => Ok("ready"),
        Ok(Ok(false)) => Err(ApiError::Unavailable(
            "database migrations are not fully applied".into(),
        )),
        Ok(Err(e)) => Err(ApiError::Unavailable(format!(
            "database unreachable: {}",
            short(&e)
        ))),
        Err(_) => Err(ApiError::Unavailable(format!(
            "database did not answer within {} ms",
            READINESS_BUDGET.as_millis()
        ))),
    }
}

/// How long `/readyz` waits for the database.
const READINESS_BUDGET: std::time::Duration = std::time::Duration::from_millis(500);

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
    match crate::telemetry::verification_stats(&state.db).await {
        Ok(stats) => state.metrics.set_verification(&stats),
        Err(e) => tracing::warn!(error = %e, "could not refresh verification gauges"),
    }
    match crate::webhooks::outbox::stats(&state.db).await {
        Ok((pending, failed)) => state.metrics.set_webhook_deliveries(pending, failed),
        Err(e) => tracing::warn!(error = %e, "could not refresh webhook delivery gauges"),
    }
    match crate::telemetry::freshness_ages(&state.db).await {
        Ok(ages) => state.metrics.freshness.set(&ages),
        Err(e) => tracing::warn!(error = %e, "could not refresh backup freshness gauges"),
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
