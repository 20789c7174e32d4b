//! A throwaway PostgreSQL cluster run as the `postgres` OS user.

use super::*;

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
