//! The report of a run: `report.json` (everything, for tools), `report.md` (for
//! people) and `timeline.svg` (faults, leadership and submit latencies over time), in
//! the run's report directory.

use crate::checker::{self, Counts, Divergence, FinalState, Latencies, Violation, INVARIANTS};
use crate::history::{FaultRecord, Note, Observation, Op, Recorded};
use crate::proxy::{LinkStats, Links};
use crate::run::RunOptions;
use crate::schedule::{self, Step};
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

/// One invariant's result.
#[derive(Debug, Clone, Serialize)]
pub struct InvariantResult {
    /// Name.
    pub name: &'static str,
    /// What it claims.
    pub claim: &'static str,
    /// Whether it held.
    pub held: bool,
    /// How often it was violated.
    pub violations: usize,
}

/// A change of leader, as the nodes reported it (only terms newer than any seen).
#[derive(Debug, Clone, Serialize)]
pub struct LeaderChange {
    /// When first seen, ms.
    pub at_ms: u64,
    /// Term.
    pub term: u64,
    /// The node id that claimed to lead it.
    pub leader: u64,
}

/// Everything `report.json` holds.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// What it injects.
    pub about: String,
    /// Seed.
    pub seed: u64,
    /// `pass` (every invariant held) or `fail`.
    pub outcome: &'static str,
    /// The command that replays the run.
    pub replay: String,
    /// Nodes.
    pub nodes: usize,
    /// Voters.
    pub voters: usize,
    /// `mesh-node` used (`workspace` for the default).
    pub node_bin: String,
    /// The fault window, ms.
    pub duration_ms: u64,
    /// Wall time of the whole run, ms.
    pub wall_ms: u64,
    /// Cluster start, ms.
    pub setup_ms: u64,
    /// When the fault window started, ms on the run's clock.
    pub window_start_ms: u64,
    /// When every fault was healed, ms.
    pub healed_ms: u64,
    /// Each invariant.
    pub invariants: Vec<InvariantResult>,
    /// Each violation.
    pub violations: Vec<Violation>,
    /// The seeded schedule.
    pub schedule: Vec<Step>,
    /// The faults as injected.
    pub faults: Vec<FaultRecord>,
    /// Leader changes.
    pub leadership: Vec<LeaderChange>,
    /// Counts.
    pub counts: Counts,
    /// Submit acknowledgement latency by phase.
    pub latency: Latencies,
    /// Proxy totals over the run.
    pub links: LinkStats,
    /// After healing: leader.
    pub leader_after_heal: Result<String, String>,
    /// After healing: probes.
    pub probes: Result<String, String>,
    /// After healing: replica comparison.
    pub convergence: Result<String, Divergence>,
    /// Phase notes.
    pub notes: Vec<Note>,
    /// Every submit with each of its tries.
    pub ops: Vec<Op>,
    /// Every status observation (the raw material of the leadership check).
    pub observations: Vec<Observation>,
}

impl Report {
    /// Put the report of a run together.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        opts: &RunOptions,
        rec: &Recorded,
        fin: &FinalState,
        violations: &[Violation],
        links: &Links,
        setup_ms: u64,
        window_start_ms: u64,
        healed_ms: u64,
        wall: Duration,
    ) -> Report {
        let (nodes, voters) = opts.shape();
        let invariants = INVARIANTS
            .iter()
            .map(|(name, claim)| {
                let n = violations.iter().filter(|v| v.invariant == *name).count();
                InvariantResult {
                    name,
                    claim,
                    held: n == 0,
                    violations: n,
                }
            })
            .collect();
        Report {
            scenario: opts.scenario.name.into(),
            about: opts.scenario.about.into(),
            seed: opts.seed,
            outcome: if violations.is_empty() {
                "pass"
            } else {
                "fail"
            },
            replay: opts.replay(),
            nodes,
            voters,
            node_bin: opts
                .node_bin
                .as_ref()
                .map_or("workspace".into(), |b| b.display().to_string()),
            duration_ms: opts.duration.as_millis() as u64,
            wall_ms: wall.as_millis() as u64,
            setup_ms,
            window_start_ms,
            healed_ms,
            invariants,
            violations: violations.to_vec(),
            schedule: schedule::generate(opts.scenario, opts.seed, opts.window()),
            faults: rec.faults.clone(),
            leadership: leadership(&rec.observations),
            counts: checker::counts(rec, fin),
            latency: checker::latencies(rec, window_start_ms, healed_ms),
            links: links.total(),
            leader_after_heal: fin.leader_after_heal.clone(),
            probes: fin.probes.clone(),
            convergence: fin.convergence.clone(),
            notes: rec.notes.clone(),
            ops: rec.ops.clone(),
            observations: rec.observations.clone(),
        }
    }
}

/// Leader changes: each term newer than every term seen before, with the node that
/// claimed it (stale claims of older terms are left out: they are in `observations`).
pub fn leadership(obs: &[Observation]) -> Vec<LeaderChange> {
    let mut sorted: Vec<&Observation> = obs.iter().filter(|o| o.role == "leader").collect();
    sorted.sort_by_key(|o| o.at_ms);
    let mut out: Vec<LeaderChange> = Vec::new();
    for o in sorted {
        if out.last().is_none_or(|l| o.term > l.term) {
            out.push(LeaderChange {
                at_ms: o.at_ms,
                term: o.term,
                leader: o.node,
            });
        }
    }
    out
}

/// Text fit for a Markdown table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

fn secs(ms: u64) -> String {
    format!("{:.1}", ms as f64 / 1000.0)
}

fn result_line<E: std::fmt::Debug>(r: &Result<String, E>) -> String {
    match r {
        Ok(s) => format!("ok: {s}"),
        Err(e) => format!("**FAILED**: {e:?}"),
    }
}

/// The Markdown report.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let verdict = if r.outcome == "pass" {
        "PASS: every invariant held"
    } else {
        "FAIL: an invariant was violated"
    };
    let _ = writeln!(
        s,
        "# mesh-chaos `{}`, seed {}: {verdict}\n",
        r.scenario, r.seed
    );
    let _ = writeln!(s, "{}\n", r.about);
    let _ = writeln!(
        s,
        "- seed **{}**; {} nodes ({} voters); fault window {} s; wall time {} s (cluster start {} s)\n- node binary: {}\n- replay: `{}`\n",
        r.seed,
        r.nodes,
        r.voters,
        secs(r.duration_ms),
        secs(r.wall_ms),
        secs(r.setup_ms),
        r.node_bin,
        r.replay
    );
    let _ = writeln!(
        s,
        "## Invariants\n\n| invariant | result | claim |\n|---|---|---|"
    );
    for i in &r.invariants {
        let res = if i.held {
            "held".to_string()
        } else {
            format!("**VIOLATED** ({})", i.violations)
        };
        let _ = writeln!(s, "| `{}` | {res} | {} |", i.name, i.claim);
    }
    if !r.violations.is_empty() {
        let _ = writeln!(s, "\n### Violations\n");
        let mut shown: BTreeMap<&str, usize> = BTreeMap::new();
        for v in &r.violations {
            let n = shown.entry(v.invariant).or_default();
            *n += 1;
            if *n <= 20 {
                let _ = writeln!(s, "- `{}`: {}", v.invariant, cell(&v.detail));
            } else if *n == 21 {
                let _ = writeln!(s, "- `{}`: ... (more in report.json)", v.invariant);
            }
        }
    }
    let _ = writeln!(s, "\n## Faults\n\nTimes are seconds from the start of the fault window.\n\n| # | at | held | fault | target | effect |\n|---|---|---|---|---|---|");
    for f in &r.faults {
        let effect = match (&f.effect, &f.skipped, &f.error) {
            (Some(e), _, None) => e.clone(),
            (Some(e), _, Some(err)) => format!("{e}; **error**: {err}"),
            (None, Some(why), _) => format!("**not injected**: {why}"),
            (None, None, Some(err)) => format!("**no effect**; error: {err}"),
            (None, None, None) => "**no effect**".into(),
        };
        let at = f.start_ms.saturating_sub(r.window_start_ms);
        let _ = writeln!(
            s,
            "| {} | {} | {} | `{}` | {} | {} |",
            f.step + 1,
            secs(at),
            secs(f.end_ms - f.start_ms),
            f.name,
            cell(&f.target),
            cell(&effect)
        );
    }
    let _ = writeln!(s, "\n## Leadership\n\nEach new term as the nodes' own `status --json` reported it.\n\n| at | term | leader |\n|---|---|---|");
    for l in &r.leadership {
        let _ = writeln!(
            s,
            "| {} | {} | node id {} |",
            secs(l.at_ms.saturating_sub(r.window_start_ms)),
            l.term,
            l.leader
        );
    }
    let c = &r.counts;
    let _ = writeln!(
        s,
        "\n## Workload\n\n| submitted | acknowledged | ambiguous (of which exist) | failed submits | tries | succeeded | failed | cancelled | results verified |\n|---|---|---|---|---|---|---|---|---|\n| {} | {} | {} ({}) | {} | {} | {} | {} | {} | {} |",
        c.submitted, c.acknowledged, c.ambiguous, c.ambiguous_existing, c.failed_submits, c.tries, c.succeeded, c.failed, c.cancelled, c.verified
    );
    let _ = writeln!(s, "\nSucceeded/failed/cancelled count tasks (the probes after healing included); the rest count keys.\n");
    let _ = writeln!(s, "## Submit latency\n\nAcknowledged `mesh-cli submit` runs, by when they started.\n\n| phase | count | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|");
    for (phase, l) in r.latency.phases() {
        let _ = writeln!(
            s,
            "| {phase} | {} | {} | {} | {} |",
            l.count, l.p50_ms, l.p99_ms, l.max_ms
        );
    }
    let l = &r.links;
    let _ = writeln!(
        s,
        "\n## Proxy\n\n{} connections, {} bytes forwarded, {} bytes dropped, {} connections refused, {} cut, {} chunks delayed.\n",
        l.connections, l.bytes_forwarded, l.bytes_dropped, l.connections_refused, l.connections_cut, l.chunks_delayed
    );
    let _ = writeln!(
        s,
        "## After healing\n\n- leader: {}\n- new submits: {}\n- replicas: {}\n",
        result_line(&r.leader_after_heal),
        result_line(&r.probes),
        result_line(&r.convergence)
    );
    let _ = writeln!(
        s,
        "## Timeline\n\n![timeline](timeline.svg)\n\n| at | phase |\n|---|---|"
    );
    for n in &r.notes {
        let _ = writeln!(
            s,
            "| {} | {} |",
            secs(n.at_ms.saturating_sub(r.window_start_ms)),
            n.text
        );
    }
    s
}

/// Write `report.json`, `report.md` and `timeline.svg` into `dir`.
pub fn write(r: &Report, rec: &Recorded, dir: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(r)?;
    std::fs::write(dir.join("report.json"), json)
        .with_context(|| format!("write {}", dir.join("report.json").display()))?;
    std::fs::write(dir.join("report.md"), markdown(r))?;
    std::fs::write(dir.join("timeline.svg"), crate::svg::timeline(r, rec))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(at_ms: u64, node: u64, role: &str, term: u64) -> Observation {
        Observation {
            at_ms,
            index: 0,
            node,
            role: role.into(),
            term,
            leader: Some(node),
            applied: None,
        }
    }

    #[test]
    fn leadership_keeps_new_terms_only() {
        let o = [
            obs(10, 1, "leader", 1),
            obs(20, 1, "leader", 1),
            obs(30, 2, "leader", 2),
            obs(40, 1, "leader", 1),
            obs(50, 3, "follower", 3),
        ];
        let l = leadership(&o);
        assert_eq!(
            l.iter().map(|c| (c.term, c.leader)).collect::<Vec<_>>(),
            vec![(1, 1), (2, 2)]
        );
    }
}
