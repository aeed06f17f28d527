//! Transcript tests of the state machine and the scheduler: each file under
//! `tests/transcripts/` is a session of commands (`> ...`) followed by the exact
//! outcome lines they must produce. Run them all; a mismatch prints the whole
//! transcript as it actually came out.
//!
//! Commands:
//! `register NODE [device=cpu|discrete|integrated] [slots=N] [label:K=V]...`,
//! `submit [by=USER] [key=K] [max_attempts=N] [priority=P] [require=EXPR]...`,
//! `assign TASK NODE`, `start TASK ATTEMPT NODE`, `complete TASK ATTEMPT NODE [bytes=N]`,
//! `fail TASK ATTEMPT NODE [fatal]`, `cancel TASK`, `state TASK`,
//! `schedule [live=N,N]` (prints decisions without applying), `place [live=N,N]` (applies them),
//! `why TASK [live=N,N]`, `refuse [require=EXPR]...` (would submit refuse it?),
//! `token create ID [ttl=MS] [uses=N] [secret=S]`, `token revoke ID`,
//! `join TOKEN [secret=S] [key=NAME]`, `down NODE`, `up NODE`, `remove NODE`,
//! `advance MS` (the clock), `live` (nodes placement may use),
//! `submit ... [shards=N] [out=BYTES] [prefer=EXPR]...`, `checkpoint TASK ATTEMPT NODE SHARD [bytes=N]`
//! (the output bytes all equal SHARD), `release TASK ATTEMPT NODE`, `drain NODE`, `undrain NODE`,
//! `result TASK` (the recorded output bytes), `key add NAME ROLE [by=NAME]`, `key remove NAME`,
//! `refused NAME ACTION REASON...`, `retention N`, `audit` (the trail, actors by name).

use mesh_core::capability::{AdapterInfo, AdapterLimits, DeviceType, NodeCapabilities};
use mesh_core::requirement::Requirement;
use mesh_core::scheduler::{never_runnable, schedule, why_waiting};
use mesh_core::task::{KernelSpec, OutputDecl, TaskSpec, DEFAULT_TIMEOUT};
use mesh_core::{Attempt, Bytes, Command, Fingerprint, MeshState, NodeId, TaskId, Timestamp};
use std::collections::{BTreeMap, BTreeSet};

fn adapter(device: DeviceType) -> AdapterInfo {
    AdapterInfo {
        name: format!("{device} adapter"),
        vendor_id: 0x10005,
        vendor: "mesa".into(),
        backend: "vulkan".into(),
        device_type: device,
        driver: "test".into(),
        features: vec!["shader-f16".into()],
        limits: AdapterLimits {
            max_buffer_size: 1 << 30,
            max_storage_buffer_binding_size: 1 << 27,
            max_storage_buffers_per_shader_stage: 8,
            max_compute_workgroups_per_dimension: 65535,
            max_compute_invocations_per_workgroup: 256,
            max_compute_workgroup_size_x: 256,
        },
    }
}

fn user(name: &str) -> Fingerprint {
    Fingerprint::of_key_blob(name.as_bytes())
}

struct Session {
    state: MeshState,
    clock: u64,
}

fn kv<'a>(words: &'a [&'a str], key: &str) -> Option<&'a str> {
    words
        .iter()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

fn live(words: &[&str], state: &MeshState) -> BTreeSet<NodeId> {
    match kv(words, "live") {
        Some(list) => list
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|n| NodeId(n.parse().unwrap()))
            .collect(),
        None => state.nodes.keys().copied().collect(),
    }
}

fn requirements(words: &[&str]) -> Vec<Requirement> {
    words
        .iter()
        .filter_map(|w| w.strip_prefix("require="))
        .map(|r| Requirement::parse(r).unwrap())
        .collect()
}

impl Session {
    fn run(&mut self, line: &str) -> Vec<String> {
        // "register N" for a node that joined keeps the key it joined with.
        self.clock += 1;
        let now = Timestamp(self.clock);
        let words: Vec<&str> = line.split_whitespace().collect();
        let n = |i: usize| -> u64 {
            words[i]
                .parse()
                .unwrap_or_else(|_| panic!("number expected in {line:?}"))
        };
        let cmd = match words[0] {
            "register" => {
                let device = kv(&words, "device")
                    .and_then(DeviceType::parse)
                    .unwrap_or(DeviceType::Cpu);
                let labels: BTreeMap<String, String> = words
                    .iter()
                    .filter_map(|w| w.strip_prefix("label:"))
                    .map(|l| {
                        let (k, v) = l.split_once('=').unwrap();
                        (k.to_string(), v.to_string())
                    })
                    .collect();
                let slots = kv(&words, "slots").map_or(1, |s| s.parse().unwrap());
                let adapters = if kv(&words, "device") == Some("none") {
                    vec![]
                } else {
                    vec![adapter(device)]
                };
                Command::RegisterNode {
                    node: NodeId(n(1)),
                    fingerprint: kv(&words, "key").map_or_else(|| user(words[1]), user),
                    addr: format!("node{}", words[1]),
                    capabilities: NodeCapabilities {
                        adapters,
                        labels,
                        slots,
                    },
                }
            }
            "submit" => Command::Submit {
                spec: TaskSpec {
                    kernel: KernelSpec::Builtin {
                        name: "vector-add".into(),
                        params: BTreeMap::new(),
                    },
                    inputs: vec![],
                    outputs: vec![],
                    requirements: requirements(&words),
                    prefer: words
                        .iter()
                        .filter_map(|w| w.strip_prefix("prefer="))
                        .map(|r| Requirement::parse(r).unwrap())
                        .collect(),
                    shards: kv(&words, "shards").map_or(1, |v| v.parse().unwrap()),
                    priority: kv(&words, "priority").map_or(0, |p| p.parse().unwrap()),
                    timeout: DEFAULT_TIMEOUT,
                    max_attempts: kv(&words, "max_attempts").map_or(3, |p| p.parse().unwrap()),
                    idempotency_key: kv(&words, "key").map(String::from),
                },
                outputs: vec![OutputDecl {
                    name: "out".into(),
                    size: kv(&words, "out").map_or(4, |v| v.parse().unwrap()),
                }],
                submitter: user(kv(&words, "by").unwrap_or("alice")),
            },
            "assign" => Command::Assign {
                task: TaskId(n(1)),
                node: NodeId(n(2)),
            },
            "start" => Command::Start {
                task: TaskId(n(1)),
                attempt: Attempt(n(2) as u32),
                node: NodeId(n(3)),
            },
            "complete" => Command::Complete {
                task: TaskId(n(1)),
                attempt: Attempt(n(2) as u32),
                node: NodeId(n(3)),
                outputs: vec![Bytes::from(vec![
                    7u8;
                    kv(&words, "bytes")
                        .map_or(4, |b| b.parse().unwrap())
                ])],
            },
            "fail" => Command::Fail {
                task: TaskId(n(1)),
                attempt: Attempt(n(2) as u32),
                node: NodeId(n(3)),
                error: "boom".into(),
                retryable: !words.contains(&"fatal"),
            },
            "token" if words[1] == "create" => Command::CreateToken {
                id: words[2].into(),
                secret_hash: mesh_core::token::secret_hash(
                    kv(&words, "secret").unwrap_or("s3cret"),
                ),
                ttl: std::time::Duration::from_millis(
                    kv(&words, "ttl").map_or(1000, |v| v.parse().unwrap()),
                ),
                uses: kv(&words, "uses").map_or(1, |v| v.parse().unwrap()),
                actor: user("admin"),
            },
            "token" if words[1] == "revoke" => Command::RevokeToken {
                id: words[2].into(),
                actor: user("admin"),
            },
            "join" => Command::Join {
                token: words[1].into(),
                secret_hash: mesh_core::token::secret_hash(
                    kv(&words, "secret").unwrap_or("s3cret"),
                ),
                fingerprint: user(kv(&words, "key").unwrap_or("newcomer")),
                addr: "joiner:7720".into(),
            },
            "checkpoint" => Command::Checkpoint {
                task: TaskId(n(1)),
                attempt: Attempt(n(2) as u32),
                node: NodeId(n(3)),
                shard: n(4) as u32,
                output: Bytes::from(vec![
                    n(4) as u8;
                    kv(&words, "bytes").map_or(2, |b| b.parse().unwrap())
                ]),
            },
            "release" => Command::Release {
                task: TaskId(n(1)),
                attempt: Attempt(n(2) as u32),
                node: NodeId(n(3)),
            },
            "drain" => Command::Drain {
                node: NodeId(n(1)),
                actor: user("admin"),
            },
            "undrain" => Command::Undrain {
                node: NodeId(n(1)),
                actor: user("admin"),
            },
            "result" => {
                let t = &self.state.tasks[&TaskId(n(1))];
                let r = t.result.as_ref().expect("a result");
                return vec![format!(
                    "{:?}",
                    self.state.blob(&r.outputs[0].digest).unwrap().as_slice()
                )];
            }
            "key" if words[1] == "add" => Command::AddKey {
                fingerprint: user(words[2]),
                key: format!("ssh-ed25519 {}", words[2]),
                role: mesh_core::access::Role::parse(words[3]).unwrap(),
                comment: String::new(),
                actor: user(kv(&words, "by").unwrap_or("admin")),
            },
            "key" if words[1] == "remove" => Command::RemoveKey {
                fingerprint: user(words[2]),
                actor: user("admin"),
            },
            "refused" => Command::AuditRefusal {
                actor: user(words[1]),
                action: words[2].into(),
                target: None,
                reason: words[3..].join(" "),
            },
            "retention" => Command::SetAuditRetention {
                entries: n(1) as u32,
                actor: user("admin"),
            },
            "audit" => {
                let names: BTreeMap<Fingerprint, &str> =
                    ["admin", "alice", "bob", "carol", "newcomer"]
                        .into_iter()
                        .map(|n| (user(n), n))
                        .collect();
                return self
                    .state
                    .audit
                    .entries
                    .iter()
                    .map(|e| {
                        format!(
                            "[{}] {} {}{} -> {}",
                            e.seq,
                            names.get(&e.actor).copied().unwrap_or("?"),
                            e.action,
                            e.target.as_ref().map_or(String::new(), |t| format!(" {t}")),
                            e.outcome
                        )
                    })
                    .collect();
            }
            "down" => Command::MarkDown { node: NodeId(n(1)) },
            "up" => Command::MarkUp { node: NodeId(n(1)) },
            "remove" => Command::RemoveNode {
                node: NodeId(n(1)),
                actor: user("admin"),
            },
            "advance" => {
                self.clock += n(1);
                return vec![format!("clock at {}", self.clock)];
            }
            "live" => {
                return vec![format!(
                    "{:?}",
                    self.state
                        .live_nodes()
                        .iter()
                        .map(|n| n.0)
                        .collect::<Vec<_>>()
                )];
            }
            "cancel" => Command::Cancel {
                task: TaskId(n(1)),
                actor: user("alice"),
            },
            "state" => {
                let t = &self.state.tasks[&TaskId(n(1))];
                let result = t.result.as_ref().map_or(String::new(), |r| {
                    format!(", result from attempt {} on node {}", r.attempt, r.node)
                });
                return vec![format!("{}{result}", t.state)];
            }
            "schedule" | "place" => {
                let decisions = schedule(&self.state, &live(&words, &self.state), now);
                if words[0] == "place" {
                    return decisions
                        .iter()
                        .map(|a| {
                            self.state
                                .apply(
                                    now,
                                    &Command::Assign {
                                        task: a.task,
                                        node: a.node,
                                    },
                                )
                                .to_string()
                        })
                        .collect();
                }
                if decisions.is_empty() {
                    return vec!["nothing to place".into()];
                }
                return decisions
                    .iter()
                    .map(|a| format!("task {} -> node {}", a.task, a.node))
                    .collect();
            }
            "why" => {
                let t = &self.state.tasks[&TaskId(n(1))];
                return vec![why_waiting(&self.state, t, &live(&words, &self.state), now)
                    .unwrap_or_else(|| "not waiting".into())];
            }
            "refuse" => {
                return vec![never_runnable(&self.state, &requirements(&words))
                    .unwrap_or_else(|| "accepted".into())];
            }
            other => panic!("unknown transcript command {other:?}"),
        };
        vec![self.state.apply(now, &cmd).to_string()]
    }
}

fn run_file(path: &std::path::Path) -> (String, String) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut session = Session {
        state: MeshState::default(),
        clock: 0,
    };
    let mut actual = String::new();
    for line in text.lines() {
        if let Some(cmd) = line.strip_prefix("> ") {
            actual += line;
            actual += "\n";
            for out in session.run(cmd) {
                actual += &out;
                actual += "\n";
            }
        } else if line.starts_with('#') || line.trim().is_empty() {
            actual += line;
            actual += "\n";
        }
    }
    (text, actual)
}

#[test]
fn transcripts() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/transcripts");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for f in files {
        let (expected, actual) = run_file(&f);
        assert!(
            expected == actual,
            "transcript {} differs; actual:\n{actual}",
            f.display()
        );
    }
}
