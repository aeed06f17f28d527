//! Mesh's side of the load: in-process SSH sessions (mesh-cli's own `Connection`), one
//! per client and each with its own user key, sending `submit` or `submit-batch`
//! exactly as `mesh-cli` does, minus a process start per request.

use super::load::Op;
use anyhow::{bail, Context, Result};
use mesh_chaos::{Cluster, UserKey};
use mesh_cli::connection::{Connection, LineStream};
use mesh_cli::host_keys::HostKeyPolicy;
use mesh_cli::identity::IdentityChoice;
use mesh_cli::node_addr::NodeAddr;
use mesh_core::api::{BatchItemReply, SubmitReply};
use mesh_core::task::TaskSpec;
use mesh_core::Bytes;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::Mutex;

/// Bytes of input per task: the payload size the etcd comparison puts.
pub const PAYLOAD_BYTES: usize = 1024;

/// A saxpy of `PAYLOAD_BYTES` of input (two vectors of 128 floats), keyed uniquely.
/// The inputs differ per key, as real tasks' do: the state machine stores equal
/// inputs once, and equal payloads would flatter the memory and disk figures.
pub fn tiny_spec(key: String) -> TaskSpec {
    let n = PAYLOAD_BYTES / 8;
    let salt = key
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    let vec = |seed: f32| -> Bytes {
        let floats: Vec<u8> = (0..n)
            .flat_map(|i| (seed + (salt % 100_000) as f32 + i as f32).to_le_bytes())
            .collect();
        floats.into()
    };
    TaskSpec {
        idempotency_key: Some(key),
        ..TaskSpec::builtin("saxpy", &[("a", "2")], [("x", vec(1.0)), ("y", vec(0.5))])
    }
}

/// Generate `n` user keys, register them as submitters (the per-key submit rate limit
/// is per client, as for real users), and open one session per key to node `target`.
pub async fn connect_clients(
    cluster: &Cluster,
    target: usize,
    n: usize,
) -> Result<Vec<Arc<Connection>>> {
    let keys_dir = cluster.dir.join("bench-keys");
    std::fs::create_dir_all(&keys_dir)?;
    let mut keys = Vec::new();
    let mut lines = String::new();
    for i in 0..n {
        let k = UserKey::generate(&keys_dir, &format!("client{i}"))?;
        lines.push_str(&std::fs::read_to_string(&k.public)?);
        keys.push(k);
    }
    let admin = open(cluster, target, &cluster.admin.private).await?;
    let out = admin
        .exec("keys add --role submitter --json", Some(lines.into_bytes()))
        .await?;
    if out.exit_status != Some(0) {
        bail!("keys add failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    admin.close().await;
    let mut clients = Vec::new();
    for k in &keys {
        clients.push(Arc::new(open(cluster, target, &k.private).await?));
    }
    Ok(clients)
}

/// An authenticated session to node `i` with the private key `identity`.
pub async fn open(cluster: &Cluster, i: usize, identity: &Path) -> Result<Connection> {
    let cli = cluster.cli(i);
    let addr: NodeAddr = cli.node.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let policy = HostKeyPolicy::load(&addr, &cli.known_hosts)?;
    Connection::open(&addr, policy, &IdentityChoice::File(identity.to_path_buf()))
        .await
        .with_context(|| format!("cannot open an SSH session to node {}", i + 1))
}

/// Run one protocol command; its standard output, or an error naming `what` failed.
async fn exec(conn: &Connection, command: &str, body: Option<Vec<u8>>) -> Result<Vec<u8>> {
    let out = conn.exec(command, body).await?;
    if out.exit_status != Some(0) {
        bail!("{command} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

/// Submit `tiny_spec(key)` and wait for the commit acknowledgement.
pub async fn submit(conn: &Connection, key: String) -> Result<SubmitReply> {
    let body = serde_json::to_vec(&tiny_spec(key))?;
    Ok(serde_json::from_slice(
        &exec(conn, "submit --json", Some(body)).await?,
    )?)
}

/// Submit one task per request and wait for the commit acknowledgement.
pub fn submit_op(run: &str) -> Op<Connection> {
    let run = run.to_string();
    Arc::new(move |c: Arc<Connection>, i, seq| {
        let key = format!("{run}-{i}-{seq}");
        Box::pin(async move {
            submit(&c, key).await?;
            Ok(1)
        })
    })
}

/// One `submit-stream --json` per session: each client's submits then go as lines
/// on one channel that stays open (no channel set-up per task). The sessions must
/// outlive the streams.
pub async fn open_streams(sessions: &[Arc<Connection>]) -> Result<Vec<Arc<Mutex<LineStream>>>> {
    let mut streams = Vec::new();
    for s in sessions {
        streams.push(Arc::new(Mutex::new(
            s.open_lines("submit-stream --json").await?,
        )));
    }
    Ok(streams)
}

/// Submit one task as a line of the client's `submit-stream` and wait for its answer
/// line (the commit acknowledgement).
pub fn stream_op(run: &str) -> Op<Mutex<LineStream>> {
    let run = run.to_string();
    Arc::new(move |c: Arc<Mutex<LineStream>>, i, seq| {
        let key = format!("{run}-{i}-{seq}");
        Box::pin(async move {
            let line = serde_json::to_vec(&tiny_spec(key))?;
            let mut stream = c.lock().await;
            stream.send(&line).await?;
            let answer = stream
                .next_line()
                .await?
                .context("the node ended submit-stream before answering")?;
            match serde_json::from_slice(&answer)? {
                BatchItemReply::Submitted(_) => Ok(1),
                BatchItemReply::Refused { error } => bail!("submit-stream refused a task: {error}"),
            }
        })
    })
}

/// Submit one tiny task per request and `wait` until its result is recorded.
pub fn end_to_end_op(run: &str) -> Op<Connection> {
    let run = run.to_string();
    Arc::new(move |c: Arc<Connection>, i, seq| {
        let key = format!("{run}-{i}-{seq}");
        Box::pin(async move {
            let r = submit(&c, key).await?;
            exec(&c, &format!("wait {} --json", r.task), None).await?;
            Ok(1)
        })
    })
}

/// Submit `batch` tasks per request with `submit-batch`.
pub fn batch_op(run: &str, batch: usize) -> Op<Connection> {
    let run = run.to_string();
    Arc::new(move |c: Arc<Connection>, i, seq| {
        let specs: Vec<TaskSpec> = (0..batch)
            .map(|k| tiny_spec(format!("{run}-{i}-{seq}-{k}")))
            .collect();
        Box::pin(async move {
            let body = serde_json::to_vec(&specs)?;
            let out = exec(&c, "submit-batch --json", Some(body)).await?;
            let replies: Vec<BatchItemReply> = serde_json::from_slice(&out)?;
            if let Some((k, BatchItemReply::Refused { error })) = replies
                .iter()
                .enumerate()
                .find(|(_, r)| matches!(r, BatchItemReply::Refused { .. }))
            {
                bail!("task {k} of the batch of {batch} was refused: {error}");
            }
            Ok(replies.len() as u64)
        })
    })
}

/// A read that involves no Raft round (`status`): the floor the SSH protocol sets.
pub fn status_op() -> Op<Connection> {
    Arc::new(|c: Arc<Connection>, _, _| {
        Box::pin(async move {
            exec(&c, "status --json", None).await?;
            Ok(1)
        })
    })
}
