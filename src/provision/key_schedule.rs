//! The key schedule: a periodic task of the worker process (every `BP_KEY_SCHEDULE_INTERVAL`),
//! run by one worker at a time (a Postgres advisory lock elects it, as for the sweep). Each
//! round it
//! - queues a `retire-access-key` job for every due retirement (`rotate::retirements::due`):
//!   an old key whose grace period passed is deactivated, one inactive for the second period is
//!   deleted. A repository with an active job is skipped until the next round;
//! - with `BP_KEY_MAX_AGE` set, queues a `rotate-access-key` job for every ready repository
//!   whose key (its IAM CreateDate) is older, and that has no active job and no pending
//!   retirement.

use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::access_key;
use super::rotate::request::{self, RotateRequestError, SCHEDULE_ACTOR};
use super::rotate::retirements;
use super::sweep::on_ticks;
use crate::audit::Actor;
use crate::cloud::CloudError;
use crate::repository;

/// The advisory lock whose holder runs the schedule ("bpkeys01").
pub const KEY_SCHEDULE_LOCK: i64 = 0x6270_6b65_7973_3031;
/// Retirements queued per round at most (the rest wait for the next round).
const BATCH: i64 = 100;

/// The schedule: Postgres and the IAM client of the workers.
#[derive(Clone)]
pub struct KeySchedule {
    pub db: PgPool,
    pub iam: aws_sdk_iam::Client,
    /// Rotate keys older than this (`BP_KEY_MAX_AGE`); `None`: never automatically.
    pub max_age: Option<Duration>,
    /// Attempts of the jobs it queues (`BP_JOB_MAX_ATTEMPTS`).
    pub max_attempts: i32,
}

/// What one round queued.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Another worker holds the lock.
    pub skipped: bool,
    /// `(repository, retirement id)` of retirement jobs queued.
    pub retirements: Vec<(String, Uuid)>,
    /// Repositories whose rotation was queued because their key is too old.
    pub rotations: Vec<String>,
    /// `(repository, error)` of repositories skipped after an error.
    pub failed: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Cloud(#[from] CloudError),
    #[error(transparent)]
    Request(#[from] RotateRequestError),
}

/// A ready repository whose key may be too old.
#[derive(Debug, sqlx::FromRow)]
struct Candidate {
    id: Uuid,
    name: String,
    bucket: String,
}

impl KeySchedule {
    /// Runs a round every `interval` until `shutdown` fires.
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        let ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        let this = &self;
        on_ticks(ticks, shutdown, || async move {
            match this.round().await {
                Ok(round) if round.retirements.len() + round.rotations.len() > 0 => {
                    tracing::info!(?round, "key schedule queued jobs");
                }
                Ok(round) if !round.failed.is_empty() => {
                    tracing::warn!(failed = ?round.failed, "key schedule skipped repositories");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "key schedule failed"),
            }
        })
        .await
    }

    /// One round, if this worker wins the lock.
    pub async fn round(&self) -> Result<Round, ScheduleError> {
        let won = crate::db::with_advisory_lock(&self.db, KEY_SCHEDULE_LOCK, || async {
            let mut round = Round::default();
            self.queue_all(&mut round).await.map(|()| round)
        })
        .await?;
        Ok(won.unwrap_or_else(|| Round {
            skipped: true,
            ..Round::default()
        }))
    }

    async fn queue_all(&self, round: &mut Round) -> Result<(), ScheduleError> {
        for due in retirements::due(&self.db, BATCH).await? {
            let mut tx = self.db.begin().await?;
            match request::enqueue_retirement(&mut tx, &due, self.max_attempts).await {
                Ok(_) => {
                    tx.commit().await?;
                    round.retirements.push((due.repository.clone(), due.id));
                }
                // A job started meanwhile: next round.
                Err(RotateRequestError::Busy(_)) => {}
                Err(e) => round.failed.push((due.repository.clone(), e.to_string())),
            }
        }
        if let Some(max_age) = self.max_age {
            self.queue_rotations(max_age, round).await?;
        }
        Ok(())
    }

    /// Queues a rotation for every candidate whose referenced key is older than `max_age`.
    async fn queue_rotations(
        &self,
        max_age: Duration,
        round: &mut Round,
    ) -> Result<(), ScheduleError> {
        for candidate in candidates(&self.db, max_age).await? {
            match self.rotate_if_old(&candidate, max_age).await {
                Ok(true) => round.rotations.push(candidate.name.clone()),
                // A job started, or the repository stopped being ready, meanwhile.
                Ok(false)
                | Err(ScheduleError::Request(
                    RotateRequestError::Busy(_)
                    | RotateRequestError::NotReady { .. }
                    | RotateRequestError::NotFound(_),
                )) => {}
                Err(e) => round.failed.push((candidate.name.clone(), e.to_string())),
            }
        }
        Ok(())
    }

    async fn rotate_if_old(
        &self,
        candidate: &Candidate,
        max_age: Duration,
    ) -> Result<bool, ScheduleError> {
        let Some(row) = repository::by_id(&self.db, candidate.id).await? else {
            return Ok(false);
        };
        let Some(key_id) = row.resources.0.access_key_id.clone() else {
            return Ok(false);
        };
        let keys = access_key::list(&self.iam, &candidate.bucket).await?;
        let Some(created) = keys.iter().find(|k| k.id == key_id).and_then(|k| k.created) else {
            return Ok(false);
        };
        let age = Utc::now() - created;
        if age.to_std().unwrap_or_default() < max_age {
            return Ok(false);
        }
        let payload = request::payload_for(&row).map_err(RotateRequestError::from)?;
        let actor = Actor {
            subject: SCHEDULE_ACTOR,
            request_id: None,
            client_request_id: None,
        };
        let detail = serde_json::json!({
            "reason": "the access key is older than BP_KEY_MAX_AGE",
            "access_key_id": key_id, "created": created,
            "max_age_seconds": max_age.as_secs(),
        });
        let mut tx = self.db.begin().await?;
        request::enqueue_rotation(&mut tx, &payload, actor, self.max_attempts, detail).await?;
        tx.commit().await?;
        Ok(true)
    }
}

/// Ready repositories, with no active job and no pending retirement, that were made more than
/// `max_age` ago and whose last rotation (if any) ended more than `max_age` ago: only those can
/// hold a key that old, so IAM is asked about few. A rotation that failed (e.g. a Secret adopted
/// without repair, which rotation refuses) is tried again only after `max_age`, not every round.
async fn candidates(db: &PgPool, max_age: Duration) -> Result<Vec<Candidate>, sqlx::Error> {
    sqlx::query_as(
        "SELECT r.id, r.name, r.bucket FROM backup_repositories r
          WHERE r.state = 'ready'
            AND r.created_at < now() - make_interval(secs => $1)
            AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.subject_id = r.id
                               AND (j.state IN ('queued', 'running')
                                    OR (j.kind = 'rotate-access-key'
                                        AND j.finished_at > now() - make_interval(secs => $1))))
            AND NOT EXISTS (SELECT 1 FROM key_retirements k WHERE k.repository_id = r.id
                               AND k.deleted_at IS NULL AND k.superseded_at IS NULL)
          ORDER BY r.name
          LIMIT $2",
    )
    .bind(max_age.as_secs_f64())
    .bind(BATCH)
    .fetch_all(db)
    .await
}
