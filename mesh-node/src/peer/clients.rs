//! Cached gRPC channels to peers, each verifying that the peer presents exactly the
//! key the directory holds for it.

use super::MAX_MESSAGE_BYTES;
use crate::tls::{self, ServerExpectation, TlsIdentity};
use mesh_core::{Fingerprint, MeshNode};
use mesh_proto::v1::mesh_client::MeshClient;
use mesh_proto::v1::raft_client::RaftClient;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use tonic::transport::Channel;

/// Channels by (address, expected key).
#[derive(Clone)]
pub struct PeerClients {
    identity: Arc<TlsIdentity>,
    channels: Arc<Mutex<HashMap<(String, Fingerprint), Channel>>>,
    routes: Arc<BTreeMap<String, String>>,
}

impl PeerClients {
    /// Clients presenting `identity`.
    pub fn new(identity: Arc<TlsIdentity>) -> PeerClients {
        PeerClients::with_routes(identity, BTreeMap::new())
    }

    /// Clients that dial `routes[addr]` instead of `addr` (fault injection: a proxy
    /// on each outgoing link). The peer's key is still checked end to end.
    pub fn with_routes(
        identity: Arc<TlsIdentity>,
        routes: BTreeMap<String, String>,
    ) -> PeerClients {
        PeerClients {
            identity,
            channels: Arc::default(),
            routes: Arc::new(routes),
        }
    }

    /// A channel to `node` (connected lazily; tonic reconnects after failures).
    pub fn channel(&self, node: &MeshNode) -> Result<Channel, tls::TlsError> {
        let key = (node.addr.clone(), node.fingerprint.clone());
        if let Some(c) = self.channels.lock().expect("not poisoned").get(&key) {
            return Ok(c.clone());
        }
        let channel = tls::connect_lazy(
            self.dial_addr(node),
            &self.identity,
            ServerExpectation::Exactly(node.fingerprint.clone()),
        )?;
        self.channels
            .lock()
            .expect("not poisoned")
            .insert(key, channel.clone());
        Ok(channel)
    }

    /// The address this node dials to reach `node` (its own, or the route to it).
    pub fn dial_addr<'a>(&'a self, node: &'a MeshNode) -> &'a str {
        self.routes.get(&node.addr).unwrap_or(&node.addr)
    }

    /// A Raft client for `node`.
    pub fn raft(&self, node: &MeshNode) -> Result<RaftClient<Channel>, tls::TlsError> {
        Ok(RaftClient::new(self.channel(node)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// A Mesh client for `node`.
    pub fn mesh(&self, node: &MeshNode) -> Result<MeshClient<Channel>, tls::TlsError> {
        Ok(MeshClient::new(self.channel(node)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }
}
