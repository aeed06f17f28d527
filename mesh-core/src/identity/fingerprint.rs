//! OpenSSH-style key fingerprints (`SHA256:` + unpadded base64 of the key blob).

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::fmt;

/// A key fingerprint exactly as `ssh-keygen -lf` prints it, e.g.
/// `SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s`.
/// `Default` is the empty string, which matches no key (openraft's node type needs it).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Fingerprint(String);

/// A string that is not an OpenSSH SHA-256 fingerprint.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("'{0}' is not a key fingerprint: expected SHA256: followed by 43 base64 characters, as `ssh-keygen -lf` prints it")]
pub struct BadFingerprint(pub String);

impl Fingerprint {
    /// The fingerprint of an SSH public key blob (the wire encoding, as found
    /// base64-encoded in `authorized_keys` and `known_hosts`).
    pub fn of_key_blob(blob: &[u8]) -> Fingerprint {
        let digest = Sha256::digest(blob);
        Fingerprint(format!(
            "SHA256:{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
        ))
    }

    /// The fingerprint of a raw 32-byte ed25519 public key.
    pub fn of_ed25519(raw: &[u8; 32]) -> Fingerprint {
        Fingerprint::of_key_blob(&ed25519_blob(raw))
    }

    /// Parse a fingerprint given by a user.
    pub fn parse(s: &str) -> Result<Fingerprint, BadFingerprint> {
        let s = s.trim();
        let Some(b64) = s.strip_prefix("SHA256:") else {
            return Err(BadFingerprint(s.to_string()));
        };
        match base64::engine::general_purpose::STANDARD_NO_PAD.decode(b64) {
            Ok(d) if d.len() == 32 => Ok(Fingerprint(s.to_string())),
            _ => Err(BadFingerprint(s.to_string())),
        }
    }

    /// The text form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = BadFingerprint;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Fingerprint::parse(s)
    }
}

/// The SSH wire encoding of an ed25519 public key: string "ssh-ed25519", string key.
pub fn ed25519_blob(raw: &[u8; 32]) -> Vec<u8> {
    let mut blob = Vec::with_capacity(51);
    let alg = b"ssh-ed25519";
    blob.extend_from_slice(&(alg.len() as u32).to_be_bytes());
    blob.extend_from_slice(alg);
    blob.extend_from_slice(&32u32.to_be_bytes());
    blob.extend_from_slice(raw);
    blob
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_ssh_keygen() {
        // `ssh-keygen -lf` of the public key below prints this fingerprint.
        let line =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILe32KEJQ8xJYeeAs4nYLxb6N0GPeFTAtATBazeGe9vD";
        let blob = base64::engine::general_purpose::STANDARD
            .decode(line.split_whitespace().nth(1).unwrap())
            .unwrap();
        let fp = Fingerprint::of_key_blob(&blob);
        assert_eq!(
            fp.as_str(),
            "SHA256:4SizsFKgEpYq2GIrnVAh6E69WjsTzV5qJpUgqZ05M+s"
        );
        let raw: [u8; 32] = blob[blob.len() - 32..].try_into().unwrap();
        assert_eq!(Fingerprint::of_ed25519(&raw), fp, "raw key and blob agree");
        assert_eq!(Fingerprint::parse(fp.as_str()).unwrap(), fp);
    }

    #[test]
    fn rejects_malformed() {
        assert!(Fingerprint::parse("MD5:aa:bb").is_err());
        assert!(Fingerprint::parse("SHA256:short").is_err());
    }
}
