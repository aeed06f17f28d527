//! A restarted voter holds its elections until it has heard from a leader.
//!
//! A node that comes back (a crash, SIGKILL, a restart by systemd) starts its election
//! timer at once, 150-300 ms by default, while the leader, which could not reach it,
//! is backing off its tries to that node (up to 400 ms, `peer::network`). If the
//! timer runs out first the node campaigns with a higher term. The other voters refuse
//! it (they honour the leader's lease), but the leader steps down as soon as it sees
//! that term: the mesh has no leader until a new election, and a node that keeps
//! restarting, or whose runtime stalls, does it again and again. Raft's PreVote
//! extension answers this; openraft 0.9 has none. The chaos harness showed it: a
//! voter killed and restarted every few seconds deposed the leader every ~2 s, and
//! with another voter down no liveness change could commit, so a dead node's task
//! stayed with it for over 8 s.
//!
//! So a node that restarts on its data directory starts with elections off
//! (openraft's `enable_elect`) and turns them on once it has accepted an AppendEntries
//! from a leader (`LeaderContact`), at once when its stored membership shows it is the
//! only voter, or after [`HOLD`] without either: when the whole mesh restarts at
//! once, every node waits that long before the first election. It still grants votes
//! meanwhile, so the others can elect a leader without it. A node that starts a new
//! mesh or joins one is not held: it has no term that could depose anyone.
//! A follower whose runtime stalls past its election timeout can still campaign:
//! the hold covers a restart, not a stall.

use crate::leader_watch::LeaderContact;
use mesh_core::raft_types::TypeConfig;
use openraft::Raft;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Longest a restarted voter waits to hear from a leader before it may campaign: the
/// leader's longest backoff towards a node it could not reach (400 ms), its
/// connection and TLS handshake, with room for a loaded machine.
pub const HOLD: Duration = Duration::from_secs(2);
/// How often the hold looks.
const TICK: Duration = Duration::from_millis(10);

/// Whether a node whose stored membership has these voters is the only one: it has
/// nobody to hear from. (No voters at all: openraft has not loaded the membership yet.)
fn only_voter(mut voters: impl Iterator<Item = u64>, me: u64) -> bool {
    voters.next() == Some(me) && voters.next().is_none()
}

/// Turns elections on once a leader has been heard from, or at once for the only
/// voter, or after [`HOLD`].
pub struct RejoinHold {
    /// This node.
    pub me: u64,
    /// Consensus, started with elections off.
    pub raft: Raft<TypeConfig>,
    /// Fed by the Raft endpoint.
    pub contact: LeaderContact,
}

impl RejoinHold {
    /// Run until elections are on, or `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let started = Instant::now();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let alone = {
                let m = self.raft.metrics();
                let m = m.borrow();
                only_voter(m.membership_config.membership().voter_ids(), self.me)
            };
            if alone {
                info!("the only voter of its mesh; elections on");
                break;
            }
            if let Some(leader) = self.contact.leader() {
                info!(
                    leader,
                    after_ms = started.elapsed().as_millis() as u64,
                    "heard from the leader since the restart; elections on"
                );
                break;
            }
            if started.elapsed() >= HOLD {
                info!(
                    after_ms = started.elapsed().as_millis() as u64,
                    "no leader heard from since the restart; elections on"
                );
                break;
            }
        }
        self.raft.runtime_config().elect(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_membership_of_this_node_alone_releases_at_once() {
        assert!(only_voter([7].into_iter(), 7));
        assert!(!only_voter([7, 8].into_iter(), 7));
        assert!(!only_voter([8].into_iter(), 7));
        // Not loaded yet: wait, as for a mesh with other voters.
        assert!(!only_voter(std::iter::empty(), 7));
    }
}
