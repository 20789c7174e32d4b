//! The outermost middleware: request ids (the server's own, and the client's when it is short
//! and safe), the URI length limit, and the security headers every response carries.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, REQUEST_ID};

/// A client's `X-Request-Id` is kept only if it is at most this long and of [`is_safe_id`]
/// characters.
pub const MAX_CLIENT_REQUEST_ID: usize = 128;

/// Longest accepted request target (path and query), in bytes: 414 beyond.
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// The ids of one request. `server` is generated for every request and is what the logs and
/// the audit log's `request_id` hold; `client` is the client's `X-Request-Id` when it is safe,
/// kept apart (`client_request_id`) because any client may send any id, another's too.
#[derive(Debug, Clone)]
pub struct RequestIds {
    pub server: String,
    pub client: Option<String>,
}

/// `[A-Za-z0-9._:-]{1,128}`.
pub fn is_safe_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CLIENT_REQUEST_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Gives the request its ids. Handlers and logs read [`RequestIds`] (the request's
/// `X-Request-Id` header is replaced by the server's id); the response's `X-Request-Id` is the
/// client's id when it was kept, else the server's.
pub async fn request_ids(mut request: Request, next: Next) -> Response {
    let server = uuid::Uuid::new_v4().to_string();
    let client = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| is_safe_id(id))
        .map(str::to_owned);
    let echoed = client.as_deref().unwrap_or(&server);
    let echoed = HeaderValue::from_str(echoed).expect("a safe id is a header value");
    let own = HeaderValue::from_str(&server).expect("a uuid is a header value");
    request.headers_mut().insert(REQUEST_ID, own);
    request
        .extensions_mut()
        .insert(RequestIds { server, client });
    let mut response = next.run(request).await;
    response.headers_mut().insert(REQUEST_ID, echoed);
    response
}

/// `X-Content-Type-Options: nosniff` on every response, `Cache-Control: no-store` on every
/// `/v1` response (they carry credentials' metadata and change at any time).
pub async fn security_headers(request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let api = path == "/v1" || path.starts_with("/v1/");
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    if api {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// Drops every `Access-Control-*` header from an answer that allows no origin: tower-http's
/// `CorsLayer` still describes the allowed methods and headers to an origin it refuses, and an
/// origin that is not the portal's should learn nothing from a preflight.
pub async fn cors_for_allowed_origins_only(mut response: Response) -> Response {
    let headers = response.headers_mut();
    if headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN) {
        return response;
    }
    let cors: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("access-control-"))
        .cloned()
        .collect();
    for name in cors {
        headers.remove(name);
    }
    response
}

/// 414 for a request target over [`MAX_URI_BYTES`].
pub async fn uri_limit(request: Request, next: Next) -> Response {
    let length = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    if length > MAX_URI_BYTES {
        return ApiError::UriTooLong(format!(
            "the request URI is {length} bytes long; at most {MAX_URI_BYTES} are accepted"
        ))
        .into_response();
    }
    next.run(request).await
}

/// `value` cut to at most `max` bytes (at a character boundary), marked when cut: what a client
/// sends reaches the logs only bounded.
pub fn loggable(value: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if value.len() <= max {
        return value.into();
    }
    let mut end = max;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…({} bytes)", &value[..end], value.len()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_ids_are_short_and_plain() {
        assert!(is_safe_id("deploy-42:step.1_a"));
        assert!(is_safe_id(&"a".repeat(128)));
        for unsafe_id in ["", "two words", "a\"b", "<x>", "é", "a/b", &"a".repeat(129)] {
            assert!(!is_safe_id(unsafe_id), "{unsafe_id:?}");
        }
    }

    #[test]
    fn loggable_values_are_bounded() {
        assert_eq!(loggable("GET", 16), "GET");
        let long = "X".repeat(300_000);
        let logged = loggable(&long, 16);
        assert!(logged.len() < 40, "{logged}");
        assert!(logged.starts_with("XXXXXXXXXXXXXXXX…"), "{logged}");
        assert_eq!(loggable("ééé", 3), "é…(6 bytes)");
    }
}
