//! The process-level harness of Mesh: launch real nodes, drive them through the real
//! CLI, inject faults. Used by `mesh-chaos`, `mesh-bench` and the integration tests;
//! never by the product at run time.

pub mod checker;
pub mod cluster;
pub mod history;
pub mod nemesis;
pub mod netns;
pub mod observer;
pub mod proxy;
pub mod report;
pub mod run;
pub mod scenario;
pub mod schedule;
pub mod svg;
pub mod workload;

pub use cluster::*;
