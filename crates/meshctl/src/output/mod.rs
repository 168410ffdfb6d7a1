//! How responses are printed: etcdctl's simple format byte for byte, etcdctl-like
//! JSON (`json.rs`) and bordered tables (`table.rs`). Every printer writes to a
//! `dyn Write` so tests can capture it and a closed pipe surfaces as an io error.
pub mod json;
pub mod lease;
pub mod maintenance;
pub mod table;

use std::io::{self, Write};
use std::time::Duration;

use mesh_core::proto::etcdserverpb as pb;
use mesh_core::proto::mvccpb;
use serde::Serialize;

pub use crate::cli::OutputFormat as Format;
pub use json::Health;

/// Simple-format switches of `get`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GetView {
    pub print_value_only: bool,
    pub count_only: bool,
}

fn write_json(out: &mut dyn Write, v: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer(&mut *out, v).map_err(io::Error::other)?;
    writeln!(out)
}

/// etcdctl's `printKV`: the key line (unless value-only), then the value line.
fn simple_kv(out: &mut dyn Write, kv: &mvccpb::KeyValue, value_only: bool) -> io::Result<()> {
    if !value_only {
        out.write_all(&kv.key)?;
        out.write_all(b"\n")?;
    }
    out.write_all(&kv.value)?;
    out.write_all(b"\n")
}

pub fn get(out: &mut dyn Write, f: Format, r: &pb::RangeResponse, view: GetView) -> io::Result<()> {
    match f {
        Format::Json => write_json(out, &json::range(r)),
        Format::Simple if view.count_only => writeln!(out, "{}", r.count),
        Format::Simple => r
            .kvs
            .iter()
            .try_for_each(|kv| simple_kv(out, kv, view.print_value_only)),
        Format::Table => {
            let rows: Vec<Vec<String>> = r
                .kvs
                .iter()
                .map(|kv| {
                    vec![
                        String::from_utf8_lossy(&kv.key).into_owned(),
                        String::from_utf8_lossy(&kv.value).into_owned(),
                        kv.create_revision.to_string(),
                        kv.mod_revision.to_string(),
                        kv.version.to_string(),
                        if kv.lease == 0 {
                            String::new()
                        } else {
                            format!("{:x}", kv.lease)
                        },
                    ]
                })
                .collect();
            out.write_all(
                table::render(
                    &["KEY", "VALUE", "CREATE REV", "MOD REV", "VERSION", "LEASE"],
                    &rows,
                )
                .as_bytes(),
            )
        }
    }
}

pub fn put(out: &mut dyn Write, f: Format, r: &pb::PutResponse) -> io::Result<()> {
    match f {
        Format::Json => write_json(out, &json::put(r)),
        Format::Simple | Format::Table => {
            writeln!(out, "OK")?;
            r.prev_kv
                .as_ref()
                .map_or(Ok(()), |kv| simple_kv(out, kv, false))
        }
    }
}

pub fn delete(out: &mut dyn Write, f: Format, r: &pb::DeleteRangeResponse) -> io::Result<()> {
    match f {
        Format::Json => write_json(out, &json::delete(r)),
        Format::Simple | Format::Table => {
            writeln!(out, "{}", r.deleted)?;
            r.prev_kvs
                .iter()
                .try_for_each(|kv| simple_kv(out, kv, false))
        }
    }
}

/// `SUCCESS`/`FAILURE`, then a blank line before each response, as etcdctl does.
pub fn txn(out: &mut dyn Write, f: Format, r: &pb::TxnResponse) -> io::Result<()> {
    use pb::response_op::Response;
    if matches!(f, Format::Json) {
        return write_json(out, &json::txn(r));
    }
    writeln!(out, "{}", if r.succeeded { "SUCCESS" } else { "FAILURE" })?;
    for op in &r.responses {
        writeln!(out)?;
        match &op.response {
            Some(Response::ResponseRange(x)) => get(out, Format::Simple, x, GetView::default())?,
            Some(Response::ResponsePut(x)) => put(out, Format::Simple, x)?,
            Some(Response::ResponseDeleteRange(x)) => delete(out, Format::Simple, x)?,
            Some(Response::ResponseTxn(x)) => txn(out, Format::Simple, x)?,
            None => writeln!(out, "unexpected response {op:?}")?,
        }
    }
    Ok(())
}

/// One watch response: per event the type, the previous key-value if any, the key-value.
pub fn watch(out: &mut dyn Write, f: Format, r: &pb::WatchResponse) -> io::Result<()> {
    if matches!(f, Format::Json) {
        return write_json(out, &json::watch(r));
    }
    for ev in &r.events {
        writeln!(out, "{}", event_type(ev))?;
        if let Some(prev) = &ev.prev_kv {
            simple_kv(out, prev, false)?;
        }
        simple_kv(
            out,
            ev.kv.as_ref().unwrap_or(&mvccpb::KeyValue::default()),
            false,
        )?;
    }
    Ok(())
}

pub fn event_type(ev: &mvccpb::Event) -> &'static str {
    match mvccpb::event::EventType::try_from(ev.r#type) {
        Ok(mvccpb::event::EventType::Delete) => "DELETE",
        _ => "PUT",
    }
}

pub fn compact(
    out: &mut dyn Write,
    f: Format,
    revision: i64,
    r: &pb::CompactionResponse,
) -> io::Result<()> {
    match f {
        Format::Json => write_json(
            out,
            &serde_json::json!({ "header": json::header(&r.header) }),
        ),
        Format::Simple | Format::Table => writeln!(out, "compacted revision {revision}"),
    }
}

fn member_row(m: &pb::Member) -> Vec<String> {
    vec![
        format!("{:x}", m.id),
        if m.name.is_empty() {
            "unstarted"
        } else {
            "started"
        }
        .to_string(),
        m.name.clone(),
        m.peer_ur_ls.join(","),
        m.client_ur_ls.join(","),
        m.is_learner.to_string(),
    ]
}

/// `member add`: etcdctl's confirmation plus the settings the new member starts with.
pub fn member_added(
    out: &mut dyn Write,
    f: Format,
    r: &pb::MemberAddResponse,
    name: &str,
    mesh_addr: &str,
    id: u64,
) -> io::Result<()> {
    if matches!(f, Format::Json) {
        return write_json(out, &json::member_added(r));
    }
    let cluster = r.header.as_ref().map_or(0, |h| h.cluster_id);
    writeln!(out, "Member {id:16x} added to cluster {cluster:16x}")?;
    writeln!(out)?;
    let peers: Vec<String> = r
        .members
        .iter()
        .filter(|m| m.id != id)
        .flat_map(|m| m.peer_ur_ls.iter())
        // --peer takes mesh addresses; members answer peer URLs.
        .map(|u| {
            u.split_once("://")
                .map_or(u.as_str(), |(_, a)| a)
                .to_string()
        })
        .collect();
    writeln!(out, "MESHD_NAME=\"{name}\"")?;
    writeln!(out, "MESHD_ADVERTISE_MESH=\"{mesh_addr}\"")?;
    writeln!(out, "MESHD_PEER=\"{}\"", peers.join(","))
}

/// `member remove | promote | update`: etcdctl's one-line confirmation.
pub fn member_changed(
    out: &mut dyn Write,
    f: Format,
    header: &Option<pb::ResponseHeader>,
    members: &[pb::Member],
    id: u64,
    verb: &str,
) -> io::Result<()> {
    if matches!(f, Format::Json) {
        let list = pb::MemberListResponse {
            header: *header,
            members: members.to_vec(),
        };
        return write_json(out, &json::member_list(&list));
    }
    let cluster = header.as_ref().map_or(0, |h| h.cluster_id);
    writeln!(out, "Member {id:16x} {verb} cluster {cluster:16x}")
}

/// A mesh peer that is not a Raft member, in the member list's columns.
fn mesh_only_row(p: &mesh_core::proto::meshpb::MeshPeer) -> Vec<String> {
    vec![
        format!("{:016x}", p.name),
        "mesh-only".into(),
        p.nickname.clone(),
        p.address.clone(),
        p.client_url.clone(),
        "false".into(),
    ]
}

pub fn member_list(
    out: &mut dyn Write,
    f: Format,
    r: &pb::MemberListResponse,
    mesh_only: &[mesh_core::proto::meshpb::MeshPeer],
) -> io::Result<()> {
    let mut rows: Vec<Vec<String>> = r.members.iter().map(member_row).collect();
    rows.extend(mesh_only.iter().map(mesh_only_row));
    match f {
        Format::Json if mesh_only.is_empty() => write_json(out, &json::member_list(r)),
        Format::Json => {
            let mut v = serde_json::to_value(json::member_list(r)).map_err(io::Error::other)?;
            v["meshOnly"] = mesh_only
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "peer": format!("{:016x}", p.name),
                        "name": p.nickname,
                        "address": p.address,
                        "clientURL": p.client_url,
                    })
                })
                .collect();
            write_json(out, &v)
        }
        Format::Simple => rows
            .iter()
            .try_for_each(|row| writeln!(out, "{}", row.join(", "))),
        Format::Table => out.write_all(
            table::render(
                &[
                    "ID",
                    "STATUS",
                    "NAME",
                    "PEER ADDRS",
                    "CLIENT ADDRS",
                    "IS LEARNER",
                ],
                &rows,
            )
            .as_bytes(),
        ),
    }
}

fn status_row(endpoint: &str, s: &pb::StatusResponse) -> Vec<String> {
    let member_id = s.header.as_ref().map_or(0, |h| h.member_id);
    vec![
        endpoint.to_string(),
        format!("{member_id:x}"),
        s.version.clone(),
        table::human_bytes(s.db_size),
        (s.leader != 0 && s.leader == member_id).to_string(),
        s.is_learner.to_string(),
        s.raft_term.to_string(),
        s.raft_index.to_string(),
        s.raft_applied_index.to_string(),
        s.errors.join(", "),
    ]
}

/// The endpoints that answered, in order.
pub fn endpoint_status(
    out: &mut dyn Write,
    f: Format,
    statuses: &[(String, pb::StatusResponse)],
) -> io::Result<()> {
    let rows: Vec<Vec<String>> = statuses.iter().map(|(ep, s)| status_row(ep, s)).collect();
    match f {
        Format::Json => {
            let list: Vec<_> = statuses
                .iter()
                .map(|(ep, s)| json::endpoint_status(ep, s))
                .collect();
            write_json(out, &list)
        }
        Format::Simple => rows
            .iter()
            .try_for_each(|row| writeln!(out, "{}", row.join(", "))),
        Format::Table => out.write_all(
            table::render(
                &[
                    "ENDPOINT",
                    "ID",
                    "VERSION",
                    "DB SIZE",
                    "IS LEADER",
                    "IS LEARNER",
                    "RAFT TERM",
                    "RAFT INDEX",
                    "RAFT APPLIED INDEX",
                    "ERRORS",
                ],
                &rows,
            )
            .as_bytes(),
        ),
    }
}

pub fn endpoint_health(out: &mut dyn Write, f: Format, results: &[Health]) -> io::Result<()> {
    match f {
        Format::Json => write_json(out, &results),
        Format::Simple => results.iter().try_for_each(|h| match &h.error {
            None => writeln!(
                out,
                "{} is healthy: successfully committed proposal: took = {}",
                h.endpoint, h.took
            ),
            Some(e) => writeln!(
                out,
                "{} is unhealthy: failed to commit proposal: {e}",
                h.endpoint
            ),
        }),
        Format::Table => {
            let rows: Vec<Vec<String>> = results
                .iter()
                .map(|h| {
                    vec![
                        h.endpoint.clone(),
                        h.health.to_string(),
                        h.took.clone(),
                        h.error.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            out.write_all(table::render(&["ENDPOINT", "HEALTH", "TOOK", "ERROR"], &rows).as_bytes())
        }
    }
}

/// Go's `time.Duration` string for the durations health prints (`1.332168ms`).
pub fn go_duration(d: Duration) -> String {
    format!("{d:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(k: &str, v: &str) -> mvccpb::KeyValue {
        mvccpb::KeyValue {
            key: k.into(),
            value: v.into(),
            create_revision: 2,
            mod_revision: 4,
            version: 2,
            lease: 0,
        }
    }
    fn hdr() -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader {
            cluster_id: 324952591200643719,
            member_id: 3319814642761637952,
            revision: 4,
            raft_term: 2,
        })
    }
    pub(crate) fn render(f: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> String {
        let mut buf = Vec::new();
        f(&mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn get_simple_and_json_match_etcdctl() {
        let r = pb::RangeResponse {
            header: hdr(),
            kvs: vec![kv("foo", "baz"), kv("foo2", "bar 2")],
            more: false,
            count: 2,
        };
        assert_eq!(
            render(|o| get(o, Format::Simple, &r, GetView::default())),
            "foo\nbaz\nfoo2\nbar 2\n"
        );
        let vo = GetView {
            print_value_only: true,
            ..Default::default()
        };
        assert_eq!(render(|o| get(o, Format::Simple, &r, vo)), "baz\nbar 2\n");
        let co = GetView {
            count_only: true,
            ..Default::default()
        };
        assert_eq!(render(|o| get(o, Format::Simple, &r, co)), "2\n");
        // Captured from etcdctl 3.4 (second kv trimmed to the first's revisions).
        assert_eq!(
            render(|o| get(o, Format::Json, &r, GetView::default())),
            "{\"header\":{\"cluster_id\":324952591200643719,\"member_id\":3319814642761637952,\"revision\":4,\"raft_term\":2},\
             \"kvs\":[{\"key\":\"Zm9v\",\"create_revision\":2,\"mod_revision\":4,\"version\":2,\"value\":\"YmF6\"},\
             {\"key\":\"Zm9vMg==\",\"create_revision\":2,\"mod_revision\":4,\"version\":2,\"value\":\"YmFyIDI=\"}],\"count\":2}\n"
        );
    }

    #[test]
    fn txn_simple_matches_etcdctl() {
        use pb::response_op::Response;
        let r = pb::TxnResponse {
            header: hdr(),
            succeeded: true,
            responses: vec![
                pb::ResponseOp {
                    response: Some(Response::ResponsePut(pb::PutResponse::default())),
                },
                pb::ResponseOp {
                    response: Some(Response::ResponseRange(pb::RangeResponse {
                        kvs: vec![kv("k1", "v2")],
                        ..Default::default()
                    })),
                },
                pb::ResponseOp {
                    response: Some(Response::ResponseDeleteRange(
                        pb::DeleteRangeResponse::default(),
                    )),
                },
            ],
        };
        assert_eq!(
            render(|o| txn(o, Format::Simple, &r)),
            "SUCCESS\n\nOK\n\nk1\nv2\n\n0\n"
        );
        let json = render(|o| txn(o, Format::Json, &r));
        assert!(
            json.contains("\"succeeded\":true,\"responses\":[{\"Response\":{\"ResponsePut\":{}}}"),
            "{json}"
        );
    }

    #[test]
    fn watch_simple_with_prev_kv_matches_etcdctl() {
        let r = pb::WatchResponse {
            events: vec![mvccpb::Event {
                r#type: 1,
                kv: Some(kv("k1", "")),
                prev_kv: Some(kv("k1", "w1")),
            }],
            ..Default::default()
        };
        assert_eq!(
            render(|o| watch(o, Format::Simple, &r)),
            "DELETE\nk1\nw1\nk1\n\n"
        );
    }

    #[test]
    fn status_and_members_simple_match_etcdctl() {
        let s = pb::StatusResponse {
            header: hdr(),
            version: "3.4.23".into(),
            db_size: 20480,
            leader: 3319814642761637952,
            raft_index: 14,
            raft_term: 2,
            raft_applied_index: 14,
            ..Default::default()
        };
        assert_eq!(
            render(|o| endpoint_status(o, Format::Simple, &[("127.0.0.1:23790".into(), s)])),
            "127.0.0.1:23790, 2e1259d415f2a040, 3.4.23, 20 kB, true, false, 2, 14, 14, \n"
        );
        let m = pb::MemberListResponse {
            header: hdr(),
            members: vec![pb::Member {
                id: 3319814642761637952,
                name: "default".into(),
                peer_ur_ls: vec!["http://127.0.0.1:23800".into()],
                client_ur_ls: vec!["http://127.0.0.1:23790".into()],
                is_learner: false,
            }],
        };
        assert_eq!(
            render(|o| member_list(o, Format::Simple, &m, &[])),
            "2e1259d415f2a040, started, default, http://127.0.0.1:23800, http://127.0.0.1:23790, false\n"
        );
        assert!(render(|o| member_list(o, Format::Json, &m, &[])).contains(
            "\"members\":[{\"ID\":3319814642761637952,\"name\":\"default\",\"peerURLs\""
        ));
    }
}
