//! HTTP: routing and bearer-token authentication.

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::Emulator;
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::ApiError;
use crate::store::{Kind, PatchKind, WriteOptions, Written};

/// The request body limit of kube-apiserver (3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;

/// The axum router serving the emulator.
pub fn router(emulator: Emulator) -> Router {
    Router::new().fallback(handle).with_state(emulator)
}

/// Serves the emulator on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, emulator: Emulator) -> std::io::Result<()> {
    axum::serve(listener, router(emulator)).await
}

/// Serves the emulator until `shutdown` completes.
pub async fn serve_with_shutdown<F>(
    listener: tokio::net::TcpListener,
    emulator: Emulator,
    shutdown: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    axum::serve(listener, router(emulator))
        .with_graceful_shutdown(shutdown)
        .await
}

enum Reply {
    Json(u16, Value),
    Text(u16, &'static str),
    Error(ApiError),
}

struct Answer {
    reply: Reply,
    warnings: Vec<String>,
}

impl From<ApiError> for Answer {
    fn from(e: ApiError) -> Self {
        Answer {
            reply: Reply::Error(e),
            warnings: Vec::new(),
        }
    }
}

impl From<Reply> for Answer {
    fn from(reply: Reply) -> Self {
        Answer {
            reply,
            warnings: Vec::new(),
        }
    }
}

fn written(w: Written) -> Answer {
    Answer {
        reply: Reply::Json(if w.created { 201 } else { 200 }, w.object),
        warnings: w
            .warnings
            .into_iter()
            .map(|f| format!("unknown field \"{f}\""))
            .collect(),
    }
}

async fn handle(State(emulator): State<Emulator>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = to_bytes(body, MAX_BODY).await;
    let path = parts.uri.path();
    let query = parts.uri.query().unwrap_or("");
    let answer = match bytes {
        Ok(bytes) => emulator.process(&parts.method, path, query, &parts.headers, &bytes),
        Err(_) => ApiError::new(413, "RequestEntityTooLarge", "Request entity too large").into(),
    };
    respond(answer)
}

fn respond(answer: Answer) -> Response {
    let mut response = match answer.reply {
        Reply::Json(code, value) => json_response(code, &value),
        Reply::Text(code, text) => {
            let mut r =
                (StatusCode::from_u16(code).unwrap_or(StatusCode::OK), text).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        }
        Reply::Error(e) => {
            let mut r = json_response(e.code, &e.to_status());
            if let Some(s) = e.retry_after_seconds {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(s));
            }
            if e.code == 401 {
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"kube-emulator\""),
                );
            }
            r
        }
    };
    for w in answer.warnings {
        if let Ok(v) = HeaderValue::from_str(&format!("299 - {}", serde_json::Value::from(w))) {
            response.headers_mut().append(header::WARNING, v);
        }
    }
    response
}

fn json_response(code: u16, value: &Value) -> Response {
    let body = serde_json::to_vec(value).expect("json");
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .expect("response")
}

/// What a path addresses.
#[derive(Debug, Clone, PartialEq)]
enum Target {
    Public(&'static str),
    Discovery(&'static str),
    Collection(Kind, Option<String>),
    Item(Kind, String, String),
}

fn route(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    Some(match segments.as_slice() {
        ["version"] => Target::Public("version"),
        ["healthz"] | ["livez"] | ["readyz"] => Target::Public("health"),
        ["api"] => Target::Discovery("api"),
        ["apis"] => Target::Discovery("apis"),
        ["api", "v1"] => Target::Discovery("v1"),
        ["api", "v1", "namespaces"] => Target::Collection(Kind::Namespace, None),
        ["api", "v1", "secrets"] => Target::Collection(Kind::Secret, None),
        ["api", "v1", "namespaces", ns] => {
            Target::Item(Kind::Namespace, String::new(), ns.to_string())
        }
        ["api", "v1", "namespaces", ns, "secrets"] => {
            Target::Collection(Kind::Secret, Some(ns.to_string()))
        }
        ["api", "v1", "namespaces", ns, "secrets", name] => {
            Target::Item(Kind::Secret, ns.to_string(), name.to_string())
        }
        _ => return None,
    })
}

/// Parsed query parameters.
#[derive(Debug, Default)]
struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    fn parse(query: &str) -> Self {
        Query {
            pairs: form_urlencoded::parse(query.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some("true") | Some("1") | Some("") => Ok(Some(true)),
            Some("false") | Some("0") => Ok(Some(false)),
            Some(other) => Err(ApiError::bad_request(format!(
                "invalid boolean value for {key}: {other:?}"
            ))),
        }
    }

    fn dry_run(&self) -> Result<bool, ApiError> {
        match self.get("dryRun") {
            None | Some("") => Ok(false),
            Some("All") => Ok(true),
            Some(other) => Err(ApiError::invalid_options(
                "CreateOptions",
                "dryRun",
                &format!("Unsupported value: {other:?}: supported values: \"All\""),
            )),
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// The default field manager of an update without `fieldManager`: the user agent's program
/// name, as kube-apiserver derives it.
fn default_manager(headers: &HeaderMap) -> String {
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|ua| ua.split('/').next())
        .filter(|s| !s.is_empty())
        .unwrap_or("unknown")
        .to_string()
}

fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
    })
}

fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-kube-emulator",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T00:00:00Z",
        "goVersion": "go1.24.2",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn discovery(which: &str, headers: &HeaderMap) -> Value {
    match which {
        "api" => {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("127.0.0.1");
            json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}],
            })
        }
        "apis" => json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
        _ => json!({
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": [
                {
                    "name": "namespaces",
                    "singularName": "namespace",
                    "namespaced": false,
                    "kind": "Namespace",
                    "verbs": ["create", "delete", "get", "list", "patch", "update"],
                    "shortNames": ["ns"],
                },
                {
                    "name": "secrets",
                    "singularName": "secret",
                    "namespaced": true,
                    "kind": "Secret",
                    "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update"],
                },
            ],
        }),
    }
}

impl Emulator {
    /// Handles one request.
    fn process(
        &self,
        method: &Method,
        path: &str,
        query: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Answer {
        let target = route(path);
        // Authentication (public endpoints excepted, as system:public-info-viewer allows).
        // Every valid token may do everything: the service's real permissions (deploy/base/rbac.yaml)
        // are tested against the real kube-apiserver.
        let authenticated = {
            let state = self.lock();
            state.tokens.is_empty() || bearer(headers).is_some_and(|t| state.tokens.contains(t))
        };
        if !authenticated && !matches!(target, Some(Target::Public(_))) {
            return ApiError::unauthorized().into();
        }
        let Some(target) = target else {
            return ApiError::no_route().into();
        };
        let query = Query::parse(query);
        match self.dispatch(method, &target, &query, headers, body) {
            Ok(a) => a,
            Err(e) => e.into(),
        }
    }

    fn dispatch(
        &self,
        method: &Method,
        target: &Target,
        query: &Query,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Answer, ApiError> {
        let (kind, namespace, name) = match target {
            Target::Public(which) => {
                if *method != Method::GET && *method != Method::HEAD {
                    return Err(ApiError::method_not_allowed());
                }
                return Ok(match *which {
                    "version" => Reply::Json(200, version_info()).into(),
                    _ => Reply::Text(200, "ok").into(),
                });
            }
            Target::Discovery(which) => {
                if *method != Method::GET && *method != Method::HEAD {
                    return Err(ApiError::method_not_allowed());
                }
                return Ok(Reply::Json(200, discovery(which, headers)).into());
            }
            Target::Collection(kind, ns) => (*kind, ns.clone(), None),
            Target::Item(kind, ns, name) => (*kind, Some(ns.clone()), Some(name.clone())),
        };

        let watch = query.bool("watch")?.unwrap_or(false);
        let verb = match (method.as_str(), name.is_some()) {
            ("GET", false) if watch => "watch",
            ("GET", false) => "list",
            ("GET", true) => "get",
            ("POST", false) if namespace.is_some() || kind == Kind::Namespace => "create",
            ("PUT", true) => "update",
            ("PATCH", true) => "patch",
            ("DELETE", true) => "delete",
            ("DELETE", false) if namespace.is_some() => "deletecollection",
            _ => return Err(ApiError::method_not_allowed()),
        };

        if watch {
            return Err(ApiError::bad_request(
                "watch is not supported by kube-emulator",
            ));
        }

        let ns = namespace.as_deref().unwrap_or("");
        let field_manager = query.get("fieldManager").map(str::to_string);
        if let Some(m) = &field_manager
            && m.chars().count() > 128
        {
            return Err(ApiError::invalid_options(
                "PatchOptions",
                "fieldManager",
                "Too long: may not be longer than 128 characters",
            ));
        }
        let opts = WriteOptions {
            manager: field_manager
                .clone()
                .unwrap_or_else(|| default_manager(headers)),
            dry_run: query.dry_run()?,
            strict: query.get("fieldValidation") == Some("Strict"),
        };

        match verb {
            "get" => {
                let name = name.as_deref().unwrap_or("");
                let obj = self.lock().store.get(kind, ns, name)?;
                Ok(Reply::Json(200, obj).into())
            }
            "list" => {
                let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or(""))?;
                let fields = FieldSelector::parse(kind, query.get("fieldSelector").unwrap_or(""))?;
                let limit = match query.get("limit") {
                    None | Some("") => None,
                    Some(l) => Some(
                        l.parse::<usize>()
                            .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
                    ),
                };
                let list = self.lock().store.list(
                    kind,
                    namespace.as_deref(),
                    &labels,
                    &fields,
                    limit,
                    query.get("continue"),
                )?;
                Ok(Reply::Json(200, list).into())
            }
            "create" => {
                check_json_content(headers)?;
                let body = parse_json(body)?;
                let w = self.lock().store.create(kind, ns, body, &opts)?;
                Ok(written(w))
            }
            "update" => {
                check_json_content(headers)?;
                let body = parse_json(body)?;
                let name = name.as_deref().unwrap_or("");
                let w = self.lock().store.update(kind, ns, name, body, &opts)?;
                Ok(written(w))
            }
            "patch" => {
                let name = name.as_deref().unwrap_or("");
                let force = query.bool("force")?;
                let media = media_type(headers);
                if media == "application/apply-patch+yaml" {
                    if field_manager.is_none() {
                        return Err(ApiError::invalid_options(
                            "PatchOptions",
                            "fieldManager",
                            "Required value: is required for apply patch",
                        ));
                    }
                    let config = serde_json::from_slice(body).map_err(|e| {
                        ApiError::bad_request(format!(
                            "error decoding YAML: kube-emulator accepts JSON apply configurations only: {e}"
                        ))
                    })?;
                    let w = self.lock().store.apply(
                        kind,
                        ns,
                        name,
                        config,
                        force.unwrap_or(false),
                        &opts,
                    )?;
                    return Ok(written(w));
                }
                if force.is_some() {
                    return Err(ApiError::invalid_options(
                        "PatchOptions",
                        "force",
                        "Forbidden: may not be specified for non-apply patch",
                    ));
                }
                let patch_kind = match media.as_str() {
                    "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                        PatchKind::Merge
                    }
                    "application/json-patch+json" => PatchKind::Json,
                    other => return Err(ApiError::unsupported_media_type(other)),
                };
                let patch = serde_json::from_slice(body)
                    .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
                let w = self
                    .lock()
                    .store
                    .patch(kind, ns, name, patch_kind, &patch, &opts)?;
                Ok(written(w))
            }
            "delete" => {
                let name = name.as_deref().unwrap_or("");
                let options: Value = if body.iter().all(u8::is_ascii_whitespace) {
                    Value::Null
                } else {
                    serde_json::from_slice(body).map_err(|e| {
                        ApiError::bad_request(format!("error decoding DeleteOptions: {e}"))
                    })?
                };
                let dry_run = opts.dry_run
                    || options
                        .get("dryRun")
                        .and_then(Value::as_array)
                        .is_some_and(|a| a.iter().any(|v| v == "All"));
                let preconditions = options.get("preconditions").cloned().unwrap_or(Value::Null);
                let out = self
                    .lock()
                    .store
                    .delete(kind, ns, name, &preconditions, dry_run)?;
                Ok(Reply::Json(200, out).into())
            }
            "deletecollection" => {
                let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or(""))?;
                let fields = FieldSelector::parse(kind, query.get("fieldSelector").unwrap_or(""))?;
                let out = self.lock().store.delete_collection(
                    kind,
                    namespace.as_deref(),
                    &labels,
                    &fields,
                    opts.dry_run,
                )?;
                Ok(Reply::Json(200, out).into())
            }
            _ => Err(ApiError::method_not_allowed()),
        }
    }
}

fn check_json_content(headers: &HeaderMap) -> Result<(), ApiError> {
    match media_type(headers).as_str() {
        "" | "application/json" | "*/*" => Ok(()),
        other => Err(ApiError::unsupported_media_type(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            route("/api/v1/namespaces/ns/secrets/a"),
            Some(Target::Item(Kind::Secret, "ns".into(), "a".into()))
        );
        assert_eq!(
            route("/api/v1/namespaces/ns/secrets"),
            Some(Target::Collection(Kind::Secret, Some("ns".into())))
        );
        assert_eq!(
            route("/api/v1/secrets"),
            Some(Target::Collection(Kind::Secret, None))
        );
        assert_eq!(route("/api/v1/namespaces/ns/configmaps"), None);
        assert_eq!(route("/apis/apps/v1"), None);
    }
}
