//! Node configuration: flags and `MESH_*` environment variables, checked once into
//! the `NodeConfig` the runtime takes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Default SSH operator port.
pub const DEFAULT_SSH_PORT: u16 = 7722;

/// `mesh-node run` flags. Every flag can also be set by the environment variable named
/// in its help.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Data directory: Raft log, state, host key. Default: the user's data directory
    /// (`~/.local/share/mesh`).
    #[arg(long, env = "MESH_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Public key file (`.pub` or `authorized_keys` format) whose keys may operate
    /// this node; repeat for more files. Default: your own `~/.ssh/id_ed25519.pub`,
    /// created if you have none.
    #[arg(long = "admin-key", env = "MESH_ADMIN_KEYS", value_delimiter = ',', value_name = "FILE.pub")]
    pub admin_keys: Vec<PathBuf>,

    /// Host key (OpenSSH ed25519 private key, e.g. /etc/ssh/ssh_host_ed25519_key).
    /// Default: `DIR/host_key`, generated on first start.
    #[arg(long, env = "MESH_HOST_KEY", value_name = "FILE")]
    pub host_key: Option<PathBuf>,

    /// Node-to-node (Raft) address this node advertises to peers.
    #[arg(long, env = "MESH_LISTEN", default_value = "127.0.0.1:7720", value_name = "ADDR")]
    pub listen: SocketAddr,

    /// SSH operator endpoint (mesh-cli and OpenSSH connect here).
    #[arg(long, env = "MESH_SSH_LISTEN", default_value = "127.0.0.1:7722", value_name = "ADDR")]
    pub ssh_listen: SocketAddr,

    /// HTTP endpoint for /metrics and /health/*.
    #[arg(long, env = "MESH_HTTP_LISTEN", default_value = "127.0.0.1:7780", value_name = "ADDR")]
    pub http_listen: SocketAddr,

    /// Operator label for placement, KEY=VALUE; repeat for more.
    #[arg(long = "label", env = "MESH_LABELS", value_delimiter = ',', value_name = "KEY=VALUE")]
    pub labels: Vec<String>,

    /// How many tasks this node runs at once.
    #[arg(long, env = "MESH_SLOTS", default_value_t = 1, value_name = "N")]
    pub slots: u32,

    /// Most bytes of GPU buffers one task may allocate on this node (default: only the
    /// adapter's own limits apply).
    #[arg(long, env = "MESH_GPU_MEMORY_BUDGET", value_name = "BYTES")]
    pub gpu_memory_budget: Option<u64>,

    /// Join an existing mesh with a token from `mesh-cli token create` (first start only).
    #[arg(long, env = "MESH_JOIN", value_name = "TOKEN")]
    pub join: Option<String>,

    /// On first start, neither bootstrap a new mesh nor join one: wait for an admin to
    /// run `mesh-cli join TOKEN` against this node's SSH endpoint.
    #[arg(long, env = "MESH_AWAIT_JOIN", conflicts_with = "join")]
    pub await_join: bool,

    /// Number of voters the mesh keeps (3 or 5; the others are learners).
    #[arg(long, env = "MESH_VOTERS", default_value_t = 3, value_name = "N")]
    pub voters: usize,

    /// Silence after which the leader marks a node down and moves its tasks.
    #[arg(long, env = "MESH_NODE_TIMEOUT", default_value = "1500ms", value_parser = parse_duration, value_name = "DURATION")]
    pub node_timeout: Duration,

    /// How long a voter may be down before a healthy learner replaces it.
    #[arg(long, env = "MESH_VOTER_REPLACE_AFTER", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub voter_replace_after: Duration,

    /// Log format: `text` or `json`.
    #[arg(long, env = "MESH_LOG_FORMAT", default_value = "text", value_name = "FORMAT")]
    pub log_format: String,
}

/// Checked configuration the runtime takes.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Data directory (exists after `validate`).
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
    /// Join token, if joining.
    pub join: Option<mesh_core::token::JoinToken>,
    /// Wait for `mesh-cli join` instead of bootstrapping.
    pub await_join: bool,
    /// Target voter count.
    pub voters: usize,
    /// Failure detector timeout.
    pub node_timeout: Duration,
    /// Voter replacement delay.
    pub voter_replace_after: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    mesh_core::duration::parse_duration(s)
}

/// A flag value that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No data directory could be determined.
    #[error("no --data-dir given and no user data directory found; pass --data-dir DIR")]
    NoDataDir,
    /// A label is not KEY=VALUE.
    #[error("label '{0}' is not KEY=VALUE (for example --label zone=a)")]
    BadLabel(String),
    /// Zero slots.
    #[error("--slots must be at least 1")]
    ZeroSlots,
    /// Unknown log format.
    #[error("--log-format must be text or json, not '{0}'")]
    BadLogFormat(String),
    /// The join token does not parse.
    #[error("--join: {0}")]
    BadToken(#[from] mesh_core::token::BadToken),
    /// Even or out-of-range voter target.
    #[error("--voters must be 1, 3 or 5 (an odd quorum), not {0}")]
    BadVoters(usize),
    /// Node timeout too short to be meaningful.
    #[error("--node-timeout must be at least 300ms")]
    NodeTimeout,
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
    /// Check every value and create the data directory.
    pub fn validate(self) -> Result<NodeConfig, ConfigError> {
        let data_dir = match self.data_dir {
            Some(d) => d,
            None => dirs::data_dir().ok_or(ConfigError::NoDataDir)?.join("mesh"),
        };
        std::fs::create_dir_all(&data_dir).map_err(|source| ConfigError::DataDir { path: data_dir.clone(), source })?;
        let mut labels = BTreeMap::new();
        for l in &self.labels {
            let (k, v) = l.split_once('=').filter(|(k, _)| !k.is_empty()).ok_or_else(|| ConfigError::BadLabel(l.clone()))?;
            labels.insert(k.to_string(), v.to_string());
        }
        if self.slots == 0 {
            return Err(ConfigError::ZeroSlots);
        }
        let json_logs = match self.log_format.as_str() {
            "text" => false,
            "json" => true,
            other => return Err(ConfigError::BadLogFormat(other.into())),
        };
        let join = self.join.as_deref().map(mesh_core::token::JoinToken::parse).transpose()?;
        if ![1, 3, 5].contains(&self.voters) {
            return Err(ConfigError::BadVoters(self.voters));
        }
        if self.node_timeout < Duration::from_millis(300) {
            return Err(ConfigError::NodeTimeout);
        }
        Ok(NodeConfig {
            gpu_memory_budget: self.gpu_memory_budget,
            join,
            await_join: self.await_join,
            voters: self.voters,
            node_timeout: self.node_timeout,
            voter_replace_after: self.voter_replace_after,
            data_dir,
            admin_keys: self.admin_keys,
            host_key: self.host_key,
            listen: self.listen,
            ssh_listen: self.ssh_listen,
            http_listen: self.http_listen,
            labels,
            slots: self.slots,
            json_logs,
        })
    }
}
