-- Verify and repair drift (issue 10, item 2): the last verification of a repository, written by
-- a verify-repository job in the transaction of its last step. `verification` is the report
-- (one entry per resource: `resource`, `settings` with expected / actual / action) and `drift`,
-- the number of settings whose action is not `none`; `drift_count` repeats that number for
-- queries and metrics. All three stay NULL until the first verification.
ALTER TABLE backup_repositories
    ADD COLUMN verified_at  timestamptz NULL,
    ADD COLUMN verification jsonb NULL,
    ADD COLUMN drift_count  integer NULL;
