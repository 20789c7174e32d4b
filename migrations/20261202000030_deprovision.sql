-- Deprovisioning (issue 10, day-2 operations): a repository can be deleted. Its record and its
-- audit history stay, in the new state `deleted`; while its deprovision job is queued or
-- running it is `deprovisioning`.

ALTER TABLE backup_repositories DROP CONSTRAINT backup_repositories_state_check;
ALTER TABLE backup_repositories ADD CONSTRAINT backup_repositories_state_check
    CHECK (state IN ('pending', 'provisioning', 'ready', 'failed', 'cancelled',
                     'deprovisioning', 'deleted'));

-- Names and buckets are unique among the repositories that are not deleted: the same name
-- created again after a deletion is a new row (a new id) that shares only the audit history
-- (audit entries name the repository). The indexes keep the constraints' names, which the code
-- matches on (`backup_repositories_bucket_key`); `ON CONFLICT` names the predicate.
ALTER TABLE backup_repositories DROP CONSTRAINT backup_repositories_name_key;
CREATE UNIQUE INDEX backup_repositories_name_key
    ON backup_repositories (name) WHERE state <> 'deleted';
ALTER TABLE backup_repositories DROP CONSTRAINT backup_repositories_bucket_key;
CREATE UNIQUE INDEX backup_repositories_bucket_key
    ON backup_repositories (bucket) WHERE state <> 'deleted';
-- The deleted ones of a name, newest first (GET shows the latest deleted one).
CREATE INDEX backup_repositories_name_deleted
    ON backup_repositories (name, updated_at DESC) WHERE state = 'deleted';

-- A repository's state follows its jobs, by kind:
--   provision-repository, adopt-repository (and any other kind): as before
--     queued (new, or retried by an operator)  -> pending
--     running, or queued again after an attempt -> provisioning
--     succeeded -> ready; failed -> failed; cancelled -> cancelled
--   verify-repository, rotate-access-key, retire-access-key: never change the state (nor
--     last_error): a repository stays ready while its key is rotated or it is verified;
--   deprovision-repository:
--     queued, running -> deprovisioning; succeeded -> deleted; failed -> failed;
--     cancelled -> cancelled.
-- last_error is the error of the attempt that just ended (cleared when the job succeeds or is
-- cancelled while running).
CREATE OR REPLACE FUNCTION backup_repository_follows_job() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    next_state text;
    attempt_ended boolean := TG_OP = 'UPDATE' AND OLD.state = 'running';
BEGIN
    IF NEW.subject_id IS NULL OR (TG_OP = 'UPDATE' AND NEW.state = OLD.state) THEN
        RETURN NULL;
    END IF;
    IF NEW.kind IN ('verify-repository', 'rotate-access-key', 'retire-access-key') THEN
        RETURN NULL;
    END IF;
    IF NEW.kind = 'deprovision-repository' THEN
        next_state := CASE
            WHEN NEW.state IN ('queued', 'running') THEN 'deprovisioning'
            WHEN NEW.state = 'succeeded' THEN 'deleted'
            ELSE NEW.state
        END;
    ELSE
        next_state := CASE
            WHEN NEW.state = 'queued' AND attempt_ended THEN 'provisioning'
            WHEN NEW.state = 'queued' THEN 'pending'
            WHEN NEW.state = 'running' THEN 'provisioning'
            WHEN NEW.state = 'succeeded' THEN 'ready'
            ELSE NEW.state
        END;
    END IF;
    UPDATE backup_repositories
       SET state = next_state,
           updated_at = now(),
           last_error = CASE
               WHEN NOT attempt_ended THEN last_error
               WHEN NEW.state IN ('succeeded', 'cancelled') THEN NULL
               WHEN NEW.last_error IS DISTINCT FROM OLD.last_error THEN NEW.last_error
               ELSE last_error
           END
     WHERE id = NEW.subject_id;
    RETURN NULL;
END;
$$;

-- The operators' job listing (`GET /v1/jobs`): newest first, optionally by repository name.
CREATE INDEX jobs_created ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_subject_name ON jobs (subject_name, created_at DESC, id DESC);
