//! Claim: what an operator installs from `deploy/` is well-formed and agrees with the
//! code. The systemd unit passes `systemd-analyze verify` without a single warning
//! about it and keeps the hardening and GPU access it promises; the sysusers file
//! creates the user the unit runs as; every example config is accepted by
//! `mesh-node config check`, forms a consistent mesh (one bootstrap node, the others
//! join, distinct addresses, one voter target) and, as node 1, really starts a node;
//! the Prometheus config scrapes exactly the examples' `http_listen` addresses; the
//! alert rules pass `promtool check rules` and their unit tests, and every metric and
//! label value they name is exported by mesh-node, the gauges on a live `/metrics`;
//! `deploy/local-mesh.sh` is an executable bash script that parses.
//!
//! Method: run the real tools where installed (`systemd-analyze`, `systemd-sysusers`,
//! `promtool`, `mesh-node config check`), each with a deliberately broken copy as a
//! negative control, so a tool that accepts everything cannot pass the test; where a
//! tool is missing, structural checks in Rust stand in (a unit file parser with a list
//! of known directives, a parser for the flat TOML the examples use, a line-based
//! look at the YAML). The structural and cross-file checks run in every case. Each
//! check prints (stderr, `--nocapture`) which path it took.

use crate::support::{http_get, scrape};
use mesh_chaos::{bin, phase, Node, UserKey};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The placeholder the joining examples carry instead of a real token.
const TOKEN_PLACEHOLDER: &str = "REPLACE_WITH_TOKEN_FROM_mesh-cli_token_create";
/// The path of mesh-node in the unit's ExecStart, rewritten for `systemd-analyze`
/// (which insists that the binary exists).
const INSTALLED_BINARY: &str = "/usr/local/bin/mesh-node";
/// What the unit must start.
const EXEC_START: &str = "/usr/local/bin/mesh-node run --config /etc/mesh/node.toml";
/// Where the unit keeps the node's state; every example's data_dir.
const STATE_DIR: &str = "/var/lib/mesh";
/// The node's shutdown grace if it cannot be read from mesh-node/src/node.rs.
const SHUTDOWN_GRACE_FALLBACK: Duration = Duration::from_secs(5);
/// How long a live node may take to export its first gauges (refreshed every second).
const GAUGE_WAIT: Duration = Duration::from_secs(15);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn deploy(rel: &str) -> PathBuf {
    root().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Whether `tool ARGS` runs and exits 0.
fn tool_works(tool: &str, args: &[&str]) -> bool {
    Command::new(tool)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run_tool(tool: &str, args: &[&str], dir: &Path) -> Output {
    Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"))
}

fn text_of(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Say which way a check went.
fn path_taken(check: &str, how: &str) {
    eprintln!("t60 {check}: {how}");
}

// ---------------------------------------------------------------------------------
// systemd

/// One `Key=Value` of a unit file.
#[derive(Debug, Clone)]
struct Directive {
    section: String,
    key: String,
    value: String,
    line: usize,
}

/// Parse a unit file the way systemd reads it: sections, `Key=Value`, comments,
/// backslash continuations. Anything else is an error.
fn parse_unit(text: &str) -> Result<Vec<Directive>, String> {
    let mut out = Vec::new();
    let mut section: Option<String> = None;
    let mut lines = text.lines().enumerate();
    while let Some((i, raw)) = lines.next() {
        let mut line = raw.trim().to_string();
        while line.ends_with('\\') {
            line.pop();
            match lines.next() {
                Some((_, next)) => line.push_str(next.trim()),
                None => {
                    return Err(format!(
                        "line {}: continuation at the end of the file",
                        i + 1
                    ))
                }
            }
        }
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.to_string());
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!(
                "line {}: neither a section, a comment nor Key=Value: {raw}",
                i + 1
            ));
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(format!("line {}: malformed key '{key}'", i + 1));
        }
        let Some(section) = &section else {
            return Err(format!("line {}: {key}= outside any section", i + 1));
        };
        out.push(Directive {
            section: section.clone(),
            key: key.into(),
            value: value.trim().into(),
            line: i + 1,
        });
    }
    Ok(out)
}

/// Directives systemd 252 knows, by section: the ones this unit uses and the ones an
/// operator is likely to add. A typo or an invented directive is not among them.
fn known_directives(section: &str) -> &'static [&'static str] {
    match section {
        "Unit" => &[
            "Description",
            "Documentation",
            "After",
            "Before",
            "Wants",
            "Requires",
            "Requisite",
            "BindsTo",
            "PartOf",
            "Conflicts",
            "OnFailure",
            "ConditionPathExists",
            "AssertPathExists",
            "StartLimitIntervalSec",
            "StartLimitBurst",
            "StartLimitAction",
            "DefaultDependencies",
        ],
        "Service" => &[
            "Type",
            "User",
            "Group",
            "SupplementaryGroups",
            "DynamicUser",
            "ExecStart",
            "ExecStartPre",
            "ExecStartPost",
            "ExecReload",
            "ExecStop",
            "ExecStopPost",
            "Environment",
            "EnvironmentFile",
            "WorkingDirectory",
            "StateDirectory",
            "StateDirectoryMode",
            "RuntimeDirectory",
            "RuntimeDirectoryMode",
            "CacheDirectory",
            "CacheDirectoryMode",
            "LogsDirectory",
            "LogsDirectoryMode",
            "ConfigurationDirectory",
            "ConfigurationDirectoryMode",
            "UMask",
            "KillSignal",
            "KillMode",
            "SendSIGKILL",
            "FinalKillSignal",
            "TimeoutStartSec",
            "TimeoutStopSec",
            "TimeoutSec",
            "Restart",
            "RestartSec",
            "OOMPolicy",
            "OOMScoreAdjust",
            "LimitNOFILE",
            "LimitNPROC",
            "LimitMEMLOCK",
            "LimitCORE",
            "NoNewPrivileges",
            "ProtectSystem",
            "ReadWritePaths",
            "ReadOnlyPaths",
            "InaccessiblePaths",
            "ProtectHome",
            "PrivateTmp",
            "PrivateDevices",
            "PrivateNetwork",
            "PrivateUsers",
            "CapabilityBoundingSet",
            "AmbientCapabilities",
            "ProtectKernelTunables",
            "ProtectKernelModules",
            "ProtectKernelLogs",
            "ProtectControlGroups",
            "ProtectClock",
            "ProtectHostname",
            "ProtectProc",
            "ProcSubset",
            "RestrictNamespaces",
            "RestrictRealtime",
            "RestrictSUIDSGID",
            "LockPersonality",
            "MemoryDenyWriteExecute",
            "RestrictAddressFamilies",
            "SystemCallFilter",
            "SystemCallErrorNumber",
            "SystemCallArchitectures",
            "DevicePolicy",
            "DeviceAllow",
            "LoadCredential",
            "SetCredential",
            "MemoryMax",
            "MemoryHigh",
            "CPUQuota",
            "TasksMax",
            "IPAddressAllow",
            "IPAddressDeny",
            "StandardOutput",
            "StandardError",
            "SyslogIdentifier",
            "Nice",
            "RemoveIPC",
            "KeyringMode",
        ],
        "Install" => &["WantedBy", "RequiredBy", "Alias", "Also"],
        _ => &[],
    }
}

/// A systemd time span as this unit writes it: `30s`, `2min`, `500ms`, or seconds.
fn systemd_span(v: &str) -> Duration {
    if let Ok(secs) = v.parse::<u64>() {
        return Duration::from_secs(secs);
    }
    mesh_core::duration::parse_duration(&v.replace("min", "m"))
        .unwrap_or_else(|e| panic!("time span {v}: {e}"))
}

/// The node's shutdown grace, read from its source so that the unit's stop timeout
/// follows it.
fn shutdown_grace() -> Duration {
    let src = read(&root().join("mesh-node/src/node.rs"));
    let found = src
        .lines()
        .find(|l| l.contains("const SHUTDOWN_GRACE: Duration = Duration::from_secs("))
        .and_then(|l| l.split("from_secs(").nth(1))
        .and_then(|rest| rest.split(')').next())
        .and_then(|n| n.trim().parse().ok());
    match found {
        Some(secs) => Duration::from_secs(secs),
        None => {
            eprintln!("t60: SHUTDOWN_GRACE not found in mesh-node/src/node.rs; assuming {SHUTDOWN_GRACE_FALLBACK:?}");
            SHUTDOWN_GRACE_FALLBACK
        }
    }
}

/// Structural checks of the unit: known directives only, and the settings the
/// node's operation depends on.
fn check_unit_structure(text: &str) {
    let directives = parse_unit(text).unwrap_or_else(|e| panic!("mesh-node.service: {e}"));
    let sections: BTreeSet<&str> = directives.iter().map(|d| d.section.as_str()).collect();
    assert_eq!(
        sections,
        BTreeSet::from(["Unit", "Service", "Install"]),
        "sections of mesh-node.service"
    );
    for d in &directives {
        assert!(
            known_directives(&d.section).contains(&d.key.as_str()),
            "mesh-node.service:{}: unknown directive {}= in [{}]",
            d.line,
            d.key,
            d.section
        );
    }
    let all = |key: &str| -> Vec<&str> {
        directives
            .iter()
            .filter(|d| d.section == "Service" && d.key == key)
            .map(|d| d.value.as_str())
            .collect()
    };
    let one = |key: &str| -> &str {
        let v = all(key);
        assert_eq!(
            v.len(),
            1,
            "mesh-node.service must set {key}= exactly once, has {v:?}"
        );
        v[0]
    };
    for (key, want) in [
        ("User", "mesh"),
        ("Group", "mesh"),
        ("StateDirectory", "mesh"),
        ("ExecStart", EXEC_START),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "true"),
        ("NoNewPrivileges", "true"),
        ("PrivateTmp", "true"),
        ("ReadWritePaths", STATE_DIR),
        (
            "RestrictAddressFamilies",
            "AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        ),
        ("Restart", "on-failure"),
        ("KillSignal", "SIGTERM"),
    ] {
        assert_eq!(one(key), want, "mesh-node.service {key}=");
    }
    let nofile = one("LimitNOFILE");
    assert!(
        nofile == "infinity" || nofile.parse::<u64>().is_ok_and(|n| n >= 4096),
        "LimitNOFILE={nofile} is too low"
    );
    let stop = systemd_span(one("TimeoutStopSec"));
    let grace = shutdown_grace();
    assert!(
        stop > grace,
        "TimeoutStopSec={stop:?} must exceed the node's shutdown grace {grace:?}"
    );
    // GPU access: device groups (globs allowed), never a directory such as /dev/dri.
    assert!(
        matches!(one("DevicePolicy"), "closed" | "strict"),
        "DevicePolicy must be closed or strict"
    );
    let devices = all("DeviceAllow");
    for spec in &devices {
        let (node, perms) = spec.split_once(' ').unwrap_or((spec, ""));
        assert!(
            perms.chars().all(|c| "rwm".contains(c)),
            "DeviceAllow={spec}: permissions are r, w, m"
        );
        let group = node.starts_with("char-") || node.starts_with("block-");
        let device_path =
            node.starts_with("/dev/") && !node.contains(['*', '?']) && node != "/dev/dri";
        assert!(
            group || device_path,
            "DeviceAllow={spec}: not a device group nor a device node path"
        );
    }
    assert!(
        devices.iter().any(|d| d.starts_with("char-drm ")),
        "no DeviceAllow for DRM (Mesa) GPUs: {devices:?}"
    );
    assert!(
        devices.iter().any(|d| d.starts_with("char-nvidia")),
        "no DeviceAllow for NVIDIA GPUs: {devices:?}"
    );
    // The node forks and execs its gpu-worker processes, drivers JIT shaders and
    // need the device nodes.
    for (key, bad) in [
        ("PrivateDevices", "true"),
        ("MemoryDenyWriteExecute", "true"),
        ("PrivateUsers", "true"),
        ("DynamicUser", "true"),
        ("ProcSubset", "pid"),
    ] {
        assert!(!all(key).contains(&bad), "{key}={bad} breaks GPU workers");
    }
    for filter in all("SystemCallFilter") {
        if let Some(denied) = filter.strip_prefix('~') {
            for group in ["@process", "execve", "fork", "clone", "@default"] {
                assert!(
                    !denied.split_whitespace().any(|g| g == group),
                    "SystemCallFilter={filter} forbids {group}"
                );
            }
        }
    }
    let install: Vec<&str> = directives
        .iter()
        .filter(|d| d.section == "Install")
        .map(|d| d.key.as_str())
        .collect();
    assert!(install.contains(&"WantedBy"), "[Install] needs WantedBy=");
}

/// `systemd-analyze verify` prints problems and still exits 0: collect the lines
/// about our unit file.
fn systemd_verify(unit: &Path) -> (bool, Vec<String>, String) {
    let out = run_tool(
        "systemd-analyze",
        &["verify", "--man=no", unit.to_str().expect("utf-8 path")],
        unit.parent().expect("dir"),
    );
    let text = text_of(&out);
    let name = unit
        .file_name()
        .expect("file name")
        .to_string_lossy()
        .to_string();
    let dir = unit.parent().expect("dir").to_string_lossy().to_string();
    let ours = text
        .lines()
        .filter(|l| l.contains(&dir) || l.starts_with(&name))
        .map(String::from)
        .collect();
    (out.status.success(), ours, text)
}

#[test]
fn systemd_unit_and_sysusers_are_valid_and_hardened() {
    let unit_path = deploy("systemd/mesh-node.service");
    let text = read(&unit_path);

    phase("mesh-node.service: structure, hardening, GPU access");
    check_unit_structure(&text);
    path_taken(
        "unit structure",
        "parsed in Rust against the known directives: ok",
    );

    phase("mesh-node.service: systemd-analyze verify");
    if tool_works("systemd-analyze", &["--version"]) {
        let dir = tempfile::tempdir().unwrap();
        // verify insists that ExecStart's binary exists: point it at one that does.
        let exe = std::env::current_exe().unwrap();
        assert_eq!(
            text.matches(INSTALLED_BINARY).count(),
            1,
            "the unit should name {INSTALLED_BINARY} once, in ExecStart"
        );
        let unit = dir.path().join("mesh-node.service");
        std::fs::write(&unit, text.replace(INSTALLED_BINARY, exe.to_str().unwrap())).unwrap();
        let (ok, ours, all) = systemd_verify(&unit);
        assert!(
            ok && ours.is_empty(),
            "systemd-analyze verify found problems in mesh-node.service:\n{all}"
        );
        if !all.trim().is_empty() {
            eprintln!("t60: systemd-analyze verify said (about other units, ignored):\n{all}");
        }
        // Negative control: the same file with an invented directive must be reported,
        // or this check proves nothing on this systemd.
        let bad = dir.path().join("broken-mesh-node.service");
        std::fs::write(
            &bad,
            format!(
                "{}\n[Service]\nFrobnicate=yes\n",
                text.replace(INSTALLED_BINARY, exe.to_str().unwrap())
            ),
        )
        .unwrap();
        let (_, ours, all) = systemd_verify(&bad);
        assert!(
            ours.iter().any(|l| l.contains("Frobnicate")),
            "systemd-analyze verify did not report an unknown directive:\n{all}"
        );
        path_taken("unit", "systemd-analyze verify (ExecStart pointed at an existing binary): no warnings; negative control caught");
    } else {
        path_taken(
            "unit",
            "systemd-analyze not installed: structural check only",
        );
    }

    phase("mesh.sysusers.conf: creates the unit's user");
    let sysusers = deploy("systemd/mesh.sysusers.conf");
    let lines: Vec<Vec<String>> = read(&sysusers)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect();
    for l in &lines {
        assert!(
            matches!(l[0].as_str(), "u" | "g" | "m" | "r"),
            "sysusers: unknown line type in {l:?}"
        );
        assert!(l.len() >= 2, "sysusers: {l:?} names nothing");
        if l[0] == "m" {
            assert_eq!(l.len(), 3, "sysusers: 'm USER GROUP' expected, got {l:?}");
        }
    }
    let user = lines
        .iter()
        .find(|l| l[0] == "u" && l[1] == "mesh")
        .expect("sysusers must create user mesh (u mesh ...)");
    assert!(
        user.iter().any(|f| f == STATE_DIR),
        "the mesh user's home should be {STATE_DIR}: {user:?}"
    );
    for group in ["video", "render"] {
        assert!(
            lines
                .iter()
                .any(|l| l[0] == "m" && l[1] == "mesh" && l[2] == group),
            "sysusers: mesh should join {group}"
        );
    }
    if tool_works("systemd-sysusers", &["--version"]) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        let root_arg = format!("--root={}", dir.path().display());
        let out = run_tool(
            "systemd-sysusers",
            &[&root_arg, "--dry-run", sysusers.to_str().unwrap()],
            dir.path(),
        );
        let text = text_of(&out);
        assert!(
            out.status.success(),
            "systemd-sysusers --dry-run refused mesh.sysusers.conf:\n{text}"
        );
        assert!(
            text.contains("Creating user 'mesh'"),
            "systemd-sysusers would not create mesh:\n{text}"
        );
        let bad = dir.path().join("bad.conf");
        std::fs::write(&bad, "u mesh - \"x\" /var/lib/mesh\nm mesh\n").unwrap();
        let out = run_tool(
            "systemd-sysusers",
            &[&root_arg, "--dry-run", bad.to_str().unwrap()],
            dir.path(),
        );
        assert!(
            !out.status.success(),
            "negative control: systemd-sysusers accepted a malformed line:\n{}",
            text_of(&out)
        );
        path_taken(
            "sysusers",
            "systemd-sysusers --dry-run into an empty root: creates mesh; negative control caught",
        );
    } else {
        path_taken(
            "sysusers",
            "systemd-sysusers not installed: structural check only",
        );
    }
}

// ---------------------------------------------------------------------------------
// Example configs

/// A value of the flat TOML the node config uses.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Str(String),
    Int(u64),
    Bool(bool),
    Strings(Vec<String>),
    Table(BTreeMap<String, String>),
}

/// Read a basic string starting at `s[0] == '"'`; returns it and the rest.
fn toml_string(s: &str) -> Result<(String, &str), String> {
    let mut out = String::new();
    let mut chars = s.char_indices().skip(1);
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &s[i + 1..])),
            '\\' => match chars.next() {
                Some((_, 'n')) => out.push('\n'),
                Some((_, 't')) => out.push('\t'),
                Some((_, c @ ('"' | '\\'))) => out.push(c),
                other => return Err(format!("unsupported escape {other:?}")),
            },
            c => out.push(c),
        }
    }
    Err("unterminated string".into())
}

/// Split `a, b, c` at top-level commas (none occur inside the strings we write).
fn toml_items(inner: &str) -> Vec<&str> {
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

fn toml_value(v: &str) -> Result<(Value, &str), String> {
    if v.starts_with('"') {
        let (s, rest) = toml_string(v)?;
        return Ok((Value::Str(s), rest));
    }
    if let Some(inner) = v.strip_prefix('[') {
        let (inner, rest) = inner.split_once(']').ok_or("unterminated array")?;
        let items = toml_items(inner)
            .into_iter()
            .map(|i| match toml_string(i)? {
                (s, "") => Ok(s),
                _ => Err(format!("junk after array item {i}")),
            })
            .collect::<Result<_, String>>()?;
        return Ok((Value::Strings(items), rest));
    }
    if let Some(inner) = v.strip_prefix('{') {
        let (inner, rest) = inner.split_once('}').ok_or("unterminated inline table")?;
        let mut table = BTreeMap::new();
        for item in toml_items(inner) {
            let (k, val) = item
                .split_once('=')
                .ok_or(format!("inline table item {item} is not k = \"v\""))?;
            let (val, tail) = toml_string(val.trim())?;
            if !tail.trim().is_empty() || table.insert(k.trim().to_string(), val).is_some() {
                return Err(format!("malformed or duplicate inline table item {item}"));
            }
        }
        return Ok((Value::Table(table), rest));
    }
    let end = v
        .find(|c: char| c.is_whitespace() || c == '#')
        .unwrap_or(v.len());
    let (word, rest) = v.split_at(end);
    match word {
        "true" => Ok((Value::Bool(true), rest)),
        "false" => Ok((Value::Bool(false), rest)),
        w => w
            .replace('_', "")
            .parse()
            .map(|n| (Value::Int(n), rest))
            .map_err(|_| format!("cannot read value '{w}'")),
    }
}

/// Parse the flat TOML of a node config: `key = value` lines and comments only.
fn parse_flat_toml(text: &str) -> Result<BTreeMap<String, Value>, String> {
    let mut out = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |e: String| format!("line {}: {e}: {raw}", i + 1);
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| err("not key = value (a node config has no tables)".into()))?;
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            return Err(err(format!("malformed key '{key}'")));
        }
        let (value, rest) = toml_value(value.trim()).map_err(err)?;
        let rest = rest.trim();
        if !(rest.is_empty() || rest.starts_with('#')) {
            return Err(err(format!("junk after the value: {rest}")));
        }
        if out.insert(key.to_string(), value).is_some() {
            return Err(err(format!("duplicate key {key}")));
        }
    }
    Ok(out)
}

/// The keys a config file may have (`mesh-node run` long flags with `_`) and the
/// shape of each value.
fn key_shape(key: &str) -> Option<&'static str> {
    Some(match key {
        "data_dir" | "host_key" | "join" | "log_format" | "restore" => "string",
        "listen" | "ssh_listen" | "http_listen" => "address",
        "node_timeout" | "voter_replace_after" | "election_timeout" => "duration",
        "admin_keys" => "strings",
        "labels" => "table",
        "slots" | "voters" | "gpu_memory_budget" | "snapshot_every" => "integer",
        "await_join" => "bool",
        _ => return None,
    })
}

/// One example config, checked on its own.
#[derive(Debug)]
struct Example {
    file: PathBuf,
    text: String,
    keys: BTreeMap<String, Value>,
}

impl Example {
    fn load(file: PathBuf) -> Example {
        let text = read(&file);
        let keys = parse_flat_toml(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for (key, value) in &keys {
            let shape =
                key_shape(key).unwrap_or_else(|| panic!("{}: unknown key {key}", file.display()));
            let ok = match (shape, value) {
                ("string", Value::Str(_))
                | ("strings", Value::Strings(_))
                | ("table", Value::Table(_)) => true,
                ("integer", Value::Int(_)) | ("bool", Value::Bool(_)) => true,
                ("address", Value::Str(s)) => s
                    .parse::<SocketAddr>()
                    .is_ok_and(|a| !a.ip().is_unspecified() || key != "listen"),
                ("duration", Value::Str(s)) => mesh_core::duration::parse_duration(s).is_ok(),
                _ => false,
            };
            assert!(
                ok,
                "{}: {key} = {value:?} is not a valid {shape}",
                file.display()
            );
        }
        Example { file, text, keys }
    }

    fn str(&self, key: &str) -> Option<&str> {
        match self.keys.get(key) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    fn int(&self, key: &str) -> Option<u64> {
        match self.keys.get(key) {
            Some(Value::Int(n)) => Some(*n),
            _ => None,
        }
    }

    fn name(&self) -> String {
        self.file
            .strip_prefix(root())
            .unwrap_or(&self.file)
            .display()
            .to_string()
    }

    /// Joins with a token, waits for `mesh-cli join`, or bootstraps.
    fn bootstraps(&self) -> bool {
        !self.keys.contains_key("join") && self.keys.get("await_join") != Some(&Value::Bool(true))
    }
}

/// The examples of one mesh: `dir/node1.toml` ... `dir/nodeN.toml`, nothing else.
fn example_set(dir: &Path, n: usize) -> Vec<Example> {
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|f| f.ends_with(".toml"))
        .collect();
    found.sort();
    let want: Vec<String> = (1..=n).map(|i| format!("node{i}.toml")).collect();
    assert_eq!(found, want, "example configs in {}", dir.display());
    want.iter().map(|f| Example::load(dir.join(f))).collect()
}

/// A set forms one mesh: node 1 bootstraps, the others join; addresses are distinct;
/// one voter target; state where the unit keeps it.
fn check_set(set: &[Example], voters: u64) {
    assert!(
        set[0].bootstraps(),
        "{} should bootstrap (no join, no await_join)",
        set[0].name()
    );
    let seed = set[0].str("listen").expect("node 1 listen");
    for e in &set[1..] {
        assert!(
            !e.bootstraps(),
            "{} would bootstrap a second mesh; give it join or await_join",
            e.name()
        );
        if let Some(token) = e.str("join") {
            assert_eq!(
                token,
                TOKEN_PLACEHOLDER,
                "{}: join should hold the placeholder",
                e.name()
            );
            assert!(
                e.text.contains("token create"),
                "{}: say how to get the token",
                e.name()
            );
        }
        assert!(
            !(e.keys.contains_key("join") && e.keys.contains_key("await_join")),
            "{}: join and await_join exclude each other",
            e.name()
        );
    }
    for key in ["listen", "ssh_listen", "http_listen"] {
        let addrs: BTreeSet<&str> = set
            .iter()
            .map(|e| {
                e.str(key)
                    .unwrap_or_else(|| panic!("{}: no {key}", e.name()))
            })
            .collect();
        assert_eq!(
            addrs.len(),
            set.len(),
            "{key} addresses must differ between nodes: {addrs:?}"
        );
    }
    for e in set {
        assert_eq!(e.int("voters"), Some(voters), "{}: voters", e.name());
        assert_eq!(
            e.str("data_dir"),
            Some(STATE_DIR),
            "{}: data_dir must be the unit's StateDirectory",
            e.name()
        );
        assert!(
            matches!(e.keys.get("admin_keys"), Some(Value::Strings(k)) if !k.is_empty()),
            "{}: set admin_keys, or the node trusts (or creates) a key of its own user",
            e.name()
        );
        // Every node listens on its own machine's address, the seed's among them.
        let host = |a: &str| a.parse::<SocketAddr>().unwrap().ip();
        assert_eq!(
            host(e.str("listen").unwrap()),
            host(e.str("ssh_listen").unwrap()),
            "{}: one machine, one address",
            e.name()
        );
    }
    // Timing every node must share: a node with a shorter election timeout would
    // campaign against a leader the others still follow.
    let timeouts: BTreeSet<Option<&str>> = set.iter().map(|e| e.str("election_timeout")).collect();
    assert!(
        timeouts.len() == 1,
        "election_timeout differs between the nodes of a set: {timeouts:?}"
    );
    assert!(seed.parse::<SocketAddr>().is_ok());
}

/// A well-formed token for `config check`, naming the set's seed.
fn dummy_token(seed: &str) -> String {
    let fp = mesh_core::Fingerprint::parse("SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s")
        .unwrap();
    mesh_core::token::JoinToken::new([0x11; 8], [0x22; 16], seed.into(), fp).encode()
}

/// Whether this mesh-node has `config check` (and so `run --config`).
fn has_config_check() -> bool {
    tool_works(
        bin("mesh-node").to_str().unwrap(),
        &["config", "check", "--help"],
    )
}

fn config_check(file: &Path) -> Output {
    run_tool(
        bin("mesh-node").to_str().unwrap(),
        &["config", "check", file.to_str().unwrap()],
        file.parent().unwrap(),
    )
}

#[test]
fn example_configs_are_accepted_and_form_consistent_meshes() {
    phase("parse every example (flat TOML), check keys and values, and each set's consistency");
    let three = example_set(&deploy("config"), 3);
    check_set(&three, 3);
    let five = example_set(&deploy("config/five-node"), 5);
    check_set(&five, 5);
    path_taken(
        "configs",
        "parsed in Rust (flat TOML subset), keys checked against the node's flags: ok",
    );

    phase("mesh-node config check on every example");
    if has_config_check() {
        let dir = tempfile::tempdir().unwrap();
        for set in [&three, &five] {
            let seed = set[0].str("listen").unwrap();
            for e in set.iter() {
                let copy = dir.path().join(e.name().replace('/', "_"));
                std::fs::write(&copy, e.text.replace(TOKEN_PLACEHOLDER, &dummy_token(seed)))
                    .unwrap();
                let out = config_check(&copy);
                assert!(
                    out.status.success(),
                    "mesh-node config check refused {}:\n{}",
                    e.name(),
                    text_of(&out)
                );
                if e.text.contains(TOKEN_PLACEHOLDER) {
                    // As shipped, the placeholder stops the node with a clear message.
                    let out = config_check(&e.file);
                    assert!(
                        !out.status.success(),
                        "{} with its placeholder token was accepted",
                        e.name()
                    );
                    assert!(
                        text_of(&out).contains("token create"),
                        "unclear refusal:\n{}",
                        text_of(&out)
                    );
                }
            }
        }
        // Negative control: the checker refuses an unknown key.
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, format!("{}\nsloots = 2\n", three[0].text)).unwrap();
        let out = config_check(&bad);
        assert!(
            !out.status.success(),
            "negative control: config check accepted an unknown key:\n{}",
            text_of(&out)
        );
        path_taken("configs", "mesh-node config check: all 8 accepted (placeholder token swapped for a well-formed one); negative control caught");
    } else {
        path_taken(
            "configs",
            "mesh-node has no `config check`: the Rust parse above stands in",
        );
    }
}

// ---------------------------------------------------------------------------------
// Prometheus

/// Every `mesh_...` metric name in a text (histogram suffixes stripped).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("mesh_") {
        let start = i + pos;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .map_or(text.len(), |e| start + e);
        if boundary {
            let name = &text[start..end];
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
            out.insert(name.to_string());
        }
        i = end;
    }
    out
}

/// The text of every Rust file under mesh-node/src.
fn node_sources() -> String {
    fn walk(dir: &Path, out: &mut String) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push_str(&read(&path));
            }
        }
    }
    let mut out = String::new();
    walk(&root().join("mesh-node/src"), &mut out);
    out
}

/// Label values the rules select on (`outcome="failed"`, `reason=~"a|b"`, `state=...`).
fn selected_label_values(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for label in ["outcome", "reason", "state", "side", "what"] {
        for op in ["=\"", "=~\"", "!~\""] {
            let pat = format!("{label}{op}");
            for piece in text.split(&pat).skip(1) {
                let value = piece.split('"').next().unwrap_or("");
                out.extend(value.split('|').filter(|v| !v.is_empty()).map(String::from));
            }
        }
    }
    out
}

/// One alerting rule as the line-based reader sees it.
#[derive(Debug, Default)]
struct Rule {
    name: String,
    expr: String,
    for_: Option<String>,
    severity: Option<String>,
    summary: bool,
}

fn indent(l: &str) -> usize {
    l.len() - l.trim_start().len()
}

/// Read the alerting rules of a Prometheus rules file by indentation: enough to check
/// names, expressions, labels and annotations when promtool is not installed.
fn read_rules(text: &str) -> Vec<Rule> {
    assert!(!text.contains('\t'), "YAML must not contain tabs");
    assert!(
        text.lines().any(|l| l == "groups:"),
        "a rules file starts with groups:"
    );
    let lines: Vec<&str> = text.lines().collect();
    let mut rules: Vec<Rule> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        let t = l.trim_start();
        if let Some(name) = t.strip_prefix("- alert: ") {
            rules.push(Rule {
                name: name.trim().into(),
                ..Rule::default()
            });
        } else if let Some(rule) = rules.last_mut() {
            if let Some(v) = t.strip_prefix("expr:") {
                let v = v.trim();
                if v.starts_with('>') || v.starts_with('|') {
                    let base = indent(l);
                    while i + 1 < lines.len()
                        && (lines[i + 1].trim().is_empty() || indent(lines[i + 1]) > base)
                    {
                        i += 1;
                        rule.expr.push_str(lines[i].trim());
                        rule.expr.push(' ');
                    }
                } else {
                    rule.expr = v.into();
                }
            } else if let Some(v) = t.strip_prefix("for:") {
                rule.for_ = Some(v.trim().into());
            } else if let Some(v) = t.strip_prefix("severity:") {
                rule.severity = Some(v.trim().into());
            } else if t.starts_with("summary:") {
                rule.summary = true;
            }
        }
        i += 1;
    }
    rules
}

/// `targets: ["a", "b"]` lines of a scrape config.
fn scrape_targets(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for l in text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("- targets:") || l.starts_with("targets:"))
    {
        let list = l
            .split_once('[')
            .and_then(|(_, r)| r.split_once(']'))
            .map(|(inner, _)| inner)
            .expect("targets: [...] on one line");
        out.extend(
            list.split(',')
                .map(|t| t.trim().trim_matches('"').to_string())
                .filter(|t| !t.is_empty()),
        );
    }
    out
}

#[test]
fn prometheus_config_and_alerts_are_valid_and_name_real_metrics() {
    let prom_dir = deploy("prometheus");
    let config = read(&prom_dir.join("prometheus.yml"));
    let alerts = read(&prom_dir.join("alerts.yml"));
    let alert_tests = read(&prom_dir.join("alerts.test.yml"));

    phase("every metric and label value the alerts use is exported by mesh-node");
    let sources = node_sources();
    let used = metric_names(&alerts);
    for name in used.iter().chain(metric_names(&alert_tests).iter()) {
        assert!(
            sources.contains(&format!("\"{name}\"")),
            "alerts name {name}, which mesh-node/src does not export"
        );
    }
    for name in [
        "mesh_raft_term",
        "mesh_raft_leader",
        "mesh_tasks",
        "mesh_attempts_finished_total",
        "mesh_tls_handshake_failures_total",
        "mesh_ssh_auth_failures_total",
        "mesh_gpu_child_restarts_total",
    ] {
        assert!(used.contains(name), "no alert uses {name}");
    }
    assert!(
        alerts.contains("up{job=\"mesh\"} == 0"),
        "no node-down alert on up == 0"
    );
    assert!(
        alerts.contains("changes(mesh_raft_term[10m])"),
        "no leader-flapping alert on changes(mesh_raft_term[10m])"
    );
    for value in selected_label_values(&alerts) {
        assert!(
            sources.contains(&format!("\"{value}\"")),
            "alerts select the label value {value:?}, which mesh-node never sets"
        );
    }

    phase("scrape targets are the examples' http_listen addresses");
    let mut listens = BTreeSet::new();
    for dir in ["config", "config/five-node"] {
        for entry in std::fs::read_dir(deploy(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                listens.insert(
                    Example::load(path)
                        .str("http_listen")
                        .expect("http_listen")
                        .to_string(),
                );
            }
        }
    }
    assert_eq!(
        scrape_targets(&config),
        listens,
        "prometheus.yml targets vs the examples' http_listen"
    );
    for needle in [
        "job_name: mesh",
        "metrics_path: /metrics",
        "rule_files:",
        "- alerts.yml",
        "scrape_configs:",
    ] {
        assert!(config.contains(needle), "prometheus.yml lacks `{needle}`");
    }

    phase("alert rules: structure");
    let rules = read_rules(&alerts);
    assert!(rules.len() >= 10, "only {} alert rules read", rules.len());
    let mut names = BTreeSet::new();
    for r in &rules {
        assert!(
            names.insert(r.name.clone()),
            "alert {} defined twice",
            r.name
        );
        assert!(
            r.name.starts_with("Mesh") && r.name.chars().all(|c| c.is_ascii_alphanumeric()),
            "alert name {}",
            r.name
        );
        assert!(!r.expr.trim().is_empty(), "alert {} has no expr", r.name);
        for (open, close) in [('(', ')'), ('[', ']'), ('{', '}')] {
            assert_eq!(
                r.expr.matches(open).count(),
                r.expr.matches(close).count(),
                "alert {}: unbalanced {open}{close}",
                r.name
            );
        }
        assert_eq!(
            r.expr.matches('"').count() % 2,
            0,
            "alert {}: unbalanced quotes",
            r.name
        );
        assert!(
            matches!(r.severity.as_deref(), Some("critical" | "warning" | "info")),
            "alert {}: severity",
            r.name
        );
        assert!(r.summary, "alert {} has no summary", r.name);
        if let Some(f) = &r.for_ {
            assert!(
                mesh_core::duration::parse_duration(f).is_ok(),
                "alert {}: for: {f}",
                r.name
            );
        }
    }
    path_taken(
        "alerts structure",
        &format!("{} rules read line by line in Rust: ok", rules.len()),
    );

    phase("promtool check config / check rules / test rules");
    if tool_works("promtool", &["--version"]) {
        for args in [
            &["check", "config", "prometheus.yml"][..],
            &["check", "rules", "alerts.yml"],
            &["test", "rules", "alerts.test.yml"],
        ] {
            let out = run_tool("promtool", args, &prom_dir);
            assert!(
                out.status.success(),
                "promtool {} failed:\n{}",
                args.join(" "),
                text_of(&out)
            );
        }
        // Negative control: a rule with a broken expression is refused.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("bad.yml"),
            alerts.replacen(
                "max by (mesh) (mesh_raft_leader) < 0",
                "max by (mesh) (mesh_raft_leader < 0",
                1,
            ),
        )
        .unwrap();
        let out = run_tool("promtool", &["check", "rules", "bad.yml"], dir.path());
        assert!(
            !out.status.success(),
            "negative control: promtool accepted a broken expression:\n{}",
            text_of(&out)
        );
        path_taken("prometheus", "promtool check config, check rules, test rules alerts.test.yml: ok; negative control caught");
    } else {
        path_taken(
            "prometheus",
            "promtool not installed: structural checks only (alerts.test.yml not run)",
        );
    }
}

// ---------------------------------------------------------------------------------
// The local mesh script and a live node

#[test]
fn local_mesh_script_is_executable_bash_that_parses() {
    use std::os::unix::fs::PermissionsExt;
    let script = deploy("local-mesh.sh");
    let mode = std::fs::metadata(&script)
        .unwrap_or_else(|e| panic!("{}: {e}", script.display()))
        .permissions()
        .mode();
    assert!(
        mode & 0o111 != 0,
        "deploy/local-mesh.sh is not executable (mode {mode:o})"
    );
    assert!(
        read(&script).starts_with("#!/usr/bin/env bash\n"),
        "deploy/local-mesh.sh should start with a bash shebang"
    );
    let out = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "bash -n deploy/local-mesh.sh:\n{}",
        text_of(&out)
    );
    path_taken(
        "local-mesh.sh",
        "exists, executable, bash -n ok (the demo itself is not run here)",
    );
}

#[test]
fn bootstrap_example_starts_a_node_whose_metrics_feed_the_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let admin = UserKey::generate(dir.path(), "admin").unwrap();
    // deploy/config/node1.toml, with the flags the launcher adds (data dir, loopback
    // ports, admin key) overriding its machine-specific keys: labels, slots, voters,
    // timeouts, budget and JSON logs come from the file.
    let with_config = has_config_check();
    let config = deploy("config/node1.toml");
    let extra: Vec<&str> = if with_config {
        vec!["--config", config.to_str().unwrap()]
    } else {
        vec![]
    };
    phase(&format!(
        "start a node {}",
        if with_config {
            "from deploy/config/node1.toml"
        } else {
            "(no --config in this mesh-node)"
        }
    ));
    let node = Node::start_with(&dir.path().join("node"), &[&admin.public], &extra).unwrap();
    if with_config {
        let first = node
            .log()
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default()
            .to_string();
        assert!(
            first.starts_with('{'),
            "log_format = \"json\" from node1.toml not applied; first log line: {first}"
        );
    }

    phase("the gauges the alerts use appear on /metrics");
    assert_eq!(
        http_get(node.http_port, "/health/live").unwrap(),
        (200, "live\n".to_string())
    );
    let alerts = read(&deploy("prometheus/alerts.yml"));
    let gauges: Vec<&str> = [
        "mesh_raft_term",
        "mesh_raft_leader",
        "mesh_raft_applied_index",
        "mesh_tasks{state=\"pending\"}",
        "mesh_tasks{state=\"running\"}",
    ]
    .into_iter()
    .filter(|g| alerts.contains(g.split('{').next().unwrap()))
    .collect();
    let deadline = Instant::now() + GAUGE_WAIT;
    let metrics = loop {
        let body = scrape(&node);
        if gauges
            .iter()
            .all(|g| body.lines().any(|l| l.starts_with(g)))
            || Instant::now() > deadline
        {
            break body;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    for g in &gauges {
        assert!(
            metrics.lines().any(|l| l.starts_with(g)),
            "{g} missing from /metrics:\n{metrics}"
        );
    }
    let leader = metrics
        .lines()
        .find(|l| l.starts_with("mesh_raft_leader "))
        .expect("mesh_raft_leader");
    assert_eq!(
        leader.split_whitespace().nth(1),
        Some("1"),
        "a bootstrapped node leads itself: {leader}"
    );
    path_taken(
        "live node",
        &format!(
            "{}; /health/live and the alerts' gauges on /metrics: ok",
            if with_config {
                "started with --config node1.toml"
            } else {
                "started with flags"
            }
        ),
    );
}
