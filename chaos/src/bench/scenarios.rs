//! The measurements. Each starts a fresh cluster of real `mesh-node` processes on
//! loopback (in a temporary directory) and returns its figures.

use super::etcd::{self, EtcdCluster};
use super::load::{drive, LoadStats};
use super::mesh_load::{self, batch_op, connect_clients, submit_op};
use anyhow::{bail, Context, Result};
use mesh_chaos::{phase, Cluster, Node};
use serde::Serialize;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

/// Node flags for throughput runs: two slots (unused: the nodes are drained).
const NODE_ARGS: &[&str] = &["--slots", "2"];

/// Node flags for `join` and `footprint`, whose state must be in a snapshot with the
/// log before it purged, as a long-running mesh's is: the smallest snapshot interval,
/// since their fill is one Raft entry per ~1,000 tasks (~100 entries for 100,000),
/// far fewer than the default 20,000 (before session 25 neither ever took a snapshot:
/// the joiner caught up from the log, and the disk figure was the log's).
const COMPACTING_ARGS: &[&str] = &["--slots", "2", "--snapshot-every", "20"];

/// A cluster of `nodes` started with `args`, for load: every node drained, so that
/// submitted tasks queue and the run measures commits, not GPU work; returns it and
/// the leader's index.
pub fn load_cluster(
    dir: &std::path::Path,
    nodes: usize,
    args: &[&str],
) -> Result<(Cluster, usize)> {
    let mut cluster = Cluster::start(dir, nodes, args)?;
    let leader = cluster.leader().context("no leader")?;
    let cli = cluster.cli(leader);
    for i in 1..=nodes {
        let out = cli.run(&["drain", &i.to_string()]);
        if out.code != 0 {
            bail!("drain {i} failed: {}", out.stderr);
        }
    }
    Ok((cluster, leader))
}

/// `clients` sessions to node `target` (one user key each) running `op` for
/// `duration` (after the warm-up).
fn drive_mesh(
    rt: &Runtime,
    cluster: &Cluster,
    target: usize,
    clients: usize,
    duration: Duration,
    op: super::load::Op<mesh_cli::connection::Connection>,
) -> Result<LoadStats> {
    rt.block_on(async {
        let sessions = connect_clients(cluster, target, clients).await?;
        Ok(drive(sessions, duration, op).await)
    })
}

/// Runs `f` on a fresh drained `nodes` mesh (and its leader) after logging `what`.
fn on_loaded_cluster<T>(
    nodes: usize,
    what: String,
    f: impl FnOnce(&Cluster, usize) -> Result<T>,
) -> Result<T> {
    let dir = tempfile::tempdir()?;
    let (cluster, leader) = load_cluster(dir.path(), nodes, NODE_ARGS)?;
    phase(&what);
    f(&cluster, leader)
}

/// How a client sends its submits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitVia {
    /// One `submit` exec per task, each on a channel of its own (what `mesh-cli
    /// submit` does).
    Exec,
    /// Lines of one long-lived `submit-stream` per client.
    Stream,
}

/// Committed single submits from `clients` concurrent clients on a `nodes` mesh.
pub fn submit(
    rt: &Runtime,
    nodes: usize,
    clients: usize,
    duration: Duration,
    via: SubmitVia,
) -> Result<LoadStats> {
    let name = match via {
        SubmitVia::Exec => "submit",
        SubmitVia::Stream => "submit-stream",
    };
    let what = format!("{name}: {clients} client(s) on {nodes} node(s) for {duration:?}");
    on_loaded_cluster(nodes, what, |cluster, leader| {
        let term = || -> Result<u64> {
            let out = cluster.cli(leader).run(&["--json", "status"]);
            out.json()["term"].as_u64().context("no term in status")
        };
        let before = term()?;
        let mut stats = match via {
            SubmitVia::Exec => drive_mesh(rt, cluster, leader, clients, duration, submit_op("s"))?,
            SubmitVia::Stream => rt.block_on(async {
                let sessions = connect_clients(cluster, leader, clients).await?;
                let streams = mesh_load::open_streams(&sessions).await?;
                Ok::<_, anyhow::Error>(drive(streams, duration, mesh_load::stream_op("s")).await)
            })?,
        };
        // A saturated leader must keep its followers' election timers quiet.
        stats.elections = Some(term()? - before);
        Ok(stats)
    })
}

/// `status` requests (no Raft round): what the SSH protocol costs on its own.
pub fn status(rt: &Runtime, nodes: usize, clients: usize, duration: Duration) -> Result<LoadStats> {
    let what = format!("status: {clients} client(s) on {nodes} node(s) for {duration:?}");
    on_loaded_cluster(nodes, what, |cluster, leader| {
        drive_mesh(
            rt,
            cluster,
            leader,
            clients,
            duration,
            mesh_load::status_op(),
        )
    })
}

/// Committed tasks per second when each request is a `submit-batch` of `batch` tasks.
pub fn submit_batch(
    rt: &Runtime,
    nodes: usize,
    clients: usize,
    batch: usize,
    duration: Duration,
) -> Result<LoadStats> {
    let what = format!(
        "submit-batch: {clients} client(s) x {batch} tasks on {nodes} node(s) for {duration:?}"
    );
    on_loaded_cluster(nodes, what, |cluster, leader| {
        drive_mesh(rt, cluster, leader, clients, duration, batch_op("b", batch))
    })
}

/// etcd puts from `clients` concurrent clients on a 3-member cluster.
pub fn etcd_put(rt: &Runtime, clients: usize, duration: Duration) -> Result<(LoadStats, String)> {
    let dir = tempfile::tempdir()?;
    rt.block_on(async {
        let cluster = EtcdCluster::start(dir.path()).await?;
        let url = cluster.leader_url().await?;
        phase(&format!(
            "etcd put: {clients} client(s) on {} members for {duration:?}",
            etcd::MEMBERS
        ));
        let sessions = etcd::clients(&url, clients).await?;
        let stats = drive(sessions, duration, etcd::put_op()).await;
        Ok((stats, cluster.version.clone()))
    })
}

/// End to end: submit a tiny kernel and wait for its result to be recorded, from
/// `clients` clients; latency per task and tasks finished per second.
pub fn end_to_end(
    rt: &Runtime,
    nodes: usize,
    clients: usize,
    duration: Duration,
) -> Result<LoadStats> {
    let dir = tempfile::tempdir()?;
    let mut cluster = Cluster::start(dir.path(), nodes, NODE_ARGS)?;
    let leader = cluster.leader().context("no leader")?;
    phase(&format!(
        "end-to-end: {clients} client(s) on {nodes} node(s) for {duration:?}"
    ));
    drive_mesh(
        rt,
        &cluster,
        leader,
        clients,
        duration,
        mesh_load::end_to_end_op("e"),
    )
}

/// What `join` measured.
#[derive(Debug, Serialize)]
pub struct JoinFigures {
    /// Tasks in the state when the node joined.
    pub tasks: u64,
    /// `mesh-node --join` started to its ready line.
    pub ready_ms: f64,
    /// Started to its applied index reaching the leader's.
    pub caught_up_ms: f64,
    /// The leader's snapshot size (bytes of the state) at the time.
    pub state_bytes: u64,
}

/// Fill a 3-node mesh with `tasks` queued tasks, then time a fourth node joining and
/// catching up (from a snapshot: the log has been compacted long before).
pub fn join(rt: &Runtime, tasks: u64) -> Result<JoinFigures> {
    let dir = tempfile::tempdir()?;
    let (mut cluster, leader) = load_cluster(dir.path(), 3, COMPACTING_ARGS)?;
    phase(&format!("join: filling the state with {tasks} tasks"));
    fill(rt, &cluster, leader, tasks)?;
    snapshot_every_task(&mut cluster, leader, tasks)?;
    let token = cluster.token(1, "10m")?;
    let status = cluster.status(leader)?;
    let target = status["applied_index"]
        .as_u64()
        .context("no applied index")?;
    let state_bytes = cluster.cli(leader).run(&[
        "snapshot",
        "save",
        &dir.path().join("state.snap").display().to_string(),
    ]);
    if state_bytes.code != 0 {
        bail!("snapshot save failed: {}", state_bytes.stderr);
    }
    let state_bytes = std::fs::metadata(dir.path().join("state.snap"))?.len();
    phase("join: starting node 4");
    let start = Instant::now();
    let node = Node::start_with(
        &dir.path().join("node4"),
        &[&cluster.admin.public],
        &["--slots", "2", "--join", &token],
    )?;
    let ready_ms = start.elapsed().as_secs_f64() * 1000.0;
    cluster.nodes.push(node);
    let i = cluster.nodes.len() - 1;
    loop {
        if let Ok(s) = cluster.status(i) {
            if s["applied_index"].as_u64().is_some_and(|a| a >= target) {
                break;
            }
        }
        if start.elapsed() > Duration::from_secs(300) {
            bail!("node 4 did not catch up within 300 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if !cluster.nodes[i]
        .log()
        .contains("installed a snapshot from the leader")
    {
        bail!(
            "node 4 caught up without installing a snapshot: the scenario measured a log catch-up"
        );
    }
    Ok(JoinFigures {
        tasks,
        ready_ms,
        caught_up_ms: start.elapsed().as_secs_f64() * 1000.0,
        state_bytes,
    })
}

/// Submit `tasks` queued tasks in batches of 1000 from 4 clients.
fn fill(rt: &Runtime, cluster: &Cluster, leader: usize, tasks: u64) -> Result<()> {
    const BATCH: usize = 1000;
    rt.block_on(async {
        let sessions = connect_clients(cluster, leader, 4).await?;
        let op = batch_op("fill", BATCH);
        let rounds = tasks.div_ceil(BATCH as u64 * 4);
        let mut done = 0u64;
        for round in 0..rounds {
            let calls = sessions
                .iter()
                .enumerate()
                .map(|(i, c)| op(c.clone(), i, round));
            for r in futures::future::join_all(calls).await {
                done += r?;
            }
        }
        if done < tasks {
            bail!("only {done} of {tasks} tasks were committed");
        }
        Ok(())
    })
}

/// Wait until node `leader` has built a snapshot of at least `tasks` tasks (its log
/// says so); each snapshot purges the log before it. Nodes snapshot every
/// `--snapshot-every` entries, so the last entries of a fill may not be in one yet:
/// each join token created is one more entry and changes no task.
fn snapshot_every_task(cluster: &mut Cluster, leader: usize, tasks: u64) -> Result<()> {
    phase(&format!(
        "waiting for node {} to snapshot {tasks} tasks",
        leader + 1
    ));
    let start = Instant::now();
    while largest_snapshot(&cluster.nodes[leader].log()) < Some(tasks) {
        if start.elapsed() > Duration::from_secs(120) {
            bail!(
                "node {} built no snapshot of {tasks} tasks within 120 s",
                leader + 1
            );
        }
        cluster.token(1, "1m")?;
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The most tasks a snapshot held, from a node's `built a snapshot ... tasks=N` lines.
fn largest_snapshot(log: &str) -> Option<u64> {
    mesh_chaos::strip_ansi(log)
        .lines()
        .filter(|line| line.contains("built a snapshot"))
        .filter_map(|line| {
            let field = line
                .split_whitespace()
                .find_map(|f| f.strip_prefix("tasks="))?;
            field.parse().ok()
        })
        .max()
}

/// What `footprint` measured.
#[derive(Debug, Serialize)]
pub struct Footprint {
    /// Tasks added.
    pub tasks: u64,
    /// Leader resident memory growth per task, bytes.
    pub memory_per_task: f64,
    /// Data directory growth per task after compaction, bytes.
    pub disk_per_task: f64,
    /// Disk growth extrapolated to a million tasks, MiB.
    pub disk_per_million_mib: f64,
    /// Input bytes per task (the saxpy payload).
    pub payload_bytes: usize,
}

/// Memory and disk per task: the leader's RSS and data directory before and after
/// `tasks` queued tasks, after snapshots have compacted the log.
pub fn footprint(rt: &Runtime, tasks: u64) -> Result<Footprint> {
    let dir = tempfile::tempdir()?;
    let (mut cluster, leader) = load_cluster(dir.path(), 3, COMPACTING_ARGS)?;
    let pid = cluster.nodes[leader].pid().context("leader not running")?;
    let (rss0, disk0) = (rss_bytes(pid)?, dir_bytes(&cluster.nodes[leader].data_dir));
    phase(&format!("footprint: adding {tasks} tasks"));
    fill(rt, &cluster, leader, tasks)?;
    snapshot_every_task(&mut cluster, leader, tasks)?;
    // Let the log purge that follows the snapshot finish.
    std::thread::sleep(Duration::from_secs(5));
    let node = &cluster.nodes[leader];
    let (rss1, disk1) = (rss_bytes(pid)?, dir_bytes(&node.data_dir));
    let per = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / tasks as f64;
    let disk_per_task = per(disk0, disk1);
    Ok(Footprint {
        tasks,
        memory_per_task: per(rss0, rss1),
        disk_per_task,
        disk_per_million_mib: disk_per_task * 1e6 / (1024.0 * 1024.0),
        payload_bytes: mesh_load::PAYLOAD_BYTES,
    })
}

fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Kill the leader; time until a submit through a survivor is acknowledged
/// (committed). The survivor is asked over one in-process SSH session, so the figure
/// holds no process starts.
pub fn failover(rt: &Runtime, mut cluster: Cluster) -> Result<f64> {
    let leader = cluster.leader().context("no leader")?;
    let survivor = (0..cluster.nodes.len())
        .find(|i| *i != leader)
        .expect("3+ nodes");
    let conn = rt.block_on(mesh_load::open(&cluster, survivor, &cluster.admin.private))?;
    let submit = |key: String| -> Result<()> {
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), mesh_load::submit(&conn, key)).await
        })??;
        Ok(())
    };
    if let Err(e) = submit("warm-up".into()) {
        bail!("the cluster does not take submits before the fault: {e}");
    }
    let start = Instant::now();
    cluster.nodes[leader].kill9();
    for n in 1.. {
        match submit(format!("after-{n}")) {
            Ok(()) => break,
            Err(e) if start.elapsed() > Duration::from_secs(30) => {
                bail!("no submit committed within 30 s of the leader kill; last error: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    Ok(start.elapsed().as_secs_f64() * 1000.0)
}

/// Kill a worker while it runs a task; time until that task runs on another node.
pub fn reassign(mut cluster: Cluster) -> Result<f64> {
    let leader = cluster.leader().context("no leader")?;
    let cli = cluster.cli(leader);
    // Long tasks, one per node slot, so a non-leader worker holds one.
    let mut ids = Vec::new();
    for i in 0..cluster.nodes.len() {
        let out = cli.run(&[
            "--json",
            "submit",
            "--kernel",
            "mandelbrot",
            "--param",
            "width=1024",
            "--param",
            "height=1024",
            "--param",
            "max_iter=5000",
            "--idempotency-key",
            &format!("long-{i}"),
        ]);
        if out.code != 0 {
            bail!("submit failed: {}", out.stderr);
        }
        ids.push(out.json()["task"].to_string());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let (victim_task, victim_node) = loop {
        let found = ids.iter().find_map(|id| {
            let t = cli.run(&["--json", "task", id]).json();
            let node = t["node"].as_u64()? as usize;
            (t["state"] == "running" && node - 1 != leader).then(|| (id.clone(), node))
        });
        if let Some(f) = found {
            break f;
        }
        if Instant::now() > deadline {
            bail!("no task ran on a non-leader node");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let start = Instant::now();
    cluster.nodes[victim_node - 1].kill9();
    loop {
        let t = cli.run(&["--json", "task", &victim_task]).json();
        let moved = t["node"]
            .as_u64()
            .is_some_and(|n| n as usize != victim_node);
        if moved && (t["state"] == "running" || t["state"] == "succeeded") {
            return Ok(start.elapsed().as_secs_f64() * 1000.0);
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("task {victim_task} did not move within 30 s: {t}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_snapshot_is_read_from_the_node_log() {
        let log = "\x1b[2m2026-12-07T21:44:30.58Z\x1b[0m \x1b[32m INFO\x1b[0m mesh_node::store::state_machine: built a snapshot \x1b[3msnapshot\x1b[0m\x1b[2m=\x1b[0m1-114-1 \x1b[3mtasks\x1b[0m\x1b[2m=\x1b[0m18 bytes=6438752
2026-12-07T21:44:31Z INFO mesh_node::store::state_machine: installed a snapshot from the leader snapshot=1-114-1 bytes=6438752
2026-12-07T21:44:36Z INFO mesh_node::store::state_machine: built a snapshot snapshot=2-229-3 tasks=41 bytes=6722195 clone_ms=0 total_ms=71
2026-12-07T21:44:37Z INFO mesh_node::ssh::server: ssh exec command=tasks=99
";
        assert_eq!(largest_snapshot(log), Some(41));
        assert_eq!(largest_snapshot("no snapshot yet\n"), None);
    }
}
