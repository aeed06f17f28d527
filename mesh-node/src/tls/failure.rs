//! Why a TLS handshake failed, as a small fixed set of reasons: the `reason` label of
//! `mesh_tls_handshake_failures_total` and the word in the log line.

use super::cert::CertKeyError;
use super::verifier::PeerKeyError;
use rustls::{CertificateError, PeerMisbehaved};
use std::fmt;
use std::io;
use std::net::SocketAddr;

/// Counter of failed node-to-node TLS handshakes, labelled `side` (`server` when a
/// peer dialled us, `client` when we dialled) and `reason` ([`HandshakeFailure::label`]).
pub const HANDSHAKE_FAILURES_METRIC: &str = "mesh_tls_handshake_failures_total";

/// Why a handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    /// The peer's ed25519 key is valid but not pinned.
    Unpinned,
    /// The peer's key is not the one this connection expected (changed key or a man
    /// in the middle).
    UnexpectedKey,
    /// The peer's certificate holds a key that is not ed25519.
    NotEd25519,
    /// The peer's certificate could not be parsed.
    BadCertificate,
    /// The peer did not prove it holds the certificate's key.
    BadSignature,
    /// The peer presented no certificate.
    NoCertificate,
    /// The peer refused us (it sent a fatal alert, e.g. because it does not pin us).
    PeerAlert,
    /// The handshake did not finish in time.
    Timeout,
    /// Anything else: not TLS at all, a reset connection, a protocol error.
    Other,
}

impl HandshakeFailure {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            HandshakeFailure::Unpinned => "unpinned",
            HandshakeFailure::UnexpectedKey => "unexpected_key",
            HandshakeFailure::NotEd25519 => "not_ed25519",
            HandshakeFailure::BadCertificate => "bad_certificate",
            HandshakeFailure::BadSignature => "bad_signature",
            HandshakeFailure::NoCertificate => "no_certificate",
            HandshakeFailure::PeerAlert => "peer_alert",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Other => "other",
        }
    }

    /// Classify the error of a rustls handshake driven by tokio-rustls.
    pub fn of_io(err: &io::Error) -> HandshakeFailure {
        if err.kind() == io::ErrorKind::TimedOut {
            return HandshakeFailure::Timeout;
        }
        match err
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(tls) => HandshakeFailure::of_rustls(tls),
            None => HandshakeFailure::Other,
        }
    }

    /// Classify a rustls error.
    pub fn of_rustls(err: &rustls::Error) -> HandshakeFailure {
        if let Some(key) = PeerKeyError::from_rustls(err) {
            return match key {
                PeerKeyError::Unpinned { .. } => HandshakeFailure::Unpinned,
                PeerKeyError::Unexpected { .. } => HandshakeFailure::UnexpectedKey,
                PeerKeyError::Key(CertKeyError::NotEd25519) => HandshakeFailure::NotEd25519,
                PeerKeyError::Key(CertKeyError::Malformed(_)) => HandshakeFailure::BadCertificate,
            };
        }
        #[allow(deprecated)] // UnsupportedSignatureAlgorithm: still produced by rustls' webpki glue
        match err {
            rustls::Error::InvalidCertificate(
                CertificateError::BadSignature
                | CertificateError::UnsupportedSignatureAlgorithm
                | CertificateError::UnsupportedSignatureAlgorithmContext { .. }
                | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. },
            )
            | rustls::Error::PeerMisbehaved(
                PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
            ) => HandshakeFailure::BadSignature,
            rustls::Error::InvalidCertificate(CertificateError::BadEncoding) => {
                HandshakeFailure::BadCertificate
            }
            rustls::Error::NoCertificatesPresented => HandshakeFailure::NoCertificate,
            rustls::Error::AlertReceived(_) => HandshakeFailure::PeerAlert,
            _ => HandshakeFailure::Other,
        }
    }
}

/// A handshake error in words: our own reason when our verifier refused the peer's key
/// (rustls would print it with `Debug`), else the error as rustls or the OS put it.
pub fn describe(err: &io::Error) -> String {
    let tls = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls.and_then(PeerKeyError::from_rustls) {
        Some(key) => key.to_string(),
        None => err.to_string(),
    }
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Which end of the connection this node was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// A peer dialled this node.
    Server,
    /// This node dialled a peer.
    Client,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Server => "server",
            Side::Client => "client",
        }
    }
}

/// Count and log one failed handshake.
pub(crate) fn record(
    side: Side,
    peer: Option<SocketAddr>,
    reason: HandshakeFailure,
    err: &dyn fmt::Display,
) {
    metrics::counter!(HANDSHAKE_FAILURES_METRIC, "side" => side.label(), "reason" => reason.label()).increment(1);
    let peer = peer.map_or_else(|| "?".to_string(), |a| a.to_string());
    match reason {
        // A key we do not trust knocked, or a key changed: an operator may need to act.
        HandshakeFailure::Unpinned
        | HandshakeFailure::UnexpectedKey
        | HandshakeFailure::NotEd25519
        | HandshakeFailure::BadSignature
        | HandshakeFailure::PeerAlert => {
            tracing::warn!(side = side.label(), %peer, %reason, "TLS handshake refused: {err}");
        }
        // Port scanners, health probes and dropped links: noise unless debugging.
        HandshakeFailure::BadCertificate
        | HandshakeFailure::NoCertificate
        | HandshakeFailure::Timeout
        | HandshakeFailure::Other => {
            tracing::debug!(side = side.label(), %peer, %reason, "TLS handshake failed: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_from_tokio_rustls_are_classified() {
        let io_of = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        assert_eq!(
            HandshakeFailure::of_io(&io_of(rustls::Error::NoCertificatesPresented)),
            HandshakeFailure::NoCertificate
        );
        assert_eq!(
            HandshakeFailure::of_io(&io_of(rustls::Error::InvalidCertificate(
                CertificateError::BadSignature
            ))),
            HandshakeFailure::BadSignature
        );
        assert_eq!(
            HandshakeFailure::of_io(&io::Error::from(io::ErrorKind::TimedOut)),
            HandshakeFailure::Timeout
        );
        assert_eq!(
            HandshakeFailure::of_io(&io::Error::from(io::ErrorKind::ConnectionReset)),
            HandshakeFailure::Other
        );
    }
}
