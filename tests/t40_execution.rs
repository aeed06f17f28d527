//! Claim: execution keeps its promises on the real stack. A WGSL kernel that never
//! ends is killed at its timeout (the task fails naming the timeout, its GPU worker
//! process is replaced) and the node goes on serving correct results; a kernel whose
//! fixed-size array is larger than its buffer is refused at submit by mesh-cli and by
//! the node alike, changing nothing, and a task over the node's `--gpu-memory-budget`
//! fails naming the budget (an output over the size limit is t20's); a sharded
//! Mandelbrot whose node is SIGKILLed resumes on another node from its committed
//! checkpoints, never re-running one, and ends byte for byte equal to the same task run
//! whole; draining a node hands its sharded task back at a shard boundary, keeps new
//! tasks off it, and undraining lets it work again; cancelling a running kernel kills
//! its worker process and frees the slot long before the kernel's own timeout; a task
//! whose node is SIGKILLed on its last attempt fails naming the lost node instead of
//! moving on; a SIGKILLed node's GPU worker does not outlive it; a quick task reports
//! its result without a start commit, while a long one is marked running.
//! Method: `mesh_chaos::Cluster` starts real `mesh-node` processes on loopback (Mesa's
//! lavapipe without a GPU); everything is driven through `mesh-cli --json` (and plain
//! OpenSSH where mesh-cli would refuse before sending). Faults are shown to have taken
//! effect: the killed kernel's worker pid is gone from `/proc`, the killed node is
//! marked down, the moved attempt's node logs only the shards that were not yet
//! committed. Waits poll for a state under a generous deadline; nothing asserts a
//! duration. The infinite kernel is the one of `mesh-node/tests/supervisor.rs`: it
//! needs atomics and a huge grid to hang on lavapipe.

pub use crate::support::{eventually, json, CLI_LIMIT, FOREVER};
use crate::support::{saxpy_reference, slow};
use crate::t10_single_node::task_id;
use mesh_chaos::{lcg_f32, phase, process_exists, strip_ansi, Cli, Cluster};
use mesh_core::builtin::f32_bytes;
use mesh_core::task::{KernelSpec, NamedBytes, OutputDecl, TaskSpec};
use mesh_core::Bytes;
use serde_json::Value;
use std::collections::BTreeSet;
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::time::Duration;

/// Bound for a workload to finish or a cluster to settle (elections, a node marked
/// down, a task moved). Waits end as soon as the state is reached; this only turns a
/// hang into a failure on a loaded two-core machine.
pub const SETTLE: Duration = Duration::from_secs(120);
/// Bound for work that must happen long before the 60 s timeout of the infinite
/// kernel: were the cancelled kernel still holding the only slot, the next task would
/// wait for that timeout and miss this deadline.
pub const PROMPTLY: Duration = Duration::from_secs(25);

/// A Mandelbrot heavy enough that each of its 8 shards takes a noticeable time here
/// (about 2.5 s on lavapipe alone, most of it in the middle rows), so that a fault can
/// land after the first checkpoints and well before the last. Used through
/// [`slow`], which scales it to a GPU.
pub const HEAVY: [&str; 8] = [
    "--kernel",
    "mandelbrot",
    "--param",
    "width=1024",
    "--param",
    "height=1024",
    "--param",
    "max_iter=12000",
];
/// A task that takes milliseconds.
pub const QUICK: [&str; 8] = [
    "--kernel",
    "mandelbrot",
    "--param",
    "width=16",
    "--param",
    "height=16",
    "--param",
    "max_iter=16",
];

/// A cluster that, when the test fails, prints every node's log tail and keeps its
/// directory (logs, data) for a post-mortem.
pub struct Fixture {
    mesh: Cluster,
    dir: Option<tempfile::TempDir>,
    /// GPU workers of nodes this test SIGKILLed: a killed `mesh-node` does not take
    /// them along (see `a_sigkilled_node_leaves_no_gpu_worker_behind`), so the fixture
    /// ends any still alive rather than leave a hung kernel spinning after the test.
    orphans: Vec<u32>,
}

impl Fixture {
    /// `n` nodes with the same extra `mesh-node run` arguments.
    pub fn start(n: usize, extra: &[&str]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        phase(&format!(
            "start {n} node(s) {extra:?} in {}",
            dir.path().display()
        ));
        let mesh = Cluster::start(dir.path(), n, extra)
            .unwrap_or_else(|e| panic!("cluster did not start: {e:#}"));
        Fixture {
            mesh,
            dir: Some(dir),
            orphans: Vec::new(),
        }
    }

    /// One node per entry, each with its own arguments.
    pub fn start_each(per_node: &[&[&str]]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        phase(&format!(
            "start {} nodes {per_node:?} in {}",
            per_node.len(),
            dir.path().display()
        ));
        let mesh = Cluster::start_each(dir.path(), per_node)
            .unwrap_or_else(|e| panic!("cluster did not start: {e:#}"));
        Fixture {
            mesh,
            dir: Some(dir),
            orphans: Vec::new(),
        }
    }

    /// The test's directory.
    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("present until drop").path()
    }

    /// The process ids of node `i`'s GPU workers, once it has `want` of them (a
    /// replaced worker takes a moment to start).
    pub fn workers(&self, i: usize, want: usize) -> Vec<u32> {
        eventually(
            &format!("node {} runs {want} GPU worker process(es)", i + 1),
            SETTLE,
            || {
                let pids = self.mesh.nodes[i].gpu_workers();
                (pids.len() == want)
                    .then_some(pids.clone())
                    .ok_or(format!("{pids:?}"))
            },
        )
    }

    /// SIGKILL node `i`, remembering its GPU workers; their ids.
    pub fn kill9(&mut self, i: usize) -> Vec<u32> {
        let workers = self.mesh.nodes[i].gpu_workers();
        self.mesh.nodes[i].kill9();
        self.orphans.extend(&workers);
        workers
    }

    /// Node `i`'s log without colour codes.
    pub fn log(&self, i: usize) -> String {
        strip_ansi(&self.mesh.nodes[i].log())
    }
}

impl Deref for Fixture {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.mesh
    }
}

impl DerefMut for Fixture {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.mesh
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.mesh.log_tails(60));
            if let Some(dir) = self.dir.take() {
                eprintln!(
                    "kept the test directory for inspection: {}",
                    dir.keep().display()
                );
            }
        }
        let mut workers: Vec<u32> = self
            .mesh
            .nodes
            .iter()
            .flat_map(|n| n.gpu_workers())
            .collect();
        for node in &mut self.mesh.nodes {
            node.kill9();
        }
        workers.append(&mut self.orphans);
        for pid in workers {
            let still_a_worker = std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(10).any(|w| w == b"gpu-worker"));
            if still_a_worker {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// Submit (`mesh-cli submit ARGS`); the new task's id.
pub fn submit(cli: &Cli, args: &[&str]) -> u64 {
    let mut full = vec!["--json", "submit"];
    full.extend_from_slice(args);
    let out = cli.run_within(&full, CLI_LIMIT).ok().json();
    assert_eq!(
        out["existing"], false,
        "a fresh submit matched an earlier task: {out}"
    );
    task_id(&out).parse().unwrap()
}

/// `task ID --json`.
pub fn task(cli: &Cli, id: u64) -> Result<Value, String> {
    json(cli, &["task", &id.to_string()])
}

/// Poll `task ID` until `pred` holds; the view.
pub fn wait_task(
    cli: &Cli,
    id: u64,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    eventually(&format!("task {id} {what}"), timeout, || {
        let t = task(cli, id)?;
        if pred(&t) {
            Ok(t)
        } else {
            Err(brief(&t))
        }
    })
}

/// Poll until the task is terminal; the view.
pub fn wait_terminal(cli: &Cli, id: u64, timeout: Duration) -> Value {
    wait_task(cli, id, "is terminal", timeout, |t| {
        ["succeeded", "failed", "cancelled"].contains(&state(t))
    })
}

/// A task's state name.
pub fn state(t: &Value) -> &str {
    t["state"].as_str().unwrap_or("?")
}

/// `state@node#attempt shards d/n errors [...] waiting ...`, for failure messages.
pub fn brief(t: &Value) -> String {
    format!(
        "{}@{}#{} shards {}/{} errors {} waiting {}",
        state(t),
        t["node"],
        t["attempt"],
        t["shards_done"],
        t["shards"],
        t["errors"],
        t["waiting"]
    )
}

/// The id of the node holding a task, if any.
pub fn node_of(t: &Value) -> Option<u64> {
    t["node"].as_u64()
}

/// The failed attempts of a task view: `(attempt, node, error)`.
pub fn errors(t: &Value) -> Vec<(u64, u64, String)> {
    t["errors"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["attempt"].as_u64().unwrap_or(0),
                        e["node"].as_u64().unwrap_or(0),
                        e["error"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Arguments submitting the infinite kernel with `timeout` and one attempt (its
/// source and input are written into `dir`).
pub fn forever_args(dir: &Path, timeout: &str) -> Vec<String> {
    let wgsl = dir.join("forever.wgsl");
    let x = dir.join("zero.bin");
    std::fs::write(&wgsl, FOREVER).unwrap();
    std::fs::write(&x, f32_bytes(&[0.0])).unwrap();
    [
        "--wgsl",
        wgsl.to_str().unwrap(),
        "--workgroups",
        "65535,1024,1",
        "--input",
        &format!("x=@{}", x.display()),
        "--output",
        "y=8",
        "--timeout",
        timeout,
        "--max-attempts",
        "1",
    ]
    .map(String::from)
    .to_vec()
}

/// Strings as `&str`s, for CLI argument lists.
pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A saxpy of `n` elements: its submit arguments (input files written into `dir`
/// under `tag`) and the CPU reference of its output.
pub fn saxpy(dir: &Path, tag: &str, n: usize) -> (Vec<String>, Vec<u8>) {
    let (x, y) = (lcg_f32(11, n), lcg_f32(12, n));
    let (xf, yf) = (
        dir.join(format!("{tag}-x.bin")),
        dir.join(format!("{tag}-y.bin")),
    );
    std::fs::write(&xf, f32_bytes(&x)).unwrap();
    std::fs::write(&yf, f32_bytes(&y)).unwrap();
    let want = saxpy_reference("-1.75", &x, &y);
    let args = [
        "--kernel",
        "saxpy",
        "--param",
        "a=-1.75",
        "--input",
        &format!("x=@{}", xf.display()),
        "--input",
        &format!("y=@{}", yf.display()),
    ]
    .map(String::from)
    .to_vec();
    (args, want)
}

/// Fetch a succeeded task's output with `result ID --output FILE` (which verifies its
/// SHA-256 against the replicated digest); its bytes.
pub fn fetch(cli: &Cli, dir: &Path, id: u64) -> Vec<u8> {
    let file = dir.join(format!("result-{id}.bin"));
    cli.run_within(
        &[
            "result",
            &id.to_string(),
            "--output",
            file.to_str().unwrap(),
        ],
        CLI_LIMIT,
    )
    .ok();
    std::fs::read(&file).unwrap()
}

/// Submit a saxpy on `cli`, wait for it within `timeout`, and check its fetched
/// output against the CPU reference bit for bit.
pub fn saxpy_succeeds(cli: &Cli, dir: &Path, tag: &str, timeout: Duration) -> Value {
    let (args, want) = saxpy(dir, tag, 4096);
    let id = submit(cli, &strs(&args));
    let t = wait_terminal(cli, id, timeout);
    assert_eq!(state(&t), "succeeded", "saxpy {tag}: {}", brief(&t));
    assert!(
        fetch(cli, dir, id) == want,
        "saxpy {tag}: the output differs from the CPU reference"
    );
    t
}

/// The shards that `node`'s log says it checkpointed for `task`
/// ("shard checkpointed" and "last shard checkpointed" lines in the attempt's span).
pub fn checkpointed_in_log(log: &str, task: u64) -> BTreeSet<u32> {
    let span = format!("task={task} ");
    log.lines()
        .filter(|l| l.contains("shard checkpointed") && l.contains(&span))
        .filter_map(|l| l.rsplit("shard=").next()?.trim().parse().ok())
        .collect()
}

#[test]
fn a_kernel_that_never_ends_is_killed_at_its_timeout_and_the_node_keeps_serving() {
    let mut fx = Fixture::start(1, &[]);
    let cli = fx.cli(0);
    let dir = fx.path().to_path_buf();
    let before = fx.workers(0, 1);

    phase("submit the infinite kernel with --timeout 2s --max-attempts 1");
    let id = submit(&cli, &strs(&forever_args(&dir, "2s")));
    wait_task(&cli, id, "runs", SETTLE, |t| {
        state(t) == "running" || state(t) == "failed"
    });

    phase("it fails at its timeout, naming the timeout");
    let t = wait_terminal(&cli, id, SETTLE);
    assert_eq!(state(&t), "failed", "{}", brief(&t));
    let errs = errors(&t);
    assert_eq!(errs.len(), 1, "one attempt, one error: {}", brief(&t));
    assert!(
        errs[0].2.contains("timed out after 2s") && errs[0].2.contains("killed"),
        "the error must name the timeout: {:?}",
        errs[0]
    );

    phase("its GPU worker process was killed and replaced");
    eventually("the hung worker is gone", SETTLE, || {
        if process_exists(before[0]) {
            Err(format!("pid {} exists", before[0]))
        } else {
            Ok(())
        }
    });
    let after = fx.workers(0, 1);
    assert_ne!(after, before, "the worker was not replaced");

    phase("the node keeps serving: a saxpy succeeds with the CPU reference's bytes");
    saxpy_succeeds(&cli, &dir, "after-timeout", SETTLE);
    assert!(
        fx.nodes[0].is_running(),
        "the node itself must survive a hung kernel"
    );
}

#[test]
fn tasks_too_big_for_their_buffers_or_the_budget_are_refused_or_fail_clearly() {
    let fx = Fixture::start(1, &["--gpu-memory-budget", "1000000"]);
    let cli = fx.cli(0);
    let dir = fx.path().to_path_buf();

    phase("a fixed-size array larger than its buffer is refused by mesh-cli before sending");
    let source = "@group(0) @binding(0) var<storage, read> x: array<f32>;\n\
                  @group(0) @binding(1) var<storage, read_write> y: array<f32, 1024>;\n\
                  @compute @workgroup_size(1) fn main() { y[0] = x[0]; }\n";
    let wgsl = dir.join("fixed.wgsl");
    std::fs::write(&wgsl, source).unwrap();
    let x = dir.join("x.bin");
    std::fs::write(&x, f32_bytes(&[1.0, 2.0, 3.0, 4.0])).unwrap();
    let out = cli.run_within(
        &[
            "submit",
            "--wgsl",
            wgsl.to_str().unwrap(),
            "--workgroups",
            "1",
            "--input",
            &format!("x=@{}", x.display()),
            "--output",
            "y=16",
        ],
        CLI_LIMIT,
    );
    assert_eq!(
        out.code,
        1,
        "refused with exit 1: {} {}",
        out.stderr,
        out.text()
    );
    assert!(
        out.stderr.starts_with("error: the task was not sent: "),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("declared as 4096 bytes")
            && out.stderr.contains("buffer y has 16 bytes"),
        "the error must name both sizes: {}",
        out.stderr
    );

    phase("the node refuses the same task sent by plain OpenSSH, past mesh-cli's check");
    let spec = TaskSpec {
        kernel: KernelSpec::Wgsl {
            source: source.into(),
            entry: "main".into(),
            workgroups: [1, 1, 1],
        },
        inputs: vec![NamedBytes {
            name: "x".into(),
            data: Bytes::from(f32_bytes(&[1.0, 2.0, 3.0, 4.0])),
        }],
        outputs: vec![OutputDecl {
            name: "y".into(),
            size: 16,
        }],
        requirements: vec![],
        prefer: vec![],
        shards: 1,
        priority: 0,
        timeout: Duration::from_secs(10),
        max_attempts: 1,
        idempotency_key: None,
    };
    let spec_file = dir.join("spec.json");
    std::fs::write(&spec_file, serde_json::to_vec(&spec).unwrap()).unwrap();
    let ssh =
        crate::support::openssh_command(fx.nodes[0].ssh_port, &cli.known_hosts, &fx.admin.private)
            .args(["mesh@127.0.0.1", "submit", "--json"])
            .stdin(std::fs::File::open(&spec_file).unwrap())
            .output()
            .unwrap();
    let stderr = String::from_utf8_lossy(&ssh.stderr);
    assert!(
        !ssh.status.success(),
        "the node accepted it: {}",
        String::from_utf8_lossy(&ssh.stdout)
    );
    assert!(
        stderr.contains("declared as 4096 bytes") && stderr.contains("16 bytes"),
        "the node's error must name both sizes: {stderr}"
    );
    let tasks = json(&cli, &["tasks"]).unwrap();
    assert_eq!(
        tasks.as_array().map(Vec::len),
        Some(0),
        "a refused submit created a task: {tasks}"
    );

    phase("a saxpy whose buffers exceed the 1000000-byte budget fails, naming the budget");
    let (mut args, _) = saxpy(&dir, "over-budget", 100_000);
    args.extend(["--max-attempts", "1"].map(String::from));
    let id = submit(&cli, &strs(&args));
    let t = wait_terminal(&cli, id, SETTLE);
    assert_eq!(state(&t), "failed", "{}", brief(&t));
    let errs = errors(&t);
    assert_eq!(errs.len(), 1, "{}", brief(&t));
    assert!(
        errs[0].2.contains("GPU memory budget of 1000000 bytes"),
        "the error must name the budget: {:?}",
        errs[0]
    );
    assert!(
        errs[0].2.contains("1200016 bytes"),
        "the error must name what the kernel needs (3 x 400000 + 16): {:?}",
        errs[0]
    );

    phase("a task within the budget still runs");
    saxpy_succeeds(&cli, &dir, "within-budget", SETTLE);
}

#[test]
fn a_sharded_task_resumes_from_its_checkpoints_after_its_node_is_killed() {
    let mut fx = Fixture::start(3, &["--node-timeout", "1500ms"]);
    let dir = fx.path().to_path_buf();
    let cli = fx.cli(0);

    phase(
        "submit the same Mandelbrot whole (the reference) and in 8 shards; each node has one slot",
    );
    let reference = submit(
        &cli,
        &[&slow(&HEAVY)[..], &["--idempotency-key", "whole"]].concat(),
    );
    wait_task(&cli, reference, "is placed", SETTLE, |t| {
        node_of(t).is_some()
    });
    let sharded = submit(
        &cli,
        &[
            &slow(&HEAVY)[..],
            &["--shards", "8", "--idempotency-key", "sharded"],
        ]
        .concat(),
    );

    phase("wait until the sharded task has committed 2 checkpoints");
    let mut seen: Vec<u64> = Vec::new();
    let t = wait_task(&cli, sharded, "has 2 shards done", SETTLE, |t| {
        t["shards_done"].as_u64().unwrap_or(0) >= 2 || ["succeeded", "failed"].contains(&state(t))
    });
    assert_eq!(
        state(&t),
        "running",
        "the sharded task must still run when its node is killed: {}",
        brief(&t)
    );
    let victim = node_of(&t).expect("a running task has a node");
    let done_before = t["shards_done"].as_u64().unwrap();
    seen.push(done_before);
    assert!(done_before < 8, "{}", brief(&t));

    phase(&format!(
        "SIGKILL node {victim}, which runs it ({done_before}/8 shards done)"
    ));
    let v = victim as usize - 1;
    fx.kill9(v);
    let survivor = (0..3).find(|i| *i != v).unwrap();
    let cli = fx.cli(survivor);

    phase("the killed node is marked down (the fault took effect)");
    fx.wait_for(SETTLE, |nodes| {
        nodes.as_array().is_some_and(|a| {
            a.iter().any(|n| {
                n["id"].as_u64() == Some(victim)
                    && n["health"].as_str().is_some_and(|h| h.starts_with("down"))
            })
        })
    })
    .unwrap_or_else(|e| panic!("node {victim} was never marked down: {e:#}"));

    phase("the task moves under a new attempt and succeeds; shards done never go back");
    let fin = eventually(
        &format!("task {sharded} succeeds after the move"),
        SETTLE,
        || {
            let t = task(&cli, sharded)?;
            seen.push(t["shards_done"].as_u64().unwrap_or(0));
            if ["succeeded", "failed", "cancelled"].contains(&state(&t)) {
                Ok(t)
            } else {
                Err(brief(&t))
            }
        },
    );
    assert_eq!(state(&fin), "succeeded", "{}", brief(&fin));
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "shards_done went backwards: {seen:?}"
    );
    assert_eq!(fin["shards_done"], 8, "{}", brief(&fin));
    assert!(
        fin["attempt"].as_u64().unwrap() >= 2,
        "the attempt number must grow: {}",
        brief(&fin)
    );
    let errs = errors(&fin);
    assert!(
        errs.iter().any(|(a, n, e)| *a == 1
            && *n == victim
            && e.contains(&format!("node {victim} was marked down"))),
        "attempt 1 must be recorded as lost with node {victim}: {errs:?}"
    );
    let resumer = node_of(&fin).unwrap();
    assert_ne!(resumer, victim);

    phase(&format!(
        "node {resumer} ran only the shards not committed before the kill"
    ));
    let before_kill = checkpointed_in_log(&fx.log(v), sharded);
    // The node logs a checkpoint after its commit returns, so the task can read as
    // succeeded a moment before the last shard's line is in the log.
    let after_move = eventually(
        &format!("node {resumer} logs the last shard's checkpoint"),
        SETTLE,
        || {
            let logged = checkpointed_in_log(&fx.log(resumer as usize - 1), sharded);
            if logged.contains(&7) {
                Ok(logged)
            } else {
                Err(format!("logged so far: {logged:?}"))
            }
        },
    );
    eprintln!(
        "node {victim} logged checkpoints {before_kill:?}; node {resumer} logged {after_move:?}"
    );
    let first = *after_move
        .iter()
        .next()
        .unwrap_or_else(|| panic!("node {resumer} logged no checkpoint of task {sharded}"));
    assert_eq!(
        after_move,
        (first..8).collect::<BTreeSet<_>>(),
        "the resumed attempt runs the remaining shards in order"
    );
    assert!(
        u64::from(first) >= done_before,
        "shard {first} was run again although {done_before} shards were committed before the kill"
    );
    assert!(
        before_kill.is_disjoint(&after_move),
        "a shard was committed twice: {before_kill:?} and {after_move:?}"
    );

    phase("the resumed output equals the whole task's output byte for byte");
    let whole = wait_terminal(&cli, reference, SETTLE);
    assert_eq!(state(&whole), "succeeded", "{}", brief(&whole));
    let (a, b) = (fetch(&cli, &dir, sharded), fetch(&cli, &dir, reference));
    assert_eq!(a.len(), 1024 * 1024 * 4);
    assert!(
        a == b,
        "the resumed sharded output differs from the uninterrupted one"
    );
    assert_eq!(fin["outputs"][0]["sha256"], whole["outputs"][0]["sha256"]);
}

#[test]
fn drain_hands_a_sharded_task_back_at_a_shard_boundary_and_keeps_new_work_off() {
    let fx = Fixture::start(2, &[]);
    let dir = fx.path().to_path_buf();
    let cli = fx.cli(0);

    phase("a sharded Mandelbrot runs and commits its first checkpoint");
    let sharded = submit(&cli, &[&slow(&HEAVY)[..], &["--shards", "8"]].concat());
    let t = wait_task(&cli, sharded, "has a shard done", SETTLE, |t| {
        t["shards_done"].as_u64().unwrap_or(0) >= 1 || state(t) == "succeeded"
    });
    assert_eq!(state(&t), "running", "{}", brief(&t));
    let x = node_of(&t).unwrap();
    let y = 3 - x;
    let mut seen = vec![t["shards_done"].as_u64().unwrap()];

    phase(&format!("drain node {x}"));
    let out = json(&cli, &["drain", &x.to_string()]).unwrap();
    assert_eq!(out["drained"], x, "{out}");
    let nodes = json(&cli, &["nodes"]).unwrap();
    let view = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == x)
        .unwrap();
    assert_eq!(view["drained"], true, "{view}");

    phase(&format!("the task is handed back and finishes on node {y}"));
    let fin = eventually(&format!("task {sharded} succeeds"), SETTLE, || {
        let t = task(&cli, sharded)?;
        seen.push(t["shards_done"].as_u64().unwrap_or(0));
        if ["succeeded", "failed", "cancelled"].contains(&state(&t)) {
            Ok(t)
        } else {
            Err(brief(&t))
        }
    });
    assert_eq!(state(&fin), "succeeded", "{}", brief(&fin));
    assert_eq!(
        node_of(&fin),
        Some(y),
        "the drained node must not finish it: {}",
        brief(&fin)
    );
    assert!(fin["attempt"].as_u64().unwrap() >= 2, "{}", brief(&fin));
    assert!(
        errors(&fin).is_empty(),
        "a hand-back is not a failure: {}",
        brief(&fin)
    );
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "shards_done went backwards: {seen:?}"
    );
    assert!(
        fx.log(x as usize - 1)
            .contains("handing the task back at a shard boundary"),
        "node {x} did not log the hand-back"
    );
    // The worker logs a checkpoint after its commit returns, so the last shard's line
    // may land a moment after the task shows as succeeded.
    let (on_x, on_y) = eventually("every shard's checkpoint logged", SETTLE, || {
        let (on_x, on_y) = (
            checkpointed_in_log(&fx.log(x as usize - 1), sharded),
            checkpointed_in_log(&fx.log(y as usize - 1), sharded),
        );
        if on_x.len() + on_y.len() >= 8 {
            Ok((on_x, on_y))
        } else {
            Err(format!("node {x}: {on_x:?}, node {y}: {on_y:?}"))
        }
    });
    eprintln!("node {x} checkpointed {on_x:?}, node {y} {on_y:?}");
    assert!(
        !on_x.is_empty() && !on_y.is_empty(),
        "both nodes must have run shards: {on_x:?} {on_y:?}"
    );
    assert!(
        on_x.is_disjoint(&on_y),
        "a shard ran on both nodes: {on_x:?} {on_y:?}"
    );
    assert_eq!(
        on_x.union(&on_y).copied().collect::<BTreeSet<_>>(),
        (0..8).collect(),
        "every shard ran once"
    );

    phase(&format!("while node {x} is drained: a kernel lands on node {y}, and a further task waits rather than use node {x}"));
    let forever = submit(&cli, &strs(&forever_args(&dir, "60s")));
    let f = wait_task(&cli, forever, "runs", SETTLE, |t| state(t) == "running");
    assert_eq!(
        node_of(&f),
        Some(y),
        "a new task landed on the drained node: {}",
        brief(&f)
    );
    let quick = submit(&cli, &QUICK);
    let q = wait_task(&cli, quick, "explains why it waits", SETTLE, |t| {
        t["waiting"].is_string()
    });
    assert_eq!(state(&q), "pending", "{}", brief(&q));
    let waiting = q["waiting"].as_str().unwrap();
    eprintln!("task {quick} waits: {waiting}");
    assert!(
        waiting.contains("drained"),
        "the reason must say that node {x} is drained: {waiting}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let q = task(&cli, quick).unwrap();
    assert_eq!((state(&q), node_of(&q)), ("pending", None), "{}", brief(&q));

    phase(&format!("undrain node {x}: the waiting task runs there"));
    let out = json(&cli, &["undrain", &x.to_string()]).unwrap();
    assert_eq!(out["undrained"], x, "{out}");
    let q = wait_terminal(&cli, quick, SETTLE);
    assert_eq!(
        (state(&q), node_of(&q)),
        ("succeeded", Some(x)),
        "{}",
        brief(&q)
    );
    json(&cli, &["cancel", &forever.to_string()]).unwrap();
}

#[test]
fn a_task_that_loses_its_node_on_its_last_attempt_fails_instead_of_moving_on() {
    let mut fx = Fixture::start(3, &["--node-timeout", "1500ms"]);
    let dir = fx.path().to_path_buf();
    let cli = fx.cli(0);

    phase("the infinite kernel runs with one attempt and a 10m timeout");
    let id = submit(&cli, &strs(&forever_args(&dir, "10m")));
    let t = wait_task(&cli, id, "runs", SETTLE, |t| state(t) == "running");
    let victim = node_of(&t).expect("a running task has a node");

    phase(&format!("SIGKILL node {victim}, which runs it"));
    let v = victim as usize - 1;
    fx.kill9(v);
    let cli = fx.cli((0..3).find(|i| *i != v).unwrap());

    phase("the node's loss spends the task's only attempt: it fails and runs nowhere else");
    let fin = wait_terminal(&cli, id, SETTLE);
    assert_eq!(state(&fin), "failed", "{}", brief(&fin));
    assert_eq!(
        fin["attempt"],
        1,
        "it was never assigned again: {}",
        brief(&fin)
    );
    let errs = errors(&fin);
    assert!(
        matches!(&errs[..], [(1, n, e)] if *n == victim
            && e.contains(&format!("node {victim} was marked down"))
            && e.contains("that was the last of 1 attempts")),
        "the one error must name the lost node and the spent budget: {errs:?}"
    );
    let nodes = json(&cli, &["nodes"]).unwrap();
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"].as_u64() == Some(victim)
                && n["health"].as_str().is_some_and(|h| h.starts_with("down"))),
        "the fault took effect: node {victim} is down: {nodes}"
    );
}

#[test]
fn a_quick_task_reports_its_result_without_a_start_commit() {
    // A kernel done within the worker's start grace (10 ms) goes from assigned to
    // succeeded in one commit, with no start: no `started_at`. The first run on a fresh
    // worker compiles its pipeline and may take longer; a loaded machine may stretch
    // any one run past the grace, so one quick task of six must show it, and every one
    // must still be right. (The long kernel that is marked running with a start is
    // `cancel_kills_a_running_kernel_and_frees_its_slot_promptly`'s.)
    let fx = Fixture::start(1, &[]);
    let cli = fx.cli(0);
    let dir = fx.path().to_path_buf();
    let mut started = Vec::new();
    for i in 0..6 {
        let t = saxpy_succeeds(&cli, &dir, &format!("quick-{i}"), SETTLE);
        assert!(t["finished_at_ms"].is_u64(), "{t}");
        started.push(t["started_at_ms"].clone());
    }
    assert!(
        started.iter().any(Value::is_null),
        "some quick task should have reported without a start: {started:?}"
    );
}

#[test]
fn cancel_kills_a_running_kernel_and_frees_its_slot_promptly() {
    let fx = Fixture::start(1, &[]);
    let cli = fx.cli(0);
    let dir = fx.path().to_path_buf();

    phase("the infinite kernel runs with a 60s timeout");
    let id = submit(&cli, &strs(&forever_args(&dir, "60s")));
    let t = wait_task(&cli, id, "runs", SETTLE, |t| state(t) == "running");
    assert!(
        t["started_at_ms"].is_u64(),
        "a kernel past the start grace is marked running with its start: {t}"
    );
    let worker = fx.workers(0, 1)[0];

    phase("cancel it");
    let out = json(&cli, &["cancel", &id.to_string()]).unwrap();
    assert_eq!(state(&out), "cancelled", "{out}");
    let t = task(&cli, id).unwrap();
    assert_eq!(state(&t), "cancelled", "{}", brief(&t));
    assert!(
        errors(&t).is_empty(),
        "a cancel is not a failed attempt: {}",
        brief(&t)
    );

    phase("its worker process is killed and the slot serves a saxpy long before the 60s timeout");
    eventually("the cancelled kernel's worker is gone", PROMPTLY, || {
        if process_exists(worker) {
            Err(format!("pid {worker} exists"))
        } else {
            Ok(())
        }
    });
    saxpy_succeeds(&cli, &dir, "after-cancel", PROMPTLY);
    let again = cli.run_within(&["cancel", &id.to_string()], CLI_LIMIT);
    assert_ne!(again.code, 0, "a cancelled task cannot be cancelled again");
}

#[test]
fn a_sigkilled_node_leaves_no_gpu_worker_behind() {
    let mut fx = Fixture::start(1, &[]);
    let cli = fx.cli(0);
    let dir = fx.path().to_path_buf();

    phase("the infinite kernel runs with a 60s timeout");
    let id = submit(&cli, &strs(&forever_args(&dir, "60s")));
    wait_task(&cli, id, "runs", SETTLE, |t| state(t) == "running");
    let workers = fx.workers(0, 1);

    phase(&format!(
        "SIGKILL the node; its GPU worker {workers:?} must not outlive it"
    ));
    fx.kill9(0);
    eventually("the killed node's GPU worker is gone", PROMPTLY, || {
        let alive: Vec<u32> = workers
            .iter()
            .copied()
            .filter(|p| process_exists(*p))
            .collect();
        alive.is_empty().then_some(()).ok_or(format!(
            "still running: {alive:?} (a hung kernel would hold the GPU forever)"
        ))
    });
}
