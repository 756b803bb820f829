//! The Lua scripts: one per operation, so each is atomic. Each touches one key (`begin`), or a
//! lock's key and its live log's stream, which share a Cluster slot (see `slot.rs`), so each runs
//! on Redis Cluster unchanged.

use std::sync::LazyLock;

use ::redis::Script;

/// `begin`: look the key up and lock it when free, in one step.
///
/// `KEYS[1]`: the key. `KEYS[2]`: its expired mark (written by `complete` with a grace, in the
/// key's slot). `ARGV[1]`: the new lock value (`L`, fingerprint, token). `ARGV[2]`: the
/// lease in ms. Returns 0 (locked: execute), 1 (mismatch), 2 (in flight), 3 (completed for
/// this fingerprint), 4 (a value this crate did not write) or 5 (expired, within its grace:
/// the key is left as it is). It reads the first 33 bytes of
/// a held value only: the record itself comes from the `GET` that follows the script in the
/// same `MULTI`, because a large string through Lua costs Redis several times a plain `GET`.
/// An expired lock or record no longer exists (Redis expired it), so it counts as free.
const BEGIN_LUA: &str = r"
local head = redis.call('GETRANGE', KEYS[1], 0, 32)
if head == '' then
  if redis.call('EXISTS', KEYS[2]) == 1 then
    return 5
  end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 0
end
local tag = string.sub(head, 1, 1)
if #head ~= 33 or (tag ~= 'L' and tag ~= 'R' and tag ~= 'T') then
  return 4
end
if string.sub(head, 2) ~= string.sub(ARGV[1], 2, 33) then
  return 1
end
if tag == 'L' then
  return 2
end
return 3
";

/// `complete`: replace the caller's lock by the record, with its TTL, and end the lock's live
/// log if it has one.
///
/// `KEYS[2]`: the lock's stream. `ARGV[1]`: the caller's lock value. `ARGV[2]`: the record.
/// `ARGV[3]`: the TTL in ms. `ARGV[4]`: how long an ended log is kept, in ms. The end marker
/// (`2-0`, `c` = 1) wakes the followers blocked on the stream; a lock nobody published to or
/// followed has no stream, and none is made for it. With a grace (`complete_with_grace`),
/// `KEYS[3]` is the key's expired mark and `ARGV[5]` the grace in ms: the mark (`1`, no
/// record) is kept for the TTL and the grace, so `begin` finds it once the record is gone.
const COMPLETE_LUA: &str = r"
if redis.call('GETRANGE', KEYS[1], 0, 48) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if ARGV[5] then
  redis.call('SET', KEYS[3], '1', 'PX', tonumber(ARGV[3]) + tonumber(ARGV[5]))
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.pcall('XADD', KEYS[2], '2-0', 'c', '1')
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
return 1
";

/// `renew`: extend the caller's lock, and its live log if it has one. `KEYS[2]`: the lock's
/// stream. `ARGV[1]`: the lock value. `ARGV[2]`: the lease in ms.
const RENEW_LUA: &str = r"
if redis.call('GETRANGE', KEYS[1], 0, 48) ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
";

/// `release`: remove the caller's lock, and end its live log if it has one (`c` = 0).
/// `KEYS[2]`: the lock's stream. `ARGV[1]`: the lock value. `ARGV[2]`: how long an ended log is
/// kept, in ms.
const RELEASE_LUA: &str = r"
if redis.call('GETRANGE', KEYS[1], 0, 48) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.pcall('XADD', KEYS[2], '2-0', 'c', '0')
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return 1
";

/// `publish`: append events to the caller's live log, each index once, while the lock is held.
///
/// `KEYS[2]`: the lock's stream. `ARGV[1]`: the lock value. `ARGV[2]`: the index of the first
/// event. `ARGV[3]`, `ARGV[4]`, ...: a field and a value per event. Event `i` is the entry
/// `1-(i+1)`; the indices the stream holds already are skipped (a publish sent again), and a
/// publish that would leave a gap writes nothing. The stream expires with the lock. Returns 1
/// (appended, or nothing new), 0 (the lock is not held: nothing written) or 2 (a gap).
const PUBLISH_LUA: &str = r"
if redis.call('GETRANGE', KEYS[1], 0, 48) ~= ARGV[1] then
  return 0
end
local held = 0
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
if last then
  held = tonumber(string.match(last[1], '^1%-(%d+)$') or 0)
end
local from = tonumber(ARGV[2])
if from > held then
  return 2
end
for i = 3, #ARGV - 1, 2 do
  local index = from + (i - 3) / 2
  if index >= held then
    redis.call('XADD', KEYS[2], string.format('1-%d', index + 1), ARGV[i], ARGV[i + 1])
  end
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return 1
";

/// `follow`, first step: which lock a follower with no cursor follows.
///
/// `ARGV[1]`: the fingerprint. Returns `{2, token id}` (a lock for this fingerprint), `{1}` (a
/// record for it) or `{0}` (anything else).
const LOOKUP_LUA: &str = r"
local head = redis.call('GETRANGE', KEYS[1], 0, 48)
if string.sub(head, 2, 33) ~= ARGV[1] then
  return {0}
end
local tag = string.sub(head, 1, 1)
if tag == 'L' and #head == 49 then
  return {2, string.sub(head, 34, 49)}
end
if tag == 'R' or tag == 'T' then
  return {1}
end
return {0}
";

/// `follow`: check the lock and read its live log after the follower's cursor.
///
/// `KEYS[2]`: the lock's stream. `ARGV[1]`: the lock value. `ARGV[2]`: the first entry id to
/// read. `ARGV[3]`: the most entries to return. Returns `{2, lease left in ms, entries}` while
/// the key holds the lock, making the stream (with the placeholder `0-1`, expiring with the
/// lock) if it has none, so that `complete` and `release` end it; otherwise the log has
/// ended: `{1}` when the key holds a record for the lock's fingerprint, `{0}` when not.
const FOLLOW_LUA: &str = r"
local held = redis.call('GETRANGE', KEYS[1], 0, 48)
if held ~= ARGV[1] then
  local tag = string.sub(held, 1, 1)
  if (tag == 'R' or tag == 'T') and string.sub(held, 2, 33) == string.sub(ARGV[1], 2, 33) then
    return {1}
  end
  return {0}
end
local ttl = redis.call('PTTL', KEYS[1])
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XADD', KEYS[2], '0-1', 'o', '')
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[2], ttl)
  end
  return {2, ttl, {}}
end
return {2, ttl, redis.call('XRANGE', KEYS[2], ARGV[2], '+', 'COUNT', ARGV[3])}
";

/// `inspect`: the key's remaining time to live in ms and its value, read in one step.
/// Returns `{}` when the key is absent (or expired).
const INSPECT_LUA: &str = r"
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then
  return {}
end
return {ttl, redis.call('GET', KEYS[1])}
";

/// `purge`: remove the key's record, unless a lock holds it. Returns 0 (absent or expired), 1
/// (a record removed), 2 (a lock: nothing changed) or 3 (a value this crate did not write:
/// nothing changed). The live log of the lock the record replaced ended with it, and expires
/// on its own.
const PURGE_LUA: &str = r"
local tag = redis.call('GETRANGE', KEYS[1], 0, 0)
if tag == '' then
  return 0
end
if tag == 'L' then
  return 2
end
if tag ~= 'R' and tag ~= 'T' then
  return 3
end
redis.call('DEL', KEYS[1])
return 1
";

pub(super) static BEGIN: LazyLock<Script> = LazyLock::new(|| Script::new(BEGIN_LUA));
pub(super) static COMPLETE: LazyLock<Script> = LazyLock::new(|| Script::new(COMPLETE_LUA));
pub(super) static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW_LUA));
pub(super) static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE_LUA));
pub(super) static PUBLISH: LazyLock<Script> = LazyLock::new(|| Script::new(PUBLISH_LUA));
pub(super) static LOOKUP: LazyLock<Script> = LazyLock::new(|| Script::new(LOOKUP_LUA));
pub(super) static FOLLOW: LazyLock<Script> = LazyLock::new(|| Script::new(FOLLOW_LUA));
pub(super) static INSPECT: LazyLock<Script> = LazyLock::new(|| Script::new(INSPECT_LUA));
pub(super) static PURGE: LazyLock<Script> = LazyLock::new(|| Script::new(PURGE_LUA));
