//! Payloads of node-to-node calls: values encoded with mesh-core's record codec.

use mesh_core::codec;
use mesh_core::membership::MeshNode;
use mesh_core::raft_types::TypeConfig;
use mesh_core::Bytes;
use mesh_proto::v1::RaftPayload;
use openraft::raft::InstallSnapshotRequest;
use openraft::{SnapshotMeta, Vote};
use serde::{de::DeserializeOwned, Deserialize, Serialize, Serializer};
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

/// One chunk of a snapshot for node `target`, as the leader sends it.
///
/// openraft's request holds the chunk in a `Vec<u8>`, which serde encodes and decodes
/// one byte at a time; its chunks are 3 MiB, and that took ~8 ms each way in a release
/// build and 110-270 ms in a debug one, on the runtime thread of the leader and then of
/// the follower, so every heartbeat of the leader and every answer of the follower
/// waited behind it (chaos replays: the leader's runtime woke timers ~180 ms late once
/// per chunk after each restart). Here the chunk is one byte string: a length and a copy.
/// The bytes on the wire are the same as before (bincode writes both alike).
pub fn snapshot_chunk_to_payload(
    target: u64,
    rpc: &InstallSnapshotRequest<TypeConfig>,
) -> Result<RaftPayload, Status> {
    to_payload(&ChunkOut {
        target,
        vote: &rpc.vote,
        meta: &rpc.meta,
        offset: rpc.offset,
        data: &rpc.data,
        done: rpc.done,
    })
}

/// Decode [`snapshot_chunk_to_payload`]'s payload: the target and the request.
pub fn snapshot_chunk_from_payload(
    p: &RaftPayload,
) -> Result<(u64, InstallSnapshotRequest<TypeConfig>), Status> {
    let chunk: ChunkIn = from_payload(p)?;
    Ok((
        chunk.target,
        InstallSnapshotRequest {
            vote: chunk.vote,
            meta: chunk.meta,
            offset: chunk.offset,
            data: chunk.data.into(),
            done: chunk.done,
        },
    ))
}

/// A snapshot chunk as encoded; the fields of [`ChunkIn`], in the same order.
#[derive(Serialize)]
struct ChunkOut<'a> {
    target: u64,
    vote: &'a Vote<u64>,
    meta: &'a SnapshotMeta<u64, MeshNode>,
    offset: u64,
    #[serde(serialize_with = "as_byte_string")]
    data: &'a [u8],
    done: bool,
}

/// A snapshot chunk as decoded.
#[derive(Deserialize)]
struct ChunkIn {
    target: u64,
    vote: Vote<u64>,
    meta: SnapshotMeta<u64, MeshNode>,
    offset: u64,
    /// Read as one byte string, as [`Bytes`] always is.
    data: Bytes,
    done: bool,
}

fn as_byte_string<S: Serializer>(data: &&[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, LogId, StoredMembership};

    /// bincode writes a byte string and a sequence of `u8` alike (a length, then the
    /// bytes), and a struct's fields as a tuple's, so a build that sends `(target,
    /// request)` through serde and this one read each other's chunks: a rolling upgrade
    /// can still send snapshots both ways.
    #[test]
    fn a_chunk_is_encoded_as_the_plain_request_was() {
        let sent = InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new_committed(7, 1),
            meta: SnapshotMeta {
                last_log_id: Some(LogId::new(CommittedLeaderId::new(7, 1), 40_000)),
                last_membership: StoredMembership::default(),
                snapshot_id: "7-40000-3".into(),
            },
            offset: 6 * 1024 * 1024,
            data: (0..70_000u32).map(|i| (i % 256) as u8).collect(),
            done: false,
        };

        let plain = to_payload(&(2u64, &sent)).unwrap();
        let chunk = snapshot_chunk_to_payload(2, &sent).unwrap();

        assert_eq!(chunk.data, plain.data);
        let (target, got) = snapshot_chunk_from_payload(&plain).unwrap();
        assert_eq!((target, got), (2, sent));
    }

    #[test]
    fn a_chunk_cut_short_is_refused() {
        let sent = InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new_committed(1, 1),
            meta: SnapshotMeta::default(),
            offset: 0,
            data: vec![9; 1000],
            done: false,
        };
        let mut payload = snapshot_chunk_to_payload(2, &sent).unwrap();
        payload.data.truncate(payload.data.len() - 10);

        let err = snapshot_chunk_from_payload(&payload).unwrap_err();

        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}
