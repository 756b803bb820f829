//! The SQL of every operation, written once per table when the store is built.
//!
//! Each operation is one statement, so it is one round trip and atomic. Times are the
//! database's `clock_timestamp()` (the time the statement runs, not the start of its
//! transaction like `now()`), so every process agrees on expiry whatever its own clock, and a
//! record written late in a long transaction still lives its whole TTL.
//!
//! Join mode adds the live log table (`{table}_live`) and the notifications: a write that
//! changes what a follower waits for (`publish`, `complete`, `release`) sends a `NOTIFY` in
//! the same statement, so it is delivered at its commit, and only when a follower marked the
//! lock `followed` (a notifying commit takes PostgreSQL's global notify lock, which
//! serializes commits: the layer's writes stay free of it unless someone follows).

use std::sync::Arc;

use sha2::{Digest, Sha256};

/// The state column `begin` answers with.
pub(crate) mod state {
    /// The key was free and is now locked by the caller's token.
    pub(crate) const EXECUTE: i32 = 0;
    /// Locked or completed for another fingerprint.
    pub(crate) const MISMATCH: i32 = 1;
    /// Locked for the same fingerprint under a live lease.
    pub(crate) const IN_FLIGHT: i32 = 2;
    /// Completed for the same fingerprint: `response` holds the record, `NULL`: not retained.
    pub(crate) const COMPLETED: i32 = 3;
    /// Transactional mode: no live row, and the key's advisory lock is held by another
    /// transaction (a request in flight, its row not committed yet).
    pub(crate) const BUSY: i32 = 4;
    /// Completed with a grace, past its TTL, within the grace: answered, the key left as it is.
    pub(crate) const EXPIRED: i32 = 5;
}

/// The state column `follow`'s read answers with.
pub(super) mod followed {
    /// A live lock for the fingerprint (and the cursor's token): its events after the cursor.
    pub(crate) const LIVE: i32 = 0;
    /// A record for the fingerprint replaced the lock.
    pub(crate) const COMPLETED: i32 = 1;
    /// No live lock for the fingerprint and cursor, and no record for the fingerprint.
    pub(crate) const GONE: i32 = 2;
}

/// The first byte of a notification's payload: what happened to the lock.
pub(crate) mod notice {
    /// Events were published.
    pub(crate) const PUBLISHED: u8 = b'p';
    /// A record replaced the lock.
    pub(crate) const COMPLETED: u8 = b'c';
    /// The lock was released.
    pub(crate) const RELEASED: u8 = b'r';
}

/// The statements of one table.
///
/// Shared strings: handing one to `sqlx::query` copies nothing, and sqlx keeps each as a
/// prepared statement per connection.
#[derive(Debug)]
pub(crate) struct Statements {
    /// The quoted, possibly schema-qualified, table name.
    pub(crate) table: Arc<str>,
    /// The quoted, possibly schema-qualified, live log table (`{table}_live`).
    pub(crate) live: Arc<str>,
    /// The channel of the table's notifications (`tower_idempotency_` and 16 hex digits).
    pub(crate) channel: Arc<str>,
    pub(crate) begin: Arc<str>,
    pub(crate) complete: Arc<str>,
    pub(crate) renew: Arc<str>,
    pub(crate) release: Arc<str>,
    /// `complete` inside the transaction that took the key (transactional mode): the row is
    /// the transaction's own (written by this very transaction, checked with `xmin`), so no
    /// lease is checked.
    pub(crate) record_held: Arc<str>,
    /// Transactional mode: `begin` in the request's transaction, under the key's advisory lock.
    pub(crate) tx_begin: Arc<str>,
    /// Transactional mode: what `tx_begin` would find, read outside any transaction.
    pub(crate) tx_peek: Arc<str>,
    /// Transactional mode: a duplicate registers its wait (the key's wait marker).
    pub(crate) tx_wait: Arc<str>,
    /// Transactional mode, after the request's transaction ended: what is left of its lock
    /// goes, and the waits registered on the key are notified.
    pub(crate) tx_end: Arc<str>,
    pub(crate) publish: Arc<str>,
    pub(crate) follow: Arc<str>,
    pub(crate) reap: Arc<str>,
    /// The operator's look at one key: its live row.
    pub(crate) inspect: Arc<str>,
    /// The operator's removal of a key's record, unless a lock holds it.
    pub(crate) purge: Arc<str>,
    /// The DDL of both migrations, in order.
    pub(crate) create: Arc<str>,
}

/// `name` as a quoted SQL identifier: any text is safe in it.
pub(super) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl Statements {
    /// The statements for the table `table` in `schema` (`None`: the connection's
    /// `search_path`).
    pub(super) fn new(schema: Option<&str>, table: &str) -> Self {
        let qualify = |table: &str| match schema {
            Some(schema) => format!("{}.{}", quote(schema), quote(table)),
            None => quote(table),
        };
        let qualified = qualify(table);
        let live_table = qualify(&format!("{table}_live"));
        let channel = channel(&qualified);
        let (t, live) = (&qualified, &live_table);
        // The payload of a notification: what happened, the key id ($key_id) and the token
        // ($token), in hex (65 bytes).
        let payload = |kind: u8, key_id: &str, token: &str| {
            format!("pg_notify('{channel}', '{}' || encode({key_id}, 'hex') || encode({token}, 'hex'))", kind as char)
        };
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
             marked AS ( \
               SELECT 1 FROM {t} AS m, now \
               WHERE m.scope = $1 AND m.key = $2 AND m.expires_at <= now.t AND m.grace_until > now.t \
             ), \
             taken AS ( \
               INSERT INTO {t} AS r (scope, key, fingerprint, token, response, expires_at) \
               SELECT $1, $2, $3, $4, NULL, now.t + $5::float8 * interval '1 microsecond' FROM now \
               WHERE NOT EXISTS (SELECT 1 FROM held) AND NOT EXISTS (SELECT 1 FROM marked) \
               ON CONFLICT (scope, key) DO UPDATE \
                 SET fingerprint = excluded.fingerprint, token = excluded.token, response = NULL, \
                     expires_at = excluded.expires_at, followed = false, grace_until = NULL \
                 WHERE r.expires_at <= (SELECT t FROM now) \
                   AND (r.grace_until IS NULL OR r.grace_until <= (SELECT t FROM now)) \
               RETURNING 1 \
             ) \
             SELECT {execute}::int4 AS state, NULL::bytea AS response FROM taken \
             UNION ALL \
             SELECT {expired}::int4, NULL::bytea FROM marked \
             UNION ALL \
             SELECT CASE WHEN held.fingerprint <> $3 THEN {mismatch} \
                         WHEN held.token IS NOT NULL THEN {in_flight} ELSE {completed} END::int4, \
                    CASE WHEN held.fingerprint = $3 AND held.token IS NULL THEN held.response END \
             FROM held",
            execute = state::EXECUTE,
            mismatch = state::MISMATCH,
            in_flight = state::IN_FLIGHT,
            completed = state::COMPLETED,
            expired = state::EXPIRED,
        );
        // $1 scope, $2 key, $3 token, $4 record (NULL: not retained), $5 TTL in microseconds,
        // $6 key id, $7 grace in microseconds (0: none; with one, the row is kept, and
        // answered as expired, until `grace_until`). A row when it completed. The lock's log goes with it, and its followers
        // (if any) are told, at the commit.
        let notify_completed = payload(notice::COMPLETED, "$6", "$3");
        let complete = format!(
            "WITH done AS ( \
               UPDATE {t} SET token = NULL, response = $4, \
                 expires_at = clock_timestamp() + $5::float8 * interval '1 microsecond', \
                 grace_until = CASE WHEN $7::float8 > 0 \
                   THEN clock_timestamp() + ($5::float8 + $7::float8) * interval '1 microsecond' END \
               WHERE scope = $1 AND key = $2 AND token = $3 AND expires_at > clock_timestamp() \
               RETURNING followed \
             ), \
             log AS (DELETE FROM {live} WHERE key_id = $6 AND EXISTS (SELECT 1 FROM done)), \
             told AS (SELECT {notify_completed} FROM done WHERE followed) \
             SELECT (SELECT count(*) FROM told) AS told FROM done"
        );
        // The row must be this transaction's own (`xmin`): a handler that ran its own `COMMIT`
        // or `ROLLBACK` on the connection ended the transaction that wrote it, and the statement
        // then runs in another transaction (or none), which finds nothing to update.
        let record_held = format!(
            "UPDATE {t} SET token = NULL, response = $4, \
               expires_at = clock_timestamp() + $5::float8 * interval '1 microsecond' \
             WHERE scope = $1 AND key = $2 AND token = $3 AND xmin = pg_current_xact_id_if_assigned()::xid"
        );
        // Transactional mode. $1 scope, $2 key, $3 fingerprint, $4 token, $5 lease in
        // microseconds, $6 the key's advisory lock. As `begin`, in the request's transaction,
        // except that a key without a live row is taken only under its advisory lock
        // (`pg_try_advisory_xact_lock`, held until the transaction ends): the insert runs only
        // once the lock is this transaction's, so it never waits on the uncommitted row of a
        // request in flight (whose transaction holds the lock); without the lock, `BUSY`. A live
        // row (a completed record) is answered without taking any lock, so concurrent retries
        // of a completed key never collide. No row: a concurrent `begin` committed the key
        // after the snapshot; run it again.
        let tx_begin = format!(
            "WITH now AS (SELECT clock_timestamp() AS t), \
             held AS ( \
               SELECT h.fingerprint, h.token, h.response FROM {t} AS h, now \
               WHERE h.scope = $1 AND h.key = $2 AND h.expires_at > now.t \
             ), \
             locked AS MATERIALIZED ( \
               SELECT pg_try_advisory_xact_lock($6) AS ok WHERE NOT EXISTS (SELECT 1 FROM held) \
             ), \
             taken AS ( \
               INSERT INTO {t} AS r (scope, key, fingerprint, token, response, expires_at) \
               SELECT $1, $2, $3, $4, NULL, now.t + $5::float8 * interval '1 microsecond' FROM now, locked \
               WHERE locked.ok \
               ON CONFLICT (scope, key) DO UPDATE \
                 SET fingerprint = excluded.fingerprint, token = excluded.token, response = NULL, \
                     expires_at = excluded.expires_at, followed = false, grace_until = NULL \
                 WHERE r.expires_at <= (SELECT t FROM now) \
               RETURNING 1 \
             ) \
             SELECT {execute}::int4 AS state, NULL::bytea AS response FROM taken \
             UNION ALL \
             SELECT {busy}::int4, NULL::bytea FROM locked WHERE NOT locked.ok \
             UNION ALL \
             SELECT CASE WHEN held.fingerprint <> $3 THEN {mismatch} \
                         WHEN held.token IS NOT NULL THEN {in_flight} ELSE {completed} END::int4, \
                    CASE WHEN held.fingerprint = $3 AND held.token IS NULL THEN held.response END \
             FROM held",
            execute = state::EXECUTE,
            busy = state::BUSY,
            mismatch = state::MISMATCH,
            in_flight = state::IN_FLIGHT,
            completed = state::COMPLETED,
        );
        // Transactional mode, outside any transaction. $1 scope, $2 key, $3 fingerprint, $4 the
        // key's advisory lock. The key's live row as `begin` answers it; without one, `BUSY`
        // when the advisory lock is held (a request in flight), `EXECUTE` when it is free (the
        // lock is released at once, with the statement: the caller then takes the key in a
        // transaction).
        let tx_peek = format!(
            "WITH now AS (SELECT clock_timestamp() AS t), \
             held AS ( \
               SELECT h.fingerprint, h.token, h.response FROM {t} AS h, now \
               WHERE h.scope = $1 AND h.key = $2 AND h.expires_at > now.t \
             ) \
             SELECT CASE WHEN held.fingerprint IS NULL THEN \
                           CASE WHEN pg_try_advisory_xact_lock($4) THEN {execute} ELSE {busy} END \
                         WHEN held.fingerprint <> $3 THEN {mismatch} \
                         WHEN held.token IS NOT NULL THEN {in_flight} ELSE {completed} END::int4 AS state, \
                    CASE WHEN held.fingerprint = $3 AND held.token IS NULL THEN held.response END AS response \
             FROM (SELECT 1) AS one LEFT JOIN held ON true",
            execute = state::EXECUTE,
            busy = state::BUSY,
            mismatch = state::MISMATCH,
            in_flight = state::IN_FLIGHT,
            completed = state::COMPLETED,
        );
        // $1 key id. The key's wait marker: a row of the live log table with the token
        // `WAIT_MARKER`, whose `n` counts the waits registered since the key's last lock ended.
        // Committed before the duplicate looks at the key again, so that the end of the
        // transaction it waits for, which reads it after its commit or rollback (`tx_end`),
        // either sees it and notifies, or ended before that look (which then sees the end).
        // The table is unlogged: no WAL, no flush.
        let marker = "'\\x00000000000000000000000000000000'::bytea";
        let tx_wait = format!(
            "INSERT INTO {live} AS l (key_id, token, seq, n, events) VALUES ($1, {marker}, 0, 1, ''::bytea) \
             ON CONFLICT (key_id, token, seq) DO UPDATE SET n = l.n + 1"
        );
        // $1 scope, $2 key, $3 token, $4 key id, $5 the notification's kind (`c` or `r`). Run
        // outside any transaction once the request's transaction ended. Deletes the lock's row
        // if it is still locked by this token (it survives only when a handler committed the
        // transaction itself), and the key's wait marker; when there was one, notifies its
        // waiters. Without a marker it writes nothing (no transaction id, no `NOTIFY`, so no
        // global notify lock). The number of waits notified.
        let tx_end = format!(
            "WITH lock AS (DELETE FROM {t} WHERE scope = $1 AND key = $2 AND token = $3), \
             marker AS (DELETE FROM {live} WHERE key_id = $4 AND token = {marker} AND seq = 0 RETURNING n), \
             told AS (SELECT pg_notify('{channel}', $5 || encode($4, 'hex') || encode($3, 'hex')) FROM marker) \
             SELECT coalesce((SELECT sum(n) FROM marker), 0)::int8 AS waits, (SELECT count(*) FROM told) AS told"
        );
        // $1 scope, $2 key, $3 token, $4 lease in microseconds.
        let renew = format!(
            "UPDATE {t} SET expires_at = clock_timestamp() + $4::float8 * interval '1 microsecond' \
             WHERE scope = $1 AND key = $2 AND token = $3 AND expires_at > clock_timestamp()"
        );
        // $1 scope, $2 key, $3 token, $4 key id. A row when it released.
        let notify_released = payload(notice::RELEASED, "$4", "$3");
        let release = format!(
            "WITH done AS ( \
               DELETE FROM {t} WHERE scope = $1 AND key = $2 AND token = $3 AND expires_at > clock_timestamp() \
               RETURNING followed \
             ), \
             log AS (DELETE FROM {live} WHERE key_id = $4 AND EXISTS (SELECT 1 FROM done)), \
             told AS (SELECT {notify_released} FROM done WHERE followed) \
             SELECT (SELECT count(*) FROM told) AS told FROM done"
        );
        // $1 scope, $2 key, $3 token, $4 key id, $5 index of the first event, $6 the events
        // (bytea[], each encoded). Appends, as one row, the events the log does not hold yet,
        // only while the lock is live: the row starts where the log ends (`seq`, its first
        // event's index) and holds the events from there on, each prefixed by its length. A
        // publish starting past the log's end (a gap, never written by the layer) appends
        // nothing; one sent again appends nothing it already holds.
        //
        // `FOR SHARE` orders it with a follower marking the lock `followed` (an `UPDATE`): a
        // publish that locks the row after the mark committed sees `followed` (PostgreSQL
        // re-reads a row updated since the snapshot before locking it) and notifies; one that
        // locked it first commits before the mark does, so the follower's next read sees its
        // events. The log is unlogged, so the commit has no durable write to wait for
        // (`synchronous_commit` off for this transaction only): a crash empties the log anyway.
        let notify_published = payload(notice::PUBLISHED, "$4", "$3");
        let publish = format!(
            "WITH held AS ( \
               SELECT followed FROM {t} \
               WHERE scope = $1 AND key = $2 AND token = $3 AND expires_at > clock_timestamp() \
               FOR SHARE \
             ), \
             log_end AS ( \
               SELECT coalesce((SELECT l.seq + l.n FROM {live} AS l WHERE l.key_id = $4 AND l.token = $3 \
                                ORDER BY l.seq DESC LIMIT 1), 0) AS at \
             ), \
             tail AS ( \
               SELECT log_end.at, count(*)::int4 AS n, \
                      string_agg(int4send(length(e.event)) || e.event, ''::bytea ORDER BY e.i) AS events \
               FROM log_end, unnest($6::bytea[]) WITH ORDINALITY AS e(event, i) \
               WHERE $5 + e.i - 1 >= log_end.at AND $5 <= log_end.at \
               GROUP BY log_end.at \
             ), \
             added AS ( \
               INSERT INTO {live} (key_id, token, seq, n, events) \
               SELECT $4, $3, tail.at, tail.n, tail.events FROM held, tail \
               ON CONFLICT DO NOTHING \
               RETURNING n \
             ), \
             told AS (SELECT {notify_published} FROM held WHERE followed AND EXISTS (SELECT 1 FROM added)) \
             SELECT coalesce((SELECT n FROM added), 0) AS added, (SELECT count(*) FROM told) AS told, \
                    set_config('synchronous_commit', 'off', true) AS commit"
        );
        // $1 scope, $2 key, $3 fingerprint, $4 the cursor's token (NULL: whichever lock holds
        // the key), $5 events read, $6 key id. One row: the state, and for a live lock its
        // token, whether it was `followed` in this statement's snapshot, the microseconds
        // left of its lease, and the log's rows from the one holding event $5 on (`events`,
        // NULL when none; `first`, the index of the first row's first event; `n`, how many
        // events they hold). Marks a live, unfollowed lock `followed`, so that the writes
        // after it notify; a follower that saw `followed` false reads once more before it
        // waits (a publish that committed between this snapshot and the mark did not notify).
        let follow = format!(
            "WITH now AS (SELECT clock_timestamp() AS t), \
             found AS ( \
               SELECT r.token, r.fingerprint, r.followed, r.expires_at - now.t AS left_ FROM {t} AS r, now \
               WHERE r.scope = $1 AND r.key = $2 AND r.expires_at > now.t \
             ), \
             held AS ( \
               SELECT token, followed, left_ FROM found \
               WHERE token IS NOT NULL AND fingerprint = $3 AND ($4::bytea IS NULL OR token = $4) \
             ), \
             marked AS ( \
               UPDATE {t} AS r SET followed = true FROM held \
               WHERE r.scope = $1 AND r.key = $2 AND r.token = held.token AND NOT held.followed \
                 AND r.expires_at > clock_timestamp() \
               RETURNING 1 \
             ), \
             log AS ( \
               SELECT array_agg(l.events ORDER BY l.seq) AS events, min(l.seq) AS first, sum(l.n)::int8 AS n \
               FROM {live} AS l, held \
               WHERE l.key_id = $6 AND l.token = held.token AND l.seq + l.n > $5 \
                 AND l.seq >= coalesce((SELECT max(b.seq) FROM {live} AS b \
                                        WHERE b.key_id = $6 AND b.token = held.token AND b.seq <= $5), 0) \
             ) \
             SELECT CASE WHEN held.token IS NOT NULL THEN {live_state} \
                         WHEN EXISTS (SELECT 1 FROM found WHERE token IS NULL AND fingerprint = $3) \
                           THEN {completed_state} \
                         ELSE {gone_state} END::int4 AS state, \
                    held.token, held.followed, \
                    (extract(epoch FROM held.left_) * 1000000)::int8 AS left_us, \
                    log.events, log.first, log.n \
             FROM (SELECT 1) AS one LEFT JOIN held ON true LEFT JOIN log ON true",
            live_state = followed::LIVE,
            completed_state = followed::COMPLETED,
            gone_state = followed::GONE,
        );
        // $1 batch size. Rows locked by someone else (a `complete` in a transaction) are
        // skipped; `FOR UPDATE` re-reads each row, so one renewed meanwhile is kept. The live
        // logs of the deleted keys go with them (the key id computed as `key_id` does). The
        // number of rows deleted.
        let reap = format!(
            "WITH now AS (SELECT clock_timestamp() AS t), \
             gone AS ( \
               DELETE FROM {t} WHERE ctid = ANY(ARRAY( \
                 SELECT ctid FROM {t} WHERE expires_at <= (SELECT t FROM now) \
                   AND (grace_until IS NULL OR grace_until <= (SELECT t FROM now)) \
                 LIMIT $1 FOR UPDATE SKIP LOCKED)) \
               RETURNING scope, key \
             ), \
             log AS ( \
               DELETE FROM {live} WHERE key_id IN ( \
                 SELECT substr(sha256(scope || decode('00', 'hex') || convert_to(key, 'UTF8')), 1, 16) FROM gone) \
             ) \
             SELECT count(*) FROM gone"
        );
        // $1 scope, $2 key. The key's live row, and the microseconds left of its lease or TTL
        // (added to the reader's clock: the database's clock decides expiry, the reader's
        // tells the time).
        let inspect = format!(
            "SELECT token, response, fingerprint, \
                    (extract(epoch FROM expires_at - clock_timestamp()) * 1000000)::int8 AS left_us \
             FROM {t} WHERE scope = $1 AND key = $2 AND expires_at > clock_timestamp()"
        );
        // $1 scope, $2 key, $3 key id. Deletes the key's row if it is a record or expired,
        // never a live lock, in one statement; the live log of an expired lock goes with it.
        // `removed`: whether a live record went; `in_flight`: whether a live lock stays. A lock
        // that completes meanwhile is still a lock in this statement's snapshot: `in_flight`.
        let purge = format!(
            "WITH now AS (SELECT clock_timestamp() AS t), \
             gone AS ( \
               DELETE FROM {t} WHERE scope = $1 AND key = $2 \
                 AND (token IS NULL OR expires_at <= (SELECT t FROM now)) \
               RETURNING token IS NULL AND expires_at > (SELECT t FROM now) AS live \
             ), \
             log AS (DELETE FROM {live} WHERE key_id = $3 AND EXISTS (SELECT 1 FROM gone)), \
             held AS ( \
               SELECT 1 FROM {t} WHERE scope = $1 AND key = $2 AND token IS NOT NULL \
                 AND expires_at > (SELECT t FROM now) \
             ) \
             SELECT coalesce((SELECT bool_or(live) FROM gone), false) AS removed, \
                    EXISTS (SELECT 1 FROM held) AS in_flight"
        );
        let create =
            format!("{}{}{}", create_table(schema, table), create_live(schema, table), create_grace(schema, table));
        Self {
            table: qualified.into(),
            live: live_table.into(),
            channel: channel.into(),
            begin: begin.into(),
            complete: complete.into(),
            renew: renew.into(),
            release: release.into(),
            record_held: record_held.into(),
            tx_begin: tx_begin.into(),
            tx_peek: tx_peek.into(),
            tx_wait: tx_wait.into(),
            tx_end: tx_end.into(),
            publish: publish.into(),
            follow: follow.into(),
            reap: reap.into(),
            inspect: inspect.into(),
            purge: purge.into(),
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

/// The DDL of join mode for `table`: the `followed` column and the live log table; for the
/// default table it is `migrations/0002_idempotency_live.sql` (a test holds them equal).
pub(super) fn create_live(schema: Option<&str>, table: &str) -> String {
    let (qualified, live) = match (schema, table) {
        (None, "idempotency") => ("idempotency".to_owned(), "idempotency_live".to_owned()),
        (schema, table) => {
            let qualify = |name: &str| match schema {
                Some(schema) => format!("{}.{}", quote(schema), quote(name)),
                None => quote(name),
            };
            (qualify(table), qualify(&format!("{table}_live")))
        }
    };
    format!(
        "-- tower-idempotency: join mode (a duplicate follows the response in flight), after 0001.\n\
         -- Set by the first duplicate following a lock: only then do its writes send a NOTIFY.\n\
         ALTER TABLE {qualified} ADD COLUMN IF NOT EXISTS followed boolean NOT NULL DEFAULT false;\n\
         -- The live log of each lock, one row per publish, deleted when the lock ends.\n\
         -- Unlogged (no WAL): a crash empties it, and its followers then wait for the record.\n\
         CREATE UNLOGGED TABLE IF NOT EXISTS {live} (\n    \
             key_id bytea NOT NULL, -- the first 16 bytes of SHA-256(scope || 0x00 || key)\n    \
             token  bytea NOT NULL, -- the token of the lock whose log it is (16 bytes)\n    \
             seq    int8  NOT NULL, -- the index in the log of the row's first event, from 0\n    \
             n      int4  NOT NULL, -- how many events the row holds\n    \
             events bytea NOT NULL, -- the events, each its length (4 bytes) then a tag byte and its bytes\n    \
             PRIMARY KEY (key_id, token, seq)\n\
         );\n"
    )
}

/// The DDL of the grace for expired keys in `table`: the `grace_until` column; for the default
/// table it is `migrations/0003_idempotency_grace.sql` (a test holds them equal).
pub(super) fn create_grace(schema: Option<&str>, table: &str) -> String {
    let qualified = match (schema, table) {
        (None, "idempotency") => table.to_owned(),
        (Some(schema), table) => format!("{}.{}", quote(schema), quote(table)),
        (None, table) => quote(table),
    };
    format!(
        "-- tower-idempotency: the grace for expired keys (`with_expired_grace`), after 0001.\n\
         -- With a grace: the row is kept, and `begin` answers that the key expired, until then.\n\
         ALTER TABLE {qualified} ADD COLUMN IF NOT EXISTS grace_until timestamptz;\n"
    )
}

/// The channel of `table`'s notifications: a digest of the qualified name, so that stores on
/// different tables of one database do not wake each other.
fn channel(qualified: &str) -> String {
    let digest = Sha256::digest(qualified.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("tower_idempotency_{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_migration_is_the_default_table() {
        let shipped = include_str!("../../../migrations/0001_idempotency.sql");
        assert_eq!(shipped, create_table(None, "idempotency"));
        let shipped = include_str!("../../../migrations/0002_idempotency_live.sql");
        assert_eq!(shipped, create_live(None, "idempotency"));
        let shipped = include_str!("../../../migrations/0003_idempotency_grace.sql");
        assert_eq!(shipped, create_grace(None, "idempotency"));
    }

    #[test]
    fn names_are_quoted() {
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
        let statements = Statements::new(Some("tenant one"), "idem");
        assert_eq!(&*statements.table, "\"tenant one\".\"idem\"");
        assert!(
            statements.create.contains("CREATE INDEX IF NOT EXISTS \"idem_expires_at\" ON \"tenant one\".\"idem\"")
        );
        assert_eq!(&*statements.live, "\"tenant one\".\"idem_live\"");
        assert!(statements.create.contains("CREATE UNLOGGED TABLE IF NOT EXISTS \"tenant one\".\"idem_live\""));
        assert!(statements.create.contains("ALTER TABLE \"tenant one\".\"idem\" ADD COLUMN IF NOT EXISTS followed"));
    }

    #[test]
    fn channels_differ_by_table() {
        let (a, b) = (Statements::new(None, "idempotency"), Statements::new(Some("s"), "idempotency"));
        assert_ne!(a.channel, b.channel);
        assert_eq!(a.channel.len(), "tower_idempotency_".len() + 16);
        assert!(a.channel.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
    }
}
