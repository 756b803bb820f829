-- tower-idempotency: the PostgresStore table, one row per (scope, key).
CREATE TABLE IF NOT EXISTS idempotency (
    scope       bytea       NOT NULL, -- SHA-256 of the scope (32 bytes); empty: unscoped
    key         text        NOT NULL, -- the Idempotency-Key, 1 to 255 visible ASCII bytes
    fingerprint bytea       NOT NULL, -- SHA-256 of the request (32 bytes)
    token       bytea,                -- the lock's token (16 bytes) while locked; NULL once completed
    response    bytea,                -- the recorded response once completed; NULL: locked, or not retained
    expires_at  timestamptz NOT NULL, -- end of the lease (locked) or of the TTL (completed)
    PRIMARY KEY (scope, key)
);
-- The reaper finds expired rows through this index, one bounded batch at a time.
CREATE INDEX IF NOT EXISTS idempotency_expires_at ON idempotency (expires_at);
