//! The dialling side of node-to-node TLS: a tonic `Channel` whose connector completes a
//! TLS handshake that presents our identity and verifies the server's key.

use super::cert::CERT_NAME;
use super::coalesce::Coalesced;
use super::failure::{self, HandshakeFailure, Side};
use super::pins::Pins;
use super::verifier::{KeyRule, PeerVerifier};
use super::{TlsError, TlsIdentity};
use hyper_util::rt::TokioIo;
use mesh_core::Fingerprint;
use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

/// How long dialling a peer may take, TCP connect and TLS handshake together. Shorter
/// than the server's `HANDSHAKE_TIMEOUT`: the caller (Raft, a join) retries on its own
/// schedule, and a peer that has not answered in 5 s is better treated as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Which server key a client accepts.
#[derive(Debug, Clone)]
pub enum ServerExpectation {
    /// The server's key must be pinned (ordinary node-to-node traffic).
    Pinned(Pins),
    /// The server's key must be exactly this one (joining: the token names the seed's key).
    Exactly(Fingerprint),
}

impl ServerExpectation {
    fn key_rule(&self) -> KeyRule {
        match self {
            ServerExpectation::Pinned(pins) => KeyRule::Pinned(pins.clone()),
            ServerExpectation::Exactly(fingerprint) => KeyRule::Exactly(fingerprint.clone()),
        }
    }
}

/// The rustls client config of a node: TLS 1.3, ALPN h2, our certificate as the
/// client certificate, and the server's certificate checked by [`PeerVerifier`].
pub fn client_config(
    identity: &TlsIdentity,
    expect: &ServerExpectation,
) -> Result<Arc<ClientConfig>, TlsError> {
    let (chain, key) = identity.rustls_parts();
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(PeerVerifier::new(expect.key_rule()))
            .with_client_auth_cert(chain, key)
            .map_err(TlsError::Config)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // Every connection runs the full handshake against the pins of that moment.
    config.resumption = Resumption::disabled();
    // Names mean nothing here (keys are pinned), so none is sent in the clear.
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// A channel to the node at `addr` (`host:port`) that connects on first use.
pub fn connect_lazy(
    addr: &str,
    identity: &TlsIdentity,
    expect: ServerExpectation,
) -> Result<Channel, TlsError> {
    Ok(endpoint(addr)?.connect_with_connector_lazy(connector(identity, &expect)?))
}

/// A channel to the node at `addr` (`host:port`), connected now.
///
/// With TLS 1.3 the client finishes its handshake before the server has checked the
/// client's certificate, so a server that does not pin us is noticed on the first
/// call, not here. A server whose key we do not accept fails here.
pub async fn connect(
    addr: &str,
    identity: &TlsIdentity,
    expect: ServerExpectation,
) -> Result<Channel, TlsError> {
    endpoint(addr)?
        .connect_with_connector(connector(identity, &expect)?)
        .await
        .map_err(|e| TlsError::Connect {
            addr: addr.to_string(),
            detail: error_chain(&e),
        })
}

/// The endpoint for `addr` (`host:port`).
fn endpoint(addr: &str) -> Result<Endpoint, TlsError> {
    let bad = |reason: String| TlsError::BadAddress {
        addr: addr.to_string(),
        reason,
    };
    if addr.contains("://") || addr.contains('/') {
        return Err(bad("give host:port, without a scheme or path".into()));
    }
    // `http`, not `https`: TLS is done by our connector, and tonic sends an https URI
    // down its own TLS path, which has no place for our verifier.
    // No `connect_timeout` here: `dial` keeps to CONNECT_TIMEOUT itself, so that it
    // can count a handshake that ran out of time.
    Endpoint::from_shared(format!("http://{addr}")).map_err(|e| bad(e.to_string()))
}

/// The connector tonic calls for every (re)connection: TCP, then our TLS handshake.
fn connector(
    identity: &TlsIdentity,
    expect: &ServerExpectation,
) -> Result<
    impl tower::Service<
            Uri,
            Response = TokioIo<Coalesced<TlsStream<TcpStream>>>,
            Error = io::Error,
            Future: Send,
        > + Send
        + 'static,
    TlsError,
> {
    let tls = TlsConnector::from(client_config(identity, expect)?);
    Ok(tower::service_fn(move |uri: Uri| dial(tls.clone(), uri)))
}

async fn dial(tls: TlsConnector, uri: Uri) -> io::Result<TokioIo<Coalesced<TlsStream<TcpStream>>>> {
    let authority = uri
        .authority()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{uri} names no host:port"),
            )
        })?
        .to_string();
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let tcp = tokio::time::timeout_at(deadline, TcpStream::connect(&authority))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no TCP connection to {authority} within {CONNECT_TIMEOUT:?}"),
            )
        })??;
    let peer = tcp.peer_addr().ok();
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(CERT_NAME).expect("CERT_NAME is a valid DNS name");
    let (reason, detail, kind) =
        match tokio::time::timeout_at(deadline, tls.connect(name, tcp)).await {
            Ok(Ok(stream)) => return Ok(TokioIo::new(Coalesced::new(stream))),
            Ok(Err(e)) => (HandshakeFailure::of_io(&e), failure::describe(&e), e.kind()),
            Err(_) => (
                HandshakeFailure::Timeout,
                format!("no TLS handshake within {CONNECT_TIMEOUT:?} of dialling"),
                io::ErrorKind::TimedOut,
            ),
        };
    failure::record(Side::Client, peer, reason, &detail);
    Err(io::Error::new(
        kind,
        format!("TLS handshake with {authority} failed ({reason}): {detail}"),
    ))
}

/// An error and its sources on one line: tonic's own message is only "transport error".
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(e) = source {
        let text = e.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = e.source();
    }
    parts.join(": ")
}
