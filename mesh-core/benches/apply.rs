//! What applying a submit to the state machine costs as the state grows: every node
//! applies every committed submit, so this is paid three times per task on a 3-node
//! mesh. Plain timing (no harness):
//!
//!     cargo bench -p mesh-core --bench apply
//!
//! Submits like mesh-bench's (saxpy, two 512-byte inputs, an idempotency key, 256
//! submitters), applied 100 per entry; prints the mean time per submit up to each
//! state size, with idempotency keys and without, and what encoding and decoding the
//! whole state costs at each size (a snapshot: its payload is this state and two small
//! fields). Figures: docs/benchmarks.md.

use mesh_core::{codec, Bytes, Command, Fingerprint, MeshState, Request, TaskSpec, Timestamp};
use std::time::{Duration, Instant};

const PER_ENTRY: u64 = 100;
const SIZES: [u64; 4] = [10_000, 100_000, 300_000, 600_000];

fn spec(n: u64, keyed: bool) -> TaskSpec {
    let input = |seed: f32| -> Bytes {
        let floats: Vec<u8> = (0..128)
            .flat_map(|i| (seed + n as f32 + i as f32).to_le_bytes())
            .collect();
        floats.into()
    };
    TaskSpec {
        idempotency_key: keyed.then(|| format!("bench-{}-{n}", n % 256)),
        ..TaskSpec::builtin(
            "saxpy",
            &[("a", "2")],
            [("x", input(1.0)), ("y", input(0.5))],
        )
    }
}

fn run(keyed: bool) {
    let submitters: Vec<Fingerprint> = (0..256u32)
        .map(|i| Fingerprint::of_key_blob(&i.to_le_bytes()))
        .collect();
    let mut state = MeshState::default();
    let mut n = 0u64;
    let mut line = format!("idempotency keys {:>3}:", if keyed { "yes" } else { "no" });
    let mut snapshots = String::new();
    for size in SIZES {
        let (mut took, mut count) = (Duration::ZERO, 0u64);
        while n < size {
            let commands: Vec<Command> = (n..n + PER_ENTRY)
                .map(|i| Command::Submit {
                    spec: spec(i, keyed),
                    outputs: Vec::new(),
                    submitter: submitters[(i % 256) as usize].clone(),
                })
                .collect();
            let request = Request {
                now: Timestamp(1),
                commands: commands.into(),
            };
            let started = Instant::now();
            std::hint::black_box(state.apply_request(&request));
            took += started.elapsed();
            count += PER_ENTRY;
            n += PER_ENTRY;
        }
        line.push_str(&format!(
            "  to {}k tasks {:.2} us",
            size / 1000,
            took.as_secs_f64() * 1e6 / count as f64
        ));
        snapshots.push_str(&snapshot(&state, size));
    }
    println!("{line}");
    println!("  the state as a snapshot:{snapshots}");
}

/// Encode and decode `state` once each; the figures as a line's part.
fn snapshot(state: &MeshState, size: u64) -> String {
    let started = Instant::now();
    let bytes = codec::encode(state).expect("the state encodes");
    let encoded = started.elapsed();
    let started = Instant::now();
    let decoded: MeshState = codec::decode(&bytes).expect("the state decodes");
    let decode = started.elapsed();
    std::hint::black_box(decoded);
    format!(
        "  {}k tasks {:.1} MiB, encode {:.0} ms, decode {:.0} ms",
        size / 1000,
        bytes.len() as f64 / 1048576.0,
        encoded.as_secs_f64() * 1e3,
        decode.as_secs_f64() * 1e3
    )
}

fn main() {
    println!("mean time to apply one submit, by state size:");
    run(true);
    run(false);
}
