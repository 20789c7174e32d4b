//! A Postgres cluster of one test's own, for tests that stop or restart the server: `initdb` and
//! `pg_ctl` (from `PG_BIN_DIR`, else the newest `/usr/lib/postgresql/*/bin`) into a temporary
//! directory, on a free loopback port, trust authentication for `postgres`. The machine's
//! cluster on 5432 is shared by every test and is never restarted.
//!
//! As root (CI containers), the cluster runs as the `postgres` user (`initdb` refuses root).
//! Dropping it stops the server (immediate mode) and deletes the directory; a test process
//! that is killed leaves the server running (it holds nothing the next run needs: other
//! directory, other port).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sqlx::{Connection, PgConnection};

use super::app::free_port;

pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

impl PrivatePostgres {
    /// Initializes and starts a cluster; panics with the tool's output if that fails.
    pub fn start() -> PrivatePostgres {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("bp-private-pg-")
            .tempdir()
            .expect("temporary directory");
        if is_root() {
            let (uid, gid) = postgres_user();
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("chown the private cluster's directory");
        }
        let data = dir.path().join("data");
        let init = run(
            &bin,
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        assert!(init.status.success(), "initdb failed:\n{}", text(&init));
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port();
            match start_server(&bin, dir.path(), port) {
                Ok(()) => return PrivatePostgres { dir, bin, port },
                // The port may have been taken meanwhile: another one.
                Err(e) => last = e,
            }
        }
        panic!("the private Postgres did not start: {last}");
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `postgres://postgres@127.0.0.1:PORT` (no database name).
    pub fn base_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// Creates database `name`; returns its URL.
    pub async fn create_database(&self, name: &str) -> String {
        let mut admin = PgConnection::connect(&format!("{}/postgres", self.base_url()))
            .await
            .expect("connect to the private Postgres");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create database");
        let _ = admin.close().await;
        format!("{}/{name}", self.base_url())
    }

    /// Starts the stopped server again on the same port.
    pub fn start_again(&self) {
        if let Err(e) = start_server(&self.bin, self.dir.path(), self.port) {
            panic!("restarting the private Postgres: {e}");
        }
    }

    /// Stops the server (`-m fast`: sessions are ended, as on a restart or failover).
    pub fn stop(&self) {
        let stopped = self.pg_ctl(&["-m", "fast", "-w", "-t", "60", "stop"]);
        assert!(stopped.status.success(), "pg_ctl stop: {}", text(&stopped));
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        let data = self.data();
        let mut all = vec!["-D", path_str(&data)];
        all.extend_from_slice(args);
        run(&self.bin, "pg_ctl", &all)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(LOG)).unwrap_or_default()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-m", "immediate", "-w", "-t", "30", "stop"]);
    }
}

const LOG: &str = "postgres.log";

/// `pg_ctl start` of the cluster in `dir` on `port`, waiting until it accepts connections.
fn start_server(bin: &Path, dir: &Path, port: u16) -> Result<(), String> {
    let options = format!(
        "-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
         -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
        path_str(dir)
    );
    let (data, log) = (dir.join("data"), dir.join(LOG));
    let started = run(
        bin,
        "pg_ctl",
        &[
            "-D",
            path_str(&data),
            "-l",
            path_str(&log),
            "-o",
            &options,
            "-w",
            "-t",
            "60",
            "start",
        ],
    );
    if started.status.success() {
        Ok(())
    } else {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        Err(format!("{}\n--- log ---\n{log}", text(&started)))
    }
}

/// Whether this process runs as root (`/proc/self` belongs to the effective user).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The uid and gid of the `postgres` user (`id`).
fn postgres_user() -> (u32, u32) {
    let id = |flag: &str| {
        let output = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("run id");
        assert!(
            output.status.success(),
            "no postgres user to run the private cluster as (initdb refuses root)"
        );
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse::<u32>()
            .expect("numeric id")
    };
    (id("-u"), id("-g"))
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs a Postgres tool, as `postgres` when this process is root.
fn run(bin: &Path, tool: &str, args: &[&str]) -> Output {
    let program = bin.join(tool);
    let mut command = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&program);
        c
    } else {
        Command::new(&program)
    };
    command
        .args(args)
        .env_remove("PGDATA")
        .env_remove("PGPORT")
        .current_dir("/")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()))
}

/// `PG_BIN_DIR`, else the newest `/usr/lib/postgresql/<version>/bin` holding `initdb`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).expect(
        "initdb and pg_ctl: set PG_BIN_DIR or install postgresql (/usr/lib/postgresql/*/bin)",
    )
}
