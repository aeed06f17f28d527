//! Mesh core: the domain model and the rules every node agrees on, free of I/O.
//!
//! Everything here is deterministic: time and randomness come in as arguments, maps
//! that are iterated are `BTreeMap`, and nothing touches sockets, files, clocks or
//! GPUs. The daemon (`mesh-node`) and the client (`mesh-cli`) build on these types.
#![warn(missing_docs)]

pub mod access;
pub mod api;
pub mod audit;
pub mod builtin;
pub mod capability;
pub mod codec;
pub mod command;
pub mod data;
pub mod duration;
pub mod idempotency;
pub mod identity;
pub mod ids;
pub mod kernel;
pub mod limits;
pub mod membership;
pub mod raft_types;
pub mod requirement;
pub mod scheduler;
pub mod state;
pub mod task;
pub mod token;

pub use capability::{AdapterInfo, DeviceType, NodeCapabilities};
pub use command::{Command, Outcome, Rejection, Request, Response};
pub use data::{Bytes, Digest};
pub use identity::fingerprint::Fingerprint;
pub use ids::{Attempt, NodeId, TaskId, Timestamp};
pub use membership::MeshNode;
pub use state::MeshState;
pub use task::{Task, TaskSpec, TaskState};
