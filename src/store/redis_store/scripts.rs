//! The Lua scripts: one per operation, each on one key, so each is atomic and runs on Redis
//! Cluster unchanged.

use std::sync::LazyLock;

use ::redis::Script;

/// `begin`: look the key up and lock it when free, in one step.
///
/// `KEYS[1]`: the key. `ARGV[1]`: the new lock value (`L`, fingerprint, token). `ARGV[2]`: the
/// lease in ms. Returns 0 (locked: execute), 1 (mismatch), 2 (in flight), 3 (completed for
/// this fingerprint) or 4 (a value this crate did not write). It reads the first 33 bytes of
/// a held value only: the record itself comes from the `GET` that follows the script in the
/// same `MULTI`, because a large string through Lua costs Redis several times a plain `GET`.
/// An expired lock or record no longer exists (Redis expired it), so it counts as free.
const BEGIN_LUA: &str = r"
local head = redis.call('GETRANGE', KEYS[1], 0, 32)
if head == '' then
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

/// `complete`: replace the caller's lock by the record, with its TTL.
///
/// `ARGV[1]`: the caller's lock value. `ARGV[2]`: the record. `ARGV[3]`: the TTL in ms.
const COMPLETE_LUA: &str = r"
if redis.call('GETRANGE', KEYS[1], 0, 48) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// `renew`: extend the caller's lock. `ARGV[1]`: the lock value. `ARGV[2]`: the lease in ms.
const RENEW_LUA: &str = r"
if redis.call('GETRANGE', KEYS[1], 0, 48) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// `release`: remove the caller's lock. `ARGV[1]`: the lock value.
const RELEASE_LUA: &str = r"
if redis.call('GETRANGE', KEYS[1], 0, 48) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

pub(super) static BEGIN: LazyLock<Script> = LazyLock::new(|| Script::new(BEGIN_LUA));
pub(super) static COMPLETE: LazyLock<Script> = LazyLock::new(|| Script::new(COMPLETE_LUA));
pub(super) static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW_LUA));
pub(super) static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE_LUA));
