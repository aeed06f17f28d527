//! Who is calling: the verified peer fingerprint of a gRPC request, and the per-call
//! guard that refuses unpinned peers on every method but the few a policy opens to them
//! (the join call).

use super::cert::cert_fingerprint;
use super::pins::Pins;
use futures::future::{self, Either, Ready};
use mesh_core::Fingerprint;
use rustls::pki_types::CertificateDer;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;
use tower::{Layer, Service};

/// Counter of calls the guard refused because the peer is not pinned.
pub const UNPINNED_CALLS_DENIED_METRIC: &str = "mesh_grpc_unpinned_calls_denied_total";

/// The fingerprint of the peer that sent `req`, recomputed from the certificate it
/// presented in the TLS handshake (the verifier already checked that certificate and
/// the peer's signature). `None` when the request did not come over node TLS.
///
/// This is the only source of a peer's identity: never take a fingerprint or node id
/// from a request body without comparing it with this.
pub fn peer_fingerprint<T>(req: &tonic::Request<T>) -> Option<Fingerprint> {
    first_cert_fingerprint(
        req.extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()?
            .peer_certs(),
    )
}

/// The verified peer fingerprint of `req` if it is pinned now, else the `Status` to
/// return. For handlers that want to check again under the per-call guard.
pub fn require_pinned<T>(req: &tonic::Request<T>, pins: &Pins) -> Result<Fingerprint, Status> {
    let peer = peer_fingerprint(req).ok_or_else(no_tls_peer)?;
    if pins.contains(&peer) {
        Ok(peer)
    } else {
        Err(Status::permission_denied(format!(
            "peer {peer} is not pinned on this node; a node must join the mesh before it can call this"
        )))
    }
}

fn first_cert_fingerprint(certs: Option<Arc<Vec<CertificateDer<'static>>>>) -> Option<Fingerprint> {
    cert_fingerprint(certs?.first()?).ok()
}

fn no_tls_peer() -> Status {
    Status::unauthenticated(
        "no verified TLS peer on this connection; node-to-node gRPC is served only over mutual TLS",
    )
}

/// A tower layer for the whole tonic server: every call from a peer that is not
/// pinned *at the time of the call* is refused with `PERMISSION_DENIED`, except calls
/// to the exact gRPC paths in `unpinned_methods`.
///
/// Default-deny: a service added to the server later is guarded without anyone
/// remembering to. Because pins are read per call, a node removed from the membership
/// loses access on its next call, even on a connection opened while it was pinned.
#[derive(Debug, Clone)]
pub struct RequirePinnedLayer {
    pins: Pins,
    unpinned_methods: &'static [&'static str],
}

impl RequirePinnedLayer {
    /// Guard with `pins`; `unpinned_methods` are full gRPC paths such as
    /// `/mesh.v1.Mesh/Join`, compared byte for byte with the request path.
    pub fn new(pins: Pins, unpinned_methods: &'static [&'static str]) -> RequirePinnedLayer {
        RequirePinnedLayer {
            pins,
            unpinned_methods,
        }
    }
}

impl<S> Layer<S> for RequirePinnedLayer {
    type Service = RequirePinned<S>;

    fn layer(&self, inner: S) -> RequirePinned<S> {
        RequirePinned {
            inner,
            pins: self.pins.clone(),
            unpinned_methods: self.unpinned_methods,
        }
    }
}

/// The service [`RequirePinnedLayer`] wraps around a tonic router.
#[derive(Debug, Clone)]
pub struct RequirePinned<S> {
    inner: S,
    pins: Pins,
    unpinned_methods: &'static [&'static str],
}

impl<S> RequirePinned<S> {
    fn admit<B>(&self, req: &http::Request<B>) -> Result<(), Status> {
        let certs = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.peer_certs());
        let peer = first_cert_fingerprint(certs).ok_or_else(no_tls_peer)?;
        let path = req.uri().path();
        if self.pins.contains(&peer) || self.unpinned_methods.contains(&path) {
            return Ok(());
        }
        metrics::counter!(UNPINNED_CALLS_DENIED_METRIC).increment(1);
        tracing::debug!(%peer, path, "refused a call from an unpinned peer");
        let open = match self.unpinned_methods {
            [] => "no method is".to_string(),
            methods => format!(
                "only {} {}",
                methods.join(", "),
                if methods.len() == 1 { "is" } else { "are" }
            ),
        };
        Err(Status::permission_denied(format!(
            "peer {peer} is not pinned on this node, and {path} is not open to unpinned keys ({open}); \
             join the mesh with a token first (`mesh-cli token create` on a member, `mesh-cli join TOKEN` here)"
        )))
    }
}

impl<S, B> Service<http::Request<B>> for RequirePinned<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match self.admit(&req) {
            Ok(()) => Either::Right(self.inner.call(req)),
            Err(status) => Either::Left(future::ready(Ok(status.into_http()))),
        }
    }
}
