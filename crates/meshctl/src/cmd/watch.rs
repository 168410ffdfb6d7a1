//! `watch`: print events until SIGINT (exit 0); with `-- CMD ARGS...` run CMD once
//! per event with ETCD_WATCH_* (exactly as etcdctl: `%q`-quoted, revision of the
//! response) and MESHCTL_WATCH_* (raw bytes, revision of the event) in its environment.
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStringExt;

use anyhow::{bail, Context, Result};
use mesh_core::client::{Client, WatchOptions};
use mesh_core::proto::mvccpb;

use crate::cli::WatchArgs;
use crate::config;
use crate::output::{self, Format};

pub async fn watch(client: &Client, out: &mut dyn Write, f: Format, a: &WatchArgs) -> Result<()> {
    let (key, range_end) = config::key_range(&a.range)?;
    let opts = WatchOptions {
        key,
        range_end,
        start_revision: a.rev,
        prev_kv: a.prev_kv,
        ..Default::default()
    };
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let mut watcher = client.watch(opts).await?;
    loop {
        let resp = tokio::select! {
            _ = &mut interrupted => return Ok(()),
            msg = watcher.message() => match msg? {
                Some(resp) => resp,
                None => bail!("watch stream closed by the server"),
            },
        };
        output::watch(out, f, &resp)?;
        out.flush()?;
        if a.exec.is_empty() {
            continue;
        }
        let revision = resp.header.as_ref().map_or(0, |h| h.revision);
        for ev in &resp.events {
            let status = tokio::select! {
                _ = &mut interrupted => return Ok(()),
                status = event_command(&a.exec, revision, ev).status() => status,
            };
            let status = status.with_context(|| format!("cannot run {:?}", a.exec[0]))?;
            if !status.success() {
                eprintln!("command {:?} failed ({status})", a.exec);
            }
        }
    }
}

/// The per-event command with its environment.
fn event_command(exec: &[String], revision: i64, ev: &mvccpb::Event) -> tokio::process::Command {
    let kv = ev.kv.clone().unwrap_or_default();
    // etcdctl exports the response's header revision; ours is the event's own.
    let event_revision = kv.mod_revision;
    let kind = output::event_type(ev);
    let mut cmd = tokio::process::Command::new(&exec[0]);
    cmd.args(&exec[1..])
        .env("ETCD_WATCH_REVISION", revision.to_string())
        .env("ETCD_WATCH_EVENT_TYPE", go_quote(kind.as_bytes()))
        .env("ETCD_WATCH_KEY", go_quote(&kv.key))
        .env("ETCD_WATCH_VALUE", go_quote(&kv.value))
        .env("MESHCTL_WATCH_REVISION", event_revision.to_string())
        .env("MESHCTL_WATCH_EVENT_TYPE", kind)
        .env("MESHCTL_WATCH_KEY", OsString::from_vec(kv.key))
        .env("MESHCTL_WATCH_VALUE", OsString::from_vec(kv.value))
        .kill_on_drop(true);
    cmd
}

/// Go's `%q` of a byte string, which is what etcdctl puts in ETCD_WATCH_* values.
pub fn go_quote(bytes: &[u8]) -> String {
    let mut s = String::from("\"");
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '"' => s.push_str("\\\""),
                '\\' => s.push_str("\\\\"),
                '\n' => s.push_str("\\n"),
                '\t' => s.push_str("\\t"),
                '\r' => s.push_str("\\r"),
                c if c.is_control() => s.push_str(&format!("\\x{:02x}", c as u32)),
                c => s.push(c),
            }
        }
        for b in chunk.invalid() {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s.push('"');
    s
}

#[cfg(test)]
mod tests {
    use super::go_quote;

    #[test]
    fn go_quote_matches_percent_q() {
        assert_eq!(go_quote(b"k1"), "\"k1\"");
        assert_eq!(go_quote(b""), "\"\"");
        assert_eq!(go_quote(b"a \"b\"\n"), "\"a \\\"b\\\"\\n\"");
        assert_eq!(go_quote(b"\xff\x01"), "\"\\xff\\x01\"");
    }
}
