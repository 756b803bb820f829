//! The crate's public store conformance suite (feature `conformance`), as the tests use it.

#[allow(unused_imports)]
pub use tower_idempotency::store::conformance::*;
