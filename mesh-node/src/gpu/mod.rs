//! The wgpu executor: adapter probing and kernel dispatch.
//!
//! [`probe`] lists the adapters wgpu sees (published as node capabilities);
//! [`Executor`] opens the best one and runs `mesh_core::kernel::KernelPlan`s on it,
//! in one call ([`Executor::run`]) or in two ([`Executor::upload`] of the inputs into
//! a staging buffer kept between runs (`staging.rs`), then [`Executor::launch`], whose
//! [`Outputs`] are read where the device put them).
//! No wgpu error panics: validation, driver and memory errors are caught in error
//! scopes and returned as [`GpuError`]s, and device loss is recorded and reported.
//!
//! The daemon does not dispatch in its own process: a [`Supervisor`] runs each job in
//! a `mesh-node gpu-worker` process ([`child`]) that holds an [`Executor`], talking
//! over a pipe ([`wire`]) and copying large jobs' inputs and outputs straight between
//! its memory and the worker's mapped staging buffers ([`direct`]), so that a hung or
//! crashing kernel is killed at its timeout or on cancel without taking the daemon down.

pub mod child;
pub mod direct;
mod error;
mod exec_error;
mod executor;
mod pipeline;
mod probe;
mod staging;
mod supervisor;
pub mod wire;

pub use error::GpuError;
pub use exec_error::{ChildExit, ExecError, StartError};
pub use executor::{Executor, OutputView, Outputs, Uploaded};
pub use pipeline::Pipelines;
pub use probe::probe;
pub use supervisor::{Supervisor, WorkerCommand, DIRECT_MIN_BYTES, WORKER_SUBCOMMAND};
pub use wire::{ChildError, ChildErrorKind};
