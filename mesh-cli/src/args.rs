//! The command line: global options, commands and their help text.

use crate::node_addr::NodeAddr;
use crate::task_spec::{parse_input, parse_output, parse_param, parse_workgroups, InputArg};
use clap::{ArgGroup, Args, Parser, Subcommand};
use mesh_core::access::Role;
use mesh_core::builtin::MAX_SHARDS;
use mesh_core::duration::parse_duration;
use mesh_core::requirement::Requirement;
use mesh_core::task::OutputDecl;
use mesh_core::token::JoinToken;
use mesh_core::{Fingerprint, NodeId, TaskId};
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
  mesh-cli submit --batch jobs.toml --wait   # many [[task]] tables, one progress bar
  mesh-cli submit --kernel mandelbrot --param width=4096 --param height=4096 --param max_iter=1000 \\
      --shards 16 --prefer device=discrete
  mesh-cli watch 7                           # one line per change, until task 7 ends
  mesh-cli result 5 --output y.bin
  mesh-cli --json tasks --state failed
  mesh-cli tasks --mine --limit 10
  T=$(mesh-cli token create --ttl 30m)       # then on a new machine: mesh-node run --join \"$T\"
  mesh-cli keys add bob.pub --role submitter
  mesh-cli audit --since 1h
  mesh-cli snapshot save mesh.snap
  mesh-cli drain 2                           # before maintenance; mesh-cli undrain 2 after
  mesh-cli remove 3

Exit status:
  0  success
  1  error (one line on stderr: error: ...; with --json also {\"error\": ...} on stdout);
     submit --batch, submit --stream: a task of the batch or a line was not submitted
  2  malformed command line (also a malformed join TOKEN, or a command the node does not know)
  3  submit --wait, submit --batch --wait, watch ID: a task ended failed or cancelled

Settings: a flag wins over its environment variable (MESH_NODE, MESH_IDENTITY, \
MESH_KNOWN_HOSTS, MESH_CLI_CONFIG), which wins over the config file \
(<config dir>/mesh/cli.toml, keys node, identity, known_hosts), which wins over the \
defaults. Shell completions: mesh-cli completions bash|zsh|fish|elvish|powershell.
See docs/cli.md and docs/task-file.md.";

/// mesh-cli's command line.
#[derive(Debug, Parser)]
#[command(name = "mesh-cli", version, about = ABOUT, long_about = LONG_ABOUT, after_help = AFTER_HELP)]
pub struct Cli {
    /// The node to talk to: the SSH endpoint of any mesh-node, as HOST:PORT [default:
    /// `node` in the config file, else 127.0.0.1:7722].
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "MESH_NODE",
        value_name = "HOST:PORT"
    )]
    pub node: Option<NodeAddr>,

    /// Your SSH private key (OpenSSH format, unencrypted). Without it (and without
    /// `identity` in the config file) mesh-cli tries the ed25519 keys of ssh-agent
    /// (SSH_AUTH_SOCK), then ~/.ssh/id_ed25519. Keep passphrase-protected keys in
    /// ssh-agent.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "MESH_IDENTITY",
        value_name = "FILE"
    )]
    pub identity: Option<PathBuf>,

    /// The known_hosts file that pins node host keys (OpenSSH format; `pin` appends to
    /// it) [default: `known_hosts` in the config file, else <config
    /// dir>/mesh/known_hosts, e.g. ~/.config/mesh/known_hosts].
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "MESH_KNOWN_HOSTS",
        value_name = "FILE"
    )]
    pub known_hosts: Option<PathBuf>,

    /// The config file with defaults for --node, --identity and --known-hosts (TOML keys
    /// node, identity, known_hosts) [default: <config dir>/mesh/cli.toml, e.g.
    /// ~/.config/mesh/cli.toml, read if it exists].
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        // Not MESH_CONFIG: that names mesh-node's own config file on the same machine.
        env = "MESH_CLI_CONFIG",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,

    /// Print exactly one JSON document on stdout instead of text (the node's answer, see
    /// docs/ssh-protocol.md; errors as {"error": "..."}). `watch` prints one JSON object
    /// per line instead (JSON Lines).
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

    /// List the nodes of the mesh: Raft role (leader, follower = voter, learner), health
    /// (up, down, removed; `,drained` when drained), when the leader last heard from
    /// each, address, host key fingerprint, GPU adapter (name, device type, backend),
    /// slots in use and labels.
    #[command(after_help = NODES_HELP)]
    Nodes,

    /// List tasks, newest last. The filters combine: a task is shown when it passes every
    /// one.
    #[command(after_help = TASKS_HELP)]
    Tasks(TasksArgs),

    /// Follow tasks live: one line per change of state, node, attempt or shards done.
    /// With ID, until that task ends (exit 0 if it succeeded, 3 if it failed or was
    /// cancelled); without, every task, until Ctrl-C.
    #[command(after_help = WATCH_HELP)]
    Watch {
        /// The task to follow [default: every task you may see].
        id: Option<TaskId>,
    },

    /// Show one task: state, node and attempt, shards done (sharded tasks), inputs and
    /// outputs with SHA-256, the errors of failed attempts, and why a pending task waits.
    #[command(after_help = "Example:\n  mesh-cli task 5")]
    Task {
        /// The task id (as printed by submit).
        id: TaskId,
    },

    /// Submit a task, from a task file or from flags, or many tasks from a batch file.
    #[command(after_help = SUBMIT_HELP)]
    // Boxed: the submit options are far larger than any other command's.
    Submit(Box<SubmitArgs>),

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

    /// Create, list and revoke join tokens: the one-time credentials that let a new
    /// machine enter the mesh.
    #[command(after_help = TOKEN_HELP)]
    Token {
        /// What to do with tokens.
        #[command(subcommand)]
        command: TokenCommand,
    },

    /// Join the node given by --node (a fresh mesh-node on this machine, not yet in a
    /// mesh) to the mesh a join token leads to. Pin that local node first.
    #[command(after_help = JOIN_HELP)]
    Join {
        // A string, checked by `commands`: clap would quote a malformed token, secret
        // and all, in its error.
        /// The token printed by `mesh-cli token create` on a node of the mesh.
        #[arg(value_name = "TOKEN")]
        token: String,
    },

    /// Remove a node from the mesh for good: it leaves the Raft membership, the other
    /// nodes drop its pinned key, its tasks are queued again elsewhere, and its id is
    /// never reused. Asks first, unless --yes is given or stdin is not a terminal.
    #[command(after_help = REMOVE_HELP)]
    Remove {
        // Not named `node`: that is the global --node, and clap keeps one value per name.
        /// The node id, as `mesh-cli nodes` shows it.
        #[arg(value_name = "NODE", value_parser = parse_node_id)]
        id: NodeId,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },

    /// Drain a node: the scheduler places no new tasks on it, so that it can be
    /// maintained or taken away without starting work there. It stays a member of the
    /// mesh, and what already runs there is not cancelled. Undo with `undrain`.
    #[command(after_help = DRAIN_HELP)]
    Drain {
        /// The node id, as `mesh-cli nodes` shows it.
        #[arg(value_name = "NODE", value_parser = parse_node_id)]
        id: NodeId,
    },

    /// Let a drained node take new tasks again.
    #[command(
        after_help = "Example:\n  mesh-cli undrain 2\n\n`mesh-cli nodes` shows drained nodes with HEALTH `up,drained`."
    )]
    Undrain {
        /// The node id, as `mesh-cli nodes` shows it.
        #[arg(value_name = "NODE", value_parser = parse_node_id)]
        id: NodeId,
    },

    /// Grant SSH keys a role, list them, take them away (admin only).
    #[command(after_help = KEYS_HELP)]
    Keys {
        /// What to do with keys.
        #[command(subcommand)]
        command: KeysCommand,
    },

    /// Show the audit trail: who did what to the mesh, and what was refused (admin
    /// only). The node keeps a bounded trail of the latest entries.
    #[command(after_help = AUDIT_HELP)]
    Audit {
        /// Only entries from this long ago until now: 30s, 10m, 1h, 7d.
        #[arg(long, value_name = "DURATION", value_parser = parse_since)]
        since: Option<Duration>,
        /// Only entries of this key, as `mesh-cli keys list` shows its fingerprint.
        #[arg(long, value_name = "SHA256:...")]
        actor: Option<Fingerprint>,
    },

    /// Save the replicated state (admin only): a backup, or evidence for a bug report.
    #[command(after_help = SNAPSHOT_HELP)]
    Snapshot {
        /// What to do with the snapshot.
        #[command(subcommand)]
        command: SnapshotCommand,
    },

    /// Print a shell completion script on stdout.
    #[command(after_help = COMPLETIONS_HELP)]
    Completions {
        /// The shell.
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
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

/// `token`'s commands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a join token and print it alone on stdout (`T=$(mesh-cli token create)`).
    /// The token names this mesh's seed node and its host key fingerprint, so the new
    /// machine checks whom it talks to before presenting the secret. The secret is shown
    /// only now; the mesh keeps its SHA-256.
    #[command(after_help = TOKEN_CREATE_HELP)]
    Create {
        /// How long the token works: 30s, 10m, 1h, 1h30m (the node allows at most 168h,
        /// that is 7 days).
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_token_ttl)]
        ttl: Duration,
        /// How many machines may join with it.
        #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        uses: u32,
    },

    /// List join tokens: id, joins left, time left, revoked, creator (never the secret).
    #[command(
        after_help = "Examples:\n  mesh-cli token list\n  mesh-cli --json token list | jq -r '.[] | select(.revoked | not) | .id'"
    )]
    List,

    /// Revoke a join token, so that no further machine can join with it. Machines that
    /// already joined stay (remove them with `mesh-cli remove NODE`).
    #[command(
        after_help = "Examples:\n  mesh-cli token revoke 3f9c0a6e1b2d4c58\n  mesh-cli token revoke \"$T\"   # the token itself works too"
    )]
    Revoke {
        /// The token id (16 hex digits, as `token list` shows it), or the whole token.
        #[arg(value_name = "ID", value_parser = parse_token_id)]
        id: String,
    },
}

/// `keys`' commands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Grant every public key in FILE (a `.pub` file, or authorized_keys lines) a role.
    /// The file is checked here first: a line that is not a public key is refused with
    /// its line number, and nothing is sent.
    #[command(after_help = KEYS_ADD_HELP)]
    Add {
        /// The public key file, e.g. ~/.ssh/id_ed25519.pub (never the private key).
        #[arg(value_name = "FILE.pub")]
        file: PathBuf,
        /// What the keys may do: viewer (read), submitter (submit and manage its own
        /// tasks), operator (every task; drain nodes), admin (everything).
        #[arg(long, value_name = "ROLE", value_parser = role_parser())]
        role: Role,
    },

    /// Take a key's role away: the key can no longer use the mesh.
    #[command(
        after_help = "Example:\n  mesh-cli keys remove SHA256:4SizsFKgEpYq2GIrnVAh6E69WjsTzV5qJpUgqZ05M+s"
    )]
    Remove {
        /// The key's fingerprint, as `mesh-cli keys list` and `ssh-keygen -lf` print it.
        #[arg(value_name = "SHA256:...")]
        fingerprint: Fingerprint,
    },

    /// List the keys with a role: fingerprint, role, comment, who added it and when.
    #[command(
        after_help = "Examples:\n  mesh-cli keys list\n  mesh-cli --json keys list | jq -r '.[] | select(.role == \"admin\") | .fingerprint'"
    )]
    List,
}

/// `snapshot`'s commands.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Fetch the snapshot and write it to FILE (through FILE.partial, so a failed fetch
    /// leaves no half file); print its size and SHA-256.
    #[command(after_help = "Example:\n  mesh-cli snapshot save mesh-$(date +%F).snap")]
    Save {
        /// Where to write it.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

/// `tasks`' filters.
#[derive(Debug, Args)]
pub struct TasksArgs {
    /// Only tasks in this state.
    #[arg(long, value_name = "STATE", value_parser = ["pending", "assigned", "running", "succeeded", "failed", "cancelled"])]
    pub state: Option<String>,

    /// Only tasks of this kernel: a built-in name (saxpy, matmul...), `wgsl` for every
    /// WGSL task, or `wgsl:ENTRY`.
    #[arg(long, value_name = "NAME")]
    pub kernel: Option<String>,

    // Not `--node`: that is the global --node HOST:PORT, and clap keeps one value per name.
    /// Only tasks on (or last on) this node, as `mesh-cli nodes` shows its id.
    #[arg(long, value_name = "NODE", value_parser = parse_node_id)]
    pub on_node: Option<NodeId>,

    /// Only tasks submitted with the key this command authenticated with.
    #[arg(long)]
    pub mine: bool,

    /// At most the N newest of the tasks that pass the other filters.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
}

impl TasksArgs {
    /// True when a filter applies that the node does not know (only `--state` goes to it).
    pub fn filters_locally(&self) -> bool {
        self.kernel.is_some() || self.on_node.is_some() || self.mine || self.limit.is_some()
    }
}

const TASKS_HELP: &str = "\
Examples:
  mesh-cli tasks
  mesh-cli tasks --state pending
  mesh-cli tasks --mine --limit 10           # my ten newest tasks
  mesh-cli tasks --kernel matmul --on-node 2 --state running
  mesh-cli --json tasks --state failed | jq -r '.[].id'

--state is applied by the node; --kernel, --on-node, --mine and --limit by mesh-cli. \
A submitter sees only its own tasks anyway.";

const WATCH_HELP: &str = "\
Examples:
  mesh-cli watch 7           # until task 7 ends; exit 0 succeeded, 3 failed or cancelled
  mesh-cli watch             # every task, until Ctrl-C
  mesh-cli --json watch | jq -c 'select(.state == \"failed\")'

Output (times are local):
  12:00:01 task 7 pending (no live node has a free slot)
  12:00:02 task 7 running on node 2 (attempt 1)
  12:00:09 task 7 succeeded

mesh-cli asks the node every 500ms over one SSH connection. Without ID it first prints \
the tasks that have not ended, then every change. On a terminal, stderr shows a spinner \
with the task's progress (watch ID) or the number of tasks in each state (watch). With \
--json, stdout holds one JSON object per line (JSON Lines), one per change: \
{\"at_ms\", \"task\", \"state\", \"node\", \"attempt\", \"max_attempts\", \"shards\", \
\"shards_done\", \"waiting\", \"error\"}.";

const KEYS_HELP: &str = "\
Roles, weakest first: viewer (read status, nodes, tasks, results), submitter (submit; \
see, wait for, fetch and cancel its own tasks), operator (every task; drain and undrain \
nodes), admin (everything: tokens, keys, remove nodes, audit, snapshots).

Examples:
  mesh-cli keys add bob.pub --role submitter
  mesh-cli keys list
  mesh-cli keys remove SHA256:4SizsFKgEpYq2GIrnVAh6E69WjsTzV5qJpUgqZ05M+s";

const KEYS_ADD_HELP: &str = "\
Examples:
  mesh-cli keys add bob.pub --role submitter
  mesh-cli keys add team_authorized_keys --role viewer   # every key in the file
  mesh-cli --json keys add ci.pub --role operator | jq -r '.added[]'";

const AUDIT_HELP: &str = "\
Examples:
  mesh-cli audit
  mesh-cli audit --since 1h
  mesh-cli audit --actor SHA256:4SizsFKgEpYq2GIrnVAh6E69WjsTzV5qJpUgqZ05M+s --since 7d
  mesh-cli --json audit | jq -r '.[] | select(.outcome != \"ok\") | .actor' | sort | uniq -c

TIME is local time. The table shortens ACTOR fingerprints to their first characters; \
--json has them whole. OUTCOME is ok, or refused: and why.";

const SNAPSHOT_HELP: &str = "\
The snapshot is the mesh's whole replicated state as the node holds it (nodes, tasks \
with their input and output bytes, user keys, join tokens without their secrets, the \
audit trail), encoded with mesh-core's codec. It is written readable by you alone. A \
new mesh starts from it with `mesh-node run --restore FILE` on an empty data directory.

Examples:
  mesh-cli snapshot save mesh-$(date +%F).snap
  mesh-cli --json snapshot save backup.snap | jq -r .sha256";

const COMPLETIONS_HELP: &str = "\
Examples:
  mesh-cli completions bash > ~/.local/share/bash-completion/completions/mesh-cli
  mesh-cli completions zsh > \"${fpath[1]}/_mesh-cli\"
  mesh-cli completions fish > ~/.config/fish/completions/mesh-cli.fish
  mesh-cli completions elvish >> ~/.config/elvish/rc.elv
  mesh-cli completions powershell >> $PROFILE";

const NODES_HELP: &str = "\
HEALTH is up, down (silent too long; its tasks move elsewhere) or removed, with \
`,drained` added for a node that takes no new tasks (`mesh-cli drain NODE`). LAST \
CONTACT is how long ago the leader last heard from the node (`-` when the node you \
ask is not the leader, or has not heard from it yet).

Examples:
  mesh-cli nodes
  mesh-cli --json nodes | jq '.[] | select(.health != \"up\") | .id'
  mesh-cli --json nodes | jq '.[] | select(.drained) | .id'";

const TOKEN_HELP: &str = "\
Adding a machine to the mesh:
  # On any node of the mesh (or anywhere with mesh-cli and a pin for one):
  T=$(mesh-cli token create --ttl 30m)
  # On the new machine, hand over $T (it is a secret), then either
  mesh-node run --join \"$T\"
  # or, with mesh-node already running there unjoined and pinned:
  mesh-cli --node 127.0.0.1:7722 join \"$T\"

Examples:
  mesh-cli token create --ttl 2h --uses 3
  mesh-cli token list
  mesh-cli token revoke 3f9c0a6e1b2d4c58";

const TOKEN_CREATE_HELP: &str = "\
Examples:
  T=$(mesh-cli token create)                 # 1 join, valid for 1h
  mesh-cli token create --ttl 2h --uses 3    # 3 machines within 2 hours
  mesh-cli --json token create | jq -r .token

Then, on the new machine: mesh-node run --join TOKEN (or mesh-cli join TOKEN).";

const JOIN_HELP: &str = "\
The token is checked here first (format, seed address, seed fingerprint); the node \
then contacts the seed, checks the seed's host key against the token's fingerprint, \
and presents the secret. The token is a secret: it is never echoed in error messages.

Examples:
  mesh-node fingerprint                        # on this machine, then pin it:
  mesh-cli pin 127.0.0.1:7722 SHA256:...
  mesh-cli --node 127.0.0.1:7722 join \"$T\"
  mesh-cli --node 127.0.0.1:7722 status        # shows the mesh it joined";

const DRAIN_HELP: &str = "\
Examples:
  mesh-cli drain 2           # node 2 takes no new tasks
  mesh-cli nodes             # HEALTH shows up,drained; SLOTS shows what still runs there
  mesh-cli undrain 2         # node 2 takes tasks again

Unlike `remove`, a drain is undone by `undrain`: the node keeps its id, its place in \
the Raft membership and its pinned key. Tasks that need a drained node wait, and \
`mesh-cli task ID` says so.";

const REMOVE_HELP: &str = "\
Examples:
  mesh-cli remove 3          # asks: remove node 3 (10.0.0.3:7700) from the mesh for good? [y/N]
  mesh-cli remove 3 --yes    # no question (also when stdin is not a terminal)

A removed node stays listed by `mesh-cli nodes` with health `removed`. To bring the \
machine back, join it again with a new token: it enters under a new id.";

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

Placement: every --require must hold on the node that runs the task; a task no \
node could ever run is refused at submit. Among the nodes that qualify, --prefer \
picks: nodes meeting the first preference come first, then the second, and so on. A \
preference never makes a task wait.
  mesh-cli submit --kernel saxpy --param a=2 --input x=@x.bin --input y=@y.bin \\
      --require backend=vulkan --require 'max_buffer_size>=268435456' \\
      --require 'label:zone in eu-1,eu-2' --prefer device=discrete --prefer label:zone=eu-1

Sharding: --shards N splits a built-in kernel's work (saxpy and vector-add by \
element, matmul and mandelbrot by row) into N parts. Each finished shard is committed \
as a checkpoint, so a task that moves to another node resumes from its last \
checkpoint instead of starting over. The output is the same, bit for bit.
  mesh-cli submit --kernel matmul --param m=1024 --param n=1024 --param k=1024 \\
      --input a=@a.bin --input b=@b.bin --shards 8 --wait

Batches: --batch FILE submits every [[task]] table of FILE (each one a task file's \
keys) over one connection, with a progress bar on stderr when it is a terminal. Each \
task prints `#N: task ID submitted` or `#N (line L): not submitted: why`, then a summary; \
the exit status is 1 if any was not submitted. With --json: an array of {\"index\", \
\"task\", \"existing\", \"error\"} (index counts [[task]] tables from 1; with --wait also \
\"state\").
  # jobs.toml
  [[task]]
  kernel = \"saxpy\"
  params = { a = 2 }
  inputs = { x = \"@x.bin\", y = \"@y.bin\" }
  [[task]]
  kernel = \"mandelbrot\"
  params = { width = 800, height = 600, max_iter = 500 }
  shards = 4

  mesh-cli submit --batch jobs.toml --priority 5 --wait

Streams: --stream FILE (or - for standard input) reads JSON Lines, one TaskSpec per line as the node's submit-stream takes it (docs/ssh-protocol.md; byte buffers base64), and sends each line as soon as it is read, so a producer can pipe tasks in as it makes them. Each line prints `line N: task ID submitted` (or `line N: not submitted: why`) as soon as it is committed, in input order; blank lines are skipped; the exit status is 1 if any line was not submitted. With --json: one {\"line\", \"task\", \"existing\", \"error\"} object per line (JSON Lines).
  make-tasks | mesh-cli submit --stream - --priority 2

With --wait, mesh-cli waits for the task (or every task of the batch) to finish and \
exits 3 if one failed or was cancelled. With --json it prints the SubmitReply, or with \
--wait the final TaskView. A task file's policy (timeout, attempts, priority, key, \
shards) can be overridden by flags; --require and --prefer add to the file's \
requirements and preferences (after them).";

const RESULT_HELP: &str = "\
Examples:
  mesh-cli result 5                          # list outputs with sizes and SHA-256
  mesh-cli result 5 --output y.bin           # the first output, verified
  mesh-cli result 7 --name c --output c.bin  # a named output
  mesh-cli result 9 --png mandelbrot.png     # a mandelbrot task as an image";

/// `submit`'s options.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("what").required(true).args(["task_file", "kernel", "wgsl", "batch", "stream"])))]
pub struct SubmitArgs {
    /// A task file (TOML) describing the whole task; see docs/task-file.md.
    #[arg(value_name = "TASK_FILE")]
    pub task_file: Option<PathBuf>,

    /// A batch file: many tasks, each a [[task]] table in the task-file format (paths
    /// relative to the batch file). Every task is checked before the first is sent; they
    /// go in chunks (the node's submit-batch) over one connection. The policy flags
    /// apply to each.
    #[arg(long, value_name = "FILE")]
    pub batch: Option<PathBuf>,

    /// JSON Lines of tasks, one TaskSpec per line in the node's wire format
    /// (docs/ssh-protocol.md; byte buffers base64), from FILE or, with -, standard
    /// input. Each line is checked and sent as soon as it is read, and answered as soon
    /// as it is committed (up to 64 in flight), over one connection: for a producer
    /// that makes tasks as it goes. The policy flags apply to each line.
    #[arg(long, value_name = "FILE")]
    pub stream: Option<PathBuf>,

    /// A built-in kernel: saxpy, vector-add, matmul, reduce-sum or mandelbrot.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["task_file", "wgsl"])]
    pub kernel: Option<String>,

    /// A built-in kernel's parameter (repeat for each), e.g. a=2.
    #[arg(long = "param", value_name = "K=V", value_parser = parse_param, conflicts_with_all = ["task_file", "wgsl", "batch", "stream"])]
    pub params: Vec<(String, String)>,

    /// A WGSL compute shader file.
    #[arg(long, value_name = "FILE", conflicts_with = "task_file")]
    pub wgsl: Option<PathBuf>,

    /// The WGSL entry point [default: main].
    #[arg(long, value_name = "NAME", conflicts_with_all = ["task_file", "kernel", "batch", "stream"])]
    pub entry: Option<String>,

    /// Workgroup counts of the WGSL dispatch: X, X,Y or X,Y,Z (missing counts are 1).
    #[arg(long, value_name = "X,Y,Z", value_parser = parse_workgroups, conflicts_with_all = ["task_file", "kernel", "batch", "stream"])]
    pub workgroups: Option<[u32; 3]>,

    /// An input buffer read from a file (repeat for each, in binding order), e.g. x=@x.bin.
    #[arg(long = "input", value_name = "NAME=@FILE", value_parser = parse_input, conflicts_with_all = ["task_file", "batch", "stream"])]
    pub inputs: Vec<InputArg>,

    /// An output buffer of a WGSL kernel with its size in bytes (repeat for each), e.g. y=4096.
    #[arg(long = "output", value_name = "NAME=BYTES", value_parser = parse_output, conflicts_with_all = ["task_file", "kernel", "batch", "stream"])]
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

    /// What the node must offer (repeat for each; all must hold). EXPR is one of:
    /// device=discrete|integrated|virtual|cpu, backend=vulkan, vendor=nvidia,
    /// feature=shader-f16; LIMIT>=N with LIMIT one of max_buffer_size,
    /// max_storage_buffer_binding_size, max_compute_invocations_per_workgroup,
    /// max_compute_workgroup_size_x; label:KEY=VALUE, label:KEY!=VALUE,
    /// 'label:KEY in V1,V2' (quote it: it holds a space).
    #[arg(long = "require", value_name = "EXPR", value_parser = Requirement::parse)]
    pub requirements: Vec<Requirement>,

    /// A soft preference, in the EXPR syntax of --require (repeat for each, most
    /// important first): among the nodes that meet every requirement, those meeting
    /// earlier preferences are chosen first. E.g. --prefer device=discrete --prefer
    /// label:zone=a.
    #[arg(long = "prefer", value_name = "EXPR", value_parser = Requirement::parse)]
    pub prefer: Vec<Requirement>,

    /// Split a built-in kernel's work into N shards, each committed as a checkpoint when
    /// done, so that a moved task resumes where it stopped (saxpy, vector-add, matmul,
    /// mandelbrot; at most one shard per element or row) [default: 1, not sharded].
    #[arg(long, value_name = "N", value_parser = parse_shards)]
    pub shards: Option<u32>,

    /// Submitting again with the same key returns the existing task instead of a new one.
    /// Not with --batch or --stream (every task would be the same one): give each task
    /// its own idempotency_key.
    #[arg(long, value_name = "KEY", conflicts_with_all = ["batch", "stream"])]
    pub idempotency_key: Option<String>,

    /// Wait until the task finishes (with --batch: every task); exit 3 if one failed or
    /// was cancelled. Not with --stream (it may never end): follow its tasks with
    /// `mesh-cli watch`.
    #[arg(long, conflicts_with = "stream")]
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

/// `--ttl` of `token create`: a duration of at least one second.
fn parse_token_ttl(text: &str) -> Result<Duration, String> {
    let ttl = parse_duration(text)?;
    if ttl < Duration::from_secs(1) {
        return Err(format!(
            "a token must live at least 1s, not {text}; write e.g. 10m, 1h or 24h"
        ));
    }
    Ok(ttl)
}

/// A token id: 16 hex digits, or the id inside a whole token.
fn parse_token_id(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.len() == 16 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(text.to_ascii_lowercase());
    }
    match JoinToken::parse(text) {
        Ok(token) => Ok(token.id),
        Err(_) => Err(
            "expected a token id: 16 hex digits, as `mesh-cli token list` shows (or the whole token)"
                .into(),
        ),
    }
}

/// `--shards`: 1 to `MAX_SHARDS`. Whether the kernel can be split that many ways is
/// checked with the whole task (`task_spec::check_locally`).
fn parse_shards(text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(n) if (1..=MAX_SHARDS).contains(&n) => Ok(n),
        _ => Err(format!(
            "expected a number of shards from 1 to {MAX_SHARDS} (1 runs the task whole), e.g. --shards 8"
        )),
    }
}

/// `--since` of `audit`: a duration of at least a millisecond.
fn parse_since(text: &str) -> Result<Duration, String> {
    let since = parse_duration(text)?;
    if since < Duration::from_millis(1) {
        return Err(format!(
            "--since must be at least 1ms, not {text}; write e.g. 10m, 1h or 7d"
        ));
    }
    Ok(since)
}

/// `--role` of `keys add`: the four role names, listed by `--help` and completions.
fn role_parser() -> impl clap::builder::TypedValueParser<Value = Role> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(["admin", "operator", "submitter", "viewer"])
        .map(|name| Role::parse(&name).expect("every possible value is a role"))
}

/// A node id: the number `mesh-cli nodes` shows.
fn parse_node_id(text: &str) -> Result<NodeId, String> {
    text.trim()
        .parse()
        .map(NodeId)
        .map_err(|_| "expected a node id: a number, as `mesh-cli nodes` shows".into())
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
        assert_eq!(c.node.unwrap().to_string(), "h:1");
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

    #[test]
    fn token_commands_check_their_arguments() {
        let create = |extra: &[&str]| {
            let mut argv = vec!["mesh-cli", "token", "create"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).map(|c| match c.command {
                Command::Token {
                    command: TokenCommand::Create { ttl, uses },
                } => (ttl, uses),
                other => panic!("{other:?}"),
            })
        };
        assert_eq!(create(&[]).unwrap(), (Duration::from_secs(3600), 1));
        assert_eq!(
            create(&["--ttl", "1h30m", "--uses", "3"]).unwrap(),
            (Duration::from_secs(5400), 3)
        );
        assert_eq!(
            create(&["--ttl", "1.5s"]).unwrap().0,
            Duration::from_millis(1500)
        );
        for bad in [
            &["--ttl", "30"][..],
            &["--ttl", "500ms"],
            &["--ttl", "0s"],
            &["--ttl", "soon"],
            &["--uses", "0"],
            &["--uses", "-1"],
            &["--uses", "many"],
        ] {
            assert!(create(bad).is_err(), "{bad:?}");
        }
        let e = create(&["--ttl", "30"]).unwrap_err().to_string();
        assert!(e.contains("a unit is missing"), "{e}");

        let revoke = |id: &str| {
            Cli::try_parse_from(["mesh-cli", "token", "revoke", id]).map(|c| match c.command {
                Command::Token {
                    command: TokenCommand::Revoke { id },
                } => id,
                other => panic!("{other:?}"),
            })
        };
        assert_eq!(revoke("3F9C0A6E1B2D4C58").unwrap(), "3f9c0a6e1b2d4c58");
        let token = JoinToken::new(
            [0x3f; 8],
            [1; 16],
            "10.0.0.1:7700".into(),
            Fingerprint::of_key_blob(b"seed"),
        );
        assert_eq!(revoke(&token.encode()).unwrap(), "3f3f3f3f3f3f3f3f");
        for bad in ["3f9c", "3f9c0a6e1b2d4c5z", ""] {
            assert!(revoke(bad).is_err(), "{bad:?}");
        }
        assert!(Cli::try_parse_from(["mesh-cli", "token", "revoke"]).is_err());
        assert!(Cli::try_parse_from(["mesh-cli", "token"]).is_err());
        assert!(matches!(
            Cli::try_parse_from(["mesh-cli", "token", "list", "--json"])
                .unwrap()
                .command,
            Command::Token {
                command: TokenCommand::List
            }
        ));
    }

    #[test]
    fn join_and_remove_check_their_arguments() {
        let token = JoinToken::new(
            [2; 8],
            [3; 16],
            "10.0.0.1:7700".into(),
            Fingerprint::of_key_blob(b"seed"),
        );
        // The token is checked by `commands`, where an error need not quote it.
        let c = Cli::try_parse_from(["mesh-cli", "join", &token.encode()]).unwrap();
        assert!(matches!(c.command, Command::Join { token: t } if t == token.encode()));

        let c = Cli::try_parse_from(["mesh-cli", "remove", "3"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Remove {
                id: NodeId(3),
                yes: false
            }
        ));
        let c = Cli::try_parse_from(["mesh-cli", "remove", "-y", "4"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Remove {
                id: NodeId(4),
                yes: true
            }
        ));
        let e = Cli::try_parse_from(["mesh-cli", "remove", "node2"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected a node id"), "{e}");
        assert!(Cli::try_parse_from(["mesh-cli", "remove"]).is_err());
    }

    #[test]
    fn drain_and_undrain_take_a_node_id() {
        let c = Cli::try_parse_from(["mesh-cli", "drain", "2"]).unwrap();
        assert!(matches!(c.command, Command::Drain { id: NodeId(2) }));
        let c = Cli::try_parse_from(["mesh-cli", "undrain", "2", "--json"]).unwrap();
        assert!(matches!(c.command, Command::Undrain { id: NodeId(2) }));
        assert!(c.json);
        let e = Cli::try_parse_from(["mesh-cli", "drain", "node2"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected a node id"), "{e}");
        assert!(Cli::try_parse_from(["mesh-cli", "undrain"]).is_err());
        assert!(Cli::try_parse_from(["mesh-cli", "drain", "2", "--yes"]).is_err());
    }

    #[test]
    fn keys_audit_and_snapshot_check_their_arguments() {
        let fp = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s";
        let c = Cli::try_parse_from(["mesh-cli", "keys", "add", "bob.pub", "--role", "submitter"])
            .unwrap();
        assert!(matches!(
            c.command,
            Command::Keys { command: KeysCommand::Add { ref file, role: Role::Submitter } }
                if file == &PathBuf::from("bob.pub")
        ));
        let e = Cli::try_parse_from(["mesh-cli", "keys", "add", "bob.pub", "--role", "root"])
            .unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string()
                .contains("[possible values: admin, operator, submitter, viewer]"),
            "{e}"
        );
        assert!(Cli::try_parse_from(["mesh-cli", "keys", "add", "bob.pub"]).is_err());
        assert!(Cli::try_parse_from(["mesh-cli", "keys", "remove", fp]).is_ok());
        let e = Cli::try_parse_from(["mesh-cli", "keys", "remove", "SHA256:short"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a key fingerprint"), "{e}");

        let c =
            Cli::try_parse_from(["mesh-cli", "audit", "--since", "1h30m", "--actor", fp]).unwrap();
        let Command::Audit { since, actor } = c.command else {
            panic!()
        };
        assert_eq!(since, Some(Duration::from_secs(5400)));
        assert_eq!(actor.unwrap().as_str(), fp);
        for bad in [
            &["--since", "0s"][..],
            &["--since", "10"],
            &["--actor", "bob"],
        ] {
            let mut argv = vec!["mesh-cli", "audit"];
            argv.extend_from_slice(bad);
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
        }

        let c = Cli::try_parse_from(["mesh-cli", "snapshot", "save", "s.snap"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Snapshot { command: SnapshotCommand::Save { ref file } } if file == &PathBuf::from("s.snap")
        ));
        assert!(Cli::try_parse_from(["mesh-cli", "snapshot", "save"]).is_err());
        assert!(Cli::try_parse_from(["mesh-cli", "snapshot"]).is_err());
    }

    #[test]
    fn tasks_filters_watch_and_completions_parse() {
        let c = Cli::try_parse_from([
            "mesh-cli",
            "tasks",
            "--state",
            "running",
            "--kernel",
            "wgsl",
            "--on-node",
            "2",
            "--mine",
            "--limit",
            "5",
        ])
        .unwrap();
        let Command::Tasks(t) = c.command else {
            panic!()
        };
        assert_eq!(
            (
                t.state.as_deref(),
                t.kernel.as_deref(),
                t.on_node,
                t.mine,
                t.limit
            ),
            (
                Some("running"),
                Some("wgsl"),
                Some(NodeId(2)),
                true,
                Some(5)
            )
        );
        assert!(t.filters_locally());
        let c = Cli::try_parse_from(["mesh-cli", "tasks", "--state", "failed"]).unwrap();
        let Command::Tasks(t) = c.command else {
            panic!()
        };
        assert!(!t.filters_locally(), "--state alone goes to the node");
        assert!(Cli::try_parse_from(["mesh-cli", "tasks", "--limit", "0"]).is_err());
        // `--node 2` is the global option, and a bare number is no host: the error says
        // where the node filter is.
        let e = Cli::try_parse_from(["mesh-cli", "tasks", "--node", "2"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("tasks --on-node N"), "{e}");

        let c = Cli::try_parse_from(["mesh-cli", "watch", "7"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Watch {
                id: Some(TaskId(7))
            }
        ));
        let c = Cli::try_parse_from(["mesh-cli", "--json", "watch"]).unwrap();
        assert!(matches!(c.command, Command::Watch { id: None }));
        assert!(Cli::try_parse_from(["mesh-cli", "watch", "seven"]).is_err());

        for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
            assert!(
                Cli::try_parse_from(["mesh-cli", "completions", shell]).is_ok(),
                "{shell}"
            );
        }
        assert!(Cli::try_parse_from(["mesh-cli", "completions", "tcsh"]).is_err());

        let c = Cli::try_parse_from(["mesh-cli", "--config", "c.toml", "status"]).unwrap();
        assert_eq!(c.config, Some(PathBuf::from("c.toml")));
    }

    #[test]
    fn a_batch_takes_policy_flags_but_no_task_of_its_own() {
        let batch = |extra: &[&str]| submit_as(&["--batch", "jobs.toml"], extra);
        let s = batch(&[
            "--wait",
            "--priority",
            "5",
            "--timeout",
            "2m",
            "--prefer",
            "device=cpu",
        ])
        .unwrap();
        assert_eq!(s.batch, Some(PathBuf::from("jobs.toml")));
        assert!(s.wait);
        for bad in TASK_OF_ITS_OWN {
            assert!(batch(bad).is_err(), "{bad:?}");
        }
    }

    /// Flags that describe one task: `--batch` and `--stream` refuse them all.
    const TASK_OF_ITS_OWN: [&[&str]; 6] = [
        &["t.toml"],
        &["--kernel", "saxpy"],
        &["--wgsl", "k.wgsl"],
        &["--input", "x=@x.bin"],
        &["--param", "a=2"],
        &["--idempotency-key", "k"],
    ];

    #[test]
    fn a_stream_takes_policy_flags_but_no_task_of_its_own_and_no_wait() {
        let stream = |extra: &[&str]| submit_as(&["--stream", "-"], extra);
        let s = stream(&["--priority", "5", "--max-attempts", "2"]).unwrap();
        assert_eq!(s.stream, Some(PathBuf::from("-")));
        assert_eq!((s.priority, s.max_attempts), (Some(5), Some(2)));
        let also: [&[&str]; 2] = [&["--batch", "jobs.toml"], &["--wait"]];
        for bad in TASK_OF_ITS_OWN.iter().chain(&also) {
            assert!(stream(bad).is_err(), "{bad:?}");
        }
    }

    fn submit(extra: &[&str]) -> Result<SubmitArgs, clap::Error> {
        submit_as(&["--kernel", "saxpy"], extra)
    }

    /// `mesh-cli submit WHAT... EXTRA...`, parsed.
    fn submit_as(what: &[&str], extra: &[&str]) -> Result<SubmitArgs, clap::Error> {
        let mut argv = vec!["mesh-cli", "submit"];
        argv.extend_from_slice(what);
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|c| match c.command {
            Command::Submit(s) => *s,
            other => panic!("{other:?}"),
        })
    }

    #[test]
    fn placement_and_shard_flags_parse_in_order() {
        let s = submit(&[
            "--shards",
            "8",
            "--require",
            "label:zone in a, b",
            "--require",
            "max_compute_workgroup_size_x>=256",
            "--prefer",
            "device=discrete",
            "--prefer",
            "label:zone=a",
        ])
        .unwrap();
        assert_eq!(s.shards, Some(8));
        let shown = |r: &[Requirement]| r.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(
            shown(&s.requirements),
            ["label:zone in a,b", "max_compute_workgroup_size_x>=256"]
        );
        assert_eq!(
            shown(&s.prefer),
            ["device=discrete", "label:zone=a"],
            "preferences keep the order given: the first weighs most"
        );
        let s = submit(&[]).unwrap();
        assert_eq!((s.shards, s.prefer.len()), (None, 0));
        // A task file takes --shards and --prefer too.
        assert!(Cli::try_parse_from([
            "mesh-cli",
            "submit",
            "t.toml",
            "--shards",
            "4",
            "--prefer",
            "vendor=nvidia"
        ])
        .is_ok());
    }

    #[test]
    fn bad_placement_and_shard_flags_are_usage_errors() {
        for bad in [
            &["--shards", "0"][..],
            &["--shards", "-2"],
            &["--shards", "many"],
            &["--shards", "1025"],
            &["--prefer", "gpu=fast"],
            &["--prefer", "device=gpu"],
            &["--require", "max_buffer_size>=lots"],
            &["--require", "max_memory>=1"],
            &["--require", "label:zone in"],
        ] {
            let e = submit(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
        let e = submit(&["--shards", "0"]).unwrap_err().to_string();
        assert!(
            e.contains("expected a number of shards from 1 to 1024 (1 runs the task whole)"),
            "{e}"
        );
        let e = submit(&["--prefer", "colour=red"]).unwrap_err().to_string();
        assert!(
            e.contains("cannot read requirement 'colour=red': unknown key 'colour'"),
            "{e}"
        );
        let e = submit(&["--require", "max_memory>=1"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown limit 'max_memory'"), "{e}");
    }
}
