//! Size limits every node enforces on what enters the replicated log.

/// Largest total of a task's input bytes accepted at submit. Inputs travel through
/// the Raft log, so this bounds one entry; 1M-element saxpy needs 8 MiB.
pub const MAX_TASK_INPUT_BYTES: u64 = 16 * 1024 * 1024;

/// Largest total of a task's declared output bytes: outputs come back through the
/// log as well.
pub const MAX_TASK_OUTPUT_BYTES: u64 = 16 * 1024 * 1024;

/// Largest WGSL source accepted, bytes.
pub const MAX_WGSL_SOURCE_BYTES: usize = 256 * 1024;

/// Most input or output buffers of one task (wgpu's default storage-buffer limit is 8).
pub const MAX_TASK_BUFFERS: usize = 8;

/// Longest idempotency key, bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;
