//! The HTTP layer: one router per resource, merged here with the middleware every request
//! passes (request id, body limit, timeout, CORS, metrics, problem+json for every error).

pub mod audit;
pub mod error;
pub mod extract;
pub mod health;
pub mod idempotency;
pub mod jobs;
pub mod openapi;
pub mod pagination;
pub mod repositories;
pub mod responses;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use sqlx::PgPool;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use utoipa_axum::router::OpenApiRouter;

use crate::auth::Authenticator;
use crate::domain::Namespace;
use crate::telemetry::Metrics;

pub use error::{ApiError, Problem};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub db: PgPool,
    pub auth: Authenticator,
    pub metrics: Arc<Metrics>,
    pub policy: Arc<RequestPolicy>,
    pub job_state_changes: crate::jobs::JobStateChanges,
}

/// Rules applied to incoming requests, from configuration.
#[derive(Debug, Clone)]
pub struct RequestPolicy {
    pub bucket_pattern: regex::Regex,
    pub allowed_namespaces: Vec<String>,
    pub max_attempts: i32,
    /// A request still in flight after this long was dropped (timeout, crash): its
    /// Idempotency-Key may be claimed again.
    pub idempotency_abandon_after: Duration,
}

impl RequestPolicy {
    pub fn namespace(&self, value: &str) -> Result<Namespace, crate::domain::ValidationError> {
        Namespace::parse(value, &self.allowed_namespaces)
    }
}

#[derive(Debug, Clone)]
pub struct HttpLimits {
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub cors_origins: Vec<String>,
}

/// The API's routes, with their OpenAPI description gathered as they are registered.
pub fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::base())
        .merge(repositories::router())
        .merge(jobs::router())
        .merge(audit::router())
        .merge(health::router())
}

pub fn router(state: AppState, limits: &HttpLimits) -> Router {
    let (api, spec) = api_router().split_for_parts();
    let spec = Arc::new(spec);
    api.merge(openapi::docs_router(spec))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            idempotency::idempotency,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            record_metrics,
        ))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            limits.request_timeout,
        ))
        .layer(RequestBodyLimitLayer::new(limits.max_body_bytes))
        .layer(middleware::map_response(error::ensure_problem_json))
        .layer(cors(&limits.cors_origins))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}

fn cors(origins: &[String]) -> CorsLayer {
    let origins: Vec<HeaderValue> = origins.iter().filter_map(|o| o.parse().ok()).collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
        ])
        .expose_headers([header::LOCATION, REQUEST_ID])
        .max_age(Duration::from_secs(600))
}

/// One log line and one metric sample per request, labelled by route template (not raw path).
async fn record_metrics(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let request_id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    state
        .metrics
        .observe_http(method.as_str(), &route, status, elapsed);
    tracing::info!(%method, %route, status, latency_ms = elapsed.as_millis() as u64, %request_id, "request");
    response
}
