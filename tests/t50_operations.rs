//! Claim: the operator-facing surface of a node behaves as docs/security.md and
//! docs/operations.md say. Roles bound every key (a viewer cannot submit; a submitter
//! cannot create tokens nor see, fetch or cancel another key's task; an operator
//! handles every task and drains but creates no token; a removed or unknown key gets
//! nothing; the last admin cannot be removed or demoted) and every refusal is in the
//! audit trail under the actor's fingerprint; plain OpenSSH is a client like mesh-cli,
//! under the same roles; `/metrics` counters move with a workload, `/health/live`
//! answers, and `/health/ready` turns 503 on a node cut off from its quorum (a
//! follower, and a leader) and 200 again once it is back; a flood of bad logins from
//! one address shuts that address out (closed at accept, before the SSH banner) while
//! a good client keeps working; a snapshot restored into a new mesh brings back every
//! task with its state, submitter and result, sends the task that was running back to
//! pending, and brings back the user keys and the audit trail, but no token (and holds
//! no token secret); `mesh-node config check` names an unknown key, and a node honours
//! its config file with flags beating it (its slots, labels, log format and runtime
//! threads).
//! Method: real `mesh-node` processes from `mesh_chaos` on loopback, keys made by
//! `ssh-keygen`, driven through `mesh-cli`, plain `ssh` (bound to 127.0.0.3 for the
//! flood), raw TCP and hand-written HTTP/1.1; faults are SIGSTOP and SIGCONT. Every
//! fault is shown to have taken effect (a write that is not committed, 503, closed
//! connections, the node's own log line) before the recovery is trusted.

use crate::support::{eventually, http_get, json, metric, scrape, CLI_LIMIT, FOREVER};
use crate::t10_single_node::{pinned_node, task_id};
use mesh_chaos::{bin, phase, strip_ansi, Cli, Cluster, Node, UserKey};
use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Bound for anything that converges (a task finishing, a gauge refreshing, an election).
const CONVERGE: Duration = Duration::from_secs(60);

/// Prints the tail of each node's log if the test panics (the nodes' data dirs).
struct DumpLogs(Vec<PathBuf>);

impl Drop for DumpLogs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for d in &self.0 {
                let log =
                    strip_ansi(&std::fs::read_to_string(d.join("node.log")).unwrap_or_default());
                let lines: Vec<&str> = log.lines().collect();
                eprintln!(
                    "===== {} (last 60 lines) =====\n{}",
                    d.display(),
                    lines[lines.len().saturating_sub(60)..].join("\n")
                );
            }
        }
    }
}

/// `mesh-cli ARGS` that must be refused: its stderr, which must name `reason`.
fn refused(cli: &Cli, args: &[&str], reason: &str) -> String {
    let out = cli.run_within(args, CLI_LIMIT);
    assert_ne!(
        out.code,
        0,
        "{args:?} should have been refused; stdout {}",
        out.text()
    );
    assert!(
        out.stderr.contains(reason),
        "{args:?}: the error must say '{reason}': {}",
        out.stderr
    );
    out.stderr
}

/// The same client with another identity.
fn as_key(cli: &Cli, key: &UserKey) -> Cli {
    Cli {
        identity: key.private.clone(),
        ..cli.clone()
    }
}

/// A key's fingerprint as `ssh-keygen -lf` prints it.
fn fingerprint(key: &UserKey) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(&key.public)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("ssh-keygen -lf printed {text}"))
        .to_string()
}

/// `keys add FILE --role ROLE` as `admin`; returns the key's fingerprint.
fn add_key(admin: &Cli, key: &UserKey, role: &str) -> String {
    let v = json(
        admin,
        &["keys", "add", key.public.to_str().unwrap(), "--role", role],
    )
    .unwrap();
    let fp = fingerprint(key);
    assert_eq!(v["added"], serde_json::json!([fp]), "{v}");
    fp
}

/// The audit entry in which `actor` was refused `action` (polled: a follower may
/// apply it a moment later). Also checks that `--actor` filters.
fn refusal_audited(admin: &Cli, actor: &str, action: &str) -> Value {
    eventually(
        &format!("the audit trail shows {actor} refused '{action}'"),
        Duration::from_secs(10),
        || {
            let entries = json(admin, &["audit", "--actor", actor])?;
            let entries = entries.as_array().ok_or("audit is not a list")?;
            if let Some(other) = entries.iter().find(|e| e["actor"] != actor) {
                return Err(format!(
                    "audit --actor {actor} returned another actor's entry: {other}"
                ));
            }
            entries
                .iter()
                .find(|e| {
                    e["action"] == action
                        && e["outcome"]
                            .as_str()
                            .is_some_and(|o| o.starts_with("refused:"))
                })
                .cloned()
                .ok_or_else(|| format!("{entries:?}"))
        },
    )
}

/// The task ids in a `tasks` answer.
fn ids(tasks: &Value) -> Vec<u64> {
    tasks
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {tasks}"))
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect()
}

/// Submit a tiny mandelbrot as `cli`; its id.
fn submit_small(cli: &Cli, tag: u32) -> u64 {
    let w = format!("width={}", 8 + tag);
    let v = json(
        cli,
        &[
            "submit",
            "--kernel",
            "mandelbrot",
            "--param",
            &w,
            "--param",
            "height=8",
            "--param",
            "max_iter=16",
        ],
    )
    .unwrap_or_else(|e| panic!("submit: {e}"));
    task_id(&v).parse().unwrap()
}

/// Submit [`FOREVER`] as `cli` with a long timeout; its id.
fn submit_forever(cli: &Cli, dir: &Path) -> u64 {
    let (wgsl, x) = (dir.join("forever.wgsl"), dir.join("zero.bin"));
    std::fs::write(&wgsl, FOREVER).unwrap();
    std::fs::write(&x, 0f32.to_le_bytes()).unwrap();
    let input = format!("x=@{}", x.display());
    let args = [
        "submit",
        "--wgsl",
        wgsl.to_str().unwrap(),
        "--workgroups",
        // lavapipe bounds every loop; enough workgroups make it run for hours.
        "65535,1024,1",
        "--input",
        &input,
    ];
    let args = [
        &args[..],
        &[
            "--output",
            "y=8",
            "--timeout",
            "120s",
            "--max-attempts",
            "3",
        ],
    ]
    .concat();
    task_id(&json(cli, &args).unwrap_or_else(|e| panic!("submit: {e}")))
        .parse()
        .unwrap()
}

/// The error texts of a task's failed attempts.
fn errors_of(t: &Value) -> Vec<String> {
    t["errors"].as_array().map_or(Vec::new(), |a| {
        a.iter()
            .map(|e| e["error"].as_str().unwrap_or("").to_string())
            .collect()
    })
}

/// Poll `task ID` until the task is terminal; its view.
fn wait_terminal(cli: &Cli, id: u64) -> Value {
    eventually(&format!("task {id} is terminal"), CONVERGE, || {
        let t = json(cli, &["task", &id.to_string()])?;
        ["succeeded", "failed", "cancelled"]
            .contains(&t["state"].as_str().unwrap_or(""))
            .then_some(t.clone())
            .ok_or(t.to_string())
    })
}

/// Run `cmd` with `stdin`, killed after `limit`: (status, stdout, stderr, time taken).
fn run_limited(
    mut cmd: Command,
    stdin: Option<&[u8]>,
    limit: Duration,
) -> (Option<ExitStatus>, Vec<u8>, String, Duration) {
    let start = Instant::now();
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    if let Some(body) = stdin {
        let mut w = child.stdin.take().unwrap();
        let _ = w.write_all(body);
    }
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        match child.try_wait().unwrap() {
            Some(s) => break Some(s),
            None if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let elapsed = start.elapsed();
    (
        status,
        out.join().unwrap_or_default(),
        String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned(),
        elapsed,
    )
}

/// Plain OpenSSH: `ssh [-b BIND] -p PORT ... -i KEY x@127.0.0.1 COMMAND`, `stdin` as
/// the command's standard input.
fn openssh(
    port: u16,
    known_hosts: &Path,
    key: &Path,
    bind: Option<&str>,
    command: &str,
    stdin: Option<&[u8]>,
) -> (Option<ExitStatus>, Vec<u8>, String, Duration) {
    let mut cmd = crate::support::openssh_command(port, known_hosts, key);
    if let Some(b) = bind {
        cmd.args(["-b", b]);
    }
    cmd.arg("x@127.0.0.1").arg(command);
    run_limited(cmd, stdin, CLI_LIMIT)
}

/// Read the first line a server sends on a TCP connection from `source` (a loopback
/// address): `Some(line)` (an SSH server's identification string), or `None` when the
/// connection was closed without a word; and how long that took.
fn first_line_from(source: &str, port: u16) -> (Option<String>, Duration) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use tokio::io::AsyncReadExt;
        let start = Instant::now();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let mut stream = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match stream.read(&mut byte).await {
                    Ok(1) if byte[0] != b'\n' => buf.push(byte[0]),
                    Ok(1) => return true,
                    _ => return false,
                }
            }
        })
        .await
        .expect("the node neither answered nor closed the connection within 10 s");
        let line =
            (read || !buf.is_empty()).then(|| String::from_utf8_lossy(&buf).trim_end().to_string());
        (line, start.elapsed())
    })
}

/// A node started with one admin key, its pinned admin client, the key, and a guard
/// that prints its log on failure.
fn single_node(dir: &Path) -> (Node, Cli, UserKey, DumpLogs) {
    let (node, cli, admin) = pinned_node(dir);
    let guard = DumpLogs(vec![node.data_dir.clone()]);
    (node, cli, admin, guard)
}

#[test]
fn roles_bound_every_key_and_every_refusal_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let (node, admin, admin_key, _logs) = single_node(dir.path());
    let admin_fp = fingerprint(&admin_key);

    phase("the admin adds a viewer and two submitters (keys made by ssh-keygen)");
    let viewer_key = UserKey::generate(dir.path(), "viewer").unwrap();
    let a_key = UserKey::generate(dir.path(), "sub_a").unwrap();
    let b_key = UserKey::generate(dir.path(), "sub_b").unwrap();
    let viewer_fp = add_key(&admin, &viewer_key, "viewer");
    let a_fp = add_key(&admin, &a_key, "submitter");
    let b_fp = add_key(&admin, &b_key, "submitter");
    let (viewer, a, b) = (
        as_key(&admin, &viewer_key),
        as_key(&admin, &a_key),
        as_key(&admin, &b_key),
    );
    let keys = json(&admin, &["keys", "list"]).unwrap();
    let role = |fp: &str| {
        keys.as_array()
            .unwrap()
            .iter()
            .find(|k| k["fingerprint"] == fp)
            .map(|k| k["role"].clone())
    };
    assert_eq!(role(&admin_fp), Some("admin".into()), "{keys}");
    assert_eq!(role(&viewer_fp), Some("viewer".into()), "{keys}");
    assert_eq!(role(&a_fp), Some("submitter".into()), "{keys}");
    assert_eq!(role(&b_fp), Some("submitter".into()), "{keys}");

    phase("the viewer reads the mesh but cannot submit; the refusal is audited");
    json(&viewer, &["status"]).unwrap();
    refused(
        &viewer,
        &[
            "submit",
            "--kernel",
            "mandelbrot",
            "--param",
            "width=8",
            "--param",
            "height=8",
            "--param",
            "max_iter=8",
        ],
        "role viewer",
    );
    refusal_audited(&admin, &viewer_fp, "submit");
    assert!(
        ids(&json(&admin, &["tasks"]).unwrap()).is_empty(),
        "a refused submit created a task"
    );

    phase("a submitter cannot create join tokens; audited");
    refused(&a, &["token", "create"], "role submitter");
    refusal_audited(&admin, &a_fp, "token create");
    assert!(
        json(&admin, &["token", "list"])
            .unwrap()
            .as_array()
            .unwrap()
            .is_empty(),
        "a refused token create made a token"
    );

    phase("drain the only node, so that submitted tasks stay pending");
    json(&admin, &["drain", "1"]).unwrap();
    let task_a = submit_small(&a, 0);
    let task_b = submit_small(&b, 1);
    assert_eq!(
        json(&a, &["task", &task_a.to_string()]).unwrap()["state"],
        "pending"
    );

    phase("submitter B cannot see A's task: `task ID` refused (audited), `tasks` omits it");
    refused(&b, &["task", &task_a.to_string()], "belongs to another key");
    let entry = refusal_audited(&admin, &b_fp, "task");
    assert_eq!(entry["target"], task_a.to_string(), "{entry}");
    assert_eq!(
        ids(&json(&b, &["tasks"]).unwrap()),
        vec![task_b],
        "B must see exactly its own task"
    );
    assert_eq!(
        ids(&json(&a, &["tasks"]).unwrap()),
        vec![task_a],
        "A must see exactly its own task"
    );
    assert_eq!(
        ids(&json(&viewer, &["tasks"]).unwrap()),
        vec![task_a, task_b],
        "a viewer sees every task"
    );

    phase("nor fetch its result (refused, audited)");
    refused(
        &b,
        &["result", &task_a.to_string()],
        "belongs to another key",
    );

    phase("submitter B cannot cancel A's task (audited); A's task stays pending");
    refused(
        &b,
        &["cancel", &task_a.to_string()],
        "belongs to another key",
    );
    let entry = refusal_audited(&admin, &b_fp, "cancel");
    assert_eq!(entry["target"], task_a.to_string(), "{entry}");
    assert_eq!(
        json(&admin, &["task", &task_a.to_string()]).unwrap()["state"],
        "pending"
    );

    phase("submitter A cancels its own task");
    let t = json(&a, &["cancel", &task_a.to_string()]).unwrap();
    assert_eq!(t["state"], "cancelled", "{t}");

    phase("an operator sees and cancels any task and drains, but cannot create tokens");
    let op_key = UserKey::generate(dir.path(), "operator").unwrap();
    let op_fp = add_key(&admin, &op_key, "operator");
    let op = as_key(&admin, &op_key);
    assert_eq!(ids(&json(&op, &["tasks"]).unwrap()), vec![task_a, task_b]);
    let t = json(&op, &["cancel", &task_b.to_string()]).unwrap();
    assert_eq!(t["state"], "cancelled", "{t}");
    json(&op, &["undrain", "1"]).unwrap();
    json(&op, &["drain", "1"]).unwrap();
    refused(&op, &["token", "create"], "role operator");
    refusal_audited(&admin, &op_fp, "token create");

    phase("a removed key loses access at once");
    json(&admin, &["keys", "remove", &b_fp]).unwrap();
    let out = b.run_within(&["--json", "tasks"], CLI_LIMIT);
    assert_ne!(
        out.code,
        0,
        "a removed key still reads tasks: {}",
        out.text()
    );
    let removal = json(&admin, &["audit", "--actor", &admin_fp]).unwrap();
    assert!(
        removal
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "keys remove" && e["target"] == b_fp && e["outcome"] == "ok"),
        "{removal}"
    );

    phase("an unknown key gets nothing: authentication fails, nothing is audited under it");
    let stranger_key = UserKey::generate(dir.path(), "stranger").unwrap();
    let stranger_fp = fingerprint(&stranger_key);
    let out = as_key(&admin, &stranger_key).run_within(&["--json", "status"], CLI_LIMIT);
    assert_ne!(out.code, 0, "an unknown key ran status: {}", out.text());
    assert!(
        !out.text().contains("\"role\""),
        "an unknown key got a status answer: {}",
        out.text()
    );
    let all = json(&admin, &["audit"]).unwrap();
    assert!(
        !all.to_string().contains(&stranger_fp),
        "an unauthenticated key reached the audit trail: {all}"
    );

    phase("the last admin key cannot be removed or demoted; both refusals are audited");
    refused(&admin, &["keys", "remove", &admin_fp], "last admin");
    let entry = refusal_audited(&admin, &admin_fp, "keys remove");
    assert_eq!(entry["target"], admin_fp, "{entry}");
    refused(
        &admin,
        &[
            "keys",
            "add",
            admin_key.public.to_str().unwrap(),
            "--role",
            "viewer",
        ],
        "last admin",
    );
    refusal_audited(&admin, &admin_fp, "keys add");
    let keys = json(&admin, &["keys", "list"]).unwrap();
    let admins = keys
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["role"] == "admin")
        .count();
    assert_eq!(
        admins, 1,
        "the admin key must still be the one admin: {keys}"
    );
    drop(node);
}

#[test]
fn plain_openssh_works_under_the_viewer_role_and_is_refused_a_submit() {
    let dir = tempfile::tempdir().unwrap();
    let (node, admin, admin_key, _logs) = single_node(dir.path());
    let viewer_key = UserKey::generate(dir.path(), "viewer").unwrap();
    let viewer_fp = add_key(&admin, &viewer_key, "viewer");
    // The example of docs/ssh-protocol.md: a saxpy over two elements.
    let spec = br#"{"kernel": {"builtin": {"name": "saxpy", "params": {"a": "2"}}},
        "inputs": [{"name": "x", "data": "AACAPwAAAEA="}, {"name": "y", "data": "AAAgQQAAoEE="}],
        "requirements": [], "priority": 0, "timeout": 60000, "max_attempts": 3}"#;

    phase("the viewer runs `status` with plain ssh");
    let (status, stdout, stderr, _) = openssh(
        node.ssh_port,
        &admin.known_hosts,
        &viewer_key.private,
        None,
        "status",
        None,
    );
    let text = String::from_utf8_lossy(&stdout);
    assert!(
        status.is_some_and(|s| s.success()),
        "ssh status as viewer failed: {stderr}"
    );
    assert!(text.contains("role leader"), "{text}");

    phase("the viewer's `submit` over plain ssh is refused naming its role, and audited");
    let (status, stdout, stderr, _) = openssh(
        node.ssh_port,
        &admin.known_hosts,
        &viewer_key.private,
        None,
        "submit --json",
        Some(spec),
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "stdout {} stderr {stderr}",
        String::from_utf8_lossy(&stdout)
    );
    assert!(
        stderr.starts_with("error: permission denied") && stderr.contains("role viewer"),
        "{stderr}"
    );
    let err: Value = serde_json::from_slice(&stdout)
        .unwrap_or_else(|e| panic!("no JSON error ({e}): {}", String::from_utf8_lossy(&stdout)));
    assert!(
        err["error"]
            .as_str()
            .is_some_and(|e| e.contains("role viewer")),
        "{err}"
    );
    refusal_audited(&admin, &viewer_fp, "submit");
    assert!(
        ids(&json(&admin, &["tasks"]).unwrap()).is_empty(),
        "a refused submit created a task"
    );

    phase("the viewer's `submit-stream` lines are each refused, audited, and the exit is 1");
    let line: Vec<u8> = spec.iter().copied().filter(|b| *b != b'\n').collect();
    let (status, stdout, stderr, _) = openssh(
        node.ssh_port,
        &admin.known_hosts,
        &viewer_key.private,
        None,
        "submit-stream",
        Some(&[&line[..], b"\n", &line[..], b"\n"].concat()),
    );
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{stderr}");
    let answers = String::from_utf8_lossy(&stdout);
    let lines: Vec<&str> = answers.lines().collect();
    assert_eq!(lines.len(), 2, "one answer per line: {answers}");
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("refused: permission denied") && l.contains("role viewer")),
        "{answers}"
    );
    refusal_audited(&admin, &viewer_fp, "submit-stream");
    assert!(
        ids(&json(&admin, &["tasks"]).unwrap()).is_empty(),
        "a refused submit-stream line created a task"
    );

    phase("the same body from the admin key over plain ssh is accepted and runs");
    let (status, stdout, stderr, _) = openssh(
        node.ssh_port,
        &admin.known_hosts,
        &admin_key.private,
        None,
        "submit --json",
        Some(spec),
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "admin submit over ssh failed: {stderr}"
    );
    let id = task_id(&serde_json::from_slice(&stdout).unwrap());
    let (status, stdout, stderr, _) = openssh(
        node.ssh_port,
        &admin.known_hosts,
        &admin_key.private,
        None,
        &format!("wait {id} --json"),
        None,
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "wait over ssh: {stderr}"
    );
    let t: Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(t["state"], "succeeded", "{t}");
}

#[test]
fn metrics_move_with_a_workload_and_readiness_follows_the_quorum() {
    let dir = tempfile::tempdir().unwrap();
    phase("start 3 nodes (node 1 bootstraps, two join with a token)");
    let mut mesh = Cluster::start(dir.path(), 3, &[])
        .unwrap_or_else(|e| panic!("cluster did not start: {e:#}"));
    let _logs = DumpLogs(mesh.nodes.iter().map(|n| n.data_dir.clone()).collect());
    let cli = mesh.cli(0);

    phase("every node is live and ready");
    for n in &mesh.nodes {
        assert_eq!(
            http_get(n.http_port, "/health/live").unwrap(),
            (200, "live\n".into())
        );
        let ready = eventually("ready", Duration::from_secs(20), || {
            readiness(n.http_port, 200)
        });
        assert_eq!(ready, "ready\n");
    }

    phase("scrape, submit a workload through node 1, scrape while it runs and after");
    let total = |what: &str, labels: &[(&str, &str)]| {
        mesh.nodes
            .iter()
            .map(|n| metric(&scrape(n), what, labels))
            .sum::<f64>()
    };
    let submitted_before = metric(&scrape(&mesh.nodes[0]), "mesh_tasks_submitted_total", &[]);
    let finished_before = total("mesh_attempts_finished_total", &[("outcome", "succeeded")]);
    let succeeded_before = metric(
        &scrape(&mesh.nodes[0]),
        "mesh_tasks",
        &[("state", "succeeded")],
    );
    const N: u32 = 6;
    let work: Vec<u64> = (0..N).map(|i| submit_small(&cli, i)).collect();
    let mid = scrape(&mesh.nodes[0]);
    let submitted_mid = metric(&mid, "mesh_tasks_submitted_total", &[]);
    assert_eq!(
        submitted_mid - submitted_before,
        f64::from(N),
        "every accepted submit counts on the node that took it"
    );
    for id in &work {
        assert_eq!(wait_terminal(&cli, *id)["state"], "succeeded");
    }
    let after = scrape(&mesh.nodes[0]);
    assert_eq!(
        metric(&after, "mesh_tasks_submitted_total", &[]),
        submitted_mid,
        "no further submits were made"
    );
    // A worker counts its attempt once its report is acknowledged, which may be a
    // moment after the task shows succeeded elsewhere.
    eventually(
        "the workers count the finished attempts",
        Duration::from_secs(20),
        || {
            let after = total("mesh_attempts_finished_total", &[("outcome", "succeeded")]);
            (after - finished_before >= f64::from(N))
                .then_some(())
                .ok_or(format!("{finished_before} -> {after}"))
        },
    );
    for (i, n) in mesh.nodes.iter().enumerate() {
        // Gauges from each node's copy of the replicated state, refreshed every second.
        eventually(
            &format!("node {} reports {N} more succeeded tasks", i + 1),
            Duration::from_secs(20),
            || {
                let v = metric(&scrape(n), "mesh_tasks", &[("state", "succeeded")]);
                (v - succeeded_before == f64::from(N))
                    .then_some(())
                    .ok_or(format!("mesh_tasks{{state=\"succeeded\"}} {v}"))
            },
        );
    }

    phase("pause the leader and the other follower: the remaining follower's readiness turns 503");
    let leader = mesh.wait_leader(CONVERGE, |_| true).unwrap();
    let keep = (0..3).find(|i| *i != leader).unwrap();
    let paused: Vec<usize> = (0..3).filter(|i| *i != keep).collect();
    for i in &paused {
        mesh.nodes[*i].signal("STOP").unwrap();
    }
    let kept = &mesh.nodes[keep];
    let why = eventually(
        &format!("node {} is not ready", keep + 1),
        Duration::from_secs(30),
        || readiness(kept.http_port, 503),
    );
    phase(&format!("node {} answers 503: {}", keep + 1, why.trim()));
    assert!(
        why.starts_with("not ready: ")
            && (why.contains("no Raft leader known") || why.contains("cut off from the leader")),
        "{why}"
    );
    assert_eq!(
        http_get(kept.http_port, "/health/live").unwrap().0,
        200,
        "a node cut off is still live"
    );

    phase("continue them: readiness returns to 200");
    for i in &paused {
        mesh.nodes[*i].signal("CONT").unwrap();
    }
    every_node_ready_again(&mesh);
}

/// `/health/ready`'s body when it answers `want`, else what it answered.
fn readiness(port: u16, want: u16) -> Result<String, String> {
    match http_get(port, "/health/ready")? {
        (code, body) if code == want => Ok(body),
        other => Err(format!("{other:?}")),
    }
}

fn every_node_ready_again(mesh: &Cluster) {
    for (i, n) in mesh.nodes.iter().enumerate() {
        eventually(&format!("node {} ready again", i + 1), CONVERGE, || {
            readiness(n.http_port, 200)
        });
    }
}

/// The same claim for the other side of a partition: a leader whose two followers
/// are gone can commit nothing, so it must not call itself ready either.
#[test]
fn a_leader_cut_off_from_its_quorum_is_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    phase("start 3 nodes (node 1 bootstraps, two join with a token)");
    let mut mesh = Cluster::start(dir.path(), 3, &[])
        .unwrap_or_else(|e| panic!("cluster did not start: {e:#}"));
    let _logs = DumpLogs(mesh.nodes.iter().map(|n| n.data_dir.clone()).collect());
    let leader = mesh.wait_leader(CONVERGE, |_| true).unwrap();
    let cli = mesh.cli(leader);
    let port = mesh.nodes[leader].http_port;
    eventually("the leader is ready", Duration::from_secs(20), || {
        readiness(port, 200)
    });

    phase(&format!("pause both followers of leader {}", leader + 1));
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for i in &followers {
        mesh.nodes[*i].signal("STOP").unwrap();
    }
    // The fault took effect: a write through the leader is not committed.
    let out = cli.run_within(
        &[
            "--json",
            "submit",
            "--kernel",
            "mandelbrot",
            "--param",
            "width=8",
            "--param",
            "height=8",
            "--param",
            "max_iter=8",
        ],
        Duration::from_secs(3),
    );
    assert_ne!(
        out.code,
        0,
        "a leader without a quorum committed a submit: {}",
        out.text()
    );
    let status = http_get(port, "/health/status").unwrap().1;
    phase(&format!(
        "a submit got no commit ({}); leader's status: {status}",
        out.stderr.trim()
    ));

    phase("the leader's /health/ready must turn 503");
    let why = eventually(
        &format!("node {} (leader without a quorum) is not ready", leader + 1),
        Duration::from_secs(15),
        || {
            readiness(port, 503).map_err(|e| {
                let status = http_get(port, "/health/status").map(|s| s.1);
                format!("{e}; status {}", status.unwrap_or_default())
            })
        },
    );
    phase(&format!("the leader answers 503: {}", why.trim()));

    phase("continue the followers: every node is ready again");
    for i in &followers {
        mesh.nodes[*i].signal("CONT").unwrap();
    }
    every_node_ready_again(&mesh);
}

#[test]
fn a_flood_of_bad_logins_shuts_its_address_out_while_a_good_client_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let (node, admin, _, _logs) = single_node(dir.path());
    let mallory = UserKey::generate(dir.path(), "mallory").unwrap();
    const FLOODER: &str = "127.0.0.3";

    phase("before the flood, a connection from 127.0.0.3 is greeted with the SSH banner");
    let (banner, _) = first_line_from(FLOODER, node.ssh_port);
    assert!(
        banner.as_deref().is_some_and(|b| b.starts_with("SSH-2.0-")),
        "{banner:?}"
    );

    phase("a good client from 127.0.0.1 keeps running `status` during the flood");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let good = {
        let (admin, stop) = (admin.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut results = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let out = admin.run_within(&["--json", "status"], CLI_LIMIT);
                results.push((out.code, out.stderr));
                std::thread::sleep(Duration::from_millis(50));
            }
            results
        })
    };

    phase("flood: ssh -b 127.0.0.3 with an unknown key, again and again");
    let mut attempts = Vec::new();
    for i in 1..=16 {
        let (status, _, stderr, took) = openssh(
            node.ssh_port,
            &admin.known_hosts,
            &mallory.private,
            Some(FLOODER),
            "status",
            None,
        );
        assert!(
            !status.is_some_and(|s| s.success()),
            "attempt {i}: an unknown key logged in"
        );
        let denied = stderr.contains("Permission denied");
        eprintln!(
            "attempt {i}: {} in {took:?}: {}",
            if denied { "denied" } else { "closed" },
            stderr.trim()
        );
        attempts.push(denied);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let good = good.join().unwrap();

    phase("the first 10 were denied; then the address was shut out and stayed so");
    assert!(
        attempts[..10].iter().all(|d| *d),
        "the burst of 10 failures must be answered normally: {attempts:?}"
    );
    let first_closed = attempts
        .iter()
        .position(|d| !*d)
        .unwrap_or_else(|| panic!("16 failed logins and never shut out: {attempts:?}"));
    assert!(
        attempts[first_closed..].iter().all(|d| !*d),
        "a shut-out address got through again: {attempts:?}"
    );
    let (line, took) = first_line_from(FLOODER, node.ssh_port);
    eprintln!("raw TCP from {FLOODER} after the flood: {line:?} in {took:?}");
    assert_eq!(
        line, None,
        "a shut-out address must be closed at accept, before the SSH banner"
    );
    let (banner, _) = first_line_from("127.0.0.1", node.ssh_port);
    assert!(
        banner.as_deref().is_some_and(|b| b.starts_with("SSH-2.0-")),
        "127.0.0.1 must still be served: {banner:?}"
    );
    let log = strip_ansi(&node.log());
    assert!(
        log.lines()
            .any(|l| l.contains("too many failed logins") && l.contains(FLOODER)),
        "the node must log the shut-out of {FLOODER}"
    );

    phase("the good client never failed, and the node still takes work");
    let failures: Vec<_> = good.iter().filter(|(code, _)| *code != 0).collect();
    assert!(
        !good.is_empty() && failures.is_empty(),
        "{} good calls, failures: {failures:?}",
        good.len()
    );
    let id = submit_small(&admin, 0);
    assert_eq!(wait_terminal(&admin, id)["state"], "succeeded");
    let m = scrape(&node);
    assert!(
        metric(&m, "mesh_ssh_auth_failures_total", &[]) >= 10.0,
        "{m}"
    );
    assert!(
        metric(&m, "mesh_ssh_rate_limited_total", &[("what", "auth")]) >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "mesh_ssh_connections_refused_total",
            &[("reason", "shut_out")]
        ) >= 1.0,
        "{m}"
    );
}

#[test]
fn a_snapshot_restores_tasks_results_keys_and_audit_into_a_new_mesh() {
    let dir = tempfile::tempdir().unwrap();
    let (mut node, admin, admin_key, _logs) = single_node(dir.path());
    let viewer_key = UserKey::generate(dir.path(), "viewer").unwrap();
    let sub_key = UserKey::generate(dir.path(), "submitter").unwrap();
    let viewer_fp = add_key(&admin, &viewer_key, "viewer");
    let sub_fp = add_key(&admin, &sub_key, "submitter");
    let (viewer, sub) = (as_key(&admin, &viewer_key), as_key(&admin, &sub_key));

    phase("complete some tasks (one cancelled), then leave one pending on a drained node");
    let done: Vec<u64> = (0..3)
        .map(|i| submit_small(if i == 1 { &sub } else { &admin }, i))
        .collect();
    for id in &done {
        assert_eq!(wait_terminal(&admin, *id)["state"], "succeeded");
    }
    phase("one task runs (a kernel that never ends) when the snapshot is taken");
    let running = submit_forever(&admin, dir.path());
    eventually("the endless task runs", CONVERGE, || {
        let t = json(&admin, &["task", &running.to_string()])?;
        (t["state"] == "running").then_some(()).ok_or(t.to_string())
    });
    json(&admin, &["drain", "1"]).unwrap();
    let cancelled = submit_small(&sub, 7);
    json(&sub, &["cancel", &cancelled.to_string()]).unwrap();
    let pending = submit_small(&admin, 9);
    let token = json(&admin, &["token", "create"]).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let before = json(&admin, &["tasks"]).unwrap();
    assert_eq!(before.as_array().unwrap().len(), 6);
    let state_of = |id: u64| {
        before
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == id)
            .unwrap()["state"]
            .clone()
    };
    assert_eq!(state_of(running), "running", "{before}");
    assert_eq!(state_of(pending), "pending", "{before}");
    let result_file = dir.path().join("before.bin");
    admin
        .run_within(
            &[
                "result",
                &done[0].to_string(),
                "--output",
                result_file.to_str().unwrap(),
            ],
            CLI_LIMIT,
        )
        .ok();

    phase("a viewer cannot take a snapshot (refused, audited)");
    let snap = dir.path().join("mesh.snap");
    refused(
        &viewer,
        &["snapshot", "save", snap.to_str().unwrap()],
        "role viewer",
    );
    assert!(!snap.exists(), "a refused snapshot left a file");
    refusal_audited(&admin, &viewer_fp, "snapshot save");

    phase("the admin saves a snapshot; it holds no token secret");
    let saved = json(&admin, &["snapshot", "save", snap.to_str().unwrap()]).unwrap();
    let bytes = std::fs::read(&snap).unwrap();
    assert_eq!(saved["bytes"].as_u64(), Some(bytes.len() as u64), "{saved}");
    let secret = token
        .strip_prefix("mesh1-")
        .unwrap()
        .split(['.', '@'])
        .nth(1)
        .unwrap()
        .to_string();
    let raw_secret = hex::decode(&secret).unwrap();
    assert!(
        !bytes.windows(secret.len()).any(|w| w == secret.as_bytes())
            && !bytes.windows(raw_secret.len()).any(|w| w == raw_secret),
        "the snapshot holds a token secret"
    );
    let audit_before = json(&admin, &["audit"]).unwrap();

    phase("stop the node; start a fresh one on a new data dir with --restore (same admin key)");
    node.signal("TERM").unwrap();
    eventually(
        "the old node exits on SIGTERM",
        Duration::from_secs(20),
        || {
            (!node.is_running())
                .then_some(())
                .ok_or("running".to_string())
        },
    );
    drop(node);
    let new_dir = dir.path().join("restored");
    let mut restored = Node::start_with(
        &new_dir,
        &[&admin_key.public],
        &["--restore", snap.to_str().unwrap()],
    )
    .unwrap();
    let _new_logs = DumpLogs(vec![new_dir.clone()]);
    let admin2 = Cli {
        node: restored.ssh_addr(),
        known_hosts: dir.path().join("known_hosts_restored"),
        ..admin.clone()
    };
    admin2
        .run_within(
            &[
                "pin",
                &restored.ssh_addr(),
                &restored.fingerprint().unwrap(),
            ],
            CLI_LIMIT,
        )
        .ok();

    phase("every task came back with its state, submitter and result digests");
    let after = json(&admin2, &["tasks"]).unwrap();
    let key = |t: &Value| {
        (
            t["id"].clone(),
            t["kernel"].clone(),
            t["submitter"].clone(),
            t["outputs"].clone(),
        )
    };
    let (before_tasks, after_tasks) = (before.as_array().unwrap(), after.as_array().unwrap());
    assert_eq!(
        after_tasks.len(),
        before_tasks.len(),
        "before {before}\nafter {after}"
    );
    for (b, a) in before_tasks.iter().zip(after_tasks) {
        if [Some(pending), Some(running)].contains(&b["id"].as_u64()) {
            // Pending or running in the snapshot: the new mesh may be running it.
            assert_eq!((&a["id"], &a["submitter"]), (&b["id"], &b["submitter"]));
        } else {
            assert_eq!(key(a), key(b), "task changed in the restore");
            assert_eq!(a["state"], b["state"], "task {} changed state", b["id"]);
        }
    }
    let result_after = dir.path().join("after.bin");
    admin2
        .run_within(
            &[
                "result",
                &done[0].to_string(),
                "--output",
                result_after.to_str().unwrap(),
            ],
            CLI_LIMIT,
        )
        .ok();
    assert_eq!(
        std::fs::read(&result_after).unwrap(),
        std::fs::read(&result_file).unwrap(),
        "the restored result bytes differ"
    );

    phase("the task that ran at the snapshot is back to pending with the reason, runs again, is cancelled");
    let t = json(&admin2, &["task", &running.to_string()]).unwrap();
    assert!(
        errors_of(&t)
            .iter()
            .any(|e| e.contains("in flight when the mesh was restored")),
        "{t}"
    );
    assert!(
        ["pending", "assigned", "running"].contains(&t["state"].as_str().unwrap()),
        "{t}"
    );
    eventually(
        "the restored task runs again, as a new attempt",
        CONVERGE,
        || {
            let t = json(&admin2, &["task", &running.to_string()])?;
            (t["state"] == "running" && t["attempt"].as_u64() >= Some(2))
                .then_some(())
                .ok_or(t.to_string())
        },
    );
    let t = json(&admin2, &["cancel", &running.to_string()]).unwrap();
    assert_eq!(t["state"], "cancelled", "{t}");

    phase("the user keys came back: the viewer and the submitter log in under their roles");
    let keys = json(&admin2, &["keys", "list"]).unwrap();
    for (fp, role) in [
        (&viewer_fp, "viewer"),
        (&sub_fp, "submitter"),
        (&fingerprint(&admin_key), "admin"),
    ] {
        assert!(
            keys.as_array()
                .unwrap()
                .iter()
                .any(|k| k["fingerprint"] == **fp && k["role"] == role),
            "{fp} {role}: {keys}"
        );
    }
    let viewer2 = as_key(&admin2, &viewer_key);
    json(&viewer2, &["status"]).unwrap();
    refused(
        &viewer2,
        &[
            "submit",
            "--kernel",
            "mandelbrot",
            "--param",
            "width=8",
            "--param",
            "height=8",
            "--param",
            "max_iter=8",
        ],
        "role viewer",
    );
    assert_eq!(
        ids(&json(&as_key(&admin2, &sub_key), &["tasks"]).unwrap()),
        vec![done[1], cancelled],
        "the submitter owns its restored tasks"
    );

    phase("the audit trail came back with a restore entry; the token did not");
    let audit_after = json(&admin2, &["audit"]).unwrap();
    let entries = |v: &Value| -> Vec<(Value, Value, Value, Value)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["actor"].clone(),
                    e["action"].clone(),
                    e["target"].clone(),
                    e["outcome"].clone(),
                )
            })
            .collect()
    };
    let (old, new) = (entries(&audit_before), entries(&audit_after));
    for e in &old {
        assert!(new.contains(e), "audit entry lost in the restore: {e:?}");
    }
    assert_eq!(
        audit_after
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "restore" && e["outcome"] == "ok")
            .count(),
        1,
        "{audit_after}"
    );
    assert!(
        json(&admin2, &["token", "list"])
            .unwrap()
            .as_array()
            .unwrap()
            .is_empty(),
        "tokens must not be restored"
    );

    phase("the task that was pending runs on the new mesh; new tasks get new ids");
    assert_eq!(wait_terminal(&admin2, pending)["state"], "succeeded");
    let fresh = submit_small(&admin2, 11);
    assert!(
        ids(&before).iter().all(|id| *id < fresh),
        "new task id {fresh} reuses a restored id"
    );

    phase("a restart ignores --restore: nothing is loaded twice");
    restored.restart().unwrap();
    let again = json(&admin2, &["tasks"]).unwrap();
    assert_eq!(
        again.as_array().unwrap().len(),
        before_tasks.len() + 1,
        "{again}"
    );
    let audit = json(&admin2, &["audit"]).unwrap();
    assert_eq!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "restore")
            .count(),
        1,
        "{audit}"
    );
}

#[test]
fn config_check_names_unknown_keys_and_a_node_honours_its_file_with_flags_first() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("node.toml");
    std::fs::write(&good, "slots = 3\nlabels = { zone = \"lab\", rack = \"r1\" }\nlog_format = \"json\"\nnode_timeout = \"2s\"\nworker_threads = 3\n").unwrap();

    phase("config check accepts a good file and prints its settings");
    let out = Command::new(bin("mesh-node"))
        .args(["config", "check"])
        .arg(&good)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("is valid"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["slots", "3"]),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["worker_threads", "3"]),
        "{text}"
    );
    assert!(
        text.contains("zone") && text.contains("lab") && text.contains("2s"),
        "{text}"
    );

    phase("config check refuses an unknown key, naming it, and a bad value, naming the setting");
    for (name, body, word) in [
        ("typo.toml", "slots = 1\nsloots = 2\n", "sloots"),
        ("voters.toml", "voters = 4\n", "voters"),
    ] {
        let bad = dir.path().join(name);
        std::fs::write(&bad, body).unwrap();
        let out = Command::new(bin("mesh-node"))
            .args(["config", "check"])
            .arg(&bad)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{name} accepted: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            err.starts_with("error: ") && err.contains(word),
            "the error must name '{word}': {err}"
        );
    }

    phase("a node runs with --config FILE --slots 2 --label rack=r9 --worker-threads 1");
    let admin = UserKey::generate(dir.path(), "admin").unwrap();
    let args = [
        "--config",
        good.to_str().unwrap(),
        "--slots",
        "2",
        "--label",
        "rack=r9",
        "--worker-threads",
        "1",
    ];
    let node = Node::start_with(&dir.path().join("node"), &[&admin.public], &args).unwrap();
    let _logs = DumpLogs(vec![node.data_dir.clone()]);
    let cli = Cli {
        node: node.ssh_addr(),
        identity: admin.private.clone(),
        known_hosts: dir.path().join("known_hosts"),
    };
    cli.run_within(
        &["pin", &node.ssh_addr(), &node.fingerprint().unwrap()],
        CLI_LIMIT,
    )
    .ok();
    let nodes = json(&cli, &["nodes"]).unwrap();
    let caps = &nodes[0]["capabilities"];
    assert_eq!(
        caps["slots"], 2,
        "the flag beats the file's slots = 3: {caps}"
    );
    assert_eq!(
        caps["labels"],
        serde_json::json!({ "zone": "lab", "rack": "r9" }),
        "file labels, the flag's rack over the file's: {caps}"
    );

    phase("the file's log_format = \"json\" took effect: every log line is a JSON object");
    let log = node.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "empty log");
    for l in &lines {
        let v: Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
    }
    // The first JSON log line whose message is `message`.
    let line = |message: &str| {
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("no '{message}' line in the log:\n{log}"))
    };
    let started = line("GPU workers ready");
    assert_eq!(
        started["fields"]["started"], 2,
        "one GPU worker per slot: {started}"
    );
    let runtime = line("async runtime started");
    assert_eq!(
        runtime["fields"]["worker_threads"], 1,
        "the flag's one worker thread beats the file's three: {runtime}"
    );
}
