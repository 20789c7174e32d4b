-- The audit log's request_id is the server's id for the request (generated for every request,
-- unique); the client's own X-Request-Id, when it was short and safe, is kept apart: any client
-- may send any id, another request's too. Bounded like the HTTP layer's check.
ALTER TABLE audit_events
    ADD COLUMN client_request_id text
        CONSTRAINT audit_events_client_request_id_bounded
        CHECK (client_request_id ~ '^[A-Za-z0-9._:-]{1,128}$');
