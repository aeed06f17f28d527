//! The process-level harness of Mesh: launch real nodes, drive them through the real
//! CLI, inject faults. Used by `mesh-chaos`, `mesh-bench` and the integration tests;
//! never by the product at run time.

pub mod cluster;

pub use cluster::*;
