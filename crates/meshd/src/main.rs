//! meshd: a member of a meshd cluster. Parses flags (or runs a `config` subcommand),
//! sets up logging, runs the server until SIGTERM or SIGINT, and tells systemd about
//! it when started by it.
// Doc comments of the clap definitions are the help text, where `<name>` is a
// placeholder, not HTML.
#![allow(rustdoc::invalid_html_tags)]

mod config;
mod systemd;

use std::process::ExitCode;
use std::sync::Arc;

use clap::FromArgMatches;
use config::{Cli, Command, ConfigCommand};
use mesh_core::server::Lifecycle;

/// jemalloc, not glibc's malloc: glibc's free path was a large share of a member's CPU
/// under many small requests (BENCHMARKS.md has the profile and the A/B).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    // A panic in any thread ends the process (after the usual message), so the service
    // manager restarts it: a member whose Raft driver or a runtime thread died must not
    // linger, answering some requests and none that need Raft.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!("meshd: a thread panicked; aborting so that the service manager restarts meshd");
        std::process::abort();
    }));
    if let Some(code) = cli_docs::hidden_command_of("meshd", "8", config::command()) {
        return code;
    }
    let matches = config::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let (args, run_matches) = match cli.command {
        None => (cli.run, &matches),
        Some(Command::Run(args)) => (*args, matches.subcommand_matches("run").expect("run")),
        Some(Command::Keygen) => {
            println!("{}", mesh_core::mesh::MeshKey::generate().to_base64());
            return ExitCode::SUCCESS;
        }
        Some(Command::Config(ConfigCommand::Default)) => {
            print!("{}", config::default_file());
            return ExitCode::SUCCESS;
        }
        Some(Command::Config(ConfigCommand::Check { file })) => {
            return match config::check_file(&file) {
                Ok(_) => {
                    println!("{}: ok", file.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("meshd: {e:#}");
                    ExitCode::from(1)
                }
            };
        }
    };
    let cfg = match config::resolve(args, run_matches) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meshd: {e:#}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&cfg.log_format);
    let notifier = match systemd::Notifier::from_env() {
        Ok(n) => n.map(Arc::new),
        Err(e) => {
            eprintln!("meshd: NOTIFY_SOCKET: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    // Fairer to the connection tasks: see .cargo/config.toml.
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    let runtime = match builder.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meshd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let observe = |event: Lifecycle<'_>| {
        let Some(n) = &notifier else { return };
        let sent = match event {
            Lifecycle::Serving(server) => {
                if let Some(every) = systemd::watchdog_interval() {
                    // Pings come from the runtime, and only while the Raft driver's loop
                    // keeps turning: a stuck driver or runtime lets systemd restart us.
                    let status = server.node().status.clone();
                    let n = n.clone();
                    tokio::spawn(async move {
                        let mut tick = tokio::time::interval(every);
                        let mut turns = None;
                        while status.is_running() {
                            tick.tick().await;
                            let now = status.driver_turns();
                            if turns == Some(now) {
                                tracing::warn!(
                                    "the Raft driver made no progress: no watchdog ping"
                                );
                                continue;
                            }
                            turns = Some(now);
                            if let Err(e) = n.notify("WATCHDOG=1") {
                                tracing::warn!("systemd watchdog ping: {e}");
                            }
                        }
                    });
                }
                n.notify("READY=1\nSTATUS=serving clients")
            }
            Lifecycle::Stopping => n.notify("STOPPING=1\nSTATUS=stopping"),
        };
        if let Err(e) = sent {
            tracing::warn!("systemd notification: {e}");
        }
    };
    match runtime.block_on(mesh_core::server::run_observed(
        cfg.server,
        shutdown_signal(),
        observe,
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("meshd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What is logged when RUST_LOG does not say: meshd's and raft's events at INFO;
/// rustls only at ERROR, since its warnings are about clients (an IP address sent as
/// SNI, a closed connection without close_notify) and would fill the journal.
const DEFAULT_LOG_FILTER: &str = "info,rustls=error";

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}
