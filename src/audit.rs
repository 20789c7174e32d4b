//! The append-only audit log: one entry per API mutation and per step attempt.
//!
//! Postgres enforces append-only (a trigger rejects UPDATE, DELETE and TRUNCATE). Entries for a
//! step attempt are keyed by (job, step, attempt, action), so writing one twice stores it once:
//! a worker that retries a commit whose acknowledgement was lost cannot duplicate history.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;
use uuid::Uuid;

/// Who acts: a token's subject (or a job's creator) and the request it came with: the
/// server's id for it, and the client's `X-Request-Id` when it was short and safe.
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a> {
    pub subject: &'a str,
    pub request_id: Option<&'a str>,
    pub client_request_id: Option<&'a str>,
}

/// One audit entry to append. `detail` must never hold a secret value.
#[derive(Debug, Clone, Default)]
pub struct AuditEntry {
    pub actor: String,
    pub request_id: Option<String>,
    /// The name of what the entry is about (a repository), stored as `repository`.
    pub subject: Option<String>,
    pub job_id: Option<Uuid>,
    pub step: Option<String>,
    pub attempt: Option<i32>,
    pub action: String,
    pub outcome: String,
    pub detail: serde_json::Value,
    pub upstream_request_id: Option<String>,
    /// The client's own `X-Request-Id` (at most 128 safe characters); `request_id` is ours.
    pub client_request_id: Option<String>,
}

/// Appends an entry; a duplicate step attempt is ignored. Returns whether a row was written.
pub async fn record(db: impl PgExecutor<'_>, entry: &AuditEntry) -> Result<bool, sqlx::Error> {
    let sql = insert_sql("VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)");
    let result = bind_entry(sqlx::query(sqlx::AssertSqlSafe(sql)), entry)
        .execute(db)
        .await?;
    Ok(result.rows_affected() == 1)
}

/// The statement appending one entry whose values `source` gives as `$1` to `$11` (a VALUES
/// list, or a SELECT that decides whether a row is written), bound by [`bind_entry`].
pub(crate) fn insert_sql(source: &str) -> String {
    format!(
        "INSERT INTO audit_events
            (actor, request_id, repository, job_id, step, attempt, action, outcome, detail,
             upstream_request_id, client_request_id)
         {source}
         ON CONFLICT (job_id, step, attempt, action)
            WHERE job_id IS NOT NULL AND step IS NOT NULL AND attempt IS NOT NULL
         DO NOTHING"
    )
}

/// Binds `entry` as `$1` to `$11` of [`insert_sql`].
pub(crate) fn bind_entry<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    entry: &'q AuditEntry,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let detail = if entry.detail.is_null() {
        serde_json::json!({})
    } else {
        entry.detail.clone()
    };
    query
        .bind(&entry.actor)
        .bind(&entry.request_id)
        .bind(&entry.subject)
        .bind(entry.job_id)
        .bind(&entry.step)
        .bind(entry.attempt)
        .bind(&entry.action)
        .bind(&entry.outcome)
        .bind(detail)
        .bind(&entry.upstream_request_id)
        .bind(&entry.client_request_id)
}

/// An audit entry as read back.
#[derive(Debug, Clone, Serialize, serde::Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AuditEvent {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub request_id: Option<String>,
    pub repository: Option<String>,
    pub job_id: Option<Uuid>,
    pub step: Option<String>,
    pub attempt: Option<i32>,
    pub action: String,
    pub outcome: String,
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
    pub upstream_request_id: Option<String>,
    /// The client's `X-Request-Id`, when it sent a short and safe one; `request_id` is the
    /// server's.
    pub client_request_id: Option<String>,
}

/// Filters for listing; `after` is the cursor (the last id of the previous page).
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub repository: Option<String>,
    pub actor: Option<String>,
    pub job_id: Option<Uuid>,
    pub since: Option<DateTime<Utc>>,
    pub after: Option<i64>,
    pub limit: i64,
}

pub async fn list(
    db: impl PgExecutor<'_>,
    filter: &AuditFilter,
) -> Result<Vec<AuditEvent>, sqlx::Error> {
    sqlx::query_as::<_, AuditEvent>(
        "SELECT id, at, actor, request_id, repository, job_id, step, attempt, action, outcome, detail,
                upstream_request_id, client_request_id
           FROM audit_events
          WHERE ($1::text IS NULL OR repository = $1)
            AND ($2::text IS NULL OR actor = $2)
            AND ($3::uuid IS NULL OR job_id = $3)
            AND ($4::timestamptz IS NULL OR at >= $4)
            AND ($5::bigint IS NULL OR id > $5)
          ORDER BY id
          LIMIT $6",
    )
    .bind(&filter.repository)
    .bind(&filter.actor)
    .bind(filter.job_id)
    .bind(filter.since)
    .bind(filter.after)
    .bind(filter.limit)
    .fetch_all(db)
    .await
}
