//! Claim: nothing acknowledged is lost when the node is killed with SIGKILL. Every
//! task whose submit was acknowledged and every recorded result is still there, with
//! the same digest, after the process restarts on the same data directory.
//! Method: submit tasks (some waited for, some only acknowledged), `kill -9`, restart,
//! compare the task list before and after.

use crate::t10_single_node::{pinned_node, task_id};
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
