//! Which SSH key proves who the operator is: `--identity FILE`, else the ed25519 keys
//! of ssh-agent, else `~/.ssh/id_ed25519`. The node maps the key to a role.

use crate::connection::ClientHandler;
use crate::node_addr::NodeAddr;
use mesh_core::identity::public_key::PublicKeyLine;
use russh::client::{AuthResult, Handle};
use russh::keys::agent::client::AgentClient;
use russh::keys::agent::AgentIdentity;
use russh::keys::{Algorithm, PrivateKeyWithHashAlg, PublicKey};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The SSH user name sent to the node. The node ignores it: the key is what counts.
pub const SSH_USER: &str = "mesh";

/// Where the key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityChoice {
    /// Exactly this OpenSSH private key file (`--identity`, `MESH_IDENTITY`).
    File(PathBuf),
    /// ssh-agent's ed25519 keys, then `~/.ssh/id_ed25519`.
    Auto,
}

/// Authenticate on a connected session, trying the keys of `choice` in order, and
/// return the fingerprint of the key the node accepted. The error names every key
/// tried and why it did not work.
pub async fn authenticate(
    handle: &mut Handle<ClientHandler>,
    node: &NodeAddr,
    choice: &IdentityChoice,
) -> anyhow::Result<String> {
    let mut tried: Vec<String> = Vec::new();
    match choice {
        IdentityChoice::File(path) => {
            let key = load_key_file(path).map_err(|why| anyhow::anyhow!("{why}"))?;
            if let Some(fp) =
                try_private_key(handle, key, &path.display().to_string(), &mut tried).await
            {
                return Ok(fp);
            }
            anyhow::bail!(
                "node {node} did not accept the key in {}: {}; ask an admin of the mesh to grant \
                 this key a role, or pass another --identity",
                path.display(),
                tried.join("; ")
            );
        }
        IdentityChoice::Auto => {
            if let Some(fp) = try_agent(handle, &mut tried).await {
                return Ok(fp);
            }
            match dirs::home_dir().map(|h| h.join(".ssh").join("id_ed25519")) {
                None => tried.push("~/.ssh/id_ed25519: no home directory".into()),
                Some(path) if !path.exists() => {
                    tried.push(format!("{}: not found", path.display()))
                }
                Some(path) => match load_key_file(&path) {
                    Err(why) => tried.push(why),
                    Ok(key) => {
                        if let Some(fp) =
                            try_private_key(handle, key, &path.display().to_string(), &mut tried)
                                .await
                        {
                            return Ok(fp);
                        }
                    }
                },
            }
            anyhow::bail!(
                "no key was accepted by node {node}; tried: {}; pass --identity FILE (or set \
                 MESH_IDENTITY) with a key the mesh knows, or ask an admin to grant your key a role",
                tried.join("; ")
            );
        }
    }
}

/// Load an unencrypted OpenSSH private key; the error is a sentence for `tried`.
fn load_key_file(path: &Path) -> Result<russh::keys::PrivateKey, String> {
    match russh::keys::load_secret_key(path, None) {
        Ok(k) => Ok(k),
        Err(russh::keys::Error::KeyIsEncrypted) => Err(format!(
            "{} is encrypted and mesh-cli does not ask for passphrases: load it into ssh-agent \
             (`ssh-add {}`) and leave out --identity",
            path.display(),
            path.display()
        )),
        Err(russh::keys::Error::IO(e)) => Err(format!("cannot read {}: {e}", path.display())),
        Err(e) => Err(format!(
            "{} is not a usable OpenSSH private key: {e}",
            path.display()
        )),
    }
}

/// Offer one private key; the fingerprint of the key if the node accepted it.
async fn try_private_key(
    handle: &mut Handle<ClientHandler>,
    key: russh::keys::PrivateKey,
    source: &str,
    tried: &mut Vec<String>,
) -> Option<String> {
    let fingerprint = fingerprint_of(key.public_key());
    let key = PrivateKeyWithHashAlg::new(Arc::new(key), None);
    match handle.authenticate_publickey(SSH_USER, key).await {
        Ok(AuthResult::Success) => Some(fingerprint),
        Ok(AuthResult::Failure { .. }) => {
            tried.push(format!("{source} (key {fingerprint}): refused by the node"));
            None
        }
        Err(e) => {
            tried.push(format!("{source} (key {fingerprint}): {e}"));
            None
        }
    }
}

/// Offer ssh-agent's ed25519 keys; the fingerprint of the one the node accepted.
async fn try_agent(handle: &mut Handle<ClientHandler>, tried: &mut Vec<String>) -> Option<String> {
    if std::env::var_os("SSH_AUTH_SOCK").is_none() {
        tried.push("ssh-agent: SSH_AUTH_SOCK is not set".into());
        return None;
    }
    let mut agent = match AgentClient::connect_env().await {
        Ok(a) => a,
        Err(e) => {
            tried.push(format!("ssh-agent: cannot connect ({e})"));
            return None;
        }
    };
    let identities = match agent.request_identities().await {
        Ok(ids) => ids,
        Err(e) => {
            tried.push(format!("ssh-agent: cannot list keys ({e})"));
            return None;
        }
    };
    let keys: Vec<(PublicKey, String)> = identities
        .into_iter()
        .filter_map(|id| match id {
            AgentIdentity::PublicKey { key, comment } if key.algorithm() == Algorithm::Ed25519 => {
                Some((key, comment))
            }
            _ => None,
        })
        .collect();
    if keys.is_empty() {
        tried.push("ssh-agent: holds no ed25519 key".into());
        return None;
    }
    for (key, comment) in keys {
        let fingerprint = fingerprint_of(&key);
        let label = if comment.is_empty() {
            format!("ssh-agent key {fingerprint}")
        } else {
            format!("ssh-agent key {fingerprint} ({comment})")
        };
        match handle
            .authenticate_publickey_with(SSH_USER, key, None, &mut agent)
            .await
        {
            Ok(AuthResult::Success) => return Some(fingerprint),
            Ok(AuthResult::Failure { .. }) => tried.push(format!("{label}: refused by the node")),
            Err(e) => tried.push(format!("{label}: the agent did not sign ({e})")),
        }
    }
    None
}

/// The OpenSSH fingerprint of a public key.
pub fn fingerprint_of(key: &PublicKey) -> String {
    match key.to_bytes() {
        Ok(blob) => PublicKeyLine {
            algorithm: key.algorithm().as_str().into(),
            blob,
            comment: String::new(),
        }
        .fingerprint()
        .to_string(),
        Err(_) => "(unencodable key)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::ssh_key::{private::Ed25519Keypair, LineEnding};

    #[test]
    fn encrypted_and_missing_keys_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let e = load_key_file(&dir.path().join("nope")).unwrap_err();
        assert!(e.starts_with("cannot read "), "{e}");
        let garbage = dir.path().join("garbage");
        std::fs::write(&garbage, "hello").unwrap();
        assert!(load_key_file(&garbage)
            .unwrap_err()
            .contains("is not a usable OpenSSH private key"));

        let key = russh::keys::PrivateKey::from(Ed25519Keypair::from_seed(&[3; 32]));
        let plain = dir.path().join("plain");
        std::fs::write(&plain, key.to_openssh(LineEnding::LF).unwrap().as_bytes()).unwrap();
        let loaded = load_key_file(&plain).unwrap();
        assert_eq!(
            fingerprint_of(loaded.public_key()),
            key.public_key()
                .fingerprint(russh::keys::HashAlg::Sha256)
                .to_string()
        );
    }
}
