//! Who may do what: SSH user keys with roles, held in the replicated state.
//!
//! | role | may |
//! |---|---|
//! | viewer | read status, nodes, tasks, results |
//! | submitter | submit; see, wait for, fetch and cancel its own tasks |
//! | operator | everything a submitter may, on every task; drain and undrain nodes |
//! | admin | everything: tokens, keys, remove nodes, audit, snapshots |

use crate::identity::fingerprint::Fingerprint;
use crate::ids::Timestamp;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A user key's role, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Read-only.
    Viewer,
    /// Submits and manages its own tasks.
    Submitter,
    /// Runs the mesh's work: every task, drain.
    Operator,
    /// Everything.
    Admin,
}

impl Role {
    /// Parse `admin|operator|submitter|viewer`.
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "admin" => Role::Admin,
            "operator" => Role::Operator,
            "submitter" => Role::Submitter,
            "viewer" => Role::Viewer,
            _ => return None,
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Viewer => "viewer",
            Role::Submitter => "submitter",
            Role::Operator => "operator",
            Role::Admin => "admin",
        })
    }
}

/// What a command asks to do, for the role check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Status, nodes.
    ReadMesh,
    /// Read tasks (a submitter: only its own).
    ReadTasks,
    /// Submit.
    Submit,
    /// Cancel (a submitter: only its own).
    Cancel,
    /// Drain or undrain a node.
    Drain,
    /// Tokens, keys, remove, audit, snapshots.
    Administer,
}

impl Action {
    /// The weakest role that may do this.
    pub fn needs(self) -> Role {
        match self {
            Action::ReadMesh | Action::ReadTasks => Role::Viewer,
            Action::Submit | Action::Cancel => Role::Submitter,
            Action::Drain => Role::Operator,
            Action::Administer => Role::Admin,
        }
    }
}

/// Whether `role` may do `action` (ownership is checked separately).
pub fn permits(role: Role, action: Action) -> bool {
    role >= action.needs()
}

/// Whether `role` sees and cancels every task, not only its own.
pub fn sees_all_tasks(role: Role) -> bool {
    role != Role::Submitter
}

/// A user key as the state records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserKey {
    /// Fingerprint.
    pub fingerprint: Fingerprint,
    /// The public key line (`ssh-ed25519 AAAA...`), for listings.
    pub key: String,
    /// Role.
    pub role: Role,
    /// Comment from the key file.
    pub comment: String,
    /// Who added it.
    pub added_by: Fingerprint,
    /// When.
    pub added_at: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_matrix() {
        use Action::*;
        let table = [
            (Role::Viewer, [true, true, false, false, false, false]),
            (Role::Submitter, [true, true, true, true, false, false]),
            (Role::Operator, [true, true, true, true, true, false]),
            (Role::Admin, [true, true, true, true, true, true]),
        ];
        for (role, allowed) in table {
            for (action, want) in [ReadMesh, ReadTasks, Submit, Cancel, Drain, Administer]
                .into_iter()
                .zip(allowed)
            {
                assert_eq!(permits(role, action), want, "{role} {action:?}");
            }
        }
        assert!(!sees_all_tasks(Role::Submitter));
        assert!(sees_all_tasks(Role::Viewer));
        assert_eq!(Role::parse("operator"), Some(Role::Operator));
        assert_eq!(Role::parse("root"), None);
    }
}
