-- Backup freshness (issue 13, item 4): what the periodic freshness check (provision::freshness)
-- last saw in each ready repository's bucket, one row per repository, written by the replica
-- holding the freshness lock. A table of its own, not columns of backup_repositories: a check
-- every few minutes must neither touch a repository's `updated_at` (the periodic verification
-- counts from it) nor lock the row its jobs' trigger updates.
--
-- newest_backup_at       LastModified of the newest completed backup's `backup.manifest`
--                        (any type: full, differential, incremental)
-- newest_full_backup_at  the same, full backups only (labels ending in `F`)
-- newest_wal_at          LastModified of the newest archived WAL object (archive/<stanza>/…)
-- checked_at             when a check last succeeded (NULL before the first success)
-- attempted_at           when a check was last attempted
-- error                  why the last attempt failed; NULL when it succeeded
-- The newest_* columns are NULL when nothing of the kind was found, and keep their values when
-- an attempt fails (they are still lower bounds of the truth).
CREATE TABLE backup_freshness (
    repository_id          uuid PRIMARY KEY REFERENCES backup_repositories (id) ON DELETE CASCADE,
    newest_backup_at       timestamptz NULL,
    newest_full_backup_at  timestamptz NULL,
    newest_wal_at          timestamptz NULL,
    checked_at             timestamptz NULL,
    attempted_at           timestamptz NOT NULL,
    error                  text NULL
);

CREATE INDEX backup_freshness_attempted ON backup_freshness (attempted_at);
