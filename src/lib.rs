//! agentfense-runc: an OCI runtime over youki's libcontainer that fences a container's
//! workspace paths (hidden, view-only, read, copy-on-write writes) and audits access.
//!
//! The binary is a thin layer (`src/main.rs`); everything testable lives here.

pub mod audit;
pub mod cli;
pub mod config;
pub mod delta;
pub mod fence;
pub mod lifecycle;
pub mod logging;
pub mod policy;
pub mod splice;
pub mod sys;
