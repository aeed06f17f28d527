//! Node-to-node traffic: gRPC (package `mesh.v1`) over mutual TLS pinned by host key.
//!
//! `directory` knows which key belongs to which node id and feeds the TLS pins;
//! `server` serves Raft, forwarded writes, heartbeats and joins; `network` is the
//! openraft network client; `clients` caches channels to peers.

pub mod clients;
pub mod codec;
pub mod directory;
pub mod forward;
pub mod network;
pub mod server;

/// Largest gRPC message between nodes: a Raft append carries whole entries, and one
/// entry may hold a task's inputs (16 MiB) base64-free in bincode.
pub const MAX_MESSAGE_BYTES: usize = 128 * 1024 * 1024;
