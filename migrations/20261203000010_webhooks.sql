-- Signed webhooks (issue 13 item 2). A request may name a `callback_url`; it is stored on the
-- job it queued. When that job ends (succeeded, failed or cancelled, whoever ends it: a
-- worker, a cancel, the rescuer), the trigger below writes one delivery to the outbox in the
-- same transaction as the job's end, so an ended job with a callback always has its delivery
-- and a job that did not end has none. `webhooks::sender` sends the outbox.
ALTER TABLE jobs ADD COLUMN callback_url text;

CREATE TABLE webhook_deliveries (
    -- Sent as `webhook-id`: stable across attempts, so receivers can drop duplicates.
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    job_id          uuid NOT NULL REFERENCES jobs (id),
    event_type      text NOT NULL,
    url             text NOT NULL,
    -- The exact bytes signed and sent (JSON); never a secret value.
    body            text NOT NULL,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    -- When a sender may (re)try it; a sender that claims it moves it past its own timeout.
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- When it was delivered or given up.
    finished_at     timestamptz
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id, created_at);

-- Every attempt at a delivery: the receiver's status code, or why no answer came.
CREATE TABLE webhook_attempts (
    delivery_id  uuid NOT NULL REFERENCES webhook_deliveries (id),
    attempt      integer NOT NULL,
    attempted_at timestamptz NOT NULL,
    duration_ms  integer NOT NULL,
    status_code  integer,
    error        text,
    PRIMARY KEY (delivery_id, attempt)
);

CREATE FUNCTION jobs_webhook_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delivery uuid;
    ended timestamptz := coalesce(NEW.finished_at, now());
    ended_text text := to_char(ended AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"');
BEGIN
    INSERT INTO webhook_deliveries (job_id, event_type, url, body)
    VALUES (NEW.id, 'job.' || NEW.state, NEW.callback_url,
            json_build_object(
                'type', 'job.' || NEW.state,
                'timestamp', ended_text,
                'data', json_build_object(
                    'job_id', NEW.id,
                    'kind', NEW.kind,
                    'repository', NEW.subject_name,
                    'state', NEW.state,
                    'error', CASE WHEN NEW.state = 'succeeded' THEN NULL ELSE NEW.last_error END,
                    'finished_at', ended_text,
                    'job_url', '/v1/jobs/' || NEW.id))::text)
    RETURNING id INTO delivery;
    PERFORM pg_notify('bp_webhooks', delivery::text);
    RETURN NULL;
END;
$$;
CREATE TRIGGER jobs_webhook_outbox AFTER UPDATE OF state ON jobs
    FOR EACH ROW
    WHEN (NEW.callback_url IS NOT NULL
          AND NEW.state IN ('succeeded', 'failed', 'cancelled')
          AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION jobs_webhook_outbox();
