//! `get`, `put`, `del` and `compact`: one request each, printed in the chosen format.
use std::io::{Read, Write};

use anyhow::Result;
use mesh_core::client::Client;

use super::Exit;
use crate::cli::{CompactArgs, DelArgs, GetArgs, PutArgs};
use crate::config;
use crate::output::{self, Format, GetView};

pub async fn get(client: &Client, out: &mut dyn Write, f: Format, a: &GetArgs) -> Result<()> {
    let resp = client.range(config::range_request(a)?).await?;
    let view = GetView {
        print_value_only: a.print_value_only,
        count_only: a.count_only,
    };
    output::get(out, f, &resp, view)?;
    out.flush()?;
    if a.require && resp.count == 0 && resp.kvs.is_empty() {
        return Err(Exit::NotFound.into());
    }
    Ok(())
}

/// The value to put: the argument, or all of stdin byte for byte (a trailing newline
/// is kept, as etcdctl does); nothing with `--ignore-value`.
fn put_value(a: &PutArgs) -> Result<Vec<u8>> {
    match (&a.value, a.ignore_value) {
        (Some(_), true) => {
            Err(Exit::Usage("put: VALUE cannot be given with --ignore-value".into()).into())
        }
        (Some(v), false) => Ok(v.clone().into_bytes()),
        (None, true) => Ok(Vec::new()),
        (None, false) => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf)?;
            if buf.is_empty() {
                return Err(Exit::Usage(
                    "put command needs 1 argument and input from stdin or 2 arguments".into(),
                )
                .into());
            }
            Ok(buf)
        }
    }
}

pub async fn put(client: &Client, out: &mut dyn Write, f: Format, a: &PutArgs) -> Result<()> {
    let req = config::put_request(a, put_value(a)?)?;
    let resp = client.put(req).await?;
    output::put(out, f, &resp)?;
    Ok(out.flush()?)
}

pub async fn del(client: &Client, out: &mut dyn Write, f: Format, a: &DelArgs) -> Result<()> {
    let resp = client.delete_range(config::delete_request(a)?).await?;
    output::delete(out, f, &resp)?;
    Ok(out.flush()?)
}

pub async fn compact(
    client: &Client,
    out: &mut dyn Write,
    f: Format,
    a: &CompactArgs,
) -> Result<()> {
    let resp = client.compact(a.revision, a.physical).await?;
    output::compact(out, f, a.revision, &resp)?;
    Ok(out.flush()?)
}
