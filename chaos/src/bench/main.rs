//! `mesh-bench`: measurements on real `mesh-node` processes on loopback, driven
//! through the real CLI protocol. Each figure is reported as min / median / max over
//! `--runs` fresh clusters; see docs/benchmarks.md for the figures on this machine.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use mesh_chaos::{phase, Cluster};
use serde::Serialize;
use std::time::{Duration, Instant};

/// Benchmarks of a Mesh cluster of real processes.
#[derive(Parser)]
#[command(
    name = "mesh-bench",
    version,
    after_help = "Examples:
  mesh-bench list
  mesh-bench run failover --runs 5
  mesh-bench run reassign --runs 5 --json"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List the scenarios.
    List,
    /// Run a scenario.
    Run {
        /// Scenario name (see `list`).
        scenario: String,
        /// Nodes in the cluster.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Independent runs (a fresh cluster each).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
}

const SCENARIOS: &[(&str, &str)] = &[
    (
        "failover",
        "leader SIGKILL to the first submit committed under the new leader",
    ),
    (
        "reassign",
        "worker SIGKILL to its task running on another node",
    ),
];

#[derive(Serialize)]
struct Report {
    scenario: String,
    nodes: usize,
    unit: &'static str,
    samples: Vec<f64>,
    min: f64,
    median: f64,
    max: f64,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::List => {
            for (n, what) in SCENARIOS {
                println!("{n:12} {what}");
            }
            Ok(())
        }
        Cmd::Run {
            scenario,
            nodes,
            runs,
            json,
        } => run(&scenario, nodes, runs, json),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

fn run(scenario: &str, nodes: usize, runs: usize, json: bool) -> Result<()> {
    if nodes < 3 {
        bail!("--nodes must be at least 3: a failover needs a surviving majority");
    }
    let mut samples = Vec::new();
    for r in 1..=runs {
        let dir = tempfile::tempdir()?;
        // Two slots per node: a moved task finds a free slot at once, so `reassign`
        // measures detection and placement, not waiting for other work to finish.
        let cluster = Cluster::start(dir.path(), nodes, &["--slots", "2"])?;
        let ms = match scenario {
            "failover" => failover(cluster)?,
            "reassign" => reassign(cluster)?,
            other => bail!("unknown scenario '{other}'; `mesh-bench list` shows them"),
        };
        phase(&format!("run {r}: {ms:.0} ms"));
        samples.push(ms);
    }
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    let report = Report {
        scenario: scenario.into(),
        nodes,
        unit: "ms",
        min: sorted[0],
        median: sorted[sorted.len() / 2],
        max: sorted[sorted.len() - 1],
        samples,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} on {} nodes over {} runs: min {:.0} ms, median {:.0} ms, max {:.0} ms",
            report.scenario, nodes, runs, report.min, report.median, report.max
        );
    }
    Ok(())
}

fn tiny_submit(cli: &mesh_chaos::Cli, key: &str) -> Result<(), String> {
    let out = cli.run(&[
        "--json",
        "submit",
        "--kernel",
        "mandelbrot",
        "--param",
        "width=8",
        "--param",
        "height=8",
        "--param",
        "max_iter=8",
        "--idempotency-key",
        key,
    ]);
    if out.code == 0 {
        Ok(())
    } else {
        Err(out.stderr)
    }
}

/// Kill the leader; time until a submit through a survivor is acknowledged (committed).
fn failover(mut cluster: Cluster) -> Result<f64> {
    let leader = cluster.leader().context("no leader")?;
    let survivor = (0..cluster.nodes.len())
        .find(|i| *i != leader)
        .expect("3+ nodes");
    let cli = cluster.cli(survivor);
    if let Err(e) = tiny_submit(&cli, "warm-up") {
        bail!("the cluster does not take submits before the fault: {e}");
    }
    let start = Instant::now();
    cluster.nodes[leader].kill9();
    let mut n = 0;
    loop {
        n += 1;
        match tiny_submit(&cli, &format!("after-{n}")) {
            Ok(()) => return Ok(start.elapsed().as_secs_f64() * 1000.0),
            Err(e) if start.elapsed() > Duration::from_secs(30) => {
                bail!("no submit committed within 30 s of the leader kill; last error: {e}")
            }
            Err(_) => {}
        }
    }
}

/// Kill a worker while it runs a task; time until that task runs on another node.
fn reassign(mut cluster: Cluster) -> Result<f64> {
    let leader = cluster.leader().context("no leader")?;
    let cli = cluster.cli(leader);
    // Long tasks, one per node slot, so a non-leader worker holds one.
    let mut ids = Vec::new();
    for i in 0..cluster.nodes.len() {
        let out = cli.run(&[
            "--json",
            "submit",
            "--kernel",
            "mandelbrot",
            "--param",
            "width=1024",
            "--param",
            "height=1024",
            "--param",
            "max_iter=5000",
            "--idempotency-key",
            &format!("long-{i}"),
        ]);
        if out.code != 0 {
            bail!("submit failed: {}", out.stderr);
        }
        ids.push(out.json()["task"].to_string());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let (victim_task, victim_node) = loop {
        let found = ids.iter().find_map(|id| {
            let t = cli.run(&["--json", "task", id]).json();
            let node = t["node"].as_u64()? as usize;
            (t["state"] == "running" && node - 1 != leader).then(|| (id.clone(), node))
        });
        if let Some(f) = found {
            break f;
        }
        if Instant::now() > deadline {
            bail!("no task ran on a non-leader node");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let start = Instant::now();
    cluster.nodes[victim_node - 1].kill9();
    loop {
        let t = cli.run(&["--json", "task", &victim_task]).json();
        let moved = t["node"]
            .as_u64()
            .is_some_and(|n| n as usize != victim_node);
        if moved && (t["state"] == "running" || t["state"] == "succeeded") {
            return Ok(start.elapsed().as_secs_f64() * 1000.0);
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("task {victim_task} did not move within 30 s: {t}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
