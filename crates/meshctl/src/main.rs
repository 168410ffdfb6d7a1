//! meshctl: the command-line client for meshd (and any etcd v3 server).
//!
//! Layout: `cli` the raw clap definitions; `config` validation into requests and
//! settings; `cmd` one module per command group; `output` simple/JSON/table
//! printing; `txn_syntax` etcdctl's txn language. `main` only parses, sets up
//! tracing, runs, and maps the outcome to an exit code.
mod cli;
mod cmd;
mod config;
mod output;
mod password;
mod txn_syntax;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    if let Some(code) = cli_docs::hidden_command::<cli::Cli>("meshctl", "1") {
        return code;
    }
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESHCTL_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(cmd::run(cli));
    // Don't wait for tasks still blocked on I/O (e.g. a watch stream) at exit.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit_code(&e),
    }
}

/// Prints the error chain once and picks the documented exit code.
fn exit_code(err: &anyhow::Error) -> ExitCode {
    let broken_pipe = err
        .chain()
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe);
    if broken_pipe {
        return ExitCode::SUCCESS;
    }
    if let Some(cmd::Exit::Status(code)) = err.downcast_ref::<cmd::Exit>() {
        return ExitCode::from(*code);
    }
    eprintln!("Error: {err:#}");
    match err.downcast_ref::<cmd::Exit>() {
        Some(exit) => ExitCode::from(exit.code()),
        None => ExitCode::FAILURE,
    }
}
