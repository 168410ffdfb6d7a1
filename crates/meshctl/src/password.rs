//! Reading passwords: from the terminal without echo (as etcdctl asks), or one line
//! from stdin when stdin is not a terminal or `--interactive=false`.
use std::io::{BufRead, IsTerminal, Write};

use anyhow::{bail, Context, Result};

/// Whether a password can be asked for on the terminal.
pub fn can_prompt() -> bool {
    std::io::stdin().is_terminal()
}

/// Asks for a password on the terminal with echo off.
pub fn prompt(prompt: &str) -> Result<String> {
    let mut err = std::io::stderr();
    write!(err, "{prompt}")?;
    err.flush()?;
    let fd = libc::STDIN_FILENO;
    // SAFETY: termios is plain data; tcgetattr fills it for the terminal on fd 0.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    let have_tty = unsafe { libc::tcgetattr(fd, &mut saved) } == 0;
    if have_tty {
        let mut quiet = saved;
        quiet.c_lflag &= !libc::ECHO;
        // SAFETY: sets attributes of the same terminal from a valid termios.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
    }
    let line = read_line();
    if have_tty {
        // SAFETY: restores what tcgetattr returned.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
        writeln!(err)?;
    }
    line
}

/// One line from stdin, without its line ending.
pub fn read_line() -> Result<String> {
    let mut line = String::new();
    let n = std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    if n == 0 {
        bail!("no password on stdin");
    }
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

/// A new password: asked twice on the terminal when `interactive`, else one line of stdin.
pub fn new_password(name: &str, interactive: bool) -> Result<String> {
    if !interactive || !can_prompt() {
        return read_line();
    }
    let first = prompt(&format!("Password of {name}: "))?;
    let again = prompt(&format!("Type password of {name} again for confirmation: "))?;
    if first != again {
        bail!("given passwords are different");
    }
    Ok(first)
}

/// The credentials of the global `--user name[:password]` / `--password` flags.
pub fn credentials(user: Option<&str>, password: Option<&str>) -> Result<Option<(String, String)>> {
    let Some(user) = user else {
        if password.is_some() {
            bail!("--password needs --user");
        }
        return Ok(None);
    };
    let (name, inline) = match user.split_once(':') {
        Some((n, p)) => (n.to_string(), Some(p.to_string())),
        None => (user.to_string(), None),
    };
    if name.is_empty() {
        bail!("--user: the user name is empty");
    }
    let password = match (inline, password) {
        (Some(p), None) => p,
        (None, Some(p)) => p.to_string(),
        (Some(_), Some(_)) => {
            bail!("give the password either in --user name:password or with --password")
        }
        (None, None) if can_prompt() => prompt("Password: ")?,
        (None, None) => bail!("--user {name}: no password given (use name:password or --password)"),
    };
    Ok(Some((name, password)))
}
