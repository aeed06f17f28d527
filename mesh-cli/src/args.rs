//! The command line: global options, commands and their help text.

use mesh_core::duration::parse_duration;
use crate::node_addr::NodeAddr;
use crate::task_spec::{parse_input, parse_output, parse_param, parse_workgroups, InputArg};
use clap::{ArgGroup, Args, Parser, Subcommand};
use mesh_core::requirement::Requirement;
use mesh_core::task::OutputDecl;
use mesh_core::{Fingerprint, TaskId};
use std::path::PathBuf;
use std::time::Duration;

const ABOUT: &str = "Operate a Mesh: submit GPU compute tasks, watch them, fetch their results.";

const LONG_ABOUT: &str = "\
Operate a Mesh: submit GPU compute tasks, watch them, fetch their results.

mesh-cli talks SSH to one node of the mesh (any node: they share one replicated \
state). It checks the node's host key against a known_hosts file and refuses keys \
that are not pinned there, so the first step with a new node is `mesh-cli pin`. \
You are identified by your SSH key: --identity FILE, else the ed25519 keys of \
ssh-agent, else ~/.ssh/id_ed25519.";

const AFTER_HELP: &str = "\
Examples:
  # Trust a node: compare the fingerprint with `mesh-node fingerprint` on it first.
  mesh-cli pin 10.0.0.2:7722 SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s
  mesh-cli --node 10.0.0.2:7722 status
  mesh-cli submit --kernel saxpy --param a=2 --input x=@x.bin --input y=@y.bin --wait
  mesh-cli submit task.toml --wait
  mesh-cli result 5 --output y.bin
  mesh-cli --json tasks --state failed

Exit status:
  0  success
  1  error (one line on stderr: error: ...; with --json also {\"error\": ...} on stdout)
  2  malformed command line
  3  submit --wait: the task ended failed or cancelled

Environment: MESH_NODE, MESH_IDENTITY, MESH_KNOWN_HOSTS (same as the options).
See docs/cli.md and docs/task-file.md.";

/// mesh-cli's command line.
#[derive(Debug, Parser)]
#[command(name = "mesh-cli", version, about = ABOUT, long_about = LONG_ABOUT, after_help = AFTER_HELP)]
pub struct Cli {
    /// The node to talk to: the SSH endpoint of any mesh-node, as HOST:PORT.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "MESH_NODE",
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:7722"
    )]
    pub node: NodeAddr,

    /// Your SSH private key (OpenSSH format, unencrypted). Without it mesh-cli tries the
    /// ed25519 keys of ssh-agent (SSH_AUTH_SOCK), then ~/.ssh/id_ed25519. Keep
    /// passphrase-protected keys in ssh-agent.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "MESH_IDENTITY",
        value_name = "FILE"
    )]
    pub identity: Option<PathBuf>,

    /// The known_hosts file that pins node host keys (OpenSSH format; `pin` appends to
    /// it) [default: <config dir>/mesh/known_hosts, e.g. ~/.config/mesh/known_hosts].
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "MESH_KNOWN_HOSTS",
        value_name = "FILE"
    )]
    pub known_hosts: Option<PathBuf>,

    /// Print exactly one JSON document on stdout instead of text (the node's answer, see
    /// docs/ssh-protocol.md; errors as {"error": "..."}).
    #[arg(long, global = true, help_heading = "Global options")]
    pub json: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the node's view of the mesh: Raft role, leader, term, log position, voters,
    /// task counts by state.
    #[command(after_help = "Example:\n  mesh-cli --node 10.0.0.2:7722 status")]
    Status,

    /// List the nodes of the mesh with their health, address, host key fingerprint, GPU
    /// adapter (name, device type, backend), slots in use and labels.
    #[command(
        after_help = "Example:\n  mesh-cli nodes\n  mesh-cli --json nodes | jq '.[].capabilities.adapters[0].name'"
    )]
    Nodes,

    /// List tasks, newest last.
    #[command(after_help = "Examples:\n  mesh-cli tasks\n  mesh-cli tasks --state pending")]
    Tasks {
        /// Only tasks in this state.
        #[arg(long, value_name = "STATE", value_parser = ["pending", "assigned", "running", "succeeded", "failed", "cancelled"])]
        state: Option<String>,
    },

    /// Show one task: state, node and attempt, inputs and outputs with SHA-256, the
    /// errors of failed attempts, and why a pending task waits.
    #[command(after_help = "Example:\n  mesh-cli task 5")]
    Task {
        /// The task id (as printed by submit).
        id: TaskId,
    },

    /// Submit a task, from a task file or from flags.
    #[command(after_help = SUBMIT_HELP)]
    Submit(SubmitArgs),

    /// Fetch a succeeded task's output: verify its SHA-256 and write it to a file, or
    /// render a mandelbrot task as PNG. Without --output or --png, list the outputs.
    #[command(after_help = RESULT_HELP)]
    Result(ResultArgs),

    /// Cancel a task that has not finished. Its result, if one arrives later, is
    /// discarded.
    #[command(after_help = "Example:\n  mesh-cli cancel 5")]
    Cancel {
        /// The task id.
        id: TaskId,
    },

    /// Pin a node's host key: connect, fetch the key it presents, and append it to the
    /// known_hosts file only if its fingerprint equals the one given. Get the
    /// fingerprint from the node itself (`mesh-node fingerprint`) over a channel you
    /// trust. Pin the node by the same HOST:PORT you pass to --node.
    #[command(
        after_help = "Example:\n  mesh-cli pin 10.0.0.2:7722 SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s"
    )]
    Pin {
        /// The node, as HOST:PORT.
        #[arg(value_name = "HOST:PORT")]
        node: NodeAddr,
        /// The fingerprint you expect, as `mesh-node fingerprint` and `ssh-keygen -lf` print it.
        #[arg(value_name = "SHA256:...")]
        fingerprint: Fingerprint,
    },
}

const SUBMIT_HELP: &str = "\
A task is either a built-in kernel (saxpy, vector-add, matmul, reduce-sum, \
mandelbrot) with parameters, or a WGSL compute shader. Inputs are files of raw \
little-endian bytes. WGSL inputs bind in the order given at @group(0) @binding(0..) \
as var<storage, read>; outputs follow as var<storage, read_write>.

Examples:
  mesh-cli submit task.toml --wait
  mesh-cli submit --kernel saxpy --param a=2 --input x=@x.bin --input y=@y.bin
  mesh-cli submit --kernel mandelbrot --param width=800 --param height=600 --param max_iter=500
  mesh-cli submit --wgsl double.wgsl --workgroups 4,1,1 --input x=@x.bin --output y=4096 \\
      --require device=discrete --timeout 2m --idempotency-key run-42

With --wait, mesh-cli waits for the task to finish and exits 3 if it failed or was \
cancelled. With --json it prints the SubmitReply, or with --wait the final TaskView.
A task file's policy (timeout, attempts, priority, key) can be overridden by flags; \
--require adds to the file's requirements.";

const RESULT_HELP: &str = "\
Examples:
  mesh-cli result 5                          # list outputs with sizes and SHA-256
  mesh-cli result 5 --output y.bin           # the first output, verified
  mesh-cli result 7 --name c --output c.bin  # a named output
  mesh-cli result 9 --png mandelbrot.png     # a mandelbrot task as an image";

/// `submit`'s options.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("what").required(true).args(["task_file", "kernel", "wgsl"])))]
pub struct SubmitArgs {
    /// A task file (TOML) describing the whole task; see docs/task-file.md.
    #[arg(value_name = "TASK_FILE")]
    pub task_file: Option<PathBuf>,

    /// A built-in kernel: saxpy, vector-add, matmul, reduce-sum or mandelbrot.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["task_file", "wgsl"])]
    pub kernel: Option<String>,

    /// A built-in kernel's parameter (repeat for each), e.g. a=2.
    #[arg(long = "param", value_name = "K=V", value_parser = parse_param, conflicts_with_all = ["task_file", "wgsl"])]
    pub params: Vec<(String, String)>,

    /// A WGSL compute shader file.
    #[arg(long, value_name = "FILE", conflicts_with = "task_file")]
    pub wgsl: Option<PathBuf>,

    /// The WGSL entry point [default: main].
    #[arg(long, value_name = "NAME", conflicts_with_all = ["task_file", "kernel"])]
    pub entry: Option<String>,

    /// Workgroup counts of the WGSL dispatch: X, X,Y or X,Y,Z (missing counts are 1).
    #[arg(long, value_name = "X,Y,Z", value_parser = parse_workgroups, conflicts_with_all = ["task_file", "kernel"])]
    pub workgroups: Option<[u32; 3]>,

    /// An input buffer read from a file (repeat for each, in binding order), e.g. x=@x.bin.
    #[arg(long = "input", value_name = "NAME=@FILE", value_parser = parse_input, conflicts_with = "task_file")]
    pub inputs: Vec<InputArg>,

    /// An output buffer of a WGSL kernel with its size in bytes (repeat for each), e.g. y=4096.
    #[arg(long = "output", value_name = "NAME=BYTES", value_parser = parse_output, conflicts_with_all = ["task_file", "kernel"])]
    pub outputs: Vec<OutputDecl>,

    /// Time limit of one attempt: 500ms, 30s, 5m, 1h, 1m30s [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,

    /// Attempts before the task fails for good [default: 3].
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,

    /// Higher runs first; may be negative [default: 0].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub priority: Option<i32>,

    /// What the node must offer (repeat for each): device=cpu|discrete|integrated|virtual,
    /// backend=vulkan, vendor=nvidia, feature=shader-f16, max_buffer_size>=N,
    /// label:KEY=VALUE, label:KEY!=VALUE.
    #[arg(long = "require", value_name = "EXPR", value_parser = Requirement::parse)]
    pub requirements: Vec<Requirement>,

    /// Submitting again with the same key returns the existing task instead of a new one.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,

    /// Wait until the task finishes; exit 3 if it failed or was cancelled.
    #[arg(long)]
    pub wait: bool,
}

/// `result`'s options.
#[derive(Debug, Args)]
pub struct ResultArgs {
    /// The task id.
    pub id: TaskId,

    /// Write the output's bytes to this file (after checking their SHA-256).
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Which output [default: the first].
    #[arg(long, value_name = "OUTPUT")]
    pub name: Option<String>,

    /// Render a mandelbrot task's iteration counts as a PNG image.
    #[arg(long, value_name = "FILE")]
    pub png: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn usage_errors_are_clap_errors() {
        // Neither a file nor a kernel.
        assert!(Cli::try_parse_from(["mesh-cli", "submit"]).is_err());
        // A task file and a kernel together.
        assert!(
            Cli::try_parse_from(["mesh-cli", "submit", "t.toml", "--kernel", "saxpy"]).is_err()
        );
        // --output belongs to WGSL kernels.
        assert!(Cli::try_parse_from([
            "mesh-cli", "submit", "--kernel", "saxpy", "--output", "y=4"
        ])
        .is_err());
        assert!(
            Cli::try_parse_from(["mesh-cli", "submit", "--kernel", "saxpy", "--param", "a"])
                .is_err()
        );
        assert!(Cli::try_parse_from([
            "mesh-cli",
            "submit",
            "--kernel",
            "saxpy",
            "--workgroups",
            "1"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["mesh-cli", "submit", "t.toml", "--input", "x=@x"]).is_err());
        assert!(
            Cli::try_parse_from(["mesh-cli", "submit", "--wgsl", "k.wgsl", "--param", "a=1"])
                .is_err()
        );
        // Policy flags go with a task file.
        assert!(
            Cli::try_parse_from(["mesh-cli", "submit", "t.toml", "--timeout", "5s", "--wait"])
                .is_ok()
        );
        assert!(Cli::try_parse_from(["mesh-cli", "tasks", "--state", "done"]).is_err());
        assert!(Cli::try_parse_from(["mesh-cli", "pin", "h:1", "MD5:aa"]).is_err());
    }

    #[test]
    fn global_options_go_before_or_after_the_command() {
        let c = Cli::try_parse_from(["mesh-cli", "status", "--json", "--node", "h:1"]).unwrap();
        assert!(c.json);
        assert_eq!(c.node.to_string(), "h:1");
        let c = Cli::try_parse_from([
            "mesh-cli",
            "--json",
            "submit",
            "--kernel",
            "reduce-sum",
            "--priority",
            "-3",
        ])
        .unwrap();
        let Command::Submit(s) = c.command else {
            panic!()
        };
        assert_eq!(s.priority, Some(-3));
    }
}
