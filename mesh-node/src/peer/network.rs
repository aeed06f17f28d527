//! The openraft network over gRPC: each Raft RPC carries the codec-encoded `(target
//! node id, openraft message)`; the answer carries `Result<Response, RaftError>`. The
//! target id lets a machine that rejoined under a new id (same key, same address)
//! refuse traffic meant for its old, removed id.
//!
//! Votes and snapshots are unary calls; a snapshot chunk carries its bytes as one byte
//! string ([`super::codec::snapshot_chunk_to_payload`]), not as serde would encode
//! openraft's `Vec<u8>`, byte by byte. AppendEntries, the hot path, go over one
//! `Replicate` stream per link (openraft sends them one at a time per follower): a
//! request, then its answer. A peer without `Replicate` (an older build) gets unary
//! calls.
//!
//! openraft cuts each AppendEntries at its heartbeat interval (50 ms). Work that a cut
//! would waste goes on in a tokio task of its own instead ([`Slot::Settling`]):
//! opening the stream (on a new connection, a TLS handshake too), and reading the
//! answer of an exchange that was cut after its request went out. The next exchange
//! waits for that task, so no request ever reads an earlier request's answer, a
//! stream slower than 50 ms to open still gets opened (were each cut to throw the
//! opening away, every try would start over and none get through), and a late answer
//! does not cost the stream.

use super::clients::PeerClients;
use super::codec::{from_payload, snapshot_chunk_to_payload, to_payload};
use futures::channel::mpsc;
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
use tokio::task::JoinHandle;
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
    /// The `Replicate` stream, between exchanges.
    slot: Slot,
    /// The peer answered `Replicate` with UNIMPLEMENTED: one unary call each.
    unary_only: bool,
}

/// Where a link's `Replicate` stream is between exchanges.
// One per link: boxing the stream would save moving ~256 bytes twice an exchange.
#[allow(clippy::large_enum_variant)]
enum Slot {
    /// None open: the next exchange opens one.
    Empty,
    /// Open and idle: every request sent on it has had its answer.
    Ready(ReplicationStream),
    /// Being opened, or reading the answer of an exchange cut short, in a tokio task
    /// that openraft's deadline does not cut: the stream once that is done, or why
    /// none could be opened.
    Settling(JoinHandle<Result<ReplicationStream, Status>>),
}

/// Requests a stream buffers before the peer reads them: exchanges are one at a time.
const REPLICATION_BUFFER: usize = 1;

/// Longest a link waits to open its stream, or for the answer of an exchange cut
/// short, before it gives the stream up and opens a new one: far above a loaded
/// peer's answer (tens of ms) and a TLS handshake, short enough that a peer that took
/// a request and never answers holds the link up only briefly. A peer that is down
/// fails faster than this (its connection is refused or reset).
const SETTLE_LIMIT: Duration = Duration::from_secs(1);

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
    encoded(to_payload(v))
}

/// A payload, or why it could not be encoded as openraft's error.
#[allow(clippy::result_large_err)]
fn encoded<E: std::error::Error>(payload: Result<RaftPayload, Status>) -> Rpc<RaftPayload, E> {
    payload.map_err(|s| RPCError::Network(NetworkError::new(&Transport(s.to_string()))))
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
        let payload = encoded(snapshot_chunk_to_payload(self.peer.target, &rpc))?;
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
            slot: Slot::Empty,
            unary_only: false,
        }
    }

    /// One AppendEntries over the stream (opened first if there is none). Cancel-safe:
    /// cut at any await, it leaves the link able to go on (see [`Slot`]).
    async fn exchange(
        &mut self,
        mut client: RaftClient<Channel>,
        payload: RaftPayload,
    ) -> Result<RaftPayload, Status> {
        if self.unary_only {
            return Ok(client.append_entries(payload).await?.into_inner());
        }
        if matches!(self.slot, Slot::Empty) {
            self.slot = Slot::Settling(tokio::spawn(open(client.clone())));
        }
        if let Slot::Settling(task) = &mut self.slot {
            // Awaited in place: cut here, the task goes on and the next exchange
            // awaits it in turn.
            let settled = task.await;
            self.slot = Slot::Empty;
            match settled {
                Ok(Ok(stream)) => self.slot = Slot::Ready(stream),
                Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                    warn!(
                        peer = self.target,
                        "the peer has no Replicate call (an older build?): AppendEntries go to it one call each"
                    );
                    self.unary_only = true;
                    return Ok(client.append_entries(payload).await?.into_inner());
                }
                Ok(Err(status)) => return Err(status),
                Err(join) => return Err(Status::internal(join.to_string())),
            }
        }
        let Slot::Ready(mut stream) = std::mem::replace(&mut self.slot, Slot::Empty) else {
            unreachable!("an empty slot was set settling, and a settled one ready");
        };
        // The stream is idle (every request on it has had its answer), so its
        // one-message buffer is free and the send does not wait: no cut can fall
        // between the request going out and the link knowing that it did.
        if stream.requests.try_send(payload).is_err() {
            return Err(Status::unavailable("the replication stream closed"));
        }
        Owed {
            slot: &mut self.slot,
            client,
            stream: Some(stream),
        }
        .answer()
        .await
    }
}

/// Opens a `Replicate` stream on `client`, within [`SETTLE_LIMIT`].
async fn open(mut client: RaftClient<Channel>) -> Result<ReplicationStream, Status> {
    let (requests, outgoing) = mpsc::channel(REPLICATION_BUFFER);
    let answers = tokio::time::timeout(SETTLE_LIMIT, client.replicate(outgoing))
        .await
        .map_err(|_| Status::deadline_exceeded("opening the replication stream timed out"))??;
    Ok(ReplicationStream {
        requests,
        answers: answers.into_inner(),
    })
}

/// Reads and drops the answer of an exchange cut short, within [`SETTLE_LIMIT`]: the
/// stream is idle again after it. If the answer does not come, the stream is given up
/// and a new one opened.
async fn finish(
    mut stream: ReplicationStream,
    client: RaftClient<Channel>,
) -> Result<ReplicationStream, Status> {
    match tokio::time::timeout(SETTLE_LIMIT, stream.answers.message()).await {
        Ok(Ok(Some(_))) => Ok(stream),
        _ => {
            drop(stream);
            open(client).await
        }
    }
}

/// A stream whose request went out and whose answer is owed. Read, the stream goes
/// back to its link's slot ready; dropped before that (openraft's deadline cut the
/// exchange), it leaves the stream settling there, its answer read in a tokio task of
/// its own.
struct Owed<'a> {
    slot: &'a mut Slot,
    client: RaftClient<Channel>,
    /// Set until the answer is read.
    stream: Option<ReplicationStream>,
}

impl Owed<'_> {
    async fn answer(mut self) -> Result<RaftPayload, Status> {
        let stream = self.stream.as_mut().expect("set until the answer is read");
        let answer = stream.answers.message().await;
        let stream = self.stream.take().expect("set until the answer is read");
        match answer {
            Ok(Some(answer)) => {
                *self.slot = Slot::Ready(stream);
                Ok(answer)
            }
            Ok(None) => Err(Status::unavailable("the peer ended the replication stream")),
            Err(status) => Err(status),
        }
    }
}

impl Drop for Owed<'_> {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        *self.slot = match tokio::runtime::Handle::try_current() {
            // A short task (at most twice SETTLE_LIMIT), owned by the link's slot.
            Ok(runtime) => Slot::Settling(runtime.spawn(finish(stream, self.client.clone()))),
            Err(_) => Slot::Empty,
        };
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
    /// A request starting with this byte is never answered.
    const NEVER: u8 = 0xfe;
    /// openraft's deadline for one AppendEntries (its heartbeat interval).
    const DEADLINE: Duration = Duration::from_millis(50);
    /// An exchange a test expects answered but unanswered this long has read from a
    /// stream that owes an earlier, never-coming answer: a failure, not a hang. Far
    /// above the settle limit, so slowness cannot reach it.
    const NEVER_ANSWERED: Duration = Duration::from_secs(10);

    /// How the test peer serves `Replicate`.
    #[derive(Clone, Copy)]
    enum Streams {
        /// Refused as a build that predates it does.
        Unknown,
        /// Opened at once.
        Quick,
        /// Opened only after [`SLOW_FOR`] (a new connection to a loaded peer).
        SlowToOpen,
    }

    /// Answers every AppendEntries with its own bytes, by either call; counts the
    /// `Replicate` calls.
    #[derive(Clone)]
    struct Echo {
        streams: Streams,
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
            match self.streams {
                Streams::Unknown => return Err(Status::unimplemented("unknown method Replicate")),
                Streams::Quick => {}
                Streams::SlowToOpen => tokio::time::sleep(SLOW_FOR).await,
            }
            let answers = req.into_inner().then(|m| async move {
                let m = m?;
                match m.data.first() {
                    Some(&SLOW) => tokio::time::sleep(SLOW_FOR).await,
                    Some(&NEVER) => futures::future::pending::<()>().await,
                    _ => {}
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
    async fn serve(streams: Streams) -> (RaftClient<Channel>, Arc<AtomicUsize>) {
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
            let answer = tokio::time::timeout(
                NEVER_ANSWERED,
                replication.exchange(client.clone(), payload(&[*b])),
            )
            .await
            .unwrap_or_else(|_| panic!("exchange of {b}: no answer in {NEVER_ANSWERED:?}"));
            assert_eq!(answer.unwrap().data, [*b], "exchange of {b}");
        }
    }

    /// One exchange under openraft's deadline: `None` if it was cut.
    async fn within_deadline(
        replication: &mut Replication,
        client: &RaftClient<Channel>,
        bytes: &[u8],
    ) -> Option<RaftPayload> {
        tokio::time::timeout(
            DEADLINE,
            replication.exchange(client.clone(), payload(bytes)),
        )
        .await
        .ok()
        .map(|answer| answer.expect("the exchange itself does not fail"))
    }

    #[tokio::test]
    async fn an_exchange_cut_short_never_hands_its_answer_to_the_next_and_keeps_the_stream() {
        let (client, calls) = serve(Streams::Quick).await;
        let mut replication = Replication::new(2);
        each_answered(&mut replication, &client, &[0, 1, 2]).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "one stream carries them all"
        );

        let cut = within_deadline(&mut replication, &client, &[SLOW, 1]).await;
        assert!(cut.is_none(), "the slow answer came within the deadline");
        assert!(
            matches!(replication.slot, Slot::Settling(_)),
            "a cut exchange leaves its stream settling"
        );

        // The slow answer is still on its way; the next exchanges must not read it.
        each_answered(&mut replication, &client, &[7, 8]).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "the stream outlived the cut"
        );
    }

    #[tokio::test]
    async fn a_stream_slower_to_open_than_the_deadline_is_opened_once() {
        let (client, calls) = serve(Streams::SlowToOpen).await;
        let mut replication = Replication::new(2);
        // Each try is cut at the deadline, as openraft cuts them. If a cut threw the
        // opening away, every try would start over and none would ever get through.
        let mut tries = 0;
        let answer = loop {
            tries += 1;
            assert!(
                tries <= 40,
                "no exchange got through in 40 tries of {DEADLINE:?}"
            );
            if let Some(answer) = within_deadline(&mut replication, &client, &[3]).await {
                break answer;
            }
        };
        assert_eq!(answer.data, [3]);
        assert!(tries > 1, "the opening was not slower than the deadline");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "the stream was opened once"
        );
    }

    #[tokio::test]
    async fn a_peer_that_never_answers_costs_its_stream_after_the_settle_limit() {
        let (client, calls) = serve(Streams::Quick).await;
        let mut replication = Replication::new(2);
        assert!(within_deadline(&mut replication, &client, &[NEVER])
            .await
            .is_none());

        let started = tokio::time::Instant::now();
        each_answered(&mut replication, &client, &[4]).await;
        assert!(
            started.elapsed() >= SETTLE_LIMIT - DEADLINE,
            "the link gave the stream up after {:?}",
            started.elapsed()
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "a new stream after the limit"
        );
    }

    #[tokio::test]
    async fn a_peer_without_replicate_gets_one_call_each() {
        let (client, calls) = serve(Streams::Unknown).await;
        let mut replication = Replication::new(2);
        each_answered(&mut replication, &client, &[0, 1, 2]).await;
        assert!(replication.unary_only);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "Replicate is asked once");
    }
}
