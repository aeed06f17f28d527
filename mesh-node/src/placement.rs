//! The leader's placement loop: runs the pure scheduler from `mesh-core` whenever the
//! state changes and proposes its decisions as one batch of `Assign` commands.

use crate::proposer::Proposer;
use crate::service::Service;
use crate::store::StateView;
use mesh_core::raft_types::TypeConfig;
use mesh_core::scheduler::schedule;
use mesh_core::Command;
use openraft::Raft;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How often placement runs even without state changes (retries after a failed
/// proposal, tasks that waited for a slot).
const PLACEMENT_TICK: Duration = Duration::from_millis(500);

/// The placement loop.
pub struct Placement {
    /// This node's id.
    pub node: u64,
    /// Consensus, to know whether this node leads.
    pub raft: Raft<TypeConfig>,
    /// State to schedule from.
    pub state: StateView,
    /// Where decisions go.
    pub proposer: Proposer,
    /// Liveness.
    pub service: Service,
}

impl Placement {
    /// Run until shutdown.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut changes = self.state.changes();
        let mut tick = tokio::time::interval(PLACEMENT_TICK);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
                _ = tick.tick() => {}
            }
            if self.raft.metrics().borrow().current_leader != Some(self.node) {
                continue;
            }
            let now = crate::proposer::now();
            let decisions = self
                .state
                .read(|s| schedule(s, &self.service.live_nodes(s), now));
            if decisions.is_empty() {
                continue;
            }
            debug!(count = decisions.len(), "placing tasks");
            let commands = decisions
                .into_iter()
                .map(|a| Command::Assign {
                    task: a.task,
                    node: a.node,
                })
                .collect();
            if let Err(e) = self.proposer.propose_all(commands).await {
                warn!(error = %e, "placement not committed; retrying on the next change");
            }
        }
    }
}
