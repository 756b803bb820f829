-- tower-idempotency: join mode (a duplicate follows the response in flight), after 0001.
-- Set by the first duplicate following a lock: only then do its writes send a NOTIFY.
ALTER TABLE idempotency ADD COLUMN IF NOT EXISTS followed boolean NOT NULL DEFAULT false;
-- The live log of each lock, one row per publish, deleted when the lock ends.
-- Unlogged (no WAL): a crash empties it, and its followers then wait for the record.
CREATE UNLOGGED TABLE IF NOT EXISTS idempotency_live (
    key_id bytea NOT NULL, -- the first 16 bytes of SHA-256(scope || 0x00 || key)
    token  bytea NOT NULL, -- the token of the lock whose log it is (16 bytes)
    seq    int8  NOT NULL, -- the index in the log of the row's first event, from 0
    n      int4  NOT NULL, -- how many events the row holds
    events bytea NOT NULL, -- the events, each its length (4 bytes) then a tag byte and its bytes
    PRIMARY KEY (key_id, token, seq)
);
