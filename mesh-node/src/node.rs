//! The composition root: opens identity, storage and the GPU, joins or bootstraps the
//! mesh, starts Raft and every long-lived loop, and shuts them down in order.

use crate::admin_keys::{self, AdminKeySource};
use crate::autopilot::{Autopilot, VoterPolicy};
use crate::capabilities::Publisher;
use crate::config::NodeConfig;
use crate::gpu::{Supervisor, WorkerCommand};
use crate::host_key::HostKey;
use crate::leader_watch::{LeaderContact, LeaderWatch};
use crate::liveness::{FailureDetector, Heartbeats, Liveness, LivenessConfig};
use crate::peer::clients::PeerClients;
use crate::peer::directory::Directory;
use crate::peer::forward::Forwarder;
use crate::peer::network::PeerNetwork;
use crate::peer::server::PeerServer;
use crate::peer::MAX_MESSAGE_BYTES;
use crate::placement::Placement;
use crate::proposer;
use crate::rejoin_hold::RejoinHold;
use crate::rollback_guard;
use crate::service::Service;
use crate::ssh::{Endpoint, SshServer};
use crate::store::Store;
use crate::tls::{self, PeerPolicy, Pins, ServerExpectation, TlsIdentity};
use crate::worker::Worker;
use crate::{http, telemetry};
use anyhow::Context;
use mesh_core::raft_types::TypeConfig;
use mesh_core::token::JoinToken;
use mesh_core::{Fingerprint, MeshNode, NodeId};
use mesh_proto::v1::mesh_server::MeshServer;
use mesh_proto::v1::raft_server::RaftServer;
use mesh_proto::v1::JoinRequest;
use openraft::Raft;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
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
/// File in the data directory holding this node's id once it is a member.
const NODE_ID_FILE: &str = "node.id";
/// Raft heartbeat interval. openraft 0.9 also gives every AppendEntries this long to
/// answer, so it is not a setting: shorter times out large appends under load.
pub(crate) const RAFT_HEARTBEAT: Duration = Duration::from_millis(50);
/// Liveness heartbeat period; the node timeout is several of these.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);
/// The only gRPC method an unpinned key may call.
const JOIN_METHOD: &[&str] = &["/mesh.v1.Mesh/Join"];

/// Longest a snapshot chunk may take to send and, for the last one, to install.
const SNAPSHOT_SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Raft timing: heartbeats every 50 ms, elections after `election_timeout` to twice
/// that of silence (`--election-timeout`, default 150 ms: 150-300 ms).
/// openraft 0.9's voters honour the old leader's lease for `election_timeout_max`
/// before their own timeout starts, so losing a leader that is silent takes 450-600
/// ms; one whose process is gone (its port refuses) ~0.35 s (`leader_watch`).
/// Shorter timeouts fail over faster but let the stalls of a saturated 2-core machine
/// start spurious elections (mesh-bench, saturated minutes: 120-240 ms gave 1-2 at
/// 16 and 256 clients; 150-300 ms 0-2 at 16 clients, none at 256; docs/benchmarks.md).
/// openraft 0.9 gives an
/// AppendEntries the heartbeat interval as its timeout, so one RPC must stay small:
/// at most 2 entries of at most 1 MiB of batched commands each
/// (`proposer::MAX_BATCH_BYTES`; a single task of up to 16 MiB of inputs goes alone).
///
/// A snapshot encodes the whole state (O(tasks)); nodes take theirs at different log
/// lengths (`--snapshot-every`, default 20,000 entries, plus 5 % of it per node id
/// modulo 8), so that the members of a mesh do not all spend the same second encoding
/// and writing one. After a snapshot the log keeps its last 5 % of that, so a follower
/// that fell a little behind catches up from the log, not from a whole snapshot.
fn raft_config(
    node: NodeId,
    election_timeout: Duration,
    snapshot_every: u64,
    elect: bool,
) -> anyhow::Result<Arc<openraft::Config>> {
    let min = election_timeout.as_millis() as u64;
    let config = openraft::Config {
        cluster_name: "mesh".into(),
        enable_elect: elect,
        heartbeat_interval: RAFT_HEARTBEAT.as_millis() as u64,
        election_timeout_min: min,
        election_timeout_max: 2 * min,
        max_payload_entries: 2,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(
            snapshot_every + node.0 % 8 * (snapshot_every / 20),
        ),
        max_in_snapshot_log_to_keep: snapshot_every / 20,
        // Sending a snapshot chunk (3 MiB) and, for the last, installing the whole
        // snapshot on the follower (decode, payload file, syncs) takes longer than
        // openraft's default 200 ms for any large state (the join benchmark's 94 MiB
        // takes ~1.9 s); a timed-out send is cancelled and the transfer starts over.
        install_snapshot_timeout: SNAPSHOT_SEND_TIMEOUT.as_millis() as u64,
        ..Default::default()
    };
    Ok(Arc::new(
        config.validate().context("invalid Raft configuration")?,
    ))
}

/// How this process becomes (or already is) a member.
enum Membership {
    /// Data directory already holds a node id.
    Existing(NodeId),
    /// Fresh: start a new single-voter mesh.
    Bootstrap,
    /// Fresh: joined with a token; pin the members the seed listed.
    Joined(NodeId, Vec<(NodeId, MeshNode)>),
}

/// Run a node until `shutdown` is cancelled.
pub async fn run(config: NodeConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let prometheus = telemetry::init_metrics()?;
    let (host_key, generated) =
        HostKey::load_or_generate(config.host_key.as_deref(), &config.data_dir)?;
    if generated {
        info!(path = %host_key.path.display(), fingerprint = %host_key.fingerprint(), "generated a new host key");
    }
    let identity = Arc::new(TlsIdentity::from_host_key(&host_key)?);
    let (admins, source) = admin_keys::resolve(&config.admin_keys, dirs::home_dir().as_deref())?;
    match &source {
        AdminKeySource::Files => {}
        AdminKeySource::UserKey(p) => eprintln!("mesh-node: no --admin-key given; trusting your key {} as admin", p.display()),
        AdminKeySource::CreatedUserKey(p) => eprintln!(
            "mesh-node: no --admin-key given and you have no SSH key; created {} (and .pub) and trusting it as admin",
            p.display()
        ),
    }
    let me = MeshNode {
        addr: config.listen.to_string(),
        fingerprint: host_key.fingerprint(),
    };
    let raft_listener = listen(config.listen, "node-to-node traffic").await?;

    let membership = match (read_node_id(&config.data_dir)?, &config.join) {
        (Some(id), _) => Membership::Existing(id),
        (None, None) if config.await_join => {
            let Some((id, members)) =
                await_join(&config, &host_key, &identity, &me, &admins, &shutdown).await?
            else {
                return Ok(());
            };
            write_node_id(&config.data_dir, id)?;
            Membership::Joined(id, members)
        }
        (None, None) => Membership::Bootstrap,
        (None, Some(token)) => {
            let (id, members) = join(token, &identity, &me).await?;
            write_node_id(&config.data_dir, id)?;
            Membership::Joined(id, members)
        }
    };
    let node = match &membership {
        Membership::Existing(id) | Membership::Joined(id, _) => *id,
        Membership::Bootstrap => FIRST_NODE_ID,
    };
    // Every port is held before the GPU workers start (seconds on some drivers): a
    // port already in use fails the start at once, and nobody takes it meanwhile.
    // (A node awaiting its join served SSH on this port until just now, and no HTTP.)
    let ssh_listener = listen(config.ssh_listen, "SSH").await?;
    let http_listener = listen(config.http_listen, "HTTP").await?;

    let store =
        Store::open(&config.data_dir.join("raft"), node.0).context("cannot open the Raft store")?;
    let state = store.state_machine.view();
    // GPU work runs in supervised worker processes, one per slot.
    let gpu = match WorkerCommand::current_exe() {
        Err(e) => {
            warn!(error = %e, "cannot locate the mesh-node executable: this node runs no tasks");
            None
        }
        Ok(cmd) => match Supervisor::start(cmd, config.slots as usize).await {
            Ok(s) => Some(Arc::new(s)),
            Err(e) => {
                warn!(error = %e, "no GPU worker: this node stores and schedules but runs no tasks");
                None
            }
        },
    };
    let publisher = Publisher {
        node,
        fingerprint: host_key.fingerprint(),
        addr: me.addr.clone(),
        labels: config.labels.clone(),
        slots: config.slots,
    };
    let capabilities = publisher.probe();

    let directory = Directory::new(Pins::new([me.fingerprint.clone()]));
    directory.add_bootstrap(Some(node), me.clone());
    if let Membership::Joined(_, members) = &membership {
        for (id, m) in members {
            directory.add_bootstrap(Some(*id), m.clone());
        }
    }
    let clients = PeerClients::with_routes(identity.clone(), config.peer_routes.clone());
    let Store {
        log: mut log_store,
        mut state_machine,
    } = store;
    if let Membership::Existing(_) = membership {
        let (local, peers) =
            rollback_guard::read_local(node, &mut log_store, &mut state_machine).await?;
        let verdict =
            rollback_guard::check(node, local, &peers, &clients, rollback_guard::WAIT).await;
        rollback_guard::enforce(verdict, &config.data_dir)?;
    }
    // A restarted node holds its elections until it hears from a leader
    // (`rejoin_hold`); a new mesh or a joining node has no term to depose anyone with.
    let restarted = matches!(membership, Membership::Existing(_));
    let raft_config = raft_config(
        node,
        config.election_timeout,
        config.snapshot_every,
        !restarted,
    )?;
    // openraft 0.9's voters honour a leader's lease for `election_timeout_max`.
    let lease = Duration::from_millis(raft_config.election_timeout_max);
    let raft = Raft::<TypeConfig>::new(
        node.0,
        raft_config,
        PeerNetwork::new(node.0, clients.clone()),
        log_store,
        state_machine,
    )
    .await
    .context("cannot start Raft")?;
    if let Membership::Bootstrap = membership {
        if !raft.is_initialized().await? {
            raft.initialize(BTreeMap::from([(node.0, me.clone())]))
                .await
                .context("cannot initialise a new mesh")?;
            info!(node = %node, "initialised a new single-voter mesh");
        }
        write_node_id(&config.data_dir, node)?;
    }
    directory.refresh(&raft, &state);

    let tracker = TaskTracker::new();
    let forwarder = Forwarder {
        node,
        raft: raft.clone(),
        directory: directory.clone(),
        clients: clients.clone(),
        state: state.clone(),
    };
    let (proposer, proposer_loop) = proposer::proposer(raft.clone(), Some(Arc::new(forwarder)));
    tracker.spawn(proposer_loop.run(shutdown.clone()));
    tracker.spawn(
        directory
            .clone()
            .run(raft.clone(), state.clone(), shutdown.clone()),
    );
    let liveness = Liveness::default();
    let timing = LivenessConfig {
        heartbeat_interval: HEARTBEAT_INTERVAL,
        node_timeout: config.node_timeout,
    };

    // Node-to-node gRPC: every call from a pinned key, except Join.
    let policy = PeerPolicy::AllowUnpinned {
        pins: directory.pins().clone(),
        unpinned_methods: JOIN_METHOD,
    };
    let contact = LeaderContact::default();
    if restarted {
        tracker.spawn(
            RejoinHold {
                me: node.0,
                raft: raft.clone(),
                contact: contact.clone(),
            }
            .run(shutdown.clone()),
        );
    }
    tracker.spawn(
        LeaderWatch {
            me: node.0,
            raft: raft.clone(),
            contact: contact.clone(),
            clients: clients.clone(),
            lease,
        }
        .run(shutdown.clone()),
    );
    let peer = PeerServer {
        contact,
        raft: raft.clone(),
        directory: directory.clone(),
        proposer: proposer.clone(),
        liveness: liveness.clone(),
        state: state.clone(),
        join_limit: crate::peer::server::join_limiter(),
    };
    let incoming = tls::incoming(raft_listener, &identity, policy.clone(), shutdown.clone())?;
    let grpc = tls::server(&policy)
        .add_service(
            RaftServer::new(peer.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            MeshServer::new(peer)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    tracker.spawn(async move {
        if let Err(e) = grpc.await {
            tracing::error!(error = %e, "node-to-node endpoint failed");
        }
    });

    let service = Service {
        node,
        fingerprint: host_key.fingerprint(),
        adapter: gpu.as_ref().map(|g| g.info().name.clone()),
        advertise: me.addr.clone(),
        local_admins: Arc::new(admins.clone()),
        raft: raft.clone(),
        state: state.clone(),
        proposer: proposer.clone(),
        liveness: liveness.clone(),
        node_timeout: config.node_timeout,
    };
    publisher
        .register(&raft, &proposer, capabilities.clone())
        .await?;
    service
        .seed_admin_keys()
        .await
        .context("cannot record the admin keys")?;
    if let (Some(path), Membership::Bootstrap) = (&config.restore, &membership) {
        restore(&service, path).await?;
    }
    tracker.spawn(publisher.refresh(
        raft.clone(),
        proposer.clone(),
        capabilities,
        shutdown.clone(),
    ));

    tracker.spawn(
        Placement {
            node: node.0,
            raft: raft.clone(),
            state: state.clone(),
            proposer: proposer.clone(),
            service: service.clone(),
        }
        .run(shutdown.clone()),
    );
    tracker.spawn(
        Heartbeats {
            node,
            raft: raft.clone(),
            directory: directory.clone(),
            clients: clients.clone(),
            liveness: liveness.clone(),
            config: timing,
            state: state.clone(),
        }
        .run(shutdown.clone()),
    );
    tracker.spawn(
        FailureDetector {
            node,
            raft: raft.clone(),
            state: state.clone(),
            proposer: proposer.clone(),
            liveness: liveness.clone(),
            config: timing,
        }
        .run(shutdown.clone()),
    );
    tracker.spawn(
        Autopilot {
            node,
            raft: raft.clone(),
            state: state.clone(),
            policy: VoterPolicy {
                target: config.voters,
                replace_after: config.voter_replace_after,
            },
        }
        .run(shutdown.clone()),
    );
    if let Some(gpu) = gpu {
        let worker = Worker::new(
            node,
            state.clone(),
            proposer.clone(),
            gpu,
            config.gpu_memory_budget,
            liveness.clone(),
            config.node_timeout,
        );
        tracker.spawn(worker.run(shutdown.clone()));
    }
    tracker.spawn(
        SshServer::new(&host_key, Endpoint::Member(service.clone()))
            .run(ssh_listener, shutdown.clone()),
    );
    tracker.spawn(http::serve(
        http_listener,
        service.clone(),
        prometheus,
        shutdown.clone(),
    ));
    tracker.spawn(telemetry::refresh_gauges(service.clone(), shutdown.clone()));
    tracker.spawn(telemetry::probe_runtime_lag(shutdown.clone()));
    tracker.close();

    // The line scripts and tests wait for.
    println!(
        "mesh-node {node} ready: ssh {} http {} raft {} fingerprint {}",
        config.ssh_listen,
        config.http_listen,
        config.listen,
        host_key.fingerprint()
    );

    shutdown.cancelled().await;
    info!("shutting down");
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!(grace = ?SHUTDOWN_GRACE, "some loops did not stop in time");
    }
    raft.shutdown()
        .await
        .map_err(|e| anyhow::anyhow!("raft shutdown: {e}"))?;
    Ok(())
}

/// Dial the seed named in the token, check its key against the token's pin, present
/// the secret, and learn this node's id and the current members.
async fn join(
    token: &JoinToken,
    identity: &TlsIdentity,
    me: &MeshNode,
) -> anyhow::Result<(NodeId, Vec<(NodeId, MeshNode)>)> {
    info!(seed = %token.seed_addr, seed_key = %token.seed_fingerprint, "joining a mesh");
    let channel = tls::connect(&token.seed_addr, identity, ServerExpectation::Exactly(token.seed_fingerprint.clone()))
        .await
        .with_context(|| {
            format!(
                "cannot reach the seed {} presenting the pinned key {}; check the address, and that the token came from that node",
                token.seed_addr, token.seed_fingerprint
            )
        })?;
    let mut client = mesh_proto::v1::mesh_client::MeshClient::new(channel);
    let reply = client
        .join(JoinRequest {
            token_id: token.id.clone(),
            secret: token.secret.clone(),
            addr: me.addr.clone(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("the seed refused the join: {}", s.message()))?
        .into_inner();
    let mut members = Vec::new();
    for m in reply.members {
        let fingerprint = Fingerprint::parse(&m.fingerprint)
            .context("the seed sent a malformed member fingerprint")?;
        members.push((
            NodeId(m.node_id),
            MeshNode {
                addr: m.addr,
                fingerprint,
            },
        ));
    }
    info!(node = reply.node_id, members = members.len(), "joined");
    Ok((NodeId(reply.node_id), members))
}

/// Load a state saved with `mesh-cli snapshot save` into this new mesh.
async fn restore(service: &Service, path: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the snapshot {}", path.display()))?;
    let state: mesh_core::MeshState = mesh_core::codec::decode(&bytes).with_context(|| {
        format!(
            "{} is not a Mesh snapshot (from `mesh-cli snapshot save`)",
            path.display()
        )
    })?;
    let cmd = mesh_core::Command::Restore {
        state: Box::new(state),
        actor: service.fingerprint.clone(),
    };
    match service.proposer.propose(cmd).await? {
        mesh_core::Outcome::Restored { tasks } => {
            info!(tasks, snapshot = %path.display(), "restored a saved state");
            Ok(())
        }
        mesh_core::Outcome::Rejected(r) => {
            // Already restored on an earlier start of this data directory: fine.
            warn!(reason = %r, "snapshot not loaded");
            Ok(())
        }
        other => anyhow::bail!("unexpected outcome of the restore: {other}"),
    }
}

/// Bind one of the node's ports; the error names what it is for.
async fn listen(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for {what} on {addr}"))
}

/// Serve only `join TOKEN` over SSH until a join succeeds (or shutdown: `None`).
async fn await_join(
    config: &NodeConfig,
    host_key: &HostKey,
    identity: &TlsIdentity,
    me: &MeshNode,
    admins: &BTreeMap<Fingerprint, mesh_core::identity::public_key::PublicKeyLine>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<(NodeId, Vec<(NodeId, MeshNode)>)>> {
    let listener = listen(config.ssh_listen, "SSH").await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let stop = shutdown.child_token();
    let admins = Arc::new(admins.keys().cloned().collect());
    let server = tokio::spawn(
        SshServer::new(host_key, Endpoint::AwaitingJoin { joins: tx, admins })
            .run(listener, stop.clone()),
    );
    println!(
        "mesh-node waiting to join: run `mesh-cli --node {} join TOKEN`; fingerprint {}",
        config.ssh_listen,
        host_key.fingerprint()
    );
    let joined = loop {
        let request = tokio::select! {
            _ = shutdown.cancelled() => break None,
            r = rx.recv() => match r { Some(r) => r, None => break None },
        };
        let outcome = match JoinToken::parse(&request.token) {
            Err(e) => Err(e.to_string()),
            Ok(token) => join(&token, identity, me)
                .await
                .map_err(|e| format!("{e:#}")),
        };
        match outcome {
            Ok((id, members)) => {
                let _ = request.reply.send(Ok(id.0));
                break Some((id, members));
            }
            Err(e) => {
                let _ = request.reply.send(Err(e));
            }
        }
    };
    stop.cancel();
    let _ = server.await;
    Ok(joined)
}

fn read_node_id(dir: &Path) -> anyhow::Result<Option<NodeId>> {
    let path = dir.join(NODE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            Ok(Some(NodeId(s.trim().parse().with_context(|| {
                format!("{} is corrupt", path.display())
            })?)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn write_node_id(dir: &Path, id: NodeId) -> anyhow::Result<()> {
    let path = dir.join(NODE_ID_FILE);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{id}\n"))
        .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|_| std::fs::rename(&tmp, &path))
        .with_context(|| format!("cannot write {}", path.display()))
}
