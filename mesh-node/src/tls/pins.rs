//! The set of node fingerprints this node accepts as peers, shared by the TLS verifiers
//! and the per-call guard and updated at runtime as Raft membership changes.

use mesh_core::Fingerprint;
use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The pinned fingerprints: the current membership plus the pins given at bootstrap.
///
/// Cloning shares the set, so the verifier inside a rustls config, the per-call guard
/// and the code that follows membership all see one set. Checks read it on every
/// handshake and every call, so a removal takes effect for the next connection and
/// the next call on an open one.
#[derive(Clone, Default)]
pub struct Pins {
    set: Arc<RwLock<BTreeSet<Fingerprint>>>,
}

impl Pins {
    /// Pins holding `initial`.
    pub fn new(initial: impl IntoIterator<Item = Fingerprint>) -> Pins {
        Pins {
            set: Arc::new(RwLock::new(initial.into_iter().collect())),
        }
    }

    /// Replace the whole set (after a membership change was applied).
    pub fn replace(&self, set: impl IntoIterator<Item = Fingerprint>) {
        *self.write() = set.into_iter().collect();
    }

    /// Pin one more key. Returns whether it was new.
    pub fn insert(&self, fingerprint: Fingerprint) -> bool {
        self.write().insert(fingerprint)
    }

    /// Unpin a key. Returns whether it was pinned.
    pub fn remove(&self, fingerprint: &Fingerprint) -> bool {
        self.write().remove(fingerprint)
    }

    /// Whether `fingerprint` is pinned.
    pub fn contains(&self, fingerprint: &Fingerprint) -> bool {
        self.read().contains(fingerprint)
    }

    /// A copy of the current set.
    pub fn snapshot(&self) -> BTreeSet<Fingerprint> {
        self.read().clone()
    }

    // A panic while holding the lock cannot leave a BTreeSet half-updated in a way that
    // matters here (every write is one call), so poisoning is ignored rather than
    // turned into a node that refuses every peer.
    fn read(&self) -> RwLockReadGuard<'_, BTreeSet<Fingerprint>> {
        self.set
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeSet<Fingerprint>> {
        self.set
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl fmt::Debug for Pins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.read().iter().map(Fingerprint::as_str))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(byte: u8) -> Fingerprint {
        Fingerprint::of_ed25519(&[byte; 32])
    }

    #[test]
    fn clones_share_one_set() {
        let pins = Pins::new([fp(1)]);
        let seen_by_verifier = pins.clone();
        assert!(pins.insert(fp(2)));
        assert!(!pins.insert(fp(2)));
        assert!(seen_by_verifier.contains(&fp(2)));
        pins.replace([fp(3)]);
        assert!(!seen_by_verifier.contains(&fp(1)));
        assert!(seen_by_verifier.contains(&fp(3)));
        assert!(seen_by_verifier.remove(&fp(3)));
        assert!(pins.snapshot().is_empty());
    }
}
