//! The scenarios `mesh-chaos` runs: for each, the cluster's shape, the workload mix
//! and the menu its seeded fault schedule is drawn from.

use crate::schedule::{Fault, FaultMenu, Rng};

/// The kind of work the clients submit during a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mix {
    /// Small saxpy and reduce-sum tasks (a few per second).
    Light,
    /// Light, plus sharded mandelbrot tasks of a few seconds, one at a time, so a node
    /// can be killed between two of their shards.
    Sharded,
    /// Light, plus unsharded mandelbrot tasks of about a second, one at a time, so a
    /// node can be paused while it runs one.
    Long,
}

/// A named scenario.
#[derive(Debug)]
pub struct Scenario {
    /// Name on the command line.
    pub name: &'static str,
    /// One line for `mesh-chaos list`.
    pub about: &'static str,
    /// Nodes started (voters plus learners).
    pub nodes: usize,
    /// The voter target (`--voters`).
    pub voters: usize,
    /// What the clients submit.
    pub mix: Mix,
    /// Whether `run-all` includes it (`smoke` is CI's short run of the same machinery).
    pub in_full_set: bool,
}

/// Every scenario, in `list` order.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "smoke",
        about: "short CI run on 3 voters: kill the leader, cut the leader off, pause a follower",
        nodes: 3,
        voters: 3,
        mix: Mix::Light,
        in_full_set: false,
    },
    Scenario {
        name: "leader-kill",
        about: "SIGKILL the leader while tasks run, restart it on its data a few seconds later",
        nodes: 5,
        voters: 3,
        mix: Mix::Light,
        in_full_set: true,
    },
    Scenario {
        name: "leader-pause",
        about: "SIGSTOP the leader longer than the election timeout, then SIGCONT (and a follower past the node timeout)",
        nodes: 5,
        voters: 3,
        mix: Mix::Light,
        in_full_set: true,
    },
    Scenario {
        name: "partition-majority",
        about: "cut the leader off from the majority: alone, with one companion, or one way only",
        nodes: 5,
        voters: 5,
        mix: Mix::Light,
        in_full_set: true,
    },
    Scenario {
        name: "bridge",
        about: "two halves that only one bridge node can see both of (5 voters)",
        nodes: 5,
        voters: 5,
        mix: Mix::Light,
        in_full_set: true,
    },
    Scenario {
        name: "flaky-network",
        about: "latency and connection-cutting loss on every node-to-node link",
        nodes: 5,
        voters: 3,
        mix: Mix::Light,
        in_full_set: true,
    },
    Scenario {
        name: "worker-kill-mid-shard",
        about: "SIGKILL a node between two shards of a sharded task; it resumes from the checkpoint elsewhere",
        nodes: 4,
        voters: 3,
        mix: Mix::Sharded,
        in_full_set: true,
    },
    Scenario {
        name: "paused-worker",
        about: "SIGSTOP a node mid-task past the node timeout; the task completes elsewhere; the late result must be fenced",
        nodes: 4,
        voters: 3,
        mix: Mix::Long,
        in_full_set: true,
    },
    Scenario {
        name: "wiped-node",
        about: "wipe a node's data directory, host key kept: it rejoins with a fresh token as a new node, its old id removed",
        nodes: 5,
        voters: 3,
        mix: Mix::Light,
        in_full_set: true,
    },
    Scenario {
        name: "stale-data-dir",
        about: "copy a stopped node's data directory aside, later restart the node on that older copy",
        nodes: 5,
        voters: 3,
        mix: Mix::Light,
        in_full_set: true,
    },
    Scenario {
        name: "mixed",
        about: "all of the above, drawn from the seed",
        nodes: 5,
        voters: 3,
        mix: Mix::Sharded,
        in_full_set: true,
    },
];

/// The scenario called `name`.
pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// The names of all scenarios, for error messages.
pub fn names() -> String {
    SCENARIOS
        .iter()
        .map(|s| s.name)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Scenario {
    /// Whether the scenario injects latency or loss, which only the proxy can (the
    /// kernel on these machines has no netem qdisc): not runnable with `--netns`.
    pub fn needs_proxy(&self) -> bool {
        matches!(self.name, "flaky-network" | "mixed")
    }
}

impl FaultMenu for Scenario {
    fn next_fault(&self, i: usize, rng: &mut Rng) -> Option<Fault> {
        let pick = rng.next_u64();
        Some(match self.name {
            // Fixed order, so that a 20 s CI run still shows each family once.
            "smoke" => match i {
                0 => Fault::KillLeader,
                1 => Fault::IsolateLeader,
                2 => Fault::PauseFollower { pick },
                _ => return None,
            },
            "leader-kill" => {
                if rng.chance(80) {
                    Fault::KillLeader
                } else {
                    Fault::KillFollower { pick }
                }
            }
            "leader-pause" => {
                if rng.chance(75) {
                    Fault::PauseLeader
                } else {
                    Fault::PauseFollower { pick }
                }
            }
            "partition-majority" => match rng.below(4) {
                0 => Fault::IsolateLeader,
                1 => Fault::LeaderMinority { pick },
                2 => Fault::OneWayFromLeader,
                _ => Fault::OneWayToLeader,
            },
            "bridge" => Fault::Bridge { pick },
            "flaky-network" => {
                if i.is_multiple_of(2) {
                    Fault::Delay {
                        ms: rng.between(20, 200),
                    }
                } else {
                    Fault::Loss {
                        percent: rng.between(2, 15),
                    }
                }
            }
            "worker-kill-mid-shard" => Fault::KillMidShard,
            "paused-worker" => Fault::PauseMidTask,
            "wiped-node" => Fault::Wipe { pick },
            // A save first, so that a rollback has an older copy to go back to.
            "stale-data-dir" => {
                if i.is_multiple_of(2) {
                    Fault::SaveDataDir { pick }
                } else {
                    Fault::Rollback
                }
            }
            "mixed" => match i {
                0 => Fault::SaveDataDir { pick },
                _ => match rng.below(13) {
                    0 => Fault::KillLeader,
                    1 => Fault::KillFollower { pick },
                    2 => Fault::PauseLeader,
                    3 => Fault::PauseFollower { pick },
                    4 => Fault::IsolateLeader,
                    5 => Fault::LeaderMinority { pick },
                    6 => Fault::OneWayToLeader,
                    7 => Fault::Bridge { pick },
                    8 => Fault::Delay {
                        ms: rng.between(20, 200),
                    },
                    9 => Fault::Loss {
                        percent: rng.between(2, 15),
                    },
                    10 => Fault::KillMidShard,
                    11 => Fault::Wipe { pick },
                    _ => Fault::Rollback,
                },
            },
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{generate, Window};
    use std::time::Duration;

    #[test]
    fn every_scenario_has_faults_in_a_short_window() {
        let w = Window {
            warmup: Duration::from_secs(3),
            window: Duration::from_secs(20),
        };
        for s in SCENARIOS {
            assert!(
                !generate(s, 1, w).is_empty(),
                "{} has no fault in 20 s",
                s.name
            );
            assert!(s.voters <= s.nodes && s.voters % 2 == 1, "{}", s.name);
        }
    }

    #[test]
    fn smoke_shows_each_family_in_a_short_run() {
        let smoke = find("smoke").unwrap();
        for seed in 0..50 {
            let w = Window {
                warmup: Duration::from_secs(2),
                window: Duration::from_secs(20),
            };
            assert!(generate(smoke, seed, w).len() >= 2, "seed {seed}");
            let w = Window {
                warmup: Duration::from_secs(2),
                window: Duration::from_secs(24),
            };
            assert_eq!(generate(smoke, seed, w).len(), 3, "seed {seed}");
        }
    }
}
