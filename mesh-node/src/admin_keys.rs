//! The keys allowed to operate this node: read from `--admin-key` files
//! (`.pub` or `authorized_keys` format), or the invoking user's own key by default.

use crate::host_key::{write_key_pair, HostKeyError};
use mesh_core::identity::fingerprint::Fingerprint;
use mesh_core::identity::public_key::PublicKeyLine;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::PrivateKey;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Why admin keys could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AdminKeyError {
    /// The file could not be read.
    #[error("cannot read admin key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is not a public key.
    #[error("admin key file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: mesh_core::identity::public_key::PublicKeyError,
    },
    /// The file has no key at all.
    #[error("admin key file {0} holds no key")]
    Empty(PathBuf),
    /// The user has no home directory to find or create a default key in.
    #[error("no --admin-key given and no home directory to find ~/.ssh/id_ed25519.pub in")]
    NoHome,
    /// Creating the default key failed.
    #[error(transparent)]
    Create(#[from] HostKeyError),
}

/// Where the admin keys came from, for the start-up message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminKeySource {
    /// `--admin-key` files.
    Files,
    /// The invoking user's existing `~/.ssh/id_ed25519.pub`.
    UserKey(PathBuf),
    /// A key pair created now at this path, because the user had none.
    CreatedUserKey(PathBuf),
}

/// Every key in the given files, by fingerprint.
pub fn read_files(
    paths: &[PathBuf],
) -> Result<BTreeMap<Fingerprint, PublicKeyLine>, AdminKeyError> {
    let mut out = BTreeMap::new();
    for path in paths {
        let text = std::fs::read_to_string(path).map_err(|source| AdminKeyError::Read {
            path: path.clone(),
            source,
        })?;
        let keys = PublicKeyLine::parse_many(&text).map_err(|source| AdminKeyError::Parse {
            path: path.clone(),
            source,
        })?;
        if keys.is_empty() {
            return Err(AdminKeyError::Empty(path.clone()));
        }
        out.extend(keys.into_iter().map(|k| (k.fingerprint(), k)));
    }
    Ok(out)
}

/// The admin keys: the given files, or else the invoking user's `~/.ssh/id_ed25519.pub`,
/// created (as `ssh-keygen -t ed25519` would) when the user has none.
pub fn resolve(
    paths: &[PathBuf],
    home: Option<&Path>,
) -> Result<(BTreeMap<Fingerprint, PublicKeyLine>, AdminKeySource), AdminKeyError> {
    if !paths.is_empty() {
        return Ok((read_files(paths)?, AdminKeySource::Files));
    }
    let home = home.ok_or(AdminKeyError::NoHome)?;
    let private = home.join(".ssh").join("id_ed25519");
    let public = private.with_extension("pub");
    if public.exists() {
        return Ok((
            read_files(std::slice::from_ref(&public))?,
            AdminKeySource::UserKey(public),
        ));
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| HostKeyError::Random(e.to_string()))?;
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    let user = std::env::var("USER").unwrap_or_else(|_| "user".into());
    write_key_pair(&key, &private, &format!("{user}@mesh"))?;
    Ok((
        read_files(std::slice::from_ref(&public))?,
        AdminKeySource::CreatedUserKey(private),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_a_user_key_when_there_is_none_then_reuses_it() {
        let home = tempfile::tempdir().unwrap();
        let (a, src) = resolve(&[], Some(home.path())).unwrap();
        assert!(matches!(src, AdminKeySource::CreatedUserKey(_)));
        let (b, src) = resolve(&[], Some(home.path())).unwrap();
        assert!(matches!(src, AdminKeySource::UserKey(_)));
        assert_eq!(a, b);
        assert_eq!(a.len(), 1);
    }

    #[test]
    fn authorized_keys_files_with_several_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("authorized_keys");
        std::fs::write(
            &p,
            "# ops\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILe32KEJQ8xJYeeAs4nYLxb6N0GPeFTAtATBazeGe9vD alice\n\
             no-pty ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMZsda+59mZ1kEjT4Avb1392ckXu60kPch+JUsZW2sZs bob\n",
        )
        .unwrap();
        assert_eq!(read_files(&[p]).unwrap().len(), 2);
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "hello world\n").unwrap();
        assert!(read_files(&[bad]).is_err());
    }
}
