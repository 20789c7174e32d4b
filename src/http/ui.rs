//! The operator console at `/ui`: static HTML, CSS and JavaScript modules from `ui/`, embedded
//! in the binary (it works offline and loads nothing from another origin), and the console's
//! settings at `/ui/config.json` (the page has no inline script to carry them).
//!
//! Every `/ui` response carries a strict Content-Security-Policy: scripts and styles only from
//! this origin, no inline script or style, connections only to this origin and, when the console
//! logs in through OIDC, the issuer's (discovery document and token endpoint). Assets are
//! revalidated on every use (`no-cache` with a strong ETag), so a new binary's console is never
//! mixed with an old one's cached modules.

use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::ApiError;

/// Where the console comes back after an OIDC login.
pub const CALLBACK_PATH: &str = "/ui/callback";

/// How the console logs in: through OIDC when both the issuer and the console's client id are
/// configured, else with a pasted token.
#[derive(Debug, Clone, Default)]
pub struct UiSettings {
    pub oidc: Option<UiOidc>,
}

impl UiSettings {
    /// OIDC login when both the issuer and the console's client id are set.
    pub fn new(issuer: Option<&url::Url>, client_id: Option<&str>, scopes: &str) -> Self {
        let oidc = issuer.zip(client_id).map(|(issuer, client_id)| UiOidc {
            issuer: issuer.clone(),
            client_id: client_id.to_owned(),
            scopes: scopes.to_owned(),
        });
        UiSettings { oidc }
    }
}

/// The console's OIDC client: authorization code with PKCE, a public client (no secret).
#[derive(Debug, Clone)]
pub struct UiOidc {
    pub issuer: url::Url,
    pub client_id: String,
    /// Space-separated scopes asked for (`openid` and what puts the roles in the token).
    pub scopes: String,
}

/// What `/ui/config.json` tells the page.
#[derive(Debug, Serialize)]
struct PageConfig<'a> {
    oidc: Option<PageOidc<'a>>,
}

#[derive(Debug, Serialize)]
struct PageOidc<'a> {
    issuer: &'a str,
    client_id: &'a str,
    scopes: &'a str,
    redirect_path: &'static str,
}

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const JS: &str = "text/javascript; charset=utf-8";

macro_rules! asset {
    ($name:literal, $type:expr) => {
        Asset {
            name: $name,
            content_type: $type,
            body: include_bytes!(concat!("../../ui/assets/", $name)),
        }
    };
}

/// Everything under `/ui/assets/`.
static ASSETS: &[Asset] = &[
    asset!("console.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("auth.js", JS),
    asset!("dom.js", JS),
    asset!("confirm.js", JS),
    asset!("sse.js", JS),
    asset!("fleet.js", JS),
    asset!("repository.js", JS),
    asset!("job.js", JS),
    asset!("audit.js", JS),
];

static INDEX: &[u8] = include_bytes!("../../ui/index.html");

/// The strong ETag of each asset (index: `ASSETS.len()`), computed once.
static ETAGS: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| a.body)
        .chain([INDEX])
        .map(|body| {
            let digest = Sha256::digest(body);
            let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
            HeaderValue::from_str(&format!("\"{hex}\"")).expect("hex is a header value")
        })
        .collect()
});

/// The names and sizes of the served files (`index.html` included), for the docs and tests.
pub fn served_files() -> Vec<(&'static str, usize)> {
    ASSETS
        .iter()
        .map(|a| (a.name, a.body.len()))
        .chain([("index.html", INDEX.len())])
        .collect()
}

#[derive(Clone)]
struct UiState {
    config_json: Arc<[u8]>,
}

/// The console's routes, each answer with the console's security headers.
pub fn router<S: Clone + Send + Sync + 'static>(settings: &UiSettings) -> Router<S> {
    let csp = HeaderValue::from_str(&content_security_policy(settings))
        .expect("an origin is a header value");
    let state = UiState {
        config_json: page_config(settings).into(),
    };
    Router::new()
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route(CALLBACK_PATH, get(index))
        .route("/ui/config.json", get(config))
        .route("/ui/assets/{file}", get(asset))
        .with_state(state)
        .layer(middleware::map_response(move |response: Response| {
            let csp = csp.clone();
            async move { with_console_headers(response, csp) }
        }))
}

/// The policy: this origin only, plus the issuer's for connections when OIDC login is on.
pub fn content_security_policy(settings: &UiSettings) -> String {
    let issuer = settings
        .oidc
        .as_ref()
        .map(|o| format!(" {}", o.issuer.origin().ascii_serialization()))
        .unwrap_or_default();
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'{issuer}; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
}

fn page_config(settings: &UiSettings) -> Vec<u8> {
    let config = PageConfig {
        oidc: settings.oidc.as_ref().map(|o| PageOidc {
            issuer: o.issuer.as_str(),
            client_id: &o.client_id,
            scopes: &o.scopes,
            redirect_path: CALLBACK_PATH,
        }),
    };
    serde_json::to_vec(&config).expect("the console's settings serialize")
}

fn with_console_headers(mut response: Response, csp: HeaderValue) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, csp);
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    response
}

async fn index(request_headers: HeaderMap) -> Response {
    let etag = &ETAGS[ASSETS.len()];
    revalidated(&request_headers, etag, "text/html; charset=utf-8", INDEX)
}

async fn asset(request_headers: HeaderMap, Path(file): Path<String>) -> Result<Response, ApiError> {
    let position = ASSETS
        .iter()
        .position(|a| a.name == file)
        .ok_or_else(|| ApiError::NotFound("no such file of the console".into()))?;
    let asset = &ASSETS[position];
    Ok(revalidated(
        &request_headers,
        &ETAGS[position],
        asset.content_type,
        asset.body,
    ))
}

async fn config(State(state): State<UiState>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        state.config_json.to_vec(),
    )
        .into_response()
}

/// The body, or 304 when the client's copy is current; either way to be revalidated next time.
fn revalidated(
    request_headers: &HeaderMap,
    etag: &HeaderValue,
    content_type: &'static str,
    body: &'static [u8],
) -> Response {
    let current = request_headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| tag.trim() == etag.to_str().unwrap_or_default() || tag.trim() == "*");
    let cache = [
        (header::ETAG, etag.clone()),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    if current {
        return (StatusCode::NOT_MODIFIED, cache).into_response();
    }
    (
        cache,
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_names_the_issuer_only_with_oidc() {
        let plain = content_security_policy(&UiSettings::default());
        assert!(plain.contains("connect-src 'self';"), "{plain}");
        let settings = UiSettings {
            oidc: Some(UiOidc {
                issuer: "https://login.example.com/oauth/v2/".parse().unwrap(),
                client_id: "console".into(),
                scopes: "openid".into(),
            }),
        };
        let with_oidc = content_security_policy(&settings);
        assert!(
            with_oidc.contains("connect-src 'self' https://login.example.com;"),
            "{with_oidc}"
        );
    }

    #[test]
    fn every_asset_has_a_distinct_name_and_a_body() {
        let files = served_files();
        for (name, size) in &files {
            assert!(*size > 0, "{name} is empty");
            assert_eq!(files.iter().filter(|(n, _)| n == name).count(), 1, "{name}");
        }
    }
}
