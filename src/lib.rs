//! tower-idempotency (crate docs written with the layer).
#![cfg_attr(docsrs, feature(doc_cfg))]

mod fingerprint;
mod key;
mod record;
mod scope;
pub mod client;
pub mod store;

pub use fingerprint::Fingerprint;
pub use key::{IdempotencyKey, InvalidKey, MAX_KEY_LEN};
pub use record::{Record, StoredResponse};
pub use scope::{Scope, ScopeFn, ScopeId};
pub use store::{Begin, IdempotencyStore, LockToken, MemoryStore, StoreError, StoreKey};

/// The header a replayed response carries: `Idempotent-Replayed: true`.
pub const IDEMPOTENT_REPLAYED: http::HeaderName = http::HeaderName::from_static("idempotent-replayed");
