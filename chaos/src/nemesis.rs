//! The nemesis: injects each scheduled fault into the running cluster (signals,
//! proxy link faults, data directory surgery), proves that it took effect, holds it,
//! and heals it.

use crate::history::{FaultRecord, History};
use crate::proxy::{LinkFault, LinkStats, Links};
use crate::schedule::{Fault, Step};
use crate::workload::Targets;
use crate::{process_exists, Cluster};
use anyhow::{bail, Context, Result};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest one status or listing call of the nemesis may take.
const ASK_LIMIT: Duration = Duration::from_secs(3);
/// How long the nemesis looks for a leader to target before skipping a leader fault.
const FIND_LEADER: Duration = Duration::from_secs(15);
/// How long it looks for a task in the right state (between shards, running).
const FIND_TASK: Duration = Duration::from_secs(25);
/// How much longer than its scheduled hold a pause may last while its effect (a new
/// leader, a node marked down) has not shown yet.
const PAUSE_GRACE: Duration = Duration::from_secs(4);
/// How long a rejoined node may take to appear under its new id, the old one removed.
const REJOIN_LIMIT: Duration = Duration::from_secs(30);
/// A step that cannot start within this long after the fault window ends is skipped:
/// the run's total duration stays bounded when injecting takes longer than planned.
const SCHEDULE_GRACE: Duration = Duration::from_secs(15);
/// Files of a data directory that survive a wipe: the host key stands for the
/// machine's `/etc/ssh` key, which outlives a disk; the log is the harness's.
pub const KEEP_ON_WIPE: &[&str] = &["host_key", "host_key.pub", "node.log"];

/// The leader as the nodes report it.
#[derive(Debug, Clone, Copy)]
pub struct LeaderView {
    /// Index into the cluster's nodes.
    pub index: usize,
    /// Its node id.
    pub id: u64,
    /// Its term.
    pub term: u64,
}

/// What one injection found.
#[derive(Default)]
struct Outcome {
    target: String,
    effect: Option<String>,
    skipped: Option<String>,
    error: Option<String>,
}

/// Injects faults into `cluster` through signals, `links` and its data directories.
pub struct Nemesis<'a> {
    /// The nodes.
    pub cluster: &'a mut Cluster,
    /// The proxy on every node-to-node link.
    pub links: &'a Links,
    /// The record.
    pub history: Arc<History>,
    /// What the clients may send to.
    pub targets: Arc<Targets>,
    /// The node whose data directory was copied aside, the copy, and when.
    saved: Option<(usize, PathBuf, u64)>,
    /// With `--netns`: partitions are nftables drops in this lab, not the proxy's.
    pub lab: Option<&'a crate::netns::NetnsLab>,
}

impl<'a> Nemesis<'a> {
    /// A nemesis for a running cluster.
    pub fn new(
        cluster: &'a mut Cluster,
        links: &'a Links,
        history: Arc<History>,
        targets: Arc<Targets>,
    ) -> Nemesis<'a> {
        Nemesis {
            cluster,
            links,
            history,
            targets,
            saved: None,
            lab: None,
        }
    }

    /// Run `steps`, each at its time from `window_start_ms` (on the history's clock),
    /// one after another; a step that falls more than [`SCHEDULE_GRACE`] behind the
    /// window's end is recorded as skipped.
    pub fn run(&mut self, steps: &[Step], window_start_ms: u64, window: Duration) {
        for (k, step) in steps.iter().enumerate() {
            let due = window_start_ms + step.at.as_millis() as u64;
            while self.history.now_ms() < due {
                std::thread::sleep(Duration::from_millis(50).min(Duration::from_millis(
                    due.saturating_sub(self.history.now_ms()),
                )));
            }
            let start_ms = self.history.now_ms();
            let late = start_ms > window_start_ms + (window + SCHEDULE_GRACE).as_millis() as u64;
            self.history.note(format!(
                "fault {}: {} (hold {:?})",
                k + 1,
                step.fault.name(),
                step.hold
            ));
            let outcome = if late {
                Outcome {
                    skipped: Some("the run fell behind its schedule".into()),
                    ..Outcome::default()
                }
            } else {
                self.inject(&step.fault, step.hold)
            };
            let record = FaultRecord {
                step: k,
                fault: step.fault.clone(),
                name: step.fault.name().into(),
                scheduled_ms: step.at.as_millis() as u64,
                target: outcome.target,
                start_ms,
                end_ms: self.history.now_ms(),
                effect: outcome.effect,
                skipped: outcome.skipped,
                error: outcome.error,
            };
            crate::phase(&format!(
                "fault {} {} on {}: {}",
                k + 1,
                record.name,
                record.target,
                record
                    .effect
                    .as_deref()
                    .or(record.skipped.as_deref())
                    .unwrap_or("NO EFFECT")
            ));
            self.history.fault(record);
        }
    }

    fn inject(&mut self, fault: &Fault, hold: Duration) -> Outcome {
        match fault {
            Fault::KillLeader => match self.find_leader() {
                Some(l) => self.kill(l.index, hold, "leader"),
                None => no_leader(),
            },
            Fault::KillFollower { pick } => match self.pick_follower(*pick) {
                Some(i) => self.kill(i, hold, "follower"),
                None => no_leader(),
            },
            Fault::PauseLeader => match self.find_leader() {
                Some(l) => self.pause(l.index, hold, Some(l)),
                None => no_leader(),
            },
            Fault::PauseFollower { pick } => match self.pick_follower(*pick) {
                Some(i) => self.pause(i, hold, None),
                None => no_leader(),
            },
            Fault::IsolateLeader
            | Fault::LeaderMinority { .. }
            | Fault::OneWayFromLeader
            | Fault::OneWayToLeader => {
                let Some(l) = self.find_leader() else {
                    return no_leader();
                };
                let n = self.cluster.nodes.len();
                let others: Vec<usize> = (0..n).filter(|i| *i != l.index).collect();
                let (cuts, target) = match fault {
                    Fault::OneWayFromLeader => (
                        others.iter().map(|o| (l.index, *o)).collect(),
                        format!("{} cannot reach the others", self.label(l.index)),
                    ),
                    Fault::OneWayToLeader => (
                        others.iter().map(|o| (*o, l.index)).collect(),
                        format!("no node reaches {}", self.label(l.index)),
                    ),
                    _ => {
                        // The leader's side is a minority: alone, or with companions
                        // up to (n - 1) / 2 nodes in all.
                        let mut side = vec![l.index];
                        if let Fault::LeaderMinority { pick } = fault {
                            let mut rest = others.clone();
                            rotate(&mut rest, *pick);
                            side.extend(rest.iter().take((n - 1) / 2 - 1));
                        }
                        let other: Vec<usize> = (0..n).filter(|i| !side.contains(i)).collect();
                        (
                            both_ways(&side, &other),
                            format!("{} | {}", self.labels(&side), self.labels(&other)),
                        )
                    }
                };
                self.partition(cuts, hold, target)
            }
            Fault::Bridge { pick } => {
                // The bridge is a follower and the leader sits in one half: with the
                // leader as the bridge, followers (which only talk to the leader)
                // would send nothing over the cut links and the fault would be a no-op.
                let Some(l) = self.find_leader() else {
                    return no_leader();
                };
                let n = self.cluster.nodes.len();
                let mut followers: Vec<usize> = (0..n).filter(|i| *i != l.index).collect();
                rotate(&mut followers, *pick);
                let bridge = followers[0];
                let mut rest = followers[1..].to_vec();
                rotate(&mut rest, pick / n as u64);
                let split = (n - 1) / 2 - 1;
                let a: Vec<usize> = std::iter::once(l.index)
                    .chain(rest[..split].iter().copied())
                    .collect();
                let b = &rest[split..];
                let target = format!(
                    "{} | bridge {} | {}",
                    self.labels(&a),
                    self.label(bridge),
                    self.labels(b)
                );
                self.partition(both_ways(&a, b), hold, target)
            }
            Fault::Delay { ms } => {
                self.every_link(LinkFault::Delay(Duration::from_millis(*ms)), hold)
            }
            Fault::Loss { percent } => {
                self.every_link(LinkFault::Loss(*percent as f64 / 100.0), hold)
            }
            Fault::KillMidShard => self.kill_mid_shard(hold),
            Fault::PauseMidTask => self.pause_mid_task(hold),
            Fault::SaveDataDir { pick } => self.save_data_dir(*pick, hold),
            Fault::Rollback => self.rollback(hold),
            Fault::Wipe { pick } => self.wipe(*pick, hold),
        }
    }

    /// "node3 (id 3)".
    fn label(&self, i: usize) -> String {
        match self.cluster.nodes[i].id() {
            Some(id) => format!("node{} (id {id})", i + 1),
            None => format!("node{}", i + 1),
        }
    }

    fn labels(&self, group: &[usize]) -> String {
        group
            .iter()
            .map(|i| self.label(*i))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The index of the node with id `id`.
    fn index_of(&self, id: u64) -> Option<usize> {
        self.cluster.nodes.iter().position(|n| n.id() == Some(id))
    }

    /// `status --json` of node `i`, if it answers within [`ASK_LIMIT`].
    fn status(&self, i: usize) -> Option<serde_json::Value> {
        let out = self.targets.clis[i].run_within(&["--json", "status"], ASK_LIMIT);
        (out.code == 0)
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// A JSON answer to `args` from any node marked up, trying each in turn.
    fn ask_any(&self, args: &[&str], except: Option<usize>) -> Option<serde_json::Value> {
        (0..self.targets.clis.len())
            .filter(|i| Some(*i) != except && self.targets.is_up(*i))
            .find_map(|i| {
                let out = self.targets.clis[i].run_within(args, ASK_LIMIT);
                (out.code == 0)
                    .then(|| serde_json::from_slice(&out.stdout).ok())
                    .flatten()
            })
    }

    /// The leader that every answering node marked up agrees on and that says so itself
    /// (`all`: and every node marked up answered).
    pub fn agreed_leader(&self, all: bool) -> Option<LeaderView> {
        let mut seen: Option<u64> = None;
        let mut answered = 0;
        for i in (0..self.cluster.nodes.len()).filter(|i| self.targets.is_up(*i)) {
            let Some(v) = self.status(i) else {
                if all {
                    return None;
                }
                continue;
            };
            answered += 1;
            let leader = v["leader"].as_u64()?;
            if seen.is_some_and(|s| s != leader) {
                return None;
            }
            seen = Some(leader);
        }
        let id = seen.filter(|_| answered > 0)?;
        let index = self.index_of(id)?;
        let v = self.status(index)?;
        (v["role"] == "leader").then(|| LeaderView {
            index,
            id,
            term: v["term"].as_u64().unwrap_or(0),
        })
    }

    /// Wait (bounded) for an agreed leader ([`Nemesis::agreed_leader`]).
    pub fn wait_leader(&self, limit: Duration, all: bool) -> Option<LeaderView> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(l) = self.agreed_leader(all) {
                return Some(l);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn find_leader(&self) -> Option<LeaderView> {
        self.wait_leader(FIND_LEADER, false)
    }

    /// A node that is not the leader, chosen by `pick`.
    fn pick_follower(&self, pick: u64) -> Option<usize> {
        let l = self.find_leader()?;
        let mut others: Vec<usize> = (0..self.cluster.nodes.len())
            .filter(|i| *i != l.index)
            .collect();
        rotate(&mut others, pick);
        others.first().copied()
    }

    /// SIGKILL node `i`, hold, start it again.
    fn kill(&mut self, i: usize, hold: Duration, role: &str) -> Outcome {
        let mut out = Outcome {
            target: format!("{} ({role})", self.label(i)),
            ..Outcome::default()
        };
        let effect = self.kill_only(i);
        std::thread::sleep(hold);
        out.error = self.start_again(i).err().map(|e| format!("{e:#}"));
        out.effect = effect;
        out
    }

    /// SIGKILL node `i` and show that its process is gone.
    fn kill_only(&mut self, i: usize) -> Option<String> {
        self.targets.set_up(i, false);
        let node = &mut self.cluster.nodes[i];
        let pid = node.pid()?;
        node.kill9();
        (!process_exists(pid) && !node.is_running()).then(|| format!("SIGKILL: pid {pid} is gone"))
    }

    /// Start node `i` again on its data directory.
    fn start_again(&mut self, i: usize) -> Result<()> {
        let result = self.cluster.nodes[i]
            .restart()
            .with_context(|| format!("node{} did not start again", i + 1));
        self.targets.set_up(i, true);
        result
    }

    /// SIGSTOP node `i` for `hold` (longer while its effect has not shown), then
    /// SIGCONT. The effect: another node leads in a later term (`was_leader`), or the
    /// mesh marks the paused node down for its missed heartbeats.
    fn pause(&mut self, i: usize, hold: Duration, was_leader: Option<LeaderView>) -> Outcome {
        let mut out = Outcome {
            target: format!(
                "{} ({})",
                self.label(i),
                if was_leader.is_some() {
                    "leader"
                } else {
                    "follower"
                }
            ),
            ..Outcome::default()
        };
        let id = self.cluster.nodes[i].id();
        // Evidence must be fresh: a node still marked down from an earlier fault
        // proves nothing about this one.
        let was_down = self.is_marked_down(id, Some(i));
        self.targets.set_up(i, false);
        if let Err(e) = self.cluster.nodes[i].signal("STOP") {
            self.targets.set_up(i, true);
            out.error = Some(format!("SIGSTOP failed: {e:#}"));
            return out;
        }
        let start = Instant::now();
        let (mut took_over, mut marked_down) = (None, None);
        while start.elapsed() < hold
            || (took_over.is_none()
                && marked_down.is_none()
                && start.elapsed() < hold + PAUSE_GRACE)
        {
            if took_over.is_none() {
                took_over = was_leader.and_then(|old| self.took_over(i, old));
            }
            if marked_down.is_none() && !was_down {
                marked_down = self.is_marked_down(id, Some(i)).then(|| {
                    "marked down after missing heartbeats for the node timeout".to_string()
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if let Err(e) = self.cluster.nodes[i].signal("CONT") {
            out.error = Some(format!("SIGCONT failed: {e:#}"));
        }
        self.targets.set_up(i, true);
        out.effect = evidence("SIGSTOP", &[took_over, marked_down]);
        out
    }

    /// Another node that leads in a term after `old`'s, while `paused` is stopped.
    fn took_over(&self, paused: usize, old: LeaderView) -> Option<String> {
        (0..self.cluster.nodes.len())
            .filter(|j| *j != paused && self.targets.is_up(*j))
            .find_map(|j| {
                let v = self.status(j)?;
                (v["role"] == "leader" && v["term"].as_u64().is_some_and(|t| t > old.term)).then(
                    || {
                        format!(
                            "{} took over (term {} -> {})",
                            self.label(j),
                            old.term,
                            v["term"]
                        )
                    },
                )
            })
    }

    /// Whether the replicated state has node `id` down, asked of any node but `except`.
    fn is_marked_down(&self, id: Option<u64>, except: Option<usize>) -> bool {
        let Some(nodes) = self.ask_any(&["--json", "nodes"], except) else {
            return false;
        };
        nodes.as_array().into_iter().flatten().any(|n| {
            id.is_some()
                && n["id"].as_u64() == id
                && n["health"].as_str().is_some_and(|h| h.starts_with("down"))
        })
    }

    /// Partition the directed links `cuts` for `hold`, then heal; the effect is the
    /// traffic those links refused, cut or dropped meanwhile.
    fn partition(&mut self, cuts: Vec<(usize, usize)>, hold: Duration, target: String) -> Outcome {
        if let Some(lab) = self.lab {
            return partition_netns(lab, &cuts, hold, target);
        }
        let before: Vec<LinkStats> = cuts.iter().map(|(f, t)| self.links.stats(*f, *t)).collect();
        for (f, t) in &cuts {
            self.links.set(*f, *t, LinkFault::Partition);
        }
        std::thread::sleep(hold);
        let delta = sum(cuts
            .iter()
            .zip(&before)
            .map(|((f, t), b)| self.links.stats(*f, *t).since(b)));
        self.links.heal_all();
        let hit = delta.connections_refused + delta.connections_cut + delta.bytes_dropped > 0;
        let arrows: Vec<String> = cuts
            .iter()
            .map(|(f, t)| format!("{}->{}", f + 1, t + 1))
            .collect();
        Outcome {
            target: format!("{target}; links {}", arrows.join(" ")),
            effect: hit.then(|| {
                format!(
                    "proxy: {} connections refused, {} cut, {} bytes dropped on the cut links",
                    delta.connections_refused, delta.connections_cut, delta.bytes_dropped
                )
            }),
            ..Outcome::default()
        }
    }

    /// `fault` on every link for `hold`, then heal.
    fn every_link(&mut self, fault: LinkFault, hold: Duration) -> Outcome {
        let n = self.cluster.nodes.len();
        let before = self.links.total();
        for f in 0..n {
            for t in (0..n).filter(|t| *t != f) {
                self.links.set(f, t, fault);
            }
        }
        std::thread::sleep(hold);
        let delta = self.links.total().since(&before);
        self.links.heal_all();
        let effect = match fault {
            LinkFault::Delay(d) => (delta.chunks_delayed > 0)
                .then(|| format!("proxy: {} chunks held {d:?} each", delta.chunks_delayed)),
            _ => (delta.connections_cut + delta.bytes_dropped > 0).then(|| {
                format!(
                    "proxy: {} connections cut, {} bytes dropped",
                    delta.connections_cut, delta.bytes_dropped
                )
            }),
        };
        Outcome {
            target: format!("every link: {fault:?}"),
            effect,
            ..Outcome::default()
        }
    }

    /// Wait for a task for which `want` holds; returns it and its node's index.
    fn find_task(
        &self,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<(serde_json::Value, usize)> {
        let deadline = Instant::now() + FIND_TASK;
        while Instant::now() < deadline {
            if let Some(tasks) = self.ask_any(&["--json", "tasks", "--state", "running"], None) {
                for t in tasks.as_array().into_iter().flatten() {
                    if want(t) {
                        if let Some(i) = t["node"].as_u64().and_then(|id| self.index_of(id)) {
                            return Some((t.clone(), i));
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    /// `task ID --json` from any node but `except`.
    fn task(&self, id: u64, except: Option<usize>) -> Option<serde_json::Value> {
        self.ask_any(&["--json", "task", &id.to_string()], except)
    }

    /// SIGKILL the node of a sharded task that has committed some shards and not all.
    fn kill_mid_shard(&mut self, hold: Duration) -> Outcome {
        let mid = |t: &serde_json::Value| {
            let (shards, done) = (
                t["shards"].as_u64().unwrap_or(1),
                t["shards_done"].as_u64().unwrap_or(0),
            );
            shards > 1 && done >= 1 && done < shards
        };
        let Some((t, i)) = self.find_task(mid) else {
            return Outcome {
                skipped: Some(format!(
                    "no sharded task was between two shards within {FIND_TASK:?}"
                )),
                ..Outcome::default()
            };
        };
        let (id, attempt) = (
            t["id"].as_u64().unwrap_or(0),
            t["attempt"].as_u64().unwrap_or(0),
        );
        let mut out = Outcome {
            target: format!(
                "{} running task {id} ({}/{} shards checkpointed, attempt {attempt})",
                self.label(i),
                t["shards_done"],
                t["shards"]
            ),
            ..Outcome::default()
        };
        let killed = self.kill_only(i);
        // Show the task moving on: a later attempt elsewhere, resuming from the checkpoint.
        let deadline = Instant::now() + hold.max(Duration::from_secs(8));
        let mut moved = None;
        while Instant::now() < deadline && moved.is_none() {
            if let Some(now) = self.task(id, Some(i)) {
                if now["attempt"].as_u64().is_some_and(|a| a > attempt) {
                    moved = Some(format!(
                        "; task {id} moved to node id {} as attempt {} ({}/{} shards done)",
                        now["node"], now["attempt"], now["shards_done"], now["shards"]
                    ));
                } else if now["state"] == "succeeded" {
                    // Shards take tens of ms: the last ones may commit between the
                    // listing and the SIGKILL. Nothing is left to move then.
                    moved = Some(format!(
                        "; task {id} had finished (attempt {attempt}) before the kill took hold"
                    ));
                }
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        out.error = self.start_again(i).err().map(|e| format!("{e:#}"));
        out.effect = killed.map(|k| {
            k + moved
                .as_deref()
                .unwrap_or("; the task had not moved yet when the node came back")
        });
        out
    }

    /// SIGSTOP the node running a whole (unsharded) task past the node timeout, until
    /// the task has moved (and ideally finished) elsewhere; then SIGCONT, so the
    /// paused node's late report reaches the state machine, which must fence it.
    fn pause_mid_task(&mut self, hold: Duration) -> Outcome {
        // Any node will do: a paused leader is deposed and its task moves just the same,
        // and its late report then goes to the new leader.
        let leader_view = self.find_leader();
        let leader = leader_view.map(|l| l.index);
        let whole =
            |t: &serde_json::Value| t["shards"].as_u64() == Some(1) && t["kernel"] == "mandelbrot";
        let Some((t, i)) = self.find_task(whole) else {
            return Outcome {
                skipped: Some(format!("no long task was running within {FIND_TASK:?}")),
                ..Outcome::default()
            };
        };
        let (id, attempt) = (
            t["id"].as_u64().unwrap_or(0),
            t["attempt"].as_u64().unwrap_or(0),
        );
        let role = if Some(i) == leader {
            "leader"
        } else {
            "follower"
        };
        let mut out = Outcome {
            target: format!(
                "{} ({role}) running task {id} (attempt {attempt})",
                self.label(i)
            ),
            ..Outcome::default()
        };
        self.targets.set_up(i, false);
        if let Err(e) = self.cluster.nodes[i].signal("STOP") {
            self.targets.set_up(i, true);
            out.error = Some(format!("SIGSTOP failed: {e:#}"));
            return out;
        }
        let node_id = self.cluster.nodes[i].id();
        let was_down = self.is_marked_down(node_id, Some(i));
        let start = Instant::now();
        let mut finished_elsewhere = false;
        // The task may have finished between the listing and the SIGSTOP: then the
        // pause shows only as the node marked down (or deposed).
        let mut paused_effect = None;
        let mut finished_before = false;
        while start.elapsed() < hold
            || (!finished_elsewhere
                && paused_effect.is_none()
                && start.elapsed() < hold + PAUSE_GRACE)
        {
            if let Some(now) = self.task(id, Some(i)) {
                if now["attempt"].as_u64().is_some_and(|a| a > attempt) {
                    finished_elsewhere = now["state"] == "succeeded";
                    out.effect = Some(format!(
                        "SIGSTOP: task {id} moved to node id {} as attempt {} and is {} there",
                        now["node"],
                        now["attempt"],
                        now["state"].as_str().unwrap_or("?")
                    ));
                } else if now["state"] == "succeeded" {
                    finished_before = true;
                }
            }
            if out.effect.is_none() && paused_effect.is_none() {
                let took_over = leader_view
                    .filter(|l| l.index == i)
                    .and_then(|old| self.took_over(i, old));
                let down = (!was_down && self.is_marked_down(node_id, Some(i))).then(|| {
                    "marked down after missing heartbeats for the node timeout".to_string()
                });
                paused_effect = evidence("SIGSTOP", &[took_over, down]);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        if let Err(e) = self.cluster.nodes[i].signal("CONT") {
            out.error = Some(format!("SIGCONT failed: {e:#}"));
        }
        self.targets.set_up(i, true);
        if out.effect.is_none() {
            let note = if finished_before {
                format!("; task {id} had finished before the pause took hold")
            } else {
                String::new()
            };
            out.effect = paused_effect.map(|e| e + &note);
        }
        out
    }

    /// A node that is neither the leader nor the one whose data was saved.
    fn pick_disk_victim(&self, pick: u64) -> Option<usize> {
        let leader = self.find_leader()?.index;
        let saved = self.saved.as_ref().map(|s| s.0);
        let mut c: Vec<usize> = (0..self.cluster.nodes.len())
            .filter(|i| *i != leader && Some(*i) != saved)
            .collect();
        rotate(&mut c, pick);
        c.first().copied()
    }

    /// Stop a node, copy its data directory aside, start it again.
    fn save_data_dir(&mut self, pick: u64, hold: Duration) -> Outcome {
        let Some(i) = self.pick_disk_victim(pick) else {
            return no_leader();
        };
        let mut out = Outcome {
            target: self.label(i),
            ..Outcome::default()
        };
        let killed = self.kill_only(i);
        let copy = self.cluster.dir.join(format!("saved-node{}", i + 1));
        let copied = replace_copy(&self.cluster.nodes[i].data_dir, &copy, &["node.log"]);
        std::thread::sleep(hold);
        out.error = self.start_again(i).err().map(|e| format!("{e:#}"));
        match copied {
            Ok(bytes) => {
                out.effect = killed
                    .map(|k| format!("{k}; {bytes} bytes of its data directory copied aside"));
                self.saved = Some((i, copy, self.history.now_ms()));
            }
            Err(e) => out.error = Some(format!("copying the data directory: {e:#}")),
        }
        out
    }

    /// Stop the saved node and start it on the older copy of its data directory.
    fn rollback(&mut self, hold: Duration) -> Outcome {
        let Some((i, copy, saved_ms)) = self.saved.clone() else {
            return Outcome {
                skipped: Some("no data directory was saved before".into()),
                ..Outcome::default()
            };
        };
        let mut out = Outcome {
            target: format!(
                "{} back to its data of {:.1} s",
                self.label(i),
                saved_ms as f64 / 1000.0
            ),
            ..Outcome::default()
        };
        let killed = self.kill_only(i);
        let dir = self.cluster.nodes[i].data_dir.clone();
        let differs = match (dir_digest(&dir), dir_digest(&copy)) {
            (Ok(now), Ok(old)) => {
                now.iter().filter(|(p, d)| old.get(*p) != Some(d)).count()
                    + old.keys().filter(|p| !now.contains_key(*p)).count()
            }
            (Err(e), _) | (_, Err(e)) => {
                out.error = Some(format!("reading data directories: {e:#}"));
                0
            }
        };
        let restored = wipe_dir(&dir, &["node.log"]).and_then(|()| copy_dir(&copy, &dir, &[]));
        std::thread::sleep(hold);
        if let Err(e) = restored {
            out.error = Some(format!("restoring the copy: {e:#}"));
            return out;
        }
        let Some(killed) = killed.filter(|_| differs > 0) else {
            out.error = self.start_again(i).err().map(|e| format!("{e:#}"));
            return out;
        };
        let went_back =
            format!("{killed}; {differs} files of its data directory went back to the older copy");
        match self.start_again(i) {
            // The leader had no record of this node ahead of the copy (it took over
            // after the node stopped): the guard could not tell, and the node runs.
            Ok(()) => {
                out.effect = Some(format!(
                    "{went_back}; it started (no leader record ahead of the copy)"
                ))
            }
            // The rollback guard refused the older directory, as it must when the
            // leader knows the node had stored more. Recover as an operator would:
            // wipe the directory (the host key stays) and join with a fresh token.
            Err(e) if refused_by_guard(&e) => {
                let old = self.cluster.nodes[i].id();
                if let Err(e) = wipe_dir(&dir, KEEP_ON_WIPE) {
                    out.error = Some(format!("wiping: {e:#}"));
                    return out;
                }
                let refused =
                    format!("{went_back}; mesh-node refused to start on it (rollback guard)");
                self.rejoin_as_new(i, old, refused, &mut out);
            }
            Err(e) => out.error = Some(format!("{e:#}")),
        }
        out
    }

    /// Stop a node, wipe its data directory but the host key, and join it again with a
    /// fresh token: it must come back as a new node, the old id removed.
    fn wipe(&mut self, pick: u64, hold: Duration) -> Outcome {
        let Some(i) = self.pick_disk_victim(pick) else {
            return no_leader();
        };
        let old = self.cluster.nodes[i].id();
        let mut out = Outcome {
            target: self.label(i),
            ..Outcome::default()
        };
        let killed = self.kill_only(i);
        if let Err(e) = wipe_dir(&self.cluster.nodes[i].data_dir, KEEP_ON_WIPE) {
            out.error = Some(format!("wiping: {e:#}"));
        }
        std::thread::sleep(hold);
        let Some(killed) = killed else {
            out.error = Some("the node was not running".into());
            return out;
        };
        self.rejoin_as_new(i, old, format!("{killed}; data wiped"), &mut out);
        out.target = format!(
            "{} (was id {})",
            self.label(i),
            old.map_or("?".into(), |o| o.to_string())
        );
        out
    }

    /// Join node `i`, whose data directory was emptied, again with a fresh token, and
    /// wait until it shows under a new id with its old id `old` removed: then `effect`
    /// (plus the ids) is the outcome's evidence.
    fn rejoin_as_new(&mut self, i: usize, old: Option<u64>, effect: String, out: &mut Outcome) {
        let token = match self.token() {
            Ok(t) => t,
            Err(e) => {
                // Without a token it can only come back under its old identity, which
                // a wiped node must not do: leave it down until the final heal.
                out.error = Some(format!("no join token for the wiped node: {e:#}"));
                return;
            }
        };
        let rejoined = self.cluster.nodes[i].rejoin(&token);
        self.targets.set_up(i, true);
        if let Err(e) = rejoined {
            out.error = Some(format!("the wiped node did not join again: {e:#}"));
            return;
        }
        let new = self.cluster.nodes[i].id();
        let deadline = Instant::now() + REJOIN_LIMIT;
        while Instant::now() < deadline {
            if let Some(nodes) = self.ask_any(&["--json", "nodes"], None) {
                let health = |id: Option<u64>| {
                    nodes
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|n| n["id"].as_u64() == id && id.is_some())
                        .map(|n| n["health"].as_str().unwrap_or("").to_string())
                };
                if new != old
                    && health(old).is_some_and(|h| h.starts_with("removed"))
                    && health(new).is_some()
                {
                    out.effect = Some(format!(
                        "{effect}; rejoined as id {}, old id {} removed",
                        new.unwrap_or(0),
                        old.map_or("?".into(), |o| o.to_string())
                    ));
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        out.error = Some(format!("within {REJOIN_LIMIT:?} the node did not show up under a new id with its old id {old:?} removed (now {new:?})"));
    }

    /// A single-use join token from any node marked up.
    fn token(&self) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = self.ask_any(
                &["--json", "token", "create", "--uses", "1", "--ttl", "10m"],
                None,
            ) {
                if let Some(t) = v["token"].as_str() {
                    return Ok(t.to_string());
                }
            }
            if Instant::now() > deadline {
                bail!("no node created a join token within 20 s");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Undo whatever may still be in effect: links healed, paused nodes continued,
    /// stopped nodes started (a wiped node left down joins with a token). Returns the
    /// nodes that could not be brought back.
    pub fn heal_all(&mut self) -> Vec<String> {
        self.links.heal_all();
        let mut failures = Vec::new();
        if let Some(lab) = self.lab {
            if let Err(e) = lab.heal() {
                failures.push(format!("nftables heal: {e:#}"));
            }
        }
        for i in 0..self.cluster.nodes.len() {
            if self.cluster.nodes[i].is_paused() {
                if let Err(e) = self.cluster.nodes[i].signal("CONT") {
                    failures.push(format!("node{}: SIGCONT: {e:#}", i + 1));
                }
            }
            if !self.cluster.nodes[i].is_running() {
                let r = if self.cluster.nodes[i].id().is_none() {
                    self.token().and_then(|t| self.cluster.nodes[i].rejoin(&t))
                } else {
                    self.cluster.nodes[i].restart()
                };
                if let Err(e) = r {
                    failures.push(format!("node{}: {e:#}", i + 1));
                }
            }
            self.targets.set_up(i, true);
        }
        failures
    }
}

/// "SIGSTOP: a; b" from the pieces of evidence found, or `None` without any.
fn evidence(what: &str, pieces: &[Option<String>]) -> Option<String> {
    let found: Vec<&str> = pieces.iter().flatten().map(String::as_str).collect();
    (!found.is_empty()).then(|| format!("{what}: {}", found.join("; ")))
}

fn no_leader() -> Outcome {
    Outcome {
        skipped: Some(format!("no agreed leader to target within {FIND_LEADER:?}")),
        ..Outcome::default()
    }
}

/// Rotate `v` left by `by` (a seeded choice of order).
fn rotate<T>(v: &mut [T], by: u64) {
    if !v.is_empty() {
        let k = (by % v.len() as u64) as usize;
        v.rotate_left(k);
    }
}

/// Every directed link between `a` and `b`, both ways.
fn both_ways(a: &[usize], b: &[usize]) -> Vec<(usize, usize)> {
    a.iter()
        .flat_map(|x| b.iter().flat_map(move |y| [(*x, *y), (*y, *x)]))
        .collect()
}

fn sum(stats: impl Iterator<Item = LinkStats>) -> LinkStats {
    stats.fold(LinkStats::default(), |mut acc, s| {
        acc.connections += s.connections;
        acc.bytes_forwarded += s.bytes_forwarded;
        acc.bytes_dropped += s.bytes_dropped;
        acc.connections_refused += s.connections_refused;
        acc.connections_cut += s.connections_cut;
        acc.chunks_delayed += s.chunks_delayed;
        acc
    })
}

/// [`Nemesis::partition`] in a network namespace lab: nftables drops in the nodes'
/// namespaces; the effect is the packets the rules dropped while held.
fn partition_netns(
    lab: &crate::netns::NetnsLab,
    cuts: &[(usize, usize)],
    hold: Duration,
    target: String,
) -> Outcome {
    let arrows: Vec<String> = cuts
        .iter()
        .map(|(f, t)| format!("{}->{}", f + 1, t + 1))
        .collect();
    let mut out = Outcome {
        target: format!("{target}; links {} (nftables)", arrows.join(" ")),
        ..Outcome::default()
    };
    let before: u64 = cuts.iter().map(|(f, t)| lab.dropped_packets(*f, *t)).sum();
    for (f, t) in cuts {
        if let Err(e) = lab.partition(*f, *t) {
            out.error = Some(format!("nftables: {e:#}"));
        }
    }
    std::thread::sleep(hold);
    let dropped = cuts
        .iter()
        .map(|(f, t)| lab.dropped_packets(*f, *t))
        .sum::<u64>()
        .saturating_sub(before);
    if let Err(e) = lab.heal() {
        out.error = Some(format!("nftables heal: {e:#}"));
    }
    out.effect =
        (dropped > 0).then(|| format!("nftables: {dropped} packets dropped on the cut links"));
    out
}

/// Remove everything in `dir` but the names in `keep`.
pub fn wipe_dir(dir: &Path, keep: &[&str]) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry?;
        if keep.iter().any(|k| entry.file_name() == *k) {
            continue;
        }
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        }
        .with_context(|| format!("remove {}", path.display()))?;
    }
    Ok(())
}

/// Whether a failed start is the rollback guard's refusal (mesh-node/src/rollback_guard.rs
/// `enforce`): a directory older than what the node acknowledged, or one of an id the
/// machine had before it last rejoined.
fn refused_by_guard(start: &anyhow::Error) -> bool {
    let why = format!("{start:#}");
    [
        "older than this node's acknowledged state",
        "a node id the mesh no longer uses",
    ]
    .iter()
    .any(|refusal| why.contains(refusal))
}

/// Make `dst` a copy of `src` alone, leaving out top-level names in `skip`; returns the
/// bytes copied. A machine saved before (under an earlier id) left its files in `dst`:
/// copied over them, a rollback would restore a mix of the two directories.
fn replace_copy(src: &Path, dst: &Path, skip: &[&str]) -> Result<u64> {
    match std::fs::remove_dir_all(dst) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(anyhow::Error::new(e).context(format!("clear {}", dst.display())))
        }
        _ => copy_dir(src, dst, skip),
    }
}

/// Copy `src` into `dst` (created), leaving out top-level names in `skip`; returns the
/// bytes copied.
pub fn copy_dir(src: &Path, dst: &Path, skip: &[&str]) -> Result<u64> {
    std::fs::create_dir_all(dst)?;
    let mut bytes = 0;
    for entry in std::fs::read_dir(src).with_context(|| format!("read {}", src.display()))? {
        let entry = entry?;
        if skip.iter().any(|k| entry.file_name() == *k) {
            continue;
        }
        let to = dst.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            bytes += copy_dir(&entry.path(), &to, &[])?;
        } else {
            bytes += std::fs::copy(entry.path(), &to)
                .with_context(|| format!("copy {}", entry.path().display()))?;
        }
    }
    Ok(bytes)
}

/// SHA-256 of every file under `dir` (but the node log), by relative path.
fn dir_digest(dir: &Path) -> Result<BTreeMap<PathBuf, String>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) -> Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                walk(root, &path, out)?;
            } else if entry.file_name() != "node.log" {
                let data = std::fs::read(&path)?;
                out.insert(
                    path.strip_prefix(root)?.to_path_buf(),
                    hex::encode(Sha256::digest(&data)),
                );
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ways_cuts_every_pair_in_each_direction() {
        let cuts = both_ways(&[0], &[1, 2]);
        assert_eq!(cuts, vec![(0, 1), (1, 0), (0, 2), (2, 0)]);
    }

    #[test]
    fn wipe_keeps_the_host_key_and_copy_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        std::fs::create_dir_all(data.join("raft/db")).unwrap();
        std::fs::write(data.join("host_key"), "k").unwrap();
        std::fs::write(data.join("node.id"), "3").unwrap();
        std::fs::write(data.join("raft/db/conf"), "x").unwrap();
        let copy = d.path().join("copy");
        assert_eq!(copy_dir(&data, &copy, &[]).unwrap(), 3);
        assert_eq!(dir_digest(&data).unwrap(), dir_digest(&copy).unwrap());
        wipe_dir(&data, KEEP_ON_WIPE).unwrap();
        let left: Vec<_> = std::fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("host_key")]);
        assert_ne!(dir_digest(&data).unwrap(), dir_digest(&copy).unwrap());
    }

    #[test]
    fn a_second_save_replaces_the_first_instead_of_mixing_with_it() {
        let d = tempfile::tempdir().unwrap();
        let (first, second) = (d.path().join("first"), d.path().join("second"));
        std::fs::create_dir_all(first.join("raft")).unwrap();
        std::fs::write(first.join("node.id"), "3").unwrap();
        std::fs::write(first.join("raft/segment-1"), "old").unwrap();
        std::fs::write(first.join("raft/segment-2"), "old").unwrap();
        std::fs::create_dir_all(second.join("raft")).unwrap();
        std::fs::write(second.join("node.id"), "6").unwrap();
        std::fs::write(second.join("raft/segment-1"), "new").unwrap();
        std::fs::write(second.join("node.log"), "not copied").unwrap();
        let saved = d.path().join("saved-node3");
        replace_copy(&first, &saved, &["node.log"]).unwrap();
        assert_eq!(dir_digest(&saved).unwrap(), dir_digest(&first).unwrap());
        replace_copy(&second, &saved, &["node.log"]).unwrap();
        // segment-2 of the first save is gone; the log was left out.
        assert_eq!(dir_digest(&saved).unwrap(), dir_digest(&second).unwrap());
        assert!(!saved.join("raft/segment-2").exists());
        assert!(!saved.join("node.log").exists());
    }

    #[test]
    fn only_the_rollback_guards_refusals_count_as_refusals() {
        let start = |why: &str| anyhow::anyhow!("{why}").context("start node 3");
        assert!(refused_by_guard(&start(
            "the data directory /d is older than this node's acknowledged state: leader 1 ..."
        )));
        assert!(refused_by_guard(&start(
            "the data directory /d is of a node id the mesh no longer uses for this machine: ..."
        )));
        assert!(!refused_by_guard(&start(
            "mesh-node exited with 1: the segment ends mid-record"
        )));
    }
}
