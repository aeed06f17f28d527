//! The daemon's side of GPU work: a pool of `mesh-node gpu-worker` processes, one job
//! at a time each, killed and replaced when a kernel hangs, crashes, loses its device
//! or is cancelled.
//!
//! Why processes: a dispatch blocked in the driver cannot be interrupted from inside
//! the process (a tokio timeout only stops waiting for it, and the stuck thread keeps
//! the device), and a driver crash takes its whole process down. SIGKILL on a worker
//! stops both, and the daemon keeps running.

use super::direct::{self, Refused, Region};
use super::exec_error::{ChildExit, ExecError, StartError};
use super::wire::{self, Answer, ChildErrorKind, FrameError, Hello, Reply, ReplyOutputs, ToWorker};
use mesh_core::capability::AdapterInfo;
use mesh_core::kernel::KernelPlan;
use mesh_core::Bytes;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdout};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The hidden `mesh-node` subcommand that runs a worker (see [`super::child`]).
pub const WORKER_SUBCOMMAND: &str = "gpu-worker";

/// How long a new worker may take to open its adapter and say so. Opening a device is
/// normally well under a second; a cold driver that loads and compiles its own code
/// can take several, and a worker silent for this long is stuck.
const WORKER_START_TIMEOUT: Duration = Duration::from_secs(30);

/// First pause after a worker fails to start; it doubles on every failure in a row.
const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest pause between restarts: a broken driver is retried this often, without
/// spinning, and a repaired one is picked up this soon.
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How long a worker whose pipe closed gets to exit on its own before it is killed,
/// and how long a killed one gets to be reaped before the crash is reported anyway.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// After a worker ended, how long to wait for the rest of its stderr (the crash
/// report is usually the last thing it wrote).
const STDERR_DRAIN: Duration = Duration::from_millis(500);
/// A killed worker that has not been reaped after this long is stuck in the driver:
/// say so, and keep its slot empty until it is gone.
const REAP_WARN_AFTER: Duration = Duration::from_secs(5);
/// How long [`Supervisor::shutdown`] waits for idle workers to exit and for the
/// supervisor's own tokio tasks to end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Lines of a worker's stderr kept for the crash report.
const STDERR_TAIL_LINES: usize = 20;
/// Longest stderr line kept or forwarded, bytes; longer ones are split.
const STDERR_LINE_MAX: u64 = 4096;

/// The program that runs as a GPU worker: normally the daemon's own executable.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    program: PathBuf,
    arg0: Option<OsString>,
    env: Vec<(OsString, OsString)>,
}

impl WorkerCommand {
    /// `program gpu-worker`, e.g. the `mesh-node` binary built for tests.
    pub fn new(program: impl Into<PathBuf>) -> WorkerCommand {
        WorkerCommand {
            program: program.into(),
            arg0: None,
            env: Vec::new(),
        }
    }

    /// The running executable. On Linux this is `/proc/self/exe`, which still runs
    /// this build after a package upgrade replaced the file on disk (a new binary
    /// would speak another pipe version); `ps` shows the real path as argv\[0\].
    pub fn current_exe() -> std::io::Result<WorkerCommand> {
        let exe = std::env::current_exe()?;
        let proc_self = PathBuf::from("/proc/self/exe");
        if proc_self.exists() {
            Ok(WorkerCommand {
                program: proc_self,
                arg0: Some(exe.into_os_string()),
                env: Vec::new(),
            })
        } else {
            Ok(WorkerCommand::new(exe))
        }
    }

    /// Add an environment variable for the workers (they inherit the daemon's
    /// environment besides), e.g. [`super::child::ABORT_ON_ENTRY_ENV`] in tests.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> WorkerCommand {
        self.env.push((key.into(), value.into()));
        self
    }
}

impl From<PathBuf> for WorkerCommand {
    fn from(program: PathBuf) -> WorkerCommand {
        WorkerCommand::new(program)
    }
}

/// Runs kernel plans in a fixed number of worker processes (slots), one job per
/// process at a time, so that killing one job's process never touches another's.
///
/// Every slot always holds one process: idle, running a job, or being replaced in
/// the background (with back-off while starts fail). Dropping the supervisor kills
/// its workers; [`Supervisor::shutdown`] lets idle ones exit cleanly first.
pub struct Supervisor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("adapter", &self.inner.info.name)
            .field("slots", &self.inner.slots)
            .finish()
    }
}

struct Inner {
    command: WorkerCommand,
    info: AdapterInfo,
    slots: usize,
    /// Workers waiting for a job. `available` has exactly one permit per entry.
    idle: Mutex<Vec<WorkerProcess>>,
    available: Semaphore,
    next_job: AtomicU64,
    restarts: AtomicU64,
    /// Why the kernel refused a direct copy, once it has. Until then jobs of
    /// [`DIRECT_MIN_BYTES`] or more take the direct route (`super::direct`); after,
    /// every job uses the pipe.
    direct_refused: OnceLock<String>,
    /// Why the most recent start failed, while starts keep failing.
    last_start_error: Mutex<Option<String>>,
    shutdown: CancellationToken,
    /// Replacements and stderr forwarders.
    tracker: TaskTracker,
}

/// One `mesh-node gpu-worker` process and its pipes.
struct WorkerProcess {
    child: Child,
    /// The worker's stdin as a pipe of tokio's own, which can lend it pages
    /// (`wire::splice_all_async`); `ChildStdin` cannot.
    stdin: tokio::net::unix::pipe::Sender,
    stdout: ChildStdout,
    pid: u32,
    slot: usize,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    stderr_forwarder: Option<JoinHandle<()>>,
}

/// Why a worker is replaced (the `reason` label of `mesh_gpu_child_restarts_total`).
#[derive(Debug, Clone, Copy)]
enum Replace {
    Timeout,
    Cancelled,
    Crashed,
    DeviceLost,
    Panicked,
    Protocol,
    /// Found dead while idle.
    ExitedIdle,
    /// The `run` future was dropped mid-job.
    Abandoned,
    /// The supervisor is stopping: kill and reap, start nothing.
    Shutdown,
}

impl Replace {
    fn as_str(self) -> &'static str {
        match self {
            Replace::Timeout => "timeout",
            Replace::Cancelled => "cancelled",
            Replace::Crashed => "crashed",
            Replace::DeviceLost => "device_lost",
            Replace::Panicked => "panicked",
            Replace::Protocol => "protocol",
            Replace::ExitedIdle => "exited_idle",
            Replace::Abandoned => "abandoned",
            Replace::Shutdown => "shutdown",
        }
    }
}

impl Supervisor {
    /// Start `slots` workers running `command` and wait until they have opened their
    /// adapter. Succeeds when at least one did; slots whose worker failed keep
    /// retrying in the background. When none did, returns the first slot's error
    /// ([`StartError::Adapter`] with the executor's message when there is no usable
    /// adapter).
    pub async fn start(
        command: impl Into<WorkerCommand>,
        slots: usize,
    ) -> Result<Supervisor, StartError> {
        if slots == 0 {
            return Err(StartError::NoSlots);
        }
        let command = command.into();
        let tracker = TaskTracker::new();
        let started = futures::future::join_all(
            (0..slots).map(|slot| spawn_worker(&command, &tracker, slot)),
        )
        .await;
        let mut ready = Vec::new();
        let mut failed = Vec::new();
        for (slot, result) in started.into_iter().enumerate() {
            match result {
                Ok(worker) => ready.push(worker),
                Err(e) => failed.push((slot, e)),
            }
        }
        let Some(info) = ready.first().map(|(_, info)| info.clone()) else {
            let (_, first) = failed.swap_remove(0);
            return Err(first);
        };
        tracing::info!(adapter = %info.name, backend = %info.backend, slots, started = ready.len(), "GPU workers ready");
        let inner = Arc::new(Inner {
            command,
            info,
            slots,
            available: Semaphore::new(ready.len()),
            idle: Mutex::new(ready.into_iter().map(|(worker, _)| worker).collect()),
            next_job: AtomicU64::new(1),
            restarts: AtomicU64::new(0),
            direct_refused: OnceLock::new(),
            last_start_error: Mutex::new(None),
            shutdown: CancellationToken::new(),
            tracker,
        });
        for (slot, e) in failed {
            tracing::warn!(slot, error = %e, "a GPU worker failed to start; retrying in the background");
            inner.set_start_error(Some(e.to_string()));
            let restarting = Arc::clone(&inner);
            inner
                .tracker
                .spawn(async move { restarting.refill(slot).await });
        }
        Ok(Supervisor { inner })
    }

    /// The adapter the workers run on (as the first worker reported it).
    pub fn info(&self) -> &AdapterInfo {
        &self.inner.info
    }

    /// Number of worker processes (jobs that can run at once).
    pub fn slots(&self) -> usize {
        self.inner.slots
    }

    /// Workers replaced since start (timeouts, cancels, crashes, lost devices).
    pub fn restarts(&self) -> u64 {
        self.inner.restarts.load(Ordering::Relaxed)
    }

    /// Whether jobs' inputs and outputs are copied straight between the daemon's
    /// memory and the workers' mapped staging buffers (`process_vm_writev`/`readv`),
    /// for jobs of at least a megabyte (smaller ones always take the pipe): true until
    /// the kernel refuses such a copy once; the pipe carries every job after that.
    pub fn copies_directly(&self) -> bool {
        self.inner.direct_refused.get().is_none()
    }

    /// Why the kernel refused a direct copy, once it has (`copies_directly` is false
    /// from then on): e.g. EFAULT where a discrete GPU's driver maps the worker's
    /// host-visible buffers as device memory, which `process_vm_writev` will not touch.
    pub fn direct_refusal(&self) -> Option<String> {
        self.inner.direct_refused.get().cloned()
    }

    /// Process ids of the idle workers, for diagnostics and tests.
    pub fn idle_pids(&self) -> Vec<u32> {
        self.inner.lock_idle().iter().map(|w| w.pid).collect()
    }

    /// Run `plan` with `inputs` in a free worker and return its outputs in
    /// `plan.outputs` order.
    ///
    /// `timeout` bounds the whole call, the wait for a free worker included. When it
    /// passes, or `cancel` fires, the worker is SIGKILLed at once, replaced in the
    /// background, and the call returns [`ExecError::Timeout`] or
    /// [`ExecError::Cancelled`] without waiting for the replacement. Dropping the
    /// returned future mid-job kills and replaces the worker too.
    pub async fn run(
        &self,
        plan: KernelPlan,
        inputs: Vec<Bytes>,
        timeout: Duration,
        cancel: CancellationToken,
    ) -> Result<Vec<Bytes>, ExecError> {
        let inner = &self.inner;
        let deadline = Instant::now() + timeout;
        let id = inner.next_job.fetch_add(1, Ordering::Relaxed);
        let bytes = inputs.iter().map(|b| b.len() as u64).sum::<u64>()
            + plan.outputs.iter().map(|o| o.size).sum::<u64>();
        let direct = bytes >= DIRECT_MIN_BYTES && self.copies_directly();
        let frame = wire::JobFrame::new(id, plan, inputs, direct).map_err(|e| match e {
            FrameError::TooLarge(bytes) => ExecError::TooLarge {
                bytes,
                limit: wire::MAX_FRAME_BYTES,
            },
            other => ExecError::Gpu(wire::ChildError {
                message: format!("the job cannot be encoded for the GPU worker: {other}"),
                retryable: false,
                kind: ChildErrorKind::InvalidPlan,
            }),
        })?;

        let worker = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(ExecError::Cancelled),
            _ = inner.shutdown.cancelled() => return Err(ExecError::ShuttingDown),
            taken = tokio::time::timeout_at(deadline, inner.take()) => match taken {
                Ok(Some(worker)) => worker,
                Ok(None) => return Err(ExecError::ShuttingDown),
                Err(_) => return Err(ExecError::Unavailable { waited: timeout, reason: inner.unavailable_reason() }),
            },
        };
        let mut lease = Lease {
            inner,
            worker: Some(worker),
        };
        let outcome = {
            let worker = lease.worker_mut();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => Outcome::Cancelled,
                _ = inner.shutdown.cancelled() => Outcome::ShuttingDown,
                done = worker.exchange(id, &frame, inner) => Outcome::Done(done),
                _ = tokio::time::sleep_until(deadline) => Outcome::Timeout,
            }
        };
        match outcome {
            Outcome::Done(Ok(done)) => match done.result {
                Ok(outputs) => {
                    metrics::histogram!("mesh_gpu_dispatch_seconds")
                        .record(done.elapsed.as_secs_f64());
                    lease.release();
                    Ok(outputs)
                }
                Err(e) => {
                    match e.kind {
                        ChildErrorKind::DeviceLost => lease.replace(Replace::DeviceLost),
                        ChildErrorKind::Panic => lease.replace(Replace::Panicked),
                        _ => lease.release(),
                    }
                    Err(ExecError::Gpu(e))
                }
            },
            Outcome::Done(Err(Exchange::Died)) => {
                let (status, stderr_tail) = lease.worker_mut().ended().await;
                tracing::warn!(%status, stderr_tail, "GPU worker crashed during a job");
                lease.replace(Replace::Crashed);
                Err(ExecError::Crashed {
                    status,
                    stderr_tail,
                })
            }
            Outcome::Done(Err(Exchange::Protocol(why))) => {
                tracing::error!(error = %why, "GPU worker broke the pipe protocol");
                lease.replace(Replace::Protocol);
                Err(ExecError::Protocol(why))
            }
            Outcome::Timeout => {
                lease.replace(Replace::Timeout);
                Err(ExecError::Timeout(timeout))
            }
            Outcome::Cancelled => {
                lease.replace(Replace::Cancelled);
                Err(ExecError::Cancelled)
            }
            Outcome::ShuttingDown => {
                lease.replace(Replace::Shutdown);
                Err(ExecError::ShuttingDown)
            }
        }
    }

    /// Stop: jobs in flight end with [`ExecError::ShuttingDown`] (their workers are
    /// killed), idle workers get their stdin closed and exit on their own, and no
    /// worker is started again. Waits at most a few seconds.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        inner.shutdown.cancel();
        inner.available.close();
        let idle = std::mem::take(&mut *inner.lock_idle());
        let exits = idle.into_iter().map(|worker| async move {
            let WorkerProcess {
                mut child,
                stdin,
                pid,
                ..
            } = worker;
            drop(stdin); // end of input: an idle worker exits cleanly
            if tokio::time::timeout(SHUTDOWN_GRACE, child.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    pid,
                    "GPU worker did not exit after its stdin closed; killing it"
                );
                let _ = child.kill().await;
            }
        });
        futures::future::join_all(exits).await;
        inner.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("GPU supervisor tasks still running after shutdown");
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // Replacement loops stop; idle workers die with `Inner` (kill_on_drop).
        self.inner.shutdown.cancel();
        self.inner.available.close();
    }
}

enum Outcome {
    Done(Result<Done, Exchange>),
    Timeout,
    Cancelled,
    ShuttingDown,
}

/// A job's end, its outputs in the daemon's memory.
struct Done {
    result: Result<Vec<Bytes>, wire::ChildError>,
    /// Time the worker spent on the job.
    elapsed: Duration,
}

/// Jobs whose inputs and outputs add up to less than this take the pipe even where
/// direct copies work: the direct route costs a round trip between the processes more
/// (the worker's addresses, the daemon's "written"), which small jobs do not win back
/// (in the GPU bench a 0.8 MB matmul ran ~0.2 ms faster by the pipe; 8 MB and more
/// ran 0.3-1.8 ms faster by the direct route).
pub const DIRECT_MIN_BYTES: u64 = 1024 * 1024;

/// Direct copies smaller than this run on the runtime's thread; larger ones on a
/// blocking thread, so that megabytes in flight do not stall other tasks.
const INLINE_COPY_BYTES: u64 = 256 * 1024;

/// Run a direct copy of `bytes` bytes (see [`INLINE_COPY_BYTES`]).
async fn copy<T: Send + 'static>(
    bytes: u64,
    f: impl FnOnce() -> Result<T, Refused> + Send + 'static,
) -> Result<T, Refused> {
    if bytes < INLINE_COPY_BYTES {
        return f();
    }
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Refused::Kernel(format!("the copy's thread failed: {e}"))))
}

/// Count one side of a job (inputs or outputs) moved by `route`.
fn transferred(route: &'static str) {
    metrics::counter!("mesh_gpu_transfers_total", "route" => route).increment(1);
}

/// A failed read from a worker's stdout as an exchange failure.
fn exchange_error(e: FrameError) -> Exchange {
    match e {
        FrameError::Closed | FrameError::Io(_) => Exchange::Died,
        e => Exchange::Protocol(format!("unreadable answer: {e}")),
    }
}

/// How one job exchange with a worker failed.
enum Exchange {
    /// The pipe closed or broke: the worker died.
    Died,
    /// The worker wrote something that is not the reply to this job.
    Protocol(String),
}

/// A worker taken from the pool for one job. It goes back with [`Lease::release`] or
/// is replaced with [`Lease::replace`]; dropped otherwise (the `run` future was
/// dropped), it is killed and replaced, so a slot is never lost.
struct Lease<'a> {
    inner: &'a Arc<Inner>,
    worker: Option<WorkerProcess>,
}

impl Lease<'_> {
    fn worker_mut(&mut self) -> &mut WorkerProcess {
        self.worker
            .as_mut()
            .expect("a lease holds its worker until it ends")
    }

    fn release(mut self) {
        if let Some(worker) = self.worker.take() {
            self.inner.release(worker);
        }
    }

    fn replace(mut self, why: Replace) {
        if let Some(worker) = self.worker.take() {
            self.inner.replace(worker, why);
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(worker) = self.worker.take() {
            self.inner.replace(worker, Replace::Abandoned);
        }
    }
}

impl Inner {
    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<WorkerProcess>> {
        // The lists stay consistent even if a holder panicked: take them anyway.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The kernel refused a direct copy: every later job takes the pipe. Logged once;
    /// at INFO when the memory is device memory the kernel never copies (NVIDIA's:
    /// expected, nothing to fix), at WARN for a policy or a fault.
    fn refuse_direct(&self, refusal: &Refused) {
        if self.direct_refused.set(refusal.to_string()).is_ok() {
            if refusal.expected() {
                tracing::info!(
                    error = %refusal,
                    "the kernel refused a direct copy to or from a GPU worker: its buffers \
                     are device memory, which the kernel does not copy (expected on NVIDIA \
                     GPUs); GPU jobs' inputs and outputs go through the worker's pipe"
                );
            } else {
                tracing::warn!(
                    error = %refusal,
                    "the kernel refused a direct copy to or from a GPU worker (a ptrace \
                     policy?); GPU jobs' inputs and outputs go through the worker's pipe \
                     from now on, which is slower"
                );
            }
        }
    }

    fn set_start_error(&self, error: Option<String>) {
        *self
            .last_start_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = error;
    }

    fn unavailable_reason(&self) -> String {
        match &*self
            .last_start_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            Some(e) => format!("GPU workers are failing to start: {e}"),
            None => format!(
                "all {} GPU worker slots were busy or restarting",
                self.slots
            ),
        }
    }

    /// Wait for an idle worker; `None` once the supervisor is shutting down.
    /// Cancel-safe: nothing is taken unless it is returned.
    async fn take(self: &Arc<Self>) -> Option<WorkerProcess> {
        loop {
            self.available.acquire().await.ok()?.forget();
            let Some(mut worker) = self.lock_idle().pop() else {
                continue;
            };
            match worker.child.try_wait() {
                Ok(None) => return Some(worker),
                Ok(Some(status)) => {
                    tracing::warn!(pid = worker.pid, status = %ChildExit::from(status), "GPU worker died while idle");
                    self.replace(worker, Replace::ExitedIdle);
                }
                Err(e) => {
                    tracing::warn!(pid = worker.pid, error = %e, "cannot check an idle GPU worker");
                    self.replace(worker, Replace::ExitedIdle);
                }
            }
        }
    }

    fn release(&self, worker: WorkerProcess) {
        self.lock_idle().push(worker);
        self.available.add_permits(1);
    }

    /// SIGKILL `worker` now, and in the background reap it and start its slot's
    /// replacement.
    fn replace(self: &Arc<Self>, mut worker: WorkerProcess, why: Replace) {
        // start_kill only fails for a process already reaped; either way it is gone.
        let _ = worker.child.start_kill();
        if !matches!(why, Replace::Shutdown) {
            self.restarts.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("mesh_gpu_child_restarts_total", "reason" => why.as_str())
                .increment(1);
            tracing::info!(
                slot = worker.slot,
                pid = worker.pid,
                reason = why.as_str(),
                "replacing GPU worker"
            );
        }
        if tokio::runtime::Handle::try_current().is_err() {
            // Only when a lease is dropped outside the runtime (at process exit).
            tracing::error!(
                slot = worker.slot,
                "no runtime to replace a GPU worker; the slot stays empty"
            );
            return;
        }
        let inner = Arc::clone(self);
        self.tracker.spawn(async move {
            let slot = worker.slot;
            inner.reap(worker).await;
            inner.refill(slot).await;
        });
    }

    /// Wait until a killed worker is gone, so that it has released its device before
    /// its replacement opens one.
    async fn reap(&self, mut worker: WorkerProcess) {
        if tokio::time::timeout(REAP_WARN_AFTER, worker.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                pid = worker.pid,
                "GPU worker still alive {REAP_WARN_AFTER:?} after SIGKILL (stuck in the driver?); its slot stays empty until it exits"
            );
            tokio::select! {
                _ = worker.child.wait() => {}
                _ = self.shutdown.cancelled() => {}
            }
        }
    }

    /// Start a worker for `slot`, backing off while starts fail, until one is idle
    /// in the pool or the supervisor shuts down.
    async fn refill(&self, slot: usize) {
        let mut delay = RESTART_BACKOFF_MIN;
        loop {
            let started = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                started = spawn_worker(&self.command, &self.tracker, slot) => started,
            };
            match started {
                Ok((worker, info)) => {
                    if info.name != self.info.name || info.backend != self.info.backend {
                        tracing::warn!(slot, adapter = %info.name, was = %self.info.name, "a restarted GPU worker opened a different adapter");
                    }
                    self.set_start_error(None);
                    if self.shutdown.is_cancelled() {
                        return; // dropping `worker` kills it
                    }
                    tracing::debug!(slot, pid = worker.pid, "GPU worker ready");
                    self.release(worker);
                    return;
                }
                Err(e) => {
                    metrics::counter!("mesh_gpu_child_start_failures_total").increment(1);
                    tracing::warn!(slot, error = %e, retry_in = ?delay, "GPU worker failed to start");
                    self.set_start_error(Some(e.to_string()));
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(RESTART_BACKOFF_MAX);
                }
            }
        }
    }
}

impl WorkerProcess {
    /// Send one job and get its outputs, by the direct route or the pipe (falling back
    /// to the pipe, for this job and every later one, when the kernel refuses a direct
    /// copy). Not cancel-safe: a caller that stops polling must kill the worker (the
    /// pipe may hold half a frame).
    async fn exchange(
        &mut self,
        id: u64,
        job: &wire::JobFrame,
        inner: &Inner,
    ) -> Result<Done, Exchange> {
        // EPIPE (the worker is gone) is an io error: Rust programs ignore SIGPIPE.
        job.write(&mut self.stdin)
            .await
            .map_err(|_| Exchange::Died)?;
        let mut answer = self.answer(id).await?;
        if let Answer::InputsAt { regions, .. } = answer {
            if !job.direct() {
                return Err(Exchange::Protocol(format!(
                    "input regions for job {id}, whose inputs went on the pipe"
                )));
            }
            let inputs = job.inputs().to_vec();
            let pid = self.pid;
            let bytes = regions.iter().map(|r| r.len).sum();
            match copy(bytes, move || direct::write_to(pid, &inputs, &regions)).await {
                Ok(()) => {
                    transferred("direct");
                    self.send(&ToWorker::InputsWritten).await?;
                }
                Err(Refused::Gone) => return Err(Exchange::Died),
                Err(refusal) => {
                    inner.refuse_direct(&refusal);
                    self.send(&ToWorker::InputsFollow).await?;
                    job.write_inputs(&mut self.stdin)
                        .await
                        .map_err(|_| Exchange::Died)?;
                    transferred("pipe");
                }
            }
            answer = self.answer(id).await?;
        } else if !job.direct() {
            transferred("pipe");
        }
        let Answer::Reply(reply) = answer else {
            return Err(Exchange::Protocol(format!(
                "a second set of input regions for job {id}"
            )));
        };
        let result = match reply.result {
            Ok(ReplyOutputs::Read(outputs)) => {
                transferred("pipe");
                Ok(outputs)
            }
            Ok(ReplyOutputs::At(regions)) => Ok(self.read_outputs(regions, inner).await?),
            Err(e) => Err(e),
        };
        Ok(Done {
            result,
            elapsed: reply.elapsed,
        })
    }

    /// Read a reply's outputs where the worker left them, or from the pipe when the
    /// kernel refuses.
    async fn read_outputs(
        &mut self,
        regions: Vec<Region>,
        inner: &Inner,
    ) -> Result<Vec<Bytes>, Exchange> {
        let lens: Vec<u64> = regions.iter().map(|r| r.len).collect();
        let pid = self.pid;
        let bytes = lens.iter().sum();
        match copy(bytes, move || direct::read_from(pid, &regions)).await {
            Ok(outputs) => {
                transferred("direct");
                Ok(outputs)
            }
            Err(Refused::Gone) => Err(Exchange::Died),
            Err(refusal) => {
                inner.refuse_direct(&refusal);
                self.send(&ToWorker::SendOutputs).await?;
                let outputs = wire::read_raw_async(&mut self.stdout, &lens)
                    .await
                    .map_err(exchange_error)?;
                transferred("pipe");
                Ok(outputs)
            }
        }
    }

    /// Read the worker's next answer, which must be about job `id`.
    async fn answer(&mut self, id: u64) -> Result<Answer, Exchange> {
        let answer = wire::read_answer_async(&mut self.stdout)
            .await
            .map_err(exchange_error)?;
        let about = match &answer {
            Answer::InputsAt { id, .. } => *id,
            Answer::Reply(Reply { id, .. }) => *id,
        };
        if about != id {
            return Err(Exchange::Protocol(format!(
                "an answer about job {about} while job {id} was running"
            )));
        }
        Ok(answer)
    }

    async fn send(&mut self, message: &ToWorker) -> Result<(), Exchange> {
        wire::send_async(&mut self.stdin, message)
            .await
            .map_err(|_| Exchange::Died)
    }

    /// The worker's pipe closed: wait (briefly) for it to end, kill it if it does
    /// not, and return how it ended with the tail of its stderr.
    async fn ended(&mut self) -> (ChildExit, String) {
        let status = match tokio::time::timeout(EXIT_GRACE, self.child.wait()).await {
            Ok(Ok(status)) => ChildExit::from(status),
            _ => {
                let _ = self.child.start_kill();
                match tokio::time::timeout(EXIT_GRACE, self.child.wait()).await {
                    Ok(Ok(status)) => ChildExit::from(status),
                    _ => ChildExit::Unknown,
                }
            }
        };
        if let Some(forwarder) = self.stderr_forwarder.take() {
            let _ = tokio::time::timeout(STDERR_DRAIN, forwarder).await;
        }
        let tail = self.stderr_tail.lock().unwrap_or_else(|e| e.into_inner());
        (status, tail.iter().cloned().collect::<Vec<_>>().join("\n"))
    }
}

/// Start one worker for `slot` and wait for its [`Hello`].
async fn spawn_worker(
    command: &WorkerCommand,
    tracker: &TaskTracker,
    slot: usize,
) -> Result<(WorkerProcess, AdapterInfo), StartError> {
    let mut cmd = tokio::process::Command::new(&command.program);
    if let Some(arg0) = &command.arg0 {
        cmd.arg0(arg0);
    }
    cmd.arg(WORKER_SUBCOMMAND)
        .envs(command.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| StartError::Spawn {
        program: command.program.clone(),
        source,
    })?;
    let pid = child.id().unwrap_or_default();
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(StartError::Protocol(
            "the GPU worker's pipes were not created".into(),
        ));
    };
    wire::widen_pipe(&stdin);
    wire::widen_pipe(&stdout);
    let stdin = stdin
        .into_owned_fd()
        .and_then(tokio::net::unix::pipe::Sender::from_owned_fd)
        .map_err(|e| StartError::Protocol(format!("the GPU worker's stdin: {e}")))?;
    let stderr_tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL_LINES)));
    let forwarder = tracker.spawn(forward_stderr(stderr, pid, slot, Arc::clone(&stderr_tail)));
    let mut worker = WorkerProcess {
        child,
        stdin,
        stdout,
        pid,
        slot,
        stderr_tail,
        stderr_forwarder: Some(forwarder),
    };
    let body = match tokio::time::timeout(
        WORKER_START_TIMEOUT,
        wire::read_body_async(&mut worker.stdout),
    )
    .await
    {
        Err(_) => return Err(StartError::NotReady(WORKER_START_TIMEOUT)), // dropped: killed
        Ok(Ok(body)) => body,
        Ok(Err(FrameError::Closed | FrameError::Io(_))) => {
            let (status, stderr_tail) = worker.ended().await;
            return Err(StartError::Exited {
                status,
                stderr_tail,
            });
        }
        Ok(Err(e)) => return Err(not_a_worker(command, &e)),
    };
    let hello = wire::decode_body::<Hello>(&body).map_err(|e| not_a_worker(command, &e))?;
    let (Hello::Ready { wire_version, .. } | Hello::Failed { wire_version, .. }) = &hello;
    if *wire_version != wire::WIRE_VERSION {
        return Err(StartError::Protocol(format!(
            "{} speaks GPU worker pipe version {wire_version}, this daemon version {}; \
             restart the daemon after an upgrade",
            command.program.display(),
            wire::WIRE_VERSION
        )));
    }
    match hello {
        Hello::Ready { info, .. } => Ok((worker, info)),
        Hello::Failed { error, .. } => {
            let _ = worker.ended().await; // reap it: it exits right after saying so
            Err(StartError::Adapter(error))
        }
    }
}

fn not_a_worker(command: &WorkerCommand, e: &FrameError) -> StartError {
    StartError::Protocol(format!(
        "{} did not answer as a Mesh GPU worker of this build ({e}); it must be this mesh-node binary",
        command.program.display()
    ))
}

/// Forward a worker's stderr into the daemon's log (target `gpu_child`) and keep its
/// last lines for crash reports. Ends when the worker does.
async fn forward_stderr(
    stderr: ChildStderr,
    pid: u32,
    slot: usize,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(STDERR_LINE_MAX)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        if text.is_empty() {
            continue;
        }
        // The worker logs plain text starting with the level (see child::init_logs);
        // its warnings and errors stay visible at the daemon's default level.
        match text.split_whitespace().next() {
            Some("ERROR") => tracing::error!(target: "gpu_child", pid, slot, "{text}"),
            Some("WARN") => tracing::warn!(target: "gpu_child", pid, slot, "{text}"),
            _ if text.contains("panicked") => {
                tracing::warn!(target: "gpu_child", pid, slot, "{text}")
            }
            _ => tracing::debug!(target: "gpu_child", pid, slot, "{text}"),
        }
        let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
        if tail.len() == STDERR_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_exe_runs_this_build_and_shows_its_path() {
        let command = WorkerCommand::current_exe().expect("current exe");
        let exe = std::env::current_exe().unwrap();
        if cfg!(target_os = "linux") {
            assert_eq!(command.program, PathBuf::from("/proc/self/exe"));
            assert_eq!(command.arg0, Some(exe.into_os_string()));
        } else {
            assert_eq!(command.program, exe);
        }
    }
}
