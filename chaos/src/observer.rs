//! The leadership observer: one thread per node polls its `status --json` during the
//! whole run and records (term, role, leader) as the node itself reports them, so the
//! checker can tell whether two nodes ever led the same term.

use crate::history::{History, Observation};
use crate::workload::Targets;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Time between two polls of one node: several per election timeout would cost two
/// cores too much; every 400 ms still sees each term that lasts longer than that.
const POLL_EVERY: Duration = Duration::from_millis(400);
/// Longest one poll may take (a cut-off node can hold the session).
const POLL_LIMIT: Duration = Duration::from_secs(2);

/// The running observer threads.
pub struct Observer {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

/// Parse one `status --json` answer.
pub fn parse_status(at_ms: u64, index: usize, v: &serde_json::Value) -> Option<Observation> {
    Some(Observation {
        at_ms,
        index,
        node: v["node"].as_u64()?,
        role: v["role"].as_str()?.to_string(),
        term: v["term"].as_u64()?,
        leader: v["leader"].as_u64(),
        applied: v["applied_index"].as_u64(),
    })
}

impl Observer {
    /// Start polling every node of `targets` that is marked up.
    pub fn start(history: Arc<History>, targets: Arc<Targets>) -> Observer {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..targets.clis.len())
            .map(|index| {
                let (history, targets, stop) = (history.clone(), targets.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        // A killed or paused node cannot answer; asking would only
                        // hold this thread for the whole limit.
                        if targets.is_up(index) {
                            let out =
                                targets.clis[index].run_within(&["--json", "status"], POLL_LIMIT);
                            if out.code == 0 {
                                let v: serde_json::Value =
                                    serde_json::from_slice(&out.stdout).unwrap_or_default();
                                if let Some(o) = parse_status(history.now_ms(), index, &v) {
                                    history.observe(o);
                                }
                            }
                        }
                        std::thread::sleep(POLL_EVERY);
                    }
                })
            })
            .collect();
        Observer { stop, handles }
    }

    /// Stop polling and wait for the threads.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles {
            let _ = h.join();
        }
    }
}
