//! `mesh-chaos`: fault injection against real `mesh-node` processes.
//!
//! The harness grows with the cluster: today it only names the scenarios it will run
//! and refuses to pretend it ran them (exit 2: the harness could not run).

use clap::{Parser, Subcommand};

/// Scenarios, with what each one injects.
const SCENARIOS: &[(&str, &str)] = &[
    ("leader-kill", "SIGKILL the leader while tasks run, restart it later"),
    ("leader-pause", "SIGSTOP the leader longer than the election timeout, then SIGCONT"),
    ("partition-majority", "cut the leader off from the majority"),
    ("bridge", "two halves that only one node can see both of"),
    ("flaky-network", "latency and packet loss on every node-to-node link"),
    ("worker-kill-mid-shard", "SIGKILL a node halfway through a sharded task"),
    ("wiped-node", "wipe a node's data directory and restart it under its old key"),
    ("mixed", "all of the above on a seeded schedule"),
];

/// Fault injection for a Mesh cluster of real processes.
#[derive(Parser)]
#[command(name = "mesh-chaos", version)]
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
        /// Seed of the fault schedule.
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn main() {
    match Cli::parse().command {
        Cmd::List => {
            for (name, what) in SCENARIOS {
                println!("{name:24} {what}");
            }
        }
        Cmd::Run { scenario, .. } => {
            if !SCENARIOS.iter().any(|(n, _)| *n == scenario) {
                eprintln!("error: unknown scenario '{scenario}'; `mesh-chaos list` shows them");
            } else {
                eprintln!("error: scenario '{scenario}' needs a multi-node mesh, which this build does not have yet");
            }
            std::process::exit(2);
        }
    }
}
