//! The fingerprint a lock and a record carry: which request they belong to.

use std::fmt;

/// The fingerprint of a request: HMAC-SHA-256 under a key derived from the layer's
/// [`Secret`](crate::Secret), over method, path, query, body and any headers the layer is told
/// to include, each length-prefixed. The layer computes it; a store keeps it with a
/// lock or a record and compares it on `begin`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// A fingerprint from its bytes (for stores that read one back).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest's bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprint(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…)")
    }
}
