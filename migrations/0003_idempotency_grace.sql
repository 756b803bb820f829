-- tower-idempotency: the grace for expired keys (`with_expired_grace`), after 0001.
-- With a grace: the row is kept, and `begin` answers that the key expired, until then.
ALTER TABLE idempotency ADD COLUMN IF NOT EXISTS grace_until timestamptz;
