//! pgBackRest's repository layout, as far as freshness needs it (names only: nothing is read
//! or decrypted; pgBackRest encrypts file contents, never names).
//!
//! ```text
//! <repo-path>/backup/<stanza>/backup.info                     rewritten by expire, stanza-create
//! <repo-path>/backup/<stanza>/<label>/backup.manifest         written last: the backup completed
//! <repo-path>/backup/<stanza>/<label>/backup.manifest.copy    written first and while it runs
//! <repo-path>/archive/<stanza>/archive.info
//! <repo-path>/archive/<stanza>/<pg-version>-<id>/<timeline+log, 16 hex>/<segment>-<sha1>[.gz|.lz4|.zst]
//! <repo-path>/archive/<stanza>/<pg-version>-<id>/<timeline>.history
//! ```
//!
//! A backup label is `YYYYMMDD-HHMMSSF` for a full backup, and the full backup's label followed
//! by `_YYYYMMDD-HHMMSSD` (differential) or `_YYYYMMDD-HHMMSSI` (incremental) otherwise.

/// The object whose presence means a backup completed, and whose `LastModified` is when.
pub const MANIFEST: &str = "backup.manifest";

/// A backup's label, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupLabel {
    /// The label as stored (the directory's name).
    pub label: String,
    /// A full backup (`…F`), not a differential or incremental one.
    pub full: bool,
    /// When the backup started (`YYYYMMDD-HHMMSS`, the last timestamp of the label): labels
    /// compare in time by it.
    pub started: String,
}

impl BackupLabel {
    /// The label of a directory name, or None for anything else (`backup.history`, …).
    pub fn parse(name: &str) -> Option<BackupLabel> {
        let (full_part, rest) = name.split_at_checked(16)?;
        let full_started = full_part.strip_suffix('F').filter(|t| is_timestamp(t))?;
        let (full, started) = match rest {
            "" => (true, full_started),
            _ => {
                let rest = rest.strip_prefix('_')?;
                let started = rest
                    .strip_suffix('D')
                    .or_else(|| rest.strip_suffix('I'))
                    .filter(|t| is_timestamp(t))?;
                (false, started)
            }
        };
        Some(BackupLabel {
            label: name.to_owned(),
            full,
            started: started.to_owned(),
        })
    }
}

/// `YYYYMMDD-HHMMSS`.
fn is_timestamp(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() == 15
        && bytes[8] == b'-'
        && bytes
            .iter()
            .enumerate()
            .all(|(i, b)| i == 8 || b.is_ascii_digit())
}

/// The backup labels among the directory names of a stanza, newest first.
pub fn labels_newest_first<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<BackupLabel> {
    let mut labels: Vec<BackupLabel> = names.into_iter().filter_map(BackupLabel::parse).collect();
    labels.sort_by(|a, b| (&b.started, &b.label).cmp(&(&a.started, &a.label)));
    labels
}

/// The archive directory of the newest PostgreSQL version among `<pg-version>-<id>` names:
/// the highest id (`stanza-upgrade` adds one), which string order cannot tell (`9.6-1`, `15-2`).
pub fn newest_archive_id<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    names
        .into_iter()
        .filter_map(|name| {
            let (_, id) = name.rsplit_once('-')?;
            Some((id.parse::<u64>().ok()?, name))
        })
        .max()
        .map(|(_, name)| name)
}

/// The newest WAL directory among `<timeline><log>` names (16 upper-case hex digits each, so
/// string order is time order: a later timeline or log sorts after).
pub fn newest_wal_dir<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    names
        .into_iter()
        .filter(|name| name.len() == 16 && name.bytes().all(|b| b.is_ascii_hexdigit()))
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_tell_full_from_differential_and_incremental_backups() {
        let full = BackupLabel::parse("20261201-010000F").expect("full");
        assert!(full.full);
        assert_eq!(full.started, "20261201-010000");
        let diff = BackupLabel::parse("20261201-010000F_20261202-010000D").expect("diff");
        assert!(!diff.full);
        assert_eq!(diff.started, "20261202-010000");
        let incr = BackupLabel::parse("20261201-010000F_20261202-030000I").expect("incr");
        assert!(!incr.full);
        for other in [
            "backup.history",
            "backup.info",
            "20261201-010000D",
            "20261201-010000F_",
            "20261201-010000F_20261202-010000F",
            "2026120a-010000F",
            "20261201-010000Fx",
            "20261201-010000F_20261202-010000DX",
            "",
        ] {
            assert_eq!(BackupLabel::parse(other), None, "{other}");
        }
    }

    #[test]
    fn labels_sort_by_when_each_backup_started_not_by_name() {
        let names = [
            "20261201-010000F",
            "20261201-010000F_20261203-010000D",
            "20261202-120000F",
            "backup.history",
        ];
        let sorted: Vec<String> = labels_newest_first(names)
            .into_iter()
            .map(|l| l.label)
            .collect();
        // By name the differential sorts before the later full backup; by time it is newer.
        assert_eq!(
            sorted,
            [
                "20261201-010000F_20261203-010000D",
                "20261202-120000F",
                "20261201-010000F"
            ]
        );
    }

    #[test]
    fn the_newest_archive_id_is_the_highest_id_and_the_newest_wal_dir_the_highest_name() {
        assert_eq!(
            newest_archive_id(["9.6-1", "15-2", "archive.info"]),
            Some("15-2")
        );
        assert_eq!(newest_archive_id(["15-1"]), Some("15-1"));
        assert_eq!(newest_archive_id(["archive.info"]), None);
        assert_eq!(
            newest_wal_dir(["0000000100000000", "0000000200000000", "00000001000000FF"]),
            Some("0000000200000000")
        );
        assert_eq!(newest_wal_dir(["00000002.history"]), None);
    }
}
