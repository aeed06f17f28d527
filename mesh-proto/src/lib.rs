//! Mesh's wire protocol, package `mesh.v1`: protobuf definitions under `proto/` and
//! the tonic/prost code generated from them. No logic lives here.
#![allow(missing_docs, clippy::all)]

/// Generated code for package `mesh.v1`.
pub mod v1 {
    tonic::include_proto!("mesh.v1");
}
