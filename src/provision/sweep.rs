//! Cleans up what failed or cancelled provisioning jobs leave behind: sealed material the Secret
//! already holds, and IAM access keys nobody can use. Not a runbook section: a periodic task of
//! the worker process ([`Sweeper::run`], every `BP_SWEEP_INTERVAL`), run by one worker at a time
//! (a Postgres advisory lock elects it), every deletion audited.
//!
//! It looks only at repositories whose latest job ended more than `BP_SWEEP_GRACE` ago and that
//! have no queued or running job, and reads their Secret first (a failed read skips the
//! repository: an unreadable Secret never counts as an absent one):
//! - a sealed access key's secret is deleted when the Secret references that key, a sealed
//!   cipher pass when the Secret holds a cipher pass (`sweep.sealed-material`). Material the
//!   Secret does not hold is never deleted (that would lose a credential): it is kept and
//!   reported in the same audit entry, once per change of what is kept;
//! - an access key of the repository's IAM user is deleted when the Secret does not reference
//!   it and no sealed secret of it is held (`sweep.access-key`): nobody has its secret. When a
//!   Secret that was once written is gone, no key is deleted (copies synced from it may still
//!   use its key).

use std::time::Duration;

use secrecy::ExposeSecret;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::audit::{self, AuditEntry};
use crate::cloud::CloudError;
use crate::crypto::Keyring;
use crate::provision::access_key;
use crate::provision::rotate::retirements;
use crate::provision::sealed::{self, Kind};
use crate::provision::secret::{self, ExistingSecret};

/// The advisory lock whose holder sweeps ("bpsweep1").
pub const SWEEP_LOCK: i64 = 0x6270_7377_6565_7031;
/// Who the sweep's audit entries name.
const ACTOR: &str = "backup-provisioner";
const SEALED_ACTION: &str = "sweep.sealed-material";
const KEY_ACTION: &str = "sweep.access-key";

/// The sweep: Postgres, the IAM client and the Kubernetes client of the workers.
#[derive(Clone)]
pub struct Sweeper {
    pub db: PgPool,
    pub iam: aws_sdk_iam::Client,
    pub kube: kube::Client,
    /// Opens a sealed cipher pass, to compare it with the Secret's before deleting it.
    pub keys: Keyring,
    /// How long after a repository's latest job ended its leftovers are swept.
    pub grace: Duration,
}

/// What one sweep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub enum Swept {
    /// Another worker holds the sweep lock.
    #[default]
    Skipped,
    Done(SweepReport),
}

/// What one sweep did, by repository name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// `(repository, kind)` of sealed material deleted.
    pub sealed_deleted: Vec<(String, String)>,
    /// `(repository, kind)` of sealed material kept because the Secret does not hold it.
    pub sealed_kept: Vec<(String, String)>,
    /// `(repository, access key id)` of keys deleted.
    pub keys_deleted: Vec<(String, String)>,
    /// `(repository, error)` of repositories skipped after an error.
    pub failed: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Cloud(#[from] CloudError),
}

/// A repository whose jobs are settled.
#[derive(Debug, sqlx::FromRow)]
struct Settled {
    id: Uuid,
    name: String,
    namespace: String,
    bucket: String,
    latest_job: Uuid,
    /// The user step ran (the IAM user exists), and its keys may be ours: an adopted
    /// repository's keys were made by hand (adoption never makes one) and may be in use
    /// wherever its Secret, in whatever layout or name, was copied; they are never swept.
    has_user: bool,
    /// The Secret step succeeded once.
    secret_written: bool,
}

/// A sealed row as the sweep sees it (never its ciphertext's plaintext).
#[derive(Debug, sqlx::FromRow)]
struct SealedRow {
    kind: String,
    key_id: String,
    nonce: Vec<u8>,
}

/// Runs `round` at each tick of `ticks` until `shutdown` fires; a tick missed while a round
/// runs is delayed, not bunched. The loop of the periodic tasks (sweep, key schedule,
/// verification top-up).
pub async fn on_ticks<F, Fut>(
    mut ticks: tokio::time::Interval,
    shutdown: CancellationToken,
    mut round: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        round().await;
    }
}

/// Runs `round` at each tick of `ticks` until `shutdown` fires, hands what a round did to
/// `report` and logs a failed round as `failed`: the loop of the periodic tasks that take the
/// lock per round (sweep, freshness, verification top-up).
pub async fn report_rounds<R, E, F, Fut>(
    ticks: tokio::time::Interval,
    shutdown: CancellationToken,
    failed: &'static str,
    round: F,
    report: impl Fn(R),
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<R, E>>,
    E: std::fmt::Display,
{
    let (round, report) = (&round, &report);
    on_ticks(ticks, shutdown, move || async move {
        match round().await {
            Ok(done) => report(done),
            Err(e) => tracing::warn!(error = %e, "{failed}"),
        }
    })
    .await
}

/// One round of a periodic task: `work`, if this replica wins the advisory lock `lock`, its
/// result made into `R` by `done`; `R::default()` (skipped) while another replica holds it.
pub async fn round_under_lock<T, R, E, F, Fut>(
    db: &PgPool,
    lock: i64,
    work: F,
    done: impl FnOnce(T) -> R,
) -> Result<R, E>
where
    R: Default,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: From<sqlx::Error>,
{
    let won = crate::db::with_advisory_lock(db, lock, work).await?;
    Ok(won.map_or_else(R::default, done))
}

impl Sweeper {
    /// Sweeps every `interval` until `shutdown` fires.
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        let ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        let sweep = || self.sweep_once();
        report_rounds(
            ticks,
            shutdown,
            "sweep failed",
            sweep,
            |swept| match swept {
                Swept::Done(report) if report != SweepReport::default() => {
                    tracing::info!(?report, "sweep done");
                }
                _ => {}
            },
        )
        .await
    }

    /// One sweep, if this worker wins the sweep lock.
    pub async fn sweep_once(&self) -> Result<Swept, SweepError> {
        round_under_lock(&self.db, SWEEP_LOCK, || self.sweep_all(), Swept::Done).await
    }

    async fn sweep_all(&self) -> Result<SweepReport, SweepError> {
        let mut report = SweepReport::default();
        for repository in settled(&self.db, self.grace).await? {
            if let Err(e) = self.sweep_repository(&repository, &mut report).await {
                tracing::warn!(repository = %repository.name, error = %e, "sweep skipped a repository");
                report.failed.push((repository.name.clone(), e.to_string()));
            }
        }
        Ok(report)
    }

    async fn sweep_repository(
        &self,
        repository: &Settled,
        report: &mut SweepReport,
    ) -> Result<(), SweepError> {
        let existing = secret::read(&self.kube, &repository.namespace, &repository.bucket).await?;
        let rows: Vec<SealedRow> = sqlx::query_as(
            "SELECT kind, key_id, nonce FROM secret_material WHERE repository_id = $1 ORDER BY kind",
        )
        .bind(repository.id)
        .fetch_all(&self.db)
        .await?;
        let sealed_keys: Vec<String> = rows
            .iter()
            .filter(|r| r.kind == "access-key")
            .map(|r| r.key_id.clone())
            .collect();
        if !rows.is_empty() {
            self.sweep_sealed(repository, existing.as_ref(), &rows, report)
                .await?;
        }
        // A Secret once written and now gone may live on in synced copies: keep its keys.
        let keys_sweepable = existing.is_some() || !repository.secret_written;
        if repository.has_user && keys_sweepable {
            self.sweep_keys(repository, existing.as_ref(), &sealed_keys, report)
                .await?;
        }
        Ok(())
    }

    /// Deletes the sealed rows the Secret holds; reports the others.
    async fn sweep_sealed(
        &self,
        repository: &Settled,
        existing: Option<&ExistingSecret>,
        rows: &[SealedRow],
        report: &mut SweepReport,
    ) -> Result<(), SweepError> {
        let (mut deleted, mut kept) = (Vec::new(), Vec::new());
        for row in rows {
            let entry = json!({ "kind": row.kind, "key_id": row.key_id });
            let reason = match not_held_reason(existing, row) {
                None => self.cipher_pass_differs(repository, existing, row).await?,
                some => some,
            };
            let Some(reason) = reason else {
                if self.delete_sealed(repository, row).await? {
                    report
                        .sealed_deleted
                        .push((repository.name.clone(), row.kind.clone()));
                    deleted.push(entry);
                }
                continue;
            };
            report
                .sealed_kept
                .push((repository.name.clone(), row.kind.clone()));
            kept.push(json!({ "kind": row.kind, "key_id": row.key_id, "reason": reason }));
        }
        let outcome = if deleted.is_empty() {
            "kept"
        } else {
            "deleted"
        };
        let detail = json!({ "deleted": deleted, "kept": kept });
        if outcome == "kept" && self.last_sweep_detail(repository).await? == Some(detail.clone()) {
            return Ok(());
        }
        self.audit(repository, SEALED_ACTION, outcome, detail).await
    }

    /// For a sealed cipher pass: why it must be kept although the Secret holds a cipher pass
    /// (a different one: backups may be encrypted with the sealed one, the last copy of it).
    async fn cipher_pass_differs(
        &self,
        repository: &Settled,
        existing: Option<&ExistingSecret>,
        row: &SealedRow,
    ) -> Result<Option<&'static str>, SweepError> {
        if row.kind != "cipher-pass" {
            return Ok(None);
        }
        let in_secret = existing.and_then(|s| s.cipher_pass.as_ref());
        let sealed = sealed::get(&self.db, &self.keys, repository.id, Kind::CipherPass).await;
        Ok(match (sealed, in_secret) {
            (Ok(Some(held)), Some(pass)) if held.secret.expose_secret() == pass.expose_secret() => {
                None
            }
            (Ok(Some(_)), _) => Some("the Secret holds a different cipher pass"),
            (Ok(None), _) => Some("the sealed cipher pass is gone"),
            (Err(_), _) => Some("the sealed cipher pass opens with no configured encryption key"),
        })
    }

    /// Deletes the row as it was read, while the repository still has no active job.
    async fn delete_sealed(
        &self,
        repository: &Settled,
        row: &SealedRow,
    ) -> Result<bool, SweepError> {
        let done = sqlx::query(
            "DELETE FROM secret_material
              WHERE repository_id = $1 AND kind = $2 AND key_id = $3 AND nonce = $4
                AND NOT EXISTS (SELECT 1 FROM jobs WHERE subject_id = $1
                                   AND state IN ('queued', 'running'))",
        )
        .bind(repository.id)
        .bind(&row.kind)
        .bind(&row.key_id)
        .bind(&row.nonce)
        .execute(&self.db)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The detail of the latest sealed-material entry of the repository, to report kept
    /// material once per change instead of every sweep.
    async fn last_sweep_detail(&self, repository: &Settled) -> Result<Option<Value>, SweepError> {
        let detail = sqlx::query_scalar(
            "SELECT detail FROM audit_events WHERE repository = $1 AND action = $2
              ORDER BY id DESC LIMIT 1",
        )
        .bind(&repository.name)
        .bind(SEALED_ACTION)
        .fetch_optional(&self.db)
        .await?;
        Ok(detail)
    }

    /// Deletes the user's keys that the Secret does not reference and that we hold no sealed
    /// secret for.
    async fn sweep_keys(
        &self,
        repository: &Settled,
        existing: Option<&ExistingSecret>,
        sealed_keys: &[String],
        report: &mut SweepReport,
    ) -> Result<(), SweepError> {
        let user = repository.bucket.as_str();
        // The key the Secret names, even in an incomplete s3.conf: copies of the Secret in
        // workload clusters may still use it.
        let referenced = existing.and_then(|s| s.access_key_id.as_deref());
        let listed = access_key::list(&self.iam, user).await?;
        // The old key of a rotation in its grace period: its own schedule retires it.
        let in_grace = retirements::keys_in_grace(&self.db, repository.id).await?;
        let orphans = listed.iter().filter(|k| {
            Some(k.id.as_str()) != referenced
                && !sealed_keys.contains(&k.id)
                && !in_grace.contains(&k.id)
        });
        for key in orphans {
            if !self.still_settled(repository).await? {
                return Ok(());
            }
            access_key::delete(&self.iam, user, &key.id).await?;
            access_key::remove_description_tag(&self.iam, user, &key.id).await?;
            report
                .keys_deleted
                .push((repository.name.clone(), key.id.clone()));
            let detail = json!({
                "user_name": user,
                "access_key_id": key.id,
                "reason": "not referenced by the Secret and no sealed secret is held for it",
            });
            self.audit(repository, KEY_ACTION, "deleted", detail)
                .await?;
        }
        Ok(())
    }

    /// No job started for the repository since the sweep looked at it.
    async fn still_settled(&self, repository: &Settled) -> Result<bool, SweepError> {
        let latest: Option<(Uuid, String)> = sqlx::query_as(
            "SELECT id, state FROM jobs WHERE subject_id = $1 ORDER BY created_at DESC LIMIT 1",
        )
        .bind(repository.id)
        .fetch_optional(&self.db)
        .await?;
        Ok(latest.is_some_and(|(id, state)| {
            id == repository.latest_job && !matches!(state.as_str(), "queued" | "running")
        }))
    }

    async fn audit(
        &self,
        repository: &Settled,
        action: &str,
        outcome: &str,
        detail: Value,
    ) -> Result<(), SweepError> {
        let entry = AuditEntry {
            actor: ACTOR.to_owned(),
            subject: Some(repository.name.clone()),
            job_id: Some(repository.latest_job),
            action: action.to_owned(),
            outcome: outcome.to_owned(),
            detail,
            ..Default::default()
        };
        audit::record(&self.db, &entry).await?;
        Ok(())
    }
}

/// Why the Secret does not hold a sealed row's material; `None` when it does.
fn not_held_reason(existing: Option<&ExistingSecret>, row: &SealedRow) -> Option<&'static str> {
    let Some(existing) = existing else {
        return Some("the Secret does not exist");
    };
    match row.kind.as_str() {
        "access-key" => match existing.conf.as_ref() {
            Some(conf) if conf.access_key_id == row.key_id => None,
            Some(_) => Some("the Secret references another access key"),
            None => Some("the Secret holds no complete s3.conf"),
        },
        "cipher-pass" if existing.cipher_pass.is_some() => None,
        "cipher-pass" => Some("the Secret holds no cipher pass"),
        _ => Some("unknown kind of material"),
    }
}

/// Repositories whose latest job ended more than `grace` ago and that have no active job. A
/// deleted repository is never swept: deprovisioning removed what it had, and its user, bucket
/// and Secret names may belong to a new repository of the same name (whose sealed keys this
/// sweep would not know, and whose keys it would delete).
async fn settled(db: &PgPool, grace: Duration) -> Result<Vec<Settled>, sqlx::Error> {
    sqlx::query_as(
        "SELECT r.id, r.name, r.namespace, r.bucket, j.id AS latest_job,
                r.resources ? 'user' AND NOT coalesce((r.options ->> 'adopt')::boolean, false)
                    AS has_user,
                r.resources ? 'secret' AS secret_written
           FROM backup_repositories r
           JOIN LATERAL (SELECT id, state, finished_at FROM jobs WHERE subject_id = r.id
                          ORDER BY created_at DESC LIMIT 1) j ON true
          WHERE j.state IN ('succeeded', 'failed', 'cancelled')
            AND r.state <> 'deleted'
            AND j.finished_at < now() - make_interval(secs => $1)
            AND NOT EXISTS (SELECT 1 FROM jobs a WHERE a.subject_id = r.id
                               AND a.state IN ('queued', 'running'))
          ORDER BY r.name",
    )
    .bind(grace.as_secs_f64())
    .fetch_all(db)
    .await
}
