//! Ready-to-apply manifests for a ready repository (issue 13, item 5): the PostgresCluster's
//! `spec.backups.pgbackrest` fragment (repo2 on S3, as the platform's clusters are wired) and
//! the ExternalSecret that copies the repository's Secret (`s3.conf`) from the management
//! cluster into the workload cluster's namespace of the same name. No secret value is in
//! either: the fragment names the Secret, the ExternalSecret names the remote key.
//!
//! Holos's defaults: the bucket's region through the dual-stack endpoint, client-side
//! encryption (`aes-256-cbc`, pass in `s3.conf`), full backups kept 14 days
//! (`repo2-retention-full-type: time`), a full backup every Sunday at 01:00 and a differential
//! backup on the other days at 01:00 (the cluster's time zone, UTC in PGO's CronJobs): a
//! restore needs at most one full and one differential backup plus WAL.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::repository::RepositoryRow;

/// The Secret's only key, which pgBackRest reads as a configuration file.
pub const S3_CONF_KEY: &str = "s3.conf";
pub const CIPHER_TYPE: &str = "aes-256-cbc";
/// Full backups are kept this many days (`repo2-retention-full-type: time`).
pub const RETENTION_FULL_DAYS: &str = "14";
pub const RETENTION_FULL_TYPE: &str = "time";
/// Weekly full backup: Sunday 01:00.
pub const FULL_SCHEDULE: &str = "0 1 * * 0";
/// Daily differential backup: Monday to Saturday 01:00 (Sunday has the full one).
pub const DIFFERENTIAL_SCHEDULE: &str = "0 1 * * 1-6";
/// The SecretStore every workload namespace has, reaching the management cluster.
pub const SECRET_STORE: &str = "default";
pub const REFRESH_INTERVAL: &str = "1h";
const PGO_API_VERSION: &str = "postgres-operator.crunchydata.com/v1beta1";
const ESO_API_VERSION: &str = "external-secrets.io/v1";

/// `repo2-path`: `/pgbackrest/<namespace>/<name>/repo2`.
pub fn repo_path(namespace: &str, name: &str) -> String {
    format!("/pgbackrest/{namespace}/{name}/repo2")
}

/// pgBackRest's S3 endpoint for a region (dual-stack, as the platform's clusters use).
pub fn s3_endpoint(region: &str) -> String {
    format!("s3.dualstack.{region}.amazonaws.com")
}

/// What `GET /v1/backup-repositories/{name}/manifests` answers (as YAML: the two objects as
/// two documents, in this order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Manifests {
    /// The PostgresCluster of the repository's name and namespace with only
    /// `spec.backups.pgbackrest`: merge it into the cluster's manifest, or server-side apply it.
    pub postgres_cluster: PostgresClusterFragment,
    /// For the workload cluster's namespace: receives the Secret the fragment names.
    pub external_secret: ExternalSecret,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresClusterFragment {
    #[schema(example = "postgres-operator.crunchydata.com/v1beta1")]
    pub api_version: String,
    #[schema(example = "PostgresCluster")]
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: PostgresClusterSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ObjectMeta {
    pub name: String,
    pub namespace: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PostgresClusterSpec {
    pub backups: Backups,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Backups {
    pub pgbackrest: PgBackRestSpec,
}

/// `spec.backups.pgbackrest`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PgBackRestSpec {
    /// The Secret whose `s3.conf` holds repo2's key and cipher pass.
    pub configuration: Vec<ConfigurationProjection>,
    /// pgBackRest options: `repo2-path`, `repo2-cipher-type`, `repo2-retention-full`,
    /// `repo2-retention-full-type`.
    pub global: BTreeMap<String, String>,
    pub repos: Vec<Repo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConfigurationProjection {
    pub secret: SecretProjection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SecretProjection {
    pub name: String,
    pub items: Vec<KeyToPath>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct KeyToPath {
    pub key: String,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Repo {
    #[schema(example = "repo2")]
    pub name: String,
    pub s3: RepoS3,
    pub schedules: Schedules,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RepoS3 {
    pub bucket: String,
    #[schema(example = "s3.dualstack.us-east-1.amazonaws.com")]
    pub endpoint: String,
    pub region: String,
}

/// Cron schedules of PGO's backup CronJobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Schedules {
    #[schema(example = "0 1 * * 0")]
    pub full: String,
    #[schema(example = "0 1 * * 1-6")]
    pub differential: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalSecret {
    #[schema(example = "external-secrets.io/v1")]
    pub api_version: String,
    #[schema(example = "ExternalSecret")]
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: ExternalSecretSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalSecretSpec {
    #[schema(example = "1h")]
    pub refresh_interval: String,
    pub secret_store_ref: SecretStoreRef,
    pub target: ExternalSecretTarget,
    pub data_from: Vec<DataFrom>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SecretStoreRef {
    #[schema(example = "SecretStore")]
    pub kind: String,
    #[schema(example = "default")]
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalSecretTarget {
    pub name: String,
    #[schema(example = "Owner")]
    pub creation_policy: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DataFrom {
    pub extract: Extract,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Extract {
    /// The Secret's name in the management cluster's namespace the SecretStore reads.
    pub key: String,
}

impl Manifests {
    pub fn for_repository(repo: &RepositoryRow) -> Self {
        let secret = secret_name(repo);
        let metadata = ObjectMeta {
            name: repo.name.clone(),
            namespace: repo.namespace.clone(),
        };
        Manifests {
            postgres_cluster: PostgresClusterFragment {
                api_version: PGO_API_VERSION.to_owned(),
                kind: "PostgresCluster".to_owned(),
                metadata,
                spec: PostgresClusterSpec {
                    backups: Backups {
                        pgbackrest: pgbackrest(repo, &secret),
                    },
                },
            },
            external_secret: external_secret(&repo.namespace, &secret),
        }
    }

    /// The two objects as a YAML stream (two documents).
    pub fn to_yaml(&self) -> Result<String, serde_saphyr::SerializeError> {
        let cluster = serde_saphyr::to_string(&self.postgres_cluster)?;
        let external = serde_saphyr::to_string(&self.external_secret)?;
        Ok(format!("---\n{cluster}---\n{external}"))
    }
}

/// The Secret the service writes (the bucket's name), or the one an adoption took over.
fn secret_name(repo: &RepositoryRow) -> String {
    repo.resources
        .0
        .secret
        .as_ref()
        .map(|s| s.name.clone())
        .or_else(|| repo.options.0.secret_name.clone())
        .unwrap_or_else(|| repo.bucket.clone())
}

fn pgbackrest(repo: &RepositoryRow, secret: &str) -> PgBackRestSpec {
    let global = [
        ("repo2-path", repo_path(&repo.namespace, &repo.name)),
        ("repo2-cipher-type", CIPHER_TYPE.to_owned()),
        ("repo2-retention-full", RETENTION_FULL_DAYS.to_owned()),
        ("repo2-retention-full-type", RETENTION_FULL_TYPE.to_owned()),
    ];
    PgBackRestSpec {
        configuration: vec![ConfigurationProjection {
            secret: SecretProjection {
                name: secret.to_owned(),
                items: vec![KeyToPath {
                    key: S3_CONF_KEY.to_owned(),
                    path: S3_CONF_KEY.to_owned(),
                }],
            },
        }],
        global: global.map(|(k, v)| (k.to_owned(), v)).into_iter().collect(),
        repos: vec![Repo {
            name: "repo2".to_owned(),
            s3: RepoS3 {
                bucket: repo.bucket.clone(),
                endpoint: s3_endpoint(&repo.region),
                region: repo.region.clone(),
            },
            schedules: Schedules {
                full: FULL_SCHEDULE.to_owned(),
                differential: DIFFERENTIAL_SCHEDULE.to_owned(),
            },
        }],
    }
}

fn external_secret(namespace: &str, secret: &str) -> ExternalSecret {
    ExternalSecret {
        api_version: ESO_API_VERSION.to_owned(),
        kind: "ExternalSecret".to_owned(),
        metadata: ObjectMeta {
            name: secret.to_owned(),
            namespace: namespace.to_owned(),
        },
        spec: ExternalSecretSpec {
            refresh_interval: REFRESH_INTERVAL.to_owned(),
            secret_store_ref: SecretStoreRef {
                kind: "SecretStore".to_owned(),
                name: SECRET_STORE.to_owned(),
            },
            target: ExternalSecretTarget {
                name: secret.to_owned(),
                creation_policy: "Owner".to_owned(),
            },
            data_from: vec![DataFrom {
                extract: Extract {
                    key: secret.to_owned(),
                },
            }],
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_yaml_stream_is_the_two_objects_with_numbers_and_crons_kept_strings() {
        let pgbackrest = PgBackRestSpec {
            configuration: Vec::new(),
            global: [("repo2-retention-full".to_owned(), "14".to_owned())].into(),
            repos: vec![Repo {
                name: "repo2".into(),
                s3: RepoS3 {
                    bucket: "holos-zitadel-backups".into(),
                    endpoint: s3_endpoint("us-east-1"),
                    region: "us-east-1".into(),
                },
                schedules: Schedules {
                    full: FULL_SCHEDULE.into(),
                    differential: DIFFERENTIAL_SCHEDULE.into(),
                },
            }],
        };
        let manifests = Manifests {
            postgres_cluster: PostgresClusterFragment {
                api_version: PGO_API_VERSION.into(),
                kind: "PostgresCluster".into(),
                metadata: ObjectMeta {
                    name: "zitadel".into(),
                    namespace: "zitadel".into(),
                },
                spec: PostgresClusterSpec {
                    backups: Backups { pgbackrest },
                },
            },
            external_secret: external_secret("zitadel", "holos-zitadel-backups"),
        };
        let yaml = manifests.to_yaml().expect("yaml");
        assert_eq!(yaml.matches("---\n").count(), 2, "{yaml}");
        let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(&yaml).expect("parse");
        assert_eq!(
            documents,
            [
                serde_json::to_value(&manifests.postgres_cluster).unwrap(),
                serde_json::to_value(&manifests.external_secret).unwrap()
            ],
            "{yaml}"
        );
        assert_eq!(
            documents[0]["spec"]["backups"]["pgbackrest"]["global"]["repo2-retention-full"],
            "14"
        );
        assert_eq!(repo_path("ns", "pg"), "/pgbackrest/ns/pg/repo2");
    }
}
