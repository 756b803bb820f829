//! Redis Cluster slots, and the name of a lock's live log: a stream key in the same slot as
//! the lock's key, so that one script can touch both on Redis Cluster.
//!
//! A record key (`{prefix}{scope}:{key}`) carries no hash tag of ours, so its keys spread over
//! all slots. The stream of a lock gets a hash tag chosen to land on the record key's slot:
//! the tag of slot `s` is the smallest number, written in decimal, whose CRC16 falls in `s`
//! (found once for every slot, a 64 KiB table).

use std::sync::LazyLock;

/// Number of Redis Cluster slots.
const SLOTS: usize = 16_384;

/// CRC16-XMODEM (polynomial 0x1021, initial value 0), the checksum Redis Cluster hashes keys
/// with, one table lookup per byte.
const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut crc = (byte as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
            bit += 1;
        }
        table[byte] = crc;
        byte += 1;
    }
    table
};

fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0, |crc, &byte| (crc << 8) ^ CRC16_TABLE[usize::from((crc >> 8) as u8 ^ byte)])
}

/// The Redis Cluster slot of `key`: of its hash tag (what lies between the first `{` and the
/// first `}` after it, when not empty), else of the whole key.
pub(super) fn slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let tag = &key[open + 1..];
            tag.iter().position(|&b| b == b'}').map(|close| &tag[..close])
        })
        .filter(|tag| !tag.is_empty())
        .unwrap_or(key);
    crc16(hashed) % SLOTS as u16
}

/// For each slot, the smallest number whose decimal form hashes to it.
static TAGS: LazyLock<Box<[u32]>> = LazyLock::new(|| {
    let mut tags = vec![u32::MAX; SLOTS].into_boxed_slice();
    let mut missing = SLOTS;
    let mut n = 0u32;
    let mut digits = [0; 10];
    while missing > 0 {
        let slot = usize::from(crc16(decimal(n, &mut digits)) % SLOTS as u16);
        if tags[slot] == u32::MAX {
            tags[slot] = n;
            missing -= 1;
        }
        n += 1;
    }
    tags
});

/// `n` in decimal, written at the end of `buffer`.
fn decimal(mut n: u32, buffer: &mut [u8; 10]) -> &[u8] {
    let mut at = buffer.len();
    loop {
        at -= 1;
        buffer[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buffer[at..];
        }
    }
}

/// The hash tag (without braces) whose slot is `slot`.
fn tag(slot: u16) -> u32 {
    TAGS[usize::from(slot)]
}

/// The stream key of the live log of lock `lock` on the record key `record_key`:
/// `{prefix}{TAG}live:{lock id, 32 hex digits}`, where `TAG` is the tag of the record key's
/// slot, so both keys are in one slot.
///
/// Only a prefix with a `{` that opens no hash tag of its own (`a{b`, `{}`) could change the
/// stream key's slot; then the tag goes before the prefix instead (`{TAG}{prefix}live:...`),
/// where it always decides the slot.
pub(super) fn stream_key(prefix: &[u8], record_key: &[u8], lock: u128) -> Vec<u8> {
    let slot = slot(record_key);
    let mut digits = [0; 10];
    let tag = decimal(tag(slot), &mut digits);
    let lock = format!("live:{lock:032x}");
    let key = [prefix, b"{", tag, b"}", lock.as_bytes()].concat();
    if self::slot(&key) == slot {
        return key;
    }
    [b"{", tag, b"}", prefix, lock.as_bytes()].concat()
}

/// The key of `record_key`'s expired mark (written by `complete_with_grace`), in the same slot
/// as `record_key`, as [`stream_key`] places a stream.
pub(super) fn mark_key(prefix: &[u8], record_key: &[u8]) -> Vec<u8> {
    let slot = slot(record_key);
    let mut digits = [0; 10];
    let tag = decimal(tag(slot), &mut digits);
    let name = [b"expired:".as_slice(), &record_key[prefix.len()..]].concat();
    let key = [prefix, b"{", tag, b"}", &name].concat();
    if self::slot(&key) == slot {
        return key;
    }
    [b"{", tag, b"}", prefix, &name].concat()
}

/// Forces the tag table now (a few ms), so that no request pays for it.
pub(super) fn prepare() {
    LazyLock::force(&TAGS);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_and_slots_match_redis() {
        // The check value of CRC16-XMODEM, and slots Redis documents or reports
        // (`CLUSTER KEYSLOT`).
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot(b"foo"), 12_182);
        assert_eq!(slot(b"bar"), 5_061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16_384, "an empty tag hashes the whole key");
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"), "the tag runs from the first {{ to the next }}");
        assert_eq!(slot(b"foo{bar}{zap}"), slot(b"bar"));
        assert_eq!(slot(b"a{b"), crc16(b"a{b") % 16_384, "no closing brace: the whole key");
        assert_eq!(slot(b""), 0);
    }

    #[cfg(feature = "redis-cluster")]
    #[test]
    fn slots_match_the_cluster_clients() {
        use ::redis::cluster_routing::Slot;
        let mut key = Vec::new();
        for i in 0..5_000u32 {
            key.clear();
            key.extend_from_slice(format!("idem:-:{i}").as_bytes());
            if i % 3 == 0 {
                key.extend_from_slice(b"{x");
            }
            if i % 5 == 0 {
                key.extend_from_slice(format!("{}}}", i % 7).as_bytes());
            }
            assert_eq!(Slot::for_key(&key), Slot::new(slot(&key)).unwrap(), "{}", String::from_utf8_lossy(&key));
        }
    }

    #[test]
    fn every_slot_has_a_short_tag() {
        let mut digits = [0; 10];
        for s in 0..SLOTS as u16 {
            let tag = decimal(tag(s), &mut digits);
            assert_eq!(slot(tag), s);
            assert!(tag.len() <= 6, "slot {s}: {}", String::from_utf8_lossy(tag));
        }
    }

    #[test]
    fn a_stream_key_shares_its_record_keys_slot() {
        let lock = 0x0123_4567_89ab_cdef_0011_2233_4455_6677;
        let key = stream_key(b"idem:", b"idem:-:order-77", lock);
        let text = String::from_utf8(key.clone()).unwrap();
        let tag = text.strip_prefix("idem:{").and_then(|rest| rest.split_once('}')).unwrap();
        assert_eq!(tag.1, "live:0123456789abcdef0011223344556677");
        assert!(tag.0.bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(slot(&key), slot(b"idem:-:order-77"));
        // Client keys with braces, prefixes with a tag of their own, or a broken one.
        for (prefix, record) in [
            (&b"idem:"[..], &b"idem:-:a{b}c"[..]),
            (b"idem:", b"idem:-:a{b"),
            (b"idem:", b"idem:-:}{"),
            (b"{svc}:", b"{svc}:-:key"),
            (b"a{b", b"a{b-:key}x"),
            (b"a{b", b"a{b-:key"),
            (b"{}", b"{}-:key"),
            (b"", b"-:key"),
        ] {
            let key = stream_key(prefix, record, lock);
            assert_eq!(slot(&key), slot(record), "{}", String::from_utf8_lossy(&key));
        }
        assert!(stream_key(b"a{b", b"a{b-:key", lock).starts_with(b"{"), "the tag goes first");
    }
}
