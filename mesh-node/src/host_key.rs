//! The node's identity: an ed25519 SSH host key in OpenSSH format.
//!
//! Generated on first start in the data directory unless one is given, so a node may
//! reuse the machine's own `/etc/ssh/ssh_host_ed25519_key`.

use mesh_core::identity::fingerprint::Fingerprint;
use russh::keys::ssh_key::{private::Ed25519Keypair, LineEnding};
use russh::keys::{PrivateKey, PublicKey};
use std::path::{Path, PathBuf};

/// File name of a generated host key inside the data directory.
pub const HOST_KEY_FILE: &str = "host_key";

/// Why the host key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    /// The key file could not be read or parsed.
    #[error("cannot load host key {path}: {reason}; give an unencrypted ed25519 key made by `ssh-keygen -t ed25519 -N ''`")]
    Load {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The key is not ed25519.
    #[error("host key {path} is {algorithm}; Mesh node identities are ed25519 keys (`ssh-keygen -t ed25519`)")]
    NotEd25519 {
        /// The file.
        path: PathBuf,
        /// The key's algorithm.
        algorithm: String,
    },
    /// A new key could not be written.
    #[error("cannot write host key {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The OS random source failed.
    #[error("cannot generate a host key: the OS random source failed: {0}")]
    Random(String),
}

/// A loaded host key.
#[derive(Clone)]
pub struct HostKey {
    key: PrivateKey,
    /// Where it was loaded from.
    pub path: PathBuf,
}

impl HostKey {
    /// Load `path` if given, else `<data_dir>/host_key`, generating it when missing.
    /// Returns the key and whether it was generated now.
    pub fn load_or_generate(
        given: Option<&Path>,
        data_dir: &Path,
    ) -> Result<(HostKey, bool), HostKeyError> {
        if let Some(path) = given {
            return Ok((HostKey::load(path)?, false));
        }
        let path = data_dir.join(HOST_KEY_FILE);
        if path.exists() {
            return Ok((HostKey::load(&path)?, false));
        }
        Ok((HostKey::generate(&path)?, true))
    }

    /// Load an OpenSSH private key file.
    pub fn load(path: &Path) -> Result<HostKey, HostKeyError> {
        let key = russh::keys::load_secret_key(path, None).map_err(|e| HostKeyError::Load {
            path: path.into(),
            reason: e.to_string(),
        })?;
        if key.key_data().ed25519().is_none() {
            return Err(HostKeyError::NotEd25519 {
                path: path.into(),
                algorithm: key.algorithm().to_string(),
            });
        }
        Ok(HostKey {
            key,
            path: path.into(),
        })
    }

    /// Generate a new key and write it (mode 0600) with its `.pub` beside it.
    pub fn generate(path: &Path) -> Result<HostKey, HostKeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| HostKeyError::Random(e.to_string()))?;
        let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        write_key_pair(&key, path, "mesh-node host key")?;
        Ok(HostKey {
            key,
            path: path.into(),
        })
    }

    /// The private key, for the SSH server.
    pub fn private_key(&self) -> &PrivateKey {
        &self.key
    }

    /// The public key.
    pub fn public_key(&self) -> &PublicKey {
        self.key.public_key()
    }

    /// The fingerprint, exactly as `ssh-keygen -lf` prints it.
    pub fn fingerprint(&self) -> Fingerprint {
        fingerprint_of(self.public_key())
    }
}

/// The fingerprint of an SSH public key.
pub fn fingerprint_of(key: &PublicKey) -> Fingerprint {
    match key.key_data().ed25519() {
        Some(ed) => Fingerprint::of_ed25519(&ed.0),
        None => Fingerprint::parse(&key.fingerprint(russh::keys::HashAlg::Sha256).to_string())
            .expect("ssh-key prints SHA256 fingerprints in OpenSSH form"),
    }
}

/// Write a private key (0600) and its `.pub`, as `ssh-keygen` would.
pub fn write_key_pair(key: &PrivateKey, path: &Path, comment: &str) -> Result<(), HostKeyError> {
    let werr = |source| HostKeyError::Write {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(werr)?;
    }
    let mut key = key.clone();
    key.set_comment(comment);
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| werr(std::io::Error::other(e.to_string())))?;
    write_private(path, text.as_bytes()).map_err(werr)?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| werr(std::io::Error::other(e.to_string())))?;
    std::fs::write(path.with_extension("pub"), format!("{public}\n")).map_err(werr)?;
    Ok(())
}

/// Create a file readable by its owner only (OpenSSH refuses looser private keys).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_reloads_with_the_same_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let (k, fresh) = HostKey::load_or_generate(None, dir.path()).unwrap();
        assert!(fresh);
        let (again, fresh) = HostKey::load_or_generate(None, dir.path()).unwrap();
        assert!(!fresh);
        assert_eq!(k.fingerprint(), again.fingerprint());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(HOST_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn garbage_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, "not a key").unwrap();
        let err = HostKey::load(&p).err().unwrap().to_string();
        assert!(err.contains("cannot load host key"), "{err}");
    }
}
