//! The systemd notification protocol (sd_notify(3)) without libsystemd: datagrams of
//! `KEY=VALUE` lines to the socket named by `$NOTIFY_SOCKET` (a path, or `@name` in
//! the abstract namespace), and the watchdog interval from `$WATCHDOG_USEC`.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where to send notifications; absent when not started by systemd with
/// `Type=notify` (or `NotifyAccess`).
pub struct Notifier {
    socket: UnixDatagram,
    target: SocketAddr,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` asks for, if any.
    pub fn from_env() -> io::Result<Option<Notifier>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(path) if !path.is_empty() => Notifier::new(&path.to_string_lossy()).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for the socket `name`: a filesystem path, or `@abstract-name`.
    pub fn new(name: &str) -> io::Result<Notifier> {
        let target = match name.strip_prefix('@') {
            Some(abstract_name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(abstract_name.as_bytes())?
            }
            None if name.starts_with('/') => SocketAddr::from_pathname(name)?,
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("NOTIFY_SOCKET={name} is neither an absolute path nor @abstract"),
                ))
            }
        };
        Ok(Notifier {
            socket: UnixDatagram::unbound()?,
            target,
        })
    }

    /// Sends one notification, e.g. `READY=1` or `STOPPING=1\nSTATUS=...`.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        self.socket.send_to_addr(state.as_bytes(), &self.target)?;
        Ok(())
    }
}

/// How often to send `WATCHDOG=1`: half the interval systemd gave in
/// `$WATCHDOG_USEC`, when that is meant for this process (`$WATCHDOG_PID` unset or
/// ours).
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != me {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_is_half_and_only_for_this_pid() {
        let half = Some(Duration::from_millis(500));
        assert_eq!(watchdog_interval_from(Some("1000000"), None, 7), half);
        assert_eq!(watchdog_interval_from(Some("1000000"), Some("7"), 7), half);
        assert_eq!(watchdog_interval_from(Some("1000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("x"), None, 7), None);
        assert_eq!(watchdog_interval_from(None, None, 7), None);
    }

    #[test]
    fn notifications_reach_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        Notifier::new(path.to_str().unwrap())
            .unwrap()
            .notify("READY=1")
            .unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("meshd-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        Notifier::new(&format!("@{name}"))
            .unwrap()
            .notify("STOPPING=1")
            .unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");

        assert!(Notifier::new("relative/path").is_err());
    }
}
