//! The composition root: opens storage, identity and the GPU, starts Raft and every
//! long-lived loop, and shuts them down in order.

use crate::admin_keys::{self, AdminKeySource};
use crate::config::NodeConfig;
use crate::gpu::{self, Executor};
use crate::host_key::HostKey;
use crate::placement::Placement;
use crate::proposer::{self, Proposer};
use crate::raft_network::NoPeers;
use crate::service::Service;
use crate::ssh::SshServer;
use crate::store::Store;
use crate::worker::Worker;
use crate::{http, telemetry};
use anyhow::Context;
use mesh_core::raft_types::TypeConfig;
use mesh_core::{Command, NodeCapabilities, NodeId, Outcome};
use mesh_core::MeshNode;
use openraft::Raft;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// How long loops get to finish after shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// The id of the node that bootstraps a mesh.
pub const FIRST_NODE_ID: NodeId = NodeId(1);
/// Retry pause while registering this node.
const REGISTER_RETRY: Duration = Duration::from_millis(200);

/// Raft timing. Heartbeats every 100 ms; elections after 300-600 ms of silence.
fn raft_config() -> anyhow::Result<Arc<openraft::Config>> {
    let config = openraft::Config {
        cluster_name: "mesh".into(),
        heartbeat_interval: 100,
        election_timeout_min: 300,
        election_timeout_max: 600,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(5000),
        max_in_snapshot_log_to_keep: 1000,
        ..Default::default()
    };
    Ok(Arc::new(config.validate().context("invalid Raft configuration")?))
}

/// Run a node until `shutdown` is cancelled.
pub async fn run(config: NodeConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let prometheus = telemetry::init_metrics()?;
    let (host_key, generated) = HostKey::load_or_generate(config.host_key.as_deref(), &config.data_dir)?;
    if generated {
        info!(path = %host_key.path.display(), fingerprint = %host_key.fingerprint(), "generated a new host key");
    }
    let (admins, source) = admin_keys::resolve(&config.admin_keys, dirs::home_dir().as_deref())?;
    match &source {
        AdminKeySource::Files => {}
        AdminKeySource::UserKey(p) => eprintln!("mesh-node: no --admin-key given; trusting your key {} as admin", p.display()),
        AdminKeySource::CreatedUserKey(p) => eprintln!(
            "mesh-node: no --admin-key given and you have no SSH key; created {} (and .pub) and trusting it as admin",
            p.display()
        ),
    }

    let node = FIRST_NODE_ID;
    let store = Store::open(&config.data_dir.join("raft")).context("cannot open the Raft store")?;
    let state = store.state_machine.view();

    let adapters = gpu::probe();
    let executor = match Executor::open_best() {
        Ok(e) => Some(Arc::new(e)),
        Err(e) => {
            warn!(error = %e, "no GPU adapter: this node stores and schedules but runs no tasks");
            None
        }
    };
    let capabilities = NodeCapabilities { adapters, labels: config.labels.clone(), slots: config.slots };

    let raft = Raft::<TypeConfig>::new(node.0, raft_config()?, NoPeers, store.log, store.state_machine)
        .await
        .context("cannot start Raft")?;
    if !raft.is_initialized().await? {
        let members = BTreeMap::from([(node.0, MeshNode { addr: config.listen.to_string(), fingerprint: host_key.fingerprint() })]);
        raft.initialize(members).await.context("cannot initialise a new mesh")?;
        info!(node = %node, "initialised a new single-voter mesh");
    }

    let ssh_listener = TcpListener::bind(config.ssh_listen)
        .await
        .with_context(|| format!("cannot listen for SSH on {}", config.ssh_listen))?;
    let http_listener = TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", config.http_listen))?;

    let tracker = TaskTracker::new();
    let (proposer, proposer_loop) = proposer::proposer(raft.clone());
    tracker.spawn(proposer_loop.run(shutdown.clone()));
    let service = Service::new(
        node,
        host_key.fingerprint(),
        executor.as_ref().map(|e| e.info().name.clone()),
        raft.clone(),
        state.clone(),
        proposer.clone(),
    );
    register(&raft, &proposer, node, &host_key, &config, capabilities).await?;

    tracker.spawn(
        Placement { node: node.0, raft: raft.clone(), state: state.clone(), proposer: proposer.clone(), service: service.clone() }
            .run(shutdown.clone()),
    );
    if let Some(executor) = executor {
        tracker.spawn(Worker::new(node, state.clone(), proposer.clone(), executor).run(shutdown.clone()));
    }
    tracker.spawn(SshServer::new(&host_key, service.clone(), admins).run(ssh_listener, shutdown.clone()));
    tracker.spawn(http::serve(http_listener, service.clone(), prometheus, shutdown.clone()));
    tracker.spawn(telemetry::refresh_gauges(service.clone(), shutdown.clone()));
    tracker.close();

    // The line scripts and tests wait for.
    println!(
        "mesh-node {node} ready: ssh {} http {} fingerprint {}",
        config.ssh_listen,
        config.http_listen,
        host_key.fingerprint()
    );

    shutdown.cancelled().await;
    info!("shutting down");
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait()).await.is_err() {
        warn!(grace = ?SHUTDOWN_GRACE, "some loops did not stop in time");
    }
    raft.shutdown().await.map_err(|e| anyhow::anyhow!("raft shutdown: {e}"))?;
    Ok(())
}

/// Wait for a leader, then record this node and its capabilities in the state.
async fn register(
    raft: &Raft<TypeConfig>,
    proposer: &Proposer,
    node: NodeId,
    host_key: &HostKey,
    config: &NodeConfig,
    capabilities: NodeCapabilities,
) -> anyhow::Result<()> {
    raft.wait(Some(Duration::from_secs(30)))
        .metrics(|m| m.current_leader.is_some(), "a leader is elected")
        .await
        .context("no Raft leader after 30 s")?;
    let command = Command::RegisterNode {
        node,
        fingerprint: host_key.fingerprint(),
        addr: config.listen.to_string(),
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
