//! The pipe protocol between the daemon and its GPU worker processes
//! (`mesh-node gpu-worker`): the messages and their framing.
//!
//! Every message starts with one frame: a 4-byte little-endian length, then a record
//! encoded with `mesh_core::codec` (bincode behind a format version byte). The worker
//! writes one [`Hello`] on stdout when it starts, then serves one job at a time
//! ([`JobFrame`] writes one; the worker reads [`ToWorker`] messages with
//! [`read_message`]) and answers each with one reply. Logs go to stderr, never stdout.
//!
//! A job's inputs and a reply's outputs (up to 16 MiB each way) never go inside a
//! record, which would copy each byte twice more. They take one of two routes, chosen
//! per job by the daemon ([`JobHeader::direct`]):
//! - **direct** (the normal one): the worker maps its upload staging buffer (whose
//!   bytes its kernel's buffers are copied from) and answers with the inputs'
//!   addresses in it ([`Answer::InputsAt`]); the daemon copies the inputs there itself
//!   (`super::direct`, `process_vm_writev`) and says [`ToWorker::InputsWritten`]. The
//!   reply gives the addresses in the mapped read-back buffer the device copied the
//!   outputs into ([`ReplyOutputs::At`]), which the daemon reads (`process_vm_readv`).
//!   One copy each way, as in one process.
//! - **pipe**: the header lists the lengths and the bytes follow it raw, lent to the
//!   pipe from where they lie and read into the buffers they are kept in; on the
//!   worker's side, the device's own mapped memory. Where a direct copy is refused
//!   the daemon switches route mid-job: [`ToWorker::InputsFollow`] and the inputs on
//!   the pipe, or [`ToWorker::SendOutputs`] and the outputs on the pipe.
//!
//! Lent, not written: [`splice_all`] hands the pipe the pages that hold the bytes
//! (`vmsplice`) instead of copying them into the pipe's own buffer, so the only copy
//! is the reader's, as in one process. The pipe reads those pages when the other side
//! reads, so the writer must leave the bytes unchanged, and their memory unfreed, until
//! the reader has them: the daemon keeps a job's inputs (immutable [`Bytes`]) until its
//! reply, which the worker sends after reading every input; the worker keeps a reply's
//! mapped outputs until the next job, which the daemon sends after reading the whole
//! reply. Where the kernel cannot lend the pages (memory a driver mapped specially,
//! a writer that is not a pipe) the bytes are written the ordinary way.

use super::direct::Region;
use super::GpuError;
use mesh_core::capability::AdapterInfo;
use mesh_core::kernel::KernelPlan;
use mesh_core::Bytes;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::{IoSlice, Read, Write};
use std::os::fd::AsFd;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::unix::pipe;

/// Largest frame either side sends or accepts, bytes, and the most a message's raw
/// inputs or outputs may add up to. A task carries at most 16 MiB of inputs and 16 MiB
/// of outputs (`mesh_core::limits`), plus its WGSL (256 KiB) in the header; 64 MiB
/// leaves room for that with margin, while a corrupt length can make the reader
/// allocate no more than this.
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// Version of the message shapes below; bumped whenever one changes. A worker whose
/// [`Hello`] carries another version (a binary replaced under a running daemon) is
/// refused instead of misread.
pub const WIRE_VERSION: u32 = 4;

/// The worker's first message: whether it opened an adapter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Hello {
    /// The executor is open; jobs may follow.
    Ready {
        /// [`WIRE_VERSION`] of the worker's build.
        wire_version: u32,
        /// The adapter the worker runs on.
        info: AdapterInfo,
    },
    /// The worker could not open an adapter and is exiting.
    Failed {
        /// [`WIRE_VERSION`] of the worker's build.
        wire_version: u32,
        /// Why.
        error: ChildError,
    },
}

/// What the daemon sends a worker after its [`Hello`].
#[derive(Debug, Serialize, Deserialize)]
pub enum ToWorker {
    /// A job. Its inputs follow raw on the pipe unless the header is
    /// [`direct`](JobHeader::direct).
    Job(JobHeader),
    /// After [`Answer::InputsAt`]: the daemon wrote every input where it was told.
    InputsWritten,
    /// After [`Answer::InputsAt`]: the daemon could not write there; the inputs
    /// follow raw on the pipe.
    InputsFollow,
    /// After a reply with [`ReplyOutputs::At`]: the daemon could not read there;
    /// the worker sends the outputs raw on the pipe.
    SendOutputs,
}

/// A job's record: one kernel to run, without its inputs.
#[derive(Debug, Serialize, Deserialize)]
pub struct JobHeader {
    /// Chosen by the daemon; echoed in the answers.
    pub id: u64,
    /// The plan.
    pub plan: KernelPlan,
    /// Bytes of each input, in order.
    pub input_lens: Vec<u64>,
    /// The direct route (see the module docs): the worker answers with the addresses
    /// of its input buffers instead of reading the inputs from the pipe, and leaves
    /// its outputs in place for the daemon to read.
    pub direct: bool,
}

/// What a worker sends after its [`Hello`], as the daemon reads it.
#[derive(Debug, Clone)]
pub enum Answer {
    /// To a direct job: its input buffers, mapped and waiting, one per input.
    InputsAt {
        /// The job's id.
        id: u64,
        /// Where each input goes, in the worker's memory.
        regions: Vec<Region>,
    },
    /// The job's end.
    Reply(Reply),
}

/// The answer to one job.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The job's id.
    pub id: u64,
    /// Output buffers in `plan.outputs` order, or why there are none.
    pub result: Result<ReplyOutputs, ChildError>,
    /// Time the worker spent in the executor.
    pub elapsed: Duration,
}

/// A successful job's outputs, in `plan.outputs` order.
#[derive(Debug, Clone)]
pub enum ReplyOutputs {
    /// Read from the pipe.
    Read(Vec<Bytes>),
    /// Left in the worker's mapped buffers, until the daemon sends its next message.
    At(Vec<Region>),
}

/// What a worker sends after its [`Hello`], on the pipe.
#[derive(Debug, Serialize, Deserialize)]
enum FromWorker {
    InputsAt { id: u64, regions: Vec<Region> },
    Reply(ReplyHeader),
}

/// A reply's record; with [`OutputsOnPipe::Follow`] the outputs follow it raw.
#[derive(Debug, Serialize, Deserialize)]
struct ReplyHeader {
    id: u64,
    result: Result<OutputsOnPipe, ChildError>,
    elapsed: Duration,
}

#[derive(Debug, Serialize, Deserialize)]
enum OutputsOnPipe {
    /// Their lengths; the bytes follow.
    Follow(Vec<u64>),
    /// Where they lie in the worker's memory.
    At(Vec<Region>),
}

/// An executor error as it crosses the pipe ([`GpuError`] itself is not serializable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ChildError {
    /// The error's message, as the executor wrote it.
    pub message: String,
    /// Whether running the plan again may succeed ([`GpuError::retryable`]).
    pub retryable: bool,
    /// Which error it was.
    pub kind: ChildErrorKind,
}

/// The [`GpuError`] variant behind a [`ChildError`], plus what only a process sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)] // one per GpuError variant, documented there
pub enum ChildErrorKind {
    NoAdapter,
    RequestDevice,
    BufferTooLarge,
    TooManyBuffers,
    InvalidPlan,
    Compile,
    Dispatch,
    Driver,
    OutOfMemory,
    Readback,
    DeviceLost,
    /// The executor panicked; the worker exits after replying.
    Panic,
    /// The reply would exceed [`MAX_FRAME_BYTES`].
    TooLarge,
}

impl ChildErrorKind {
    /// True when the worker's executor cannot be trusted afterwards: the worker exits
    /// after replying and the daemon starts a fresh one.
    pub fn ends_worker(self) -> bool {
        matches!(self, ChildErrorKind::DeviceLost | ChildErrorKind::Panic)
    }
}

impl From<&GpuError> for ChildError {
    fn from(e: &GpuError) -> ChildError {
        let kind = match e {
            GpuError::NoAdapter => ChildErrorKind::NoAdapter,
            GpuError::RequestDevice { .. } => ChildErrorKind::RequestDevice,
            GpuError::BufferTooLarge { .. } => ChildErrorKind::BufferTooLarge,
            GpuError::TooManyBuffers { .. } => ChildErrorKind::TooManyBuffers,
            GpuError::InvalidPlan(_) => ChildErrorKind::InvalidPlan,
            GpuError::Compile(_) => ChildErrorKind::Compile,
            GpuError::Dispatch(_) => ChildErrorKind::Dispatch,
            GpuError::Driver(_) => ChildErrorKind::Driver,
            GpuError::OutOfMemory(_) => ChildErrorKind::OutOfMemory,
            GpuError::Readback(_) => ChildErrorKind::Readback,
            GpuError::DeviceLost(_) => ChildErrorKind::DeviceLost,
        };
        ChildError {
            message: e.to_string(),
            retryable: e.retryable(),
            kind,
        }
    }
}

/// A frame that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the pipe before a frame started (a clean end).
    #[error("the pipe was closed")]
    Closed,
    /// The pipe failed, or closed in the middle of a frame.
    #[error("pipe error: {0}")]
    Io(#[from] std::io::Error),
    /// The length prefix is over [`MAX_FRAME_BYTES`]: the peer is broken or not a
    /// Mesh GPU worker.
    #[error("a frame of {0} bytes is over the limit of {MAX_FRAME_BYTES} bytes")]
    TooLarge(usize),
    /// The frame's bytes are not the expected record.
    #[error("the frame does not decode: {0}")]
    Decode(#[from] mesh_core::codec::CodecError),
}

/// Bytes each pipe between the daemon and a worker holds (Linux's default is 64 KiB,
/// and 1 MiB is what `/proc/sys/fs/pipe-max-size` lets any process ask for by
/// default): a 16 MiB input then crosses in 16 hand-offs between the two processes
/// instead of 256.
const PIPE_BYTES: usize = 1024 * 1024;

/// Ask for a [`PIPE_BYTES`] pipe buffer. Best effort: a smaller pipe is only slower.
pub fn widen_pipe(pipe: &impl AsFd) {
    let size = nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_BYTES as i32);
    if let Err(e) = nix::fcntl::fcntl(pipe, size) {
        tracing::debug!(error = %e, "cannot enlarge a GPU worker pipe; keeping its size");
    }
}

/// Encode `value` as a complete frame (length prefix included), refusing one over
/// [`MAX_FRAME_BYTES`].
pub fn encode_frame<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    let mut frame = vec![0; 4];
    mesh_core::codec::encode_into(value, &mut frame)?;
    let len = frame.len() - 4;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    frame[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(frame)
}

/// Checks that buffers of these lengths may cross the pipe (at most
/// [`MAX_FRAME_BYTES`] in all): a corrupt header must not make the reader allocate more.
fn check_payload(lens: &[u64]) -> Result<(), FrameError> {
    let total = lens
        .iter()
        .try_fold(0u64, |sum, &len| sum.checked_add(len))
        .unwrap_or(u64::MAX);
    if total > MAX_FRAME_BYTES as u64 {
        return Err(FrameError::TooLarge(
            usize::try_from(total).unwrap_or(usize::MAX),
        ));
    }
    Ok(())
}

/// [`check_payload`] for outputs left in the worker's memory.
fn check_regions(regions: &[Region]) -> Result<(), FrameError> {
    check_payload(&regions.iter().map(|r| r.len).collect::<Vec<_>>())
}

/// Read a payload of `len` bytes (checked by [`check_payload`]) into the buffer that
/// keeps it: no zeroing first, no copy into [`Bytes`] after. `take` keeps each read
/// within the payload, so the next message's bytes stay in the pipe.
async fn read_payload_async(
    r: &mut (impl AsyncRead + Unpin),
    len: u64,
) -> Result<Bytes, FrameError> {
    let mut buffer = Vec::with_capacity(len as usize);
    let mut payload = r.take(len);
    while (buffer.len() as u64) < len {
        if payload.read_buf(&mut buffer).await? == 0 {
            return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
    Ok(Bytes::from(buffer))
}

/// A job ready for the pipe: its header frame, and its inputs.
pub struct JobFrame {
    header: Vec<u8>,
    inputs: Vec<Bytes>,
    direct: bool,
}

impl JobFrame {
    /// Encode job `id` (echoed in its answers): `plan` with its `inputs` (indexed as
    /// in `BindingPlan::Input`), by the direct route or the pipe. Refuses a job whose
    /// header or inputs are over [`MAX_FRAME_BYTES`].
    pub fn new(
        id: u64,
        plan: KernelPlan,
        inputs: Vec<Bytes>,
        direct: bool,
    ) -> Result<JobFrame, FrameError> {
        let input_lens: Vec<u64> = inputs.iter().map(|b| b.len() as u64).collect();
        check_payload(&input_lens)?;
        let header = encode_frame(&ToWorker::Job(JobHeader {
            id,
            plan,
            input_lens,
            direct,
        }))?;
        Ok(JobFrame {
            header,
            inputs,
            direct,
        })
    }

    /// The inputs, in order.
    pub fn inputs(&self) -> &[Bytes] {
        &self.inputs
    }

    /// Whether the job takes the direct route.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Write the job to the worker's stdin: the header, and the inputs after it
    /// unless the job is direct.
    pub async fn write(&self, w: &mut pipe::Sender) -> Result<(), FrameError> {
        w.write_all(&self.header).await?;
        if !self.direct {
            self.write_inputs(w).await?;
        }
        Ok(())
    }

    /// Write the inputs raw, lent to the pipe ([`splice_all_async`]): keep this
    /// frame until the job's reply has been read.
    pub async fn write_inputs(&self, w: &mut pipe::Sender) -> Result<(), FrameError> {
        for input in &self.inputs {
            splice_all_async(w, input).await?;
        }
        Ok(())
    }
}

/// Send the worker a message that carries no bytes after it.
pub async fn send_async(w: &mut pipe::Sender, message: &ToWorker) -> Result<(), FrameError> {
    w.write_all(&encode_frame(message)?).await?;
    Ok(())
}

/// Lend the pipe `w` the pages under (a prefix of) `bytes`; how many bytes it took.
fn lend(w: &impl AsFd, bytes: &[u8], flags: nix::fcntl::SpliceFFlags) -> std::io::Result<usize> {
    match nix::fcntl::vmsplice(w, &[IoSlice::new(bytes)], flags) {
        Ok(0) => Err(std::io::ErrorKind::WriteZero.into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.into()),
    }
}

/// Blocking: put `bytes` on the pipe `w` by lending it their pages (see the module
/// docs: `bytes` must stay unchanged and allocated until the reader has read them),
/// or by writing them where the pages cannot be lent (EFAULT for memory a driver
/// mapped, EINVAL for a writer that is not a pipe; the write then reports whatever
/// is really wrong). Anything `w` buffers must have been flushed first.
pub fn splice_all(w: &mut (impl Write + AsFd), mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match lend(w, bytes, nix::fcntl::SpliceFFlags::empty()) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return w.write_all(bytes),
        }
    }
    Ok(())
}

/// [`splice_all`] on a non-blocking pipe: waits for room instead of blocking a thread.
pub async fn splice_all_async(w: &mut pipe::Sender, mut bytes: &[u8]) -> std::io::Result<()> {
    use std::io::ErrorKind::{Interrupted, WouldBlock};
    while !bytes.is_empty() {
        w.writable().await?;
        let flags = nix::fcntl::SpliceFFlags::SPLICE_F_NONBLOCK;
        // `try_io` clears the readiness it saw when the pipe is full (EAGAIN).
        match w.try_io(|| lend(&*w, bytes, flags)) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if matches!(e.kind(), WouldBlock | Interrupted) => {}
            Err(_) => return w.write_all(bytes).await,
        }
    }
    Ok(())
}

/// Blocking: read the daemon's next message; [`FrameError::Closed`] at a clean end
/// of stream. A [`ToWorker::Job`] that is not direct, and a [`ToWorker::InputsFollow`],
/// have the inputs after them: read each with [`read_input`] in order, or pass over
/// them with [`skip_inputs`].
pub fn read_message(r: &mut impl Read) -> Result<ToWorker, FrameError> {
    let message: ToWorker = decode_body(&read_body(r)?)?;
    if let ToWorker::Job(header) = &message {
        check_payload(&header.input_lens)?;
    }
    Ok(message)
}

/// Bytes the worker reads from the pipe at a time on their way into a device buffer
/// (the `chunk` of [`read_input`]): a quarter of the pipe, small enough to stay in the
/// CPU's cache between the two copies.
pub const READ_CHUNK: usize = 256 * 1024;

/// Blocking: read the next input, `len` bytes, handing it to `sink(offset, bytes)`
/// one `chunk` at a time (the worker's sink is write-only device memory, which a
/// read cannot fill directly). A small chunk reused for every input stays in the CPU's
/// cache; reading a whole input into fresh memory first would fault in each page.
pub fn read_input(
    r: &mut impl Read,
    len: usize,
    chunk: &mut [u8],
    mut sink: impl FnMut(usize, &[u8]),
) -> Result<(), FrameError> {
    let mut done = 0;
    while done < len {
        let n = chunk.len().min(len - done);
        r.read_exact(&mut chunk[..n])?;
        sink(done, &chunk[..n]);
        done += n;
    }
    Ok(())
}

/// Blocking: read past inputs of these lengths (a job that is refused before its
/// inputs have anywhere to go), so that the next header is next on the pipe.
pub fn skip_inputs(r: &mut impl Read, lens: &[u64]) -> Result<(), FrameError> {
    let total = lens.iter().sum();
    if std::io::copy(&mut r.take(total), &mut std::io::sink())? != total {
        return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(())
}

/// Blocking: answer a direct job with where its inputs go, and flush.
pub fn write_inputs_at(
    w: &mut impl Write,
    id: u64,
    regions: Vec<Region>,
) -> Result<(), FrameError> {
    write_frame(w, &encode_frame(&FromWorker::InputsAt { id, regions })?)
}

/// Blocking: write a successful job's reply, the header and then its outputs lent to
/// the pipe ([`write_raw`]). Outputs over [`MAX_FRAME_BYTES`] in all are refused
/// before anything is written.
pub fn write_outputs<O: AsRef<[u8]>>(
    w: &mut (impl Write + AsFd),
    id: u64,
    outputs: &[O],
    elapsed: Duration,
) -> Result<(), FrameError> {
    let lens: Vec<u64> = outputs.iter().map(|o| o.as_ref().len() as u64).collect();
    check_payload(&lens)?;
    write_reply(w, id, Ok(OutputsOnPipe::Follow(lens)), elapsed)?;
    write_raw(w, outputs)
}

/// Blocking: write a successful direct job's reply, which says where its outputs lie
/// (the worker leaves them there, unchanged, until the daemon's next message), and
/// flush. Outputs over [`MAX_FRAME_BYTES`] in all are refused before anything is
/// written.
pub fn write_outputs_at(
    w: &mut impl Write,
    id: u64,
    regions: Vec<Region>,
    elapsed: Duration,
) -> Result<(), FrameError> {
    check_regions(&regions)?;
    write_reply(w, id, Ok(OutputsOnPipe::At(regions)), elapsed)
}

/// Blocking: put `outputs` on the pipe raw, one after another, lent to it
/// ([`splice_all`]): keep them unchanged until the daemon has read them.
pub fn write_raw<O: AsRef<[u8]>>(
    w: &mut (impl Write + AsFd),
    outputs: &[O],
) -> Result<(), FrameError> {
    w.flush()?;
    for output in outputs {
        splice_all(w, output.as_ref())?;
    }
    Ok(())
}

/// Blocking: write a failed job's reply and flush it.
pub fn write_error(
    w: &mut impl Write,
    id: u64,
    error: &ChildError,
    elapsed: Duration,
) -> Result<(), FrameError> {
    write_reply(w, id, Err(error.clone()), elapsed)
}

/// Blocking: write a reply's record and flush it.
fn write_reply(
    w: &mut impl Write,
    id: u64,
    result: Result<OutputsOnPipe, ChildError>,
    elapsed: Duration,
) -> Result<(), FrameError> {
    let reply = FromWorker::Reply(ReplyHeader {
        id,
        result,
        elapsed,
    });
    write_frame(w, &encode_frame(&reply)?)
}

/// Read the worker's next answer, with the outputs that follow a reply on the pipe;
/// [`FrameError::Closed`] at a clean end of stream.
pub async fn read_answer_async(r: &mut (impl AsyncRead + Unpin)) -> Result<Answer, FrameError> {
    let header = match decode_body(&read_body_async(r).await?)? {
        FromWorker::InputsAt { id, regions } => return Ok(Answer::InputsAt { id, regions }),
        FromWorker::Reply(header) => header,
    };
    let result = match header.result {
        Ok(OutputsOnPipe::Follow(lens)) => Ok(ReplyOutputs::Read(read_raw_async(r, &lens).await?)),
        Ok(OutputsOnPipe::At(regions)) => {
            check_regions(&regions)?;
            Ok(ReplyOutputs::At(regions))
        }
        Err(e) => Err(e),
    };
    Ok(Answer::Reply(Reply {
        id: header.id,
        result,
        elapsed: header.elapsed,
    }))
}

/// Read buffers of these lengths, sent raw one after another.
pub async fn read_raw_async(
    r: &mut (impl AsyncRead + Unpin),
    lens: &[u64],
) -> Result<Vec<Bytes>, FrameError> {
    check_payload(lens)?;
    let mut outputs = Vec::with_capacity(lens.len());
    for &len in lens {
        outputs.push(read_payload_async(r, len).await?);
    }
    Ok(outputs)
}

/// Decode a frame's body (what follows the length prefix).
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    Ok(mesh_core::codec::decode(body)?)
}

/// Checked length prefix.
fn body_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Blocking: read one frame's body; [`FrameError::Closed`] at a clean end of stream.
pub fn read_body(r: &mut impl Read) -> Result<Vec<u8>, FrameError> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut body = vec![0u8; body_len(prefix)?];
    r.read_exact(&mut body)?;
    Ok(body)
}

/// Blocking: write one encoded frame and flush it.
pub fn write_frame(w: &mut impl Write, frame: &[u8]) -> Result<(), FrameError> {
    w.write_all(frame)?;
    w.flush()?;
    Ok(())
}

/// Read one frame's body; [`FrameError::Closed`] at a clean end of stream.
pub async fn read_body_async(r: &mut (impl AsyncRead + Unpin)) -> Result<Vec<u8>, FrameError> {
    let mut prefix = [0u8; 4];
    let first = r.read(&mut prefix).await?;
    if first == 0 {
        return Err(FrameError::Closed);
    }
    r.read_exact(&mut prefix[first..]).await?;
    let mut body = vec![0u8; body_len(prefix)?];
    r.read_exact(&mut body).await?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::kernel::{BindingPlan, Dispatch};
    use mesh_core::task::OutputDecl;

    fn plan() -> KernelPlan {
        KernelPlan {
            source: "@compute @workgroup_size(1) fn main() {}".into(),
            steps: vec![
                Dispatch::new("main", [1, 2, 3]),
                Dispatch::new("end", [1, 1, 1]),
            ],
            bindings: vec![
                BindingPlan::Input(0),
                BindingPlan::Output(0),
                BindingPlan::Scratch(16),
            ],
            outputs: vec![OutputDecl {
                name: "y".into(),
                size: 8,
            }],
        }
    }

    fn inputs() -> Vec<Bytes> {
        vec![Bytes::from(vec![1u8, 2, 3, 4])]
    }

    /// The next message, which must be a job.
    fn read_job_header(r: &mut impl Read) -> Result<JobHeader, FrameError> {
        match read_message(r)? {
            ToWorker::Job(header) => Ok(header),
            other => panic!("expected a job, got {other:?}"),
        }
    }

    /// The next answer, which must be a reply.
    async fn read_reply_async(r: &mut (impl AsyncRead + Unpin)) -> Result<Reply, FrameError> {
        match read_answer_async(r).await? {
            Answer::Reply(reply) => Ok(reply),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    /// A job sent by the pipe route as the worker reads it: the header, then each
    /// input into its own buffer.
    fn read_job(r: &mut impl Read) -> Result<(JobHeader, Vec<Bytes>), FrameError> {
        let header = read_job_header(r)?;
        let mut inputs = Vec::new();
        for &len in &header.input_lens {
            let mut input = vec![0; len as usize];
            // A 3-byte chunk: inputs span several chunks.
            read_input(r, input.len(), &mut [0; 3], |at, bytes| {
                input[at..at + bytes.len()].copy_from_slice(bytes)
            })?;
            inputs.push(Bytes::from(input));
        }
        Ok((header, inputs))
    }

    /// A thread reading `reader` to its end.
    fn read_to_end(mut reader: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            reader.read_to_end(&mut bytes).unwrap();
            bytes
        })
    }

    /// Everything `write` puts on a real pipe, read to its end by another thread
    /// (lent pages need a reader while the writer waits for room).
    fn through_pipe(write: impl FnOnce(&mut std::io::PipeWriter)) -> Vec<u8> {
        let (reader, mut writer) = std::io::pipe().unwrap();
        widen_pipe(&writer);
        let read = read_to_end(reader);
        write(&mut writer);
        drop(writer);
        read.join().unwrap()
    }

    /// [`through_pipe`] for the daemon's kind of pipe: `write` runs on `rt`.
    fn through_tokio_pipe(
        rt: &tokio::runtime::Runtime,
        write: impl AsyncFnOnce(&mut pipe::Sender),
    ) -> Vec<u8> {
        let (mut sender, receiver) = rt.block_on(async { pipe::pipe() }).unwrap();
        let read = read_to_end(std::fs::File::from(receiver.into_blocking_fd().unwrap()));
        rt.block_on(write(&mut sender));
        drop(sender);
        read.join().unwrap()
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn jobs_and_replies_cross_with_their_bytes_raw_after_the_header() {
        let rt = runtime();
        // Jobs back to back, through the daemon's kind of pipe: each job's inputs must
        // end exactly where the next job's header starts, whether read or skipped.
        // The frames outlive the reading, as the daemon's do (their inputs are lent).
        let frames: Vec<JobFrame> = (0..3)
            .map(|_| JobFrame::new(7, plan(), inputs(), false).unwrap())
            .collect();
        let pipe = through_tokio_pipe(&rt, async |sender| {
            for frame in &frames {
                frame.write(sender).await.unwrap();
            }
        });
        drop(frames);
        let header_len = u32::from_le_bytes(pipe[..4].try_into().unwrap()) as usize;
        assert_eq!(
            pipe.len(),
            3 * (4 + header_len + 4),
            "header, then 4 raw input bytes"
        );
        assert_eq!(&pipe[4 + header_len..][..4], &[1, 2, 3, 4]);
        let mut r = &pipe[..];
        let skipped = read_job_header(&mut r).unwrap();
        skip_inputs(&mut r, &skipped.input_lens).unwrap();
        for _ in 0..2 {
            let (header, read) = read_job(&mut r).unwrap();
            assert_eq!((header.id, &header.plan, &read), (7, &plan(), &inputs()));
        }
        assert!(matches!(read_job_header(&mut r), Err(FrameError::Closed)));

        // Replies: outputs, then an error (no bytes after its header).
        let outputs = vec![vec![9u8; 5], Vec::new(), vec![8u8; 3]];
        let error = ChildError::from(&GpuError::Compile("bad".into()));
        let elapsed = Duration::from_millis(3);
        let pipe = through_pipe(|w| {
            write_outputs(w, 1, &outputs, elapsed).unwrap();
            write_error(w, 2, &error, elapsed).unwrap();
        });
        rt.block_on(async {
            let mut r = &pipe[..];
            let first = read_reply_async(&mut r).await.unwrap();
            let Ok(ReplyOutputs::Read(got)) = first.result else {
                panic!("outputs on the pipe: {first:?}");
            };
            let got: Vec<Vec<u8>> = got.iter().map(|b| b.to_vec()).collect();
            assert_eq!((first.id, got, first.elapsed), (1, outputs, elapsed));
            let second = read_reply_async(&mut r).await.unwrap();
            assert_eq!((second.id, second.result.unwrap_err()), (2, error));
            assert!(matches!(
                read_reply_async(&mut r).await,
                Err(FrameError::Closed)
            ));
        });
    }

    #[test]
    fn a_direct_job_has_only_its_header_on_the_pipe_and_its_answers_carry_regions() {
        let rt = runtime();
        let frame = JobFrame::new(9, plan(), inputs(), true).unwrap();
        let mut pipe = through_tokio_pipe(&rt, async |sender| {
            frame.write(sender).await.unwrap();
            // The route changed mid-job: the inputs follow after all.
            send_async(sender, &ToWorker::InputsFollow).await.unwrap();
            frame.write_inputs(sender).await.unwrap();
            send_async(sender, &ToWorker::SendOutputs).await.unwrap();
        });
        let mut r = &pipe[..];
        let header = read_job_header(&mut r).unwrap();
        assert_eq!((header.id, header.direct), (9, true));
        assert!(matches!(read_message(&mut r), Ok(ToWorker::InputsFollow)));
        let mut input = [0u8; 4];
        read_input(&mut r, 4, &mut [0; 4], |at, bytes| {
            input[at..at + bytes.len()].copy_from_slice(bytes)
        })
        .unwrap();
        assert_eq!(input, [1, 2, 3, 4]);
        assert!(matches!(read_message(&mut r), Ok(ToWorker::SendOutputs)));
        assert!(matches!(read_message(&mut r), Err(FrameError::Closed)));

        let inputs_at = vec![Region {
            addr: 1 << 20,
            len: 4,
        }];
        let outputs_at = vec![Region {
            addr: 2 << 20,
            len: 8,
        }];
        let elapsed = Duration::from_millis(5);
        pipe = through_pipe(|w| {
            write_inputs_at(w, 9, inputs_at.clone()).unwrap();
            write_outputs_at(w, 9, outputs_at.clone(), elapsed).unwrap();
            write_raw(w, &[[5u8; 8]]).unwrap();
        });
        rt.block_on(async {
            let mut r = &pipe[..];
            let Answer::InputsAt { id, regions } = read_answer_async(&mut r).await.unwrap() else {
                panic!("the inputs' regions come first");
            };
            assert_eq!((id, regions), (9, inputs_at));
            let reply = read_reply_async(&mut r).await.unwrap();
            assert!(
                matches!(&reply.result, Ok(ReplyOutputs::At(at)) if *at == outputs_at),
                "{reply:?}"
            );
            // Sent after SendOutputs: the bytes alone, read by their known lengths.
            let raw = read_raw_async(&mut r, &[8]).await.unwrap();
            assert_eq!(raw, vec![Bytes::from(vec![5u8; 8])]);
        });
    }

    /// Bytes over several pipefuls, not a multiple of a page, from an odd offset.
    fn large() -> Vec<u8> {
        (0..3 * PIPE_BYTES + 12_345)
            .map(|i| (i % 251) as u8)
            .collect()
    }

    #[test]
    fn spliced_bytes_cross_whole_through_pipes_and_are_written_elsewhere() {
        let bytes = large();
        let got = through_pipe(|w| splice_all(w, &bytes[1..]).unwrap());
        assert!(got == bytes[1..], "blocking: every byte, in order");

        let got = through_tokio_pipe(&runtime(), async |sender| {
            splice_all_async(sender, &bytes[1..]).await.unwrap()
        });
        assert!(got == bytes[1..], "async: every byte, in order");

        // Not a pipe: the kernel refuses to lend (EINVAL), the bytes are written.
        let mut file = tempfile::tempfile().unwrap();
        splice_all(&mut file, &bytes).unwrap();
        let mut written = Vec::new();
        std::io::Seek::rewind(&mut file).unwrap();
        file.read_to_end(&mut written).unwrap();
        assert!(written == bytes, "the fallback wrote every byte");
    }

    #[test]
    fn splicing_lends_the_pages_it_does_not_copy_them() {
        // What the module's rule (keep lent bytes unchanged until they are read)
        // guards against, and the proof that the copy into the pipe is gone: bytes
        // changed after `splice_all` returned are read as changed.
        let (mut reader, mut writer) = std::io::pipe().unwrap();
        let mut bytes = vec![1u8; 8192];
        splice_all(&mut writer, &bytes).unwrap();
        bytes.fill(2);
        let mut got = vec![0u8; bytes.len()];
        reader.read_exact(&mut got).unwrap();
        assert!(got.iter().all(|&b| b == 2), "the pipe read the lent pages");
    }

    #[test]
    fn payloads_over_the_limit_are_refused_before_anything_moves() {
        // A reply whose outputs add up to more than the limit writes nothing.
        let half = vec![0u8; MAX_FRAME_BYTES / 2 + 1];
        let pipe = through_pipe(|w| {
            let too_large = write_outputs(w, 1, &[half.clone(), half], Duration::ZERO);
            assert!(matches!(too_large, Err(FrameError::TooLarge(_))));
        });
        assert!(pipe.is_empty());
        // A header that claims more input than the limit is refused before any
        // buffer is allocated for it.
        let header = encode_frame(&ToWorker::Job(JobHeader {
            id: 1,
            plan: plan(),
            input_lens: vec![u64::MAX, 2],
            direct: false,
        }))
        .unwrap();
        assert!(matches!(
            read_job_header(&mut &header[..]),
            Err(FrameError::TooLarge(_))
        ));
        // A stream cut inside the inputs.
        let mut cut = encode_frame(&ToWorker::Job(JobHeader {
            id: 1,
            plan: plan(),
            input_lens: vec![4],
            direct: false,
        }))
        .unwrap();
        cut.extend_from_slice(&[1, 2]);
        assert!(matches!(read_job(&mut &cut[..]), Err(FrameError::Io(_))));
        let mut r = &cut[..];
        let header = read_job_header(&mut r).unwrap();
        assert!(matches!(
            skip_inputs(&mut r, &header.input_lens),
            Err(FrameError::Io(_))
        ));
    }

    #[test]
    fn worker_pipes_are_widened() {
        let (reader, writer) = std::io::pipe().unwrap();
        let size = || nix::fcntl::fcntl(&reader, nix::fcntl::FcntlArg::F_GETPIPE_SZ).unwrap();
        let before = size() as usize;
        widen_pipe(&writer);
        let after = size() as usize;
        assert_eq!((before < PIPE_BYTES, after), (true, PIPE_BYTES));
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        // A length prefix over the limit is refused before anything is allocated.
        let huge = ((MAX_FRAME_BYTES + 1) as u32).to_le_bytes();
        assert!(matches!(
            read_body(&mut &huge[..]),
            Err(FrameError::TooLarge(_))
        ));
        // A stream cut inside the prefix or the body.
        assert!(matches!(
            read_body(&mut &[1u8, 0][..]),
            Err(FrameError::Io(_))
        ));
        assert!(matches!(
            read_body(&mut &[4u8, 0, 0, 0, 1][..]),
            Err(FrameError::Io(_))
        ));
        // Garbage that frames correctly but is not a record.
        let body = read_body(&mut &[3u8, 0, 0, 0, 9, 9, 9][..]).unwrap();
        assert!(matches!(
            decode_body::<JobHeader>(&body),
            Err(FrameError::Decode(_))
        ));
    }

    #[test]
    fn device_loss_and_panics_end_the_worker() {
        let lost = ChildError::from(&GpuError::DeviceLost("reset".into()));
        assert_eq!(lost.kind, ChildErrorKind::DeviceLost);
        assert!(lost.retryable && lost.kind.ends_worker());
        let compile = ChildError::from(&GpuError::Compile("bad".into()));
        assert!(!compile.retryable && !compile.kind.ends_worker());
    }
}
