//! The last freshness check of each repository (table `backup_freshness`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use super::scan::Found;

/// What the last freshness check found in a repository's prefix. Dates are the objects'
/// LastModified; a `newest_*` is null when nothing of the kind was found (or before the first
/// successful check).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Freshness {
    /// When the newest completed backup (full, differential or incremental) completed.
    pub newest_backup_at: Option<DateTime<Utc>>,
    /// When the newest completed full backup completed.
    pub newest_full_backup_at: Option<DateTime<Utc>>,
    /// When the newest WAL segment (or timeline history file) was archived.
    pub newest_wal_at: Option<DateTime<Utc>>,
    /// When a check last succeeded; null before the first success.
    pub checked_at: Option<DateTime<Utc>>,
    /// When a check was last attempted.
    pub attempted_at: DateTime<Utc>,
    /// Why the last attempt failed (the dates are then those of the last success); null when
    /// it succeeded.
    pub error: Option<String>,
}

/// Stores a check's outcome: what it found (replacing what an earlier check found), or why it
/// failed (keeping what an earlier check found).
pub async fn record(
    db: &PgPool,
    repository_id: Uuid,
    outcome: &Result<Found, String>,
) -> Result<(), sqlx::Error> {
    let query = match outcome {
        Ok(found) => sqlx::query(
            "INSERT INTO backup_freshness AS f (repository_id, newest_backup_at,
                    newest_full_backup_at, newest_wal_at, checked_at, attempted_at, error)
             VALUES ($1, $2, $3, $4, now(), now(), NULL)
             ON CONFLICT (repository_id) DO UPDATE
                SET newest_backup_at = EXCLUDED.newest_backup_at,
                    newest_full_backup_at = EXCLUDED.newest_full_backup_at,
                    newest_wal_at = EXCLUDED.newest_wal_at,
                    checked_at = now(), attempted_at = now(), error = NULL",
        )
        .bind(repository_id)
        .bind(found.newest_backup_at)
        .bind(found.newest_full_backup_at)
        .bind(found.newest_wal_at),
        Err(error) => sqlx::query(
            "INSERT INTO backup_freshness AS f (repository_id, attempted_at, error)
             VALUES ($1, now(), $2)
             ON CONFLICT (repository_id) DO UPDATE SET attempted_at = now(), error = $2",
        )
        .bind(repository_id)
        .bind(error),
    };
    query.execute(db).await?;
    Ok(())
}

/// The last check of each of `repository_ids` checked at least once (for a page of a listing).
pub async fn of_repositories(
    db: &PgPool,
    repository_ids: &[Uuid],
) -> Result<Vec<(Uuid, Freshness)>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        repository_id: Uuid,
        #[sqlx(flatten)]
        freshness: Freshness,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT repository_id, newest_backup_at, newest_full_backup_at, newest_wal_at,
                checked_at, attempted_at, error
           FROM backup_freshness WHERE repository_id = ANY($1)",
    )
    .bind(repository_ids)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.repository_id, r.freshness))
        .collect())
}
