//! The round trip (backup, restore, marker read back) and assertions shared by the end-to-end
//! tests.

use super::*;

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
    let settings = RepoSettings::for_cluster(bucket, region, namespace, name);
    round_trip_with(s3_conf_text, &settings, s3_endpoint)
}

/// [`round_trip`] with repo2 configured by `settings` (e.g. taken from a PostgresCluster
/// fragment).
pub fn round_trip_with(
    s3_conf_text: &str,
    settings: &RepoSettings,
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
    let repo = S3Repo::behind(&proxy, settings);
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

/// [`round_trip_with`] on the blocking thread pool, for async tests.
pub async fn round_trip_with_async(
    s3_conf_text: String,
    settings: RepoSettings,
    s3_endpoint: String,
) -> anyhow::Result<RoundTripReport> {
    tokio::task::spawn_blocking(move || round_trip_with(&s3_conf_text, &settings, &s3_endpoint))
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
