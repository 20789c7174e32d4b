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

// ---------------------------------------------------------------------------------------------
// TLS proxy
// ---------------------------------------------------------------------------------------------

/// nginx terminating TLS on `127.0.0.1:port` and forwarding to a plain-http upstream (moto),
/// with a fresh self-signed certificate (`ca_file`) valid for 127.0.0.1 and localhost.
/// Killed on drop.
pub struct TlsProxy {
    pub port: u16,
    /// The self-signed certificate, usable as `repo2-storage-ca-file` (world-readable).
    pub ca_file: PathBuf,
    pub upstream: String,
    /// How long generating the certificate and starting nginx took.
    pub startup: Duration,
    error_log: PathBuf,
    child: Child,
    dir: tempfile::TempDir,
}

impl TlsProxy {
    /// Starts the proxy in front of `upstream` (`http://127.0.0.1:PORT`) and waits until the
    /// port completes a TLS handshake that verifies against `ca_file`. Panics on failure.
    pub fn start(upstream: &str) -> TlsProxy {
        Self::try_start(upstream).unwrap_or_else(|e| panic!("TLS proxy: {e:#}"))
    }

    pub fn try_start(upstream: &str) -> anyhow::Result<TlsProxy> {
        let started = Instant::now();
        let upstream = upstream.trim_end_matches('/').to_owned();
        if !upstream.starts_with("http://") {
            bail!("upstream must be a plain http:// URL, got {upstream}");
        }
        let dir = tempfile::Builder::new().prefix("tls-proxy-").tempdir()?;
        // Traversable by nginx workers (user nobody) and pgBackRest (user postgres); the key
        // stays 0600 (read by the root master process only).
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let mut openssl = Command::new("openssl");
        openssl
            .args(["req", "-x509", "-nodes", "-days", "2"])
            .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
            .args(["-subj", "/CN=127.0.0.1"])
            .args([
                "-addext",
                "subjectAltName=DNS:127.0.0.1,DNS:localhost,IP:127.0.0.1",
            ])
            // A leaf certificate (rustls rejects a CA:TRUE certificate as the server's own:
            // CaUsedAsEndEntity); OpenSSL (pgBackRest, curl) trusts it as its own anchor.
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .args(["-addext", "keyUsage=critical,digitalSignature"])
            .args(["-addext", "extendedKeyUsage=serverAuth"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert);
        run_command(openssl, SHORT_COMMAND_DEADLINE)?;
        fs::set_permissions(&cert, fs::Permissions::from_mode(0o644))?;
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600))?;
        let ca_pem = fs::read(&cert)?;

        let deadline = Instant::now() + PROXY_START_DEADLINE;
        let mut attempts = Vec::new();
        while Instant::now() < deadline {
            let port = free_port();
            let conf = dir.path().join("nginx.conf");
            let error_log = dir.path().join("error.log");
            fs::write(&conf, nginx_conf(dir.path(), port, &upstream, &cert, &key))?;
            let mut command = Command::new("nginx");
            command
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&conf)
                .arg("-e")
                .arg(&error_log)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(dir.path().join("nginx.stderr"))?);
            // SIGTERM: nginx's fast shutdown, which also stops its worker.
            let mut child = spawn_tied(command, Signal::SIGTERM)
                .context("starting nginx (scripts/install-deps.sh installs nginx-light)")?;
            match wait_tls(&mut child, port, &ca_pem, deadline) {
                Ok(()) => {
                    return Ok(TlsProxy {
                        port,
                        ca_file: cert,
                        upstream,
                        startup: started.elapsed(),
                        error_log,
                        child,
                        dir,
                    });
                }
                Err(e) => {
                    terminate(&mut child, Signal::SIGTERM, Duration::from_secs(5));
                    let stderr =
                        fs::read_to_string(dir.path().join("nginx.stderr")).unwrap_or_default();
                    let log = fs::read_to_string(&error_log).unwrap_or_default();
                    attempts.push(format!("port {port}: {e}\n{stderr}{log}"));
                    // Most likely the port was taken in between: try another one.
                }
            }
        }
        bail!(
            "nginx did not serve TLS within {PROXY_START_DEADLINE:?}:\n{}",
            attempts.join("\n")
        )
    }

    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// nginx's error log so far (for failure messages).
    pub fn error_log(&self) -> String {
        fs::read_to_string(&self.error_log).unwrap_or_default()
    }

    /// nginx's access log so far (one line per proxied request).
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        terminate(&mut self.child, Signal::SIGTERM, Duration::from_secs(5));
    }
}

fn nginx_conf(dir: &Path, port: u16, upstream: &str, cert: &Path, key: &Path) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/client_body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    client_max_body_size 0;
    location / {{
      proxy_pass {upstream};
      proxy_request_buffering off;
      proxy_buffering off;
      proxy_http_version 1.1;
      proxy_set_header Host $http_host;
      proxy_read_timeout 300s;
      proxy_send_timeout 300s;
    }}
  }}
}}
"#,
        cert = cert.display(),
        key = key.display(),
    )
}

/// Polls until a TLS handshake on `port` verifies against `ca_pem` (as 127.0.0.1), the child
/// exits, or the deadline passes.
fn wait_tls(child: &mut Child, port: u16, ca_pem: &[u8], deadline: Instant) -> anyhow::Result<()> {
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("nginx exited early with {status}");
        }
        let last = match tls_handshake(port, ca_pem) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            bail!("no TLS handshake before the deadline (last: {last:#})");
        }
        std::thread::sleep(POLL);
    }
}

fn tls_handshake(port: u16, ca_pem: &[u8]) -> anyhow::Result<()> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from("127.0.0.1")?.to_owned();
    let mut tls = rustls::ClientConnection::new(Arc::new(config), name)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut socket = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    socket.set_write_timeout(Some(Duration::from_secs(2)))?;
    while tls.is_handshaking() {
        tls.complete_io(&mut socket)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL cluster
// ---------------------------------------------------------------------------------------------

/// A throwaway PostgreSQL 15 cluster owned by the `postgres` OS user in a temporary directory,
/// listening only on a unix socket (`socket_dir`, `port`). The postmaster is a child of the
/// test process (so it dies with it); stopped with a fast shutdown on drop.
pub struct PgCluster {
    pub port: u16,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub log_file: PathBuf,
    /// `-c name=value` settings given to the postmaster (they override the config files).
    pub settings: Vec<(String, String)>,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl PgCluster {
    /// `initdb` a fresh cluster and start it with `archive_mode=on` and an empty
    /// `archive_command` (WAL is kept until [`PgBackRest::enable_archiving`] sets one).
    pub fn init() -> anyhow::Result<PgCluster> {
        let mut cluster = Self::empty("pg-cluster-")?;
        let mut initdb = as_postgres(format!("{}/initdb", pg_bin()), cluster.dir.path())?;
        initdb
            .arg("-D")
            .arg(&cluster.data_dir)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "--encoding=UTF8",
                "--locale=C",
            ])
            .args(["--no-sync", "--no-instructions"]);
        run_command(initdb, SHORT_COMMAND_DEADLINE)?;
        cluster.set("archive_mode", "on");
        cluster.start()?;
        Ok(cluster)
    }

    /// A cluster whose data directory does not exist yet (created empty, 0700, for a restore);
    /// start it with [`PgCluster::start`] once the data directory is filled.
    pub fn empty(prefix: &str) -> anyhow::Result<PgCluster> {
        let dir = postgres_tempdir(prefix)?;
        let data_dir = dir.path().join("data");
        let socket_dir = dir.path().join("socket");
        postgres_dir(&socket_dir)?;
        let mut cluster = PgCluster {
            port: free_port(),
            log_file: dir.path().join("postgres.log"),
            data_dir,
            socket_dir,
            settings: Vec::new(),
            child: None,
            dir,
        };
        cluster.set("listen_addresses", "");
        // A throwaway cluster: durability is not what is tested.
        cluster.set("fsync", "off");
        cluster.set("logging_collector", "off");
        Ok(cluster)
    }

    /// Sets (or replaces) a `-c name=value` startup setting; takes effect at the next start.
    pub fn set(&mut self, name: &str, value: &str) {
        self.settings.retain(|(n, _)| n != name);
        self.settings.push((name.to_owned(), value.to_owned()));
    }

    /// The temporary directory holding the data directory, socket and log.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the postmaster and waits until it accepts connections. Returns the wait.
    pub fn start(&mut self) -> anyhow::Result<Duration> {
        if self.child.is_some() {
            bail!("cluster already running");
        }
        let started = Instant::now();
        let mut command = as_postgres(format!("{}/postgres", pg_bin()), self.dir.path())?;
        command
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(&self.socket_dir);
        for (name, value) in &self.settings {
            command.arg("-c").arg(format!("{name}={value}"));
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SIGQUIT: immediate shutdown, which also ends every backend.
        let child = spawn_tied(command, Signal::SIGQUIT).context("starting postgres")?;
        self.child = Some(child);
        let deadline = started + PG_START_DEADLINE;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "postgres exited during start-up with {status}\n--- log ---\n{}",
                    self.log()
                );
            }
            let mut ready = as_postgres(format!("{}/pg_isready", pg_bin()), self.dir.path())?;
            ready.arg("-h").arg(&self.socket_dir).args([
                "-p",
                &self.port.to_string(),
                "-d",
                "postgres",
                "-t",
                "2",
            ]);
            if run_command(ready, Duration::from_secs(5)).is_ok() {
                return Ok(started.elapsed());
            }
            if Instant::now() >= deadline {
                bail!(
                    "postgres not ready within {PG_START_DEADLINE:?}\n--- log ---\n{}",
                    self.log()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Fast shutdown (SIGINT), SIGKILL after a deadline. Returns how long it took.
    pub fn stop(&mut self) -> Duration {
        let started = Instant::now();
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Signal::SIGINT, PG_STOP_DEADLINE);
        }
        started.elapsed()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Runs SQL through `psql` (unaligned, tuples only, stop on error); returns stdout trimmed.
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        let mut command = as_postgres(format!("{}/psql", pg_bin()), self.dir.path())?;
        command
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string(), "-d", "postgres", "-c", sql]);
        let run = run_command(command, SHORT_COMMAND_DEADLINE)?;
        Ok(run.stdout.trim().to_owned())
    }

    /// Polls `sql` until it returns `expected` or the deadline passes.
    pub fn wait_for(&self, sql: &str, expected: &str, deadline: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + deadline;
        loop {
            let got = self.psql(sql);
            if matches!(&got, Ok(value) if value == expected) {
                return Ok(());
            }
            if Instant::now() >= until {
                bail!("`{sql}` did not return {expected:?} within {deadline:?} (last: {got:?})");
            }
            std::thread::sleep(POLL);
        }
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_file).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// pgBackRest
// ---------------------------------------------------------------------------------------------

/// Where repo2 lives: an S3 bucket reached through a [`TlsProxy`].
#[derive(Debug, Clone)]
pub struct S3Repo {
    pub bucket: String,
    pub region: String,
    /// `repo2-s3-endpoint` (pgBackRest also sends it as the Host header).
    pub endpoint: String,
    pub port: u16,
    /// `repo2-storage-ca-file`; `None` means `repo2-storage-verify-tls=n`.
    pub ca_file: Option<PathBuf>,
    /// `repo2-path`, e.g. `/pgbackrest/<namespace>/<name>/repo2`.
    pub path: String,
}

impl S3Repo {
    /// The repository behind `proxy`, with the PostgresCluster layout
    /// `repo2-path=/pgbackrest/<namespace>/<name>/repo2`.
    pub fn behind(
        proxy: &TlsProxy,
        bucket: &str,
        region: &str,
        namespace: &str,
        name: &str,
    ) -> S3Repo {
        S3Repo {
            bucket: bucket.to_owned(),
            region: region.to_owned(),
            endpoint: "127.0.0.1".to_owned(),
            port: proxy.port,
            ca_file: Some(proxy.ca_file.clone()),
            path: repo_path(namespace, name),
        }
    }

    /// The S3 key prefix under which pgBackRest stores this repository (no leading slash).
    pub fn key_prefix(&self) -> String {
        format!("{}/", self.path.trim_matches('/'))
    }
}

/// `/pgbackrest/<namespace>/<name>/repo2`, as in the PostgresCluster fragment.
pub fn repo_path(namespace: &str, name: &str) -> String {
    format!("/pgbackrest/{namespace}/{name}/repo2")
}

/// A pgBackRest configuration for stanza [`STANZA`] of one [`PgCluster`]: `pgbackrest.conf`
/// (repo2 on S3, no credentials) in `config_dir`, and the Secret's `s3.conf` verbatim in
/// `include_dir` (passed as `--config-include-path`). Commands run as the `postgres` user.
pub struct PgBackRest {
    pub config_dir: PathBuf,
    pub config_file: PathBuf,
    pub include_dir: PathBuf,
    pub s3_conf_path: PathBuf,
    pub repo: S3Repo,
    dir: tempfile::TempDir,
}

impl PgBackRest {
    /// Writes the configuration for `pg` and `repo`; `s3_conf` is the Secret's `s3.conf` text.
    pub fn new(repo: S3Repo, s3_conf: &str, pg: &PgCluster) -> anyhow::Result<PgBackRest> {
        let dir = postgres_tempdir("pgbackrest-")?;
        let config_dir = dir.path().join("config");
        let include_dir = dir.path().join("conf.d");
        for sub in ["config", "conf.d", "log", "lock", "spool"] {
            postgres_dir(&dir.path().join(sub))?;
        }
        let config_file = config_dir.join("pgbackrest.conf");
        let s3_conf_path = include_dir.join("s3.conf");
        postgres_file(&config_file, &pgbackrest_conf(dir.path(), &repo, pg))?;
        postgres_file(&s3_conf_path, s3_conf)?;
        Ok(PgBackRest {
            config_dir,
            config_file,
            include_dir,
            s3_conf_path,
            repo,
            dir,
        })
    }

    /// The options every command gets (`--config`, `--config-include-path`, `--stanza`).
    pub fn base_args(&self) -> Vec<String> {
        vec![
            format!("--config={}", self.config_file.display()),
            format!("--config-include-path={}", self.include_dir.display()),
            format!("--stanza={STANZA}"),
        ]
    }

    /// `archive_command` for the cluster.
    pub fn archive_command(&self) -> String {
        format!("pgbackrest {} archive-push %p", self.base_args().join(" "))
    }

    /// Points the running cluster's `archive_command` at this repository (ALTER SYSTEM and a
    /// reload; `archive_mode=on` is already set by [`PgCluster::init`]).
    pub fn enable_archiving(&self, pg: &PgCluster) -> anyhow::Result<()> {
        let command = self.archive_command();
        pg.psql(&format!(
            "ALTER SYSTEM SET archive_command = '{}'",
            command.replace('\'', "''")
        ))?;
        pg.psql("SELECT pg_reload_conf()")?;
        pg.wait_for("SHOW archive_command", &command, Duration::from_secs(10))
    }

    /// Runs `pgbackrest <base args> <args>` as the postgres user.
    pub fn run(&self, args: &[&str]) -> Result<Run, CommandFailure> {
        let mut command = match as_postgres("pgbackrest", self.dir.path()) {
            Ok(command) => command,
            Err(e) => {
                return Err(CommandFailure {
                    command: format!("pgbackrest {}", args.join(" ")),
                    status: None,
                    elapsed: Duration::ZERO,
                    stdout: String::new(),
                    stderr: String::new(),
                    reason: format!("{e:#}"),
                });
            }
        };
        command.args(self.base_args()).args(args);
        run_command(command, PGBACKREST_DEADLINE)
    }

    pub fn stanza_create(&self) -> Result<Run, CommandFailure> {
        self.run(&["stanza-create"])
    }

    /// `check`: archiving and the repository work.
    pub fn check(&self) -> Result<Run, CommandFailure> {
        self.run(&["check"])
    }

    pub fn backup_full(&self) -> Result<Run, CommandFailure> {
        self.run(&["backup", "--type=full"])
    }

    /// `info` as JSON text.
    pub fn info_json(&self) -> Result<Run, CommandFailure> {
        self.run(&["info", "--output=json"])
    }

    /// Restores the latest backup into `data_dir` (which must be empty or absent; it is
    /// created 0700 for the postgres user), with archiving off in the restored cluster.
    pub fn restore_into(&self, data_dir: &Path) -> Result<Run, CommandFailure> {
        if let Err(e) = postgres_dir(data_dir) {
            return Err(CommandFailure {
                command: "pgbackrest restore".into(),
                status: None,
                elapsed: Duration::ZERO,
                stdout: String::new(),
                stderr: String::new(),
                reason: format!("{e:#}"),
            });
        }
        let pg1_path = format!("--pg1-path={}", data_dir.display());
        self.run(&["restore", &pg1_path, "--archive-mode=off"])
    }
}

fn pgbackrest_conf(dir: &Path, repo: &S3Repo, pg: &PgCluster) -> String {
    let d = dir.display();
    let tls = match &repo.ca_file {
        Some(ca) => format!("repo2-storage-ca-file={}", ca.display()),
        None => "repo2-storage-verify-tls=n".to_owned(),
    };
    format!(
        "[global]
repo2-type=s3
repo2-s3-endpoint={endpoint}
repo2-storage-port={port}
repo2-s3-bucket={bucket}
repo2-s3-region={region}
repo2-s3-uri-style=path
{tls}
repo2-cipher-type=aes-256-cbc
repo2-path={path}
log-path={d}/log
lock-path={d}/lock
spool-path={d}/spool
log-level-console=info
log-level-stderr=warn
log-level-file=off
start-fast=y

[{STANZA}]
pg1-path={data}
pg1-port={pg_port}
pg1-socket-path={socket}
",
        endpoint = repo.endpoint,
        port = repo.port,
        bucket = repo.bucket,
        region = repo.region,
        path = repo.path,
        data = pg.data_dir.display(),
        pg_port = pg.port,
        socket = pg.socket_dir.display(),
    )
}

// ---------------------------------------------------------------------------------------------
// The round trip
// ---------------------------------------------------------------------------------------------

/// What [`round_trip`] did and how long each phase took.
#[derive(Debug, Clone)]
pub struct RoundTripReport {
    /// `repo2-path`.
    pub repo_path: String,
    /// S3 key prefix of the repository (`repo_path` without the leading slash, plus `/`).
    pub key_prefix: String,
    /// The marker written before the backup and the value read from the restored cluster.
    pub marker: String,
    pub restored_marker: String,
    pub proxy_start: Duration,
    /// initdb + start + marker table.
    pub cluster_init: Duration,
    pub stanza_create: Duration,
    pub backup: Duration,
    pub restore: Duration,
    /// Start of the restored cluster until it accepts connections.
    pub restored_start: Duration,
    /// Until the restored cluster finished recovery (archive-get through the repository).
    pub recovery: Duration,
    pub total: Duration,
    /// pgBackRest's console output of the backup (has "full backup size = ...").
    pub backup_output: String,
}

impl fmt::Display for RoundTripReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pgBackRest round trip: proxy {:.2?}, cluster init {:.2?}, stanza-create {:.2?}, \
             backup {:.2?}, restore {:.2?}, restored start {:.2?}, recovery {:.2?}, total {:.2?}",
            self.proxy_start,
            self.cluster_init,
            self.stanza_create,
            self.backup,
            self.restore,
            self.restored_start,
            self.recovery,
            self.total
        )
    }
}

/// Backs a fresh cluster up to repo2 in `bucket` (through a TLS proxy in front of
/// `s3_endpoint`, a plain-http moto URL) using only the credentials in `s3_conf_text` (the
/// Secret's `s3.conf`), restores it into a fresh data directory, starts that on another port
/// and reads the marker row back. Fails (with pgBackRest's output and the logs) if any step
/// fails or the marker differs.
pub fn round_trip(
    s3_conf_text: &str,
    bucket: &str,
    region: &str,
    namespace: &str,
    name: &str,
    s3_endpoint: &str,
) -> anyhow::Result<RoundTripReport> {
    let started = Instant::now();
    let proxy = TlsProxy::try_start(s3_endpoint)?;
    let proxy_start = proxy.startup;
    let with_proxy_log = |e: anyhow::Error| {
        anyhow!(
            "{e:#}\n--- nginx error log ---\n{}",
            proxy.error_log().trim_end()
        )
    };

    let phase = Instant::now();
    let mut source = PgCluster::init().context("initdb/start of the source cluster")?;
    let repo = S3Repo::behind(&proxy, bucket, region, namespace, name);
    let pgbackrest = PgBackRest::new(repo.clone(), s3_conf_text, &source)?;
    let marker = uuid::Uuid::new_v4().to_string();
    source.psql(&format!(
        "CREATE TABLE backup_marker (id int PRIMARY KEY, value text NOT NULL); \
         INSERT INTO backup_marker VALUES (1, '{marker}')"
    ))?;
    let cluster_init = phase.elapsed();

    let stanza_create = pgbackrest
        .stanza_create()
        .context("stanza-create")
        .map_err(with_proxy_log)?
        .elapsed;
    pgbackrest
        .enable_archiving(&source)
        .context("archive_command")?;
    let backup = pgbackrest
        .backup_full()
        .context("full backup")
        .map_err(|e| anyhow!("{e:#}\n--- postgres log ---\n{}", source.log()))
        .map_err(with_proxy_log)?;
    source.stop();

    let mut restored = PgCluster::empty("pg-restored-")?;
    let restore = pgbackrest
        .restore_into(&restored.data_dir)
        .context("restore")
        .map_err(with_proxy_log)?
        .elapsed;
    // The restored postgresql.auto.conf keeps the source's archive_command; no archiving here.
    restored.set("archive_mode", "off");
    let restored_start = restored.start().context("start of the restored cluster")?;
    let phase = Instant::now();
    let restored_marker = restored
        .psql("SELECT value FROM backup_marker WHERE id = 1")
        .context("marker query on the restored cluster")?;
    restored
        .wait_for("SELECT pg_is_in_recovery()", "f", Duration::from_secs(60))
        .map_err(|e| anyhow!("{e:#}\n--- restored postgres log ---\n{}", restored.log()))?;
    let recovery = restored_start + phase.elapsed();
    if restored_marker != marker {
        bail!("restored marker {restored_marker:?} differs from the backed-up {marker:?}");
    }
    restored.stop();

    Ok(RoundTripReport {
        repo_path: repo.path.clone(),
        key_prefix: repo.key_prefix(),
        marker,
        restored_marker,
        proxy_start,
        cluster_init,
        stanza_create,
        backup: backup.elapsed,
        restore,
        restored_start,
        recovery,
        total: started.elapsed(),
        backup_output: backup.stdout,
    })
}

/// [`round_trip`] on the blocking thread pool, for async tests.
pub async fn round_trip_async(
    s3_conf_text: String,
    bucket: String,
    region: String,
    namespace: String,
    name: String,
    s3_endpoint: String,
) -> anyhow::Result<RoundTripReport> {
    tokio::task::spawn_blocking(move || {
        round_trip(
            &s3_conf_text,
            &bucket,
            &region,
            &namespace,
            &name,
            &s3_endpoint,
        )
    })
    .await
    .context("round trip task panicked")?
}

/// The Secret's `s3.conf` text for one access key and cipher pass (repo3 = repo2, as in the
/// runbook).
pub fn s3_conf(cipher_pass: &str, access_key_id: &str, secret_access_key: &str) -> String {
    format!(
        "[global]\n\
         repo2-cipher-pass={cipher_pass}\n\
         repo2-s3-key={access_key_id}\n\
         repo2-s3-key-secret={secret_access_key}\n\
         repo3-cipher-pass={cipher_pass}\n\
         repo3-s3-key={access_key_id}\n\
         repo3-s3-key-secret={secret_access_key}\n"
    )
}

// Assertions shared by the end-to-end tests.

pub async fn create_bucket(s3: &aws_sdk_s3::Client, bucket: &str, region: &str) {
    s3.create_bucket()
        .bucket(bucket)
        .create_bucket_configuration(
            aws_sdk_s3::types::CreateBucketConfiguration::builder()
                .location_constraint(aws_sdk_s3::types::BucketLocationConstraint::from(region))
                .build(),
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("create bucket {bucket}: {e:?}"));
}

/// Every object under `prefix` with its first bytes (at most 8), fetched by the admin.
pub async fn object_heads(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
) -> Vec<(String, i64, Vec<u8>)> {
    let mut keys = Vec::new();
    let mut pages = s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.expect("list objects");
        for object in page.contents() {
            keys.push((
                object.key().expect("object key").to_owned(),
                object.size().unwrap_or_default(),
            ));
        }
    }
    futures::stream::iter(keys)
        .map(|(key, size)| async move {
            if size == 0 {
                return (key, size, Vec::new());
            }
            let object = s3
                .get_object()
                .bucket(bucket)
                .key(&key)
                .range("bytes=0-7")
                .send()
                .await
                .unwrap_or_else(|e| panic!("get {key}: {e:?}"));
            let bytes = object
                .body
                .collect()
                .await
                .unwrap_or_else(|e| panic!("read {key}: {e:?}"))
                .into_bytes();
            (key, size, bytes[..bytes.len().min(8)].to_vec())
        })
        .buffer_unordered(8)
        .collect()
        .await
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
