//! Extractors whose rejections are problem+json: JSON bodies, query strings, path parameters,
//! the caller's identity (bearer JWT).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::hardening::RequestIds;
use super::{ApiError, AppState};
use crate::auth::{Principal, Role};

/// `Json<T>` whose rejections (wrong content type, bad syntax, unknown fields, too large) are
/// precise problem+json 4xx responses.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(value) = axum::Json::<T>::from_request(req, state).await?;
        Ok(ApiJson(value))
    }
}

/// `Query<T>` with problem+json rejections.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Query(value) =
            axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(ApiQuery(value))
    }
}

/// `Path<T>` with problem+json rejections: a path parameter that does not parse (a job id
/// that is no UUID, a name that is not UTF-8) names no resource, so 404 as documented.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(value) =
            axum::extract::Path::<T>::from_request_parts(parts, state).await?;
        Ok(ApiPath(value))
    }
}

/// The authenticated caller. Handlers then demand a role with [`Caller::require`].
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    /// The server's id for the request ([`super::hardening::RequestIds`]).
    pub request_id: Option<String>,
    /// The client's `X-Request-Id`, when it was short and safe.
    pub client_request_id: Option<String>,
    /// The highest role demanded of this caller so far ([`Caller::require`]: 0 none, else the
    /// role's position in [`Role::ALL`] plus one), shared by the clones made for one request: the
    /// idempotency layer stores it with the answer and demands it again before a replay.
    required: Arc<AtomicU8>,
}

impl Caller {
    /// The caller as the use cases record it (audit actor, job creator).
    pub fn actor(&self) -> crate::audit::Actor<'_> {
        crate::audit::Actor {
            subject: &self.principal.subject,
            request_id: self.request_id.as_deref(),
            client_request_id: self.client_request_id.as_deref(),
        }
    }

    /// The highest role a handler demanded of this caller ([`Caller::require`]), if any.
    pub fn required_role(&self) -> Option<Role> {
        let rank = usize::from(self.required.load(Ordering::Relaxed));
        Role::ALL.get(rank.checked_sub(1)?).copied()
    }

    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        let rank = Role::ALL.iter().position(|r| *r == role).unwrap_or(0) + 1;
        self.required
            .fetch_max(u8::try_from(rank).unwrap_or(u8::MAX), Ordering::Relaxed);
        if self.principal.has(role) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this action needs the role '{role}'; the token for '{}' has: {}",
                self.principal.subject,
                if self.principal.roles.is_empty() {
                    "no roles".to_owned()
                } else {
                    self.principal
                        .roles
                        .iter()
                        .map(|r| r.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )))
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if let Some(caller) = parts.extensions.get::<Caller>() {
            return Ok(caller.clone());
        }
        let token = bearer_token(parts)?;
        let principal = state.auth.authenticate(token).await.map_err(|e| {
            if e.is_unavailable() {
                ApiError::Unavailable(format!("cannot verify tokens right now: {e}"))
            } else {
                ApiError::Unauthorized(e.to_string())
            }
        })?;
        let ids = parts.extensions.get::<RequestIds>();
        let caller = Caller {
            principal,
            request_id: ids.map(|ids| ids.server.clone()),
            client_request_id: ids.and_then(|ids| ids.client.clone()),
            required: Arc::default(),
        };
        parts.extensions.insert(caller.clone());
        Ok(caller)
    }
}

fn bearer_token(parts: &Parts) -> Result<&str, ApiError> {
    let value = parts.headers.get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::Unauthorized(
            "missing Authorization header: send 'Authorization: Bearer <JWT>'".into(),
        )
    })?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthorized("Authorization header is not valid text".into()))?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(ApiError::Unauthorized(
            "Authorization header must be 'Bearer <JWT>'".into(),
        )),
    }
}
