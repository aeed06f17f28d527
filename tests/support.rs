//! Helpers every integration test file shares: polling for a state, CLI calls that
//! answer JSON, the kernel that never ends, and the CPU reference of a saxpy.

use mesh_chaos::{Cli, Node};
use mesh_core::builtin::{cpu_reference, f32_bytes};
use mesh_core::task::NamedBytes;
use mesh_core::Bytes;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How many times the slow tasks' Mandelbrot iterations are multiplied on this
/// machine: they are sized to run for seconds on lavapipe (CPU), and a GPU runs them
/// 50-100 times faster (an H100: a t40 sharded task in 50 ms instead of 2.5 s), which
/// would end them before the fault a test means to land while they run. The nodes
/// open the same best adapter this process probes.
pub fn slow_scale() -> u64 {
    static SCALE: OnceLock<u64> = OnceLock::new();
    *SCALE.get_or_init(
        || match mesh_node::gpu::probe().first().map(|a| a.device_type) {
            Some(mesh_core::DeviceType::Cpu) | None => 1,
            Some(_) => 100,
        },
    )
}

/// `args` with every `max_iter=N` multiplied by [`slow_scale`].
pub fn slow(args: &[&'static str]) -> Vec<&'static str> {
    args.iter()
        .map(|arg| match arg.strip_prefix("max_iter=") {
            Some(n) => {
                let n: u64 = n.parse().expect("max_iter is a number");
                &*format!("max_iter={}", n * slow_scale()).leak()
            }
            None => arg,
        })
        .collect()
}

/// Plain OpenSSH to a node on loopback, as an operator would run it: no user config,
/// the host key checked strictly against `known_hosts`, only `key` offered, no agent.
/// The caller adds any further options, then the destination (`x@127.0.0.1`) and the
/// command.
pub fn openssh_command(
    port: u16,
    known_hosts: &std::path::Path,
    key: &std::path::Path,
) -> std::process::Command {
    let mut cmd = std::process::Command::new("ssh");
    cmd.args(["-F", "/dev/null", "-p", &port.to_string()])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
            "-i",
        ])
        .arg(key)
        .env_remove("SSH_AUTH_SOCK");
    cmd
}

/// How long one CLI call may take before it counts as no answer.
pub const CLI_LIMIT: Duration = Duration::from_secs(30);

/// Poll `probe` until it returns `Ok`; panic with its last `Err` after `timeout`.
pub fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(last) if Instant::now() > deadline => {
                panic!("{what}: not reached within {timeout:?}; last seen: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Poll task `id` through `cli` until it has succeeded; panic after `timeout`.
pub fn wait_succeeded(cli: &Cli, id: &str, timeout: Duration) {
    eventually(&format!("task {id} succeeds"), timeout, || {
        let t = json(cli, &["task", id])?;
        (t["state"] == "succeeded")
            .then_some(())
            .ok_or(t.to_string())
    });
}

/// `mesh-cli --json ARGS` on `cli`: its JSON answer, or its error as text.
pub fn json(cli: &Cli, args: &[&str]) -> Result<Value, String> {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let out = cli.run_within(&full, CLI_LIMIT);
    if out.code != 0 {
        return Err(format!(
            "{args:?} on {} failed ({}): {}",
            cli.node,
            out.code,
            out.stderr.trim()
        ));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{args:?}: no JSON ({e}): {}", out.text()))
}

/// A kernel that never ends (until its timeout, or a cancel): each invocation
/// loops until x[0] < -1 or y[1] != 0, which never happens; lavapipe folds
/// side-effect-free loops (hence the atomics) and caps each invocation at 65535
/// iterations (hence 65535 x 1024 workgroups of 64).
pub const FOREVER: &str = r#"
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<atomic<u32>>;
@compute @workgroup_size(64)
fn main() {
    loop {
        if (x[0] < -1.0 || atomicLoad(&y[1]) != 0u) { break; }
        atomicAdd(&y[0], 1u);
    }
}
"#;

/// The bytes `saxpy` with `a` must produce for `x` and `y` (mesh-core's CPU reference).
pub fn saxpy_reference(a: &str, x: &[f32], y: &[f32]) -> Vec<u8> {
    let inputs = [
        NamedBytes {
            name: "x".into(),
            data: Bytes::from(f32_bytes(x)),
        },
        NamedBytes {
            name: "y".into(),
            data: Bytes::from(f32_bytes(y)),
        },
    ];
    cpu_reference(
        "saxpy",
        &BTreeMap::from([("a".to_string(), a.to_string())]),
        &inputs,
    )
}

/// `GET path` on `127.0.0.1:port` over a plain TCP stream: (status code, body).
pub fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let addr = ([127, 0, 0, 1], port).into();
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {port}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    use std::io::{Read, Write};
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("GET {path}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET {path}: no HTTP answer: {text:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("GET {path}: bad status line: {head}"))?;
    Ok((code, body.to_string()))
}

/// Sum of the samples of `name` whose labels include every `labels` pair, in a
/// Prometheus text exposition (0 when absent: counters appear on first increment).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

/// `/metrics` of a node.
pub fn scrape(node: &Node) -> String {
    let (code, body) = http_get(node.http_port, "/metrics").unwrap();
    assert_eq!(code, 200, "{body}");
    body
}
