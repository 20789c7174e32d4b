-- A replayed answer is authorized again: the role the request's handler required
-- (`http::extract::Caller::require`) is stored with the answer, and the caller must still hold it
-- (or a higher one) when the answer is replayed. NULL: the handler required no role (the request
-- was refused before it ran).
ALTER TABLE idempotency_keys ADD COLUMN required_role text
    CHECK (required_role IN ('viewer', 'operator', 'admin'));

-- Answers stored before: every POST route required `operator`.
UPDATE idempotency_keys SET required_role = 'operator' WHERE response_status IS NOT NULL;

-- Refusals are no longer stored (they depend on the token and the moment, not on the request).
DELETE FROM idempotency_keys WHERE response_status IN (401, 403, 429);
