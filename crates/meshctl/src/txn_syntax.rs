//! etcdctl's txn language: compares like `mod("key") > "0"` and one-line ops
//! (`put k v`, `get k --prefix`, `del k`), split into words the way etcdctl's
//! `argify` does (double quotes group, Go escapes inside them).
use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use mesh_core::proto::etcdserverpb as pb;
use pb::compare::{CompareResult, CompareTarget, TargetUnion};

use crate::cli::{DelArgs, GetArgs, PutArgs};
use crate::config;

/// Reads a Go-style double-quoted string at the start of `s` (after optional
/// spaces); returns its bytes and the rest of `s`.
fn quoted(s: &str) -> Result<(Vec<u8>, &str)> {
    let s = s.trim_start();
    let mut chars = s.char_indices();
    match chars.next() {
        Some((_, '"')) => {}
        _ => bail!("expected a double-quoted string at {s:?}"),
    }
    let mut out = Vec::new();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &s[i + 1..])),
            '\\' => {
                let (_, e) = chars
                    .next()
                    .ok_or_else(|| anyhow!("unterminated escape in {s:?}"))?;
                match e {
                    'n' => out.push(b'\n'),
                    't' => out.push(b'\t'),
                    'r' => out.push(b'\r'),
                    '0' => out.push(0),
                    '\\' | '"' | '\'' => out.push(e as u8),
                    'x' => {
                        let hex: String = chars.by_ref().take(2).map(|(_, c)| c).collect();
                        let b = u8::from_str_radix(&hex, 16)
                            .with_context(|| format!("bad \\x escape \\x{hex}"))?;
                        out.push(b);
                    }
                    other => bail!("unknown escape \\{other} in {s:?}"),
                }
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    bail!("missing closing quote in {s:?}")
}

/// Parses one compare line, e.g. `value("k") = "v"` or `lease("k") = "694d77aa9e38260f"`.
pub fn parse_compare(line: &str) -> Result<pb::Compare> {
    parse_compare_inner(line).with_context(|| format!("malformed comparison: {line}"))
}

fn parse_compare_inner(line: &str) -> Result<pb::Compare> {
    let (target, rest) = line
        .split_once('(')
        .ok_or_else(|| anyhow!("expected TARGET(\"key\") OP \"value\""))?;
    let (key, rest) = quoted(rest).context("key")?;
    let rest = rest
        .trim_start()
        .strip_prefix(')')
        .ok_or_else(|| anyhow!("expected ')' after the key"))?
        .trim_start();
    let op_len = rest
        .find(|c: char| c.is_whitespace() || c == '"')
        .unwrap_or(rest.len());
    let result = match &rest[..op_len] {
        "=" => CompareResult::Equal,
        "!=" => CompareResult::NotEqual,
        "<" => CompareResult::Less,
        ">" => CompareResult::Greater,
        "" => bail!("missing operator (one of = != < >)"),
        other => bail!("unknown operator {other:?} (expected one of = != < >)"),
    };
    let (value, rest) = quoted(&rest[op_len..]).context("value")?;
    if !rest.trim().is_empty() {
        bail!("unexpected text after the value: {:?}", rest.trim());
    }
    let int = |what: &str| -> Result<i64> {
        let s = String::from_utf8(value.clone())?;
        s.parse::<i64>()
            .with_context(|| format!("{what} must be an integer, got {s:?}"))
    };
    let (target, union) = match target.trim() {
        "ver" | "version" => (
            CompareTarget::Version,
            TargetUnion::Version(int("version")?),
        ),
        "c" | "create" => (
            CompareTarget::Create,
            TargetUnion::CreateRevision(int("create revision")?),
        ),
        "m" | "mod" => (
            CompareTarget::Mod,
            TargetUnion::ModRevision(int("mod revision")?),
        ),
        "val" | "value" => (CompareTarget::Value, TargetUnion::Value(value.clone())),
        "lease" => {
            let s = String::from_utf8(value.clone())?;
            (
                CompareTarget::Lease,
                TargetUnion::Lease(config::parse_lease_id(&s)?),
            )
        }
        other => bail!("unknown target {other:?} (expected version, create, mod, value or lease)"),
    };
    Ok(pb::Compare {
        result: result as i32,
        target: target as i32,
        key,
        target_union: Some(union),
        range_end: Vec::new(),
    })
}

/// Splits an op line into words: whitespace separates, `"..."` groups (with escapes).
pub fn split_words(line: &str) -> Result<Vec<String>> {
    let mut words = Vec::new();
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        if rest.starts_with('"') {
            let (bytes, after) = quoted(rest)?;
            words.push(String::from_utf8(bytes).context("quoted word is not UTF-8")?);
            rest = after;
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            words.push(rest[..end].to_string());
            rest = &rest[end..];
        }
        rest = rest.trim_start();
    }
    Ok(words)
}

/// One request line inside a txn, parsed with the same flags as the top-level commands.
#[derive(Debug, Parser)]
#[command(no_binary_name = true, disable_help_subcommand = true)]
enum TxnOp {
    Get(GetArgs),
    Put(PutArgs),
    #[command(alias = "delete")]
    Del(DelArgs),
}

/// Parses one op line (`put k v`, `get k --prefix`, `del k`).
pub fn parse_op(line: &str) -> Result<pb::RequestOp> {
    use pb::request_op::Request;
    let words = split_words(line).with_context(|| format!("malformed request: {line}"))?;
    let op = TxnOp::try_parse_from(&words).map_err(|e| {
        let msg = e.render().to_string();
        let first = msg
            .lines()
            .next()
            .unwrap_or("")
            .trim_start_matches("error: ")
            .to_string();
        anyhow!("malformed request: {line} ({first})")
    })?;
    let request = match op {
        TxnOp::Get(a) => Request::RequestRange(config::range_request(&a)?),
        TxnOp::Put(a) => {
            let value = a.value.clone().ok_or_else(|| {
                anyhow!("malformed request: {line} (put needs a key and a value)")
            })?;
            Request::RequestPut(config::put_request(&a, value.into_bytes())?)
        }
        TxnOp::Del(a) => Request::RequestDeleteRange(config::delete_request(&a)?),
    };
    Ok(pb::RequestOp {
        request: Some(request),
    })
}

/// A whole txn in text form: compares, blank line, success ops, blank line, failure ops.
/// A section also ends at end of input.
pub fn parse_txn(text: &str) -> Result<pb::TxnRequest> {
    let mut sections = [Vec::new(), Vec::new(), Vec::new()];
    let mut idx = 0;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            idx += 1;
            if idx > 2 {
                break;
            }
            continue;
        }
        sections[idx].push(line.to_string());
    }
    let [compares, success, failure] = sections;
    Ok(pb::TxnRequest {
        compare: compares
            .iter()
            .map(|l| parse_compare(l))
            .collect::<Result<_>>()?,
        success: success.iter().map(|l| parse_op(l)).collect::<Result<_>>()?,
        failure: failure.iter().map(|l| parse_op(l)).collect::<Result<_>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::request_op::Request;

    fn cmp(line: &str) -> pb::Compare {
        parse_compare(line).unwrap()
    }

    #[test]
    fn every_compare_kind() {
        let c = cmp(r#"mod("key") > "0""#);
        assert_eq!(
            (c.target, c.result, c.key.as_slice()),
            (
                CompareTarget::Mod as i32,
                CompareResult::Greater as i32,
                &b"key"[..]
            )
        );
        assert_eq!(c.target_union, Some(TargetUnion::ModRevision(0)));
        let c = cmp(r#"value("k") = "v""#);
        assert_eq!(c.target_union, Some(TargetUnion::Value(b"v".to_vec())));
        assert_eq!(c.result, CompareResult::Equal as i32);
        let c = cmp(r#"version("k") = "0""#);
        assert_eq!(
            (c.target, c.target_union),
            (CompareTarget::Version as i32, Some(TargetUnion::Version(0)))
        );
        let c = cmp(r#"create("k") < "5""#);
        assert_eq!(
            (c.target, c.result),
            (CompareTarget::Create as i32, CompareResult::Less as i32)
        );
        assert_eq!(c.target_union, Some(TargetUnion::CreateRevision(5)));
        let c = cmp(r#"lease("k") = "694d77aa9e38260f""#);
        assert_eq!(c.target_union, Some(TargetUnion::Lease(0x694d77aa9e38260f)));
        let c = cmp(r#"val("k") != "x""#);
        assert_eq!(
            (c.target, c.result),
            (CompareTarget::Value as i32, CompareResult::NotEqual as i32)
        );
        assert_eq!(
            cmp(r#"ver("k") = "1""#).target,
            CompareTarget::Version as i32
        );
        assert_eq!(cmp(r#"c("k") = "1""#).target, CompareTarget::Create as i32);
        assert_eq!(cmp(r#"m("k") = "1""#).target, CompareTarget::Mod as i32);
    }

    #[test]
    fn compare_quoting() {
        let c = cmp(r#"value("a key\twith \"quotes\"") = "multi word \x41\n""#);
        assert_eq!(c.key, b"a key\twith \"quotes\"");
        assert_eq!(
            c.target_union,
            Some(TargetUnion::Value(b"multi word A\n".to_vec()))
        );
        // Spacing is flexible.
        assert_eq!(
            cmp(r#"mod( "k" )>"3""#).target_union,
            Some(TargetUnion::ModRevision(3))
        );
        assert_eq!(
            cmp(r#"value("k") = """#).target_union,
            Some(TargetUnion::Value(vec![]))
        );
    }

    #[test]
    fn compare_errors_say_what_is_wrong() {
        let err = |l: &str| format!("{:#}", parse_compare(l).unwrap_err());
        assert!(
            err(r#"value("k") == "v""#).contains("unknown operator \"==\""),
            "{}",
            err(r#"value("k") == "v""#)
        );
        assert!(err(r#"version("k") = "abc""#).contains("version must be an integer"));
        assert!(err(r#"size("k") = "1""#).contains("unknown target \"size\""));
        assert!(err(r#"value(k) = "v""#).contains("expected a double-quoted string"));
        assert!(err(r#"value("k) = "v""#).starts_with("malformed comparison"));
        assert!(err(r#"value("k") = "v" extra"#).contains("unexpected text"));
        assert!(err("put k v").contains("expected TARGET"));
        assert!(err(r#"lease("k") = "zz""#).contains("expected hex"));
    }

    #[test]
    fn ops() {
        let op = parse_op(r#"put k1 "quoted val""#).unwrap();
        match op.request {
            Some(Request::RequestPut(p)) => assert_eq!(
                (p.key.as_slice(), p.value.as_slice()),
                (&b"k1"[..], &b"quoted val"[..])
            ),
            other => panic!("{other:?}"),
        }
        match parse_op("get k --prefix --limit 2").unwrap().request {
            Some(Request::RequestRange(r)) => {
                assert_eq!((r.range_end.as_slice(), r.limit), (&b"l"[..], 2))
            }
            other => panic!("{other:?}"),
        }
        match parse_op("del a c").unwrap().request {
            Some(Request::RequestDeleteRange(d)) => assert_eq!(d.range_end, b"c"),
            other => panic!("{other:?}"),
        }
        assert!(
            format!("{:#}", parse_op("put k").unwrap_err()).contains("put needs a key and a value")
        );
        assert!(
            format!("{:#}", parse_op("frob k").unwrap_err()).contains("malformed request: frob k")
        );
        assert!(
            format!("{:#}", parse_op(r#"put "k v"#).unwrap_err()).contains("missing closing quote")
        );
    }

    #[test]
    fn whole_txn() {
        let t = parse_txn(
            "mod(\"k1\") > \"0\"\nvalue(\"k1\") = \"v1\"\n\nput k1 v2\nget k1\n\nput k1 fail\n\n",
        )
        .unwrap();
        assert_eq!(
            (t.compare.len(), t.success.len(), t.failure.len()),
            (2, 2, 1)
        );
        // Sections may end at end of input, and may be empty.
        let t = parse_txn("\nget k\n").unwrap();
        assert_eq!(
            (t.compare.len(), t.success.len(), t.failure.len()),
            (0, 1, 0)
        );
        assert!(parse_txn("bogus\n").is_err());
    }
}
