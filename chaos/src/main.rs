//! `mesh-chaos`: fault injection against real `mesh-node` processes. Starts a cluster
//! on loopback with a fault-injecting proxy on every node-to-node link, runs a
//! workload through `mesh-cli`, injects a seeded schedule of faults, heals, and checks
//! the invariants (docs/chaos.md).
//!
//! Exit status: 0 every invariant held, 1 one was violated (the report names it), 2
//! the harness itself could not run.

use clap::{Parser, Subcommand};
use mesh_chaos::run::{self, RunOptions};
use mesh_chaos::scenario::{self, SCENARIOS};
use std::path::PathBuf;
use std::time::Duration;

/// Fault injection for a Mesh cluster of real processes.
#[derive(Parser)]
#[command(
    name = "mesh-chaos",
    version,
    after_help = "Examples:
  mesh-chaos list
  mesh-chaos run leader-kill --seed 7
  mesh-chaos run smoke --seed 1 --duration 20s --report /tmp/smoke
  mesh-chaos run-all --seed 1
  mesh-chaos run paused-worker --seed 1 --node-bin target/negative/debug/mesh-node
  mesh-chaos run bridge --seed 1 --netns      (as root: nodes in namespaces, nftables partitions)

Exit status: 0 every invariant held, 1 an invariant was violated, 2 the harness could not run."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List the scenarios.
    List,
    /// Run one scenario.
    Run {
        /// Scenario name (see `list`).
        scenario: String,
        #[command(flatten)]
        common: Common,
        /// Nodes (voters plus learners); default: the scenario's.
        #[arg(long)]
        nodes: Option<usize>,
        /// Report directory; default: target/chaos/<scenario>-<seed>.
        #[arg(long, value_name = "DIR")]
        report: Option<PathBuf>,
    },
    /// Run every scenario of the full set one after another (not `smoke`), with one
    /// seed; exit 1 if any violated an invariant.
    RunAll {
        #[command(flatten)]
        common: Common,
        /// Directory for the reports (one subdirectory per scenario); default: target/chaos.
        #[arg(long, value_name = "DIR")]
        report_root: Option<PathBuf>,
    },
    /// Internal: a tiny TCP peer run inside a network namespace to show that a
    /// partition takes effect (`serve`, `session:ADDR`, `connect:ADDR`).
    #[command(name = "netns-probe", hide = true)]
    NetnsProbe {
        /// What to do.
        role: String,
    },
}

#[derive(clap::Args)]
struct Common {
    /// Seed of the fault schedule, the workload and the proxy's losses; default: from
    /// the clock (printed, so the run can be replayed).
    #[arg(long)]
    seed: Option<u64>,
    /// Length of the fault window (the workload runs through it; healing, liveness
    /// checks and the report come after).
    #[arg(long, default_value = "60s", value_parser = mesh_core::duration::parse_duration)]
    duration: Duration,
    /// The mesh-node executable to start (e.g. a negative-control build); default: the
    /// one beside mesh-chaos.
    #[arg(long, value_name = "PATH")]
    node_bin: Option<PathBuf>,
    /// Keep the nodes' data directories after the run (the path is printed).
    #[arg(long)]
    keep: bool,
    /// Run every node in a network namespace of its own (root only) and make
    /// partitions with nftables drops instead of the proxy; scenarios with latency
    /// or loss need the proxy and are refused (run-all skips them).
    #[arg(long)]
    netns: bool,
    /// Raft log entries between two snapshots on every node (`mesh-node
    /// --snapshot-every`). Small by default, so that every run builds snapshots and
    /// nodes that fall behind (restarted, wiped, cut off) catch up by installing the
    /// leader's, under the faults; the nodes' own default is 20000.
    #[arg(long, default_value_t = 100, value_name = "ENTRIES")]
    snapshot_every: u64,
}

fn seed_or_clock(seed: Option<u64>) -> u64 {
    seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 % 1_000_000)
    })
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Cmd::List => {
            for s in SCENARIOS {
                println!("{:24} {:>2} nodes  {}", s.name, s.nodes, s.about);
            }
            0
        }
        Cmd::Run {
            scenario,
            common,
            nodes,
            report,
        } => {
            let Some(s) = scenario::find(&scenario) else {
                eprintln!("error: unknown scenario '{scenario}'; the scenarios are: {} (`mesh-chaos list`)", scenario::names());
                std::process::exit(2);
            };
            let seed = seed_or_clock(common.seed);
            let opts = RunOptions {
                scenario: s,
                seed,
                nodes,
                duration: common.duration,
                report_dir: report.unwrap_or_else(|| run::default_report_dir(s.name, seed)),
                node_bin: common.node_bin,
                keep: common.keep,
                netns: common.netns,
                snapshot_every: common.snapshot_every,
            };
            one(&opts)
        }
        Cmd::NetnsProbe { role } => mesh_chaos::netns::probe_peer(&role),
        Cmd::RunAll {
            common,
            report_root,
        } => {
            let seed = seed_or_clock(common.seed);
            let mut worst = 0;
            let mut lines = Vec::new();
            for s in SCENARIOS
                .iter()
                .filter(|s| s.in_full_set && !(common.netns && s.needs_proxy()))
            {
                let report_dir = match &report_root {
                    Some(r) => r.join(format!("{}-{seed}", s.name)),
                    None => run::default_report_dir(s.name, seed),
                };
                let opts = RunOptions {
                    scenario: s,
                    seed,
                    nodes: None,
                    duration: common.duration,
                    report_dir,
                    node_bin: common.node_bin.clone(),
                    keep: common.keep,
                    netns: common.netns,
                    snapshot_every: common.snapshot_every,
                };
                let started = std::time::Instant::now();
                let code = one(&opts);
                let verdict =
                    ["pass", "FAIL (invariant violated)", "ERROR (harness)"][code as usize];
                lines.push(format!(
                    "{:24} seed {seed:<8} {:>5.0} s  {verdict}",
                    s.name,
                    started.elapsed().as_secs_f64()
                ));
                worst = worst.max(code);
            }
            println!("\nmesh-chaos run-all, seed {seed}:");
            for l in lines {
                println!("  {l}");
            }
            worst
        }
    };
    std::process::exit(code);
}

/// Run one scenario and print its verdict; returns the exit status.
fn one(opts: &RunOptions) -> i32 {
    // A bug in the harness must not read as a verdict on the mesh: a panic is exit 2
    // (the nodes are killed as the cluster unwinds).
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run::run(opts)))
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the harness panicked (see above)")));
    match result {
        Ok(out) if out.violations.is_empty() => {
            println!(
                "mesh-chaos: {} seed {}: PASS, every invariant held ({:.0} s); report in {}",
                opts.scenario.name,
                opts.seed,
                out.wall.as_secs_f64(),
                out.report_dir.display()
            );
            0
        }
        Ok(out) => {
            println!(
                "mesh-chaos: {} seed {}: FAIL ({:.0} s); report in {}",
                opts.scenario.name,
                opts.seed,
                out.wall.as_secs_f64(),
                out.report_dir.display()
            );
            for v in out.violations.iter().take(20) {
                println!("  violated {}: {}", v.invariant, v.detail);
            }
            if out.violations.len() > 20 {
                println!("  ... {} more in report.md", out.violations.len() - 20);
            }
            1
        }
        Err(e) => {
            eprintln!(
                "error: the harness could not run {} seed {}: {e:#}",
                opts.scenario.name, opts.seed
            );
            2
        }
    }
}
