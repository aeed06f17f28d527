//! `mesh-bench`: measurements on real `mesh-node` processes on loopback, driven
//! through the real SSH protocol (in-process sessions, one per client), side by side
//! with etcd. See docs/benchmarks.md for the figures on this machine and the command
//! behind each.

mod disk;
mod etcd;
mod load;
mod mesh_load;
mod plot;
mod scenarios;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use load::LoadStats;
use mesh_chaos::{phase, Cluster};
use scenarios::SubmitVia;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;
use tokio::runtime::Runtime;

/// Benchmarks of a Mesh cluster of real processes, side by side with etcd.
#[derive(Parser)]
#[command(
    name = "mesh-bench",
    version,
    after_help = "Examples:
  mesh-bench list
  mesh-bench run submit --nodes 3 --clients 1,16,256 --duration 30s
  mesh-bench run submit-batch --clients 4
  mesh-bench run failover --runs 5
  mesh-bench compare-etcd --clients 1,16,256
  mesh-bench run disk --duration 3s         what the disk allows one client, for any system
  mesh-bench all --out target/bench        every figure of docs/benchmarks.md, and the plot

Load runs are closed loops: each client sends its next request when the previous one
is acknowledged (committed). The first 2 s of each run are a warm-up and not counted.
Exit status: 0 done, 2 the benchmark could not run."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
struct LoadArgs {
    /// Nodes in the mesh (a list runs each).
    #[arg(long, value_delimiter = ',', default_value = "3")]
    nodes: Vec<usize>,
    /// Concurrent clients (a list runs each).
    #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
    clients: Vec<usize>,
    /// Measured time of each load run (after a 2 s warm-up).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// Independent runs of each point (a fresh cluster each); figures are min / median / max.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// List the scenarios.
    List,
    /// Run a scenario.
    Run {
        /// Scenario name (see `list`).
        scenario: String,
        #[command(flatten)]
        load: LoadArgs,
        /// Tasks per request for `submit-batch`; tasks in the state for `join` and `footprint`.
        #[arg(long)]
        size: Option<u64>,
    },
    /// etcd (3 members, Debian's etcd-server) and a 3-node mesh at the same client
    /// counts and payload: both systems' figures and the ratios, with Mesh's clients
    /// sending one `submit` exec per task and, again, lines of one `submit-stream`.
    /// The three take their runs in turn, so each Mesh run has an etcd run beside it
    /// (the "paired runs" column: the spread of those runs' ratios). The disk is
    /// measured before and after (`run disk`): where it takes one flush at a time it
    /// bounds one client's commits for both systems.
    CompareEtcd {
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Every figure of docs/benchmarks.md: writes results.json, tables.md and
    /// latency-throughput.svg to --out.
    All {
        /// Output directory.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// Measured time of each load run.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        duration: Duration,
        /// Runs of each point.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Tasks in the state for `join` and `footprint`.
        #[arg(long, default_value_t = 100_000)]
        tasks: u64,
    },
}

const SCENARIOS: &[(&str, &str)] = &[
    ("submit", "committed single submits (1 KiB of input each): throughput and p50/p99/p999 latency"),
    ("submit-stream", "the same submits as lines of one long-lived submit-stream channel per client"),
    ("submit-batch", "committed tasks per second when each request is a submit-batch of --size tasks (default 1000)"),
    ("status", "`status` requests, no Raft round: the floor the SSH protocol sets for a request"),
    ("end-to-end", "a tiny kernel from submit to its result recorded: latency and tasks per second"),
    ("failover", "leader SIGKILL to the first submit committed under the new leader"),
    ("reassign", "worker SIGKILL to its task running on another node"),
    ("join", "a new node joins a 3-node mesh holding --size tasks (default 100000) and catches up from a snapshot"),
    ("footprint", "leader memory and disk per task after --size tasks (default 100000), log compacted"),
    ("etcd", "etcd 3-member puts of the same payload (what compare-etcd runs for its side)"),
    ("disk", "durable 1 KiB appends from 1 and from 3 writers at once (--duration each, at most 5 s): the bound the disk sets on one client"),
];

/// How long `compare-etcd` and `all` measure the disk with each writer count, before
/// and after their load runs.
const DISK_EACH: Duration = Duration::from_secs(2);

/// The disk, measured where the clusters keep their data (the system's temporary
/// directory), with a phase line.
fn disk_now(when: &str, each: Duration) -> Result<disk::Disk> {
    let d = disk::measure(&std::env::temp_dir(), each)?;
    phase(&format!("{when}: {d}"));
    Ok(d)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    mesh_core::duration::parse_duration(s)
}

fn main() {
    let cli = Cli::parse();
    let result = Runtime::new()
        .context("cannot start the async runtime")
        .and_then(|rt| match cli.command {
            Cmd::List => {
                for (n, what) in SCENARIOS {
                    println!("{n:13} {what}");
                }
                Ok(())
            }
            Cmd::Run {
                scenario,
                load,
                size,
            } => run(&rt, &scenario, &load, size),
            Cmd::CompareEtcd { load } => compare_etcd(&rt, &load),
            Cmd::All {
                out,
                duration,
                runs,
                tasks,
            } => all(&rt, &out, duration, runs, tasks),
        });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

/// Min, median and max of samples.
#[derive(Debug, Clone, Serialize)]
struct Spread {
    min: f64,
    median: f64,
    max: f64,
}

impl Spread {
    fn of(samples: &[f64]) -> Spread {
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        Spread {
            min: v.first().copied().unwrap_or(0.0),
            median: v.get(v.len() / 2).copied().unwrap_or(0.0),
            max: v.last().copied().unwrap_or(0.0),
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = |v: f64| {
            if v >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        };
        if self.min == self.max {
            write!(f, "{}", p(self.median))
        } else {
            write!(f, "{} ({}-{})", p(self.median), p(self.min), p(self.max))
        }
    }
}

/// One load point over its runs.
#[derive(Debug, Clone, Serialize)]
struct Point {
    system: String,
    scenario: String,
    nodes: usize,
    clients: usize,
    ops_per_sec: Spread,
    p50_ms: Spread,
    p99_ms: Spread,
    p999_ms: Spread,
    errors: u64,
    /// Elections during the runs (submit only).
    elections: Option<u64>,
    runs: Vec<LoadStats>,
}

impl Point {
    fn of(
        system: &str,
        scenario: &str,
        nodes: usize,
        clients: usize,
        runs: Vec<LoadStats>,
    ) -> Point {
        let f = |g: fn(&LoadStats) -> f64| Spread::of(&runs.iter().map(g).collect::<Vec<_>>());
        Point {
            system: system.into(),
            scenario: scenario.into(),
            nodes,
            clients,
            ops_per_sec: f(|s| s.ops_per_sec),
            p50_ms: f(|s| s.p50_ms),
            p99_ms: f(|s| s.p99_ms),
            p999_ms: f(|s| s.p999_ms),
            errors: runs.iter().map(|s| s.errors).sum(),
            elections: runs.iter().map(|s| s.elections).sum(),
            runs,
        }
    }

    fn line(&self) -> String {
        let err = self
            .runs
            .iter()
            .find_map(|r| r.first_error.clone())
            .map(|e| format!("; first error: {e}"))
            .unwrap_or_default();
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |{err}",
            self.system,
            self.scenario,
            self.nodes,
            self.clients,
            self.ops_per_sec,
            self.p50_ms,
            self.p99_ms,
            self.p999_ms,
            self.errors,
            self.elections.map_or("-".into(), |e| e.to_string())
        )
    }
}

const TABLE_HEAD: &str = "| system | scenario | nodes | clients | ops/s | p50 ms | p99 ms | p999 ms | errors | elections |\n|---|---|---|---|---|---|---|---|---|---|";

fn load_points(
    rt: &Runtime,
    scenario: &str,
    a: &LoadArgs,
    size: Option<u64>,
) -> Result<Vec<Point>> {
    let mut points = Vec::new();
    for &nodes in &a.nodes {
        // etcd runs its own 3 members whatever --nodes says.
        let nodes = if scenario == "etcd" {
            etcd::MEMBERS
        } else {
            nodes
        };
        for &clients in &a.clients {
            let runs = (0..a.runs)
                .map(|_| load_run(rt, scenario, nodes, clients, a.duration, size))
                .collect::<Result<Vec<_>>>()?;
            let system = if scenario == "etcd" { "etcd" } else { "mesh" };
            points.push(Point::of(system, scenario, nodes, clients, runs));
        }
        if scenario == "etcd" {
            break;
        }
    }
    Ok(points)
}

/// One run of a load scenario on a fresh cluster.
fn load_run(
    rt: &Runtime,
    scenario: &str,
    nodes: usize,
    clients: usize,
    duration: Duration,
    size: Option<u64>,
) -> Result<LoadStats> {
    let s = match scenario {
        "submit" => scenarios::submit(rt, nodes, clients, duration, SubmitVia::Exec)?,
        "submit-stream" => scenarios::submit(rt, nodes, clients, duration, SubmitVia::Stream)?,
        "submit-batch" => {
            scenarios::submit_batch(rt, nodes, clients, size.unwrap_or(1000) as usize, duration)?
        }
        "end-to-end" => scenarios::end_to_end(rt, nodes, clients, duration)?,
        "status" => scenarios::status(rt, nodes, clients, duration)?,
        "etcd" => scenarios::etcd_put(rt, clients, duration)?.0,
        other => bail!("unknown load scenario '{other}'"),
    };
    phase(&format!(
        "{scenario} nodes={nodes} clients={clients}: {:.0} ops/s, p50 {:.2} ms, p99 {:.2} ms, errors {}",
        s.ops_per_sec, s.p50_ms, s.p99_ms, s.errors
    ));
    Ok(s)
}

/// Mesh by `submit` and by `submit-stream` on 3 nodes, and etcd, at each client count,
/// their runs taken in turn (Mesh, Mesh, etcd, then again): the load of this shared
/// machine drifts over minutes, and runs taken together meet the same drift, so run
/// N of Mesh and run N of etcd make a fair pair (see `Ratio::paired`).
fn side_by_side(rt: &Runtime, a: &LoadArgs) -> Result<[Vec<Point>; 3]> {
    const SIDES: [(&str, &str, usize); 3] = [
        ("mesh", "submit", 3),
        ("mesh", "submit-stream", 3),
        ("etcd", "etcd", etcd::MEMBERS),
    ];
    let mut points: [Vec<Point>; 3] = Default::default();
    for &clients in &a.clients {
        let mut runs: [Vec<LoadStats>; 3] = Default::default();
        for _ in 0..a.runs {
            for (side, &(_, scenario, nodes)) in SIDES.iter().enumerate() {
                runs[side].push(load_run(rt, scenario, nodes, clients, a.duration, None)?);
            }
        }
        for (side, runs) in runs.into_iter().enumerate() {
            let (system, scenario, nodes) = SIDES[side];
            points[side].push(Point::of(system, scenario, nodes, clients, runs));
        }
    }
    Ok(points)
}

fn print_points(points: &[Point], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(points)?);
    } else {
        println!("{TABLE_HEAD}");
        for p in points {
            println!("{}", p.line());
        }
    }
    Ok(())
}

fn run(rt: &Runtime, scenario: &str, a: &LoadArgs, size: Option<u64>) -> Result<()> {
    match scenario {
        "submit" | "submit-stream" | "submit-batch" | "end-to-end" | "etcd" | "status" => {
            let mut a = a.clone();
            if scenario == "end-to-end" && a.clients == [1, 16, 256] {
                a.clients = vec![1, 16];
            }
            if scenario == "submit-batch" && a.clients == [1, 16, 256] {
                a.clients = vec![4];
            }
            print_points(&load_points(rt, scenario, &a, size)?, a.json)
        }
        "failover" | "reassign" => {
            let nodes = a.nodes[0];
            let spread = timed(rt, scenario, nodes, a.runs.max(1))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&spread)?);
            } else {
                println!(
                    "{scenario} on {nodes} nodes over {} runs: median {:.0} ms, min {:.0} ms, max {:.0} ms",
                    spread.1.len(),
                    spread.0.median,
                    spread.0.min,
                    spread.0.max
                );
            }
            Ok(())
        }
        "join" => {
            let f = scenarios::join(rt, size.unwrap_or(100_000))?;
            println!("{}", serde_json::to_string_pretty(&f)?);
            Ok(())
        }
        "footprint" => {
            let f = scenarios::footprint(rt, size.unwrap_or(100_000))?;
            println!("{}", serde_json::to_string_pretty(&f)?);
            Ok(())
        }
        "disk" => {
            let d = disk_now("disk", a.duration.min(Duration::from_secs(5)))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                println!("disk: {d}");
            }
            Ok(())
        }
        other => bail!("unknown scenario '{other}'; `mesh-bench list` shows them"),
    }
}

/// `failover` or `reassign` over `runs` fresh clusters: milliseconds.
fn timed(rt: &Runtime, scenario: &str, nodes: usize, runs: usize) -> Result<(Spread, Vec<f64>)> {
    if nodes < 3 {
        bail!("--nodes must be at least 3: a failover needs a surviving majority");
    }
    let mut samples = Vec::new();
    for r in 1..=runs {
        let dir = tempfile::tempdir()?;
        // Two slots per node: a moved task finds a free slot at once, so `reassign`
        // measures detection and placement, not waiting for other work to finish.
        let cluster = Cluster::start(dir.path(), nodes, &["--slots", "2"])?;
        let ms = match scenario {
            "failover" => scenarios::failover(rt, cluster)?,
            _ => scenarios::reassign(cluster)?,
        };
        phase(&format!("{scenario} run {r}: {ms:.0} ms"));
        samples.push(ms);
    }
    Ok((Spread::of(&samples), samples))
}

/// The ratios compare-etcd reports for one client count.
#[derive(Debug, Serialize)]
struct Ratio {
    /// How Mesh's clients submitted: `submit` or `submit-stream`.
    mesh: String,
    clients: usize,
    /// Of the medians.
    throughput_ratio: f64,
    /// Of the medians.
    p99_ratio: f64,
    /// Throughput of each Mesh run over that of the etcd run taken beside it
    /// (`side_by_side`): how far the ratio moves with the machine's drift.
    paired: Spread,
}

/// Mesh's figures over etcd's at the same client count, for each of Mesh's points
/// (by `submit` and by `submit-stream` alike).
fn ratios(mesh: &[Point], etcd: &[Point]) -> Vec<Ratio> {
    mesh.iter()
        .filter_map(|m| Some((m, etcd.iter().find(|e| e.clients == m.clients)?)))
        .map(|(m, e)| Ratio {
            mesh: m.scenario.clone(),
            clients: m.clients,
            throughput_ratio: m.ops_per_sec.median / e.ops_per_sec.median.max(f64::MIN_POSITIVE),
            p99_ratio: m.p99_ms.median / e.p99_ms.median.max(f64::MIN_POSITIVE),
            paired: Spread::of(
                &m.runs
                    .iter()
                    .zip(&e.runs)
                    .map(|(m, e)| m.ops_per_sec / e.ops_per_sec.max(f64::MIN_POSITIVE))
                    .collect::<Vec<_>>(),
            ),
        })
        .collect()
}

fn compare_etcd(rt: &Runtime, a: &LoadArgs) -> Result<()> {
    let version = etcd::etcd_version()?;
    let before = disk_now("disk before the runs", DISK_EACH)?;
    let [mut mesh, stream, etcd] = side_by_side(rt, a)?;
    let after = disk_now("disk after the runs", DISK_EACH)?;
    mesh.extend(stream);
    let ratios = ratios(&mesh, &etcd);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "etcd_version": version, "points": mesh.iter().chain(&etcd).collect::<Vec<_>>(), "ratios": ratios,
                "disk_before": before, "disk_after": after
            }))?
        );
    } else {
        println!("{}", comparison_table(&mesh, &etcd, &ratios, &version));
        println!("{}", disk_lines(&before, &after));
    }
    Ok(())
}

/// The disk before and after a comparison's runs, as text under its tables.
fn disk_lines(before: &disk::Disk, after: &disk::Disk) -> String {
    format!(
        "The disk before the runs: {before}.\nAfter the runs: {after}.\n(A commit is a sync on each of the 3 nodes or members; `mesh-bench run disk`.)\n"
    )
}

fn comparison_table(mesh: &[Point], etcd: &[Point], ratios: &[Ratio], version: &str) -> String {
    let mut s = format!("{TABLE_HEAD}\n");
    for p in mesh.iter().chain(etcd) {
        s.push_str(&p.line());
        s.push('\n');
    }
    s.push_str(&format!(
        "\nMesh / etcd ({version}), 3 nodes each, medians (and each Mesh run over the etcd run taken beside it):\n\n| Mesh clients send | clients | committed submits/s ÷ puts/s | paired runs | p99 Mesh ÷ p99 etcd |\n|---|---|---|---|---|\n"
    ));
    for r in ratios {
        s.push_str(&format!(
            "| {} | {} | {:.2} | {:.2}-{:.2} | {:.2} |\n",
            r.mesh, r.clients, r.throughput_ratio, r.paired.min, r.paired.max, r.p99_ratio
        ));
    }
    s
}

fn all(
    rt: &Runtime,
    out: &std::path::Path,
    duration: Duration,
    runs: usize,
    tasks: u64,
) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let base = LoadArgs {
        nodes: vec![1, 3, 5],
        clients: vec![1, 16, 256],
        duration,
        runs,
        json: false,
    };
    let mut md = String::new();
    let mut results = serde_json::Map::new();
    let disk_before = disk_now("disk before the runs", DISK_EACH)?;
    let [mesh3, stream, etcd] = side_by_side(rt, &base)?;
    let disk_after = disk_now("disk after the comparison's runs", DISK_EACH)?;
    let others = LoadArgs {
        nodes: vec![1, 5],
        ..base.clone()
    };
    let mut submit = load_points(rt, "submit", &others, None)?;
    submit.extend(mesh3.iter().cloned());
    submit.sort_by_key(|p| (p.nodes, p.clients));
    md.push_str(&format!("## submit\n\n{TABLE_HEAD}\n"));
    for p in &submit {
        md.push_str(&format!("{}\n", p.line()));
    }
    let version = etcd::etcd_version()?;
    let both: Vec<Point> = mesh3.iter().chain(&stream).cloned().collect();
    let ratios = ratios(&both, &etcd);
    md.push_str(&format!(
        "\n## compare-etcd\n\n{}\n{}",
        comparison_table(&both, &etcd, &ratios, &version),
        disk_lines(&disk_before, &disk_after)
    ));
    std::fs::write(
        out.join("latency-throughput.svg"),
        plot::latency_throughput(&mesh3, &stream, &etcd),
    )?;
    let batch_args = LoadArgs {
        nodes: vec![3],
        clients: vec![4],
        ..base.clone()
    };
    let batch = load_points(rt, "submit-batch", &batch_args, Some(1000))?;
    let e2e_args = LoadArgs {
        nodes: vec![3],
        clients: vec![1, 16],
        ..base.clone()
    };
    let e2e = load_points(rt, "end-to-end", &e2e_args, None)?;
    let status = load_points(rt, "status", &e2e_args, None)?;
    md.push_str(&format!(
        "\n## submit-batch (1000 tasks per request), end-to-end, status (the SSH floor)\n\n{TABLE_HEAD}\n"
    ));
    for p in batch.iter().chain(&e2e).chain(&status) {
        md.push_str(&format!("{}\n", p.line()));
    }
    let failover = timed(rt, "failover", 3, runs.max(5))?;
    let reassign = timed(rt, "reassign", 3, runs.max(5))?;
    md.push_str(&format!(
        "\n## failover and reassign (3 nodes, ms over {} runs)\n\n| scenario | median | min | max |\n|---|---|---|---|\n| failover | {:.0} | {:.0} | {:.0} |\n| reassign | {:.0} | {:.0} | {:.0} |\n",
        failover.1.len(),
        failover.0.median, failover.0.min, failover.0.max,
        reassign.0.median, reassign.0.min, reassign.0.max
    ));
    let join = scenarios::join(rt, tasks)?;
    let footprint = scenarios::footprint(rt, tasks)?;
    md.push_str(&format!(
        "\n## join and footprint ({tasks} tasks)\n\n- join: ready after {:.0} ms, caught up after {:.0} ms (state {:.1} MiB)\n- memory per task {:.0} B, disk per task {:.0} B ({:.0} MiB per million tasks, {} B of input each)\n",
        join.ready_ms,
        join.caught_up_ms,
        join.state_bytes as f64 / 1048576.0,
        footprint.memory_per_task,
        footprint.disk_per_task,
        footprint.disk_per_million_mib,
        footprint.payload_bytes
    ));
    results.insert("submit".into(), serde_json::to_value(&submit)?);
    results.insert("submit_stream".into(), serde_json::to_value(&stream)?);
    results.insert("etcd".into(), serde_json::to_value(&etcd)?);
    results.insert("etcd_version".into(), version.into());
    results.insert("ratios".into(), serde_json::to_value(&ratios)?);
    results.insert("disk_before".into(), serde_json::to_value(&disk_before)?);
    results.insert("disk_after".into(), serde_json::to_value(&disk_after)?);
    results.insert("submit_batch".into(), serde_json::to_value(&batch)?);
    results.insert("end_to_end".into(), serde_json::to_value(&e2e)?);
    results.insert("status".into(), serde_json::to_value(&status)?);
    results.insert("failover_ms".into(), serde_json::to_value(&failover)?);
    results.insert("reassign_ms".into(), serde_json::to_value(&reassign)?);
    results.insert("join".into(), serde_json::to_value(&join)?);
    results.insert("footprint".into(), serde_json::to_value(&footprint)?);
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(out.join("tables.md"), &md)?;
    println!("{md}");
    println!(
        "written: {}/{{results.json,tables.md,latency-throughput.svg}}",
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(system: &str, clients: usize, rates: &[f64]) -> Point {
        let runs = rates
            .iter()
            .map(|&ops_per_sec| LoadStats {
                clients,
                seconds: 1.0,
                ops: ops_per_sec as u64,
                errors: 0,
                ops_per_sec,
                p50_ms: 1.0,
                p99_ms: 2.0,
                p999_ms: 3.0,
                max_ms: 4.0,
                elections: None,
                first_error: None,
            })
            .collect();
        Point::of(system, system, 3, clients, runs)
    }

    #[test]
    fn each_mesh_run_is_compared_with_the_etcd_run_taken_beside_it() {
        // The medians come from different runs (8,000 / 3,000); each pair is one moment.
        let mesh = [point("mesh", 16, &[3000.0, 8000.0, 9000.0])];
        let etcd = [
            point("etcd", 16, &[2000.0, 4000.0, 3000.0]),
            point("etcd", 1, &[1.0]),
        ];
        let [r] = &ratios(&mesh, &etcd)[..] else {
            panic!("one ratio per Mesh point")
        };
        assert_eq!(r.clients, 16);
        assert_eq!(r.throughput_ratio, 8000.0 / 3000.0);
        assert_eq!(
            (r.paired.min, r.paired.median, r.paired.max),
            (1.5, 2.0, 3.0)
        );
    }
}
