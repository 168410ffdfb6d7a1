//! The `locksmith` binary: parse the flags, set up tracing, run one command, and map
//! the outcome to the documented exit code (see `locksmith --help`).
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use locksmith::cli::{Cli, Command};

fn main() -> ExitCode {
    if let Some(code) = cli_docs::hidden_command::<Cli>("locksmith", "1") {
        return code;
    }
    let cli = Cli::parse();
    let default_level = match cli.command {
        // The daemon and reboot log to the journal; `run` keeps stderr to its command.
        Command::Daemon { .. } | Command::Reboot { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // No color codes in the journal or in log files.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOCKSMITH_LOG")
                .unwrap_or_else(|_| default_level.into()),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(locksmith::commands::run(cli));
    // Don't wait for tasks still blocked on I/O (a watch stream) at exit.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let broken_pipe = e
                .chain()
                .filter_map(|c| c.downcast_ref::<std::io::Error>())
                .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe);
            if broken_pipe {
                return ExitCode::SUCCESS;
            }
            eprintln!("Error: {e:#}");
            ExitCode::from(locksmith::commands::exit_code(&e))
        }
    }
}
