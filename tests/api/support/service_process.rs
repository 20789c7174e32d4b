//! The real `backup-provisioner` binary as a child process: `serve` (API, and workers unless
//! `--workers 0`) or `worker`, configured through its environment as deployed (DATABASE_URL,
//! BP_ENCRYPTION_KEY, AWS_ENDPOINT_URL and the standard AWS variables, KUBECONFIG), logging to
//! a file. Killed (SIGKILL) when dropped, and when the test process dies.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::app::{HS256_SECRET, free_port};
use super::moto::{TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY};

const START_DEADLINE: Duration = Duration::from_secs(30);

/// What to run and against what.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// Shown in logs and used as the worker id (`HOSTNAME`).
    pub name: String,
    /// `["serve", "--workers", "0"]`, `["worker"]`, ...
    pub args: Vec<String>,
    pub database_url: String,
    /// Base64, the same for every process of one deployment.
    pub encryption_key: String,
    /// S3/IAM endpoint (moto, or an AWS realism proxy in front of it).
    pub aws_endpoint: String,
    pub kubeconfig: PathBuf,
    /// More variables (`BP_JOB_LEASE`, ...), set last.
    pub env: Vec<(String, String)>,
}

impl ServiceSpec {
    /// `serve`/`worker` with test-friendly timings: 200 ms polling, 100 ms retry base, 5 s
    /// shutdown grace, no sweep.
    pub fn new(
        name: &str,
        args: &[&str],
        database_url: &str,
        encryption_key: &str,
        aws_endpoint: &str,
        kubeconfig: &Path,
    ) -> ServiceSpec {
        ServiceSpec {
            name: name.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            database_url: database_url.to_owned(),
            encryption_key: encryption_key.to_owned(),
            aws_endpoint: aws_endpoint.to_owned(),
            kubeconfig: kubeconfig.to_owned(),
            env: vec![
                ("BP_POLL_INTERVAL".into(), "200ms".into()),
                ("BP_RETRY_BASE".into(), "100ms".into()),
                ("BP_SHUTDOWN_GRACE".into(), "5s".into()),
                ("BP_SWEEP_INTERVAL".into(), "0s".into()),
                // Tests count AWS calls, not pace them (tests/api/verify_sweep.rs paces).
                ("BP_AWS_MAX_RPS".into(), "10000".into()),
                ("BP_VERIFY_INTERVAL".into(), "0s".into()),
            ],
        }
    }

    pub fn env(mut self, name: &str, value: &str) -> ServiceSpec {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    fn serves_http(&self) -> bool {
        self.args.first().is_some_and(|a| a == "serve")
    }
}

/// A running `backup-provisioner` process.
pub struct ServiceProcess {
    pub name: String,
    child: Child,
    log_path: PathBuf,
    /// `http://127.0.0.1:PORT` for `serve`.
    pub base_url: Option<String>,
}

impl ServiceProcess {
    /// Starts the process (its log in `dir`) and waits until it serves `/healthz` (`serve`) or
    /// its workers started (`worker`).
    pub async fn spawn(dir: &Path, spec: &ServiceSpec) -> ServiceProcess {
        let mut last_error = String::new();
        for attempt in 0..3 {
            let port = spec.serves_http().then(free_port);
            let log_path = dir.join(format!("{}-{attempt}.log", spec.name));
            let mut service = Self::launch(spec, port, log_path);
            match service.wait_started().await {
                Ok(()) => return service,
                // The port may have been taken in between: try another one.
                Err(e) => last_error = format!("{e}\n--- log ---\n{}", service.log()),
            }
        }
        panic!("{} did not start: {last_error}", spec.name);
    }

    fn launch(spec: &ServiceSpec, port: Option<u16>, log_path: PathBuf) -> ServiceProcess {
        let log = std::fs::File::create(&log_path).expect("log file");
        let home = log_path.parent().expect("log directory").to_owned();
        let mut command = Command::new(env!("CARGO_BIN_EXE_backup-provisioner"));
        command
            .args(&spec.args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &home)
            .env("HOSTNAME", &spec.name)
            .env("DATABASE_URL", &spec.database_url)
            .env("BP_JWT_HS256_SECRET", HS256_SECRET)
            .env("BP_ENCRYPTION_KEY", &spec.encryption_key)
            .env("AWS_ENDPOINT_URL", &spec.aws_endpoint)
            .env("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", TEST_SECRET_ACCESS_KEY)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("KUBECONFIG", &spec.kubeconfig)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        if let Some(port) = port {
            command.env("BP_LISTEN_ADDR", format!("127.0.0.1:{port}"));
        }
        command.envs(spec.env.iter().map(|(k, v)| (k, v)));
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe calls (prctl) between fork and exec.
            unsafe {
                command.pre_exec(|| {
                    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
                });
            }
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", spec.name));
        ServiceProcess {
            name: spec.name.clone(),
            child,
            log_path,
            base_url: port.map(|p| format!("http://127.0.0.1:{p}")),
        }
    }

    async fn wait_started(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_DEADLINE;
        let client = reqwest::Client::new();
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("exited early with {status}"));
            }
            let started = match &self.base_url {
                Some(base) => client
                    .get(format!("{base}/healthz"))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200),
                None => self.log().contains("workers started"),
            };
            if started {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err("not started before the deadline".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `base_url` + `path` (panics for a worker-only process).
    pub fn url(&self, path: &str) -> String {
        format!(
            "{}{path}",
            self.base_url.as_deref().expect("a serve process")
        )
    }

    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// Still running (not exited)?
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then waits for the exit until `deadline`; None if it did not exit.
    pub async fn terminate(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if started.elapsed() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
