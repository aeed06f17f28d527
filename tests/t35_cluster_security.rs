//! Claim: only keys the mesh pinned take part in it, and every refusal is clear and
//! changes nothing. A join with an expired, used-up, revoked or wrong-secret token, or
//! with a token whose seed pin does not match the seed, exits non-zero naming the
//! reason (never echoing the secret); a key the mesh has not pinned gets
//! `PERMISSION_DENIED` on every node-to-node call but `Join`; a member's key claiming
//! another node's id is refused, so it cannot keep a dead node alive nor vote or
//! replicate as it; a
//! client that expects one node's key at another node's address refuses the
//! connection (node-to-node TLS and SSH alike); plain TCP garbage on the node-to-node
//! and SSH ports is dropped and the mesh keeps serving.
//! Method: real clusters from `mesh_chaos::Cluster`; joins are real `mesh-node run
//! --join` processes; the hostile peer is a tonic client in this test using
//! `mesh_node::tls` with a key from a separately bootstrapped node or a member's
//! `host_key` file. After each refusal the node list, the token table and the Raft term
//! are compared with their values before.

use crate::t30_cluster::{
    eventually, nodes, role_health, submit_then_poll, Mesh, CLI_LIMIT, CONVERGE,
};
use mesh_chaos::{phase, Cli, Cluster, Node};
use mesh_core::codec;
use mesh_core::Fingerprint;
use mesh_node::host_key::HostKey;
use mesh_node::tls::{self, ServerExpectation, TlsIdentity};
use mesh_proto::v1::mesh_client::MeshClient;
use mesh_proto::v1::raft_client::RaftClient;
use mesh_proto::v1::{HeartbeatRequest, JoinRequest, RaftPayload};
use serde_json::Value;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::transport::Channel;
use tonic::Code;

/// `(id, fingerprint, health)` of every node: what must not change after a refusal.
fn membership(mesh: &mut Cluster) -> Vec<(u64, String, String)> {
    let mut v: Vec<_> = nodes(mesh)
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["id"].as_u64().unwrap(),
                n["fingerprint"].as_str().unwrap().to_string(),
                n["health"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// `token list --json` by token id: `(uses_left, revoked)`.
fn tokens(cli: &Cli) -> std::collections::BTreeMap<String, (u64, bool)> {
    let v = cli
        .run_within(&["--json", "token", "list"], CLI_LIMIT)
        .ok()
        .json();
    v.as_array()
        .unwrap_or_else(|| panic!("token list is not a list: {v}"))
        .iter()
        .map(|t| {
            (
                t["id"].as_str().unwrap().to_string(),
                (
                    t["uses_left"].as_u64().unwrap(),
                    t["revoked"].as_bool().unwrap(),
                ),
            )
        })
        .collect()
}

/// The parts of `mesh1-ID.SECRET.FP@ADDR`.
fn token_parts(token: &str) -> (String, String, String, String) {
    let rest = token.strip_prefix("mesh1-").unwrap();
    let (creds, addr) = rest.split_once('@').unwrap();
    let p: Vec<&str> = creds.split('.').collect();
    (p[0].into(), p[1].into(), p[2].into(), addr.into())
}

/// Start `mesh-node run --join TOKEN` on a fresh data directory and expect it to
/// exit non-zero with an error naming `reason`; the token's secret must not be shown.
fn join_refused(mesh: &Cluster, dir: &Path, name: &str, token: &str, reason: &str) -> String {
    phase(&format!("join with {name}: refused with '{reason}'"));
    let data = dir.join(name);
    let (code, log) =
        Node::start_refused(&data, &[&mesh.admin.public], &["--join", token]).unwrap();
    let log = mesh_chaos::strip_ansi(&log);
    assert_ne!(code, 0, "{log}");
    let error = log
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no `error:` line in the log:\n{log}"));
    assert!(
        error.contains(reason),
        "the error must name the reason '{reason}': {error}"
    );
    let (_, secret, _, _) = token_parts(token);
    assert!(
        !log.contains(&secret),
        "the token's secret appears in the log of a refused join:\n{log}"
    );
    assert!(
        !data.join("node.id").exists(),
        "a refused joiner must not record a node id"
    );
    error.to_string()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn bad_join_tokens_are_refused_with_the_reason_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path(), 1, &[]);
    let cli = mesh.cli(0);
    let before = membership(&mut mesh);

    phase("an expired token");
    let out = cli
        .run_within(
            &["--json", "token", "create", "--ttl", "1s", "--uses", "1"],
            CLI_LIMIT,
        )
        .ok()
        .json();
    let (expired, expires_at) = (
        out["token"].as_str().unwrap().to_string(),
        out["expires_at_ms"].as_u64().unwrap(),
    );
    while now_ms() <= expires_at + 200 {
        std::thread::sleep(Duration::from_millis(50));
    }
    join_refused(&mesh, dir.path(), "expired", &expired, "expired");

    phase("a revoked token");
    let revoked = mesh.token(1, "10m").unwrap();
    let revoked_id = token_parts(&revoked).0;
    cli.run_within(&["token", "revoke", &revoked_id], CLI_LIMIT)
        .ok();
    join_refused(&mesh, dir.path(), "revoked", &revoked, "was revoked");

    phase("a token with the wrong secret");
    let good = mesh.token(1, "10m").unwrap();
    let (id, secret, fp, addr) = token_parts(&good);
    let other_secret: String = secret.chars().rev().collect();
    assert_ne!(other_secret, secret);
    join_refused(
        &mesh,
        dir.path(),
        "wrong-secret",
        &format!("mesh1-{id}.{other_secret}.{fp}@{addr}"),
        "secret does not match",
    );
    assert_eq!(
        membership(&mut mesh),
        before,
        "a refused join changed the node list"
    );
    let table = tokens(&cli);
    assert_eq!(
        table[&token_parts(&expired).0],
        (1, false),
        "an expired token was consumed"
    );
    assert_eq!(table[&revoked_id], (1, true));
    assert_eq!(table[&id], (1, false), "a wrong secret consumed the token");

    phase("a single-use token, used twice: the first join works, the second is refused");
    let once = mesh.token(1, "10m").unwrap();
    let joined = Node::start_with(
        &dir.path().join("first"),
        &[&mesh.admin.public],
        &["--join", &once],
    )
    .unwrap();
    let joined_fp = joined.fingerprint().unwrap();
    let with_joiner = eventually("the joiner is registered", CONVERGE, || {
        let m = membership(&mut mesh);
        (m.len() == before.len() + 1 && m.iter().any(|n| n.1 == joined_fp && n.2 == "up"))
            .then_some(m.clone())
            .ok_or(format!("{m:?}"))
    });
    join_refused(&mesh, dir.path(), "used-twice", &once, "used up");
    assert_eq!(
        membership(&mut mesh),
        with_joiner,
        "a refused join changed the node list"
    );
    assert_eq!(tokens(&cli)[&token_parts(&once).0], (0, false));

    phase("a token whose seed pin names another node's key: the secret is never presented");
    let (id, secret, _, addr) = token_parts(&good);
    let wrong_pin = joined_fp.trim_start_matches("SHA256:");
    let seed_fp = mesh.nodes[0].fingerprint().unwrap();
    let error = join_refused(
        &mesh,
        dir.path(),
        "wrong-pin",
        &format!("mesh1-{id}.{secret}.{wrong_pin}@{addr}"),
        &joined_fp,
    );
    assert!(
        error.contains(&seed_fp),
        "the error must show the key the seed presented ({seed_fp}): {error}"
    );
    assert_eq!(
        membership(&mut mesh),
        with_joiner,
        "a refused join changed the node list"
    );
    assert_eq!(
        tokens(&cli)[&id],
        (1, false),
        "the token was consumed although the seed's key did not match its pin"
    );

    phase("the untouched token still works: the refusals were about the tokens, not the mesh");
    let second = Node::start_with(
        &dir.path().join("second"),
        &[&mesh.admin.public],
        &["--join", &good],
    )
    .unwrap();
    let second_fp = second.fingerprint().unwrap();
    eventually("the second joiner is registered", CONVERGE, || {
        let m = membership(&mut mesh);
        m.iter()
            .any(|n| n.1 == second_fp)
            .then_some(())
            .ok_or(format!("{m:?}"))
    });
}

/// A TLS identity from an OpenSSH host key file.
fn identity(key: &Path) -> TlsIdentity {
    TlsIdentity::from_host_key(&HostKey::load(key).unwrap()).unwrap()
}

/// A channel to `addr` presenting `me`, which must present exactly `expect`.
async fn dial(addr: &str, me: &TlsIdentity, expect: &str) -> Channel {
    tls::connect(
        addr,
        me,
        ServerExpectation::Exactly(Fingerprint::parse(expect).unwrap()),
    )
    .await
    .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"))
}

/// A Raft vote request for `term` from candidate `candidate` to node `target`, encoded
/// as nodes send it (`(target, request)`).
fn vote(term: u64, candidate: u64, target: u64) -> RaftPayload {
    let req = openraft::raft::VoteRequest::<u64>::new(openraft::Vote::new(term, candidate), None);
    RaftPayload {
        data: codec::encode(&(target, &req)).unwrap(),
    }
}

/// An empty AppendEntries of leader `leader` in `term` to node `target`, encoded as
/// nodes send it.
fn append(term: u64, leader: u64, target: u64) -> RaftPayload {
    let req = openraft::raft::AppendEntriesRequest::<mesh_core::raft_types::TypeConfig> {
        vote: openraft::Vote::new_committed(term, leader),
        prev_log_id: None,
        entries: vec![],
        leader_commit: None,
    };
    RaftPayload {
        data: codec::encode(&(target, &req)).unwrap(),
    }
}

/// The message of a call that must be refused with `PERMISSION_DENIED`.
fn denied<T: std::fmt::Debug>(what: &str, r: Result<tonic::Response<T>, tonic::Status>) -> String {
    match r {
        Ok(v) => panic!("{what} was accepted: {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), Code::PermissionDenied, "{what}: {s:?}");
            s.message().to_string()
        }
    }
}

#[test]
fn unpinned_keys_reach_only_join_and_members_cannot_claim_another_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path(), 3, &[]);
    let leader = mesh.wait_leader(CONVERGE, |_| true).unwrap();
    let (a, b) = {
        let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
        (others[0], others[1])
    };
    let (a_id, b_id) = (a as u64 + 1, b as u64 + 1);
    let leader_addr = mesh.nodes[leader].raft_addr();
    let leader_fp = mesh.nodes[leader].fingerprint().unwrap();

    phase("a node that bootstrapped its own mesh: its key is not pinned here");
    let foreign = Node::start(&dir.path().join("foreign"), &[&mesh.admin.public]).unwrap();
    let foreign_fp = foreign.fingerprint().unwrap();
    let before = membership(&mut mesh);
    assert!(before.iter().all(|n| n.1 != foreign_fp));
    let term_before = mesh.status(leader).unwrap()["term"].as_u64().unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let stranger = identity(&foreign.data_dir.join("host_key"));
        let channel = dial(&leader_addr, &stranger, &leader_fp).await;
        let (mut raft, mut peer) = (RaftClient::new(channel.clone()), MeshClient::new(channel));

        phase("unpinned key: every Raft and Mesh call but Join is PERMISSION_DENIED");
        let msg = denied(
            "a vote from an unpinned key",
            raft.vote(vote(term_before + 1000, 1, leader as u64 + 1))
                .await,
        );
        assert!(
            msg.contains(&foreign_fp) && msg.contains("not pinned"),
            "{msg}"
        );
        denied(
            "append_entries from an unpinned key",
            raft.append_entries(RaftPayload { data: vec![0; 16] }).await,
        );
        denied(
            "a replication stream from an unpinned key",
            raft.replicate(futures::stream::iter([RaftPayload { data: vec![0; 16] }]))
                .await,
        );
        denied(
            "install_snapshot from an unpinned key",
            raft.install_snapshot(RaftPayload { data: vec![0; 16] })
                .await,
        );
        denied(
            "propose from an unpinned key",
            peer.propose(RaftPayload { data: vec![0; 16] }).await,
        );
        let msg = denied(
            "a heartbeat from an unpinned key",
            peer.heartbeat(HeartbeatRequest {
                node_id: b_id,
                running: 0,
            })
            .await,
        );
        assert!(msg.contains("not pinned"), "{msg}");

        phase("unpinned key: Join is reachable, and the token decides");
        let join = peer
            .join(JoinRequest {
                token_id: "0000000000000000".into(),
                secret: "0".repeat(32),
                addr: "127.0.0.1:9".into(),
            })
            .await;
        let msg = denied("a join with a made-up token", join);
        assert!(
            msg.contains("join refused")
                && msg.contains("does not exist")
                && !msg.contains("not pinned"),
            "Join must reach its handler: {msg}"
        );
    });

    phase("nothing changed: same nodes, and the refused vote did not raise the term");
    assert_eq!(membership(&mut mesh), before);
    let term_after = mesh.status(leader).unwrap()["term"].as_u64().unwrap();
    assert!(
        term_after < term_before + 1000,
        "a refused vote moved the term from {term_before} to {term_after}"
    );

    phase(&format!(
        "SIGKILL node {b_id} and wait until it is marked down"
    ));
    mesh.nodes[b].kill9();
    eventually("the killed node is marked down", CONVERGE, || {
        let n = nodes(&mut mesh)?;
        (role_health(&n, b_id).1 == "down")
            .then_some(())
            .ok_or(format!("{:?}", role_health(&n, b_id)))
    });
    let leader = mesh.wait_leader(CONVERGE, |_| true).unwrap();
    let leader_addr = mesh.nodes[leader].raft_addr();
    let leader_fp = mesh.nodes[leader].fingerprint().unwrap();
    let term_before = mesh.status(leader).unwrap()["term"].as_u64().unwrap();

    rt.block_on(async {
        phase(&format!(
            "node {a_id}'s own key claims node {b_id}: heartbeats and votes are refused"
        ));
        let member = identity(&mesh.nodes[a].data_dir.join("host_key"));
        let channel = dial(&leader_addr, &member, &leader_fp).await;
        let (mut raft, mut peer) = (RaftClient::new(channel.clone()), MeshClient::new(channel));
        // For longer than the failure detector needs to mark a node up once heard from.
        for _ in 0..10 {
            let msg = denied(
                "a heartbeat claiming another node",
                peer.heartbeat(HeartbeatRequest {
                    node_id: b_id,
                    running: 0,
                })
                .await,
            );
            assert!(
                msg.contains(&format!("belongs to node {a_id}"))
                    && msg.contains(&format!("claims node {b_id}")),
                "{msg}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let msg = denied(
            "a vote claiming another node",
            raft.vote(vote(term_before + 1000, b_id, leader as u64 + 1))
                .await,
        );
        assert!(
            msg.contains(&format!("claims to come from node {b_id}")),
            "{msg}"
        );
        let mut answers = raft
            .replicate(futures::stream::iter([append(
                term_before + 1000,
                b_id,
                leader as u64 + 1,
            )]))
            .await
            .expect("a member may open a replication stream")
            .into_inner();
        let msg = denied(
            "an append on a replication stream claiming another node",
            answers.message().await.map(tonic::Response::new),
        );
        assert!(
            msg.contains(&format!("claims to come from node {b_id}")),
            "{msg}"
        );
    });

    phase(&format!(
        "node {b_id} is still down and the term did not jump"
    ));
    let n = nodes(&mut mesh).unwrap();
    assert_eq!(
        role_health(&n, b_id).1,
        "down",
        "spoofed heartbeats brought a dead node back up"
    );
    let term_after = mesh.status(leader).unwrap()["term"].as_u64().unwrap();
    assert!(
        term_after < term_before + 1000,
        "a refused vote moved the term from {term_before} to {term_after}"
    );
    drop(foreign);
}

/// Claim: unpinning a key takes effect on the `Replicate` stream it already has open
/// (the key is checked per message, not only when the stream opens).
#[test]
fn a_removed_nodes_open_replication_stream_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path(), 3, &[]);
    let leader = mesh.wait_leader(CONVERGE, |_| true).unwrap();
    let a = (0..3).find(|i| *i != leader).unwrap();
    let a_id = a as u64 + 1;
    let leader_addr = mesh.nodes[leader].raft_addr();
    let leader_fp = mesh.nodes[leader].fingerprint().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let member = identity(&mesh.nodes[a].data_dir.join("host_key"));

    phase(&format!(
        "node {a_id}'s key opens a replication stream to the leader and is answered"
    ));
    let (mut requests, mut answers) = rt.block_on(async {
        let channel = dial(&leader_addr, &member, &leader_fp).await;
        let (mut requests, outgoing) = futures::channel::mpsc::channel(1);
        // A stale term: the leader answers (with its higher vote) and changes nothing.
        futures::SinkExt::send(&mut requests, append(1, a_id, leader as u64 + 1))
            .await
            .unwrap();
        let mut answers = RaftClient::new(channel)
            .replicate(outgoing)
            .await
            .expect("a member may open a replication stream")
            .into_inner();
        let first = answers.message().await;
        assert!(
            matches!(first, Ok(Some(_))),
            "a pinned member's append was not answered: {first:?}"
        );
        (requests, answers)
    });

    phase(&format!(
        "`mesh-cli remove {a_id}`, until it shows `removed`"
    ));
    let out = mesh
        .cli(leader)
        .run_within(&["--json", "remove", &a_id.to_string(), "--yes"], CLI_LIMIT)
        .ok()
        .json();
    assert_eq!(out["removed"].as_u64(), Some(a_id), "{out}");
    eventually("the node shows removed", CONVERGE, || {
        let n = nodes(&mut mesh)?;
        (role_health(&n, a_id).1 == "removed")
            .then_some(())
            .ok_or(format!("{:?}", role_health(&n, a_id)))
    });

    phase("the next append on the stream that was open is PERMISSION_DENIED");
    rt.block_on(async {
        futures::SinkExt::send(&mut requests, append(1, a_id, leader as u64 + 1))
            .await
            .unwrap();
        let msg = denied(
            "an append from a removed node on its open stream",
            answers.message().await.map(tonic::Response::new),
        );
        assert!(msg.contains("not pinned"), "{msg}");
    });
}

#[test]
fn a_different_key_at_a_pinned_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path(), 2, &[]);
    let (fp1, fp2) = (
        mesh.nodes[0].fingerprint().unwrap(),
        mesh.nodes[1].fingerprint().unwrap(),
    );
    let before = membership(&mut mesh);

    phase("node-to-node TLS: expecting node 1's key at node 2's address fails");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let me = identity(&mesh.nodes[0].data_dir.join("host_key"));
    let addr2 = mesh.nodes[1].raft_addr();
    let err = rt
        .block_on(tls::connect(
            &addr2,
            &me,
            ServerExpectation::Exactly(Fingerprint::parse(&fp1).unwrap()),
        ))
        .map(|_| ())
        .expect_err("a connection to a node presenting an unexpected key must fail");
    let err = err.to_string();
    assert!(
        err.contains(&fp2) && err.contains(&fp1),
        "the error must show the presented and the expected key: {err}"
    );
    phase("control: expecting node 2's own key at its address works");
    rt.block_on(tls::connect(
        &addr2,
        &me,
        ServerExpectation::Exactly(Fingerprint::parse(&fp2).unwrap()),
    ))
    .unwrap();

    phase("SSH: node 1's key pinned for node 2's address is refused by mesh-cli");
    let key1 = std::fs::read_to_string(mesh.nodes[0].data_dir.join("host_key.pub")).unwrap();
    let key1: Vec<&str> = key1.split_whitespace().take(2).collect();
    let known_hosts = dir.path().join("swapped_known_hosts");
    std::fs::write(
        &known_hosts,
        format!(
            "[127.0.0.1]:{} {}\n",
            mesh.nodes[1].ssh_port,
            key1.join(" ")
        ),
    )
    .unwrap();
    let swapped = Cli {
        known_hosts,
        ..mesh.cli(1)
    };
    let out = swapped.run_within(&["status"], CLI_LIMIT);
    assert_ne!(out.code, 0, "{}", out.text());
    assert!(
        out.stderr.contains("not the pinned") && out.stderr.contains(&fp2),
        "{}",
        out.stderr
    );

    assert_eq!(membership(&mut mesh), before);
}

/// Send `garbage` to `addr` and read until the server closes the connection; what it sent.
fn dropped_after_garbage(addr: &str, garbage: &[u8]) -> Vec<u8> {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = s.write_all(garbage);
    let (mut got, mut buf) = (Vec::new(), [0u8; 4096]);
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                return got
            }
            Err(e) => panic!("{addr} did not drop a connection that sent garbage: {e}"),
        }
    }
}

#[test]
fn tcp_garbage_is_dropped_and_the_mesh_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut mesh = Mesh::start(dir.path(), 2, &[]);
    let before = membership(&mut mesh);
    let mut garbage = b"GET / HTTP/1.1\r\nHost: mesh\r\n\r\n".to_vec();
    garbage.extend(
        mesh_chaos::lcg_f32(9, 1024)
            .iter()
            .flat_map(|f| f.to_le_bytes()),
    );
    garbage.extend_from_slice(b"\r\n\r\n");

    for i in 0..2 {
        phase(&format!(
            "garbage to node {}'s node-to-node (TLS) port",
            i + 1
        ));
        dropped_after_garbage(&mesh.nodes[i].raft_addr(), &garbage);
        phase(&format!("garbage to node {}'s SSH port", i + 1));
        let banner = dropped_after_garbage(&mesh.nodes[i].ssh_addr(), &garbage);
        assert!(
            banner.starts_with(b"SSH-2.0-"),
            "the SSH port answered {:?}",
            String::from_utf8_lossy(&banner)
        );
    }

    phase("the mesh keeps serving: both nodes answer and a submit on each succeeds");
    for i in 0..2 {
        assert!(mesh.nodes[i].is_running(), "node {} died", i + 1);
        let out = submit_then_poll(
            &mesh.cli(i),
            &[
                "--kernel",
                "mandelbrot",
                "--param",
                "width=16",
                "--param",
                "height=16",
                "--param",
                "max_iter=32",
            ],
        );
        assert_eq!(out["state"], Value::from("succeeded"), "{out}");
    }
    assert_eq!(membership(&mut mesh), before);
}
