//! The Mesh daemon: Raft over sled, the SSH operator endpoint, the wgpu executor.
//!
//! `main.rs` only parses the command line; everything else lives in the modules here
//! so integration tests and benchmarks can reuse it.
#![warn(missing_docs)]

pub mod gpu;
pub mod store;
