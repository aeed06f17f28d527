//! The wgpu executor: adapter probing and kernel dispatch.
//!
//! [`probe`] lists the adapters wgpu sees (published as node capabilities);
//! [`Executor`] opens the best one and runs `mesh_core::kernel::KernelPlan`s on it.
//! No wgpu error panics: validation, driver and memory errors are caught in error
//! scopes and returned as [`GpuError`]s, and device loss is recorded and reported.

mod error;
mod executor;
mod probe;

pub use error::GpuError;
pub use executor::Executor;
pub use probe::probe;
