//! Which host key belongs to which node id: the union of the Raft membership, the
//! nodes recorded in the state (not removed), and the pins given at bootstrap (the
//! seed of a join token, the members a join reply listed). It feeds the TLS pin set,
//! and answers "does this key belong to the node id the request claims?".

use crate::store::StateView;
use crate::tls::Pins;
use mesh_core::raft_types::TypeConfig;
use mesh_core::{Fingerprint, MeshNode, NodeId};
use openraft::Raft;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, RwLock};
use tokio_util::sync::CancellationToken;

/// The id -> key map and the pins derived from it.
#[derive(Clone)]
pub struct Directory {
    pins: Pins,
    inner: Arc<RwLock<Inner>>,
}

#[derive(Default)]
struct Inner {
    bootstrap: BTreeMap<Option<NodeId>, Vec<MeshNode>>,
    by_id: BTreeMap<NodeId, MeshNode>,
}

impl Directory {
    /// A directory that feeds `pins`.
    pub fn new(pins: Pins) -> Directory {
        Directory {
            pins,
            inner: Arc::default(),
        }
    }

    /// The pin set.
    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// Pin a key given at bootstrap (the seed from a token has no known id yet).
    pub fn add_bootstrap(&self, id: Option<NodeId>, node: MeshNode) {
        let mut inner = self.inner.write().expect("not poisoned");
        inner.bootstrap.entry(id).or_default().push(node.clone());
        if let Some(id) = id {
            inner.by_id.entry(id).or_insert(node.clone());
        }
        drop(inner);
        self.pins.insert(node.fingerprint);
    }

    /// The key and address of a node id.
    pub fn node(&self, id: NodeId) -> Option<MeshNode> {
        self.inner
            .read()
            .expect("not poisoned")
            .by_id
            .get(&id)
            .cloned()
    }

    /// The node id a key belongs to.
    pub fn id_of(&self, fp: &Fingerprint) -> Option<NodeId> {
        let inner = self.inner.read().expect("not poisoned");
        inner
            .by_id
            .iter()
            .find(|(_, n)| n.fingerprint == *fp)
            .map(|(id, _)| *id)
    }

    /// Recompute from the current membership and state.
    pub fn refresh(&self, raft: &Raft<TypeConfig>, state: &StateView) {
        let mut by_id: BTreeMap<NodeId, MeshNode> = BTreeMap::new();
        let inner = self.inner.read().expect("not poisoned");
        for (id, nodes) in &inner.bootstrap {
            if let (Some(id), Some(n)) = (id, nodes.last()) {
                by_id.insert(*id, n.clone());
            }
        }
        let unnamed: Vec<MeshNode> = inner.bootstrap.get(&None).cloned().unwrap_or_default();
        drop(inner);
        state.read(|s| {
            for n in s.nodes.values() {
                if n.removed {
                    by_id.remove(&n.id);
                } else {
                    by_id.insert(
                        n.id,
                        MeshNode {
                            addr: n.addr.clone(),
                            fingerprint: n.fingerprint.clone(),
                        },
                    );
                }
            }
        });
        let removed: Vec<NodeId> = state.read(|s| {
            s.nodes
                .values()
                .filter(|n| n.removed)
                .map(|n| n.id)
                .collect()
        });
        let membership = raft.metrics().borrow().membership_config.clone();
        for (id, node) in membership.membership().nodes() {
            if !removed.contains(&NodeId(*id)) {
                by_id.insert(NodeId(*id), node.clone());
            }
        }
        let pins = by_id
            .values()
            .map(|n| n.fingerprint.clone())
            .chain(unnamed.into_iter().map(|n| n.fingerprint));
        self.pins.replace(pins.collect::<Vec<_>>());
        self.inner.write().expect("not poisoned").by_id = by_id;
    }

    /// Keep the directory current until shutdown. Both watches fire for nearly every
    /// Raft entry; the map is rebuilt only when what it is made of changed.
    pub async fn run(self, raft: Raft<TypeConfig>, state: StateView, shutdown: CancellationToken) {
        let mut changes = state.changes();
        let mut metrics = raft.metrics();
        let mut built_from = None;
        loop {
            let sources = Sources::now(&raft, &state);
            if built_from.as_ref() != Some(&sources) {
                self.refresh(&raft, &state);
                built_from = Some(sources);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
                r = metrics.changed() => if r.is_err() { return },
            }
        }
    }
}

/// What the map is built from, in short: the membership's log id and a hash of the
/// node records' ids, addresses, keys and removal marks. (The bootstrap pins, its third
/// source, are all added before `run` starts.)
#[derive(PartialEq)]
struct Sources {
    membership: Option<openraft::LogId<u64>>,
    nodes: u64,
}

impl Sources {
    fn now(raft: &Raft<TypeConfig>, state: &StateView) -> Sources {
        let membership = *raft.metrics().borrow().membership_config.log_id();
        let nodes = state.read(|s| {
            let mut h = std::hash::DefaultHasher::new();
            for n in s.nodes.values() {
                (n.id, &n.addr, &n.fingerprint, n.removed).hash(&mut h);
            }
            h.finish()
        });
        Sources { membership, nodes }
    }
}

impl Directory {
    /// Every known node id with its key and address.
    pub fn members(&self) -> Vec<(NodeId, MeshNode)> {
        self.inner
            .read()
            .expect("not poisoned")
            .by_id
            .iter()
            .map(|(id, n)| (*id, n.clone()))
            .collect()
    }
}
