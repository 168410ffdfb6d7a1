//! The validated layer between clap and the commands: global settings (endpoints,
//! timeouts, output format) and the translation of get/put/del arguments into
//! etcd requests, with every string (durations, hex IDs, sort names) checked here.
use std::time::Duration;

use anyhow::{Context, Result};
use mesh_core::client::{from_key_range_end, prefix_range_end, ClientConfig, ClientTls};
use mesh_core::proto::etcdserverpb as pb;
use pb::range_request::{SortOrder, SortTarget};

use crate::cli::{Cli, DelArgs, GetArgs, KeyRange, OutputFormat, PutArgs};

/// Returns early with a usage error (exit 2): a flag value that clap accepted as a
/// string but that does not mean anything.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err(crate::cmd::Exit::Usage(format!($($arg)*)).into())
    };
}

/// Settings every command shares.
#[derive(Debug, Clone)]
pub struct Global {
    pub client: ClientConfig,
    pub format: OutputFormat,
}

impl Global {
    pub fn from_cli(cli: &Cli) -> Result<Global> {
        let endpoints: Vec<String> = cli
            .endpoints
            .iter()
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            bail!("--endpoints: at least one endpoint is required");
        }
        Ok(Global {
            client: ClientConfig {
                endpoints,
                dial_timeout: parse_duration(&cli.dial_timeout).context("--dial-timeout")?,
                request_timeout: parse_duration(&cli.timeout).context("--timeout")?,
                tls: ClientTls {
                    ca_file: cli.tls_cacert.clone(),
                    cert_file: cli.tls_cert.clone(),
                    key_file: cli.tls_key.clone(),
                },
                credentials: crate::password::credentials(
                    cli.auth_user.as_deref(),
                    cli.auth_password.as_deref(),
                )?,
            },
            format: cli.write_out,
        })
    }
}

/// Parses a Go-style duration: a decimal number with a unit (`ns`, `us`, `µs`, `ms`,
/// `s`, `m`, `h`), several concatenated allowed (`1m30s`); plain `0` is zero.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        bail!("empty duration");
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            bail!("invalid duration {s:?}: expected a number at {rest:?}");
        }
        let Ok(n) = rest[..num_len].parse::<f64>() else {
            bail!("invalid duration {s:?}: bad number {:?}", &rest[..num_len]);
        };
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs_per_unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => bail!("invalid duration {s:?}: missing unit (e.g. 5s, 500ms)"),
            u => bail!("invalid duration {s:?}: unknown unit {u:?}"),
        };
        total += n * secs_per_unit;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_secs_f64(total))
}

/// Parses a lease ID the way etcdctl prints it: hex, optional `0x`.
pub fn parse_lease_id(s: &str) -> Result<i64> {
    let digits = s.trim().trim_start_matches("0x");
    match u64::from_str_radix(digits, 16) {
        Ok(id) => Ok(id as i64),
        Err(_) => bail!("bad lease ID {s:?}: expected hex, e.g. 694d77aa9e38260f"),
    }
}

/// `l` (linearizable) → false, `s` (serializable) → true.
pub fn parse_serializable(s: &str) -> Result<bool> {
    match s {
        "l" | "L" => Ok(false),
        "s" | "S" => Ok(true),
        _ => bail!("unknown consistency flag {s:?}: expected l (linearizable) or s (serializable)"),
    }
}

/// Works out `range_end` from an explicit end or `--prefix` / `--from-key`.
fn range_end(key: &str, explicit: Option<&str>, prefix: bool, from_key: bool) -> Result<Vec<u8>> {
    match (explicit, prefix, from_key) {
        (Some(_), true, _) | (Some(_), _, true) => bail!(
            "too many arguments, only accept one argument when `--prefix` or `--from-key` is set"
        ),
        (_, true, true) => {
            bail!("`--prefix` and `--from-key` cannot be set at the same time, choose one")
        }
        (Some(end), false, false) => Ok(end.as_bytes().to_vec()),
        (None, true, false) => Ok(if key.is_empty() {
            vec![0]
        } else {
            prefix_range_end(key.as_bytes())
        }),
        (None, false, true) => Ok(from_key_range_end()),
        (None, false, false) => Ok(Vec::new()),
    }
}

/// The start key; an empty key with `--prefix`/`--from-key` means "from the very
/// first key", which etcd spells `\0` (an empty key is rejected).
fn range_key(key: &str, open_ended: bool) -> Vec<u8> {
    if key.is_empty() && open_ended {
        vec![0]
    } else {
        key.as_bytes().to_vec()
    }
}

/// The `(key, range_end)` pair a [`KeyRange`] stands for.
pub fn key_range(r: &KeyRange) -> Result<(Vec<u8>, Vec<u8>)> {
    let end = range_end(&r.key, r.range_end.as_deref(), r.prefix, r.from_key)?;
    Ok((range_key(&r.key, r.prefix || r.from_key), end))
}

/// `get` arguments as a Range request.
pub fn range_request(a: &GetArgs) -> Result<pb::RangeRequest> {
    let (key, end) = key_range(&a.range)?;
    let sort_target = match a.sort_by.as_deref().map(str::to_ascii_uppercase).as_deref() {
        None | Some("KEY") => SortTarget::Key,
        Some("VERSION") => SortTarget::Version,
        Some("CREATE") => SortTarget::Create,
        Some("MODIFY") | Some("MOD") => SortTarget::Mod,
        Some("VALUE") => SortTarget::Value,
        Some(other) => {
            bail!("bad sort target {other:?}: expected KEY, VERSION, CREATE, MODIFY or VALUE")
        }
    };
    let sort_order = match a.order.as_deref().map(str::to_ascii_uppercase).as_deref() {
        None if a.sort_by.is_some() => SortOrder::Ascend,
        None => SortOrder::None,
        Some("ASCEND") => SortOrder::Ascend,
        Some("DESCEND") => SortOrder::Descend,
        Some(other) => bail!("bad sort order {other:?}: expected ASCEND or DESCEND"),
    };
    if a.limit < 0 {
        bail!("--limit must not be negative");
    }
    Ok(pb::RangeRequest {
        key,
        range_end: end,
        limit: a.limit,
        revision: a.rev,
        sort_order: sort_order as i32,
        sort_target: sort_target as i32,
        serializable: parse_serializable(&a.consistency)?,
        keys_only: a.keys_only,
        count_only: a.count_only,
        ..Default::default()
    })
}

/// `put` arguments (with the value already resolved) as a Put request.
pub fn put_request(a: &PutArgs, value: Vec<u8>) -> Result<pb::PutRequest> {
    let lease = a
        .lease
        .as_deref()
        .map(parse_lease_id)
        .transpose()?
        .unwrap_or(0);
    Ok(pb::PutRequest {
        key: a.key.as_bytes().to_vec(),
        value,
        lease,
        prev_kv: a.prev_kv,
        ignore_value: a.ignore_value,
        ignore_lease: a.ignore_lease,
    })
}

/// `del` arguments as a DeleteRange request.
pub fn delete_request(a: &DelArgs) -> Result<pb::DeleteRangeRequest> {
    let (key, end) = key_range(&a.range)?;
    Ok(pb::DeleteRangeRequest {
        key,
        range_end: end,
        prev_kv: a.prev_kv,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("5")
            .unwrap_err()
            .to_string()
            .contains("missing unit"));
        assert!(parse_duration("5x")
            .unwrap_err()
            .to_string()
            .contains("unknown unit"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn lease_ids_are_hex() {
        assert_eq!(
            parse_lease_id("694d77aa9e38260f").unwrap(),
            0x694d77aa9e38260f
        );
        assert_eq!(parse_lease_id("0x10").unwrap(), 16);
        assert_eq!(parse_lease_id("ffffffffffffffff").unwrap(), -1);
        assert!(parse_lease_id("xyz")
            .unwrap_err()
            .to_string()
            .contains("expected hex"));
    }

    #[test]
    fn range_ends() {
        assert_eq!(range_end("foo", None, true, false).unwrap(), b"fop");
        assert_eq!(range_end("", None, true, false).unwrap(), b"\0");
        assert_eq!(range_end("a", None, false, true).unwrap(), b"\0");
        assert_eq!(range_end("a", Some("c"), false, false).unwrap(), b"c");
        assert!(range_end("a", Some("c"), true, false).is_err());
        assert!(range_end("a", None, true, true).is_err());
    }
}
