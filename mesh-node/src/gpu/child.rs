//! The GPU worker process (`mesh-node gpu-worker`): one [`Executor`] running the jobs
//! the daemon's [`Supervisor`](super::Supervisor) sends over stdin, one at a time.
//!
//! The process exists so that the daemon can SIGKILL a kernel that hangs or crash-loops
//! the driver without going down with it. It is not meant to be started by hand.

use super::wire::{self, ChildError, ChildErrorKind, FrameError, Hello, JobHeader};
use super::{Executor, GpuError, OutputView, Uploaded};
use mesh_core::kernel::KernelPlan;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Fault-injection hook for tests and drills, read only by `mesh-node gpu-worker`:
/// when set, the worker aborts (SIGABRT) on receiving a job whose entry point has this
/// name, as a crashing driver would. Unset in production.
pub const ABORT_ON_ENTRY_ENV: &str = "MESH_GPU_WORKER_ABORT_ON_ENTRY";

/// Exit status: the daemon closed stdin while the worker was idle (a normal end).
pub const EXIT_DONE: i32 = 0;
/// Exit status: no adapter could be opened (the [`Hello::Failed`] says why).
pub const EXIT_NO_ADAPTER: i32 = 2;
/// Exit status: the device was lost or the executor panicked; a fresh process must
/// open a new device.
pub const EXIT_EXECUTOR_BROKEN: i32 = 3;
/// Exit status: stdin or stdout broke the protocol (bad frame, closed pipe).
pub const EXIT_PROTOCOL: i32 = 4;

/// A job read from the daemon, its inputs already in the device buffers its kernel
/// binds.
struct Staged {
    id: u64,
    plan: KernelPlan,
    /// The uploaded inputs, or why the job cannot run.
    uploaded: Result<Uploaded, ChildError>,
    /// Time spent uploading, part of the time reported for the job.
    upload_time: Duration,
}

/// Jobs read ahead of the one running. The supervisor sends one job at a time, so one
/// is all that can ever be queued.
const JOB_QUEUE: usize = 1;

/// Write a line to stderr, ignoring failure: stderr is a pipe to the daemon, which
/// may be gone, and `eprintln!` would panic exactly when the worker must act.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// How often the worker checks that the daemon that started it is still alive.
const PARENT_CHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// Kill this worker as soon as its parent (the daemon) is gone. Closing stdin is not
/// enough: a worker whose exit blocks in driver teardown behind a running kernel, or
/// that misses the pipe's end, would spin on the GPU forever. SIGKILL cannot block.
fn watch_parent() {
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || loop {
        std::thread::sleep(PARENT_CHECK);
        if std::os::unix::process::parent_id() != parent {
            note!("mesh-node gpu-worker: the daemon (pid {parent}) is gone; killing this worker");
            let _ = std::process::Command::new("kill")
                .arg("-KILL")
                .arg(std::process::id().to_string())
                .status();
            std::process::abort();
        }
    });
}

/// Run the worker until stdin closes; returns the process exit status.
pub fn serve() -> i32 {
    init_logs();
    watch_parent();
    let mut stdout = std::io::stdout().lock();
    let executor = match Executor::open_best() {
        Ok(executor) => executor,
        Err(e) => {
            tracing::error!(error = %e, "cannot open a GPU adapter");
            let hello = Hello::Failed {
                wire_version: wire::WIRE_VERSION,
                error: ChildError::from(&e),
            };
            let _ = send(&mut stdout, &hello);
            return EXIT_NO_ADAPTER;
        }
    };
    let hello = Hello::Ready {
        wire_version: wire::WIRE_VERSION,
        info: executor.info().clone(),
    };
    if let Err(code) = send(&mut stdout, &hello) {
        return code;
    }

    // stdin is read on its own thread so that the worker notices the daemon going away
    // even while a kernel runs (see `read_jobs`). That thread also uploads each job's
    // inputs, from the pipe straight into device buffers.
    let executor = Arc::new(executor);
    let busy = Arc::new(AtomicBool::new(false));
    let (jobs_tx, jobs) = mpsc::sync_channel::<Staged>(JOB_QUEUE);
    let reader_busy = Arc::clone(&busy);
    let reader_executor = Arc::clone(&executor);
    std::thread::spawn(move || read_jobs(&reader_executor, jobs_tx, &reader_busy));

    let abort_on_entry = std::env::var(ABORT_ON_ENTRY_ENV).ok();
    // The last reply's outputs, lent to the pipe (`wire::write_outputs`): the daemon
    // may not have read them yet. It sends the next job only after the whole reply,
    // so they are released when the next job arrives (or stdin closes), not before.
    let mut lent: Option<Vec<OutputView>> = None;
    // The channel closes when stdin does, with the worker idle: a clean end.
    while let Ok(job) = jobs.recv() {
        drop(lent.take());
        if abort_on_entry.as_deref() == Some(job.plan.entry.as_str()) {
            note!(
                "{ABORT_ON_ENTRY_ENV} matches entry point '{}': aborting as asked",
                job.plan.entry
            );
            std::process::abort();
        }
        let started = Instant::now();
        let result = job
            .uploaded
            .and_then(|uploaded| launch(&executor, &job.plan, uploaded));
        let elapsed = job.upload_time + started.elapsed();
        let ends_worker = result.as_ref().err().is_some_and(|e| e.kind.ends_worker());
        // Idle before the reply leaves: a daemon that closes stdin as soon as it has
        // the reply (shutdown) must find this worker idle, not make it abort.
        busy.store(false, Ordering::SeqCst);
        if let Err(code) = send_reply(&mut stdout, job.id, &result, elapsed) {
            return code;
        }
        lent = result.ok();
        if ends_worker {
            tracing::warn!(
                "the executor is unusable; exiting so that the daemon starts a fresh worker"
            );
            return EXIT_EXECUTOR_BROKEN;
        }
    }
    EXIT_DONE
}

/// Run an uploaded job; its outputs stay where the device put them until the reply
/// is written.
fn launch(
    executor: &Executor,
    plan: &KernelPlan,
    uploaded: Uploaded,
) -> Result<Vec<OutputView>, ChildError> {
    let launched = std::panic::catch_unwind(AssertUnwindSafe(|| {
        executor.launch(plan, uploaded)?.views()
    }));
    match launched {
        Ok(result) => result.map_err(|e| ChildError::from(&e)),
        Err(panic) => Err(panicked(&*panic)),
    }
}

/// Read jobs from stdin into `jobs` until stdin closes.
///
/// When stdin closes while a kernel runs, the daemon is gone (it died, or dropped its
/// supervisor): nothing will read the result and a hung kernel would spin forever, so
/// the worker aborts at once. A normal `exit` could block in driver teardown behind
/// the running kernel.
fn read_jobs(executor: &Executor, jobs: mpsc::SyncSender<Staged>, busy: &AtomicBool) {
    let mut stdin = std::io::stdin().lock();
    let mut chunk = vec![0; wire::READ_CHUNK];
    loop {
        let header = match wire::read_job_header(&mut stdin) {
            Ok(header) => header,
            Err(FrameError::Closed) => {
                if busy.load(Ordering::SeqCst) {
                    note!("mesh-node gpu-worker: the daemon closed the pipe while a kernel was running; aborting");
                    std::process::abort();
                }
                return; // dropping `jobs` ends the main loop
            }
            Err(e) => bad_job(&e),
        };
        let started = Instant::now();
        let (uploaded, pipe_lost) = match upload(executor, &header, &mut stdin, &mut chunk) {
            Ok(Upload::Ready(uploaded)) => (Ok(uploaded), false),
            Ok(Upload::Refused(error)) => (Err(error), false),
            Ok(Upload::Panicked(error)) => (Err(error), true),
            Err(e) => bad_job(&e),
        };
        // Busy from the moment a job is accepted, so that a close right behind it
        // aborts instead of leaving the job to run with nobody waiting.
        busy.store(true, Ordering::SeqCst);
        let job = Staged {
            id: header.id,
            plan: header.plan,
            uploaded,
            upload_time: started.elapsed(),
        };
        // After a panic the pipe's position is unknown: the main loop answers this
        // job and exits (a panic ends the worker); nothing more is read.
        if jobs.send(job).is_err() || pipe_lost {
            return;
        }
    }
}

/// How reading a job's inputs into device buffers ended, when the pipe did not break.
enum Upload {
    /// The inputs are in device buffers.
    Ready(Uploaded),
    /// The executor refused the job; its inputs were read past.
    Refused(ChildError),
    /// The executor panicked, somewhere within the inputs.
    Panicked(ChildError),
}

/// Why an upload stopped: the executor, or the pipe it was reading.
enum UploadError {
    Gpu(GpuError),
    Pipe(FrameError),
}

impl From<GpuError> for UploadError {
    fn from(e: GpuError) -> UploadError {
        UploadError::Gpu(e)
    }
}

/// Read a job's inputs from the pipe into the device buffers its kernel will bind.
/// `Err` means the pipe broke and the worker cannot go on.
fn upload(
    executor: &Executor,
    header: &JobHeader,
    stdin: &mut impl Read,
    chunk: &mut [u8],
) -> Result<Upload, FrameError> {
    let mut read = 0;
    let uploaded = std::panic::catch_unwind(AssertUnwindSafe(|| {
        executor.upload(&header.plan, &header.input_lens, |_, mut dest| {
            wire::read_input(stdin, dest.len(), chunk, |at, bytes| {
                dest.slice(at..at + bytes.len()).copy_from_slice(bytes)
            })
            .map_err(UploadError::Pipe)?;
            read += 1;
            Ok(())
        })
    }));
    match uploaded {
        Ok(Ok(uploaded)) => Ok(Upload::Ready(uploaded)),
        Ok(Err(UploadError::Gpu(e))) => {
            wire::skip_inputs(stdin, &header.input_lens[read..])?;
            Ok(Upload::Refused(ChildError::from(&e)))
        }
        Ok(Err(UploadError::Pipe(e))) => Err(e),
        Err(panic) => Ok(Upload::Panicked(panicked(&*panic))),
    }
}

/// Exit on a job that breaks the protocol.
fn bad_job(e: &FrameError) -> ! {
    note!("mesh-node gpu-worker: bad job from the daemon ({e}); this process only talks to a mesh-node of the same build");
    std::process::exit(EXIT_PROTOCOL);
}

/// Write one message to the daemon; on failure, the exit status to end with.
fn send<T: serde::Serialize>(stdout: &mut impl Write, message: &T) -> Result<(), i32> {
    let frame = wire::encode_frame(message).map_err(|e| {
        note!("mesh-node gpu-worker: cannot encode a message: {e}");
        EXIT_PROTOCOL
    })?;
    write(stdout, &frame)
}

/// Write a reply; outputs too large for the pipe are replaced by an error with the
/// same id.
fn send_reply(
    stdout: &mut (impl Write + AsFd),
    id: u64,
    result: &Result<Vec<OutputView>, ChildError>,
    elapsed: Duration,
) -> Result<(), i32> {
    let written = match result {
        Ok(outputs) => match wire::write_outputs(stdout, id, outputs, elapsed) {
            Err(FrameError::TooLarge(bytes)) => {
                tracing::warn!(
                    bytes,
                    "outputs over the pipe's limit; sending an error instead"
                );
                let error = ChildError {
                    message: format!(
                        "the outputs take {bytes} bytes, over the {}-byte limit of the GPU worker pipe; \
                         split the work into smaller tasks",
                        wire::MAX_FRAME_BYTES
                    ),
                    retryable: false,
                    kind: ChildErrorKind::TooLarge,
                };
                wire::write_error(stdout, id, &error, elapsed)
            }
            other => other,
        },
        Err(error) => wire::write_error(stdout, id, error, elapsed),
    };
    written.map_err(|e| {
        note!("mesh-node gpu-worker: cannot write a reply to the daemon ({e}); exiting");
        EXIT_PROTOCOL
    })
}

fn write(stdout: &mut impl Write, frame: &[u8]) -> Result<(), i32> {
    wire::write_frame(stdout, frame).map_err(|e| {
        note!("mesh-node gpu-worker: cannot write to the daemon ({e}); exiting");
        EXIT_PROTOCOL
    })
}

/// The error a caught executor panic is answered with.
fn panicked(panic: &(dyn std::any::Any + Send)) -> ChildError {
    let message = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a non-string panic".into());
    ChildError {
        message: format!("the GPU executor panicked: {message}"),
        retryable: true,
        kind: ChildErrorKind::Panic,
    }
}

/// Plain text logs on stderr, without colour or time: the daemon forwards each line
/// into its own log (target `gpu_child`), which adds both.
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,wgpu_core=warn,wgpu_hal=warn,naga=warn")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .try_init();
}
