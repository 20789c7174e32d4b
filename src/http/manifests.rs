//! `GET /v1/backup-repositories/{name}/manifests`: the PostgresCluster fragment and the
//! ExternalSecret of a ready repository (`provision::manifests`), as JSON or YAML.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::error::{PROBLEM_JSON, Problem};
use super::extract::{ApiPath, Caller};
use super::responses::{NotFound, TooManyRequests, Unauthorized};
use super::{ApiError, AppState};
use crate::auth::Role;
use crate::provision::manifests::Manifests;
use crate::repository;

pub const APPLICATION_YAML: &str = "application/yaml";

/// The manifests that wire a PostgresCluster to this repository: its
/// `spec.backups.pgbackrest` fragment (repo2 on S3 at `/pgbackrest/<namespace>/<name>/repo2`,
/// the dual-stack endpoint, `aes-256-cbc`, 14 days of full backups, a weekly full and a daily
/// differential schedule, the Secret's `s3.conf`) and the ExternalSecret that brings the
/// Secret into the workload cluster (SecretStore `default`, refreshed hourly). No secret value
/// is in them. `Accept: application/yaml` answers a YAML stream of the two objects; anything
/// else JSON.
#[utoipa::path(
    get, path = "/v1/backup-repositories/{name}/manifests", tag = "repositories",
    params(
        ("name" = String, Path, description = "Repository name"),
        ("Accept" = Option<String>, Header, description = "`application/yaml` for YAML (two documents: the PostgresCluster fragment, the ExternalSecret); otherwise JSON"),
    ),
    responses(
        (status = 200, description = "The manifests", content(
            (Manifests = "application/json"),
            (String = "application/yaml"),
        )),
        Unauthorized, NotFound,
        (status = 409, description = "The repository is not ready (its Secret is not written yet)", body = Problem, content_type = PROBLEM_JSON),
        TooManyRequests,
    ),
    security(("bearer" = []))
)]
pub async fn get_manifests(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    caller.require(Role::Viewer)?;
    let row = repository::by_name(&state.db, &name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no backup repository named '{name}'")))?;
    if row.state != "ready" {
        return Err(ApiError::Conflict(format!(
            "backup repository '{name}' is {}, not ready: its manifests are served once its \
             Secret is written",
            row.state
        )));
    }
    let manifests = Manifests::for_repository(&row);
    if !prefers_yaml(&headers) {
        return Ok(axum::Json(manifests).into_response());
    }
    let yaml = manifests
        .to_yaml()
        .map_err(|e| ApiError::Internal(format!("manifests as YAML: {e}")))?;
    let content_type = HeaderValue::from_static("application/yaml; charset=utf-8");
    Ok(([(header::CONTENT_TYPE, content_type)], yaml).into_response())
}

/// Whether the best media type `Accept` allows (by quality, then order) is a YAML one.
fn prefers_yaml(headers: &HeaderMap) -> bool {
    let mut best: Option<(f32, bool)> = None;
    let ranges = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for range in ranges {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default().to_ascii_lowercase();
        let quality = parts
            .filter_map(|p| p.strip_prefix("q="))
            .find_map(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        let yaml = matches!(
            media.as_str(),
            APPLICATION_YAML | "application/x-yaml" | "text/yaml"
        );
        let known = yaml || matches!(media.as_str(), "application/json" | "application/*" | "*/*");
        if known && quality > 0.0 && best.is_none_or(|(q, _)| quality > q) {
            best = Some((quality, yaml));
        }
    }
    best.is_some_and(|(_, yaml)| yaml)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn yaml_only_when_it_is_the_best_acceptable_media_type() {
        assert!(prefers_yaml(&accept("application/yaml")));
        assert!(prefers_yaml(&accept("text/yaml, application/json;q=0.5")));
        assert!(prefers_yaml(&accept(
            "application/json;q=0.1, application/x-yaml"
        )));
        assert!(!prefers_yaml(&HeaderMap::new()));
        assert!(!prefers_yaml(&accept("*/*")));
        assert!(!prefers_yaml(&accept("application/json, application/yaml")));
        assert!(!prefers_yaml(&accept("application/yaml;q=0, */*")));
        assert!(!prefers_yaml(&accept("text/html")));
    }
}
