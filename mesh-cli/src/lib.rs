//! The SSH client side of the Mesh protocol, shared by the `mesh-cli` binary and the
//! programs that drive a mesh from Rust (`mesh-bench`): node addresses, host-key
//! pinning, identities and the session that runs protocol commands
//! (docs/ssh-protocol.md).

pub mod connection;
// Compiled into the library's and the binary's tests; each uses a part of it.
#[cfg(test)]
#[allow(dead_code)]
mod fake_node;
pub mod host_keys;
pub mod identity;
pub mod node_addr;
