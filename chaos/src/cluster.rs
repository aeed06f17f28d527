//! Real `mesh-node` and `mesh-cli` processes on loopback, each node with its own data
//! directory, user keys made by `ssh-keygen`: the launcher shared by the integration
//! tests, `mesh-chaos` and `mesh-bench`.
//!
//! The binaries are the workspace's own, found beside the running executable
//! (`target/debug/`, or `target/debug/deps/` for tests); build them first
//! (`cargo build --bins`).

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a node may take to print its ready line (first start probes the GPU).
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long one `mesh-cli` call made by the cluster's own polling may take: a paused
/// node can hold an SSH session open forever, and a poll must not hang with it.
const POLL_CLI_LIMIT: Duration = Duration::from_secs(20);

/// Where [`bin`] looks instead of next to the running executable (scripts/bench-ab
/// runs two builds of mesh-node under the same bench this way).
pub const BIN_DIR_ENV: &str = "MESH_BIN_DIR";

/// Path of a workspace binary: next to the running executable, or in `$MESH_BIN_DIR`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    // target/debug/deps/integration-xxxx or target/debug/mesh-bench -> target/debug/
    let mut dir = exe.parent().expect("target dir").to_path_buf();
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target dir").to_path_buf();
    }
    if let Some(chosen) = std::env::var_os(BIN_DIR_ENV) {
        dir = PathBuf::from(chosen);
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// A free loopback port (bound then released; good enough on a test machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Log a test phase, so a failing run shows how far it got.
pub fn phase(msg: &str) {
    eprintln!("--- {msg}");
}

/// An ed25519 user key made by OpenSSH's `ssh-keygen`.
pub struct UserKey {
    /// Private key file.
    pub private: PathBuf,
    /// Public key file.
    pub public: PathBuf,
}

impl UserKey {
    /// Generate `dir/name` and `dir/name.pub`.
    pub fn generate(dir: &Path, name: &str) -> Result<UserKey> {
        let private = dir.join(name);
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&private)
            .output()
            .context("ssh-keygen is needed (apt-get install openssh-client)")?;
        if !out.status.success() {
            bail!(
                "ssh-keygen failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(UserKey {
            public: private.with_extension("pub"),
            private,
        })
    }
}

/// A running `mesh-node` process.
pub struct Node {
    /// Data directory.
    pub data_dir: PathBuf,
    /// SSH port.
    pub ssh_port: u16,
    /// HTTP port.
    pub http_port: u16,
    /// Raft port.
    pub raft_port: u16,
    admin_keys: Vec<PathBuf>,
    extra_args: Vec<String>,
    /// The `mesh-node` executable; `None`: the workspace's own ([`bin`]).
    program: Option<PathBuf>,
    child: Option<Child>,
    /// Stopped with SIGSTOP and not continued since.
    paused: AtomicBool,
    /// The network namespace the node runs in and its address there (`mesh-chaos
    /// --netns`); `None`: the host's loopback.
    net: Option<NodeNet>,
    /// Worker threads of the node's async runtime ([`core_share`]); `None`: its default.
    /// Set as `TOKIO_WORKER_THREADS`, which every build honours, not as
    /// `--worker-threads`, which builds before it refuse (A/B runs start older ones).
    runtime_threads: Option<usize>,
}

/// Where a node runs in a [`crate::netns::NetnsLab`]: its namespace and address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeNet {
    /// Namespace name (`ip netns exec` takes it).
    pub namespace: String,
    /// The node's address inside the lab.
    pub addr: std::net::IpAddr,
}

/// A command for `program`, run inside the namespace of whichever lab node owns
/// `host` (the address part of a node address) or, for anything else, as it is.
fn command_for_host(program: impl AsRef<std::ffi::OsStr>, host: &str) -> Command {
    match host.parse().ok().and_then(crate::netns::namespace_of) {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &ns]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

impl Node {
    /// Start a node on fresh ports with `data_dir` and the given admin keys.
    pub fn start(data_dir: &Path, admin_keys: &[&Path]) -> Result<Node> {
        Node::start_with(data_dir, admin_keys, &[])
    }

    /// Start a node with extra `mesh-node run` arguments (e.g. `--join TOKEN`).
    pub fn start_with(data_dir: &Path, admin_keys: &[&Path], extra_args: &[&str]) -> Result<Node> {
        // Distinct ports, below the ephemeral range where possible: three separate
        // `free_port` calls once handed a new node's HTTP port that its seed was using.
        let ports = NodePorts::allocate(1)?.remove(0);
        let extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        Node::start_on(None, data_dir, ports, admin_keys, &extra_args)
    }

    /// Run `mesh-node run` with `extra_args` on fresh ports and expect it to exit
    /// before it is ready (a refused `--join`, a bad flag): returns its exit code and
    /// its log. Fails if the node became ready instead.
    pub fn start_refused(
        data_dir: &Path,
        admin_keys: &[&Path],
        extra_args: &[&str],
    ) -> Result<(i32, String)> {
        match Node::start_with(data_dir, admin_keys, extra_args) {
            Ok(node) => bail!(
                "mesh-node started although it should have been refused; log:\n{}",
                node.log()
            ),
            Err(e) => {
                let log = std::fs::read_to_string(data_dir.join("node.log")).unwrap_or_default();
                let text = e.to_string();
                // The message of `spawn` for an early exit: "mesh-node exited with exit status: N before ...".
                let code = text
                    .strip_prefix("mesh-node exited with exit status: ")
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|c| c.parse().ok())
                    .with_context(|| format!("mesh-node did not exit with a status: {text}"))?;
                Ok((code, log))
            }
        }
    }

    /// `HOST:RAFT_PORT`, the node-to-node address.
    pub fn raft_addr(&self) -> String {
        format!("{}:{}", self.host(), self.raft_port)
    }

    /// The address the node listens on: its lab address, or 127.0.0.1.
    pub fn host(&self) -> String {
        self.net
            .as_ref()
            .map_or("127.0.0.1".into(), |n| n.addr.to_string())
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Send a signal by name (`STOP`, `CONT`, `TERM`) with `kill(1)`. `STOP` marks the
    /// node paused (see [`Node::is_paused`]) until `CONT`.
    pub fn signal(&self, name: &str) -> Result<()> {
        let pid = self.pid().context("node is not running")?;
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{name} {pid} failed");
        }
        match name {
            "STOP" | "SIGSTOP" => self.paused.store(true, Ordering::SeqCst),
            "CONT" | "SIGCONT" => self.paused.store(false, Ordering::SeqCst),
            _ => {}
        }
        Ok(())
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Whether the process was stopped with `signal("STOP")` and not continued.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Running and not paused: a node that can answer a client.
    pub fn is_serving(&mut self) -> bool {
        !self.is_paused() && self.is_running()
    }

    /// The node id recorded in the data directory once the node is a member.
    pub fn id(&self) -> Option<u64> {
        std::fs::read_to_string(self.data_dir.join("node.id"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// `HOST:SSH_PORT`.
    pub fn ssh_addr(&self) -> String {
        format!("{}:{}", self.host(), self.ssh_port)
    }

    fn spawn(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.data_dir)?;
        // The log outlives restarts and wipes: an error quotes only what this start
        // wrote, so that an earlier start's refusal is never read as this one's.
        let log_start = std::fs::metadata(self.data_dir.join("node.log")).map_or(0, |m| m.len());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.join("node.log"))?;
        let program = self.program.clone().unwrap_or_else(|| bin("mesh-node"));
        // In a lab, `ip netns exec` execs mesh-node in the node's namespace: the
        // child's pid stays the node's, so signals reach it.
        let mut cmd = command_for_host(program, &self.host());
        cmd.arg("run")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--ssh-listen", &self.ssh_addr()])
            .args([
                "--http-listen",
                &format!("{}:{}", self.host(), self.http_port),
            ])
            .args(["--listen", &self.raft_addr()]);
        for k in &self.admin_keys {
            cmd.arg("--admin-key").arg(k);
        }
        cmd.args(&self.extra_args);
        if let Some(n) = self.runtime_threads {
            cmd.env("TOKIO_WORKER_THREADS", n.to_string());
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context("spawn mesh-node")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains(" ready: ") {
                    let _ = tx.send(line);
                }
            }
        });
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
                phase(&format!("node up: {line}"));
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().expect("spawned").try_wait()? {
                bail!(
                    "mesh-node exited with {status} before it was ready; its log:\n{}",
                    self.log_from(log_start)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "mesh-node not ready after {READY_TIMEOUT:?}; its log:\n{}",
                    self.log_from(log_start)
                );
            }
        }
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        self.log_from(0)
    }

    /// The node's log from byte `offset` on (what one start wrote).
    fn log_from(&self, offset: u64) -> String {
        read_from(&self.data_dir.join("node.log"), offset)
    }

    /// The last `lines` lines of the log, without terminal colour codes.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = strip_ansi(&self.log());
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGKILL the process (no shutdown, no flush) and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.paused.store(false, Ordering::SeqCst);
    }

    /// Start the process again on the same data directory and ports. A `--join`
    /// argument is dropped: the node already holds its id.
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        if let Some(i) = self.extra_args.iter().position(|a| a == "--join") {
            self.extra_args.drain(i..(i + 2).min(self.extra_args.len()));
        }
        self.spawn()
    }

    /// The host key fingerprint, from `mesh-node fingerprint`.
    pub fn fingerprint(&self) -> Result<String> {
        let out = Command::new(bin("mesh-node"))
            .arg("fingerprint")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .output()?;
        if !out.status.success() {
            bail!(
                "mesh-node fingerprint failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        NodePorts::release(&self.ports());
    }
}

/// The file at `path` from byte `offset` on, invalid UTF-8 replaced (a node's log may
/// end mid-character when it is killed); empty when the file is missing or shorter.
fn read_from(path: &Path, offset: u64) -> String {
    let all = std::fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset).unwrap_or(usize::MAX).min(all.len());
    String::from_utf8_lossy(&all[start..]).into_owned()
}

/// `text` without ANSI escape sequences (the node colours its log lines).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            // Parameters and intermediates, then one final byte in @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A `mesh-cli` configuration: identity, known_hosts, target node.
#[derive(Clone)]
pub struct Cli {
    /// `--node`.
    pub node: String,
    /// `--identity`.
    pub identity: PathBuf,
    /// `--known-hosts`.
    pub known_hosts: PathBuf,
}

/// The outcome of one `mesh-cli` run.
pub struct CliOutput {
    /// Exit code.
    pub code: i32,
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: String,
}

impl CliOutput {
    /// Standard output as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Standard output as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "mesh-cli printed no JSON ({e}); stdout: {} stderr: {}",
                self.text(),
                self.stderr
            )
        })
    }

    /// Panic unless it exited 0.
    pub fn ok(self) -> CliOutput {
        assert_eq!(
            self.code,
            0,
            "mesh-cli failed: {}\nstdout: {}",
            self.stderr,
            self.text()
        );
        self
    }
}

impl Cli {
    /// The host part of `node`.
    fn host(&self) -> &str {
        self.node
            .rsplit_once(':')
            .map_or(self.node.as_str(), |(h, _)| h)
    }

    /// Run `mesh-cli` with these global options and `args`.
    pub fn run(&self, args: &[&str]) -> CliOutput {
        let out: Output = command_for_host(bin("mesh-cli"), self.host())
            .arg("--node")
            .arg(&self.node)
            .arg("--identity")
            .arg(&self.identity)
            .arg("--known-hosts")
            .arg(&self.known_hosts)
            .args(args)
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .output()
            .expect("run mesh-cli");
        CliOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// [`Cli::run`], killed after `limit`: a node that is paused or cut off can keep an
    /// SSH session open forever. A run that was killed has code -1 and says so on stderr.
    pub fn run_within(&self, args: &[&str], limit: Duration) -> CliOutput {
        let mut cmd = command_for_host(bin("mesh-cli"), self.host());
        cmd.arg("--node")
            .arg(&self.node)
            .arg("--identity")
            .arg(&self.identity)
            .arg("--known-hosts")
            .arg(&self.known_hosts)
            .args(args);
        output_within(cmd, limit, &format!("mesh-cli {}", args.join(" ")))
    }
}

/// Deterministic pseudo-random f32s in [-1, 1) (an LCG; no dependency needed).
pub fn lcg_f32(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A mesh of real nodes on loopback: node 1 bootstraps, the others join with a token.
pub struct Cluster {
    /// The nodes; `nodes[i]` has node id `i + 1`.
    pub nodes: Vec<Node>,
    /// The admin key every node trusts.
    pub admin: UserKey,
    /// Where data, keys and known_hosts live.
    pub dir: PathBuf,
}

impl Cluster {
    /// Start `n` nodes with `extra` arguments each (e.g. `--voters 5`), joined with one
    /// token, and wait until every node is registered.
    pub fn start(dir: &Path, n: usize, extra: &[&str]) -> Result<Cluster> {
        Cluster::start_each(dir, &vec![extra; n])
    }

    /// A pinned client for node `i` (index into `nodes`).
    pub fn cli(&self, i: usize) -> Cli {
        let node = &self.nodes[i];
        let cli = Cli {
            node: node.ssh_addr(),
            identity: self.admin.private.clone(),
            known_hosts: self.dir.join(format!("known_hosts{}", i + 1)),
        };
        if !cli.known_hosts.exists() {
            if let Ok(fp) = node.fingerprint() {
                let _ = cli.run(&["pin", &node.ssh_addr(), &fp]);
            }
        }
        cli
    }

    /// A client for the first running node other than `except` (a node paused with
    /// `signal("STOP")` does not count: it would never answer).
    pub fn any_cli(&mut self, except: Option<usize>) -> Cli {
        let i = (0..self.nodes.len())
            .find(|i| Some(*i) != except && self.nodes[*i].is_serving())
            .expect("a running node");
        self.cli(i)
    }

    /// Indexes of the nodes that run and are not paused.
    pub fn serving(&mut self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].is_serving())
            .collect()
    }

    /// Poll `nodes --json` on any running node until `pred` holds.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let cli = self.any_cli(None);
            let out = cli.run_within(&["--json", "nodes"], POLL_CLI_LIMIT);
            if out.code == 0 {
                let v = out.json();
                if pred(&v) {
                    return Ok(v);
                }
                if Instant::now() > deadline {
                    bail!("condition not reached in {timeout:?}; last nodes: {v}");
                }
            } else if Instant::now() > deadline {
                bail!(
                    "condition not reached in {timeout:?}; last error: {}",
                    out.stderr
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The current leader's index into `nodes`, asking any running node.
    pub fn leader(&mut self) -> Option<usize> {
        let v = self
            .any_cli(None)
            .run_within(&["--json", "status"], POLL_CLI_LIMIT);
        (v.code == 0)
            .then(|| v.json()["leader"].as_u64())
            .flatten()
            .map(|id| id as usize - 1)
    }

    /// `status --json` of node `i`, or the error it answered with.
    pub fn status(&mut self, i: usize) -> Result<serde_json::Value> {
        let out = self
            .cli(i)
            .run_within(&["--json", "status"], POLL_CLI_LIMIT);
        if out.code != 0 {
            bail!("status on node {} failed: {}", i + 1, out.stderr.trim());
        }
        Ok(out.json())
    }

    /// The leader every serving node agrees on, confirmed by the leader itself (its
    /// own status says `leader`): `None` while an election runs or views differ.
    pub fn agreed_leader(&mut self) -> Option<usize> {
        let mut agreed = None;
        for i in self.serving() {
            let leader = self.status(i).ok()?["leader"].as_u64()? as usize - 1;
            if agreed.is_some_and(|l| l != leader) {
                return None;
            }
            agreed = Some(leader);
        }
        let leader = agreed?;
        (self.nodes.get_mut(leader)?.is_serving() && self.status(leader).ok()?["role"] == "leader")
            .then_some(leader)
    }

    /// Wait until the serving nodes agree on a leader for which `pred` holds.
    pub fn wait_leader(
        &mut self,
        timeout: Duration,
        pred: impl Fn(usize) -> bool,
    ) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.agreed_leader() {
                Some(l) if pred(l) => return Ok(l),
                seen => {
                    if Instant::now() > deadline {
                        bail!("no agreed leader of the kind wanted within {timeout:?} (last seen: {:?})", seen.map(|l| l + 1));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A join token for `uses` joins, valid for `ttl` (e.g. `10m`), created on a serving node.
    pub fn token(&mut self, uses: u32, ttl: &str) -> Result<String> {
        let out = self.any_cli(None).run_within(
            &[
                "--json",
                "token",
                "create",
                "--uses",
                &uses.to_string(),
                "--ttl",
                ttl,
            ],
            POLL_CLI_LIMIT,
        );
        if out.code != 0 {
            bail!("token create failed: {}", out.stderr);
        }
        Ok(out.json()["token"]
            .as_str()
            .context("no token in reply")?
            .to_string())
    }

    /// The tail of every node's log, for a failure report.
    pub fn log_tails(&self, lines: usize) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                format!(
                    "===== node{} ({}) last {lines} log lines =====\n{}\n",
                    i + 1,
                    n.data_dir.display(),
                    n.log_tail(lines)
                )
            })
            .collect()
    }
}

impl Node {
    /// Process ids of this node's supervised GPU worker processes (`mesh-node
    /// gpu-worker`, its direct children), read from `/proc`; empty when the node is
    /// not running. Lets a test show that a killed kernel's process really is gone.
    pub fn gpu_workers(&self) -> Vec<u32> {
        let Some(pid) = self.pid() else {
            return Vec::new();
        };
        let mut children = Vec::new();
        if let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in threads.flatten() {
                if let Ok(list) = std::fs::read_to_string(t.path().join("children")) {
                    children.extend(
                        list.split_whitespace()
                            .filter_map(|c| c.parse::<u32>().ok()),
                    );
                }
            }
        }
        children.sort_unstable();
        children.dedup();
        children.retain(|c| {
            std::fs::read(format!("/proc/{c}/cmdline"))
                .is_ok_and(|cmd| cmd.split(|b| *b == 0).any(|arg| arg == b"gpu-worker"))
        });
        children
    }
}

/// Whether a process with this id is alive (a zombie has exited and does not count).
pub fn process_exists(pid: u32) -> bool {
    // A zombie has exited; it only waits for its (possibly non-reaping) parent.
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        !s.lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'))
    })
}

impl Cluster {
    /// Like [`Cluster::start`], but node `i + 1` gets its own arguments `per_node[i]`
    /// (labels, slots, budgets differ per node). The voter count is read from the first
    /// node's `--voters` (default 3).
    pub fn start_each(dir: &Path, per_node: &[&[&str]]) -> Result<Cluster> {
        let ports = NodePorts::allocate(per_node.len())?;
        let per_node: Vec<Vec<String>> = per_node
            .iter()
            .map(|args| args.iter().map(|a| a.to_string()).collect())
            .collect();
        Cluster::start_on(dir, None, &ports, &per_node)
    }
}

/// The three ports of a node, chosen before it starts, so that every node's
/// `--peer-route` arguments (which name the peers' addresses) can be computed before
/// any node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePorts {
    /// SSH operator port.
    pub ssh: u16,
    /// HTTP port.
    pub http: u16,
    /// Node-to-node (Raft) port.
    pub raft: u16,
}

/// Lowest port [`NodePorts::allocate`] hands out.
const FIXED_PORT_MIN: u16 = 10_000;

/// Ports [`NodePorts::allocate`] handed out whose [`Node`] is not dropped yet, up or
/// down (tests in one binary run as threads of one process).
static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// The first port of the kernel's ephemeral range (`ip_local_port_range`).
fn ephemeral_min() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768)
}

impl NodePorts {
    /// Ports for `n` nodes, distinct and free now. They are taken below the kernel's
    /// ephemeral range (`ip_local_port_range`), so no later `bind(":0")` (a proxy
    /// listener, a client's outgoing connection) can take one before its node binds it.
    pub fn allocate(n: usize) -> Result<Vec<NodePorts>> {
        let ephemeral_min = ephemeral_min();
        let wanted = 3 * n;
        if ephemeral_min < FIXED_PORT_MIN + 1000 + wanted as u16 {
            // No room below the ephemeral range: fall back to released ephemeral ports,
            // kept out of other meshes by the same registry.
            let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
            let mut port = || loop {
                let port = free_port();
                if handed_out.insert(port) {
                    return port;
                }
            };
            let ports = (0..n).map(|_| NodePorts {
                ssh: port(),
                http: port(),
                raft: port(),
            });
            return Ok(ports.collect());
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        NodePorts::allocate_from(
            n,
            nanos ^ (u64::from(std::process::id()) << 20),
            ephemeral_min,
        )
    }

    /// [`NodePorts::allocate`], scanning from the `start`th port above
    /// [`FIXED_PORT_MIN`] (modulo the span) and wrapping around below `below`. Skips
    /// ports it cannot bind and ports it handed out before whose [`Node`] this process
    /// still has: a node killed by a test is down, its ports free, and a mesh another
    /// test starts at the same time must not take them (t30 once failed to restart a
    /// killed leader: "Address already in use"). Holding them bound instead would
    /// change the fault: a dead node's port must refuse connections, which the
    /// survivors' leader watch relies on.
    fn allocate_from(n: usize, start: u64, below: u16) -> Result<Vec<NodePorts>> {
        let span = u64::from(below - FIXED_PORT_MIN);
        let wanted = 3 * n;
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        // Hold every listener until all are chosen, so no port is handed out twice.
        let mut held = Vec::with_capacity(wanted);
        for step in 0..span {
            if held.len() == wanted {
                break;
            }
            let port = FIXED_PORT_MIN + ((start % span + step) % span) as u16;
            if handed_out.contains(&port) {
                continue;
            }
            if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
                held.push(l);
            }
        }
        if held.len() < wanted {
            bail!(
                "found only {} free loopback ports below {below}, {wanted} needed",
                held.len()
            );
        }
        let ports: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<Result<_, _>>()?;
        handed_out.extend(&ports);
        Ok(ports
            .chunks_exact(3)
            .map(|p| NodePorts {
                ssh: p[0],
                http: p[1],
                raft: p[2],
            })
            .collect())
    }

    /// Let [`NodePorts::allocate`] hand these ports out again (their node is gone).
    fn release(ports: &NodePorts) {
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        for port in [ports.ssh, ports.http, ports.raft] {
            handed_out.remove(&port);
        }
    }

    /// `127.0.0.1:RAFT`, the address peers dial.
    pub fn raft_addr(&self) -> String {
        format!("127.0.0.1:{}", self.raft)
    }
}

impl Node {
    /// Start a node on the given ports, with `program` as the `mesh-node` executable
    /// (`None`: the workspace's own) and extra `mesh-node run` arguments.
    pub fn start_on(
        program: Option<&Path>,
        data_dir: &Path,
        ports: NodePorts,
        admin_keys: &[&Path],
        extra_args: &[String],
    ) -> Result<Node> {
        Node::start_on_net(program, data_dir, ports, admin_keys, extra_args, None, None)
    }

    /// [`Node::start_on`] inside a lab namespace (`net`), or on loopback (`None`), with
    /// `runtime_threads` worker threads in its async runtime (`None`: its default).
    pub fn start_on_net(
        program: Option<&Path>,
        data_dir: &Path,
        ports: NodePorts,
        admin_keys: &[&Path],
        extra_args: &[String],
        net: Option<NodeNet>,
        runtime_threads: Option<usize>,
    ) -> Result<Node> {
        let mut node = Node {
            data_dir: data_dir.into(),
            ssh_port: ports.ssh,
            http_port: ports.http,
            raft_port: ports.raft,
            admin_keys: admin_keys.iter().map(|p| p.to_path_buf()).collect(),
            extra_args: extra_args.to_vec(),
            program: program.map(Path::to_path_buf),
            child: None,
            paused: AtomicBool::new(false),
            net,
            runtime_threads,
        };
        node.spawn()?;
        Ok(node)
    }

    /// The node's ports.
    pub fn ports(&self) -> NodePorts {
        NodePorts {
            ssh: self.ssh_port,
            http: self.http_port,
            raft: self.raft_port,
        }
    }

    /// SIGKILL the process if it runs, then start it again on the same data directory
    /// and ports with `--join TOKEN`: a machine whose data directory was wiped joins
    /// again as a new node.
    pub fn rejoin(&mut self, token: &str) -> Result<()> {
        self.kill9();
        if let Some(i) = self.extra_args.iter().position(|a| a == "--join") {
            self.extra_args.drain(i..(i + 2).min(self.extra_args.len()));
        }
        self.extra_args
            .extend(["--join".to_string(), token.to_string()]);
        self.spawn()
    }
}

/// Runtime threads for each of `nodes` nodes that share this machine: its cores divided
/// among them, as docs/operations.md advises (each node's runtime would otherwise start
/// one thread per core, and they would all compete for the same cores). `None` for one
/// node, which gets every core anyway.
pub fn core_share(nodes: usize) -> Option<usize> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (nodes > 1).then(|| (cores / nodes).max(1))
}

impl Cluster {
    /// Like [`Cluster::start_each`], on ports chosen beforehand ([`NodePorts::allocate`])
    /// and with `program` as the `mesh-node` executable (`None`: the workspace's own):
    /// node `i + 1` gets `ports[i]` and its own arguments `per_node[i]`.
    pub fn start_on(
        dir: &Path,
        program: Option<&Path>,
        ports: &[NodePorts],
        per_node: &[Vec<String>],
    ) -> Result<Cluster> {
        Cluster::start_on_nets(dir, program, ports, per_node, &[])
    }

    /// [`Cluster::start_on`] with node `i + 1` in the lab namespace `nets[i]` (an
    /// empty `nets`: every node on loopback).
    pub fn start_on_nets(
        dir: &Path,
        program: Option<&Path>,
        ports: &[NodePorts],
        per_node: &[Vec<String>],
        nets: &[NodeNet],
    ) -> Result<Cluster> {
        let n = per_node.len();
        let net = |i: usize| nets.get(i).cloned();
        if n == 0 || ports.len() != n {
            bail!(
                "start_on needs one set of ports per node ({} ports for {n} nodes)",
                ports.len()
            );
        }
        let threads = core_share(n);
        let admin = UserKey::generate(dir, "admin")?;
        let first = Node::start_on_net(
            program,
            &dir.join("node1"),
            ports[0],
            &[&admin.public],
            &per_node[0],
            net(0),
            threads,
        )?;
        let mut cluster = Cluster {
            nodes: vec![first],
            admin,
            dir: dir.into(),
        };
        if n > 1 {
            let token = cluster.token(n as u32 - 1, "10m")?;
            for (i, extra) in per_node.iter().enumerate().skip(1) {
                let mut args = extra.clone();
                args.extend(["--join".to_string(), token.clone()]);
                let node = Node::start_on_net(
                    program,
                    &dir.join(format!("node{}", i + 1)),
                    ports[i],
                    &[&cluster.admin.public],
                    &args,
                    net(i),
                    threads,
                )?;
                cluster.nodes.push(node);
            }
        }
        let target: usize = per_node[0]
            .iter()
            .position(|a| a == "--voters")
            .and_then(|i| per_node[0].get(i + 1))
            .map_or(3, |v| v.parse().unwrap_or(3));
        let mut voters = n.min(target);
        if voters.is_multiple_of(2) {
            voters -= 1;
        }
        cluster.wait_for(Duration::from_secs(60), |nodes| {
            nodes.as_array().is_some_and(|a| {
                a.len() >= n
                    && a.iter()
                        .filter(|x| x["role"] == "leader" || x["role"] == "follower")
                        .count()
                        == voters
            })
        })?;
        Ok(cluster)
    }
}

impl Cli {
    /// Run one raw command line on the node with OpenSSH (`ssh -p PORT 127.0.0.1
    /// COMMAND`), pinned by the same known_hosts file: for the node commands mesh-cli
    /// has no subcommand for (`digest`). Killed after `limit`, like [`Cli::run_within`].
    pub fn ssh_within(&self, command: &str, limit: Duration) -> CliOutput {
        let (host, port) = self
            .node
            .rsplit_once(':')
            .unwrap_or((self.node.as_str(), "7722"));
        let mut cmd = command_for_host("ssh", host);
        cmd.arg("-p")
            .arg(port)
            .arg("-i")
            .arg(&self.identity)
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args([
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=5",
                "-o",
                "LogLevel=ERROR",
            ])
            .arg(host)
            .arg(command);
        output_within(cmd, limit, command)
    }
}

/// Run `cmd` with piped output, killed after `limit` (code -1, said on stderr).
fn output_within(mut cmd: Command, limit: Duration, what: &str) -> CliOutput {
    let spawned = cmd
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            return CliOutput {
                code: -1,
                stdout: Vec::new(),
                stderr: format!("could not start {what:?}: {e}\n"),
            }
        }
    };
    let drain = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() <= deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let mut stderr = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
    let code = match status {
        Some(s) => s.code().unwrap_or(-1),
        None => {
            stderr.push_str(&format!(
                "{what:?} killed after {limit:?} without an answer\n"
            ));
            -1
        }
    };
    CliOutput {
        code,
        stdout,
        stderr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_handed_out_stay_taken_until_their_node_is_gone() {
        // Two scans from the same place: the first one's ports are free again (nothing
        // binds them), yet the second passes over them.
        let (start, below) = (u64::from(std::process::id()) * 7 % 5_000, ephemeral_min());
        let first = NodePorts::allocate_from(2, start, below).unwrap();
        let second = NodePorts::allocate_from(2, start, below).unwrap();
        let ports = |all: &[NodePorts]| -> Vec<u16> {
            all.iter().flat_map(|p| [p.ssh, p.http, p.raft]).collect()
        };
        for port in ports(&second) {
            assert!(
                !ports(&first).contains(&port),
                "port {port} handed out twice"
            );
        }
        // Released (their node dropped), the first ones are handed out again.
        for p in first.iter().chain(&second) {
            NodePorts::release(p);
        }
        let again = NodePorts::allocate_from(2, start, below).unwrap();
        again.iter().for_each(NodePorts::release);
        assert_eq!(again, first);
    }

    #[test]
    fn a_start_reads_only_what_it_wrote_to_the_log() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("node.log");
        std::fs::write(&log, "first start: refused by the guard\n").unwrap();
        let second_start = std::fs::metadata(&log).unwrap().len();
        let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(&mut file, b"second start: bind failed \xff\n").unwrap();
        assert_eq!(
            read_from(&log, second_start),
            "second start: bind failed \u{fffd}\n"
        );
        assert!(read_from(&log, 0).starts_with("first start"));
        assert_eq!(read_from(&log, u64::MAX), "");
        assert_eq!(read_from(&d.path().join("missing.log"), 0), "");
    }
}
