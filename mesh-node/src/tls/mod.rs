//! Node-to-node transport security: mutual TLS 1.3 in which each side is trusted only
//! through the fingerprint of its SSH host key.
//!
//! A node's certificate is self-signed with its ed25519 SSH host key ([`TlsIdentity`]),
//! so the key in the certificate is the key operators pin in `known_hosts`. Both ends
//! run one verifier ([`PeerVerifier`]): the peer's key must be ed25519, its fingerprint
//! must be accepted (pinned, or exactly the one a join token names), and the peer must
//! sign the handshake with it. Names, dates and issuers are not checked: pinning
//! replaces PKI. There is no path that accepts an arbitrary certificate.
//!
//! Serving:
//! ```text
//! let policy = PeerPolicy::AllowUnpinned { pins, unpinned_methods: &["/mesh.v1.Mesh/Join"] };
//! tls::server(&policy)            // every call is guarded: unpinned peers reach only join
//!     .add_service(RaftServer::new(raft))
//!     .add_service(MeshServer::new(mesh))
//!     .serve_with_incoming_shutdown(tls::incoming(listener, &identity, policy, stop.clone())?, stop.cancelled())
//! ```
//! Handlers learn the caller from [`peer_fingerprint`], never from the request body.
//!
//! Dialling: [`connect`] / [`connect_lazy`] with [`ServerExpectation::Pinned`], or
//! [`ServerExpectation::Exactly`] the seed's fingerprint when joining.
//!
//! Failed handshakes are counted in [`HANDSHAKE_FAILURES_METRIC`] by side and reason.

mod cert;
mod client;
mod coalesce;
mod failure;
mod guard;
mod pins;
mod server;
mod verifier;

pub use cert::{cert_ed25519_key, cert_fingerprint, CertKeyError, TlsIdentity, CERT_NAME};
pub use client::{client_config, connect, connect_lazy, ServerExpectation, CONNECT_TIMEOUT};
pub use failure::{
    describe as describe_handshake_error, HandshakeFailure, HANDSHAKE_FAILURES_METRIC,
};
pub use guard::{
    peer_fingerprint, require_pinned, RequirePinned, RequirePinnedLayer,
    UNPINNED_CALLS_DENIED_METRIC,
};
pub use pins::Pins;
pub use server::{
    incoming, server, server_config, PeerPolicy, TlsIncoming, TlsListener, HANDSHAKE_TIMEOUT,
    MAX_PENDING_HANDSHAKES,
};
pub use verifier::{PeerKeyError, PeerVerifier};

/// Why node TLS could not be set up. Handshake failures with a peer are not here: they
/// are counted and logged where they happen, and reach a caller as a failed connection.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Our own host key cannot serve as a TLS identity (node configuration).
    #[error(
        "the host key is {algorithm}; node TLS needs an ed25519 host key (`ssh-keygen -t ed25519`)"
    )]
    HostKeyNotEd25519 {
        /// The key's algorithm.
        algorithm: String,
    },
    /// Our host key file's private and public halves disagree (a corrupt file).
    #[error("the host key's private and public halves do not match; the key file is corrupt: restore it or generate a new key (the node's fingerprint then changes)")]
    HostKeyInconsistent,
    /// The certificate could not be made (a bug or an unusable key).
    #[error("cannot make the node certificate: {0}")]
    Certificate(rcgen::Error),
    /// rustls refused the configuration (a bug: the inputs are our own).
    #[error("cannot configure TLS: {0}")]
    Config(rustls::Error),
    /// The peer address given by the caller is not `host:port`.
    #[error("'{addr}' is not a peer address: {reason}")]
    BadAddress {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The peer could not be reached, or its handshake failed.
    #[error("cannot connect to the node at {addr}: {detail}")]
    Connect {
        /// The address dialled.
        addr: String,
        /// The failure and its causes.
        detail: String,
    },
}
