//! Byte payloads (task inputs and outputs) and their SHA-256 digests.
//!
//! Payloads serialize as raw bytes in binary formats (bincode) and as base64 in
//! human-readable ones (JSON), so one type serves the log and the operator API.

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};
use std::fmt;

/// An immutable, cheaply cloned byte buffer. Made from a `Vec` it keeps the `Vec`'s
/// allocation (no copy), which matters for the megabytes of a task's inputs and outputs.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Bytes(bytes::Bytes);

impl Bytes {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// SHA-256 of the bytes.
    pub fn digest(&self) -> Digest {
        Digest::of(&self.0)
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Self {
        Bytes(bytes::Bytes::from(v))
    }
}

/// Keeps the allocation when these bytes are its only holder (as bytes just decoded
/// are); copies otherwise.
impl From<Bytes> for Vec<u8> {
    fn from(b: Bytes) -> Vec<u8> {
        b.0.into()
    }
}

impl From<&[u8]> for Bytes {
    fn from(v: &[u8]) -> Self {
        Bytes(bytes::Bytes::copy_from_slice(v))
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} bytes, {})", self.len(), self.digest().short())
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Bytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes or a base64 string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Bytes, E> {
                base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .map(Bytes::from)
                    .map_err(|e| E::custom(format!("invalid base64: {e}")))
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes::from(v))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes::from(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Bytes, A::Error> {
                let mut v = Vec::with_capacity(a.size_hint().unwrap_or(0));
                while let Some(b) = a.next_element::<u8>()? {
                    v.push(b);
                }
                Ok(Bytes::from(v))
            }
        }
        if d.is_human_readable() {
            d.deserialize_str(V)
        } else {
            d.deserialize_bytes(V)
        }
    }
}

/// A SHA-256 digest. Data is referred to by digest inside the state machine, so that
/// large payloads can later move to content-addressed blobs with only the digest in
/// the log.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

/// Byte order (as the derived `Ord` of the array), compared a 64-bit word at a time:
/// the state's blob map searches by digest for every input of every submit on every
/// node, and the array's `Ord` called `memcmp` for each key the search passed. Random
/// digests nearly always differ in the first word.
impl Ord for Digest {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let word = |d: &[u8; 32], i: usize| {
            u64::from_be_bytes(d[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
        };
        (0..4)
            .map(|i| word(&self.0, i).cmp(&word(&other.0, i)))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    }
}

impl PartialOrd for Digest {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Digest {
    /// SHA-256 of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(Sha256::digest(data).into())
    }

    /// Lowercase hex, as `sha256sum` prints it.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex digits, for logs.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }

    /// Parse 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Digest> {
        let v = hex::decode(s).ok()?;
        Some(Digest(v.try_into().ok()?))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.short())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_hex())
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            Digest::from_hex(&s).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
        } else {
            <[u8; 32]>::deserialize(d).map(Digest)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_order_as_their_bytes() {
        let mut digests: Vec<Digest> = (0u32..200).map(|i| Digest::of(&i.to_le_bytes())).collect();
        // Pairs that differ only in a later word, or only in the last byte.
        for at in [8, 16, 24, 31] {
            let mut d = digests[0];
            d.0[at] ^= 0x80;
            digests.push(d);
        }
        digests.push(digests[0]);
        for a in &digests {
            for b in &digests {
                assert_eq!(a.cmp(b), a.0.cmp(&b.0), "{a:?} against {b:?}");
            }
        }
    }

    #[test]
    fn bytes_round_trip_in_json_and_bincode() {
        let b = Bytes::from(vec![0u8, 1, 2, 255]);
        let j = serde_json::to_string(&b).unwrap();
        assert_eq!(j, "\"AAEC/w==\"");
        assert_eq!(serde_json::from_str::<Bytes>(&j).unwrap(), b);
        let cfg = bincode::config::standard();
        let enc = bincode::serde::encode_to_vec(&b, cfg).unwrap();
        assert_eq!(
            enc.len(),
            5,
            "length prefix plus raw bytes, no per-byte overhead"
        );
        let (dec, _): (Bytes, usize) = bincode::serde::decode_from_slice(&enc, cfg).unwrap();
        assert_eq!(dec, b);
    }

    #[test]
    fn digest_matches_sha256sum() {
        assert_eq!(
            Digest::of(b"abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
