//! The fault schedule of a run: which faults, when, and for how long, drawn from the
//! run's seed alone, so the same seed replays the same schedule.
//!
//! A fault names its target by role (the leader, "a node that is not the leader") and a
//! seeded `pick` among the candidates; which concrete node that is gets decided when
//! the fault is injected, from the cluster as it is then (as Jepsen's nemeses do).

use serde::Serialize;
use std::time::Duration;

/// SplitMix64: a small seeded generator. Written out here instead of taken from `rand`
/// so that a seed printed today replays the same schedule with any later dependency
/// versions.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// An independent generator for one consumer (`stream`) of the same seed: the
    /// schedule, each workload client, ... draw from their own streams, so adding a
    /// client does not change the fault schedule.
    pub fn stream(seed: u64, stream: u64) -> Rng {
        let mut r = Rng(seed ^ stream.wrapping_mul(0xd6e8_feb8_6659_fd93));
        r.next_u64();
        r
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    /// A duration uniform in `lo..=hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.between(lo, hi))
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// One fault the nemesis can inject.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Fault {
    /// SIGKILL the leader; start it again (same data) after the hold.
    KillLeader,
    /// SIGKILL a node that is not the leader; start it again after the hold.
    KillFollower {
        /// Seeded choice among the candidates.
        pick: u64,
    },
    /// SIGSTOP the leader for the hold (longer than the election timeout), then SIGCONT.
    PauseLeader,
    /// SIGSTOP a node that is not the leader for the hold (longer than the node timeout).
    PauseFollower {
        /// Seeded choice among the candidates.
        pick: u64,
    },
    /// The leader alone on one side, every other node on the other, both directions.
    IsolateLeader,
    /// The leader and one other node on one side, the rest (a majority) on the other.
    LeaderMinority {
        /// Seeded choice of the leader's companion.
        pick: u64,
    },
    /// One-way: the leader cannot open or use its connections to any other node; the
    /// others can still reach it.
    OneWayFromLeader,
    /// One-way: no other node can reach the leader; the leader still reaches them.
    OneWayToLeader,
    /// Two halves that cannot see each other (the leader in one of them), and one
    /// bridge node, a follower, that sees both.
    Bridge {
        /// Seeded choice of the bridge node and of the halves.
        pick: u64,
    },
    /// Latency on every node-to-node link, each way.
    Delay {
        /// Added to every chunk, in milliseconds.
        ms: u64,
    },
    /// Loss on every node-to-node link: each chunk cuts its connection with this chance.
    Loss {
        /// Per-chunk probability, in percent.
        percent: u64,
    },
    /// SIGKILL the node running a sharded task after some of its shards are committed
    /// (checkpointed) and before the last; start it again after the hold.
    KillMidShard,
    /// SIGSTOP the node running a task for longer than the node timeout, so the task
    /// moves and completes elsewhere; then SIGCONT: its late result must be fenced.
    PauseMidTask,
    /// Stop a node, copy its data directory aside, start it again (the copy is used by
    /// a later [`Fault::Rollback`]).
    SaveDataDir {
        /// Seeded choice of the node.
        pick: u64,
    },
    /// Stop the node saved by [`Fault::SaveDataDir`] and start it on that older copy of
    /// its data directory.
    Rollback,
    /// Stop a node and wipe its data directory (its host key stays, as a machine's
    /// `/etc/ssh` key would); it joins again with a fresh token as a new node.
    Wipe {
        /// Seeded choice of the node.
        pick: u64,
    },
}

impl Fault {
    /// Short name, as the report shows it.
    pub fn name(&self) -> &'static str {
        match self {
            Fault::KillLeader => "kill-leader",
            Fault::KillFollower { .. } => "kill-follower",
            Fault::PauseLeader => "pause-leader",
            Fault::PauseFollower { .. } => "pause-follower",
            Fault::IsolateLeader => "isolate-leader",
            Fault::LeaderMinority { .. } => "leader-minority",
            Fault::OneWayFromLeader => "one-way-from-leader",
            Fault::OneWayToLeader => "one-way-to-leader",
            Fault::Bridge { .. } => "bridge",
            Fault::Delay { .. } => "delay",
            Fault::Loss { .. } => "loss",
            Fault::KillMidShard => "kill-mid-shard",
            Fault::PauseMidTask => "pause-mid-task",
            Fault::SaveDataDir { .. } => "save-data-dir",
            Fault::Rollback => "rollback-data-dir",
            Fault::Wipe { .. } => "wipe-data-dir",
        }
    }

    /// The family, for colours in the chart.
    pub fn family(&self) -> &'static str {
        match self {
            Fault::KillLeader | Fault::KillFollower { .. } | Fault::KillMidShard => "kill",
            Fault::PauseLeader | Fault::PauseFollower { .. } | Fault::PauseMidTask => "pause",
            Fault::IsolateLeader
            | Fault::LeaderMinority { .. }
            | Fault::OneWayFromLeader
            | Fault::OneWayToLeader
            | Fault::Bridge { .. } => "partition",
            Fault::Delay { .. } | Fault::Loss { .. } => "network",
            Fault::SaveDataDir { .. } | Fault::Rollback | Fault::Wipe { .. } => "disk",
        }
    }

    /// How long this fault is held, drawn from its kind's range.
    fn hold(&self, rng: &mut Rng) -> Duration {
        match self {
            // Long enough to miss several elections; a restart adds about a second.
            Fault::KillLeader | Fault::KillFollower { .. } | Fault::KillMidShard => {
                rng.millis(1500, 4000)
            }
            // Longer than the election timeout (300-600 ms) and the node timeout (1.5 s).
            Fault::PauseLeader | Fault::PauseFollower { .. } => rng.millis(2500, 4000),
            // The task must be marked down (1.5 s), move, and finish elsewhere first.
            Fault::PauseMidTask => rng.millis(4000, 5500),
            Fault::IsolateLeader
            | Fault::LeaderMinority { .. }
            | Fault::OneWayFromLeader
            | Fault::OneWayToLeader
            | Fault::Bridge { .. } => rng.millis(3000, 6000),
            Fault::Delay { .. } | Fault::Loss { .. } => rng.millis(4000, 8000),
            Fault::SaveDataDir { .. } => rng.millis(500, 1000),
            Fault::Rollback | Fault::Wipe { .. } => rng.millis(1000, 2500),
        }
    }
}

/// One scheduled fault.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// When to inject it, from the start of the fault window.
    #[serde(serialize_with = "as_millis")]
    pub at: Duration,
    /// How long to hold it before healing.
    #[serde(serialize_with = "as_millis")]
    pub hold: Duration,
    /// What to inject.
    pub fault: Fault,
}

/// Durations in reports are whole milliseconds.
pub fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// Where faults may fall: after `warmup` (so the "before" latencies have data), and
/// ending by `window`.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Quiet time at the start.
    pub warmup: Duration,
    /// End of the fault window, from its start.
    pub window: Duration,
}

/// Chooses the next fault of a scenario: `i` is its position in the schedule.
pub trait FaultMenu {
    /// The `i`-th fault, or `None` to end the schedule early.
    fn next_fault(&self, i: usize, rng: &mut Rng) -> Option<Fault>;
}

/// The seeded schedule: faults one after another, each held for its drawn time, with
/// a gap of 1.5 to 4 s between them so that the mesh settles and "between" latencies
/// have data.
pub fn generate(menu: &dyn FaultMenu, seed: u64, w: Window) -> Vec<Step> {
    let mut rng = Rng::stream(seed, 1);
    let mut steps = Vec::new();
    let mut at = w.warmup;
    for i in 0.. {
        let Some(fault) = menu.next_fault(i, &mut rng) else {
            break;
        };
        let hold = fault.hold(&mut rng);
        if at + hold > w.window {
            break;
        }
        steps.push(Step { at, hold, fault });
        at += hold + rng.millis(1500, 4000);
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Kills;
    impl FaultMenu for Kills {
        fn next_fault(&self, _i: usize, rng: &mut Rng) -> Option<Fault> {
            Some(if rng.chance(50) {
                Fault::KillLeader
            } else {
                Fault::PauseLeader
            })
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let w = Window {
            warmup: Duration::from_secs(2),
            window: Duration::from_secs(60),
        };
        let a = serde_json::to_string(&generate(&Kills, 7, w)).unwrap();
        assert_eq!(a, serde_json::to_string(&generate(&Kills, 7, w)).unwrap());
        assert_ne!(a, serde_json::to_string(&generate(&Kills, 8, w)).unwrap());
    }

    #[test]
    fn steps_fit_the_window_and_do_not_overlap() {
        let w = Window {
            warmup: Duration::from_secs(2),
            window: Duration::from_secs(30),
        };
        for seed in 0..50 {
            let steps = generate(&Kills, seed, w);
            assert!(!steps.is_empty());
            for pair in steps.windows(2) {
                assert!(pair[0].at + pair[0].hold < pair[1].at);
            }
            let last = steps.last().unwrap();
            assert!(last.at + last.hold <= w.window);
            assert!(steps[0].at >= w.warmup);
        }
    }

    #[test]
    fn streams_are_independent_and_stable() {
        let mut a = Rng::stream(1, 1);
        let mut b = Rng::stream(1, 2);
        assert_ne!(a.next_u64(), b.next_u64());
        // Pinned: a seed printed by an earlier build must replay the same schedule.
        assert_eq!(Rng::new(0).next_u64(), 0xe220_a839_7b1d_cdaf);
    }
}
