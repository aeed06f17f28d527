//! The staging buffers an executor keeps between runs: one that a job's inputs are
//! written into (`MAP_WRITE | COPY_SRC`) and one that its outputs are copied back
//! into (`MAP_READ | COPY_DST`), each holding all of a job's buffers side by side.
//!
//! Why: a new mappable buffer costs an allocation, a page fault per page on first
//! touch and wgpu's zeroing of it (every resource reads as zero until written). On
//! lavapipe that is 1.7 ms of a 16 MiB upload before a byte of input is written,
//! and every write into fresh pages (a direct copy from the daemon included) faults
//! them in once more. A kept buffer was initialised by its first run and its pages
//! stay resident, so a later run pays for its copies alone. A GPU worker runs one job
//! at a time, so one buffer of each kind is enough; runs that overlap in one process
//! (tests, the bench) find it taken and make one of their own.
//!
//! Nothing of one run reaches the next through them: a kernel binds only the device
//! buffers the staged bytes are copied into (an input's every byte, its padding
//! included, is written for each run; outputs are new and zeroed by wgpu), and the
//! read-back views cover only the ranges the run copied into.

use std::sync::{Arc, Mutex};

/// The largest buffer kept for the next run: twice a task's input or output limit,
/// room for padding and alignment. A run past it (only in-process, where plans are
/// not bound by the task limits) gets a buffer that is dropped after it.
const KEPT_MAX_BYTES: u64 = 2 * mesh_core::limits::MAX_TASK_INPUT_BYTES;

/// New buffers are made a multiple of this, so that a job slightly larger than the
/// last does not replace the kept buffer.
const SIZE_STEP: u64 = 1024 * 1024;

/// Where each of a job's buffers lies in one staging buffer.
#[derive(Debug)]
pub(super) struct Packing {
    /// Byte offset of each buffer, in order; a multiple of `wgpu::MAP_ALIGNMENT`, as
    /// mapping a part of a buffer requires.
    pub offsets: Vec<u64>,
    /// Bytes from the first buffer's start to the end of the last.
    pub total: u64,
}

impl Packing {
    /// Buffers of `sizes` bytes (each a multiple of 4), one after the other.
    pub fn of(sizes: impl IntoIterator<Item = u64>) -> Packing {
        let mut total = 0u64;
        let offsets = sizes
            .into_iter()
            .map(|size| {
                let offset = total.next_multiple_of(wgpu::MAP_ALIGNMENT);
                total = offset + size;
                offset
            })
            .collect();
        Packing { offsets, total }
    }
}

/// One kind of staging buffer and the one kept of it between runs.
#[derive(Debug)]
pub(super) struct Shelf {
    usage: wgpu::BufferUsages,
    label: &'static str,
    kept: Mutex<Option<wgpu::Buffer>>,
}

impl Shelf {
    /// Buffers that inputs are written into and copied from.
    pub fn uploads() -> Shelf {
        Shelf::new(
            wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
            "mesh upload",
        )
    }

    /// Buffers that outputs are copied into and read from.
    pub fn readbacks() -> Shelf {
        Shelf::new(
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            "mesh readback",
        )
    }

    fn new(usage: wgpu::BufferUsages, label: &'static str) -> Shelf {
        Shelf {
            usage,
            label,
            kept: Mutex::new(None),
        }
    }

    /// The kept buffer, unmapped, if it holds `size` bytes and no other run has it
    /// (one too small is dropped: the new one this run makes replaces it); else a new
    /// buffer, mapped for writing when `mapped`. Returns the buffer and whether it is
    /// new.
    pub fn take_or_create(
        &self,
        device: &wgpu::Device,
        size: u64,
        mapped: bool,
    ) -> (wgpu::Buffer, bool) {
        let kept = self.kept.lock().expect("not poisoned").take();
        if let Some(buffer) = kept.filter(|buffer| buffer.size() >= size) {
            return (buffer, false);
        }
        let buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(self.label),
            size: size.max(1).next_multiple_of(SIZE_STEP),
            usage: self.usage,
            mapped_at_creation: mapped,
        });
        (buffer, true)
    }

    /// Keep `buffer`, unmapped and no longer used by the device, for the next run.
    pub fn put(&self, buffer: wgpu::Buffer) {
        if buffer.size() <= KEPT_MAX_BYTES {
            *self.kept.lock().expect("not poisoned") = Some(buffer);
        }
    }
}

/// A mapped read-back buffer, shared by the views into it: unmapped and put back on
/// its shelf when the last of them is dropped.
#[derive(Debug)]
pub(super) struct Mapped {
    buffer: wgpu::Buffer,
    shelf: Arc<Shelf>,
}

impl Mapped {
    pub fn new(buffer: wgpu::Buffer, shelf: Arc<Shelf>) -> Mapped {
        Mapped { buffer, shelf }
    }

    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // Every view holds this `Mapped` and drops its `BufferView` first, so none is
        // left. A lost device's error here reaches the executor's error log.
        self.buffer.unmap();
        self.shelf.put(self.buffer.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_buffers_start_at_map_aligned_offsets_and_never_overlap() {
        let packing = Packing::of([12, 4, 8, 4096]);
        assert_eq!(packing.offsets, [0, 16, 24, 32]);
        assert_eq!(packing.total, 32 + 4096);
        for (i, &offset) in packing.offsets.iter().enumerate() {
            assert_eq!(offset % wgpu::MAP_ALIGNMENT, 0, "buffer {i}");
        }
        let empty = Packing::of([]);
        assert!(empty.offsets.is_empty());
        assert_eq!(empty.total, 0);
    }
}
