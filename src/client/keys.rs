//! Making keys: random, derived from the caller's parts, per batch item (the client half uses them).

use sha2::{Digest, Sha256};

use crate::IdempotencyKey;

/// Domain-separation tag of [`KeyDeriver`]'s digest. Bump the version if the encoding changes.
const DERIVE_TAG: &[u8] = b"tower-idempotency/derive/v1";
/// Namespace of [`IdempotencyKey::for_item`], so an item key never equals a derived key.
const BATCH_ITEM_NAMESPACE: &[u8] = b"tower-idempotency/batch-item/v1";

impl IdempotencyKey {
    /// A fresh random key: a UUID v4 in its hyphenated form (36 characters).
    ///
    /// Use it for a request that has no natural identity: generate it once per logical
    /// request and send it on every retry of that request (the
    /// [`SetIdempotencyKeyLayer`](crate::client::SetIdempotencyKeyLayer) does this for you).
    ///
    /// ```
    /// use tower_idempotency::IdempotencyKey;
    ///
    /// let key = IdempotencyKey::random();
    /// assert_eq!(key.as_str().len(), 36);
    /// assert_ne!(key, IdempotencyKey::random());
    /// ```
    #[must_use]
    pub fn random() -> Self {
        Self::from_valid(uuid::Uuid::new_v4().hyphenated().to_string())
    }

    /// A key derived from `parts` in `namespace`: the same inputs always give the same key.
    ///
    /// Shorthand for [`KeyDeriver::new(namespace)`](KeyDeriver::new), one
    /// [`part`](KeyDeriver::part) per item, then [`finish`](KeyDeriver::finish); see
    /// [`KeyDeriver`] for the encoding and for parts of mixed types.
    ///
    /// ```
    /// use tower_idempotency::IdempotencyKey;
    ///
    /// let a = IdempotencyKey::derive("generate", ["user-1", "a poem about rust", "model-x"]);
    /// let b = IdempotencyKey::derive("generate", ["user-1", "a poem about rust", "model-x"]);
    /// assert_eq!(a, b);
    /// // Moving a separator between parts gives another key.
    /// assert_ne!(a, IdempotencyKey::derive("generate", ["user-1", "a poem", "about rust", "model-x"]));
    /// ```
    #[must_use]
    pub fn derive<I>(namespace: &str, parts: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<[u8]>,
    {
        parts.into_iter().fold(KeyDeriver::new(namespace), KeyDeriver::part).finish()
    }

    /// The key of item `index` of a batch whose key is `self`.
    ///
    /// When one logical operation is sent as many requests (a batch of 100 orders, each its
    /// own `POST`), give the batch one key, store it with the batch, and derive each item's key
    /// from it: a retry of the whole batch, even from another process, then sends every item
    /// with the key it had the first time, and the server runs each item once.
    ///
    /// Item keys are derived like [`KeyDeriver`] keys, in a namespace of their own, so they
    /// never equal the batch key, another batch's item keys, or a [`derive`](Self::derive)d key.
    ///
    /// ```
    /// use tower_idempotency::IdempotencyKey;
    ///
    /// let batch = IdempotencyKey::random();
    /// let first = batch.for_item(0);
    /// assert_eq!(first, batch.for_item(0));
    /// assert_ne!(first, batch.for_item(1));
    /// ```
    #[must_use]
    pub fn for_item(&self, index: u64) -> Self {
        KeyDeriver::new(BATCH_ITEM_NAMESPACE).part(self.as_str()).part(index.to_be_bytes()).finish()
    }
}

/// Derives a deterministic key from a namespace and a sequence of parts.
///
/// Use it when a request has a natural identity the caller can recompute, for example
/// (user, prompt, model) for an LLM generation that bills tokens: a retry after a crash, from
/// any process, then carries the same key, and the server replays the first result instead of
/// billing twice. Use a different `namespace` per kind of operation, so the same parts sent to
/// two operations never share a key.
///
/// # Encoding
///
/// The key is the SHA-256 digest, as 64 lowercase hex characters, of
///
/// ```text
/// "tower-idempotency/derive/v1" || len(namespace) || namespace || len(part1) || part1 || ...
/// ```
///
/// where each `len` is the byte length as a big-endian `u64`. Length-prefixing every field
/// makes the encoding injective: no choice of separators inside the parts can make two
/// different sequences encode alike, so `("a:b", "c")` and `("a", "b:c")` differ, and so do
/// `("ab", "")` and `("a", "b")`, or `()` and `("")`. Each part is hashed as it is added, so
/// a long prompt is never copied.
///
/// The encoding is stable: a key derived by this version is derived the same by every later
/// `0.x`/`1.x` version, so keys survive upgrades of the client.
///
/// A derived key is as guessable as its parts. The server scopes keys per tenant (by default,
/// by the `Authorization` header), so another tenant cannot use a guessed key; still, prefer
/// parts that identify the operation (ids, content) over secrets.
///
/// ```
/// use tower_idempotency::client::KeyDeriver;
///
/// let user_id: u64 = 42;
/// let base = KeyDeriver::new("generate").part(user_id.to_be_bytes());
/// // Clone a prefix to derive many keys that share it.
/// let key = base.clone().part("a poem about rust").part("model-x").finish();
/// assert_eq!(key.as_str().len(), 64);
/// assert_ne!(key, base.part("a poem about rust").finish());
/// ```
#[derive(Clone, Debug)]
#[must_use = "a KeyDeriver does nothing until `finish` is called"]
pub struct KeyDeriver {
    hasher: Sha256,
}

impl KeyDeriver {
    /// Starts a key in `namespace` (any bytes; the empty namespace is a namespace too).
    pub fn new(namespace: impl AsRef<[u8]>) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(DERIVE_TAG);
        let mut this = Self { hasher };
        this.update(namespace.as_ref());
        this
    }

    /// Appends one part. Parts are ordered: `a` then `b` is not `b` then `a`.
    pub fn part(mut self, part: impl AsRef<[u8]>) -> Self {
        self.update(part.as_ref());
        self
    }

    /// The key: 64 lowercase hex characters.
    #[must_use]
    pub fn finish(self) -> IdempotencyKey {
        let digest = self.hasher.finalize();
        let mut hex = String::with_capacity(2 * digest.len());
        for byte in digest {
            hex.push(char::from(HEX[usize::from(byte >> 4)]));
            hex.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        IdempotencyKey::from_valid(hex)
    }

    fn update(&mut self, field: &[u8]) {
        // `usize` is at most 64 bits on every supported target, so this is lossless.
        let len = field.len() as u64;
        self.hasher.update(len.to_be_bytes());
        self.hasher.update(field);
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::key::validate;

    fn derive(parts: &[&[u8]]) -> IdempotencyKey {
        IdempotencyKey::derive("ns", parts)
    }

    #[test]
    fn random_keys_are_valid_uuids_and_distinct() {
        let keys: HashSet<_> = (0..1000).map(|_| IdempotencyKey::random()).collect();
        assert_eq!(keys.len(), 1000);
        for key in &keys {
            assert_eq!(validate(key.as_str().as_bytes()), Ok(()));
            let uuid = uuid::Uuid::parse_str(key.as_str()).expect("a UUID");
            assert_eq!(uuid.get_version_num(), 4);
        }
    }

    #[test]
    fn derive_is_deterministic_and_looks_like_hex() {
        let a = derive(&[b"user-1", b"prompt", b"model"]);
        assert_eq!(a, derive(&[b"user-1", b"prompt", b"model"]));
        assert_eq!(a.as_str().len(), 64);
        assert!(a.as_str().bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }

    #[test]
    fn derive_has_a_known_answer() {
        // Pins the encoding: changing it would silently change every caller's keys.
        let mut hasher = Sha256::new();
        hasher.update(b"tower-idempotency/derive/v1");
        hasher.update(2u64.to_be_bytes());
        hasher.update(b"ns");
        hasher.update(3u64.to_be_bytes());
        hasher.update(b"abc");
        let expected: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(derive(&[b"abc"]).as_str(), expected);
    }

    #[test]
    fn separators_inside_parts_cannot_collide() {
        assert_ne!(derive(&[b"a:b", b"c"]), derive(&[b"a", b"b:c"]));
        assert_ne!(derive(&[b"ab", b""]), derive(&[b"a", b"b"]));
        assert_ne!(derive(&[b"", b"ab"]), derive(&[b"ab"]));
        assert_ne!(derive(&[]), derive(&[b""]));
        assert_ne!(derive(&[b""]), derive(&[b"", b""]));
        assert_ne!(derive(&[b"a", b"b"]), derive(&[b"b", b"a"]));
        // A length prefix inside a part does not fool it either.
        let mut forged = b"a".to_vec();
        forged.extend_from_slice(&1u64.to_be_bytes());
        forged.push(b'b');
        assert_ne!(derive(&[&forged]), derive(&[b"a", b"b"]));
    }

    #[test]
    fn namespaces_separate_keys() {
        assert_ne!(IdempotencyKey::derive("a", ["b"]), IdempotencyKey::derive("ab", [""; 0]));
        assert_ne!(IdempotencyKey::derive("", ["ab"]), IdempotencyKey::derive("a", ["b"]));
        assert_ne!(IdempotencyKey::derive("orders", ["1"]), IdempotencyKey::derive("refunds", ["1"]));
    }

    #[test]
    fn builder_and_shorthand_agree() {
        let built = KeyDeriver::new("ns").part("user").part(7u32.to_be_bytes()).part(b"x".as_slice()).finish();
        assert_eq!(built, derive(&[b"user", &7u32.to_be_bytes(), b"x"]));
    }

    #[test]
    fn batch_item_keys_are_stable_distinct_and_valid() {
        let batch: IdempotencyKey = "batch-2024-06-01".parse().unwrap();
        let items: Vec<_> = (0..100).map(|i| batch.for_item(i)).collect();
        assert_eq!(items.iter().collect::<HashSet<_>>().len(), 100);
        assert_eq!(items[7], batch.for_item(7));
        assert!(!items.contains(&batch));
        let other: IdempotencyKey = "batch-2024-06-02".parse().unwrap();
        assert_ne!(other.for_item(0), batch.for_item(0));
        // Not the same as deriving from the batch key's text in another namespace.
        assert_ne!(batch.for_item(0), IdempotencyKey::derive("", [batch.as_str().as_bytes(), &0u64.to_be_bytes()]));
        for item in &items {
            assert_eq!(validate(item.as_str().as_bytes()), Ok(()));
        }
    }

    /// Property-style: every key the client makes, over many shapes of input (empty, binary,
    /// non-ASCII, long, many parts), passes the server's validation, and distinct inputs give
    /// distinct keys.
    #[test]
    fn every_produced_key_passes_server_validation() {
        let mut state = 0x5eed_u64;
        let mut next = move || {
            // splitmix64: a fixed, dependency-free stream of test inputs.
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let mut seen = HashSet::new();
        let mut inputs = HashSet::new();
        for _ in 0..2000 {
            let part_count = (next() % 6) as usize;
            let parts: Vec<Vec<u8>> = (0..part_count)
                .map(|_| {
                    let len = match next() % 4 {
                        0 => 0,
                        1 => 1,
                        2 => (next() % 64) as usize,
                        _ => (next() % 4096) as usize,
                    };
                    (0..len).map(|_| next() as u8).collect()
                })
                .collect();
            let namespace = if next() % 2 == 0 { "" } else { "généré ✓" };
            let key = IdempotencyKey::derive(namespace, &parts);
            assert_eq!(validate(key.as_str().as_bytes()), Ok(()), "{parts:?}");
            assert_eq!(IdempotencyKey::parse(key.as_str().as_bytes()).as_ref(), Ok(&key));
            let item = key.for_item(next());
            assert_eq!(validate(item.as_str().as_bytes()), Ok(()));
            if inputs.insert((namespace, parts)) {
                assert!(seen.insert(key), "two different inputs derived the same key");
            }
        }
        for _ in 0..200 {
            let key = IdempotencyKey::random();
            assert_eq!(IdempotencyKey::parse(key.as_str().as_bytes()).as_ref(), Ok(&key));
        }
    }
}
