//! The GPU worker process (`mesh-node gpu-worker`): one [`Executor`] running the jobs
//! the daemon's [`Supervisor`](super::Supervisor) sends over stdin, one at a time.
//!
//! The process exists so that the daemon can SIGKILL a kernel that hangs or crash-loops
//! the driver without going down with it. It is not meant to be started by hand.

use super::direct;
use super::error::panic_message;
use super::wire::{self, ChildError, ChildErrorKind, FrameError, Hello, JobHeader, ToWorker};
use super::{Executor, GpuError, OutputView, Uploaded};
use mesh_core::kernel::KernelPlan;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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

    let busy = Arc::new(AtomicBool::new(false));
    let closed = Arc::new(AtomicBool::new(false));
    match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(stdin) => {
            watch_hangup(stdin, Arc::clone(&busy), Arc::clone(&closed));
        }
        // Only for want of a file descriptor; the parent watch still ends the worker.
        Err(e) => note!("mesh-node gpu-worker: cannot watch stdin ({e})"),
    }
    let mut stdin = std::io::stdin().lock();
    let mut pipe = Pipe {
        stdin: &mut stdin,
        stdout: &mut stdout,
        chunk: vec![0; wire::READ_CHUNK],
    };
    let abort_on_entry = std::env::var(ABORT_ON_ENTRY_ENV).ok();
    // The last reply's outputs, mapped where the device put them and lent to the pipe
    // or read there by the daemon: it sends its next message only after it has them,
    // so they are released when a job arrives (or stdin closes), not before.
    let mut lent: Option<Vec<OutputView>> = None;
    loop {
        let header = match wire::read_message(pipe.stdin) {
            Ok(ToWorker::Job(header)) => header,
            Ok(ToWorker::SendOutputs) => {
                let Some(outputs) = &lent else {
                    bad_job(&unexpected("SendOutputs with no outputs kept"));
                };
                if let Err(e) = wire::write_raw(pipe.stdout, outputs) {
                    note!(
                        "mesh-node gpu-worker: cannot write outputs to the daemon ({e}); exiting"
                    );
                    return EXIT_PROTOCOL;
                }
                continue;
            }
            Ok(other) => bad_job(&unexpected(&format!("{other:?} between jobs"))),
            // stdin closed with the worker idle: a clean end.
            Err(FrameError::Closed) => return EXIT_DONE,
            Err(e) => bad_job(&e),
        };
        drop(lent.take());
        if let Some(entry) = abort_on_entry
            .as_deref()
            .filter(|entry| header.plan.steps.iter().any(|step| step.entry == *entry))
        {
            note!("{ABORT_ON_ENTRY_ENV} matches entry point '{entry}': aborting as asked");
            std::process::abort();
        }
        let started = Instant::now();
        // A panic is answered and ends the worker (its kind does): after one, the
        // pipe's position is unknown.
        let uploaded = pipe
            .upload(&executor, &header)
            .unwrap_or_else(|e| bad_job(&e));
        // Busy from the moment a job runs, so that a daemon that goes away now makes
        // the worker abort instead of leaving the kernel to run with nobody waiting.
        busy.store(true, Ordering::SeqCst);
        if closed.load(Ordering::SeqCst) {
            note!(
                "mesh-node gpu-worker: the daemon closed the pipe before the kernel ran; aborting"
            );
            std::process::abort();
        }
        let result = uploaded.and_then(|uploaded| launch(&executor, &header.plan, uploaded));
        let elapsed = started.elapsed();
        let ends_worker = result.as_ref().err().is_some_and(|e| e.kind.ends_worker());
        // Idle before the reply leaves: a daemon that closes stdin as soon as it has
        // the reply (shutdown) must find this worker idle, not make it abort.
        busy.store(false, Ordering::SeqCst);
        if let Err(code) = send_reply(pipe.stdout, header.id, &result, elapsed, header.direct) {
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

/// Abort the worker as soon as the daemon closes its end of `pipe` (the worker's
/// stdin) while a kernel runs (`busy`): the daemon is gone (it died, or dropped its
/// supervisor), nothing will read the result, and a hung kernel would spin forever. A
/// normal `exit` could block in driver teardown behind the running kernel. With the
/// worker idle the close only sets `closed`; the main loop reads the end of the pipe
/// and exits cleanly.
///
/// Waits in `poll` for the hang-up alone, so that the main loop stays the only reader.
fn watch_hangup(
    pipe: OwnedFd,
    busy: Arc<AtomicBool>,
    closed: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::empty())];
        loop {
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {
                    let hung_up = fds[0]
                        .revents()
                        .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR));
                    if hung_up {
                        break;
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    note!("mesh-node gpu-worker: cannot watch stdin ({e})");
                    return;
                }
            }
        }
        closed.store(true, Ordering::SeqCst);
        if busy.load(Ordering::SeqCst) {
            note!("mesh-node gpu-worker: the daemon closed the pipe while a kernel was running; aborting");
            std::process::abort();
        }
    })
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

impl From<FrameError> for UploadError {
    fn from(e: FrameError) -> UploadError {
        UploadError::Pipe(e)
    }
}

/// The worker's two pipes to the daemon.
struct Pipe<'a, R, W> {
    stdin: &'a mut R,
    stdout: &'a mut W,
    /// Where inputs read from the pipe pass on their way to device memory.
    chunk: Vec<u8>,
}

impl<R: Read, W: Write> Pipe<'_, R, W> {
    /// Get a job's inputs into the executor's mapped upload buffer: by the direct
    /// route (their addresses to the daemon, which copies, or sends them on the pipe
    /// after all), or from the pipe. `Ok(Err)` is the executor refusing the job (its
    /// inputs read past or never sent) or panicking; `Err` means the pipe broke and
    /// the worker cannot go on.
    fn upload(
        &mut self,
        executor: &Executor,
        header: &JobHeader,
    ) -> Result<Result<Uploaded, ChildError>, FrameError> {
        let mut read = 0;
        let uploaded = std::panic::catch_unwind(AssertUnwindSafe(|| {
            executor.upload(&header.plan, &header.input_lens, |mut dests| {
                if header.direct {
                    let regions = dests
                        .iter_mut()
                        .map(|dest| {
                            let len = dest.len();
                            let start = dest.as_raw_element_ptr().as_ptr().cast_const();
                            direct::Region::of(start, len)
                        })
                        .collect();
                    let regions = direct::advertise(direct::Side::Inputs, regions);
                    wire::write_inputs_at(self.stdout, header.id, regions)?;
                    // From here the daemon writes into `dests`; nothing here touches
                    // them until it says it is done.
                    match wire::read_message(self.stdin)? {
                        ToWorker::InputsWritten => return Ok(()),
                        ToWorker::InputsFollow => {}
                        other => {
                            return Err(unexpected(&format!("{other:?} for a job's inputs")).into())
                        }
                    }
                }
                for mut dest in dests {
                    wire::read_input(self.stdin, dest.len(), &mut self.chunk, |at, bytes| {
                        dest.slice(at..at + bytes.len()).copy_from_slice(bytes)
                    })?;
                    read += 1;
                }
                Ok::<(), UploadError>(())
            })
        }));
        match uploaded {
            Ok(Ok(uploaded)) => Ok(Ok(uploaded)),
            Ok(Err(UploadError::Gpu(e))) => {
                // Refused before the inputs had buffers (or, all read, at the unmap):
                // a piped job's unread inputs are passed over; a direct job's were
                // never sent, or came on the pipe and were read.
                if !header.direct {
                    wire::skip_inputs(self.stdin, &header.input_lens[read..])?;
                }
                Ok(Err(ChildError::from(&e)))
            }
            Ok(Err(UploadError::Pipe(e))) => Err(e),
            Err(panic) => Ok(Err(panicked(&*panic))),
        }
    }
}

/// A message out of place in the protocol.
fn unexpected(what: &str) -> FrameError {
    FrameError::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("unexpected message: {what}"),
    ))
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

/// Write a reply; a successful one's outputs raw on the pipe after it, or, for a
/// direct job (`in_place`), left in place with the reply saying where. Outputs too large for the
/// pipe are replaced by an error with the same id.
fn send_reply(
    stdout: &mut (impl Write + AsFd),
    id: u64,
    result: &Result<Vec<OutputView>, ChildError>,
    elapsed: Duration,
    in_place: bool,
) -> Result<(), i32> {
    let written = match result {
        Ok(outputs) if in_place => {
            let regions = outputs
                .iter()
                .map(|o| direct::Region::of(o.as_ptr(), o.len()))
                .collect();
            let regions = direct::advertise(direct::Side::Outputs, regions);
            wire::write_outputs_at(stdout, id, regions, elapsed)
        }
        Ok(outputs) => wire::write_outputs(stdout, id, outputs, elapsed),
        Err(error) => wire::write_error(stdout, id, error, elapsed),
    };
    let written = match written {
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
    let message = panic_message(panic).unwrap_or_else(|| "a non-string panic".into());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hangup_watch_wakes_on_the_close_alone_and_leaves_the_bytes() {
        let (mut reader, mut writer) = std::io::pipe().unwrap();
        let watched = reader.as_fd().try_clone_to_owned().unwrap();
        let (busy, closed) = (Arc::new(AtomicBool::new(false)), Arc::default());
        let watch = watch_hangup(watched, busy, Arc::clone(&closed));
        writer.write_all(b"job").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !closed.load(Ordering::SeqCst) && !watch.is_finished(),
            "bytes on the pipe are not a hang-up"
        );
        drop(writer);
        watch.join().unwrap();
        assert!(closed.load(Ordering::SeqCst), "the close was seen");
        let mut left = String::new();
        reader.read_to_string(&mut left).unwrap();
        assert_eq!(left, "job", "the watch read nothing");
    }
}
