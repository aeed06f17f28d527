//! The key of the state's idempotency map: (submitter, idempotency key), hashed once.
//!
//! The map is searched on every submit that carries a key, on every node. As a B-tree
//! of `Arc<(Fingerprint, String)>` each search compared ~50 keys through two pointers
//! each (the shared 51-byte fingerprint first): a keyed submit cost 1.5-2 µs more than
//! an unkeyed one at 100k tasks and 6-8 µs more at 600k (`cargo bench -p mesh-core
//! --bench apply`, docs/benchmarks.md). A hash map finds the key in one probe. The hash is computed once per key, with a key of the
//! process's own (so no submitter can pick keys that collide), and kept beside the
//! pair: growing the map moves entries without reading the strings again. The seed
//! changes only where entries sit in memory: lookups are exact, and the state is
//! encoded in key order (`state.rs`, `in_key_order`), the same bytes on every node.

use crate::identity::fingerprint::Fingerprint;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::sync::{Arc, OnceLock};

/// (submitter, idempotency key). Encoded exactly as the pair it holds, so the state's
/// encoding is the same as when the map was keyed by `Arc<(Fingerprint, String)>`.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    hash: u64,
    /// Shared: a snapshot's clone of the map copies pointers, not two strings per task.
    pair: Arc<(Fingerprint, String)>,
}

/// The map type: searched by the stored hash.
pub type IdempotencyMap<V> = HashMap<IdempotencyKey, V, BuildHasherDefault<StoredHash>>;

impl IdempotencyKey {
    /// The key of `key` submitted by `submitter`.
    pub fn new(submitter: Fingerprint, key: String) -> IdempotencyKey {
        static SEED: OnceLock<RandomState> = OnceLock::new();
        let pair = (submitter, key);
        IdempotencyKey {
            hash: SEED.get_or_init(RandomState::new).hash_one(&pair),
            pair: Arc::new(pair),
        }
    }

    /// The submitter.
    pub fn submitter(&self) -> &Fingerprint {
        &self.pair.0
    }

    /// The submitter's idempotency key.
    pub fn key(&self) -> &str {
        &self.pair.1
    }
}

impl PartialEq for IdempotencyKey {
    fn eq(&self, other: &IdempotencyKey) -> bool {
        self.hash == other.hash && self.pair == other.pair
    }
}

impl Eq for IdempotencyKey {}

/// By submitter, then key: the order the state is encoded in.
impl Ord for IdempotencyKey {
    fn cmp(&self, other: &IdempotencyKey) -> std::cmp::Ordering {
        self.pair.cmp(&other.pair)
    }
}

impl PartialOrd for IdempotencyKey {
    fn partial_cmp(&self, other: &IdempotencyKey) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Hash for IdempotencyKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl Serialize for IdempotencyKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.pair.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for IdempotencyKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (submitter, key) = <(Fingerprint, String)>::deserialize(deserializer)?;
        Ok(IdempotencyKey::new(submitter, key))
    }
}

/// A hasher that passes on the hash an [`IdempotencyKey`] already holds.
#[derive(Default)]
pub struct StoredHash(u64);

impl Hasher for StoredHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `IdempotencyKey` is hashed with this, and it writes one u64; anything
        // else still gets a usable (FNV-1a) hash rather than a constant.
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(c: char) -> Fingerprint {
        Fingerprint::of_key_blob(&[c as u8])
    }

    #[test]
    fn keys_are_equal_by_submitter_and_key_and_encode_as_the_pair() {
        let a = IdempotencyKey::new(fp('a'), "k1".into());
        assert_eq!(a, IdempotencyKey::new(fp('a'), "k1".into()));
        assert_ne!(a, IdempotencyKey::new(fp('b'), "k1".into()));
        assert_ne!(a, IdempotencyKey::new(fp('a'), "k2".into()));

        let as_pair = crate::codec::encode(&Arc::new((fp('a'), "k1".to_string()))).unwrap();
        assert_eq!(crate::codec::encode(&a).unwrap(), as_pair);
        let back: IdempotencyKey = crate::codec::decode(&as_pair).unwrap();
        assert_eq!(back, a);
        assert_eq!((back.submitter(), back.key()), (&fp('a'), "k1"));
    }

    #[test]
    fn the_map_finds_every_key_after_growing() {
        let mut map: IdempotencyMap<u64> = IdempotencyMap::default();
        for i in 0..10_000u64 {
            let submitter = fp(if i % 2 == 0 { 'a' } else { 'b' });
            assert!(map
                .insert(IdempotencyKey::new(submitter, format!("k{i}")), i)
                .is_none());
        }
        for i in 0..10_000u64 {
            let submitter = fp(if i % 2 == 0 { 'a' } else { 'b' });
            assert_eq!(
                map.get(&IdempotencyKey::new(submitter, format!("k{i}"))),
                Some(&i)
            );
        }
        assert_eq!(map.get(&IdempotencyKey::new(fp('b'), "k0".into())), None);
    }
}
