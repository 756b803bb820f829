//! The layer behind real hyper servers on loopback (HTTP/1.1 and HTTP/2), and the example
//! server driven as a black box.
//!
//! One binary per area (as tower groups its tests); each file is one former test binary.

mod example_admin;
#[cfg(feature = "json")]
mod example_quotes;
mod example_rpc;
mod example_server;
mod example_stream;
mod joined_past_bound;
#[path = "../common/live_bound.rs"]
mod live_bound;
mod readme;
mod real_servers;
#[path = "../common/resume.rs"]
mod resume;
mod resume_exactly;
#[path = "../support/mod.rs"]
mod support;
mod uploads;
