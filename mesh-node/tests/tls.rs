//! Claim: node-to-node mutual TLS trusts a peer only through the SSH fingerprint of the
//! key it proves it holds. Pinned peers talk and their handlers see each other's SSH
//! fingerprints; an unpinned client, a server with an unexpected key, a certificate
//! that is not ed25519 and a stolen certificate without its key are all refused in the
//! handshake, for the reason the failure counter names; the join exception opens one
//! method and nothing else; unpinning takes effect on an open connection; garbage and
//! silent connections neither crash the listener nor block the next accept.
//!
//! Method: real TCP on 127.0.0.1 and real TLS 1.3 handshakes. The service under test is
//! a tiny `mesh.v1.Raft` implementation whose handlers answer with the method name and
//! the caller's verified fingerprint and count their calls, so "nothing reached the
//! handler" is observed, not assumed. Refusals are checked at the client (its error)
//! and at the server (`mesh_tls_handshake_failures_total`, read from a Prometheus
//! recorder installed for this test binary; tests run in parallel, so each waits for
//! its counter to grow rather than for an exact value).

use futures::StreamExt;
use mesh_node::host_key::HostKey;
use mesh_node::tls::{self, PeerPolicy, Pins, ServerExpectation, TlsIdentity, TlsListener};
use mesh_proto::v1::raft_client::RaftClient;
use mesh_proto::v1::raft_server::{Raft, RaftServer};
use mesh_proto::v1::RaftPayload;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status, Streaming};

/// Upper bound for anything a test waits for; every step normally takes milliseconds.
const PATIENCE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------
// Fixtures

/// A node identity made from a freshly generated SSH host key.
struct Node {
    host: HostKey,
    tls: TlsIdentity,
}

fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let host = HostKey::generate(&dir.path().join("host_key")).unwrap();
    let tls = TlsIdentity::from_host_key(&host).unwrap();
    Node { host, tls }
}

/// The service under test: echoes the method and the caller's verified fingerprint.
#[derive(Clone, Default)]
struct Echo {
    calls: Arc<AtomicUsize>,
}

impl Echo {
    fn reply<T>(&self, method: &str, req: &Request<T>) -> Result<Response<RaftPayload>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let peer = tls::peer_fingerprint(req).map_or_else(|| "none".to_string(), |f| f.to_string());
        Ok(Response::new(RaftPayload {
            data: format!("{method} {peer}").into_bytes(),
        }))
    }
}

#[tonic::async_trait]
impl Raft for Echo {
    async fn append_entries(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        self.reply("append_entries", &req)
    }
    type ReplicateStream = futures::stream::BoxStream<'static, Result<RaftPayload, Status>>;
    /// Answers every message of the stream with the same echo.
    async fn replicate(
        &self,
        req: Request<Streaming<RaftPayload>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        let echo = self.reply("replicate", &req)?.into_inner();
        let answers = req.into_inner().map(move |m| m.map(|_| echo.clone()));
        Ok(Response::new(Box::pin(answers)))
    }
    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.reply("vote", &req)
    }
    async fn install_snapshot(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        self.reply("install_snapshot", &req)
    }
}

/// In the join-exception test, `Vote` stands in for the join call.
const STAND_IN_JOIN: &[&str] = &["/mesh.v1.Raft/Vote"];

/// A running server; dropping it shuts it down.
struct Served {
    addr: String,
    calls: Arc<AtomicUsize>,
    shutdown: CancellationToken,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

async fn serve(identity: &TlsIdentity, policy: PeerPolicy) -> Served {
    serve_on(
        TlsListener::new(bind().await, identity, &policy).unwrap(),
        policy,
    )
}

fn serve_on(listener: TlsListener, policy: PeerPolicy) -> Served {
    let addr = listener.local_addr().unwrap().to_string();
    let shutdown = CancellationToken::new();
    let echo = Echo::default();
    let calls = echo.calls.clone();
    let incoming = listener.incoming(shutdown.clone());
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tls::server(&policy)
            .add_service(RaftServer::new(echo))
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
            .unwrap();
    });
    Served {
        addr,
        calls,
        shutdown,
    }
}

async fn vote(channel: &Channel) -> Result<String, Status> {
    let reply = RaftClient::new(channel.clone())
        .vote(RaftPayload { data: vec![] })
        .await?;
    Ok(String::from_utf8(reply.into_inner().data).unwrap())
}

async fn append(channel: &Channel) -> Result<String, Status> {
    let reply = RaftClient::new(channel.clone())
        .append_entries(RaftPayload { data: vec![] })
        .await?;
    Ok(String::from_utf8(reply.into_inner().data).unwrap())
}

fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(" <- ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

fn init_logs() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

// ---------------------------------------------------------------------------------
// The handshake-failure counter

fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .install_recorder()
            .expect("the only recorder of this test binary")
    })
}

fn failures(side: &str, reason: &str) -> u64 {
    let side = format!("side=\"{side}\"");
    let reason = format!("reason=\"{reason}\"");
    recorder()
        .render()
        .lines()
        .filter(|l| {
            l.starts_with(tls::HANDSHAKE_FAILURES_METRIC)
                && l.contains(&side)
                && l.contains(&reason)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Wait until the counter for (`side`, `reason`) exceeds `before`.
async fn counted(side: &str, reason: &str, before: u64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while failures(side, reason) <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {side} handshake failure counted with reason {reason}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------
// A hand-built client for refusals our own `connect` cannot produce

/// Presents a fixed certificate with a fixed key, whatever the server asks for.
#[derive(Debug)]
struct Present(Arc<CertifiedKey>);

impl ResolvesClientCert for Present {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// An ECDSA key that claims to sign ed25519, so the client sends its ECDSA certificate
/// to a server that asked for ed25519 only (an honest rustls client would send none).
#[derive(Debug)]
struct ClaimsEd25519(Arc<dyn SigningKey>);

#[derive(Debug)]
struct ClaimsEd25519Signer(Box<dyn Signer>);

impl SigningKey for ClaimsEd25519 {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        if !offered.contains(&SignatureScheme::ED25519) {
            return None;
        }
        let inner = self
            .0
            .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])?;
        Some(Box::new(ClaimsEd25519Signer(inner)))
    }
    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ED25519
    }
}

impl Signer for ClaimsEd25519Signer {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.0.sign(message)
    }
    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

/// Handshake with the server at `addr` presenting `cert` signed by `key`; the client
/// trusts the server (its key is `server`). Returns what the client saw once the server
/// had its say: the server's alert, or `Ok` if the connection stayed usable.
async fn handshake_presenting(
    addr: &str,
    me: &Node,
    server: &Node,
    presented: CertifiedKey,
) -> Result<(), String> {
    let expect = ServerExpectation::Exactly(server.tls.fingerprint());
    let mut config = (*tls::client_config(&me.tls, &expect).unwrap()).clone();
    config.client_auth_cert_resolver = Arc::new(Present(Arc::new(presented)));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut stream = connector
        .connect(ServerName::try_from("mesh-node").unwrap(), tcp)
        .await
        .map_err(|e| format!("client side: {e}"))?;
    // In TLS 1.3 the client is done before the server has judged its certificate; the
    // verdict arrives as an alert (or nothing) on the next read.
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await {
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(0)) => Err("closed".into()),
        Ok(Ok(_)) | Err(_) => Ok(()),
    }
}

fn pkcs8_of(pair: &rcgen::KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pair.serialize_der()))
}

// ---------------------------------------------------------------------------------
// Tests

/// 1. Both pinned: the call goes through, the handler sees B's SSH fingerprint, and the
///    certificate A presents on the wire carries A's SSH host key.
#[tokio::test]
async fn pinned_peers_see_each_others_ssh_fingerprints() {
    init_logs();
    let (a, b) = (node(), node());
    let pins = Pins::new([a.host.fingerprint(), b.host.fingerprint()]);
    let served = serve(&a.tls, PeerPolicy::Pinned(pins.clone())).await;

    tracing::info!("phase: B calls A over pinned mTLS");
    let channel = tls::connect(
        &served.addr,
        &b.tls,
        ServerExpectation::Pinned(pins.clone()),
    )
    .await
    .unwrap();
    let reply = vote(&channel).await.unwrap();
    assert_eq!(reply, format!("vote {}", b.host.fingerprint()));
    assert_eq!(served.calls.load(Ordering::SeqCst), 1);

    tracing::info!("phase: inspect the certificate A presents");
    let config =
        tls::client_config(&b.tls, &ServerExpectation::Exactly(a.host.fingerprint())).unwrap();
    let tcp = TcpStream::connect(&served.addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("mesh-node").unwrap(), tcp)
        .await
        .unwrap();
    let (_, session) = stream.get_ref();
    let presented: &CertificateDer<'_> = &session.peer_certificates().unwrap()[0];
    assert_eq!(
        tls::cert_fingerprint(presented).unwrap(),
        a.host.fingerprint()
    );
    assert_eq!(
        session.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));
}

/// 2. A client the server does not pin is refused in the handshake; nothing reaches
///    the handler, and the server counts an `unpinned` failure.
#[tokio::test]
async fn unpinned_client_is_refused_in_the_handshake() {
    init_logs();
    let (a, c) = (node(), node());
    let served = serve(
        &a.tls,
        PeerPolicy::Pinned(Pins::new([a.host.fingerprint()])),
    )
    .await;
    let before = failures("server", "unpinned");

    let channel = tls::connect_lazy(
        &served.addr,
        &c.tls,
        ServerExpectation::Exactly(a.host.fingerprint()),
    )
    .unwrap();
    let err = vote(&channel)
        .await
        .expect_err("an unpinned client must not get through");
    let text = chain(&err);
    tracing::info!("client saw: {text}");
    assert!(
        text.contains("CertificateUnknown") || text.contains("alert"),
        "{text}"
    );

    counted("server", "unpinned", before).await;
    assert_eq!(
        served.calls.load(Ordering::SeqCst),
        0,
        "nothing may reach the handler"
    );
}

/// 3. A client that expects another key than the server presents (a reinstalled node
///    or a man in the middle) refuses to connect, naming the key it was shown.
#[tokio::test]
async fn client_refuses_a_server_with_another_key() {
    init_logs();
    let (a, b, expected) = (node(), node(), node());
    let pins = Pins::new([a.host.fingerprint(), b.host.fingerprint()]);
    let served = serve(&a.tls, PeerPolicy::Pinned(pins)).await;
    let before = failures("client", "unexpected_key");

    let err = tls::connect(
        &served.addr,
        &b.tls,
        ServerExpectation::Exactly(expected.host.fingerprint()),
    )
    .await
    .expect_err("the server's key is not the expected one");
    let text = err.to_string();
    assert!(
        text.contains(a.host.fingerprint().as_str()),
        "names the presented key: {text}"
    );
    assert!(
        text.contains(expected.host.fingerprint().as_str()),
        "names the expected key: {text}"
    );
    counted("client", "unexpected_key", before).await;

    // The same through the pin set: the server's key is simply not pinned.
    let before = failures("client", "unpinned");
    let err = tls::connect(
        &served.addr,
        &b.tls,
        ServerExpectation::Pinned(Pins::new([b.host.fingerprint()])),
    )
    .await
    .expect_err("the server's key is not pinned");
    assert!(
        err.to_string()
            .contains(&format!("{} is not pinned", a.host.fingerprint())),
        "{err}"
    );
    counted("client", "unpinned", before).await;
    assert_eq!(served.calls.load(Ordering::SeqCst), 0);
}

/// 4. An ECDSA P-256 client certificate is refused as not ed25519, even by a server in
///    its most permissive (join-accepting) mode.
#[tokio::test]
async fn non_ed25519_client_certificate_is_refused() {
    init_logs();
    let (a, c) = (node(), node());
    let policy = PeerPolicy::AllowUnpinned {
        pins: Pins::new([a.host.fingerprint()]),
        unpinned_methods: STAND_IN_JOIN,
    };
    let served = serve(&a.tls, policy).await;
    let before = failures("server", "not_ed25519");

    let ecdsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["mesh-node".into()])
        .unwrap()
        .self_signed(&ecdsa)
        .unwrap();
    assert_eq!(
        tls::cert_fingerprint(cert.der()),
        Err(tls::CertKeyError::NotEd25519)
    );
    let key = rustls::crypto::ring::sign::any_ecdsa_type(&pkcs8_of(&ecdsa)).unwrap();
    let presented = CertifiedKey::new(vec![cert.der().clone()], Arc::new(ClaimsEd25519(key)));

    let outcome = handshake_presenting(&served.addr, &c, &a, presented).await;
    assert!(
        outcome.is_err(),
        "the server must refuse an ECDSA certificate"
    );
    counted("server", "not_ed25519", before).await;
    assert_eq!(served.calls.load(Ordering::SeqCst), 0);
}

/// 5. Certificates are public: presenting a pinned node's certificate without its
///    private key fails on the handshake signature.
#[tokio::test]
async fn stolen_certificate_without_its_key_is_refused() {
    init_logs();
    let (a, b, thief) = (node(), node(), node());
    let pins = Pins::new([a.host.fingerprint(), b.host.fingerprint()]);
    let served = serve(&a.tls, PeerPolicy::Pinned(pins)).await;
    let before = failures("server", "bad_signature");

    let own_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let PrivateKeyDer::Pkcs8(der) = pkcs8_of(&own_key) else {
        unreachable!()
    };
    let signer = rustls::crypto::ring::sign::any_eddsa_type(&der).unwrap();
    let presented = CertifiedKey::new(vec![b.tls.cert_der().clone()], signer);

    let outcome = handshake_presenting(&served.addr, &thief, &a, presented).await;
    assert!(
        outcome.is_err(),
        "B's certificate without B's key must be refused"
    );
    counted("server", "bad_signature", before).await;
    assert_eq!(served.calls.load(Ordering::SeqCst), 0);
}

/// 6. The join exception: with `AllowUnpinned`, an unpinned client completes the
///    handshake but reaches only the method the policy opens; every other call is
///    PERMISSION_DENIED before any handler runs. Pinning it later opens the rest on
///    the same connection.
#[tokio::test]
async fn join_exception_opens_one_method_only() {
    init_logs();
    let (a, b, joiner) = (node(), node(), node());
    let pins = Pins::new([a.host.fingerprint(), b.host.fingerprint()]);
    let policy = PeerPolicy::AllowUnpinned {
        pins: pins.clone(),
        unpinned_methods: STAND_IN_JOIN,
    };
    let served = serve(&a.tls, policy).await;

    tracing::info!("phase: an unpinned joiner calls the join stand-in");
    let channel = tls::connect(
        &served.addr,
        &joiner.tls,
        ServerExpectation::Exactly(a.host.fingerprint()),
    )
    .await
    .unwrap();
    let reply = vote(&channel).await.unwrap();
    assert_eq!(
        reply,
        format!("vote {}", joiner.host.fingerprint()),
        "the handler sees the joiner's TLS key"
    );
    assert_eq!(served.calls.load(Ordering::SeqCst), 1);

    tracing::info!("phase: the same joiner calls a pinned-only method");
    let denied = append(&channel)
        .await
        .expect_err("append_entries is for pinned peers only");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(
        denied
            .message()
            .contains(joiner.host.fingerprint().as_str()),
        "{}",
        denied.message()
    );
    assert!(
        denied.message().contains("not pinned"),
        "{}",
        denied.message()
    );
    let denied = RaftClient::new(channel.clone())
        .install_snapshot(RaftPayload { data: vec![] })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(
        served.calls.load(Ordering::SeqCst),
        1,
        "no denied call reached a handler"
    );

    tracing::info!("phase: a pinned peer may call anything");
    let member = tls::connect(
        &served.addr,
        &b.tls,
        ServerExpectation::Pinned(pins.clone()),
    )
    .await
    .unwrap();
    assert_eq!(
        append(&member).await.unwrap(),
        format!("append_entries {}", b.host.fingerprint())
    );

    tracing::info!("phase: once the joiner is pinned, its open connection may call anything");
    pins.insert(joiner.host.fingerprint());
    assert_eq!(
        append(&channel).await.unwrap(),
        format!("append_entries {}", joiner.host.fingerprint())
    );
}

/// 7. Unpinning a member takes effect on its next call, even on a connection opened
///    while it was pinned; a fresh connection is refused in the handshake.
#[tokio::test]
async fn unpinning_takes_effect_on_an_open_connection() {
    init_logs();
    let (a, b) = (node(), node());
    let pins = Pins::new([a.host.fingerprint(), b.host.fingerprint()]);
    let served = serve(&a.tls, PeerPolicy::Pinned(pins.clone())).await;
    let channel = tls::connect(
        &served.addr,
        &b.tls,
        ServerExpectation::Exactly(a.host.fingerprint()),
    )
    .await
    .unwrap();
    vote(&channel).await.unwrap();

    assert!(pins.remove(&b.host.fingerprint()));
    let denied = vote(&channel).await.expect_err("b is no longer pinned");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    let fresh = tls::connect_lazy(
        &served.addr,
        &b.tls,
        ServerExpectation::Exactly(a.host.fingerprint()),
    )
    .unwrap();
    assert!(vote(&fresh).await.is_err());
    assert_eq!(served.calls.load(Ordering::SeqCst), 1);
}

/// 8. Garbage on the TLS port is dropped, a silent connection is timed out, and
///    neither stops the listener from serving a good client meanwhile.
#[tokio::test]
async fn garbage_and_silent_connections_do_not_stop_the_server() {
    init_logs();
    let (a, b) = (node(), node());
    let pins = Pins::new([a.host.fingerprint(), b.host.fingerprint()]);
    let policy = PeerPolicy::Pinned(pins.clone());
    let listener = TlsListener::new(bind().await, &a.tls, &policy)
        .unwrap()
        .with_handshake_timeout(Duration::from_millis(300));
    let served = serve_on(listener, policy);
    let (other_before, timeout_before) =
        (failures("server", "other"), failures("server", "timeout"));

    tracing::info!("phase: a silent client holds a handshake slot");
    let mut silent = TcpStream::connect(&served.addr).await.unwrap();

    tracing::info!("phase: a client writes plain HTTP and junk");
    let mut garbage = TcpStream::connect(&served.addr).await.unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff\x16\x03\x01\x00\x00")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let read = tokio::time::timeout(PATIENCE, garbage.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "the server must drop a garbage connection");

    tracing::info!("phase: a good client is served while the silent one still waits");
    let channel = tls::connect(&served.addr, &b.tls, ServerExpectation::Pinned(pins))
        .await
        .unwrap();
    assert_eq!(
        vote(&channel).await.unwrap(),
        format!("vote {}", b.host.fingerprint())
    );

    tracing::info!("phase: the silent client is timed out");
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(PATIENCE, silent.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the server must close a silent connection: {read:?}"
    );
    counted("server", "other", other_before).await;
    counted("server", "timeout", timeout_before).await;
    assert_eq!(served.calls.load(Ordering::SeqCst), 1);
}
