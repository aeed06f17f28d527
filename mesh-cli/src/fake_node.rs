//! A stand-in for mesh-node's SSH endpoint in tests: a russh server that answers
//! scripted replies to exact command lines and records what it received.

use crate::host_keys::HostKey;
use crate::node_addr::NodeAddr;
use mesh_core::Digest;
use russh::keys::ssh_key::{private::Ed25519Keypair, LineEnding};
use russh::keys::{PrivateKey, PublicKey};
use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelId, MethodKind, MethodSet};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Every command line a fake node ran, with the standard input it came with.
pub type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// The answer to one command line.
#[derive(Clone)]
pub enum Reply {
    /// Fixed output and exit status.
    Fixed {
        /// Standard output.
        stdout: Vec<u8>,
        /// Standard error.
        stderr: String,
        /// Exit status.
        status: u32,
    },
    /// After standard input ends: `LEN SHA256` of what arrived, exit 0.
    DigestOfStdin,
    /// One reply per call, in order; the last one answers every later call.
    Sequence(Arc<Mutex<VecDeque<Reply>>>),
}

impl Reply {
    /// Exit 0 with this output.
    pub fn ok(stdout: impl Into<Vec<u8>>) -> Reply {
        Reply::Fixed {
            stdout: stdout.into(),
            stderr: String::new(),
            status: 0,
        }
    }

    /// Successive answers to the same command line (a task that moves on).
    pub fn sequence(replies: Vec<Reply>) -> Reply {
        assert!(!replies.is_empty(), "a sequence needs a reply");
        Reply::Sequence(Arc::new(Mutex::new(replies.into())))
    }

    /// The reply for this call: a sequence gives its next one.
    fn next(&self) -> Reply {
        match self {
            Reply::Sequence(queue) => {
                let mut queue = queue.lock().unwrap();
                if queue.len() > 1 {
                    queue.pop_front().unwrap()
                } else {
                    queue.front().unwrap().next()
                }
            }
            other => other.clone(),
        }
    }

    /// Exit `status` with an error line, as the protocol prescribes for `--json`.
    pub fn error(status: u32, message: &str) -> Reply {
        Reply::Fixed {
            stdout: serde_json::to_vec(&mesh_core::api::ErrorView {
                error: message.into(),
            })
            .unwrap(),
            stderr: format!("error: {message}\n"),
            status,
        }
    }
}

/// A running fake node.
pub struct FakeNode {
    /// Where it listens.
    pub addr: NodeAddr,
    /// Its host key.
    pub host_key: HostKey,
    /// The key it accepts.
    pub user_key: PrivateKey,
    /// Every command line with the standard input it came with.
    pub received: Received,
    /// How many SSH connections it accepted.
    pub connections: Arc<AtomicUsize>,
}

impl FakeNode {
    /// Write the accepted user key as an OpenSSH private key file.
    pub fn user_key_file(&self, dir: &Path) -> PathBuf {
        key_file(dir, "id_ed25519", &self.user_key)
    }
}

/// A deterministic ed25519 key.
pub fn key(seed: u8) -> PrivateKey {
    PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
}

/// Write a private key file.
pub fn key_file(dir: &Path, name: &str, key: &PrivateKey) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, key.to_openssh(LineEnding::LF).unwrap().as_bytes()).unwrap();
    path
}

/// Start a fake node with host key `key(host_seed)` that accepts `key(user_seed)`.
pub async fn start(host_seed: u8, user_seed: u8, script: Vec<(&str, Reply)>) -> FakeNode {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = NodeAddr {
        host: "127.0.0.1".into(),
        port: listener.local_addr().unwrap().port(),
    };
    let host = key(host_seed);
    let user_key = key(user_seed);
    let host_key = HostKey::of(host.public_key()).unwrap();
    let config = Arc::new(server::Config {
        keys: vec![host],
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(1),
        auth_rejection_time_initial: Some(Duration::ZERO),
        ..Default::default()
    });
    let script: Arc<HashMap<String, Reply>> = Arc::new(
        script
            .into_iter()
            .map(|(c, r)| (c.to_string(), r))
            .collect(),
    );
    let received = Arc::new(Mutex::new(Vec::new()));
    let (allowed, log) = (user_key.public_key().clone(), received.clone());
    let connections = Arc::new(AtomicUsize::new(0));
    let accepted = connections.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            let handler = FakeSession {
                allowed: allowed.clone(),
                script: script.clone(),
                received: log.clone(),
                commands: HashMap::new(),
                stdin: HashMap::new(),
            };
            let config = config.clone();
            tokio::spawn(async move {
                if let Ok(session) = server::run_stream(config, stream, handler).await {
                    let _ = session.await;
                }
            });
        }
    });
    FakeNode {
        addr,
        host_key,
        user_key,
        received,
        connections,
    }
}

/// One client connection.
struct FakeSession {
    allowed: PublicKey,
    script: Arc<HashMap<String, Reply>>,
    received: Received,
    commands: HashMap<ChannelId, String>,
    stdin: HashMap<ChannelId, Vec<u8>>,
}

impl FakeSession {
    fn send(&self, ch: ChannelId, reply: Reply, stdin: &[u8], session: &mut Session) {
        let (stdout, stderr, status) = match reply {
            Reply::Fixed {
                stdout,
                stderr,
                status,
            } => (stdout, stderr, status),
            Reply::DigestOfStdin => (
                format!("{} {}", stdin.len(), Digest::of(stdin).to_hex()).into_bytes(),
                String::new(),
                0,
            ),
            Reply::Sequence(_) => unreachable!("resolved by Reply::next"),
        };
        // Through the session handle, so that answers of any size respect the window.
        let handle = session.handle();
        tokio::spawn(async move {
            if !stderr.is_empty() {
                let _ = handle.extended_data(ch, 1, stderr.into_bytes()).await;
            }
            if !stdout.is_empty() {
                let _ = handle.data(ch, stdout).await;
            }
            let _ = handle.exit_status_request(ch, status).await;
            let _ = handle.eof(ch).await;
            let _ = handle.close(ch).await;
        });
    }
}

impl server::Handler for FakeSession {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if key.public_key.key_data() == self.allowed.key_data() {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        ch: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(ch)?;
        self.commands
            .insert(ch, String::from_utf8_lossy(data).to_string());
        Ok(())
    }

    async fn data(
        &mut self,
        ch: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.stdin.entry(ch).or_default().extend_from_slice(data);
        Ok(())
    }

    /// Answer once the client's input is complete, like `submit` does.
    async fn channel_eof(
        &mut self,
        ch: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = self.commands.get(&ch).cloned().unwrap_or_default();
        let stdin = self.stdin.remove(&ch).unwrap_or_default();
        self.received
            .lock()
            .unwrap()
            .push((command.clone(), stdin.clone()));
        let reply = self
            .script
            .get(&command)
            .map(Reply::next)
            .unwrap_or_else(|| {
                Reply::error(2, &format!("the fake node has no reply for '{command}'"))
            });
        self.send(ch, reply, &stdin, session);
        Ok(())
    }
}
