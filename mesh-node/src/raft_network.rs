//! The Raft network of a node that has no peers yet.
//!
//! A single-voter mesh never sends Raft RPCs; any attempt to reach another node reports
//! it unreachable. The gRPC transport over pinned mutual TLS replaces this when nodes
//! join (see the cluster issue).

use mesh_core::raft_types::TypeConfig;
use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse};
use mesh_core::MeshNode;
use openraft::{RaftNetwork, RaftNetworkFactory};

/// Builds `NoPeer` clients.
#[derive(Debug, Clone, Default)]
pub struct NoPeers;

/// A client for a peer that cannot be reached.
#[derive(Debug)]
pub struct NoPeer(u64);

#[derive(Debug, thiserror::Error)]
#[error("node {0} is not reachable: this node has no node-to-node transport yet")]
struct NoTransport(u64);

impl RaftNetworkFactory<TypeConfig> for NoPeers {
    type Network = NoPeer;
    async fn new_client(&mut self, target: u64, _node: &MeshNode) -> NoPeer {
        NoPeer(target)
    }
}

impl RaftNetwork<TypeConfig> for NoPeer {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, MeshNode, RaftError<u64>>> {
        Err(RPCError::Unreachable(Unreachable::new(&NoTransport(self.0))))
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, MeshNode, RaftError<u64, InstallSnapshotError>>> {
        Err(RPCError::Unreachable(Unreachable::new(&NoTransport(self.0))))
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, MeshNode, RaftError<u64>>> {
        Err(RPCError::Unreachable(Unreachable::new(&NoTransport(self.0))))
    }
}
