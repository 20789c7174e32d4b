//! `GET /v1/jobs/{id}/events` with `Accept: text/event-stream`: the job's transitions and its
//! steps' as Server-Sent Events, live, for portal buttons and the CLI's `--wait`.
//!
//! - Each event is a row of `job_events` (written by triggers on `jobs` and `job_steps` in the
//!   transaction that makes the transition): `event: step` or `event: job`, `id:` the row's id,
//!   `data:` JSON (a step: the fields of a job view's step; a job: id, kind, state, attempts,
//!   last_error, times).
//! - Resumable: with `Last-Event-ID` the stream first sends what came after that id, from the
//!   database, then goes live. Within a job the ids grow in commit order (see the migration
//!   `20261203000030_job_events`), so "after id N" misses nothing and repeats nothing.
//! - Live: the stream subscribes to the LISTEN/NOTIFY fan-out before it reads, and re-reads on
//!   each notification of its job (and every few seconds, in case one was lost); it only ever
//!   asks for ids above the last it sent, which is the de-duplication.
//! - A keep-alive comment is sent whenever nothing was sent for `BP_EVENT_STREAM_KEEP_ALIVE`.
//! - The stream ends after the event that ends the job (`succeeded`, `failed`, `cancelled`)
//!   once nothing follows it, and when the server stops. A reconnect that has seen that final
//!   event is answered 204, which tells a browser's `EventSource` to stop reconnecting.
//!
//! Without `text/event-stream` in `Accept`, the route keeps answering the job's audit events as
//! JSON (`jobs::job_events`): a plain GET must not hang open.

use std::convert::Infallible;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt, stream};
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{ApiError, AppState, hardening};
use crate::jobs::queue;
use crate::jobs::state_changes::{RecordedEvent, events_after};

pub const EVENT_STREAM: &str = "text/event-stream";

pub const LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");

/// Events read per query: a long backlog goes out in batches of this many.
const BATCH: i64 = 200;

/// How often a stream re-reads even without a notification (one may be lost while the
/// listener reconnects).
const REREAD_EVERY: Duration = Duration::from_secs(5);

/// Whether the request's `Accept` names `text/event-stream` (with a q above 0).
pub fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(accepts_event_stream)
}

fn accepts_event_stream(range: &str) -> bool {
    let mut parts = range.split(';').map(str::trim);
    let media = parts.next().unwrap_or_default();
    let refused = parts.any(|param| {
        param
            .strip_prefix("q=")
            .and_then(|q| q.trim().parse::<f32>().ok())
            == Some(0.0)
    });
    media.eq_ignore_ascii_case(EVENT_STREAM) && !refused
}

/// The id after which the stream starts: `Last-Event-ID`, 0 when absent or empty.
fn last_event_id(headers: &HeaderMap) -> Result<i64, ApiError> {
    let Some(value) = headers.get(LAST_EVENT_ID) else {
        return Ok(0);
    };
    let text = String::from_utf8_lossy(value.as_bytes());
    let text = text.trim();
    if text.is_empty() {
        return Ok(0);
    }
    text.parse::<i64>()
        .ok()
        .filter(|id| *id >= 0)
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "Last-Event-ID must be the id of an event this stream sent, a number (got '{}')",
                hardening::loggable(text, 64)
            ))
        })
}

/// The event stream of job `job`, or 204 when the client has already seen the event that
/// ended it, or 404.
pub async fn respond(
    state: &AppState,
    job: Uuid,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let after = last_event_id(headers)?;
    // Subscribed before anything is read: a change committed from here on wakes the stream.
    let follower = Follower {
        db: state.db.clone(),
        job,
        last: after,
        ended: false,
        changes: state.job_state_changes.subscribe_events(),
        stop: state.job_state_changes.stopping(),
    };
    if queue::get(&state.db, job).await?.is_none() {
        return Err(ApiError::NotFound(format!("no job {job}")));
    }
    if already_seen_end(&state.db, job, after).await? {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let keep_alive = KeepAlive::new()
        .interval(state.policy.event_stream_keep_alive)
        .text("keep-alive");
    let mut response = Sse::new(follower.into_stream())
        .keep_alive(keep_alive)
        .into_response();
    // nginx (an ingress) would buffer the stream and deliver it in lumps without this.
    response.headers_mut().insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    Ok(response)
}

/// Whether the job's newest event ended it and the client has it (its id is at most `after`).
async fn already_seen_end(db: &PgPool, job: Uuid, after: i64) -> Result<bool, ApiError> {
    if after == 0 {
        return Ok(false);
    }
    let newest = crate::jobs::state_changes::newest_event(db, job).await?;
    Ok(newest.is_some_and(|event| event.id <= after && event.ends_job()))
}

/// Follows one job's events from `last` on.
struct Follower {
    db: PgPool,
    job: Uuid,
    /// The id of the last event sent (or the client's `Last-Event-ID`).
    last: i64,
    /// The last event sent ended the job.
    ended: bool,
    changes: broadcast::Receiver<Uuid>,
    stop: CancellationToken,
}

impl Follower {
    fn into_stream(self) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
        stream::unfold(self, |mut follower| async move {
            let batch = follower.next_batch().await?;
            Some((stream::iter(batch.into_iter().map(Ok)), follower))
        })
        .flatten()
    }

    /// The next events, waiting for some; None once the job ended (after its final event), the
    /// server stops, or the database cannot be read (the client reconnects with its last id).
    async fn next_batch(&mut self) -> Option<Vec<Event>> {
        loop {
            let batch = match events_after(&self.db, self.job, self.last, BATCH).await {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(error = %e, job = %self.job, "event stream cannot read; ending it");
                    return None;
                }
            };
            if let Some(newest) = batch.last() {
                self.last = newest.id;
                self.ended = newest.ends_job();
                return Some(batch.iter().map(sse_event).collect());
            }
            if self.ended || !self.wait().await {
                return None;
            }
        }
    }

    /// Waits for a notification about this job (or a lag, or [`REREAD_EVERY`]); false when the
    /// server stops.
    async fn wait(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + REREAD_EVERY;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return false,
                _ = tokio::time::sleep_until(deadline) => return true,
                note = self.changes.recv() => match note {
                    Ok(id) if id != self.job => continue,
                    Err(RecvError::Closed) => return false,
                    Ok(_) | Err(RecvError::Lagged(_)) => return true,
                },
            }
        }
    }
}

/// `data:` of a `step` event: the fields of a job view's step.
#[derive(Debug, Serialize)]
struct StepEventData<'a> {
    job_id: Uuid,
    name: &'a str,
    position: i32,
    state: &'a str,
    attempts: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    started_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finished_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<&'a str>,
    at: DateTime<Utc>,
}

/// `data:` of a `job` event.
#[derive(Debug, Serialize)]
struct JobEventData<'a> {
    id: Uuid,
    kind: &'a str,
    state: &'a str,
    attempts: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    started_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finished_at: Option<DateTime<Utc>>,
    at: DateTime<Utc>,
}

fn sse_event(row: &RecordedEvent) -> Event {
    let event = Event::default().id(row.id.to_string());
    let data = match &row.step {
        Some(name) => event.event("step").json_data(StepEventData {
            job_id: row.job_id,
            name,
            position: row.position.unwrap_or_default(),
            state: &row.state,
            attempts: row.attempts,
            started_at: row.started_at,
            finished_at: row.finished_at,
            duration_ms: row
                .started_at
                .zip(row.finished_at)
                .map(|(start, end)| (end - start).num_milliseconds()),
            last_error: row.last_error.as_deref(),
            at: row.at,
        }),
        None => event.event("job").json_data(JobEventData {
            id: row.job_id,
            kind: &row.job_kind,
            state: &row.state,
            attempts: row.attempts,
            last_error: row.last_error.as_deref(),
            started_at: row.started_at,
            finished_at: row.finished_at,
            at: row.at,
        }),
    };
    // Serializing these plain structs cannot fail; an event without data is still an event.
    data.unwrap_or_else(|_| Event::default().id(row.id.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(name: HeaderName, value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(name, value.parse().unwrap());
        headers
    }

    #[test]
    fn only_an_accept_naming_event_streams_asks_for_one() {
        for accept in [
            "text/event-stream",
            "application/json, text/event-stream",
            "Text/Event-Stream; q=0.5",
        ] {
            assert!(
                wants_event_stream(&with(header::ACCEPT, accept)),
                "{accept}"
            );
        }
        for accept in ["*/*", "application/json", "text/*", "text/event-stream;q=0"] {
            assert!(
                !wants_event_stream(&with(header::ACCEPT, accept)),
                "{accept}"
            );
        }
        assert!(!wants_event_stream(&HeaderMap::new()));
    }

    #[test]
    fn last_event_id_is_a_number_or_nothing() {
        assert_eq!(last_event_id(&HeaderMap::new()).unwrap(), 0);
        assert_eq!(last_event_id(&with(LAST_EVENT_ID, "")).unwrap(), 0);
        assert_eq!(last_event_id(&with(LAST_EVENT_ID, " 42 ")).unwrap(), 42);
        for bad in ["-1", "abc", "1.5", "99999999999999999999"] {
            assert!(last_event_id(&with(LAST_EVENT_ID, bad)).is_err(), "{bad}");
        }
    }
}
