//! `HOST:PORT` of a node's SSH endpoint, as given to `--node` and `pin`.

use std::fmt;
use std::str::FromStr;

/// The port `mesh-node` serves SSH on unless configured otherwise.
pub const DEFAULT_SSH_PORT: u16 = 7722;

/// Where a node's SSH endpoint listens. The host is kept exactly as the user wrote it,
/// because known_hosts pins are looked up by that name (`[HOST]:PORT`), as OpenSSH does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddr {
    /// Host name or IP address, without brackets.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl FromStr for NodeAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let bad = |why: &str| {
            format!("'{s}' is not HOST:PORT ({why}); examples: 127.0.0.1:7722, node1.lan:7722, [::1]:7722")
        };
        if s.is_empty() {
            return Err(bad("it is empty"));
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            // [v6]:port or [v6]
            let (host, after) = rest.split_once(']').ok_or_else(|| bad("missing ']'"))?;
            match after {
                "" => (host, None),
                p => (
                    host,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| bad("expected ':' after ']'"))?,
                    ),
                ),
            }
        } else if s.matches(':').count() > 1 {
            // A bare IPv6 address has no port.
            (s, None)
        } else {
            match s.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        if host.is_empty() {
            return Err(bad("the host is empty"));
        }
        if host.bytes().all(|b| b.is_ascii_digit()) {
            // `tasks --node 2` meant a node id: that filter is `--on-node`.
            return Err(bad(
                "a bare number is not a host; to list the tasks on node N use `tasks --on-node N`",
            ));
        }
        let port = match port {
            None => DEFAULT_SSH_PORT,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("the port must be 1 to 65535"))?,
        };
        Ok(NodeAddr {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_port_forms() {
        let a: NodeAddr = "127.0.0.1:7722".parse().unwrap();
        assert_eq!((a.host.as_str(), a.port), ("127.0.0.1", 7722));
        let a: NodeAddr = "node1.lan".parse().unwrap();
        assert_eq!((a.host.as_str(), a.port), ("node1.lan", DEFAULT_SSH_PORT));
        let a: NodeAddr = "[::1]:2222".parse().unwrap();
        assert_eq!((a.host.as_str(), a.port), ("::1", 2222));
        assert_eq!(a.to_string(), "[::1]:2222");
        let a: NodeAddr = "::1".parse().unwrap();
        assert_eq!((a.host.as_str(), a.port), ("::1", DEFAULT_SSH_PORT));
        assert!("host:0".parse::<NodeAddr>().is_err());
        assert!("host:http".parse::<NodeAddr>().is_err());
        assert!(":7722".parse::<NodeAddr>().is_err());
        let e = "2".parse::<NodeAddr>().unwrap_err();
        assert!(e.contains("a bare number is not a host"), "{e}");
        assert!("2:7722".parse::<NodeAddr>().is_err());
        assert_eq!("10.0.0.2".parse::<NodeAddr>().unwrap().host, "10.0.0.2");
    }
}
