//! `watch [ID]`: follow tasks live by asking the node for them every
//! [`POLL_INTERVAL`] on one connection, and print a line (or a JSON Lines object)
//! for every change. Also the pieces `submit --batch --wait` follows its tasks with:
//! [`Changes`], [`Progress`] and [`poll_tasks`].

use super::{call, now_ms, print_out, Context, Reply};
use crate::connection::Connection;
use crate::exit_code::ExitError;
use crate::render;
use mesh_core::api::TaskView;
use mesh_core::{NodeId, TaskId};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal as _;
use std::time::Duration;

/// How often `watch` (and `submit --batch --wait`) asks for the tasks: a line appears
/// within half a second of a change, and a node answering a listing twice a second is
/// not kept busy (each poll is one exec channel on the same connection).
pub(super) const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// How often a spinner on stderr moves.
const SPINNER_TICK: Duration = Duration::from_millis(120);

/// What `watch` last saw of a task: a change in any of these is worth a line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    state: String,
    node: Option<NodeId>,
    attempt: u32,
    shards_done: u32,
}

impl Seen {
    fn of(t: &TaskView) -> Seen {
        Seen {
            state: t.state.clone(),
            node: t.node,
            attempt: t.attempt,
            shards_done: t.shards_done,
        }
    }
}

/// The tasks seen so far, to tell what changed between two polls.
#[derive(Debug, Default)]
pub(super) struct Changes {
    seen: BTreeMap<TaskId, Seen>,
}

impl Changes {
    /// Record `views` and return those that are new or changed since the last call.
    pub(super) fn update<'a>(&mut self, views: &'a [TaskView]) -> Vec<&'a TaskView> {
        views
            .iter()
            .filter(|v| {
                let now = Seen::of(v);
                match self.seen.insert(v.id, now.clone()) {
                    Some(before) => before != now,
                    None => true,
                }
            })
            .collect()
    }
}

/// One line of `watch --json` (JSON Lines): a task as it is after a change.
#[derive(Debug, Serialize)]
pub(super) struct WatchEvent<'a> {
    /// When mesh-cli saw the change, ms since the epoch.
    at_ms: u64,
    task: TaskId,
    state: &'a str,
    node: Option<NodeId>,
    attempt: u32,
    max_attempts: u32,
    shards: u32,
    shards_done: u32,
    /// Why a pending task waits.
    waiting: Option<&'a str>,
    /// The latest attempt's error, unless the task succeeded.
    error: Option<&'a str>,
}

impl<'a> WatchEvent<'a> {
    pub(super) fn of(t: &'a TaskView, at_ms: u64) -> WatchEvent<'a> {
        WatchEvent {
            at_ms,
            task: t.id,
            state: &t.state,
            node: t.node,
            attempt: t.attempt,
            max_attempts: t.max_attempts,
            shards: t.shards,
            shards_done: t.shards_done,
            waiting: t.waiting.as_deref(),
            error: (t.state != "succeeded")
                .then(|| t.errors.last().map(|e| e.error.as_str()))
                .flatten(),
        }
    }
}

/// Lines on stdout, with a spinner or bar on stderr below them when stderr is a
/// terminal. Lines are printed with the bar suspended, so the two never garble.
pub(super) struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    /// A spinner with a message.
    pub(super) fn spinner() -> Progress {
        Progress::styled(
            indicatif::ProgressBar::new_spinner(),
            "{spinner} {msg} [{elapsed}]",
        )
    }

    /// A bar counting up to `len`, with a message.
    pub(super) fn bar(len: u64) -> Progress {
        Progress::styled(
            indicatif::ProgressBar::new(len),
            "{spinner} [{bar:30}] {pos}/{len} {msg} [{elapsed}]",
        )
    }

    fn styled(bar: indicatif::ProgressBar, template: &str) -> Progress {
        if cfg!(test) || !std::io::stderr().is_terminal() {
            return Progress { bar: None };
        }
        if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.enable_steady_tick(SPINNER_TICK);
        Progress { bar: Some(bar) }
    }

    /// Print text on stdout above the bar.
    pub(super) fn print(&self, text: &str) -> anyhow::Result<()> {
        match &self.bar {
            Some(bar) => bar.suspend(|| print_out(text)),
            None => print_out(text),
        }
    }

    pub(super) fn set_message(&self, message: String) {
        if let Some(bar) = &self.bar {
            bar.set_message(message);
        }
    }

    pub(super) fn set_position(&self, position: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(position);
        }
    }

    pub(super) fn set_length(&self, len: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(len);
        }
    }

    pub(super) fn inc(&self) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    /// Take the bar off the terminal.
    pub(super) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// One poll: the task `id`, or every task the key may see.
async fn poll(conn: &Connection, id: Option<TaskId>) -> anyhow::Result<Vec<TaskView>> {
    Ok(match id {
        Some(id) => {
            let r: Reply<TaskView> = call(conn, &format!("task {id} --json"), None).await?;
            vec![r.value]
        }
        None => {
            let r: Reply<Vec<TaskView>> = call(conn, "tasks --json", None).await?;
            r.value
        }
    })
}

/// The current views of `ids`: one `tasks` listing, and `task ID` for any the listing
/// lacks.
pub(super) async fn poll_tasks(
    conn: &Connection,
    ids: &BTreeSet<TaskId>,
) -> anyhow::Result<Vec<TaskView>> {
    let mut views: Vec<TaskView> = poll(conn, None)
        .await?
        .into_iter()
        .filter(|v| ids.contains(&v.id))
        .collect();
    let listed: BTreeSet<TaskId> = views.iter().map(|v| v.id).collect();
    for id in ids.difference(&listed) {
        views.extend(poll(conn, Some(*id)).await?);
    }
    Ok(views)
}

/// Print one change: `12:00:01 task 7 running on node 2 (attempt 1)`, or its JSON line.
fn emit(ctx: &Context, progress: &Progress, t: &TaskView, at_ms: u64) -> anyhow::Result<()> {
    let line = if ctx.json {
        serde_json::to_string(&WatchEvent::of(t, at_ms))?
    } else {
        format!("{} {}", render::clock(at_ms), render::watch_event(t))
    };
    progress.print(&format!("{line}\n"))
}

/// `watch ID` (until the task ends) or `watch` (every task, until Ctrl-C).
pub(super) async fn watch(
    ctx: &Context,
    conn: &Connection,
    id: Option<TaskId>,
) -> anyhow::Result<()> {
    let progress = Progress::spinner();
    let mut changes = Changes::default();
    let mut first = true;
    let mut ticks = tokio::time::interval(POLL_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Ctrl-C ends `watch` cleanly; `watch ID` keeps the usual interrupt (exit 130), so
    // that a script never takes an interrupted watch for a succeeded task.
    let interrupted = async {
        match id {
            None => tokio::signal::ctrl_c().await,
            Some(_) => std::future::pending().await,
        }
    };
    tokio::pin!(interrupted);
    loop {
        tokio::select! {
            _ = &mut interrupted => {
                progress.finish();
                return Ok(());
            }
            _ = ticks.tick() => {}
        }
        let views = poll(conn, id).await?;
        let at_ms = now_ms();
        for t in changes.update(&views) {
            // At the start of `watch`, finished tasks are history, not news.
            if first && id.is_none() && t.is_terminal() {
                continue;
            }
            emit(ctx, &progress, t, at_ms)?;
        }
        first = false;
        match id {
            Some(id) => {
                let t = views
                    .first()
                    .ok_or_else(|| anyhow::anyhow!("the node answered no view for task {id}"))?;
                progress.set_message(render::progress(t));
                if t.is_terminal() {
                    progress.finish();
                    return ended(t);
                }
            }
            None => progress.set_message(format!(
                "{} task(s): {}",
                views.len(),
                render::state_counts(views.iter().map(|v| v.state.as_str()))
            )),
        }
    }
}

/// The outcome of `watch ID` for a task that ended: exit 0 if it succeeded, 3 if not.
fn ended(t: &TaskView) -> anyhow::Result<()> {
    match t.state.as_str() {
        "succeeded" => Ok(()),
        "cancelled" => Err(ExitError::TaskFailed(format!("task {} was cancelled", t.id)).into()),
        state => {
            let why = t
                .errors
                .last()
                .map(|e| format!(": {}", e.error))
                .unwrap_or_default();
            Err(ExitError::TaskFailed(format!(
                "task {} {state} after {} attempt(s){why}",
                t.id, t.attempt
            ))
            .into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::api::AttemptErrorView;

    fn task(id: u64, state: &str, node: Option<u64>, attempt: u32) -> TaskView {
        TaskView {
            id: TaskId(id),
            kernel: "saxpy".into(),
            params: Default::default(),
            state: state.into(),
            node: node.map(NodeId),
            attempt,
            max_attempts: 3,
            priority: 0,
            idempotency_key: None,
            submitter: "SHA256:me".into(),
            submitted_at_ms: 0,
            started_at_ms: None,
            finished_at_ms: None,
            inputs: vec![],
            outputs: vec![],
            errors: vec![],
            waiting: None,
            shards: 1,
            shards_done: 0,
            results_recorded: 0,
        }
    }

    #[test]
    fn only_new_and_changed_tasks_are_news() {
        let mut changes = Changes::default();
        let poll1 = [
            task(1, "pending", None, 0),
            task(2, "succeeded", Some(1), 1),
        ];
        let ids = |v: Vec<&TaskView>| v.iter().map(|t| t.id.0).collect::<Vec<_>>();
        assert_eq!(ids(changes.update(&poll1)), [1, 2]);
        assert_eq!(
            ids(changes.update(&poll1)),
            Vec::<u64>::new(),
            "nothing changed"
        );

        let mut sharded = task(1, "running", Some(2), 1);
        sharded.shards = 4;
        let poll2 = [
            sharded.clone(),
            task(2, "succeeded", Some(1), 1),
            task(3, "pending", None, 0),
        ];
        assert_eq!(ids(changes.update(&poll2)), [1, 3]);
        sharded.shards_done = 1;
        let mut waiting = task(3, "pending", None, 0);
        waiting.waiting = Some("no free slot".into());
        assert_eq!(
            ids(changes.update(&[sharded.clone(), waiting])),
            [1],
            "a shard done is news, a new reason to wait is not"
        );
        // Moved to another node for attempt 2.
        let moved = task(1, "running", Some(3), 2);
        assert_eq!(ids(changes.update(&[moved])), [1]);
    }

    #[test]
    fn events_carry_the_error_only_while_it_matters() {
        let mut failed = task(7, "failed", Some(2), 3);
        failed.errors = vec![AttemptErrorView {
            attempt: 3,
            node: NodeId(2),
            error: "device lost".into(),
        }];
        let line = serde_json::to_value(WatchEvent::of(&failed, 5)).unwrap();
        assert_eq!(
            line,
            serde_json::json!({
                "at_ms": 5, "task": 7, "state": "failed", "node": 2, "attempt": 3,
                "max_attempts": 3, "shards": 1, "shards_done": 0, "waiting": null,
                "error": "device lost"
            })
        );
        let succeeded = TaskView {
            state: "succeeded".into(),
            ..failed.clone()
        };
        assert_eq!(WatchEvent::of(&succeeded, 5).error, None);
        assert_eq!(
            ended(&failed).unwrap_err().to_string(),
            "task 7 failed after 3 attempt(s): device lost"
        );
        assert_eq!(
            crate::exit_code::exit_status_of(&ended(&failed).unwrap_err()),
            3
        );
        assert!(ended(&succeeded).is_ok());
    }
}
