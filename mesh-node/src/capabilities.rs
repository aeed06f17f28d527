//! What this node publishes about itself: its adapters (probed through wgpu), labels
//! and slots. Registered through Raft once a leader is known, and re-registered when
//! a periodic probe finds that something changed (a driver update, a lost device).

use crate::gpu;
use crate::proposer::Proposer;
use anyhow::Context;
use mesh_core::raft_types::TypeConfig;
use mesh_core::{Command, Fingerprint, NodeCapabilities, NodeId, Outcome};
use openraft::Raft;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often adapters are probed again.
const REFRESH_INTERVAL: Duration = Duration::from_secs(60);
/// Retry pause while registering.
const REGISTER_RETRY: Duration = Duration::from_millis(200);
/// How long to wait for a leader before giving up at start.
const LEADER_WAIT: Duration = Duration::from_secs(60);

/// The node's identity and configuration as published in its node record.
#[derive(Clone)]
pub struct Publisher {
    /// This node.
    pub node: NodeId,
    /// Its host key fingerprint.
    pub fingerprint: Fingerprint,
    /// Its node-to-node address.
    pub addr: String,
    /// Operator labels.
    pub labels: BTreeMap<String, String>,
    /// Concurrent task slots.
    pub slots: u32,
}

impl Publisher {
    /// Probe the adapters now (blocking: wgpu enumerates devices).
    pub fn probe(&self) -> NodeCapabilities {
        NodeCapabilities {
            adapters: gpu::probe(),
            labels: self.labels.clone(),
            slots: self.slots,
        }
    }

    /// Wait for a leader, then record this node and its capabilities.
    pub async fn register(
        &self,
        raft: &Raft<TypeConfig>,
        proposer: &Proposer,
        capabilities: NodeCapabilities,
    ) -> anyhow::Result<()> {
        raft.wait(Some(LEADER_WAIT))
            .metrics(|m| m.current_leader.is_some(), "a leader is known")
            .await
            .with_context(|| format!("no Raft leader after {LEADER_WAIT:?}"))?;
        let command = Command::RegisterNode {
            node: self.node,
            fingerprint: self.fingerprint.clone(),
            addr: self.addr.clone(),
            capabilities,
        };
        loop {
            match proposer.propose(command.clone()).await {
                Ok(Outcome::NodeRegistered(_)) => return Ok(()),
                Ok(other) => anyhow::bail!("registering this node was refused: {other}"),
                Err(e) => {
                    warn!(error = %e, "registering this node; retrying");
                    tokio::time::sleep(REGISTER_RETRY).await;
                }
            }
        }
    }

    /// Probe periodically; re-register when the capabilities changed.
    pub async fn refresh(
        self,
        raft: Raft<TypeConfig>,
        proposer: Proposer,
        mut last: NodeCapabilities,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(REFRESH_INTERVAL);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let this = self.clone();
            let Ok(now) = tokio::task::spawn_blocking(move || this.probe()).await else {
                continue;
            };
            if now == last {
                continue;
            }
            info!(
                adapters = now.adapters.len(),
                "capabilities changed; registering again"
            );
            match self.register(&raft, &proposer, now.clone()).await {
                Ok(()) => last = now,
                Err(e) => warn!(error = %e, "could not publish new capabilities"),
            }
        }
    }
}
