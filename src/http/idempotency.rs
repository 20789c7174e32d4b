//! `Idempotency-Key` for POST requests, as the IETF httpapi draft describes it:
//! same key and same request → the first response again; same key and a different request → 422;
//! same key while the first request is still being processed → 409; keys expire after 24 hours.
//! Keys are scoped to the caller (token subject), so two clients cannot collide.
//!
//! The caller is authenticated before the key is looked at, a replay is authorized again (the
//! caller must still hold the role the handler required: `Caller::require`), and refusals that
//! depend on the token or the moment (401, 403, 429) are never stored, nor are server errors.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::extract::Caller;
use super::{ApiError, AppState};
use crate::auth::Role;

pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Headers replayed with a stored response.
const REPLAYED_HEADERS: [HeaderName; 2] = [header::CONTENT_TYPE, header::LOCATION];

pub async fn idempotency(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if request.method() != Method::POST || !request.headers().contains_key(IDEMPOTENCY_KEY) {
        return next.run(request).await;
    }
    match handle(state, request, next).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn handle(state: AppState, request: Request, next: Next) -> Result<Response, ApiError> {
    let (mut parts, body) = request.into_parts();
    // Authentication first: without a valid token the key is not looked at (401, not 400).
    let caller = Caller::from_request_parts(&mut parts, &state).await?;
    let key = parse_key(&parts.headers)?;
    let body = axum::body::to_bytes(body, usize::MAX).await.map_err(|_| {
        ApiError::PayloadTooLarge("request body is larger than the configured limit".into())
    })?;
    let fingerprint = fingerprint(&parts.method, parts.uri.path(), &body);
    let actor = caller.principal.subject.as_str();
    if let Some(response) = existing(&state, &caller, &key, &fingerprint).await? {
        return Ok(response);
    }
    if !claim(
        &state,
        actor,
        &key,
        &fingerprint,
        &parts.method,
        parts.uri.path(),
    )
    .await?
    {
        // Another request claimed the key between our read and our insert.
        return existing(&state, &caller, &key, &fingerprint)
            .await?
            .ok_or_else(|| {
                ApiError::Conflict(
                    "a request with this Idempotency-Key is still being processed".into(),
                )
            });
    }
    let response = next.run(Request::from_parts(parts, Body::from(body))).await;
    store(&state, &caller, &key, response).await
}

fn parse_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let raw = headers
        .get(IDEMPOTENCY_KEY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // The draft defines the key as a structured-field string; accept it quoted or bare.
    let key = raw.trim().trim_matches('"');
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(ApiError::BadRequest(
            "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
        ));
    }
    Ok(key.to_owned())
}

fn fingerprint(method: &Method, path: &str, body: &[u8]) -> Vec<u8> {
    let mut hash = Sha256::new();
    hash.update(method.as_str());
    hash.update([0]);
    hash.update(path);
    hash.update([0]);
    hash.update(body);
    hash.finalize().to_vec()
}

#[derive(sqlx::FromRow)]
struct StoredKey {
    request_hash: Vec<u8>,
    response_status: Option<i32>,
    response_headers: Option<sqlx::types::Json<Vec<(String, String)>>>,
    response_body: Option<Vec<u8>>,
    required_role: Option<String>,
    abandoned: bool,
}

/// The answer for a key already seen: a replay (once the caller is authorized again), a 403, a
/// 422 or a 409. None when the key is new (or expired, or abandoned by a crashed request: such
/// rows are removed here).
async fn existing(
    state: &AppState,
    caller: &Caller,
    key: &str,
    fingerprint: &[u8],
) -> Result<Option<Response>, ApiError> {
    let actor = caller.principal.subject.as_str();
    let row: Option<StoredKey> = sqlx::query_as(
        "SELECT request_hash, response_status, response_headers, response_body, required_role,
                (response_status IS NULL AND created_at < now() - make_interval(secs => $3)) AS abandoned
           FROM idempotency_keys WHERE actor = $1 AND key = $2 AND expires_at > now()",
    )
    .bind(actor)
    .bind(key)
    .bind(state.policy.idempotency_abandon_after.as_secs_f64())
    .fetch_optional(&state.db)
    .await?;
    let Some(row) = row else {
        forget(state, actor, key, "expires_at <= now()").await?;
        return Ok(None);
    };
    if row.request_hash != fingerprint {
        return Err(ApiError::Unprocessable(
            "this Idempotency-Key was already used with a different request; use a new key".into(),
        ));
    }
    if row.abandoned {
        forget(state, actor, key, "response_status IS NULL").await?;
        return Ok(None);
    }
    let Some(status) = row.response_status else {
        return Err(ApiError::Conflict(
            "a request with this Idempotency-Key is still being processed".into(),
        ));
    };
    if let Some(role) = row.required_role {
        // A role this binary does not know: demand the highest.
        caller.require(role.parse().unwrap_or(Role::Admin))?;
    }
    Ok(Some(replay(
        status,
        row.response_headers.map(|h| h.0).unwrap_or_default(),
        row.response_body,
    )))
}

async fn forget(
    state: &AppState,
    actor: &str,
    key: &str,
    condition: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM idempotency_keys WHERE actor = $1 AND key = $2 AND {condition}"
    )))
    .bind(actor)
    .bind(key)
    .execute(&state.db)
    .await?;
    Ok(())
}

async fn claim(
    state: &AppState,
    actor: &str,
    key: &str,
    fingerprint: &[u8],
    method: &Method,
    path: &str,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO idempotency_keys (actor, key, request_hash, method, path) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (actor, key) DO NOTHING",
    )
    .bind(actor)
    .bind(key)
    .bind(fingerprint)
    .bind(method.as_str())
    .bind(path)
    .execute(&state.db)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// Whether an answer is stored for replay: not a server error (the client's retry runs the
/// request again), nor a refusal that depends on the token or the moment rather than on the
/// request (401, 403: roles change; 429: the rate frees up).
fn is_stored(status: StatusCode) -> bool {
    !status.is_server_error()
        && !matches!(
            status,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS
        )
}

/// Stores a final response for replay, with the role its handler required of the caller; an
/// answer that is not stored ([`is_stored`]) releases the key.
async fn store(
    state: &AppState,
    caller: &Caller,
    key: &str,
    response: Response,
) -> Result<Response, ApiError> {
    let actor = caller.principal.subject.as_str();
    if !is_stored(response.status()) {
        forget(state, actor, key, "response_status IS NULL").await?;
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    let bytes: Bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .map_err(|e| ApiError::Internal(format!("buffering response: {e}")))?;
    let headers: Vec<(String, String)> = REPLAYED_HEADERS
        .iter()
        .filter_map(|name| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| (name.to_string(), v.to_owned()))
        })
        .collect();
    sqlx::query(
        "UPDATE idempotency_keys SET response_status = $3, response_headers = $4, response_body = $5,
                required_role = $6
          WHERE actor = $1 AND key = $2",
    )
    .bind(actor)
    .bind(key)
    .bind(parts.status.as_u16() as i32)
    .bind(sqlx::types::Json(&headers))
    .bind(bytes.as_ref())
    .bind(caller.required_role().map(Role::as_str))
    .execute(&state.db)
    .await?;
    Ok(Response::from_parts(parts, Body::from(bytes)))
}

fn replay(status: i32, headers: Vec<(String, String)>, body: Option<Vec<u8>>) -> Response {
    let status = StatusCode::from_u16(status as u16).unwrap_or(StatusCode::OK);
    let mut response = (status, body.unwrap_or_default()).into_response();
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            response.headers_mut().insert(name, value);
        }
    }
    response.headers_mut().insert(
        HeaderName::from_static("idempotent-replayed"),
        HeaderValue::from_static("true"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_and_server_errors_are_not_stored() {
        for status in [200, 201, 202, 400, 404, 409, 413, 415, 422] {
            assert!(is_stored(StatusCode::from_u16(status).unwrap()), "{status}");
        }
        for status in [401, 403, 429, 500, 502, 503, 504] {
            assert!(
                !is_stored(StatusCode::from_u16(status).unwrap()),
                "{status}"
            );
        }
    }
}
