//! What can go wrong between a kernel plan and its output bytes, and whether trying
//! again (on this node or another) can help.

/// Why the executor could not open an adapter or run a plan.
///
/// Each variant says who caused it: the machine (no driver, device loss, memory), the
/// task (a kernel that does not compile, buffers over the adapter's limits), or a
/// plan that `mesh_core::kernel::plan` should never have produced.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The machine: wgpu found no adapter at all.
    #[error(
        "no GPU adapter found: wgpu sees no Vulkan, Metal, DX12 or GL device on this machine; \
         install Mesa's CPU Vulkan driver (`apt-get install mesa-vulkan-drivers`) or a GPU driver"
    )]
    NoAdapter,
    /// The machine: the driver refused to open a device on the adapter.
    #[error("the adapter '{adapter}' refused to open a device: {reason}")]
    RequestDevice {
        /// Adapter name.
        adapter: String,
        /// wgpu's reason.
        reason: String,
    },
    /// The task: a buffer is larger than this adapter allows. Checked before any
    /// buffer is created.
    #[error(
        "binding {binding} needs a {bytes}-byte buffer, over this adapter's limit of {limit} bytes \
         ({limit_name}); split the work into smaller tasks"
    )]
    BufferTooLarge {
        /// The `@binding` index.
        binding: u32,
        /// Bytes the binding needs.
        bytes: u64,
        /// The adapter's limit.
        limit: u64,
        /// Which wgpu limit was exceeded, e.g. `max_storage_buffer_binding_size`.
        limit_name: &'static str,
    },
    /// The task: more buffers of one kind than one shader stage may bind here.
    #[error(
        "the kernel binds {count} {kind} buffers; this adapter allows {limit} per shader stage"
    )]
    TooManyBuffers {
        /// `storage` or `uniform`.
        kind: &'static str,
        /// Buffers of that kind in the plan.
        count: u32,
        /// The adapter's limit.
        limit: u32,
    },
    /// The planner: the plan contradicts itself or the inputs given with it.
    #[error("invalid kernel plan: {0}")]
    InvalidPlan(String),
    /// The task: shader module, bind group layout or pipeline creation failed
    /// validation (wgpu's message).
    #[error("the kernel does not compile on this adapter:\n{0}")]
    Compile(String),
    /// The task: creating buffers, binding them or encoding the dispatch failed
    /// validation (wgpu's message).
    #[error("the dispatch was refused: {0}")]
    Dispatch(String),
    /// The machine: the driver reported an internal error (e.g. its shader compiler
    /// failed); another adapter may succeed.
    #[error("the GPU driver reported an internal error: {0}")]
    Driver(String),
    /// The machine: the device ran out of memory.
    #[error("the GPU ran out of memory: {0}")]
    OutOfMemory(String),
    /// The machine: reading the output back failed.
    #[error("reading the output back from the GPU failed: {0}")]
    Readback(String),
    /// The machine: the device was lost (driver reset, GPU fell off the bus, ...).
    /// The executor is unusable afterwards; the node must open a new one.
    #[error("the GPU device was lost: {0}")]
    DeviceLost(String),
}

impl GpuError {
    /// Whether running the same plan again (here after reopening, or on another node)
    /// may succeed. False for errors that follow from the task itself and will fail
    /// again anywhere: kernels that do not compile, refused dispatches, buffers over
    /// the limits, invalid plans.
    pub fn retryable(&self) -> bool {
        match self {
            GpuError::NoAdapter
            | GpuError::RequestDevice { .. }
            | GpuError::Driver(_)
            | GpuError::OutOfMemory(_)
            | GpuError::Readback(_)
            | GpuError::DeviceLost(_) => true,
            GpuError::BufferTooLarge { .. }
            | GpuError::TooManyBuffers { .. }
            | GpuError::InvalidPlan(_)
            | GpuError::Compile(_)
            | GpuError::Dispatch(_) => false,
        }
    }
}

/// The message a caught panic carried, when it carried a string (as `panic!` with a
/// message does).
pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> Option<String> {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
}
