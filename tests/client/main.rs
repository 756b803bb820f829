//! The client half: stamping keys, retrying with them (tower and reqwest), and against the
//! server half.
//!
//! One binary per area (as tower groups its tests); each file is one former test binary.

mod end_to_end;
mod reqwest_middleware;
mod retry;
mod stamp;
#[path = "../support/mod.rs"]
mod support;
