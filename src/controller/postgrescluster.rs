//! Crunchy PGO's `PostgresCluster` (`postgres-operator.crunchydata.com/v1beta1`) as the
//! controller reads it: its metadata, and nothing else. `spec` and `status` (PGO's) are kept
//! opaque and never written: the controller patches `metadata.annotations` only.

use std::borrow::Cow;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use crate::domain::{BucketName, Labels, Namespace, Region, RepositoryName, ValidationError};
use crate::repository::{DesiredRepository, RepositoryOptions};

pub const GROUP: &str = "postgres-operator.crunchydata.com";
pub const VERSION: &str = "v1beta1";
pub const KIND: &str = "PostgresCluster";

/// Asks for a repository: the bucket's name.
pub const BUCKET_ANNOTATION: &str = "backup-provisioner.holos.run/bucket";
/// The bucket's region (default: the controller's `BP_CONTROLLER_DEFAULT_REGION`).
pub const REGION_ANNOTATION: &str = "backup-provisioner.holos.run/region";
/// Written by the controller: the repository's state as it last saw it.
pub const STATE_ANNOTATION: &str = "backup-provisioner.holos.run/state";
/// Written by the controller: the URL of the repository's latest job.
pub const JOB_ANNOTATION: &str = "backup-provisioner.holos.run/job";

/// A PostgresCluster; only `metadata` is read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PostgresCluster {
    pub metadata: ObjectMeta,
    /// `apiVersion`, `kind`, `spec`, `status`: PGO's, carried unread.
    #[serde(flatten)]
    pub rest: serde_json::Map<String, serde_json::Value>,
}

impl kube::Resource for PostgresCluster {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        KIND.into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        GROUP.into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        VERSION.into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        "postgresclusters".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The rules a request from an annotation is held to, as the API holds its requests.
#[derive(Debug, Clone)]
pub struct RequestRules {
    /// Namespaces a repository may target (empty: any but the cluster's own).
    pub allowed_namespaces: Vec<String>,
    pub bucket_pattern: regex::Regex,
    pub default_region: String,
}

impl PostgresCluster {
    fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    }

    /// Whether the cluster asks for a repository (carries the bucket annotation).
    pub fn asks_for_repository(&self) -> bool {
        self.annotation(BUCKET_ANNOTATION).is_some()
    }

    /// The state and job annotations the controller wrote last.
    pub fn reported(&self) -> (Option<&str>, Option<&str>) {
        (
            self.annotation(STATE_ANNOTATION),
            self.annotation(JOB_ANNOTATION),
        )
    }

    /// The repository the annotations ask for: named after the cluster, in its namespace, the
    /// annotated bucket and region. Every violation is collected, each naming the annotation.
    pub fn desired(&self, rules: &RequestRules) -> Result<DesiredRepository, Vec<ValidationError>> {
        let mut errors = Vec::new();
        let name = self.metadata.name.as_deref().unwrap_or_default();
        let name = RepositoryName::parse(name)
            .map_err(|e| errors.push(e.with_field("metadata.name")))
            .ok();
        let namespace = self.metadata.namespace.as_deref().unwrap_or_default();
        let namespace = Namespace::parse(namespace, &rules.allowed_namespaces)
            .map_err(|e| errors.push(e.with_field("metadata.namespace")))
            .ok();
        let bucket = BucketName::parse(
            self.annotation(BUCKET_ANNOTATION).unwrap_or_default(),
            &rules.bucket_pattern,
        )
        .map_err(|e| errors.push(e.with_field(BUCKET_ANNOTATION)))
        .ok();
        let region = self
            .annotation(REGION_ANNOTATION)
            .unwrap_or(&rules.default_region);
        let region = Region::parse(region)
            .map_err(|e| errors.push(e.with_field(REGION_ANNOTATION)))
            .ok();
        match (name, namespace, bucket, region) {
            (Some(name), Some(namespace), Some(bucket), Some(region)) => Ok(DesiredRepository {
                name,
                namespace,
                bucket,
                region,
                labels: Labels::empty(),
                options: RepositoryOptions::default(),
            }),
            _ => Err(errors),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str, annotations: &[(&str, &str)]) -> PostgresCluster {
        let annotations = annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        PostgresCluster {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some("zitadel".to_owned()),
                annotations: Some(annotations),
                ..Default::default()
            },
            rest: Default::default(),
        }
    }

    fn rules() -> RequestRules {
        RequestRules {
            allowed_namespaces: vec!["zitadel".into()],
            bucket_pattern: regex::Regex::new(crate::domain::DEFAULT_BUCKET_PATTERN).unwrap(),
            default_region: "us-east-2".into(),
        }
    }

    #[test]
    fn the_annotations_name_the_bucket_and_region() {
        let bucket = "holos-zitadel-backups";
        let desired = cluster("zitadel", &[(BUCKET_ANNOTATION, bucket)])
            .desired(&rules())
            .unwrap();
        assert_eq!(desired.name.as_str(), "zitadel");
        assert_eq!(desired.namespace.as_str(), "zitadel");
        assert_eq!(desired.bucket.as_str(), bucket);
        assert_eq!(desired.region.as_str(), "us-east-2");
        let desired = cluster(
            "zitadel",
            &[
                (BUCKET_ANNOTATION, bucket),
                (REGION_ANNOTATION, "eu-west-1"),
            ],
        )
        .desired(&rules())
        .unwrap();
        assert_eq!(desired.region.as_str(), "eu-west-1");
    }

    #[test]
    fn every_bad_annotation_is_named() {
        let errors = cluster(
            "zitadel",
            &[
                (BUCKET_ANNOTATION, "Not_A_Bucket"),
                (REGION_ANNOTATION, "mars"),
            ],
        )
        .desired(&rules())
        .unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, [BUCKET_ANNOTATION, REGION_ANNOTATION]);
    }

    #[test]
    fn the_metadata_is_all_that_is_read_and_the_rest_round_trips() {
        let json = serde_json::json!({
            "apiVersion": "postgres-operator.crunchydata.com/v1beta1", "kind": "PostgresCluster",
            "metadata": {"name": "zitadel", "namespace": "zitadel"},
            "spec": {"postgresVersion": 16, "instances": [{"name": "pgha1"}]},
            "status": {"conditions": []}
        });
        let cluster: PostgresCluster = serde_json::from_value(json.clone()).unwrap();
        assert!(!cluster.asks_for_repository());
        assert_eq!(serde_json::to_value(&cluster).unwrap(), json);
    }
}
