//! The serving side of node-to-node TLS: an accept loop that runs each handshake in its
//! own tokio task and yields finished TLS connections to tonic's
//! `serve_with_incoming`, and the pre-guarded tonic server builder to serve them with.

use super::coalesce::Coalesced;
use super::failure::{self, HandshakeFailure, Side};
use super::guard::RequirePinnedLayer;
use super::pins::Pins;
use super::verifier::{KeyRule, PeerVerifier};
use super::{TlsError, TlsIdentity};
use futures::Stream;
use rustls::server::NoServerSessionStorage;
use rustls::ServerConfig;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::layer::util::{Identity, Stack};

/// How long a peer may take to complete the TLS handshake after its TCP connection was
/// accepted: ample for a cross-region round trip on a loaded node, short enough that a
/// peer that connects and goes silent holds a handshake slot only briefly.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once. Bounds the tokio tasks and buffers a connection
/// flood can hold; when all are taken, accepting waits and the kernel backlog queues
/// the rest. A mesh has tens of nodes, so honest peers never come near it.
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// Finished connections waiting for tonic to take them. tonic takes each as soon as it
/// can spawn the connection's tokio task, so a short queue suffices.
const READY_QUEUE: usize = 16;

/// Pause after a failed `accept` (out of file descriptors, say), so the loop does not
/// spin while the condition lasts.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Which clients the server lets complete a TLS handshake, and which calls the per-call
/// guard ([`server`]) then lets through.
#[derive(Debug, Clone)]
pub enum PeerPolicy {
    /// Only a client whose key is pinned completes the handshake; the guard checks the
    /// pins again on every call.
    Pinned(Pins),
    /// Any client with a valid ed25519 certificate completes the handshake (it must
    /// still prove it holds the key); the guard refuses every call from an unpinned
    /// peer except to `unpinned_methods`. This is the join exception: pass exactly the
    /// join method, whose handler checks the token.
    AllowUnpinned {
        /// The pinned keys.
        pins: Pins,
        /// Full gRPC paths an unpinned peer may call, e.g. `/mesh.v1.Mesh/Join`.
        unpinned_methods: &'static [&'static str],
    },
}

impl PeerPolicy {
    /// The pins this policy checks.
    pub fn pins(&self) -> &Pins {
        match self {
            PeerPolicy::Pinned(pins) | PeerPolicy::AllowUnpinned { pins, .. } => pins,
        }
    }

    /// The per-call guard that goes with this policy.
    pub fn guard(&self) -> RequirePinnedLayer {
        match self {
            PeerPolicy::Pinned(pins) => RequirePinnedLayer::new(pins.clone(), &[]),
            PeerPolicy::AllowUnpinned {
                pins,
                unpinned_methods,
            } => RequirePinnedLayer::new(pins.clone(), unpinned_methods),
        }
    }

    fn key_rule(&self) -> KeyRule {
        match self {
            PeerPolicy::Pinned(pins) => KeyRule::Pinned(pins.clone()),
            PeerPolicy::AllowUnpinned { .. } => KeyRule::SignedByAnyEd25519,
        }
    }
}

/// The tonic server builder to serve node TLS connections with: it carries the policy's
/// per-call guard around every service added to it. Serve [`incoming`] connections
/// only through a builder made here.
pub fn server(
    policy: &PeerPolicy,
) -> tonic::transport::Server<Stack<RequirePinnedLayer, Identity>> {
    tonic::transport::Server::builder().layer(policy.guard())
}

/// Accept TLS connections on `listener` under `policy` until `shutdown`, for
/// `tonic::transport::Server::serve_with_incoming`.
pub fn incoming(
    listener: TcpListener,
    identity: &TlsIdentity,
    policy: PeerPolicy,
    shutdown: CancellationToken,
) -> Result<TlsIncoming, TlsError> {
    Ok(TlsListener::new(listener, identity, &policy)?.incoming(shutdown))
}

/// The rustls server config of a node: TLS 1.3, ALPN h2, our certificate, and a
/// mandatory client certificate checked by [`PeerVerifier`] under `policy`.
pub fn server_config(
    identity: &TlsIdentity,
    policy: &PeerPolicy,
) -> Result<Arc<ServerConfig>, TlsError> {
    let (chain, key) = identity.rustls_parts();
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(PeerVerifier::new(policy.key_rule()))
            .with_single_cert(chain, key)
            .map_err(TlsError::Config)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No resumption: every connection runs the full handshake, so the verifier sees
    // the client's certificate against the pins of that moment.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A TCP listener that completes TLS handshakes, each in its own tokio task, so a slow
/// or hostile peer never holds up the next accept.
pub struct TlsListener {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
}

impl TlsListener {
    /// Serve `identity` on `listener`, checking clients under `policy`.
    pub fn new(
        listener: TcpListener,
        identity: &TlsIdentity,
        policy: &PeerPolicy,
    ) -> Result<TlsListener, TlsError> {
        Ok(TlsListener {
            listener,
            acceptor: TlsAcceptor::from(server_config(identity, policy)?),
            handshake_timeout: HANDSHAKE_TIMEOUT,
        })
    }

    /// Replace [`HANDSHAKE_TIMEOUT`] (tests use a short one).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> TlsListener {
        self.handshake_timeout = timeout;
        self
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Spawn [`TlsListener::run`] and return the stream of its connections.
    pub fn incoming(self, shutdown: CancellationToken) -> TlsIncoming {
        let (ready, rx) = mpsc::channel(READY_QUEUE);
        tokio::spawn(self.run(ready, shutdown));
        TlsIncoming { ready: rx }
    }

    /// Accept until `shutdown` or until `ready`'s receiver is gone, then abandon the
    /// handshakes still in progress and wait for their tokio tasks to end.
    pub async fn run(self, ready: mpsc::Sender<TlsStream<TcpStream>>, shutdown: CancellationToken) {
        let stop = shutdown.child_token();
        let handshakes = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
        loop {
            let slot = tokio::select! {
                _ = stop.cancelled() => break,
                _ = ready.closed() => break,
                slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            };
            let (tcp, peer) = tokio::select! {
                _ = stop.cancelled() => break,
                _ = ready.closed() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!("accepting a node connection failed: {e}; retrying in {ACCEPT_ERROR_BACKOFF:?}");
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => continue,
                        }
                    }
                },
            };
            let handshake = Handshake {
                acceptor: self.acceptor.clone(),
                timeout: self.handshake_timeout,
                ready: ready.clone(),
            };
            let stop = stop.clone();
            handshakes.spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = handshake.run(tcp, peer) => {}
                }
                drop(slot);
            });
        }
        stop.cancel();
        handshakes.close();
        handshakes.wait().await;
    }
}

/// One connection's handshake.
struct Handshake {
    acceptor: TlsAcceptor,
    timeout: Duration,
    ready: mpsc::Sender<TlsStream<TcpStream>>,
}

impl Handshake {
    async fn run(self, tcp: TcpStream, peer: SocketAddr) {
        // Raft heartbeats are small and latency-bound.
        let _ = tcp.set_nodelay(true);
        match tokio::time::timeout(self.timeout, self.acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => {
                // Fails only when the server stopped taking connections; the connection
                // is then dropped, which is all there is to do.
                let _ = self.ready.send(tls).await;
            }
            Ok(Err(e)) => failure::record(
                Side::Server,
                Some(peer),
                HandshakeFailure::of_io(&e),
                &failure::describe(&e),
            ),
            Err(_) => failure::record(
                Side::Server,
                Some(peer),
                HandshakeFailure::Timeout,
                &format_args!("no TLS handshake within {:?}", self.timeout),
            ),
        }
    }
}

/// The connections a [`TlsListener`] has finished the handshake with. It never yields
/// an error: failed handshakes are counted and logged where they happen.
pub struct TlsIncoming {
    ready: mpsc::Receiver<TlsStream<TcpStream>>,
}

impl Stream for TlsIncoming {
    type Item = Result<Coalesced<TlsStream<TcpStream>>, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.ready
            .poll_recv(cx)
            .map(|conn| conn.map(|tls| Ok(Coalesced::new(tls))))
    }
}
