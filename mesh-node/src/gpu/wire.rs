//! The pipe protocol between the daemon and its GPU worker processes
//! (`mesh-node gpu-worker`): the messages and their framing.
//!
//! Every message is one frame: a 4-byte little-endian length, then a record encoded
//! with `mesh_core::codec` (bincode behind a format version byte). The worker writes
//! one [`Hello`] on stdout when it starts, then answers each [`Job`] read from stdin
//! with one [`Reply`], one job at a time. Logs go to stderr, never stdout.

use super::GpuError;
use mesh_core::capability::AdapterInfo;
use mesh_core::kernel::KernelPlan;
use mesh_core::Bytes;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::{Read, Write};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// Largest frame either side sends or accepts, bytes. A task carries at most 16 MiB of
/// inputs and 16 MiB of outputs (`mesh_core::limits`), plus its WGSL (256 KiB) and
/// framing; 64 MiB leaves room for that with margin, while a corrupt length prefix can
/// make the reader allocate no more than this.
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// Version of the message shapes below; bumped whenever one changes. A worker whose
/// [`Hello`] carries another version (a binary replaced under a running daemon) is
/// refused instead of misread.
pub const WIRE_VERSION: u32 = 1;

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

/// One kernel to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    /// Chosen by the daemon; echoed in the reply.
    pub id: u64,
    /// The plan.
    pub plan: KernelPlan,
    /// Input bytes, indexed as in `BindingPlan::Input`.
    pub inputs: Vec<Bytes>,
}

/// The answer to one [`Job`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    /// The job's id.
    pub id: u64,
    /// Output buffers in `plan.outputs` order, or why there are none.
    pub result: Result<Vec<Bytes>, ChildError>,
    /// Time the worker spent in the executor.
    pub elapsed: Duration,
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
pub fn widen_pipe(pipe: &impl std::os::fd::AsFd) {
    if let Err(e) = rustix::pipe::fcntl_setpipe_size(pipe, PIPE_BYTES) {
        tracing::debug!(error = %e, "cannot enlarge a GPU worker pipe; keeping its size");
    }
}

/// Encode `value` as a complete frame (length prefix included), refusing one over
/// [`MAX_FRAME_BYTES`]. `size_hint`: about how many bytes the record takes (the
/// frame is written in place, without regrowing for large inputs or outputs).
pub fn encode_frame<T: Serialize>(value: &T, size_hint: usize) -> Result<Vec<u8>, FrameError> {
    let mut frame = Vec::with_capacity(4 + size_hint.min(MAX_FRAME_BYTES) + 1024);
    frame.extend_from_slice(&[0; 4]);
    mesh_core::codec::encode_into(value, &mut frame)?;
    let len = frame.len() - 4;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    frame[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(frame)
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

/// Write one encoded frame and flush it.
pub async fn write_frame_async(
    w: &mut (impl AsyncWrite + Unpin),
    frame: &[u8],
) -> Result<(), FrameError> {
    w.write_all(frame).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::kernel::BindingPlan;
    use mesh_core::task::OutputDecl;

    fn job() -> Job {
        Job {
            id: 7,
            plan: KernelPlan {
                source: "@compute @workgroup_size(1) fn main() {}".into(),
                entry: "main".into(),
                workgroups: [1, 2, 3],
                bindings: vec![BindingPlan::Input(0), BindingPlan::Output(0)],
                outputs: vec![OutputDecl {
                    name: "y".into(),
                    size: 8,
                }],
            },
            inputs: vec![Bytes::from(vec![1u8, 2, 3, 4])],
        }
    }

    #[test]
    fn frames_round_trip_blocking_and_async() {
        let frame = encode_frame(&job(), 0).unwrap();
        assert_eq!(
            u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize,
            frame.len() - 4
        );
        let mut stream: Vec<u8> = Vec::new();
        write_frame(&mut stream, &frame).unwrap();
        write_frame(&mut stream, &frame).unwrap();
        let mut r = &stream[..];
        for _ in 0..2 {
            let back: Job = decode_body(&read_body(&mut r).unwrap()).unwrap();
            assert_eq!(
                (back.id, &back.plan, &back.inputs),
                (7, &job().plan, &job().inputs)
            );
        }
        assert!(matches!(read_body(&mut r), Err(FrameError::Closed)));

        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut r = &stream[..];
            let back: Job = decode_body(&read_body_async(&mut r).await.unwrap()).unwrap();
            assert_eq!(back.plan, job().plan);
            read_body_async(&mut r).await.unwrap();
            assert!(matches!(
                read_body_async(&mut r).await,
                Err(FrameError::Closed)
            ));
        });
    }

    #[test]
    fn worker_pipes_are_widened() {
        let (reader, writer) = std::io::pipe().unwrap();
        let before = rustix::pipe::fcntl_getpipe_size(&reader).unwrap();
        widen_pipe(&writer);
        let after = rustix::pipe::fcntl_getpipe_size(&reader).unwrap();
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
            decode_body::<Job>(&body),
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
