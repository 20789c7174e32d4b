//! The outbox's SQL: the trigger of migration `20261203000010` writes deliveries; here they are
//! claimed, their attempts recorded, and read for `GET /v1/jobs/{id}/deliveries` and /metrics.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

/// The channel the trigger notifies with a new delivery's id.
pub const CHANNEL: &str = "bp_webhooks";

/// A delivery a sender claimed for one attempt.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: Uuid,
    pub url: String,
    pub body: String,
    /// This attempt's number, from 1.
    pub attempts: i32,
}

/// Claims up to `limit` due deliveries for one attempt each: their next attempt moves `hold`
/// ahead, so no other sender takes them meanwhile, and one whose sender died is tried again
/// after it.
pub async fn claim_due(
    db: &PgPool,
    limit: i64,
    hold: Duration,
) -> Result<Vec<Claimed>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE webhook_deliveries
            SET attempts = attempts + 1,
                next_attempt_at = now() + make_interval(secs => $2)
          WHERE id IN (SELECT id FROM webhook_deliveries
                        WHERE state = 'pending' AND next_attempt_at <= now()
                        ORDER BY next_attempt_at
                        FOR UPDATE SKIP LOCKED
                        LIMIT $1)
        RETURNING id, url, body, attempts",
    )
    .bind(limit)
    .bind(hold.as_secs_f64())
    .fetch_all(db)
    .await
}

/// How long until the earliest pending delivery is due; None without any.
pub async fn next_due_in(db: &PgPool) -> Result<Option<Duration>, sqlx::Error> {
    let seconds: Option<f64> = sqlx::query_scalar(
        "SELECT greatest(extract(epoch FROM min(next_attempt_at) - now()), 0)::float8
           FROM webhook_deliveries WHERE state = 'pending'",
    )
    .fetch_one(db)
    .await?;
    Ok(seconds.map(Duration::from_secs_f64))
}

/// One attempt at a delivery, as the sender saw it.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub attempted_at: DateTime<Utc>,
    pub duration: Duration,
    /// The receiver's answer, if one came.
    pub status_code: Option<u16>,
    /// Why it did not count as delivered; None when it did.
    pub error: Option<String>,
}

/// What follows an attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    Delivered,
    /// Try again after `delay`, unless that is past the delivery's creation plus `window`:
    /// then it has failed for good.
    Retry {
        delay: Duration,
        window: Duration,
    },
    /// Failed for good now (its destination is no longer allowed).
    GiveUp,
}

/// Records attempt `claimed.attempts` and what follows it, in one transaction. A sender whose
/// claim was taken over (it outlived its hold) records its attempt but changes nothing else.
pub async fn record(
    db: &PgPool,
    claimed: &Claimed,
    attempt: &Attempt,
    next: Next,
) -> Result<(), sqlx::Error> {
    let mut tx = db.begin().await?;
    sqlx::query(
        "INSERT INTO webhook_attempts
            (delivery_id, attempt, attempted_at, duration_ms, status_code, error)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT DO NOTHING",
    )
    .bind(claimed.id)
    .bind(claimed.attempts)
    .bind(attempt.attempted_at)
    .bind(i32::try_from(attempt.duration.as_millis()).unwrap_or(i32::MAX))
    .bind(attempt.status_code.map(i32::from))
    .bind(&attempt.error)
    .execute(&mut *tx)
    .await?;
    let (state, delay, window) = match next {
        Next::Delivered => ("delivered", Duration::ZERO, Duration::ZERO),
        Next::Retry { delay, window } => ("pending", delay, window),
        Next::GiveUp => ("failed", Duration::ZERO, Duration::ZERO),
    };
    sqlx::query(
        "UPDATE webhook_deliveries
            SET state = CASE WHEN $3 = 'pending'
                              AND now() + make_interval(secs => $4)
                                  > created_at + make_interval(secs => $5)
                             THEN 'failed' ELSE $3 END,
                next_attempt_at = now() + make_interval(secs => $4),
                last_error = $6,
                finished_at = CASE WHEN $3 = 'pending'
                                    AND now() + make_interval(secs => $4)
                                        <= created_at + make_interval(secs => $5)
                                   THEN NULL ELSE now() END
          WHERE id = $1 AND attempts = $2 AND state = 'pending'",
    )
    .bind(claimed.id)
    .bind(claimed.attempts)
    .bind(state)
    .bind(delay.as_secs_f64())
    .bind(window.as_secs_f64())
    .bind(&attempt.error)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// A delivery as `GET /v1/jobs/{id}/deliveries` shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeliveryRow {
    pub id: Uuid,
    pub event_type: String,
    pub url: String,
    pub body: String,
    pub state: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRow {
    pub delivery_id: Uuid,
    pub attempt: i32,
    pub attempted_at: DateTime<Utc>,
    pub duration_ms: i32,
    pub status_code: Option<i32>,
    pub error: Option<String>,
}

/// The deliveries of job `job_id`, oldest first, and all their attempts.
pub async fn of_job(
    db: &PgPool,
    job_id: Uuid,
) -> Result<(Vec<DeliveryRow>, Vec<AttemptRow>), sqlx::Error> {
    let deliveries = sqlx::query_as(
        "SELECT id, event_type, url, body, state, attempts, next_attempt_at, last_error,
                created_at, finished_at
           FROM webhook_deliveries WHERE job_id = $1 ORDER BY created_at, id",
    )
    .bind(job_id)
    .fetch_all(db)
    .await?;
    let attempts = sqlx::query_as(
        "SELECT a.delivery_id, a.attempt, a.attempted_at, a.duration_ms, a.status_code, a.error
           FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id
          WHERE d.job_id = $1 ORDER BY a.delivery_id, a.attempt",
    )
    .bind(job_id)
    .fetch_all(db)
    .await?;
    Ok((deliveries, attempts))
}

/// Deliveries pending (not yet delivered, still retried) and failed for good, for /metrics.
pub async fn stats(db: impl PgExecutor<'_>) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'pending'), count(*) FILTER (WHERE state = 'failed')
           FROM webhook_deliveries",
    )
    .fetch_one(db)
    .await
}
