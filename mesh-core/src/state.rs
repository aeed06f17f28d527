//! The replicated state machine: `apply` is a pure function of (state, command).
//!
//! Architecture invariant: a result is recorded only from the task's current attempt,
//! and a terminal task never changes again.

use crate::access::UserKey;
use crate::audit::AuditLog;
use crate::capability::NodeCapabilities;
use crate::command::{Command, Outcome, Rejection, Request, Response};
use crate::data::{Bytes, Digest};
use crate::idempotency::{IdempotencyKey, IdempotencyMap};
use crate::identity::fingerprint::Fingerprint;
use crate::ids::{Attempt, NodeId, TaskId, Timestamp};
use crate::task::{
    AttemptError, Checkpoint, DataRef, OutputDecl, Task, TaskResult, TaskSpec, TaskState,
};
use crate::token::TokenRecord;
use serde::{Deserialize, Serialize};
use std::collections::{hash_map, BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// A node as the mesh knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Id.
    pub id: NodeId,
    /// Host key fingerprint.
    pub fingerprint: Fingerprint,
    /// Advertised address.
    pub addr: String,
    /// Adapters and labels.
    pub capabilities: NodeCapabilities,
    /// When it first registered.
    pub registered_at: Timestamp,
    /// When it last registered or refreshed.
    pub updated_at: Timestamp,
    /// Marked down by the leader (no heartbeat for the node timeout).
    pub down: bool,
    /// Removed for good; its id is never reused.
    pub removed: bool,
    /// Drained by an operator: no new placements.
    pub drained: bool,
}

impl NodeRecord {
    /// Whether placement may use this node.
    pub fn is_live(&self) -> bool {
        !self.down && !self.removed
    }
}

/// The whole replicated state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MeshState {
    /// Nodes by id.
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// Tasks by id. Shared (`Arc`) so that cloning the state for a snapshot copies
    /// pointers, not every task (a deep clone of 100,000 tasks held the state lock for
    /// 120-300 ms and stalled a node's Raft heartbeats); a change copies one task
    /// if a snapshot still holds it (`Arc::make_mut`).
    pub tasks: BTreeMap<TaskId, Arc<Task>>,
    /// (submitter, idempotency key) -> task: a hash map searched on every keyed submit
    /// (`idempotency.rs` tells why and how), encoded in key order.
    #[serde(serialize_with = "in_key_order")]
    pub idempotency: IdempotencyMap<TaskId>,
    /// Input and output bytes by digest: a hash map, searched once per input of every
    /// submit (a B-tree of 32-byte keys missed the cache at every level), encoded in
    /// key order.
    #[serde(serialize_with = "in_key_order")]
    pub blobs: HashMap<Digest, Bytes>,
    /// The id the next submitted task gets.
    pub next_task: u64,
    /// Join tokens by id.
    pub tokens: BTreeMap<String, TokenRecord>,
    /// User keys by fingerprint.
    pub users: BTreeMap<Fingerprint, UserKey>,
    /// The audit trail.
    pub audit: AuditLog,
    /// Derived, never encoded: pending and active (assigned or running) task ids, so
    /// that placement and the workers do not scan every task on every commit.
    #[serde(skip)]
    index: TaskIndex,
}

/// Encode a hash map's entries in key order, as a `BTreeMap` encodes them: every node
/// encodes the same state to the same bytes, whatever order its map holds them in (the
/// order depends on the map's history and on the process's hash seed).
fn in_key_order<K: Ord + Serialize, V: Serialize, H, S: serde::Serializer>(
    map: &HashMap<K, V, H>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut entries: Vec<(&K, &V)> = map.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    serializer.collect_map(entries)
}

/// Task ids by the states that placement and the workers look for, and how many
/// tasks ended in each terminal state (for `status` and the gauges, without a scan of
/// every task). Rebuilt from `tasks` after a decode (`valid` is false then) and kept up
/// to date by `apply`.
#[derive(Debug, Clone, Default)]
struct TaskIndex {
    valid: bool,
    pending: BTreeSet<TaskId>,
    active: BTreeSet<TaskId>,
    /// Tasks succeeded, failed, cancelled: a terminal state is final, so each task is
    /// counted once, when it leaves `pending` or `active` for one.
    terminal: BTreeMap<&'static str, usize>,
}

// The index is derived from `tasks`: two states with equal tasks are equal.
impl PartialEq for TaskIndex {
    fn eq(&self, _: &TaskIndex) -> bool {
        true
    }
}

impl MeshState {
    /// Apply one Raft entry.
    pub fn apply_request(&mut self, req: &Request) -> Response {
        Response {
            outcomes: req
                .commands
                .iter()
                .map(|c| self.apply(req.now, c))
                .collect(),
        }
    }

    /// Apply one command at time `now`; administrative commands are audited with
    /// their outcome.
    pub fn apply(&mut self, now: Timestamp, cmd: &Command) -> Outcome {
        if !self.index.valid {
            self.rebuild_index();
        }
        let outcome = self.transition(now, cmd);
        match (cmd, &outcome) {
            (_, Outcome::Submitted { task, .. }) => self.reindex(*task),
            (
                Command::Assign { task, .. }
                | Command::Start { task, .. }
                | Command::Complete { task, .. }
                | Command::Fail { task, .. }
                | Command::Checkpoint { task, .. }
                | Command::Release { task, .. }
                | Command::Cancel { task, .. },
                _,
            ) => self.reindex(*task),
            // `requeue` reindexes the tasks it moves.
            (Command::MarkDown { .. } | Command::RemoveNode { .. }, _) => {}
            // Commands that may move many tasks at once (a restore) are rare: rebuild.
            _ => self.rebuild_index(),
        }
        self.audit_command(now, cmd, &outcome);
        outcome
    }

    fn reindex(&mut self, id: TaskId) {
        let state = self.tasks.get(&id).map(|t| &t.state);
        let (pending, active) = match state {
            Some(TaskState::Pending) => (true, false),
            Some(TaskState::Assigned { .. } | TaskState::Running { .. }) => (false, true),
            _ => (false, false),
        };
        let mut was_open = false;
        for (set, member) in [
            (&mut self.index.pending, pending),
            (&mut self.index.active, active),
        ] {
            if member {
                was_open |= !set.insert(id);
            } else {
                was_open |= set.remove(&id);
            }
        }
        if let Some(state) = state.filter(|s| s.is_terminal() && was_open) {
            *self.index.terminal.entry(state.name()).or_insert(0) += 1;
        }
    }

    fn rebuild_index(&mut self) {
        let mut index = TaskIndex {
            valid: true,
            ..TaskIndex::default()
        };
        for (id, t) in &self.tasks {
            match t.state {
                TaskState::Pending => {
                    index.pending.insert(*id);
                }
                TaskState::Assigned { .. } | TaskState::Running { .. } => {
                    index.active.insert(*id);
                }
                ref terminal => *index.terminal.entry(terminal.name()).or_insert(0) += 1,
            }
        }
        self.index = index;
    }

    /// Pending tasks in id order (from the index once the state has applied a
    /// command; a scan of every task before that).
    pub fn pending_tasks(&self) -> Box<dyn Iterator<Item = &Task> + '_> {
        if self.index.valid {
            Box::new(
                self.index
                    .pending
                    .iter()
                    .filter_map(|id| self.tasks.get(id).map(|t| &**t)),
            )
        } else {
            Box::new(
                self.tasks
                    .values()
                    .map(|t| &**t)
                    .filter(|t| t.state == TaskState::Pending),
            )
        }
    }

    /// Assigned and running tasks in id order (indexed as [`MeshState::pending_tasks`]).
    pub fn active_tasks(&self) -> Box<dyn Iterator<Item = &Task> + '_> {
        if self.index.valid {
            Box::new(
                self.index
                    .active
                    .iter()
                    .filter_map(|id| self.tasks.get(id).map(|t| &**t)),
            )
        } else {
            Box::new(
                self.tasks
                    .values()
                    .map(|t| &**t)
                    .filter(|t| t.state.assignment().is_some()),
            )
        }
    }

    fn audit_command(&mut self, now: Timestamp, cmd: &Command, outcome: &Outcome) {
        let (actor, action, target) = match cmd {
            Command::Submit { submitter, .. } => (submitter, "submit", None),
            Command::Cancel { task, actor } => (actor, "cancel", Some(task.to_string())),
            Command::CreateToken { id, actor, .. } => (actor, "token create", Some(id.clone())),
            Command::RevokeToken { id, actor } => (actor, "token revoke", Some(id.clone())),
            Command::Join {
                token, fingerprint, ..
            } => (fingerprint, "join", Some(format!("token {token}"))),
            Command::RemoveNode { node, actor } => (actor, "remove", Some(format!("node {node}"))),
            Command::Drain { node, actor } => (actor, "drain", Some(format!("node {node}"))),
            Command::Undrain { node, actor } => (actor, "undrain", Some(format!("node {node}"))),
            Command::AddKey {
                fingerprint,
                role,
                actor,
                ..
            } => (actor, "keys add", Some(format!("{fingerprint} as {role}"))),
            Command::RemoveKey { fingerprint, actor } => {
                (actor, "keys remove", Some(fingerprint.to_string()))
            }
            Command::SetAuditRetention { entries, actor } => {
                (actor, "audit retention", Some(entries.to_string()))
            }
            Command::Restore { actor, .. } => (actor, "restore", None),
            _ => return,
        };
        let (target, result) = match outcome {
            Outcome::Rejected(r) => (target, format!("refused: {r}")),
            Outcome::Submitted { task, existing } => (
                Some(task.to_string()),
                if *existing {
                    "ok (existing)".into()
                } else {
                    "ok".into()
                },
            ),
            Outcome::Joined(n) => (Some(format!("node {n}")), "ok".into()),
            _ => (target, "ok".into()),
        };
        let actor = actor.clone();
        self.audit.record(now, &actor, action, target, result);
    }

    fn transition(&mut self, now: Timestamp, cmd: &Command) -> Outcome {
        match cmd {
            Command::RegisterNode {
                node,
                fingerprint,
                addr,
                capabilities,
            } => {
                if let Some(n) = self.nodes.get(node) {
                    if n.removed || n.fingerprint != *fingerprint {
                        return Outcome::Rejected(Rejection::NodeIdentity(format!(
                            "node {node} is {}; it cannot register again",
                            if n.removed {
                                "removed"
                            } else {
                                "registered under another key"
                            }
                        )));
                    }
                }
                let registered_at = self.nodes.get(node).map_or(now, |n| n.registered_at);
                self.nodes.insert(
                    *node,
                    NodeRecord {
                        id: *node,
                        fingerprint: fingerprint.clone(),
                        addr: addr.clone(),
                        capabilities: capabilities.clone(),
                        registered_at,
                        updated_at: now,
                        down: false,
                        removed: false,
                        drained: self.nodes.get(node).is_some_and(|n| n.drained),
                    },
                );
                Outcome::NodeRegistered(*node)
            }
            Command::CreateToken {
                id,
                secret_hash,
                ttl,
                uses,
                actor,
            } => {
                self.tokens.insert(
                    id.clone(),
                    TokenRecord {
                        id: id.clone(),
                        secret_hash: *secret_hash,
                        created_at: now,
                        expires_at: now.plus(*ttl),
                        uses_left: *uses,
                        created_by: actor.clone(),
                        revoked: false,
                    },
                );
                Outcome::TokenCreated(id.clone())
            }
            Command::RevokeToken { id, .. } => match self.tokens.get_mut(id) {
                Some(t) => {
                    t.revoked = true;
                    Outcome::TokenRevoked(id.clone())
                }
                None => Outcome::Rejected(Rejection::UnknownToken(id.clone())),
            },
            Command::Join {
                token,
                secret_hash,
                fingerprint,
                addr,
            } => self.join(now, token, secret_hash, fingerprint, addr),
            Command::MarkDown { node } => match self.nodes.get_mut(node) {
                Some(n) if !n.removed => {
                    n.down = true;
                    self.requeue(now, *node, "was marked down (no heartbeat)", true);
                    Outcome::NodeDown(*node)
                }
                _ => Outcome::Rejected(Rejection::UnknownNode(*node)),
            },
            Command::MarkUp { node } => match self.nodes.get_mut(node) {
                Some(n) if !n.removed => {
                    n.down = false;
                    Outcome::NodeUp(*node)
                }
                _ => Outcome::Rejected(Rejection::UnknownNode(*node)),
            },
            Command::RemoveNode { node, .. } => match self.nodes.get_mut(node) {
                Some(n) if !n.removed => {
                    n.removed = true;
                    n.down = true;
                    self.requeue(now, *node, "was removed", false);
                    Outcome::NodeRemoved(*node)
                }
                _ => Outcome::Rejected(Rejection::UnknownNode(*node)),
            },
            Command::Submit {
                spec,
                outputs,
                submitter,
            } => self.submit(now, spec, outputs, submitter),
            Command::Assign { task, node } => self.assign(*task, *node),
            Command::Start {
                task,
                attempt,
                node,
            } => self.start(now, *task, *attempt, *node),
            Command::Complete {
                task,
                attempt,
                node,
                outputs,
            } => self.complete(now, *task, *attempt, *node, outputs),
            Command::Fail {
                task,
                attempt,
                node,
                error,
                retryable,
            } => self.fail(now, *task, *attempt, *node, error, *retryable),
            Command::Cancel { task, .. } => self.cancel(now, *task),
            Command::AddKey {
                fingerprint,
                key,
                role,
                comment,
                actor,
            } => {
                let demotes_last_admin = self
                    .users
                    .get(fingerprint)
                    .is_some_and(|u| u.role == crate::access::Role::Admin)
                    && *role != crate::access::Role::Admin
                    && self.admin_count() == 1;
                if demotes_last_admin {
                    return Outcome::Rejected(Rejection::LastAdmin(fingerprint.clone()));
                }
                self.users.insert(
                    fingerprint.clone(),
                    UserKey {
                        fingerprint: fingerprint.clone(),
                        key: key.clone(),
                        role: *role,
                        comment: comment.clone(),
                        added_by: actor.clone(),
                        added_at: now,
                    },
                );
                Outcome::KeyAdded(fingerprint.clone())
            }
            Command::RemoveKey { fingerprint, .. } => match self.users.get(fingerprint) {
                None => Outcome::Rejected(Rejection::UnknownKey(fingerprint.clone())),
                Some(u) if u.role == crate::access::Role::Admin && self.admin_count() == 1 => {
                    Outcome::Rejected(Rejection::LastAdmin(fingerprint.clone()))
                }
                Some(_) => {
                    self.users.remove(fingerprint);
                    Outcome::KeyRemoved(fingerprint.clone())
                }
            },
            Command::AuditRefusal {
                actor,
                action,
                target,
                reason,
            } => {
                self.audit.record(
                    now,
                    actor,
                    action,
                    target.clone(),
                    format!("refused: {reason}"),
                );
                Outcome::Audited
            }
            Command::Restore { state, .. } => {
                if !self.tasks.is_empty() {
                    return Outcome::Rejected(Rejection::NodeIdentity(format!(
                        "this mesh already has {} tasks; restore into a fresh mesh",
                        self.tasks.len()
                    )));
                }
                let saved = (**state).clone();
                let mut tasks = saved.tasks;
                for t in tasks.values_mut() {
                    if let Some((node, attempt)) = t.state.assignment() {
                        let t = Arc::make_mut(t);
                        t.errors.push(AttemptError {
                            attempt,
                            node,
                            error: "in flight when the mesh was restored".into(),
                        });
                        t.state = TaskState::Pending;
                    }
                }
                for (id, mut n) in saved.nodes {
                    n.removed = true;
                    n.down = true;
                    self.nodes.entry(id).or_insert(n);
                }
                let count = tasks.len();
                self.tasks = tasks;
                self.idempotency = saved.idempotency;
                self.blobs = saved.blobs;
                self.next_task = saved.next_task;
                self.users.extend(saved.users);
                let retention = saved.audit.retention;
                for e in saved.audit.entries {
                    self.audit
                        .record(e.at, &e.actor, &e.action, e.target, e.outcome);
                }
                self.audit.set_retention(retention);
                Outcome::Restored { tasks: count }
            }
            Command::SetAuditRetention { entries, .. } => {
                self.audit.set_retention(*entries);
                Outcome::Audited
            }
            Command::Checkpoint {
                task,
                attempt,
                node,
                shard,
                output,
            } => self.checkpoint(now, *task, *attempt, *node, *shard, output),
            Command::Release {
                task,
                attempt,
                node,
            } => match self.current(*task, *attempt, *node, "release") {
                Ok(t) => {
                    t.state = TaskState::Pending;
                    Outcome::Released(*task)
                }
                Err(r) => Outcome::Rejected(r),
            },
            Command::Drain { node, .. } | Command::Undrain { node, .. } => {
                let draining = matches!(cmd, Command::Drain { .. });
                match self.nodes.get_mut(node) {
                    Some(n) if !n.removed => {
                        n.drained = draining;
                        Outcome::Drained {
                            node: *node,
                            draining,
                        }
                    }
                    _ => Outcome::Rejected(Rejection::UnknownNode(*node)),
                }
            }
        }
    }

    fn join(
        &mut self,
        now: Timestamp,
        token: &str,
        secret_hash: &Digest,
        fingerprint: &Fingerprint,
        addr: &str,
    ) -> Outcome {
        let refuse = |why: String| Outcome::Rejected(Rejection::Token(why));
        let Some(t) = self.tokens.get_mut(token) else {
            return refuse(format!("token {token} does not exist"));
        };
        if t.revoked {
            return refuse(format!("token {token} was revoked"));
        }
        if now >= t.expires_at {
            return refuse(format!("token {token} expired"));
        }
        if t.uses_left == 0 {
            return refuse(format!("token {token} is used up"));
        }
        if t.secret_hash != *secret_hash {
            return refuse(format!("the secret does not match token {token}"));
        }
        t.uses_left -= 1;
        // A machine that comes back under a key the mesh knows (its data was wiped)
        // joins as a new node; the old identity is removed so it can never vote again.
        let old: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| n.fingerprint == *fingerprint && !n.removed)
            .map(|n| n.id)
            .collect();
        for id in old {
            if let Some(n) = self.nodes.get_mut(&id) {
                n.removed = true;
                n.down = true;
            }
            self.requeue(now, id, "rejoined under a new node id", false);
        }
        let id = NodeId(self.nodes.keys().next_back().map_or(1, |n| n.0 + 1));
        self.nodes.insert(
            id,
            NodeRecord {
                id,
                fingerprint: fingerprint.clone(),
                addr: addr.into(),
                capabilities: NodeCapabilities::default(),
                registered_at: now,
                updated_at: now,
                down: false,
                removed: false,
                drained: false,
            },
        );
        Outcome::Joined(id)
    }

    /// Take back every attempt held by `node`: the tasks go back to pending, so the
    /// next assignment carries a new attempt and the old node's reports are stale.
    /// When the node failed (`spent`), the attempt ends as a failed run does (`fail`):
    /// a task whose last attempt it was fails for good, so a task that brings down
    /// every node it runs on stops after `max_attempts` nodes. An operator's removal
    /// (or a rejoin under a new id) always puts the task back to pending.
    fn requeue(&mut self, now: Timestamp, node: NodeId, why: &str, spent: bool) {
        let held: Vec<(TaskId, Attempt)> = self
            .active_tasks()
            .filter_map(|t| match t.state.assignment() {
                Some((holder, attempt)) if holder == node => Some((t.id, attempt)),
                _ => None,
            })
            .collect();
        for (id, attempt) in held {
            let t = Arc::make_mut(self.tasks.get_mut(&id).expect("an active task exists"));
            let last = spent && !t.may_retry_after(attempt);
            let mut error = format!("node {node} {why}");
            if last {
                error += &format!("; that was the last of {} attempts", t.max_attempts);
            }
            t.errors.push(AttemptError {
                attempt,
                node,
                error,
            });
            if last {
                t.state = TaskState::Failed;
                t.finished_at = Some(now);
            } else {
                t.state = TaskState::Pending;
            }
            self.reindex(id);
        }
    }

    fn admin_count(&self) -> usize {
        self.users
            .values()
            .filter(|u| u.role == crate::access::Role::Admin)
            .count()
    }

    /// The role of a user key, if it is one.
    pub fn role_of(&self, fp: &Fingerprint) -> Option<crate::access::Role> {
        self.users.get(fp).map(|u| u.role)
    }

    /// Nodes placement may use: registered, not down, not removed.
    pub fn live_nodes(&self) -> std::collections::BTreeSet<NodeId> {
        self.nodes
            .values()
            .filter(|n| n.is_live())
            .map(|n| n.id)
            .collect()
    }

    fn submit(
        &mut self,
        now: Timestamp,
        spec: &TaskSpec,
        outputs: &[OutputDecl],
        submitter: &Fingerprint,
    ) -> Outcome {
        let id = TaskId(self.next_task);
        if let Some(key) = &spec.idempotency_key {
            // One search of the key map for both the lookup and the insert.
            match self
                .idempotency
                .entry(IdempotencyKey::new(submitter.clone(), key.clone()))
            {
                hash_map::Entry::Occupied(e) => {
                    return Outcome::Submitted {
                        task: *e.get(),
                        existing: true,
                    }
                }
                hash_map::Entry::Vacant(e) => {
                    e.insert(id);
                }
            }
        }
        self.next_task += 1;
        let inputs = spec
            .inputs
            .iter()
            .map(|i| self.store_blob(&i.name, &i.data))
            .collect();
        self.tasks.insert(
            id,
            Arc::new(Task {
                id,
                kernel: spec.kernel.clone(),
                inputs,
                outputs: outputs.to_vec(),
                requirements: spec.requirements.clone(),
                prefer: spec.prefer.clone(),
                shards: spec.shards.max(1),
                checkpoints: BTreeMap::new(),
                not_before: None,
                priority: spec.priority,
                timeout: spec.timeout,
                max_attempts: spec.max_attempts.max(1),
                idempotency_key: spec.idempotency_key.clone(),
                submitter: submitter.clone(),
                state: TaskState::Pending,
                attempt: Attempt(0),
                submitted_at: now,
                started_at: None,
                finished_at: None,
                result: None,
                results_recorded: 0,
                errors: Vec::new(),
            }),
        );
        Outcome::Submitted {
            task: id,
            existing: false,
        }
    }

    fn store_blob(&mut self, name: &str, data: &Bytes) -> DataRef {
        let digest = data.digest();
        self.blobs.entry(digest).or_insert_with(|| data.clone());
        DataRef {
            name: name.into(),
            digest,
            len: data.len() as u64,
        }
    }

    fn assign(&mut self, id: TaskId, node: NodeId) -> Outcome {
        if !self.nodes.contains_key(&node) {
            return Outcome::Rejected(Rejection::UnknownNode(node));
        }
        let Some(task) = self.tasks.get_mut(&id).map(Arc::make_mut) else {
            return Outcome::Rejected(Rejection::UnknownTask(id));
        };
        if task.state != TaskState::Pending {
            return Outcome::Rejected(wrong_state(task, "assign"));
        }
        let attempt = task.attempt.next();
        debug_assert!(attempt > task.attempt, "an attempt number only grows");
        task.attempt = attempt;
        task.state = TaskState::Assigned { node, attempt };
        Outcome::Assigned {
            task: id,
            node,
            attempt,
        }
    }

    /// The fencing check: the report must come from the node holding the current attempt.
    fn current<'a>(
        &'a mut self,
        id: TaskId,
        attempt: Attempt,
        node: NodeId,
        action: &str,
    ) -> Result<&'a mut Task, Rejection> {
        let task = self
            .tasks
            .get_mut(&id)
            .map(Arc::make_mut)
            .ok_or(Rejection::UnknownTask(id))?;
        if task.state.is_terminal() {
            return Err(wrong_state(task, action));
        }
        match task.state.assignment() {
            Some((holder, current)) if current == attempt && holder == node => Ok(task),
            holder => Err(Rejection::StaleAttempt {
                task: id,
                got: attempt,
                current: task.attempt,
                holder: match holder {
                    Some((n, _)) => format!("node {n}"),
                    None => "no node".into(),
                },
            }),
        }
    }

    fn start(&mut self, now: Timestamp, id: TaskId, attempt: Attempt, node: NodeId) -> Outcome {
        match self.current(id, attempt, node, "start") {
            Ok(task) => {
                if let TaskState::Assigned { node, attempt } = task.state {
                    task.state = TaskState::Running { node, attempt };
                    task.started_at = Some(now);
                }
                Outcome::Started(id)
            }
            Err(r) => Outcome::Rejected(r),
        }
    }

    fn complete(
        &mut self,
        now: Timestamp,
        id: TaskId,
        attempt: Attempt,
        node: NodeId,
        outputs: &[Bytes],
    ) -> Outcome {
        let declared = match self.current(id, attempt, node, "record a result") {
            Ok(task) => task.outputs.clone(),
            Err(r) => return Outcome::Rejected(r),
        };
        let sizes_match = declared.len() == outputs.len()
            && declared
                .iter()
                .zip(outputs)
                .all(|(d, o)| d.size == o.len() as u64);
        if !sizes_match {
            return Outcome::Rejected(Rejection::BadOutputs {
                task: id,
                why: format!(
                    "outputs of {:?} bytes do not match the declared {:?}",
                    outputs.iter().map(|o| o.len()).collect::<Vec<_>>(),
                    declared.iter().map(|d| d.size).collect::<Vec<_>>()
                ),
            });
        }
        let refs = declared
            .iter()
            .zip(outputs)
            .map(|(d, o)| self.store_blob(&d.name, o))
            .collect();
        let task = self
            .tasks
            .get_mut(&id)
            .map(Arc::make_mut)
            .expect("checked above");
        debug_assert!(task.result.is_none(), "a task records exactly one result");
        task.result = Some(TaskResult {
            attempt,
            node,
            outputs: refs,
        });
        task.state = TaskState::Succeeded;
        task.finished_at = Some(now);
        Outcome::Completed(id)
    }

    fn fail(
        &mut self,
        now: Timestamp,
        id: TaskId,
        attempt: Attempt,
        node: NodeId,
        error: &str,
        retryable: bool,
    ) -> Outcome {
        let task = match self.current(id, attempt, node, "fail") {
            Ok(task) => task,
            Err(r) => return Outcome::Rejected(r),
        };
        task.errors.push(AttemptError {
            attempt,
            node,
            error: error.into(),
        });
        let retry = retryable && task.may_retry_after(attempt);
        if retry {
            task.state = TaskState::Pending;
            task.not_before = Some(now.plus(retry_backoff(attempt)));
        } else {
            task.state = TaskState::Failed;
            task.finished_at = Some(now);
        }
        Outcome::Failed { task: id, retry }
    }

    fn checkpoint(
        &mut self,
        now: Timestamp,
        id: TaskId,
        attempt: Attempt,
        node: NodeId,
        shard: u32,
        output: &Bytes,
    ) -> Outcome {
        let task = match self.current(id, attempt, node, "checkpoint") {
            Ok(t) => t,
            Err(r) => return Outcome::Rejected(r),
        };
        if shard >= task.shards || task.checkpoints.contains_key(&shard) {
            return Outcome::Rejected(Rejection::BadOutputs {
                task: id,
                why: format!(
                    "shard {shard} is out of range or already committed (the task has {} shards)",
                    task.shards
                ),
            });
        }
        let name = task
            .outputs
            .first()
            .map_or_else(|| "out".to_string(), |o| o.name.clone());
        let output_ref = self.store_blob(&format!("{name}.shard{shard}"), output);
        let task = self
            .tasks
            .get_mut(&id)
            .map(Arc::make_mut)
            .expect("checked above");
        task.checkpoints.insert(
            shard,
            Checkpoint {
                attempt,
                node,
                output: output_ref,
            },
        );
        if task.checkpoints.len() < task.shards as usize {
            return Outcome::Checkpointed { task: id, shard };
        }
        // Every shard is in: the result is the shards' outputs in order.
        let mut whole = Vec::new();
        let digests: Vec<Digest> = task.checkpoints.values().map(|c| c.output.digest).collect();
        for d in &digests {
            whole.extend_from_slice(self.blobs.get(d).map(|b| b.as_slice()).unwrap_or_default());
        }
        self.complete(now, id, attempt, node, &[Bytes::from(whole)])
    }

    fn cancel(&mut self, now: Timestamp, id: TaskId) -> Outcome {
        let Some(task) = self.tasks.get_mut(&id).map(Arc::make_mut) else {
            return Outcome::Rejected(Rejection::UnknownTask(id));
        };
        if task.state.is_terminal() {
            return Outcome::Rejected(wrong_state(task, "cancel"));
        }
        task.state = TaskState::Cancelled;
        task.finished_at = Some(now);
        Outcome::Cancelled(id)
    }

    /// The bytes of a stored buffer.
    pub fn blob(&self, digest: &Digest) -> Option<&Bytes> {
        self.blobs.get(digest)
    }

    /// Tasks assigned to or running on `node`.
    pub fn tasks_on(&self, node: NodeId) -> impl Iterator<Item = &Task> {
        self.active_tasks()
            .filter(move |t| t.state.assignment().is_some_and(|(n, _)| n == node))
    }

    /// Number of tasks in each state, by state name.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        if !self.index.valid {
            return self.counts_by_scan();
        }
        let mut c = self.index.terminal.clone();
        if !self.index.pending.is_empty() {
            c.insert("pending", self.index.pending.len());
        }
        for t in self.active_tasks() {
            *c.entry(t.state.name()).or_insert(0) += 1;
        }
        c
    }

    /// [`MeshState::counts`] by a scan of every task (before the index is built).
    fn counts_by_scan(&self) -> BTreeMap<&'static str, usize> {
        let mut c = BTreeMap::new();
        for t in self.tasks.values() {
            *c.entry(t.state.name()).or_insert(0) += 1;
        }
        c
    }
}

/// Delay before a failed attempt's task may be placed again: 500 ms, doubling per
/// attempt, at most 30 s.
pub fn retry_backoff(failed: Attempt) -> std::time::Duration {
    let ms = 500u64.saturating_mul(1 << failed.0.saturating_sub(1).min(16));
    std::time::Duration::from_millis(ms.min(30_000))
}

fn wrong_state(task: &Task, action: &str) -> Rejection {
    Rejection::WrongState {
        task: task.id,
        state: task.state.name().into(),
        action: action.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_maps_encode_in_key_order_as_the_b_trees_did() {
        let submitter = |i: u32| Fingerprint::of_key_blob(&i.to_le_bytes());
        let entries: Vec<(Fingerprint, String, TaskId, Bytes)> = (0..300u32)
            .map(|i| {
                let data: Bytes = i.to_le_bytes().to_vec().into();
                (
                    submitter(i % 7),
                    format!("k{i}"),
                    TaskId(u64::from(i)),
                    data,
                )
            })
            .collect();
        let fill = |order: &mut dyn Iterator<Item = &(Fingerprint, String, TaskId, Bytes)>| {
            let mut state = MeshState::default();
            for (fp, key, task, data) in order {
                state
                    .idempotency
                    .insert(IdempotencyKey::new(fp.clone(), key.clone()), *task);
                state.blobs.insert(data.digest(), data.clone());
            }
            state
        };
        let forward = crate::codec::encode(&fill(&mut entries.iter())).unwrap();
        let backward = crate::codec::encode(&fill(&mut entries.iter().rev())).unwrap();
        assert!(
            forward == backward,
            "the same state must encode to the same bytes"
        );

        // The bytes the B-tree maps gave: old snapshots and logs read unchanged.
        let state = fill(&mut entries.iter());
        let ids: BTreeMap<Arc<(Fingerprint, String)>, TaskId> = state
            .idempotency
            .iter()
            .map(|(k, v)| (Arc::new((k.submitter().clone(), k.key().to_string())), *v))
            .collect();
        let blobs: BTreeMap<Digest, Bytes> =
            state.blobs.iter().map(|(k, v)| (*k, v.clone())).collect();
        #[derive(Serialize)]
        struct Maps {
            #[serde(serialize_with = "in_key_order")]
            idempotency: IdempotencyMap<TaskId>,
            #[serde(serialize_with = "in_key_order")]
            blobs: HashMap<Digest, Bytes>,
        }
        let now = crate::codec::encode(&Maps {
            idempotency: state.idempotency.clone(),
            blobs: state.blobs.clone(),
        })
        .unwrap();
        assert!(now == crate::codec::encode(&(ids, blobs)).unwrap());
        let back: MeshState = crate::codec::decode(&forward).unwrap();
        assert_eq!(back, state);
    }

    fn fp(c: char) -> Fingerprint {
        Fingerprint::of_key_blob(&[c as u8])
    }

    fn spec(key: Option<&str>) -> TaskSpec {
        TaskSpec {
            max_attempts: 2,
            idempotency_key: key.map(String::from),
            ..TaskSpec::builtin("vector-add", &[], [("x", Bytes::from(vec![1, 2, 3, 4]))])
        }
    }

    fn with_node() -> MeshState {
        let mut s = MeshState::default();
        s.apply(
            Timestamp(1),
            &Command::RegisterNode {
                node: NodeId(1),
                fingerprint: fp('a'),
                addr: "n1".into(),
                capabilities: Default::default(),
            },
        );
        s
    }

    fn submit(s: &mut MeshState, key: Option<&str>) -> Outcome {
        s.apply(
            Timestamp(2),
            &Command::Submit {
                spec: spec(key),
                outputs: vec![OutputDecl {
                    name: "out".into(),
                    size: 4,
                }],
                submitter: fp('u'),
            },
        )
    }

    /// The ids the index yields, and the ids a scan of every task finds.
    fn indexed_and_scanned(s: &MeshState) -> [(Vec<TaskId>, Vec<TaskId>); 2] {
        let ids = |it: Box<dyn Iterator<Item = &Task> + '_>| it.map(|t| t.id).collect::<Vec<_>>();
        let scan = |f: fn(&Task) -> bool| s.tasks.values().filter(|t| f(t)).map(|t| t.id).collect();
        [
            (
                ids(s.pending_tasks()),
                scan(|t| t.state == TaskState::Pending),
            ),
            (
                ids(s.active_tasks()),
                scan(|t| t.state.assignment().is_some()),
            ),
        ]
    }

    #[test]
    fn the_task_index_follows_every_transition_and_survives_a_decode() {
        let mut s = with_node();
        for _ in 0..4 {
            submit(&mut s, None);
        }
        let assign = |task| Command::Assign {
            task: TaskId(task),
            node: NodeId(1),
        };
        s.apply(Timestamp(3), &assign(0));
        s.apply(Timestamp(3), &assign(1));
        s.apply(Timestamp(3), &assign(2));
        s.apply(
            Timestamp(4),
            &Command::Start {
                task: TaskId(1),
                attempt: Attempt(1),
                node: NodeId(1),
            },
        );
        s.apply(
            Timestamp(5),
            &Command::Cancel {
                task: TaskId(2),
                actor: fp('u'),
            },
        );
        for (indexed, scanned) in indexed_and_scanned(&s) {
            assert_eq!(indexed, scanned);
        }
        assert_eq!(s.active_tasks().count(), 2);
        assert_eq!(s.pending_tasks().count(), 1);
        assert_eq!(s.counts(), s.counts_by_scan());
        assert_eq!(s.counts()["cancelled"], 1);
        // Cancelling a cancelled task again is refused and counts nothing twice.
        s.apply(
            Timestamp(5),
            &Command::Cancel {
                task: TaskId(2),
                actor: fp('u'),
            },
        );
        assert_eq!(s.counts(), s.counts_by_scan());

        // A node marked down moves its tasks back to pending all at once.
        s.apply(Timestamp(6), &Command::MarkDown { node: NodeId(1) });
        for (indexed, scanned) in indexed_and_scanned(&s) {
            assert_eq!(indexed, scanned);
        }
        assert_eq!(s.counts(), s.counts_by_scan());
        assert_eq!(s.active_tasks().count(), 0);

        // A decoded state has no index yet: it scans, then indexes on its next apply.
        let mut decoded: MeshState =
            crate::codec::decode(&crate::codec::encode(&s).unwrap()).unwrap();
        assert_eq!(decoded, s);
        assert!(!decoded.index.valid);
        assert_eq!(
            indexed_and_scanned(&decoded)[0].0,
            indexed_and_scanned(&s)[0].0
        );
        assert_eq!(decoded.counts(), decoded.counts_by_scan());
        decoded.apply(Timestamp(7), &assign(3));
        assert!(decoded.index.valid);
        for (indexed, scanned) in indexed_and_scanned(&decoded) {
            assert_eq!(indexed, scanned);
        }
        assert_eq!(decoded.counts(), decoded.counts_by_scan());
    }

    #[test]
    fn a_node_lost_under_a_task_spends_an_attempt_and_the_last_one_fails_it() {
        let mut s = with_node();
        s.apply(
            Timestamp(1),
            &Command::RegisterNode {
                node: NodeId(2),
                fingerprint: fp('b'),
                addr: "n2".into(),
                capabilities: Default::default(),
            },
        );
        submit(&mut s, None); // task 0, max_attempts 2
        submit(&mut s, None); // task 1
        let on = |s: &mut MeshState, task, node| {
            let out = s.apply(
                Timestamp(3),
                &Command::Assign {
                    task: TaskId(task),
                    node: NodeId(node),
                },
            );
            assert!(matches!(out, Outcome::Assigned { .. }), "{out:?}");
        };
        // First attempt lost with its node: back to pending, the loss recorded.
        on(&mut s, 0, 1);
        s.apply(Timestamp(4), &Command::MarkDown { node: NodeId(1) });
        let t = &s.tasks[&TaskId(0)];
        assert_eq!(t.state, TaskState::Pending);
        assert_eq!(t.errors.len(), 1);
        assert!(t.errors[0].error.contains("marked down"), "{:?}", t.errors);
        // Its second (last) attempt lost too: it fails for good instead of moving on.
        on(&mut s, 0, 2);
        on(&mut s, 1, 2);
        s.apply(Timestamp(5), &Command::MarkDown { node: NodeId(2) });
        let t = &s.tasks[&TaskId(0)];
        assert_eq!(t.state, TaskState::Failed);
        assert_eq!(t.finished_at, Some(Timestamp(5)));
        assert!(
            t.errors[1].error.contains("the last of 2 attempts"),
            "{:?}",
            t.errors
        );
        // Task 1 had attempts left: pending again.
        assert_eq!(s.tasks[&TaskId(1)].state, TaskState::Pending);
        for (indexed, scanned) in indexed_and_scanned(&s) {
            assert_eq!(indexed, scanned);
        }
        assert_eq!(s.counts(), s.counts_by_scan());
        assert_eq!(s.counts()["failed"], 1);

        // An operator's removal spends nothing: task 1's last attempt goes back.
        s.apply(Timestamp(6), &Command::MarkUp { node: NodeId(1) });
        on(&mut s, 1, 1);
        s.apply(
            Timestamp(7),
            &Command::RemoveNode {
                node: NodeId(1),
                actor: fp('u'),
            },
        );
        let t = &s.tasks[&TaskId(1)];
        assert_eq!(
            (t.state.clone(), t.attempt),
            (TaskState::Pending, Attempt(2))
        );
        assert!(t.errors.last().unwrap().error.contains("was removed"));
        assert_eq!(s.counts(), s.counts_by_scan());
    }

    #[test]
    fn a_clone_shares_tasks_until_one_side_changes_them() {
        let mut s = with_node();
        submit(&mut s, None);
        submit(&mut s, None);
        let snapshot = s.clone();
        assert!(Arc::ptr_eq(
            &s.tasks[&TaskId(0)],
            &snapshot.tasks[&TaskId(0)]
        ));
        s.apply(
            Timestamp(3),
            &Command::Assign {
                task: TaskId(0),
                node: NodeId(1),
            },
        );
        assert!(matches!(
            s.tasks[&TaskId(0)].state,
            TaskState::Assigned { .. }
        ));
        assert_eq!(
            snapshot.tasks[&TaskId(0)].state,
            TaskState::Pending,
            "the clone kept its copy"
        );
        assert!(!Arc::ptr_eq(
            &s.tasks[&TaskId(0)],
            &snapshot.tasks[&TaskId(0)]
        ));
        assert!(
            Arc::ptr_eq(&s.tasks[&TaskId(1)], &snapshot.tasks[&TaskId(1)]),
            "untouched tasks stay shared"
        );
    }

    #[test]
    fn identical_inputs_are_stored_once() {
        let mut s = with_node();
        submit(&mut s, None);
        submit(&mut s, None);
        assert_eq!(s.tasks.len(), 2);
        assert_eq!(s.blobs.len(), 1);
    }

    #[test]
    fn idempotency_is_per_submitter() {
        let mut s = with_node();
        assert_eq!(
            submit(&mut s, Some("k")),
            Outcome::Submitted {
                task: TaskId(0),
                existing: false
            }
        );
        assert_eq!(
            submit(&mut s, Some("k")),
            Outcome::Submitted {
                task: TaskId(0),
                existing: true
            }
        );
        let other = s.apply(
            Timestamp(3),
            &Command::Submit {
                spec: spec(Some("k")),
                outputs: vec![],
                submitter: fp('v'),
            },
        );
        assert_eq!(
            other,
            Outcome::Submitted {
                task: TaskId(1),
                existing: false
            }
        );
    }

    #[test]
    fn wrong_output_size_is_rejected_and_changes_nothing() {
        let mut s = with_node();
        submit(&mut s, None);
        s.apply(
            Timestamp(3),
            &Command::Assign {
                task: TaskId(0),
                node: NodeId(1),
            },
        );
        let before = s.clone();
        let o = s.apply(
            Timestamp(4),
            &Command::Complete {
                task: TaskId(0),
                attempt: Attempt(1),
                node: NodeId(1),
                outputs: vec![Bytes::from(vec![0; 8])],
            },
        );
        assert!(
            matches!(o, Outcome::Rejected(Rejection::BadOutputs { .. })),
            "{o:?}"
        );
        assert_eq!(s, before);
    }

    #[test]
    fn request_applies_commands_in_order() {
        let mut s = with_node();
        let resp = s.apply_request(&Request {
            now: Timestamp(5),
            commands: vec![
                Command::Submit {
                    spec: spec(None),
                    outputs: vec![],
                    submitter: fp('u'),
                },
                Command::Assign {
                    task: TaskId(0),
                    node: NodeId(1),
                },
                Command::Assign {
                    task: TaskId(0),
                    node: NodeId(1),
                },
            ]
            .into(),
        });
        assert_eq!(resp.outcomes.len(), 3);
        assert!(matches!(
            resp.outcomes[1],
            Outcome::Assigned {
                attempt: Attempt(1),
                ..
            }
        ));
        assert!(matches!(
            resp.outcomes[2],
            Outcome::Rejected(Rejection::WrongState { .. })
        ));
    }
}
