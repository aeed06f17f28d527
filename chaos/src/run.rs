//! One run of a scenario, start to finish: start the cluster behind the proxy, run the
//! workload and the observer while the nemesis plays the seeded schedule, heal, check
//! liveness, gather the final state, check the invariants, write the report.

use crate::checker::{self, Divergence, FinalState, References, Violation};
use crate::history::History;
use crate::nemesis::Nemesis;
use crate::observer::Observer;
use crate::proxy::Links;
use crate::report::{self, Report};
use crate::scenario::Scenario;
use crate::schedule::{self, Rng, Window};
use crate::workload::{is_terminal, ClientCtx, Targets, TaskPlan, Workload, READ_LIMIT};
use crate::{Cluster, NodePorts};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the workload keeps going after the final heal, so "after" latencies have
/// data before the liveness checks.
const AFTER_HEAL: Duration = Duration::from_secs(5);
/// Longest wait for one agreed leader after healing.
const LEADER_LIMIT: Duration = Duration::from_secs(30);
/// Longest wait for the probe submits to succeed after healing.
const PROBE_LIMIT: Duration = Duration::from_secs(60);
/// Probe submits after healing.
const PROBES: usize = 3;
/// Longest wait for every task to reach a terminal state after healing.
const TERMINAL_LIMIT: Duration = Duration::from_secs(120);
/// Longest wait for every replica to reach the same stable applied index.
const CONVERGE_LIMIT: Duration = Duration::from_secs(60);
/// Longest the fetching of results may take in all.
const FETCH_LIMIT: Duration = Duration::from_secs(180);
/// Node timeout given to every node (the failure detector; pauses are longer).
pub const NODE_TIMEOUT: &str = "1500ms";

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The scenario.
    pub scenario: &'static Scenario,
    /// The seed of the schedule, the workload and the proxy's losses.
    pub seed: u64,
    /// Nodes (default: the scenario's).
    pub nodes: Option<usize>,
    /// The fault window.
    pub duration: Duration,
    /// Where the report goes.
    pub report_dir: PathBuf,
    /// Another `mesh-node` executable (the negative control's build).
    pub node_bin: Option<PathBuf>,
    /// Keep the cluster's data directories (their path is printed).
    pub keep: bool,
    /// Nodes in network namespaces, partitions by nftables (root only).
    pub netns: bool,
    /// Every node's `--snapshot-every`: Raft log entries between snapshots.
    pub snapshot_every: u64,
}

impl RunOptions {
    /// Nodes and voters of this run.
    pub fn shape(&self) -> (usize, usize) {
        let n = self.nodes.unwrap_or(self.scenario.nodes);
        let mut voters = self.scenario.voters.min(n);
        if voters.is_multiple_of(2) {
            voters -= 1;
        }
        (n, voters)
    }

    /// Where the schedule's faults may fall: after a warm-up of an eighth of the
    /// window (2 to 5 s, so "before" latencies have data), ending with the window.
    pub fn window(&self) -> Window {
        let warmup = (self.duration / 8).clamp(Duration::from_secs(2), Duration::from_secs(5));
        Window {
            warmup,
            window: self.duration,
        }
    }

    /// The command line that replays this run.
    pub fn replay(&self) -> String {
        let mut s = format!(
            "mesh-chaos run {} --seed {} --nodes {} --duration {}s",
            self.scenario.name,
            self.seed,
            self.shape().0,
            self.duration.as_secs()
        );
        if let Some(b) = &self.node_bin {
            s += &format!(" --node-bin {}", b.display());
        }
        if self.netns {
            s += " --netns";
        }
        s
    }
}

/// A finished run: its violations (empty: every invariant held) and where its report is.
pub struct RunOutcome {
    /// Broken invariants.
    pub violations: Vec<Violation>,
    /// The report directory.
    pub report_dir: PathBuf,
    /// Wall time of the whole run.
    pub wall: Duration,
}

/// The default report directory: `target/chaos/<scenario>-<seed>` beside the build.
pub fn default_report_dir(scenario: &str, seed: u64) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/debug/mesh-chaos -> target/
    let target = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"));
    target.join("chaos").join(format!("{scenario}-{seed}"))
}

/// Run a scenario. `Err`: the harness itself could not run (exit 2).
pub fn run(opts: &RunOptions) -> Result<RunOutcome> {
    let started = Instant::now();
    let (n, voters) = opts.shape();
    if n < 3 {
        bail!("--nodes must be at least 3 (a fault needs a surviving majority)");
    }
    if let Some(b) = &opts.node_bin {
        if !b.is_file() {
            bail!(
                "--node-bin {} is not a file; build it first (see docs/chaos.md)",
                b.display()
            );
        }
    }
    println!(
        "mesh-chaos: scenario {} seed {} ({} nodes, {} voters, fault window {:?})",
        opts.scenario.name, opts.seed, n, voters, opts.duration
    );
    println!("mesh-chaos: replay with: {}", opts.replay());
    let tmp = tempfile::Builder::new()
        .prefix("mesh-chaos-")
        .tempdir()
        .context("create a temporary directory")?;
    let dir = tmp.path().to_path_buf();
    std::fs::create_dir_all(dir.join("inputs"))?;
    std::fs::create_dir_all(dir.join("outputs"))?;

    // Ports first, so that every node's routes through the proxy are known before
    // any node starts.
    let ports = NodePorts::allocate(n)?;
    let addrs: Vec<String> = ports.iter().map(NodePorts::raft_addr).collect();
    // With --netns the nodes talk directly over the lab's bridge; the proxy still
    // runs (its links stay idle) so that the rest of the harness is the same.
    let links = Links::start(&addrs, opts.seed).context("start the proxy")?;
    let lab = if opts.netns {
        if opts.scenario.needs_proxy() {
            bail!(
                "scenario {} injects latency or loss, which only the proxy can (the kernel here has no netem); run it without --netns",
                opts.scenario.name
            );
        }
        Some(
            crate::netns::NetnsLab::new(n)
                .context("build the network namespaces (--netns needs root, ip and nft)")?,
        )
    } else {
        None
    };
    let nets = lab.as_ref().map(|l| l.host_nodes()).unwrap_or_default();
    let per_node: Vec<Vec<String>> = (0..n)
        .map(|i| {
            let mut args: Vec<String> = [
                "--voters",
                &voters.to_string(),
                "--node-timeout",
                NODE_TIMEOUT,
                "--slots",
                "1",
                "--snapshot-every",
                &opts.snapshot_every.to_string(),
            ]
            .map(String::from)
            .to_vec();
            if lab.is_none() {
                args.extend(links.route_args(i));
            }
            args
        })
        .collect();
    crate::phase(&format!(
        "starting {n} nodes {}",
        if lab.is_some() {
            "in network namespaces (partitions by nftables)"
        } else {
            "behind the proxy"
        }
    ));
    let mut cluster =
        Cluster::start_on_nets(&dir, opts.node_bin.as_deref(), &ports, &per_node, &nets)
            .context("start the cluster")?;
    let clis = (0..n).map(|i| cluster.cli(i)).collect();
    let targets = Arc::new(Targets::new(clis));
    let history = Arc::new(History::new());
    let setup_ms = started.elapsed().as_millis() as u64;

    let steps = schedule::generate(opts.scenario, opts.seed, opts.window());
    crate::phase(&format!(
        "schedule: {}",
        steps
            .iter()
            .map(|s| format!("{:.1}s {}", s.at.as_secs_f64(), s.fault.name()))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    let stop = Arc::new(AtomicBool::new(false));
    let ctx = ClientCtx {
        history: history.clone(),
        targets: targets.clone(),
        input_dir: dir.join("inputs"),
        seed: opts.seed,
        key_prefix: format!("{}-{}", opts.scenario.name, opts.seed),
        stop: stop.clone(),
    };
    let window_start_ms = history.now_ms();
    history.note("fault window starts; workload and observer running");
    let observer = Observer::start(history.clone(), targets.clone());
    let workload = Workload::start(ctx.clone(), opts.scenario.mix);

    let mut fin = FinalState::default();
    let healed_ms;
    {
        let mut nemesis = Nemesis::new(&mut cluster, &links, history.clone(), targets.clone());
        nemesis.lab = lab.as_ref();
        nemesis.run(&steps, window_start_ms, opts.duration);
        let end = window_start_ms + opts.duration.as_millis() as u64;
        while history.now_ms() < end {
            std::thread::sleep(Duration::from_millis(100));
        }
        fin.heal_failures = nemesis.heal_all();
        healed_ms = history.now_ms();
        history.note("every fault healed");
        std::thread::sleep(AFTER_HEAL);
        workload.stop();
        history.note("workload stopped; liveness checks");
        fin.leader_after_heal = match nemesis.wait_leader(LEADER_LIMIT, true) {
            Some(l) => Ok(format!(
                "node id {} (node{}) in term {}",
                l.id,
                l.index + 1,
                l.term
            )),
            None => Err(format!(
                "no leader that every node agrees on within {LEADER_LIMIT:?} of healing"
            )),
        };
    }
    fin.probes = probe(&ctx);
    history.note("waiting for every task to end");
    let (tasks, listed_by) = wait_terminal(&targets);
    fin.tasks = tasks;
    history.note("comparing replicas");
    fin.convergence = converge(&targets);
    let count = |what: &str| -> usize {
        cluster
            .nodes
            .iter()
            .map(|n| n.log().matches(what).count())
            .sum()
    };
    history.note(format!(
        "snapshots (--snapshot-every {}): {} built, {} installed from a leader (node logs; a wiped node's log went with its data)",
        opts.snapshot_every,
        count("built a snapshot"),
        count("installed a snapshot from the leader"),
    ));
    observer.stop();
    history.note("fetching results");
    fin.outputs = fetch_outputs(&targets, &fin.tasks, &dir.join("outputs"), listed_by);
    fin.panics = cluster
        .nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| {
            panics(&n.log())
                .into_iter()
                .map(move |p| format!("node{}: {p}", i + 1))
        })
        .collect();

    let rec = history.snapshot();
    let mut refs = References::new();
    let violations = checker::check(&rec, &fin, &mut refs);
    let wall = started.elapsed();
    let report = Report::build(
        opts,
        &rec,
        &fin,
        &violations,
        &links,
        setup_ms,
        window_start_ms,
        healed_ms,
        wall,
    );
    std::fs::create_dir_all(&opts.report_dir)
        .with_context(|| format!("create {}", opts.report_dir.display()))?;
    report::write(&report, &rec, &opts.report_dir)?;
    if !violations.is_empty() {
        // The node logs tell why; they live in the temporary directory.
        let logs = opts.report_dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        for (i, node) in cluster.nodes.iter().enumerate() {
            let _ = std::fs::copy(
                node.data_dir.join("node.log"),
                logs.join(format!("node{}.log", i + 1)),
            );
        }
    }
    drop(cluster);
    drop(links);
    if opts.keep {
        let kept = tmp.keep();
        println!("mesh-chaos: data directories kept in {}", kept.display());
    }
    Ok(RunOutcome {
        violations,
        report_dir: opts.report_dir.clone(),
        wall,
    })
}

/// Submit a few fresh tasks after healing; each must be acknowledged and succeed.
fn probe(ctx: &ClientCtx) -> Result<String, String> {
    let mut rng = Rng::stream(ctx.seed, 300);
    let mut ids = Vec::new();
    for i in 0..PROBES {
        let plan = TaskPlan::light(&mut rng, format!("{}-probe-{i}", ctx.key_prefix));
        match ctx.submit(plan, "probe", &mut rng) {
            Some(id) => ids.push(id),
            None => {
                return Err(format!(
                    "probe submit {i} was not acknowledged after healing"
                ))
            }
        }
    }
    let deadline = Instant::now() + PROBE_LIMIT;
    for id in &ids {
        loop {
            let i = ctx.targets.pick(&mut rng);
            let out =
                ctx.targets.clis[i].run_within(&["--json", "task", &id.to_string()], READ_LIMIT);
            let state = (out.code == 0)
                .then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).ok())
                .flatten()
                .and_then(|v| v["state"].as_str().map(String::from));
            match state.as_deref() {
                Some("succeeded") => break,
                Some(s) if is_terminal(s) => return Err(format!("probe task {id} ended {s}")),
                _ if Instant::now() > deadline => {
                    return Err(format!(
                        "probe task {id} did not succeed within {PROBE_LIMIT:?} (last: {state:?})"
                    ))
                }
                _ => std::thread::sleep(Duration::from_millis(300)),
            }
        }
    }
    Ok(format!(
        "{PROBES} new tasks acknowledged and succeeded: {ids:?}"
    ))
}

/// `tasks --json`, once every task is terminal or the limit passed, from the node
/// that has applied the most of the log (a node whose consensus died would answer
/// from a stale state).
fn wait_terminal(targets: &Targets) -> (Vec<serde_json::Value>, Option<usize>) {
    let deadline = Instant::now() + TERMINAL_LIMIT;
    let mut last = Vec::new();
    let mut from = None;
    loop {
        let mut order: Vec<(u64, usize)> = (0..targets.clis.len())
            .map(|i| {
                let out = targets.clis[i].run_within(&["--json", "status"], READ_LIMIT);
                let applied = (out.code == 0)
                    .then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).ok())
                    .flatten()
                    .and_then(|v| v["applied_index"].as_u64());
                (applied.unwrap_or(0), i)
            })
            .collect();
        order.sort_by(|a, b| b.cmp(a));
        for (_, i) in order {
            let out = targets.clis[i].run_within(&["--json", "tasks"], READ_LIMIT * 2);
            if let Some(serde_json::Value::Array(tasks)) = (out.code == 0)
                .then(|| serde_json::from_slice(&out.stdout).ok())
                .flatten()
            {
                last = tasks;
                from = Some(i);
                break;
            }
        }
        let open = last
            .iter()
            .filter(|t| !t["state"].as_str().is_some_and(is_terminal))
            .count();
        if (open == 0 && !last.is_empty()) || Instant::now() > deadline {
            return (last, from);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Poll every node's `digest` until all report the same applied index, stable; then
/// their digests must be equal.
fn converge(targets: &Targets) -> Result<String, Divergence> {
    let deadline = Instant::now() + CONVERGE_LIMIT;
    loop {
        let answers: Vec<Option<serde_json::Value>> = targets
            .clis
            .iter()
            .map(|cli| {
                let out = cli.ssh_within("digest", READ_LIMIT);
                (out.code == 0)
                    .then(|| serde_json::from_slice(&out.stdout).ok())
                    .flatten()
            })
            .collect();
        let indexes: Vec<Option<u64>> = answers
            .iter()
            .map(|a| a.as_ref().and_then(|v| v["applied_index"].as_u64()))
            .collect();
        let all_stable = answers
            .iter()
            .all(|a| a.as_ref().is_some_and(|v| v["stable"] == true));
        let last = answers
            .iter()
            .enumerate()
            .map(|(i, a)| match a {
                Some(v) => format!(
                    "node{} id {} at {} ({})",
                    i + 1,
                    v["node"],
                    v["applied_index"],
                    &v["digest"].as_str().unwrap_or("?")
                        [..12.min(v["digest"].as_str().unwrap_or("?").len())]
                ),
                None => format!("node{} did not answer", i + 1),
            })
            .collect::<Vec<_>>()
            .join("; ");
        if all_stable && indexes.windows(2).all(|w| w[0] == w[1]) && indexes[0].is_some() {
            let digests: BTreeMap<&str, Vec<usize>> =
                answers
                    .iter()
                    .enumerate()
                    .fold(BTreeMap::new(), |mut m, (i, a)| {
                        m.entry(a.as_ref().and_then(|v| v["digest"].as_str()).unwrap_or("?"))
                            .or_default()
                            .push(i + 1);
                        m
                    });
            if digests.len() == 1 {
                let d = digests.keys().next().copied().unwrap_or("?");
                return Ok(format!(
                    "{} nodes at applied index {} with state digest {d}",
                    answers.len(),
                    indexes[0].unwrap_or(0)
                ));
            }
            return Err(Divergence::Diverged(format!(
                "replicas diverged at applied index {}: {last}",
                indexes[0].unwrap_or(0)
            )));
        }
        if Instant::now() > deadline {
            return Err(Divergence::NotConverged(format!(
                "replicas not at one stable applied index within {CONVERGE_LIMIT:?}: {last}"
            )));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The panics in a node's log: each `panicked at` line with the message after it.
pub fn panics(log: &str) -> Vec<String> {
    let log = crate::strip_ansi(log);
    let lines: Vec<&str> = log.lines().collect();
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("panicked at"))
        .map(|(i, l)| {
            let at = l
                .split("panicked at")
                .nth(1)
                .unwrap_or("")
                .trim()
                .trim_end_matches(':');
            format!(
                "panicked at {at}: {}",
                lines.get(i + 1).copied().unwrap_or("").trim()
            )
        })
        .collect()
}

/// Fetch the output of every succeeded task with `mesh-cli result ID --output FILE`
/// (which checks the bytes against the recorded SHA-256 before writing).
///
/// Asks `first` (the node the final listing came from) first; a node that does not
/// answer in time is not asked again, and the whole phase is bounded by
/// [`FETCH_LIMIT`] (what is left is reported as not fetched).
fn fetch_outputs(
    targets: &Targets,
    tasks: &[serde_json::Value],
    dir: &Path,
    first: Option<usize>,
) -> BTreeMap<u64, Result<Vec<u8>, String>> {
    let deadline = Instant::now() + FETCH_LIMIT;
    let mut order: Vec<usize> = first.into_iter().collect();
    order.extend((0..targets.clis.len()).filter(|i| Some(*i) != first));
    let mut silent = BTreeSet::new();
    let mut out = BTreeMap::new();
    for t in tasks.iter().filter(|t| t["state"] == "succeeded") {
        let Some(id) = t["id"].as_u64() else { continue };
        if Instant::now() > deadline {
            out.insert(
                id,
                Err(format!(
                    "not fetched: the fetch phase ran past {FETCH_LIMIT:?}"
                )),
            );
            continue;
        }
        let file = dir.join(format!("{id}.bin"));
        let mut result = Err("no node answered".to_string());
        for &i in &order {
            if silent.contains(&i) {
                continue;
            }
            let r = targets.clis[i].run_within(
                &[
                    "--json",
                    "result",
                    &id.to_string(),
                    "--output",
                    &file.to_string_lossy(),
                ],
                READ_LIMIT * 2,
            );
            if r.code == 0 {
                result = std::fs::read(&file).map_err(|e| format!("read {}: {e}", file.display()));
                let _ = std::fs::remove_file(&file);
                break;
            }
            if r.code == -1 {
                silent.insert(i);
            }
            result = Err(format!("node{}: {}", i + 1, r.stderr.trim()));
        }
        out.insert(id, result);
    }
    out
}
