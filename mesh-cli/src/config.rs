//! mesh-cli's settings: the config file (`<config dir>/mesh/cli.toml`, or `--config
//! FILE`), merged under the flags and `MESH_*` variables, and checked once into the
//! [`Settings`] every command runs with. Precedence: flag > environment > file > default
//! (clap already puts a flag before its variable).

use crate::host_keys::default_known_hosts_path;
use crate::identity::IdentityChoice;
use crate::node_addr::NodeAddr;
use anyhow::Context as _;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The node mesh-cli talks to when neither a flag, `MESH_NODE` nor the file names one.
pub const DEFAULT_NODE: &str = "127.0.0.1:7722";

/// The config file mesh-cli reads unless `--config` (or `MESH_CLI_CONFIG`) names another:
/// `<config dir>/mesh/cli.toml` (`~/.config/mesh/cli.toml` on Linux).
pub fn default_config_path() -> Option<PathBuf> {
    dirs::config_dir().map(|d| d.join("mesh").join("cli.toml"))
}

/// The config file as written. Every field is optional; unknown keys are errors, so a
/// misspelt key does not silently fall back to a default.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The node to talk to, as `HOST:PORT` [default: `127.0.0.1:7722`].
    pub node: Option<String>,
    /// The SSH private key to authenticate with (OpenSSH format, unencrypted); a
    /// relative path is taken from the config file's directory, `~/` from the home
    /// directory [default: ssh-agent's ed25519 keys, then `~/.ssh/id_ed25519`].
    pub identity: Option<PathBuf>,
    /// The known_hosts file that pins node host keys; relative paths as for
    /// `identity` [default: `<config dir>/mesh/known_hosts`].
    pub known_hosts: Option<PathBuf>,
}

/// The values given by a flag or its `MESH_*` variable (clap merges the two).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Given {
    /// `--node` / `MESH_NODE`.
    pub node: Option<NodeAddr>,
    /// `--identity` / `MESH_IDENTITY`.
    pub identity: Option<PathBuf>,
    /// `--known-hosts` / `MESH_KNOWN_HOSTS`.
    pub known_hosts: Option<PathBuf>,
}

/// The checked settings every command runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The node to talk to.
    pub node: NodeAddr,
    /// Which key proves who the operator is.
    pub identity: IdentityChoice,
    /// The known_hosts file.
    pub known_hosts: PathBuf,
}

/// Read the config file. `explicit` is `--config FILE`: it must exist. Without it the
/// default file is read if it exists, and a missing one means "no settings".
pub fn load(explicit: Option<&Path>) -> anyhow::Result<(FileConfig, Option<PathBuf>)> {
    let (path, required) = match explicit {
        Some(p) => (p.to_path_buf(), true),
        None => match default_config_path() {
            Some(p) => (p, false),
            None => return Ok((FileConfig::default(), None)),
        },
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
            return Ok((FileConfig::default(), None));
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot read the config file {} (given by --config or MESH_CLI_CONFIG)",
                    path.display()
                )
            })
        }
    };
    let file = parse(&text, &path)?;
    Ok((file, Some(path)))
}

/// Parse a config file's text; `path` names it in errors and anchors relative paths.
pub fn parse(text: &str, path: &Path) -> anyhow::Result<FileConfig> {
    let mut file: FileConfig = toml::from_str(text).map_err(|e| {
        let at = e
            .span()
            .map(|span| {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!(" line {line}:")
            })
            .unwrap_or_default();
        anyhow::anyhow!(
            "config file {}:{at} {}; the keys are node, identity and known_hosts (see docs/cli.md)",
            path.display(),
            e.message().trim_end()
        )
    })?;
    let base = path.parent().unwrap_or(Path::new(""));
    file.identity = file.identity.map(|p| resolve_path(&p, base));
    file.known_hosts = file.known_hosts.map(|p| resolve_path(&p, base));
    Ok(file)
}

/// `~/x` from the home directory, a relative path from `base`, an absolute one as is.
fn resolve_path(p: &Path, base: &Path) -> PathBuf {
    if let Ok(rest) = p.strip_prefix("~") {
        if let Some(home) = dirs::home_dir() {
            return home.join(rest);
        }
    }
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

impl Settings {
    /// Merge flags (and their variables), the file and the defaults, in that order.
    /// `file_path` names the file in errors; `default_known_hosts` is
    /// [`default_known_hosts_path`], passed in so that tests need no home directory.
    pub fn resolve(
        given: Given,
        file: FileConfig,
        file_path: Option<&Path>,
        default_known_hosts: Option<PathBuf>,
    ) -> anyhow::Result<Settings> {
        let in_file = || {
            file_path.map_or_else(
                || "the config file".to_string(),
                |p| format!("config file {}", p.display()),
            )
        };
        let node = match (given.node, file.node) {
            (Some(n), _) => n,
            (None, Some(text)) => text
                .parse()
                .map_err(|e: String| anyhow::anyhow!("{}: node = {e}", in_file()))?,
            (None, None) => DEFAULT_NODE.parse().expect("the default node parses"),
        };
        let identity = given
            .identity
            .or(file.identity)
            .map_or(IdentityChoice::Auto, IdentityChoice::File);
        let known_hosts = match given.known_hosts.or(file.known_hosts).or(default_known_hosts) {
            Some(p) => p,
            None => anyhow::bail!(
                "there is no config directory for the default known_hosts file; pass --known-hosts FILE, \
                 set MESH_KNOWN_HOSTS, or set known_hosts in the config file"
            ),
        };
        Ok(Settings {
            node,
            identity,
            known_hosts,
        })
    }

    /// The settings for a command line: its flags, then the config file, then defaults.
    pub fn of_cli(cli: &crate::args::Cli) -> anyhow::Result<Settings> {
        let (file, path) = load(cli.config.as_deref())?;
        Settings::resolve(
            Given {
                node: cli.node.clone(),
                identity: cli.identity.clone(),
                known_hosts: cli.known_hosts.clone(),
            },
            file,
            path.as_deref(),
            default_known_hosts_path(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> NodeAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_file_with_every_key_parses_and_anchors_relative_paths() {
        let file = parse(
            "node = \"10.0.0.2:7722\"\nidentity = \"keys/ops\"\nknown_hosts = \"/etc/mesh/known_hosts\"\n",
            Path::new("/home/alice/.config/mesh/cli.toml"),
        )
        .unwrap();
        assert_eq!(file.node.as_deref(), Some("10.0.0.2:7722"));
        assert_eq!(
            file.identity.as_deref(),
            Some(Path::new("/home/alice/.config/mesh/keys/ops"))
        );
        assert_eq!(
            file.known_hosts.as_deref(),
            Some(Path::new("/etc/mesh/known_hosts"))
        );
        assert_eq!(
            parse("", Path::new("c.toml")).unwrap(),
            FileConfig::default()
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_file_and_line() {
        let e = parse(
            "node = \"h:1\"\nidentty = \"k\"\n",
            Path::new("/x/cli.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("config file /x/cli.toml: line 2: unknown field `identty`"),
            "{e}"
        );
        assert!(
            e.ends_with("the keys are node, identity and known_hosts (see docs/cli.md)"),
            "{e}"
        );
        let e = parse("node = 7722\n", Path::new("/x/cli.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1:"), "{e}");

        let file = parse("node = \"h:http\"\n", Path::new("/x/cli.toml")).unwrap();
        let e = Settings::resolve(
            Given::default(),
            file,
            Some(Path::new("/x/cli.toml")),
            Some("/kh".into()),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("config file /x/cli.toml: node = 'h:http' is not HOST:PORT"),
            "{e}"
        );
    }

    #[test]
    fn flags_and_variables_beat_the_file_which_beats_the_defaults() {
        let file = FileConfig {
            node: Some("file-node:1".into()),
            identity: Some("/file/id".into()),
            known_hosts: Some("/file/kh".into()),
        };
        let default_kh = Some(PathBuf::from("/default/kh"));

        // Nothing given: the file's values.
        let s =
            Settings::resolve(Given::default(), file.clone(), None, default_kh.clone()).unwrap();
        assert_eq!(s.node, addr("file-node:1"));
        assert_eq!(s.identity, IdentityChoice::File("/file/id".into()));
        assert_eq!(s.known_hosts, PathBuf::from("/file/kh"));

        // Given by a flag or variable: those win, one by one.
        let given = Given {
            node: Some(addr("flag-node:2")),
            identity: None,
            known_hosts: Some("/flag/kh".into()),
        };
        let s = Settings::resolve(given, file, None, default_kh.clone()).unwrap();
        assert_eq!(s.node, addr("flag-node:2"));
        assert_eq!(s.identity, IdentityChoice::File("/file/id".into()));
        assert_eq!(s.known_hosts, PathBuf::from("/flag/kh"));

        // No file either: the defaults.
        let s =
            Settings::resolve(Given::default(), FileConfig::default(), None, default_kh).unwrap();
        assert_eq!(s.node, addr(DEFAULT_NODE));
        assert_eq!(s.identity, IdentityChoice::Auto);
        assert_eq!(s.known_hosts, PathBuf::from("/default/kh"));
        assert!(
            Settings::resolve(Given::default(), FileConfig::default(), None, None).is_err(),
            "no known_hosts anywhere"
        );
    }

    #[test]
    fn an_explicit_file_must_exist_and_the_default_one_may_not() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        let e = load(Some(&missing)).unwrap_err();
        assert!(
            format!("{e:#}").starts_with("cannot read the config file"),
            "{e:#}"
        );
        let present = dir.path().join("cli.toml");
        std::fs::write(&present, "node = \"h:9\"\nknown_hosts = \"kh\"\n").unwrap();
        let (file, path) = load(Some(&present)).unwrap();
        assert_eq!(file.node.as_deref(), Some("h:9"));
        assert_eq!(file.known_hosts, Some(dir.path().join("kh")));
        assert_eq!(path.as_deref(), Some(present.as_path()));
    }
}
