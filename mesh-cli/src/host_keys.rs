//! Strict host-key pinning: the verdict on a node's presented key, and `pin`, which
//! appends a known_hosts line. There is no trust on first use: an unknown key is
//! refused with the command that pins it.

use crate::node_addr::NodeAddr;
use anyhow::Context as _;
use mesh_core::identity::known_hosts::{pin_line, HostKeyCheck, KnownHosts};
use mesh_core::identity::public_key::PublicKeyLine;
use mesh_core::Fingerprint;
use russh::keys::PublicKey;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The known_hosts file mesh-cli uses unless told otherwise:
/// `<config dir>/mesh/known_hosts` (`~/.config/mesh/known_hosts` on Linux).
pub fn default_known_hosts_path() -> Option<PathBuf> {
    dirs::config_dir().map(|d| d.join("mesh").join("known_hosts"))
}

/// A presented host key in the forms pinning needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKey {
    /// The key as a known_hosts / authorized_keys line.
    pub line: PublicKeyLine,
    /// Its fingerprint, as `ssh-keygen -lf` prints it.
    pub fingerprint: Fingerprint,
}

impl HostKey {
    /// The forms of a key that russh hands over.
    pub fn of(key: &PublicKey) -> anyhow::Result<HostKey> {
        // The SSH wire encoding of the key: what known_hosts stores in base64.
        let blob = key
            .to_bytes()
            .context("cannot encode the node's host key")?;
        let line = PublicKeyLine {
            algorithm: key.algorithm().as_str().to_string(),
            blob,
            comment: String::new(),
        };
        let fingerprint = line.fingerprint();
        Ok(HostKey { line, fingerprint })
    }
}

/// Why a node's host key is refused. Each message shows the fingerprint and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostKeyRefusal {
    /// Nothing is pinned for this node.
    #[error(
        "host key for {node} is {presented} and is not pinned in {path}; if this is your node \
         (check with `mesh-node fingerprint` on it), run: {pin_command}"
    )]
    Unknown {
        /// The node as the user named it.
        node: String,
        /// The fingerprint the node presented.
        presented: Fingerprint,
        /// The known_hosts file.
        path: String,
        /// The command that pins the presented key.
        pin_command: String,
    },
    /// Another key is pinned for this node.
    #[error(
        "host key for {node} is {presented}, not the pinned {pinned}; someone may be intercepting \
         the connection, or the node was reinstalled: if you trust the new key, remove the old line \
         from {path} and run {pin_command}"
    )]
    Changed {
        /// The node as the user named it.
        node: String,
        /// The fingerprint the node presented.
        presented: Fingerprint,
        /// The pinned fingerprints, joined with " or ".
        pinned: String,
        /// The known_hosts file.
        path: String,
        /// The command that pins the presented key.
        pin_command: String,
    },
}

/// What the known_hosts file pins for one node: the check run in `check_server_key`.
#[derive(Debug, Clone)]
pub struct HostKeyPolicy {
    node: NodeAddr,
    path: PathBuf,
    path_is_default: bool,
    pins: KnownHosts,
}

impl HostKeyPolicy {
    /// Read the pins for `node` from `path`. A missing file pins nothing.
    pub fn load(node: &NodeAddr, path: &Path) -> anyhow::Result<HostKeyPolicy> {
        let text = read_known_hosts(path)?;
        Ok(HostKeyPolicy {
            node: node.clone(),
            path: path.to_path_buf(),
            path_is_default: default_known_hosts_path().as_deref() == Some(path),
            pins: KnownHosts::parse(&text),
        })
    }

    /// The verdict on the key the node presented.
    pub fn check(&self, key: &HostKey) -> Result<(), HostKeyRefusal> {
        let pin_command = self.pin_command(&key.fingerprint);
        match self
            .pins
            .check(&self.node.host, self.node.port, &key.line.blob)
        {
            HostKeyCheck::Trusted => Ok(()),
            HostKeyCheck::Unknown => Err(HostKeyRefusal::Unknown {
                node: self.node.to_string(),
                presented: key.fingerprint.clone(),
                path: self.path.display().to_string(),
                pin_command,
            }),
            HostKeyCheck::Changed { pinned } => Err(HostKeyRefusal::Changed {
                node: self.node.to_string(),
                presented: key.fingerprint.clone(),
                pinned: pinned
                    .iter()
                    .map(Fingerprint::as_str)
                    .collect::<Vec<_>>()
                    .join(" or "),
                path: self.path.display().to_string(),
                pin_command,
            }),
        }
    }

    /// `mesh-cli pin NODE FP`, naming the known_hosts file when it is not the default.
    fn pin_command(&self, fp: &Fingerprint) -> String {
        if self.path_is_default {
            format!("mesh-cli pin {} {fp}", self.node)
        } else {
            format!(
                "mesh-cli --known-hosts {} pin {} {fp}",
                self.path.display(),
                self.node
            )
        }
    }
}

/// What `pin` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinOutcome {
    /// A line was appended.
    Added,
    /// The key was pinned already; nothing was written.
    AlreadyPinned,
}

/// Pin `key` for `node` in the known_hosts file at `path`: append one OpenSSH line,
/// creating the file and its directory if needed. Never writes a duplicate, and
/// refuses when a different key is pinned for the node (the user must remove that
/// line on purpose first).
pub fn pin(path: &Path, node: &NodeAddr, key: &HostKey) -> anyhow::Result<PinOutcome> {
    let text = read_known_hosts(path)?;
    match KnownHosts::parse(&text).check(&node.host, node.port, &key.line.blob) {
        HostKeyCheck::Trusted => return Ok(PinOutcome::AlreadyPinned),
        HostKeyCheck::Changed { pinned } => {
            anyhow::bail!(
            "{} already pins {} for {node}; if the node was reinstalled and {} is its new key, \
             remove the old line from {} first, then pin again",
            path.display(),
            pinned.iter().map(Fingerprint::as_str).collect::<Vec<_>>().join(" and "),
            key.fingerprint,
            path.display()
        )
        }
        HostKeyCheck::Unknown => {}
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    }
    let mut line = String::new();
    if !text.is_empty() && !text.ends_with('\n') {
        line.push('\n');
    }
    line.push_str(&pin_line(&node.host, node.port, &key.line));
    line.push('\n');
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {} for writing", path.display()))?;
    file.write_all(line.as_bytes())
        .with_context(|| format!("cannot write to {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("cannot write to {}", path.display()))?;
    Ok(PinOutcome::Added)
}

/// The text of a known_hosts file; a missing file is empty.
fn read_known_hosts(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => {
            Err(e).with_context(|| format!("cannot read the known_hosts file {}", path.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILe32KEJQ8xJYeeAs4nYLxb6N0GPeFTAtATBazeGe9vD";
    const B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMZsda+59mZ1kEjT4Avb1392ckXu60kPch+JUsZW2sZs";

    fn key(line: &str) -> HostKey {
        let line = PublicKeyLine::parse(line).unwrap();
        HostKey {
            fingerprint: line.fingerprint(),
            line,
        }
    }

    fn node(s: &str) -> NodeAddr {
        s.parse().unwrap()
    }

    #[test]
    fn pin_appends_once_and_refuses_a_different_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/known_hosts");
        let n = node("127.0.0.1:7722");
        assert_eq!(pin(&path, &n, &key(A)).unwrap(), PinOutcome::Added);
        assert_eq!(pin(&path, &n, &key(A)).unwrap(), PinOutcome::AlreadyPinned);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("[127.0.0.1]:7722 {A}\n"), "exactly one line");

        let e = pin(&path, &n, &key(B)).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "already pins {} for 127.0.0.1:7722",
                key(A).fingerprint
            )),
            "{e}"
        );
        // Another port of the same host is another node.
        assert_eq!(
            pin(&path, &node("127.0.0.1:7723"), &key(B)).unwrap(),
            PinOutcome::Added
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
    }

    #[test]
    fn pin_keeps_existing_lines_without_a_final_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        std::fs::write(&path, format!("other.host {B}")).unwrap();
        pin(&path, &node("h:22"), &key(A)).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("other.host {B}\nh {A}\n")
        );
    }

    #[test]
    fn verdicts_name_the_fingerprint_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        let n = node("127.0.0.1:7722");
        let policy = HostKeyPolicy::load(&n, &path).unwrap();
        let e = policy.check(&key(A)).unwrap_err().to_string();
        let fa = key(A).fingerprint;
        assert!(
            e.starts_with(&format!(
                "host key for 127.0.0.1:7722 is {fa} and is not pinned in {}",
                path.display()
            )),
            "{e}"
        );
        assert!(
            e.contains(&format!(
                "run: mesh-cli --known-hosts {} pin 127.0.0.1:7722 {fa}",
                path.display()
            )),
            "{e}"
        );

        pin(&path, &n, &key(A)).unwrap();
        let policy = HostKeyPolicy::load(&n, &path).unwrap();
        assert_eq!(policy.check(&key(A)), Ok(()));
        let e = policy.check(&key(B)).unwrap_err().to_string();
        let fb = key(B).fingerprint;
        assert!(e.starts_with(&format!("host key for 127.0.0.1:7722 is {fb}, not the pinned {fa}; someone may be intercepting")), "{e}");
        assert!(e.contains("remove the old line from"), "{e}");
    }
}
