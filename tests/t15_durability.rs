//! Claim: nothing acknowledged is lost when the node is killed with SIGKILL. Every
//! task whose submit was acknowledged and every recorded result is still there, with
//! the same digest, after the process restarts on the same data directory.
//! Method: submit tasks (some waited for, some only acknowledged), `kill -9`, restart,
//! compare the task list before and after.
//!
//! Claim: with snapshots taken every few entries, each node keeps exactly one
//! snapshot file, and a follower that was down while the leader's log moved on past
//! it catches up from the leader's snapshot, then survives a SIGKILL and restart with
//! that snapshot file in its data directory, with the same tasks and results as the
//! others. (That a store reopens from its snapshot file is shown in
//! mesh-node/tests/store.rs.)

use crate::support::{eventually, metric, scrape};
use crate::t10_single_node::{pinned_node, task_id};
use crate::t30_cluster::{check_outcomes, submit_workload, tasks_on, Mesh, CONVERGE};
use mesh_chaos::phase;
use std::collections::BTreeMap;

fn snapshot(cli: &mesh_chaos::Cli) -> BTreeMap<String, (String, String)> {
    let tasks = cli.run(&["--json", "tasks"]).ok().json();
    tasks
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let digest = t["outputs"][0]["sha256"].as_str().unwrap_or("").to_string();
            (
                t["id"].to_string(),
                (t["state"].as_str().unwrap().to_string(), digest),
            )
        })
        .collect()
}

#[test]
fn acknowledged_tasks_and_results_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let (mut node, cli, _) = pinned_node(dir.path());
    phase("submit and complete tasks");
    let mut done = Vec::new();
    for i in 1..=3 {
        let w = (16 * i).to_string();
        let out = cli
            .run(&[
                "--json",
                "submit",
                "--kernel",
                "mandelbrot",
                "--param",
                &format!("width={w}"),
                "--param",
                "height=16",
                "--param",
                "max_iter=32",
                "--wait",
            ])
            .ok()
            .json();
        done.push(task_id(&out));
    }
    phase("submit tasks without waiting");
    let mut acked = Vec::new();
    for i in 0..5 {
        let key = format!("k{i}");
        let out = cli
            .run(&[
                "--json",
                "submit",
                "--kernel",
                "mandelbrot",
                "--param",
                "width=32",
                "--param",
                "height=32",
                "--param",
                "max_iter=16",
                "--idempotency-key",
                &key,
            ])
            .ok()
            .json();
        acked.push(task_id(&out));
    }
    let before = snapshot(&cli);
    for id in done.iter().chain(&acked) {
        assert!(before.contains_key(id), "task {id} missing before the kill");
    }

    phase("kill -9 and restart");
    node.kill9();
    node.restart().unwrap();
    let after = snapshot(&cli);
    for id in &done {
        assert_eq!(
            after[id], before[id],
            "completed task {id} changed across the crash"
        );
        assert_eq!(after[id].0, "succeeded");
    }
    for id in &acked {
        assert!(after.contains_key(id), "acknowledged task {id} was lost");
    }

    phase("acknowledged tasks still finish after the restart, and idempotency keys still hold");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    for id in &acked {
        loop {
            let t = cli.run(&["--json", "task", id]).ok().json();
            if t["state"] == "succeeded" {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "task {id} did not finish after the restart: {t}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    let again = cli
        .run(&[
            "--json",
            "submit",
            "--kernel",
            "mandelbrot",
            "--param",
            "width=32",
            "--param",
            "height=32",
            "--param",
            "max_iter=16",
            "--idempotency-key",
            "k0",
        ])
        .ok()
        .json();
    assert_eq!(
        task_id(&again),
        acked[0],
        "an idempotency key must return the task submitted before the crash"
    );
}

/// The snapshot payload files of a node's data directory.
fn snapshot_files(node: &mesh_chaos::Node) -> Vec<String> {
    let dir = node.data_dir.join("raft").join("snapshot");
    std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_follower_behind_the_leaders_snapshot_catches_up_from_it_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    // 20 entries (the least allowed) plus 1 per node id: the log keeps 1 entry after one.
    let mut mesh = Mesh::start(dir.path(), 3, &["--snapshot-every", "20"]);
    let leader = mesh.leader_of_three_voters();
    let behind = (0..3).find(|i| *i != leader).unwrap();
    phase(&format!(
        "SIGKILL follower {} and commit past it",
        behind + 1
    ));
    mesh.nodes[behind].kill9();
    // One Raft entry per submit at least: more than any node's snapshot interval.
    let work = submit_workload(&mesh.cli(leader), dir.path(), "snap", 0, 40);

    phase("the live nodes snapshot and keep one payload file each");
    for i in (0..3).filter(|i| *i != behind) {
        eventually("a snapshot built", CONVERGE, || {
            let built = metric(&scrape(&mesh.nodes[i]), "mesh_snapshots_built_total", &[]);
            let files = snapshot_files(&mesh.nodes[i]);
            (built >= 1.0 && files.len() == 1 && files[0].ends_with(".snap"))
                .then_some(())
                .ok_or(format!("node {}: built {built}, files {files:?}", i + 1))
        });
    }

    phase("restart the follower: the leader's log no longer reaches back to it");
    mesh.nodes[behind].restart().unwrap();
    eventually(
        "the follower installs the leader's snapshot",
        CONVERGE,
        || {
            let installed = metric(
                &scrape(&mesh.nodes[behind]),
                "mesh_snapshots_installed_total",
                &[],
            );
            (installed >= 1.0)
                .then_some(())
                .ok_or(format!("installed {installed}"))
        },
    );
    assert_eq!(snapshot_files(&mesh.nodes[behind]).len(), 1);
    check_outcomes(&mut mesh, dir.path(), &work);

    phase("SIGKILL and restart it again: it starts on its snapshot file and holds every task");
    mesh.nodes[behind].kill9();
    mesh.nodes[behind].restart().unwrap();
    let cli = mesh.cli(behind);
    eventually("the restarted follower holds every task", CONVERGE, || {
        let tasks = tasks_on(&cli)?;
        let missing: Vec<u64> = work
            .iter()
            .map(|w| w.id)
            .filter(|id| tasks.get(id).is_none_or(|t| t["state"] != "succeeded"))
            .collect();
        missing
            .is_empty()
            .then_some(())
            .ok_or(format!("missing or unfinished: {missing:?}"))
    });
    check_outcomes(&mut mesh, dir.path(), &work);
}
