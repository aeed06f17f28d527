//! OpenSSH `known_hosts` files: which host key is pinned for which `host:port`.
//!
//! Host patterns follow OpenSSH: `host` for port 22, `[host]:port` otherwise, several
//! comma-separated names per line. Hashed names (`|1|...`) and `@revoked` /
//! `@cert-authority` markers are not used by Mesh and never match.

use super::fingerprint::Fingerprint;
use super::public_key::PublicKeyLine;

/// The pins of one known_hosts text.
#[derive(Debug, Default, Clone)]
pub struct KnownHosts {
    entries: Vec<(Vec<String>, PublicKeyLine)>,
}

/// What the known_hosts file says about a presented host key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyCheck {
    /// A pinned key for this host equals the presented key.
    Trusted,
    /// No key is pinned for this host.
    Unknown,
    /// Keys are pinned for this host, none of them the presented one.
    Changed {
        /// Fingerprints pinned for the host.
        pinned: Vec<Fingerprint>,
    },
}

impl KnownHosts {
    /// Parse a known_hosts text. Lines that cannot be read are skipped, as OpenSSH does.
    pub fn parse(text: &str) -> KnownHosts {
        let entries = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('@'))
            .filter_map(|l| {
                let (hosts, key) = l.split_once(char::is_whitespace)?;
                let key = PublicKeyLine::parse(key.trim()).ok()?;
                Some((hosts.split(',').map(str::to_string).collect(), key))
            })
            .collect();
        KnownHosts { entries }
    }

    /// Check the key a host presented against the pins.
    pub fn check(&self, host: &str, port: u16, key_blob: &[u8]) -> HostKeyCheck {
        let pattern = host_pattern(host, port);
        let pinned: Vec<&PublicKeyLine> = self
            .entries
            .iter()
            .filter(|(hosts, _)| hosts.contains(&pattern))
            .map(|(_, k)| k)
            .collect();
        if pinned.is_empty() {
            HostKeyCheck::Unknown
        } else if pinned.iter().any(|k| k.blob == key_blob) {
            HostKeyCheck::Trusted
        } else {
            HostKeyCheck::Changed {
                pinned: pinned.iter().map(|k| k.fingerprint()).collect(),
            }
        }
    }
}

/// The host field OpenSSH writes for `host:port`.
pub fn host_pattern(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

/// The known_hosts line that pins `key` for `host:port`.
pub fn pin_line(host: &str, port: u16, key: &PublicKeyLine) -> String {
    format!("{} {}", host_pattern(host, port), key.to_openssh())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILe32KEJQ8xJYeeAs4nYLxb6N0GPeFTAtATBazeGe9vD";
    const B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMZsda+59mZ1kEjT4Avb1392ckXu60kPch+JUsZW2sZs";

    #[test]
    fn trusted_unknown_changed() {
        let a = PublicKeyLine::parse(A).unwrap();
        let b = PublicKeyLine::parse(B).unwrap();
        let text = format!(
            "# pins\n{}\nother.host,10.0.0.9 {B}\n",
            pin_line("127.0.0.1", 7722, &a)
        );
        let kh = KnownHosts::parse(&text);
        assert_eq!(kh.check("127.0.0.1", 7722, &a.blob), HostKeyCheck::Trusted);
        assert_eq!(kh.check("127.0.0.1", 7723, &a.blob), HostKeyCheck::Unknown);
        assert_eq!(kh.check("10.0.0.9", 22, &b.blob), HostKeyCheck::Trusted);
        assert_eq!(
            kh.check("127.0.0.1", 7722, &b.blob),
            HostKeyCheck::Changed {
                pinned: vec![a.fingerprint()]
            }
        );
    }

    #[test]
    fn pattern_uses_brackets_for_non_default_ports() {
        assert_eq!(host_pattern("h", 22), "h");
        assert_eq!(host_pattern("h", 7722), "[h]:7722");
    }
}
