//! The commands: turn the parsed flags into a [`LockClient`] and settings, run one
//! command, and report the exit code. `run`/`reboot` live in `process`, `daemon` in
//! `daemon`; the short ones are here.
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use mesh_core::client::{Client, ClientConfig};

use crate::cas::{LockClient, LockError, EXIT_USAGE};
use crate::cli::{BackoffArgs, Cli, Command, Format, Strategy, WaitArgs};
use crate::daemon::Backend;
use crate::fleetlock::client::FleetLockClient;
use crate::fleetlock::{ClientParams, DEFAULT_GROUP};
use crate::semaphore::{semaphore_key, LockOutcome, Semaphore};
use crate::wait::{lock_waiting, WaitOptions};
use crate::window::Window;

/// Where the default holder ID comes from.
pub const MACHINE_ID_FILE: &str = "/etc/machine-id";

/// A usage error found after parsing (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// The exit code for an error returned by [`run`].
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<Usage>().is_some() {
        return EXIT_USAGE;
    }
    err.chain()
        .find_map(|e| e.downcast_ref::<LockError>())
        .map_or(crate::cas::EXIT_ERROR, LockError::exit_code)
}

/// `--user name:password` or `--user name --password P` (locksmith runs unattended:
/// it never asks).
fn credentials(cli: &Cli) -> Result<Option<(String, String)>, Usage> {
    let Some(user) = &cli.auth_user else {
        if cli.auth_password.is_some() {
            return Err(Usage("--password needs --user".into()));
        }
        return Ok(None);
    };
    let (name, password) = match (user.split_once(':'), &cli.auth_password) {
        (Some((n, p)), None) => (n.to_string(), p.to_string()),
        (None, Some(p)) => (user.clone(), p.clone()),
        (Some(_), Some(_)) => {
            return Err(Usage(
                "give the password either in --user name:password or with --password".into(),
            ))
        }
        (None, None) => return Err(Usage(format!("--user {user}: no password given"))),
    };
    if name.is_empty() {
        return Err(Usage("--user: the user name is empty".into()));
    }
    Ok(Some((name, password)))
}

/// Runs the command; `Ok(code)` is the exit code of a command that completed
/// (non-zero only for `run`, which passes on its command's status).
pub async fn run(cli: Cli) -> Result<u8> {
    let client = Client::connect(ClientConfig {
        endpoints: cli.endpoints.clone(),
        request_timeout: cli.request_timeout,
        tls: mesh_core::client::ClientTls {
            ca_file: cli.tls_cacert.clone(),
            cert_file: cli.tls_cert.clone(),
            key_file: cli.tls_key.clone(),
        },
        credentials: credentials(&cli)?,
        ..Default::default()
    })
    .map_err(|e| Usage(e.to_string()))?;
    let lc = LockClient::new(client, semaphore_key(cli.group.as_deref()), cli.retry_for);
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Status { write_out } => {
            let v = lc.read().await?;
            print_status(&mut out, write_out, &v.semaphore)?;
        }
        Command::Lock {
            holder,
            wait,
            limit,
        } => {
            let id = holder_id(holder.or(cli.id))?;
            let (outcome, v) = if wait {
                lock_waiting(&lc, &id, &wait_options(&limit, true)?).await?
            } else {
                if limit.wait_timeout.is_some() {
                    return Err(Usage("lock: --timeout needs --wait".into()).into());
                }
                lc.lock(&id).await?
            };
            let what = match outcome {
                LockOutcome::Acquired => "acquired",
                LockOutcome::AlreadyHeld => "already held",
            };
            writeln!(out, "lock {what} by {id} ({})", slots(&v.semaphore))?;
        }
        Command::Unlock { holder } => {
            let id = holder_id(holder.or(cli.id))?;
            let v = lc.unlock(&id).await?;
            writeln!(out, "lock released by {id} ({})", slots(&v.semaphore))?;
        }
        Command::SetMax { max } => {
            let (old, v) = lc.set_max(i64::from(max)).await?;
            writeln!(out, "Old-Max: {old}\nMax: {}", v.semaphore.max)?;
        }
        Command::Run { limit, command } => {
            let id = holder_id(cli.id)?;
            drop(out);
            return crate::process::run_locked(&lc, &id, &wait_options(&limit, true)?, &command)
                .await;
        }
        Command::Reboot { limit, reboot } => {
            let id = holder_id(cli.id)?;
            drop(out);
            crate::process::reboot(
                &lc,
                &id,
                &wait_options(&limit, true)?,
                &reboot.reboot_command,
            )
            .await?;
        }
        Command::Daemon {
            backoff,
            reboot,
            need,
            window_start,
            window_length,
            poll_interval,
            strategy,
            fleetlock,
        } => {
            let id = holder_id(cli.id)?;
            let backend = match strategy {
                Strategy::Cluster => Backend::Cluster(lc),
                Strategy::Fleetlock => {
                    let url = fleetlock.fleetlock_url.ok_or_else(|| {
                        Usage("--strategy fleetlock needs --fleetlock-url".into())
                    })?;
                    let token = fleetlock
                        .fleetlock_token_file
                        .as_deref()
                        .map(read_token)
                        .transpose()?;
                    let client = FleetLockClient::new(
                        &url,
                        fleetlock.fleetlock_cacert.as_deref(),
                        token,
                        cli.request_timeout,
                    )
                    .map_err(Usage)?;
                    let params = ClientParams {
                        id: id.clone(),
                        group: cli.group.clone().unwrap_or_else(|| DEFAULT_GROUP.into()),
                    };
                    if !crate::fleetlock::valid_group(&params.group) {
                        return Err(Usage(format!(
                            "--group {:?}: a FleetLock group must match ^[a-zA-Z0-9.-]+$",
                            params.group
                        ))
                        .into());
                    }
                    Backend::FleetLock { client, params }
                }
            };
            let window = match (window_start, window_length) {
                (Some(s), Some(l)) => Some(Window::parse(&s, l).map_err(|e| Usage(e.to_string()))?),
                _ => None,
            };
            let settings = crate::daemon::DaemonSettings {
                id,
                wait: backoff_options(&backoff, None, false)?,
                reboot_command: reboot.reboot_command,
                need_reboot_file: need.need_reboot_file,
                window,
                poll_interval,
            };
            drop(out);
            crate::daemon::run(&backend, &settings).await?;
        }
        Command::Fleetlock {
            listen,
            groups,
            token_file,
            cert_file,
            key_file,
        } => {
            let token = token_file.as_deref().map(read_token).transpose()?;
            let tls = match (cert_file, key_file) {
                (Some(cert_file), Some(key_file)) => {
                    let tls = mesh_core::tls::ServerTls {
                        cert_file,
                        key_file,
                        client_cert_auth: false,
                        trusted_ca_file: None,
                    };
                    tls.check().map_err(|e| Usage(e.to_string()))?;
                    Some(tls)
                }
                _ => None,
            };
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            drop(out);
            let settings = crate::fleetlock::server::Settings {
                groups: (!groups.is_empty()).then_some(groups),
                token,
                tls,
                retry_for: cli.retry_for,
            };
            let mut signals = crate::process::Signals::new()?;
            let stop = async move {
                let sig = signals.recv().await;
                tracing::info!(sig, "stopping");
            };
            crate::fleetlock::server::serve(lc.client().clone(), settings, listener, stop).await?;
        }
        Command::SendNeedReboot { need } => send_need_reboot(&need.need_reboot_file)?,
    }
    Ok(0)
}

/// A bearer token from a file (trailing whitespace dropped; empty is refused).
fn read_token(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read token file {}", path.display()))?;
    let token = text.trim_end().to_string();
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(Usage(format!(
            "token file {}: empty, or spaces inside the token",
            path.display()
        ))
        .into());
    }
    Ok(token)
}

fn slots(s: &Semaphore) -> String {
    format!("{} of {} slots free", s.semaphore, s.max)
}

/// CoreOS locksmithctl's status layout, or the stored JSON.
fn print_status(out: &mut dyn Write, format: Format, s: &Semaphore) -> Result<()> {
    match format {
        Format::Json => writeln!(out, "{}", s.to_json())?,
        Format::Simple => {
            writeln!(out, "Available: {}\nMax: {}", s.semaphore, s.max)?;
            if !s.holders.is_empty() {
                writeln!(out, "\nMACHINE ID")?;
                for h in &s.holders {
                    writeln!(out, "{h}")?;
                }
            }
        }
    }
    Ok(())
}

/// The holder ID: given explicitly, else this machine's ID.
pub fn holder_id(given: Option<String>) -> Result<String> {
    if let Some(id) = given {
        let id = id.trim().to_string();
        if id.is_empty() {
            return Err(Usage("the holder ID must not be empty".into()).into());
        }
        return Ok(id);
    }
    machine_id(Path::new(MACHINE_ID_FILE))
}

/// The trimmed contents of a machine-id file.
pub fn machine_id(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the holder ID from {} (pass --id)",
            path.display()
        )
    })?;
    let id = text.trim();
    anyhow::ensure!(
        !id.is_empty(),
        "{} is empty: cannot use it as the holder ID (pass --id)",
        path.display()
    );
    Ok(id.to_string())
}

fn wait_options(limit: &WaitArgs, spinner: bool) -> Result<WaitOptions> {
    backoff_options(&limit.backoff, limit.wait_timeout, spinner)
}

fn backoff_options(
    b: &BackoffArgs,
    timeout: Option<std::time::Duration>,
    spinner: bool,
) -> Result<WaitOptions> {
    if b.backoff_min.is_zero() || b.backoff_min > b.backoff_max {
        return Err(Usage(format!(
            "--backoff-min ({}) must be more than 0 and at most --backoff-max ({})",
            humantime::format_duration(b.backoff_min),
            humantime::format_duration(b.backoff_max)
        ))
        .into());
    }
    Ok(WaitOptions {
        backoff_min: b.backoff_min,
        backoff_max: b.backoff_max,
        timeout,
        spinner,
    })
}

/// Creates the need-reboot file (and its directory).
pub fn send_need_reboot(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, b"").with_context(|| format!("cannot create {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_machine_id_is_trimmed_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("machine-id");
        std::fs::write(&p, "0123abcd\n").unwrap();
        assert_eq!(machine_id(&p).unwrap(), "0123abcd");
        std::fs::write(&p, "\n").unwrap();
        assert!(machine_id(&p).unwrap_err().to_string().contains("is empty"));
        let e = machine_id(&dir.path().join("missing")).unwrap_err();
        assert!(format!("{e:#}").contains("pass --id"), "{e:#}");
        assert_eq!(holder_id(Some(" x ".into())).unwrap(), "x");
        assert_eq!(exit_code(&holder_id(Some(" ".into())).unwrap_err()), 2);
    }
}
