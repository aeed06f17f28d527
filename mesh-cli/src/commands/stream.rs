//! `submit --stream FILE|-`: JSON Lines of task specs, each line checked and sent on
//! the node's `submit-stream` channel as soon as it is read, and reported as soon as
//! the node answers it (in input order). For a producer that makes tasks as it goes:
//! unlike `--batch`, nothing waits for the end of the input.

use super::submitted::{Submitted, Tally};
use super::watch::Progress;
use super::Context;
use crate::args::SubmitArgs;
use crate::connection::LineStream;
use crate::exit_code::{one_line, ExitError};
use crate::task_spec;
use anyhow::Context as _;
use mesh_core::api::BatchItemReply;
use mesh_core::TaskSpec;
use serde::Serialize;
use std::collections::VecDeque;
use std::path::Path;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

/// Lines sent whose answers are not yet read, at most. Below russh's per-channel buffer
/// of 100 messages: the client's session task waits when it cannot hand an incoming
/// message to the channel, and while it waits it also reads no window adjustment, so
/// if this loop were blocked sending a large line while more than 100 answers sat
/// unread, neither would ever move. And below the node's own limit of lines in flight
/// (256), so the node always reads the next line.
const WINDOW: usize = 64;

/// The command on the node: one compact `BatchItemReply` per line.
const COMMAND: &str = "submit-stream --json";

/// What became of one input line (`--json` prints one per line).
#[derive(Debug, Serialize)]
struct LineItem {
    /// The line's number in the input, from 1.
    line: usize,
    /// Its submission.
    #[serde(flatten)]
    sent: Submitted,
}

/// `submit --stream FILE|-`.
pub(super) async fn submit(ctx: &Context, args: &SubmitArgs) -> anyhow::Result<()> {
    let path = args
        .stream
        .as_deref()
        .expect("stream::submit runs for --stream");
    let stdin = path == Path::new("-");
    let source = if stdin {
        "standard input".to_string()
    } else {
        path.display().to_string()
    };
    let input: Box<dyn AsyncBufRead + Unpin + Send> = if stdin {
        Box::new(BufReader::new(tokio::io::stdin()))
    } else {
        let file = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("cannot read the task stream {}", path.display()))?;
        Box::new(BufReader::new(file))
    };
    let conn = ctx.connect().await?;
    let stream = conn.open_lines(COMMAND).await?;
    let result = run(ctx, stream, input, args, &source).await;
    conn.close().await;
    result
}

/// The JSON body of one line: parsed as a spec, the policy flags applied, checked the
/// way the node will check it.
fn prepare(line: &str, args: &SubmitArgs) -> anyhow::Result<Vec<u8>> {
    let spec: TaskSpec = serde_json::from_str(line).map_err(|e| {
        // serde_json says "at line 1 column C": the line is the input's, not the JSON's.
        let what = e.to_string();
        let what = what
            .rsplit_once(" at line ")
            .map_or(what.as_str(), |(w, _)| w);
        anyhow::anyhow!(
            "not a task spec in the node's JSON format (docs/ssh-protocol.md): {what} at column {}",
            e.column()
        )
    })?;
    let spec = task_spec::apply_policy(spec, args);
    task_spec::check_locally(&spec)?;
    serde_json::to_vec(&spec).context("cannot encode the task")
}

async fn run(
    ctx: &Context,
    mut stream: LineStream,
    input: Box<dyn AsyncBufRead + Unpin + Send>,
    args: &SubmitArgs,
    source: &str,
) -> anyhow::Result<()> {
    let progress = Progress::spinner();
    let mut lines = input.lines();
    let mut number = 0usize;
    let mut sent: VecDeque<usize> = VecDeque::new();
    let mut tally = Tally::default();
    let mut input_done = false;
    // Why the stream broke: the lines sent and unanswered may or may not be submitted.
    let mut broken: Option<String> = None;
    let report = |line: usize, sent: Submitted, tally: &mut Tally| -> anyhow::Result<()> {
        tally.add(&sent);
        progress.set_message(format!(
            "{} submitted, {} not submitted",
            tally.submitted, tally.refused
        ));
        if ctx.json {
            super::print_json_line(&LineItem { line, sent })
        } else {
            progress.print(&format!("line {line}: {}\n", sent.describe()))
        }
    };
    while broken.is_none() {
        let take_input = !input_done && sent.len() < WINDOW;
        tokio::select! {
            read = lines.next_line(), if take_input => {
                let text = read.with_context(|| format!("cannot read the task stream {source}"))?;
                let Some(text) = text else {
                    input_done = true;
                    continue;
                };
                number += 1;
                if text.trim().is_empty() {
                    continue;
                }
                match prepare(&text, args) {
                    Ok(body) => match stream.send(&body).await {
                        Ok(()) => sent.push_back(number),
                        Err(e) => {
                            let why = one_line(&format!("{e:#}"));
                            report(number, Submitted::refused(why.clone()), &mut tally)?;
                            broken = Some(why);
                        }
                    },
                    Err(e) => report(number, Submitted::refused(one_line(&format!("{e:#}"))), &mut tally)?,
                }
            }
            answer = stream.next_line(), if !sent.is_empty() => {
                let line = sent.pop_front().expect("an answer is awaited only for a sent line");
                match answer {
                    Ok(Some(raw)) => match serde_json::from_slice::<BatchItemReply>(&raw) {
                        Ok(reply) => report(line, Submitted::answered(reply), &mut tally)?,
                        Err(e) => {
                            sent.push_front(line);
                            broken = Some(format!(
                                "the node's answer is not the JSON mesh-cli expects ({e}); are mesh-cli and mesh-node the same version?"
                            ));
                        }
                    },
                    Ok(None) => {
                        sent.push_front(line);
                        broken = Some("the node ended the stream".into());
                    }
                    Err(e) => {
                        sent.push_front(line);
                        broken = Some(one_line(&format!("{e:#}")));
                    }
                }
            }
            else => break,
        }
    }
    if let Some(why) = &broken {
        for line in sent.drain(..) {
            report(
                line,
                Submitted::refused(format!("no answer ({why}): it may or may not have been submitted; submit it again with its idempotency key to find out")),
                &mut tally,
            )?;
        }
    } else {
        let out = stream.finish().await?;
        if out.exit_status != Some(mesh_core::api::EXIT_OK) && tally.refused == 0 {
            // Every line was answered as submitted, yet the node reports a failure.
            broken = Some(out.error_message().unwrap_or_else(|| {
                format!(
                    "the node ended '{COMMAND}' with exit status {:?}",
                    out.exit_status
                )
            }));
        }
    }
    progress.finish();
    if !ctx.json {
        progress.print(&tally.summary("line(s)"))?;
    }
    if let Some(why) = broken {
        anyhow::bail!("the task stream {source} broke off: {why}");
    }
    if tally.refused > 0 {
        return Err(ExitError::BatchIncomplete(format!(
            "{} of the {} line(s) in {source} were not submitted",
            tally.refused, tally.total
        ))
        .into());
    }
    Ok(())
}
