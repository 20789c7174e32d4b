//! moto (AWS emulator) launcher: `Moto::shared()` for one server per test binary (tests use
//! unique bucket names), `Moto::start()` / `Moto::with_iam_auth(n)` for a private server.
//!
//! Children are spawned from one long-lived thread with `PR_SET_PDEATHSIG`, so a moto server
//! never outlives the test process (statics are not dropped at exit).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use backup_provisioner::cloud::aws::{self, AwsClients, AwsSettings, CallCounter};

/// Credentials moto accepts when IAM authorization is not enforced.
pub const TEST_ACCESS_KEY_ID: &str = "test";
pub const TEST_SECRET_ACCESS_KEY: &str = "test";

const START_DEADLINE: Duration = Duration::from_secs(60);

/// A running moto server; killed on drop.
pub struct Moto {
    pub endpoint: String,
    pub port: u16,
    child: Mutex<Child>,
    /// moto's stderr, in an unlinked temporary file (nothing is left behind in /tmp).
    log: std::fs::File,
}

impl Moto {
    /// The moto server shared by every test of this binary (started on first use).
    pub fn shared() -> &'static Moto {
        static SHARED: OnceLock<Moto> = OnceLock::new();
        SHARED.get_or_init(Moto::start)
    }

    /// A private moto server without IAM authorization.
    pub fn start() -> Moto {
        Self::launch(None, &[])
    }

    /// A private moto server started with extra environment variables (moto feature switches
    /// such as `MOTO_S3_ALLOW_CROSSACCOUNT_ACCESS`).
    pub fn with_env(env: &[(&str, &str)]) -> Moto {
        Self::launch(None, env)
    }

    /// A private moto server that enforces IAM authorization after the first
    /// `initial_no_auth_count` requests (`INITIAL_NO_AUTH_ACTION_COUNT`).
    pub fn with_iam_auth(initial_no_auth_count: u32) -> Moto {
        Self::launch(Some(initial_no_auth_count), &[])
    }

    /// A private moto server enforcing IAM authorization (after `initial_no_auth_count`
    /// requests) with AWS's action names and resource ARNs: `support/moto_authz.py` (S3 requests
    /// checked as the actions AWS evaluates, IAM requests against the user, group or policy
    /// they name), so a resource-scoped least-privilege policy can be proven.
    pub fn with_aws_authorization(initial_no_auth_count: u32) -> Moto {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let program = [
            root.join(".venv/bin/python3"),
            root.join("tests/api/support/moto_authz.py"),
        ];
        Self::launch_program(&program, Some(initial_no_auth_count), &[])
    }

    /// Path of `.venv/bin/moto_server` (installed by `scripts/install-deps.sh`).
    pub fn binary() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server")
    }

    fn launch(initial_no_auth_count: Option<u32>, env: &[(&str, &str)]) -> Moto {
        Self::launch_program(&[Self::binary()], initial_no_auth_count, env)
    }

    /// Starts `program[0]` with the other elements as its first arguments, then moto's.
    fn launch_program(
        program: &[PathBuf],
        initial_no_auth_count: Option<u32>,
        env: &[(&str, &str)],
    ) -> Moto {
        let binary = &program[0];
        assert!(
            binary.exists(),
            "{} is missing: run scripts/install-deps.sh",
            binary.display()
        );
        let deadline = Instant::now() + START_DEADLINE;
        let mut last_error = String::new();
        while Instant::now() < deadline {
            let port = free_port();
            let log = tempfile::tempfile().expect("moto log file");
            let mut command = Command::new(binary);
            command
                .args(&program[1..])
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .env("PYTHONUNBUFFERED", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log.try_clone().expect("moto log file"))
                .envs(env.iter().copied());
            match initial_no_auth_count {
                Some(n) => command.env("INITIAL_NO_AUTH_ACTION_COUNT", n.to_string()),
                None => command.env_remove("INITIAL_NO_AUTH_ACTION_COUNT"),
            };
            let mut child = spawn_tied_to_process(command)
                .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
            match wait_ready(&mut child, port, deadline) {
                Ok(()) => {
                    return Moto {
                        endpoint: format!("http://127.0.0.1:{port}"),
                        port,
                        child: Mutex::new(child),
                        log,
                    };
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let output = read_log(&log);
                    last_error = format!("{e}\n--- moto log ---\n{output}");
                    // Port taken by someone else in between: try another one.
                }
            }
        }
        panic!("moto did not start within {START_DEADLINE:?}: {last_error}");
    }

    /// The moto log so far (for failure messages).
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// Settings pointing the service at this server.
    pub fn settings(&self, region: &str) -> AwsSettings {
        endpoint_settings(&self.endpoint, region)
    }

    /// SDK clients for this server with the static `test`/`test` credentials (never process env).
    pub async fn clients(&self, region: &str, counter: Option<CallCounter>) -> AwsClients {
        self.clients_as(region, counter, TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY)
            .await
    }

    /// SDK clients for this server signing with the given access key.
    pub async fn clients_as(
        &self,
        region: &str,
        counter: Option<CallCounter>,
        access_key_id: &str,
        secret: &str,
    ) -> AwsClients {
        clients_at(&self.endpoint, region, counter, access_key_id, secret).await
    }

    /// Wipes all emulated state (`POST /moto-api/reset`). Only for private servers.
    pub async fn reset(&self) {
        self.post("/moto-api/reset", "application/json", "").await;
    }

    /// Re-arms `INITIAL_NO_AUTH_ACTION_COUNT` (`POST /moto-api/reset-auth`).
    pub async fn reset_auth(&self, initial_no_auth_count: u32) {
        self.post(
            "/moto-api/reset-auth",
            "text/plain",
            &initial_no_auth_count.to_string(),
        )
        .await;
    }

    async fn post(&self, path: &str, content_type: &str, body: &str) {
        backup_provisioner::install_crypto_provider();
        let response = reqwest::Client::new()
            .post(format!("{}{path}", self.endpoint))
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body.to_owned())
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        assert!(
            response.status().is_success(),
            "POST {path}: {}",
            response.status()
        );
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Reads the whole log with positioned reads (the child shares the file offset).
fn read_log(log: &std::fs::File) -> String {
    use std::os::unix::fs::FileExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n @ 1..) = log.read_at(&mut buf, out.len() as u64) {
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// Polls `GET /moto-api/` until moto answers, the child exits, or the deadline passes.
fn wait_ready(child: &mut Child, port: u16, deadline: Instant) -> Result<(), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("moto exited early with {status}"));
        }
        if probe(addr) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err("moto did not answer before the deadline".to_owned());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP request to moto's dashboard API; true when an HTTP response comes back.
fn probe(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request =
        format!("GET /moto-api/data.json HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `command` from a thread that lives as long as the process, with the child asking the
/// kernel for SIGKILL when that thread (i.e. the process) dies.
fn spawn_tied_to_process(command: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("moto-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    use std::os::unix::process::CommandExt;
                    // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and exec.
                    unsafe {
                        command.pre_exec(|| {
                            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                                .map_err(std::io::Error::from)?;
                            Ok(())
                        });
                    }
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("moto spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    sender
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((command, reply_tx))
        .expect("moto spawner thread alive");
    reply_rx.recv().expect("moto spawner reply")
}

/// Works around a moto limitation for tests with IAM authorization enforced: moto re-encodes an
/// IAM form body before checking its SigV4 signature, writing spaces as `+`, so a body the SDK
/// encoded with `%20` (any parameter with a space: the runbook's policy description, the access
/// key description tag) fails with SignatureDoesNotMatch. This interceptor sends spaces as `+`
/// (equally valid form encoding, accepted by AWS too) before the request is signed.
#[derive(Debug)]
struct SpacesAsPlus;

impl aws_sdk_iam::config::Intercept for SpacesAsPlus {
    fn name(&self) -> &'static str {
        "SpacesAsPlus"
    }

    fn modify_before_signing(
        &self,
        context: &mut aws_sdk_iam::config::interceptors::BeforeTransmitInterceptorContextMut<'_>,
        _runtime_components: &aws_sdk_iam::config::RuntimeComponents,
        _cfg: &mut aws_sdk_iam::config::ConfigBag,
    ) -> Result<(), aws_sdk_iam::error::BoxError> {
        let request = context.request_mut();
        let Some(body) = request.body().bytes() else {
            return Ok(());
        };
        let text = String::from_utf8_lossy(body).replace("%20", "+");
        let length = text.len().to_string();
        *request.body_mut() = aws_smithy_types::body::SdkBody::from(text);
        request.headers_mut().insert("content-length", length);
        Ok(())
    }
}

/// `iam` with [`SpacesAsPlus`] added.
pub fn iam_for_enforced_moto(iam: &aws_sdk_iam::Client) -> aws_sdk_iam::Client {
    aws_sdk_iam::Client::from_conf(iam.config().to_builder().interceptor(SpacesAsPlus).build())
}

/// Settings for an S3/IAM endpoint of the tests (moto, or a proxy in front of it).
pub fn endpoint_settings(endpoint: &str, region: &str) -> AwsSettings {
    AwsSettings {
        endpoint_url: Some(endpoint.to_owned()),
        region: Some(region.to_owned()),
    }
}

/// SDK clients for `endpoint` signing with the given static key (never the process's
/// environment).
pub async fn clients_at(
    endpoint: &str,
    region: &str,
    counter: Option<CallCounter>,
    access_key_id: &str,
    secret: &str,
) -> AwsClients {
    let credentials =
        aws_sdk_s3::config::Credentials::new(access_key_id, secret, None, None, "tests");
    aws::clients_with_credentials(&endpoint_settings(endpoint, region), counter, credentials).await
}
