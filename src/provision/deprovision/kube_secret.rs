//! The repository's Kubernetes Secret, removed only when it is ours: labelled
//! `app.kubernetes.io/managed-by: backup-provisioner`, or the Secret the repository recorded
//! (its provisioning wrote or adopted it). Anyone else's Secret is left in place and reported.
//!
//! The delete carries the `resourceVersion` and `uid` of the read: a Secret replaced or changed
//! in between is not deleted (the server answers 409, retryable; the next attempt reads again).
//! Its `s3.conf` holds the only copy of the cipher pass this service kept: backups left in a
//! kept bucket can be restored only with a copy held elsewhere.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{DeleteParams, Preconditions};
use serde_json::json;

use super::teardown::{Mode, Teardown};
use crate::cloud::CloudError;
use crate::cloud::kube::classify;
use crate::provision::report::Action;
use crate::provision::secret::{FIELD_MANAGER, MANAGED_BY_LABEL};

fn labelled_ours(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == FIELD_MANAGER)
}

/// Before any change: when the Secret is ours, a server-side dry-run delete proves the service
/// may delete it (a Role without `delete` fails here, naming the verb, instead of after the
/// keys were deactivated). Changes nothing.
pub async fn preflight(
    kube: &kube::Client,
    namespace: &str,
    name: &str,
    recorded: bool,
) -> Result<(), CloudError> {
    let api: Api<Secret> = Api::namespaced(kube.clone(), namespace);
    let Some(secret) = api
        .get_opt(name)
        .await
        .map_err(|e| classify("get secret", e))?
    else {
        return Ok(());
    };
    if !labelled_ours(&secret) && !recorded {
        return Ok(());
    }
    let params = DeleteParams {
        dry_run: true,
        ..Default::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(classify("delete secret", e)),
    }
}

/// Removes the Secret `namespace/name` if it is ours (`recorded`: the repository's resources
/// name it).
pub async fn remove(
    kube: &kube::Client,
    namespace: &str,
    name: &str,
    recorded: bool,
    mode: Mode,
) -> Result<Teardown, CloudError> {
    let api: Api<Secret> = Api::namespaced(kube.clone(), namespace);
    let mut report = Teardown::new("kube-secret", format!("{namespace}/{name}"));
    let Some(secret) = api
        .get_opt(name)
        .await
        .map_err(|e| classify("get secret", e))?
    else {
        report.absent();
        return Ok(report);
    };
    if !labelled_ours(&secret) && !recorded {
        report.left(format!(
            "not managed by backup-provisioner (no {MANAGED_BY_LABEL}: {FIELD_MANAGER} label) \
             and not the Secret this repository recorded: left in place"
        ));
        return Ok(report);
    }
    let keys: Vec<String> = secret
        .data
        .as_ref()
        .map(|d| d.keys().cloned().collect())
        .unwrap_or_default();
    report.setting("keys", json!([]), json!(keys), Action::Delete);
    if mode.applies() {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: secret.metadata.resource_version.clone(),
                uid: secret.metadata.uid.clone(),
            }),
            ..Default::default()
        };
        match api.delete(name, &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(classify("delete secret", e)),
        }
    }
    report.deleted(None);
    Ok(report)
}
