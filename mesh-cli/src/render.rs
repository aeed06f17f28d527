//! Human-readable text for the node's JSON answers (`mesh_core::api`). With `--json`
//! none of this is used: the node's document is printed as it came.

use mesh_core::api::{AuditView, KeyView, NodeView, StatusView, TaskView, TokenCreated, TokenView};
use mesh_core::duration::format_duration;
use std::fmt::Write as _;
use std::time::Duration;

/// Columns padded to their widest cell, separated by two spaces.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|h| h.to_string()).collect()],
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let pad = widths[c] - cell.chars().count();
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn or_dash(s: Option<String>) -> String {
    s.filter(|s| !s.is_empty()).unwrap_or_else(|| "-".into())
}

/// How long ago `then_ms` was, e.g. `12s ago`.
fn ago(now_ms: u64, then_ms: u64) -> String {
    format!(
        "{} ago",
        format_duration(Duration::from_millis(now_ms.saturating_sub(then_ms)))
    )
}

/// LAST CONTACT of `nodes`: `120ms ago`, or `-` when the node asked does not know.
fn last_contact(ms: Option<u64>) -> String {
    match ms {
        Some(ms) => format!("{} ago", format_duration(Duration::from_millis(ms))),
        None => "-".into(),
    }
}

/// Time left until `expires_at_ms`, in whole seconds from a second on: `59m59s`,
/// `250ms`, or `expired`.
fn expires_in(now_ms: u64, expires_at_ms: u64) -> String {
    match expires_at_ms.checked_sub(now_ms) {
        None | Some(0) => "expired".into(),
        Some(left) if left < 1000 => format_duration(Duration::from_millis(left)),
        Some(left) => format_duration(Duration::from_secs(left / 1000)),
    }
}

/// `status`.
pub fn status(s: &StatusView) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "node:     {} ({}), {}", s.node, s.fingerprint, s.role);
    let _ = writeln!(
        out,
        "leader:   {}",
        or_dash(s.leader.map(|l| format!("node {l}")))
    );
    let _ = writeln!(out, "term:     {}", s.term);
    let _ = writeln!(
        out,
        "log:      last index {}, applied {}",
        or_dash(s.last_log_index.map(|i| i.to_string())),
        or_dash(s.applied_index.map(|i| i.to_string()))
    );
    let voters: Vec<String> = s.voters.iter().map(ToString::to_string).collect();
    let _ = writeln!(out, "voters:   {}", or_dash(Some(voters.join(", "))));
    let _ = writeln!(out, "nodes:    {}", s.nodes);
    let tasks: Vec<String> = s
        .tasks
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(state, n)| format!("{n} {state}"))
        .collect();
    let _ = writeln!(
        out,
        "tasks:    {}",
        if tasks.is_empty() {
            "none".to_string()
        } else {
            tasks.join(", ")
        }
    );
    let _ = writeln!(out, "adapter:  {}", or_dash(s.adapter.clone()));
    let _ = writeln!(out, "version:  {}", s.version);
    out
}

/// `nodes`: one row per node.
pub fn nodes(nodes: &[NodeView]) -> String {
    if nodes.is_empty() {
        return "no nodes are registered\n".into();
    }
    let mut t = Table::new(&[
        "ID",
        "ROLE",
        "HEALTH",
        "LAST CONTACT",
        "ADDRESS",
        "FINGERPRINT",
        "ADAPTER",
        "SLOTS",
        "LABELS",
    ]);
    for n in nodes {
        let adapter = match n.capabilities.primary() {
            Some(a) => format!("{} ({}, {})", a.name, a.device_type, a.backend),
            None => "none".into(),
        };
        let labels: Vec<String> = n
            .capabilities
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        t.row(vec![
            n.id.to_string(),
            n.role.clone(),
            health(n),
            last_contact(n.last_contact_ms),
            n.addr.clone(),
            n.fingerprint.clone(),
            adapter,
            format!("{}/{}", n.running, n.capabilities.slots),
            or_dash(Some(labels.join(","))),
        ]);
    }
    t.render()
}

/// HEALTH of `nodes`: `up`, `down` or `removed`, with `,drained` for a node that takes
/// no new tasks (a removed node takes none anyway).
fn health(n: &NodeView) -> String {
    if n.drained && n.health != "removed" {
        format!("{},drained", n.health)
    } else {
        n.health.clone()
    }
}

/// Shard progress of a sharded task, e.g. `shards 3/8 done`; `None` for a task that
/// runs whole.
fn shard_progress(t: &TaskView) -> Option<String> {
    (t.shards > 1).then(|| format!("shards {}/{} done", t.shards_done, t.shards))
}

/// `token list`: one row per token; the secret is never known here.
pub fn tokens(tokens: &[TokenView], now_ms: u64) -> String {
    if tokens.is_empty() {
        return "no join tokens; create one with: mesh-cli token create\n".into();
    }
    let mut t = Table::new(&["ID", "USES LEFT", "EXPIRES IN", "REVOKED", "CREATED BY"]);
    for v in tokens {
        t.row(vec![
            v.id.clone(),
            v.uses_left.to_string(),
            expires_in(now_ms, v.expires_at_ms),
            if v.revoked { "yes" } else { "no" }.into(),
            v.created_by.clone(),
        ]);
    }
    t.render()
}

/// The stderr line after `token create` on a terminal. It names the token by its id:
/// the secret is already on stdout, perhaps captured into a variable on purpose.
pub fn token_hint(t: &TokenCreated, uses: u32, now_ms: u64) -> String {
    let joins = if uses == 1 {
        "1 join".to_string()
    } else {
        format!("{uses} joins")
    };
    format!(
        "token {} allows {joins} within {}; on the new machine run: mesh-node run --join TOKEN (or mesh-cli join TOKEN)",
        t.id,
        expires_in(now_ms, t.expires_at_ms)
    )
}

/// The one-line note on a task: its shard progress, then why it waits or its latest
/// error.
fn note(t: &TaskView) -> String {
    let why = match (&t.waiting, t.state.as_str(), t.errors.last()) {
        (Some(w), _, _) => Some(w.clone()),
        (None, "succeeded", _) => None,
        (None, _, Some(e)) => Some(format!("attempt {}: {}", e.attempt, e.error)),
        _ => None,
    };
    [shard_progress(t), why]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("; ")
}

/// `tasks`: one row per task.
pub fn tasks(tasks: &[TaskView], now_ms: u64) -> String {
    if tasks.is_empty() {
        return "no tasks\n".into();
    }
    let mut t = Table::new(&[
        "ID",
        "STATE",
        "KERNEL",
        "NODE",
        "ATTEMPT",
        "PRIO",
        "SUBMITTED",
        "NOTE",
    ]);
    for v in tasks {
        t.row(vec![
            v.id.to_string(),
            v.state.clone(),
            v.kernel.clone(),
            or_dash(v.node.map(|n| n.to_string())),
            format!("{}/{}", v.attempt, v.max_attempts),
            v.priority.to_string(),
            ago(now_ms, v.submitted_at_ms),
            note(v),
        ]);
    }
    t.render()
}

/// `task ID`: everything about one task.
pub fn task(t: &TaskView, now_ms: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "task {}: {}", t.id, t.state);
    let params: Vec<String> = t.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if params.is_empty() {
        let _ = writeln!(out, "  kernel:     {}", t.kernel);
    } else {
        let _ = writeln!(out, "  kernel:     {} ({})", t.kernel, params.join(", "));
    }
    let _ = writeln!(
        out,
        "  node:       {}, attempt {} of {}",
        or_dash(t.node.map(|n| n.to_string())),
        t.attempt,
        t.max_attempts
    );
    if t.shards > 1 {
        let _ = writeln!(out, "  shards:     {}/{} done", t.shards_done, t.shards);
    }
    let _ = writeln!(out, "  priority:   {}", t.priority);
    if let Some(k) = &t.idempotency_key {
        let _ = writeln!(out, "  key:        {k}");
    }
    let _ = writeln!(out, "  submitter:  {}", t.submitter);
    let _ = writeln!(out, "  submitted:  {}", ago(now_ms, t.submitted_at_ms));
    match (t.started_at_ms, t.finished_at_ms) {
        (Some(s), Some(f)) => {
            let _ = writeln!(
                out,
                "  ran:        {}",
                format_duration(Duration::from_millis(f.saturating_sub(s)))
            );
        }
        (Some(s), None) => {
            let _ = writeln!(out, "  started:    {}", ago(now_ms, s));
        }
        (None, Some(f)) => {
            let _ = writeln!(out, "  finished:   {}", ago(now_ms, f));
        }
        (None, None) => {}
    }
    for (label, buffers) in [("inputs", &t.inputs), ("outputs", &t.outputs)] {
        if buffers.is_empty() {
            continue;
        }
        let _ = writeln!(out, "  {label}:");
        let mut table = Table::new(&["", "NAME", "BYTES", "SHA-256"]);
        for b in buffers.iter() {
            table.row(vec![
                String::new(),
                b.name.clone(),
                b.bytes.to_string(),
                or_dash(b.sha256.clone()),
            ]);
        }
        for line in table.render().lines().skip(1) {
            let _ = writeln!(out, "  {line}");
        }
    }
    if !t.errors.is_empty() {
        let _ = writeln!(out, "  errors:");
        for e in &t.errors {
            let _ = writeln!(
                out,
                "    attempt {} on node {}: {}",
                e.attempt, e.node, e.error
            );
        }
    }
    if let Some(w) = &t.waiting {
        let _ = writeln!(out, "  waiting:    {w}");
    }
    out
}

/// `result ID` without a file: what can be fetched.
pub fn outputs(t: &TaskView) -> String {
    let mut table = Table::new(&["OUTPUT", "BYTES", "SHA-256"]);
    for b in &t.outputs {
        table.row(vec![
            b.name.clone(),
            b.bytes.to_string(),
            or_dash(b.sha256.clone()),
        ]);
    }
    let mut out = table.render();
    let _ = writeln!(
        out,
        "fetch one with: mesh-cli result {} --output FILE [--name OUTPUT]",
        t.id
    );
    out
}

/// Wall-clock time `ms` (since the epoch) in the local time zone, to the second:
/// `2025-06-01 12:00:01`.
pub fn local_time(ms: u64) -> String {
    local(ms).format("%Y-%m-%d %H:%M:%S").to_string()
}

/// Time of day of `ms` in the local time zone: `12:00:01`.
pub fn clock(ms: u64) -> String {
    local(ms).format("%H:%M:%S").to_string()
}

fn local(ms: u64) -> chrono::DateTime<chrono::Local> {
    let utc = chrono::DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX))
        .unwrap_or_default();
    utc.with_timezone(&chrono::Local)
}

/// Base64 characters of a fingerprint kept by [`short_fingerprint`]: 72 bits, enough to
/// tell a mesh's keys apart at a glance.
const SHORT_FINGERPRINT_CHARS: usize = 12;

/// A fingerprint shortened for a table column: `SHA256:uNiVztksCsDh`. Anything that is
/// not a long `SHA256:` fingerprint is kept as it is.
pub fn short_fingerprint(fp: &str) -> String {
    match fp.strip_prefix("SHA256:") {
        Some(b64) if b64.len() > SHORT_FINGERPRINT_CHARS => {
            format!("SHA256:{}", &b64[..SHORT_FINGERPRINT_CHARS])
        }
        _ => fp.to_string(),
    }
}

/// `keys list`: one row per key with a role.
pub fn keys(keys: &[KeyView], now_ms: u64) -> String {
    if keys.is_empty() {
        return "no keys have a role; add one with: mesh-cli keys add FILE.pub --role ROLE\n"
            .into();
    }
    let mut t = Table::new(&["FINGERPRINT", "ROLE", "COMMENT", "ADDED BY", "ADDED"]);
    for k in keys {
        t.row(vec![
            k.fingerprint.clone(),
            k.role.clone(),
            or_dash(Some(k.comment.clone())),
            or_dash(Some(k.added_by.clone())),
            ago(now_ms, k.added_at_ms),
        ]);
    }
    t.render()
}

/// `keys add`: one line per key added.
pub fn keys_added(added: &[String], role: &str) -> String {
    added
        .iter()
        .map(|fp| format!("key {fp} added as {role}\n"))
        .collect()
}

/// `audit`: one row per entry, oldest first, times local, actors shortened.
pub fn audit(entries: &[AuditView]) -> String {
    if entries.is_empty() {
        return "no audit entries match\n".into();
    }
    let mut t = Table::new(&["TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME"]);
    for e in entries {
        t.row(vec![
            local_time(e.at_ms),
            short_fingerprint(&e.actor),
            e.action.clone(),
            or_dash(e.target.clone()),
            e.outcome.clone(),
        ]);
    }
    t.render()
}

/// What `watch` says about a task that changed: `task 7 running on node 2 (attempt
/// 1)`, `task 7 succeeded`, `task 7 failed after 3 attempt(s): device lost`.
pub fn watch_event(t: &TaskView) -> String {
    let shards = shard_progress(t);
    let with_shards = |inner: String| match &shards {
        Some(s) => format!("{inner}, {s}"),
        None => inner,
    };
    match (t.state.as_str(), t.node) {
        ("assigned", Some(n)) => format!(
            "task {} assigned to node {n} ({})",
            t.id,
            with_shards(format!("attempt {}", t.attempt))
        ),
        ("running", Some(n)) => format!(
            "task {} running on node {n} ({})",
            t.id,
            with_shards(format!("attempt {}", t.attempt))
        ),
        ("succeeded", _) => format!("task {} succeeded", t.id),
        ("cancelled", _) => format!("task {} cancelled", t.id),
        ("failed", _) => match t.errors.last() {
            Some(e) => format!(
                "task {} failed after {} attempt(s): {}",
                t.id, t.attempt, e.error
            ),
            None => format!("task {} failed after {} attempt(s)", t.id, t.attempt),
        },
        (state, _) => {
            let why = match (&t.waiting, t.errors.last()) {
                (Some(w), _) => Some(w.clone()),
                (None, Some(e)) if t.attempt > 0 => {
                    Some(format!("attempt {} failed: {}", e.attempt, e.error))
                }
                _ => None,
            };
            match [why, shards].into_iter().flatten().collect::<Vec<_>>() {
                notes if notes.is_empty() => format!("task {} {state}", t.id),
                notes => format!("task {} {state} ({})", t.id, notes.join(", ")),
            }
        }
    }
}

/// The states in the order a task passes through them, for counts.
const STATES: [&str; 6] = [
    "pending",
    "assigned",
    "running",
    "succeeded",
    "failed",
    "cancelled",
];

/// How many tasks are in each state, leaving out empty states: `3 pending, 1 running,
/// 12 succeeded` (`no tasks` for none).
pub fn state_counts<'a>(states: impl IntoIterator<Item = &'a str>) -> String {
    let mut counts = [0usize; STATES.len()];
    let mut other = 0usize;
    for state in states {
        match STATES.iter().position(|s| *s == state) {
            Some(i) => counts[i] += 1,
            None => other += 1,
        }
    }
    let mut parts: Vec<String> = STATES
        .iter()
        .zip(counts)
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    if other > 0 {
        parts.push(format!("{other} other"));
    }
    if parts.is_empty() {
        "no tasks".into()
    } else {
        parts.join(", ")
    }
}

/// A spinner line while waiting: `task 5: running on node 2 (attempt 1/3)`, with
/// `, shards 3/8 done` for a sharded task.
pub fn progress(t: &TaskView) -> String {
    let shards = shard_progress(t).map_or(String::new(), |s| format!(", {s}"));
    match (t.state.as_str(), t.node) {
        ("assigned" | "running", Some(n)) => {
            format!(
                "task {}: {} on node {n} (attempt {}/{}{shards})",
                t.id, t.state, t.attempt, t.max_attempts
            )
        }
        _ => match &t.waiting {
            Some(w) => format!("task {}: {} ({w}{shards})", t.id, t.state),
            None if shards.is_empty() => format!("task {}: {}", t.id, t.state),
            None => format!("task {}: {} ({})", t.id, t.state, &shards[2..]),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::api::{AttemptErrorView, BufferView};
    use mesh_core::capability::NodeCapabilities;
    use mesh_core::{NodeId, TaskId};
    use std::collections::BTreeMap;

    fn view() -> TaskView {
        TaskView {
            id: TaskId(5),
            kernel: "saxpy".into(),
            params: BTreeMap::from([("a".into(), "2".into())]),
            state: "failed".into(),
            node: Some(NodeId(2)),
            attempt: 3,
            max_attempts: 3,
            priority: 0,
            idempotency_key: None,
            submitter: "SHA256:x".into(),
            submitted_at_ms: 1_000,
            started_at_ms: Some(2_000),
            finished_at_ms: Some(3_500),
            inputs: vec![BufferView {
                name: "x".into(),
                bytes: 8,
                sha256: Some("ab".into()),
            }],
            outputs: vec![BufferView {
                name: "out".into(),
                bytes: 8,
                sha256: None,
            }],
            errors: vec![AttemptErrorView {
                attempt: 3,
                node: NodeId(2),
                error: "device lost".into(),
            }],
            waiting: None,
            shards: 1,
            shards_done: 0,
            results_recorded: 0,
        }
    }

    #[test]
    fn task_views_read_well() {
        let text = task(&view(), 61_000);
        assert!(
            text.starts_with("task 5: failed\n  kernel:     saxpy (a=2)\n"),
            "{text}"
        );
        assert!(text.contains("  submitted:  1m ago\n"), "{text}");
        assert!(text.contains("  ran:        1.5s\n"), "{text}");
        assert!(text.contains("attempt 3 on node 2: device lost"), "{text}");
        let list = tasks(&[view()], 61_000);
        let mut lines = list.lines();
        assert!(
            lines
                .next()
                .unwrap()
                .starts_with("ID  STATE   KERNEL  NODE"),
            "{list}"
        );
        assert!(
            lines.next().unwrap().ends_with("attempt 3: device lost"),
            "{list}"
        );
    }

    fn node_view(id: u64, role: &str, health: &str, last_contact_ms: Option<u64>) -> NodeView {
        NodeView {
            id: NodeId(id),
            fingerprint: format!("SHA256:fp{id}"),
            addr: format!("10.0.0.{id}:7700"),
            role: role.into(),
            health: health.into(),
            last_contact_ms,
            drained: false,
            running: 1,
            capabilities: NodeCapabilities {
                adapters: vec![],
                labels: BTreeMap::from([("zone".into(), "a".into())]),
                slots: 2,
            },
        }
    }

    #[test]
    fn last_contact_reads_as_time_ago() {
        assert_eq!(last_contact(None), "-");
        assert_eq!(last_contact(Some(0)), "0ms ago");
        assert_eq!(last_contact(Some(120)), "120ms ago");
        assert_eq!(last_contact(Some(1_500)), "1.5s ago");
        assert_eq!(last_contact(Some(90_000)), "1m30s ago");
        assert_eq!(last_contact(Some(3_725_000)), "1h2m5s ago");
    }

    #[test]
    fn node_rows_show_role_health_and_last_contact() {
        let text = nodes(&[
            node_view(1, "leader", "up", Some(0)),
            node_view(2, "follower", "down", Some(120)),
            node_view(3, "learner", "removed", None),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "ID  ROLE      HEALTH   LAST CONTACT  ADDRESS        FINGERPRINT  ADAPTER  SLOTS  LABELS"
        );
        assert_eq!(
            lines[2],
            "2   follower  down     120ms ago     10.0.0.2:7700  SHA256:fp2   none     1/2    zone=a"
        );
        assert_eq!(
            lines[3],
            "3   learner   removed  -             10.0.0.3:7700  SHA256:fp3   none     1/2    zone=a"
        );
        assert_eq!(nodes(&[]), "no nodes are registered\n");
    }

    #[test]
    fn drained_nodes_say_so_in_health() {
        let drained = |id, health| NodeView {
            drained: true,
            ..node_view(id, "follower", health, None)
        };
        let text = nodes(&[
            node_view(1, "leader", "up", Some(0)),
            drained(2, "up"),
            drained(3, "down"),
            drained(4, "removed"),
        ]);
        let health: Vec<&str> = text
            .lines()
            .map(|l| l.split_whitespace().nth(2).unwrap())
            .collect();
        assert_eq!(
            health,
            ["HEALTH", "up", "up,drained", "down,drained", "removed"]
        );
    }

    #[test]
    fn sharded_tasks_show_their_progress() {
        let running = TaskView {
            state: "running".into(),
            attempt: 2,
            shards: 8,
            shards_done: 3,
            errors: vec![AttemptErrorView {
                attempt: 1,
                node: NodeId(4),
                error: "node 4 went down".into(),
            }],
            ..view()
        };
        let text = task(&running, 61_000);
        assert!(
            text.contains(
                "  node:       2, attempt 2 of 3\n  shards:     3/8 done\n  priority:   0\n"
            ),
            "{text}"
        );
        assert_eq!(
            note(&running),
            "shards 3/8 done; attempt 1: node 4 went down"
        );
        assert_eq!(
            progress(&running),
            "task 5: running on node 2 (attempt 2/3, shards 3/8 done)"
        );
        let list = tasks(std::slice::from_ref(&running), 61_000);
        assert!(
            list.lines()
                .nth(1)
                .unwrap()
                .ends_with("shards 3/8 done; attempt 1: node 4 went down"),
            "{list}"
        );

        let waiting = TaskView {
            state: "pending".into(),
            node: None,
            errors: vec![],
            waiting: Some("every live node that matches (node 2) is drained".into()),
            ..running.clone()
        };
        assert_eq!(
            note(&waiting),
            "shards 3/8 done; every live node that matches (node 2) is drained"
        );
        assert!(
            task(&waiting, 61_000)
                .ends_with("  waiting:    every live node that matches (node 2) is drained\n"),
            "a pending task says why it waits"
        );
        assert_eq!(
            progress(&waiting),
            "task 5: pending (every live node that matches (node 2) is drained, shards 3/8 done)"
        );

        let done = TaskView {
            state: "succeeded".into(),
            shards_done: 8,
            ..running.clone()
        };
        assert_eq!(note(&done), "shards 8/8 done");
        assert_eq!(
            progress(&TaskView {
                state: "pending".into(),
                node: None,
                ..done
            }),
            "task 5: pending (shards 8/8 done)"
        );

        // A task that runs whole shows no shard line.
        assert!(!task(&view(), 0).contains("shards"));
        assert_eq!(note(&view()), "attempt 3: device lost");
    }

    #[test]
    fn key_rows_and_added_lines() {
        let key = |fp: &str, role: &str, comment: &str, added_by: &str| KeyView {
            fingerprint: fp.into(),
            role: role.into(),
            comment: comment.into(),
            key: "ssh-ed25519 AAAA".into(),
            added_by: added_by.into(),
            added_at_ms: 1_000,
        };
        let text = keys(
            &[
                key("SHA256:admin", "admin", "alice@laptop", ""),
                key("SHA256:bob", "submitter", "", "SHA256:admin"),
            ],
            91_000,
        );
        assert_eq!(
            text,
            "\
FINGERPRINT   ROLE       COMMENT       ADDED BY      ADDED
SHA256:admin  admin      alice@laptop  -             1m30s ago
SHA256:bob    submitter  -             SHA256:admin  1m30s ago
"
        );
        assert!(keys(&[], 0).starts_with("no keys have a role"));
        assert_eq!(
            keys_added(&["SHA256:a".into(), "SHA256:b".into()], "viewer"),
            "key SHA256:a added as viewer\nkey SHA256:b added as viewer\n"
        );
    }

    #[test]
    fn audit_rows_show_local_time_and_short_actors() {
        let actor = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s";
        assert_eq!(short_fingerprint(actor), "SHA256:uNiVztksCsDh");
        assert_eq!(short_fingerprint("SHA256:abc"), "SHA256:abc");
        assert_eq!(short_fingerprint("node 1"), "node 1");
        let at_ms = 1_700_000_000_000;
        let text = audit(&[
            AuditView {
                seq: 1,
                at_ms,
                actor: actor.into(),
                action: "keys add".into(),
                target: Some("as viewer".into()),
                outcome: "ok".into(),
            },
            AuditView {
                seq: 2,
                at_ms: at_ms + 1_000,
                actor: actor.into(),
                action: "snapshot save".into(),
                target: None,
                outcome: "refused: permission denied".into(),
            },
        ]);
        let lines: Vec<&str> = text.lines().collect();
        let time = local_time(at_ms);
        assert_eq!(time.len(), "2023-11-14 22:13:20".len(), "{time}");
        assert_eq!(
            lines[0],
            format!(
                "{:<21}ACTOR                ACTION         TARGET     OUTCOME",
                "TIME"
            )
        );
        assert_eq!(
            lines[1],
            format!("{time}  SHA256:uNiVztksCsDh  keys add       as viewer  ok")
        );
        assert!(
            lines[2].ends_with(
                "SHA256:uNiVztksCsDh  snapshot save  -          refused: permission denied"
            ),
            "{text}"
        );
        assert_eq!(audit(&[]), "no audit entries match\n");
        assert_eq!(clock(at_ms), time[11..]);
    }

    #[test]
    fn watch_events_say_what_changed() {
        let at = |state: &str, node: Option<u64>, attempt: u32| TaskView {
            state: state.into(),
            node: node.map(NodeId),
            attempt,
            errors: vec![],
            ..view()
        };
        assert_eq!(watch_event(&at("pending", None, 0)), "task 5 pending");
        assert_eq!(
            watch_event(&TaskView {
                waiting: Some("no live node has a free slot".into()),
                ..at("pending", None, 0)
            }),
            "task 5 pending (no live node has a free slot)"
        );
        assert_eq!(
            watch_event(&at("assigned", Some(2), 1)),
            "task 5 assigned to node 2 (attempt 1)"
        );
        assert_eq!(
            watch_event(&at("running", Some(2), 1)),
            "task 5 running on node 2 (attempt 1)"
        );
        assert_eq!(
            watch_event(&TaskView {
                shards: 8,
                shards_done: 3,
                ..at("running", Some(2), 2)
            }),
            "task 5 running on node 2 (attempt 2, shards 3/8 done)"
        );
        assert_eq!(
            watch_event(&at("succeeded", Some(2), 1)),
            "task 5 succeeded"
        );
        assert_eq!(watch_event(&at("cancelled", None, 0)), "task 5 cancelled");
        assert_eq!(
            watch_event(&view()),
            "task 5 failed after 3 attempt(s): device lost"
        );
        assert_eq!(
            watch_event(&TaskView {
                state: "pending".into(),
                attempt: 1,
                ..view()
            }),
            "task 5 pending (attempt 3 failed: device lost)"
        );
    }

    #[test]
    fn state_counts_follow_the_life_of_a_task() {
        assert_eq!(
            state_counts(["succeeded", "pending", "running", "succeeded", "odd"]),
            "1 pending, 1 running, 2 succeeded, 1 other"
        );
        assert_eq!(state_counts([]), "no tasks");
    }

    #[test]
    fn token_rows_show_time_left_and_never_a_secret() {
        let now = 10_000_000;
        let token = |id: &str, expires_at_ms: u64, uses_left: u32, revoked: bool| TokenView {
            id: id.into(),
            created_at_ms: 0,
            expires_at_ms,
            uses_left,
            revoked,
            created_by: "SHA256:admin".into(),
        };
        let text = tokens(
            &[
                token("00000000000000aa", now + 3_599_999, 1, false),
                token("00000000000000bb", now + 400, 2, true),
                token("00000000000000cc", now - 1, 0, false),
            ],
            now,
        );
        assert_eq!(
            text,
            "\
ID                USES LEFT  EXPIRES IN  REVOKED  CREATED BY
00000000000000aa  1          59m59s      no       SHA256:admin
00000000000000bb  2          400ms       yes      SHA256:admin
00000000000000cc  0          expired     no       SHA256:admin
"
        );
        assert!(tokens(&[], now).starts_with("no join tokens"));
        let created = TokenCreated {
            token: "mesh1-secret".into(),
            id: "00000000000000aa".into(),
            expires_at_ms: now + 3_600_000,
        };
        let hint = token_hint(&created, 3, now);
        assert_eq!(
            hint,
            "token 00000000000000aa allows 3 joins within 1h; on the new machine run: \
             mesh-node run --join TOKEN (or mesh-cli join TOKEN)"
        );
        assert!(!hint.contains("secret"));
    }
}
