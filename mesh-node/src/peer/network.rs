//! The openraft network over gRPC: each Raft RPC is one unary call carrying the
//! codec-encoded `(target node id, openraft message)`; the answer carries
//! `Result<Response, RaftError>`. The target id lets a machine that rejoined under a
//! new id (same key, same address) refuse traffic meant for its old, removed id.

use super::clients::PeerClients;
use super::codec::{from_payload, to_payload};
use mesh_core::raft_types::TypeConfig;
use mesh_core::MeshNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{RaftNetwork, RaftNetworkFactory};
use serde::de::DeserializeOwned;
use std::future::Future;
use tonic::Status;

/// Builds one link per target.
#[derive(Clone)]
pub struct PeerNetwork {
    clients: PeerClients,
}

impl PeerNetwork {
    /// A network using these clients.
    pub fn new(clients: PeerClients) -> PeerNetwork {
        PeerNetwork { clients }
    }
}

/// The link to one Raft peer.
pub struct PeerLink {
    target: u64,
    node: MeshNode,
    clients: PeerClients,
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerLink;
    async fn new_client(&mut self, target: u64, node: &MeshNode) -> PeerLink {
        PeerLink {
            target,
            node: node.clone(),
            clients: self.clients.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Transport(String);

type Rpc<R, E> = Result<R, RPCError<u64, MeshNode, RaftError<u64, E>>>;

impl PeerLink {
    async fn call<R, E, F, Fut>(&self, option: &RPCOption, f: F) -> Rpc<R, E>
    where
        R: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
        F: FnOnce(mesh_proto::v1::raft_client::RaftClient<tonic::transport::Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<mesh_proto::v1::RaftPayload>, Status>>,
    {
        let client = self
            .clients
            .raft(&self.node)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&Transport(e.to_string()))))?;
        let reply = match tokio::time::timeout(option.hard_ttl(), f(client)).await {
            Err(_) => {
                return Err(RPCError::Unreachable(Unreachable::new(&Transport(
                    "timed out".into(),
                ))))
            }
            Ok(Err(status)) => {
                return Err(match status.code() {
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
                        RPCError::Unreachable(Unreachable::new(&Transport(status.to_string())))
                    }
                    _ => RPCError::Network(NetworkError::new(&Transport(status.to_string()))),
                })
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        let result: Result<R, RaftError<u64, E>> = from_payload(&reply)
            .map_err(|s| RPCError::Network(NetworkError::new(&Transport(s.to_string()))))?;
        result.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                e,
            ))
        })
    }
}

// openraft's RPC error type is large by design; it is what the trait returns.
#[allow(clippy::result_large_err)]
fn encode<T: serde::Serialize, E: std::error::Error>(v: &T) -> Rpc<mesh_proto::v1::RaftPayload, E> {
    to_payload(v).map_err(|s| RPCError::Network(NetworkError::new(&Transport(s.to_string()))))
}

impl RaftNetwork<TypeConfig> for PeerLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<AppendEntriesResponse<u64>, openraft::error::Infallible> {
        let payload = encode(&(self.target, &rpc))?;
        self.call(
            &option,
            |mut c| async move { c.append_entries(payload).await },
        )
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        let payload = encode(&(self.target, &rpc))?;
        self.call(
            &option,
            |mut c| async move { c.install_snapshot(payload).await },
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Rpc<VoteResponse<u64>, openraft::error::Infallible> {
        let payload = encode(&(self.target, &rpc))?;
        self.call(&option, |mut c| async move { c.vote(payload).await })
            .await
    }
}
