//! The SSH session with one node: connect with host-key pinning, authenticate, and run
//! protocol commands as exec requests (standard input in, standard output, standard
//! error and exit status out). See `docs/ssh-protocol.md`.

use crate::host_keys::{HostKey, HostKeyPolicy, HostKeyRefusal};
use crate::identity::{self, IdentityChoice};
use crate::node_addr::NodeAddr;
use anyhow::Context as _;
use russh::client::{self, Handle};
use russh::keys::{PublicKey, PublicKeyOrCertificate};
use russh::{Channel, ChannelMsg};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt as _;

/// How long connecting and the key exchange may take before we give up: long enough
/// for a loaded node across a WAN, short enough that a wrong address fails quickly.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Keepalive interval: a `wait` may sit silent for minutes, and NAT boxes drop idle
/// TCP connections after a few minutes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// Bytes handed to the channel writer per write. The writer splits further by the
/// peer's window and packet size; this bounds how much one write holds.
const STDIN_CHUNK_BYTES: usize = 256 * 1024;

/// Most bytes of standard output or error accepted from one command. The largest
/// legitimate answer is a raw output (16 MiB, `mesh_core::limits`) or a task listing;
/// this stops a misbehaving peer from exhausting memory.
const MAX_REPLY_BYTES: usize = 256 * 1024 * 1024;

/// Most bytes accepted for a snapshot (`Connection::exec_snapshot`). A snapshot is the
/// whole replicated state, task data included, which the node holds in memory: it can
/// outgrow [`MAX_REPLY_BYTES`], but hardly 4 GiB (and no 32-bit client holds more).
pub const MAX_SNAPSHOT_BYTES: usize = u32::MAX as usize;

/// How mesh-cli treats the node's host key.
#[derive(Debug, Clone)]
pub enum HostKeyMode {
    /// Continue only with a pinned key (every command but `pin`).
    Verify(Arc<HostKeyPolicy>),
    /// Record the key and stop before authentication (`pin`).
    Capture,
}

/// Why the SSH session ended. Host-key refusals are kept as they are, so the user
/// sees our message rather than russh's "Unknown server key".
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The transport or the SSH protocol failed.
    #[error(transparent)]
    Ssh(#[from] russh::Error),
    /// The host key is not the pinned one.
    #[error(transparent)]
    HostKey(#[from] HostKeyRefusal),
    /// The key was captured for `pin`; the session was stopped on purpose.
    #[error("host key captured")]
    Captured,
}

/// russh's callbacks for our side of the session.
pub struct ClientHandler {
    mode: HostKeyMode,
    presented: Arc<Mutex<Option<PublicKey>>>,
}

impl client::Handler for ClientHandler {
    type Error = SessionError;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, SessionError> {
        // For a certificate, the key that signed the exchange is the certified key.
        let key = key.public_key();
        *self.presented.lock().expect("host key slot poisoned") = Some(key.clone());
        match &self.mode {
            HostKeyMode::Capture => Err(SessionError::Captured),
            HostKeyMode::Verify(policy) => {
                let key =
                    HostKey::of(&key).map_err(|_| SessionError::Ssh(russh::Error::UnknownKey))?;
                policy.check(&key)?;
                Ok(true)
            }
        }
    }
}

/// What one command sent back.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
    /// Exit status, if the node sent one.
    pub exit_status: Option<u32>,
}

impl ExecOutput {
    /// The node's error line: the first non-empty line of standard error, else the
    /// `{"error": ..}` document on standard output.
    pub fn error_message(&self) -> Option<String> {
        let stderr = String::from_utf8_lossy(&self.stderr);
        let line = stderr
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(|l| {
                let l = l.strip_prefix("error:").unwrap_or(l).trim();
                l.to_string()
            });
        line.or_else(|| {
            serde_json::from_slice::<mesh_core::api::ErrorView>(&self.stdout)
                .ok()
                .map(|e| e.error)
        })
    }
}

/// An authenticated SSH session with one node. Each command runs on a channel of its
/// own, so several may run at once and one connection serves a whole `watch`.
pub struct Connection {
    handle: Handle<ClientHandler>,
    node: NodeAddr,
    user: String,
}

fn client_config() -> Arc<client::Config> {
    Arc::new(client::Config {
        keepalive_interval: Some(KEEPALIVE_INTERVAL),
        keepalive_max: 3,
        nodelay: true,
        ..Default::default()
    })
}

/// Bytes read from the node's socket at a time. russh reads each packet with two
/// `read_exact` calls (length, then body); through this buffer the packets the node
/// sent together cost one `recvfrom` instead of two each.
const READ_BUFFER: usize = 16 * 1024;

/// `russh::client::connect` with the socket's reads buffered.
async fn connect_buffered(
    node: &NodeAddr,
    handler: ClientHandler,
) -> Result<Handle<ClientHandler>, SessionError> {
    let socket = tokio::net::TcpStream::connect((node.host.as_str(), node.port))
        .await
        .map_err(|e| SessionError::Ssh(russh::Error::IO(e)))?;
    // Requests are small and answered one by one: Nagle's delay would hold them back.
    let _ = socket.set_nodelay(true);
    let stream = tokio::io::BufReader::with_capacity(READ_BUFFER, socket);
    client::connect_stream(client_config(), stream, handler).await
}

/// Connect and run the key exchange; also returns the host key the node presented,
/// whatever the verdict.
async fn connect_handle(
    node: &NodeAddr,
    mode: HostKeyMode,
) -> (anyhow::Result<Handle<ClientHandler>>, Option<PublicKey>) {
    let presented = Arc::new(Mutex::new(None));
    let handler = ClientHandler {
        mode,
        presented: presented.clone(),
    };
    let result = tokio::time::timeout(CONNECT_TIMEOUT, connect_buffered(node, handler)).await;
    let seen = presented.lock().expect("host key slot poisoned").clone();
    let result = match result {
        Err(_) => Err(anyhow::anyhow!(
            "no SSH answer from node {node} within {}s; check the address (--node, MESH_NODE or node in the config file) \
             and that mesh-node runs there",
            CONNECT_TIMEOUT.as_secs()
        )),
        Ok(Ok(handle)) => Ok(handle),
        Ok(Err(SessionError::HostKey(refusal))) => Err(refusal.into()),
        Ok(Err(SessionError::Captured)) => Err(SessionError::Captured.into()),
        Ok(Err(SessionError::Ssh(russh::Error::IO(e)))) => Err(anyhow::anyhow!(
            "cannot connect to node {node}: {e}; check the address (--node, MESH_NODE or node in the config file) and \
             that mesh-node runs there"
        )),
        Ok(Err(SessionError::Ssh(e))) => {
            Err(anyhow::anyhow!("SSH connection to node {node} failed: {e}"))
        }
    };
    (result, seen)
}

/// Connect to `node` only far enough to see its host key (for `pin`); nothing is
/// authenticated and no command runs.
pub async fn fetch_host_key(node: &NodeAddr) -> anyhow::Result<HostKey> {
    let (result, seen) = connect_handle(node, HostKeyMode::Capture).await;
    match result {
        // Cannot happen (Capture stops the handshake), but never leave a session open.
        Ok(handle) => {
            let _ = handle
                .disconnect(russh::Disconnect::ByApplication, "", "en")
                .await;
        }
        Err(e)
            if matches!(
                e.downcast_ref::<SessionError>(),
                Some(SessionError::Captured)
            ) => {}
        Err(e) => return Err(e),
    }
    match seen {
        Some(k) => HostKey::of(&k),
        None => Err(anyhow::anyhow!("node {node} did not present a host key")),
    }
}

impl Connection {
    /// Connect, check the host key against the pins, and authenticate.
    pub async fn open(
        node: &NodeAddr,
        policy: HostKeyPolicy,
        identity: &IdentityChoice,
    ) -> anyhow::Result<Connection> {
        let (handle, _) = connect_handle(node, HostKeyMode::Verify(Arc::new(policy))).await;
        let mut handle = handle?;
        let user = identity::authenticate(&mut handle, node, identity).await?;
        Ok(Connection {
            handle,
            node: node.clone(),
            user,
        })
    }

    /// The fingerprint of the key the node accepted: who the node thinks we are.
    pub fn user_fingerprint(&self) -> &str {
        &self.user
    }

    /// Run one protocol command (`COMMAND [ARGS] --json`) with an optional standard
    /// input body, sent in chunks while the answer is read, and collect the whole answer.
    pub async fn exec(&self, command: &str, stdin: Option<Vec<u8>>) -> anyhow::Result<ExecOutput> {
        self.exec_as(command, command, stdin).await
    }

    /// [`Connection::exec`], naming the command `shown` in every message: a command
    /// line that carries a secret (`join TOKEN`) must not end up in error output.
    pub async fn exec_as(
        &self,
        command: &str,
        shown: &str,
        stdin: Option<Vec<u8>>,
    ) -> anyhow::Result<ExecOutput> {
        self.exec_limited(command, shown, stdin, MAX_REPLY_BYTES)
            .await
    }

    /// Run `snapshot`, whose answer may be larger than any other (up to
    /// [`MAX_SNAPSHOT_BYTES`]).
    pub async fn exec_snapshot(&self, command: &str) -> anyhow::Result<ExecOutput> {
        self.exec_limited(command, command, None, MAX_SNAPSHOT_BYTES)
            .await
    }

    async fn exec_limited(
        &self,
        command: &str,
        shown: &str,
        stdin: Option<Vec<u8>>,
        max_reply_bytes: usize,
    ) -> anyhow::Result<ExecOutput> {
        let node = &self.node;
        let (mut reader, writer) = self.start(command, shown).await?.split();

        // Write standard input on its own tokio task: a large body must flow while the
        // answer is read, or both sides could wait on each other's window.
        let feeder = tokio::spawn(async move {
            if let Some(body) = stdin {
                let mut tx = writer.make_writer();
                for chunk in body.chunks(STDIN_CHUNK_BYTES) {
                    tx.write_all(chunk).await?;
                }
                tx.flush().await?;
            }
            writer.eof().await?;
            Ok::<_, anyhow::Error>(())
        });

        let mut out = ExecOutput::default();
        let mut refused = false;
        while let Some(msg) = reader.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    append(&mut out.stdout, &data, shown, max_reply_bytes)?
                }
                ChannelMsg::ExtendedData { data, ext: 1 } => {
                    append(&mut out.stderr, &data, shown, MAX_REPLY_BYTES)?
                }
                ChannelMsg::ExitStatus { exit_status } => out.exit_status = Some(exit_status),
                ChannelMsg::ExitSignal {
                    signal_name,
                    error_message,
                    ..
                } => {
                    append(
                        &mut out.stderr,
                        format!("killed by signal {signal_name:?}: {error_message}\n").as_bytes(),
                        shown,
                        MAX_REPLY_BYTES,
                    )?;
                }
                ChannelMsg::Failure => {
                    // The node refused the exec request itself; it may leave the channel open.
                    refused = true;
                    break;
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        let fed = if feeder.is_finished() {
            feeder.await.unwrap_or_else(|e| Err(anyhow::anyhow!("{e}")))
        } else {
            feeder.abort();
            Ok(())
        };
        if refused {
            anyhow::bail!(
                "node {node} refused to run '{shown}'; is it a mesh-node of the same version?"
            );
        }
        if out.exit_status.is_none() {
            if let Err(e) = fed {
                return Err(e.context(format!(
                    "sending the input of '{shown}' to node {node} failed"
                )));
            }
            let detail = out
                .error_message()
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            anyhow::bail!(
                "node {node} closed the session during '{shown}' without an exit status{detail}"
            );
        }
        Ok(out)
    }

    /// Start a command that exchanges lines while it runs (`submit-stream`): each
    /// [`LineStream::send`] line is answered by one line, read with
    /// [`LineStream::next_line`], on one channel.
    pub async fn open_lines(&self, command: &str) -> anyhow::Result<LineStream> {
        let (reader, writer) = self.start(command, command).await?.split();
        Ok(LineStream {
            reader,
            writer,
            received: Vec::new(),
            out: ExecOutput::default(),
            node: self.node.to_string(),
            command: command.to_string(),
        })
    }

    /// Open a session channel and send the exec request (`shown` names the command in
    /// errors).
    async fn start(&self, command: &str, shown: &str) -> anyhow::Result<Channel<client::Msg>> {
        let node = &self.node;
        let channel = self
            .handle
            .channel_open_session()
            .await
            .with_context(|| format!("node {node} refused to open a session channel"))?;
        channel
            .exec(true, command.as_bytes())
            .await
            .with_context(|| format!("cannot send the command '{shown}' to node {node}"))?;
        Ok(channel)
    }

    /// End the session politely.
    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
}

fn append(buf: &mut Vec<u8>, data: &[u8], command: &str, max: usize) -> anyhow::Result<()> {
    if buf.len() + data.len() > max {
        anyhow::bail!(
            "the answer to '{command}' is larger than {max} bytes; refusing to buffer more"
        );
    }
    buf.extend_from_slice(data);
    Ok(())
}

/// A running command whose standard input and output are lines (see
/// [`Connection::open_lines`]). A caller that sends ahead must keep fewer than 100
/// answers unread (russh's per-channel buffer, `channel_buffer_size`): past that the
/// session stops reading the connection, window adjustments included, and a `send`
/// waiting for window would wait forever.
pub struct LineStream {
    reader: russh::ChannelReadHalf,
    writer: russh::ChannelWriteHalf<client::Msg>,
    /// Standard output received and not yet returned as a line.
    received: Vec<u8>,
    /// Standard error, exit status.
    out: ExecOutput,
    node: String,
    command: String,
}

impl LineStream {
    /// Send one line (a newline is added).
    pub async fn send(&self, line: &[u8]) -> anyhow::Result<()> {
        let mut framed = Vec::with_capacity(line.len() + 1);
        framed.extend_from_slice(line);
        framed.push(b'\n');
        self.writer.data(&framed[..]).await.with_context(|| {
            format!(
                "cannot send a line of '{}' to node {}",
                self.command, self.node
            )
        })
    }

    /// The next line of standard output, without its newline; `None` once the command
    /// has ended (then [`LineStream::finish`] tells how).
    pub async fn next_line(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        loop {
            if let Some(end) = self.received.iter().position(|b| *b == b'\n') {
                let mut line: Vec<u8> = self.received.drain(..=end).collect();
                line.pop();
                return Ok(Some(line));
            }
            let Some(msg) = self.reader.wait().await else {
                return Ok(None);
            };
            match msg {
                ChannelMsg::Data { data } => {
                    append(&mut self.received, &data, &self.command, MAX_REPLY_BYTES)?
                }
                ChannelMsg::ExtendedData { data, ext: 1 } => {
                    append(&mut self.out.stderr, &data, &self.command, MAX_REPLY_BYTES)?
                }
                ChannelMsg::ExitStatus { exit_status } => self.out.exit_status = Some(exit_status),
                ChannelMsg::Failure => anyhow::bail!(
                    "node {} refused to run '{}'; is it a mesh-node of the same version?",
                    self.node,
                    self.command
                ),
                ChannelMsg::Close => return Ok(None),
                _ => {}
            }
        }
    }

    /// Close standard input, read what is left, and return the command's standard
    /// error, exit status and the output no line was read for.
    pub async fn finish(mut self) -> anyhow::Result<ExecOutput> {
        self.writer.eof().await.ok();
        let mut rest = Vec::new();
        while let Some(line) = self.next_line().await? {
            rest.extend_from_slice(&line);
            rest.push(b'\n');
        }
        rest.append(&mut self.received);
        let mut out = std::mem::take(&mut self.out);
        out.stdout = rest;
        if out.exit_status.is_none() {
            anyhow::bail!(
                "node {} closed the session during '{}' without an exit status",
                self.node,
                self.command
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_node::{self, Reply};
    use crate::host_keys;
    use mesh_core::Digest;

    const BIG: usize = 16 << 20;

    #[tokio::test]
    async fn pinning_then_large_bodies_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
        let node = fake_node::start(
            1,
            2,
            vec![
                ("submit --json", Reply::DigestOfStdin),
                ("result 1 --raw", Reply::ok(big.clone())),
                (
                    "task 9 --json",
                    Reply::error(1, "no task 9; list tasks with `mesh-cli tasks`"),
                ),
            ],
        )
        .await;
        let known_hosts = dir.path().join("known_hosts");
        let identity = IdentityChoice::File(node.user_key_file(dir.path()));

        // Unknown key: refused with our message, before authentication.
        let policy = HostKeyPolicy::load(&node.addr, &known_hosts).unwrap();
        let e = Connection::open(&node.addr, policy, &identity)
            .await
            .err()
            .unwrap()
            .to_string();
        let (addr, host_fp) = (&node.addr, &node.host_key.fingerprint);
        assert!(
            e.starts_with(&format!(
                "host key for {addr} is {host_fp} and is not pinned in"
            )),
            "{e}"
        );
        assert!(e.contains(&format!("pin {addr} {host_fp}")), "{e}");

        // Pin what the node presents, then connect.
        let presented = fetch_host_key(&node.addr).await.unwrap();
        assert_eq!(&presented.fingerprint, host_fp);
        host_keys::pin(&known_hosts, &node.addr, &presented).unwrap();
        let policy = HostKeyPolicy::load(&node.addr, &known_hosts).unwrap();
        let conn = Connection::open(&node.addr, policy, &identity)
            .await
            .unwrap();
        assert_eq!(
            conn.user_fingerprint(),
            identity::fingerprint_of(node.user_key.public_key()),
            "the connection knows which key the node accepted"
        );

        // A 9 MiB body on stdin arrives whole.
        let body: Vec<u8> = (0..9 << 20).map(|i| (i * 7 % 256) as u8).collect();
        let out = conn
            .exec("submit --json", Some(body.clone()))
            .await
            .unwrap();
        assert_eq!(out.exit_status, Some(0));
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            format!("{} {}", body.len(), Digest::of(&body).to_hex())
        );

        // 16 MiB of stdout are collected in full.
        let out = conn.exec("result 1 --raw", None).await.unwrap();
        assert_eq!(out.exit_status, Some(0));
        assert!(out.stdout == big, "16 MiB answer arrived intact");

        // An error reply: exit 1 and the message from stderr.
        let out = conn.exec("task 9 --json", None).await.unwrap();
        assert_eq!(out.exit_status, Some(1));
        assert_eq!(
            out.error_message().unwrap(),
            "no task 9; list tasks with `mesh-cli tasks`"
        );
        conn.close().await;
    }

    #[tokio::test]
    async fn changed_key_and_unknown_identity_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let node = fake_node::start(4, 5, vec![]).await;
        let known_hosts = dir.path().join("known_hosts");

        // Another key is pinned for this address: refused as a possible interception.
        let other = HostKey::of(fake_node::key(6).public_key()).unwrap();
        host_keys::pin(&known_hosts, &node.addr, &other).unwrap();
        let policy = HostKeyPolicy::load(&node.addr, &known_hosts).unwrap();
        let identity = IdentityChoice::File(node.user_key_file(dir.path()));
        let e = Connection::open(&node.addr, policy, &identity)
            .await
            .err()
            .unwrap()
            .to_string();
        let expected = format!(
            "host key for {} is {}, not the pinned {}",
            node.addr, node.host_key.fingerprint, other.fingerprint
        );
        assert!(e.starts_with(&expected), "{e}");

        // With the right pin, a key the node does not know is refused by name.
        std::fs::remove_file(&known_hosts).unwrap();
        host_keys::pin(&known_hosts, &node.addr, &node.host_key).unwrap();
        let stranger = fake_node::key_file(dir.path(), "stranger", &fake_node::key(7));
        let policy = HostKeyPolicy::load(&node.addr, &known_hosts).unwrap();
        let e = Connection::open(&node.addr, policy, &IdentityChoice::File(stranger.clone()))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with(&format!(
                "node {} did not accept the key in {}",
                node.addr,
                stranger.display()
            )),
            "{e}"
        );
        assert!(e.contains("refused by the node"), "{e}");
    }
}
