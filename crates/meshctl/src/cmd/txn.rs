//! `txn` (etcdctl's text syntax from stdin, optionally prompted) and `cas`, a
//! script-friendly compare-and-swap built on a one-compare Txn.
use std::io::{BufRead, IsTerminal, Write};

use anyhow::Result;
use mesh_core::client::Client;
use mesh_core::proto::etcdserverpb as pb;
use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::request_op::Request;

use super::Exit;
use crate::cli::{CasArgs, TxnArgs};
use crate::output::{self, Format};
use crate::txn_syntax;

/// Reads the three sections; in interactive mode each is announced with etcdctl's prompt.
fn read_txn_text(interactive: bool, out: &mut dyn Write) -> Result<String> {
    const PROMPTS: [&str; 3] = [
        "compares:",
        "success requests (get, put, del):",
        "failure requests (get, put, del):",
    ];
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut text = String::new();
    'sections: for prompt in PROMPTS {
        if interactive {
            writeln!(out, "{prompt}")?;
            out.flush()?;
        }
        loop {
            match lines.next().transpose()? {
                None => break 'sections,
                Some(line) if line.trim().is_empty() => break,
                Some(line) => {
                    text.push_str(&line);
                    text.push('\n');
                }
            }
        }
        text.push('\n');
    }
    Ok(text)
}

pub async fn txn(client: &Client, out: &mut dyn Write, f: Format, a: &TxnArgs) -> Result<()> {
    let interactive = a.interactive || std::io::stdin().is_terminal();
    let text = read_txn_text(interactive, out)?;
    // Bad txn text is bad input data (exit 1), even where a piece of it, like a
    // lease ID, would be a usage error (exit 2) as a flag: flatten the chain.
    let req = txn_syntax::parse_txn(&text).map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let resp = client.txn(req).await?;
    output::txn(out, f, &resp)?;
    Ok(out.flush()?)
}

pub async fn cas(client: &Client, out: &mut dyn Write, f: Format, a: &CasArgs) -> Result<()> {
    let key = a.key.as_bytes().to_vec();
    let (target, result, union) = match (&a.expect_value, a.expect_rev, a.create) {
        (Some(v), _, _) => (
            CompareTarget::Value,
            CompareResult::Equal,
            TargetUnion::Value(v.clone().into_bytes()),
        ),
        (_, Some(rev), _) => (
            CompareTarget::Mod,
            CompareResult::Equal,
            TargetUnion::ModRevision(rev),
        ),
        // A key that does not exist has create revision 0.
        _ => (
            CompareTarget::Create,
            CompareResult::Equal,
            TargetUnion::CreateRevision(0),
        ),
    };
    let req = pb::TxnRequest {
        compare: vec![pb::Compare {
            result: result as i32,
            target: target as i32,
            key: key.clone(),
            target_union: Some(union),
            range_end: Vec::new(),
        }],
        success: vec![pb::RequestOp {
            request: Some(Request::RequestPut(pb::PutRequest {
                key: key.clone(),
                value: a.value.clone().into_bytes(),
                ..Default::default()
            })),
        }],
        failure: vec![pb::RequestOp {
            request: Some(Request::RequestRange(pb::RangeRequest {
                key,
                ..Default::default()
            })),
        }],
    };
    let resp = client.txn(req).await?;
    match f {
        Format::Json => output::txn(out, f, &resp)?,
        Format::Simple | Format::Table if resp.succeeded => writeln!(out, "OK")?,
        Format::Simple | Format::Table => {}
    }
    out.flush()?;
    if resp.succeeded {
        return Ok(());
    }
    let current = resp.responses.first().and_then(|r| match &r.response {
        Some(pb::response_op::Response::ResponseRange(rr)) => rr.kvs.first().cloned(),
        _ => None,
    });
    let why = match current {
        None => format!("key {:?} does not exist", a.key),
        Some(kv) => format!(
            "key {:?} has value {:?} (mod revision {})",
            a.key,
            String::from_utf8_lossy(&kv.value),
            kv.mod_revision
        ),
    };
    Err(Exit::CompareFailed(why).into())
}
