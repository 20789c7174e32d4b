//! Variations of [`Env`](super::provisioning::Env) for failure cases: the service with its own
//! AWS identity or Kubernetes credentials, and a private moto server started with extra
//! environment variables (e.g. `MOTO_S3_ALLOW_CROSSACCOUNT_ACCESS=false`).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use backup_provisioner::cloud::aws::{self, AwsClients, AwsSettings, CallCounter};
use backup_provisioner::crypto::EncryptionKey;
use backup_provisioner::jobs::Registry;
use backup_provisioner::provision::job::Provisioner;
use secrecy::ExposeSecret;

use super::app::{AppOptions, spawn_app_with, worker_args};
use super::kube::KubeEmulator;
use super::moto::{Moto, TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY};
use super::provisioning::Env;

pub const REGION: &str = "us-east-1";

/// Starts the service (2 workers) whose provisioner uses `service_aws` (which should carry
/// `counter`) and `service_kube`; `admin` is kept for assertions.
pub async fn start_env(
    kube: KubeEmulator,
    service_aws: AwsClients,
    service_kube: kube::Client,
    admin: AwsClients,
    counter: CallCounter,
) -> Env {
    backup_provisioner::install_crypto_provider();
    let worker = worker_args(2);
    let key = worker
        .encryption_key
        .as_ref()
        .expect("key")
        .expose_secret()
        .to_owned();
    let provisioner = Provisioner {
        aws: service_aws,
        kube: service_kube,
        encryption_key: EncryptionKey::from_base64(&key).expect("key"),
        credential_check_budget: Duration::from_secs(20),
        credential_check_backoff: Duration::from_millis(100),
    };
    let registry = Registry::new().register(provisioner);
    let app = spawn_app_with(AppOptions {
        worker,
        registry,
        ..Default::default()
    })
    .await;
    Env {
        app,
        kube,
        admin,
        counter,
        region: REGION.to_owned(),
    }
}

/// The shared moto and the admin Kubernetes identity, but the service's Kubernetes client is
/// `service_kube(&emulator)` (e.g. a token without rights in the repository's namespace).
pub async fn start_with_kube_client(
    namespaces: &[&str],
    service_kube: impl FnOnce(&KubeEmulator) -> kube::Client,
) -> Env {
    backup_provisioner::install_crypto_provider();
    let kube = KubeEmulator::start(namespaces);
    let client = service_kube(&kube);
    let counter = CallCounter::new();
    let moto = Moto::shared();
    let service_aws = moto.clients(REGION, Some(counter.clone())).await;
    let admin = moto.clients(REGION, None).await;
    start_env(kube, service_aws, client, admin, counter).await
}

/// A private moto server started with extra environment variables; killed on drop. The child
/// gets SIGKILL if the thread that spawned it dies (keep it inside one test).
pub struct CustomMoto {
    pub endpoint: String,
    child: Child,
    log: std::fs::File,
}

const START_DEADLINE: Duration = Duration::from_secs(60);

impl CustomMoto {
    pub fn start(env: &[(&str, &str)]) -> CustomMoto {
        let binary = Moto::binary();
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
            let mut command = Command::new(&binary);
            command
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .env("PYTHONUNBUFFERED", "1")
                .env_remove("INITIAL_NO_AUTH_ACTION_COUNT")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log.try_clone().expect("moto log file"));
            for (k, v) in env {
                command.env(k, v);
            }
            {
                use std::os::unix::process::CommandExt;
                // SAFETY: only async-signal-safe calls (prctl) between fork and exec.
                unsafe {
                    command.pre_exec(|| {
                        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                            .map_err(std::io::Error::from)
                    });
                }
            }
            let mut child = command
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
            match wait_ready(&mut child, port, deadline) {
                Ok(()) => {
                    return CustomMoto {
                        endpoint: format!("http://127.0.0.1:{port}"),
                        child,
                        log,
                    };
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error = format!("{e}\n--- moto log ---\n{}", read_log(&log));
                }
            }
        }
        panic!("moto did not start within {START_DEADLINE:?}: {last_error}");
    }

    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// Clients signing as moto's default account (`test`/`test`).
    pub async fn clients(&self, counter: Option<CallCounter>) -> AwsClients {
        let credentials = aws_sdk_s3::config::Credentials::new(
            TEST_ACCESS_KEY_ID,
            TEST_SECRET_ACCESS_KEY,
            None,
            None,
            "moto-test",
        );
        let settings = AwsSettings {
            endpoint_url: Some(self.endpoint.clone()),
            region: Some(REGION.to_owned()),
        };
        aws::clients_with_credentials(&settings, counter, credentials).await
    }
}

impl Drop for CustomMoto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_log(log: &std::fs::File) -> String {
    use std::os::unix::fs::FileExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n @ 1..) = log.read_at(&mut buf, out.len() as u64) {
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

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
