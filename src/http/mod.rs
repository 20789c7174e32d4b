//! The HTTP layer: one router per resource, merged here with the middleware every request
//! passes (security headers, request ids, URI limit, CORS, problem+json for every error, body
//! limit, timeout, metrics, rate limits), and the server that runs it (`server`).

pub mod audit;
pub mod deliveries;
pub mod dry_run;
pub mod error;
pub mod events;
pub mod extract;
pub mod hardening;
pub mod health;
pub mod idempotency;
pub mod jobs;
pub mod manifests;
pub mod me;
pub mod openapi;
pub mod pagination;
pub mod rate_limit;
pub mod raw_answers;
pub mod repositories;
pub mod responses;
pub mod server;
pub mod ui;

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
use tower_http::timeout::TimeoutLayer;
use utoipa_axum::router::OpenApiRouter;

use crate::auth::Authenticator;
use crate::domain::Namespace;
use crate::telemetry::Metrics;

pub use error::{ApiError, Problem};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What every handler can reach: shared, because every extractor and middleware of every
/// request takes its own handle (a clone of the parts would cost each request allocations).
#[derive(Clone)]
pub struct AppState(Arc<AppStateParts>);

impl AppState {
    pub fn new(parts: AppStateParts) -> Self {
        AppState(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppStateParts;

    fn deref(&self) -> &AppStateParts {
        &self.0
    }
}

pub struct AppStateParts {
    pub db: PgPool,
    pub auth: Authenticator,
    pub metrics: Arc<Metrics>,
    pub policy: Arc<RequestPolicy>,
    pub job_state_changes: crate::jobs::JobStateChanges,
    /// The job kinds this process runs; dry runs ask them for their plan (empty on a replica
    /// without workers, where a dry run answers 503).
    pub job_kinds: crate::jobs::Registry,
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
    /// An event stream's keep-alive comment interval (`events`).
    pub event_stream_keep_alive: Duration,
    /// What a request's `callback_url` may be (`BP_WEBHOOK_*`).
    pub webhooks: crate::webhooks::CallbackPolicy,
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
    pub connections: server::ConnectionLimits,
    pub rate_limits: rate_limit::RateLimitSettings,
    /// The operator console's login settings (`/ui`).
    pub ui: ui::UiSettings,
}

/// The API's routes, with their OpenAPI description gathered as they are registered.
pub fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::base())
        .merge(repositories::router())
        .merge(jobs::router())
        .merge(deliveries::router())
        .merge(audit::router())
        .merge(me::router())
        .merge(health::router())
}

pub fn router(state: AppState, limits: &HttpLimits) -> Router {
    let (api, spec) = api_router().split_for_parts();
    let spec = Arc::new(spec);
    api.merge(openapi::docs_router(spec))
        .merge(ui::router(&limits.ui))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            idempotency::idempotency,
        ))
        .layer(middleware::from_fn_with_state(
            (
                state.clone(),
                Arc::new(rate_limit::RateLimits::new(limits.rate_limits)),
            ),
            rate_limit::rate_limit,
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
        .layer(middleware::map_response(
            hardening::cors_for_allowed_origins_only,
        ))
        .layer(middleware::from_fn(hardening::uri_limit))
        .layer(middleware::from_fn(hardening::request_ids))
        .layer(middleware::from_fn(hardening::security_headers))
        .with_state(state)
}

fn cors(origins: &[String]) -> CorsLayer {
    let origins: Vec<HeaderValue> = origins.iter().filter_map(|o| o.parse().ok()).collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
            events::LAST_EVENT_ID,
        ])
        .expose_headers([header::LOCATION, REQUEST_ID, header::RETRY_AFTER])
        .max_age(Duration::from_secs(600))
}

/// One log line (debug for a successful read, else info) and one metric sample per request. Metric labels come from closed sets: the
/// route template (`unmatched` when no route matched) and the method (`other` unless standard);
/// the method and path the client sent are logged cut to a bounded length.
async fn record_metrics(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = hardening::loggable(request.uri().path(), 256).into_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let ids = request.extensions().get::<hardening::RequestIds>().cloned();
    let (request_id, client_request_id) = ids.map(|i| (i.server, i.client)).unwrap_or_default();
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    state
        .metrics
        .observe_http(method.as_str(), &route, status, elapsed);
    // Successful reads are the bulk of the traffic (portals and scripts polling a job or a
    // repository) and are counted in the metrics: their lines are debug. Changes, refusals and
    // failures are info.
    let read_ok = matches!(method, Method::GET | Method::HEAD) && status < 400;
    macro_rules! log_request {
        ($level:expr) => {
            tracing::event!(
                $level,
                method = %hardening::loggable(method.as_str(), 16),
                %route,
                %path,
                status,
                latency_ms = elapsed.as_millis() as u64,
                %request_id,
                client_request_id = client_request_id.as_deref().unwrap_or(""),
                "request"
            )
        };
    }
    if read_ok {
        log_request!(tracing::Level::DEBUG);
    } else {
        log_request!(tracing::Level::INFO);
    }
    response
}
