-- Every transition of a job and of its steps, for GET /v1/jobs/{id}/events (Server-Sent
-- Events). `id` is the event's SSE `id:`: a client that reconnects with `Last-Event-ID` gets
-- the rows of its job with a greater id.
--
-- Why a bigserial is exact per job: every write of a job's row or of its steps' rows holds
-- the job's row lock until it commits (a worker's writes go through `fenced_tx`, which locks
-- the row first; cancel, retry and the rescuer update the job's row first), and the triggers
-- below take their id after that lock. So two transactions that record events of one job
-- never overlap, and within a job the ids are in commit order: once a reader has seen id N,
-- no event of that job with an id below N can still appear. (Across jobs the order is not
-- exact, and no reader relies on it.)
CREATE TABLE job_events (
    id          bigserial PRIMARY KEY,
    job_id      uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    kind        text NOT NULL CHECK (kind IN ('job', 'step')),
    -- Steps only: the step's name and position.
    step        text,
    position    integer,
    -- The job's or the step's state and attempt count after the transition.
    state       text NOT NULL,
    attempts    integer NOT NULL,
    last_error  text,
    started_at  timestamptz,
    finished_at timestamptz,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    CHECK ((kind = 'step') = (step IS NOT NULL))
);
CREATE INDEX job_events_job ON job_events (job_id, id);

-- A step's row changes state or starts another attempt.
CREATE FUNCTION job_steps_record_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.state IS DISTINCT FROM OLD.state
       OR NEW.attempts IS DISTINCT FROM OLD.attempts THEN
        INSERT INTO job_events (job_id, kind, step, position, state, attempts, last_error,
                                started_at, finished_at)
        VALUES (NEW.job_id, 'step', NEW.step, NEW.position, NEW.state, NEW.attempts,
                NEW.last_error, NEW.started_at, NEW.finished_at);
        PERFORM pg_notify('bp_job_events', NEW.job_id::text);
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER job_steps_record_event_insert AFTER INSERT ON job_steps
    FOR EACH ROW EXECUTE FUNCTION job_steps_record_event();
CREATE TRIGGER job_steps_record_event_update AFTER UPDATE ON job_steps
    FOR EACH ROW EXECUTE FUNCTION job_steps_record_event();

-- A job is queued or changes state.
CREATE FUNCTION jobs_record_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.state IS DISTINCT FROM OLD.state THEN
        INSERT INTO job_events (job_id, kind, state, attempts, last_error, started_at,
                                finished_at)
        VALUES (NEW.id, 'job', NEW.state, NEW.attempts, NEW.last_error, NEW.started_at,
                NEW.finished_at);
        PERFORM pg_notify('bp_job_events', NEW.id::text);
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER jobs_record_event_insert AFTER INSERT ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_record_event();
CREATE TRIGGER jobs_record_event_update AFTER UPDATE OF state ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_record_event();

-- Jobs from before this migration: their steps' and their own current state, so their stream
-- shows where they are and, for an ended job, ends with its state.
INSERT INTO job_events (job_id, kind, step, position, state, attempts, last_error, started_at,
                        finished_at, at)
SELECT s.job_id, 'step', s.step, s.position, s.state, s.attempts, s.last_error, s.started_at,
       s.finished_at, coalesce(s.finished_at, s.started_at, now())
  FROM job_steps s JOIN jobs j ON j.id = s.job_id
 ORDER BY j.created_at, j.id, s.position, s.step;
INSERT INTO job_events (job_id, kind, state, attempts, last_error, started_at, finished_at, at)
SELECT id, 'job', state, attempts, last_error, started_at, finished_at,
       coalesce(finished_at, started_at, created_at)
  FROM jobs
 ORDER BY created_at, id;
