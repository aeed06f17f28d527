//! Fast failover when the leader's process is gone (crash, SIGKILL, OOM kill).
//!
//! openraft 0.9 campaigns after the old leader's lease (`election_timeout_max`) plus
//! the follower's own election timeout: 450-600 ms with the default 150 ms. The lease
//! is what the other voters enforce (they refuse votes until it has run out); the
//! timeout is what rides out a leader that is slow, paused or cut off. A leader whose
//! process died leaves evidence that a slow one does not: its host refuses connections
//! to its port. So a follower that has not heard from its leader for two heartbeats
//! dials the leader's Raft address (again every two heartbeats while the dial is not
//! refused: see `dial_again`); once a dial is refused, it campaigns as soon as the
//! lease has run out (plus a margin for the other voters' leases), the surviving
//! voters taking turns by id so that they do not split the vote.
//!
//! A leader that is paused, partitioned, overloaded, or on a machine that is down (no
//! one answers the dial at all) is not refused, and openraft's timeouts apply as
//! before; so this shortens no timeout that a stall could trip. The election itself is
//! openraft's (`Raft::trigger().elect()`), with its lease and log checks: this module
//! only decides when a follower asks for it.

use crate::peer::clients::PeerClients;
use mesh_core::raft_types::TypeConfig;
use openraft::{Raft, ServerState};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Silence after which the leader's port is dialled: two missed heartbeats.
const PROBE_AFTER: Duration = Duration::from_millis(100);
/// How long the dial may take (a host refuses at once; no answer means "not refused").
const PROBE_TIMEOUT: Duration = Duration::from_millis(100);
/// Beyond the lease: the other voters may have taken the last heartbeat a little later.
const LEASE_MARGIN: Duration = Duration::from_millis(30);
/// Between the turns of the surviving voters: time for the first to win and be heard.
const TURN: Duration = Duration::from_millis(60);
/// How often the watch looks at the clock.
const TICK: Duration = Duration::from_millis(10);

/// When this node last accepted an AppendEntries, and from which leader. Written by
/// the Raft endpoint, read by [`LeaderWatch`].
#[derive(Clone, Default)]
pub struct LeaderContact(Arc<Mutex<Option<Contact>>>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Contact {
    leader: u64,
    at: Instant,
}

impl LeaderContact {
    /// An AppendEntries (or heartbeat) from `leader` was accepted just now.
    pub fn heard(&self, leader: u64) {
        *self.0.lock().expect("not poisoned") = Some(Contact {
            leader,
            at: Instant::now(),
        });
    }

    fn last(&self) -> Option<Contact> {
        *self.0.lock().expect("not poisoned")
    }

    /// The leader this node last accepted an AppendEntries from, if any since it started.
    pub fn leader(&self) -> Option<u64> {
        self.last().map(|c| c.leader)
    }
}

/// How long after the last contact with a leader that refuses connections this node
/// campaigns: the lease, a margin, and `turn` turns.
fn campaign_after(lease: Duration, turn: usize) -> Duration {
    lease + LEASE_MARGIN + TURN * turn as u32
}

/// This node's turn among the voters that survive `leader` (0 goes first), or `None`
/// when it is not one of them.
fn turn_of(voters: impl Iterator<Item = u64>, leader: u64, me: u64) -> Option<usize> {
    let mut survivors: Vec<u64> = voters.filter(|v| *v != leader).collect();
    survivors.sort_unstable();
    survivors.iter().position(|v| *v == me)
}

/// What a dial of the leader's port said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// Connected, timed out, or failed some other way: nothing to conclude.
    NotRefused,
    /// Refused: no process listens there. `campaigned` once this node asked to elect.
    Refused { campaigned: bool },
}

/// The last dial of the leader of one contact.
#[derive(Clone, Copy, Debug)]
struct Dialled {
    contact: Contact,
    verdict: Verdict,
    /// When the dial started.
    at: Instant,
}

/// Whether the leader's port must be dialled (again) at `now`, still silent since
/// `contact`. A refusal is final for its contact: a process that is gone stays gone,
/// and a new process would have to win an election before it is heard from. A dial
/// that was not refused is only true of its moment: the leader may have been alive
/// but slow (a starved machine, a long pause) when it was dialled and killed just
/// after, with no contact in between to start afresh. So it is checked again every
/// `PROBE_AFTER` while the silence lasts; otherwise one slow moment would turn the
/// fast path off until the next leader, and failover would wait for openraft's
/// timers.
fn dial_again(last: &Dialled, contact: Contact, now: Instant) -> bool {
    if last.contact != contact {
        return true;
    }
    match last.verdict {
        Verdict::Refused { .. } => false,
        Verdict::NotRefused => now.saturating_duration_since(last.at) >= PROBE_AFTER,
    }
}

async fn dial(addr: &str) -> Verdict {
    match tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Verdict::Refused { campaigned: false }
        }
        _ => Verdict::NotRefused,
    }
}

/// The follower-side watch (see the module docs).
pub struct LeaderWatch {
    /// This node.
    pub me: u64,
    /// Consensus.
    pub raft: Raft<TypeConfig>,
    /// Fed by the Raft endpoint.
    pub contact: LeaderContact,
    /// Where the leader's address is dialled (routes included).
    pub clients: PeerClients,
    /// The leader lease the voters enforce: openraft's `election_timeout_max`.
    pub lease: Duration,
}

impl LeaderWatch {
    /// Run until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // The last dial's verdict on the leader of one contact: a new contact starts
        // afresh, and a verdict of "not refused" is checked again (see `dial_again`).
        let mut verdict: Option<Dialled> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Some(contact) = self.contact.last() else {
                continue;
            };
            let silent = contact.at.elapsed();
            if silent < PROBE_AFTER {
                continue;
            }
            // Only a voter following the leader it last heard from: a candidate or a
            // new leader is openraft's business already.
            let target = {
                let m = self.raft.metrics();
                let m = m.borrow();
                let membership = m.membership_config.membership();
                match (m.state, m.current_leader) {
                    (ServerState::Follower, Some(l)) if l == contact.leader => {
                        turn_of(membership.voter_ids(), l, self.me).and_then(|turn| {
                            let node = membership.get_node(&l)?;
                            Some((turn, self.clients.dial_addr(node).to_string()))
                        })
                    }
                    _ => None,
                }
            };
            let Some((turn, addr)) = target else {
                continue;
            };
            let current = match verdict {
                Some(d) if !dial_again(&d, contact, Instant::now()) => d.verdict,
                _ => {
                    let at = Instant::now();
                    let v = dial(&addr).await;
                    if v != Verdict::NotRefused {
                        metrics::counter!("mesh_raft_leader_gone_total").increment(1);
                        info!(
                            leader = contact.leader,
                            %addr,
                            silent_ms = silent.as_millis() as u64,
                            "the leader refuses connections: its process is gone; campaigning when its lease ends (turn {turn})"
                        );
                    }
                    verdict = Some(Dialled {
                        contact,
                        verdict: v,
                        at,
                    });
                    v
                }
            };
            if current == (Verdict::Refused { campaigned: false })
                && contact.at.elapsed() >= campaign_after(self.lease, turn)
            {
                if let Some(d) = verdict.as_mut() {
                    d.verdict = Verdict::Refused { campaigned: true };
                }
                info!(
                    leader = contact.leader,
                    "campaigning: the leader is gone and its lease has run out"
                );
                if let Err(e) = self.raft.trigger().elect().await {
                    tracing::warn!(error = %e, "cannot start an election");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survivors_take_turns_by_id_and_the_old_leader_has_none() {
        let voters = [3, 1, 2];
        assert_eq!(turn_of(voters.into_iter(), 2, 1), Some(0));
        assert_eq!(turn_of(voters.into_iter(), 2, 3), Some(1));
        assert_eq!(turn_of(voters.into_iter(), 1, 3), Some(1));
        assert_eq!(turn_of(voters.into_iter(), 2, 2), None, "the old leader");
        assert_eq!(turn_of(voters.into_iter(), 2, 7), None, "a learner");
    }

    #[test]
    fn the_first_turn_campaigns_just_after_the_lease_and_later_turns_wait() {
        let lease = Duration::from_millis(300);
        assert!(campaign_after(lease, 0) > lease);
        assert!(campaign_after(lease, 0) < lease + Duration::from_millis(100));
        assert_eq!(campaign_after(lease, 2) - campaign_after(lease, 1), TURN);
    }

    #[test]
    fn a_refusal_is_final_for_its_contact_but_an_answer_is_checked_again() {
        let start = Instant::now();
        let contact = Contact {
            leader: 2,
            at: start,
        };
        let dialled = |verdict| Dialled {
            contact,
            verdict,
            at: start + PROBE_AFTER,
        };
        let soon = start + PROBE_AFTER + PROBE_AFTER / 2;
        let later = start + PROBE_AFTER * 2;

        let answered = dialled(Verdict::NotRefused);
        assert!(
            !dial_again(&answered, contact, soon),
            "not before PROBE_AFTER"
        );
        assert!(
            dial_again(&answered, contact, later),
            "a leader that answered once may be killed just after: dial it again"
        );

        let refused = dialled(Verdict::Refused { campaigned: false });
        assert!(!dial_again(&refused, contact, later + PROBE_AFTER * 10));

        let heard_again = Contact {
            leader: 2,
            at: start + PROBE_AFTER,
        };
        assert!(
            dial_again(&refused, heard_again, soon),
            "a new contact starts afresh"
        );
    }

    #[tokio::test]
    async fn a_port_nobody_listens_on_is_refused_and_a_listening_one_is_not() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap().to_string();
        assert_eq!(dial(&open).await, Verdict::NotRefused);
        drop(listener);
        assert_eq!(dial(&open).await, Verdict::Refused { campaigned: false });
    }
}
