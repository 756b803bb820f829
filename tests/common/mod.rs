//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

pub mod conformance;
#[cfg(feature = "redis")]
pub mod redis;
