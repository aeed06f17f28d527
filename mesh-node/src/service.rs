//! The operator operations behind every SSH command: read the replicated state,
//! check a request, propose commands. Transport-free, so tests and other front ends
//! can call it.

use crate::liveness::Liveness;
use crate::proposer::{ProposeError, Proposer};
use crate::store::StateView;
use mesh_core::access::Role;
use mesh_core::api::{
    AuditView, BatchItemReply, KeyView, NodeView, StatusView, SubmitReply, TaskView, TokenCreated,
    TokenView, MAX_BATCH_TASKS,
};
use mesh_core::identity::public_key::PublicKeyLine;
use mesh_core::kernel::{self, SpecError};
use mesh_core::raft_types::TypeConfig;
use mesh_core::scheduler::never_runnable;
use mesh_core::task::KernelSpec;
use mesh_core::token::JoinToken;
use mesh_core::{
    Bytes, Command, Fingerprint, MeshState, NodeId, Outcome, Rejection, TaskId, TaskSpec,
};
use openraft::Raft;
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;

/// Why an operation failed. Each message names the thing, the reason and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request is malformed (the caller's fault).
    #[error("{0}")]
    BadRequest(String),
    /// The task spec cannot run.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// No node could ever run the task.
    #[error("task refused: {0}")]
    Unschedulable(String),
    /// No such task.
    #[error("task {0} does not exist; `mesh-cli tasks` lists the tasks")]
    UnknownTask(TaskId),
    /// The state machine refused the command.
    #[error("{0}")]
    Rejected(#[from] Rejection),
    /// The task has no such output or no result yet.
    #[error("{0}")]
    NoResult(String),
    /// Consensus could not take the write.
    #[error(transparent)]
    Propose(#[from] ProposeError),
    /// The node failed at its own work (a task of its own panicked): its log says more.
    #[error("{0}; the node's log has the details")]
    Internal(String),
}

/// Encode a copy of the state on a blocking thread: O(state), so not on the runtime's
/// workers, which serve Raft and clients.
async fn encode_state(state: MeshState) -> Result<Vec<u8>, ServiceError> {
    tokio::task::spawn_blocking(move || mesh_core::codec::encode(&state))
        .await
        .map_err(|e| ServiceError::Internal(format!("encoding the state failed: {e}")))?
        .map_err(|e| ServiceError::Internal(format!("cannot encode the state: {e}")))
}

/// The operations of one node.
#[derive(Clone)]
pub struct Service {
    /// This node.
    pub node: NodeId,
    /// This node's host key fingerprint.
    pub fingerprint: Fingerprint,
    /// This node's primary adapter name.
    pub adapter: Option<String>,
    /// This node's advertised node-to-node address (the seed address in tokens).
    pub advertise: String,
    /// Admin keys from this node's `--admin-key`: they act only while the mesh has
    /// no user keys at all (its very start); then the replicated keys decide.
    pub local_admins: Arc<BTreeMap<Fingerprint, PublicKeyLine>>,
    /// Consensus.
    pub raft: Raft<TypeConfig>,
    /// The replicated state.
    pub state: StateView,
    /// Where writes go.
    pub proposer: Proposer,
    /// Heartbeat bookkeeping (last contact).
    pub liveness: Liveness,
    /// The failure detector's timeout (for readiness).
    pub node_timeout: std::time::Duration,
}

impl Service {
    /// True when this node has not reached the leader within the node timeout.
    pub fn cut_off(&self) -> bool {
        self.liveness.cut_off(self.node_timeout)
    }

    /// The role of a key: the replicated user keys decide; while there are none
    /// (a mesh's first moments), this node's `--admin-key` keys are admins.
    pub fn role_of(&self, fp: &Fingerprint) -> Option<Role> {
        self.state.read(|s| {
            if s.users.is_empty() {
                self.local_admins.contains_key(fp).then_some(Role::Admin)
            } else {
                s.role_of(fp)
            }
        })
    }

    /// Record this node's admin keys as the mesh's first user keys, if it has none.
    pub async fn seed_admin_keys(&self) -> Result<(), ServiceError> {
        if !self.state.read(|s| s.users.is_empty()) {
            return Ok(());
        }
        for (fp, key) in self.local_admins.iter() {
            let cmd = Command::AddKey {
                fingerprint: fp.clone(),
                key: key.to_openssh(),
                role: Role::Admin,
                comment: key.comment.clone(),
                actor: self.fingerprint.clone(),
            };
            self.proposer.propose(cmd).await?;
        }
        Ok(())
    }

    /// Nodes placement may use (not marked down, not removed).
    pub fn live_nodes(&self, state: &MeshState) -> BTreeSet<NodeId> {
        state.live_nodes()
    }

    /// `status`.
    pub fn status(&self) -> StatusView {
        let m = self.raft.metrics().borrow().clone();
        let voters = m
            .membership_config
            .membership()
            .voter_ids()
            .map(NodeId)
            .collect();
        self.state.read(|s| StatusView {
            node: self.node,
            fingerprint: self.fingerprint.to_string(),
            version: env!("CARGO_PKG_VERSION").into(),
            role: role_name(&m.state).into(),
            leader: m.current_leader.map(NodeId),
            term: m.current_term,
            last_log_index: m.last_log_index,
            applied_index: m.last_applied.map(|l| l.index),
            voters,
            nodes: s.nodes.len(),
            tasks: s
                .counts()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            adapter: self.adapter.clone(),
        })
    }

    /// `nodes`.
    pub fn nodes(&self) -> Vec<NodeView> {
        let m = self.raft.metrics().borrow().clone();
        let voters: BTreeSet<u64> = m.membership_config.membership().voter_ids().collect();
        self.state.read(|s| {
            s.nodes
                .values()
                .map(|n| {
                    let role = if m.current_leader == Some(n.id.0) {
                        "leader"
                    } else if voters.contains(&n.id.0) {
                        "follower"
                    } else {
                        "learner"
                    };
                    // Only the leader hears heartbeats; elsewhere the contact is unknown.
                    let leading = m.current_leader == Some(self.node.0);
                    let contact = if n.id == self.node {
                        Some(0)
                    } else if leading {
                        self.liveness.silence(n.id).map(|d| d.as_millis() as u64)
                    } else {
                        None
                    };
                    NodeView::of(s, n, role, contact)
                })
                .collect()
        })
    }

    /// `tasks [--state S]`.
    pub fn tasks(&self, state_filter: Option<&str>) -> Vec<TaskView> {
        self.state.read(|s| {
            let live = self.live_nodes(s);
            s.tasks
                .values()
                .filter(|t| state_filter.is_none_or(|f| t.state.name() == f))
                .map(|t| TaskView::of(s, t, &live, crate::proposer::now()))
                .collect()
        })
    }

    /// `task ID`.
    pub fn task(&self, id: TaskId) -> Result<TaskView, ServiceError> {
        self.state.read(|s| {
            let t = s.tasks.get(&id).ok_or(ServiceError::UnknownTask(id))?;
            Ok(TaskView::of(
                s,
                t,
                &self.live_nodes(s),
                crate::proposer::now(),
            ))
        })
    }

    /// `submit`: check the spec (naga for WGSL), refuse what no node could ever run,
    /// then propose it.
    pub async fn submit(
        &self,
        spec: TaskSpec,
        submitter: Fingerprint,
    ) -> Result<SubmitReply, ServiceError> {
        let command = self.check_submit(spec, submitter)?;
        submitted(self.proposer.propose(command).await?)
    }

    /// `submit-batch`: every task is checked on its own (a bad one is refused, the
    /// rest go on) and the valid ones are proposed together, so the proposer puts
    /// them into few Raft entries with one durable sync each.
    pub async fn submit_batch(
        &self,
        specs: Vec<TaskSpec>,
        submitter: Fingerprint,
    ) -> Result<Vec<BatchItemReply>, ServiceError> {
        if specs.len() > MAX_BATCH_TASKS {
            return Err(ServiceError::BadRequest(format!(
                "a batch holds at most {MAX_BATCH_TASKS} tasks, not {}; split it",
                specs.len()
            )));
        }
        let proposals = specs.into_iter().map(|spec| {
            let checked = self.check_submit(spec, submitter.clone());
            async move {
                let outcome = match checked {
                    Ok(command) => self
                        .proposer
                        .propose(command)
                        .await
                        .map_err(ServiceError::from)
                        .and_then(submitted),
                    Err(e) => Err(e),
                };
                match outcome {
                    Ok(r) => BatchItemReply::Submitted(r),
                    Err(e) => BatchItemReply::Refused {
                        error: e.to_string(),
                    },
                }
            }
        });
        Ok(futures::future::join_all(proposals).await)
    }

    /// The checks of a submit, and the command to propose.
    fn check_submit(
        &self,
        spec: TaskSpec,
        submitter: Fingerprint,
    ) -> Result<Command, ServiceError> {
        check_spec_fields(&spec)?;
        let declared = match &spec.kernel {
            KernelSpec::Wgsl { .. } => spec.outputs.clone(),
            KernelSpec::Builtin { .. } => Vec::new(),
        };
        let plan = kernel::plan(&spec.kernel, &spec.inputs, &declared)?;
        if spec.shards > 1 {
            match &spec.kernel {
                KernelSpec::Builtin { name, params } => {
                    mesh_core::builtin::shard_units(name, params, &spec.inputs, spec.shards)?;
                }
                KernelSpec::Wgsl { .. } => {
                    return Err(ServiceError::BadRequest(format!(
                        "WGSL kernels cannot be sharded (--shards {}); shardable built-in kernels are: {}",
                        spec.shards,
                        mesh_core::builtin::SHARDABLE.join(", ")
                    )))
                }
            }
        }
        if let Some(why) = self.state.read(|s| never_runnable(s, &spec.requirements)) {
            return Err(ServiceError::Unschedulable(why));
        }
        Ok(Command::Submit {
            spec,
            outputs: plan.outputs,
            submitter,
        })
    }

    /// `wait ID`: block until the task is terminal.
    pub async fn wait(&self, id: TaskId) -> Result<TaskView, ServiceError> {
        let mut changes = self.state.changes();
        loop {
            let view = self.task(id)?;
            if view.is_terminal() {
                return Ok(view);
            }
            if changes.changed().await.is_err() {
                return Err(ServiceError::Propose(ProposeError::Unavailable(
                    "the node is shutting down".into(),
                )));
            }
        }
    }

    /// `result ID --raw`: the bytes of one output (the first, or the named one).
    pub fn result_bytes(&self, id: TaskId, name: Option<&str>) -> Result<Bytes, ServiceError> {
        self.state.read(|s| {
            let t = s.tasks.get(&id).ok_or(ServiceError::UnknownTask(id))?;
            let r = t.result.as_ref().ok_or_else(|| {
                ServiceError::NoResult(format!(
                    "task {id} is {} and has no result; `mesh-cli task {id}` shows why",
                    t.state.name()
                ))
            })?;
            let out = match name {
                Some(n) => r.outputs.iter().find(|o| o.name == n).ok_or_else(|| {
                    let names: Vec<&str> = r.outputs.iter().map(|o| o.name.as_str()).collect();
                    ServiceError::NoResult(format!(
                        "task {id} has no output '{n}'; its outputs are: {}",
                        names.join(", ")
                    ))
                })?,
                None => r
                    .outputs
                    .first()
                    .ok_or_else(|| ServiceError::NoResult(format!("task {id} has no outputs")))?,
            };
            s.blob(&out.digest).cloned().ok_or_else(|| {
                ServiceError::NoResult(format!(
                    "output {} of task {id} is not stored on this node",
                    out.name
                ))
            })
        })
    }

    /// `cancel ID`.
    pub async fn cancel(&self, id: TaskId, actor: Fingerprint) -> Result<TaskView, ServiceError> {
        self.task(id)?;
        match self
            .proposer
            .propose(Command::Cancel { task: id, actor })
            .await?
        {
            Outcome::Cancelled(_) => self.task(id),
            Outcome::Rejected(r) => Err(r.into()),
            other => Err(ServiceError::BadRequest(format!(
                "unexpected outcome {other}"
            ))),
        }
    }
}

impl Service {
    /// `token create`: a new join token naming this node as the seed.
    pub async fn token_create(
        &self,
        ttl: std::time::Duration,
        uses: u32,
        actor: Fingerprint,
    ) -> Result<TokenCreated, ServiceError> {
        if uses == 0 {
            return Err(ServiceError::BadRequest("--uses must be at least 1".into()));
        }
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            return Err(ServiceError::BadRequest(format!(
                "--ttl must be between 1s and {}",
                mesh_core::duration::format_duration(MAX_TOKEN_TTL)
            )));
        }
        let (mut id, mut secret) = ([0u8; 8], [0u8; 16]);
        getrandom::fill(&mut id)
            .and_then(|_| getrandom::fill(&mut secret))
            .map_err(|e| ServiceError::BadRequest(format!("the OS random source failed: {e}")))?;
        let token = JoinToken::new(id, secret, self.advertise.clone(), self.fingerprint.clone());
        let cmd = Command::CreateToken {
            id: token.id.clone(),
            secret_hash: token.secret_hash(),
            ttl,
            uses,
            actor,
        };
        match self.proposer.propose(cmd).await? {
            Outcome::TokenCreated(id) => {
                metrics::counter!("mesh_token_events_total", "event" => "created").increment(1);
                let expires_at_ms = self
                    .state
                    .read(|s| s.tokens.get(&id).map_or(0, |t| t.expires_at.0));
                Ok(TokenCreated {
                    token: token.encode(),
                    id,
                    expires_at_ms,
                })
            }
            Outcome::Rejected(r) => Err(r.into()),
            other => Err(ServiceError::BadRequest(format!(
                "unexpected outcome {other}"
            ))),
        }
    }

    /// `token list`.
    pub fn token_list(&self) -> Vec<TokenView> {
        self.state.read(|s| {
            s.tokens
                .values()
                .map(|t| TokenView {
                    id: t.id.clone(),
                    created_at_ms: t.created_at.0,
                    expires_at_ms: t.expires_at.0,
                    uses_left: t.uses_left,
                    revoked: t.revoked,
                    created_by: t.created_by.to_string(),
                })
                .collect()
        })
    }

    /// `token revoke ID`.
    pub async fn token_revoke(&self, id: &str, actor: Fingerprint) -> Result<(), ServiceError> {
        match self
            .proposer
            .propose(Command::RevokeToken {
                id: id.into(),
                actor,
            })
            .await?
        {
            Outcome::TokenRevoked(_) => {
                metrics::counter!("mesh_token_events_total", "event" => "revoked").increment(1);
                Ok(())
            }
            Outcome::Rejected(r) => Err(r.into()),
            other => Err(ServiceError::BadRequest(format!(
                "unexpected outcome {other}"
            ))),
        }
    }

    /// `drain NODE` / `undrain NODE`.
    pub async fn drain(
        &self,
        node: NodeId,
        draining: bool,
        actor: Fingerprint,
    ) -> Result<(), ServiceError> {
        let cmd = if draining {
            Command::Drain { node, actor }
        } else {
            Command::Undrain { node, actor }
        };
        match self.proposer.propose(cmd).await? {
            Outcome::Drained { .. } => Ok(()),
            Outcome::Rejected(r) => Err(r.into()),
            other => Err(ServiceError::BadRequest(format!(
                "unexpected outcome {other}"
            ))),
        }
    }

    /// `remove NODE`: the node leaves the mesh for good; its attempts move elsewhere.
    pub async fn remove(&self, node: NodeId, actor: Fingerprint) -> Result<(), ServiceError> {
        match self
            .proposer
            .propose(Command::RemoveNode { node, actor })
            .await?
        {
            Outcome::NodeRemoved(_) => Ok(()),
            Outcome::Rejected(r) => Err(r.into()),
            other => Err(ServiceError::BadRequest(format!(
                "unexpected outcome {other}"
            ))),
        }
    }
}

impl Service {
    /// Record an action refused by a role check in the audit trail.
    pub async fn audit_refusal(
        &self,
        actor: &Fingerprint,
        action: &str,
        target: Option<String>,
        reason: &str,
    ) {
        let cmd = Command::AuditRefusal {
            actor: actor.clone(),
            action: action.into(),
            target,
            reason: reason.into(),
        };
        if let Err(e) = self.proposer.propose(cmd).await {
            tracing::warn!(error = %e, "could not audit a refused action");
        }
    }

    /// `keys add` (the public key text on standard input).
    pub async fn keys_add(
        &self,
        text: &str,
        role: Role,
        actor: Fingerprint,
    ) -> Result<Vec<Fingerprint>, ServiceError> {
        let keys = PublicKeyLine::parse_many(text)
            .map_err(|e| ServiceError::BadRequest(format!("the key on standard input: {e}")))?;
        if keys.is_empty() {
            return Err(ServiceError::BadRequest(
                "no public key on standard input; give a .pub file".into(),
            ));
        }
        let mut added = Vec::new();
        for k in keys {
            let cmd = Command::AddKey {
                fingerprint: k.fingerprint(),
                key: k.to_openssh(),
                role,
                comment: k.comment.clone(),
                actor: actor.clone(),
            };
            match self.proposer.propose(cmd).await? {
                Outcome::KeyAdded(fp) => added.push(fp),
                Outcome::Rejected(r) => return Err(r.into()),
                other => {
                    return Err(ServiceError::BadRequest(format!(
                        "unexpected outcome {other}"
                    )))
                }
            }
        }
        Ok(added)
    }

    /// `keys remove FINGERPRINT`.
    pub async fn keys_remove(
        &self,
        fp: Fingerprint,
        actor: Fingerprint,
    ) -> Result<(), ServiceError> {
        match self
            .proposer
            .propose(Command::RemoveKey {
                fingerprint: fp,
                actor,
            })
            .await?
        {
            Outcome::KeyRemoved(_) => Ok(()),
            Outcome::Rejected(r) => Err(r.into()),
            other => Err(ServiceError::BadRequest(format!(
                "unexpected outcome {other}"
            ))),
        }
    }

    /// `keys list`.
    pub fn keys_list(&self) -> Vec<KeyView> {
        self.state.read(|s| {
            s.users
                .values()
                .map(|u| KeyView {
                    fingerprint: u.fingerprint.to_string(),
                    role: u.role.to_string(),
                    comment: u.comment.clone(),
                    key: u.key.clone(),
                    added_by: u.added_by.to_string(),
                    added_at_ms: u.added_at.0,
                })
                .collect()
        })
    }

    /// `audit [--since D] [--actor FP]`.
    pub fn audit(
        &self,
        since: Option<std::time::Duration>,
        actor: Option<&Fingerprint>,
    ) -> Vec<AuditView> {
        let from = since.map(|d| {
            crate::proposer::now()
                .0
                .saturating_sub(d.as_millis() as u64)
        });
        self.state.read(|s| {
            s.audit
                .entries
                .iter()
                .filter(|e| from.is_none_or(|f| e.at.0 >= f) && actor.is_none_or(|a| e.actor == *a))
                .map(|e| AuditView {
                    seq: e.seq,
                    at_ms: e.at.0,
                    actor: e.actor.to_string(),
                    action: e.action.clone(),
                    target: e.target.clone(),
                    outcome: e.outcome.clone(),
                })
                .collect()
        })
    }

    /// `snapshot`: the whole replicated state, codec-encoded (what `restore` reads).
    pub async fn snapshot(&self) -> Result<Vec<u8>, ServiceError> {
        let (_, state) = self.state.copy();
        encode_state(state).await
    }

    /// `digest`: the applied index and the SHA-256 of the state encoded at that index,
    /// to compare replicas (equal indexes must give equal digests). `stable` is always
    /// true now that the index and the state are read together (nodes before session 8
    /// encoded the live state and said whether the index moved meanwhile).
    pub async fn digest(&self) -> Result<serde_json::Value, ServiceError> {
        let (applied, state) = self.state.copy();
        let bytes = encode_state(state).await?;
        Ok(serde_json::json!({
            "node": self.node,
            "applied_index": applied,
            "stable": true,
            "digest": mesh_core::Digest::of(&bytes).to_hex(),
        }))
    }

    /// Who submitted a task.
    pub fn submitter_of(&self, id: TaskId) -> Option<Fingerprint> {
        self.state
            .read(|s| s.tasks.get(&id).map(|t| t.submitter.clone()))
    }
}

/// Longest a join token may live.
const MAX_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// The reply to a committed submit.
fn submitted(outcome: Outcome) -> Result<SubmitReply, ServiceError> {
    match outcome {
        Outcome::Submitted { task, existing } => {
            metrics::counter!("mesh_tasks_submitted_total").increment(u64::from(!existing));
            Ok(SubmitReply { task, existing })
        }
        Outcome::Rejected(r) => Err(r.into()),
        other => Err(ServiceError::BadRequest(format!(
            "unexpected outcome {other}"
        ))),
    }
}

fn check_spec_fields(spec: &TaskSpec) -> Result<(), ServiceError> {
    use mesh_core::limits::MAX_IDEMPOTENCY_KEY_BYTES;
    if spec.max_attempts == 0 {
        return Err(ServiceError::BadRequest(
            "max_attempts must be at least 1".into(),
        ));
    }
    if spec.timeout.is_zero() {
        return Err(ServiceError::BadRequest(
            "timeout must be longer than zero".into(),
        ));
    }
    if let Some(k) = &spec.idempotency_key {
        if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_BYTES {
            return Err(ServiceError::BadRequest(format!(
                "idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes"
            )));
        }
    }
    let mut names = BTreeSet::new();
    for i in &spec.inputs {
        if !names.insert(i.name.as_str()) {
            return Err(ServiceError::BadRequest(format!(
                "input '{}' is given twice",
                i.name
            )));
        }
    }
    Ok(())
}

/// The word for a Raft server state.
pub fn role_name(s: &openraft::ServerState) -> &'static str {
    match s {
        openraft::ServerState::Leader => "leader",
        openraft::ServerState::Follower => "follower",
        openraft::ServerState::Candidate => "candidate",
        openraft::ServerState::Learner => "learner",
        openraft::ServerState::Shutdown => "shutdown",
    }
}
