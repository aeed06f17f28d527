//! What happened during a run, as the harness saw it: every submit attempt and its
//! outcome, every status observation of every node, every fault with its proof of
//! effect. Shared by the client, observer and nemesis threads; read by the checker and
//! the report.

use crate::schedule::Fault;
use crate::workload::TaskPlan;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// How one submit attempt ended, as a client can know it.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum SubmitOutcome {
    /// The node answered with a task id: the submit is acknowledged (committed).
    Ack {
        /// The task.
        task: u64,
        /// The key was already known (a retry found the earlier task).
        existing: bool,
    },
    /// Timed out or failed after the request may have been sent: it may or may not
    /// have happened (Jepsen's "info").
    Ambiguous {
        /// The client's error.
        why: String,
    },
    /// Failed before anything was sent or written (connection refused, refused by
    /// the node's checks before proposing): it did not happen.
    Failed {
        /// The client's error.
        why: String,
    },
}

/// One `mesh-cli submit` run.
#[derive(Debug, Clone, Serialize)]
pub struct SubmitAttempt {
    /// Start, ms from the start of the run's clock.
    pub start_ms: u64,
    /// End, ms.
    pub end_ms: u64,
    /// Index of the node it was sent to.
    pub node_index: usize,
    /// How it ended.
    pub outcome: SubmitOutcome,
}

/// One logical submit: a task with its idempotency key, tried until acknowledged.
#[derive(Debug, Clone, Serialize)]
pub struct Op {
    /// Idempotency key.
    pub key: String,
    /// Kernel name.
    pub kernel: String,
    /// Which client submitted it (`probe` ops are the liveness phase's).
    pub client: String,
    /// Each try, in order.
    pub attempts: Vec<SubmitAttempt>,
}

impl Op {
    /// The task ids the node acknowledged for this key (all equal if idempotency holds).
    pub fn acked_tasks(&self) -> Vec<u64> {
        self.attempts
            .iter()
            .filter_map(|a| match a.outcome {
                SubmitOutcome::Ack { task, .. } => Some(task),
                _ => None,
            })
            .collect()
    }

    /// Whether any try was acknowledged.
    pub fn acknowledged(&self) -> bool {
        !self.acked_tasks().is_empty()
    }

    /// Whether some try may have happened without an acknowledgement.
    pub fn ambiguous(&self) -> bool {
        self.attempts
            .iter()
            .any(|a| matches!(a.outcome, SubmitOutcome::Ambiguous { .. }))
    }
}

/// One answer to `status --json` from one node.
#[derive(Debug, Clone, Serialize)]
pub struct Observation {
    /// When the answer came, ms.
    pub at_ms: u64,
    /// Index of the node asked.
    pub index: usize,
    /// The node id it reported.
    pub node: u64,
    /// Its Raft role.
    pub role: String,
    /// Its current term.
    pub term: u64,
    /// The leader it knows of, if any.
    pub leader: Option<u64>,
    /// Its applied log index.
    pub applied: Option<u64>,
}

/// One injected fault and what it did.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    /// Position in the schedule.
    pub step: usize,
    /// What was scheduled.
    pub fault: Fault,
    /// Short name.
    pub name: String,
    /// When it was scheduled, ms from the start of the fault window.
    pub scheduled_ms: u64,
    /// The concrete nodes it acted on ("node 2 (id 2, leader)").
    pub target: String,
    /// Injected at, ms.
    pub start_ms: u64,
    /// Healed at, ms.
    pub end_ms: u64,
    /// The evidence that it took effect; `None`: it changed nothing.
    pub effect: Option<String>,
    /// Why it was not injected at all (no leader to target, no task mid-run...).
    pub skipped: Option<String>,
    /// Something went wrong while injecting or healing it (a node that did not
    /// come back).
    pub error: Option<String>,
}

/// A line worth showing in the timeline that is not a fault (phases of the run).
#[derive(Debug, Clone, Serialize)]
pub struct Note {
    /// When, ms.
    pub at_ms: u64,
    /// What.
    pub text: String,
}

#[derive(Default)]
struct Inner {
    ops: Vec<Op>,
    observations: Vec<Observation>,
    faults: Vec<FaultRecord>,
    notes: Vec<Note>,
    plans: BTreeMap<String, Arc<TaskPlan>>,
}

/// The shared record of a run.
pub struct History {
    t0: Instant,
    inner: Mutex<Inner>,
}

/// Everything recorded, copied out at the end of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Recorded {
    /// Submits.
    pub ops: Vec<Op>,
    /// Status observations.
    pub observations: Vec<Observation>,
    /// Faults.
    pub faults: Vec<FaultRecord>,
    /// Phase notes.
    pub notes: Vec<Note>,
    /// The tasks the clients meant to submit, by idempotency key.
    #[serde(skip)]
    pub plans: BTreeMap<String, Arc<TaskPlan>>,
}

impl History {
    /// An empty history whose clock starts now.
    pub fn new() -> History {
        History {
            t0: Instant::now(),
            inner: Mutex::default(),
        }
    }

    /// Milliseconds since the history started.
    pub fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panicking client thread must not take the record with it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start a logical submit; returns its index for [`History::attempt`].
    pub fn begin_op(&self, plan: Arc<TaskPlan>, client: &str) -> usize {
        let mut inner = self.lock();
        inner.ops.push(Op {
            key: plan.key.clone(),
            kernel: plan.kernel.to_string(),
            client: client.into(),
            attempts: Vec::new(),
        });
        inner.plans.insert(plan.key.clone(), plan);
        inner.ops.len() - 1
    }

    /// Record one try of op `op`.
    pub fn attempt(&self, op: usize, attempt: SubmitAttempt) {
        self.lock().ops[op].attempts.push(attempt);
    }

    /// Record a status observation.
    pub fn observe(&self, o: Observation) {
        self.lock().observations.push(o);
    }

    /// Record a fault.
    pub fn fault(&self, f: FaultRecord) {
        self.lock().faults.push(f);
    }

    /// Record a phase note (also logged).
    pub fn note(&self, text: impl Into<String>) {
        let text = text.into();
        crate::phase(&text);
        let at_ms = self.now_ms();
        self.lock().notes.push(Note { at_ms, text });
    }

    /// The latest observation of node `index`.
    pub fn last_observation(&self, index: usize) -> Option<Observation> {
        self.lock()
            .observations
            .iter()
            .rev()
            .find(|o| o.index == index)
            .cloned()
    }

    /// A copy of everything recorded so far.
    pub fn snapshot(&self) -> Recorded {
        let inner = self.lock();
        Recorded {
            ops: inner.ops.clone(),
            observations: inner.observations.clone(),
            faults: inner.faults.clone(),
            notes: inner.notes.clone(),
            plans: inner.plans.clone(),
        }
    }
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}
