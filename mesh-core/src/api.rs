//! The operator API carried over SSH: command names and the JSON documents the node
//! answers with. `mesh-node` renders them, `mesh-cli` reads them; see
//! `docs/ssh-protocol.md` for the exchange itself.

use crate::capability::NodeCapabilities;
use crate::ids::{NodeId, TaskId};
use crate::scheduler::why_waiting;
use crate::state::{MeshState, NodeRecord};
use crate::task::Task;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Exit status of a command that succeeded.
pub const EXIT_OK: u32 = 0;
/// Exit status of a command that failed (the message says why).
pub const EXIT_ERROR: u32 = 1;
/// Exit status of a malformed command line.
pub const EXIT_USAGE: u32 = 2;
/// Exit status of `wait` when the task ended failed or cancelled.
pub const EXIT_TASK_FAILED: u32 = 3;

/// The answer to `submit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitReply {
    /// The task id.
    pub task: TaskId,
    /// True when an idempotency key matched an earlier submission.
    pub existing: bool,
}

/// Most tasks in one `submit-batch` call.
pub const MAX_BATCH_TASKS: usize = 10_000;

/// The answer to one task of `submit-batch`: in the order the tasks were sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BatchItemReply {
    /// Committed (or matched an earlier submission by idempotency key).
    Submitted(SubmitReply),
    /// Refused; nothing was recorded for this task.
    Refused {
        /// Why.
        error: String,
    },
}

/// A stored buffer in a task view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferView {
    /// Buffer name.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256, lowercase hex (absent for outputs not produced yet).
    pub sha256: Option<String>,
}

/// A failed attempt in a task view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptErrorView {
    /// Attempt number.
    pub attempt: u32,
    /// Node.
    pub node: NodeId,
    /// Error message.
    pub error: String,
}

/// The answer to `task ID`, `wait ID` and one row of `tasks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskView {
    /// Id.
    pub id: TaskId,
    /// Kernel label (`saxpy`, `wgsl:main`).
    pub kernel: String,
    /// Built-in kernel parameters (empty for WGSL kernels).
    pub params: BTreeMap<String, String>,
    /// `pending`, `assigned`, `running`, `succeeded`, `failed` or `cancelled`.
    pub state: String,
    /// Node holding or last holding the task.
    pub node: Option<NodeId>,
    /// Latest attempt number (0 = never assigned).
    pub attempt: u32,
    /// Attempt budget.
    pub max_attempts: u32,
    /// Priority.
    pub priority: i32,
    /// Idempotency key.
    pub idempotency_key: Option<String>,
    /// Submitter's key fingerprint.
    pub submitter: String,
    /// Submit time, ms since the epoch.
    pub submitted_at_ms: u64,
    /// Start of the current or last attempt.
    pub started_at_ms: Option<u64>,
    /// End time.
    pub finished_at_ms: Option<u64>,
    /// Inputs.
    pub inputs: Vec<BufferView>,
    /// Outputs (with digests once succeeded).
    pub outputs: Vec<BufferView>,
    /// Failed attempts.
    pub errors: Vec<AttemptErrorView>,
    /// Why a pending task waits.
    pub waiting: Option<String>,
    /// Number of shards (1: not sharded).
    pub shards: u32,
    /// Shards committed as checkpoints.
    pub shards_done: u32,
    /// Results recorded for this task (at most 1 unless exactly-once is broken).
    pub results_recorded: u32,
}

impl TaskView {
    /// The view of a task.
    pub fn of(
        state: &MeshState,
        t: &Task,
        live: &BTreeSet<NodeId>,
        now: crate::ids::Timestamp,
    ) -> TaskView {
        let outputs = match &t.result {
            Some(r) => r
                .outputs
                .iter()
                .map(|o| BufferView {
                    name: o.name.clone(),
                    bytes: o.len,
                    sha256: Some(o.digest.to_hex()),
                })
                .collect(),
            None => t
                .outputs
                .iter()
                .map(|o| BufferView {
                    name: o.name.clone(),
                    bytes: o.size,
                    sha256: None,
                })
                .collect(),
        };
        TaskView {
            id: t.id,
            kernel: t.kernel.label(),
            params: match &t.kernel {
                crate::task::KernelSpec::Builtin { params, .. } => params.clone(),
                crate::task::KernelSpec::Wgsl { .. } => BTreeMap::new(),
            },
            state: t.state.name().into(),
            node: t
                .state
                .assignment()
                .map(|(n, _)| n)
                .or(t.result.as_ref().map(|r| r.node))
                .or(t.errors.last().map(|e| e.node)),
            attempt: t.attempt.0,
            max_attempts: t.max_attempts,
            priority: t.priority,
            idempotency_key: t.idempotency_key.clone(),
            submitter: t.submitter.to_string(),
            submitted_at_ms: t.submitted_at.0,
            started_at_ms: t.started_at.map(|x| x.0),
            finished_at_ms: t.finished_at.map(|x| x.0),
            inputs: t
                .inputs
                .iter()
                .map(|i| BufferView {
                    name: i.name.clone(),
                    bytes: i.len,
                    sha256: Some(i.digest.to_hex()),
                })
                .collect(),
            outputs,
            errors: t
                .errors
                .iter()
                .map(|e| AttemptErrorView {
                    attempt: e.attempt.0,
                    node: e.node,
                    error: e.error.clone(),
                })
                .collect(),
            waiting: why_waiting(state, t, live, now),
            shards: t.shards,
            shards_done: t.checkpoints.len() as u32,
            results_recorded: t.results_recorded,
        }
    }

    /// True once the task can never change again.
    pub fn is_terminal(&self) -> bool {
        matches!(self.state.as_str(), "succeeded" | "failed" | "cancelled")
    }
}

/// One node in `nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// Id.
    pub id: NodeId,
    /// Host key fingerprint.
    pub fingerprint: String,
    /// Address.
    pub addr: String,
    /// `leader`, `follower`, `learner` or `unknown`.
    pub role: String,
    /// `up`, `down` or `removed`.
    pub health: String,
    /// Milliseconds since the leader last heard from it (known on the leader only).
    pub last_contact_ms: Option<u64>,
    /// Drained: takes no new work.
    pub drained: bool,
    /// Tasks assigned or running there.
    pub running: usize,
    /// Adapters, labels, slots.
    pub capabilities: NodeCapabilities,
}

impl NodeView {
    /// The view of a registered node.
    pub fn of(
        state: &MeshState,
        n: &NodeRecord,
        role: &str,
        last_contact_ms: Option<u64>,
    ) -> NodeView {
        NodeView {
            id: n.id,
            fingerprint: n.fingerprint.to_string(),
            addr: n.addr.clone(),
            role: role.into(),
            health: if n.removed {
                "removed"
            } else if n.down {
                "down"
            } else {
                "up"
            }
            .into(),
            last_contact_ms,
            drained: n.drained,
            running: state.tasks_on(n.id).count(),
            capabilities: n.capabilities.clone(),
        }
    }
}

/// The answer to `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    /// This node's id.
    pub node: NodeId,
    /// This node's host key fingerprint.
    pub fingerprint: String,
    /// Mesh version.
    pub version: String,
    /// Raft role of this node.
    pub role: String,
    /// The leader, if known.
    pub leader: Option<NodeId>,
    /// Current term.
    pub term: u64,
    /// Last log index.
    pub last_log_index: Option<u64>,
    /// Last applied index.
    pub applied_index: Option<u64>,
    /// Voters.
    pub voters: Vec<NodeId>,
    /// Registered nodes.
    pub nodes: usize,
    /// Tasks by state.
    pub tasks: BTreeMap<String, usize>,
    /// This node's primary adapter, if any.
    pub adapter: Option<String>,
}

/// The document printed with `--json` when a command fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorView {
    /// One-line message naming the thing, the reason and the fix.
    pub error: String,
}

/// One join token in `token list` (the secret is never shown again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenView {
    /// Public id.
    pub id: String,
    /// Creation time, ms since the epoch.
    pub created_at_ms: u64,
    /// Expiry, ms since the epoch.
    pub expires_at_ms: u64,
    /// Joins left.
    pub uses_left: u32,
    /// Revoked by an admin.
    pub revoked: bool,
    /// Creator's key fingerprint.
    pub created_by: String,
}

/// The answer to `token create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreated {
    /// The token string to hand to the joining machine.
    pub token: String,
    /// Its public id.
    pub id: String,
    /// Expiry, ms since the epoch.
    pub expires_at_ms: u64,
}

/// One user key in `keys list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyView {
    /// Fingerprint.
    pub fingerprint: String,
    /// Role.
    pub role: String,
    /// Key comment.
    pub comment: String,
    /// Public key line.
    pub key: String,
    /// Who added it.
    pub added_by: String,
    /// When, ms since the epoch.
    pub added_at_ms: u64,
}

/// One entry in `audit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditView {
    /// Sequence number.
    pub seq: u64,
    /// When, ms since the epoch.
    pub at_ms: u64,
    /// Actor's key fingerprint.
    pub actor: String,
    /// Action.
    pub action: String,
    /// Target.
    pub target: Option<String>,
    /// `ok` or `refused: ...`.
    pub outcome: String,
}
