//! Payloads of node-to-node calls: values encoded with mesh-core's record codec.

use mesh_core::codec;
use mesh_proto::v1::RaftPayload;
use serde::{de::DeserializeOwned, Serialize};
use tonic::Status;

/// Encode a value into a payload.
pub fn to_payload<T: Serialize>(v: &T) -> Result<RaftPayload, Status> {
    codec::encode(v)
        .map(|data| RaftPayload { data })
        .map_err(|e| Status::internal(format!("encode: {e}")))
}

/// Decode a payload; a peer sending garbage gets `INVALID_ARGUMENT`.
pub fn from_payload<T: DeserializeOwned>(p: &RaftPayload) -> Result<T, Status> {
    codec::decode(&p.data)
        .map_err(|e| Status::invalid_argument(format!("undecodable payload: {e}")))
}
