//! Secret hygiene: the real `backup-provisioner serve` binary provisions a repository against
//! moto and the real kube-apiserver (from a kubeconfig with the CA and the ServiceAccount's
//! token, as deployed) with debug logging; afterwards neither its log output, nor
//! any API response, nor any Postgres row holds the secret access key or the cipher pass.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use backup_provisioner::auth::{Role, mint_hs256};
use backup_provisioner::crypto::EncryptionKey;
use base64::Engine as _;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::support::app::{AUDIENCE, HS256_SECRET, TestDb, free_port, fresh_database};
use crate::support::env::{bucket_for, conf_value, unique_name};
use crate::support::kube_env::KubeEnv;
use crate::support::moto::{Moto, TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY};

const NAMESPACE: &str = "zitadel";
const START_DEADLINE: Duration = Duration::from_secs(30);
const JOB_DEADLINE: Duration = Duration::from_secs(90);
const STOP_DEADLINE: Duration = Duration::from_secs(20);

/// The service binary as a child process; SIGKILLed if dropped while still running.
struct Service {
    child: Child,
    base_url: String,
    log_path: PathBuf,
}

impl Service {
    fn spawn(dir: &Path, database_url: &str, kubeconfig: &Path, json_logs: bool) -> Service {
        let mut last_error = String::new();
        for attempt in 0..3 {
            let port = free_port();
            let log_path = dir.join(format!("service-{attempt}.log"));
            let log = std::fs::File::create(&log_path).expect("log file");
            let mut command = Command::new(env!("CARGO_BIN_EXE_backup-provisioner"));
            command
                .args(["serve", "--workers", "2"])
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .env("HOME", dir)
                .env("DATABASE_URL", database_url)
                .env("BP_LISTEN_ADDR", format!("127.0.0.1:{port}"))
                .env("BP_JWT_HS256_SECRET", HS256_SECRET)
                .env("BP_ENCRYPTION_KEY", EncryptionKey::generate_base64())
                .env("BP_POLL_INTERVAL", "200ms")
                .env("BP_RETRY_BASE", "100ms")
                .env("BP_SHUTDOWN_GRACE", "5s")
                .env("AWS_ENDPOINT_URL", &Moto::shared().endpoint)
                .env("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY_ID)
                .env("AWS_SECRET_ACCESS_KEY", TEST_SECRET_ACCESS_KEY)
                .env("AWS_REGION", "us-east-1")
                .env("AWS_EC2_METADATA_DISABLED", "true")
                .env("KUBECONFIG", kubeconfig)
                .env("RUST_LOG", "debug")
                .env("BP_LOG_JSON", if json_logs { "true" } else { "false" })
                .envs(std::env::vars_os().filter(|(k, _)| k.to_string_lossy().starts_with("PG")))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log file"))
                .stderr(log);
            {
                use std::os::unix::process::CommandExt;
                // SAFETY: only async-signal-safe calls (prctl) between fork and exec.
                unsafe {
                    command.pre_exec(|| {
                        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
                            .map_err(std::io::Error::from)
                    });
                }
            }
            let child = command.spawn().expect("spawn backup-provisioner");
            let mut service = Service {
                child,
                base_url: format!("http://127.0.0.1:{port}"),
                log_path,
            };
            match service.wait_healthy() {
                Ok(()) => return service,
                Err(e) => {
                    last_error = format!("{e}\n--- log ---\n{}", service.log());
                    // The port may have been taken in between: try another one.
                }
            }
        }
        panic!("backup-provisioner did not become healthy: {last_error}");
    }

    /// Polls `GET /healthz` until 200, the child exits, or the deadline passes.
    fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_DEADLINE;
        let addr = self.base_url.trim_start_matches("http://").to_owned();
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("exited early with {status}"));
            }
            if http_ok(&addr, "/healthz") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err("no answer on /healthz before the deadline".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// SIGTERM, then waits for the exit (polling) until `deadline`.
    fn terminate(&mut self, deadline: Duration) -> Option<(ExitStatus, Duration)> {
        let started = Instant::now();
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some((status, started.elapsed()));
            }
            if started.elapsed() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One `GET` over a plain TCP socket (the child is polled from sync code); true on a 200.
fn http_ok(addr: &str, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(addr) = addr.parse::<std::net::SocketAddr>() else {
        return false;
    };
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

/// Every API response body fetched, with what was asked.
#[derive(Default)]
struct Collected {
    responses: Vec<(String, String)>,
}

impl Collected {
    async fn call(&mut self, request: reqwest::RequestBuilder, what: String) -> (u16, Value) {
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let status = response.status().as_u16();
        let headers = format!("{:?}", response.headers());
        let body = response
            .text()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        self.responses
            .push((format!("{what} -> {status}"), format!("{headers}\n{body}")));
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    fn all_text(&self) -> String {
        self.responses
            .iter()
            .map(|(what, body)| format!("### {what}\n{body}\n"))
            .collect()
    }
}

/// `SELECT row_to_json(t)::text` of every table in the public schema.
async fn dump_tables(db: &PgPool) -> (Vec<String>, String) {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename",
    )
    .fetch_all(db)
    .await
    .expect("list tables");
    let mut dump = String::new();
    for table in &tables {
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT row_to_json(t)::text FROM \"{table}\" t"
        )))
        .fetch_all(db)
        .await
        .unwrap_or_else(|e| panic!("dump {table}: {e}"));
        dump.push_str(&format!("### {table} ({} rows)\n", rows.len()));
        for row in rows {
            dump.push_str(&row);
            dump.push('\n');
        }
    }
    (tables, dump)
}

fn percent_encoded(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The forms a secret could leak in: as is, base64 (standard and URL-safe), percent-encoded.
fn leak_forms(label: &str, secret: &str) -> Vec<(String, String)> {
    let standard = base64::engine::general_purpose::STANDARD.encode(secret);
    let url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
    let mut forms = vec![
        (format!("{label} (clear)"), secret.to_owned()),
        (
            format!("{label} (base64)"),
            standard.trim_end_matches('=').to_owned(),
        ),
        (format!("{label} (base64url)"), url_safe),
    ];
    let encoded = percent_encoded(secret);
    if encoded != secret {
        forms.push((format!("{label} (percent-encoded)"), encoded));
    }
    forms
}

/// The first leak of any form in `text`: its label and some context, with every form masked.
fn find_leak(text: &str, forms: &[(String, String)]) -> Option<String> {
    let (label, at) = forms
        .iter()
        .filter_map(|(label, needle)| text.find(needle.as_str()).map(|at| (label, at)))
        .min_by_key(|(_, at)| *at)?;
    let floor = |mut i: usize| {
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let start = floor(at.saturating_sub(200));
    let start = text[start..at].rfind('\n').map_or(start, |i| start + i + 1);
    let mut context = text[start..floor((at + 200).min(text.len()))].to_owned();
    for (_, needle) in forms {
        context = context.replace(needle.as_str(), "<LEAKED>");
    }
    Some(format!("{label}: ...{context}..."))
}

fn assert_clean(source: &str, text: &str, forms: &[(String, String)]) {
    if let Some(leak) = find_leak(text, forms) {
        panic!("found in {source}: {leak}");
    }
}

async fn provision_and_check(json_logs: bool) {
    let started = Instant::now();
    backup_provisioner::install_crypto_provider();
    let TestDb {
        pool: db,
        url: database_url,
        guard: _guard,
    } = fresh_database().await;
    let kube = KubeEnv::start(&[NAMESPACE]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, kube.service_kubeconfig(NAMESPACE)).expect("kubeconfig");
    let mut service = Service::spawn(dir.path(), &database_url, &kubeconfig, json_logs);
    let startup = started.elapsed();

    let operator = mint_hs256(
        &SecretString::from(HS256_SECRET),
        "operator@test",
        &[Role::Operator],
        Duration::from_secs(600),
        AUDIENCE,
    )
    .expect("token");
    let client = reqwest::Client::new();
    let base = service.base_url.clone();
    let mut collected = Collected::default();
    let name = unique_name("hyg");
    let bucket = bucket_for(&name);

    let (status, created) = collected
        .call(
            client
                .post(format!("{base}/v1/backup-repositories"))
                .bearer_auth(&operator)
                .json(&json!({"name": name, "namespace": kube.ns(NAMESPACE)})),
            "POST /v1/backup-repositories".into(),
        )
        .await;
    assert_eq!(status, 202, "{created:#}");
    let job_id = created["job"]["id"].as_str().expect("job id").to_owned();

    let until = Instant::now() + JOB_DEADLINE;
    let job = loop {
        let (status, job) = collected
            .call(
                client
                    .get(format!("{base}/v1/jobs/{job_id}?wait=5s"))
                    .bearer_auth(&operator),
                format!("GET /v1/jobs/{job_id}"),
            )
            .await;
        assert_eq!(status, 200, "{job:#}");
        let state = job["state"].as_str().unwrap_or_default();
        if ["succeeded", "failed", "cancelled"].contains(&state) {
            break job;
        }
        assert!(
            Instant::now() < until,
            "job did not end: {job:#}\n{}",
            service.log()
        );
    };
    assert_eq!(
        job["state"],
        "succeeded",
        "job: {job:#}\n--- log ---\n{}",
        service.log()
    );
    let provisioned = started.elapsed();

    for (path, what) in [
        (format!("/v1/jobs/{job_id}/events?limit=200"), "job events"),
        (format!("/v1/backup-repositories/{name}"), "repository"),
        ("/v1/backup-repositories".to_owned(), "list"),
        ("/v1/audit?limit=200".to_owned(), "audit"),
        ("/metrics".to_owned(), "metrics"),
    ] {
        let (status, body) = collected
            .call(
                client.get(format!("{base}{path}")).bearer_auth(&operator),
                format!("GET {path} ({what})"),
            )
            .await;
        assert_eq!(status, 200, "{what}: {body:#}");
        if what == "repository" {
            assert_eq!(body["state"], "ready", "{body:#}");
        }
    }
    // A reconcile of the ready repository, so the re-run path is covered too.
    let (status, reconcile) = collected
        .call(
            client
                .post(format!("{base}/v1/backup-repositories/{name}/reconcile"))
                .bearer_auth(&operator)
                .json(&json!({})),
            "POST reconcile".into(),
        )
        .await;
    assert_eq!(status, 202, "{reconcile:#}");
    let rerun_id = reconcile["job"]["id"].as_str().expect("job id").to_owned();
    let until = Instant::now() + JOB_DEADLINE;
    loop {
        let (_, job) = collected
            .call(
                client
                    .get(format!("{base}/v1/jobs/{rerun_id}?wait=5s"))
                    .bearer_auth(&operator),
                format!("GET /v1/jobs/{rerun_id}"),
            )
            .await;
        if job["state"] == "succeeded" {
            break;
        }
        assert!(
            job["state"] != "failed" && Instant::now() < until,
            "re-run: {job:#}"
        );
    }
    let (_, _) = collected
        .call(
            client
                .get(format!("{base}/v1/jobs/{rerun_id}/events?limit=200"))
                .bearer_auth(&operator),
            "GET re-run events".into(),
        )
        .await;

    let conf = String::from_utf8(
        kube.secret_data(kube.ns(NAMESPACE), &bucket)
            .await
            .expect("the Secret")["s3.conf"]
            .clone(),
    )
    .expect("utf8");
    let cipher_pass = conf_value(&conf, "repo2-cipher-pass");
    let key_id = conf_value(&conf, "repo2-s3-key");
    let key_secret = conf_value(&conf, "repo2-s3-key-secret");
    assert_eq!(cipher_pass.len(), 64);
    assert_eq!(key_secret.len(), 40, "an AWS secret access key");

    let (tables, dump) = dump_tables(&db).await;
    for expected in [
        "_sqlx_migrations",
        "jobs",
        "job_steps",
        "audit_events",
        "backup_repositories",
        "secret_material",
    ] {
        assert!(
            tables.iter().any(|t| t == expected),
            "{expected} not in {tables:?}"
        );
    }

    let stop = service.terminate(STOP_DEADLINE);
    let log = service.log();
    let (exit, stop_time) = stop.unwrap_or_else(|| {
        panic!(
            "no exit within {STOP_DEADLINE:?} of SIGTERM\n--- log (tail) ---\n{}",
            tail(&log, 30)
        )
    });
    assert!(
        exit.success(),
        "graceful shutdown must exit 0, got {exit}\n--- log (tail) ---\n{}",
        tail(&log, 30)
    );

    // The collections are real: debug logs of the run, identifiers in responses and rows.
    assert!(log.lines().count() > 50, "too few log lines:\n{log}");
    assert!(
        log.contains("DEBUG") || log.contains("\"level\":\"DEBUG\""),
        "no debug lines"
    );
    if json_logs {
        let first = log
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default();
        assert!(
            serde_json::from_str::<Value>(first).is_ok(),
            "BP_LOG_JSON=true must log JSON lines: {first}"
        );
    }
    let responses = collected.all_text();
    assert!(
        responses.contains(&key_id),
        "the key id is shown in the API"
    );
    assert!(dump.contains(&key_id), "the key id is recorded in Postgres");
    assert!(dump.contains(&bucket));
    // Nothing sealed is left behind (it would be encrypted anyway).
    assert!(dump.contains("### secret_material (0 rows)"), "{dump}");

    let mut forms = leak_forms("secret access key", &key_secret);
    forms.extend(leak_forms("cipher pass", &cipher_pass));
    let conf_b64 = base64::engine::general_purpose::STANDARD.encode(&conf);
    forms.push(("s3.conf (base64)".into(), conf_b64));
    // Positive control: the needles do match where the secrets legitimately are.
    let stored = serde_json::to_string(&kube.secret(kube.ns(NAMESPACE), &bucket).await).unwrap();
    assert!(
        find_leak(&stored, &forms).is_some(),
        "the leak check must find s3.conf in the Secret"
    );
    assert_clean("the service log", &log, &forms);
    assert_clean("the API responses", &responses, &forms);
    assert_clean("the Postgres dump", &dump, &forms);

    eprintln!(
        "secret hygiene (json logs: {json_logs}): started in {startup:.2?}, ready after \
         {provisioned:.2?}; checked {} log lines ({} bytes), {} API responses, {} tables ({} bytes); \
         SIGTERM -> exit 0 in {stop_time:.2?}; total {:.2?}",
        log.lines().count(),
        log.len(),
        collected.responses.len(),
        tables.len(),
        dump.len(),
        started.elapsed()
    );
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_response_or_row_holds_a_secret() {
    provision_and_check(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_json_log_line_response_or_row_holds_a_secret() {
    provision_and_check(true).await;
}
