//! The SQL of every operation, written once per table when the store is built.
//!
//! Each operation is one statement, so it is one round trip and atomic. Times are the
//! database's `clock_timestamp()` (the time the statement runs, not the start of its
//! transaction like `now()`), so every process agrees on expiry whatever its own clock, and a
//! record written late in a long transaction still lives its whole TTL.

use std::sync::Arc;

/// The state column `begin` answers with.
pub(super) mod state {
    /// The key was free and is now locked by the caller's token.
    pub(crate) const EXECUTE: i32 = 0;
    /// Locked or completed for another fingerprint.
    pub(crate) const MISMATCH: i32 = 1;
    /// Locked for the same fingerprint under a live lease.
    pub(crate) const IN_FLIGHT: i32 = 2;
    /// Completed for the same fingerprint: `response` holds the record, `NULL`: not retained.
    pub(crate) const COMPLETED: i32 = 3;
}

/// The statements of one table.
///
/// Shared strings: handing one to `sqlx::query` copies nothing, and sqlx keeps each as a
/// prepared statement per connection.
#[derive(Debug)]
pub(super) struct Statements {
    /// The quoted, possibly schema-qualified, table name.
    pub(super) table: Arc<str>,
    pub(super) begin: Arc<str>,
    pub(super) complete: Arc<str>,
    pub(super) renew: Arc<str>,
    pub(super) release: Arc<str>,
    /// `complete` inside the transaction that took the key (transactional mode): the row is
    /// the transaction's own, so no lease is checked.
    pub(super) record_held: Arc<str>,
    pub(super) reap: Arc<str>,
    pub(super) create: Arc<str>,
}

/// `name` as a quoted SQL identifier: any text is safe in it.
pub(super) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl Statements {
    /// The statements for the table `table` in `schema` (`None`: the connection's
    /// `search_path`).
    pub(super) fn new(schema: Option<&str>, table: &str) -> Self {
        let qualified = match schema {
            Some(schema) => format!("{}.{}", quote(schema), quote(table)),
            None => quote(table),
        };
        let t = &qualified;
        // $1 scope, $2 key, $3 fingerprint, $4 token, $5 lease in microseconds.
        //
        // A live row in the statement's snapshot is the answer, read without a write (a
        // replay, a duplicate in flight or a mismatch locks nothing, so it costs PostgreSQL no
        // transaction id and no WAL flush). Otherwise the insert takes the key, free or
        // expired. When it cannot (a concurrent `begin` committed the key after the
        // snapshot), the statement returns nothing and the store runs it again: the new
        // snapshot sees that row.
        let begin = format!(
            "WITH now AS (SELECT clock_timestamp() AS t), \
             held AS ( \
               SELECT h.fingerprint, h.token, h.response FROM {t} AS h, now \
               WHERE h.scope = $1 AND h.key = $2 AND h.expires_at > now.t \
             ), \
             taken AS ( \
               INSERT INTO {t} AS r (scope, key, fingerprint, token, response, expires_at) \
               SELECT $1, $2, $3, $4, NULL, now.t + $5::float8 * interval '1 microsecond' FROM now \
               WHERE NOT EXISTS (SELECT 1 FROM held) \
               ON CONFLICT (scope, key) DO UPDATE \
                 SET fingerprint = excluded.fingerprint, token = excluded.token, response = NULL, \
                     expires_at = excluded.expires_at \
                 WHERE r.expires_at <= (SELECT t FROM now) \
               RETURNING 1 \
             ) \
             SELECT {execute}::int4 AS state, NULL::bytea AS response FROM taken \
             UNION ALL \
             SELECT CASE WHEN held.fingerprint <> $3 THEN {mismatch} \
                         WHEN held.token IS NOT NULL THEN {in_flight} ELSE {completed} END::int4, \
                    CASE WHEN held.fingerprint = $3 AND held.token IS NULL THEN held.response END \
             FROM held",
            execute = state::EXECUTE,
            mismatch = state::MISMATCH,
            in_flight = state::IN_FLIGHT,
            completed = state::COMPLETED,
        );
        // $1 scope, $2 key, $3 token, $4 record (NULL: not retained), $5 TTL in microseconds.
        let complete = format!(
            "UPDATE {t} SET token = NULL, response = $4, \
               expires_at = clock_timestamp() + $5::float8 * interval '1 microsecond' \
             WHERE scope = $1 AND key = $2 AND token = $3 AND expires_at > clock_timestamp()"
        );
        let record_held = format!(
            "UPDATE {t} SET token = NULL, response = $4, \
               expires_at = clock_timestamp() + $5::float8 * interval '1 microsecond' \
             WHERE scope = $1 AND key = $2 AND token = $3"
        );
        // $1 scope, $2 key, $3 token, $4 lease in microseconds.
        let renew = format!(
            "UPDATE {t} SET expires_at = clock_timestamp() + $4::float8 * interval '1 microsecond' \
             WHERE scope = $1 AND key = $2 AND token = $3 AND expires_at > clock_timestamp()"
        );
        // $1 scope, $2 key, $3 token.
        let release =
            format!("DELETE FROM {t} WHERE scope = $1 AND key = $2 AND token = $3 AND expires_at > clock_timestamp()");
        // $1 batch size. Rows locked by someone else (a `complete` in a transaction) are
        // skipped; `FOR UPDATE` re-reads each row, so one renewed meanwhile is kept.
        let reap = format!(
            "WITH now AS (SELECT clock_timestamp() AS t) \
             DELETE FROM {t} WHERE ctid = ANY(ARRAY( \
               SELECT ctid FROM {t} WHERE expires_at <= (SELECT t FROM now) \
               LIMIT $1 FOR UPDATE SKIP LOCKED))"
        );
        let create = create_table(schema, table);
        Self {
            table: qualified.into(),
            begin: begin.into(),
            complete: complete.into(),
            renew: renew.into(),
            release: release.into(),
            record_held: record_held.into(),
            reap: reap.into(),
            create: create.into(),
        }
    }
}

/// The DDL of the table and its index; for the default table it is
/// `migrations/0001_idempotency.sql` (a test holds them equal).
pub(super) fn create_table(schema: Option<&str>, table: &str) -> String {
    let (qualified, index) = match (schema, table) {
        (None, "idempotency") => ("idempotency".to_owned(), "idempotency_expires_at".to_owned()),
        (schema, table) => (
            match schema {
                Some(schema) => format!("{}.{}", quote(schema), quote(table)),
                None => quote(table),
            },
            quote(&format!("{table}_expires_at")),
        ),
    };
    format!(
        "-- tower-idempotency: the PostgresStore table, one row per (scope, key).\n\
         CREATE TABLE IF NOT EXISTS {qualified} (\n    \
             scope       bytea       NOT NULL, -- SHA-256 of the scope (32 bytes); empty: unscoped\n    \
             key         text        NOT NULL, -- the Idempotency-Key, 1 to 255 visible ASCII bytes\n    \
             fingerprint bytea       NOT NULL, -- SHA-256 of the request (32 bytes)\n    \
             token       bytea,                -- the lock's token (16 bytes) while locked; NULL once completed\n    \
             response    bytea,                -- the recorded response once completed; NULL: locked, or not retained\n    \
             expires_at  timestamptz NOT NULL, -- end of the lease (locked) or of the TTL (completed)\n    \
             PRIMARY KEY (scope, key)\n\
         );\n\
         -- The reaper finds expired rows through this index, one bounded batch at a time.\n\
         CREATE INDEX IF NOT EXISTS {index} ON {qualified} (expires_at);\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_migration_is_the_default_table() {
        let shipped = include_str!("../../../migrations/0001_idempotency.sql");
        assert_eq!(shipped, create_table(None, "idempotency"));
    }

    #[test]
    fn names_are_quoted() {
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
        let statements = Statements::new(Some("tenant one"), "idem");
        assert_eq!(&*statements.table, "\"tenant one\".\"idem\"");
        assert!(
            statements.create.contains("CREATE INDEX IF NOT EXISTS \"idem_expires_at\" ON \"tenant one\".\"idem\"")
        );
    }
}
