//! The problem+json error responses the routes document, declared once.
//!
//! Each type is one documented response (status, description, `application/problem+json` with
//! the [`Problem`] schema); a route lists the ones it can answer with, e.g.
//! `responses((status = 200, body = X), BadRequest, Unauthorized, NotFound)`. A response whose
//! meaning is specific to one route (most 409s) stays an explicit line on that route, with
//! `body = Problem, content_type = PROBLEM_JSON`.
//!
//! These types only describe responses; handlers answer with [`super::ApiError`].

use utoipa::IntoResponses;

use super::error::{PROBLEM_JSON, Problem};

/// 400: the request is malformed.
#[derive(IntoResponses)]
#[response(
    status = 400,
    description = "Malformed request: JSON syntax, query string, cursor or parameter value",
    content_type = PROBLEM_JSON
)]
pub struct BadRequest(pub Problem);

/// 401: no valid bearer token.
#[derive(IntoResponses)]
#[response(
    status = 401,
    description = "Missing, invalid or expired bearer token",
    content_type = PROBLEM_JSON
)]
pub struct Unauthorized(pub Problem);

/// 403: the token is valid but its roles do not allow the operation.
#[derive(IntoResponses)]
#[response(
    status = 403,
    description = "The token's roles do not allow this operation",
    content_type = PROBLEM_JSON
)]
pub struct Forbidden(pub Problem);

/// 404: the named resource does not exist.
#[derive(IntoResponses)]
#[response(
    status = 404,
    description = "No such resource",
    content_type = PROBLEM_JSON
)]
pub struct NotFound(pub Problem);

/// 413: the body exceeds `BP_MAX_BODY_BYTES`.
#[derive(IntoResponses)]
#[response(
    status = 413,
    description = "The request body is larger than the configured limit",
    content_type = PROBLEM_JSON
)]
pub struct PayloadTooLarge(pub Problem);

/// 415: the body is not declared as JSON.
#[derive(IntoResponses)]
#[response(
    status = 415,
    description = "The request body is not JSON (`Content-Type: application/json` is required)",
    content_type = PROBLEM_JSON
)]
pub struct UnsupportedMediaType(pub Problem);

/// 422: well-formed JSON that does not describe a valid request.
#[derive(IntoResponses)]
#[response(
    status = 422,
    description = "The body does not match the schema or a field is invalid; `errors` lists every invalid field",
    content_type = PROBLEM_JSON
)]
pub struct Unprocessable(pub Problem);

/// 503: a dependency is not available.
#[derive(IntoResponses)]
#[response(
    status = 503,
    description = "The database is unreachable or its migrations are not fully applied",
    content_type = PROBLEM_JSON
)]
pub struct Unavailable(pub Problem);

/// 429: over a rate limit (`BP_RATE_LIMIT_PER_SUBJECT`, `BP_RATE_LIMIT_GLOBAL`).
#[derive(IntoResponses)]
#[response(
    status = 429,
    description = "Too many mutating requests from this token's subject, or to this service; retry after `Retry-After` seconds",
    content_type = PROBLEM_JSON,
    headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))
)]
pub struct TooManyRequests(pub Problem);
