//! A restarting node checks that its data directory has not gone back in time.
//!
//! Raft is safe only if a node never forgets what it acknowledged: a follower that
//! stored entries and told the leader so, then comes back on an older copy of its data
//! directory (a restored backup or VM snapshot), may vote for a candidate that lacks
//! committed entries. Before this node starts Raft it asks its peers how far the
//! leader had replicated to it; if the leader has matched an index this directory
//! does not have, the node refuses to start, as etcd does, and says how to recover
//! (wipe the directory and join again with a token). It refuses too when a peer pins
//! this machine's key under another id: the directory is of an id the machine had
//! before it last rejoined, which the mesh removed.
//!
//! The check is best effort: it needs the leader that replicated to this node to be
//! the leader now and reachable within [`WAIT`]. A whole mesh restarting at once has
//! no leader to ask; the node then starts after the wait, with a warning.

use crate::peer::clients::PeerClients;
use anyhow::Context;
use mesh_core::{MeshNode, NodeId};
use mesh_proto::v1::ProgressRequest;
use openraft::storage::{RaftLogReader, RaftLogStorage, RaftStateMachine};
use std::time::Duration;
use tracing::{debug, info, warn};

/// How long a restarting node waits for the leader's answer.
pub const WAIT: Duration = Duration::from_secs(3);
/// Time limit of one question to one peer.
const ASK_TIMEOUT: Duration = Duration::from_millis(800);
/// Pause between rounds of questions.
const ROUND: Duration = Duration::from_millis(250);

/// What this node's own storage holds.
#[derive(Debug, Clone, Copy)]
pub struct Local {
    /// Index of the last log entry (purged or not); 0 for an empty log.
    pub last_index: u64,
    /// Term of the stored vote.
    pub term: u64,
}

/// How the check ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The leader's view of this node is within what the directory holds.
    Consistent {
        /// The leader that answered.
        leader: NodeId,
    },
    /// No leader answered in time (or none of its answers was current enough).
    Unverified,
    /// This node is the only member: there is no one to ask.
    Alone,
    /// The mesh knows this machine's key under another id: the directory is of an id
    /// that was replaced when the machine rejoined (an old copy put back).
    Replaced {
        /// The peer that said so.
        peer: NodeId,
        /// Its answer, which names the id the key belongs to.
        answer: String,
    },
    /// The directory lost entries the leader knows this node stored.
    RolledBack {
        /// The leader that answered.
        leader: NodeId,
        /// The index it had matched.
        matched: u64,
        /// The index this directory ends at.
        local: u64,
    },
}

/// What this node's storage holds (last log index, vote term) and its fellow members,
/// read before Raft starts.
pub async fn read_local(
    node: NodeId,
    log: &mut crate::store::LogStore,
    state_machine: &mut crate::store::StateMachineStore,
) -> anyhow::Result<(Local, Vec<(NodeId, MeshNode)>)> {
    let state = log
        .get_log_state()
        .await
        .context("cannot read the Raft log state")?;
    let vote = log.read_vote().await.context("cannot read the Raft vote")?;
    let (_, applied) = state_machine
        .applied_state()
        .await
        .context("cannot read the applied membership")?;
    // The newest membership: in the log (not applied yet: openraft applies it again
    // when it starts) or else in the snapshot the state machine was loaded from.
    let mut membership = applied.membership().clone();
    let last = state.last_log_id.map_or(0, |l| l.index);
    let first = state.last_purged_log_id.map_or(0, |l| l.index + 1);
    let mut hi = last;
    'scan: while hi >= first && hi > 0 {
        let lo = hi.saturating_sub(63).max(first);
        let entries = log
            .try_get_log_entries(lo..hi + 1)
            .await
            .context("cannot read the Raft log")?;
        for e in entries.iter().rev() {
            if let openraft::EntryPayload::Membership(m) = &e.payload {
                membership = m.clone();
                break 'scan;
            }
        }
        if lo == first {
            break;
        }
        hi = lo - 1;
    }
    let peers = membership
        .nodes()
        .filter(|(id, _)| **id != node.0)
        .map(|(id, n)| (NodeId(*id), n.clone()))
        .collect();
    let local = Local {
        last_index: state.last_log_id.map_or(0, |l| l.index),
        term: vote.map_or(0, |v| v.leader_id().term),
    };
    Ok((local, peers))
}

/// Ask `peers` (this node's fellow members) until the leader answers or `wait` ends.
pub async fn check(
    me: NodeId,
    local: Local,
    peers: &[(NodeId, MeshNode)],
    clients: &PeerClients,
    wait: Duration,
) -> Verdict {
    if peers.is_empty() {
        return Verdict::Alone;
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let asks = peers.iter().map(|(id, node)| async move {
            let unanswered = |why: String| (*id, None, why);
            let mut client = clients.mesh(node).map_err(|e| unanswered(e.to_string()))?;
            let call = client.progress(ProgressRequest { node_id: me.0 });
            let reply = tokio::time::timeout(ASK_TIMEOUT, call)
                .await
                .map_err(|_| unanswered(format!("no answer within {ASK_TIMEOUT:?}")))?
                .map_err(|s| (*id, Some(s.code()), s.message().to_string()))?;
            Ok::<_, (NodeId, Option<tonic::Code>, String)>((*id, reply.into_inner()))
        });
        let answers = futures::future::join_all(asks).await;
        for (peer, code, why) in answers.iter().filter_map(|a| a.as_ref().err()) {
            // The peer pins this key under another id: a definite answer, not a
            // failure to ask (peers before this build answer PERMISSION_DENIED, which
            // stays unanswered).
            if *code == Some(tonic::Code::FailedPrecondition) {
                return Verdict::Replaced {
                    peer: *peer,
                    answer: why.clone(),
                };
            }
            debug!(%peer, error = %why, "progress question not answered");
        }
        for (leader, reply) in answers.into_iter().flatten() {
            // A deposed leader that has not noticed yet may hold an old view of this
            // node: only a leader at least as recent as this node's own vote counts.
            if !reply.leader || reply.term < local.term {
                continue;
            }
            return judge(
                leader,
                reply.has_matched.then_some(reply.matched_index),
                local,
            );
        }
        if tokio::time::Instant::now() + ROUND >= deadline {
            return Verdict::Unverified;
        }
        tokio::time::sleep(ROUND).await;
    }
}

/// The verdict on one leader's answer.
pub fn judge(leader: NodeId, matched: Option<u64>, local: Local) -> Verdict {
    match matched {
        Some(m) if m > local.last_index => Verdict::RolledBack {
            leader,
            matched: m,
            local: local.last_index,
        },
        _ => Verdict::Consistent { leader },
    }
}

/// Log the verdict; an error (refuse to start) for a rolled-back directory.
pub fn enforce(verdict: Verdict, data_dir: &std::path::Path) -> anyhow::Result<()> {
    match verdict {
        Verdict::Consistent { leader } => {
            info!(%leader, "the leader's view of this node matches its data directory");
            Ok(())
        }
        Verdict::Alone => Ok(()),
        Verdict::Unverified => {
            warn!(
                "no leader answered within {WAIT:?}: starting without checking this data directory against the mesh"
            );
            Ok(())
        }
        Verdict::Replaced { peer, answer } => {
            metrics::counter!("mesh_rollback_refusals_total").increment(1);
            anyhow::bail!(
                "the data directory {} is of a node id the mesh no longer uses for this machine: \
                 node {peer} answered \"{answer}\". The machine rejoined under a new id since this \
                 directory was written (was it restored from a copy or backup?), and starting on it \
                 would only campaign with refused votes. To bring the machine back: stop it, empty \
                 the directory (keep the host key if it lives there), create a token with \
                 `mesh-cli token create` and start it with `--join TOKEN` (docs/operations.md, \
                 \"A node restored from an old copy\")",
                data_dir.display()
            )
        }
        Verdict::RolledBack {
            leader,
            matched,
            local,
        } => {
            metrics::counter!("mesh_rollback_refusals_total").increment(1);
            anyhow::bail!(
                "the data directory {} is older than this node's acknowledged state: leader {leader} \
                 has replicated up to log index {matched} to this node, but the directory ends at {local} \
                 (was it restored from a copy or backup?). A node that forgot what it acknowledged could \
                 make the mesh lose committed tasks, so it will not start on it. To bring the machine \
                 back: stop it, empty the directory (keep the host key if it lives there), create a \
                 token with `mesh-cli token create` and start it with `--join TOKEN`; it rejoins \
                 under a new id and the old id is removed (docs/operations.md, \"A node restored from \
                 an old copy\")",
                data_dir.display()
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_ahead_of_the_directory_means_rolled_back() {
        let local = Local {
            last_index: 100,
            term: 3,
        };
        assert_eq!(
            judge(NodeId(2), Some(140), local),
            Verdict::RolledBack {
                leader: NodeId(2),
                matched: 140,
                local: 100
            }
        );
        assert_eq!(
            judge(NodeId(2), Some(100), local),
            Verdict::Consistent { leader: NodeId(2) }
        );
        assert_eq!(
            judge(NodeId(2), None, local),
            Verdict::Consistent { leader: NodeId(2) }
        );
    }
}
