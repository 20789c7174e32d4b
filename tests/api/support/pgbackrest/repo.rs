//! pgBackRest: an S3 repository from an `s3.conf` text, and the commands run against it.

use super::*;

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
    /// Further `[global]` options of repo2 (`repo2-cipher-type`, retention), as a
    /// PostgresCluster's `spec.backups.pgbackrest.global` sets them.
    pub options: Vec<(String, String)>,
}

/// repo2 as a PostgresCluster fragment configures it: bucket, region, `repo2-path` and the
/// other `repo2-*` options of `spec.backups.pgbackrest.global`.
#[derive(Debug, Clone)]
pub struct RepoSettings {
    pub bucket: String,
    pub region: String,
    pub path: String,
    pub options: Vec<(String, String)>,
}

impl RepoSettings {
    /// The PostgresCluster layout (`repo2-path=/pgbackrest/<namespace>/<name>/repo2`) with
    /// client-side encryption.
    pub fn for_cluster(bucket: &str, region: &str, namespace: &str, name: &str) -> RepoSettings {
        RepoSettings {
            bucket: bucket.to_owned(),
            region: region.to_owned(),
            path: repo_path(namespace, name),
            options: vec![("repo2-cipher-type".into(), "aes-256-cbc".into())],
        }
    }
}

impl S3Repo {
    /// The repository of `settings` behind `proxy`.
    pub fn behind(proxy: &TlsProxy, settings: &RepoSettings) -> S3Repo {
        S3Repo {
            bucket: settings.bucket.clone(),
            region: settings.region.clone(),
            endpoint: "127.0.0.1".to_owned(),
            port: proxy.port,
            ca_file: Some(proxy.ca_file.clone()),
            path: settings.path.clone(),
            options: settings.options.clone(),
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
{options}
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
        options = repo
            .options
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("\n"),
        data = pg.data_dir.display(),
        pg_port = pg.port,
        socket = pg.socket_dir.display(),
    )
}
