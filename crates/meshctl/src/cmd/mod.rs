//! Command dispatch: validates the global flags, builds the client and hands each
//! subcommand to its module (`kv`, `txn`, `watch`, `lease`, `concurrency` (lock and
//! elect), `cluster`, `bench`). Outcomes that
//! are not errors of the tool itself (compare failed, key not found) are [`Exit`]s.
mod auth;
mod bench;
mod cluster;
mod concurrency;
mod kv;
mod lease;
mod maintenance;
mod mesh;
mod snapshot;
mod txn;
mod watch;

use std::io::Write;

use anyhow::Result;
use clap::CommandFactory;
use mesh_core::client::Client;

use crate::cli::{
    AlarmCommand, Cli, Command, CounterCommand, EndpointCommand, MemberCommand, MeshCommand,
    SnapshotCommand,
};
use crate::config::Global;

/// Non-zero outcomes with their own documented exit codes.
#[derive(Debug, thiserror::Error)]
pub enum Exit {
    /// `cas`: the compare did not hold; nothing was written (exit 3).
    #[error("compare failed: {0}")]
    CompareFailed(String),
    /// `get --require`: no key matched (exit 4).
    #[error("key not found")]
    NotFound,
    /// Arguments clap could not check (exit 2).
    #[error("{0}")]
    Usage(String),
    /// `lock NAME -- CMD`: CMD's own exit status, passed on without a message.
    #[error("command exited with status {0}")]
    Status(u8),
}

impl Exit {
    pub fn code(&self) -> u8 {
        match self {
            Exit::CompareFailed(_) => 3,
            Exit::NotFound => 4,
            Exit::Usage(_) => 2,
            Exit::Status(code) => *code,
        }
    }
}

/// Runs the parsed command line to completion.
pub async fn run(cli: Cli) -> Result<()> {
    let global = Global::from_cli(&cli)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let f = global.format;
    let client = || Client::connect(global.client.clone());
    match cli.command {
        Command::Get(a) => kv::get(&client()?, &mut out, f, &a).await,
        Command::Put(a) => kv::put(&client()?, &mut out, f, &a).await,
        Command::Del(a) => kv::del(&client()?, &mut out, f, &a).await,
        Command::Compact(a) => kv::compact(&client()?, &mut out, f, &a).await,
        Command::Txn(a) => txn::txn(&client()?, &mut out, f, &a).await,
        Command::Cas(a) => txn::cas(&client()?, &mut out, f, &a).await,
        Command::Watch(a) => watch::watch(&client()?, &mut out, f, &a).await,
        Command::Lease(c) => lease::run(&client()?, &mut out, f, c).await,
        Command::Lock(a) => concurrency::lock(&client()?, &mut out, f, &a).await,
        Command::Elect(a) => concurrency::elect(&client()?, &mut out, f, &a).await,
        Command::Member(MemberCommand::List) => cluster::member_list(&client()?, &mut out, f).await,
        Command::Member(m) => cluster::member_change(&client()?, &mut out, f, m).await,
        Command::Endpoint(EndpointCommand::Status { cluster }) => {
            cluster::status(&global, &mut out, cluster).await
        }
        Command::Endpoint(EndpointCommand::Health { cluster }) => {
            cluster::health(&global, &mut out, cluster).await
        }
        Command::Mesh(MeshCommand::Peers) => mesh::peers(&client()?, &mut out, f).await,
        Command::Mesh(MeshCommand::Status) => mesh::status(&client()?, &mut out, f).await,
        Command::Counter(CounterCommand::Incr { name, delta }) => {
            let v = client()?.counter_incr(&name, delta).await?;
            writeln!(out, "{v}")?;
            Ok(out.flush()?)
        }
        Command::Counter(CounterCommand::Get { name }) => {
            let v = client()?.counter_get(&name).await?;
            writeln!(out, "{v}")?;
            Ok(out.flush()?)
        }
        Command::Endpoint(EndpointCommand::Hashkv { cluster, rev }) => {
            maintenance::hashkv(&global, &mut out, cluster, rev).await
        }
        Command::Snapshot(SnapshotCommand::Save { file }) => {
            snapshot::save(&global, &mut out, &file).await
        }
        Command::Snapshot(SnapshotCommand::Status { file }) => snapshot::status(&mut out, f, &file),
        Command::Snapshot(SnapshotCommand::Restore(a)) => snapshot::restore(&mut out, &a),
        Command::MoveLeader { target } => {
            maintenance::move_leader(&global, &mut out, &target).await
        }
        Command::Defrag { cluster } => maintenance::defrag(&global, &mut out, cluster).await,
        Command::Alarm(AlarmCommand::List) => {
            maintenance::alarm_list(&client()?, &mut out, f).await
        }
        Command::Alarm(AlarmCommand::Disarm) => {
            maintenance::alarm_disarm(&client()?, &mut out, f).await
        }
        Command::Bench(b) => bench::run(&global, &mut out, b).await,
        Command::User(c) => auth::user(&client()?, &mut out, f, c).await,
        Command::Role(c) => auth::role(&client()?, &mut out, f, c).await,
        Command::Auth(c) => auth::auth(&client()?, &mut out, f, c).await,
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "meshctl", &mut out);
            out.flush()?;
            Ok(())
        }
    }
}
