//! The layer in process, through `tower::ServiceExt`: what each request gets, the answers the layer
//! makes itself, inputs, security, gRPC, races, faults, the flood bound and completion.
//!
//! One binary per area (as tower groups its tests); each file is one former test binary.

mod answers;
mod behaviour;
#[cfg(feature = "json")]
mod canonical;
#[path = "../common/mod.rs"]
mod common;
mod completion;
mod concurrency;
mod cors;
mod expired;
mod faults;
mod flood;
mod grpc;
mod inputs;
mod join;
mod json_rpc;
#[path = "../common/live_bound.rs"]
mod live_bound;
#[cfg(feature = "metrics")]
mod metrics;
mod one_write;
mod security;
