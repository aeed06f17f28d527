//! Forwarding writes to the leader, so a client may talk to any node. A forward that
//! meets a leader change is retried against the new leader; one whose answer is lost
//! is reported as unknown, never retried blindly (it may have committed).

use super::clients::PeerClients;
use super::codec::{from_payload, to_payload};
use super::directory::Directory;
use crate::proposer::{Forward, ProposeError};
use mesh_core::raft_types::TypeConfig;
use mesh_core::{Command, NodeId, Outcome};
use openraft::Raft;
use std::time::Duration;

/// Tries before giving up on finding a leader that takes the write.
const FORWARD_TRIES: usize = 20;
/// Longest pause between tries while a leader is elected (a new leader ends it).
const FORWARD_BACKOFF: Duration = Duration::from_millis(150);
/// How long one forwarded write may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// Forwards batches to the current leader.
#[derive(Clone)]
pub struct Forwarder {
    /// This node.
    pub node: NodeId,
    /// To find the leader.
    pub raft: Raft<TypeConfig>,
    /// To find its address and key.
    pub directory: Directory,
    /// Channels.
    pub clients: PeerClients,
    /// This node's state, to wait until it has applied a forwarded write.
    pub state: crate::store::StateView,
}

/// How long a forwarded write waits for this node to apply it before answering.
const CATCH_UP: Duration = Duration::from_secs(5);

impl Forward for Forwarder {
    fn forward(
        &self,
        commands: Vec<Command>,
    ) -> futures::future::BoxFuture<'static, Result<Vec<Outcome>, ProposeError>> {
        let this = self.clone();
        Box::pin(async move { this.run(commands).await })
    }
}

impl Forwarder {
    /// Wait (bounded) until this node has applied `index`, so a client that reads
    /// here right after its write sees it.
    async fn catch_up(&self, index: u64) {
        let mut changes = self.state.changes();
        let _ = tokio::time::timeout(CATCH_UP, changes.wait_for(|applied| *applied >= index)).await;
    }

    async fn run(&self, commands: Vec<Command>) -> Result<Vec<Outcome>, ProposeError> {
        let payload =
            to_payload(&commands).map_err(|s| ProposeError::Unavailable(s.message().into()))?;
        let mut last = ProposeError::NotLeader { leader: None };
        for _ in 0..FORWARD_TRIES {
            let leader = self.raft.metrics().borrow().current_leader;
            match leader {
                Some(l) if l == self.node.0 => {
                    // Became leader meanwhile: propose here directly.
                    let req = mesh_core::Request {
                        now: crate::proposer::now(),
                        commands: commands.clone().into(),
                    };
                    return match self.raft.client_write(req).await {
                        Ok(r) => Ok(r.data.outcomes),
                        Err(e) => {
                            last = ProposeError::Unavailable(e.to_string());
                            tokio::time::sleep(FORWARD_BACKOFF).await;
                            continue;
                        }
                    };
                }
                Some(l) => {
                    let Some(node) = self.directory.node(NodeId(l)) else {
                        tokio::time::sleep(FORWARD_BACKOFF).await;
                        continue;
                    };
                    let mut client = self
                        .clients
                        .mesh(&node)
                        .map_err(|e| ProposeError::Unavailable(e.to_string()))?;
                    match tokio::time::timeout(FORWARD_TIMEOUT, client.propose(payload.clone())).await {
                        Ok(Ok(reply)) => {
                            let result: Result<(Vec<Outcome>, u64), ProposeError> = from_payload(reply.get_ref())
                                .map_err(|s| ProposeError::Unavailable(s.message().into()))?;
                            match result {
                                Err(ProposeError::NotLeader { leader }) => last = ProposeError::NotLeader { leader },
                                Err(e) => return Err(e),
                                Ok((outcomes, applied)) => {
                                    self.catch_up(applied).await;
                                    return Ok(outcomes);
                                }
                            }
                        }
                        Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                            // Not connected: nothing was sent, safe to try again.
                            last = ProposeError::Unavailable(format!("leader {l} unreachable: {}", status.message()));
                        }
                        Ok(Err(status)) => return Err(ProposeError::Unavailable(status.message().into())),
                        Err(_) => {
                            return Err(ProposeError::Unavailable(format!(
                                "no answer from leader {l} within {FORWARD_TIMEOUT:?}; the write may or may not have committed"
                            )))
                        }
                    }
                }
                None => {}
            }
            // Try again as soon as this node learns of another leader (an election
            // ended), or after the backoff.
            let mut metrics = self.raft.metrics();
            let _ = tokio::time::timeout(
                FORWARD_BACKOFF,
                metrics.wait_for(|m| m.current_leader.is_some() && m.current_leader != leader),
            )
            .await;
        }
        Err(last)
    }
}
