//! The openraft type configuration shared by every node.

use crate::command::{Request, Response};

openraft::declare_raft_types!(
    /// Mesh's Raft types: entries carry a batch of commands.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = crate::membership::MeshNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A Raft log entry of the mesh.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id.
pub type LogId = openraft::LogId<u64>;
/// A vote.
pub type Vote = openraft::Vote<u64>;
/// The stored membership.
pub type StoredMembership = openraft::StoredMembership<u64, crate::membership::MeshNode>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<u64, crate::membership::MeshNode>;
