//! Claim: real nodes form one mesh by join token and keep their promises when nodes
//! fail. Three nodes bootstrap into three voters with one leader and a follower forwards
//! a submit; five nodes with `--voters 5` reach five voters (each runtime with its share
//! of the machine's cores); when the leader is killed
//! or paused, or a worker is killed or removed, a new leader takes over where needed,
//! the lost node's attempts move to other nodes under new attempt numbers, and every
//! acknowledged task ends `succeeded` with exactly one result that matches the CPU
//! (bit for bit for saxpy and a small Mandelbrot; the large Mandelbrots agree with each
//! other); a learner replaces a voter that stays down; a killed or paused node comes
//! back as an up follower. The survivors of a killed leader see its port refuse
//! connections (`mesh_raft_leader_gone_total`) and campaign early; a paused leader's
//! open port is never taken for a dead one.
//! Method: `mesh_chaos::Cluster` starts `mesh-node` processes on loopback (node 1
//! bootstraps, the others `--join` with a token); faults are SIGKILL, SIGSTOP/SIGCONT
//! and `mesh-cli remove`; every check goes through `mesh-cli --json` on a node that
//! still serves. Each fault is injected only once the victim is seen holding a running
//! task, and shown to have taken effect (leader changed, node marked down or removed)
//! before results are judged. Waits poll for a state, they never assert a duration.

pub use crate::support::{eventually, json, CLI_LIMIT};
use crate::support::{metric, saxpy_reference, scrape, slow, wait_succeeded};
use crate::t10_single_node::task_id;
use mesh_chaos::{lcg_f32, phase, Cli, Cluster};
use mesh_core::builtin::{cpu_reference, f32_bytes};
use mesh_core::Digest;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::time::Duration;

/// Generous bound for a cluster to converge (elections, autopilot, catch-up). Waits
/// end as soon as the state is reached; this only turns a hang into a failure.
pub const CONVERGE: Duration = Duration::from_secs(60);
/// Bound for a workload to finish, failures and retries included.
pub const FINISH: Duration = Duration::from_secs(180);

/// The slow task: on lavapipe about one core-second, so that several are still
/// running or pending when a fault lands (scaled to a GPU by [`slow`]). Large Mandelbrots are too slow for the
/// CPU reference in a debug build; all of them must agree with each other instead.
const HEAVY: [&str; 6] = [
    "--param",
    "width=512",
    "--param",
    "height=512",
    "--param",
    "max_iter=20000",
];

/// A cluster that prints the tail of every node's log when the test fails.
pub struct Mesh(pub Cluster);

impl Mesh {
    /// `Cluster::start`, panicking with the reason.
    pub fn start(dir: &Path, n: usize, extra: &[&str]) -> Mesh {
        phase(&format!(
            "start {n} nodes (node 1 bootstraps, the others join with a token) {extra:?}"
        ));
        Mesh(
            Cluster::start(dir, n, extra)
                .unwrap_or_else(|e| panic!("cluster did not start: {e:#}")),
        )
    }

    /// Wait for a leader and for the mesh to have three voters; the leader's index.
    pub fn leader_of_three_voters(&mut self) -> usize {
        let leader = self.wait_leader(CONVERGE, |_| true).unwrap();
        eventually("3 voters", CONVERGE, || {
            let s = self.status(leader).map_err(|e| e.to_string())?;
            (voters(&s).len() == 3).then_some(()).ok_or(s.to_string())
        });
        leader
    }
}

impl Deref for Mesh {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.0
    }
}

impl DerefMut for Mesh {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.0
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.0.log_tails(80));
        }
    }
}

/// `nodes --json` as seen by any serving node.
pub fn nodes(mesh: &mut Cluster) -> Result<Vec<Value>, String> {
    let cli = mesh.any_cli(None);
    json(&cli, &["nodes"]).and_then(|v| {
        v.as_array()
            .cloned()
            .ok_or_else(|| format!("not a list: {v}"))
    })
}

/// The view of node `id` in a `nodes` answer.
pub fn node(nodes: &[Value], id: u64) -> Option<&Value> {
    nodes.iter().find(|n| n["id"].as_u64() == Some(id))
}

/// `(role, health)` of node `id`.
pub fn role_health(nodes: &[Value], id: u64) -> (String, String) {
    node(nodes, id).map_or(("absent".into(), "absent".into()), |n| {
        (
            n["role"].as_str().unwrap_or("?").into(),
            n["health"].as_str().unwrap_or("?").into(),
        )
    })
}

/// The voter ids in a `status` answer.
pub fn voters(status: &Value) -> BTreeSet<u64> {
    status["voters"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// What a task's output must be.
pub enum Expect {
    /// Exactly these bytes (the CPU reference).
    Bytes(Vec<u8>),
    /// The same bytes as every other heavy task (one kernel, one set of parameters).
    SameAsHeavy,
}

/// A task whose submit was acknowledged.
pub struct Submitted {
    /// Task id.
    pub id: u64,
    /// The `mesh-cli submit` arguments, idempotency key included.
    pub args: Vec<String>,
    /// Its correct output.
    pub expect: Expect,
}

/// Submit `heavy` large Mandelbrots, `light` saxpys and one small Mandelbrot, each with
/// an idempotency key. Heavy tasks go first so that light ones queue behind them.
pub fn submit_workload(
    cli: &Cli,
    dir: &Path,
    tag: &str,
    heavy: usize,
    light: usize,
) -> Vec<Submitted> {
    phase(&format!(
        "submit {heavy} heavy Mandelbrots, {light} saxpys and a small Mandelbrot through {}",
        cli.node
    ));
    let mut work = Vec::new();
    let mut submit = |args: Vec<String>, expect: Expect| {
        let mut full: Vec<&str> = vec!["--json", "submit"];
        full.extend(args.iter().map(String::as_str));
        let out = cli.run_within(&full, CLI_LIMIT).ok().json();
        assert_eq!(
            out["existing"], false,
            "a fresh idempotency key matched an earlier task: {out}"
        );
        work.push(Submitted {
            id: task_id(&out).parse().unwrap(),
            args,
            expect,
        });
    };
    for k in 0..heavy {
        let mut args: Vec<String> = ["--kernel", "mandelbrot"]
            .iter()
            .chain(slow(&HEAVY).iter())
            .map(|s| s.to_string())
            .collect();
        args.extend(["--idempotency-key".into(), format!("{tag}-heavy-{k}")]);
        submit(args, Expect::SameAsHeavy);
    }
    for k in 0..light {
        let n = 4096 + 64 * k;
        let (x, y) = (lcg_f32(100 + k as u64, n), lcg_f32(200 + k as u64, n));
        let (xf, yf) = (
            dir.join(format!("{tag}-x{k}.bin")),
            dir.join(format!("{tag}-y{k}.bin")),
        );
        std::fs::write(&xf, f32_bytes(&x)).unwrap();
        std::fs::write(&yf, f32_bytes(&y)).unwrap();
        let want = saxpy_reference("1.5", &x, &y);
        let args = vec![
            "--kernel".into(),
            "saxpy".into(),
            "--param".into(),
            "a=1.5".into(),
            "--input".into(),
            format!("x=@{}", xf.display()),
            "--input".into(),
            format!("y=@{}", yf.display()),
            "--idempotency-key".into(),
            format!("{tag}-saxpy-{k}"),
        ];
        submit(args, Expect::Bytes(want));
    }
    let params = BTreeMap::from(
        [("width", "64"), ("height", "48"), ("max_iter", "5000")]
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let want = cpu_reference("mandelbrot", &params, &[]);
    let mut args: Vec<String> = vec!["--kernel".into(), "mandelbrot".into()];
    for (k, v) in &params {
        args.extend(["--param".into(), format!("{k}={v}")]);
    }
    args.extend([
        "--idempotency-key".into(),
        format!("{tag}-small-mandelbrot"),
    ]);
    submit(args, Expect::Bytes(want));
    work
}

/// `tasks --json` of one client, by id.
pub fn tasks_on(cli: &Cli) -> Result<BTreeMap<u64, Value>, String> {
    let v = json(cli, &["tasks"])?;
    Ok(v.as_array()
        .ok_or("not a list")?
        .iter()
        .map(|t| (t["id"].as_u64().unwrap_or(u64::MAX), t.clone()))
        .collect())
}

/// Wait until a serving node sees task `pred` hold for some task; return that task.
pub fn wait_task(mesh: &mut Cluster, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    eventually(what, FINISH, || {
        let cli = mesh.any_cli(None);
        let tasks = tasks_on(&cli)?;
        tasks
            .values()
            .find(|t| pred(t))
            .cloned()
            .ok_or_else(|| format!("{:?}", summary(&tasks)))
    })
}

/// `id: state@node#attempt` for every task, for failure messages.
pub fn summary(tasks: &BTreeMap<u64, Value>) -> Vec<String> {
    tasks
        .values()
        .map(|t| {
            format!(
                "{}: {}@{}#{}",
                t["id"],
                t["state"].as_str().unwrap_or("?"),
                t["node"],
                t["attempt"]
            )
        })
        .collect()
}

/// Wait until every submitted task is terminal on a serving node; their views.
pub fn wait_finished(mesh: &mut Cluster, work: &[Submitted]) -> BTreeMap<u64, Value> {
    phase("wait until every acknowledged task is terminal");
    eventually("every task terminal", FINISH, || {
        let cli = mesh.any_cli(None);
        let tasks = tasks_on(&cli)?;
        let done = work.iter().all(|s| {
            tasks.get(&s.id).is_some_and(|t| {
                ["succeeded", "failed", "cancelled"].contains(&t["state"].as_str().unwrap_or(""))
            })
        });
        if done {
            Ok(tasks)
        } else {
            Err(format!("{:?}", summary(&tasks)))
        }
    })
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

/// Every task succeeded exactly once with the right bytes, and every serving node
/// holds the same outcome. Returns the final views.
pub fn check_outcomes(mesh: &mut Cluster, dir: &Path, work: &[Submitted]) -> BTreeMap<u64, Value> {
    let views = wait_finished(mesh, work);
    phase("every task succeeded once: attempts 1..n-1 failed and were recorded, attempt n holds the one result");
    let mut heavy_digests = BTreeSet::new();
    for s in work {
        let t = &views[&s.id];
        assert_eq!(
            t["state"], "succeeded",
            "task {} did not succeed: {t}",
            s.id
        );
        let attempt = t["attempt"].as_u64().unwrap();
        let failed: Vec<u64> = errors(t).iter().map(|e| e.0).collect();
        assert_eq!(
            failed,
            (1..attempt).collect::<Vec<_>>(),
            "task {}: every earlier attempt must have one recorded failure: {t}",
            s.id
        );
        let outputs = t["outputs"].as_array().unwrap();
        assert_eq!(outputs.len(), 1, "task {}: one output: {t}", s.id);
        let sha = outputs[0]["sha256"]
            .as_str()
            .unwrap_or_else(|| panic!("task {} has no digest: {t}", s.id));
        match &s.expect {
            Expect::Bytes(want) => assert_eq!(
                sha,
                Digest::of(want).to_hex(),
                "task {}: output digest differs from the CPU reference",
                s.id
            ),
            Expect::SameAsHeavy => {
                heavy_digests.insert(sha.to_string());
            }
        }
    }
    assert!(
        heavy_digests.len() <= 1,
        "identical heavy tasks produced different outputs: {heavy_digests:?}"
    );

    phase("fetch the verified outputs and compare them with the CPU bit for bit");
    let cli = mesh.any_cli(None);
    for s in work {
        if let Expect::Bytes(want) = &s.expect {
            let file = dir.join(format!("result-{}.bin", s.id));
            cli.run_within(
                &[
                    "result",
                    &s.id.to_string(),
                    "--output",
                    file.to_str().unwrap(),
                ],
                CLI_LIMIT,
            )
            .ok();
            let got = std::fs::read(&file).unwrap();
            assert!(
                got == *want,
                "task {}: fetched output differs from the CPU reference",
                s.id
            );
        }
    }

    phase("no duplicate tasks, and an idempotent resubmit returns the existing task");
    let all = tasks_on(&cli).unwrap();
    assert_eq!(
        all.len(),
        work.len(),
        "the mesh holds other tasks than those submitted: {:?}",
        summary(&all)
    );
    let again = &work[0];
    let mut args: Vec<&str> = vec!["--json", "submit"];
    args.extend(again.args.iter().map(String::as_str));
    let out = cli.run_within(&args, CLI_LIMIT).ok().json();
    assert_eq!(
        (task_id(&out), &out["existing"]),
        (again.id.to_string(), &Value::Bool(true)),
        "{out}"
    );

    phase("no node's log shows a second accepted result for any task");
    let logs: Vec<String> = mesh
        .nodes
        .iter()
        .map(|n| mesh_chaos::strip_ansi(&n.log()))
        .collect();
    let mut total = 0;
    for s in work {
        // The worker's line for a report the state machine accepted (see worker.rs).
        let line = format!("attempt reported outcome=task {} succeeded", s.id);
        let accepted: usize = logs.iter().map(|l| l.matches(&line).count()).sum();
        assert!(
            accepted <= 1,
            "task {}: {accepted} results were accepted",
            s.id
        );
        total += accepted;
    }
    assert!(
        total > 0,
        "no accepted result in any log: has the worker's `attempt reported` line changed?"
    );

    phase("every member that serves holds the same outcome for every task");
    let removed: Vec<u64> = nodes(mesh)
        .unwrap()
        .iter()
        .filter(|n| n["health"] == "removed")
        .filter_map(|n| n["id"].as_u64())
        .collect();
    for i in mesh
        .serving()
        .into_iter()
        .filter(|i| !removed.contains(&(*i as u64 + 1)))
    {
        let cli = mesh.cli(i);
        eventually(
            &format!("node {} agrees on every task", i + 1),
            CONVERGE,
            || {
                let theirs = tasks_on(&cli)?;
                for s in work {
                    let (a, b) = (
                        &views[&s.id],
                        theirs.get(&s.id).ok_or(format!("task {} missing", s.id))?,
                    );
                    let key = |t: &Value| {
                        (
                            t["state"].clone(),
                            t["attempt"].clone(),
                            t["node"].clone(),
                            t["outputs"].clone(),
                            t["errors"].clone(),
                        )
                    };
                    if key(a) != key(b) {
                        return Err(format!("task {}: {a} vs {b}", s.id));
                    }
                }
                Ok(())
            },
        );
    }
    views
}

/// Submit on `cli` and poll `task ID` on the same node until the task is terminal.
/// (Not `submit --wait`: on a follower that races the local apply of the forwarded
/// write, see the forwarding test.)
pub fn submit_then_poll(cli: &Cli, args: &[&str]) -> Value {
    let mut full = vec!["--json", "submit"];
    full.extend_from_slice(args);
    let id = task_id(&cli.run_within(&full, CLI_LIMIT).ok().json());
    eventually(
        &format!("task {id} on {} is terminal", cli.node),
        FINISH,
        || {
            let t = json(cli, &["task", &id])?;
            ["succeeded", "failed", "cancelled"]
                .contains(&t["state"].as_str().unwrap_or(""))
                .then_some(t.clone())
                .ok_or(t.to_string())
        },
    )
}

/// Wait until node `i` is back in the mesh: every serving node, `i` included, names
/// the same leader, `i` is a voter in its own view, and it is a follower of that leader
/// (or, after a later election, the leader itself). Its status.
pub fn follows_agreed_leader(mesh: &mut Cluster, i: usize) -> Value {
    eventually(
        &format!("node {} follows the leader the others agree on", i + 1),
        CONVERGE,
        || {
            let l = mesh.agreed_leader().ok_or("no agreed leader")?;
            let s = mesh.status(i).map_err(|e| e.to_string())?;
            let role_ok = if l == i {
                s["role"] == "leader"
            } else {
                s["role"] == "follower"
            };
            (role_ok && voters(&s).len() == 3 && voters(&s).contains(&(i as u64 + 1)))
                .then_some(s.clone())
                .ok_or(s.to_string())
        },
    )
}

/// Wait until node `id` holds a running task; that task's id.
pub fn wait_running_on(mesh: &mut Cluster, id: u64) -> u64 {
    let t = wait_task(mesh, &format!("node {id} runs a task"), |t| {
        t["state"] == "running" && t["node"].as_u64() == Some(id)
    });
    t["id"].as_u64().unwrap()
}

/// Tasks whose errors name `node` with `reason`.
pub fn moved_from(views: &BTreeMap<u64, Value>, node: u64, reason: &str) -> Vec<u64> {
    views
        .values()
        .filter(|t| {
            errors(t)
                .iter()
                .any(|e| e.1 == node && e.2.contains(reason))
        })
        .map(|t| t["id"].as_u64().unwrap())
        .collect()
}

#[test]
fn three_nodes_join_by_token_and_a_follower_forwards_a_submit() {
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path(), 3, &[]);

    phase("all three registered and up: three voters, one leader, two followers");
    let leader = mesh.wait_leader(CONVERGE, |_| true).unwrap();
    let fingerprints: Vec<String> = mesh
        .nodes
        .iter()
        .map(|n| n.fingerprint().unwrap())
        .collect();
    eventually("3 voters with one leader", CONVERGE, || {
        let nodes = nodes(&mut mesh)?;
        let mut roles: Vec<(String, String)> = (1..=3).map(|id| role_health(&nodes, id)).collect();
        roles.sort();
        let want = [("follower", "up"), ("follower", "up"), ("leader", "up")]
            .map(|(r, h)| (r.to_string(), h.to_string()));
        (nodes.len() == 3 && roles == want)
            .then_some(())
            .ok_or(format!("{roles:?}"))
    });
    let nodes = nodes(&mut mesh).unwrap();
    for (i, fp) in fingerprints.iter().enumerate() {
        let n = node(&nodes, i as u64 + 1).unwrap();
        assert_eq!(
            n["fingerprint"],
            fp.as_str(),
            "node {} is registered under another key: {n}",
            i + 1
        );
        assert_eq!(n["addr"], mesh.nodes[i].raft_addr(), "{n}");
    }
    for i in 0..3 {
        let status = eventually(&format!("node {} sees 3 voters", i + 1), CONVERGE, || {
            let s = mesh.status(i).map_err(|e| e.to_string())?;
            (voters(&s) == BTreeSet::from([1, 2, 3]))
                .then_some(s.clone())
                .ok_or(s.to_string())
        });
        assert_eq!(
            status["leader"].as_u64(),
            Some(leader as u64 + 1),
            "node {} names another leader: {status}",
            i + 1
        );
    }

    phase("a saxpy submitted on a follower is forwarded, runs, and matches the CPU");
    let follower = (0..3).find(|i| *i != leader).unwrap();
    assert_eq!(mesh.status(follower).unwrap()["role"], "follower");
    let cli = mesh.cli(follower);
    let work = {
        let n = 1 << 16;
        let (x, y) = (lcg_f32(7, n), lcg_f32(8, n));
        let (xf, yf) = (dir.path().join("x.bin"), dir.path().join("y.bin"));
        std::fs::write(&xf, f32_bytes(&x)).unwrap();
        std::fs::write(&yf, f32_bytes(&y)).unwrap();
        let args: Vec<String> = [
            "--kernel",
            "saxpy",
            "--param",
            "a=-3.25",
            "--input",
            &format!("x=@{}", xf.display()),
            "--input",
            &format!("y=@{}", yf.display()),
            "--idempotency-key",
            "fwd",
        ]
        .map(String::from)
        .to_vec();
        let mut full: Vec<&str> = vec!["--json", "submit"];
        full.extend(args.iter().map(String::as_str));
        full.push("--wait");
        // `submit --wait` is two commands on the follower: the forwarded submit, then
        // `wait ID`, which must see the task the follower just acknowledged.
        let out = cli.run_within(&full, FINISH);
        assert_eq!(
            out.code,
            0,
            "a forwarded `submit --wait` on follower node {} failed (read-your-writes): {}",
            follower + 1,
            out.stderr
        );
        let view = out.json();
        assert_eq!(view["state"], "succeeded", "{view}");
        let want = saxpy_reference("-3.25", &x, &y);
        vec![Submitted {
            id: view["id"].as_u64().unwrap(),
            args,
            expect: Expect::Bytes(want),
        }]
    };
    check_outcomes(&mut mesh, dir.path(), &work);
}

#[test]
fn five_nodes_with_voters_5_reach_five_voters() {
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path(), 5, &["--voters", "5"]);
    let leader = mesh.wait_leader(CONVERGE, |_| true).unwrap();
    phase("autopilot promotes learners until there are 5 voters");
    let status = eventually("5 voters", CONVERGE, || {
        let s = mesh.status(leader).map_err(|e| e.to_string())?;
        (voters(&s) == BTreeSet::from([1, 2, 3, 4, 5]))
            .then_some(s.clone())
            .ok_or(s.to_string())
    });
    assert_eq!(status["role"], "leader", "{status}");
    let nodes = nodes(&mut mesh).unwrap();
    let mut roles: Vec<(String, String)> = (1..=5).map(|id| role_health(&nodes, id)).collect();
    roles.sort();
    assert_eq!(
        roles.iter().filter(|r| r.0 == "leader").count(),
        1,
        "{roles:?}"
    );
    assert_eq!(
        roles.iter().filter(|r| r.0 == "follower").count(),
        4,
        "no learner may remain: {roles:?}"
    );
    assert!(roles.iter().all(|r| r.1 == "up"), "{roles:?}");

    phase("five nodes on one machine share its cores: each runtime has cores / 5 threads");
    let share = format!(
        "worker_threads={}",
        mesh_chaos::core_share(5).expect("a share for five nodes")
    );
    for node in &mesh.nodes {
        let log = mesh_chaos::strip_ansi(&node.log());
        assert!(
            log.lines()
                .any(|l| l.contains("async runtime started") && l.contains(&share)),
            "no 'async runtime started ... {share}' in {}:\n{log}",
            node.data_dir.display()
        );
    }
}

#[test]
fn leader_sigkill_while_tasks_run_loses_nothing_and_the_old_leader_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path(), 3, &[]);
    let leader = mesh.leader_of_three_voters();
    let old = leader as u64 + 1;
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let work = submit_workload(&mesh.cli(follower), dir.path(), "lk", 6, 3);

    phase(&format!(
        "wait until the leader (node {old}) runs a task, then SIGKILL it"
    ));
    wait_running_on(&mut mesh, old);
    mesh.nodes[leader].kill9();

    phase("a new leader is elected among the survivors, and the old one is marked down");
    let new = mesh.wait_leader(CONVERGE, |l| l != leader).unwrap();
    assert_ne!(new, leader);
    // The survivors found the dead leader's port refusing connections and campaigned
    // at the end of its lease (mesh-node/src/leader_watch.rs).
    assert!(
        leader_gone_seen(&mesh, leader) >= 1.0,
        "no survivor saw the killed leader's port refuse connections"
    );
    eventually("the killed leader is marked down", CONVERGE, || {
        let n = nodes(&mut mesh)?;
        (role_health(&n, old).1 == "down")
            .then_some(())
            .ok_or(format!("{:?}", role_health(&n, old)))
    });

    let views = check_outcomes(&mut mesh, dir.path(), &work);
    let moved = moved_from(&views, old, "marked down");
    assert!(
        !moved.is_empty(),
        "the killed leader's task must have moved: {:?}",
        summary(&views)
    );
    for id in &moved {
        let t = &views[id];
        assert!(
            t["attempt"].as_u64().unwrap() >= 2,
            "a moved task runs under a new attempt: {t}"
        );
    }

    phase(&format!(
        "restart node {old} on its data: it rejoins as an up follower and catches up"
    ));
    mesh.nodes[leader].restart().unwrap();
    eventually("the old leader is up again", CONVERGE, || {
        let n = nodes(&mut mesh)?;
        let rh = role_health(&n, old);
        (rh.1 == "up").then_some(()).ok_or(format!("{rh:?}"))
    });
    follows_agreed_leader(&mut mesh, leader);
    check_outcomes(&mut mesh, dir.path(), &work);
}

/// What a restarted node logs when the leader's first AppendEntries ends its hold.
const HELD: &str = "heard from the leader since the restart; elections on";

#[test]
fn a_follower_restarted_again_and_again_never_deposes_the_leader() {
    // A restarted node's election timer (150-300 ms) can run out before the leader,
    // backing off its tries to a node it could not reach (up to 400 ms), reaches it; on
    // a loaded machine it often does (the chaos harness saw 55-459 ms). It would then
    // campaign with a higher term, and the leader steps down at the sight of it. So the
    // node holds its elections until it hears from the leader
    // (mesh-node/src/rejoin_hold.rs): each start says so in its log, and the term
    // never moves.
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path(), 3, &[]);
    let leader = mesh.leader_of_three_voters();
    let term = mesh.status(leader).unwrap()["term"].as_u64().unwrap();
    let follower = (0..3).find(|i| *i != leader).unwrap();
    for round in 1..=3 {
        phase(&format!(
            "round {round}: SIGKILL node {}, wait until the leader backs off from it, restart it",
            follower + 1
        ));
        mesh.nodes[follower].kill9();
        std::thread::sleep(Duration::from_millis(1500));
        let held_before = mesh.nodes[follower].log().matches(HELD).count();
        mesh.nodes[follower].restart().unwrap();
        let back = follows_agreed_leader(&mut mesh, follower);
        assert_eq!(
            back["leader"].as_u64(),
            Some(leader as u64 + 1),
            "round {round}: the leader changed: {back}"
        );
        let now = mesh.status(leader).unwrap();
        assert_eq!(
            (now["role"].as_str(), now["term"].as_u64()),
            (Some("leader"), Some(term)),
            "round {round}: the restarted follower forced an election: {now}"
        );
        eventually(
            "the restart held its elections until it heard from the leader",
            CONVERGE,
            || {
                let log = mesh.nodes[follower].log();
                (log.matches(HELD).count() > held_before)
                    .then_some(())
                    .ok_or(format!("no {HELD:?} since the restart"))
            },
        );
    }
}

#[test]
fn leader_sigstop_longer_than_an_election_then_sigcont_returns_as_follower() {
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path(), 3, &[]);
    let leader = mesh.leader_of_three_voters();
    let old = leader as u64 + 1;
    let follower = (0..3).find(|i| *i != leader).unwrap();
    let work = submit_workload(&mesh.cli(follower), dir.path(), "ls", 6, 3);

    phase(&format!(
        "wait until the leader (node {old}) runs a task, then SIGSTOP it"
    ));
    wait_running_on(&mut mesh, old);
    mesh.nodes[leader].signal("STOP").unwrap();

    phase("while it is paused: the others elect a new leader and mark it down");
    let new = mesh.wait_leader(CONVERGE, |l| l != leader).unwrap();
    eventually("the paused leader is marked down", CONVERGE, || {
        let n = nodes(&mut mesh)?;
        (role_health(&n, old).1 == "down")
            .then_some(())
            .ok_or(format!("{:?}", role_health(&n, old)))
    });
    let during = mesh.status(new).unwrap();
    // A paused process still has its port open: the fast path must not take it for dead.
    for i in (0..3).filter(|i| *i != leader) {
        let gone = metric(&scrape(&mesh.nodes[i]), "mesh_raft_leader_gone_total", &[]);
        assert_eq!(
            gone,
            0.0,
            "node {} took a paused leader for a dead one",
            i + 1
        );
    }

    phase("SIGCONT: the old leader steps down and comes back as an up follower");
    mesh.nodes[leader].signal("CONT").unwrap();
    let views = check_outcomes(&mut mesh, dir.path(), &work);
    let moved = moved_from(&views, old, "marked down");
    assert!(
        !moved.is_empty(),
        "the paused leader's task must have moved: {:?}",
        summary(&views)
    );
    eventually("the paused node is up again", CONVERGE, || {
        let n = nodes(&mut mesh)?;
        let rh = role_health(&n, old);
        (rh.1 == "up").then_some(()).ok_or(format!("{rh:?}"))
    });
    let status = follows_agreed_leader(&mut mesh, leader);
    assert!(
        status["term"].as_u64().unwrap() >= during["term"].as_u64().unwrap(),
        "the resumed node must be on the new term: {status} vs {during}"
    );
}

#[test]
fn a_leader_paused_past_the_probe_and_then_killed_is_still_found_gone() {
    // The leader watch dials a silent leader's port after two missed heartbeats. A
    // paused process's port still accepts, so that first dial is "not refused"; the
    // watch must dial again, or a leader that was slow and then died would be waited
    // out by openraft's timers (the one-off CI failure of the SIGKILL test above).
    // A 1 s election timeout: the lease is 2 s and openraft's own timer 3-4 s, so the
    // pause and the kill both land well inside the lease on a loaded machine.
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path(), 3, &["--election-timeout", "1s"]);
    let leader = mesh.leader_of_three_voters();

    phase("SIGSTOP the leader for 500 ms (the watch's first dial connects), then SIGKILL it");
    mesh.nodes[leader].signal("STOP").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    mesh.nodes[leader].kill9();

    phase("a survivor finds the port refused and campaigns at the end of the lease");
    let new = mesh.wait_leader(CONVERGE, |l| l != leader).unwrap();
    assert_ne!(new, leader);
    assert!(
        leader_gone_seen(&mesh, leader) >= 1.0,
        "no survivor dialled the killed leader again after the pause"
    );
}

#[test]
fn worker_sigkill_moves_its_tasks_to_other_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path(), 3, &[]);
    let leader = mesh.wait_leader(CONVERGE, |_| true).unwrap();
    let work = submit_workload(&mesh.cli(leader), dir.path(), "wk", 6, 3);

    phase("wait until a follower runs a task, then SIGKILL it");
    let t = wait_task(&mut mesh, "a follower runs a task", |t| {
        t["state"] == "running" && t["node"].as_u64().is_some_and(|n| n != leader as u64 + 1)
    });
    let victim = t["node"].as_u64().unwrap();
    mesh.nodes[victim as usize - 1].kill9();

    phase(&format!(
        "node {victim} is marked down; its attempts go back to pending"
    ));
    eventually("the killed worker is marked down", CONVERGE, || {
        let n = nodes(&mut mesh)?;
        (role_health(&n, victim).1 == "down")
            .then_some(())
            .ok_or(format!("{:?}", role_health(&n, victim)))
    });
    let views = check_outcomes(&mut mesh, dir.path(), &work);
    // Pending work remained when it died, so it held an attempt then (the task seen
    // running, or the next one if that had just finished).
    let moved = moved_from(&views, victim, &format!("node {victim} was marked down"));
    assert!(
        !moved.is_empty(),
        "the tasks of node {victim} (seen running task {}) must have moved: {:?}",
        t["id"],
        summary(&views)
    );
    for id in &moved {
        let t = &views[id];
        assert!(t["attempt"].as_u64().unwrap() >= 2, "{t}");
        assert_ne!(
            t["node"].as_u64(),
            Some(victim),
            "a moved task finished on the dead node: {t}"
        );
    }
}

#[test]
fn a_learner_replaces_a_voter_that_stays_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path(), 4, &["--voter-replace-after", "2s"]);
    let leader = mesh.wait_leader(CONVERGE, |_| true).unwrap();
    phase("three voters and one learner");
    let (before, learner) = eventually("3 voters + 1 learner", CONVERGE, || {
        let s = mesh.status(leader).map_err(|e| e.to_string())?;
        let v = voters(&s);
        let n = nodes(&mut mesh)?;
        let learners: Vec<u64> = (1..=4)
            .filter(|id| role_health(&n, *id) == ("learner".into(), "up".into()))
            .collect();
        (v.len() == 3 && learners.len() == 1)
            .then(|| (v.clone(), learners[0]))
            .ok_or(format!("voters {v:?}, learners {learners:?}"))
    });
    let victim = *before.iter().find(|id| **id != leader as u64 + 1).unwrap();

    phase(&format!(
        "SIGKILL voter {victim}; after the replacement delay learner {learner} takes its place"
    ));
    mesh.nodes[victim as usize - 1].kill9();
    let after = eventually(
        "the learner is promoted in place of the dead voter",
        CONVERGE,
        || {
            let l = mesh.agreed_leader().ok_or("no agreed leader")?;
            let s = mesh.status(l).map_err(|e| e.to_string())?;
            let v = voters(&s);
            (v.len() == 3 && v.contains(&learner) && !v.contains(&victim))
                .then_some(v.clone())
                .ok_or(format!("voters {v:?}"))
        },
    );
    assert_eq!(
        after,
        before
            .iter()
            .copied()
            .filter(|id| *id != victim)
            .chain([learner])
            .collect::<BTreeSet<u64>>()
    );
    let n = nodes(&mut mesh).unwrap();
    assert_eq!(
        role_health(&n, victim),
        ("learner".into(), "down".into()),
        "the dead voter is demoted, not forgotten"
    );
    assert_eq!(role_health(&n, learner).1, "up");

    phase("the new voter set serves writes");
    let leader = mesh.wait_leader(CONVERGE, |_| true).unwrap();
    let out = submit_then_poll(
        &mesh.cli(leader),
        &[
            "--kernel",
            "mandelbrot",
            "--param",
            "width=32",
            "--param",
            "height=32",
            "--param",
            "max_iter=64",
        ],
    );
    assert_eq!(out["state"], "succeeded", "{out}");
}

#[test]
fn a_removed_node_leaves_the_voters_and_its_tasks_move() {
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path(), 3, &[]);
    let leader = mesh.leader_of_three_voters();
    let cli = mesh.cli(leader);
    let work = submit_workload(&cli, dir.path(), "rm", 6, 3);

    phase("wait until a follower runs a task, then `mesh-cli remove` it");
    let t = wait_task(&mut mesh, "a follower runs a task", |t| {
        t["state"] == "running" && t["node"].as_u64().is_some_and(|n| n != leader as u64 + 1)
    });
    let victim = t["node"].as_u64().unwrap();
    let out = cli
        .run_within(
            &["--json", "remove", &victim.to_string(), "--yes"],
            CLI_LIMIT,
        )
        .ok()
        .json();
    assert_eq!(out["removed"].as_u64(), Some(victim), "{out}");

    phase(&format!(
        "node {victim} shows `removed` and leaves the voter set"
    ));
    eventually("removed and out of the voters", CONVERGE, || {
        let n = nodes(&mut mesh)?;
        let s = mesh.status(leader).map_err(|e| e.to_string())?;
        let (health, v) = (role_health(&n, victim).1, voters(&s));
        (health == "removed" && !v.contains(&victim))
            .then_some(())
            .ok_or(format!("health {health}, voters {v:?}"))
    });

    let views = check_outcomes(&mut mesh, dir.path(), &work);
    let moved = moved_from(&views, victim, &format!("node {victim} was removed"));
    assert!(
        !moved.is_empty(),
        "the tasks of node {victim} (seen running task {}) must have moved: {:?}",
        t["id"],
        summary(&views)
    );
    for id in &moved {
        assert_ne!(
            views[id]["node"].as_u64(),
            Some(victim),
            "a moved task finished on the removed node: {}",
            views[id]
        );
    }

    phase("the removed node's key is no longer pinned: its node-to-node calls are refused");
    eventually("the removed node logs a refusal", CONVERGE, || {
        let log = mesh_chaos::strip_ansi(&mesh.nodes[victim as usize - 1].log());
        log.contains("not pinned")
            .then_some(())
            .ok_or("no refusal yet".to_string())
    });
}

/// Claim: a node restarted on an older copy of its data directory (a restored backup)
/// has forgotten entries it acknowledged; it refuses to start and says how to recover,
/// and after its directory is emptied it rejoins with a token under a new id.
#[test]
fn a_node_restarted_on_an_older_copy_of_its_data_refuses_and_rejoins_after_a_wipe() {
    use mesh_chaos::nemesis::{copy_dir, wipe_dir, KEEP_ON_WIPE};
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path(), 3, &[]);
    let leader = mesh.wait_leader(CONVERGE, |_| true).unwrap();
    let f = (0..3).find(|i| *i != leader).unwrap();
    let old_id = f as u64 + 1;
    let data = mesh.nodes[f].data_dir.clone();
    let copy = dir.path().join("older-copy");

    phase(&format!(
        "stop node {old_id}, copy its data directory aside, start it again"
    ));
    mesh.nodes[f].kill9();
    copy_dir(&data, &copy, &["node.log"]).unwrap();
    mesh.nodes[f].restart().unwrap();

    phase("commit more entries, which the leader replicates to that node");
    let cli = mesh.cli(leader);
    let ids: Vec<String> = (0..5)
        .map(|k| {
            let out = cli
                .run_within(
                    &[
                        "--json",
                        "submit",
                        "--kernel",
                        "saxpy",
                        "--param",
                        "a=2",
                        "--input",
                        &format!("x=@{}", write_f32(dir.path(), &format!("x{k}"), 64)),
                        "--input",
                        &format!("y=@{}", write_f32(dir.path(), &format!("y{k}"), 64)),
                    ],
                    CLI_LIMIT,
                )
                .ok()
                .json();
            task_id(&out)
        })
        .collect();
    let target = mesh.status(leader).unwrap()["applied_index"]
        .as_u64()
        .unwrap();
    eventually("the node has applied the new entries", CONVERGE, || {
        let s = mesh.status(f).map_err(|e| e.to_string())?;
        (s["applied_index"].as_u64() >= Some(target))
            .then_some(())
            .ok_or(s.to_string())
    });

    // Stop the node, put the copy back as its directory, start it: why it refused.
    let start_on_copy = |mesh: &mut Mesh| {
        mesh.nodes[f].kill9();
        wipe_dir(&data, &["node.log"]).unwrap();
        copy_dir(&copy, &data, &[]).unwrap();
        match mesh.nodes[f].restart() {
            Ok(()) => panic!("node {} started on the copy", f + 1),
            Err(e) => format!("{e:#}"),
        }
    };

    phase("stop it, put the older copy back, start it: it must refuse");
    let err = start_on_copy(&mut mesh);
    assert!(
        err.contains("older than this node's acknowledged state") && err.contains("--join TOKEN"),
        "the refusal names the problem and the way out: {err}"
    );

    phase("the mesh goes on without it; wipe and rejoin brings the machine back");
    wipe_dir(&data, KEEP_ON_WIPE).unwrap();
    let token = mesh.token(1, "10m").unwrap();
    mesh.nodes[f].rejoin(&token).unwrap();
    let new_id = mesh.nodes[f].id().unwrap();
    assert_ne!(new_id, old_id, "it rejoins under a new id");
    eventually("old id removed, new id up", CONVERGE, || {
        let n = nodes(&mut mesh)?;
        let (old, new) = (role_health(&n, old_id).1, role_health(&n, new_id).1);
        (old == "removed" && new == "up")
            .then_some(())
            .ok_or(format!("old {old}, new {new}"))
    });

    phase("stop it, put the old id's copy back once more: it must refuse at once");
    let err = start_on_copy(&mut mesh);
    assert!(
        err.contains("a node id the mesh no longer uses")
            && err.contains(&format!("belongs to node {new_id}"))
            && err.contains("--join TOKEN"),
        "the refusal names the id the key has now and the way out: {err}"
    );
    wipe_dir(&data, KEEP_ON_WIPE).unwrap();
    let token = mesh.token(1, "10m").unwrap();
    mesh.nodes[f].rejoin(&token).unwrap();
    for id in &ids {
        wait_succeeded(&cli, id, FINISH);
    }
}

/// How many times the nodes other than `leader` found its port refusing connections
/// (`mesh_raft_leader_gone_total`, mesh-node/src/leader_watch.rs).
fn leader_gone_seen(mesh: &Mesh, leader: usize) -> f64 {
    (0..mesh.nodes.len())
        .filter(|i| *i != leader)
        .map(|i| metric(&scrape(&mesh.nodes[i]), "mesh_raft_leader_gone_total", &[]))
        .sum()
}

/// Write `n` f32s (0, 1, 2, ...) to `dir/name` for `--input`; returns the path.
fn write_f32(dir: &Path, name: &str, n: usize) -> String {
    let path = dir.join(name);
    let data: Vec<f32> = (0..n).map(|i| i as f32).collect();
    std::fs::write(&path, f32_bytes(&data)).unwrap();
    path.display().to_string()
}
