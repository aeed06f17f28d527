//! The leader keeps the Raft membership in line with the replicated node records
//! (what Consul and Nomad call autopilot): joined nodes become learners, caught-up
//! learners are promoted while the voter set is below its target (always to an odd
//! size), a voter that has been down longer than the replacement delay is demoted in
//! favour of a healthy learner, and removed nodes leave the membership.

use crate::store::StateView;
use mesh_core::raft_types::TypeConfig;
use mesh_core::{MeshNode, NodeId};
use openraft::{ChangeMembers, Raft};
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often membership is reconciled.
const RECONCILE_INTERVAL: Duration = Duration::from_millis(500);
/// A learner this many entries behind the leader is not promoted yet.
const MAX_PROMOTION_LAG: u64 = 64;

/// Voter policy.
#[derive(Debug, Clone, Copy)]
pub struct VoterPolicy {
    /// Wanted number of voters (odd: 3 or 5).
    pub target: usize,
    /// How long a voter may be down before a learner replaces it.
    pub replace_after: Duration,
}

/// The reconciliation loop.
pub struct Autopilot {
    /// This node.
    pub node: NodeId,
    /// Consensus.
    pub raft: Raft<TypeConfig>,
    /// Node records.
    pub state: StateView,
    /// Policy.
    pub policy: VoterPolicy,
}

impl Autopilot {
    /// Run until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(RECONCILE_INTERVAL);
        let mut down_since: HashMap<NodeId, Instant> = HashMap::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let m = self.raft.metrics().borrow().clone();
            if m.current_leader != Some(self.node.0) {
                down_since.clear();
                continue;
            }
            let membership = m.membership_config.membership().clone();
            let voters: BTreeSet<u64> = membership.voter_ids().collect();
            let members: BTreeSet<u64> = membership.nodes().map(|(id, _)| *id).collect();
            let (records, down, removed) = self.state.read(|s| {
                let live: Vec<(u64, MeshNode)> = s
                    .nodes
                    .values()
                    .filter(|n| !n.removed)
                    .map(|n| {
                        (
                            n.id.0,
                            MeshNode {
                                addr: n.addr.clone(),
                                fingerprint: n.fingerprint.clone(),
                            },
                        )
                    })
                    .collect();
                let down: BTreeSet<u64> = s
                    .nodes
                    .values()
                    .filter(|n| n.down && !n.removed)
                    .map(|n| n.id.0)
                    .collect();
                let removed: BTreeSet<u64> = s
                    .nodes
                    .values()
                    .filter(|n| n.removed)
                    .map(|n| n.id.0)
                    .collect();
                (live, down, removed)
            });
            let now = Instant::now();
            down_since.retain(|id, _| down.contains(&id.0));
            for id in &down {
                down_since.entry(NodeId(*id)).or_insert(now);
            }

            // Removed nodes leave: voters first (a voter cannot be removed directly).
            let removed_voters: BTreeSet<u64> = voters.intersection(&removed).copied().collect();
            if !removed_voters.is_empty() {
                let keep: BTreeSet<u64> = voters.difference(&removed_voters).copied().collect();
                self.change(
                    ChangeMembers::ReplaceAllVoters(keep),
                    false,
                    "remove voters of removed nodes",
                )
                .await;
                continue;
            }
            let removed_learners: BTreeSet<u64> = members.intersection(&removed).copied().collect();
            if !removed_learners.is_empty() {
                self.change(
                    ChangeMembers::RemoveNodes(removed_learners),
                    false,
                    "remove learners of removed nodes",
                )
                .await;
                continue;
            }

            // Joined nodes become learners.
            for (id, node) in records.iter().filter(|(id, _)| !members.contains(id)) {
                info!(node = id, addr = %node.addr, "adding learner");
                if let Err(e) = self.raft.add_learner(*id, node.clone(), false).await {
                    warn!(node = id, error = %e, "could not add learner");
                }
            }

            let last = m.last_log_index.unwrap_or(0);
            let caught_up = |id: &u64| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(id))
                    .and_then(|l| l.as_ref())
                    .is_some_and(|l| l.index + MAX_PROMOTION_LAG >= last)
            };
            let healthy_learners: Vec<u64> = members
                .iter()
                .filter(|id| {
                    !voters.contains(id)
                        && !down.contains(id)
                        && !removed.contains(id)
                        && caught_up(id)
                })
                .copied()
                .collect();

            // Replace a voter that has been down too long.
            let dead: Vec<u64> = voters
                .iter()
                .filter(|id| {
                    **id != self.node.0
                        && down_since
                            .get(&NodeId(**id))
                            .is_some_and(|t| t.elapsed() >= self.policy.replace_after)
                })
                .copied()
                .collect();
            if let (Some(dead), Some(learner)) = (dead.first(), healthy_learners.first()) {
                let mut next = voters.clone();
                next.remove(dead);
                next.insert(*learner);
                info!(
                    dead,
                    learner, "replacing a dead voter with a healthy learner"
                );
                self.change(
                    ChangeMembers::ReplaceAllVoters(next),
                    true,
                    "replace dead voter",
                )
                .await;
                continue;
            }

            // Grow the voter set toward the target, keeping it odd.
            if voters.len() < self.policy.target && !healthy_learners.is_empty() {
                let mut k = (self.policy.target - voters.len()).min(healthy_learners.len());
                if (voters.len() + k).is_multiple_of(2) {
                    k -= 1;
                }
                if k > 0 {
                    let next: BTreeSet<u64> = voters
                        .iter()
                        .copied()
                        .chain(healthy_learners.iter().take(k).copied())
                        .collect();
                    info!(voters = ?next, "promoting learners");
                    self.change(
                        ChangeMembers::ReplaceAllVoters(next),
                        true,
                        "promote learners",
                    )
                    .await;
                }
            }
        }
    }

    async fn change(&self, change: ChangeMembers<u64, MeshNode>, retain: bool, why: &str) {
        if let Err(e) = self.raft.change_membership(change, retain).await {
            warn!(error = %e, why, "membership change failed");
        }
    }
}
