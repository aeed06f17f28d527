//! Join tokens, modelled on kubeadm's bootstrap tokens with a pinned key hash.
//!
//! The string an admin hands to a new machine carries a token id, a secret, the seed
//! node's address and the seed's host key fingerprint:
//! `mesh1-<id>.<secret>.<fingerprint base64>@<host:port>`. The replicated state keeps
//! only the SHA-256 of the secret.

use crate::data::Digest;
use crate::identity::fingerprint::Fingerprint;
use serde::{Deserialize, Serialize};

/// Prefix and version of the token format.
const PREFIX: &str = "mesh1-";

/// A token as handed to a joining machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Public id (16 hex digits): names the token in `token list` and `token revoke`.
    pub id: String,
    /// The secret (32 hex digits).
    pub secret: String,
    /// Node-to-node address of the seed node.
    pub seed_addr: String,
    /// The seed's host key fingerprint, checked before the secret is presented.
    pub seed_fingerprint: Fingerprint,
}

/// A token string that cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("this is not a Mesh join token ({0}); create one with `mesh-cli token create` on a node of the mesh")]
pub struct BadToken(&'static str);

impl JoinToken {
    /// Build a token from 8 random bytes for the id and 16 for the secret.
    pub fn new(
        id: [u8; 8],
        secret: [u8; 16],
        seed_addr: String,
        seed_fingerprint: Fingerprint,
    ) -> JoinToken {
        JoinToken {
            id: hex::encode(id),
            secret: hex::encode(secret),
            seed_addr,
            seed_fingerprint,
        }
    }

    /// The token string.
    pub fn encode(&self) -> String {
        let fp = self.seed_fingerprint.as_str().trim_start_matches("SHA256:");
        format!(
            "{PREFIX}{}.{}.{fp}@{}",
            self.id, self.secret, self.seed_addr
        )
    }

    /// Parse a token string.
    pub fn parse(s: &str) -> Result<JoinToken, BadToken> {
        let rest = s
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(BadToken("it does not start with mesh1-"))?;
        let (creds, addr) = rest.split_once('@').ok_or(BadToken("no seed address"))?;
        let mut parts = creds.split('.');
        let (Some(id), Some(secret), Some(fp), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(BadToken("expected id.secret.fingerprint@address"));
        };
        let is_hex = |v: &str, n: usize| v.len() == n && v.bytes().all(|b| b.is_ascii_hexdigit());
        if !is_hex(id, 16) || !is_hex(secret, 32) {
            return Err(BadToken("malformed id or secret"));
        }
        let seed_fingerprint = Fingerprint::parse(&format!("SHA256:{fp}"))
            .map_err(|_| BadToken("malformed seed fingerprint"))?;
        if addr.is_empty() || !addr.contains(':') {
            return Err(BadToken("the seed address must be host:port"));
        }
        Ok(JoinToken {
            id: id.into(),
            secret: secret.into(),
            seed_addr: addr.into(),
            seed_fingerprint,
        })
    }

    /// What the state stores and compares: SHA-256 of the secret.
    pub fn secret_hash(&self) -> Digest {
        secret_hash(&self.secret)
    }
}

/// SHA-256 of a token secret as presented.
pub fn secret_hash(secret: &str) -> Digest {
    Digest::of(secret.as_bytes())
}

/// A token as the replicated state records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public id.
    pub id: String,
    /// SHA-256 of the secret.
    pub secret_hash: Digest,
    /// When it was created.
    pub created_at: crate::ids::Timestamp,
    /// When it stops working.
    pub expires_at: crate::ids::Timestamp,
    /// Joins it still allows.
    pub uses_left: u32,
    /// Who created it.
    pub created_by: Fingerprint,
    /// Revoked by an admin.
    pub revoked: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_malformed() {
        let fp = Fingerprint::of_key_blob(b"seed");
        let t = JoinToken::new([1; 8], [2; 16], "127.0.0.1:7720".into(), fp.clone());
        let s = t.encode();
        assert!(s.starts_with("mesh1-0101010101010101.0202"), "{s}");
        assert_eq!(JoinToken::parse(&s).unwrap(), t);
        assert!(JoinToken::parse("mesh1-zz").is_err());
        assert!(JoinToken::parse(&s.replace('@', "#")).is_err());
        assert!(JoinToken::parse(&s.replace("mesh1-", "mesh2-")).is_err());
        assert!(JoinToken::parse(&s.replace("0101010101010101", "01")).is_err());
        assert_ne!(t.secret_hash(), secret_hash("other"));
    }
}
