//! How a node appears in the Raft membership: its address and the fingerprint every
//! peer pins it by. Carrying the fingerprint in the membership itself means the
//! replicated log is the source of the pin set.

use crate::identity::fingerprint::Fingerprint;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A Raft member: where to reach it and which key it must present.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MeshNode {
    /// Node-to-node (gRPC over mutual TLS) address, `host:port`.
    pub addr: String,
    /// Its host key fingerprint.
    pub fingerprint: Fingerprint,
}

impl fmt::Display for MeshNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.addr, self.fingerprint)
    }
}
