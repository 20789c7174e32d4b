//! The OpenAPI document (generated from the routes) and offline Swagger UI at `/docs`.

use std::sync::Arc;

use axum::Router;
use utoipa::Modify;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_swagger_ui::SwaggerUi;

use super::Problem;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "backup-provisioner",
        description = "Provisions pgBackRest S3 repositories (bucket, IAM policy, group, user, access key and the s3.conf Secret) for Crunchy PGO PostgresClusters.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    // Routes document errors through `super::responses`, whose schema utoipa does not collect
    // from the routes: register it here.
    components(schemas(Problem)),
    modifiers(&BearerAuth),
    tags(
        (name = "repositories", description = "Backup repositories and their provisioning"),
        (name = "jobs", description = "Provisioning jobs: progress, cancel, retry"),
        (name = "audit", description = "The append-only audit log"),
        (name = "operations", description = "Probes and metrics"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

pub fn base() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The full document as the running server describes itself.
pub fn spec() -> utoipa::openapi::OpenApi {
    super::api_router().split_for_parts().1
}

/// Pretty JSON, exactly as committed in `openapi/openapi.json`.
pub fn spec_json() -> String {
    let mut text = spec()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    text.push('\n');
    text
}

pub fn docs_router<S: Clone + Send + Sync + 'static>(
    spec: Arc<utoipa::openapi::OpenApi>,
) -> Router<S> {
    Router::from(SwaggerUi::new("/docs").url("/openapi.json", (*spec).clone()))
}
