//! Backup freshness (issue 13, item 4): how old the newest backup and the newest archived WAL
//! of every ready repository are, so that someone learns when backups stop arriving.
//!
//! A task of the worker process ([`FreshnessChecker::run`]): every `tick` the replica holding
//! the advisory lock [`FRESHNESS_LOCK`] checks the ready repositories whose last check is older
//! than `BP_FRESHNESS_INTERVAL` (never checked first), at most `BP_FRESHNESS_CONCURRENCY` at a
//! time. A check lists the repository's prefix (`repo2-path` of its PostgresCluster fragment,
//! [`crate::provision::manifests::repo_path`]) as the service's own identity, ListObjectsV2
//! only (names and dates; nothing is read or decrypted), every request under the process's AWS
//! request-rate limit like every other (`BP_AWS_MAX_RPS`), and stores what it found
//! ([`store`], table `backup_freshness`). The API shows it on a repository and `/metrics`
//! exports the ages, computed at scrape time from the stored dates (so they keep growing
//! between checks, and every replica reports the same).
//!
//! What counts ([`layout`]): a backup is dated by its `backup.manifest`, which pgBackRest writes
//! last (a running or aborted backup does not count); full backups are told apart by their
//! label (`…F`); WAL is dated by the newest object in the newest WAL directory of the newest
//! PostgreSQL version's archive.

pub mod layout;
pub mod scan;
pub mod store;

use std::time::Duration;

use futures::StreamExt;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cloud::aws::AwsClients;
use crate::provision::sweep::{report_rounds, round_under_lock};

pub use scan::Found;
pub use store::Freshness;

/// The advisory lock whose holder checks freshness ("bpfresh1").
pub const FRESHNESS_LOCK: i64 = 0x6270_6672_6573_6831;

/// The periodic freshness check: Postgres, the service's AWS identity and its settings.
#[derive(Debug, Clone)]
pub struct FreshnessChecker {
    pub db: PgPool,
    /// Rate-limited clients of the service's own identity (S3 per bucket region from these).
    pub aws: AwsClients,
    /// `BP_FRESHNESS_INTERVAL`: a repository is due when its last check is older (never 0:
    /// `0s` turns the check off, and startup makes no checker).
    pub interval: Duration,
    /// `BP_FRESHNESS_CONCURRENCY`: repositories checked at once.
    pub concurrency: usize,
}

/// What one round did.
#[derive(Debug, Default, PartialEq, Eq)]
pub enum Refresh {
    /// Another replica holds the lock.
    #[default]
    Skipped,
    /// The repositories checked (maybe none), each with what was found or why not.
    Checked(Vec<Checked>),
}

/// One repository's check.
#[derive(Debug, PartialEq, Eq)]
pub struct Checked {
    pub repository: String,
    pub outcome: Result<Found, String>,
}

/// A ready repository whose check is due.
#[derive(Debug, sqlx::FromRow)]
struct Due {
    id: Uuid,
    name: String,
    namespace: String,
    bucket: String,
    region: String,
}

impl FreshnessChecker {
    /// Checks the due repositories every `tick` until `shutdown` fires; the first right away.
    pub async fn run(self, tick: Duration, shutdown: CancellationToken) {
        let (ticks, refresh) = (tokio::time::interval(tick), || self.refresh_once());
        report_rounds(
            ticks,
            shutdown,
            "freshness round failed",
            refresh,
            warn_failed,
        )
        .await
    }

    /// One round, if this replica wins the lock.
    pub async fn refresh_once(&self) -> Result<Refresh, sqlx::Error> {
        let check = || self.check_due();
        round_under_lock(&self.db, FRESHNESS_LOCK, check, Refresh::Checked).await
    }

    async fn check_due(&self) -> Result<Vec<Checked>, sqlx::Error> {
        let due = due(&self.db, self.interval).await?;
        futures::stream::iter(due)
            .map(|repository| self.check_one(repository))
            .buffer_unordered(self.concurrency.max(1))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    /// Scans one repository and stores the outcome (a failed scan keeps what was found before).
    async fn check_one(&self, repository: Due) -> Result<Checked, sqlx::Error> {
        let s3 = self.aws.s3_for_region(&repository.region);
        let prefix = key_prefix(&repository.namespace, &repository.name);
        let outcome = scan::scan(&s3, &repository.bucket, &prefix)
            .await
            .map_err(|e| e.to_string());
        store::record(&self.db, repository.id, &outcome).await?;
        Ok(Checked {
            repository: repository.name,
            outcome,
        })
    }
}

/// Logs each repository whose check failed in a round.
fn warn_failed(refreshed: Refresh) {
    let Refresh::Checked(checked) = refreshed else {
        return;
    };
    for failed in checked.iter().filter(|c| c.outcome.is_err()) {
        tracing::warn!(repository = %failed.repository,
            error = ?failed.outcome.as_ref().err(), "freshness check failed");
    }
}

/// The S3 key prefix of a repository: its `repo2-path` without the leading `/`, plus `/`.
pub fn key_prefix(namespace: &str, name: &str) -> String {
    let path = crate::provision::manifests::repo_path(namespace, name);
    format!("{}/", path.trim_matches('/'))
}

/// The ready repositories due for a check, never checked first, then the longest unchecked.
async fn due(db: &PgPool, interval: Duration) -> Result<Vec<Due>, sqlx::Error> {
    sqlx::query_as(
        "SELECT r.id, r.name, r.namespace, r.bucket, r.region
           FROM backup_repositories r
           LEFT JOIN backup_freshness f ON f.repository_id = r.id
          WHERE r.state = 'ready'
            AND (f.attempted_at IS NULL
                 OR f.attempted_at <= now() - make_interval(secs => $1))
          ORDER BY f.attempted_at ASC NULLS FIRST, r.name",
    )
    .bind(interval.as_secs_f64())
    .fetch_all(db)
    .await
}
