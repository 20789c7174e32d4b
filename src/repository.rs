//! Backup repositories in Postgres: the desired state a client asked for, the state of its
//! provisioning, and the identifiers of the resources made for it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::domain::{BucketName, Labels, Namespace, Region, RepositoryName};

/// Every state a repository can be in (the table's CHECK constraint); the trigger
/// `backup_repository_follows_job` moves it with its jobs. A `deleted` repository keeps its
/// record (and audit history) but no longer holds its name or bucket.
pub const STATES: [&str; 7] = [
    "pending",
    "provisioning",
    "ready",
    "failed",
    "cancelled",
    "deprovisioning",
    "deleted",
];

/// The state of a repository whose deprovisioning succeeded.
pub const DELETED: &str = "deleted";

/// A validated request for a repository: what must exist.
#[derive(Debug, Clone)]
pub struct DesiredRepository {
    pub name: RepositoryName,
    pub namespace: Namespace,
    pub bucket: BucketName,
    pub region: Region,
    pub labels: Labels,
    pub options: RepositoryOptions,
}

/// Switches that change how provisioning treats what it finds, not what it makes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct RepositoryOptions {
    /// Make a new cipher pass even though the bucket already holds objects.
    #[serde(default)]
    pub allow_new_cipher_pass: bool,
    /// Take over a Secret of the same name that backup-provisioner did not create.
    #[serde(default)]
    pub adopt_existing_secret: bool,
    /// Adopted: resources made by hand with the runbook, taken over without making anything
    /// (`provision::adopt`); its jobs are adoptions, never provisionings.
    #[serde(default)]
    pub adopt: bool,
    /// With `adopt`: the Secret read (default: the bucket's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// With `adopt`: the safe differences are converged and a Secret in another layout is
    /// rewritten into the runbook's `s3.conf`.
    #[serde(default)]
    pub repair: bool,
}

/// Identifiers of what provisioning made, filled in step by step. Never secret values.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Resources {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket_arn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_arn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RepositoryRow {
    pub id: Uuid,
    pub name: String,
    pub namespace: String,
    pub bucket: String,
    pub region: String,
    pub labels: sqlx::types::Json<BTreeMap<String, String>>,
    pub options: sqlx::types::Json<RepositoryOptions>,
    pub state: String,
    pub resources: sqlx::types::Json<Resources>,
    pub last_error: Option<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When the last verification (a `verify-repository` job) finished; NULL before the first.
    pub verified_at: Option<DateTime<Utc>>,
    /// Its report (`provision::verify::Verification`).
    pub verification: Option<sqlx::types::Json<serde_json::Value>>,
    /// Its number of settings whose action is not `none`.
    pub drift_count: Option<i32>,
}

impl RepositoryRow {
    /// Fields whose stored value differs from `desired` (empty when the desired state matches).
    pub fn differences(&self, desired: &DesiredRepository) -> Vec<&'static str> {
        let mut fields = Vec::new();
        if self.namespace != desired.namespace.as_str() {
            fields.push("namespace");
        }
        if self.bucket != desired.bucket.as_str() {
            fields.push("bucket");
        }
        if self.region != desired.region.as_str() {
            fields.push("region");
        }
        if self.labels.0 != *desired.labels.as_map() {
            fields.push("labels");
        }
        fields
    }
}

pub(crate) const COLUMNS: &str = "id, name, namespace, bucket, region, labels, options, state, resources, last_error, \
                       created_by, created_at, updated_at, verified_at, verification, drift_count";

/// Inserts the repository unless one of that name exists (and is not deleted). Returns the new
/// row, or None.
pub async fn insert_if_absent(
    conn: &mut PgConnection,
    desired: &DesiredRepository,
    created_by: &str,
) -> Result<Option<RepositoryRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO backup_repositories (id, name, namespace, bucket, region, labels, options, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (name) WHERE state <> 'deleted' DO NOTHING
         RETURNING {COLUMNS}"
    )))
    .bind(Uuid::new_v4())
    .bind(desired.name.as_str())
    .bind(desired.namespace.as_str())
    .bind(desired.bucket.as_str())
    .bind(desired.region.as_str())
    .bind(sqlx::types::Json(desired.labels.as_map()))
    .bind(sqlx::types::Json(&desired.options))
    .bind(created_by)
    .fetch_optional(conn)
    .await
}

/// The live (not deleted) repository of that name.
pub async fn by_name(
    db: impl PgExecutor<'_>,
    name: &str,
) -> Result<Option<RepositoryRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM backup_repositories WHERE name = $1 AND state <> 'deleted'"
    )))
    .bind(name)
    .fetch_optional(db)
    .await
}

pub async fn by_id(
    db: impl PgExecutor<'_>,
    id: Uuid,
) -> Result<Option<RepositoryRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM backup_repositories WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(db)
    .await
}

/// The live (not deleted) repository of that name or, when there is none, the one of that
/// name deleted last: what `GET /v1/backup-repositories/{name}` shows.
pub async fn by_name_or_deleted(
    db: impl PgExecutor<'_>,
    name: &str,
) -> Result<Option<RepositoryRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM backup_repositories WHERE name = $1
          ORDER BY state = 'deleted', updated_at DESC
          LIMIT 1"
    )))
    .bind(name)
    .fetch_optional(db)
    .await
}

/// The live (not deleted) repository using that bucket.
pub async fn by_bucket(
    db: impl PgExecutor<'_>,
    bucket: &str,
) -> Result<Option<RepositoryRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM backup_repositories WHERE bucket = $1 AND state <> 'deleted'"
    )))
    .bind(bucket)
    .fetch_optional(db)
    .await
}

#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this state; without one, every state but `deleted` (deleted repositories are
    /// listed only when asked for).
    pub state: Option<String>,
    pub namespace: Option<String>,
    /// Cursor: list names after this one.
    pub after: Option<String>,
    /// Cursor: with `after`, list the repositories of that name after this id (deleted
    /// repositories can share a name).
    pub after_id: Option<Uuid>,
    pub limit: i64,
}

/// Repositories by name (then id), filtered; see [`ListFilter`].
pub async fn list(
    db: impl PgExecutor<'_>,
    filter: &ListFilter,
) -> Result<Vec<RepositoryRow>, sqlx::Error> {
    // The cursor is one row comparison (no cursor: after the empty name, which sorts before
    // every name) so that even a generic plan starts the index scan at the cursor.
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM backup_repositories
          WHERE (state = $1 OR ($1::text IS NULL AND state <> 'deleted'))
            AND ($2::text IS NULL OR namespace = $2)
            AND (name, id) > (coalesce($3::text, ''),
                              coalesce($5, 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid))
          ORDER BY name, id
          LIMIT $4"
    )))
    .bind(&filter.state)
    .bind(&filter.namespace)
    .bind(&filter.after)
    .bind(filter.limit)
    .bind(filter.after_id)
    .fetch_all(db)
    .await
}

pub async fn set_options(
    db: impl PgExecutor<'_>,
    id: Uuid,
    options: &RepositoryOptions,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE backup_repositories SET options = $2, updated_at = now() WHERE id = $1")
        .bind(id)
        .bind(sqlx::types::Json(options))
        .execute(db)
        .await?;
    Ok(())
}

/// Locks the repository's row for the rest of the transaction and returns its state (`None`:
/// no such row). A job queued after this sees the state it checked.
pub async fn lock_state(conn: &mut PgConnection, id: Uuid) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT state FROM backup_repositories WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// [`merge_resources`] as the statement of `jobs::JobContext::fenced_write`: `$3` the
/// repository's id, `$4` the patch ([`resources_patch`]).
pub const MERGE_RESOURCES_IF_LEASED: &str = "UPDATE backup_repositories
    SET resources = resources || $4, updated_at = now()
  WHERE id = $3 AND EXISTS (SELECT 1 FROM lease)";

/// What [`merge_resources`] merges into the stored resources.
pub fn resources_patch(patch: &Resources) -> serde_json::Value {
    serde_json::to_value(patch).unwrap_or_default()
}

/// Merges newly known identifiers into the repository's resources.
pub async fn merge_resources(
    db: impl PgExecutor<'_>,
    id: Uuid,
    patch: &Resources,
) -> Result<(), sqlx::Error> {
    let patch = resources_patch(patch);
    sqlx::query("UPDATE backup_repositories SET resources = resources || $2, updated_at = now() WHERE id = $1")
        .bind(id)
        .bind(patch)
        .execute(db)
        .await?;
    Ok(())
}

/// Stores the verification just made of repository `id` (in the transaction of the verify
/// job's last step). Its state is not changed.
pub async fn record_verification(
    db: impl PgExecutor<'_>,
    id: Uuid,
    verification: &serde_json::Value,
    drift_count: i32,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE backup_repositories
            SET verified_at = now(), verification = $2, drift_count = $3
          WHERE id = $1",
    )
    .bind(id)
    .bind(verification)
    .bind(drift_count)
    .execute(db)
    .await?;
    Ok(())
}
