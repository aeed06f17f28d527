//! The one certificate verifier of node-to-node TLS, for both ends of a connection:
//! the peer's certificate must carry an ed25519 key whose SSH fingerprint the rule
//! accepts, and the peer must sign the handshake with that key.
//!
//! Pinning replaces PKI, so names, validity dates and issuers are not checked: a node
//! certificate is self-signed and trusted only through its key.

use super::cert::{cert_fingerprint, CertKeyError};
use super::pins::Pins;
use mesh_core::Fingerprint;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, PeerMisbehaved,
    SignatureScheme,
};
use std::sync::Arc;

/// Which keys a verifier lets complete a handshake.
#[derive(Debug, Clone)]
pub(crate) enum KeyRule {
    /// The key must be pinned at handshake time.
    Pinned(Pins),
    /// The key must be this one (a join token names the seed's key).
    Exactly(Fingerprint),
    /// Any ed25519 key whose holder signs the handshake. Only a server built from
    /// `PeerPolicy::AllowUnpinned` uses this, and that server's per-call guard
    /// (`RequirePinnedLayer`) then refuses unpinned peers on every method but the
    /// ones the policy names.
    SignedByAnyEd25519,
}

/// Why a peer's key was refused. Carried inside `rustls::Error` so the code that
/// counts handshake failures can tell the reasons apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerKeyError {
    /// The certificate does not carry an ed25519 key.
    #[error(transparent)]
    Key(#[from] CertKeyError),
    /// The key is valid but not pinned on this node.
    #[error("peer key {presented} is not pinned on this node; a node is pinned once it has joined the mesh (`mesh-cli token create` on a member, then `mesh-cli join TOKEN` on the new node)")]
    Unpinned {
        /// The fingerprint of the key the peer presented.
        presented: Fingerprint,
    },
    /// The key is not the one this connection expects.
    #[error("peer key is {presented}, not the expected {expected}; if that node was reinstalled with a new key, create a new join token on a member")]
    Unexpected {
        /// The fingerprint of the key the peer presented.
        presented: Fingerprint,
        /// The fingerprint this side expected.
        expected: Fingerprint,
    },
}

impl PeerKeyError {
    /// Find this error inside a rustls error, if that is what failed.
    pub fn from_rustls(err: &Error) -> Option<&PeerKeyError> {
        match err {
            Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
                inner.downcast_ref()
            }
            _ => None,
        }
    }
}

/// Verifies a peer's certificate and handshake signature against a [`KeyRule`]. One
/// type serves as rustls' server verifier on the client and client verifier on the
/// server, so both directions apply the same rule.
#[derive(Debug)]
pub struct PeerVerifier {
    rule: KeyRule,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PeerVerifier {
    pub(crate) fn new(rule: KeyRule) -> Arc<PeerVerifier> {
        Arc::new(PeerVerifier {
            rule,
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        })
    }

    /// Check the presented certificate's key against the rule.
    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<Fingerprint, Error> {
        let presented = cert_fingerprint(end_entity).map_err(|e| rejection(e.into()))?;
        match &self.rule {
            KeyRule::Pinned(pins) if !pins.contains(&presented) => {
                Err(rejection(PeerKeyError::Unpinned { presented }))
            }
            KeyRule::Exactly(expected) if *expected != presented => {
                Err(rejection(PeerKeyError::Unexpected {
                    presented,
                    expected: expected.clone(),
                }))
            }
            KeyRule::Pinned(_) | KeyRule::Exactly(_) | KeyRule::SignedByAnyEd25519 => Ok(presented),
        }
    }

    /// Check the handshake signature with the key of the certificate `check` accepted.
    fn check_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        if dss.scheme != SignatureScheme::ED25519 {
            return Err(Error::PeerMisbehaved(
                PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
            ));
        }
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

fn rejection(err: PeerKeyError) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

/// Configs offer TLS 1.3 only, so a TLS 1.2 signature means a misconfigured build.
fn tls12_refused() -> Result<HandshakeSignatureValid, Error> {
    Err(Error::General("node-to-node TLS is TLS 1.3 only".into()))
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.check(end_entity)
            .map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.check_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.check(end_entity)
            .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.check_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_key::HostKey;
    use crate::tls::TlsIdentity;

    fn identity() -> TlsIdentity {
        let dir = tempfile::tempdir().unwrap();
        TlsIdentity::from_host_key(&HostKey::generate(&dir.path().join("k")).unwrap()).unwrap()
    }

    fn refusal(verifier: &PeerVerifier, cert: &CertificateDer<'_>) -> PeerKeyError {
        let err = verifier
            .verify_client_cert(cert, &[], UnixTime::now())
            .expect_err("refused");
        PeerKeyError::from_rustls(&err)
            .expect("a PeerKeyError")
            .clone()
    }

    #[test]
    fn rules_decide_on_the_key_alone() {
        let (a, b) = (identity(), identity());
        let pins = Pins::new([a.fingerprint()]);
        let pinned = PeerVerifier::new(KeyRule::Pinned(pins.clone()));
        assert!(pinned
            .verify_client_cert(a.cert_der(), &[], UnixTime::now())
            .is_ok());
        assert_eq!(
            refusal(&pinned, b.cert_der()),
            PeerKeyError::Unpinned {
                presented: b.fingerprint()
            }
        );
        pins.insert(b.fingerprint());
        assert!(
            pinned
                .verify_client_cert(b.cert_der(), &[], UnixTime::now())
                .is_ok(),
            "pins are read live"
        );

        let exactly = PeerVerifier::new(KeyRule::Exactly(a.fingerprint()));
        let name = ServerName::try_from("ignored").unwrap();
        assert!(exactly
            .verify_server_cert(a.cert_der(), &[], &name, &[], UnixTime::now())
            .is_ok());
        let err = exactly
            .verify_server_cert(b.cert_der(), &[], &name, &[], UnixTime::now())
            .err()
            .unwrap();
        assert_eq!(
            PeerKeyError::from_rustls(&err),
            Some(&PeerKeyError::Unexpected {
                presented: b.fingerprint(),
                expected: a.fingerprint()
            })
        );
        assert!(err.to_string().contains(b.fingerprint().as_str()), "{err}");
    }

    #[test]
    fn any_ed25519_still_refuses_other_keys() {
        let verifier = PeerVerifier::new(KeyRule::SignedByAnyEd25519);
        assert!(verifier
            .verify_client_cert(identity().cert_der(), &[], UnixTime::now())
            .is_ok());
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&ec)
            .unwrap();
        assert_eq!(
            refusal(&verifier, cert.der()),
            PeerKeyError::Key(CertKeyError::NotEd25519)
        );
        assert_eq!(
            ClientCertVerifier::supported_verify_schemes(&*verifier),
            vec![SignatureScheme::ED25519]
        );
    }
}
