//! The workload: client threads that submit tasks through real `mesh-cli` processes,
//! each with an idempotency key and an output the CPU can recompute (saxpy and
//! reduce-sum; mandelbrot, sharded or long, where the scenario needs it). An ambiguous
//! submit is retried with the same key, which is how a careful client retries.

use crate::history::{History, SubmitAttempt, SubmitOutcome};
use crate::scenario::Mix;
use crate::schedule::Rng;
use crate::{lcg_f32, Cli, CliOutput};
use mesh_core::builtin;
use mesh_core::task::NamedBytes;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest one `mesh-cli submit` may take before the client gives up on it (and counts
/// it as ambiguous): a paused or cut-off node can hold the SSH session forever.
pub const SUBMIT_LIMIT: Duration = Duration::from_secs(10);
/// Longest a read-only `mesh-cli` call (task, tasks, status) may take.
pub const READ_LIMIT: Duration = Duration::from_secs(5);
/// Tries of one logical submit (the first and its retries with the same key).
const SUBMIT_TRIES: usize = 4;
/// Attempts a workload task may use: faults kill attempts on purpose, and a task that
/// ends `failed` only because the harness killed it five times proves nothing.
const TASK_MAX_ATTEMPTS: &str = "10";
/// Per-attempt time limit of a workload task.
const TASK_TIMEOUT: &str = "60s";
/// Longest the heavy client waits for one of its tasks before submitting the next.
const HEAVY_WAIT: Duration = Duration::from_secs(30);
/// Light clients: two, each pausing 0.4-0.8 s between submits, about three tasks a
/// second in all: enough to have work in flight at every fault, light enough for two
/// cores that also run every node on lavapipe.
const LIGHT_CLIENTS: usize = 2;

/// A task a client submits, with everything needed to recompute its output.
#[derive(Debug, Clone)]
pub struct TaskPlan {
    /// Idempotency key (unique per run).
    pub key: String,
    /// Built-in kernel.
    pub kernel: &'static str,
    /// Parameters, as sent.
    pub params: BTreeMap<String, String>,
    /// Input buffers.
    pub inputs: Vec<(String, Vec<u8>)>,
    /// Shards (1: not sharded).
    pub shards: u32,
}

impl TaskPlan {
    /// A small saxpy or reduce-sum task.
    pub fn light(rng: &mut Rng, key: String) -> TaskPlan {
        let floats = |rng: &mut Rng, n: usize| builtin::f32_bytes(&lcg_f32(rng.next_u64(), n));
        if rng.chance(60) {
            let n = rng.between(64, 2048) as usize;
            // A multiple of 1/4: the node and the reference parse the same exact f32.
            let a = (rng.between(0, 64) as f32 - 32.0) / 4.0;
            TaskPlan {
                key,
                kernel: "saxpy",
                params: BTreeMap::from([("a".to_string(), a.to_string())]),
                inputs: vec![("x".into(), floats(rng, n)), ("y".into(), floats(rng, n))],
                shards: 1,
            }
        } else {
            let n = rng.between(256, 8192) as usize;
            TaskPlan {
                key,
                kernel: "reduce-sum",
                params: BTreeMap::new(),
                inputs: vec![("x".into(), floats(rng, n))],
                shards: 1,
            }
        }
    }

    /// A mandelbrot task of a second or more on lavapipe: in `shards` shards
    /// (checkpointed one by one) or whole; `max_iter` is drawn from `iters`.
    pub fn mandelbrot(rng: &mut Rng, key: String, shards: u32, iters: &[u32]) -> TaskPlan {
        // Few distinct parameter sets, so the checker computes each reference once.
        let max_iter = iters[rng.below(iters.len() as u64) as usize];
        let params = BTreeMap::from([
            ("width".to_string(), "512".to_string()),
            ("height".to_string(), "512".to_string()),
            ("max_iter".to_string(), max_iter.to_string()),
        ]);
        TaskPlan {
            key,
            kernel: "mandelbrot",
            params,
            inputs: Vec::new(),
            shards,
        }
    }

    /// The `mesh-cli` arguments that submit it; input files are written under `dir`.
    pub fn submit_args(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        let mut args: Vec<String> = ["--json", "submit", "--kernel", self.kernel]
            .map(String::from)
            .to_vec();
        for (k, v) in &self.params {
            args.extend(["--param".to_string(), format!("{k}={v}")]);
        }
        for (name, bytes) in &self.inputs {
            let file = dir.join(format!("{}-{name}.bin", self.key));
            if !file.exists() {
                std::fs::write(&file, bytes)?;
            }
            args.extend(["--input".to_string(), format!("{name}=@{}", file.display())]);
        }
        if self.shards > 1 {
            args.extend(["--shards".to_string(), self.shards.to_string()]);
        }
        args.extend(
            [
                "--idempotency-key",
                &self.key,
                "--max-attempts",
                TASK_MAX_ATTEMPTS,
                "--timeout",
                TASK_TIMEOUT,
            ]
            .map(String::from),
        );
        Ok(args)
    }

    /// The output the task must produce: mesh-core's CPU reference. Shards concatenate
    /// to the unsharded output, so the same reference holds for a sharded task.
    pub fn reference(&self) -> Vec<u8> {
        let inputs: Vec<NamedBytes> = self
            .inputs
            .iter()
            .map(|(name, data)| NamedBytes {
                name: name.clone(),
                data: data.clone().into(),
            })
            .collect();
        builtin::cpu_reference(self.kernel, &self.params, &inputs)
    }

    /// What identifies the reference: tasks with equal identities have equal outputs
    /// (lets the checker compute a mandelbrot reference once).
    pub fn reference_key(&self) -> Option<String> {
        self.inputs
            .is_empty()
            .then(|| format!("{}{:?}", self.kernel, self.params))
    }
}

/// The nodes as the clients see them: a pinned client for each, and whether the
/// nemesis has it running (a killed or paused node is not worth sending to; a
/// partitioned one is, and its answers are part of the test).
pub struct Targets {
    /// `clis[i]` talks to node `i`.
    pub clis: Vec<Cli>,
    up: Vec<AtomicBool>,
}

impl Targets {
    /// All nodes up.
    pub fn new(clis: Vec<Cli>) -> Targets {
        let up = clis.iter().map(|_| AtomicBool::new(true)).collect();
        Targets { clis, up }
    }

    /// Mark node `i` running (true) or killed/paused (false).
    pub fn set_up(&self, i: usize, up: bool) {
        self.up[i].store(up, Ordering::SeqCst);
    }

    /// Whether node `i` is marked running.
    pub fn is_up(&self, i: usize) -> bool {
        self.up[i].load(Ordering::SeqCst)
    }

    /// A node marked up, drawn from `rng` (any node if none is).
    pub fn pick(&self, rng: &mut Rng) -> usize {
        let up: Vec<usize> = (0..self.clis.len()).filter(|i| self.is_up(*i)).collect();
        if up.is_empty() {
            rng.below(self.clis.len() as u64) as usize
        } else {
            up[rng.below(up.len() as u64) as usize]
        }
    }
}

/// Sorts a failed `mesh-cli submit` into "did not happen" and "may have happened".
pub fn classify(out: &CliOutput) -> SubmitOutcome {
    if out.code == 0 {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        return match v["task"].as_u64() {
            Some(task) => SubmitOutcome::Ack {
                task,
                existing: v["existing"].as_bool().unwrap_or(false),
            },
            None => SubmitOutcome::Ambiguous {
                why: format!("exit 0 without a task id: {}", out.text().trim()),
            },
        };
    }
    let why = out
        .stderr
        .trim()
        .lines()
        .last()
        .unwrap_or("no message")
        .to_string();
    // Only errors raised before anything could be proposed are definite.
    let definite = [
        "cannot connect to node",
        "was not sent",
        "task refused:",
        "too many",
    ];
    if out.code != -1 && definite.iter().any(|d| why.contains(d)) {
        SubmitOutcome::Failed { why }
    } else {
        SubmitOutcome::Ambiguous { why }
    }
}

/// What every client shares.
#[derive(Clone)]
pub struct ClientCtx {
    /// The record.
    pub history: Arc<History>,
    /// The nodes.
    pub targets: Arc<Targets>,
    /// Where input files go.
    pub input_dir: PathBuf,
    /// The run's seed.
    pub seed: u64,
    /// Prefix of every idempotency key.
    pub key_prefix: String,
    /// Set to stop the clients.
    pub stop: Arc<AtomicBool>,
}

impl ClientCtx {
    /// Submit `plan` until acknowledged or out of tries; returns the task id.
    pub fn submit(&self, plan: TaskPlan, client: &str, rng: &mut Rng) -> Option<u64> {
        let args = match plan.submit_args(&self.input_dir) {
            Ok(a) => a,
            Err(e) => {
                crate::phase(&format!(
                    "client {client}: cannot write inputs of {}: {e}",
                    plan.key
                ));
                return None;
            }
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let op = self.history.begin_op(Arc::new(plan), client);
        for _ in 0..SUBMIT_TRIES {
            let node_index = self.targets.pick(rng);
            let start_ms = self.history.now_ms();
            let out = self.targets.clis[node_index].run_within(&args, SUBMIT_LIMIT);
            let outcome = classify(&out);
            let end_ms = self.history.now_ms();
            let acked = match outcome {
                SubmitOutcome::Ack { task, .. } => Some(task),
                _ => None,
            };
            self.history.attempt(
                op,
                SubmitAttempt {
                    start_ms,
                    end_ms,
                    node_index,
                    outcome,
                },
            );
            if acked.is_some() {
                return acked;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        None
    }

    /// Poll until task `id` is terminal or `limit` passes.
    fn wait_terminal(&self, id: u64, limit: Duration, rng: &mut Rng) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline && !self.stop.load(Ordering::SeqCst) {
            let i = self.targets.pick(rng);
            let out =
                self.targets.clis[i].run_within(&["--json", "task", &id.to_string()], READ_LIMIT);
            if out.code == 0 {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                if v["state"].as_str().is_some_and(is_terminal) {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Whether a task state is final.
pub fn is_terminal(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "cancelled")
}

/// The running client threads.
pub struct Workload {
    handles: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Workload {
    /// Start the clients of `mix`.
    pub fn start(ctx: ClientCtx, mix: Mix) -> Workload {
        let mut handles = Vec::new();
        for c in 0..LIGHT_CLIENTS {
            let ctx = ctx.clone();
            handles.push(std::thread::spawn(move || {
                let mut rng = Rng::stream(ctx.seed, 100 + c as u64);
                let name = format!("light-{c}");
                for n in 0.. {
                    if ctx.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let plan = TaskPlan::light(&mut rng, format!("{}-{name}-{n}", ctx.key_prefix));
                    ctx.submit(plan, &name, &mut rng);
                    std::thread::sleep(rng.millis(400, 800));
                }
            }));
        }
        if mix != Mix::Light {
            let ctx = ctx.clone();
            handles.push(std::thread::spawn(move || {
                let mut rng = Rng::stream(ctx.seed, 200);
                for n in 0.. {
                    if ctx.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let key = format!("{}-heavy-{n}", ctx.key_prefix);
                    // Sharded: 8 shards of a few hundred ms each, so a kill lands between
                    // two. Long: about two seconds whole, so a pause lands mid-task.
                    let plan = match mix {
                        Mix::Sharded => TaskPlan::mandelbrot(&mut rng, key, 8, &[2000, 2500, 3000]),
                        _ => TaskPlan::mandelbrot(&mut rng, key, 1, &[5000, 6000, 7000]),
                    };
                    match ctx.submit(plan, "heavy", &mut rng) {
                        Some(id) => ctx.wait_terminal(id, HEAVY_WAIT, &mut rng),
                        None => std::thread::sleep(Duration::from_secs(1)),
                    }
                }
            }));
        }
        Workload {
            handles,
            stop: ctx.stop,
        }
    }

    /// Stop the clients and wait for their last submits to end (bounded by the
    /// submit limit and tries).
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(code: i32, stdout: &str, stderr: &str) -> CliOutput {
        CliOutput {
            code,
            stdout: stdout.as_bytes().to_vec(),
            stderr: stderr.into(),
        }
    }

    #[test]
    fn outcomes_are_sorted_as_jepsen_would() {
        assert!(matches!(
            classify(&out(0, r#"{"task":4,"existing":true}"#, "")),
            SubmitOutcome::Ack {
                task: 4,
                existing: true
            }
        ));
        assert!(matches!(
            classify(&out(
                1,
                "",
                "error: cannot connect to node 127.0.0.1:1: refused"
            )),
            SubmitOutcome::Failed { .. }
        ));
        assert!(matches!(
            classify(&out(
                1,
                "",
                "error: no leader: timed out waiting for a commit"
            )),
            SubmitOutcome::Ambiguous { .. }
        ));
        assert!(matches!(
            classify(&out(-1, "", "killed after 10s")),
            SubmitOutcome::Ambiguous { .. }
        ));
    }

    #[test]
    fn plans_replay_from_the_seed_and_match_their_reference_shape() {
        let a = TaskPlan::light(&mut Rng::new(3), "k".into());
        let b = TaskPlan::light(&mut Rng::new(3), "k".into());
        assert_eq!(
            (a.kernel, &a.params, &a.inputs),
            (b.kernel, &b.params, &b.inputs)
        );
        let r = a.reference();
        match a.kernel {
            "saxpy" => assert_eq!(r.len(), a.inputs[0].1.len()),
            _ => assert_eq!(r.len(), 4),
        }
    }
}
