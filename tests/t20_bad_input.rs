//! Claim: bad input gets a clear, one-line error and changes nothing. Invalid WGSL,
//! an unknown kernel, wrong input sizes, an output over the size limit, an unknown
//! SSH key, an unpinned host and a wrong host pin each fail with a message that names
//! the problem, and the task list is unchanged afterwards.
//! Method: real node and CLI; count tasks before and after every refusal.

use crate::t10_single_node::pinned_node;
use mesh_chaos::{phase, Cli, UserKey};

fn task_count(cli: &Cli) -> usize {
    cli.run(&["--json", "tasks"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .len()
}

/// Run a command that must fail; return its stderr.
fn refused(cli: &Cli, args: &[&str]) -> String {
    let out = cli.run(args);
    assert_ne!(out.code, 0, "{args:?} should fail; stdout {}", out.text());
    assert!(
        out.stderr.starts_with("error: "),
        "one-line error expected, got {:?}",
        out.stderr
    );
    out.stderr
}

#[test]
fn bad_tasks_are_refused_with_clear_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_node, cli, _) = pinned_node(dir.path());
    let before = task_count(&cli);
    let small = dir.path().join("x.bin");
    std::fs::write(&small, [0u8; 16]).unwrap();
    let odd = dir.path().join("y.bin");
    std::fs::write(&odd, [0u8; 12]).unwrap();
    let x = format!("x=@{}", small.display());

    phase("invalid WGSL: naga's message comes back");
    let bad = dir.path().join("bad.wgsl");
    std::fs::write(
        &bad,
        "@compute @workgroup_size(1) fn main() { let a = undefined_name; }",
    )
    .unwrap();
    let err = refused(
        &cli,
        &[
            "submit",
            "--wgsl",
            bad.to_str().unwrap(),
            "--workgroups",
            "1,1,1",
            "--input",
            &x,
            "--output",
            "y=16",
        ],
    );
    assert!(err.contains("undefined_name"), "{err}");

    phase("unknown kernel");
    let err = refused(&cli, &["submit", "--kernel", "sgemm", "--input", &x]);
    assert!(err.contains("unknown kernel 'sgemm'"), "{err}");

    phase("wrong input sizes");
    let err = refused(
        &cli,
        &[
            "submit",
            "--kernel",
            "saxpy",
            "--param",
            "a=1",
            "--input",
            &x,
            "--input",
            &format!("y=@{}", odd.display()),
        ],
    );
    assert!(err.contains("same length"), "{err}");

    phase("output over the size limit");
    let good = dir.path().join("ok.wgsl");
    std::fs::write(
        &good,
        "@group(0) @binding(0) var<storage, read> x: array<f32>;\n@group(0) @binding(1) var<storage, read_write> y: array<f32>;\n@compute @workgroup_size(1) fn main() { y[0] = x[0]; }\n",
    )
    .unwrap();
    let huge = format!("y={}", 64 * 1024 * 1024);
    let err = refused(
        &cli,
        &[
            "submit",
            "--wgsl",
            good.to_str().unwrap(),
            "--workgroups",
            "1,1,1",
            "--input",
            &x,
            "--output",
            &huge,
        ],
    );
    assert!(err.contains("over the limit"), "{err}");

    assert_eq!(
        task_count(&cli),
        before,
        "a refused submit changed the task list"
    );
}

#[test]
fn unknown_keys_and_wrong_pins_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (node, cli, _) = pinned_node(dir.path());
    let before = task_count(&cli);

    phase("a user key the node does not know");
    let mallory = UserKey::generate(dir.path(), "mallory").unwrap();
    let stranger = Cli {
        identity: mallory.private.clone(),
        ..cli.clone()
    };
    let err = refused(&stranger, &["status"]);
    assert!(
        err.to_lowercase().contains("denied")
            || err.contains("refused")
            || err.contains("not accepted"),
        "{err}"
    );

    phase("a host that is not pinned");
    let fresh = Cli {
        known_hosts: dir.path().join("empty_known_hosts"),
        ..cli.clone()
    };
    let err = refused(&fresh, &["status"]);
    let fp = node.fingerprint().unwrap();
    assert!(err.contains("not pinned"), "{err}");
    assert!(
        err.contains(&format!("pin {} {fp}", node.ssh_addr())),
        "the error must show how to pin the presented key: {err}"
    );

    phase("pin with the wrong fingerprint");
    let wrong = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let err = refused(&fresh, &["pin", &node.ssh_addr(), wrong]);
    assert!(err.contains(&node.fingerprint().unwrap()), "{err}");
    assert!(
        !fresh.known_hosts.exists()
            || std::fs::read_to_string(&fresh.known_hosts)
                .unwrap()
                .is_empty()
    );

    phase("a changed host key at a pinned address");
    let other = UserKey::generate(dir.path(), "other_host").unwrap();
    let pub_line = std::fs::read_to_string(&other.public).unwrap();
    let fake = dir.path().join("fake_known_hosts");
    let key = pub_line
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::write(&fake, format!("[127.0.0.1]:{} {key}\n", node.ssh_port)).unwrap();
    let mitm = Cli {
        known_hosts: fake,
        ..cli.clone()
    };
    let err = refused(&mitm, &["status"]);
    assert!(err.contains("not the pinned"), "{err}");

    assert_eq!(task_count(&cli), before);
}
