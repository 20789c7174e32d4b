//! A repository as its page shows it (`GET /v1/backup-repositories/{name}`): the stored row,
//! its latest job and its backups' freshness, read in one query. Portals and scripts poll that
//! page; one round trip instead of three is most of what such a read costs.

use sqlx::PgExecutor;
use sqlx::types::Json;

use super::freshness::store::Freshness;
use crate::jobs::queue::{JOB_COLUMNS, Job};
use crate::repository::{self, RepositoryRow};

pub struct Overview {
    pub row: RepositoryRow,
    pub latest_job: Option<Job>,
    pub freshness: Option<Freshness>,
}

#[derive(sqlx::FromRow)]
struct Row {
    #[sqlx(flatten)]
    row: RepositoryRow,
    latest_job: Option<Json<Job>>,
    freshness: Option<Json<Freshness>>,
}

/// The repository of that name as [`repository::by_name_or_deleted`] finds it, with its
/// newest job and its last freshness check.
pub async fn by_name(db: impl PgExecutor<'_>, name: &str) -> Result<Option<Overview>, sqlx::Error> {
    let columns = repository::COLUMNS;
    let found: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {columns},
                (SELECT to_jsonb(j)
                   FROM (SELECT {JOB_COLUMNS} FROM jobs WHERE subject_id = r.id
                          ORDER BY created_at DESC LIMIT 1) j) AS latest_job,
                (SELECT to_jsonb(f) FROM backup_freshness f
                  WHERE f.repository_id = r.id) AS freshness
           FROM backup_repositories r WHERE name = $1
          ORDER BY state = 'deleted', updated_at DESC
          LIMIT 1"
    )))
    .bind(name)
    .fetch_optional(db)
    .await?;
    Ok(found.map(|found| Overview {
        row: found.row,
        latest_job: found.latest_job.map(|job| job.0),
        freshness: found.freshness.map(|freshness| freshness.0),
    }))
}
