//! The openraft network over gRPC: each Raft RPC carries the codec-encoded `(target
//! node id, openraft message)`; the answer carries `Result<Response, RaftError>`. The
//! target id lets a machine that rejoined under a new id (same key, same address)
//! refuse traffic meant for its old, removed id.
//!
//! Votes and snapshots are unary calls. AppendEntries, the hot path, go over one
//! `Replicate` stream per link (openraft sends them one at a time per follower): a
//! request, then its answer. The stream is taken out of the link for the exchange
//! and put back only once the answer is in, so an exchange cut short (its timeout,
//! a dropped future) drops the stream, and no later request can read an earlier
//! request's answer. A peer without `Replicate` (an older build) gets unary calls.

use super::clients::PeerClients;
use super::codec::{from_payload, to_payload};
use futures::channel::mpsc;
use futures::SinkExt;
use mesh_core::raft_types::TypeConfig;
use mesh_core::MeshNode;
use mesh_proto::v1::raft_client::RaftClient;
use mesh_proto::v1::RaftPayload;
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
use tonic::transport::Channel;
use tonic::Status;
use tracing::warn;

/// Waits between tries to a peer that cannot be reached (connection refused, reset):
/// short at first, so a blip costs less than an election timeout (openraft sends no
/// heartbeats to the peer meanwhile), doubling to 400 ms for a peer that is down.
fn unreachable_backoff() -> Backoff {
    Backoff::new((0..).map(|i: u32| Duration::from_millis(25u64 << i.min(4))))
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
    peer: Peer,
    replication: Replication,
}

/// Who a link talks to, and how it reaches them.
struct Peer {
    me: u64,
    target: u64,
    node: MeshNode,
    clients: PeerClients,
}

/// The link's AppendEntries transport.
struct Replication {
    /// The peer's node id (for the log).
    target: u64,
    /// The open `Replicate` stream, between exchanges.
    stream: Option<ReplicationStream>,
    /// The peer answered `Replicate` with UNIMPLEMENTED: one unary call each.
    unary_only: bool,
}

/// Requests a stream buffers before the peer reads them: exchanges are one at a time.
const REPLICATION_BUFFER: usize = 1;

/// One open `Replicate` call.
struct ReplicationStream {
    requests: mpsc::Sender<RaftPayload>,
    answers: tonic::Streaming<RaftPayload>,
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerLink;
    async fn new_client(&mut self, target: u64, node: &MeshNode) -> PeerLink {
        PeerLink {
            peer: Peer {
                me: self.me,
                target,
                node: node.clone(),
                clients: self.clients.clone(),
            },
            replication: Replication::new(target),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Transport(String);

type Rpc<R, E> = Result<R, RPCError<u64, MeshNode, RaftError<u64, E>>>;

impl Peer {
    async fn call<R, E, F, Fut>(&self, rpc: RPCTypes, option: &RPCOption, f: F) -> Rpc<R, E>
    where
        R: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
        F: FnOnce(RaftClient<Channel>) -> Fut,
        Fut: Future<Output = Result<RaftPayload, Status>>,
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
            Ok(Ok(r)) => r,
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
fn encode<T: serde::Serialize, E: std::error::Error>(v: &T) -> Rpc<RaftPayload, E> {
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
        let payload = encode(&(self.peer.target, &rpc))?;
        let replication = &mut self.replication;
        self.peer
            .call(RPCTypes::AppendEntries, &option, |c| {
                replication.exchange(c, payload)
            })
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        let payload = encode(&(self.peer.target, &rpc))?;
        self.peer
            .call(RPCTypes::InstallSnapshot, &option, |mut c| async move {
                Ok(c.install_snapshot(payload).await?.into_inner())
            })
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Rpc<VoteResponse<u64>, openraft::error::Infallible> {
        let payload = encode(&(self.peer.target, &rpc))?;
        self.peer
            .call(RPCTypes::Vote, &option, |mut c| async move {
                Ok(c.vote(payload).await?.into_inner())
            })
            .await
    }
}

impl Replication {
    fn new(target: u64) -> Replication {
        Replication {
            target,
            stream: None,
            unary_only: false,
        }
    }

    /// One AppendEntries over the stream (opened now if there is none). The stream is
    /// put back only once the answer is in.
    async fn exchange(
        &mut self,
        mut client: RaftClient<Channel>,
        payload: RaftPayload,
    ) -> Result<RaftPayload, Status> {
        if self.unary_only {
            return Ok(client.append_entries(payload).await?.into_inner());
        }
        let mut stream = match self.stream.take() {
            Some(s) => s,
            None => {
                let (requests, outgoing) = mpsc::channel(REPLICATION_BUFFER);
                match client.replicate(outgoing).await {
                    Ok(answers) => ReplicationStream {
                        requests,
                        answers: answers.into_inner(),
                    },
                    Err(s) if s.code() == tonic::Code::Unimplemented => {
                        warn!(
                            peer = self.target,
                            "the peer has no Replicate call (an older build?): AppendEntries go to it one call each"
                        );
                        self.unary_only = true;
                        return Ok(client.append_entries(payload).await?.into_inner());
                    }
                    Err(s) => return Err(s),
                }
            }
        };
        stream
            .requests
            .send(payload)
            .await
            .map_err(|_| Status::unavailable("the replication stream closed"))?;
        let answer = stream
            .answers
            .message()
            .await?
            .ok_or_else(|| Status::unavailable("the peer ended the replication stream"))?;
        self.stream = Some(stream);
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::stream::BoxStream;
    use futures::StreamExt;
    use mesh_proto::v1::raft_server::{Raft as RaftService, RaftServer};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tonic::{Request, Response, Streaming};

    /// A request starting with this byte is answered only after [`SLOW_FOR`].
    const SLOW: u8 = 0xff;
    const SLOW_FOR: Duration = Duration::from_millis(300);

    /// Answers every AppendEntries with its own bytes, by either call; counts the
    /// `Replicate` calls. Without `streams` it refuses `Replicate` as a build that
    /// predates it does.
    #[derive(Clone)]
    struct Echo {
        streams: bool,
        replicate_calls: Arc<AtomicUsize>,
    }

    #[tonic::async_trait]
    impl RaftService for Echo {
        async fn append_entries(
            &self,
            req: Request<RaftPayload>,
        ) -> Result<Response<RaftPayload>, Status> {
            Ok(Response::new(req.into_inner()))
        }
        type ReplicateStream = BoxStream<'static, Result<RaftPayload, Status>>;
        async fn replicate(
            &self,
            req: Request<Streaming<RaftPayload>>,
        ) -> Result<Response<Self::ReplicateStream>, Status> {
            self.replicate_calls.fetch_add(1, Ordering::SeqCst);
            if !self.streams {
                return Err(Status::unimplemented("unknown method Replicate"));
            }
            let answers = req.into_inner().then(|m| async move {
                let m = m?;
                if m.data.first() == Some(&SLOW) {
                    tokio::time::sleep(SLOW_FOR).await;
                }
                Ok(m)
            });
            Ok(Response::new(Box::pin(answers)))
        }
        async fn vote(&self, _: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            Err(Status::unimplemented("not used here"))
        }
        async fn install_snapshot(
            &self,
            _: Request<RaftPayload>,
        ) -> Result<Response<RaftPayload>, Status> {
            Err(Status::unimplemented("not used here"))
        }
    }

    /// Serves an [`Echo`] on loopback (plain HTTP/2: this is about the stream, not
    /// TLS): a client, and the count of `Replicate` calls the server took.
    async fn serve(streams: bool) -> (RaftClient<Channel>, Arc<AtomicUsize>) {
        let replicate_calls = Arc::new(AtomicUsize::new(0));
        let echo = Echo {
            streams,
            replicate_calls: replicate_calls.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = futures::stream::unfold(listener, |l| async move {
            Some((l.accept().await.map(|(s, _)| s), l))
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftServer::new(echo))
                .serve_with_incoming(incoming),
        );
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        (RaftClient::new(channel), replicate_calls)
    }

    fn payload(bytes: &[u8]) -> RaftPayload {
        RaftPayload {
            data: bytes.to_vec(),
        }
    }

    /// Exchanges one message per byte of `bytes`; each must get its own answer.
    async fn each_answered(
        replication: &mut Replication,
        client: &RaftClient<Channel>,
        bytes: &[u8],
    ) {
        for b in bytes {
            let answer = replication.exchange(client.clone(), payload(&[*b])).await;
            assert_eq!(answer.unwrap().data, [*b], "exchange of {b}");
        }
    }

    #[tokio::test]
    async fn an_exchange_cut_short_never_hands_its_answer_to_the_next() {
        let (client, calls) = serve(true).await;
        let mut replication = Replication::new(2);
        each_answered(&mut replication, &client, &[0, 1, 2]).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "one stream carries them all"
        );

        let cut = tokio::time::timeout(
            Duration::from_millis(50),
            replication.exchange(client.clone(), payload(&[SLOW, 1])),
        )
        .await;
        assert!(cut.is_err(), "the slow answer came within the timeout");
        assert!(
            replication.stream.is_none(),
            "a cut exchange drops its stream"
        );

        // The slow answer is still on its way; the next exchange must not read it.
        each_answered(&mut replication, &client, &[7]).await;
        tokio::time::sleep(SLOW_FOR).await;
        each_answered(&mut replication, &client, &[8]).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "one new stream after the cut"
        );
    }

    #[tokio::test]
    async fn a_peer_without_replicate_gets_one_call_each() {
        let (client, calls) = serve(false).await;
        let mut replication = Replication::new(2);
        each_answered(&mut replication, &client, &[0, 1, 2]).await;
        assert!(replication.unary_only);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "Replicate is asked once");
    }
}
