//! [`ConfigError`]: an invalid configuration value, whichever setting it came from.

use std::fmt;

/// The fewest bytes a [`Secret`](crate::Secret) has: 16 (128 bits).
pub(crate) const MIN_SECRET_LEN: usize = 16;

/// An invalid configuration value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The header name is not a valid HTTP header name.
    InvalidHeaderName(String),
    /// The [`Secret`](crate::Secret) has fewer than [`MIN_SECRET_LEN`](crate::secret::MIN_SECRET_LEN)
    /// bytes (it had this many).
    SecretTooShort(usize),
    /// The layer's store outlives the process and the layer has no
    /// [`Secret`](crate::Secret) ([`with_secret`](crate::IdempotencyLayer::with_secret)), so
    /// it has no keyed digests to compute a store key with.
    NoSecret,
    /// The JSON Pointer is not one (RFC 6901: empty, or `/`-separated tokens where `~` is
    /// followed by `0` or `1`).
    InvalidJsonPointer(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidHeaderName(name) => write!(f, "`{name}` is not a valid HTTP header name"),
            Self::SecretTooShort(len) => write!(
                f,
                "the idempotency secret has {len} bytes; it needs at least {} (ideally 32 random bytes)",
                MIN_SECRET_LEN
            ),
            Self::NoSecret => f.write_str(
                "the idempotency layer's store outlives the process and the layer has no secret: \
                 set the deployment secret with `with_secret`",
            ),
            Self::InvalidJsonPointer(pointer) => write!(f, "`{pointer}` is not a valid JSON Pointer (RFC 6901)"),
        }
    }
}

impl std::error::Error for ConfigError {}
