//! Claim: `mesh-bench`, the command every figure in docs/benchmarks.md comes from, still
//! runs end to end: `list` names the scenarios, and short runs of `submit-stream` on
//! three real nodes and of `end-to-end` (a tiny kernel on lavapipe, submit to result)
//! report committed work with no errors in their JSON, and `run disk` reports the
//! disk's syncs from one and from three writers.
//! Method: run the `mesh-bench` binary (built beside this test, like the nodes) with
//! 2 s load runs; check its exit status and the JSON it prints. The figures of such
//! short runs of debug builds say nothing about speed and are not checked.

use mesh_chaos::{bin, phase};
use serde_json::Value;
use std::process::Command;

/// `mesh-bench ARGS`, which must succeed; its standard output.
fn mesh_bench(args: &[&str]) -> String {
    phase(&format!("mesh-bench {}", args.join(" ")));
    let out = Command::new(bin("mesh-bench"))
        .args(args)
        .output()
        .expect("run mesh-bench");
    assert!(
        out.status.success(),
        "mesh-bench {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// The one point of a `run --json` document, after checking that it did work.
fn only_point(json: &str, scenario: &str, nodes: u64) -> Value {
    let doc: Value = serde_json::from_str(json).expect("run --json prints JSON");
    let points = doc.as_array().expect("a list of points");
    assert_eq!(points.len(), 1, "{doc:#}");
    let point = points[0].clone();
    assert_eq!(point["system"], "mesh", "{point:#}");
    assert_eq!(point["scenario"], scenario, "{point:#}");
    assert_eq!(point["nodes"], nodes, "{point:#}");
    assert_eq!(point["errors"], 0, "{point:#}");
    let run = &point["runs"][0];
    assert!(
        run["ops"].as_u64().unwrap() > 0,
        "no committed work: {point:#}"
    );
    assert!(run["ops_per_sec"].as_f64().unwrap() > 0.0, "{point:#}");
    let (p50, p99) = (
        run["p50_ms"].as_f64().unwrap(),
        run["p99_ms"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99, "{point:#}");
    point
}

#[test]
fn mesh_bench_lists_its_scenarios_and_short_runs_report_committed_work() {
    let list = mesh_bench(&["list"]);
    for scenario in [
        "submit",
        "submit-stream",
        "submit-batch",
        "status",
        "end-to-end",
        "failover",
        "reassign",
        "join",
        "footprint",
        "etcd",
        "disk",
    ] {
        assert!(
            list.lines()
                .any(|l| l.split_whitespace().next() == Some(scenario)),
            "`mesh-bench list` lacks {scenario}:\n{list}"
        );
    }

    let stream = mesh_bench(&[
        "run",
        "submit-stream",
        "--nodes",
        "3",
        "--clients",
        "2",
        "--duration",
        "2s",
        "--json",
    ]);
    let point = only_point(&stream, "submit-stream", 3);
    assert_eq!(point["clients"], 2, "{point:#}");

    let end_to_end = mesh_bench(&[
        "run",
        "end-to-end",
        "--nodes",
        "1",
        "--clients",
        "1",
        "--duration",
        "2s",
        "--json",
    ]);
    only_point(&end_to_end, "end-to-end", 1);

    // The disk's syncs, from one writer and from three at once, and the bound they
    // set on one client: a third of the three writers' syncs per second.
    let disk: Value = serde_json::from_str(&mesh_bench(&[
        "run",
        "disk",
        "--duration",
        "300ms",
        "--json",
    ]))
    .expect("run disk --json prints JSON");
    for (side, writers) in [("one", 1), ("three", 3)] {
        assert_eq!(disk[side]["writers"], writers, "{disk:#}");
        assert!(disk[side]["per_sec"].as_f64().unwrap() > 0.0, "{disk:#}");
        let (p50, p90) = (
            disk[side]["p50_us"].as_f64().unwrap(),
            disk[side]["p90_us"].as_f64().unwrap(),
        );
        assert!(0.0 < p50 && p50 <= p90, "{disk:#}");
    }
    let bound = disk["one_client_bound"].as_f64().unwrap();
    let three = disk["three"]["per_sec"].as_f64().unwrap();
    assert!((bound - three / 3.0).abs() < 1e-6, "{disk:#}");
}
