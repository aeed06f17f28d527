//! The invariants, checked after a run against what the harness recorded (the
//! history) and what the healed mesh reports (the final state). Pure: every call to the
//! cluster happens before, in `run.rs`.

use crate::history::{FaultRecord, Observation, Recorded, SubmitOutcome};
use crate::workload::is_terminal;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, BTreeSet};

/// Every invariant a run checks: name and claim.
pub const INVARIANTS: &[(&str, &str)] = &[
    ("acknowledged-terminal", "every acknowledged submit exists and, like every other task the clients may have created, reached a terminal state"),
    ("one-task-per-key", "one task per idempotency key, and every acknowledgement of a key named that task"),
    ("exactly-once", "no task has more than one recorded result (results_recorded <= 1)"),
    ("reference-results", "every recorded result, fetched with `mesh-cli result ID --output`, equals the CPU reference"),
    ("one-leader-per-term", "no two nodes claimed or were seen leading the same term (status --json of every node, polled)"),
    ("leader-after-heal", "after healing, one leader that every node agrees on"),
    ("convergence", "after healing, every node at the same applied index (stable) with the same state digest"),
    ("submit-after-heal", "after healing, new submits are acknowledged and succeed"),
    ("fault-effect", "every scheduled fault was injected and took effect (otherwise: fault had no effect)"),
    ("nodes-recover", "every node that was killed, paused, wiped or rolled back came back"),
    ("no-panic", "no node process panicked (its log has no `panicked at`)"),
];

/// One broken invariant.
#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    /// The invariant's name (see [`INVARIANTS`]).
    pub invariant: &'static str,
    /// What was seen.
    pub detail: String,
}

/// What the healed mesh reported, gathered by the run after the liveness phase.
#[derive(Debug, Serialize)]
pub struct FinalState {
    /// `tasks --json` from one node, after waiting for the tasks to end.
    pub tasks: Vec<serde_json::Value>,
    /// Output bytes fetched for succeeded tasks (or why the fetch failed), by task id.
    #[serde(skip)]
    pub outputs: BTreeMap<u64, Result<Vec<u8>, String>>,
    /// The agreed leader after healing, or why there was none.
    pub leader_after_heal: Result<String, String>,
    /// The probe submits after healing: what happened, or what failed.
    pub probes: Result<String, String>,
    /// Replica comparison: the common index and digest, or what differed.
    pub convergence: Result<String, Divergence>,
    /// Nodes the final heal could not bring back.
    pub heal_failures: Vec<String>,
    /// Panics found in the node logs ("node2: message").
    pub panics: Vec<String>,
}

/// How replicas failed to agree.
#[derive(Debug, Clone, Serialize)]
pub enum Divergence {
    /// Same applied index, different state: a safety violation.
    Diverged(String),
    /// Never all at one stable index within the limit.
    NotConverged(String),
}

impl Default for FinalState {
    fn default() -> Self {
        let unchecked = || Err("not checked".to_string());
        FinalState {
            tasks: Vec::new(),
            outputs: BTreeMap::new(),
            leader_after_heal: unchecked(),
            probes: unchecked(),
            convergence: Err(Divergence::NotConverged("not checked".into())),
            heal_failures: Vec::new(),
            panics: Vec::new(),
        }
    }
}

/// The reference outputs, computed once per distinct task (mandelbrot is costly).
pub struct References {
    by_key: BTreeMap<String, Vec<u8>>,
}

impl References {
    /// An empty cache.
    pub fn new() -> References {
        References {
            by_key: BTreeMap::new(),
        }
    }

    fn get(&mut self, plan: &crate::workload::TaskPlan) -> Vec<u8> {
        match plan.reference_key() {
            Some(k) => self
                .by_key
                .entry(k)
                .or_insert_with(|| plan.reference())
                .clone(),
            None => plan.reference(),
        }
    }
}

impl Default for References {
    fn default() -> Self {
        References::new()
    }
}

/// Check every invariant.
pub fn check(rec: &Recorded, fin: &FinalState, refs: &mut References) -> Vec<Violation> {
    let mut v = Vec::new();
    check_tasks(rec, fin, refs, &mut v);
    check_leaders(&rec.observations, &mut v);
    if let Err(e) = &fin.leader_after_heal {
        v.push(Violation {
            invariant: "leader-after-heal",
            detail: e.clone(),
        });
    }
    match &fin.convergence {
        Ok(_) => {}
        Err(Divergence::Diverged(d)) | Err(Divergence::NotConverged(d)) => v.push(Violation {
            invariant: "convergence",
            detail: d.clone(),
        }),
    }
    if let Err(e) = &fin.probes {
        v.push(Violation {
            invariant: "submit-after-heal",
            detail: e.clone(),
        });
    }
    check_faults(&rec.faults, &mut v);
    for f in &fin.heal_failures {
        v.push(Violation {
            invariant: "nodes-recover",
            detail: format!("after the run: {f}"),
        });
    }
    for p in &fin.panics {
        v.push(Violation {
            invariant: "no-panic",
            detail: p.clone(),
        });
    }
    v
}

fn check_tasks(rec: &Recorded, fin: &FinalState, refs: &mut References, v: &mut Vec<Violation>) {
    let mut by_key: BTreeMap<&str, Vec<&serde_json::Value>> = BTreeMap::new();
    let mut by_id: BTreeMap<u64, &serde_json::Value> = BTreeMap::new();
    for t in &fin.tasks {
        if let Some(id) = t["id"].as_u64() {
            by_id.insert(id, t);
        }
        if let Some(k) = t["idempotency_key"].as_str() {
            by_key.entry(k).or_default().push(t);
        }
    }
    for (key, tasks) in &by_key {
        if tasks.len() > 1 {
            let ids: Vec<String> = tasks.iter().map(|t| t["id"].to_string()).collect();
            v.push(Violation {
                invariant: "one-task-per-key",
                detail: format!("key {key} has {} tasks: {}", tasks.len(), ids.join(", ")),
            });
        }
    }
    for op in &rec.ops {
        let acked: BTreeSet<u64> = op.acked_tasks().into_iter().collect();
        if acked.len() > 1 {
            v.push(Violation {
                invariant: "one-task-per-key",
                detail: format!("key {} was acknowledged as tasks {acked:?}", op.key),
            });
        }
        let existing = by_key
            .get(op.key.as_str())
            .and_then(|t| t.first())
            .and_then(|t| t["id"].as_u64());
        for id in &acked {
            match by_id.get(id) {
                None => v.push(Violation {
                    invariant: "acknowledged-terminal",
                    detail: format!(
                        "task {id} (key {}) was acknowledged but does not exist",
                        op.key
                    ),
                }),
                Some(t) if t["idempotency_key"].as_str() != Some(op.key.as_str()) => {
                    v.push(Violation {
                        invariant: "one-task-per-key",
                        detail: format!(
                            "key {} was acknowledged as task {id}, which has key {}",
                            op.key, t["idempotency_key"]
                        ),
                    })
                }
                Some(_) if existing.is_some_and(|e| e != *id) => v.push(Violation {
                    invariant: "one-task-per-key",
                    detail: format!(
                        "key {} was acknowledged as task {id} but its task is {}",
                        op.key,
                        existing.unwrap_or(0)
                    ),
                }),
                Some(_) => {}
            }
        }
    }
    // Every task the clients may have created: acknowledged or not, it must satisfy
    // every check once it exists.
    for t in &fin.tasks {
        let id = t["id"].as_u64().unwrap_or(u64::MAX);
        let key = t["idempotency_key"].as_str().unwrap_or("");
        let state = t["state"].as_str().unwrap_or("?");
        if !is_terminal(state) {
            v.push(Violation {
                invariant: "acknowledged-terminal",
                detail: format!("task {id} (key {key}) is still {state} after healing and waiting"),
            });
        }
        let recorded = t["results_recorded"].as_u64().unwrap_or(0);
        if recorded > 1 {
            v.push(Violation {
                invariant: "exactly-once",
                detail: format!(
                    "task {id} (key {key}) has {recorded} recorded results (attempt {})",
                    t["attempt"]
                ),
            });
        }
        if state != "succeeded" {
            continue;
        }
        let Some(plan) = rec.plans.get(key) else {
            v.push(Violation {
                invariant: "reference-results",
                detail: format!("task {id} has key {key:?}, which no client submitted"),
            });
            continue;
        };
        let want = refs.get(plan);
        let want_sha = hex::encode(Sha256::digest(&want));
        let got_sha = t["outputs"]
            .get(0)
            .and_then(|o| o["sha256"].as_str())
            .unwrap_or("");
        if got_sha != want_sha {
            v.push(Violation {
                invariant: "reference-results",
                detail: format!(
                    "task {id} ({key}): recorded sha256 {got_sha}, CPU reference {want_sha}"
                ),
            });
        }
        match fin.outputs.get(&id) {
            Some(Ok(bytes)) if *bytes == want => {}
            Some(Ok(bytes)) => v.push(Violation {
                invariant: "reference-results",
                detail: format!("task {id} ({key}): fetched {} bytes that differ from the CPU reference ({} bytes)", bytes.len(), want.len()),
            }),
            Some(Err(e)) => v.push(Violation { invariant: "reference-results", detail: format!("task {id} ({key}): its output could not be fetched: {e}") }),
            None => v.push(Violation { invariant: "reference-results", detail: format!("task {id} ({key}): its output was not fetched") }),
        }
    }
}

/// At most one leader per term: from the nodes' own claims (role `leader`) and from
/// whom each node follows in its term.
fn check_leaders(obs: &[Observation], v: &mut Vec<Violation>) {
    let mut claims: BTreeMap<u64, BTreeMap<u64, u64>> = BTreeMap::new();
    for o in obs {
        if o.role == "leader" {
            claims
                .entry(o.term)
                .or_default()
                .entry(o.node)
                .or_insert(o.at_ms);
        }
        if let Some(l) = o.leader {
            claims
                .entry(o.term)
                .or_default()
                .entry(l)
                .or_insert(o.at_ms);
        }
    }
    for (term, leaders) in claims {
        if leaders.len() > 1 {
            let who: Vec<String> = leaders
                .iter()
                .map(|(id, at)| {
                    format!("node id {id} (first seen at {:.1} s)", *at as f64 / 1000.0)
                })
                .collect();
            v.push(Violation {
                invariant: "one-leader-per-term",
                detail: format!(
                    "term {term} had {} leaders: {}",
                    leaders.len(),
                    who.join(", ")
                ),
            });
        }
    }
}

fn check_faults(faults: &[FaultRecord], v: &mut Vec<Violation>) {
    for f in faults {
        if f.effect.is_none() {
            let why = f
                .skipped
                .as_deref()
                .or(f.error.as_deref())
                .unwrap_or("nothing showed it");
            v.push(Violation {
                invariant: "fault-effect",
                detail: format!(
                    "fault had no effect: #{} {} on {}: {why}",
                    f.step + 1,
                    f.name,
                    f.target
                ),
            });
        }
        if let Some(e) = &f.error {
            v.push(Violation {
                invariant: "nodes-recover",
                detail: format!("#{} {} on {}: {e}", f.step + 1, f.name, f.target),
            });
        }
    }
}

/// Counts of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    /// Logical submits (keys) by the workload clients.
    pub submitted: usize,
    /// Keys acknowledged.
    pub acknowledged: usize,
    /// Keys never acknowledged after at least one ambiguous try.
    pub ambiguous: usize,
    /// ... of which the task exists anyway (the submit did happen).
    pub ambiguous_existing: usize,
    /// Keys never acknowledged, every try a definite failure.
    pub failed_submits: usize,
    /// Submit tries (with retries).
    pub tries: usize,
    /// Tasks that ended succeeded.
    pub succeeded: usize,
    /// Tasks that ended failed.
    pub failed: usize,
    /// Tasks that ended cancelled.
    pub cancelled: usize,
    /// Tasks whose result was verified against the CPU reference.
    pub verified: usize,
}

/// Count what the run did.
pub fn counts(rec: &Recorded, fin: &FinalState) -> Counts {
    let keys: BTreeSet<&str> = fin
        .tasks
        .iter()
        .filter_map(|t| t["idempotency_key"].as_str())
        .collect();
    let workload = rec.ops.iter().filter(|o| o.client != "probe");
    let mut c = Counts::default();
    for op in workload {
        c.submitted += 1;
        c.tries += op.attempts.len();
        if op.acknowledged() {
            c.acknowledged += 1;
        } else if op.ambiguous() {
            c.ambiguous += 1;
            if keys.contains(op.key.as_str()) {
                c.ambiguous_existing += 1;
            }
        } else {
            c.failed_submits += 1;
        }
    }
    for t in &fin.tasks {
        match t["state"].as_str() {
            Some("succeeded") => c.succeeded += 1,
            Some("failed") => c.failed += 1,
            Some("cancelled") => c.cancelled += 1,
            _ => {}
        }
    }
    c.verified = fin.outputs.values().filter(|o| o.is_ok()).count();
    c
}

/// Submit-acknowledgement latencies in one phase of the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Acknowledged tries.
    pub count: usize,
    /// Median, ms.
    pub p50_ms: u64,
    /// 99th percentile, ms.
    pub p99_ms: u64,
    /// Slowest, ms.
    pub max_ms: u64,
}

/// Submit latencies by phase of the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latencies {
    /// Before the first fault.
    pub before: Latency,
    /// While a fault was held.
    pub during: Latency,
    /// Between two faults.
    pub between: Latency,
    /// After the final heal.
    pub after: Latency,
}

impl Latencies {
    /// (phase, latency) in time order.
    pub fn phases(&self) -> [(&'static str, &Latency); 4] {
        [
            ("before", &self.before),
            ("during", &self.during),
            ("between", &self.between),
            ("after", &self.after),
        ]
    }
}

/// Latencies before the first fault, while a fault was held, between faults, and
/// after the final heal (by when each try started).
pub fn latencies(rec: &Recorded, window_start_ms: u64, healed_ms: u64) -> Latencies {
    let first_fault = rec
        .faults
        .iter()
        .map(|f| f.start_ms)
        .min()
        .unwrap_or(healed_ms);
    let mut phases: BTreeMap<&'static str, Vec<u64>> = BTreeMap::new();
    for op in rec.ops.iter().filter(|o| o.client != "probe") {
        for a in &op.attempts {
            if !matches!(a.outcome, SubmitOutcome::Ack { .. }) || a.start_ms < window_start_ms {
                continue;
            }
            let phase = if a.start_ms >= healed_ms {
                "after"
            } else if a.start_ms < first_fault {
                "before"
            } else if rec
                .faults
                .iter()
                .any(|f| a.start_ms >= f.start_ms && a.start_ms <= f.end_ms)
            {
                "during"
            } else {
                "between"
            };
            phases.entry(phase).or_default().push(a.end_ms - a.start_ms);
        }
    }
    let mut of = |p: &str| {
        let mut ms = phases.remove(p).unwrap_or_default();
        ms.sort_unstable();
        let at = |q: f64| {
            ms.get(((ms.len() as f64 * q).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or(0)
        };
        Latency {
            count: ms.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: ms.last().copied().unwrap_or(0),
        }
    };
    Latencies {
        before: of("before"),
        during: of("during"),
        between: of("between"),
        after: of("after"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(node: u64, role: &str, term: u64, leader: Option<u64>) -> Observation {
        Observation {
            at_ms: 0,
            index: 0,
            node,
            role: role.into(),
            term,
            leader,
            applied: None,
        }
    }

    #[test]
    fn two_leaders_in_one_term_are_caught() {
        let mut v = Vec::new();
        check_leaders(
            &[
                obs(1, "leader", 2, Some(1)),
                obs(2, "follower", 2, Some(1)),
                obs(3, "leader", 3, Some(3)),
            ],
            &mut v,
        );
        assert!(v.is_empty(), "{v:?}");
        check_leaders(
            &[obs(1, "leader", 4, Some(1)), obs(2, "leader", 4, Some(2))],
            &mut v,
        );
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].invariant, "one-leader-per-term");
        // A follower naming another leader for a term counts too.
        let mut v = Vec::new();
        check_leaders(
            &[obs(1, "leader", 5, Some(1)), obs(2, "follower", 5, Some(3))],
            &mut v,
        );
        assert_eq!(v.len(), 1);
    }

    #[test]
    fn a_second_recorded_result_is_caught() {
        let rec = Recorded {
            ops: vec![],
            observations: vec![],
            faults: vec![],
            notes: vec![],
            plans: BTreeMap::new(),
        };
        let fin = FinalState {
            tasks: vec![
                serde_json::json!({"id": 1, "idempotency_key": "k", "state": "failed", "results_recorded": 2, "attempt": 3}),
            ],
            ..FinalState::default()
        };
        let mut v = Vec::new();
        check_tasks(&rec, &fin, &mut References::new(), &mut v);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].invariant, "exactly-once");
    }

    #[test]
    fn percentiles() {
        use crate::history::{Op, SubmitAttempt};
        let ops = (1..=100)
            .map(|i| Op {
                key: format!("k{i}"),
                kernel: "saxpy".into(),
                client: "light-0".into(),
                attempts: vec![SubmitAttempt {
                    start_ms: 10,
                    end_ms: 10 + i,
                    node_index: 0,
                    outcome: SubmitOutcome::Ack {
                        task: i,
                        existing: false,
                    },
                }],
            })
            .collect();
        let rec = Recorded {
            ops,
            observations: vec![],
            faults: vec![],
            notes: vec![],
            plans: BTreeMap::new(),
        };
        let l = &latencies(&rec, 0, 1000).before;
        assert_eq!((l.count, l.p50_ms, l.p99_ms, l.max_ms), (100, 50, 99, 100));
    }
}
