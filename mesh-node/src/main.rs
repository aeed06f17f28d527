//! `mesh-node`: the Mesh daemon's command line.

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh_node::config::RunArgs;
use mesh_node::host_key::HostKey;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc's malloc: a submit allocates and frees many small
/// objects (decoded specs, commands, log and RPC buffers) across tokio's threads,
/// which glibc's per-thread arenas serve slowly (docs/benchmarks.md, batched submits).
/// Built with `no_thp` (workspace Cargo.toml): mimalloc otherwise asks for transparent
/// huge pages, and the kernel zeroing each fresh 2 MiB page was 7 % of all CPU at 16
/// clients.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Mesh daemon: one per machine. Nodes form a Raft group that schedules WGSL
/// compute tasks onto their GPUs. Operators talk to it over SSH with `mesh-cli` or
/// plain OpenSSH.
#[derive(Parser)]
#[command(
    name = "mesh-node",
    version,
    after_help = "Examples:
  mesh-node                      start a node with defaults (data under ~/.local/share/mesh,
                                 SSH on 127.0.0.1:7722, your ~/.ssh/id_ed25519.pub as admin)
  mesh-node run --data-dir /var/lib/mesh --admin-key ~/.ssh/id_ed25519.pub
  mesh-node fingerprint --data-dir /var/lib/mesh   print the host key fingerprint to pin"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

// Parsed once at start; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Run the node (the default when no command is given).
    Run(RunArgs),
    /// Print the node's host key fingerprint, as `ssh-keygen -lf` prints it.
    Fingerprint {
        /// Data directory holding the generated host key.
        #[arg(long, env = "MESH_DATA_DIR", value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Host key file, if the node runs with --host-key.
        #[arg(long, env = "MESH_HOST_KEY", value_name = "FILE")]
        host_key: Option<PathBuf>,
    },
    /// Check a node config file: parse it (unknown keys are errors), apply the
    /// defaults, and print the resulting settings.
    Config {
        #[command(subcommand)]
        command: ConfigCmd,
    },
    /// Internal: a GPU worker process, started by the node itself to run kernels
    /// (jobs on stdin, results on stdout). Not for operators.
    #[command(name = "gpu-worker", hide = true)]
    GpuWorker,
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate FILE and print the settings a node would run with.
    Check {
        /// The TOML file.
        file: PathBuf,
    },
}

fn config_check(file: PathBuf) -> anyhow::Result<()> {
    let c = RunArgs {
        config: Some(file.clone()),
        ..RunArgs::default()
    }
    .validate()?;
    println!(
        "{} is valid; a node started with it runs with:",
        file.display()
    );
    println!("  data_dir            {}", c.data_dir.display());
    println!("  listen              {}", c.listen);
    println!("  ssh_listen          {}", c.ssh_listen);
    println!("  http_listen         {}", c.http_listen);
    println!("  slots               {}", c.slots);
    println!(
        "  worker_threads      {}",
        c.worker_threads
            .map_or_else(|| "one per core".to_string(), |n| n.to_string())
    );
    println!("  voters              {}", c.voters);
    println!("  node_timeout        {:?}", c.node_timeout);
    println!("  voter_replace_after {:?}", c.voter_replace_after);
    println!("  labels              {:?}", c.labels);
    println!("  admin_keys          {:?}", c.admin_keys);
    println!(
        "  join                {}",
        if c.join.is_some() {
            "yes (token given)"
        } else {
            "no"
        }
    );
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Cmd::GpuWorker) => std::process::exit(mesh_node::gpu::child::serve()),
        Some(Cmd::Fingerprint { data_dir, host_key }) => fingerprint(data_dir, host_key),
        Some(Cmd::Config {
            command: ConfigCmd::Check { file },
        }) => config_check(file),
        Some(Cmd::Run(args)) => run(args),
        None => run(RunArgs::parse_from_defaults()),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

trait Defaults {
    fn parse_from_defaults() -> RunArgs;
}

impl Defaults for RunArgs {
    /// `mesh-node` with no arguments: `run` with every default (environment still applies).
    fn parse_from_defaults() -> RunArgs {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            args: RunArgs,
        }
        Only::parse_from(["mesh-node"]).args
    }
}

fn fingerprint(data_dir: Option<PathBuf>, host_key: Option<PathBuf>) -> anyhow::Result<()> {
    let path = match (host_key, data_dir) {
        (Some(k), _) => k,
        (None, Some(d)) => d.join(mesh_node::host_key::HOST_KEY_FILE),
        (None, None) => dirs::data_dir()
            .context("no --data-dir given")?
            .join("mesh")
            .join(mesh_node::host_key::HOST_KEY_FILE),
    };
    let key = HostKey::load(&path)?;
    println!("{}", key.fingerprint());
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = args.validate()?;
    config.prepare()?;
    mesh_node::telemetry::init_logs(config.json_logs);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(n) = config.worker_threads {
        runtime.worker_threads(n);
    }
    let runtime = runtime.build().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        tracing::info!(worker_threads = workers, "async runtime started");
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("signal handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            signal.cancel();
        });
        mesh_node::node::run(config, shutdown).await
    })
}
