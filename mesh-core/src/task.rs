//! Tasks: what a user submits (`TaskSpec`) and what the mesh records (`Task`).
//!
//! Everything here is stored with bincode, so no serde attribute that needs a
//! self-describing format (`flatten`, internally tagged enums) may be used.

use crate::data::{Bytes, Digest};
use crate::identity::fingerprint::Fingerprint;
use crate::ids::{Attempt, NodeId, TaskId, Timestamp};
use crate::requirement::Requirement;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Default per-attempt timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default number of attempts before a task fails for good.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// The kernel a task runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KernelSpec {
    /// A built-in kernel by name (`saxpy`, `vector-add`, `matmul`, `reduce-sum`,
    /// `mandelbrot`) with its parameters.
    Builtin {
        /// Kernel name.
        name: String,
        /// Parameters, e.g. `a = "2"`.
        params: BTreeMap<String, String>,
    },
    /// A WGSL compute shader. Inputs bind in order at `@group(0) @binding(0..)`,
    /// outputs follow them.
    Wgsl {
        /// WGSL source.
        source: String,
        /// Entry point name.
        entry: String,
        /// Workgroup counts of the dispatch.
        workgroups: [u32; 3],
    },
}

impl KernelSpec {
    /// A short name for listings.
    pub fn label(&self) -> String {
        match self {
            KernelSpec::Builtin { name, .. } => name.clone(),
            KernelSpec::Wgsl { entry, .. } => format!("wgsl:{entry}"),
        }
    }
}

/// A named input buffer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamedBytes {
    /// Buffer name.
    pub name: String,
    /// Contents.
    pub data: Bytes,
}

/// A declared output buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputDecl {
    /// Buffer name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

/// A task as submitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// What to run.
    pub kernel: KernelSpec,
    /// Input buffers.
    #[serde(default)]
    pub inputs: Vec<NamedBytes>,
    /// Output buffers; only WGSL kernels declare them, built-ins derive their own.
    #[serde(default)]
    pub outputs: Vec<OutputDecl>,
    /// What the node must offer.
    #[serde(default)]
    pub requirements: Vec<Requirement>,
    /// Soft preferences, most important first: among nodes that meet the
    /// requirements, those meeting earlier preferences are chosen first.
    #[serde(default)]
    pub prefer: Vec<Requirement>,
    /// Split the work into this many shards; each finished shard is committed as a
    /// checkpoint, and a moved task resumes from the last one (built-ins only).
    #[serde(default = "one")]
    pub shards: u32,
    /// Higher runs first.
    #[serde(default)]
    pub priority: i32,
    /// Per-attempt timeout.
    #[serde(default = "default_timeout", with = "duration_ms")]
    pub timeout: Duration,
    /// Attempts before the task fails for good.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Resubmitting with the same key returns the existing task.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

impl TaskSpec {
    /// The built-in kernel `name` with `params` over `inputs` (name, bytes), every
    /// other field as a spec that leaves it out gets it: no outputs, requirements or
    /// preferences, one shard, priority 0, [`DEFAULT_TIMEOUT`],
    /// [`DEFAULT_MAX_ATTEMPTS`], no idempotency key. Set others with struct update
    /// syntax: `TaskSpec { priority: 5, ..TaskSpec::builtin(...) }`.
    pub fn builtin<'a>(
        name: &str,
        params: &[(&str, &str)],
        inputs: impl IntoIterator<Item = (&'a str, Bytes)>,
    ) -> TaskSpec {
        TaskSpec {
            kernel: KernelSpec::Builtin {
                name: name.into(),
                params: params
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
            inputs: inputs
                .into_iter()
                .map(|(name, data)| NamedBytes {
                    name: name.into(),
                    data,
                })
                .collect(),
            outputs: Vec::new(),
            requirements: Vec::new(),
            prefer: Vec::new(),
            shards: one(),
            priority: 0,
            timeout: DEFAULT_TIMEOUT,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            idempotency_key: None,
        }
    }
}

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}
fn default_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}
fn one() -> u32 {
    1
}

/// Serde for `Duration` as whole milliseconds (readable in JSON, compact in bincode).
pub mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    /// Serialize.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
    /// Deserialize.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// A reference to a stored buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataRef {
    /// Buffer name.
    pub name: String,
    /// SHA-256 of the contents.
    pub digest: Digest,
    /// Length in bytes.
    pub len: u64,
}

/// Where a task is in its lifecycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskState {
    /// Waiting for a node.
    Pending,
    /// Given to a node, which has not confirmed it started.
    Assigned {
        /// The node.
        node: NodeId,
        /// The fencing token of this assignment.
        attempt: Attempt,
    },
    /// Running on a node.
    Running {
        /// The node.
        node: NodeId,
        /// The fencing token of this assignment.
        attempt: Attempt,
    },
    /// Finished; the result is recorded.
    Succeeded,
    /// Failed for good.
    Failed,
    /// Cancelled by a user.
    Cancelled,
}

impl TaskState {
    /// True once the task can never change again.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled
        )
    }

    /// The short name.
    pub fn name(&self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Assigned { .. } => "assigned",
            TaskState::Running { .. } => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }

    /// The current assignment, if any.
    pub fn assignment(&self) -> Option<(NodeId, Attempt)> {
        match self {
            TaskState::Assigned { node, attempt } | TaskState::Running { node, attempt } => {
                Some((*node, *attempt))
            }
            _ => None,
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.assignment() {
            Some((node, attempt)) => write!(f, "{} (node {node}, attempt {attempt})", self.name()),
            None => f.write_str(self.name()),
        }
    }
}

/// The recorded result of a task: exactly one per task, from the current attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    /// The attempt that produced it.
    pub attempt: Attempt,
    /// The node that produced it.
    pub node: NodeId,
    /// Output buffers.
    pub outputs: Vec<DataRef>,
}

/// One finished shard of a sharded task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The attempt that produced it.
    pub attempt: Attempt,
    /// The node that produced it.
    pub node: NodeId,
    /// The shard's output.
    pub output: DataRef,
}

/// A failed attempt, kept for `mesh-cli task ID`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptError {
    /// Which attempt.
    pub attempt: Attempt,
    /// On which node.
    pub node: NodeId,
    /// What went wrong.
    pub error: String,
}

/// A task as the replicated state records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Id.
    pub id: TaskId,
    /// What to run.
    pub kernel: KernelSpec,
    /// Inputs, by digest; the bytes are in the state's blob table.
    pub inputs: Vec<DataRef>,
    /// Outputs (resolved for built-ins).
    pub outputs: Vec<OutputDecl>,
    /// Requirements.
    pub requirements: Vec<Requirement>,
    /// Preferences, most important first.
    pub prefer: Vec<Requirement>,
    /// Number of shards (1: not sharded).
    pub shards: u32,
    /// Committed shard outputs, by shard index.
    pub checkpoints: BTreeMap<u32, Checkpoint>,
    /// A retried task is not placed before this time (backoff).
    pub not_before: Option<Timestamp>,
    /// Priority, higher first.
    pub priority: i32,
    /// Per-attempt timeout.
    #[serde(with = "duration_ms")]
    pub timeout: Duration,
    /// Attempt budget.
    pub max_attempts: u32,
    /// Idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// Who submitted it.
    pub submitter: Fingerprint,
    /// Lifecycle state.
    pub state: TaskState,
    /// The latest attempt issued (0 before the first assignment).
    pub attempt: Attempt,
    /// When it was submitted.
    pub submitted_at: Timestamp,
    /// When the current or last attempt started running.
    pub started_at: Option<Timestamp>,
    /// When it reached a terminal state.
    pub finished_at: Option<Timestamp>,
    /// The result, once succeeded.
    pub result: Option<TaskResult>,
    /// How many times a result was recorded: the exactly-once invariant says at most
    /// one (the chaos harness checks it).
    pub results_recorded: u32,
    /// Failed attempts.
    pub errors: Vec<AttemptError>,
}

impl Task {
    /// The attempt budget: whether the task may run again after `attempt` ended in a
    /// failure (a failed run, or its node lost).
    pub fn may_retry_after(&self, attempt: Attempt) -> bool {
        attempt.0 < self.max_attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_builtin_spec_has_the_defaults_of_a_spec_that_leaves_the_fields_out() {
        let made = TaskSpec::builtin("saxpy", &[("a", "2")], [("x", Bytes::from(vec![1, 2]))]);
        let read: TaskSpec = serde_json::from_str(
            r#"{"kernel": {"builtin": {"name": "saxpy", "params": {"a": "2"}}},
                "inputs": [{"name": "x", "data": "AQI="}]}"#,
        )
        .unwrap();
        assert_eq!(made, read);
    }
}
