//! The Mesh daemon: Raft over sled, the SSH operator endpoint, the wgpu executor.
//!
//! `main.rs` only parses the command line; `node.rs` wires the modules below.
#![warn(missing_docs)]

pub mod admin_keys;
pub mod autopilot;
pub mod capabilities;
pub mod config;
pub mod gpu;
pub mod host_key;
pub mod http;
pub mod leader_watch;
pub mod liveness;
pub mod node;
pub mod peer;
pub mod placement;
pub mod proposer;
pub mod rejoin_hold;
pub mod rollback_guard;
pub mod service;
pub mod ssh;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod worker;
