//! One OpenSSH public key line (`ssh-ed25519 AAAA... comment`), as found in `.pub`
//! files, `authorized_keys` and (after the host field) `known_hosts`.

use super::fingerprint::Fingerprint;
use base64::Engine as _;

/// A parsed public key line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKeyLine {
    /// Key algorithm, e.g. `ssh-ed25519`.
    pub algorithm: String,
    /// The key blob (SSH wire encoding).
    pub blob: Vec<u8>,
    /// The comment, if any.
    pub comment: String,
}

/// Why a public key line could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublicKeyError {
    /// The line has no `ALGORITHM BASE64` pair.
    #[error("expected 'ssh-ed25519 AAAA... [comment]', found {0:?}")]
    Malformed(String),
    /// The base64 part does not decode, or does not carry the algorithm it claims.
    #[error("the key data of {0} is not valid base64 for that algorithm")]
    BadKeyData(String),
}

impl PublicKeyLine {
    /// Parse one line of an `authorized_keys` file or a `.pub` file. Options before
    /// the key type (`from="..." ssh-ed25519 ...`) are skipped.
    pub fn parse(line: &str) -> Result<PublicKeyLine, PublicKeyError> {
        let mut words = line.split_whitespace().peekable();
        // Skip authorized_keys options: everything before a word that looks like a key type.
        while let Some(w) = words.peek() {
            if is_key_type(w) {
                break;
            }
            words.next();
        }
        let algorithm = words
            .next()
            .ok_or_else(|| PublicKeyError::Malformed(line.into()))?;
        let data = words
            .next()
            .ok_or_else(|| PublicKeyError::Malformed(line.into()))?;
        let comment = words.collect::<Vec<_>>().join(" ");
        let blob = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|_| PublicKeyError::BadKeyData(algorithm.into()))?;
        if blob_algorithm(&blob) != Some(algorithm) {
            return Err(PublicKeyError::BadKeyData(algorithm.into()));
        }
        Ok(PublicKeyLine {
            algorithm: algorithm.into(),
            blob,
            comment,
        })
    }

    /// Every key in an `authorized_keys` text; blank lines and `#` comments are skipped.
    pub fn parse_many(text: &str) -> Result<Vec<PublicKeyLine>, PublicKeyError> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(PublicKeyLine::parse)
            .collect()
    }

    /// The key's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_key_blob(&self.blob)
    }

    /// The raw ed25519 key, if this is one.
    pub fn ed25519(&self) -> Option<[u8; 32]> {
        (self.algorithm == "ssh-ed25519" && self.blob.len() == 51)
            .then(|| self.blob[19..].try_into().ok())
            .flatten()
    }

    /// The `ALGORITHM BASE64` form, without comment.
    pub fn to_openssh(&self) -> String {
        format!(
            "{} {}",
            self.algorithm,
            base64::engine::general_purpose::STANDARD.encode(&self.blob)
        )
    }
}

fn is_key_type(w: &str) -> bool {
    w.starts_with("ssh-") || w.starts_with("ecdsa-") || w.starts_with("sk-")
}

/// The algorithm name at the start of a key blob.
fn blob_algorithm(blob: &[u8]) -> Option<&str> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    std::str::from_utf8(blob.get(4..4 + len)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILe32KEJQ8xJYeeAs4nYLxb6N0GPeFTAtATBazeGe9vD alice@laptop";

    #[test]
    fn parses_pub_and_authorized_keys_lines() {
        let k = PublicKeyLine::parse(KEY).unwrap();
        assert_eq!(k.algorithm, "ssh-ed25519");
        assert_eq!(k.comment, "alice@laptop");
        assert!(k.ed25519().is_some());
        let with_opts = format!("no-pty,from=\"10.0.0.0/8\" {KEY}");
        assert_eq!(PublicKeyLine::parse(&with_opts).unwrap().blob, k.blob);
        let many = PublicKeyLine::parse_many(&format!("# admins\n\n{KEY}\n{KEY}\n")).unwrap();
        assert_eq!(many.len(), 2);
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            PublicKeyLine::parse("hello"),
            Err(PublicKeyError::Malformed(_))
        ));
        assert!(matches!(
            PublicKeyLine::parse("ssh-ed25519 !!!!"),
            Err(PublicKeyError::BadKeyData(_))
        ));
        // Blob says ed25519, line claims rsa.
        let lie = KEY.replace("ssh-ed25519", "ssh-rsa");
        assert!(matches!(
            PublicKeyLine::parse(&lie),
            Err(PublicKeyError::BadKeyData(_))
        ));
    }
}
