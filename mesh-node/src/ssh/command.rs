//! One operator command: parse the exec line, run it against the `Service`, and turn
//! the result into stdout, stderr and an exit status (the only place where service
//! errors become SSH replies).

use crate::service::{Service, ServiceError};
use mesh_core::access::{permits, sees_all_tasks, Action, Role};
use mesh_core::api::{
    BatchItemReply, ErrorView, TaskView, EXIT_ERROR, EXIT_TASK_FAILED, EXIT_USAGE,
};
use mesh_core::{Fingerprint, TaskId, TaskSpec};
use serde::Serialize;

/// Largest request body accepted on a command's standard input. A submit carries its
/// inputs base64-encoded in JSON: 16 MiB of inputs need about 22 MiB.
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `status`
    Status,
    /// `nodes`
    Nodes,
    /// `tasks [--state S]`
    Tasks(Option<String>),
    /// `submit` (body on stdin)
    Submit,
    /// `submit-batch` (a JSON array of task specs on stdin, proposed together)
    SubmitBatch,
    /// `submit-stream` (one JSON task spec per line on stdin, each answered by a line
    /// once committed, while the channel stays open)
    SubmitStream,
    /// `task ID`
    Task(TaskId),
    /// `wait ID`
    Wait(TaskId),
    /// `result ID [--raw] [--name N]`
    Result {
        /// Task.
        id: TaskId,
        /// Raw bytes instead of a summary.
        raw: bool,
        /// Output name.
        name: Option<String>,
    },
    /// `cancel ID`
    Cancel(TaskId),
    /// `token create [--ttl D] [--uses N]`
    TokenCreate {
        /// Lifetime.
        ttl: std::time::Duration,
        /// Joins allowed.
        uses: u32,
    },
    /// `token list`
    TokenList,
    /// `token revoke ID`
    TokenRevoke(String),
    /// `remove NODE`
    Remove(mesh_core::NodeId),
    /// `drain NODE` (true) / `undrain NODE` (false)
    Drain(mesh_core::NodeId, bool),
    /// `keys add --role R` (public keys on stdin)
    KeysAdd(Role),
    /// `keys remove FINGERPRINT`
    KeysRemove(Fingerprint),
    /// `keys list`
    KeysList,
    /// `audit [--since D] [--actor FP]`
    Audit {
        /// Only entries newer than this.
        since: Option<std::time::Duration>,
        /// Only this actor.
        actor: Option<Fingerprint>,
    },
    /// `snapshot` (raw state on stdout)
    Snapshot,
    /// `digest` (applied index and state digest, for comparing replicas)
    Digest,
}

impl Request {
    /// What the role check needs.
    pub fn action(&self) -> Action {
        match self {
            Request::Status | Request::Nodes | Request::Digest => Action::ReadMesh,
            Request::Tasks(_) | Request::Task(_) | Request::Wait(_) | Request::Result { .. } => {
                Action::ReadTasks
            }
            Request::Submit | Request::SubmitBatch | Request::SubmitStream => Action::Submit,
            Request::Cancel(_) => Action::Cancel,
            Request::Drain(..) => Action::Drain,
            Request::TokenCreate { .. }
            | Request::TokenList
            | Request::TokenRevoke(_)
            | Request::Remove(_)
            | Request::KeysAdd(_)
            | Request::KeysRemove(_)
            | Request::KeysList
            | Request::Audit { .. }
            | Request::Snapshot => Action::Administer,
        }
    }

    /// The audit name and target of a request.
    fn describe(&self) -> (&'static str, Option<String>) {
        match self {
            Request::Status => ("status", None),
            Request::Nodes => ("nodes", None),
            Request::Tasks(_) => ("tasks", None),
            Request::Submit => ("submit", None),
            Request::SubmitBatch => ("submit-batch", None),
            Request::SubmitStream => ("submit-stream", None),
            Request::Task(id) => ("task", Some(id.to_string())),
            Request::Wait(id) => ("wait", Some(id.to_string())),
            Request::Result { id, .. } => ("result", Some(id.to_string())),
            Request::Cancel(id) => ("cancel", Some(id.to_string())),
            Request::TokenCreate { .. } => ("token create", None),
            Request::TokenList => ("token list", None),
            Request::TokenRevoke(id) => ("token revoke", Some(id.clone())),
            Request::Remove(n) => ("remove", Some(format!("node {n}"))),
            Request::Drain(n, true) => ("drain", Some(format!("node {n}"))),
            Request::Drain(n, false) => ("undrain", Some(format!("node {n}"))),
            Request::KeysAdd(r) => ("keys add", Some(format!("as {r}"))),
            Request::KeysRemove(fp) => ("keys remove", Some(fp.to_string())),
            Request::KeysList => ("keys list", None),
            Request::Audit { .. } => ("audit", None),
            Request::Snapshot => ("snapshot save", None),
            Request::Digest => ("digest", None),
        }
    }
}

/// A parsed exec line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine {
    /// What to do.
    pub request: Request,
    /// Answer in JSON.
    pub json: bool,
}

const USAGE: &str = "commands: status, nodes, tasks [--state S], submit (JSON task on stdin), submit-batch (JSON array of tasks on stdin), submit-stream (one JSON task per line on stdin, one answer line each), task ID, wait ID, result ID [--raw] [--name OUTPUT], cancel ID, token create [--ttl 1h] [--uses N], token list, token revoke ID, remove NODE, drain NODE, undrain NODE, keys add --role R (key on stdin), keys remove FP, keys list, audit [--since D] [--actor FP], snapshot; add --json for JSON output";

/// Lifetime of a join token when `--ttl` is not given.
const DEFAULT_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

impl CommandLine {
    /// Parse `COMMAND [ARGS] [--json]`.
    pub fn parse(line: &str) -> Result<CommandLine, String> {
        let mut words: Vec<&str> = line.split_whitespace().collect();
        let json = words.contains(&"--json");
        words.retain(|w| *w != "--json");
        let raw = words.contains(&"--raw");
        words.retain(|w| *w != "--raw");
        let flag = |words: &mut Vec<&str>, name: &str| -> Result<Option<String>, String> {
            match words.iter().position(|w| *w == name) {
                None => Ok(None),
                Some(i) if i + 1 < words.len() => {
                    let v = words[i + 1].to_string();
                    words.drain(i..=i + 1);
                    Ok(Some(v))
                }
                Some(_) => Err(format!("{name} needs a value")),
            }
        };
        let state = flag(&mut words, "--state")?;
        let name = flag(&mut words, "--name")?;
        let ttl = flag(&mut words, "--ttl")?;
        let role = flag(&mut words, "--role")?;
        let since = flag(&mut words, "--since")?;
        let actor = flag(&mut words, "--actor")?;
        let uses = flag(&mut words, "--uses")?;
        let id = |words: &[&str]| -> Result<TaskId, String> {
            match words {
                [_, id] => id.parse().map_err(|_| {
                    format!("'{id}' is not a task id (a number, as `mesh-cli tasks` shows)")
                }),
                _ => Err(format!("{} takes one task id", words[0])),
            }
        };
        let request = match words.first().copied() {
            None => return Err(format!("no command given; {USAGE}")),
            Some("status") => Request::Status,
            Some("nodes") => Request::Nodes,
            Some("tasks") => Request::Tasks(state),
            Some("keys") => match words.get(1).copied() {
                Some("add") => Request::KeysAdd(
                    role.as_deref()
                        .and_then(Role::parse)
                        .ok_or("keys add needs --role admin|operator|submitter|viewer (the public key goes on standard input)")?,
                ),
                Some("remove") => match words.get(2) {
                    Some(fp) => Request::KeysRemove(Fingerprint::parse(fp).map_err(|e| e.to_string())?),
                    None => return Err("keys remove takes a key fingerprint (`keys list` shows them)".into()),
                },
                Some("list") => Request::KeysList,
                _ => return Err("keys takes add, remove or list".into()),
            },
            Some("audit") => Request::Audit {
                since: since.map(|d| mesh_core::duration::parse_duration(&d)).transpose()?,
                actor: actor.map(|a| Fingerprint::parse(&a).map_err(|e| e.to_string())).transpose()?,
            },
            Some("snapshot") => Request::Snapshot,
            Some("digest") => Request::Digest,
            Some("submit") => Request::Submit,
            Some("submit-batch") => Request::SubmitBatch,
            Some("submit-stream") => Request::SubmitStream,
            Some("task") => Request::Task(id(&words)?),
            Some("wait") => Request::Wait(id(&words)?),
            Some("result") => Request::Result { id: id(&words)?, raw, name },
            Some("cancel") => Request::Cancel(id(&words)?),
            Some("token") => match words.get(1).copied() {
                Some("create") => Request::TokenCreate {
                    ttl: match ttl {
                        Some(t) => mesh_core::duration::parse_duration(&t)?,
                        None => DEFAULT_TOKEN_TTL,
                    },
                    uses: match uses {
                        Some(u) => u.parse().map_err(|_| format!("--uses takes a whole number, not '{u}'"))?,
                        None => 1,
                    },
                },
                Some("list") => Request::TokenList,
                Some("revoke") => match words.get(2) {
                    Some(id) => Request::TokenRevoke(id.to_string()),
                    None => return Err("token revoke takes the token id (`token list` shows ids)".into()),
                },
                _ => return Err("token takes create, list or revoke".into()),
            },
            Some(cmd @ ("remove" | "drain" | "undrain")) => match words.get(1).map(|n| n.parse::<u64>()) {
                Some(Ok(n)) if cmd == "remove" => Request::Remove(mesh_core::NodeId(n)),
                Some(Ok(n)) => Request::Drain(mesh_core::NodeId(n), cmd == "drain"),
                _ => return Err(format!("{cmd} takes a node id (`nodes` lists them)")),
            },
            Some(other) => return Err(format!("unknown command '{other}'; {USAGE}")),
        };
        Ok(CommandLine { request, json })
    }

    /// Whether the command reads a body from standard input.
    pub fn takes_body(&self) -> bool {
        matches!(
            self.request,
            Request::Submit | Request::SubmitBatch | Request::KeysAdd(_)
        )
    }
}

/// One line of a `submit-batch` or `submit-stream` answer in text.
fn batch_line(r: &BatchItemReply) -> String {
    match r {
        BatchItemReply::Submitted(r) if r.existing => {
            format!(
                "task {} (already submitted with this idempotency key)\n",
                r.task
            )
        }
        BatchItemReply::Submitted(r) => format!("task {} submitted\n", r.task),
        BatchItemReply::Refused { error } => format!("refused: {error}\n"),
    }
}

/// What goes back over the channel.
#[derive(Debug, Default)]
pub struct Reply {
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
    /// Exit status.
    pub status: u32,
}

impl Reply {
    fn json<T: Serialize>(v: &T) -> Reply {
        let mut stdout = serde_json::to_vec_pretty(v).expect("API views serialize");
        stdout.push(b'\n');
        Reply {
            stdout,
            ..Reply::default()
        }
    }

    fn text(s: String) -> Reply {
        Reply {
            stdout: s.into_bytes(),
            ..Reply::default()
        }
    }

    /// A failure: one line on stderr, and `{"error": ...}` on stdout in JSON mode.
    pub fn error(message: &str, status: u32, json: bool) -> Reply {
        let line = message.replace('\n', " ");
        Reply {
            stdout: if json {
                Reply::json(&ErrorView {
                    error: message.into(),
                })
                .stdout
            } else {
                Vec::new()
            },
            stderr: format!("error: {line}\n").into_bytes(),
            status,
        }
    }
}

/// Run a parsed command for the authenticated user `actor`.
pub async fn run(
    service: &Service,
    limits: &super::limits::Limits,
    cmd: &CommandLine,
    body: &[u8],
    actor: &Fingerprint,
) -> Reply {
    if let Err(why) = admit(service, limits, &cmd.request, actor).await {
        return Reply::error(&why, EXIT_ERROR, cmd.json);
    }
    match dispatch(service, cmd, body, actor).await {
        Ok(reply) => reply,
        Err(e) => Reply::error(&e.to_string(), EXIT_ERROR, cmd.json),
    }
}

/// One line of `submit-stream`: submit the task spec on it (rate limit and role
/// checked per line, as for `submit`), and answer with one line, a compact
/// `BatchItemReply` in JSON mode. The flag is whether the task went in.
pub async fn submit_line(
    service: &Service,
    limits: &super::limits::Limits,
    actor: &Fingerprint,
    line: &[u8],
    json: bool,
) -> (Vec<u8>, bool) {
    let item = match submit_one(service, limits, actor, line).await {
        Ok(r) => BatchItemReply::Submitted(r),
        Err(error) => BatchItemReply::Refused { error },
    };
    let out = if json {
        let mut out = serde_json::to_vec(&item).expect("API views serialize");
        out.push(b'\n');
        out
    } else {
        batch_line(&item).into_bytes()
    };
    (out, matches!(item, BatchItemReply::Submitted(_)))
}

async fn submit_one(
    service: &Service,
    limits: &super::limits::Limits,
    actor: &Fingerprint,
    line: &[u8],
) -> Result<mesh_core::api::SubmitReply, String> {
    admit(service, limits, &Request::SubmitStream, actor).await?;
    let spec: TaskSpec = serde_json::from_slice(line)
        .map_err(|e| format!("the line is not valid JSON for a task spec: {e}"))?;
    service
        .submit(spec, actor.clone())
        .await
        .map_err(|e| e.to_string())
}

/// Whether `actor` may make `request` now: the submit rate limit (a submit of any kind,
/// each `submit-stream` line), then the role check; a refused role is audited.
async fn admit(
    service: &Service,
    limits: &super::limits::Limits,
    request: &Request,
    actor: &Fingerprint,
) -> Result<(), String> {
    if request.action() == Action::Submit {
        limits.allow_submit(actor)?;
    }
    if let Err(why) = authorize(service, request, actor) {
        let (action, target) = request.describe();
        service.audit_refusal(actor, action, target, &why).await;
        return Err(why);
    }
    Ok(())
}

/// The role check, and for a submitter, ownership of the task it names.
fn authorize(service: &Service, request: &Request, actor: &Fingerprint) -> Result<(), String> {
    let Some(role) = service.role_of(actor) else {
        return Err(format!(
            "permission denied: key {actor} is no longer a user key of this mesh"
        ));
    };
    let action = request.action();
    if !permits(role, action) {
        return Err(format!(
            "permission denied: key {actor} has role {role}; this needs {} (an admin can run: mesh-cli keys add KEY.pub --role {})",
            action.needs(),
            action.needs()
        ));
    }
    if !sees_all_tasks(role) {
        let owned = |id: &TaskId| service.submitter_of(*id).is_none_or(|s| s == *actor);
        match request {
            Request::Task(id)
            | Request::Wait(id)
            | Request::Result { id, .. }
            | Request::Cancel(id)
                if !owned(id) =>
            {
                return Err(format!("permission denied: task {id} belongs to another key; a submitter sees only its own tasks"));
            }
            _ => {}
        }
    }
    Ok(())
}

async fn dispatch(
    service: &Service,
    cmd: &CommandLine,
    body: &[u8],
    actor: &Fingerprint,
) -> Result<Reply, ServiceError> {
    let json = cmd.json;
    Ok(match &cmd.request {
        Request::Status => {
            let s = service.status();
            if json {
                Reply::json(&s)
            } else {
                let tasks: Vec<String> = s.tasks.iter().map(|(k, v)| format!("{k}={v}")).collect();
                Reply::text(format!(
                    "node {} ({})\nrole {}, leader {}, term {}, applied index {}\nadapter {}\nnodes {}, tasks: {}\n",
                    s.node,
                    s.fingerprint,
                    s.role,
                    s.leader.map_or("none".into(), |l| l.to_string()),
                    s.term,
                    s.applied_index.map_or("none".into(), |i| i.to_string()),
                    s.adapter.as_deref().unwrap_or("none"),
                    s.nodes,
                    if tasks.is_empty() { "none".into() } else { tasks.join(" ") }
                ))
            }
        }
        Request::Nodes => {
            let nodes = service.nodes();
            if json {
                Reply::json(&nodes)
            } else {
                Reply::text(
                    nodes
                        .iter()
                        .map(|n| {
                            let a = n.capabilities.primary();
                            format!(
                                "{} {} {} {} {} adapter={} ({}, {}) slots={}\n",
                                n.id,
                                n.role,
                                n.health,
                                n.addr,
                                n.fingerprint,
                                a.map_or("none", |a| a.name.as_str()),
                                a.map_or("-".into(), |a| a.device_type.to_string()),
                                a.map_or("-", |a| a.backend.as_str()),
                                n.capabilities.slots
                            )
                        })
                        .collect(),
                )
            }
        }
        Request::Tasks(state) => {
            let mut tasks = service.tasks(state.as_deref());
            if service.role_of(actor).is_some_and(|r| !sees_all_tasks(r)) {
                tasks.retain(|t| t.submitter == actor.as_str());
            }
            if json {
                Reply::json(&tasks)
            } else {
                Reply::text(tasks.iter().map(task_line).collect())
            }
        }
        Request::Submit => {
            let spec: TaskSpec = serde_json::from_slice(body).map_err(|e| {
                ServiceError::BadRequest(format!(
                    "the task on standard input is not valid JSON for a task spec: {e}"
                ))
            })?;
            let r = service.submit(spec, actor.clone()).await?;
            if json {
                Reply::json(&r)
            } else if r.existing {
                Reply::text(format!(
                    "task {} (already submitted with this idempotency key)\n",
                    r.task
                ))
            } else {
                Reply::text(format!("task {} submitted\n", r.task))
            }
        }
        // Served line by line by the SSH server (`submit_line`), never as one body.
        Request::SubmitStream => Reply::error(
            "submit-stream is answered line by line, not as one request",
            EXIT_ERROR,
            json,
        ),
        Request::SubmitBatch => {
            let specs: Vec<TaskSpec> = serde_json::from_slice(body).map_err(|e| {
                ServiceError::BadRequest(format!(
                    "the batch on standard input is not a JSON array of task specs: {e}"
                ))
            })?;
            let replies = service.submit_batch(specs, actor.clone()).await?;
            if json {
                Reply::json(&replies)
            } else {
                Reply::text(replies.iter().map(batch_line).collect())
            }
        }
        Request::Task(id) => task_reply(&service.task(*id)?, json),
        Request::Wait(id) => {
            let view = service.wait(*id).await?;
            let mut reply = task_reply(&view, json);
            if view.state != "succeeded" {
                reply.status = EXIT_TASK_FAILED;
            }
            reply
        }
        Request::Result {
            id,
            raw: true,
            name,
        } => {
            let bytes = service.result_bytes(*id, name.as_deref())?;
            Reply {
                stdout: bytes.to_vec(),
                ..Reply::default()
            }
        }
        Request::Result { id, raw: false, .. } => {
            let view = service.task(*id)?;
            if view.state != "succeeded" {
                return Err(ServiceError::NoResult(format!(
                    "task {id} is {} and has no result",
                    view.state
                )));
            }
            task_reply(&view, json)
        }
        Request::Cancel(id) => task_reply(&service.cancel(*id, actor.clone()).await?, json),
        Request::TokenCreate { ttl, uses } => {
            let t = service.token_create(*ttl, *uses, actor.clone()).await?;
            if json {
                Reply::json(&t)
            } else {
                Reply::text(format!("{}\n", t.token))
            }
        }
        Request::TokenList => {
            let list = service.token_list();
            if json {
                Reply::json(&list)
            } else {
                Reply::text(
                    list.iter()
                        .map(|t| {
                            format!(
                                "{} uses_left={} expires_at_ms={}{}\n",
                                t.id,
                                t.uses_left,
                                t.expires_at_ms,
                                if t.revoked { " revoked" } else { "" }
                            )
                        })
                        .collect(),
                )
            }
        }
        Request::TokenRevoke(id) => {
            service.token_revoke(id, actor.clone()).await?;
            if json {
                Reply::json(&serde_json::json!({ "revoked": id }))
            } else {
                Reply::text(format!("token {id} revoked\n"))
            }
        }
        Request::KeysAdd(role) => {
            let text = String::from_utf8_lossy(body);
            let added = service.keys_add(&text, *role, actor.clone()).await?;
            if json {
                Reply::json(&serde_json::json!({ "added": added, "role": role.to_string() }))
            } else {
                Reply::text(
                    added
                        .iter()
                        .map(|fp| format!("key {fp} added as {role}\n"))
                        .collect(),
                )
            }
        }
        Request::KeysRemove(fp) => {
            service.keys_remove(fp.clone(), actor.clone()).await?;
            if json {
                Reply::json(&serde_json::json!({ "removed": fp }))
            } else {
                Reply::text(format!("key {fp} removed\n"))
            }
        }
        Request::KeysList => {
            let keys = service.keys_list();
            if json {
                Reply::json(&keys)
            } else {
                Reply::text(
                    keys.iter()
                        .map(|k| format!("{} {} {}\n", k.fingerprint, k.role, k.comment))
                        .collect(),
                )
            }
        }
        Request::Audit { since, actor: who } => {
            let entries = service.audit(*since, who.as_ref());
            if json {
                Reply::json(&entries)
            } else {
                Reply::text(
                    entries
                        .iter()
                        .map(|e| {
                            format!(
                                "{} {} {} {} {}\n",
                                e.at_ms,
                                e.actor,
                                e.action,
                                e.target.as_deref().unwrap_or("-"),
                                e.outcome
                            )
                        })
                        .collect(),
                )
            }
        }
        Request::Digest => Reply::json(&service.digest().await?),
        Request::Snapshot => Reply {
            stdout: service.snapshot().await?,
            ..Reply::default()
        },
        Request::Drain(node, draining) => {
            service.drain(*node, *draining, actor.clone()).await?;
            let word = if *draining { "drained" } else { "undrained" };
            if json {
                Reply::json(&serde_json::json!({ word: node }))
            } else {
                Reply::text(format!("node {node} {word}\n"))
            }
        }
        Request::Remove(node) => {
            service.remove(*node, actor.clone()).await?;
            if json {
                Reply::json(&serde_json::json!({ "removed": node }))
            } else {
                Reply::text(format!("node {node} removed\n"))
            }
        }
    })
}

fn task_line(t: &TaskView) -> String {
    format!(
        "{} {} {} attempt {}/{}{}\n",
        t.id,
        t.kernel,
        t.state,
        t.attempt,
        t.max_attempts,
        t.node.map_or(String::new(), |n| format!(" node {n}"))
    )
}

fn task_reply(t: &TaskView, json: bool) -> Reply {
    if json {
        return Reply::json(t);
    }
    let mut s = task_line(t);
    for o in &t.outputs {
        s += &format!(
            "  output {} {} bytes {}\n",
            o.name,
            o.bytes,
            o.sha256.as_deref().unwrap_or("-")
        );
    }
    for e in &t.errors {
        s += &format!(
            "  attempt {} on node {} failed: {}\n",
            e.attempt, e.node, e.error
        );
    }
    if let Some(w) = &t.waiting {
        s += &format!("  waiting: {w}\n");
    }
    Reply::text(s)
}

/// The reply to a line that does not parse.
pub fn usage_error(message: &str, json: bool) -> Reply {
    Reply::error(message, EXIT_USAGE, json)
}

/// Serve a node that is not a member yet: only `join TOKEN` does something.
pub async fn awaiting_join(
    line: &str,
    joins: &tokio::sync::mpsc::Sender<crate::ssh::server::JoinRequest>,
) -> Reply {
    let json = line.split_whitespace().any(|w| w == "--json");
    let words: Vec<&str> = line.split_whitespace().filter(|w| *w != "--json").collect();
    match words.as_slice() {
        ["join", token] => {
            let (reply, rx) = tokio::sync::oneshot::channel();
            if joins.send(crate::ssh::server::JoinRequest { token: token.to_string(), reply }).await.is_err() {
                return Reply::error("this node is already joining a mesh", EXIT_ERROR, json);
            }
            match rx.await {
                Ok(Ok(node)) if json => Reply::json(&serde_json::json!({ "node": node })),
                Ok(Ok(node)) => Reply::text(format!("joined as node {node}\n")),
                Ok(Err(e)) => Reply::error(&e, EXIT_ERROR, json),
                Err(_) => Reply::error("the join was abandoned", EXIT_ERROR, json),
            }
        }
        ["join", ..] => usage_error("join takes one token (from `mesh-cli token create` on a member)", json),
        _ => Reply::error(
            "this node is not a member of a mesh yet; run `mesh-cli join TOKEN` with a token from `mesh-cli token create` on a member",
            EXIT_ERROR,
            json,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands_and_flags() {
        assert_eq!(
            CommandLine::parse("status").unwrap(),
            CommandLine {
                request: Request::Status,
                json: false
            }
        );
        assert_eq!(
            CommandLine::parse("task 7 --json").unwrap(),
            CommandLine {
                request: Request::Task(TaskId(7)),
                json: true
            }
        );
        assert_eq!(
            CommandLine::parse("result 3 --raw --name out")
                .unwrap()
                .request,
            Request::Result {
                id: TaskId(3),
                raw: true,
                name: Some("out".into())
            }
        );
        assert_eq!(
            CommandLine::parse("tasks --state running").unwrap().request,
            Request::Tasks(Some("running".into()))
        );
        assert!(CommandLine::parse("submit").unwrap().takes_body());
        let stream = CommandLine::parse("submit-stream --json").unwrap();
        assert_eq!(stream.request, Request::SubmitStream);
        // Its standard input is read line by line while it runs, not as one body.
        assert!(!stream.takes_body());
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        assert!(CommandLine::parse("")
            .unwrap_err()
            .contains("no command given"));
        assert!(CommandLine::parse("launch")
            .unwrap_err()
            .contains("unknown command 'launch'"));
        assert!(CommandLine::parse("task x")
            .unwrap_err()
            .contains("'x' is not a task id"));
        assert!(CommandLine::parse("task")
            .unwrap_err()
            .contains("takes one task id"));
        assert!(CommandLine::parse("tasks --state")
            .unwrap_err()
            .contains("--state needs a value"));
    }
}
