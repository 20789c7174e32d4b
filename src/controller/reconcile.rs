//! One reconcile of one PostgresCluster: ask the use case behind `POST /v1/backup-repositories`
//! for the repository its annotations describe (the same request the API makes; a repository
//! that exists as asked answers `Unchanged`: nothing is stored, queued or called), then report
//! the repository's state back on the object, once per change: the state and job annotations
//! and a Kubernetes Event. A repository on its way is followed by requeueing; a terminal one
//! waits for the object to change.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::Context;
use super::postgrescluster::{JOB_ANNOTATION, PostgresCluster, STATE_ANNOTATION};
use crate::audit::Actor;
use crate::provision::request::{self, RequestError, Requested};
use crate::repository::RepositoryRow;

/// Why a reconcile must be tried again (after [`error_policy`]'s delay).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
}

/// What the controller reports on a PostgresCluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The repository's state, or `invalid` / `conflict` when no repository was requested.
    pub state: String,
    pub job: Option<uuid::Uuid>,
    pub event: EventType,
    pub reason: &'static str,
    pub note: String,
}

impl Report {
    fn in_progress(&self) -> bool {
        ["pending", "provisioning", "deprovisioning", "busy"].contains(&self.state.as_str())
    }
}

pub async fn reconcile(
    cluster: Arc<PostgresCluster>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    if !cluster.asks_for_repository() || cluster.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let report = match cluster.desired(&ctx.settings.rules) {
        Err(errors) => invalid(&errors),
        Ok(desired) => {
            let actor = Actor {
                subject: &ctx.actor,
                request_id: None,
                client_request_id: None,
            };
            let max_attempts = ctx.settings.max_attempts;
            // Boxed: the use case's future is large, and a Controller polls reconciles deep down a
            // stack of stream adapters.
            let answer = Box::pin(request::request(&ctx.db, &desired, actor, max_attempts)).await;
            let report = from_answer(answer)?;
            if let Some(repository_id) = report.1 {
                super::retention::link(&ctx, &cluster, repository_id).await?;
            }
            report.0
        }
    };
    Box::pin(publish(&cluster, &ctx, &report)).await?;
    Ok(match report.in_progress() {
        true => Action::requeue(ctx.settings.follow_interval),
        false => Action::await_change(),
    })
}

/// After a failed reconcile: try again after the follow interval (the watch may also bring a
/// change sooner).
pub fn error_policy(
    cluster: Arc<PostgresCluster>,
    error: &ReconcileError,
    ctx: Arc<Context>,
) -> Action {
    tracing::warn!(
        postgrescluster = %cluster.name_any(),
        namespace = cluster.namespace().unwrap_or_default(),
        %error,
        "reconcile failed; retrying"
    );
    Action::requeue(ctx.settings.follow_interval.max(Duration::from_secs(1)))
}

fn invalid(errors: &[crate::domain::ValidationError]) -> Report {
    let reasons: Vec<String> = errors.iter().map(ToString::to_string).collect();
    Report {
        state: "invalid".into(),
        job: None,
        event: EventType::Warning,
        reason: "InvalidAnnotation",
        note: format!("no repository requested: {}", reasons.join("; ")),
    }
}

/// The report for the use case's answer, and the repository it is about (if any).
fn from_answer(
    answer: Result<Requested, RequestError>,
) -> Result<(Report, Option<uuid::Uuid>), ReconcileError> {
    let (repository, job) = match answer {
        Ok(Requested::Created(queued) | Requested::OptionsChanged(queued)) => {
            (queued.repository, Some(queued.job.id))
        }
        Ok(Requested::Unchanged {
            repository,
            latest_job,
        }) => (repository, latest_job.map(|job| job.id)),
        Err(RequestError::Database(e)) => return Err(e.into()),
        Err(RequestError::Busy(_) | RequestError::DeletedConcurrently) => {
            let report = Report {
                state: "busy".into(),
                job: None,
                event: EventType::Normal,
                reason: "RepositoryBusy",
                note: "the repository has a job running (e.g. being deprovisioned); following it"
                    .into(),
            };
            return Ok((report, None));
        }
        Err(refused) => {
            let report = Report {
                state: "conflict".into(),
                job: None,
                event: EventType::Warning,
                reason: "RepositoryConflict",
                note: format!("no repository requested: {refused}"),
            };
            return Ok((report, None));
        }
    };
    let id = repository.id;
    Ok((of_repository(repository, job), Some(id)))
}

fn of_repository(repository: RepositoryRow, job: Option<uuid::Uuid>) -> Report {
    let (event, reason, note) = match repository.state.as_str() {
        "ready" => (
            EventType::Normal,
            "RepositoryReady",
            format!(
                "backup repository {} is ready: bucket {} in {}, Secret {} in {}",
                repository.name,
                repository.bucket,
                repository.region,
                repository.bucket,
                repository.namespace
            ),
        ),
        "failed" | "cancelled" => (
            EventType::Warning,
            "RepositoryFailed",
            format!(
                "backup repository {} is {}: {}; fix the cause, then reconcile it \
                 (POST /v1/backup-repositories/{}/reconcile)",
                repository.name,
                repository.state,
                repository
                    .last_error
                    .as_deref()
                    .unwrap_or("no error recorded"),
                repository.name
            ),
        ),
        state => (
            EventType::Normal,
            "RepositoryRequested",
            format!("backup repository {} is {state}", repository.name),
        ),
    };
    Report {
        state: repository.state,
        job,
        event,
        reason,
        note,
    }
}

/// Writes the report on the cluster when it differs from what the cluster carries: an Event
/// when the state changed, and the annotations (server-side apply of metadata only, as the
/// controller's field manager; `status` is PGO's).
/// Kubernetes refuses an Event whose note is over 1 KiB, in bytes (not characters).
const EVENT_NOTE_MAX_BYTES: usize = 1024;

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn within_bytes(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let end = (0..=max)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    &text[..end]
}

async fn publish(
    cluster: &PostgresCluster,
    ctx: &Context,
    report: &Report,
) -> Result<(), ReconcileError> {
    let job_url = report.job.map(|id| ctx.job_url(id));
    let (state, job) = cluster.reported();
    if state == Some(report.state.as_str()) && job == job_url.as_deref() {
        return Ok(());
    }
    let mut annotations = serde_json::Map::new();
    annotations.insert(STATE_ANNOTATION.into(), report.state.clone().into());
    if let Some(url) = &job_url {
        annotations.insert(JOB_ANNOTATION.into(), url.clone().into());
    }
    let patch = json!({
        "apiVersion": PostgresCluster::api_version(&()),
        "kind": PostgresCluster::kind(&()),
        "metadata": {"name": cluster.name_any(), "annotations": annotations},
    });
    if state != Some(report.state.as_str()) {
        let note = match &job_url {
            Some(url) => format!("{} (job {url})", report.note),
            None => report.note.clone(),
        };
        let event = Event {
            type_: report.event,
            reason: report.reason.into(),
            note: Some(within_bytes(&note, EVENT_NOTE_MAX_BYTES).to_owned()),
            action: "RequestBackupRepository".into(),
            secondary: None,
        };
        ctx.recorder
            .publish(&event, &cluster.object_ref(&()))
            .await?;
    }
    // The Event first: should the patch fail, the next reconcile sees the old state and
    // reports again (a repeated Event joins the first's series) rather than never.
    let namespace = cluster.namespace().unwrap_or_default();
    let api: Api<PostgresCluster> = Api::namespaced(ctx.client.clone(), &namespace);
    let params = PatchParams::apply(&ctx.settings.field_manager()).force();
    api.patch(&cluster.name_any(), &params, &Patch::Apply(&patch))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_note_is_cut_to_1_kib_on_a_character_boundary() {
        assert_eq!(within_bytes("short", EVENT_NOTE_MAX_BYTES), "short");
        let ascii = "a".repeat(2000);
        assert_eq!(within_bytes(&ascii, EVENT_NOTE_MAX_BYTES).len(), 1024);
        // 1000 three-byte characters: 1000 characters would be 3000 bytes.
        let wide = "€".repeat(1000);
        let cut = within_bytes(&wide, EVENT_NOTE_MAX_BYTES);
        assert_eq!(cut.len(), 1023);
        assert_eq!(cut.chars().count(), 341);
        let mixed = format!("{}{}", "a".repeat(1023), "é");
        assert_eq!(within_bytes(&mixed, EVENT_NOTE_MAX_BYTES), "a".repeat(1023));
    }
}
