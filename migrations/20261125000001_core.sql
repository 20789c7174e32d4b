-- Core schema: backup repositories, the job queue, per-step progress, the append-only audit log,
-- idempotency keys and encrypted secret material. Applied migrations are never edited:
-- add a new file instead.

CREATE TABLE backup_repositories (
    id            uuid PRIMARY KEY,
    name          text NOT NULL UNIQUE,
    namespace     text NOT NULL,
    bucket        text NOT NULL UNIQUE,
    region        text NOT NULL,
    labels        jsonb NOT NULL DEFAULT '{}'::jsonb,
    options       jsonb NOT NULL DEFAULT '{}'::jsonb,
    state         text NOT NULL DEFAULT 'pending'
                  CHECK (state IN ('pending', 'provisioning', 'ready', 'failed', 'cancelled')),
    -- Identifiers of the resources made for this repository (ARNs, names, key id); never secrets.
    resources     jsonb NOT NULL DEFAULT '{}'::jsonb,
    last_error    text,
    created_by    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX backup_repositories_namespace ON backup_repositories (namespace);
CREATE INDEX backup_repositories_state ON backup_repositories (state);

CREATE TABLE jobs (
    id               uuid PRIMARY KEY,
    kind             text NOT NULL,
    repository_id    uuid REFERENCES backup_repositories (id),
    payload          jsonb NOT NULL DEFAULT '{}'::jsonb,
    state            text NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    attempts         integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL DEFAULT 8,
    run_at           timestamptz NOT NULL DEFAULT now(),
    -- The lease: a worker owns a running job only while lease_token matches and the lease
    -- has not expired. Every write by a worker checks the token (fencing).
    lease_token      uuid,
    lease_expires_at timestamptz,
    locked_by        text,
    cancel_requested boolean NOT NULL DEFAULT false,
    last_error       text,
    created_by       text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz
);
CREATE INDEX jobs_claimable ON jobs (run_at) WHERE state = 'queued';
CREATE INDEX jobs_leased ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX jobs_repository ON jobs (repository_id, created_at DESC);
-- At most one active job per repository, enforced by the database itself.
CREATE UNIQUE INDEX jobs_one_active_per_repository
    ON jobs (repository_id) WHERE state IN ('queued', 'running');

CREATE TABLE job_steps (
    job_id       uuid NOT NULL REFERENCES jobs (id),
    step         text NOT NULL,
    position     integer NOT NULL DEFAULT 0,
    state        text NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'running', 'succeeded', 'failed', 'skipped')),
    attempts     integer NOT NULL DEFAULT 0,
    output       jsonb,
    last_error   text,
    started_at   timestamptz,
    finished_at  timestamptz,
    PRIMARY KEY (job_id, step)
);

CREATE TABLE audit_events (
    id                  bigserial PRIMARY KEY,
    at                  timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor               text NOT NULL,
    request_id          text,
    repository          text,
    job_id              uuid,
    step                text,
    attempt             integer,
    action              text NOT NULL,
    outcome             text NOT NULL,
    detail              jsonb NOT NULL DEFAULT '{}'::jsonb,
    upstream_request_id text
);
CREATE INDEX audit_events_repository ON audit_events (repository, id);
CREATE INDEX audit_events_job ON audit_events (job_id, id);
CREATE INDEX audit_events_actor ON audit_events (actor, id);
-- Writing the same (job, step, attempt, action) twice stores it once.
CREATE UNIQUE INDEX audit_events_attempt_once
    ON audit_events (job_id, step, attempt, action)
    WHERE job_id IS NOT NULL AND step IS NOT NULL AND attempt IS NOT NULL;

CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER audit_events_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();

CREATE TABLE idempotency_keys (
    actor           text NOT NULL,
    key             text NOT NULL,
    request_hash    bytea NOT NULL,
    method          text NOT NULL,
    path            text NOT NULL,
    response_status integer,
    response_headers jsonb,
    response_body   bytea,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL DEFAULT now() + interval '24 hours',
    PRIMARY KEY (actor, key)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);

-- Secret material held between the step that creates it and the step that delivers it to the
-- Kubernetes Secret. Always encrypted (XChaCha20-Poly1305, key from BP_ENCRYPTION_KEY); wiped
-- once the Secret is written and read back.
CREATE TABLE secret_material (
    repository_id uuid NOT NULL REFERENCES backup_repositories (id),
    kind          text NOT NULL CHECK (kind IN ('access-key', 'cipher-pass')),
    key_id        text NOT NULL,
    nonce         bytea NOT NULL,
    ciphertext    bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (repository_id, kind)
);

-- Wake workers when work is queued and long-polling clients when a job changes state.
CREATE FUNCTION jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = 'queued' THEN
        PERFORM pg_notify('bp_jobs_queued', NEW.id::text);
    END IF;
    IF TG_OP = 'INSERT' OR NEW.state IS DISTINCT FROM OLD.state THEN
        PERFORM pg_notify('bp_job_state', NEW.id::text);
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER jobs_notify_insert AFTER INSERT ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_notify();
CREATE TRIGGER jobs_notify_update AFTER UPDATE OF state ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_notify();
