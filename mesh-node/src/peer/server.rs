//! The node-to-node gRPC services. Every call but `Join` must come from a pinned key,
//! and the node id a request claims must be the one that key belongs to.

use super::codec::{from_payload, snapshot_chunk_from_payload, to_payload};
use super::directory::Directory;
use crate::liveness::Liveness;
use crate::proposer::Proposer;
use crate::tls;
use mesh_core::raft_types::TypeConfig;
use mesh_core::{Command, Fingerprint, NodeId, Outcome};
use mesh_proto::v1::mesh_server::Mesh;
use mesh_proto::v1::raft_server::Raft as RaftService;
use mesh_proto::v1::{
    HeartbeatReply, HeartbeatRequest, JoinReply, JoinRequest, Member, ProgressReply,
    ProgressRequest, RaftPayload,
};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest};
use openraft::{Raft, Vote};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

/// Serves `mesh.v1.Raft` and `mesh.v1.Mesh`.
#[derive(Clone)]
pub struct PeerServer {
    /// Consensus.
    pub raft: Raft<TypeConfig>,
    /// Keys and ids.
    pub directory: Directory,
    /// Where forwarded writes and joins go.
    pub proposer: Proposer,
    /// Heartbeat bookkeeping.
    pub liveness: Liveness,
    /// The replicated state (token pre-checks).
    pub state: crate::store::StateView,
    /// When a leader was last heard (the fast-failover watch reads it).
    pub contact: crate::leader_watch::LeaderContact,
    /// Join attempts per source address.
    pub join_limit: std::sync::Arc<governor::DefaultKeyedRateLimiter<std::net::IpAddr>>,
}

/// How long a join waits for this node's copy of the state to show its token.
const TOKEN_SETTLE: std::time::Duration = std::time::Duration::from_secs(10);

/// Join attempts an address may make per minute (a burst of as many).
pub const JOINS_PER_MINUTE: u32 = 10;

/// The limiter for join attempts.
pub fn join_limiter() -> std::sync::Arc<governor::DefaultKeyedRateLimiter<std::net::IpAddr>> {
    let n = std::num::NonZeroU32::new(JOINS_PER_MINUTE).expect("positive");
    std::sync::Arc::new(governor::RateLimiter::keyed(governor::Quota::per_minute(n)))
}

impl PeerServer {
    /// The cheap part of the token check, on this node's copy of the state. The state
    /// machine checks again when the join commits (the copy may be stale).
    fn precheck_token(&self, id: &str, secret: &str) -> Result<(), String> {
        let hash = mesh_core::token::secret_hash(secret);
        let now = crate::proposer::now();
        self.state.read(|s| match s.tokens.get(id) {
            None => Err(format!("token {id} does not exist")),
            Some(t) if t.revoked => Err(format!("token {id} was revoked")),
            Some(t) if now >= t.expires_at => Err(format!("token {id} expired")),
            Some(t) if t.uses_left == 0 => Err(format!("token {id} is used up")),
            Some(t) if t.secret_hash != hash => {
                Err(format!("the secret does not match token {id}"))
            }
            Some(_) => Ok(()),
        })
    }

    /// [`PeerServer::precheck_token`], given a moment for a token this node has not
    /// applied yet: a follower that is catching up (a large backlog, a fresh
    /// snapshot) may not hold a token the leader committed a moment ago.
    async fn precheck_token_settled(&self, id: &str, secret: &str) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + TOKEN_SETTLE;
        let mut changes = self.state.changes();
        loop {
            match self.precheck_token(id, secret) {
                Err(why) if why.ends_with("does not exist") => {
                    let changed = tokio::time::timeout_at(deadline, changes.changed()).await;
                    if !matches!(changed, Ok(Ok(()))) {
                        return Err(why);
                    }
                }
                other => return other,
            }
        }
    }

    /// The pinned peer behind a request, and the node id its key belongs to.
    fn member<T>(&self, req: &Request<T>) -> Result<(Fingerprint, NodeId), Status> {
        let fp = caller_key(req)?;
        let id = self.member_key(&fp)?;
        Ok((fp, id))
    }

    /// The node id of a key this mesh pins. Checked per call, and per message on a
    /// stream, so that unpinning a key takes effect on what it already has open.
    fn member_key(&self, fp: &Fingerprint) -> Result<NodeId, Status> {
        if !self.directory.pins().contains(fp) {
            metrics::counter!("mesh_peer_refused_total", "reason" => "unpinned").increment(1);
            return Err(Status::permission_denied(format!(
                "peer key {fp} is not pinned by this mesh; only the join call is open to unpinned keys"
            )));
        }
        self.directory.id_of(fp).ok_or_else(|| {
            Status::permission_denied(format!(
                "peer key {fp} is pinned but belongs to no known node id yet"
            ))
        })
    }

    /// A Raft message is for one node id: a machine that rejoined under a new id (same
    /// key, same address) must not take traffic for its old, removed id.
    fn check_target(&self, target: u64) -> Result<(), Status> {
        let me = self.raft.metrics().borrow().id;
        if target != me {
            metrics::counter!("mesh_peer_refused_total", "reason" => "wrong_target").increment(1);
            return Err(Status::failed_precondition(format!(
                "this is node {me}, not node {target} (that id was removed when this machine rejoined)"
            )));
        }
        Ok(())
    }

    /// The Raft node id a message claims must belong to the key that sent it.
    fn check_claim(&self, id: NodeId, fp: &Fingerprint, vote: &Vote<u64>) -> Result<(), Status> {
        match vote.leader_id().voted_for() {
            Some(claimed) if claimed != id.0 => {
                metrics::counter!("mesh_peer_refused_total", "reason" => "id_mismatch")
                    .increment(1);
                warn!(%fp, key_node = %id, claimed, "peer claims another node's id");
                Err(Status::permission_denied(format!(
                    "peer key {fp} belongs to node {id}, but the request claims to come from node {claimed}"
                )))
            }
            _ => Ok(()),
        }
    }

    /// One AppendEntries from the holder of key `fp`, by either call. The key is checked
    /// here, so a stream checks it for every message.
    async fn append_entries_from(
        &self,
        fp: &Fingerprint,
        payload: &RaftPayload,
    ) -> Result<RaftPayload, Status> {
        let id = self.member_key(fp)?;
        let (target, rpc): (u64, AppendEntriesRequest<TypeConfig>) = from_payload(payload)?;
        self.check_claim(id, fp, &rpc.vote)?;
        self.check_target(target)?;
        let started = std::time::Instant::now();
        let entries = rpc.entries.len();
        let result = self.raft.append_entries(rpc).await;
        let took = started.elapsed();
        metrics::histogram!("mesh_raft_append_handle_seconds").record(took.as_secs_f64());
        if took > crate::node::RAFT_HEARTBEAT {
            // The leader gave up on this answer (its timeout is the heartbeat interval).
            debug!(
                leader = %id,
                entries,
                bytes = payload.data.len(),
                took_ms = took.as_millis() as u64,
                "answered an AppendEntries after the leader's timeout"
            );
        }
        if matches!(&result, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
            self.contact.heard(id.0);
        }
        to_payload(&result)
    }
}

/// The key a call's TLS session verified.
fn caller_key<T>(req: &Request<T>) -> Result<Fingerprint, Status> {
    tls::peer_fingerprint(req)
        .ok_or_else(|| Status::unauthenticated("no verified peer certificate"))
}

/// The answers of one `Replicate` stream.
type ReplicateAnswers = futures::stream::BoxStream<'static, Result<RaftPayload, Status>>;

#[tonic::async_trait]
impl RaftService for PeerServer {
    async fn append_entries(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let fp = caller_key(&req)?;
        Ok(Response::new(
            self.append_entries_from(&fp, req.get_ref()).await?,
        ))
    }

    type ReplicateStream = ReplicateAnswers;

    /// Answers each request in order, one at a time (a follower handles appends in
    /// order anyway). The sender's key is checked when the stream opens and again for
    /// every message. The first failure ends the stream with its status; the leader then
    /// opens a new one.
    async fn replicate(
        &self,
        req: Request<Streaming<RaftPayload>>,
    ) -> Result<Response<ReplicateAnswers>, Status> {
        let (fp, _) = self.member(&req)?;
        let requests = req.into_inner();
        let server = self.clone();
        let answers = futures::stream::unfold(Some((requests, server, fp)), |state| async move {
            let (mut requests, server, fp) = state?;
            let answer = match requests.message().await {
                Ok(Some(payload)) => server.append_entries_from(&fp, &payload).await,
                Ok(None) => return None,
                Err(status) => Err(status),
            };
            let next = answer.is_ok().then_some((requests, server, fp));
            Some((answer, next))
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let (fp, id) = self.member(&req)?;
        let (target, rpc): (u64, VoteRequest<u64>) = from_payload(req.get_ref())?;
        self.check_claim(id, &fp, &rpc.vote)?;
        self.check_target(target)?;
        Ok(Response::new(to_payload(&self.raft.vote(rpc).await)?))
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let (fp, id) = self.member(&req)?;
        let (target, rpc) = snapshot_chunk_from_payload(req.get_ref())?;
        self.check_claim(id, &fp, &rpc.vote)?;
        self.check_target(target)?;
        Ok(Response::new(to_payload(
            &self.raft.install_snapshot(rpc).await,
        )?))
    }
}

#[tonic::async_trait]
impl Mesh for PeerServer {
    async fn propose(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.member(&req)?;
        let commands: Vec<Command> = from_payload(req.get_ref())?;
        // With the outcomes goes the index this leader has applied, so the follower can
        // wait for its own copy to catch up before answering (read your writes).
        let result = self
            .proposer
            .propose_local(commands)
            .await
            .map(|outcomes| (outcomes, *self.state.changes().borrow()));
        Ok(Response::new(to_payload(&result)?))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let (fp, id) = self.member(&req)?;
        let hb = req.into_inner();
        if hb.node_id != id.0 {
            return Err(Status::permission_denied(format!(
                "peer key {fp} belongs to node {id}, but the heartbeat claims node {}",
                hb.node_id
            )));
        }
        self.liveness.heard_from(id);
        let leader = self.raft.metrics().borrow().current_leader.unwrap_or(0);
        Ok(Response::new(HeartbeatReply { leader_id: leader }))
    }

    async fn progress(
        &self,
        req: Request<ProgressRequest>,
    ) -> Result<Response<ProgressReply>, Status> {
        let (fp, id) = self.member(&req)?;
        // FAILED_PRECONDITION (not PERMISSION_DENIED): a definite answer the rollback
        // guard acts on; the asker's directory is of an id this key no longer has.
        if req.get_ref().node_id != id.0 {
            return Err(Status::failed_precondition(format!(
                "peer key {fp} belongs to node {id}, but the request asks for node {}",
                req.get_ref().node_id
            )));
        }
        let m = self.raft.metrics().borrow().clone();
        let leader = m.state == openraft::ServerState::Leader;
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&id.0).copied().flatten())
            .filter(|_| leader);
        Ok(Response::new(ProgressReply {
            leader,
            term: m.current_term,
            has_matched: matched.is_some(),
            matched_index: matched.map_or(0, |l| l.index),
        }))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        // The one call open to an unpinned key: the token decides. The joiner's
        // identity is the key of its TLS session, never a field of the request.
        let fp = tls::peer_fingerprint(&req)
            .ok_or_else(|| Status::unauthenticated("no verified peer certificate"))?;
        if let Some(addr) = req.remote_addr() {
            if self.join_limit.check_key(&addr.ip()).is_err() {
                metrics::counter!("mesh_join_events_total", "outcome" => "rate_limited")
                    .increment(1);
                return Err(Status::resource_exhausted(format!(
                    "too many join attempts from {}; at most {JOINS_PER_MINUTE} a minute",
                    addr.ip()
                )));
            }
        }
        let j = req.into_inner();
        if j.addr.is_empty() || j.addr.len() > 256 {
            return Err(Status::invalid_argument(
                "the joiner's address must be host:port",
            ));
        }
        // Check the token against the replicated state before anything reaches the
        // log: an unpinned key must not be able to grow the log with failed joins.
        if let Err(why) = self.precheck_token_settled(&j.token_id, &j.secret).await {
            metrics::counter!("mesh_join_events_total", "outcome" => "refused").increment(1);
            warn!(%fp, reason = %why, "join refused before proposal");
            return Err(Status::permission_denied(format!("join refused: {why}")));
        }
        let command = Command::Join {
            token: j.token_id.clone(),
            secret_hash: mesh_core::token::secret_hash(&j.secret),
            fingerprint: fp.clone(),
            addr: j.addr.clone(),
        };
        match self.proposer.propose(command).await {
            Ok(Outcome::Joined(id)) => {
                metrics::counter!("mesh_join_events_total", "outcome" => "joined").increment(1);
                info!(node = %id, %fp, addr = %j.addr, "a node joined");
                let members = self
                    .directory
                    .members()
                    .into_iter()
                    .map(|(id, n)| Member {
                        node_id: id.0,
                        addr: n.addr,
                        fingerprint: n.fingerprint.to_string(),
                    })
                    .collect();
                Ok(Response::new(JoinReply {
                    node_id: id.0,
                    members,
                }))
            }
            Ok(Outcome::Rejected(r)) => {
                metrics::counter!("mesh_join_events_total", "outcome" => "refused").increment(1);
                warn!(%fp, reason = %r, "join refused");
                Err(Status::permission_denied(r.to_string()))
            }
            Ok(other) => Err(Status::internal(format!("unexpected outcome {other}"))),
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }
}
