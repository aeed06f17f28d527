//! Group commit: commands from many callers are batched into few Raft entries.
//!
//! openraft syncs each entry on its own, so throughput comes from putting many
//! commands in one entry. The proposer takes whatever has queued while the previous
//! entries were in flight, up to a count and byte budget, and proposes it as one
//! `Request`; each caller gets its own command's outcome back.

use mesh_core::raft_types::TypeConfig;
use mesh_core::{Command, Outcome, Request, Timestamp};
use openraft::error::ClientWriteError;
use openraft::Raft;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

/// Commands waiting for a batch. Callers wait (back-pressure) when it is full.
const QUEUE_CAPACITY: usize = 4096;
/// Most commands in one entry: bounds apply latency per entry.
const MAX_BATCH_COMMANDS: usize = 1024;
/// Most payload bytes in one entry (inputs and outputs travel in the log); a single
/// larger command still goes alone. Small enough that an AppendEntries of
/// `max_payload_entries` such entries finishes within openraft 0.9's append timeout,
/// which is the heartbeat interval (mesh-node/src/node.rs): larger RPCs time out and
/// are sent again forever.
const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Entries proposed but not yet applied. The next batch forms while one commits.
/// openraft 0.9 appends and replicates one entry after another, so more in flight only
/// makes batches smaller and entries more numerous, and on a CPU-bound leader each entry
/// costs an append, a sync and an AppendEntries to each follower and back. Session 11,
/// `mesh-bench run submit-stream --nodes 3 --clients 16`, alternated 5 rounds: 2 gave
/// 5,428-6,481 submits/s (median 5,677; 5.1 commands per entry), 1 gave 5,713-7,317
/// (median 6,983; 7.9 per entry); one client unchanged, 256 within noise, per-exec
/// submits at 16 clients 3,329 / 4,340 -> 5,175 / 5,160. (Session 3: 4 gave 2,260, 2
/// gave 2,530.)
const MAX_IN_FLIGHT_ENTRIES: usize = 1;
/// How long a write may stay unanswered once this node is no longer the leader of the
/// term it was proposed in. openraft 0.9 answers a pending write when its entry is
/// applied or truncated, but not when a snapshot from the new leader replaces the log
/// under it (a deposed leader that falls behind the new leader's purged log): such a
/// write, and the in-flight slot it holds, would wait forever (found by mesh-chaos
/// with `--snapshot-every 100`: a restarted former leader never finished registering).
const DEPOSED_GRACE: Duration = Duration::from_secs(3);

/// Why a proposal did not produce an outcome.
#[derive(Debug, Clone, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum ProposeError {
    /// This node is not the leader.
    #[error("this node is not the Raft leader{}", match .leader { Some(l) => format!(" (the leader is node {l})"), None => " and no leader is known yet; retry in a moment".into() })]
    NotLeader {
        /// The leader, if known.
        leader: Option<u64>,
    },
    /// Raft failed or is shutting down.
    #[error("consensus is unavailable: {0}")]
    Unavailable(String),
}

struct Proposal {
    command: Command,
    /// Forward to the leader when this node is not it (false for writes that a
    /// follower already forwarded here).
    forward: bool,
    reply: oneshot::Sender<Result<Outcome, ProposeError>>,
}

/// Sends batches this node cannot commit (it is not the leader) to the leader.
pub trait Forward: Send + Sync + 'static {
    /// Propose `commands` on the current leader and return their outcomes.
    fn forward(
        &self,
        commands: Vec<Command>,
    ) -> futures::future::BoxFuture<'static, Result<Vec<Outcome>, ProposeError>>;
}

/// Handle to propose commands.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Proposal>,
}

impl Proposer {
    /// Propose one command (forwarded to the leader if need be) and wait for its outcome.
    pub async fn propose(&self, command: Command) -> Result<Outcome, ProposeError> {
        self.submit(command, true).await
    }

    /// Propose on this node only: fails with `NotLeader` instead of forwarding.
    pub async fn propose_local(
        &self,
        commands: Vec<Command>,
    ) -> Result<Vec<Outcome>, ProposeError> {
        let waits: Vec<_> = commands
            .into_iter()
            .map(|c| self.submit(c, false))
            .collect();
        futures::future::join_all(waits).await.into_iter().collect()
    }

    async fn submit(&self, command: Command, forward: bool) -> Result<Outcome, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Proposal {
                command,
                forward,
                reply,
            })
            .await
            .map_err(|_| ProposeError::Unavailable("the node is shutting down".into()))?;
        rx.await
            .map_err(|_| ProposeError::Unavailable("the node is shutting down".into()))?
    }

    /// Propose several commands (they may share an entry) and wait for all outcomes.
    pub async fn propose_all(&self, commands: Vec<Command>) -> Result<Vec<Outcome>, ProposeError> {
        let waits: Vec<_> = commands.into_iter().map(|c| self.propose(c)).collect();
        futures::future::join_all(waits).await.into_iter().collect()
    }
}

/// The batching loop.
pub struct ProposerLoop {
    raft: Raft<TypeConfig>,
    rx: mpsc::Receiver<Proposal>,
    forwarder: Option<Arc<dyn Forward>>,
    /// A proposal taken from the queue that did not fit the previous batch.
    carry: Option<Proposal>,
}

/// Create the proposer handle and its loop.
pub fn proposer(
    raft: Raft<TypeConfig>,
    forwarder: Option<Arc<dyn Forward>>,
) -> (Proposer, ProposerLoop) {
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    (
        Proposer { tx },
        ProposerLoop {
            raft,
            rx,
            forwarder,
            carry: None,
        },
    )
}

fn payload_bytes(c: &Command) -> usize {
    match c {
        Command::Submit { spec, .. } => spec.inputs.iter().map(|i| i.data.len()).sum(),
        Command::Complete { outputs, .. } => outputs.iter().map(|o| o.len()).sum(),
        _ => 64,
    }
}

/// Wall-clock now, for the entry's timestamp.
pub fn now() -> Timestamp {
    Timestamp(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    )
}

impl ProposerLoop {
    /// Run until shutdown.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT_ENTRIES));
        loop {
            let first = match self.carry.take() {
                Some(p) => p,
                None => tokio::select! {
                    _ = shutdown.cancelled() => return,
                    p = self.rx.recv() => match p { Some(p) => p, None => return },
                },
            };
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                return;
            };
            let mut bytes = payload_bytes(&first.command);
            // A batch is homogeneous in `forward`, so a write a follower already
            // forwarded here is never forwarded again (no forwarding loops).
            let forward = first.forward;
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH_COMMANDS && bytes < MAX_BATCH_BYTES {
                match self.rx.try_recv() {
                    Ok(p) if p.forward == forward => {
                        bytes += payload_bytes(&p.command);
                        batch.push(p);
                    }
                    Ok(p) => {
                        self.carry = Some(p);
                        break;
                    }
                    Err(_) => break,
                }
            }
            let (commands, replies): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|p| (p.command, p.reply)).unzip();
            metrics::histogram!("mesh_raft_batch_commands").record(commands.len() as f64);
            let forwarder = self.forwarder.clone().filter(|_| forward);
            let retained = forwarder.as_ref().map(|_| commands.clone());
            let request = Request {
                now: now(),
                commands: commands.into(),
            };
            let started = std::time::Instant::now();
            let raft_metrics = self.raft.metrics();
            let (me, term) = {
                let m = raft_metrics.borrow();
                (m.id, m.current_term)
            };
            let receiver = self.raft.client_write_ff(request).await;
            tokio::spawn(async move {
                let result = match receiver {
                    Ok(rx) => tokio::select! {
                        answer = rx => {
                            metrics::histogram!("mesh_raft_write_seconds")
                                .record(started.elapsed().as_secs_f64());
                            match answer {
                                Ok(Ok(resp)) => Ok(resp.data.outcomes),
                                Ok(Err(e)) => Err(write_error(e)),
                                Err(e) => Err(ProposeError::Unavailable(e.to_string())),
                            }
                        }
                        () = deposed(raft_metrics, me, term) => {
                            metrics::counter!("mesh_raft_writes_abandoned_total").increment(1);
                            Err(ProposeError::Unavailable(
                                "this node stopped leading before the write was answered; it may or may not have committed".into(),
                            ))
                        }
                    },
                    Err(fatal) => Err(ProposeError::Unavailable(fatal.to_string())),
                };
                drop(permit);
                let result = match (result, forwarder, retained) {
                    (Err(ProposeError::NotLeader { .. }), Some(f), Some(commands)) => {
                        f.forward(commands).await
                    }
                    (r, _, _) => r,
                };
                match result {
                    Ok(outcomes) => {
                        for (reply, outcome) in replies.into_iter().zip(outcomes) {
                            let _ = reply.send(Ok(outcome));
                        }
                    }
                    Err(e) => {
                        for reply in replies {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
            });
        }
    }
}

/// Returns [`DEPOSED_GRACE`] after node `me` stops leading term `term` (counted from
/// now if it is not leading it): a write proposed in that term and still unanswered
/// by then will not be answered.
async fn deposed(
    mut metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<u64, mesh_core::MeshNode>>,
    me: u64,
    term: u64,
) {
    // A closed channel means Raft stopped; the write's own answer reports that.
    let _ = metrics
        .wait_for(|m| m.current_term != term || m.current_leader != Some(me))
        .await;
    tokio::time::sleep(DEPOSED_GRACE).await;
}

fn write_error(e: ClientWriteError<u64, mesh_core::MeshNode>) -> ProposeError {
    match e {
        ClientWriteError::ForwardToLeader(f) => ProposeError::NotLeader {
            leader: f.leader_id,
        },
        other => ProposeError::Unavailable(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leading(term: u64) -> openraft::RaftMetrics<u64, mesh_core::MeshNode> {
        let mut m = openraft::RaftMetrics::new_initial(1);
        m.current_term = term;
        m.current_leader = Some(1);
        m
    }

    // Paused time: the 3 s grace passes without waiting for it.
    #[tokio::test(start_paused = true)]
    async fn a_write_is_given_up_only_a_grace_after_its_leader_stops_leading() {
        let (tx, rx) = tokio::sync::watch::channel(leading(2));
        let give_up = tokio::spawn(deposed(rx, 1, 2));
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.send_modify(|m| m.last_applied = None);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!give_up.is_finished(), "still the leader of its term");

        let stepped_down = tokio::time::Instant::now();
        tx.send_modify(|m| {
            m.current_term = 3;
            m.current_leader = Some(2);
        });
        give_up.await.unwrap();
        assert!(stepped_down.elapsed() >= DEPOSED_GRACE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_term_led_by_the_same_node_also_deposes_the_old_terms_writes() {
        let (tx, rx) = tokio::sync::watch::channel(leading(2));
        let give_up = tokio::spawn(deposed(rx, 1, 2));
        tx.send_modify(|m| m.current_term = 4);
        give_up.await.unwrap();
    }
}
