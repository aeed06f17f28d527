//! The storage record codec: bincode 2 (serde) behind a format version byte.
//!
//! Every record the node stores (log entries, vote, snapshots) goes through here, so
//! a format change is one version bump in one place.

use serde::{de::DeserializeOwned, Serialize};

/// The current record format.
pub const FORMAT_VERSION: u8 = 1;

/// A record that cannot be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The record is empty.
    #[error("empty record")]
    Empty,
    /// Written by another format version.
    #[error("record has format version {found}, this build reads version {FORMAT_VERSION}")]
    Version {
        /// The version byte found.
        found: u8,
    },
    /// bincode failed to encode.
    #[error("encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// bincode failed to decode (corrupt or foreign data).
    #[error("decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    /// Bytes were left after the record.
    #[error("{0} trailing bytes after the record")]
    Trailing(usize),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encode a record.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    encode_into(value, &mut out)?;
    Ok(out)
}

/// Encode a record at the end of `out` (a frame that already holds its header).
pub fn encode_into<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    out.push(FORMAT_VERSION);
    bincode::serde::encode_into_std_write(value, out, config())?;
    Ok(())
}

/// Decode a record written by `encode`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(CodecError::Version { found: version });
    }
    let (value, used) = bincode::serde::decode_from_slice(body, config())?;
    if used != body.len() {
        return Err(CodecError::Trailing(body.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, Request};
    use crate::ids::{NodeId, TaskId, Timestamp};

    #[test]
    fn round_trip_and_version_check() {
        let req = Request {
            now: Timestamp(7),
            commands: vec![Command::Assign {
                task: TaskId(1),
                node: NodeId(2),
            }]
            .into(),
        };
        let bytes = encode(&req).unwrap();
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode::<Request>(&bytes).unwrap(), req);
        let mut wrong = bytes.clone();
        wrong[0] = 99;
        assert!(matches!(
            decode::<Request>(&wrong),
            Err(CodecError::Version { found: 99 })
        ));
        assert!(decode::<Request>(&bytes[..bytes.len() - 1]).is_err());
    }
}
