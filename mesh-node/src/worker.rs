//! Runs the tasks the mesh assigned to this node on the local GPU and reports back.
//!
//! Execution is at least once (a restart re-runs an attempt that was in flight); the
//! state machine records one result, from the current attempt only.

use crate::gpu::Executor;
use crate::liveness::Liveness;
use std::time::Duration;
use crate::proposer::Proposer;
use crate::store::StateView;
use mesh_core::kernel::{self, KernelPlan};
use mesh_core::task::{KernelSpec, NamedBytes, Task, TaskState};
use mesh_core::{Attempt, Bytes, Command, NodeId, Outcome, TaskId};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

/// The executing part of a node.
pub struct Worker {
    node: NodeId,
    state: StateView,
    proposer: Proposer,
    executor: Arc<Executor>,
    liveness: Liveness,
    node_timeout: Duration,
}

/// An attempt this node is executing now.
type Running = Arc<Mutex<BTreeSet<(TaskId, Attempt)>>>;

impl Worker {
    /// A worker for `node`.
    pub fn new(
        node: NodeId,
        state: StateView,
        proposer: Proposer,
        executor: Arc<Executor>,
        liveness: Liveness,
        node_timeout: Duration,
    ) -> Worker {
        Worker { node, state, proposer, executor, liveness, node_timeout }
    }

    /// Watch the state and run every attempt assigned here, until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let running: Running = Arc::default();
        let tracker = TaskTracker::new();
        let mut changes = self.state.changes();
        let mut tick = tokio::time::interval(self.node_timeout / 2);
        loop {
            // Cut off from the leader: start nothing; our reports would be fenced.
            let cut_off = self.liveness.cut_off(self.node_timeout);
            let mine: Vec<Task> = if cut_off { Vec::new() } else { self.collect(&running) };
            for task in mine {
                let key = (task.id, task.attempt);
                running.lock().expect("not poisoned").insert(key);
                let span = tracing::info_span!("attempt", task = %key.0, attempt = %key.1, node = %self.node);
                let run = execute(self.node, task, self.state.clone(), self.proposer.clone(), self.executor.clone());
                let running = running.clone();
                tracker.spawn(
                    async move {
                        run.await;
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
    }

    /// Attempts assigned here that are not running yet.
    fn collect(&self, running: &Running) -> Vec<Task> {
        self.state.read(|s| {
            s.tasks_on(self.node)
                .filter(|t| t.state.assignment().is_some_and(|(_, a)| !running.lock().expect("not poisoned").contains(&(t.id, a))))
                .cloned()
                .collect()
        })
    }
}

/// Run one attempt: confirm the start, dispatch, report the outcome.
async fn execute(node: NodeId, task: Task, state: StateView, proposer: Proposer, executor: Arc<Executor>) {
    let (id, attempt) = (task.id, task.attempt);
    if matches!(task.state, TaskState::Assigned { .. }) {
        match proposer.propose(Command::Start { task: id, attempt, node }).await {
            Ok(Outcome::Started(_)) => {}
            Ok(other) => {
                info!(%other, "attempt no longer current; not running it");
                return;
            }
            Err(e) => {
                warn!(error = %e, "could not confirm the start; will retry when the state changes");
                return;
            }
        }
    }
    let prepared = state.read(|s| prepare(&task, s));
    let report = match prepared {
        Err(e) => Command::Fail { task: id, attempt, node, error: e, retryable: false },
        Ok((plan, inputs)) => {
            let started = Instant::now();
            let exec = executor.clone();
            let job = tokio::task::spawn_blocking(move || exec.run(&plan, &inputs));
            match tokio::time::timeout(task.timeout, job).await {
                Ok(Ok(Ok(outputs))) => {
                    metrics::histogram!("mesh_gpu_dispatch_seconds").record(started.elapsed().as_secs_f64());
                    Command::Complete { task: id, attempt, node, outputs: outputs.into_iter().map(Bytes::from).collect() }
                }
                Ok(Ok(Err(e))) => Command::Fail { task: id, attempt, node, error: e.to_string(), retryable: e.retryable() },
                Ok(Err(join)) => Command::Fail { task: id, attempt, node, error: format!("the executor crashed: {join}"), retryable: true },
                Err(_) => Command::Fail {
                    task: id,
                    attempt,
                    node,
                    error: format!("timed out after {:?}", task.timeout),
                    retryable: true,
                },
            }
        }
    };
    let completed = matches!(report, Command::Complete { .. });
    match proposer.propose(report).await {
        Ok(Outcome::Rejected(r)) => info!(reason = %r, "report refused (the attempt is no longer current)"),
        Ok(outcome) => {
            metrics::counter!("mesh_attempts_finished_total", "outcome" => if completed { "succeeded" } else { "failed" }).increment(1);
            info!(%outcome, "attempt reported");
        }
        Err(e) => warn!(error = %e, "could not report the attempt; it will run again"),
    }
}

/// The plan and input bytes of a task, from the replicated state.
fn prepare(task: &Task, s: &mesh_core::MeshState) -> Result<(KernelPlan, Vec<Bytes>), String> {
    let inputs: Vec<NamedBytes> = task
        .inputs
        .iter()
        .map(|r| {
            s.blob(&r.digest)
                .map(|data| NamedBytes { name: r.name.clone(), data: data.clone() })
                .ok_or_else(|| format!("input {} ({}) is missing from the state", r.name, r.digest.short()))
        })
        .collect::<Result<_, _>>()?;
    let declared = match &task.kernel {
        KernelSpec::Wgsl { .. } => task.outputs.clone(),
        KernelSpec::Builtin { .. } => Vec::new(),
    };
    let plan = kernel::plan(&task.kernel, &inputs, &declared).map_err(|e| e.to_string())?;
    Ok((plan, inputs.into_iter().map(|i| i.data).collect()))
}
