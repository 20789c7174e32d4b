//! `--wait`: follows a job with `GET /v1/jobs/{id}?wait=1s` (a long poll that answers at once
//! when the job ends) and shows its steps as they progress: a spinner with the running step on
//! a terminal, and one line per step change on stderr either way.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use super::api::{Api, ClientError};

/// The job view at its end; `JobFailed` when it ended failed or cancelled.
pub async fn follow(api: &Api, id: &str, timeout: Duration) -> Result<Value, ClientError> {
    let deadline = Instant::now() + timeout;
    let mut progress = Progress::new(id);
    loop {
        let view = api
            .get(&format!("/v1/jobs/{id}"), &[("wait", "1s".to_owned())])
            .await?
            .body;
        progress.show(&view);
        match view["state"].as_str() {
            Some("succeeded") => {
                progress.finish();
                return Ok(view);
            }
            Some(state @ ("failed" | "cancelled")) => {
                progress.finish();
                let error = view["last_error"].as_str().unwrap_or("no error recorded");
                return Err(ClientError::JobFailed(format!("job {id} {state}: {error}")));
            }
            _ if Instant::now() >= deadline => {
                progress.finish();
                return Err(ClientError::WaitTimedOut(format!(
                    "job {id} still {} after {}",
                    view["state"].as_str().unwrap_or("unknown"),
                    humantime::format_duration(timeout)
                )));
            }
            _ => {}
        }
    }
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
        let state = view["state"].as_str().unwrap_or("?");
        if state != self.job_state {
            self.job_state = state.to_owned();
            self.line(format!(
                "job {} {} ({}), attempt {}",
                view["id"].as_str().unwrap_or("?"),
                state,
                view["kind"].as_str().unwrap_or("?"),
                view["attempts"]
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
