//! The openraft network over gRPC: each Raft RPC is one unary call carrying the
//! codec-encoded `(target node id, openraft message)`; the answer carries
//! `Result<Response, RaftError>`. The target id lets a machine that rejoined under a
//! new id (same key, same address) refuse traffic meant for its old, removed id.

use super::clients::PeerClients;
use super::codec::{from_payload, to_payload};
use mesh_core::raft_types::TypeConfig;
use mesh_core::MeshNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RPCTypes};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{RaftNetwork, RaftNetworkFactory};
use serde::de::DeserializeOwned;
use std::future::Future;
use std::time::Duration;
use tonic::Status;

/// Waits between tries to a peer that cannot be reached (connection refused, reset):
/// short at first, so a blip costs less than an election timeout (openraft sends no
/// heartbeats to the peer meanwhile), growing to half a second for a peer that is down.
fn unreachable_backoff() -> Backoff {
    Backoff::new(
        (0..)
            .map(|i: u32| Duration::from_millis(25u64 << i.min(4)).min(Duration::from_millis(500))),
    )
}

/// Builds one link per target.
#[derive(Clone)]
pub struct PeerNetwork {
    me: u64,
    clients: PeerClients,
}

impl PeerNetwork {
    /// The network of node `me`, using these clients.
    pub fn new(me: u64, clients: PeerClients) -> PeerNetwork {
        PeerNetwork { me, clients }
    }
}

/// The link to one Raft peer.
pub struct PeerLink {
    me: u64,
    target: u64,
    node: MeshNode,
    clients: PeerClients,
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerLink;
    async fn new_client(&mut self, target: u64, node: &MeshNode) -> PeerLink {
        PeerLink {
            me: self.me,
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
    async fn call<R, E, F, Fut>(&self, rpc: RPCTypes, option: &RPCOption, f: F) -> Rpc<R, E>
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
        let started = std::time::Instant::now();
        let reply = tokio::time::timeout(option.hard_ttl(), f(client)).await;
        let label = match rpc {
            RPCTypes::Vote => "vote",
            RPCTypes::AppendEntries => "append_entries",
            RPCTypes::InstallSnapshot => "install_snapshot",
        };
        metrics::histogram!("mesh_raft_rpc_seconds", "rpc" => label)
            .record(started.elapsed().as_secs_f64());
        let reply = match reply {
            // A slow answer is not an unreachable peer: openraft retries a timed-out RPC
            // on its next tick, while `Unreachable` stops heartbeats for a backoff.
            Err(_) => {
                return Err(RPCError::Timeout(Timeout {
                    action: rpc,
                    id: self.me,
                    target: self.target,
                    timeout: option.hard_ttl(),
                }))
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
    fn backoff(&self) -> Backoff {
        unreachable_backoff()
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<AppendEntriesResponse<u64>, openraft::error::Infallible> {
        let payload = encode(&(self.target, &rpc))?;
        self.call(RPCTypes::AppendEntries, &option, |mut c| async move {
            c.append_entries(payload).await
        })
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        let payload = encode(&(self.target, &rpc))?;
        self.call(RPCTypes::InstallSnapshot, &option, |mut c| async move {
            c.install_snapshot(payload).await
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Rpc<VoteResponse<u64>, openraft::error::Infallible> {
        let payload = encode(&(self.target, &rpc))?;
        self.call(RPCTypes::Vote, &option, |mut c| async move {
            c.vote(payload).await
        })
        .await
    }
}
