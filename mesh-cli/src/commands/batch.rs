//! `submit --batch FILE`: every `[[task]]` of a batch file (`batch_file.rs`), all
//! checked before the first is sent, then submitted in chunks with the node's
//! `submit-batch` over one connection (each chunk's tasks share few Raft entries),
//! with a progress bar on stderr; `--wait` follows them to the end.

use super::submitted::{Submitted, Tally};
use super::watch::{poll_tasks, Progress, POLL_INTERVAL};
use super::{parse_reply, print_json, remote_error, Context};
use crate::args::SubmitArgs;
use crate::batch_file::{Batch, BatchEntry};
use crate::connection::Connection;
use crate::exit_code::{one_line, ExitError};
use crate::{render, task_spec};
use anyhow::Context as _;
use mesh_core::api::{BatchItemReply, TaskView, EXIT_OK, MAX_BATCH_TASKS};
use mesh_core::TaskId;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// One element of `submit --batch --json`: what became of one `[[task]]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
struct BatchItem {
    /// The `[[task]]`'s position in the file, from 1.
    index: usize,
    /// Its submission.
    #[serde(flatten)]
    sent: Submitted,
    /// With `--wait`: the state it ended in.
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<String>,
}

/// Most JSON bytes in one `submit-batch` call: bounds what the client and the node
/// hold at once (a chunk ends early at this size or at `MAX_BATCH_TASKS` tasks).
const CHUNK_BYTES: usize = 8 * 1024 * 1024;

/// What became of one chunk.
enum Sent {
    /// The node answered for every task of the chunk, in order.
    Answered(Vec<BatchItemReply>),
    /// The connection failed or the node refused the whole chunk: nothing of it is
    /// known to be submitted, and nothing more is sent.
    Broken(String),
}

/// `submit --batch FILE [--wait]`.
pub(super) async fn submit(ctx: &Context, args: &SubmitArgs) -> anyhow::Result<()> {
    let path = args
        .batch
        .as_deref()
        .expect("batch::submit runs for --batch");
    let batch = Batch::load(path).context("the batch was not sent")?;
    // Build and check every task before sending the first: a mistake in the last one
    // must not leave the others submitted. The specs are built again when sent, so that
    // a batch of large inputs is never held in memory whole.
    for entry in &batch.entries {
        prepare(&batch, entry, args).context("the batch was not sent")?;
    }
    let conn = ctx.connect().await?;
    let result = run(ctx, &conn, &batch, args).await;
    conn.close().await;
    result
}

/// The JSON body of one task: built from its table, the policy flags applied, checked.
fn prepare(batch: &Batch, entry: &BatchEntry, args: &SubmitArgs) -> anyhow::Result<Vec<u8>> {
    let spec = task_spec::apply_policy(batch.spec(entry)?, args);
    task_spec::check_locally(&spec).with_context(|| {
        format!(
            "batch file {}: task {}",
            batch.path.display(),
            entry.label()
        )
    })?;
    serde_json::to_vec(&spec).context("cannot encode the task")
}

/// Send the already built task bodies of one chunk as one `submit-batch`.
async fn send(conn: &Connection, bodies: &[Vec<u8>]) -> Sent {
    let command = "submit-batch --json";
    let mut body = Vec::with_capacity(bodies.iter().map(|b| b.len() + 1).sum::<usize>() + 2);
    body.push(b'[');
    for (i, b) in bodies.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(b);
    }
    body.push(b']');
    match conn.exec(command, Some(body)).await {
        Err(e) => Sent::Broken(one_line(&format!("{e:#}"))),
        Ok(out) if out.exit_status == Some(EXIT_OK) => {
            match parse_reply::<Vec<BatchItemReply>>(out.stdout, command) {
                Ok(r) if r.value.len() == bodies.len() => Sent::Answered(r.value),
                Ok(r) => Sent::Broken(format!(
                    "the node answered for {} task(s) of a chunk of {}",
                    r.value.len(),
                    bodies.len()
                )),
                Err(e) => Sent::Broken(one_line(&format!("{e:#}"))),
            }
        }
        Ok(out) => Sent::Broken(one_line(&remote_error(&out, command).to_string())),
    }
}

/// The text line for one `[[task]]` after its submission.
fn submitted_line(entry: &BatchEntry, item: &BatchItem) -> String {
    format!("{}: {}\n", entry.label(), item.sent.describe())
}

/// The summary after the submissions: `20 task(s): 19 submitted (1 already existed), 1
/// not submitted`.
fn summary(items: &[BatchItem]) -> String {
    let mut tally = Tally::default();
    for item in items {
        tally.add(&item.sent);
    }
    tally.summary("task(s)")
}

async fn run(
    ctx: &Context,
    conn: &Connection,
    batch: &Batch,
    args: &SubmitArgs,
) -> anyhow::Result<()> {
    let total = batch.entries.len();
    let progress = Progress::bar(total as u64);
    progress.set_message("submitting".into());
    let mut items: Vec<BatchItem> = Vec::with_capacity(total);
    let mut broken: Option<String> = None;
    let mut unsent = 0usize;
    let mut chunk: Vec<(&BatchEntry, Vec<u8>)> = Vec::new();
    let mut chunk_bytes = 0usize;
    let mut entries = batch.entries.iter().peekable();
    while let Some(entry) = entries.next() {
        // Built again here (checked before the first chunk went), so that only one
        // chunk of inputs is in memory at a time.
        match prepare(batch, entry, args) {
            Ok(body) => {
                chunk_bytes += body.len();
                chunk.push((entry, body));
            }
            Err(e) => {
                let item = BatchItem {
                    index: entry.index,
                    sent: Submitted::refused(one_line(&format!("{e:#}"))),
                    state: None,
                };
                if !ctx.json {
                    progress.print(&submitted_line(entry, &item))?;
                }
                progress.inc();
                items.push(item);
            }
        }
        let full = chunk.len() >= MAX_BATCH_TASKS || chunk_bytes >= CHUNK_BYTES;
        if chunk.is_empty() || !(full || entries.peek().is_none()) {
            continue;
        }
        let sent = if let Some(why) = &broken {
            Sent::Broken(format!("not sent: an earlier submission failed: {why}"))
        } else {
            let bodies: Vec<Vec<u8>> = chunk.iter().map(|(_, b)| b.clone()).collect();
            send(conn, &bodies).await
        };
        let (replies, chunk_error): (Vec<Option<BatchItemReply>>, Option<String>) = match sent {
            Sent::Answered(r) => (r.into_iter().map(Some).collect(), None),
            Sent::Broken(why) => {
                if broken.is_some() {
                    unsent += chunk.len();
                }
                broken.get_or_insert(why.clone());
                (vec![None; chunk.len()], Some(why))
            }
        };
        for ((entry, _), reply) in chunk.drain(..).zip(replies) {
            let item = BatchItem {
                index: entry.index,
                sent: match reply {
                    Some(reply) => Submitted::answered(reply),
                    None => Submitted {
                        error: chunk_error.clone(),
                        ..Submitted::default()
                    },
                },
                state: None,
            };
            if !ctx.json {
                progress.print(&submitted_line(entry, &item))?;
            }
            progress.inc();
            items.push(item);
        }
        chunk_bytes = 0;
    }
    items.sort_by_key(|i| i.index);
    if !ctx.json {
        if unsent > 0 {
            progress.print(&format!(
                "{unsent} more task(s) were not sent: the connection to node {} failed\n",
                ctx.node
            ))?;
        }
        progress.print(&summary(&items))?;
    }

    let ids: BTreeSet<TaskId> = items.iter().filter_map(|i| i.sent.task).collect();
    if args.wait && broken.is_none() && !ids.is_empty() {
        let labels: BTreeMap<TaskId, String> = batch
            .entries
            .iter()
            .zip(&items)
            .filter_map(|(e, i)| i.sent.task.map(|id| (id, e.label())))
            .rev() // the first entry's label wins for a task submitted twice
            .collect();
        let ended = wait_all(ctx, conn, &ids, &progress, &labels).await?;
        for item in &mut items {
            item.state = item
                .sent
                .task
                .and_then(|id| ended.get(&id))
                .map(|v| v.state.clone());
        }
        if !ctx.json {
            progress.print(&format!(
                "{} task(s) ended: {}\n",
                ended.len(),
                render::state_counts(ended.values().map(|v| v.state.as_str()))
            ))?;
        }
    }
    progress.finish();
    if ctx.json {
        print_json(&items)?;
    }
    outcome(&items, batch)
}

/// The exit status of a batch: 1 if a task was not submitted, else 3 if a waited-for
/// task failed or was cancelled, else 0.
fn outcome(items: &[BatchItem], batch: &Batch) -> anyhow::Result<()> {
    let refused = items.iter().filter(|i| i.sent.error.is_some()).count();
    if refused > 0 {
        return Err(ExitError::BatchIncomplete(format!(
            "{refused} of the {} task(s) in {} were not submitted",
            items.len(),
            batch.path.display()
        ))
        .into());
    }
    let unsuccessful: BTreeSet<TaskId> = items
        .iter()
        .filter(|i| matches!(i.state.as_deref(), Some("failed" | "cancelled")))
        .filter_map(|i| i.sent.task)
        .collect();
    if !unsuccessful.is_empty() {
        let ids: Vec<String> = unsuccessful.iter().map(ToString::to_string).collect();
        return Err(ExitError::TaskFailed(format!(
            "{} task(s) of the batch failed or were cancelled: {}; see why with: mesh-cli task ID",
            ids.len(),
            ids.join(", ")
        ))
        .into());
    }
    Ok(())
}

/// Poll until every task in `ids` has ended; a line for each as it ends (text mode),
/// the bar counting them.
async fn wait_all(
    ctx: &Context,
    conn: &Connection,
    ids: &BTreeSet<TaskId>,
    progress: &Progress,
    labels: &BTreeMap<TaskId, String>,
) -> anyhow::Result<BTreeMap<TaskId, TaskView>> {
    progress.set_length(ids.len() as u64);
    progress.set_position(0);
    progress.set_message("waiting".into());
    let mut ended: BTreeMap<TaskId, TaskView> = BTreeMap::new();
    let mut states: BTreeMap<TaskId, String> = BTreeMap::new();
    let mut ticks = tokio::time::interval(POLL_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while ended.len() < ids.len() {
        ticks.tick().await;
        let open: BTreeSet<TaskId> = ids
            .iter()
            .filter(|id| !ended.contains_key(id))
            .copied()
            .collect();
        for view in poll_tasks(conn, &open).await? {
            states.insert(view.id, view.state.clone());
            if view.is_terminal() {
                if !ctx.json {
                    let label = labels.get(&view.id).map_or("", String::as_str);
                    progress.print(&format!("{label}: {}\n", render::watch_event(&view)))?;
                }
                ended.insert(view.id, view);
            }
        }
        progress.set_position(ended.len() as u64);
        progress.set_message(render::state_counts(states.values().map(String::as_str)));
    }
    Ok(ended)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn item(index: usize, task: Option<u64>, existing: bool, error: Option<&str>) -> BatchItem {
        BatchItem {
            index,
            sent: Submitted {
                task: task.map(TaskId),
                existing: task.map(|_| existing),
                error: error.map(Into::into),
            },
            state: None,
        }
    }

    #[test]
    fn lines_summary_and_json_items() {
        let batch = Batch::parse(
            "[[task]]\nkernel = \"saxpy\"\n[[task]]\nkernel = \"saxpy\"\n[[task]]\nkernel = \"saxpy\"\n",
            Path::new("jobs.toml"),
            Path::new(""),
        )
        .unwrap();
        let items = [
            item(1, Some(17), false, None),
            item(2, Some(9), true, None),
            item(
                3,
                None,
                false,
                Some("permission denied: key SHA256:x has role viewer"),
            ),
        ];
        let lines: Vec<String> = batch
            .entries
            .iter()
            .zip(&items)
            .map(|(e, i)| submitted_line(e, i))
            .collect();
        assert_eq!(
            lines,
            [
                "#1 (line 1): task 17 submitted\n",
                "#2 (line 3): task 9 already exists (same idempotency key)\n",
                "#3 (line 5): not submitted: permission denied: key SHA256:x has role viewer\n",
            ]
        );
        assert_eq!(
            summary(&items),
            "3 task(s): 2 submitted (1 already existed), 1 not submitted\n"
        );
        assert_eq!(
            serde_json::to_value(&items).unwrap(),
            serde_json::json!([
                {"index": 1, "task": 17, "existing": false},
                {"index": 2, "task": 9, "existing": true},
                {"index": 3, "error": "permission denied: key SHA256:x has role viewer"},
            ])
        );
        let e = outcome(&items, &batch).unwrap_err();
        assert_eq!(crate::exit_code::exit_status_of(&e), 1);
        assert_eq!(
            e.to_string(),
            "1 of the 3 task(s) in jobs.toml were not submitted"
        );

        let mut waited = [
            item(1, Some(17), false, None),
            item(2, Some(18), false, None),
        ];
        waited[0].state = Some("succeeded".into());
        waited[1].state = Some("cancelled".into());
        let e = outcome(&waited, &batch).unwrap_err();
        assert_eq!(crate::exit_code::exit_status_of(&e), 3);
        assert!(
            e.to_string()
                .starts_with("1 task(s) of the batch failed or were cancelled: 18;"),
            "{e}"
        );
        waited[1].state = Some("succeeded".into());
        outcome(&waited, &batch).unwrap();
    }
}
