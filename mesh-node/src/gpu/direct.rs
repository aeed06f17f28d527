//! Direct copies between the daemon's memory and a GPU worker's mapped device
//! buffers (`process_vm_writev` / `process_vm_readv`), the pipe left out.
//!
//! Why: a pipe moves bytes page by page through the kernel, and even with the writer's
//! pages lent (`wire::splice_all_async`) the reader still copies them once more: on
//! this project's machine a crossing costs 3-5 times a `memcpy` of the same bytes.
//! A job's inputs written by the daemon straight into the worker's mapped upload
//! buffer (which the device copies into the buffers its kernel binds), and its outputs
//! read straight out of the mapped buffer the device copied them into, take one copy
//! each, as in a single process, at close to `memcpy` speed.
//!
//! The worker says where ([`Region`]s in its own address space); the daemon copies.
//! The two never touch a region at the same time: the worker maps its upload buffer,
//! sends the inputs' addresses in it and waits, untouched, until the daemon says it is
//! done; it keeps a reply's mapped outputs, untouched, until the daemon sends the next job.
//!
//! The calls need the right to trace the worker, which a parent has over its own
//! child unless a policy says otherwise (Yama's `ptrace_scope` 2 or 3, a seccomp
//! filter without `@ipc`, gVisor); and the kernel refuses memory that a driver maps
//! specially (`VM_IO`/`VM_PFNMAP`, as some discrete GPUs' host-visible memory). A
//! refusal is [`Refused::Memory`] (EFAULT: memory it will not copy, expected on
//! NVIDIA GPUs) or [`Refused::Kernel`] (a policy, or anything else): either way the
//! caller moves the bytes through the pipe instead.

use mesh_core::Bytes;
use nix::errno::Errno;
use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::io::{IoSlice, IoSliceMut};
use std::sync::OnceLock;

/// Fault-injection hook for tests, read only by `mesh-node gpu-worker`: `inputs` or
/// `outputs` makes the worker give addresses no process maps (below the kernel's
/// `mmap_min_addr`) for that side of every job, so that the daemon's direct copy fails
/// as a refused one would and must fall back to the pipe. Unset in production.
pub const UNREACHABLE_ENV: &str = "MESH_GPU_WORKER_UNREACHABLE";

/// An address no process maps: what [`UNREACHABLE_ENV`] advertises.
const UNMAPPED: u64 = 4096;

/// Bytes at an address in a GPU worker's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// The address, in the worker's address space.
    pub addr: u64,
    /// Bytes.
    pub len: u64,
}

impl Region {
    /// The region of `len` bytes at `start`, memory of this process that another one
    /// will copy to or from while this one leaves it alone. Where the other process
    /// writes, `start` must carry write permission (`as_mut_ptr`, not `as_ptr`).
    pub fn of(start: *const u8, len: usize) -> Region {
        Region {
            // The address leaves this process on purpose: another one copies there.
            addr: start.expose_provenance() as u64,
            len: len as u64,
        }
    }
}

/// A job's two sides, as the [`UNREACHABLE_ENV`] hook names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `inputs`.
    Inputs,
    /// `outputs`.
    Outputs,
}

/// The regions a worker advertises for `side` of a job: `regions`, unless the
/// [`UNREACHABLE_ENV`] hook names that side, which moves them (lengths kept) to an
/// address nobody maps.
pub fn advertise(side: Side, regions: Vec<Region>) -> Vec<Region> {
    static HOOK: OnceLock<Option<String>> = OnceLock::new();
    let hooked = HOOK.get_or_init(|| std::env::var(UNREACHABLE_ENV).ok());
    let name = match side {
        Side::Inputs => "inputs",
        Side::Outputs => "outputs",
    };
    if hooked.as_deref() != Some(name) {
        return regions;
    }
    regions
        .into_iter()
        .map(|r| Region {
            addr: UNMAPPED,
            len: r.len,
        })
        .collect()
}

/// Why a direct copy did not happen.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The worker is gone (ESRCH): the exchange failed, not the method.
    #[error("the GPU worker is gone")]
    Gone,
    /// The kernel will not copy this memory (EFAULT, or a copy that stops short):
    /// device memory a driver maps specially, as NVIDIA's host-visible buffers, or an
    /// address the worker does not map. Expected on such GPUs: use the pipe.
    #[error("{0}")]
    Memory(String),
    /// The kernel refused for another reason (a ptrace policy's EPERM), or the
    /// copy could not be made (lengths that do not match, a copy thread that failed):
    /// use the pipe, and an operator may want to know.
    #[error("{0}")]
    Kernel(String),
}

impl Refused {
    /// Whether the refusal is what a GPU whose buffers are device memory always
    /// gives (nothing an operator can change), as opposed to a policy or a fault.
    pub fn expected(&self) -> bool {
        matches!(self, Refused::Memory(_))
    }
}

fn refused(what: &str, e: Errno) -> Refused {
    match e {
        Errno::ESRCH => Refused::Gone,
        Errno::EFAULT => Refused::Memory(format!("{what}: {e}")),
        e => Refused::Kernel(format!("{what}: {e}")),
    }
}

fn pid(pid: u32) -> Result<Pid, Refused> {
    i32::try_from(pid)
        .map(Pid::from_raw)
        .map_err(|_| Refused::Kernel(format!("process id {pid} out of range")))
}

/// Blocking: write each of `inputs` at the region of the same index in process
/// `worker`. On `Err` nothing may be assumed written.
pub fn write_to(worker: u32, inputs: &[Bytes], regions: &[Region]) -> Result<(), Refused> {
    if inputs.len() != regions.len()
        || inputs
            .iter()
            .zip(regions)
            .any(|(input, region)| input.len() as u64 != region.len)
    {
        return Err(Refused::Kernel(
            "the worker's regions do not match the inputs".into(),
        ));
    }
    let segments = inputs
        .iter()
        .zip(regions)
        .map(|(input, region)| (&input[..], region.addr as usize))
        .collect();
    let pid = pid(worker)?;
    copy_in_pieces(segments, "process_vm_writev wrote", |local, remote| {
        let local: Vec<IoSlice<'_>> = local.into_iter().map(IoSlice::new).collect();
        process_vm_writev(pid, &local, remote).map_err(|e| refused("process_vm_writev", e))
    })
}

/// Blocking: read each region of process `worker` into a buffer of its own.
pub fn read_from(worker: u32, regions: &[Region]) -> Result<Vec<Bytes>, Refused> {
    // Zeroed, not uninitialised: the call wants `&mut [u8]` (filling uninitialised
    // memory would need `unsafe`). Where the allocator hands out fresh pages the zeroing
    // is theirs already; where it reuses memory it costs a `memset` more than the bare
    // path's `to_vec`.
    let mut buffers: Vec<Vec<u8>> = regions.iter().map(|r| vec![0; r.len as usize]).collect();
    let segments = buffers
        .iter_mut()
        .zip(regions)
        .map(|(buffer, region)| (&mut buffer[..], region.addr as usize))
        .collect();
    let pid = pid(worker)?;
    copy_in_pieces(segments, "process_vm_readv read", |local, remote| {
        let mut local: Vec<IoSliceMut<'_>> = local.into_iter().map(IoSliceMut::new).collect();
        process_vm_readv(pid, &mut local, remote).map_err(|e| refused("process_vm_readv", e))
    })?;
    Ok(buffers.into_iter().map(Bytes::from).collect())
}

/// Copies of at least this many bytes are split over threads ([`copy_in_pieces`]):
/// below it, starting a thread costs about what it saves.
const SPLIT_MIN_BYTES: usize = 2 * 1024 * 1024;

/// The most threads one copy is split over: a copy runs at about the speed of memory
/// on one core, and more threads than a few only contend for the worker's page
/// tables.
const MAX_COPY_THREADS: usize = 4;

/// Pieces are cut at multiples of this, so that no page is shared by two threads'
/// copies (the kernel pins each page it copies).
const PIECE_ALIGN: usize = 4096;

/// Memory of this process on one side of a copy, cut where a piece ends: `&[u8]`
/// (what is written out) or `&mut [u8]` (what is read in).
trait Piece: Sized {
    fn len(&self) -> usize;
    fn cut(self, at: usize) -> (Self, Self);
}

impl Piece for &[u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn cut(self, at: usize) -> (Self, Self) {
        self.split_at(at)
    }
}

impl Piece for &mut [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn cut(self, at: usize) -> (Self, Self) {
        self.split_at_mut(at)
    }
}

/// Copy `segments` (this process's bytes, each with the worker's address it pairs
/// with) by `copy(local, remote)`, which gets a piece's local bytes and the worker's
/// ranges they pair with and returns the bytes it moved. A copy of [`SPLIT_MIN_BYTES`]
/// or more is cut, in order, into pieces of about equal size, one per core (at most
/// [`MAX_COPY_THREADS`]), each copied on a thread of its own while the calling thread
/// waits; a smaller copy runs on the calling thread. Fewer bytes moved
/// than asked (the kernel stopped at a page it could not copy) is a refusal, which
/// says "`moved` N of M bytes".
///
/// Why threads: with the worker's staging buffers resident (kept between jobs,
/// `gpu/staging.rs`), one `process_vm_writev` of 16 MiB ran at about a third of a
/// `memcpy`'s speed on this project's 2-core machine, and two threads took 1-2 ms off
/// saxpy's 17 ms run in the worker (docs/benchmarks.md).
///
/// Why the calling thread does not take a piece itself: Linux places a new thread on
/// the least busy core when it is made, and with every core busy at that moment (the
/// caller copying, the thread that woke it not yet asleep) that is the caller's own.
/// There it waited behind the caller's piece, up to 2 ms with the other core idle
/// (`perf sched timehist`; how many pieces started late before and after, timed by a
/// throwaway build, is in docs/notes/2026-11-23-session-20.md). A caller that only
/// waits leaves its core to the pieces.
fn copy_in_pieces<P: Piece + Send>(
    segments: Vec<(P, usize)>,
    moved: &str,
    copy: impl Fn(Vec<P>, &[RemoteIoVec]) -> Result<usize, Refused> + Sync,
) -> Result<(), Refused> {
    let segments: Vec<(P, usize)> = segments.into_iter().filter(|(p, _)| p.len() > 0).collect();
    let total: usize = segments.iter().map(|(p, _)| p.len()).sum();
    if total == 0 {
        return Ok(());
    }
    let threads = if total < SPLIT_MIN_BYTES {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_COPY_THREADS))
    };
    let pieces = cut_pieces(
        segments,
        total.div_ceil(threads).next_multiple_of(PIECE_ALIGN),
    );
    let copy = &|piece: Vec<(P, usize)>| {
        let remote: Vec<RemoteIoVec> = piece
            .iter()
            .map(|(bytes, base)| RemoteIoVec {
                base: *base,
                len: bytes.len(),
            })
            .collect();
        copy(piece.into_iter().map(|(bytes, _)| bytes).collect(), &remote)
    };
    let results: Vec<Result<usize, Refused>> = if pieces.len() == 1 {
        pieces.into_iter().map(copy).collect()
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = pieces
                .into_iter()
                .map(|piece| scope.spawn(move || copy(piece)))
                .collect();
            handles
                .into_iter()
                .map(|handle| {
                    handle
                        .join()
                        .unwrap_or_else(|_| Err(Refused::Kernel("a copy thread panicked".into())))
                })
                .collect()
        })
    };
    let mut done = 0;
    for result in results {
        done += result?;
    }
    if done != total {
        // The calls stop at the first address they cannot copy and count what they
        // did: the same refusal as EFAULT, met after some bytes.
        return Err(Refused::Memory(format!("{moved} {done} of {total} bytes")));
    }
    Ok(())
}

/// `segments` cut, in order, into pieces of `size` bytes (the last one shorter).
fn cut_pieces<P: Piece>(segments: Vec<(P, usize)>, size: usize) -> Vec<Vec<(P, usize)>> {
    let mut pieces = vec![Vec::new()];
    let mut room = size;
    for (mut bytes, mut base) in segments {
        while bytes.len() > 0 {
            if room == 0 {
                pieces.push(Vec::new());
                room = size;
            }
            let take = bytes.len().min(room);
            let (head, rest) = bytes.cut(take);
            pieces.last_mut().expect("never empty").push((head, base));
            bytes = rest;
            base += take;
            room -= take;
        }
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_land_where_the_regions_say_and_refusals_are_told_apart() {
        // This process stands in for the worker: the calls are the same ones, into
        // memory of its own.
        let me = std::process::id();
        let mut dest = vec![0u8; 5000 + 256];
        let (first, second) = dest.split_at_mut(5000);
        let regions = [
            // Mutable pointers: the copies write through them.
            Region::of(first.as_mut_ptr(), first.len()),
            Region::of(std::ptr::null(), 0),
            Region::of(second.as_mut_ptr(), second.len()),
        ];
        let inputs = [
            Bytes::from(vec![7u8; 5000]),
            Bytes::from(Vec::new()),
            Bytes::from((0..=255u8).collect::<Vec<_>>()),
        ];
        write_to(me, &inputs, &regions).unwrap();
        assert!(dest[..5000].iter().all(|&b| b == 7));
        assert!(dest[5000..] == *inputs[2]);

        let read = read_from(me, &regions).unwrap();
        assert_eq!(read, inputs);

        // Memory nobody maps: the kernel refuses with EFAULT, as it does for device
        // memory (NVIDIA's host-visible buffers): the expected refusal.
        let nowhere = [Region {
            addr: UNMAPPED,
            len: 5000,
        }];
        let refusal = write_to(me, &inputs[..1], &nowhere).unwrap_err();
        assert!(matches!(refusal, Refused::Memory(_)), "{refusal:?}");
        assert!(refusal.expected());
        assert!(matches!(read_from(me, &nowhere), Err(Refused::Memory(_))));
        // Lengths that do not match are refused before any call, and are no device's
        // doing.
        let refusal = write_to(me, &inputs[..1], &regions[2..]).unwrap_err();
        assert!(matches!(refusal, Refused::Kernel(_)), "{refusal:?}");
        assert!(!refusal.expected());
        // A process that does not exist: the worker is gone, not the method refused.
        assert!(matches!(
            read_from(i32::MAX as u32, &regions),
            Err(Refused::Gone)
        ));
    }

    #[test]
    fn pieces_keep_order_and_addresses_and_cut_at_the_piece_size() {
        let a = [1u8; 10];
        let b = [2u8; 3];
        let pieces = cut_pieces(vec![(&a[..], 1000), (&b[..], 5000)], 4);
        let shape: Vec<Vec<(usize, usize)>> = pieces
            .iter()
            .map(|piece| {
                piece
                    .iter()
                    .map(|(bytes, base)| (*base, bytes.len()))
                    .collect()
            })
            .collect();
        assert_eq!(
            shape,
            [
                vec![(1000, 4)],
                vec![(1004, 4)],
                vec![(1008, 2), (5000, 2)],
                vec![(5002, 1)],
            ]
        );
    }

    #[test]
    fn large_copies_split_over_threads_land_whole() {
        // Over SPLIT_MIN_BYTES, in three inputs of lengths that are no page multiple,
        // so that pieces start and end inside inputs.
        let me = std::process::id();
        let lens = [3 * 1024 * 1024 + 7, 5, 2 * 1024 * 1024 + 4093];
        let inputs: Vec<Bytes> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| Bytes::from((0..n).map(|j| (j * 31 + i * 7) as u8).collect::<Vec<u8>>()))
            .collect();
        let mut dests: Vec<Vec<u8>> = lens.iter().map(|&n| vec![0u8; n]).collect();
        let regions: Vec<Region> = dests
            .iter_mut()
            .map(|d| Region::of(d.as_mut_ptr(), d.len()))
            .collect();
        write_to(me, &inputs, &regions).unwrap();
        for (dest, input) in dests.iter().zip(&inputs) {
            assert!(dest[..] == input[..]);
        }
        assert_eq!(read_from(me, &regions).unwrap(), inputs);
        // A refusal in any piece fails the whole copy.
        let mut nowhere = regions.clone();
        nowhere[2].addr = UNMAPPED;
        assert!(matches!(
            write_to(me, &inputs, &nowhere),
            Err(Refused::Memory(_))
        ));
        assert!(matches!(read_from(me, &nowhere), Err(Refused::Memory(_))));
    }
}
