//! The `key_retirements` table: one row per rotation, the old key's timeline (grace, then
//! deactivation, then deletion). A leaf module (Postgres only), so that every path that deletes
//! access keys (provisioning's access key and retire steps, the sweep) can ask which keys it
//! must spare without depending on the rotation job.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

/// A retirement as stored.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Retirement {
    pub id: Uuid,
    pub repository_id: Uuid,
    pub rotation_job_id: Uuid,
    pub old_key_id: String,
    pub new_key_id: String,
    pub secret_changed_at: DateTime<Utc>,
    pub deactivate_after: DateTime<Utc>,
    pub delete_after: DateTime<Utc>,
    pub deactivated_at: Option<DateTime<Utc>>,
    pub deleted_at: Option<DateTime<Utc>>,
    pub last_used: Option<serde_json::Value>,
    pub halted_at: Option<DateTime<Utc>>,
    pub halt_reason: Option<String>,
}

const COLUMNS: &str = "id, repository_id, rotation_job_id, old_key_id, new_key_id, \
    secret_changed_at, deactivate_after, delete_after, deactivated_at, deleted_at, last_used, \
    halted_at, halt_reason";

/// Which keys of a repository are in a pending retirement: kept by every deletion path (their
/// grace period is running, or an operator must look at them).
pub async fn keys_in_grace(
    db: impl PgExecutor<'_>,
    repository_id: Uuid,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT old_key_id FROM key_retirements
          WHERE repository_id = $1 AND deleted_at IS NULL AND superseded_at IS NULL
          ORDER BY created_at",
    )
    .bind(repository_id)
    .fetch_all(db)
    .await
}

/// The pending retirements of a repository, oldest first.
pub async fn pending(
    db: impl PgExecutor<'_>,
    repository_id: Uuid,
) -> Result<Vec<Retirement>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM key_retirements
          WHERE repository_id = $1 AND deleted_at IS NULL AND superseded_at IS NULL
          ORDER BY created_at"
    )))
    .bind(repository_id)
    .fetch_all(db)
    .await
}

/// One retirement by id.
pub async fn get(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<Retirement>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM key_retirements WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(db)
    .await
}

/// The retirement a rotation job scheduled, if it did.
pub async fn of_rotation(
    db: impl PgExecutor<'_>,
    rotation_job_id: Uuid,
) -> Result<Option<Retirement>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM key_retirements WHERE rotation_job_id = $1"
    )))
    .bind(rotation_job_id)
    .fetch_optional(db)
    .await
}

/// What a rotation schedules once the Secret holds its new key.
#[derive(Debug, Clone)]
pub struct NewRetirement<'a> {
    pub repository_id: Uuid,
    pub rotation_job_id: Uuid,
    pub old_key_id: &'a str,
    pub new_key_id: &'a str,
    /// How long the old key stays active after the Secret changed.
    pub grace: std::time::Duration,
    /// How long it stays (inactive) after it was deactivated, before it is deleted.
    pub delete_grace: std::time::Duration,
}

/// Schedules the old key's retirement, timed from now (the Secret was just read back holding
/// the new key). Idempotent per rotation job; an earlier pending row for the same old key (a
/// halted one) is closed as superseded. Call it in the transaction that records the Secret.
pub async fn schedule(conn: &mut PgConnection, new: &NewRetirement<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE key_retirements SET superseded_at = now(), updated_at = now()
          WHERE repository_id = $1 AND old_key_id = $2 AND rotation_job_id <> $3
            AND deleted_at IS NULL AND superseded_at IS NULL",
    )
    .bind(new.repository_id)
    .bind(new.old_key_id)
    .bind(new.rotation_job_id)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO key_retirements (id, repository_id, rotation_job_id, old_key_id, new_key_id,
                                      secret_changed_at, deactivate_after, delete_after)
         VALUES ($1, $2, $3, $4, $5, clock_timestamp(),
                 clock_timestamp() + make_interval(secs => $6),
                 clock_timestamp() + make_interval(secs => $6 + $7))
         ON CONFLICT (rotation_job_id) DO NOTHING",
    )
    .bind(Uuid::new_v4())
    .bind(new.repository_id)
    .bind(new.rotation_job_id)
    .bind(new.old_key_id)
    .bind(new.new_key_id)
    .bind(new.grace.as_secs_f64())
    .bind(new.delete_grace.as_secs_f64())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records the old key's last use (read before deactivating it).
pub async fn record_last_used(
    db: impl PgExecutor<'_>,
    id: Uuid,
    last_used: &serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE key_retirements SET last_used = $2, updated_at = now() WHERE id = $1")
        .bind(id)
        .bind(last_used)
        .execute(db)
        .await?;
    Ok(())
}

/// The old key is inactive now. The second period runs from now: a deactivation that came late
/// (the service was down) still leaves the whole period before the key is deleted.
pub async fn mark_deactivated(db: impl PgExecutor<'_>, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE key_retirements
            SET deactivated_at = coalesce(deactivated_at, clock_timestamp()),
                delete_after = greatest(delete_after,
                                        clock_timestamp() + (delete_after - deactivate_after)),
                updated_at = now()
          WHERE id = $1",
    )
    .bind(id)
    .execute(db)
    .await?;
    Ok(())
}

/// The old key is gone (deleted by the schedule, or early to make room for a new rotation).
pub async fn mark_deleted(db: impl PgExecutor<'_>, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE key_retirements SET deleted_at = coalesce(deleted_at, clock_timestamp()),
                updated_at = now()
          WHERE id = $1",
    )
    .bind(id)
    .execute(db)
    .await?;
    Ok(())
}

/// The retirement stops until an operator looks at it; the key is kept.
pub async fn halt(db: impl PgExecutor<'_>, id: Uuid, reason: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE key_retirements SET halted_at = clock_timestamp(), halt_reason = $2,
                updated_at = now()
          WHERE id = $1",
    )
    .bind(id)
    .bind(reason)
    .execute(db)
    .await?;
    Ok(())
}

/// What a retirement is due for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The grace period passed: check last use, then deactivate.
    Deactivate,
    /// The second period passed since deactivation: delete.
    Delete,
}

/// A retirement that is due, with its repository's names (for the retire job's payload).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Due {
    pub id: Uuid,
    pub repository_id: Uuid,
    pub repository: String,
    pub namespace: String,
    pub bucket: String,
    pub region: String,
    /// The Secret's name when it is not the bucket's.
    pub secret_name: Option<String>,
    pub deactivated: bool,
}

impl Due {
    pub fn phase(&self) -> Phase {
        if self.deactivated {
            Phase::Delete
        } else {
            Phase::Deactivate
        }
    }
}

/// Retirements due now (not halted), whose repository has no active job and is not being (or
/// was not) deprovisioned.
pub async fn due(db: impl PgExecutor<'_>, limit: i64) -> Result<Vec<Due>, sqlx::Error> {
    sqlx::query_as(
        "SELECT k.id, k.repository_id, r.name AS repository, r.namespace, r.bucket, r.region,
                r.options ->> 'secret_name' AS secret_name,
                k.deactivated_at IS NOT NULL AS deactivated
           FROM key_retirements k JOIN backup_repositories r ON r.id = k.repository_id
          WHERE k.deleted_at IS NULL AND k.superseded_at IS NULL AND k.halted_at IS NULL
            -- Deprovisioning deletes every key of the user itself.
            AND r.state NOT IN ('deprovisioning', 'deleted')
            AND ((k.deactivated_at IS NULL AND k.deactivate_after <= now())
              OR (k.deactivated_at IS NOT NULL AND k.delete_after <= now()))
            AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.subject_id = r.id
                               AND j.state IN ('queued', 'running'))
          ORDER BY least(k.deactivate_after, k.delete_after)
          LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db)
    .await
}
