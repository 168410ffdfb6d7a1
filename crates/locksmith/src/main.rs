//! The `locksmith` binary: parse the flags, set up tracing, run one command, and map
//! the outcome to the documented exit code (see `locksmith --help`).
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use locksmith::cli::{Cli, Command};

fn main() -> ExitCode {
    if let Some(code) = hidden_command() {
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

/// Commands for the repository's scripts and tests, not clap commands (so they stay
/// out of the CLI, its help and completions):
/// - `locksmith generate-man DIR` writes DIR/locksmith.1 from the clap definitions (scripts/gen-man;
///   a test compares the result with man/);
/// - `locksmith check-args ARGS...` only parses ARGS as `locksmith ARGS...` would: exit 0, or the
///   usage error and exit 2 (the README test checks every documented command this way).
fn hidden_command() -> Option<ExitCode> {
    use clap::{CommandFactory, Parser};
    let mut args = std::env::args_os().skip(1);
    let first = args.next()?;
    if first == "check-args" {
        let argv = std::iter::once("locksmith".into()).chain(args);
        return Some(match <Cli>::try_parse_from(argv) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) if !e.use_stderr() => ExitCode::SUCCESS, // --help, --version
            Err(e) => {
                eprint!("{e}");
                ExitCode::from(2)
            }
        });
    }
    if first != "generate-man" {
        return None;
    }
    let Some(dir) = args.next() else {
        eprintln!("usage: locksmith generate-man DIR");
        return Some(ExitCode::from(2));
    };
    let path = std::path::Path::new(&dir).join("locksmith.1");
    let man = clap_mangen::Man::new(<Cli>::command()).section("1");
    let mut page = Vec::new();
    match man
        .render(&mut page)
        .and_then(|()| std::fs::write(&path, page))
    {
        Ok(()) => Some(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("locksmith: cannot write {}: {e}", path.display());
            Some(ExitCode::FAILURE)
        }
    }
}
