//! What the people wiring a PostgresCluster to its repository need once it is ready: the
//! `spec.backups.pgbackrest` fragment and the ExternalSecret that copies the Secret from the
//! management cluster into the workload cluster's namespace of the same name.

use serde_json::{Value, json};

use crate::repository::RepositoryRow;

pub struct Wiring {
    pub pgbackrest: Value,
    pub external_secret: Value,
}

/// pgBackRest's S3 endpoint for a region (dual-stack, as the platform's clusters use).
pub fn s3_endpoint(region: &str) -> String {
    format!("s3.dualstack.{region}.amazonaws.com")
}

impl Wiring {
    pub fn for_repository(repo: &RepositoryRow) -> Self {
        let secret_name = &repo.bucket;
        let pgbackrest = json!({
            "configuration": [ { "secret": { "name": secret_name } } ],
            "global": {
                "repo2-cipher-type": "aes-256-cbc",
                "repo2-path": format!("/pgbackrest/{}/{}/repo2", repo.namespace, repo.name),
            },
            "repos": [ {
                "name": "repo2",
                "s3": {
                    "bucket": repo.bucket,
                    "endpoint": s3_endpoint(&repo.region),
                    "region": repo.region,
                }
            } ]
        });
        let external_secret = json!({
            "apiVersion": "external-secrets.io/v1",
            "kind": "ExternalSecret",
            "metadata": { "name": secret_name, "namespace": repo.namespace },
            "spec": {
                "refreshInterval": "1h",
                "secretStoreRef": { "kind": "SecretStore", "name": "default" },
                "target": { "name": secret_name, "creationPolicy": "Owner" },
                "dataFrom": [ { "extract": { "key": secret_name } } ]
            }
        });
        Wiring {
            pgbackrest,
            external_secret,
        }
    }
}
