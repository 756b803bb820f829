//! The deployment secret that keys the two digests a store keeps: the scope (who a key belongs
//! to) and the request fingerprint.
//!
//! Both are HMAC-SHA-256 under a key derived from the [`Secret`], so what a store keeps (Redis
//! key names and values, PostgreSQL rows, a dump or a backup of either) lets no one test
//! guesses of a credential or of a secret in a request body against it: without the secret,
//! a digest is indistinguishable from random bytes.
//!
//! - [`MemoryStore`](crate::store::MemoryStore) (and any store whose
//!   [`outlives_process`](crate::store::IdempotencyStore::outlives_process) is `false`) needs
//!   nothing: without [`with_secret`](crate::IdempotencyLayer::with_secret) the layer uses a
//!   random secret drawn once per process.
//! - A store that outlives the process (Redis, PostgreSQL) needs
//!   [`with_secret`](crate::IdempotencyLayer::with_secret), the same on every replica: a random
//!   secret per process would make every record unreachable after a restart, and a retry
//!   would run its request again. Without one, every guarded request is refused with `503`
//!   and an error is logged, naming the fix.
//! - Replicas check that they agree: at its first guarded request, a layer over such a store
//!   writes a check record under a reserved key, whose fingerprint is derived from the secret,
//!   kept for a century. A replica with another secret finds that record bound to another
//!   fingerprint: it refuses every guarded request with `503` and logs an error, instead of
//!   missing every record the others wrote and running their requests a second time.
//!
//! # Rotating the secret
//!
//! Every scope and every fingerprint changes with the secret, so the stored key of every
//! request changes too. What that means:
//!
//! - **Records** written under the old secret cannot be found under the new one: a retry of a
//!   key answered before the rotation runs again. They expire with their TTL.
//! - **Keys in flight** under the old secret are locked under the old stored key only: a
//!   retry reaching a replica with the new secret runs the request a second time.
//! - **A mixed fleet is refused**: the check record names one secret; replicas started with
//!   another answer `503` to every guarded request until the check record is removed.
//!
//! So rotate with no traffic on covered requests in between: stop (or drain) every replica,
//! wait until no client will retry a request it sent before (its retry window, at most the
//! TTL), delete the check record, then start every replica with the new secret:
//!
//! - Redis: `DEL idem:0000000000000000000000000000000000000000000000000000000000000000:tower-idempotency-secret-check`
//!   (your key prefix in place of `idem:`; the scope part is 64 zeros);
//! - PostgreSQL: `DELETE FROM idempotency WHERE key = 'tower-idempotency-secret-check'` (your
//!   table's name in place of `idempotency`).
//!
//! A rotation that cannot wait for the retry window accepts that a request retried across it
//! may run twice. A replica started with a new secret before the record was deleted runs
//! nothing twice: it refuses, and serves once the record is gone and it claims it.

use std::{
    fmt,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{
    IdempotencyKey, ScopeId,
    error::ConfigError,
    store::{Begin, Fingerprint, IdempotencyStore, Record, StoreError, StoreKey},
};

/// How long the check record is kept: a century, the longest TTL a store is asked for.
const CHECK_TTL: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// The fewest bytes a [`Secret`] has: 16 (128 bits).
pub const MIN_SECRET_LEN: usize = crate::error::MIN_SECRET_LEN;

/// The idempotency key of the check record (in a scope of 32 zero bytes), which a layer over a
/// store that outlives the process writes to prove its replicas share one secret: see the
/// [module docs](self). Delete it to rotate the secret.
pub const CHECK_KEY: &str = "tower-idempotency-secret-check";

/// The deployment secret the layer keys its digests with (the scope and the request
/// fingerprint). Set it with [`IdempotencyLayer::with_secret`](crate::IdempotencyLayer::with_secret).
///
/// Default: a random secret per process when the store does not outlive the process (the
/// in-memory store); none, and every guarded request refused with `503`, over a store that does
/// (Redis, PostgreSQL), whose replicas and restarts must share it. See the
/// [`secret`](crate::secret) module docs for what it protects and how to rotate it.
///
/// Its `Debug` shows no byte of it.
///
/// ```
/// use tower_idempotency::{IdempotencyLayer, Secret};
///
/// // In production: from the environment or a secret manager, the same on every replica.
/// let secret = Secret::new("a long random string, the same on every replica")?;
/// let layer = IdempotencyLayer::new().with_secret(secret);
/// # let _ = layer;
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Secret(Arc<[u8]>);

impl Secret {
    /// A secret from its bytes: at least [`MIN_SECRET_LEN`] (16), ideally 32 random bytes (a
    /// random string of 43 base64 characters, say).
    pub fn new(bytes: impl AsRef<[u8]>) -> Result<Self, ConfigError> {
        let bytes = bytes.as_ref();
        if bytes.len() < MIN_SECRET_LEN {
            return Err(ConfigError::SecretTooShort(bytes.len()));
        }
        Ok(Self(bytes.into()))
    }

    /// A new random secret (32 bytes from the operating system's generator). Only for a store
    /// that ends with the process: a shared store needs the same secret in every process.
    pub fn random() -> Self {
        let mut bytes = [0u8; 32];
        bytes[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        bytes[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        Self(bytes.as_slice().into())
    }

    /// The random secret of this process, drawn once: every layer over a store that ends with
    /// the process shares it.
    fn per_process() -> &'static Self {
        static SECRET: OnceLock<Secret> = OnceLock::new();
        SECRET.get_or_init(Self::random)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The keyed digests of one layer: HMAC states keyed once, cloned per request.
pub(crate) struct Keyed {
    scope: Hmac<Sha256>,
    fingerprint: Hmac<Sha256>,
    /// For a store that outlives the process: the check that every replica has this secret.
    check: Option<Check>,
}

struct Check {
    fingerprint: Fingerprint,
    done: AtomicBool,
    /// One check at a time per layer: the others wait for its result.
    running: tokio::sync::Mutex<()>,
}

/// Why a layer refuses a guarded request before looking at the store.
pub(crate) enum Refused {
    /// The store outlives the process, and no secret was set.
    NoSecret,
    /// The check record was written with another secret.
    OtherSecret,
    /// The store failed during the check.
    Store(StoreError),
}

/// The layer's digests: keyed, or missing (a store that outlives the process, no secret).
#[derive(Clone)]
pub(crate) enum Digests {
    Keyed(Arc<Keyed>),
    Missing,
}

impl Digests {
    /// The default for `store`: a per-process secret if the store ends with the process.
    pub(crate) fn default_for<St: IdempotencyStore>(store: &St) -> Self {
        if store.outlives_process() { Self::Missing } else { Self::keyed(Secret::per_process(), false) }
    }

    /// Digests keyed with `secret`; `check`: replicas must prove they share it.
    pub(crate) fn keyed(secret: &Secret, check: bool) -> Self {
        let derive = |label: &[u8]| {
            let mut mac = new_mac(&secret.0);
            mac.update(label);
            mac.finalize().into_bytes()
        };
        let scope = new_mac(&derive(b"tower-idempotency/scope/v1"));
        let fingerprint = new_mac(&derive(b"tower-idempotency/fingerprint/v1"));
        let check = check.then(|| Check {
            fingerprint: Fingerprint::from_bytes(derive(b"tower-idempotency/secret-check/v1").into()),
            done: AtomicBool::new(false),
            running: tokio::sync::Mutex::new(()),
        });
        Self::Keyed(Arc::new(Keyed { scope, fingerprint, check }))
    }

    /// The keyed digests, unchecked: `None` without a secret.
    pub(crate) fn unchecked(&self) -> Option<&Keyed> {
        match self {
            Self::Keyed(keyed) => Some(keyed),
            Self::Missing => None,
        }
    }

    /// The keyed digests, once the store is known to hold this secret's check record (checked
    /// once per layer, at its first guarded request).
    pub(crate) async fn ready<St: IdempotencyStore>(
        &self,
        store: &St,
        lease: std::time::Duration,
    ) -> Result<&Keyed, Refused> {
        let Self::Keyed(keyed) = self else { return Err(Refused::NoSecret) };
        let Some(check) = &keyed.check else { return Ok(keyed) };
        if check.done.load(Ordering::Acquire) {
            return Ok(keyed);
        }
        let _running = check.running.lock().await;
        if check.done.load(Ordering::Acquire) {
            return Ok(keyed);
        }
        let key = check_key();
        let agreed = match store.begin(&key, &check.fingerprint, lease).await.map_err(Refused::Store)? {
            Begin::Execute(token) => {
                store.complete(&key, &token, Record::NotRetained, CHECK_TTL).await.map_err(Refused::Store)?
            }
            // Another replica is writing the same check record, or wrote it: the same secret.
            Begin::Locked | Begin::Completed(_) => true,
            Begin::Mismatch => return Err(Refused::OtherSecret),
            // The check record is written without a grace, so this is not it: nothing checked.
            Begin::Expired => false,
        };
        // A completion that lost its lease checked nothing: the next request checks again.
        check.done.store(agreed, Ordering::Release);
        Ok(keyed)
    }
}

impl Keyed {
    /// The scope HMAC, keyed: `Scope::resolve` clones it per request.
    pub(crate) fn scope_key(&self) -> &Hmac<Sha256> {
        &self.scope
    }

    /// A new HMAC for a request fingerprint.
    pub(crate) fn fingerprint_mac(&self) -> Hmac<Sha256> {
        self.fingerprint.clone()
    }
}

fn new_mac(key: &[u8]) -> Hmac<Sha256> {
    <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes a key of any length")
}

/// The reserved store key of the check record. Its scope, 32 zero bytes, is no keyed digest
/// of anything (a collision is a 2^-256 chance), so no request's key can land on it.
pub(crate) fn check_key() -> StoreKey {
    let key = IdempotencyKey::parse(CHECK_KEY.as_bytes()).expect("a valid key");
    StoreKey::new(Some(ScopeId::from_bytes([0; 32])), key)
}

impl fmt::Debug for Digests {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Keyed(keyed) => {
                f.write_str(if keyed.check.is_some() { "Keyed(checked in the store)" } else { "Keyed" })
            }
            Self::Missing => f.write_str("Missing"),
        }
    }
}

/// Digests keyed with a secret of 32 `byte`s, unchecked, for unit tests.
#[cfg(test)]
pub(crate) fn test_keyed(byte: u8) -> Keyed {
    let Digests::Keyed(keyed) = Digests::keyed(&Secret::new([byte; 32]).unwrap(), false) else { unreachable!() };
    Arc::into_inner(keyed).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_no_byte_and_short_secrets_are_refused() {
        let secret = Secret::new("0123456789abcdef-the-secret").unwrap();
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
        assert_eq!(Secret::new("short").unwrap_err(), ConfigError::SecretTooShort(5));
    }

    #[test]
    fn digests_depend_on_the_secret_and_on_their_purpose() {
        let mac = |digests: &Digests, scope: bool| {
            let Digests::Keyed(keyed) = digests else { unreachable!() };
            let mut mac = if scope { keyed.scope_key().clone() } else { keyed.fingerprint_mac() };
            mac.update(b"Basic dXNlcjpwYXNz");
            mac.finalize().into_bytes()
        };
        let a = Digests::keyed(&Secret::new([1u8; 32]).unwrap(), false);
        let b = Digests::keyed(&Secret::new([2u8; 32]).unwrap(), false);
        assert_eq!(mac(&a, true), mac(&Digests::keyed(&Secret::new([1u8; 32]).unwrap(), true), true));
        assert_ne!(mac(&a, true), mac(&b, true));
        assert_ne!(mac(&a, true), mac(&a, false));
    }
}
