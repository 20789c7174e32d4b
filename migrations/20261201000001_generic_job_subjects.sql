-- The job engine is generic: a job has a subject (an id and a display name) instead of a
-- repository. Which table a subject lives in, and how it follows its jobs, is the business of
-- the job kinds: for backup repositories that is the trigger below, so the repository's state
-- changes in the same transaction as the job's, whoever changes the job.

ALTER TABLE jobs RENAME COLUMN repository_id TO subject_id;
ALTER TABLE jobs RENAME CONSTRAINT jobs_repository_id_fkey TO jobs_subject_id_fkey;
ALTER INDEX jobs_repository RENAME TO jobs_subject;
ALTER INDEX jobs_one_active_per_repository RENAME TO jobs_one_active_per_subject;

-- Shown in audit entries and job views without reading the kind's payload.
ALTER TABLE jobs ADD COLUMN subject_name text;
UPDATE jobs SET subject_name = payload ->> 'repository' WHERE subject_id IS NOT NULL;

-- A repository's state follows its latest job:
--   queued (new, or retried by an operator)  -> pending
--   running, or queued again after an attempt -> provisioning
--   succeeded -> ready; failed -> failed; cancelled -> cancelled
-- Its last_error is the error of the attempt that just ended (cleared when the job succeeds or
-- is cancelled while running).
CREATE FUNCTION backup_repository_follows_job() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    next_state text;
    attempt_ended boolean := TG_OP = 'UPDATE' AND OLD.state = 'running';
BEGIN
    IF NEW.subject_id IS NULL OR (TG_OP = 'UPDATE' AND NEW.state = OLD.state) THEN
        RETURN NULL;
    END IF;
    next_state := CASE
        WHEN NEW.state = 'queued' AND attempt_ended THEN 'provisioning'
        WHEN NEW.state = 'queued' THEN 'pending'
        WHEN NEW.state = 'running' THEN 'provisioning'
        WHEN NEW.state = 'succeeded' THEN 'ready'
        ELSE NEW.state
    END;
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
CREATE TRIGGER backup_repository_follows_job_insert AFTER INSERT ON jobs
    FOR EACH ROW EXECUTE FUNCTION backup_repository_follows_job();
CREATE TRIGGER backup_repository_follows_job_update AFTER UPDATE OF state ON jobs
    FOR EACH ROW EXECUTE FUNCTION backup_repository_follows_job();
