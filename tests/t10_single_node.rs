//! Claim: a newcomer's first session works on the real stack. A node starts on a
//! fresh data directory with an admin key made by `ssh-keygen`, its fingerprint
//! matches `ssh-keygen -lf`, `mesh-cli pin` pins it, a 1M-element saxpy submitted with
//! `--wait` succeeds, and the fetched result equals a CPU computation bit for bit.
//! Method: spawn the binaries, drive them only through their command lines.

use crate::support::{json, openssh_command, saxpy_reference, wait_succeeded};
use mesh_chaos::{lcg_f32, phase, Cli, Node, UserKey};
use mesh_core::builtin::{cpu_reference, f32_bytes};
use mesh_core::task::NamedBytes;
use mesh_core::Bytes;
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

/// Starts a node with one admin key and returns a pinned client.
pub fn pinned_node(dir: &std::path::Path) -> (Node, Cli, UserKey) {
    let user = UserKey::generate(dir, "alice").unwrap();
    let node = Node::start(&dir.join("node"), &[&user.public]).unwrap();
    let cli = Cli {
        node: node.ssh_addr(),
        identity: user.private.clone(),
        known_hosts: dir.join("known_hosts"),
    };
    let fp = node.fingerprint().unwrap();
    cli.run(&["pin", &node.ssh_addr(), &fp]).ok();
    (node, cli, user)
}

/// The task id in a `submit --json` answer.
pub fn task_id(v: &serde_json::Value) -> String {
    v.get("task")
        .or_else(|| v.get("id"))
        .and_then(|x| x.as_u64())
        .unwrap_or_else(|| panic!("no task id in {v}"))
        .to_string()
}

#[test]
fn saxpy_of_a_million_elements_matches_the_cpu_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    phase("start a node with an ssh-keygen admin key");
    let user = UserKey::generate(dir.path(), "alice").unwrap();
    let node = Node::start(&dir.path().join("node"), &[&user.public]).unwrap();

    phase("mesh-node fingerprint agrees with ssh-keygen -lf");
    let fp = node.fingerprint().unwrap();
    let keygen = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(node.data_dir.join("host_key.pub"))
        .output()
        .unwrap();
    let keygen = String::from_utf8(keygen.stdout).unwrap();
    assert_eq!(
        keygen.split_whitespace().nth(1),
        Some(fp.as_str()),
        "ssh-keygen printed {keygen}"
    );

    phase("pin the node");
    let cli = Cli {
        node: node.ssh_addr(),
        identity: user.private.clone(),
        known_hosts: dir.path().join("known_hosts"),
    };
    let pinned = cli
        .run(&["--json", "pin", &node.ssh_addr(), &fp])
        .ok()
        .json();
    assert_eq!(pinned["fingerprint"], fp);
    let kh = std::fs::read_to_string(&cli.known_hosts).unwrap();
    assert!(
        kh.contains(&format!("[127.0.0.1]:{} ssh-ed25519 ", node.ssh_port)),
        "{kh}"
    );

    phase("submit saxpy over 1M elements and wait");
    let n = 1 << 20;
    let (x, y) = (lcg_f32(1, n), lcg_f32(2, n));
    std::fs::write(dir.path().join("x.bin"), f32_bytes(&x)).unwrap();
    std::fs::write(dir.path().join("y.bin"), f32_bytes(&y)).unwrap();
    let xa = format!("x=@{}", dir.path().join("x.bin").display());
    let ya = format!("y=@{}", dir.path().join("y.bin").display());
    let out = cli
        .run(&[
            "--json", "submit", "--kernel", "saxpy", "--param", "a=2.5", "--input", &xa, "--input",
            &ya, "--wait",
        ])
        .ok()
        .json();
    let id = task_id(&out);

    phase("fetch the result and compare with the CPU");
    let result = dir.path().join("out.bin");
    cli.run(&["result", &id, "--output", result.to_str().unwrap()])
        .ok();
    let got = std::fs::read(&result).unwrap();
    let want = saxpy_reference("2.5", &x, &y);
    assert_eq!(got.len(), n * 4);
    assert!(got == want, "GPU output differs from the CPU reference");

    phase("task shows succeeded with the output digest");
    let task = cli.run(&["--json", "task", &id]).ok().json();
    assert_eq!(task["state"], "succeeded");
    assert_eq!(
        task["outputs"][0]["sha256"],
        mesh_core::Digest::of(&want).to_hex()
    );
}

#[test]
fn builtins_custom_wgsl_png_and_cancel_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, cli, _) = pinned_node(dir.path());

    phase("reduce-sum and matmul match their CPU references");
    let xs = lcg_f32(3, 100_000);
    let xf = dir.path().join("xs.bin");
    std::fs::write(&xf, f32_bytes(&xs)).unwrap();
    let out = cli
        .run(&[
            "--json",
            "submit",
            "--kernel",
            "reduce-sum",
            "--input",
            &format!("x=@{}", xf.display()),
            "--wait",
        ])
        .ok()
        .json();
    let id = task_id(&out);
    let res = dir.path().join("sum.bin");
    cli.run(&["result", &id, "--output", res.to_str().unwrap()])
        .ok();
    let want = cpu_reference(
        "reduce-sum",
        &BTreeMap::new(),
        &[NamedBytes {
            name: "x".into(),
            data: Bytes::from(f32_bytes(&xs)),
        }],
    );
    assert_eq!(std::fs::read(&res).unwrap(), want);

    phase("mandelbrot renders to a PNG");
    let out = cli
        .run(&[
            "--json",
            "submit",
            "--kernel",
            "mandelbrot",
            "--param",
            "width=64",
            "--param",
            "height=48",
            "--param",
            "max_iter=64",
            "--wait",
        ])
        .ok()
        .json();
    let id = task_id(&out);
    let png = dir.path().join("m.png");
    cli.run(&["result", &id, "--png", png.to_str().unwrap()])
        .ok();
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");

    phase("a custom WGSL kernel runs with its declared buffers");
    let wgsl = dir.path().join("double.wgsl");
    std::fs::write(
        &wgsl,
        "@group(0) @binding(0) var<storage, read> x: array<f32>;\n\
         @group(0) @binding(1) var<storage, read_write> y: array<f32>;\n\
         @compute @workgroup_size(64)\n\
         fn main(@builtin(global_invocation_id) id: vec3<u32>) { if (id.x < arrayLength(&x)) { y[id.x] = 2.0 * x[id.x]; } }\n",
    )
    .unwrap();
    let small = dir.path().join("small.bin");
    std::fs::write(&small, f32_bytes(&[1.0, 2.0, 3.0, 4.0])).unwrap();
    let out = cli
        .run(&[
            "--json",
            "submit",
            "--wgsl",
            wgsl.to_str().unwrap(),
            "--entry",
            "main",
            "--workgroups",
            "1,1,1",
            "--input",
            &format!("x=@{}", small.display()),
            "--output",
            "y=16",
            "--wait",
        ])
        .ok()
        .json();
    let id = task_id(&out);
    let res = dir.path().join("y.bin");
    cli.run(&["result", &id, "--output", res.to_str().unwrap()])
        .ok();
    assert_eq!(
        std::fs::read(&res).unwrap(),
        f32_bytes(&[2.0, 4.0, 6.0, 8.0])
    );

    phase("cancel: a cancelled task is terminal and cannot be cancelled twice");
    let out = cli
        .run(&[
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
        ])
        .ok()
        .json();
    let id = task_id(&out);
    let first = cli.run(&["--json", "cancel", &id]);
    let cancelled = first.code == 0;
    let task = cli.run(&["--json", "task", &id]).ok().json();
    if first.code == 0 {
        assert_eq!(task["state"], "cancelled");
        let again = cli.run(&["cancel", &id]);
        assert_ne!(again.code, 0);
        assert!(again.stderr.contains("cancelled"), "{}", again.stderr);
    } else {
        // The tiny task finished before the cancel arrived: refused, and it stays succeeded.
        assert_eq!(task["state"], "succeeded", "{}", first.stderr);
    }

    phase("status and nodes over the CLI");
    let status = cli.run(&["--json", "status"]).ok().json();
    assert_eq!(status["role"], "leader");
    let succeeded = if cancelled { 3 } else { 4 };
    assert_eq!(
        status["tasks"]["succeeded"].as_u64().unwrap(),
        succeeded,
        "{status}"
    );
    let nodes = cli.run(&["--json", "nodes"]).ok().json();
    let adapter = &nodes[0]["capabilities"]["adapters"][0];
    assert!(
        adapter["name"].as_str().is_some_and(|n| !n.is_empty()),
        "{nodes}"
    );
}

#[test]
fn plain_openssh_runs_status_with_an_ssh_keygen_key() {
    let dir = tempfile::tempdir().unwrap();
    let (node, cli, user) = pinned_node(dir.path());
    let out = openssh_command(node.ssh_port, &cli.known_hosts, &user.private)
        .args(["mesh@127.0.0.1", "status"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ssh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("role leader"), "{text}");
}

/// Claim: `submit-batch` takes many tasks in one call: each task is checked on its
/// own (a bad one is refused with its reason, the others go in), answers come back in
/// order, an idempotency key repeated in the batch names one task, every task runs
/// and its result equals the CPU; an oversized batch is refused whole.
#[test]
fn submit_batch_commits_the_valid_tasks_and_refuses_the_bad_one() {
    use mesh_core::api::{BatchItemReply, MAX_BATCH_TASKS};

    let dir = tempfile::tempdir().unwrap();
    let (_node, cli, user) = pinned_node(dir.path());
    let spec = |key: &str, x: Vec<f32>, y: Vec<f32>| saxpy_spec(key, &x, &y, 0);
    let batch = serde_json::json!([
        spec("b-1", lcg_f32(1, 64), lcg_f32(2, 64)),
        spec("b-bad", lcg_f32(3, 64), lcg_f32(4, 63)),
        spec("b-1", lcg_f32(1, 64), lcg_f32(2, 64)),
        spec("b-2", lcg_f32(5, 256), lcg_f32(6, 256)),
    ]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let conn = rt.block_on(session(&cli, &user));
    let exec = |body: Vec<u8>| {
        rt.block_on(conn.exec("submit-batch --json", Some(body)))
            .unwrap()
    };

    phase("a batch of four: two with one key, one bad, one more");
    let out = exec(serde_json::to_vec(&batch).unwrap());
    assert_eq!(
        out.exit_status,
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replies: Vec<BatchItemReply> = serde_json::from_slice(&out.stdout).unwrap();
    let submitted = |i: usize| match &replies[i] {
        BatchItemReply::Submitted(r) => r.clone(),
        other => panic!("task #{i} was not submitted: {other:?}"),
    };
    let (a, again, b) = (submitted(0), submitted(2), submitted(3));
    assert_eq!(a.task, again.task, "one idempotency key, one task");
    assert!(
        a.existing != again.existing,
        "exactly one of the two created it: {a:?} {again:?}"
    );
    assert_ne!(a.task, b.task);
    match &replies[1] {
        BatchItemReply::Refused { error } => {
            assert!(
                error.contains("same length") && error.contains("y is 252 bytes"),
                "the reason names the input: {error}"
            )
        }
        other => panic!("the bad task must be refused: {other:?}"),
    }

    phase("both tasks run, and their results equal the CPU");
    for (id, x, y) in [
        (a.task, lcg_f32(1, 64), lcg_f32(2, 64)),
        (b.task, lcg_f32(5, 256), lcg_f32(6, 256)),
    ] {
        let id = id.to_string();
        wait_succeeded(&cli, &id, Duration::from_secs(120));
        let path = dir.path().join(format!("out-{id}"));
        cli.run(&["result", &id, "--output", path.to_str().unwrap()])
            .ok();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            saxpy_reference("3", &x, &y),
            "task {id}"
        );
    }

    phase("a batch over the limit is refused whole");
    let tiny = spec("t", vec![1.0], vec![2.0]);
    let big: Vec<&serde_json::Value> = std::iter::repeat_n(&tiny, MAX_BATCH_TASKS + 1).collect();
    let out = exec(serde_json::to_vec(&big).unwrap());
    assert_ne!(out.exit_status, Some(0));
    let err =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at most 10000 tasks"), "{err}");
    rt.block_on(conn.close());
}

/// A saxpy (a = 3) task spec as JSON, with an idempotency key and a priority.
fn saxpy_spec(key: &str, x: &[f32], y: &[f32], priority: i32) -> serde_json::Value {
    let t = mesh_core::TaskSpec {
        priority,
        idempotency_key: Some(key.into()),
        ..mesh_core::TaskSpec::builtin(
            "saxpy",
            &[("a", "3")],
            [("x", f32_bytes(x).into()), ("y", f32_bytes(y).into())],
        )
    };
    serde_json::to_value(t).unwrap()
}

/// An SSH session of mesh-cli's own with `user`'s key, to the node `cli` is pinned to.
async fn session(cli: &Cli, user: &UserKey) -> mesh_cli::connection::Connection {
    use mesh_cli::host_keys::HostKeyPolicy;
    use mesh_cli::identity::IdentityChoice;
    let addr = cli.node.parse().unwrap();
    let policy = HostKeyPolicy::load(&addr, &cli.known_hosts).unwrap();
    mesh_cli::connection::Connection::open(
        &addr,
        policy,
        &IdentityChoice::File(user.private.clone()),
    )
    .await
    .unwrap()
}

/// Claim: `submit-stream` takes one task spec per line on a channel that stays open
/// and answers each with one line once it is committed, in input order, also when
/// many lines are in flight; a bad line is refused with its reason and the stream goes
/// on; an idempotency key sent twice names one task; the task runs and its result
/// equals the CPU; at EOF the exit status says a line was refused.
#[test]
fn submit_stream_answers_each_line_in_order_and_goes_on_after_a_bad_one() {
    use mesh_core::api::BatchItemReply;

    let dir = tempfile::tempdir().unwrap();
    let (_node, cli, user) = pinned_node(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let conn = rt.block_on(session(&cli, &user));
    let mut stream = rt
        .block_on(conn.open_lines("submit-stream --json"))
        .unwrap();
    let mut ask = |line: Vec<u8>| -> BatchItemReply {
        rt.block_on(async {
            stream.send(&line).await.unwrap();
            let answer = stream.next_line().await.unwrap().expect("an answer line");
            serde_json::from_slice(&answer).unwrap()
        })
    };
    let (x, y) = (lcg_f32(11, 128), lcg_f32(12, 128));

    phase("one task, answered once committed");
    let BatchItemReply::Submitted(first) =
        ask(saxpy_spec("s-1", &x, &y, 0).to_string().into_bytes())
    else {
        panic!("the first line must be submitted")
    };
    assert!(!first.existing);

    phase("a line that is not a task spec, and one whose inputs do not match: refused, the stream goes on");
    match ask(b"{not json".to_vec()) {
        BatchItemReply::Refused { error } => assert!(error.contains("not valid JSON"), "{error}"),
        other => panic!("{other:?}"),
    }
    match ask(saxpy_spec("s-bad", &x, &y[..100], 0)
        .to_string()
        .into_bytes())
    {
        BatchItemReply::Refused { error } => assert!(error.contains("same length"), "{error}"),
        other => panic!("{other:?}"),
    }

    phase("the same idempotency key again names the same task");
    match ask(saxpy_spec("s-1", &x, &y, 0).to_string().into_bytes()) {
        BatchItemReply::Submitted(again) => {
            assert_eq!(again.task, first.task);
            assert!(again.existing);
        }
        other => panic!("{other:?}"),
    }

    phase("40 lines sent before any answer is read come back in input order");
    let answers: Vec<BatchItemReply> = rt.block_on(async {
        for i in 0..40 {
            let line = saxpy_spec(&format!("p-{i}"), &[1.0], &[2.0], i).to_string();
            stream.send(line.as_bytes()).await.unwrap();
        }
        let mut answers = Vec::new();
        for _ in 0..40 {
            let line = stream.next_line().await.unwrap().expect("an answer line");
            answers.push(serde_json::from_slice(&line).unwrap());
        }
        answers
    });
    for (i, a) in answers.iter().enumerate() {
        let BatchItemReply::Submitted(r) = a else {
            panic!("line {i}: {a:?}")
        };
        let task = json(&cli, &["task", &r.task.to_string()]).unwrap();
        assert_eq!(
            task["priority"], i as i64,
            "answer {i} names the task of line {i}: {task}"
        );
    }

    phase("at EOF: no more output, exit status 1 for the refused lines");
    let end = rt.block_on(stream.finish()).unwrap();
    assert_eq!(end.exit_status, Some(1));
    assert!(
        end.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&end.stdout)
    );

    phase("the first task runs and its result equals the CPU");
    let id = first.task.to_string();
    wait_succeeded(&cli, &id, Duration::from_secs(120));
    let path = dir.path().join("out");
    cli.run(&["result", &id, "--output", path.to_str().unwrap()])
        .ok();
    assert_eq!(std::fs::read(&path).unwrap(), saxpy_reference("3", &x, &y));
    rt.block_on(conn.close());
}

/// Claim: plain OpenSSH can feed `submit-stream` from a file: one answer line per task
/// line, exit status 0 when every line went in.
#[test]
fn plain_openssh_streams_task_lines_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let (node, cli, user) = pinned_node(dir.path());
    let lines: String = (0..3)
        .map(|i| saxpy_spec(&format!("o-{i}"), &[1.0, 2.0], &[3.0, 4.0], 0).to_string() + "\n")
        .collect();
    let file = dir.path().join("tasks.jsonl");
    std::fs::write(&file, lines).unwrap();
    let out = openssh_command(node.ssh_port, &cli.known_hosts, &user.private)
        .args(["mesh@127.0.0.1", "submit-stream"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ssh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answered: Vec<&str> = text.lines().collect();
    assert_eq!(answered.len(), 3, "{text}");
    assert!(
        answered
            .iter()
            .all(|l| l.starts_with("task ") && l.ends_with(" submitted")),
        "{text}"
    );
}

#[test]
fn mesh_cli_submit_stream_answers_each_line_while_the_input_stays_open() {
    use std::io::{BufRead, Write};
    let dir = tempfile::tempdir().unwrap();
    let (_node, cli, _user) = pinned_node(dir.path());

    phase("mesh-cli submit --stream -: a line is answered before the next is written");
    let mut child = Command::new(mesh_chaos::cluster::bin("mesh-cli"))
        .args(["--node", &cli.node, "--identity"])
        .arg(&cli.identity)
        .arg("--known-hosts")
        .arg(&cli.known_hosts)
        .args(["submit", "--stream", "-", "--priority", "7"])
        .env_remove("SSH_AUTH_SOCK")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let answer = |what: &str| -> String {
        rx.recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("no answer for {what} while the input is open: {e}"))
    };
    let spec = |key: &str| saxpy_spec(key, &[1.0, 2.0], &[3.0, 4.0], 0).to_string() + "\n";

    stdin.write_all(spec("st-0").as_bytes()).unwrap();
    stdin.flush().unwrap();
    let first = answer("line 1");
    let id: u64 = first
        .strip_prefix("line 1: task ")
        .and_then(|r| r.strip_suffix(" submitted"))
        .unwrap_or_else(|| panic!("{first}"))
        .parse()
        .unwrap();

    stdin.write_all(b"{not json\n\n").unwrap();
    stdin.flush().unwrap();
    let bad = answer("line 2");
    assert!(
        bad.starts_with("line 2: not submitted: not a task spec"),
        "{bad}"
    );

    // Line 3 was blank (skipped); line 4 repeats line 1's idempotency key.
    stdin.write_all(spec("st-0").as_bytes()).unwrap();
    stdin.flush().unwrap();
    assert_eq!(
        answer("line 4"),
        format!("line 4: task {id} already exists (same idempotency key)")
    );
    let wrong_param = saxpy_spec("st-1", &[1.0], &[2.0], 0)
        .to_string()
        .replace(r#""a":"3""#, r#""a":"three""#);
    stdin
        .write_all(format!("{wrong_param}\n").as_bytes())
        .unwrap();
    drop(stdin);
    let refused = answer("line 5");
    assert!(refused.starts_with("line 5: not submitted: "), "{refused}");
    assert_eq!(
        answer("the summary"),
        "4 line(s): 2 submitted (1 already existed), 2 not submitted"
    );
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "a line was not submitted");

    let view = cli.run(&["--json", "task", &id.to_string()]).ok().json();
    assert_eq!(
        view["priority"], 7,
        "the policy flag applies to each line: {view}"
    );

    phase("--json from a file of 150 lines of 32 KiB inputs (more than the SSH window)");
    let file = dir.path().join("tasks.jsonl");
    let big: Vec<f32> = (0..4096).map(|i| i as f32).collect();
    let lines: String = (0..150)
        .map(|i| saxpy_spec(&format!("sf-{i}"), &big, &big, 0).to_string() + "\n")
        .collect();
    assert!(lines.len() > 4 << 20, "{} bytes", lines.len());
    std::fs::write(&file, lines).unwrap();
    let out = cli
        .run(&["--json", "submit", "--stream", file.to_str().unwrap()])
        .ok();
    let items: Vec<serde_json::Value> = out
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(items.len(), 150, "{}", out.text());
    for (i, item) in items.iter().enumerate() {
        assert_eq!(item["line"], i + 1, "{item}");
        assert!(item["task"].as_u64().is_some(), "{item}");
        assert_eq!(item["existing"], false, "{item}");
    }
}
