//! Lease output: etcdctl 3.4's simple texts byte for byte (`lease %016x granted with
//! TTL(%ds)` ...), and etcdctl's JSON, which flattens the header into the response
//! object as Go's embedded `*ResponseHeader` does. Tables print the simple text.
use std::io::{self, Write};

use mesh_core::proto::etcdserverpb as pb;
use serde::Serialize;

use super::{write_json, Format};

#[derive(Serialize)]
struct Flat<'a, T: Serialize> {
    #[serde(flatten)]
    header: Option<super::json::Header>,
    #[serde(flatten)]
    body: &'a T,
}

fn json<T: Serialize>(
    out: &mut dyn Write,
    h: &Option<pb::ResponseHeader>,
    body: &T,
) -> io::Result<()> {
    write_json(
        out,
        &Flat {
            header: super::json::header(h),
            body,
        },
    )
}

#[derive(Serialize)]
struct IdTtl {
    #[serde(rename = "ID")]
    id: i64,
    #[serde(rename = "TTL")]
    ttl: i64,
}

#[derive(Serialize)]
struct Granted<'a> {
    #[serde(rename = "ID")]
    id: i64,
    #[serde(rename = "TTL")]
    ttl: i64,
    #[serde(rename = "Error")]
    error: &'a str,
}

pub fn grant(out: &mut dyn Write, f: Format, r: &pb::LeaseGrantResponse) -> io::Result<()> {
    match f {
        Format::Json => json(
            out,
            &r.header,
            &Granted {
                id: r.id,
                ttl: r.ttl,
                error: &r.error,
            },
        ),
        _ => writeln!(out, "lease {:016x} granted with TTL({}s)", r.id, r.ttl),
    }
}

#[derive(Serialize)]
struct Revoked {
    header: Option<super::json::Header>,
}

pub fn revoke(
    out: &mut dyn Write,
    f: Format,
    id: i64,
    r: &pb::LeaseRevokeResponse,
) -> io::Result<()> {
    match f {
        // etcdctl prints the protobuf response here: the header stays nested.
        Format::Json => write_json(
            out,
            &Revoked {
                header: super::json::header(&r.header),
            },
        ),
        _ => writeln!(out, "lease {id:016x} revoked"),
    }
}

pub fn keep_alive(
    out: &mut dyn Write,
    f: Format,
    r: &pb::LeaseKeepAliveResponse,
) -> io::Result<()> {
    match f {
        Format::Json => json(
            out,
            &r.header,
            &IdTtl {
                id: r.id,
                ttl: r.ttl,
            },
        ),
        _ => writeln!(out, "lease {:016x} keepalived with TTL({})", r.id, r.ttl),
    }
}

/// Printed (simple format only) when a kept-alive lease turns out to be gone.
pub fn keep_alive_ended(out: &mut dyn Write, f: Format, id: i64) -> io::Result<()> {
    if f == Format::Json {
        return Ok(());
    }
    writeln!(out, "lease {id:016x} expired or revoked.")
}

#[derive(Serialize)]
struct TimeToLive {
    id: i64,
    ttl: i64,
    #[serde(rename = "granted-ttl")]
    granted_ttl: i64,
    /// Base64, as Go encodes `[][]byte`; null when there are none.
    keys: Option<Vec<String>>,
}

pub fn time_to_live(
    out: &mut dyn Write,
    f: Format,
    r: &pb::LeaseTimeToLiveResponse,
    with_keys: bool,
) -> io::Result<()> {
    let keys: Vec<String> = r
        .keys
        .iter()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    if f == Format::Json {
        let body = TimeToLive {
            id: r.id,
            ttl: r.ttl,
            granted_ttl: r.granted_ttl,
            keys: (!r.keys.is_empty()).then(|| {
                use base64::Engine as _;
                r.keys
                    .iter()
                    .map(|k| base64::engine::general_purpose::STANDARD.encode(k))
                    .collect()
            }),
        };
        return json(out, &r.header, &body);
    }
    if r.granted_ttl == 0 && r.ttl == -1 {
        return writeln!(out, "lease {:016x} already expired", r.id);
    }
    write!(
        out,
        "lease {:016x} granted with TTL({}s), remaining({}s)",
        r.id, r.granted_ttl, r.ttl
    )?;
    if with_keys {
        // Go's `%v` of a []string: space separated in brackets.
        write!(out, ", attached keys([{}])", keys.join(" "))?;
    }
    writeln!(out)
}

#[derive(Serialize)]
struct Leases {
    leases: Vec<LeaseId>,
}

#[derive(Serialize)]
struct LeaseId {
    id: i64,
}

pub fn list(out: &mut dyn Write, f: Format, r: &pb::LeaseLeasesResponse) -> io::Result<()> {
    if f == Format::Json {
        let body = Leases {
            leases: r.leases.iter().map(|l| LeaseId { id: l.id }).collect(),
        };
        return json(out, &r.header, &body);
    }
    writeln!(out, "found {} leases", r.leases.len())?;
    r.leases
        .iter()
        .try_for_each(|l| writeln!(out, "{:016x}", l.id))
}
