//! `--wait`: follows a job and shows its steps as they progress: a spinner with the running
//! step on a terminal, and one line per step change on stderr either way.
//!
//! It reads the job's event stream (`GET /v1/jobs/{id}/events` with `Accept:
//! text/event-stream`), which sends every transition as it happens. A stream that drops is
//! resumed with `Last-Event-ID`, so nothing is missed or shown twice. Against a server without
//! the stream (404, 406, or its JSON answer to that path) it long-polls
//! `GET /v1/jobs/{id}?wait=1s` instead (an answer comes at once when the job ends). Either way
//! the job's view at its end is what `--wait` returns.

use std::collections::BTreeMap;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use tokio::time::Instant;

use super::api::{Api, ClientError, Opened, read_failed};
use super::sse::{SseEvent, SseParser};

/// Reconnects in a row that may fail before `--wait` gives up (exit 4).
const MAX_RECONNECTS: u32 = 5;

/// Without a byte for this long (events or keep-alive comments, every 15 s by default) a stream
/// is taken as dropped and resumed.
const SILENCE: Duration = Duration::from_secs(75);

/// The first pause before reconnecting, doubled per failure in a row.
const RECONNECT_DELAY: Duration = Duration::from_millis(250);

/// The longest pause after streams that end without a new event (a proxy closing them early):
/// each such end in a row doubles the pause up to this, rather than asking 4 times a second.
const MAX_QUIET_RECONNECT_DELAY: Duration = Duration::from_secs(5);

/// The job view at its end; `JobFailed` when it ended failed or cancelled.
pub async fn follow(api: &Api, id: &str, timeout: Duration) -> Result<Value, ClientError> {
    let deadline = Instant::now() + timeout;
    let mut progress = Progress::new(id);
    let streamed =
        tokio::time::timeout_at(deadline, follow_stream(api, id, timeout, &mut progress)).await;
    let result = match streamed {
        // The stream showed the job's end (or there is none): its view, at once when it ended.
        Ok(Ok(())) => long_poll(api, id, deadline, timeout, &mut progress).await,
        Ok(Err(err)) => Err(err),
        Err(_) => {
            let view = api.get(&format!("/v1/jobs/{id}"), &[]).await?.body;
            Err(still_going(id, &view, timeout))
        }
    };
    progress.finish();
    result
}

/// Shows the job's events until the one that ends it; returns at once when the server has no
/// event stream.
async fn follow_stream(
    api: &Api,
    id: &str,
    timeout: Duration,
    progress: &mut Progress,
) -> Result<(), ClientError> {
    let path = format!("/v1/jobs/{id}/events");
    let mut parser = SseParser::default();
    let mut failures = 0;
    // Streams in a row that ended without a new event.
    let mut quiet_ends = 0;
    loop {
        let seen = parser.last_id().map(str::to_owned);
        // The request may stream for the whole wait; `follow` stops it at the deadline.
        let opened = api
            .open_event_stream(&path, parser.last_id(), timeout + SILENCE)
            .await;
        let read = match opened {
            Ok(Opened::Stream(response)) => read_stream(response, &mut parser, progress).await,
            Ok(Opened::NothingAfter | Opened::Unsupported) => return Ok(()),
            Err(err) => Err(err),
        };
        match read {
            Ok(true) => return Ok(()),
            // Ended early (the server stopped): resume after the last event.
            Ok(false) => {
                failures = 0;
                quiet_ends = match parser.last_id() == seen.as_deref() {
                    true => quiet_ends + 1,
                    false => 0,
                };
            }
            Err(ClientError::Unavailable(_)) if failures < MAX_RECONNECTS => failures += 1,
            Err(err) => return Err(err),
        }
        tokio::time::sleep(reconnect_delay(failures, quiet_ends)).await;
    }
}

/// The pause before reconnecting after `failures` failed attempts in a row, or `quiet_ends`
/// streams in a row that ended without a new event.
fn reconnect_delay(failures: u32, quiet_ends: u32) -> Duration {
    let after_failures = RECONNECT_DELAY * 2u32.pow(failures.min(MAX_RECONNECTS));
    let after_quiet_ends =
        (RECONNECT_DELAY * 2u32.pow(quiet_ends.min(8))).min(MAX_QUIET_RECONNECT_DELAY);
    after_failures.max(after_quiet_ends)
}

/// Shows the events of one response until it ends; true when the last one ended the job.
async fn read_stream(
    mut response: reqwest::Response,
    parser: &mut SseParser,
    progress: &mut Progress,
) -> Result<bool, ClientError> {
    let mut ended = false;
    loop {
        let chunk = tokio::time::timeout(SILENCE, response.chunk())
            .await
            .map_err(|_| ClientError::Unavailable("the event stream went silent".into()))?
            .map_err(|e| read_failed(&e))?;
        let Some(chunk) = chunk else {
            return Ok(ended);
        };
        for event in parser.feed(&chunk) {
            ended = progress.show_event(&event);
        }
    }
}

/// Long-polls the job's view until it ends or the deadline passes.
async fn long_poll(
    api: &Api,
    id: &str,
    deadline: Instant,
    timeout: Duration,
    progress: &mut Progress,
) -> Result<Value, ClientError> {
    loop {
        let view = api
            .get(&format!("/v1/jobs/{id}"), &[("wait", "1s".to_owned())])
            .await?
            .body;
        progress.show(&view);
        match view["state"].as_str() {
            Some("succeeded") => return Ok(view),
            Some(state @ ("failed" | "cancelled")) => {
                let error = view["last_error"].as_str().unwrap_or("no error recorded");
                return Err(ClientError::JobFailed(format!("job {id} {state}: {error}")));
            }
            _ if Instant::now() >= deadline => return Err(still_going(id, &view, timeout)),
            _ => {}
        }
    }
}

fn still_going(id: &str, view: &Value, timeout: Duration) -> ClientError {
    ClientError::WaitTimedOut(format!(
        "job {id} still {} after {}",
        view["state"].as_str().unwrap_or("unknown"),
        humantime::format_duration(timeout)
    ))
}

/// What was last shown per step, so each change is printed once.
struct Progress {
    bar: ProgressBar,
    seen: BTreeMap<String, String>,
    job_state: String,
}

impl Progress {
    fn new(id: &str) -> Progress {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        bar.set_message(format!("job {id}"));
        Progress {
            bar,
            seen: BTreeMap::new(),
            job_state: String::new(),
        }
    }

    /// The steps' changes first, then the job's, so "succeeded" comes last.
    fn show(&mut self, view: &Value) {
        for step in view["steps"].as_array().into_iter().flatten() {
            self.show_step(step);
        }
        self.show_job(view);
    }

    /// One event of the stream (its data has the fields of a view's step, or of the job);
    /// true when it is the job's end.
    fn show_event(&mut self, event: &SseEvent) -> bool {
        let Ok(data) = serde_json::from_str::<Value>(&event.data) else {
            return false;
        };
        match event.event.as_str() {
            "step" => self.show_step(&data),
            "job" => {
                self.show_job(&data);
                return matches!(
                    data["state"].as_str(),
                    Some("succeeded" | "failed" | "cancelled")
                );
            }
            _ => {}
        }
        false
    }

    fn show_job(&mut self, job: &Value) {
        let state = job["state"].as_str().unwrap_or("?");
        if state != self.job_state {
            self.job_state = state.to_owned();
            self.line(format!(
                "job {} {} ({}), attempt {}",
                job["id"].as_str().unwrap_or("?"),
                state,
                job["kind"].as_str().unwrap_or("?"),
                job["attempts"]
            ));
        }
    }

    fn show_step(&mut self, step: &Value) {
        let name = step["name"].as_str().unwrap_or("?").to_owned();
        let state = step["state"].as_str().unwrap_or("?");
        let summary = format!("{state}/{}", step["attempts"]);
        if self.seen.get(&name) == Some(&summary) {
            return;
        }
        self.seen.insert(name.clone(), summary);
        let mark = match state {
            "succeeded" => "✓",
            "failed" => "✗",
            _ => "…",
        };
        let mut line = format!("  {mark} {name} {state} (attempt {})", step["attempts"]);
        if let Some(ms) = step["duration_ms"].as_i64() {
            line.push_str(&format!(" {ms} ms"));
        }
        if let Some(error) = step["last_error"].as_str() {
            line.push_str(&format!(": {error}"));
        }
        self.line(line);
        if state == "running" {
            self.bar.set_message(format!("step {name}"));
        }
    }

    /// A line above the spinner on a terminal; a plain stderr line when the bar is hidden.
    fn line(&self, text: String) {
        if self.bar.is_hidden() {
            eprintln!("{text}");
        } else {
            self.bar.println(text);
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::routing::get;
    use serde_json::json;

    use super::*;

    const JOB: &str = "0b5c0c3e-0000-4000-8000-000000000001";

    #[test]
    fn streams_ending_without_an_event_are_asked_again_ever_more_slowly_up_to_5_s() {
        assert_eq!(reconnect_delay(0, 0), Duration::from_millis(250));
        assert_eq!(reconnect_delay(0, 1), Duration::from_millis(500));
        assert_eq!(reconnect_delay(0, 4), Duration::from_secs(4));
        assert_eq!(reconnect_delay(0, 5), Duration::from_secs(5));
        assert_eq!(reconnect_delay(0, 1000), Duration::from_secs(5));
        // Failures back off as before.
        assert_eq!(reconnect_delay(3, 0), Duration::from_secs(2));
    }

    fn view(state: &str) -> Value {
        json!({"id": JOB, "kind": "test", "state": state, "attempts": 1, "steps": []})
    }

    /// An API at a local address answering with `router`.
    async fn serve(router: Router) -> Api {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        Api::new(&format!("http://{addr}"), "token".into()).unwrap()
    }

    /// The first stream ends after two events without the job's end (a server going away); the
    /// client asks again after the last id it got and ends with the job.
    #[tokio::test]
    async fn a_dropped_stream_resumes_after_the_last_event() {
        let asked: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
        let record = asked.clone();
        let events = move |headers: HeaderMap| {
            let last = headers
                .get("last-event-id")
                .map(|v| v.to_str().unwrap().to_owned());
            record.lock().unwrap().push(last.clone());
            let body = match last {
                None => concat!(
                    "id: 1\nevent: job\ndata: {\"state\":\"running\"}\n\n",
                    ": keep-alive\n\n",
                    "id: 2\nevent: step\ndata: {\"name\":\"a\",\"state\":\"running\",\"attempts\":1}\n\n",
                ),
                Some(_) => concat!(
                    "id: 3\nevent: step\ndata: {\"name\":\"a\",\"state\":\"succeeded\",\"attempts\":1}\n\n",
                    "id: 4\nevent: job\ndata: {\"state\":\"succeeded\"}\n\n",
                ),
            };
            async move { ([(header::CONTENT_TYPE, "text/event-stream")], body) }
        };
        let router = Router::new()
            .route("/v1/jobs/{id}/events", get(events))
            .route(
                "/v1/jobs/{id}",
                get(|| async { axum::Json(view("succeeded")) }),
            );
        let done = follow(&serve(router).await, JOB, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(done["state"], "succeeded");
        assert_eq!(*asked.lock().unwrap(), [None, Some("2".to_owned())]);
    }

    /// A server without the stream (404 at its path) is followed with the long poll.
    #[tokio::test]
    async fn a_server_without_the_stream_is_long_polled() {
        let polls = Arc::new(Mutex::new(0));
        let count = polls.clone();
        let job = move || {
            let mut polls = count.lock().unwrap();
            *polls += 1;
            let state = if *polls < 3 { "running" } else { "failed" };
            async move { axum::Json(view(state)) }
        };
        let router = Router::new()
            .route(
                "/v1/jobs/{id}/events",
                get(|| async { (StatusCode::NOT_FOUND, "no such route") }),
            )
            .route("/v1/jobs/{id}", get(job));
        let ended = follow(&serve(router).await, JOB, Duration::from_secs(30)).await;
        assert!(matches!(ended, Err(ClientError::JobFailed(_))), "{ended:?}");
        assert_eq!(*polls.lock().unwrap(), 3);
    }
}
