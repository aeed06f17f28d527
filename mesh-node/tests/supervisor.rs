//! Proves that GPU work runs in supervised `mesh-node gpu-worker` processes: results
//! are byte-identical to the CPU reference, with inputs and outputs copied straight
//! into and out of the worker's device buffers, and through the pipe where the kernel
//! refuses such a copy (a fault hook makes it refuse); a kernel that never ends
//! is killed at its timeout, and a cancelled one promptly; a worker that crashes is
//! reported with its signal and stderr; and in every case the slot gets a fresh worker
//! so the next job succeeds. Two slots run two jobs at once.
//!
//! Method: each test starts its own `Supervisor` on the built `mesh-node` binary
//! (`CARGO_BIN_EXE_mesh-node`) on the best adapter (lavapipe in CI). The hang is a
//! data-dependent infinite loop that naga accepts; the crash is the worker's
//! fault-injection hook (`MESH_GPU_WORKER_ABORT_ON_ENTRY`), which aborts on a job whose
//! entry point it names; the refused copy is the hook `MESH_GPU_WORKER_UNREACHABLE`,
//! which makes the worker give addresses nobody maps. That a fault really took effect is shown by the killed
//! worker's process id having disappeared and the restart count going up, not only by
//! the error. Without an adapter the tests FAIL (they never skip): CI must install
//! mesa-vulkan-drivers.

use mesh_core::builtin::{cpu_reference, f32_bytes};
use mesh_core::kernel::{self, KernelPlan};
use mesh_core::task::{KernelSpec, NamedBytes, OutputDecl};
use mesh_core::{Bytes, DeviceType};
use mesh_node::gpu::child::ABORT_ON_ENTRY_ENV;
use mesh_node::gpu::direct::UNREACHABLE_ENV;
use mesh_node::gpu::{ChildErrorKind, ChildExit, ExecError, StartError, Supervisor, WorkerCommand};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Generous bound for work that should take milliseconds: the CI machine has two
/// cores shared with the kernels these tests leave spinning until they are killed.
const PROMPTLY: Duration = Duration::from_secs(3);
/// Timeout for jobs expected to succeed.
const JOB_TIMEOUT: Duration = Duration::from_secs(30);

fn worker() -> WorkerCommand {
    WorkerCommand::new(env!("CARGO_BIN_EXE_mesh-node"))
}

async fn start(command: WorkerCommand, slots: usize) -> Supervisor {
    match Supervisor::start(command, slots).await {
        Ok(supervisor) => supervisor,
        Err(e) => panic!(
            "the supervisor tests need a wgpu adapter and the GPU worker found none usable: {e}\n\
             On a machine without a GPU run `apt-get update && apt-get install -y mesa-vulkan-drivers` \
             (Mesa's lavapipe CPU Vulkan driver). These tests never skip."
        ),
    }
}

/// A built-in saxpy job of `n` elements and the bytes its CPU reference computes.
fn saxpy(n: usize) -> (KernelPlan, Vec<Bytes>, Vec<u8>) {
    let x: Vec<f32> = (0..n).map(|i| i as f32 * 0.25 - 7.0).collect();
    let y: Vec<f32> = (0..n).map(|i| 3.0 - i as f32 / 7.0).collect();
    let inputs = vec![
        NamedBytes {
            name: "x".into(),
            data: Bytes::from(f32_bytes(&x)),
        },
        NamedBytes {
            name: "y".into(),
            data: Bytes::from(f32_bytes(&y)),
        },
    ];
    let params: BTreeMap<String, String> = [("a".to_string(), "1.5".to_string())].into();
    let spec = KernelSpec::Builtin {
        name: "saxpy".into(),
        params: params.clone(),
    };
    let plan = kernel::plan(&spec, &inputs, &[]).expect("saxpy plans");
    let expected = cpu_reference("saxpy", &params, &inputs);
    (plan, inputs.into_iter().map(|i| i.data).collect(), expected)
}

/// Elements of the saxpy most tests run.
const SMALL: usize = 1000;
/// Elements of a saxpy whose inputs (1.2 MB each) are larger than the worker's pipe
/// and its read chunk, and not a multiple of either, and which is large enough for the
/// direct route (`SMALL` is not: it always takes the pipe).
const LARGE: usize = 300_001;

/// Run a saxpy of `n` elements and require the reference bytes.
async fn assert_saxpy_of(supervisor: &Supervisor, n: usize, when: &str) {
    let (plan, inputs, expected) = saxpy(n);
    let outputs = supervisor
        .run(plan, inputs, JOB_TIMEOUT, CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("saxpy {when} failed: {e}"));
    assert_eq!(outputs.len(), 1, "saxpy has one output");
    assert!(
        outputs[0].as_slice() == expected.as_slice(),
        "saxpy {when}: the output differs from the CPU reference"
    );
}

/// Run a job the worker's executor must refuse with an error of `kind`.
async fn run_refused(
    supervisor: &Supervisor,
    plan: KernelPlan,
    inputs: Vec<Bytes>,
    kind: ChildErrorKind,
) -> ExecError {
    let err = supervisor
        .run(plan, inputs, JOB_TIMEOUT, CancellationToken::new())
        .await
        .expect_err("the executor refuses this job");
    assert!(
        matches!(&err, ExecError::Gpu(e) if e.kind == kind),
        "expected a {kind:?} error: {err:?}"
    );
    err
}

/// A large job refused before its inputs have a device buffer to go to (2.4 MB of
/// inputs), then a saxpy that must succeed, in the same worker `pid` as ever.
async fn refused_then_saxpy(supervisor: &Supervisor, pid: u32, route: &str) {
    let (mut plan, inputs, _) = saxpy(LARGE);
    plan.steps[0].workgroups = [0, 1, 1];
    run_refused(supervisor, plan, inputs, ChildErrorKind::InvalidPlan).await;
    assert_saxpy_of(supervisor, LARGE, &format!("{route}: after a refused job")).await;
    assert_eq!(
        (only_pid(supervisor), supervisor.restarts()),
        (pid, 0),
        "{route}: a refused job does not restart the worker"
    );
}

/// A kernel that never ends: each invocation loops until x[0] < -1 (the tests pass 0)
/// or y[1] is set (nothing sets it), so naga accepts it. On a GPU the loop alone
/// never ends. llvmpipe needs more: its compiler computes a side-effect-free loop's
/// result without running it (hence the atomics), and it stops each invocation after
/// 65535 loop iterations in total (gallivm's `LP_MAX_TGSI_LOOP_ITERATIONS`), so the
/// grid is large enough for that cap to take years: 65535 x 1024 workgroups of 64.
const FOREVER: &str = r#"
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<atomic<u32>>;
@compute @workgroup_size(64)
fn main() {
    loop {
        if (x[0] < -1.0 || atomicLoad(&y[1]) != 0u) { break; }
        atomicAdd(&y[0], 1u);
    }
}
"#;

fn forever() -> (KernelPlan, Vec<Bytes>) {
    let inputs = vec![NamedBytes {
        name: "x".into(),
        data: Bytes::from(f32_bytes(&[0.0])),
    }];
    let outputs = vec![OutputDecl {
        name: "y".into(),
        size: 8,
    }];
    let spec = KernelSpec::Wgsl {
        source: FOREVER.into(),
        entry: "main".into(),
        workgroups: [65535, 1024, 1],
    };
    let plan = kernel::plan(&spec, &inputs, &outputs).expect("the infinite kernel passes naga");
    (plan, inputs.into_iter().map(|i| i.data).collect())
}

/// The only idle worker of a one-slot supervisor.
fn only_pid(supervisor: &Supervisor) -> u32 {
    let pids = supervisor.idle_pids();
    assert_eq!(pids.len(), 1, "one slot, idle: {pids:?}");
    pids[0]
}

/// The killed worker is gone: reaped, not left spinning or as a zombie.
fn assert_gone(pid: u32) {
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the killed GPU worker {pid} still exists"
    );
}

#[tokio::test]
async fn saxpy_through_a_worker_matches_the_cpu_reference() {
    let supervisor = start(worker(), 1).await;
    println!(
        "adapter: {} ({})",
        supervisor.info().name,
        supervisor.info().backend
    );
    assert!(!supervisor.info().name.is_empty());
    assert_saxpy_of(&supervisor, SMALL, "through the worker").await;
    assert_saxpy_of(&supervisor, LARGE, "with inputs larger than the pipe").await;
    // lavapipe's buffers are plain memory, which the kernel copies into; a discrete
    // GPU's driver may map them as device memory, which it refuses (the node then
    // uses the pipe, as above, with the same results).
    if let Some(why) = supervisor.direct_refusal() {
        assert!(
            supervisor.info().device_type != DeviceType::Cpu,
            "the kernel refused to copy straight into and out of a CPU adapter's worker: {why}"
        );
        println!(
            "the kernel refused direct copies on {}: {why}",
            supervisor.info().name
        );
    }
    // Errors from the executor come back typed, and leave the worker in place.
    let pid = only_pid(&supervisor);
    let (mut plan, inputs, _) = saxpy(SMALL);
    plan.source = plan.source.replace("params.a", "params.nope");
    let err = run_refused(&supervisor, plan, inputs, ChildErrorKind::Compile).await;
    assert!(!err.retryable(), "{err}");
    assert_eq!(
        (only_pid(&supervisor), supervisor.restarts()),
        (pid, 0),
        "a compile error does not restart the worker"
    );
    // Direct: a refused job's inputs are never asked for, and the next job follows.
    refused_then_saxpy(&supervisor, pid, "direct").await;
    supervisor.shutdown().await;
}

#[tokio::test]
async fn a_refused_direct_copy_falls_back_to_the_pipe_for_good() {
    for side in ["inputs", "outputs"] {
        let supervisor = start(worker().env(UNREACHABLE_ENV, side), 1).await;
        let pid = only_pid(&supervisor);
        assert!(supervisor.copies_directly(), "a supervisor starts direct");
        assert_saxpy_of(&supervisor, LARGE, &format!("with its {side} copy refused")).await;
        assert!(
            !supervisor.copies_directly(),
            "{side}: the refusal switched the supervisor to the pipe"
        );
        // Memory the kernel will not copy, as a discrete GPU's device memory: the
        // refusal that is expected there (logged at INFO, not WARN).
        let why = supervisor.direct_refusal().expect("a reason");
        assert!(why.contains("EFAULT"), "{side}: {why}");
        assert_saxpy_of(&supervisor, LARGE, &format!("after the {side} refusal")).await;
        // By the pipe: the worker reads past a refused job's inputs, and the next
        // job's header is next. Falling back restarted nothing either.
        refused_then_saxpy(&supervisor, pid, &format!("the pipe after {side}")).await;
        supervisor.shutdown().await;
    }
}

#[tokio::test]
async fn a_kernel_that_never_ends_is_killed_at_its_timeout() {
    let supervisor = start(worker(), 1).await;
    let pid = only_pid(&supervisor);
    let (plan, inputs) = forever();
    let timeout = Duration::from_secs(1);
    println!("phase: running the infinite kernel with a {timeout:?} timeout in worker {pid}");
    let started = Instant::now();
    let err = supervisor
        .run(plan, inputs, timeout, CancellationToken::new())
        .await
        .expect_err("the kernel never ends");
    let took = started.elapsed();
    assert!(
        matches!(err, ExecError::Timeout(d) if d == timeout),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "timed out after 1s: the kernel was killed");
    assert!(err.retryable());
    assert!(
        took >= timeout && took < timeout + PROMPTLY,
        "returned after {took:?}"
    );
    assert_eq!(supervisor.restarts(), 1);

    println!("phase: the next job runs in a fresh worker");
    assert_saxpy_of(&supervisor, SMALL, "after a timeout").await;
    let new_pid = only_pid(&supervisor);
    assert_ne!(new_pid, pid, "the worker was replaced");
    assert_gone(pid);
    supervisor.shutdown().await;
}

#[tokio::test]
async fn cancel_stops_a_running_kernel_promptly() {
    let supervisor = start(worker(), 1).await;
    let pid = only_pid(&supervisor);
    let (plan, inputs) = forever();
    let cancel = CancellationToken::new();
    let canceller = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        canceller.cancel();
    });
    println!("phase: running the infinite kernel, cancelling after 200ms");
    let started = Instant::now();
    let err = supervisor
        .run(plan, inputs, JOB_TIMEOUT, cancel)
        .await
        .expect_err("cancelled");
    let took = started.elapsed();
    assert!(matches!(err, ExecError::Cancelled), "{err:?}");
    assert!(!err.retryable());
    assert!(
        took < PROMPTLY,
        "cancel took {took:?} (the timeout was {JOB_TIMEOUT:?})"
    );

    println!("phase: the next job runs in a fresh worker");
    assert_saxpy_of(&supervisor, SMALL, "after a cancel").await;
    assert_ne!(only_pid(&supervisor), pid, "the worker was replaced");
    assert_gone(pid);
    assert_eq!(supervisor.restarts(), 1);
    supervisor.shutdown().await;
}

#[tokio::test]
async fn a_crashing_worker_is_reported_and_replaced() {
    let supervisor = start(worker().env(ABORT_ON_ENTRY_ENV, "crash"), 1).await;
    let pid = only_pid(&supervisor);
    let (mut plan, inputs, _) = saxpy(SMALL);
    plan.source = plan.source.replace("fn main(", "fn crash(");
    plan.steps[0].entry = "crash".into();
    assert!(
        plan.source.contains("fn crash("),
        "the built-in's entry point was renamed"
    );
    println!("phase: a job whose entry point makes worker {pid} abort");
    let err = supervisor
        .run(plan, inputs, JOB_TIMEOUT, CancellationToken::new())
        .await
        .expect_err("the worker aborts");
    match &err {
        ExecError::Crashed {
            status,
            stderr_tail,
        } => {
            assert_eq!(*status, ChildExit::Signal(6), "SIGABRT: {err}");
            assert!(
                stderr_tail.contains(ABORT_ON_ENTRY_ENV),
                "the crash report carries the worker's stderr: {err}"
            );
        }
        other => panic!("expected Crashed, got {other:?}"),
    }
    assert!(err.retryable());
    assert!(
        err.to_string()
            .starts_with("the GPU worker process crashed (signal 6, SIGABRT): "),
        "{err}"
    );

    println!("phase: the next job runs in a fresh worker");
    assert_saxpy_of(&supervisor, SMALL, "after a crash").await;
    assert_ne!(only_pid(&supervisor), pid, "the worker was replaced");
    assert_gone(pid);
    assert_eq!(supervisor.restarts(), 1);
    supervisor.shutdown().await;
}

#[tokio::test]
async fn two_slots_run_two_jobs_at_once() {
    let supervisor = std::sync::Arc::new(start(worker(), 2).await);
    assert_eq!(supervisor.idle_pids().len(), 2, "both workers started");
    let (plan, inputs) = forever();
    let long_timeout = Duration::from_secs(4);
    let long = tokio::spawn({
        let supervisor = supervisor.clone();
        async move {
            supervisor
                .run(plan, inputs, long_timeout, CancellationToken::new())
                .await
        }
    });
    // Wait until the long job holds its worker.
    let waiting = Instant::now();
    while supervisor.idle_pids().len() != 1 {
        assert!(
            waiting.elapsed() < PROMPTLY,
            "the long job never took a worker"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("phase: the long job holds one worker; a short one runs beside it");
    let started = Instant::now();
    let short = tokio::spawn({
        let supervisor = supervisor.clone();
        async move { assert_saxpy_of(&supervisor, SMALL, "beside a long job").await }
    });
    // The supervisor hands it to the other worker at once: both are busy together
    // (unless it is done before this loop looks).
    let mut both_busy = false;
    while !short.is_finished() {
        both_busy |= supervisor.idle_pids().is_empty();
        if both_busy {
            break;
        }
        assert!(
            started.elapsed() < PROMPTLY,
            "the short job never took the second worker"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    short.await.expect("the short job succeeds");
    let short_took = started.elapsed();
    assert!(
        both_busy || short_took < long_timeout,
        "the short job neither ran beside the long one nor ended before its timeout ({short_took:?})"
    );
    // On a CPU adapter (lavapipe) each worker's kernels run on their own threads, so
    // the short job ends while the long one spins. A GPU runs one process's kernel at a
    // time and need not preempt a kernel that never ends: there the short one may wait
    // for the long one's timeout, which is what the timeout is for.
    if supervisor.info().device_type == DeviceType::Cpu {
        assert!(
            !long.is_finished() && short_took < long_timeout,
            "the short job waited for the long one ({short_took:?})"
        );
    } else {
        println!(
            "the short job took {short_took:?} beside a kernel that never ends on {}",
            supervisor.info().name
        );
    }
    let long = long.await.expect("the long job's tokio task");
    assert!(matches!(long, Err(ExecError::Timeout(_))), "{long:?}");
    supervisor.shutdown().await;
}

#[tokio::test]
async fn no_adapter_is_reported_with_the_workers_message() {
    // A Vulkan loader that finds no driver: the worker starts, opens nothing, and says so.
    // VK_DRIVER_FILES is the loader's newer name, and wins over the older one where
    // both are set (as on a machine whose environment names its driver's file).
    let command = worker()
        .env("WGPU_BACKEND", "vulkan")
        .env("VK_DRIVER_FILES", "/nonexistent.json")
        .env("VK_ICD_FILENAMES", "/nonexistent.json");
    let err = Supervisor::start(command, 2).await.expect_err("no adapter");
    assert!(err.no_adapter(), "{err:?}");
    assert!(
        matches!(&err, StartError::Adapter(e) if e.kind == ChildErrorKind::NoAdapter),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("mesa-vulkan-drivers"),
        "the message names the fix: {err}"
    );

    // A program that is not a GPU worker.
    let err = Supervisor::start(WorkerCommand::new("/bin/true"), 1)
        .await
        .expect_err("not a worker");
    assert!(
        matches!(
            err,
            StartError::Exited {
                status: ChildExit::Code(0),
                ..
            }
        ),
        "{err:?}"
    );
}
