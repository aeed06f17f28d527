//! A node's TLS identity: a self-signed X.509 certificate whose key IS the SSH host key,
//! and the rule that turns a presented certificate back into an SSH fingerprint.

use super::TlsError;
use crate::host_key::HostKey;
use mesh_core::Fingerprint;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::fmt;

/// The DNS name written into every node certificate. Nothing checks it (pinning
/// replaces names); it only makes the certificate readable in `openssl x509 -text`.
pub const CERT_NAME: &str = "mesh-node";

/// DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE { SEQUENCE { OID
/// 1.3.101.112 }, BIT STRING (0 unused bits) }, followed by the 32-byte raw key.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// DER prefix of an ed25519 PKCS#8 v1 private key (RFC 8410): version 0, the ed25519
/// algorithm, and an OCTET STRING holding the OCTET STRING of the 32-byte seed.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A node's TLS identity: a self-signed certificate over the node's ed25519 SSH host
/// key, and that key in PKCS#8 form for rustls.
pub struct TlsIdentity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    fingerprint: Fingerprint,
}

impl TlsIdentity {
    /// Build the identity of the node that owns `host_key`. The certificate's public
    /// key is the host key itself, so a peer that pins the SSH fingerprint pins this.
    pub fn from_host_key(host_key: &HostKey) -> Result<TlsIdentity, TlsError> {
        let pair = host_key.private_key().key_data().ed25519().ok_or_else(|| {
            TlsError::HostKeyNotEd25519 {
                algorithm: host_key.private_key().algorithm().to_string(),
            }
        })?;
        let seed = pair.private.to_bytes();
        let public = pair.public.0;

        let mut pkcs8 = Vec::with_capacity(ED25519_PKCS8_PREFIX.len() + seed.len());
        pkcs8.extend_from_slice(&ED25519_PKCS8_PREFIX);
        pkcs8.extend_from_slice(&seed);
        let key = PrivatePkcs8KeyDer::from(pkcs8);

        let signer = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key, &rcgen::PKCS_ED25519)
            .map_err(TlsError::Certificate)?;
        if signer.public_key_raw() != public.as_slice() {
            // The seed and the public half of an OpenSSH key file disagree: the file is
            // corrupt, and signing with it would present a key nobody pinned.
            return Err(TlsError::HostKeyInconsistent);
        }
        let params = rcgen::CertificateParams::new(vec![CERT_NAME.to_string()])
            .map_err(TlsError::Certificate)?;
        let cert = params
            .self_signed(&signer)
            .map_err(TlsError::Certificate)?
            .der()
            .clone();

        let fingerprint = Fingerprint::of_ed25519(&public);
        debug_assert_eq!(cert_fingerprint(&cert).ok(), Some(fingerprint.clone()));
        Ok(TlsIdentity {
            cert,
            key,
            fingerprint,
        })
    }

    /// The fingerprint peers pin: the SSH host key's, as `ssh-keygen -lf` prints it.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint.clone()
    }

    /// The certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The certificate chain and key in the form rustls' config builders take.
    pub(crate) fn rustls_parts(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (
            vec![self.cert.clone()],
            PrivateKeyDer::Pkcs8(self.key.clone_key()),
        )
    }
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            fingerprint: self.fingerprint.clone(),
        }
    }
}

impl fmt::Debug for TlsIdentity {
    // The private key never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Why a presented certificate does not carry a usable node key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertKeyError {
    /// The peer sent bytes that are not an X.509 certificate.
    #[error("peer certificate cannot be parsed: {0}")]
    Malformed(String),
    /// The peer's certificate holds another kind of key (RSA, ECDSA...).
    #[error("peer certificate key is not ed25519; Mesh nodes present their ed25519 SSH host key")]
    NotEd25519,
}

/// The raw ed25519 public key inside a certificate.
pub fn cert_ed25519_key(cert: &CertificateDer<'_>) -> Result<[u8; 32], CertKeyError> {
    let parsed = rustls::server::ParsedCertificate::try_from(cert)
        .map_err(|e| CertKeyError::Malformed(e.to_string()))?;
    let spki = parsed.subject_public_key_info();
    let raw = spki
        .as_ref()
        .strip_prefix(ED25519_SPKI_PREFIX.as_slice())
        .ok_or(CertKeyError::NotEd25519)?;
    raw.try_into().map_err(|_| CertKeyError::NotEd25519)
}

/// The SSH fingerprint of the key inside a certificate: the same string `ssh-keygen
/// -lf` prints for that node's host key.
pub fn cert_fingerprint(cert: &CertificateDer<'_>) -> Result<Fingerprint, CertKeyError> {
    cert_ed25519_key(cert).map(|raw| Fingerprint::of_ed25519(&raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_key_is_the_host_key() {
        let dir = tempfile::tempdir().unwrap();
        let host = HostKey::generate(&dir.path().join("k")).unwrap();
        let id = TlsIdentity::from_host_key(&host).unwrap();
        assert_eq!(id.fingerprint(), host.fingerprint());
        assert_eq!(cert_fingerprint(id.cert_der()).unwrap(), host.fingerprint());
        let raw = host.private_key().key_data().ed25519().unwrap().public.0;
        assert_eq!(cert_ed25519_key(id.cert_der()).unwrap(), raw);
        assert!(
            !format!("{id:?}").contains("key:"),
            "Debug must not print the private key"
        );
    }

    #[test]
    fn other_key_types_and_garbage_are_refused() {
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec![CERT_NAME.into()])
            .unwrap()
            .self_signed(&ec)
            .unwrap();
        assert_eq!(cert_fingerprint(cert.der()), Err(CertKeyError::NotEd25519));
        let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(matches!(
            cert_fingerprint(&junk),
            Err(CertKeyError::Malformed(_))
        ));
    }
}
