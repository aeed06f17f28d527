//! `mesh-cli`, the operator client: parse the command line, run the command over SSH,
//! and turn the outcome into output and an exit status (0 ok, 1 error, 2 usage,
//! 3 waited-for task failed).

mod args;
mod batch_file;
mod commands;
mod config;
mod exit_code;
// Compiled into the library's and the binary's tests; each uses a part of it.
#[cfg(test)]
#[allow(dead_code)]
mod fake_node;
mod png_out;
mod render;
mod task_file;
mod task_spec;

// The session, pinning and identity live in the library (shared with mesh-bench).
use mesh_cli::{connection, host_keys, identity, node_addr};

use clap::Parser as _;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Usage errors, --help and --version exit here (2 or 0), as clap does.
    let cli = args::Cli::parse();
    let json = cli.json;
    // `watch --json` prints JSON Lines, so its error document must be one line too.
    let json_lines = matches!(cli.command, args::Command::Watch { .. });
    let outcome = match &cli.command {
        // Completions need neither settings nor a node.
        args::Command::Completions { shell } => commands::completions(*shell),
        _ => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(async {
                let ctx = commands::Context::from_cli(&cli)?;
                commands::run(cli, &ctx).await
            }),
            Err(e) => Err(anyhow::Error::new(e).context("cannot start the async runtime")),
        },
    };
    match outcome {
        Ok(()) => ExitCode::from(mesh_core::api::EXIT_OK as u8),
        Err(err) => {
            let message = exit_code::one_line(&format!("{err:#}"));
            if json && !exit_code::reported_on_stdout(&err) {
                let error = mesh_core::api::ErrorView {
                    error: message.clone(),
                };
                let _ = if json_lines {
                    commands::print_json_line(&error)
                } else {
                    commands::print_json(&error)
                };
            }
            eprintln!("error: {message}");
            ExitCode::from(exit_code::exit_status_of(&err) as u8)
        }
    }
}
