-- Access key rotation without downtime (issue 10, item 3): the old key of a rotation stays
-- active for a grace period after the Secret holds the new one, is then deactivated, and is
-- deleted after a second period. One row per rotation, written in the transaction that records
-- the rotation's Secret step (`provision::rotate`), read by the key schedule
-- (`provision::key_schedule`) and by everything that deletes keys (a key whose row is pending is
-- never deleted by provisioning's retire step, its access key step or the sweep).
CREATE TABLE key_retirements (
    id                uuid PRIMARY KEY,
    repository_id     uuid NOT NULL REFERENCES backup_repositories (id),
    -- The rotate-access-key job that wrote the Secret (one row per rotation).
    rotation_job_id   uuid NOT NULL UNIQUE REFERENCES jobs (id),
    old_key_id        text NOT NULL,
    new_key_id        text NOT NULL,
    -- When the Secret was read back holding the new key: a use of the old key after this is a
    -- consumer that did not move.
    secret_changed_at timestamptz NOT NULL,
    deactivate_after  timestamptz NOT NULL,
    delete_after      timestamptz NOT NULL,
    deactivated_at    timestamptz,
    deleted_at        timestamptz,
    -- GetAccessKeyLastUsed of the old key, read before it was deactivated.
    last_used         jsonb,
    -- The retirement stopped and waits for an operator (e.g. the Secret references the old key
    -- again); the key is kept, and no deletion path touches it.
    halted_at         timestamptz,
    halt_reason       text,
    -- A later rotation scheduled the same old key again (after a halt): this row is closed.
    superseded_at     timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CHECK (delete_after >= deactivate_after),
    CHECK (old_key_id <> new_key_id)
);
-- The keys no deletion path may touch, and what the schedule looks at.
CREATE INDEX key_retirements_pending ON key_retirements (repository_id)
    WHERE deleted_at IS NULL AND superseded_at IS NULL;
CREATE INDEX key_retirements_due ON key_retirements (deactivate_after, delete_after)
    WHERE deleted_at IS NULL AND superseded_at IS NULL AND halted_at IS NULL;
