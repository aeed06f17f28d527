//! Node configuration: a TOML file (`--config`), `MESH_*` environment variables and
//! flags, in increasing precedence, checked once into the `NodeConfig` the runtime
//! takes. Every key of the file is a long flag name with `-` replaced by `_`; unknown
//! keys are errors.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default node-to-node address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7720";
/// Default SSH operator address.
pub const DEFAULT_SSH_LISTEN: &str = "127.0.0.1:7722";
/// Default HTTP address (loopback: metrics and health are not for the world).
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:7780";
/// Default task slots.
pub const DEFAULT_SLOTS: u32 = 1;
/// Default voter target.
pub const DEFAULT_VOTERS: usize = 3;
/// Default failure-detector timeout: a few missed heartbeats (every 250 ms).
pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_millis(1500);
/// Default delay before a down voter is replaced.
pub const DEFAULT_VOTER_REPLACE_AFTER: Duration = Duration::from_secs(10);
/// Default shortest Raft election timeout (each node draws one between this and twice it).
pub const DEFAULT_ELECTION_TIMEOUT: Duration = Duration::from_millis(150);
/// Default Raft log entries between two snapshots of the state.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 20_000;
/// Bounds of `snapshot_every`.
const SNAPSHOT_EVERY_RANGE: std::ops::RangeInclusive<u64> = 20..=10_000_000;

/// `mesh-node run` flags. Every flag can also be set by the environment variable
/// named in its help, or by the same key (with `_`) in the `--config` file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// TOML config file; flags and MESH_* variables override its keys.
    #[arg(long, env = "MESH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Data directory: Raft log, state, host key. Default: the user's data directory
    /// (`~/.local/share/mesh`).
    #[arg(long, env = "MESH_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Public key file (`.pub` or `authorized_keys` format) whose keys are the mesh's
    /// first admins; repeat for more files. Default: your own `~/.ssh/id_ed25519.pub`,
    /// created if you have none.
    #[arg(
        long = "admin-key",
        env = "MESH_ADMIN_KEYS",
        value_delimiter = ',',
        value_name = "FILE.pub"
    )]
    pub admin_keys: Vec<PathBuf>,

    /// Host key (OpenSSH ed25519 private key, e.g. /etc/ssh/ssh_host_ed25519_key).
    /// Default: `DIR/host_key`, generated on first start.
    #[arg(long, env = "MESH_HOST_KEY", value_name = "FILE")]
    pub host_key: Option<PathBuf>,

    /// Node-to-node (Raft, gRPC over mutual TLS) address; also the address peers use.
    /// Default: 127.0.0.1:7720.
    #[arg(long, env = "MESH_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// SSH operator endpoint (mesh-cli and OpenSSH connect here). Default: 127.0.0.1:7722.
    #[arg(long, env = "MESH_SSH_LISTEN", value_name = "ADDR")]
    pub ssh_listen: Option<SocketAddr>,

    /// HTTP endpoint for /metrics and /health/*. Default: 127.0.0.1:7780.
    #[arg(long, env = "MESH_HTTP_LISTEN", value_name = "ADDR")]
    pub http_listen: Option<SocketAddr>,

    /// Operator label for placement, KEY=VALUE; repeat for more.
    #[arg(
        long = "label",
        env = "MESH_LABELS",
        value_delimiter = ',',
        value_name = "KEY=VALUE"
    )]
    pub labels: Vec<String>,

    /// How many tasks this node runs at once (one GPU worker process each). Default: 1.
    #[arg(long, env = "MESH_SLOTS", value_name = "N")]
    pub slots: Option<u32>,

    /// Most bytes of GPU buffers one task may allocate on this node. Default: only the
    /// adapter's own limits apply.
    #[arg(long, env = "MESH_GPU_MEMORY_BUDGET", value_name = "BYTES")]
    pub gpu_memory_budget: Option<u64>,

    /// Threads of the node's async runtime (network, Raft, SSH; GPU work runs in
    /// worker processes of its own). Default: one per core, right for one node per
    /// machine; where several nodes share a machine, give each its share of the cores.
    #[arg(long, env = "MESH_WORKER_THREADS", value_name = "N")]
    pub worker_threads: Option<usize>,

    /// Join an existing mesh with a token from `mesh-cli token create` (first start only).
    #[arg(long, env = "MESH_JOIN", value_name = "TOKEN")]
    pub join: Option<String>,

    /// On first start, neither bootstrap a new mesh nor join one: wait for an admin to
    /// run `mesh-cli join TOKEN` against this node's SSH endpoint.
    #[arg(long, env = "MESH_AWAIT_JOIN", conflicts_with = "join")]
    pub await_join: bool,

    /// On first start, bootstrap a new mesh from a state saved with
    /// `mesh-cli snapshot save FILE` (disaster recovery).
    #[arg(long, env = "MESH_RESTORE", value_name = "FILE", conflicts_with_all = ["join", "await_join"])]
    pub restore: Option<PathBuf>,

    /// Number of voters the mesh keeps (1, 3 or 5; the others are learners). Default: 3.
    #[arg(long, env = "MESH_VOTERS", value_name = "N")]
    pub voters: Option<usize>,

    /// Silence after which the leader marks a node down and moves its tasks. Default: 1500ms.
    #[arg(long, env = "MESH_NODE_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    pub node_timeout: Option<Duration>,

    /// How long a voter may be down before a healthy learner replaces it. Default: 10s.
    #[arg(long, env = "MESH_VOTER_REPLACE_AFTER", value_parser = parse_duration, value_name = "DURATION")]
    pub voter_replace_after: Option<Duration>,

    /// Shortest Raft election timeout; each node draws its own between this and twice
    /// this. A follower that hears nothing from the leader for its timeout plus the
    /// leader's lease (twice this) starts an election, so a leader crash costs about
    /// 3-4x this. Shorter fails over faster but elects needlessly when a loaded
    /// machine stalls heartbeats that long. Use the same value on every node.
    /// Default: 150ms; at least 100ms (three heartbeats of 50ms).
    #[arg(long, env = "MESH_ELECTION_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    pub election_timeout: Option<Duration>,

    /// Raft log entries between two snapshots of the state. A snapshot writes the
    /// whole state to disk (seconds for 100,000 tasks) and lets the log before it go;
    /// fewer entries means a shorter log on disk and a faster restart, more means less
    /// snapshot work. Each node adds 5 % per its id modulo 8, so the members of a mesh
    /// do not snapshot together. Default: 20000; between 20 and 10000000.
    #[arg(long, env = "MESH_SNAPSHOT_EVERY", value_name = "ENTRIES")]
    pub snapshot_every: Option<u64>,

    /// Log format: `text` or `json`. Default: text.
    #[arg(long, env = "MESH_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,

    /// Fault injection (mesh-chaos): dial ADDR2 whenever a peer's address is ADDR1, so
    /// a proxy can sit on this node's outgoing links. Repeatable. Not for production.
    #[arg(
        long = "peer-route",
        env = "MESH_PEER_ROUTES",
        value_delimiter = ',',
        value_name = "ADDR1=ADDR2",
        hide = true
    )]
    pub peer_routes: Vec<String>,
}

/// The `--config` file: the same settings as the flags, every one optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// See `--admin-key` (a list of files).
    pub admin_keys: Option<Vec<PathBuf>>,
    /// See `--host-key`.
    pub host_key: Option<PathBuf>,
    /// See `--listen`.
    pub listen: Option<SocketAddr>,
    /// See `--ssh-listen`.
    pub ssh_listen: Option<SocketAddr>,
    /// See `--http-listen`.
    pub http_listen: Option<SocketAddr>,
    /// See `--label` (a table: `labels = { zone = "a" }`).
    pub labels: Option<BTreeMap<String, String>>,
    /// See `--slots`.
    pub slots: Option<u32>,
    /// See `--gpu-memory-budget`.
    pub gpu_memory_budget: Option<u64>,
    /// See `--worker-threads`.
    pub worker_threads: Option<usize>,
    /// See `--join`.
    pub join: Option<String>,
    /// See `--await-join`.
    pub await_join: Option<bool>,
    /// See `--restore`.
    pub restore: Option<PathBuf>,
    /// See `--voters`.
    pub voters: Option<usize>,
    /// See `--node-timeout` (`"1500ms"`).
    pub node_timeout: Option<String>,
    /// See `--voter-replace-after` (`"10s"`).
    pub voter_replace_after: Option<String>,
    /// See `--election-timeout` (`"150ms"`).
    pub election_timeout: Option<String>,
    /// See `--snapshot-every`.
    pub snapshot_every: Option<u64>,
    /// See `--log-format`.
    pub log_format: Option<String>,
}

impl FileConfig {
    /// Read and parse a config file.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })
    }
}

/// Checked configuration the runtime takes.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Data directory (created by `prepare`).
    pub data_dir: PathBuf,
    /// Admin key files (empty: use the invoking user's key).
    pub admin_keys: Vec<PathBuf>,
    /// Host key file, if given.
    pub host_key: Option<PathBuf>,
    /// Advertised node-to-node address.
    pub listen: SocketAddr,
    /// SSH listen address.
    pub ssh_listen: SocketAddr,
    /// HTTP listen address.
    pub http_listen: SocketAddr,
    /// Placement labels.
    pub labels: BTreeMap<String, String>,
    /// Concurrent task slots.
    pub slots: u32,
    /// Emit JSON logs.
    pub json_logs: bool,
    /// Per-task GPU buffer budget, bytes.
    pub gpu_memory_budget: Option<u64>,
    /// Threads of the async runtime (`None`: one per core).
    pub worker_threads: Option<usize>,
    /// Join token, if joining.
    pub join: Option<mesh_core::token::JoinToken>,
    /// Wait for `mesh-cli join` instead of bootstrapping.
    pub await_join: bool,
    /// A saved state to bootstrap from.
    pub restore: Option<PathBuf>,
    /// Target voter count.
    pub voters: usize,
    /// Failure detector timeout.
    pub node_timeout: Duration,
    /// Dial overrides for fault injection: peer address -> address to dial.
    pub peer_routes: BTreeMap<String, String>,
    /// Voter replacement delay.
    pub voter_replace_after: Duration,
    /// Shortest Raft election timeout (the longest is twice it).
    pub election_timeout: Duration,
    /// Raft log entries between two snapshots (before the per-node stagger).
    pub snapshot_every: u64,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    mesh_core::duration::parse_duration(s)
}

/// A setting that cannot work. Each message names the setting and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for a node config (unknown keys included).
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, from the TOML parser (names the key and line).
        message: String,
    },
    /// No data directory could be determined.
    #[error("no data_dir (--data-dir) given and no user data directory found; set one")]
    NoDataDir,
    /// A label is not KEY=VALUE.
    #[error("label '{0}' is not KEY=VALUE (for example --label zone=a)")]
    BadLabel(String),
    /// Zero slots.
    #[error("slots (--slots) must be at least 1")]
    ZeroSlots,
    /// Zero runtime threads.
    #[error("worker_threads (--worker-threads) must be at least 1; leave it out for one per core")]
    ZeroWorkerThreads,
    /// Unknown log format.
    #[error("log_format (--log-format) must be text or json, not '{0}'")]
    BadLogFormat(String),
    /// A duration does not parse.
    #[error("{key}: {message}")]
    BadDuration {
        /// The setting.
        key: &'static str,
        /// The parser's message.
        message: String,
    },
    /// The join token does not parse.
    #[error("join (--join): {0}")]
    BadToken(#[from] mesh_core::token::BadToken),
    /// Both ways to become a member at once.
    #[error("join, await_join and restore exclude each other: a node either joins, waits for `mesh-cli join`, or bootstraps")]
    Conflict,
    /// Even or out-of-range voter target.
    #[error("voters (--voters) must be 1, 3 or 5 (an odd quorum), not {0}")]
    BadVoters(usize),
    /// Node timeout too short to be meaningful.
    #[error("node_timeout (--node-timeout) must be at least 300ms")]
    NodeTimeout,
    /// Election timeout outside what heartbeats and openraft allow.
    #[error("election_timeout (--election-timeout) must be between 100ms (three 50ms heartbeats) and 10s, not {0:?}")]
    ElectionTimeout(Duration),
    /// Snapshot interval outside its bounds.
    #[error(
        "snapshot_every (--snapshot-every) must be between 20 and 10000000 log entries, not {0}"
    )]
    SnapshotEvery(u64),
    /// The data directory cannot be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl RunArgs {
    /// Merge flags and environment (these) over the config file, then defaults, and
    /// check every value. Touches nothing on disk.
    pub fn validate(self) -> Result<NodeConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let addr = |flag: Option<SocketAddr>, file: Option<SocketAddr>, default: &str| {
            flag.or(file)
                .unwrap_or_else(|| default.parse().expect("default addresses parse"))
        };
        let duration =
            |flag: Option<Duration>, file: Option<String>, key: &'static str, default: Duration| {
                match (flag, file) {
                    (Some(d), _) => Ok(d),
                    (None, Some(s)) => parse_duration(&s)
                        .map_err(|message| ConfigError::BadDuration { key, message }),
                    (None, None) => Ok(default),
                }
            };
        let data_dir = match self.data_dir.or(file.data_dir) {
            Some(d) => d,
            None => dirs::data_dir().ok_or(ConfigError::NoDataDir)?.join("mesh"),
        };
        let mut labels = file.labels.unwrap_or_default();
        for l in &self.labels {
            let (k, v) = l
                .split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| ConfigError::BadLabel(l.clone()))?;
            labels.insert(k.to_string(), v.to_string());
        }
        let slots = self.slots.or(file.slots).unwrap_or(DEFAULT_SLOTS);
        if slots == 0 {
            return Err(ConfigError::ZeroSlots);
        }
        let worker_threads = self.worker_threads.or(file.worker_threads);
        if worker_threads == Some(0) {
            return Err(ConfigError::ZeroWorkerThreads);
        }
        let json_logs = match self
            .log_format
            .or(file.log_format)
            .as_deref()
            .unwrap_or("text")
        {
            "text" => false,
            "json" => true,
            other => return Err(ConfigError::BadLogFormat(other.into())),
        };
        let join = self
            .join
            .or(file.join)
            .as_deref()
            .map(mesh_core::token::JoinToken::parse)
            .transpose()?;
        let await_join = self.await_join || file.await_join.unwrap_or(false);
        let restore = self.restore.or(file.restore);
        if [join.is_some(), await_join, restore.is_some()]
            .iter()
            .filter(|b| **b)
            .count()
            > 1
        {
            return Err(ConfigError::Conflict);
        }
        let voters = self.voters.or(file.voters).unwrap_or(DEFAULT_VOTERS);
        if ![1, 3, 5].contains(&voters) {
            return Err(ConfigError::BadVoters(voters));
        }
        let node_timeout = duration(
            self.node_timeout,
            file.node_timeout,
            "node_timeout",
            DEFAULT_NODE_TIMEOUT,
        )?;
        if node_timeout < Duration::from_millis(300) {
            return Err(ConfigError::NodeTimeout);
        }
        let election_timeout = duration(
            self.election_timeout,
            file.election_timeout,
            "election_timeout",
            DEFAULT_ELECTION_TIMEOUT,
        )?;
        if !(Duration::from_millis(100)..=Duration::from_secs(10)).contains(&election_timeout) {
            return Err(ConfigError::ElectionTimeout(election_timeout));
        }
        let snapshot_every = self
            .snapshot_every
            .or(file.snapshot_every)
            .unwrap_or(DEFAULT_SNAPSHOT_EVERY);
        if !SNAPSHOT_EVERY_RANGE.contains(&snapshot_every) {
            return Err(ConfigError::SnapshotEvery(snapshot_every));
        }
        let mut peer_routes = BTreeMap::new();
        for r in &self.peer_routes {
            let (from, to) = r
                .split_once('=')
                .ok_or_else(|| ConfigError::BadLabel(r.clone()))?;
            peer_routes.insert(from.to_string(), to.to_string());
        }
        Ok(NodeConfig {
            peer_routes,
            data_dir,
            admin_keys: if self.admin_keys.is_empty() {
                file.admin_keys.unwrap_or_default()
            } else {
                self.admin_keys
            },
            host_key: self.host_key.or(file.host_key),
            listen: addr(self.listen, file.listen, DEFAULT_LISTEN),
            ssh_listen: addr(self.ssh_listen, file.ssh_listen, DEFAULT_SSH_LISTEN),
            http_listen: addr(self.http_listen, file.http_listen, DEFAULT_HTTP_LISTEN),
            labels,
            slots,
            json_logs,
            gpu_memory_budget: self.gpu_memory_budget.or(file.gpu_memory_budget),
            worker_threads,
            join,
            await_join,
            restore,
            voters,
            node_timeout,
            election_timeout,
            snapshot_every,
            voter_replace_after: duration(
                self.voter_replace_after,
                file.voter_replace_after,
                "voter_replace_after",
                DEFAULT_VOTER_REPLACE_AFTER,
            )?,
        })
    }
}

impl NodeConfig {
    /// Create the data directory.
    pub fn prepare(&self) -> Result<(), ConfigError> {
        std::fs::create_dir_all(&self.data_dir).map_err(|source| ConfigError::DataDir {
            path: self.data_dir.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("node.toml");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn file_then_flags_then_defaults() {
        let (_d, p) = file("data_dir = \"/var/lib/mesh\"\nslots = 4\nlabels = { zone = \"a\" }\nnode_timeout = \"2s\"\nssh_listen = \"0.0.0.0:7722\"\n");
        let args = RunArgs {
            config: Some(p),
            slots: Some(2),
            labels: vec!["rack=7".into()],
            ..RunArgs::default()
        };
        let c = args.validate().unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/mesh"));
        assert_eq!(c.slots, 2, "a flag beats the file");
        assert_eq!(c.node_timeout, Duration::from_secs(2));
        assert_eq!(c.labels.len(), 2);
        assert_eq!(c.ssh_listen.to_string(), "0.0.0.0:7722");
        assert_eq!(c.http_listen.to_string(), DEFAULT_HTTP_LISTEN);
        assert_eq!(c.voters, DEFAULT_VOTERS);
        assert_eq!(c.election_timeout, DEFAULT_ELECTION_TIMEOUT);
    }

    /// `flags` validated over a config file holding `text`.
    fn with_file(text: &str, flags: RunArgs) -> Result<NodeConfig, ConfigError> {
        let (_d, p) = file(text);
        RunArgs {
            config: Some(p),
            ..flags
        }
        .validate()
    }

    fn error_of(text: &str) -> String {
        with_file(text, RunArgs::default()).unwrap_err().to_string()
    }

    #[test]
    fn election_timeout_comes_from_file_or_flag_and_is_bounded() {
        let text = "election_timeout = \"400ms\"\n";
        let c = with_file(text, RunArgs::default()).unwrap();
        assert_eq!(c.election_timeout, Duration::from_millis(400));
        let flag = RunArgs {
            election_timeout: Some(Duration::from_millis(250)),
            ..RunArgs::default()
        };
        let c = with_file(text, flag).unwrap();
        assert_eq!(
            c.election_timeout,
            Duration::from_millis(250),
            "a flag beats the file"
        );
        for bad in [Duration::from_millis(60), Duration::from_secs(11)] {
            let e = RunArgs {
                election_timeout: Some(bad),
                ..RunArgs::default()
            }
            .validate()
            .unwrap_err()
            .to_string();
            assert!(e.contains("election_timeout (--election-timeout)"), "{e}");
        }
    }

    #[test]
    fn snapshot_every_comes_from_file_or_flag_and_is_bounded() {
        assert_eq!(
            with_file("", RunArgs::default()).unwrap().snapshot_every,
            DEFAULT_SNAPSHOT_EVERY
        );
        let text = "snapshot_every = 500\n";
        assert_eq!(
            with_file(text, RunArgs::default()).unwrap().snapshot_every,
            500
        );
        let flag = RunArgs {
            snapshot_every: Some(50),
            ..RunArgs::default()
        };
        assert_eq!(with_file(text, flag).unwrap().snapshot_every, 50);
        for bad in [0, 19, 10_000_001] {
            let e = error_of(&format!("snapshot_every = {bad}\n"));
            assert!(e.contains("snapshot_every (--snapshot-every)"), "{e}");
        }
    }

    #[test]
    fn worker_threads_come_from_file_or_flag_and_are_at_least_one() {
        assert_eq!(
            with_file("", RunArgs::default()).unwrap().worker_threads,
            None,
            "one per core unless set"
        );
        let text = "worker_threads = 2\n";
        assert_eq!(
            with_file(text, RunArgs::default()).unwrap().worker_threads,
            Some(2)
        );
        let flag = RunArgs {
            worker_threads: Some(1),
            ..RunArgs::default()
        };
        assert_eq!(with_file(text, flag).unwrap().worker_threads, Some(1));
        let e = error_of("worker_threads = 0\n");
        assert!(e.contains("worker_threads (--worker-threads)"), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let e = error_of("slots = 1\nsloots = 2\n");
        assert!(e.contains("unknown field `sloots`"), "{e}");
        let e = error_of("voters = 4\n");
        assert!(e.contains("voters"), "{e}");
        let e = error_of("node_timeout = \"soon\"\n");
        assert!(e.contains("node_timeout"), "{e}");
        assert!(matches!(
            with_file("await_join = true\nrestore = \"x\"\n", RunArgs::default()),
            Err(ConfigError::Conflict)
        ));
    }
}
