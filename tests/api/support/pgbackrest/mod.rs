//! pgBackRest end to end against an S3 emulator: a TLS proxy (nginx) in front of plain-http
//! moto, a throwaway PostgreSQL 15 cluster run as the `postgres` OS user, a pgBackRest
//! configuration that takes its credentials from an `s3.conf` text (exactly what the
//! Kubernetes Secret holds), and [`round_trip`]: backup to repo2, restore into a fresh data
//! directory, read a marker row back.
//!
//! Everything here is synchronous (child processes and polling with deadlines); call
//! [`round_trip_async`] from async tests. Long-lived children (nginx, postgres) are spawned
//! from one long-lived thread with `PR_SET_PDEATHSIG`, so they never outlive the test process,
//! and are stopped on drop. Requires root (the tests run as root): PostgreSQL and pgBackRest
//! run as the `postgres` OS user.
//!
//! Gotchas this encodes (see also /work/shared/stack-notes.md):
//! - pgBackRest 2.45 checks the endpoint host only against *DNS* subjectAltNames (or the CN
//!   when there are none); an `IP:127.0.0.1` SAN alone fails with "unable to find hostname
//!   '127.0.0.1' in certificate", after a 60 s retry loop. The certificate therefore carries
//!   `DNS:127.0.0.1` as well as `IP:127.0.0.1` (for rustls/curl) and `DNS:localhost`.
//! - `repo3-*` lines in `s3.conf` without a `repo3-type` are ignored silently by pgBackRest
//!   (options from configuration files whose dependency is unmet are dropped, as happens in a
//!   PostgresCluster that only defines repo1/repo2), so the Secret is used verbatim.
//! - `--config-include-path` is a command-line option only: `archive_command` and the
//!   `restore_command` pgBackRest writes on restore carry it explicitly.
#![allow(dead_code)]

use std::fmt;
use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures::StreamExt;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

mod cluster;
mod repo;
mod round_trip;
mod tls_proxy;

pub use cluster::*;
pub use repo::*;
pub use round_trip::*;
pub use tls_proxy::*;

/// Directory of the PostgreSQL server binaries (Debian `postgresql-NN`).
pub fn pg_bin() -> &'static str {
    // The newest PostgreSQL server installed from Debian's packages.
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        let mut versions: Vec<u32> = fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries (run scripts/install-deps.sh)")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        versions.sort_unstable();
        let newest = versions
            .last()
            .expect("a PostgreSQL version under /usr/lib/postgresql");
        format!("/usr/lib/postgresql/{newest}/bin")
    })
}
/// The stanza every harness configuration uses.
pub const STANZA: &str = "demo";
/// OS user that owns the clusters and runs pgBackRest.
pub const PG_OS_USER: &str = "postgres";

const PROXY_START_DEADLINE: Duration = Duration::from_secs(20);
const PG_START_DEADLINE: Duration = Duration::from_secs(60);
const PG_STOP_DEADLINE: Duration = Duration::from_secs(30);
const SHORT_COMMAND_DEADLINE: Duration = Duration::from_secs(60);
/// Upper bound for one pgBackRest command (backup/restore of a small cluster take seconds).
const PGBACKREST_DEADLINE: Duration = Duration::from_secs(180);
const POLL: Duration = Duration::from_millis(25);

// ---------------------------------------------------------------------------------------------
// Command results
// ---------------------------------------------------------------------------------------------

/// A finished command: its output and how long it took.
#[derive(Debug, Clone)]
pub struct Run {
    pub command: String,
    pub elapsed: Duration,
    pub stdout: String,
    pub stderr: String,
}

/// A command that failed to start, exited non-zero or ran past its deadline.
#[derive(Debug, Clone)]
pub struct CommandFailure {
    pub command: String,
    /// `None` when the command could not be started or was killed at the deadline.
    pub status: Option<ExitStatus>,
    pub elapsed: Duration,
    pub stdout: String,
    pub stderr: String,
    pub reason: String,
}

impl fmt::Display for CommandFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` {} after {:.2?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            self.reason,
            self.elapsed,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

impl std::error::Error for CommandFailure {}

/// Runs `command` to completion with stdout/stderr captured in files (no pipe deadlocks),
/// killing it at `deadline` (and terminating it if the test process dies).
fn run_command(mut command: Command, deadline: Duration) -> Result<Run, CommandFailure> {
    let display = describe(&command);
    let started = Instant::now();
    let failure = |reason: String, status, stdout: String, stderr: String| CommandFailure {
        command: display.clone(),
        status,
        elapsed: started.elapsed(),
        stdout,
        stderr,
        reason,
    };
    let (Ok(mut out), Ok(mut err)) = (tempfile::tempfile(), tempfile::tempfile()) else {
        return Err(failure(
            "could not create capture files".into(),
            None,
            String::new(),
            String::new(),
        ));
    };
    let spawned = match (out.try_clone(), err.try_clone()) {
        (Ok(o), Ok(e)) => {
            command.stdin(Stdio::null()).stdout(o).stderr(e);
            // SIGTERM if the test process dies: pgBackRest then stops cleanly.
            spawn_tied(command, Signal::SIGTERM)
        }
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            return Err(failure(
                format!("could not start: {e}"),
                None,
                String::new(),
                String::new(),
            ));
        }
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(POLL),
            Err(_) => break None,
        }
    };
    let read = |file: &mut fs::File| {
        use std::io::Seek;
        let mut text = String::new();
        let _ = file.rewind();
        let _ = file.read_to_string(&mut text);
        text
    };
    let (stdout, stderr) = (read(&mut out), read(&mut err));
    match status {
        Some(status) if status.success() => Ok(Run {
            command: display,
            elapsed: started.elapsed(),
            stdout,
            stderr,
        }),
        Some(status) => Err(failure(
            format!("exited with {status}"),
            Some(status),
            stdout,
            stderr,
        )),
        None => Err(failure(
            format!("killed at the {deadline:?} deadline"),
            None,
            stdout,
            stderr,
        )),
    }
}

fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// Processes tied to the test process, the postgres OS user
// ---------------------------------------------------------------------------------------------

type SpawnRequest = (Command, Signal, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `command` from a thread that lives as long as the process; the child gets
/// `death_signal` when that thread (i.e. the test process) dies.
fn spawn_tied(command: Command, death_signal: Signal) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("pgbackrest-harness-spawner".into())
            .spawn(move || {
                for (mut command, signal, reply) in rx {
                    // SAFETY: only prctl (async-signal-safe) runs between fork and exec. It runs
                    // after std's setuid, which would otherwise clear the death signal.
                    unsafe {
                        command.pre_exec(move || {
                            nix::sys::prctl::set_pdeathsig(signal).map_err(std::io::Error::from)
                        });
                    }
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    sender
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((command, death_signal, reply_tx))
        .expect("spawner thread alive");
    reply_rx.recv().expect("spawner reply")
}

/// Sends `signal`, waits up to `deadline` for the child to exit, then SIGKILLs it.
fn terminate(child: &mut Child, signal: Signal, deadline: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    let _ = nix::sys::signal::kill(Pid::from_raw(child.id() as i32), signal);
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(POLL);
    }
    let _ = child.kill();
    child.wait().ok()
}

/// uid and gid of [`PG_OS_USER`], from /etc/passwd.
fn postgres_ids() -> anyhow::Result<(u32, u32)> {
    static IDS: OnceLock<Result<(u32, u32), String>> = OnceLock::new();
    IDS.get_or_init(|| {
        let passwd = fs::read_to_string("/etc/passwd").map_err(|e| e.to_string())?;
        passwd
            .lines()
            .map(|line| line.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[0] == PG_OS_USER)
            .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .ok_or_else(|| {
                format!("no `{PG_OS_USER}` user in /etc/passwd: run scripts/install-deps.sh")
            })
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// A command that runs as the `postgres` OS user with a minimal, predictable environment.
fn as_postgres(program: impl AsRef<std::ffi::OsStr>, cwd: &Path) -> anyhow::Result<Command> {
    let (uid, gid) = postgres_ids()?;
    let mut command = Command::new(program);
    command
        .env_clear()
        .env("PATH", format!("{}:/usr/local/bin:/usr/bin:/bin", pg_bin()))
        .env("HOME", cwd)
        .env("LC_ALL", "C")
        .current_dir(cwd)
        .uid(uid)
        .gid(gid);
    Ok(command)
}

/// A root-created temporary directory handed over to the `postgres` user.
fn postgres_tempdir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    let (uid, gid) = postgres_ids()?;
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .context("tempdir")?;
    chown(dir.path(), Some(uid), Some(gid)).with_context(|| {
        format!(
            "chown {} to {PG_OS_USER} (the pgBackRest harness must run as root)",
            dir.path().display()
        )
    })?;
    Ok(dir)
}

/// Creates `path` (mode 0700) owned by the `postgres` user.
fn postgres_dir(path: &Path) -> anyhow::Result<()> {
    let (uid, gid) = postgres_ids()?;
    fs::create_dir_all(path).with_context(|| format!("mkdir {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
    chown(path, Some(uid), Some(gid))?;
    Ok(())
}

/// Writes `text` to `path` (mode 0600) owned by the `postgres` user.
fn postgres_file(path: &Path, text: &str) -> anyhow::Result<()> {
    let (uid, gid) = postgres_ids()?;
    fs::write(path, text).with_context(|| format!("write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    chown(path, Some(uid), Some(gid))?;
    Ok(())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}
