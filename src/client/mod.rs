//! `backup-provisioner client`: the admin CLI. Every subcommand is one call of the same HTTP
//! API curl uses (reqwest), printed as a table or as the API's JSON; `--wait` follows the job a
//! mutating call queued. It knows nothing of the server's code: its types are the API's JSON.
//!
//! Exit codes: 0 done; 1 a followed job failed or was cancelled; 2 bad usage; 3 the API
//! refused the request (4xx, printed as `error: <detail>` and one line per field error);
//! 4 the API is unavailable (no connection, timeout, 5xx); 5 `--wait` gave up before the job
//! ended.

mod api;
mod args;
mod commands;
mod sse;
mod table;
mod views;
mod wait;

pub use args::ClientArgs;

use api::{Api, ClientError};

/// The base URL when neither `--url`, `BP_API_URL` nor `API` is set.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// Runs one client command; returns the process exit code.
pub async fn run(args: ClientArgs) -> u8 {
    let api = match connect(&args) {
        Ok(api) => api,
        Err(err) => return report(err),
    };
    match commands::run(&api, &args).await {
        Ok(()) => 0,
        Err(err) => report(err),
    }
}

fn report(err: ClientError) -> u8 {
    eprintln!("{}", err.message());
    err.exit_code()
}

/// The API from flags or the environment: `--url`/`BP_API_URL`/`API`, `--token`/`BP_TOKEN`/`TOKEN`.
fn connect(args: &ClientArgs) -> Result<Api, ClientError> {
    let from_env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let url = args
        .url
        .clone()
        .filter(|u| !u.is_empty())
        .or_else(|| from_env("API"))
        .unwrap_or_else(|| DEFAULT_URL.to_owned());
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(ClientError::Usage(format!(
            "the API URL must start with http:// or https:// (got '{url}')"
        )));
    }
    let token = args
        .token
        .clone()
        .filter(|t| !t.is_empty())
        .or_else(|| from_env("TOKEN"))
        .ok_or_else(|| {
            ClientError::Usage(
                "no token: set --token, BP_TOKEN or TOKEN (backup-provisioner token mints one)"
                    .into(),
            )
        })?;
    Api::new(&url, token)
}
