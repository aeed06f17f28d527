//! etcd side by side: a 3-member etcd cluster of real `etcd` processes (Debian's
//! `etcd-server`) on loopback, each with its own data directory (etcd fsyncs its WAL
//! per batch, as Mesh does), driven by the same closed-loop clients as Mesh with
//! durable puts of the same payload size, each client on its own HTTP/2 connection to
//! the leader.

use super::load::Op;
use super::mesh_load::PAYLOAD_BYTES;
use anyhow::{bail, Context, Result};
use mesh_chaos::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Generated client code for the slice of etcd's API in `chaos/proto`.
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

/// The etcd daemon, from PATH (Debian's `etcd-server` installs it as /usr/bin/etcd;
/// scripts/bench puts that binary in /usr/local/bin).
const ETCD_BIN: &str = "etcd";
/// Members of the cluster.
pub const MEMBERS: usize = 3;

/// A running etcd cluster; the processes are killed on drop.
pub struct EtcdCluster {
    children: Vec<Child>,
    /// Client URLs of the members.
    pub client_urls: Vec<String>,
    /// etcd's version line.
    pub version: String,
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The etcd executable, or how to get it.
pub fn etcd_version() -> Result<String> {
    let out = Command::new(ETCD_BIN).arg("--version").output().context(
        "etcd is not installed: `apt-get install etcd-server` (scripts/bench does it when run as root)",
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .next()
        .unwrap_or("etcd (unknown version)")
        .to_string())
}

impl EtcdCluster {
    /// Start `MEMBERS` members under `dir` and wait until a put succeeds.
    pub async fn start(dir: &Path) -> Result<EtcdCluster> {
        let version = etcd_version()?;
        let peers: Vec<(String, u16, u16)> = (1..=MEMBERS)
            .map(|i| (format!("m{i}"), free_port(), free_port()))
            .collect();
        let initial = peers
            .iter()
            .map(|(n, _, p)| format!("{n}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            children: Vec::new(),
            client_urls: Vec::new(),
            version,
        };
        for (name, client, peer) in &peers {
            let data: PathBuf = dir.join(format!("etcd-{name}"));
            let log = std::fs::File::create(dir.join(format!("etcd-{name}.log")))?;
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let child = Command::new(ETCD_BIN)
                .arg("--name")
                .arg(name)
                .arg("--data-dir")
                .arg(&data)
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "mesh-bench"])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("cannot start etcd")?;
            cluster.children.push(child);
            cluster.client_urls.push(client_url);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match cluster.leader_url().await {
                Ok(url) => {
                    let mut kv = pb::kv_client::KvClient::new(connect(&url).await?);
                    if kv.put(put_request(b"warm".to_vec())).await.is_ok() {
                        return Ok(cluster);
                    }
                }
                Err(e) if Instant::now() > deadline => {
                    bail!(
                        "etcd did not elect a leader within 30 s: {e:#} (logs in {})",
                        dir.display()
                    )
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The client URL of the current leader (from `Maintenance.Status`).
    pub async fn leader_url(&self) -> Result<String> {
        let mut ids = Vec::new();
        let mut leader = None;
        for url in &self.client_urls {
            let mut m = pb::maintenance_client::MaintenanceClient::new(connect(url).await?);
            let s = m.status(pb::StatusRequest {}).await?.into_inner();
            ids.push((s.header.map_or(0, |h| h.member_id), url.clone()));
            if s.leader != 0 {
                leader = Some(s.leader);
            }
        }
        let leader = leader.context("no etcd member knows a leader yet")?;
        ids.into_iter()
            .find(|(id, _)| *id == leader)
            .map(|(_, url)| url)
            .context("the leader named by etcd is not one of our members")
    }
}

/// A plaintext HTTP/2 channel to an etcd member.
pub async fn connect(url: &str) -> Result<Channel> {
    Channel::from_shared(url.to_string())?
        .connect()
        .await
        .with_context(|| format!("cannot connect to etcd at {url}"))
}

fn put_request(key: Vec<u8>) -> pb::PutRequest {
    pb::PutRequest {
        key,
        value: vec![0x5a; PAYLOAD_BYTES],
        ..Default::default()
    }
}

/// One client: its own connection.
pub struct EtcdClient {
    kv: pb::kv_client::KvClient<Channel>,
}

/// `n` clients, each with its own connection to `url`.
pub async fn clients(url: &str, n: usize) -> Result<Vec<Arc<EtcdClient>>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(Arc::new(EtcdClient {
            kv: pb::kv_client::KvClient::new(connect(url).await?),
        }));
    }
    Ok(out)
}

/// A durable put of `PAYLOAD_BYTES` under a unique key.
pub fn put_op() -> Op<EtcdClient> {
    Arc::new(|c: Arc<EtcdClient>, i, seq| {
        Box::pin(async move {
            let mut kv = c.kv.clone();
            kv.put(put_request(format!("bench/{i}/{seq}").into_bytes()))
                .await?;
            Ok(1)
        })
    })
}
