//! The HTTP calls the client makes: the same API, paths and JSON bodies curl uses, with the
//! answer classified into the client's exit codes.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

/// Why the client stopped; each maps to a documented exit code.
#[derive(Debug)]
pub enum ClientError {
    /// A followed job ended failed or cancelled (exit 1).
    JobFailed(String),
    /// Bad arguments or settings the client caught itself (exit 2).
    Usage(String),
    /// The API refused the request: a 4xx problem (exit 3).
    Refused { status: StatusCode, problem: Value },
    /// The API could not be reached, timed out or answered 5xx (exit 4).
    Unavailable(String),
    /// `--wait` gave up while the job was still going (exit 5).
    WaitTimedOut(String),
}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::JobFailed(_) => 1,
            ClientError::Usage(_) => 2,
            ClientError::Refused { .. } => 3,
            ClientError::Unavailable(_) => 4,
            ClientError::WaitTimedOut(_) => 5,
        }
    }

    /// `error: <detail>`, then one line per field error of a problem.
    pub fn message(&self) -> String {
        match self {
            ClientError::Refused { status, problem } => problem_message(*status, problem),
            ClientError::JobFailed(m)
            | ClientError::Usage(m)
            | ClientError::Unavailable(m)
            | ClientError::WaitTimedOut(m) => format!("error: {m}"),
        }
    }
}

fn problem_message(status: StatusCode, problem: &Value) -> String {
    let detail = problem["detail"]
        .as_str()
        .or_else(|| problem["title"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| format!("HTTP {status}"));
    let mut message = format!("error: {detail}");
    let errors = problem["errors"].as_array().cloned().unwrap_or_default();
    // The detail names every field error; one per line only helps when there are several.
    if errors.len() < 2 {
        return message;
    }
    for error in &errors {
        let field = error["field"].as_str().unwrap_or("?");
        let text = error["message"].as_str().unwrap_or("");
        message.push_str(&format!("\n  {field}: {text}"));
    }
    message
}

/// An answer the API gave with a 2xx status.
#[derive(Debug)]
pub struct Answer {
    pub body: Value,
}

/// The API at one base URL with one token.
pub struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(base: &str, token: String) -> Result<Api, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Above the longest long poll (30 s) the client asks for.
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ClientError::Usage(format!("cannot build the HTTP client: {e}")))?;
        Ok(Api {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http,
        })
    }

    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Answer, ClientError> {
        self.send(Method::GET, path, query, None, &[]).await
    }

    /// Sends one request; `body` as JSON when given, `headers` added as they are.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        headers: &[(&str, String)],
    ) -> Result<Answer, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut request = self
            .http
            .request(method, &url)
            .bearer_auth(&self.token)
            .query(query);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| unreachable(&self.base, &e))?;
        classify(response).await
    }
}

/// What a request for a job's event stream got.
pub enum Opened {
    /// The stream, to read chunk by chunk.
    Stream(reqwest::Response),
    /// 204: the job ended and the stream has nothing after the last event id sent.
    NothingAfter,
    /// No stream here: a server without it (404, 406, or its JSON answer to the same path).
    Unsupported,
}

impl Api {
    /// `GET path` asking for `text/event-stream`, resuming after `last_event_id`; the answer
    /// may take up to `timeout` to be read to its end.
    pub async fn open_event_stream(
        &self,
        path: &str,
        last_event_id: Option<&str>,
        timeout: Duration,
    ) -> Result<Opened, ClientError> {
        let mut request = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .timeout(timeout);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request
            .send()
            .await
            .map_err(|e| unreachable(&self.base, &e))?;
        let status = response.status();
        let is_stream = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        match status {
            StatusCode::NO_CONTENT => Ok(Opened::NothingAfter),
            _ if status.is_success() && is_stream => Ok(Opened::Stream(response)),
            StatusCode::NOT_FOUND | StatusCode::NOT_ACCEPTABLE => Ok(Opened::Unsupported),
            _ if status.is_success() => Ok(Opened::Unsupported),
            _ => classify(response).await.map(|_| Opened::Unsupported),
        }
    }
}

/// The cause of a failed read of a streamed answer, as [`ClientError::Unavailable`].
pub fn read_failed(err: &reqwest::Error) -> ClientError {
    ClientError::Unavailable(format!("reading the event stream: {err}"))
}

async fn classify(response: reqwest::Response) -> Result<Answer, ClientError> {
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| ClientError::Unavailable(format!("reading the answer: {e}")))?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if status.is_success() {
        return Ok(Answer { body });
    }
    if status.is_client_error() {
        return Err(ClientError::Refused {
            status,
            problem: body,
        });
    }
    let detail = body["detail"].as_str().map(str::to_owned);
    Err(ClientError::Unavailable(
        detail.unwrap_or_else(|| format!("HTTP {status}")),
    ))
}

/// A request that got no answer, named by its innermost cause (reqwest's own message hides it:
/// "error sending request").
fn unreachable(base: &str, err: &reqwest::Error) -> ClientError {
    let mut cause: &dyn std::error::Error = err;
    while let Some(source) = cause.source() {
        cause = source;
    }
    let what = if err.is_timeout() {
        "timed out".to_owned()
    } else {
        cause.to_string()
    };
    ClientError::Unavailable(format!("cannot reach {base}: {what}"))
}
