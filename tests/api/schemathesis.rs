//! schemathesis fuzzes the running service against the committed `openapi/openapi.json`, once
//! with an operator's token and once with a viewer's: no 5xx, and every response conforms to the
//! document (status code, content type, headers, body schema).
//!
//! schemathesis is pinned in `scripts/requirements-fuzz.txt` and installed by `make test`
//! (`scripts/install-deps.sh`) into `~/.cache/backup-provisioner/venv-fuzz-<hash>`; the test
//! fails when that venv is missing. The seed is fixed, so a run repeats; a failure prints
//! schemathesis's report, which names each failing case with a `curl` line to reproduce it.
//! Workers are off: a POST only queues a job. The job kinds are registered against moto and the
//! real kube-apiserver, so a `?dry_run=true` answers a real plan (read calls only).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::support::app::TestApp;
use crate::support::env::Env;

/// The service with every job kind (for dry runs) and no worker.
async fn service() -> Env {
    Env::builder(&["fuzz"]).workers(0).start().await
}

/// The seed of every run (schemathesis prints it; change it here to explore other cases).
const SEED: &str = "20261201";
/// Test cases per operation and phase; both runs together stay well under 90 s on 2 cores.
const MAX_EXAMPLES: &str = "50";
/// A run that takes longer than this is stopped and fails.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_headers_conformance,response_schema_conformance";

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// `st` of the venv `scripts/install-deps.sh` made for the current requirements file: the same
/// key, the first 12 hex digits of the file's SHA-256.
fn schemathesis_bin() -> PathBuf {
    let requirements = std::fs::read(repo_path("scripts/requirements-fuzz.txt"))
        .expect("read scripts/requirements-fuzz.txt");
    let hash = format!("{:x}", Sha256::digest(&requirements));
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"));
    let bin = cache
        .join("backup-provisioner")
        .join(format!("venv-fuzz-{}", &hash[..12]))
        .join("bin")
        .join("st");
    assert!(
        bin.is_file(),
        "schemathesis is not installed at {}: run `make deps` (or `bash scripts/install-deps.sh`)",
        bin.display()
    );
    bin
}

/// Runs schemathesis against `app` with `token`; panics with its report unless it exits 0.
async fn fuzz(app: &TestApp, role: &str, token: &str) {
    let bin = schemathesis_bin();
    // Its example database and reports go to a directory of its own, not the clone.
    let workdir = tempfile::tempdir().expect("a temporary directory");
    let started = Instant::now();
    let child = tokio::process::Command::new(&bin)
        .current_dir(workdir.path())
        .env("NO_COLOR", "1")
        .args(["--no-color", "run"])
        .arg(repo_path("openapi/openapi.json"))
        .args(["--url", &app.url("")])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--checks", CHECKS])
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--seed", SEED])
        .args(["--workers", "1"])
        .args(["--generation-database", "none"])
        .args(["--request-timeout", "35"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
    let output = tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("schemathesis ({role}) ran longer than {RUN_TIMEOUT:?}"))
        .expect("schemathesis ran");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "schemathesis found problems with the {role} token ({}, {:.1} s):\n{report}",
        output.status,
        started.elapsed().as_secs_f64()
    );
    eprintln!(
        "schemathesis ({role}): passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_with_an_operator_token() {
    let env = service().await;
    let token = env.app.operator();
    fuzz(&env.app, "operator", &token).await;
    env.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_with_a_viewer_token() {
    let env = service().await;
    let token = env.app.viewer();
    fuzz(&env.app, "viewer", &token).await;
    env.app.stop().await;
}
