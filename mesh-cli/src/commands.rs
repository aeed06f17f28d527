//! What each command does: the protocol calls it makes (docs/ssh-protocol.md) and what
//! it prints. With `--json` exactly one JSON document goes to stdout: the node's
//! answer as it came, or for `pin`, `result --output/--png`, filtered `tasks`,
//! `snapshot save` and `submit --batch` one of ours; `watch` and `submit --stream`
//! print JSON Lines.
//! The cluster commands (join tokens, `join`, `remove`, `drain`, `undrain`) live in
//! `commands/cluster.rs`, the admin commands (keys, audit, snapshots) in
//! `commands/admin.rs`, `watch` in `commands/watch.rs`, batches in
//! `commands/batch.rs` and streams in `commands/stream.rs`.

mod admin;
mod batch;
mod cluster;
mod stream;
mod submitted;
mod watch;

use crate::args::{Cli, Command, ResultArgs, SubmitArgs, TasksArgs};
use crate::config::Settings;
use crate::connection::{fetch_host_key, Connection, ExecOutput};
use crate::exit_code::ExitError;
use crate::host_keys::{self, HostKeyPolicy, PinOutcome};
use crate::identity::IdentityChoice;
use crate::node_addr::NodeAddr;
use crate::{png_out, render, task_file, task_spec};
use anyhow::Context as _;
use mesh_core::api::{
    NodeView, StatusView, SubmitReply, TaskView, EXIT_OK, EXIT_TASK_FAILED, EXIT_USAGE,
};
use mesh_core::{Digest, Fingerprint, TaskId};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often the spinner of `submit --wait` asks for the task's state.
const WAIT_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Settings every command shares, checked once.
pub struct Context {
    node: NodeAddr,
    known_hosts: PathBuf,
    identity: IdentityChoice,
    json: bool,
}

/// A node's answer: the document as it came and its parsed form.
struct Reply<T> {
    raw: Vec<u8>,
    value: T,
}

/// `pin --json`.
#[derive(Serialize)]
struct PinnedView {
    pinned: String,
    fingerprint: String,
    known_hosts: String,
}

/// `result --output/--png --json`.
#[derive(Serialize)]
struct SavedView {
    task: TaskId,
    output: String,
    bytes: u64,
    sha256: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    png: Option<String>,
}

impl Context {
    /// Check the global options, merged with the config file.
    pub fn from_cli(cli: &Cli) -> anyhow::Result<Context> {
        let settings = Settings::of_cli(cli)?;
        Ok(Context {
            node: settings.node,
            known_hosts: settings.known_hosts,
            identity: settings.identity,
            json: cli.json,
        })
    }

    async fn connect(&self) -> anyhow::Result<Connection> {
        let policy = HostKeyPolicy::load(&self.node, &self.known_hosts)?;
        Connection::open(&self.node, policy, &self.identity).await
    }
}

/// Print the completion script for `shell`. It needs neither settings nor a node.
pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(
        shell,
        &mut <Cli as clap::CommandFactory>::command(),
        "mesh-cli",
        &mut script,
    );
    print_out(&String::from_utf8_lossy(&script))
}

/// Run the command.
pub async fn run(cli: Cli, ctx: &Context) -> anyhow::Result<()> {
    match cli.command {
        Command::Completions { shell } => completions(shell),
        Command::Pin { node, fingerprint } => pin(ctx, &node, &fingerprint).await,
        Command::Submit(args) if args.batch.is_some() => batch::submit(ctx, &args).await,
        Command::Submit(args) if args.stream.is_some() => stream::submit(ctx, &args).await,
        Command::Keys {
            command: crate::args::KeysCommand::Add { file, role },
        } => {
            // Check the key file before connecting: a wrong file shows without a node.
            let text = admin::read_public_keys(&file)?;
            let conn = ctx.connect().await?;
            let result = admin::keys_add(ctx, &conn, &text, role).await;
            conn.close().await;
            result
        }
        Command::Submit(args) => {
            // Build and check the task before connecting: mistakes show without a node.
            let body = prepare_submit(&args)?;
            let conn = ctx.connect().await?;
            let result = submit(ctx, &conn, &args, body).await;
            conn.close().await;
            result
        }
        Command::Join { token } => {
            // Check the token before connecting: a typo shows without a node.
            let token = cluster::parse_token(&token)?;
            let conn = ctx.connect().await?;
            let result = cluster::join(ctx, &conn, &token).await;
            conn.close().await;
            result
        }
        command => {
            let conn = ctx.connect().await?;
            let result = run_connected(ctx, &conn, command).await;
            conn.close().await;
            result
        }
    }
}

async fn run_connected(ctx: &Context, conn: &Connection, command: Command) -> anyhow::Result<()> {
    let now = now_ms();
    match command {
        Command::Status => {
            let r: Reply<StatusView> = call(conn, "status --json", None).await?;
            show(ctx, &r, || render::status(&r.value))
        }
        Command::Nodes => {
            let r: Reply<Vec<NodeView>> = call(conn, "nodes --json", None).await?;
            show(ctx, &r, || render::nodes(&r.value))
        }
        Command::Tasks(args) => {
            let line = match &args.state {
                Some(s) => format!("tasks --state {s} --json"),
                None => "tasks --json".to_string(),
            };
            let r: Reply<Vec<TaskView>> = call(conn, &line, None).await?;
            if !args.filters_locally() {
                return show(ctx, &r, || render::tasks(&r.value, now));
            }
            let kept = filter_tasks(r.value, &args, conn.user_fingerprint());
            if ctx.json {
                print_json(&kept)
            } else {
                print_out(&render::tasks(&kept, now))
            }
        }
        Command::Watch { id } => watch::watch(ctx, conn, id).await,
        Command::Keys { command } => admin::keys(ctx, conn, command, now).await,
        Command::Audit { since, actor } => admin::audit(ctx, conn, since, actor.as_ref()).await,
        Command::Snapshot {
            command: crate::args::SnapshotCommand::Save { file },
        } => admin::snapshot_save(ctx, conn, &file).await,
        Command::Task { id } => {
            let r: Reply<TaskView> = call(conn, &format!("task {id} --json"), None).await?;
            show(ctx, &r, || render::task(&r.value, now))
        }
        Command::Cancel { id } => {
            let r: Reply<TaskView> = call(conn, &format!("cancel {id} --json"), None).await?;
            show(ctx, &r, || {
                format!("task {}: {}\n", r.value.id, r.value.state)
            })
        }
        Command::Result(args) => result(ctx, conn, &args).await,
        Command::Token { command } => cluster::token(ctx, conn, command, now).await,
        Command::Remove { id, yes } => cluster::remove(ctx, conn, id, yes).await,
        Command::Drain { id } => cluster::drain(ctx, conn, id, true).await,
        Command::Undrain { id } => cluster::drain(ctx, conn, id, false).await,
        Command::Pin { .. }
        | Command::Submit(_)
        | Command::Join { .. }
        | Command::Completions { .. } => {
            unreachable!("handled by run")
        }
    }
}

/// The tasks of a listing that pass `tasks`' local filters (`--state` is the node's),
/// newest last; `me` is the fingerprint this connection authenticated with.
fn filter_tasks(tasks: Vec<TaskView>, args: &TasksArgs, me: &str) -> Vec<TaskView> {
    let mut kept: Vec<TaskView> = tasks
        .into_iter()
        .filter(|t| {
            args.kernel.as_deref().is_none_or(|k| {
                // `wgsl` matches every WGSL task, whose label is `wgsl:ENTRY`.
                t.kernel == k || t.kernel.split_once(':').is_some_and(|(kind, _)| kind == k)
            })
        })
        .filter(|t| args.on_node.is_none_or(|n| t.node == Some(n)))
        .filter(|t| !args.mine || t.submitter == me)
        .collect();
    if let Some(limit) = args.limit {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        kept.drain(..kept.len().saturating_sub(limit));
    }
    kept
}

/// Run a protocol command and read its JSON answer.
async fn call<T: DeserializeOwned>(
    conn: &Connection,
    command: &str,
    stdin: Option<Vec<u8>>,
) -> anyhow::Result<Reply<T>> {
    call_as(conn, command, command, stdin).await
}

/// [`call`], naming the command `shown` in messages (a join token is a secret).
async fn call_as<T: DeserializeOwned>(
    conn: &Connection,
    command: &str,
    shown: &str,
    stdin: Option<Vec<u8>>,
) -> anyhow::Result<Reply<T>> {
    let out = conn.exec_as(command, shown, stdin).await?;
    match out.exit_status {
        Some(EXIT_OK) => parse_reply(out.stdout, shown),
        _ => Err(remote_error(&out, shown)),
    }
}

fn parse_reply<T: DeserializeOwned>(raw: Vec<u8>, command: &str) -> anyhow::Result<Reply<T>> {
    match serde_json::from_slice(&raw) {
        Ok(value) => Ok(Reply { raw, value }),
        Err(e) => anyhow::bail!(
            "the node's answer to '{command}' is not the JSON mesh-cli expects ({e}); are mesh-cli and mesh-node the same version?"
        ),
    }
}

/// The error for a command that did not exit 0.
fn remote_error(out: &ExecOutput, command: &str) -> anyhow::Error {
    let status = out.exit_status.unwrap_or(u32::MAX);
    let message = out.error_message().unwrap_or_else(|| {
        format!("the node answered '{command}' with exit status {status} and no message")
    });
    if status == EXIT_USAGE {
        ExitError::Usage(format!(
            "the node did not understand '{command}': {message}"
        ))
        .into()
    } else {
        anyhow::anyhow!("{message}")
    }
}

/// Print the node's document (JSON mode) or its text rendering.
fn show<T>(ctx: &Context, reply: &Reply<T>, text: impl FnOnce() -> String) -> anyhow::Result<()> {
    if ctx.json {
        print_json_raw(&reply.raw)
    } else {
        print_out(&text())
    }
}

/// Write text to stdout. A closed pipe (`| head`) is not an error.
pub fn print_out(text: &str) -> anyhow::Result<()> {
    if cfg!(test) {
        // Captured by the test harness, unlike writes to the stdout handle.
        print!("{text}");
        return Ok(());
    }
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|_| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

fn print_json_raw(raw: &[u8]) -> anyhow::Result<()> {
    print_out(&format!("{}\n", String::from_utf8_lossy(raw).trim()))
}

/// Print one JSON document of ours.
pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    print_out(&format!("{}\n", serde_json::to_string_pretty(value)?))
}

/// Print one JSON value on one line (JSON Lines, for `watch`).
pub fn print_json_line<T: Serialize>(value: &T) -> anyhow::Result<()> {
    print_out(&format!("{}\n", serde_json::to_string(value)?))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn pin(ctx: &Context, node: &NodeAddr, expected: &Fingerprint) -> anyhow::Result<()> {
    let key = fetch_host_key(node).await?;
    if &key.fingerprint != expected {
        anyhow::bail!(
            "host key for {node} is {}, not the {expected} you asked to pin; nothing was written. Check the \
             fingerprint with `mesh-node fingerprint` on the node; a mismatch may mean the address is wrong \
             or someone is intercepting the connection",
            key.fingerprint
        );
    }
    let outcome = host_keys::pin(&ctx.known_hosts, node, &key)?;
    if ctx.json {
        return print_json(&PinnedView {
            pinned: node.to_string(),
            fingerprint: key.fingerprint.to_string(),
            known_hosts: ctx.known_hosts.display().to_string(),
        });
    }
    match outcome {
        PinOutcome::Added => print_out(&format!(
            "pinned {} for {node} in {}\n",
            key.fingerprint,
            ctx.known_hosts.display()
        )),
        PinOutcome::AlreadyPinned => print_out(&format!(
            "{} is already pinned for {node} in {}\n",
            key.fingerprint,
            ctx.known_hosts.display()
        )),
    }
}

/// The JSON body of `submit`: the task from its file or flags, checked locally.
fn prepare_submit(args: &SubmitArgs) -> anyhow::Result<Vec<u8>> {
    let spec = match &args.task_file {
        Some(path) => task_spec::apply_policy(task_file::load(path)?, args),
        None => task_spec::from_flags(args)?,
    };
    task_spec::check_locally(&spec).context("the task was not sent")?;
    serde_json::to_vec(&spec).context("cannot encode the task")
}

async fn submit(
    ctx: &Context,
    conn: &Connection,
    args: &SubmitArgs,
    body: Vec<u8>,
) -> anyhow::Result<()> {
    let reply: Reply<SubmitReply> = call(conn, "submit --json", Some(body)).await?;
    let id = reply.value.task;
    if !args.wait {
        return show(ctx, &reply, || {
            if reply.value.existing {
                format!("task {id} already exists (same idempotency key)\n")
            } else {
                format!("task {id} submitted\n")
            }
        });
    }
    if !ctx.json {
        let existing = if reply.value.existing {
            " (existing task, same idempotency key)"
        } else {
            ""
        };
        print_out(&format!("task {id} submitted{existing}\n"))?;
    }
    let done = wait(conn, id).await?;
    show(ctx, &done, || {
        let mut text = render::task(&done.value, now_ms());
        if done.value.state == "succeeded" {
            text.push_str(&format!(
                "fetch the output with: mesh-cli result {id} --output FILE\n"
            ));
        }
        text
    })?;
    match done.value.state.as_str() {
        "succeeded" => Ok(()),
        "cancelled" => Err(ExitError::TaskFailed(format!("task {id} was cancelled")).into()),
        state => {
            let why = done
                .value
                .errors
                .last()
                .map(|e| format!(": {}", e.error))
                .unwrap_or_default();
            Err(ExitError::TaskFailed(format!(
                "task {id} {state} after {} attempt(s){why}",
                done.value.attempt
            ))
            .into())
        }
    }
}

/// `wait ID --json`, with a spinner on a terminal that shows the task's state.
async fn wait(conn: &Connection, id: TaskId) -> anyhow::Result<Reply<TaskView>> {
    let command = format!("wait {id} --json");
    let waiting = conn.exec(&command, None);
    let out = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new_spinner();
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
            bar.set_style(style);
        }
        bar.set_message(format!("task {id}: waiting"));
        bar.enable_steady_tick(Duration::from_millis(120));
        tokio::pin!(waiting);
        let mut poll = tokio::time::interval(WAIT_POLL_INTERVAL);
        let out = loop {
            tokio::select! {
                out = &mut waiting => break out,
                _ = poll.tick() => {
                    if let Ok(r) = call::<TaskView>(conn, &format!("task {id} --json"), None).await {
                        bar.set_message(render::progress(&r.value));
                    }
                }
            }
        };
        bar.finish_and_clear();
        out
    } else {
        waiting.await
    }?;
    match out.exit_status {
        // Exit 3: the task ended but did not succeed; the view is still the answer.
        Some(EXIT_OK | EXIT_TASK_FAILED) => parse_reply(out.stdout, &command),
        _ => Err(remote_error(&out, &command)),
    }
}

async fn result(ctx: &Context, conn: &Connection, args: &ResultArgs) -> anyhow::Result<()> {
    let id = args.id;
    let view: Reply<TaskView> = call(conn, &format!("task {id} --json"), None).await?;
    let task = &view.value;
    match task.state.as_str() {
        "succeeded" => {}
        "failed" | "cancelled" => anyhow::bail!(
            "task {id} {} and has no outputs; see why with: mesh-cli task {id}",
            if task.state == "failed" { "failed" } else { "was cancelled" }
        ),
        state => anyhow::bail!(
            "task {id} is {state}; its outputs exist once it succeeds (follow it with: mesh-cli task {id})"
        ),
    }
    if args.output.is_none() && args.png.is_none() {
        return show(ctx, &view, || render::outputs(task));
    }
    let names = || {
        task.outputs
            .iter()
            .map(|o| o.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let wanted = match &args.name {
        Some(n) => task.outputs.iter().find(|o| &o.name == n).ok_or_else(|| {
            anyhow::anyhow!(
                "task {id} has no output named '{n}'; its outputs are: {}",
                names()
            )
        })?,
        None => task
            .outputs
            .first()
            .ok_or_else(|| anyhow::anyhow!("task {id} has no outputs"))?,
    };
    let recorded = wanted
        .sha256
        .as_deref()
        .and_then(Digest::from_hex)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "the node reports no SHA-256 for output {} of task {id}",
                wanted.name
            )
        })?;

    let command = format!("result {id} --raw --name {}", wanted.name);
    let out = conn.exec(&command, None).await?;
    if out.exit_status != Some(EXIT_OK) {
        return Err(remote_error(&out, &command));
    }
    let bytes = out.stdout;
    let got = Digest::of(&bytes);
    if got != recorded || bytes.len() as u64 != wanted.bytes {
        anyhow::bail!(
            "output {} of task {id} arrived as {} bytes with SHA-256 {got}, but the mesh recorded {} bytes with \
             {recorded}; nothing was written. Try again; if it persists, the node's copy is damaged",
            wanted.name,
            bytes.len(),
            wanted.bytes
        );
    }

    let mut saved = SavedView {
        task: id,
        output: wanted.name.clone(),
        bytes: wanted.bytes,
        sha256: got.to_hex(),
        file: None,
        png: None,
    };
    let mut lines = String::new();
    if let Some(path) = &args.output {
        write_file(path, &bytes)?;
        lines.push_str(&format!(
            "wrote output {} of task {id} to {} ({} bytes, sha256 {got}, verified)\n",
            wanted.name,
            path.display(),
            bytes.len()
        ));
        saved.file = Some(path.display().to_string());
    }
    if let Some(path) = &args.png {
        let (w, h, max_iter) = mandelbrot_params(task)?;
        let image = png_out::mandelbrot_png(&bytes, w, h, max_iter).with_context(|| {
            format!(
                "cannot render output {} of task {id} as an image",
                wanted.name
            )
        })?;
        write_file(path, &image)?;
        lines.push_str(&format!(
            "wrote a {w}x{h} image of task {id} to {}\n",
            path.display()
        ));
        saved.png = Some(path.display().to_string());
    }
    if ctx.json {
        print_json(&saved)
    } else {
        print_out(&lines)
    }
}

/// Width, height and max_iter of a mandelbrot task, from its view.
fn mandelbrot_params(task: &TaskView) -> anyhow::Result<(u32, u32, u32)> {
    if task.kernel != "mandelbrot" {
        anyhow::bail!(
            "--png renders the built-in mandelbrot kernel's iteration counts; task {} ran {}; use --output FILE",
            task.id,
            task.kernel
        );
    }
    let param = |name: &str| -> anyhow::Result<u32> {
        task.params
            .get(name)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "task {} has no usable mandelbrot parameter '{name}'",
                    task.id
                )
            })
    };
    Ok((param("width")?, param("height")?, param("max_iter")?))
}

/// Write a whole file, or nothing: bytes go to a temporary name, then into place.
fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_file_as(path, bytes, false)
}

/// [`write_file`]; a `private` file is readable by its owner alone (a snapshot holds
/// every task's data) and reaches the disk before it takes its name.
fn write_file_as(path: &Path, bytes: &[u8], private: bool) -> anyhow::Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let written = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if private {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        let mut file = options.open(&partial)?;
        file.write_all(bytes)?;
        if private {
            file.sync_all()?;
        }
        Ok::<_, std::io::Error>(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(e).with_context(|| format!("cannot write {}", partial.display()));
    }
    std::fs::rename(&partial, path).with_context(|| {
        let _ = std::fs::remove_file(&partial);
        format!("cannot move {} to {}", partial.display(), path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit_code::exit_status_of;
    use crate::fake_node::{self, FakeNode, Reply};
    use crate::host_keys::HostKey;
    use clap::Parser as _;
    use mesh_core::api::{AttemptErrorView, BufferView};
    use mesh_core::task::KernelSpec;
    use mesh_core::{NodeId, TaskSpec};
    use std::collections::BTreeMap;

    fn view(
        id: u64,
        kernel: &str,
        params: &[(&str, &str)],
        state: &str,
        out: Option<&[u8]>,
    ) -> TaskView {
        TaskView {
            id: TaskId(id),
            kernel: kernel.into(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            state: state.into(),
            node: Some(NodeId(1)),
            attempt: 3,
            max_attempts: 3,
            priority: 0,
            idempotency_key: None,
            submitter: "SHA256:someone".into(),
            submitted_at_ms: 0,
            started_at_ms: None,
            finished_at_ms: None,
            inputs: vec![],
            outputs: vec![BufferView {
                name: "out".into(),
                bytes: out.map_or(8, |o| o.len() as u64),
                sha256: out.map(|o| Digest::of(o).to_hex()),
            }],
            errors: if state == "failed" {
                vec![AttemptErrorView {
                    attempt: 3,
                    node: NodeId(1),
                    error: "device lost".into(),
                }]
            } else {
                vec![]
            },
            waiting: None,
            shards: 1,
            shards_done: 0,
            results_recorded: 0,
        }
    }

    fn json(v: &impl Serialize) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    /// Run a command line against the fake node, with its key pinned and the user key given.
    async fn run_cli(node: &FakeNode, dir: &Path, args: &[&str]) -> anyhow::Result<()> {
        let known_hosts = dir.join("known_hosts");
        host_keys::pin(&known_hosts, &node.addr, &node.host_key).unwrap();
        let (addr, kh, id) = (
            node.addr.to_string(),
            known_hosts.display().to_string(),
            node.user_key_file(dir),
        );
        let id = id.display().to_string();
        // An empty config file: the tester's own must not count.
        let config = dir.join("cli.toml");
        std::fs::write(&config, "").unwrap();
        let config = config.display().to_string();
        let mut argv = vec![
            "mesh-cli",
            "--config",
            &config,
            "--node",
            &addr,
            "--known-hosts",
            &kh,
            "--identity",
            &id,
        ];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).unwrap();
        let ctx = Context::from_cli(&cli)?;
        run(cli, &ctx).await
    }

    #[tokio::test]
    async fn submit_wait_sends_the_spec_and_exits_3_when_the_task_failed() {
        let dir = tempfile::tempdir().unwrap();
        let (x, y) = (dir.path().join("x.bin"), dir.path().join("y.bin"));
        std::fs::write(&x, mesh_core::builtin::f32_bytes(&[1.0, 2.0])).unwrap();
        std::fs::write(&y, mesh_core::builtin::f32_bytes(&[10.0, 20.0])).unwrap();
        let failed = view(5, "saxpy", &[("a", "2")], "failed", None);
        let node = fake_node::start(
            10,
            11,
            vec![
                (
                    "submit --json",
                    Reply::ok(json(&SubmitReply {
                        task: TaskId(5),
                        existing: false,
                    })),
                ),
                (
                    "wait 5 --json",
                    Reply::Fixed {
                        stdout: json(&failed),
                        stderr: String::new(),
                        status: 3,
                    },
                ),
            ],
        )
        .await;
        let (xa, ya) = (format!("x=@{}", x.display()), format!("y=@{}", y.display()));
        let err = run_cli(
            &node,
            dir.path(),
            &[
                "submit", "--kernel", "saxpy", "--param", "a=2", "--input", &xa, "--input", &ya,
                "--wait",
            ],
        )
        .await
        .unwrap_err();
        assert_eq!(exit_status_of(&err), 3);
        assert_eq!(
            err.to_string(),
            "task 5 failed after 3 attempt(s): device lost"
        );

        let received = node.received.lock().unwrap().clone();
        assert_eq!(
            received.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
            ["submit --json", "wait 5 --json"]
        );
        let spec: TaskSpec = serde_json::from_slice(&received[0].1).unwrap();
        assert_eq!(
            spec.kernel,
            KernelSpec::Builtin {
                name: "saxpy".into(),
                params: BTreeMap::from([("a".into(), "2".into())])
            }
        );
        assert_eq!(
            spec.inputs[1].data.as_slice(),
            mesh_core::builtin::f32_bytes(&[10.0, 20.0]).as_slice()
        );
    }

    #[tokio::test]
    async fn a_bad_spec_is_refused_before_anything_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let node = fake_node::start(12, 13, vec![]).await;
        let err = run_cli(&node, dir.path(), &["submit", "--kernel", "sgemm"])
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("the task was not sent: unknown kernel 'sgemm'"),
            "{err:#}"
        );
        assert!(node.received.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn result_verifies_the_digest_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0u32..8).flat_map(|i| i.to_le_bytes()).collect();
        let good = view(
            5,
            "mandelbrot",
            &[("width", "4"), ("height", "2"), ("max_iter", "7")],
            "succeeded",
            Some(&data),
        );
        let bad = view(6, "saxpy", &[], "succeeded", Some(b"something else"));
        let node = fake_node::start(
            14,
            15,
            vec![
                ("task 5 --json", Reply::ok(json(&good))),
                ("result 5 --raw --name out", Reply::ok(data.clone())),
                ("task 6 --json", Reply::ok(json(&bad))),
                ("result 6 --raw --name out", Reply::ok(data.clone())),
                (
                    "task 7 --json",
                    Reply::ok(json(&view(7, "saxpy", &[], "running", None))),
                ),
            ],
        )
        .await;
        let (file, png) = (dir.path().join("out.bin"), dir.path().join("m.png"));
        let (f, p) = (file.display().to_string(), png.display().to_string());
        run_cli(
            &node,
            dir.path(),
            &["result", "5", "--output", &f, "--png", &p],
        )
        .await
        .unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), data);
        let decoded = png::Decoder::new(std::io::Cursor::new(std::fs::read(&png).unwrap()))
            .read_info()
            .unwrap();
        assert_eq!((decoded.info().width, decoded.info().height), (4, 2));

        let other = dir.path().join("other.bin");
        let e = run_cli(
            &node,
            dir.path(),
            &["result", "6", "--output", &other.display().to_string()],
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("nothing was written"), "{e}");
        assert!(!other.exists());

        let e = run_cli(
            &node,
            dir.path(),
            &["result", "5", "--name", "nope", "--output", &f],
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "task 5 has no output named 'nope'; its outputs are: out"
        );
        let e = run_cli(&node, dir.path(), &["result", "7", "--output", &f])
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("task 7 is running; its outputs exist once it succeeds"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn cluster_commands_send_checked_lines_and_keep_the_secret_out_of_errors() {
        use mesh_core::api::TokenCreated;
        use mesh_core::capability::NodeCapabilities;
        use mesh_core::token::JoinToken;

        let dir = tempfile::tempdir().unwrap();
        let token = JoinToken::new(
            [7; 8],
            [9; 16],
            "10.0.0.1:7700".into(),
            Fingerprint::of_key_blob(b"seed"),
        );
        let encoded = token.encode();
        let created = TokenCreated {
            token: encoded.clone(),
            id: token.id.clone(),
            expires_at_ms: 1,
        };
        let node_view = |id: u64, health: &str| NodeView {
            id: NodeId(id),
            fingerprint: "SHA256:x".into(),
            addr: format!("10.0.0.{id}:7700"),
            role: "follower".into(),
            health: health.into(),
            last_contact_ms: Some(120),
            drained: false,
            running: 0,
            capabilities: NodeCapabilities::default(),
        };
        let join_line = format!("join {encoded} --json");
        let newer = JoinToken::new(
            [8; 8],
            [9; 16],
            "10.0.0.1:7700".into(),
            Fingerprint::of_key_blob(b"seed"),
        )
        .encode();
        let newer_line = format!("join {newer} --json");
        let node = fake_node::start(
            20,
            21,
            vec![
                (
                    "token create --ttl 1800000ms --uses 2 --json",
                    Reply::ok(json(&created)),
                ),
                ("token list --json", Reply::ok(b"[]".to_vec())),
                (
                    "token revoke 0707070707070707 --json",
                    Reply::ok(br#"{"revoked": "0707070707070707"}"#.to_vec()),
                ),
                (
                    "nodes --json",
                    Reply::ok(json(&vec![node_view(1, "up"), node_view(2, "removed")])),
                ),
                ("remove 1 --json", Reply::ok(br#"{"removed": 1}"#.to_vec())),
                (
                    &join_line,
                    Reply::error(2, "unknown command 'join'; commands: status, nodes"),
                ),
                (&newer_line, Reply::ok(br#"{"node": 4}"#.to_vec())),
            ],
        )
        .await;
        let ok = |args: &'static [&'static str]| {
            let (node, dir) = (&node, dir.path());
            async move { run_cli(node, dir, args).await }
        };
        ok(&["token", "create", "--ttl", "30m", "--uses", "2"])
            .await
            .unwrap();
        ok(&["--json", "token", "list"]).await.unwrap();
        run_cli(&node, dir.path(), &["token", "revoke", &encoded])
            .await
            .unwrap();
        ok(&["remove", "1", "--yes"]).await.unwrap();
        let e = ok(&["remove", "2", "--yes"]).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "node 2 (10.0.0.2:7700) was already removed from the mesh"
        );
        let e = ok(&["remove", "5", "--yes"]).await.unwrap_err();
        assert!(
            e.to_string()
                .starts_with("node 5 is not in the mesh; its nodes are 1"),
            "{e}"
        );

        // An older node does not know `join`: its answer comes through, without the secret.
        let e = run_cli(&node, dir.path(), &["join", &encoded])
            .await
            .unwrap_err();
        assert_eq!(exit_status_of(&e), 2);
        let message = format!("{e:#}");
        assert!(message.contains("unknown command 'join'"), "{message}");
        assert!(message.contains("<token 0707070707070707>"), "{message}");
        assert!(message.contains("mesh-node run --await-join"), "{message}");
        assert!(!message.contains(&token.secret), "{message}");
        run_cli(&node, dir.path(), &["join", &newer]).await.unwrap();
        // A malformed token is refused here, and nothing is sent.
        let e = ok(&["join", "mesh1-0707.0909@h:1"]).await.unwrap_err();
        assert_eq!(exit_status_of(&e), 2);

        let received = node.received.lock().unwrap().clone();
        assert_eq!(
            received.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
            [
                "token create --ttl 1800000ms --uses 2 --json",
                "token list --json",
                "token revoke 0707070707070707 --json",
                "nodes --json",
                "remove 1 --json",
                "nodes --json",
                "nodes --json",
                join_line.as_str(),
                newer_line.as_str(),
            ]
        );
    }

    #[tokio::test]
    async fn drain_and_undrain_check_the_node_then_send_one_line() {
        use mesh_core::capability::NodeCapabilities;

        let dir = tempfile::tempdir().unwrap();
        let node_view = |id: u64, health: &str, drained: bool| NodeView {
            id: NodeId(id),
            fingerprint: "SHA256:x".into(),
            addr: format!("10.0.0.{id}:7700"),
            role: "follower".into(),
            health: health.into(),
            last_contact_ms: None,
            drained,
            running: 0,
            capabilities: NodeCapabilities::default(),
        };
        let nodes = vec![
            node_view(1, "up", false),
            node_view(2, "up", true),
            node_view(3, "removed", false),
        ];
        let node = fake_node::start(
            22,
            23,
            vec![
                ("nodes --json", Reply::ok(json(&nodes))),
                ("drain 1 --json", Reply::ok(br#"{"drained": 1}"#.to_vec())),
                (
                    "undrain 2 --json",
                    Reply::ok(br#"{"undrained": 2}"#.to_vec()),
                ),
            ],
        )
        .await;
        run_cli(&node, dir.path(), &["drain", "1"]).await.unwrap();
        run_cli(&node, dir.path(), &["--json", "undrain", "2"])
            .await
            .unwrap();
        let e = run_cli(&node, dir.path(), &["drain", "3"])
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "node 3 (10.0.0.3:7700) was removed from the mesh; a removed node takes no tasks and \
             cannot be drained"
        );
        let e = run_cli(&node, dir.path(), &["undrain", "9"])
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "node 9 is not in the mesh; its nodes are 1, 2 (see `mesh-cli nodes`)"
        );
        let received = node.received.lock().unwrap().clone();
        assert_eq!(
            received.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
            [
                "nodes --json",
                "drain 1 --json",
                "nodes --json",
                "undrain 2 --json",
                "nodes --json",
                "nodes --json",
            ],
            "refused ids send nothing after the node list"
        );
    }

    #[tokio::test]
    async fn submit_sends_shards_and_preferences_and_refuses_bad_ones_locally() {
        let dir = tempfile::tempdir().unwrap();
        let node = fake_node::start(
            24,
            25,
            vec![(
                "submit --json",
                Reply::ok(json(&SubmitReply {
                    task: TaskId(8),
                    existing: false,
                })),
            )],
        )
        .await;
        run_cli(
            &node,
            dir.path(),
            &[
                "submit",
                "--kernel",
                "mandelbrot",
                "--param",
                "width=64",
                "--param",
                "height=64",
                "--param",
                "max_iter=50",
                "--shards",
                "4",
                "--require",
                "label:zone in a,b",
                "--require",
                "max_buffer_size>=1024",
                "--prefer",
                "device=discrete",
                "--prefer",
                "label:zone=a",
            ],
        )
        .await
        .unwrap();
        let received = node.received.lock().unwrap().clone();
        assert_eq!(received.len(), 1);
        let spec: TaskSpec = serde_json::from_slice(&received[0].1).unwrap();
        assert_eq!(spec.shards, 4);
        let shown = |r: &[mesh_core::requirement::Requirement]| {
            r.iter().map(ToString::to_string).collect::<Vec<_>>()
        };
        assert_eq!(
            shown(&spec.requirements),
            ["label:zone in a,b", "max_buffer_size>=1024"]
        );
        assert_eq!(shown(&spec.prefer), ["device=discrete", "label:zone=a"]);
        // The wire form docs/ssh-protocol.md shows.
        let body: serde_json::Value = serde_json::from_slice(&received[0].1).unwrap();
        assert_eq!(body["shards"], serde_json::json!(4));
        assert_eq!(
            body["requirements"],
            serde_json::json!([
                {"label-in": ["zone", ["a", "b"]]},
                {"min-limit": ["max_buffer_size", 1024]}
            ])
        );
        assert_eq!(
            body["prefer"],
            serde_json::json!([{"device": "discrete"}, {"label-eq": ["zone", "a"]}])
        );

        // Too many shards for the rows there are: refused here, nothing sent.
        let e = run_cli(
            &node,
            dir.path(),
            &[
                "submit",
                "--kernel",
                "mandelbrot",
                "--param",
                "width=8",
                "--param",
                "height=2",
                "--param",
                "max_iter=5",
                "--shards",
                "3",
            ],
        )
        .await
        .unwrap_err();
        assert!(
            format!("{e:#}").starts_with("the task was not sent: 3 shards for 2 rows"),
            "{e:#}"
        );
        assert_eq!(node.received.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn pin_writes_only_the_fingerprint_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let node = fake_node::start(16, 17, vec![]).await;
        let known_hosts = dir.path().join("kh");
        let (addr, kh) = (node.addr.to_string(), known_hosts.display().to_string());
        let wrong = HostKey::of(fake_node::key(18).public_key())
            .unwrap()
            .fingerprint
            .to_string();
        let config = dir.path().join("cli.toml");
        std::fs::write(&config, "").unwrap();
        let config = config.display().to_string();
        let pin_cli = |fp: &str| {
            Cli::try_parse_from([
                "mesh-cli",
                "--config",
                &config,
                "--known-hosts",
                &kh,
                "pin",
                &addr,
                fp,
            ])
            .unwrap()
        };

        let cli = pin_cli(&wrong);
        let ctx = Context::from_cli(&cli).unwrap();
        let e = run(cli, &ctx).await.unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "not the {wrong} you asked to pin; nothing was written"
            )),
            "{e}"
        );
        assert!(!known_hosts.exists());

        let cli = pin_cli(node.host_key.fingerprint.as_str());
        let ctx = Context::from_cli(&cli).unwrap();
        run(cli, &ctx).await.unwrap();
        let text = std::fs::read_to_string(&known_hosts).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert!(
            text.starts_with(&format!("[127.0.0.1]:{} ssh-ed25519 ", node.addr.port)),
            "{text}"
        );
    }

    fn task_in(id: u64, state: &str, node: Option<u64>, kernel: &str, submitter: &str) -> TaskView {
        TaskView {
            node: node.map(NodeId),
            submitter: submitter.into(),
            ..view(id, kernel, &[], state, None)
        }
    }

    #[test]
    fn task_filters_combine_and_keep_the_newest() {
        use crate::args::TasksArgs;
        let tasks = vec![
            task_in(1, "succeeded", Some(1), "saxpy", "SHA256:me"),
            task_in(2, "running", Some(2), "wgsl:main", "SHA256:me"),
            task_in(3, "running", Some(2), "saxpy", "SHA256:other"),
            task_in(4, "pending", None, "saxpy", "SHA256:me"),
            task_in(5, "running", Some(2), "wgsl:double", "SHA256:me"),
        ];
        let ids = |args: TasksArgs| {
            filter_tasks(tasks.clone(), &args, "SHA256:me")
                .iter()
                .map(|t| t.id.0)
                .collect::<Vec<_>>()
        };
        let none = || TasksArgs {
            state: None,
            kernel: None,
            on_node: None,
            mine: false,
            limit: None,
        };
        assert_eq!(ids(none()), [1, 2, 3, 4, 5]);
        assert_eq!(
            ids(TasksArgs {
                kernel: Some("saxpy".into()),
                ..none()
            }),
            [1, 3, 4]
        );
        assert_eq!(
            ids(TasksArgs {
                kernel: Some("wgsl".into()),
                ..none()
            }),
            [2, 5]
        );
        assert_eq!(
            ids(TasksArgs {
                kernel: Some("wgsl:main".into()),
                ..none()
            }),
            [2]
        );
        assert_eq!(
            ids(TasksArgs {
                on_node: Some(NodeId(2)),
                ..none()
            }),
            [2, 3, 5]
        );
        assert_eq!(
            ids(TasksArgs {
                mine: true,
                ..none()
            }),
            [1, 2, 4, 5]
        );
        assert_eq!(
            ids(TasksArgs {
                mine: true,
                on_node: Some(NodeId(2)),
                limit: Some(1),
                ..none()
            }),
            [5],
            "the newest of those that pass"
        );
        assert_eq!(
            ids(TasksArgs {
                limit: Some(99),
                ..none()
            }),
            [1, 2, 3, 4, 5]
        );
    }

    #[tokio::test]
    async fn tasks_mine_sends_one_listing_and_knows_who_i_am() {
        let dir = tempfile::tempdir().unwrap();
        let node = fake_node::start(
            40,
            41,
            vec![("tasks --state running --json", Reply::ok(b"[]".to_vec()))],
        )
        .await;
        run_cli(
            &node,
            dir.path(),
            &[
                "--json", "tasks", "--state", "running", "--mine", "--limit", "3",
            ],
        )
        .await
        .unwrap();
        let received = node.received.lock().unwrap().clone();
        assert_eq!(received.len(), 1);
        assert_eq!(received[0].0, "tasks --state running --json");
    }

    #[tokio::test]
    async fn admin_commands_check_locally_then_send_one_line() {
        use mesh_core::api::{AuditView, KeyView};

        let dir = tempfile::tempdir().unwrap();
        let bob = fake_node::key(33);
        let bob_line = format!("{} bob@laptop\n", bob.public_key().to_openssh().unwrap());
        let bob_fp = crate::identity::fingerprint_of(bob.public_key());
        let pub_file = dir.path().join("bob.pub");
        std::fs::write(&pub_file, &bob_line).unwrap();
        let snapshot: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let key_view = KeyView {
            fingerprint: bob_fp.clone(),
            role: "submitter".into(),
            comment: "bob@laptop".into(),
            key: bob_line.trim().into(),
            added_by: "SHA256:admin".into(),
            added_at_ms: 0,
        };
        let audit_view = AuditView {
            seq: 1,
            at_ms: 0,
            actor: "SHA256:admin".into(),
            action: "keys add".into(),
            target: Some("as submitter".into()),
            outcome: "ok".into(),
        };
        let remove_line = format!("keys remove {bob_fp} --json");
        let audit_line = format!("audit --since 3600000ms --actor {bob_fp} --json");
        let node = fake_node::start(
            34,
            35,
            vec![
                (
                    "keys add --role submitter --json",
                    Reply::ok(json(&serde_json::json!({"added": [bob_fp], "role": "submitter"}))),
                ),
                (
                    "keys add --role admin --json",
                    Reply::error(
                        1,
                        "permission denied: key SHA256:x has role operator; this needs admin (an admin can run: mesh-cli keys add KEY.pub --role admin)",
                    ),
                ),
                ("keys list --json", Reply::ok(json(&vec![key_view]))),
                (&remove_line, Reply::ok(json(&serde_json::json!({"removed": bob_fp})))),
                (&audit_line, Reply::ok(json(&vec![audit_view]))),
                (
                    "snapshot",
                    Reply::sequence(vec![
                        Reply::ok(snapshot.clone()),
                        Reply::error(1, "permission denied: key SHA256:x has role viewer; this needs admin"),
                    ]),
                ),
            ],
        )
        .await;
        let f = pub_file.display().to_string();
        run_cli(
            &node,
            dir.path(),
            &["keys", "add", &f, "--role", "submitter"],
        )
        .await
        .unwrap();
        let e = run_cli(&node, dir.path(), &["keys", "add", &f, "--role", "admin"])
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("permission denied: key SHA256:x has role operator"),
            "{e}"
        );
        run_cli(&node, dir.path(), &["keys", "list"]).await.unwrap();
        run_cli(&node, dir.path(), &["keys", "remove", &bob_fp])
            .await
            .unwrap();
        run_cli(
            &node,
            dir.path(),
            &["audit", "--since", "1h", "--actor", &bob_fp],
        )
        .await
        .unwrap();

        // A file that is not a public key: refused by line, nothing sent.
        let bad = dir.path().join("bad.pub");
        std::fs::write(&bad, format!("{bob_line}ssh-ed25519 AAAA\n")).unwrap();
        let e = run_cli(
            &node,
            dir.path(),
            &[
                "keys",
                "add",
                &bad.display().to_string(),
                "--role",
                "viewer",
            ],
        )
        .await
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("{}: line 2: ", bad.display())),
            "{e}"
        );

        // The snapshot is written whole, readable by its owner alone, with no .partial left.
        let saved = dir.path().join("mesh.snap");
        run_cli(
            &node,
            dir.path(),
            &["snapshot", "save", &saved.display().to_string()],
        )
        .await
        .unwrap();
        assert!(std::fs::read(&saved).unwrap() == snapshot);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&saved).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let other = dir.path().join("other.snap");
        let e = run_cli(
            &node,
            dir.path(),
            &["snapshot", "save", &other.display().to_string()],
        )
        .await
        .unwrap_err();
        assert!(e.to_string().starts_with("permission denied"), "{e}");
        assert!(!other.exists());
        assert!(!dir.path().join("other.snap.partial").exists());

        let received = node.received.lock().unwrap().clone();
        assert_eq!(
            received.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
            [
                "keys add --role submitter --json",
                "keys add --role admin --json",
                "keys list --json",
                remove_line.as_str(),
                audit_line.as_str(),
                "snapshot",
                "snapshot",
            ]
        );
        assert_eq!(
            received[0].1,
            bob_line.as_bytes(),
            "the key file goes on stdin as it is"
        );
    }

    #[tokio::test]
    async fn watch_polls_one_connection_until_the_task_ends() {
        let dir = tempfile::tempdir().unwrap();
        let mut sharded = view(7, "mandelbrot", &[], "running", None);
        sharded.shards = 4;
        sharded.node = Some(NodeId(2));
        sharded.attempt = 1;
        let mut done = sharded.clone();
        done.shards_done = 4;
        done.state = "succeeded".into();
        let node = fake_node::start(
            42,
            43,
            vec![
                (
                    "task 7 --json",
                    Reply::sequence(vec![
                        Reply::ok(json(&TaskView {
                            state: "pending".into(),
                            node: None,
                            ..sharded.clone()
                        })),
                        Reply::ok(json(&sharded)),
                        Reply::ok(json(&sharded)),
                        Reply::ok(json(&done)),
                    ]),
                ),
                (
                    "task 8 --json",
                    Reply::sequence(vec![
                        Reply::ok(json(&view(8, "saxpy", &[], "running", None))),
                        Reply::ok(json(&view(8, "saxpy", &[], "failed", None))),
                    ]),
                ),
                ("tasks --json", Reply::ok(json(&vec![sharded.clone()]))),
            ],
        )
        .await;
        run_cli(&node, dir.path(), &["watch", "7"]).await.unwrap();
        let e = run_cli(&node, dir.path(), &["--json", "watch", "8"])
            .await
            .unwrap_err();
        assert_eq!(exit_status_of(&e), 3);
        assert_eq!(
            e.to_string(),
            "task 8 failed after 3 attempt(s): device lost"
        );
        assert!(
            crate::exit_code::reported_on_stdout(&e),
            "no error document among the JSON Lines"
        );

        // `watch` without an ID runs until interrupted.
        let all = tokio::time::timeout(
            Duration::from_millis(1_300),
            run_cli(&node, dir.path(), &["watch"]),
        )
        .await;
        assert!(all.is_err(), "watch ended by itself: {all:?}");

        let received = node.received.lock().unwrap().clone();
        let count = |c: &str| received.iter().filter(|(r, _)| r == c).count();
        assert_eq!(
            count("task 7 --json"),
            4,
            "one poll per answer until the task ended"
        );
        assert_eq!(count("task 8 --json"), 2);
        assert!(count("tasks --json") >= 2, "{received:?}");
        assert_eq!(
            node.connections.load(std::sync::atomic::Ordering::SeqCst),
            3,
            "one connection per watch"
        );
    }

    fn write_batch(dir: &Path, text: &str) -> String {
        let path = dir.join("jobs.toml");
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    const MANDELBROTS: &str = "\
[[task]]
kernel = \"mandelbrot\"
params = { width = 8, height = 4, max_iter = 9 }

[[task]]
kernel = \"mandelbrot\"
params = { width = 8, height = 4, max_iter = 9 }
shards = 4

[[task]]
kernel = \"mandelbrot\"
params = { width = 8, height = 4, max_iter = 9 }
idempotency_key = \"m3\"
";

    #[tokio::test]
    async fn a_batch_is_checked_whole_then_sent_over_one_connection() {
        use mesh_core::api::BatchItemReply;
        let dir = tempfile::tempdir().unwrap();
        let submitted = |id: u64, existing: bool| {
            BatchItemReply::Submitted(SubmitReply {
                task: TaskId(id),
                existing,
            })
        };
        let node = fake_node::start(
            44,
            45,
            vec![(
                "submit-batch --json",
                Reply::ok(json(&vec![
                    submitted(1, false),
                    BatchItemReply::Refused {
                        error: "no registered node could ever run task: needs device=discrete"
                            .into(),
                    },
                    submitted(3, true),
                ])),
            )],
        )
        .await;
        let jobs = write_batch(dir.path(), MANDELBROTS);
        let e = run_cli(
            &node,
            dir.path(),
            &["submit", "--batch", &jobs, "--priority", "4"],
        )
        .await
        .unwrap_err();
        assert_eq!(exit_status_of(&e), 1);
        assert_eq!(
            e.to_string(),
            format!("1 of the 3 task(s) in {jobs} were not submitted")
        );
        let received = node.received.lock().unwrap().clone();
        assert_eq!(received.len(), 1, "one submit-batch for the whole file");
        let specs: Vec<TaskSpec> = serde_json::from_slice(&received[0].1).unwrap();
        assert_eq!(specs.len(), 3, "every task of the file in the batch");
        assert_eq!(
            specs
                .iter()
                .map(|s| (s.priority, s.shards))
                .collect::<Vec<_>>(),
            [(4, 1), (4, 4), (4, 1)],
            "the policy flags apply to every task"
        );
        assert_eq!(specs[2].idempotency_key.as_deref(), Some("m3"));
        assert_eq!(
            node.connections.load(std::sync::atomic::Ordering::SeqCst),
            1
        );

        // One bad task: the batch is refused before anything is sent.
        let jobs = write_batch(dir.path(), &MANDELBROTS.replace("shards = 4", "shards = 5"));
        let e = run_cli(&node, dir.path(), &["submit", "--batch", &jobs])
            .await
            .unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            format!("the batch was not sent: batch file {jobs}: task #2 (line 5): 5 shards for 4 rows: shards must be between 1 and 4")
        );
        assert_eq!(node.received.lock().unwrap().len(), 1);
        assert_eq!(
            node.connections.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "no connection either"
        );
    }

    #[tokio::test]
    async fn a_batch_with_wait_follows_every_task_to_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let submitted = |id: u64| {
            mesh_core::api::BatchItemReply::Submitted(SubmitReply {
                task: TaskId(id),
                existing: false,
            })
        };
        let at = |id: u64, state: &str| view(id, "mandelbrot", &[], state, None);
        let node = fake_node::start(
            46,
            47,
            vec![
                (
                    "submit-batch --json",
                    Reply::ok(json(&vec![submitted(11), submitted(12), submitted(13)])),
                ),
                (
                    "tasks --json",
                    Reply::sequence(vec![
                        // Task 13 is missing from the first listing: asked for by id.
                        Reply::ok(json(&vec![
                            at(9, "running"),
                            at(11, "running"),
                            at(12, "pending"),
                        ])),
                        Reply::ok(json(&vec![
                            at(11, "succeeded"),
                            at(12, "running"),
                            at(13, "succeeded"),
                        ])),
                        Reply::ok(json(&vec![
                            at(11, "succeeded"),
                            at(12, "cancelled"),
                            at(13, "succeeded"),
                        ])),
                    ]),
                ),
                ("task 13 --json", Reply::ok(json(&at(13, "pending")))),
            ],
        )
        .await;
        let jobs = write_batch(dir.path(), MANDELBROTS);
        let e = run_cli(
            &node,
            dir.path(),
            &["--json", "submit", "--batch", &jobs, "--wait"],
        )
        .await
        .unwrap_err();
        assert_eq!(exit_status_of(&e), 3);
        assert!(
            e.to_string()
                .starts_with("1 task(s) of the batch failed or were cancelled: 12;"),
            "{e}"
        );
        let received = node.received.lock().unwrap().clone();
        assert_eq!(
            received.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
            [
                "submit-batch --json",
                "tasks --json",
                "task 13 --json",
                "tasks --json",
                "tasks --json",
            ]
        );
        assert_eq!(
            node.connections.load(std::sync::atomic::Ordering::SeqCst),
            1
        );
    }
}
