//! Commands: the only way the replicated state changes. One Raft entry carries a
//! `Request` (many commands, one timestamp) and yields a `Response` (one outcome each).

use crate::capability::NodeCapabilities;
use crate::data::Bytes;
use crate::identity::fingerprint::Fingerprint;
use crate::ids::{Attempt, NodeId, TaskId, Timestamp};
use crate::task::{OutputDecl, TaskSpec};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// One state transition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// A node announces itself and what it can run (also used to refresh).
    RegisterNode {
        /// The node.
        node: NodeId,
        /// Its host key fingerprint.
        fingerprint: Fingerprint,
        /// Its advertised address.
        addr: String,
        /// Its adapters and labels.
        capabilities: NodeCapabilities,
    },
    /// A user submits a task. The spec was planned (validated) before proposal;
    /// `outputs` are the resolved output buffers.
    Submit {
        /// The task.
        spec: TaskSpec,
        /// Its output buffers.
        outputs: Vec<OutputDecl>,
        /// The key that submitted it.
        submitter: Fingerprint,
    },
    /// The scheduler gives a pending task to a node, with a new attempt number.
    Assign {
        /// The task.
        task: TaskId,
        /// The node.
        node: NodeId,
    },
    /// A node reports that it started an attempt.
    Start {
        /// The task.
        task: TaskId,
        /// The attempt the node holds.
        attempt: Attempt,
        /// The reporting node.
        node: NodeId,
    },
    /// A node reports the outputs of an attempt.
    Complete {
        /// The task.
        task: TaskId,
        /// The attempt the node holds.
        attempt: Attempt,
        /// The reporting node.
        node: NodeId,
        /// Output buffers, in declaration order.
        outputs: Vec<Bytes>,
    },
    /// A node reports that an attempt failed.
    Fail {
        /// The task.
        task: TaskId,
        /// The attempt the node holds.
        attempt: Attempt,
        /// The reporting node.
        node: NodeId,
        /// Why.
        error: String,
        /// False when retrying cannot help (the kernel itself is broken).
        retryable: bool,
    },
    /// An admin creates a join token; only the secret's hash enters the log.
    CreateToken {
        /// Public id.
        id: String,
        /// SHA-256 of the secret.
        secret_hash: crate::data::Digest,
        /// How long it stays valid.
        #[serde(with = "crate::task::duration_ms")]
        ttl: std::time::Duration,
        /// How many joins it allows.
        uses: u32,
        /// Who created it.
        actor: Fingerprint,
    },
    /// An admin revokes a join token.
    RevokeToken {
        /// Public id.
        id: String,
        /// Who revoked it.
        actor: Fingerprint,
    },
    /// A new machine presents a token. The fingerprint is the key the joiner presented
    /// in the TLS handshake, never a value from the request body.
    Join {
        /// Token id.
        token: String,
        /// SHA-256 of the secret presented.
        secret_hash: crate::data::Digest,
        /// The joiner's host key fingerprint, from the TLS session.
        fingerprint: Fingerprint,
        /// The joiner's node-to-node address.
        addr: String,
    },
    /// The leader saw no heartbeat from a node for the node timeout: its attempts
    /// are taken back (each counts against its task's attempt budget, like a failed
    /// run; a task whose last attempt it was fails) and the node gets no new work.
    MarkDown {
        /// The node.
        node: NodeId,
    },
    /// A node marked down is heard from again.
    MarkUp {
        /// The node.
        node: NodeId,
    },
    /// An admin removes a node for good.
    RemoveNode {
        /// The node.
        node: NodeId,
        /// Who removed it.
        actor: Fingerprint,
    },
    /// A node committed one finished shard of a sharded task. The last shard
    /// completes the task (its output is the shards' outputs in order).
    Checkpoint {
        /// The task.
        task: TaskId,
        /// The attempt the node holds.
        attempt: Attempt,
        /// The reporting node.
        node: NodeId,
        /// Shard index.
        shard: u32,
        /// The shard's output (sharded tasks have one output).
        output: Bytes,
    },
    /// A node gives a task back (it is being drained); checkpoints are kept.
    Release {
        /// The task.
        task: TaskId,
        /// The attempt the node holds.
        attempt: Attempt,
        /// The node.
        node: NodeId,
    },
    /// An operator drains a node: no new placements there.
    Drain {
        /// The node.
        node: NodeId,
        /// Who.
        actor: Fingerprint,
    },
    /// An operator lets a drained node take work again.
    Undrain {
        /// The node.
        node: NodeId,
        /// Who.
        actor: Fingerprint,
    },
    /// An admin adds (or changes the role of) a user key.
    AddKey {
        /// The key's fingerprint.
        fingerprint: Fingerprint,
        /// The public key line.
        key: String,
        /// Its role.
        role: crate::access::Role,
        /// Comment.
        comment: String,
        /// Who.
        actor: Fingerprint,
    },
    /// An admin removes a user key.
    RemoveKey {
        /// The key's fingerprint.
        fingerprint: Fingerprint,
        /// Who.
        actor: Fingerprint,
    },
    /// Record an action refused before it reached the state machine (a role check).
    AuditRefusal {
        /// Who tried.
        actor: Fingerprint,
        /// What.
        action: String,
        /// On what.
        target: Option<String>,
        /// Why it was refused.
        reason: String,
    },
    /// An admin sets how many audit entries are kept.
    SetAuditRetention {
        /// Entries to keep.
        entries: u32,
        /// Who.
        actor: Fingerprint,
    },
    /// Disaster recovery: load a saved state into a fresh mesh (one with no tasks).
    /// Tasks, results, keys and the audit trail come back; attempts in flight go back
    /// to pending; the saved nodes are kept as removed records (their ids are never
    /// reused); tokens do not come back (they name the old seed).
    Restore {
        /// The saved state.
        state: Box<crate::state::MeshState>,
        /// Who restored it.
        actor: Fingerprint,
    },
    /// A user cancels a task.
    Cancel {
        /// The task.
        task: TaskId,
        /// Who cancelled it.
        actor: Fingerprint,
    },
}

impl Command {
    /// The task a command is about, for log fields.
    pub fn task(&self) -> Option<TaskId> {
        match self {
            Command::Assign { task, .. }
            | Command::Start { task, .. }
            | Command::Complete { task, .. }
            | Command::Fail { task, .. }
            | Command::Cancel { task, .. }
            | Command::Checkpoint { task, .. }
            | Command::Release { task, .. } => Some(*task),
            _ => None,
        }
    }
}

/// What applying one command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The node is registered.
    NodeRegistered(NodeId),
    /// The task exists; `existing` is true when an idempotency key matched.
    Submitted {
        /// Its id.
        task: TaskId,
        /// True when this returned an earlier submission.
        existing: bool,
    },
    /// The task was assigned.
    Assigned {
        /// The task.
        task: TaskId,
        /// The node.
        node: NodeId,
        /// The new attempt.
        attempt: Attempt,
    },
    /// The attempt is running.
    Started(TaskId),
    /// The result is recorded.
    Completed(TaskId),
    /// The attempt failed; `retry` says whether the task went back to pending.
    Failed {
        /// The task.
        task: TaskId,
        /// True when it will be retried.
        retry: bool,
    },
    /// The task is cancelled.
    Cancelled(TaskId),
    /// A join token exists.
    TokenCreated(String),
    /// A join token is revoked.
    TokenRevoked(String),
    /// A machine joined and got this node id.
    Joined(NodeId),
    /// A user key was added or its role changed.
    KeyAdded(Fingerprint),
    /// A user key was removed.
    KeyRemoved(Fingerprint),
    /// An audit entry or setting was recorded.
    Audited,
    /// A saved state was loaded.
    Restored {
        /// Tasks restored.
        tasks: usize,
    },
    /// A node's liveness changed.
    NodeDown(NodeId),
    /// A node is up again.
    NodeUp(NodeId),
    /// A node is removed.
    NodeRemoved(NodeId),
    /// A shard is committed.
    Checkpointed {
        /// The task.
        task: TaskId,
        /// The shard.
        shard: u32,
    },
    /// A task went back to pending.
    Released(TaskId),
    /// A node's drain flag changed.
    Drained {
        /// The node.
        node: NodeId,
        /// True when draining.
        draining: bool,
    },
    /// Nothing changed.
    Rejected(Rejection),
}

/// Why a command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// No such task.
    #[error("task {0} does not exist")]
    UnknownTask(TaskId),
    /// No such node.
    #[error("node {0} is not registered")]
    UnknownNode(NodeId),
    /// A report from an attempt that is no longer current (the fencing check).
    #[error("task {task}: attempt {got} is stale (current attempt is {current} on {holder})")]
    StaleAttempt {
        /// The task.
        task: TaskId,
        /// The attempt in the report.
        got: Attempt,
        /// The task's current attempt.
        current: Attempt,
        /// Who holds the task now.
        holder: String,
    },
    /// The task is not in a state that allows this command.
    #[error("task {task} is {state}; {action} is not possible")]
    WrongState {
        /// The task.
        task: TaskId,
        /// Its state.
        state: String,
        /// What was tried.
        action: String,
    },
    /// A node record cannot be written under this identity.
    #[error("{0}")]
    NodeIdentity(String),
    /// The key is not a user key of the mesh.
    #[error("key {0} is not a user key of this mesh; `mesh-cli keys list` shows them")]
    UnknownKey(Fingerprint),
    /// The change would leave the mesh without an admin.
    #[error("key {0} is the last admin key; add another admin first")]
    LastAdmin(Fingerprint),
    /// No token has this id.
    #[error("token {0} does not exist; `mesh-cli token list` shows the tokens")]
    UnknownToken(String),
    /// The join token is unusable; the reason says why.
    #[error("join refused: {0}")]
    Token(String),
    /// The outputs do not match the declared buffers.
    #[error("task {task}: {why}")]
    BadOutputs {
        /// The task.
        task: TaskId,
        /// What is wrong.
        why: String,
    },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::NodeRegistered(n) => write!(f, "node {n} registered"),
            Outcome::Submitted {
                task,
                existing: false,
            } => write!(f, "task {task} submitted"),
            Outcome::Submitted {
                task,
                existing: true,
            } => write!(f, "task {task} already exists (same idempotency key)"),
            Outcome::Assigned {
                task,
                node,
                attempt,
            } => write!(
                f,
                "task {task} assigned to node {node} as attempt {attempt}"
            ),
            Outcome::Started(t) => write!(f, "task {t} running"),
            Outcome::Completed(t) => write!(f, "task {t} succeeded"),
            Outcome::Failed { task, retry: true } => {
                write!(f, "task {task} attempt failed, will retry")
            }
            Outcome::Failed { task, retry: false } => write!(f, "task {task} failed"),
            Outcome::Cancelled(t) => write!(f, "task {t} cancelled"),
            Outcome::TokenCreated(t) => write!(f, "token {t} created"),
            Outcome::TokenRevoked(t) => write!(f, "token {t} revoked"),
            Outcome::Joined(n) => write!(f, "joined as node {n}"),
            Outcome::KeyAdded(k) => write!(f, "key {k} added"),
            Outcome::KeyRemoved(k) => write!(f, "key {k} removed"),
            Outcome::Audited => write!(f, "audited"),
            Outcome::Restored { tasks } => write!(f, "restored {tasks} tasks"),
            Outcome::NodeDown(n) => write!(f, "node {n} down"),
            Outcome::NodeUp(n) => write!(f, "node {n} up"),
            Outcome::NodeRemoved(n) => write!(f, "node {n} removed"),
            Outcome::Checkpointed { task, shard } => {
                write!(f, "task {task} shard {shard} checkpointed")
            }
            Outcome::Released(t) => write!(f, "task {t} released"),
            Outcome::Drained {
                node,
                draining: true,
            } => write!(f, "node {node} draining"),
            Outcome::Drained {
                node,
                draining: false,
            } => write!(f, "node {node} takes work again"),
            Outcome::Rejected(r) => write!(f, "rejected: {r}"),
        }
    }
}

/// The payload of one Raft entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Proposer's wall clock when the entry was formed.
    pub now: Timestamp,
    /// Commands, applied in order. Shared: the log store keeps recent entries decoded
    /// and hands out clones to replication and apply, so a clone must not copy the
    /// commands (encoded exactly as a `Vec`).
    pub commands: Arc<[Command]>,
}

/// The result of applying one entry: one outcome per command.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Outcomes, in command order.
    pub outcomes: Vec<Outcome>,
}
