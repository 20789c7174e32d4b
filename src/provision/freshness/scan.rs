//! What a repository's prefix holds, found by listing (ListObjectsV2 with delimiter `/`, every
//! page) as the service's own identity: a few requests per repository however many files a
//! backup has, because only directory names and the objects that date a backup or a WAL
//! segment are listed (see [`super::layout`]).

use aws_sdk_s3::Client;
use chrono::{DateTime, Utc};

use super::layout::{self, BackupLabel, MANIFEST};
use crate::cloud::CloudError;
use crate::cloud::aws::classify;

const S3: &str = "s3";

/// The newest backups and WAL a repository holds (None: none found).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Found {
    /// When the newest completed backup of any type completed (its manifest's LastModified).
    pub newest_backup_at: Option<DateTime<Utc>>,
    /// The same for full backups only.
    pub newest_full_backup_at: Option<DateTime<Utc>>,
    /// LastModified of the newest archived WAL object (segment, or timeline history).
    pub newest_wal_at: Option<DateTime<Utc>>,
}

/// One level under a prefix: the names of the directories and objects directly under it
/// (relative to the prefix, without the trailing `/` of a directory).
#[derive(Debug, Default)]
struct Level {
    dirs: Vec<String>,
    objects: Vec<(String, DateTime<Utc>)>,
}

impl Level {
    fn dir_names(&self) -> impl Iterator<Item = &str> {
        self.dirs.iter().map(String::as_str)
    }

    fn newest_object(&self) -> Option<DateTime<Utc>> {
        self.objects.iter().map(|(_, at)| *at).max()
    }
}

/// Scans the repository whose S3 keys start with `repo_prefix` (`pgbackrest/<ns>/<name>/repo2/`).
pub async fn scan(s3: &Client, bucket: &str, repo_prefix: &str) -> Result<Found, CloudError> {
    let (newest_backup_at, newest_full_backup_at) =
        newest_backups(s3, bucket, &format!("{repo_prefix}backup/")).await?;
    let newest_wal_at = newest_wal(s3, bucket, &format!("{repo_prefix}archive/")).await?;
    Ok(Found {
        newest_backup_at,
        newest_full_backup_at,
        newest_wal_at,
    })
}

/// The newest completed backup of any type, and of type full, over every stanza.
async fn newest_backups(
    s3: &Client,
    bucket: &str,
    backup_prefix: &str,
) -> Result<(Option<DateTime<Utc>>, Option<DateTime<Utc>>), CloudError> {
    let (mut any, mut full) = (None, None);
    for stanza in level(s3, bucket, backup_prefix).await?.dirs {
        let stanza_prefix = format!("{backup_prefix}{stanza}/");
        let labels =
            layout::labels_newest_first(level(s3, bucket, &stanza_prefix).await?.dir_names());
        let newest = completed(s3, bucket, &stanza_prefix, labels.iter()).await?;
        // The newest completed backup is often the newest full one: no second look then.
        let newest_full = match &newest {
            Some((label, at)) if label.full => Some(*at),
            _ => completed(s3, bucket, &stanza_prefix, labels.iter().filter(|l| l.full))
                .await?
                .map(|(_, at)| at),
        };
        any = any.max(newest.map(|(_, at)| at));
        full = full.max(newest_full);
    }
    Ok((any, full))
}

/// The first of `labels` (newest first) whose backup completed, and when: the LastModified of
/// its `backup.manifest` (a backup running or aborted has only `backup.manifest.copy`).
async fn completed<'a>(
    s3: &Client,
    bucket: &str,
    stanza_prefix: &str,
    labels: impl Iterator<Item = &'a BackupLabel>,
) -> Result<Option<(&'a BackupLabel, DateTime<Utc>)>, CloudError> {
    for label in labels {
        let manifest = format!("{stanza_prefix}{}/{MANIFEST}", label.label);
        let found = level(s3, bucket, &manifest).await?;
        if let Some((_, at)) = found.objects.iter().find(|(rest, _)| rest.is_empty()) {
            return Ok(Some((label, *at)));
        }
    }
    Ok(None)
}

/// The newest archived WAL object over every stanza: in the newest archive id (PostgreSQL
/// version), its timeline history files and its newest WAL directory.
async fn newest_wal(
    s3: &Client,
    bucket: &str,
    archive_prefix: &str,
) -> Result<Option<DateTime<Utc>>, CloudError> {
    let mut newest = None;
    for stanza in level(s3, bucket, archive_prefix).await?.dirs {
        let stanza_prefix = format!("{archive_prefix}{stanza}/");
        let ids = level(s3, bucket, &stanza_prefix).await?;
        let Some(id) = layout::newest_archive_id(ids.dir_names()) else {
            continue;
        };
        let id_prefix = format!("{stanza_prefix}{id}/");
        let id_level = level(s3, bucket, &id_prefix).await?;
        newest = newest.max(id_level.newest_object());
        if let Some(dir) = layout::newest_wal_dir(id_level.dir_names()) {
            let segments = level(s3, bucket, &format!("{id_prefix}{dir}/")).await?;
            newest = newest.max(segments.newest_object());
        }
    }
    Ok(newest)
}

/// Every page of ListObjectsV2 of `prefix` with delimiter `/`.
async fn level(s3: &Client, bucket: &str, prefix: &str) -> Result<Level, CloudError> {
    let mut pages = s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .delimiter("/")
        .into_paginator()
        .send();
    let mut level = Level::default();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| classify(S3, "ListObjectsV2", e))?;
        let dirs = page.common_prefixes().iter().filter_map(|p| p.prefix());
        level.dirs.extend(
            dirs.filter_map(|p| p.strip_prefix(prefix))
                .map(|name| name.trim_end_matches('/').to_owned()),
        );
        for object in page.contents() {
            let (Some(key), Some(modified)) = (object.key(), object.last_modified()) else {
                continue;
            };
            if let (Some(name), Some(at)) = (key.strip_prefix(prefix), to_utc(modified)) {
                level.objects.push((name.to_owned(), at));
            }
        }
    }
    Ok(level)
}

fn to_utc(at: &aws_smithy_types::DateTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(at.secs(), at.subsec_nanos())
}
