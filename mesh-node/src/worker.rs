//! Runs the attempts the mesh assigned to this node, in supervised GPU worker
//! processes, and reports them back through Raft.
//!
//! Execution is at least once (a restart re-runs an attempt that was in flight); the
//! state machine records one result, from the current attempt only. An attempt that
//! stops being current here (cancelled, moved after this node was marked down) is
//! cancelled: its worker process is killed. A sharded task commits each shard as a
//! checkpoint and resumes from the last one; on a drained node it hands the task back
//! at the next shard boundary.

use crate::gpu::{ExecError, Supervisor};
use crate::liveness::Liveness;
use crate::proposer::Proposer;
use crate::store::StateView;
use mesh_core::builtin;
use mesh_core::kernel::{self, BindingPlan, KernelPlan};
use mesh_core::task::{KernelSpec, NamedBytes, Task, TaskState};
use mesh_core::{Attempt, Bytes, Command, MeshState, NodeId, Outcome, TaskId};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

/// The executing part of a node.
pub struct Worker {
    ctx: Ctx,
    liveness: Liveness,
    node_timeout: Duration,
}

/// What one attempt's execution needs.
#[derive(Clone)]
struct Ctx {
    node: NodeId,
    state: StateView,
    proposer: Proposer,
    gpu: Arc<Supervisor>,
    memory_budget: Option<u64>,
}

/// Attempts executing now, each with the token that cancels it.
type Running = Arc<Mutex<BTreeMap<(TaskId, Attempt), CancellationToken>>>;

/// How long an unsharded attempt's kernel runs before its start is proposed. A kernel
/// done by then reports its result straight from `Assigned` (the state machine takes a
/// result from the current attempt, started or not): a small task commits three
/// entries instead of four, and never shows as running. A longer one is marked running
/// this much later; its start commits while the kernel goes on, as before. Twenty
/// commits' worth on the project's test machine (0.5 ms each), so the start costs a
/// task only when it ends within one commit after the grace.
const START_GRACE: Duration = Duration::from_millis(10);

impl Worker {
    /// A worker for `node` running on `gpu`; `memory_budget` caps the bytes of one
    /// dispatch's buffers.
    pub fn new(
        node: NodeId,
        state: StateView,
        proposer: Proposer,
        gpu: Arc<Supervisor>,
        memory_budget: Option<u64>,
        liveness: Liveness,
        node_timeout: Duration,
    ) -> Worker {
        Worker {
            ctx: Ctx {
                node,
                state,
                proposer,
                gpu,
                memory_budget,
            },
            liveness,
            node_timeout,
        }
    }

    /// Watch the state and run every attempt assigned here, until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let running: Running = Arc::default();
        let tracker = TaskTracker::new();
        let mut changes = self.ctx.state.changes();
        let mut tick = tokio::time::interval(self.node_timeout / 2);
        loop {
            // Cut off from the leader: stop our work and start nothing; our reports
            // would be fenced anyway.
            let cut_off = self.liveness.cut_off(self.node_timeout);
            self.cancel_stale(&running, cut_off);
            let mine = if cut_off {
                Vec::new()
            } else {
                self.new_attempts(&running)
            };
            for task in mine {
                let key = (task.id, task.attempt);
                let cancel = shutdown.child_token();
                running
                    .lock()
                    .expect("not poisoned")
                    .insert(key, cancel.clone());
                let span = tracing::info_span!("attempt", task = %key.0, attempt = %key.1, node = %self.ctx.node);
                let (ctx, running) = (self.ctx.clone(), running.clone());
                tracker.spawn(
                    async move {
                        execute(ctx, task, cancel).await;
                        running.lock().expect("not poisoned").remove(&key);
                    }
                    .instrument(span),
                );
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = changes.changed() => if r.is_err() { break },
                _ = tick.tick() => {}
            }
        }
        tracker.close();
        tracker.wait().await;
        self.ctx.gpu.shutdown().await;
    }

    /// Attempts assigned here that are not running yet.
    fn new_attempts(&self, running: &Running) -> Vec<Task> {
        let running = running.lock().expect("not poisoned");
        self.ctx.state.read(|s| {
            s.tasks_on(self.ctx.node)
                .filter(|t| {
                    t.state
                        .assignment()
                        .is_some_and(|(_, a)| !running.contains_key(&(t.id, a)))
                })
                .cloned()
                .collect()
        })
    }

    /// Cancel attempts that are no longer this node's current ones (cancelled tasks,
    /// tasks moved away): their worker processes are killed within a bounded time.
    fn cancel_stale(&self, running: &Running, cut_off: bool) {
        let running = running.lock().expect("not poisoned");
        self.ctx.state.read(|s| {
            for ((task, attempt), cancel) in running.iter() {
                let t = s.tasks.get(task);
                let current = t.and_then(|t| t.state.assignment()) == Some((self.ctx.node, *attempt));
                // Our own report just landed: nothing to stop.
                let ours_done = t.and_then(|t| t.result.as_ref()).is_some_and(|r| r.attempt == *attempt && r.node == self.ctx.node);
                if (cut_off || !current) && !ours_done && !cancel.is_cancelled() {
                    info!(%task, %attempt, cut_off, "attempt is no longer current here; stopping it");
                    cancel.cancel();
                }
            }
        });
    }
}

/// Run one attempt and report it. A sharded attempt confirms its start first: its
/// checkpoints are reports too. An unsharded one commits its start beside the kernel,
/// if at all ([`run_unsharded`]).
async fn execute(ctx: Ctx, task: Task, cancel: CancellationToken) {
    let report = if task.shards > 1 {
        if confirm_start(&ctx, &task).await != Start::Confirmed {
            return;
        }
        run_shards(&ctx, &task, &cancel).await
    } else {
        run_unsharded(&ctx, &task, &cancel).await
    };
    let Some(report) = report else { return };
    let completed = matches!(report, Command::Complete { .. });
    match ctx.proposer.propose(report).await {
        Ok(Outcome::Rejected(r)) => {
            info!(reason = %r, "report refused (the attempt is no longer current)")
        }
        Ok(outcome) => {
            metrics::counter!("mesh_attempts_finished_total", "outcome" => if completed { "succeeded" } else { "failed" })
                .increment(1);
            if matches!(outcome, Outcome::Completed(_)) {
                let took = crate::proposer::now().since(task.submitted_at);
                metrics::histogram!("mesh_task_submit_to_finish_seconds")
                    .record(took.as_secs_f64());
            }
            info!(%outcome, "attempt reported");
        }
        Err(e) => warn!(error = %e, "could not report the attempt; it will run again"),
    }
}

/// An unsharded attempt: its kernel starts at once. One that ends within
/// [`START_GRACE`] reports without a start (a start commit took as long as a small
/// kernel, on the path of every task). Past the grace its start is proposed while the
/// kernel goes on, and the report waits for the start, so the log keeps the start
/// before the result. A start the state machine refuses (the attempt stopped being
/// current) stops the kernel and nothing is reported; one that could not be committed
/// (no leader for a moment) does not: the report is proposed anyway, and the state
/// machine takes it if the attempt is still current.
async fn run_unsharded(ctx: &Ctx, task: &Task, cancel: &CancellationToken) -> Option<Command> {
    let kernel = run_whole(ctx, task, cancel);
    tokio::pin!(kernel);
    if let Ok(report) = tokio::time::timeout(START_GRACE, &mut kernel).await {
        return report;
    }
    let start = async {
        let start = confirm_start(ctx, task).await;
        if start == Start::Refused {
            cancel.cancel();
        }
        start
    };
    let (start, report) = tokio::join!(start, kernel);
    if start == Start::Refused {
        return None;
    }
    report
}

/// How confirming an attempt's start ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Committed now, or before a restart of this node.
    Confirmed,
    /// The state machine refused it: the attempt is no longer current.
    Refused,
    /// Not committed (no leader, a timeout); the attempt may still be current.
    Unconfirmed,
}

/// Commit the start of an attempt still `Assigned`.
async fn confirm_start(ctx: &Ctx, task: &Task) -> Start {
    if !matches!(task.state, TaskState::Assigned { .. }) {
        return Start::Confirmed;
    }
    let start = Command::Start {
        task: task.id,
        attempt: task.attempt,
        node: ctx.node,
    };
    match ctx.proposer.propose(start).await {
        Ok(Outcome::Started(_)) => {
            let waited = crate::proposer::now().since(task.submitted_at);
            metrics::histogram!("mesh_task_submit_to_start_seconds").record(waited.as_secs_f64());
            Start::Confirmed
        }
        Ok(other) => {
            info!(%other, "start refused: the attempt is no longer current; stopping it");
            Start::Refused
        }
        Err(e) => {
            warn!(error = %e, "could not confirm the start");
            Start::Unconfirmed
        }
    }
}

/// An unsharded attempt: one dispatch; the report to propose (None: nothing to report).
async fn run_whole(ctx: &Ctx, task: &Task, cancel: &CancellationToken) -> Option<Command> {
    let (id, attempt, node) = (task.id, task.attempt, ctx.node);
    let fail = |error: String, retryable: bool| {
        Some(Command::Fail {
            task: id,
            attempt,
            node,
            error,
            retryable,
        })
    };
    let (plan, inputs) = match ctx.state.read(|s| prepare(task, s)) {
        Ok(x) => x,
        Err(e) => return fail(e, false),
    };
    match dispatch(ctx, plan, inputs, task.timeout, cancel).await {
        Ok(outputs) => Some(Command::Complete {
            task: id,
            attempt,
            node,
            outputs,
        }),
        Err(ExecError::Cancelled | ExecError::ShuttingDown) => {
            info!("attempt stopped; its kernel was killed");
            None
        }
        Err(e) => fail(e.to_string(), e.retryable()),
    }
}

/// A sharded attempt: run the shards not yet committed, committing each as a
/// checkpoint; the last checkpoint completes the task in the state machine.
async fn run_shards(ctx: &Ctx, task: &Task, cancel: &CancellationToken) -> Option<Command> {
    let (id, attempt, node) = (task.id, task.attempt, ctx.node);
    let fail = |error: String, retryable: bool| {
        Some(Command::Fail {
            task: id,
            attempt,
            node,
            error,
            retryable,
        })
    };
    let KernelSpec::Builtin { name, params } = &task.kernel else {
        return fail("only built-in kernels can be sharded".into(), false);
    };
    let inputs = match ctx.state.read(|s| input_bytes(task, s)) {
        Ok(x) => x,
        Err(e) => return fail(e, false),
    };
    for shard in 0..task.shards {
        // Fresh look before every shard: the attempt may have moved, been cancelled,
        // or this node drained (then hand the task back at this boundary).
        let (done, current, drained) = ctx.state.read(|s| {
            let t = s.tasks.get(&id);
            (
                t.is_some_and(|t| t.checkpoints.contains_key(&shard)),
                t.and_then(|t| t.state.assignment()) == Some((node, attempt)),
                s.nodes.get(&node).is_some_and(|n| n.drained),
            )
        });
        if !current || cancel.is_cancelled() {
            return None;
        }
        if done {
            continue;
        }
        if drained {
            info!(
                shard,
                "node drained: handing the task back at a shard boundary"
            );
            return Some(Command::Release {
                task: id,
                attempt,
                node,
            });
        }
        let (plan, shard_inputs) =
            match builtin::plan_shard(name, params, &inputs, task.shards, shard) {
                Ok(x) => x,
                Err(e) => return fail(e.to_string(), false),
            };
        match dispatch(ctx, plan, shard_inputs, task.timeout, cancel).await {
            Ok(mut outputs) if outputs.len() == 1 => {
                let output = outputs.remove(0);
                match ctx
                    .proposer
                    .propose(Command::Checkpoint {
                        task: id,
                        attempt,
                        node,
                        shard,
                        output,
                    })
                    .await
                {
                    Ok(Outcome::Checkpointed { .. }) => info!(shard, "shard checkpointed"),
                    Ok(Outcome::Completed(_)) => {
                        info!(shard, "last shard checkpointed; task succeeded");
                        return None;
                    }
                    Ok(other) => {
                        info!(%other, "checkpoint refused; stopping");
                        return None;
                    }
                    Err(e) => {
                        warn!(error = %e, "could not commit a checkpoint; the attempt will run again");
                        return None;
                    }
                }
            }
            Ok(outputs) => {
                return fail(
                    format!("a shard produced {} outputs, expected 1", outputs.len()),
                    false,
                )
            }
            Err(ExecError::Cancelled | ExecError::ShuttingDown) => return None,
            Err(e) => return fail(format!("shard {shard}: {e}"), e.retryable()),
        }
    }
    None
}

/// One dispatch in a worker process, after the memory budget check.
async fn dispatch(
    ctx: &Ctx,
    plan: KernelPlan,
    inputs: Vec<Bytes>,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<Vec<Bytes>, ExecError> {
    let bytes = buffer_bytes(&plan, &inputs);
    if let Some(budget) = ctx.memory_budget.filter(|b| bytes > *b) {
        return Err(ExecError::OverBudget { bytes, budget });
    }
    ctx.gpu.run(plan, inputs, timeout, cancel.clone()).await
}

/// Bytes of every buffer a plan allocates.
fn buffer_bytes(plan: &KernelPlan, inputs: &[Bytes]) -> u64 {
    plan.bindings
        .iter()
        .map(|b| match b {
            BindingPlan::Input(i) => inputs.get(*i).map_or(0, |x| x.len() as u64),
            BindingPlan::Uniform(u) => u.len() as u64,
            BindingPlan::Output(o) => plan.outputs.get(*o).map_or(0, |x| x.size),
            BindingPlan::Scratch(bytes) => *bytes,
        })
        .sum()
}

/// The named input bytes of a task, from the replicated state.
fn input_bytes(task: &Task, s: &MeshState) -> Result<Vec<NamedBytes>, String> {
    task.inputs
        .iter()
        .map(|r| {
            s.blob(&r.digest)
                .map(|data| NamedBytes {
                    name: r.name.clone(),
                    data: data.clone(),
                })
                .ok_or_else(|| {
                    format!(
                        "input {} ({}) is missing from the state",
                        r.name,
                        r.digest.short()
                    )
                })
        })
        .collect()
}

/// The plan and input bytes of an unsharded task.
fn prepare(task: &Task, s: &MeshState) -> Result<(KernelPlan, Vec<Bytes>), String> {
    let inputs = input_bytes(task, s)?;
    let declared = match &task.kernel {
        KernelSpec::Wgsl { .. } => task.outputs.clone(),
        KernelSpec::Builtin { .. } => Vec::new(),
    };
    let plan = kernel::plan(&task.kernel, &inputs, &declared).map_err(|e| e.to_string())?;
    Ok((plan, inputs.into_iter().map(|i| i.data).collect()))
}
