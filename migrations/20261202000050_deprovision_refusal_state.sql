-- A deprovision that changed nothing leaves the repository as it was (issue 10 review).
--
-- Before: a deprovisioning job that failed or was cancelled made its repository `failed` /
-- `cancelled` even when it was refused before any change (an IAM user not ours, a non-empty
-- bucket without `force`) or cancelled before its first step: a healthy repository then
-- dropped out of the verify sweep and the automatic rotation, which select `ready`.
--
-- Now the repository remembers the state it had when its deprovisioning was queued
-- (`state_before_deprovision`, set when it becomes `deprovisioning`), and a deprovisioning job
-- that fails or is cancelled with no step done (no succeeded `job_steps` row; the job undoes
-- its key deactivation on the way out, which puts that step back to pending) gives it that
-- state back, its `last_error` unchanged (the refusal is the job's `last_error` and in the
-- audit log). A job that ends with steps done makes it `failed` / `cancelled` as before: it is
-- partly deleted. When it ends after deactivating the keys but before removing the Secret
-- (the undoing failed, or no worker ran it: cancelled while queued for a retry, out of
-- attempts after its worker died), the repository's `last_error` names the inactive keys and
-- how to reactivate them.

ALTER TABLE backup_repositories ADD COLUMN state_before_deprovision text;

-- The message for keys a deprovisioning job left inactive while the Secret may still
-- reference one; NULL when there are none.
CREATE FUNCTION deprovision_stranded_keys(job jobs) RETURNS text LANGUAGE plpgsql STABLE AS $$
DECLARE
    deactivated jsonb;
    user_name text := job.payload ->> 'bucket';
BEGIN
    SELECT coalesce(output, 'null') INTO deactivated FROM job_steps
     WHERE job_id = job.id AND step = 'deactivate_keys' AND state = 'succeeded';
    IF NOT FOUND OR EXISTS (SELECT 1 FROM job_steps
                             WHERE job_id = job.id AND step = 'remove_secret'
                               AND state = 'succeeded') THEN
        RETURN NULL;
    END IF;
    RETURN format(
        'the deprovisioning ended (%s) after deactivating access keys %s of IAM user %s but '
        'before removing the Secret, which still references one of them: whatever uses it is '
        'denied. Retry the job to finish the deprovisioning, or make the keys active again: '
        'aws iam update-access-key --user-name %s --access-key-id <id> --status Active',
        job.state,
        CASE WHEN jsonb_typeof(deactivated) = 'array'
             THEN (SELECT coalesce(nullif(string_agg(k, ', '), ''), '(none)')
                     FROM jsonb_array_elements_text(deactivated) AS k)
             ELSE '(all of them)' END,
        user_name, user_name);
END;
$$;

-- As in 20261202000030, except for a deprovisioning job that fails or is cancelled (above).
CREATE OR REPLACE FUNCTION backup_repository_follows_job() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    next_state text;
    attempt_ended boolean := TG_OP = 'UPDATE' AND OLD.state = 'running';
    restored boolean := false;
    stranded text;
BEGIN
    IF NEW.subject_id IS NULL OR (TG_OP = 'UPDATE' AND NEW.state = OLD.state) THEN
        RETURN NULL;
    END IF;
    IF NEW.kind IN ('verify-repository', 'rotate-access-key', 'retire-access-key') THEN
        RETURN NULL;
    END IF;
    IF NEW.kind = 'deprovision-repository' THEN
        IF NEW.state IN ('queued', 'running') THEN
            next_state := 'deprovisioning';
        ELSIF NEW.state = 'succeeded' THEN
            next_state := 'deleted';
        ELSIF NOT EXISTS (SELECT 1 FROM job_steps
                           WHERE job_id = NEW.id AND state = 'succeeded') THEN
            SELECT state_before_deprovision INTO next_state
              FROM backup_repositories WHERE id = NEW.subject_id;
            restored := next_state IS NOT NULL;
            next_state := coalesce(next_state, NEW.state);
        ELSE
            next_state := NEW.state;
            stranded := deprovision_stranded_keys(NEW);
        END IF;
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
       SET state_before_deprovision = CASE
               WHEN next_state = 'deprovisioning' AND state <> 'deprovisioning' THEN state
               ELSE state_before_deprovision
           END,
           state = next_state,
           updated_at = now(),
           last_error = CASE
               WHEN restored THEN last_error
               WHEN stranded IS NOT NULL THEN concat_ws('. ', NEW.last_error, stranded)
               WHEN NOT attempt_ended THEN last_error
               WHEN NEW.state IN ('succeeded', 'cancelled') THEN NULL
               WHEN NEW.last_error IS DISTINCT FROM OLD.last_error THEN NEW.last_error
               ELSE last_error
           END
     WHERE id = NEW.subject_id;
    RETURN NULL;
END;
$$;
