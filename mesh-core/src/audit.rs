//! The audit trail: every administrative action and its outcome, refused ones
//! included, with the actor's key fingerprint, kept in the replicated state up to a
//! retention count.

use crate::identity::fingerprint::Fingerprint;
use crate::ids::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Entries kept when no retention was set.
pub const DEFAULT_RETENTION: u32 = 10_000;

/// One audited action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Sequence number (never reused).
    pub seq: u64,
    /// When (the proposer's clock).
    pub at: Timestamp,
    /// Who.
    pub actor: Fingerprint,
    /// What: `submit`, `cancel`, `token create`, `join`, `remove`, `drain`, `keys add`...
    pub action: String,
    /// On what (a task id, node id, token id, key fingerprint), if anything.
    pub target: Option<String>,
    /// `ok`, or `refused: REASON`.
    pub outcome: String,
}

/// The bounded trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditLog {
    /// Entries, oldest first.
    pub entries: VecDeque<AuditEntry>,
    /// Most entries kept.
    pub retention: u32,
    /// The next sequence number.
    pub next_seq: u64,
}

impl Default for AuditLog {
    fn default() -> Self {
        AuditLog {
            entries: VecDeque::new(),
            retention: DEFAULT_RETENTION,
            next_seq: 0,
        }
    }
}

impl AuditLog {
    /// Append an entry, dropping the oldest beyond the retention.
    pub fn record(
        &mut self,
        at: Timestamp,
        actor: &Fingerprint,
        action: &str,
        target: Option<String>,
        outcome: String,
    ) {
        self.entries.push_back(AuditEntry {
            seq: self.next_seq,
            at,
            actor: actor.clone(),
            action: action.into(),
            target,
            outcome,
        });
        self.next_seq += 1;
        self.trim();
    }

    /// Apply a new retention.
    pub fn set_retention(&mut self, retention: u32) {
        self.retention = retention.max(1);
        self.trim();
    }

    fn trim(&mut self) {
        while self.entries.len() > self.retention as usize {
            self.entries.pop_front();
        }
    }
}
