//! Heartbeats and liveness. Every node reports to the leader on a fixed interval; the
//! leader marks a node down through Raft when it has been silent for the node
//! timeout (its attempts go back to pending), and up again when it is heard from.
//! A node that has not reached the leader for the node timeout considers itself cut
//! off and starts no new work: its results would be fenced anyway.

use crate::peer::clients::PeerClients;
use crate::peer::directory::Directory;
use crate::proposer::Proposer;
use crate::store::StateView;
use mesh_core::raft_types::TypeConfig;
use mesh_core::{Command, NodeId};
use mesh_proto::v1::HeartbeatRequest;
use openraft::Raft;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Timing of heartbeats and the failure detector.
#[derive(Debug, Clone, Copy)]
pub struct LivenessConfig {
    /// How often a node reports to the leader.
    pub heartbeat_interval: Duration,
    /// Silence after which the leader marks a node down (and a node considers itself cut off).
    pub node_timeout: Duration,
}

/// What this node knows about who was heard from when.
#[derive(Clone, Default)]
pub struct Liveness {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    heard: HashMap<NodeId, Instant>,
    /// When this node last reached a leader (or was one).
    last_ack: Option<Instant>,
}

impl Liveness {
    /// The leader received a heartbeat from `node`.
    pub fn heard_from(&self, node: NodeId) {
        self.inner
            .lock()
            .expect("not poisoned")
            .heard
            .insert(node, Instant::now());
    }

    /// Time since the leader heard from `node`.
    pub fn silence(&self, node: NodeId) -> Option<Duration> {
        self.inner
            .lock()
            .expect("not poisoned")
            .heard
            .get(&node)
            .map(Instant::elapsed)
    }

    /// This node reached the leader (or is the leader).
    pub fn acked(&self) {
        self.inner.lock().expect("not poisoned").last_ack = Some(Instant::now());
    }

    /// True when this node has not reached a leader for `timeout`.
    pub fn cut_off(&self, timeout: Duration) -> bool {
        self.inner
            .lock()
            .expect("not poisoned")
            .last_ack
            .is_none_or(|t| t.elapsed() > timeout)
    }
}

/// Sends this node's heartbeats to the leader.
pub struct Heartbeats {
    /// This node.
    pub node: NodeId,
    /// Consensus (to find the leader).
    pub raft: Raft<TypeConfig>,
    /// Addresses and keys.
    pub directory: Directory,
    /// Channels.
    pub clients: PeerClients,
    /// Bookkeeping.
    pub liveness: Liveness,
    /// Timing.
    pub config: LivenessConfig,
    /// State (to count running attempts).
    pub state: StateView,
}

impl Heartbeats {
    /// Run until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let leader = self.raft.metrics().borrow().current_leader;
            match leader {
                Some(l) if l == self.node.0 => {
                    // A leader counts as connected only while a quorum acknowledges
                    // it: an isolated leader must stop its work and report not ready.
                    let m = self.raft.metrics().borrow().clone();
                    let alone = m
                        .membership_config
                        .membership()
                        .voter_ids()
                        .all(|v| v == self.node.0);
                    let quorum_ack = m
                        .millis_since_quorum_ack
                        .is_some_and(|ms| ms < self.config.node_timeout.as_millis() as u64);
                    if alone || quorum_ack {
                        self.liveness.acked();
                    }
                    self.liveness.heard_from(self.node);
                }
                Some(l) => {
                    let Some(target) = self.directory.node(NodeId(l)) else {
                        continue;
                    };
                    let Ok(mut client) = self.clients.mesh(&target) else {
                        continue;
                    };
                    let running = self.state.read(|s| s.tasks_on(self.node).count()) as u32;
                    let call = client.heartbeat(HeartbeatRequest {
                        node_id: self.node.0,
                        running,
                    });
                    match tokio::time::timeout(self.config.node_timeout, call).await {
                        Ok(Ok(_)) => self.liveness.acked(),
                        Ok(Err(e)) => warn!(leader = l, error = %e.message(), "heartbeat refused"),
                        Err(_) => warn!(leader = l, "heartbeat timed out"),
                    }
                }
                None => {}
            }
        }
    }
}

/// The leader's failure detector: proposes `MarkDown` / `MarkUp`.
pub struct FailureDetector {
    /// This node.
    pub node: NodeId,
    /// Consensus.
    pub raft: Raft<TypeConfig>,
    /// State.
    pub state: StateView,
    /// Where marks go.
    pub proposer: Proposer,
    /// Bookkeeping.
    pub liveness: Liveness,
    /// Timing.
    pub config: LivenessConfig,
}

impl FailureDetector {
    /// Run until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.heartbeat_interval);
        let mut leading_since: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let is_leader = self.raft.metrics().borrow().current_leader == Some(self.node.0);
            // A new leader has heard from nobody yet: every node gets a full timeout
            // counted from the moment this node took over.
            let since = match (is_leader, leading_since) {
                (false, _) => {
                    leading_since = None;
                    continue;
                }
                (true, None) => *leading_since.insert(Instant::now()),
                (true, Some(t)) => t,
            };
            let mut marks = Vec::new();
            self.state.read(|s| {
                for n in s.nodes.values().filter(|n| !n.removed && n.id != self.node) {
                    // Only a real heartbeat counts as hearing from a node.
                    let heard = self.liveness.silence(n.id);
                    let silence = heard.unwrap_or(Duration::MAX).min(since.elapsed());
                    if !n.down && silence > self.config.node_timeout {
                        marks.push(Command::MarkDown { node: n.id });
                    } else if n.down
                        && heard
                            .is_some_and(|h| h < self.config.node_timeout && h < since.elapsed())
                    {
                        marks.push(Command::MarkUp { node: n.id });
                    }
                }
            });
            for m in marks {
                info!(command = ?m, "liveness change");
                if let Err(e) = self.proposer.propose(m).await {
                    warn!(error = %e, "could not record a liveness change");
                }
            }
        }
    }
}
