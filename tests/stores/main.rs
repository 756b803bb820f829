//! The stores: the conformance suite against each, their own limits, the layer over Redis, and a
//! Redis restart.
//!
//! One binary per area (as tower groups its tests); each file is one former test binary.

#[path = "../common/mod.rs"]
mod common;
mod layer_redis;
mod memory;
mod redis_cluster;
mod redis_live;
#[cfg(feature = "redis")]
mod redis_processes;
mod redis_restart;
mod redis_store;
#[cfg(feature = "redis-cluster")]
#[path = "../common/resume.rs"]
mod resume;
mod secret_redis;
