//! A provisioning worker in a real child process that SIGKILLs itself at a named checkpoint.
//!
//! The parent re-executes this test binary (`current_exe`) running one `#[ignore]`d entry test
//! with `--exact --ignored`; everything the child needs comes through environment variables
//! ([`ChildSpec`]): it shares the parent's database, moto server, kube-apiserver (through the
//! parent's proxy, as the service's ServiceAccount) and encryption key, but nothing in memory. The child installs a checkpoint hook that kills its
//! own process with SIGKILL when the job reaches the named point (`"<step>:before-record"`,
//! see `JobContext::checkpoint`), so nothing of the worker gets to clean up: no destructor, no
//! rollback message, no lease release.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use backup_provisioner::cloud::aws::{self, AwsSettings};
use backup_provisioner::jobs::{Registry, WorkerConfig, WorkerPool};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

use super::env::{provisioner, rotation_kinds};
use super::kube_apiserver::client_for;
use super::moto::{TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY};

const ENV_DATABASE_URL: &str = "BP_CRASH_CHILD_DATABASE_URL";
const ENV_MOTO_ENDPOINT: &str = "BP_CRASH_CHILD_MOTO_ENDPOINT";
const ENV_REGION: &str = "BP_CRASH_CHILD_REGION";
const ENV_KUBE_URL: &str = "BP_CRASH_CHILD_KUBE_URL";
const ENV_KUBE_TOKEN: &str = "BP_CRASH_CHILD_KUBE_TOKEN";
const ENV_KUBE_CA: &str = "BP_CRASH_CHILD_KUBE_CA";
const ENV_ENCRYPTION_KEY: &str = "BP_CRASH_CHILD_ENCRYPTION_KEY";
const ENV_KILL_AT: &str = "BP_CRASH_CHILD_KILL_AT";
const ENV_WORKER_ID: &str = "BP_CRASH_CHILD_WORKER_ID";

/// The lease of the child's worker: short, so the rescuer re-queues the job soon after a kill.
pub const CHILD_LEASE: Duration = Duration::from_secs(2);
/// How long a child may live if it never reaches its kill point (the parent fails earlier).
const CHILD_LIFETIME_CAP: Duration = Duration::from_secs(150);

/// What a crash child is told through its environment.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    pub database_url: String,
    pub moto_endpoint: String,
    pub region: String,
    pub kube_url: String,
    /// The CA (PEM) the server's certificate is signed by.
    pub kube_ca_pem: String,
    pub kube_token: String,
    /// Base64, the same key the parent's own worker uses later.
    pub encryption_key: String,
    /// The checkpoint to die at, e.g. `"access_key:before-record"`.
    pub kill_at: String,
    pub worker_id: String,
}

impl ChildSpec {
    fn envs(&self) -> [(&'static str, &str); 9] {
        [
            (ENV_DATABASE_URL, &self.database_url),
            (ENV_MOTO_ENDPOINT, &self.moto_endpoint),
            (ENV_REGION, &self.region),
            (ENV_KUBE_URL, &self.kube_url),
            (ENV_KUBE_CA, &self.kube_ca_pem),
            (ENV_KUBE_TOKEN, &self.kube_token),
            (ENV_ENCRYPTION_KEY, &self.encryption_key),
            (ENV_KILL_AT, &self.kill_at),
            (ENV_WORKER_ID, &self.worker_id),
        ]
    }

    /// The spec from this process's environment; `None` when the entry test runs on its own.
    pub fn from_env() -> Option<ChildSpec> {
        let var = |name: &str| std::env::var(name).ok();
        Some(ChildSpec {
            database_url: var(ENV_DATABASE_URL)?,
            moto_endpoint: var(ENV_MOTO_ENDPOINT)?,
            region: var(ENV_REGION)?,
            kube_url: var(ENV_KUBE_URL)?,
            kube_ca_pem: var(ENV_KUBE_CA)?,
            kube_token: var(ENV_KUBE_TOKEN)?,
            encryption_key: var(ENV_ENCRYPTION_KEY)?,
            kill_at: var(ENV_KILL_AT)?,
            worker_id: var(ENV_WORKER_ID)?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Parent side
// ---------------------------------------------------------------------------------------------

/// A running crash child; killed if dropped while still alive.
pub struct CrashChild {
    child: tokio::process::Child,
    log: tempfile::NamedTempFile,
    kill_at: String,
}

/// Starts this test binary as a child process running the entry test `entry_test`
/// (its full libtest name, e.g. `crash_safety::crash_child_worker`).
pub fn spawn(entry_test: &str, spec: &ChildSpec) -> CrashChild {
    let log = tempfile::NamedTempFile::new().expect("child log file");
    let out = log.reopen().expect("child log file");
    let err = out.try_clone().expect("child log file");
    let mut command = tokio::process::Command::new(test_binary());
    command
        .args([
            entry_test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .envs(spec.envs())
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true);
    // SAFETY: only prctl between fork and exec (async-signal-safe). The child dies with the
    // thread that spawned it, which lives as long as the test does.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let child = command.spawn().expect("spawn the crash child");
    CrashChild {
        child,
        log,
        kill_at: spec.kill_at.clone(),
    }
}

/// This very test binary. `/proc/self/exe` still names it when a concurrent build has replaced
/// the file on disk since this process started (`current_exe` would then name the new build, or
/// a path that no longer exists).
fn test_binary() -> PathBuf {
    let proc_exe = PathBuf::from("/proc/self/exe");
    if proc_exe.exists() {
        proc_exe
    } else {
        std::env::current_exe().expect("test binary path")
    }
}

impl CrashChild {
    /// Everything the child wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Waits (at most `deadline`) for the child to die and asserts that SIGKILL killed it.
    pub async fn expect_sigkill(mut self, deadline: Duration) {
        let status = match tokio::time::timeout(deadline, self.child.wait()).await {
            Ok(status) => status.expect("wait for the crash child"),
            Err(_) => panic!(
                "the crash child did not die at {} within {deadline:?}; its output:\n{}",
                self.kill_at,
                self.log()
            ),
        };
        assert_eq!(
            status.signal(),
            Some(Signal::SIGKILL as i32),
            "the crash child should have died of SIGKILL at {} but ended with {status}; its output:\n{}",
            self.kill_at,
            self.log()
        );
        assert!(
            self.log()
                .contains(&format!("crash child: SIGKILL at {}", self.kill_at)),
            "the child died of SIGKILL, but not at its kill point; its output:\n{}",
            self.log()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Child side
// ---------------------------------------------------------------------------------------------

/// The child's body: installs the kill hook and runs a provisioning worker pool until the hook
/// fires. Exits (without a signal, so the parent notices) if the job ends without reaching the
/// kill point.
pub async fn run(spec: ChildSpec) {
    backup_provisioner::install_crypto_provider();
    eprintln!(
        "crash child {} started; will die at {}",
        spec.worker_id, spec.kill_at
    );
    let kill_at = spec.kill_at.clone();
    backup_provisioner::jobs::context::set_checkpoint_hook(Arc::new(move |point: &str| {
        eprintln!("crash child: checkpoint {point}");
        if point == kill_at {
            eprintln!("crash child: SIGKILL at {point}");
            let _ = kill(Pid::this(), Signal::SIGKILL);
            // SIGKILL cannot be caught; make sure nothing runs past this point regardless.
            std::process::abort();
        }
    }));

    let db = PgPoolOptions::new()
        .max_connections(8)
        .connect(&spec.database_url)
        .await
        .expect("child: connect to the test database");
    let settings = AwsSettings {
        endpoint_url: Some(spec.moto_endpoint.clone()),
        region: Some(spec.region.clone()),
    };
    let credentials = aws_sdk_s3::config::Credentials::new(
        TEST_ACCESS_KEY_ID,
        TEST_SECRET_ACCESS_KEY,
        None,
        None,
        "crash-child",
    );
    let aws = aws::clients_with_credentials(&settings, None, credentials).await;
    let kube = client_for(&spec.kube_url, &spec.kube_ca_pem, Some(&spec.kube_token));
    let provisioner = provisioner(aws, kube, &spec.encryption_key);
    // The rotation kinds too (tests/api/rotate_crash.rs), with the default grace periods.
    let (rotator, retirer) = rotation_kinds(&provisioner, &super::app::worker_args(1));
    // And deprovisioning (tests/api/deprovision.rs).
    let deprovisioner =
        backup_provisioner::provision::deprovision::Deprovisioner::like(&provisioner);
    // And adoption (tests/api/adopt/crash.rs).
    let adopter = backup_provisioner::provision::adopt::Adopter::like(&provisioner);
    let registry = Registry::new()
        .register(rotator)
        .register(retirer)
        .register(deprovisioner)
        .register(adopter)
        .register(provisioner);
    let config = WorkerConfig {
        concurrency: 1,
        lease: CHILD_LEASE,
        poll_interval: Duration::from_millis(100),
        retry_base: Duration::from_millis(50),
        shutdown_grace: Duration::from_secs(5),
        worker_id: spec.worker_id.clone(),
    };
    let shutdown = CancellationToken::new();
    let pool = tokio::spawn(WorkerPool::new(db.clone(), registry, config).run(shutdown.clone()));

    // Normally the hook kills this process. If the job ends instead (it failed, or the kill
    // point was never reached), say so and exit with a code the parent reports.
    let started = tokio::time::Instant::now();
    // Jobs that ended before this child started (e.g. the provisioning before a rotation) are
    // not its business.
    let since: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&db)
        .await
        .expect("child: read the database clock");
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let ended: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT state, last_error FROM jobs
              WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at > $1",
        )
        .bind(since)
        .fetch_all(&db)
        .await
        .unwrap_or_default();
        if let Some((state, error)) = ended.first() {
            eprintln!(
                "crash child: the job ended ({state}, {error:?}) without reaching {}",
                spec.kill_at
            );
            std::process::exit(3);
        }
        if pool.is_finished() {
            eprintln!(
                "crash child: the worker pool stopped unexpectedly: {:?}",
                pool.await
            );
            std::process::exit(4);
        }
        if started.elapsed() > CHILD_LIFETIME_CAP {
            eprintln!(
                "crash child: never reached {} within {CHILD_LIFETIME_CAP:?}",
                spec.kill_at
            );
            std::process::exit(5);
        }
    }
}
