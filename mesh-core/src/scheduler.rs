//! Placement: a pure function from (state, live nodes) to assignments.
//!
//! Pending tasks are taken highest priority first, first come first within a
//! priority; a retried task waits out its backoff. Each goes to a live, undrained
//! node that meets every requirement, ranked by: the task's preferences (earlier ones
//! weigh more), a node where the task has not failed before, discrete over integrated
//! over CPU adapters, the most free slots (so equal work spreads across equal nodes,
//! a weighted round robin by free capacity), then the lower node id.

use crate::capability::{DeviceType, NodeCapabilities};
use crate::ids::{NodeId, TaskId, Timestamp};
use crate::requirement::{first_unmet, Requirement};
use crate::state::MeshState;
use crate::task::{Task, TaskState};
use std::collections::{BTreeMap, BTreeSet};

/// One placement decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    /// The task.
    pub task: TaskId,
    /// Where it goes.
    pub node: NodeId,
}

/// Assign as many pending tasks as free slots allow.
pub fn schedule(state: &MeshState, live: &BTreeSet<NodeId>, now: Timestamp) -> Vec<Assignment> {
    let mut free: BTreeMap<NodeId, i64> = state
        .nodes
        .values()
        .filter(|n| live.contains(&n.id) && !n.drained && n.capabilities.primary().is_some())
        .map(|n| (n.id, n.capabilities.slots.max(1) as i64))
        .collect();
    // Nothing to place on (every node drained, down or busy): skip the scan and sort
    // of the pending tasks, which a queue of many thousands makes the leader's
    // costliest step on every commit.
    if free.is_empty() {
        return Vec::new();
    }
    for t in state.active_tasks() {
        if let Some((node, _)) = t.state.assignment() {
            if let Some(f) = free.get_mut(&node) {
                *f -= 1;
            }
        }
    }
    if free.values().all(|f| *f <= 0) {
        return Vec::new();
    }
    let mut pending: Vec<&Task> = state
        .pending_tasks()
        .filter(|t| t.not_before.is_none_or(|nb| nb <= now))
        .collect();
    pending.sort_by_key(|t| (std::cmp::Reverse(t.priority), t.id));
    let mut out = Vec::new();
    for task in pending {
        let failed_on: BTreeSet<NodeId> = task.errors.iter().map(|e| e.node).collect();
        let best = free
            .iter()
            .filter(|(_, f)| **f > 0)
            .filter(|(id, _)| {
                first_unmet(&task.requirements, &state.nodes[id].capabilities).is_none()
            })
            .max_by_key(|(id, f)| {
                let caps = &state.nodes[id].capabilities;
                (
                    preference_score(&task.prefer, caps),
                    !failed_on.contains(id),
                    device_rank(caps),
                    **f,
                    std::cmp::Reverse(**id),
                )
            })
            .map(|(id, _)| *id);
        if let Some(node) = best {
            *free.get_mut(&node).expect("present") -= 1;
            out.push(Assignment {
                task: task.id,
                node,
            });
        }
    }
    out
}

/// Preferences met, earlier ones weighing more: one bit per preference, the first
/// preference the most significant.
fn preference_score(prefer: &[Requirement], caps: &NodeCapabilities) -> u64 {
    prefer
        .iter()
        .take(63)
        .fold(0u64, |acc, p| (acc << 1) | u64::from(p.satisfied_by(caps)))
}

fn device_rank(caps: &NodeCapabilities) -> u8 {
    match caps.primary().map(|a| a.device_type) {
        Some(DeviceType::Discrete) => 4,
        Some(DeviceType::Integrated) => 3,
        Some(DeviceType::Virtual) => 2,
        Some(DeviceType::Cpu) => 1,
        _ => 0,
    }
}

/// Why no registered node could ever run a task with these requirements, or `None`
/// when at least one could.
pub fn never_runnable(state: &MeshState, reqs: &[Requirement]) -> Option<String> {
    if state.nodes.values().all(|n| n.removed) {
        return Some("no node has registered yet".into());
    }
    let mut unmet = Vec::new();
    for n in state.nodes.values().filter(|n| !n.removed) {
        if n.capabilities.primary().is_none() {
            unmet.push(format!("node {} has no GPU adapter", n.id));
            continue;
        }
        match first_unmet(reqs, &n.capabilities) {
            None => return None,
            Some(r) => unmet.push(format!("node {} lacks {r}", n.id)),
        }
    }
    Some(format!(
        "no node in the mesh can run it: {}",
        unmet.join("; ")
    ))
}

/// Why a pending task is still waiting, for `mesh-cli task ID`.
pub fn why_waiting(
    state: &MeshState,
    task: &Task,
    live: &BTreeSet<NodeId>,
    now: Timestamp,
) -> Option<String> {
    if task.state != TaskState::Pending {
        return None;
    }
    if let Some(nb) = task.not_before.filter(|nb| *nb > now) {
        return Some(format!(
            "retrying after a failed attempt, in {} ms (backoff)",
            nb.0 - now.0
        ));
    }
    let matching: Vec<NodeId> = state
        .nodes
        .values()
        .filter(|n| {
            !n.removed
                && n.capabilities.primary().is_some()
                && first_unmet(&task.requirements, &n.capabilities).is_none()
        })
        .map(|n| n.id)
        .collect();
    if matching.is_empty() {
        return never_runnable(state, &task.requirements);
    }
    if !matching.iter().any(|n| live.contains(n)) {
        return Some(format!(
            "every node that matches ({}) is down",
            join(&matching)
        ));
    }
    // Say for each matching node why it takes nothing now.
    let reasons: Vec<String> = matching
        .iter()
        .map(|n| {
            let why = if !live.contains(n) {
                "down"
            } else if state.nodes[n].drained {
                "drained"
            } else {
                "has all its slots busy"
            };
            format!("node {n} {why}")
        })
        .collect();
    Some(format!(
        "no matching node can take it now: {}",
        reasons.join(", ")
    ))
}

fn join(ids: &[NodeId]) -> String {
    ids.iter()
        .map(|n| format!("node {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
