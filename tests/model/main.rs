//! Random programs against a model of the documented behaviour (the `guide` page), and random faults under load.
//!
//! One binary per area (as tower groups its tests); each file is one former test binary.

#[path = "../common/mod.rs"]
mod common;
mod fault_injection;
mod join_model;
mod layer_model;
