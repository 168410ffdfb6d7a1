//! Printers of the maintenance commands, in etcdctl 3.4's simple / JSON / table forms.
use std::io::{self, Write};

use mesh_core::proto::etcdserverpb as pb;
use mesh_core::snapshot::Status as SnapshotStatus;
use serde::Serialize;

use super::{json, table, write_json, Format};

#[derive(Serialize)]
struct HashKv {
    #[serde(skip_serializing_if = "Option::is_none")]
    header: Option<json::Header>,
    hash: u32,
    compact_revision: i64,
    hash_revision: i64,
}

#[derive(Serialize)]
struct EndpointHashKv {
    #[serde(rename = "Endpoint")]
    endpoint: String,
    #[serde(rename = "HashKV")]
    hash_kv: HashKv,
}

pub fn hashkv(
    out: &mut dyn Write,
    f: Format,
    list: &[(String, pb::HashKvResponse)],
) -> io::Result<()> {
    match f {
        Format::Simple => list
            .iter()
            .try_for_each(|(ep, h)| writeln!(out, "{ep}, {}", h.hash)),
        Format::Json => {
            let v: Vec<EndpointHashKv> = list
                .iter()
                .map(|(ep, h)| EndpointHashKv {
                    endpoint: ep.clone(),
                    hash_kv: HashKv {
                        header: json::header(&h.header),
                        hash: h.hash,
                        compact_revision: h.compact_revision,
                        hash_revision: h.hash_revision,
                    },
                })
                .collect();
            write_json(out, &v)
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|(ep, h)| vec![ep.clone(), h.hash.to_string()])
                .collect();
            out.write_all(table::render(&["ENDPOINT", "HASH"], &rows).as_bytes())
        }
    }
}

pub fn move_leader(
    out: &mut dyn Write,
    f: Format,
    from: u64,
    to: u64,
    r: &pb::MoveLeaderResponse,
) -> io::Result<()> {
    match f {
        Format::Json => {
            #[derive(Serialize)]
            struct MoveLeader {
                #[serde(skip_serializing_if = "Option::is_none")]
                header: Option<json::Header>,
            }
            write_json(
                out,
                &MoveLeader {
                    header: json::header(&r.header),
                },
            )
        }
        _ => writeln!(out, "Leadership transferred from {from:x} to {to:x}"),
    }
}

/// An alarm the way etcdctl prints it: `memberID:<decimal> alarm:<NAME> `.
pub fn alarm_line(a: &pb::AlarmMember) -> String {
    let name = pb::AlarmType::try_from(a.alarm)
        .map_or_else(|_| a.alarm.to_string(), |t| t.as_str_name().to_string());
    format!("memberID:{} alarm:{name} ", a.member_id)
}

pub fn alarms(out: &mut dyn Write, f: Format, r: &pb::AlarmResponse) -> io::Result<()> {
    match f {
        Format::Json => {
            #[derive(Serialize)]
            struct Alarm {
                #[serde(rename = "memberID")]
                member_id: u64,
                alarm: i32,
            }
            #[derive(Serialize)]
            struct Alarms {
                #[serde(skip_serializing_if = "Option::is_none")]
                header: Option<json::Header>,
                alarms: Vec<Alarm>,
            }
            write_json(
                out,
                &Alarms {
                    header: json::header(&r.header),
                    alarms: r
                        .alarms
                        .iter()
                        .map(|a| Alarm {
                            member_id: a.member_id,
                            alarm: a.alarm,
                        })
                        .collect(),
                },
            )
        }
        _ => r
            .alarms
            .iter()
            .try_for_each(|a| writeln!(out, "{}", alarm_line(a))),
    }
}

pub fn snapshot_status(out: &mut dyn Write, f: Format, s: &SnapshotStatus) -> io::Result<()> {
    let size = s.total_size;
    match f {
        Format::Json => {
            #[derive(Serialize)]
            #[serde(rename_all = "camelCase")]
            struct Status {
                hash: u32,
                revision: i64,
                total_key: u64,
                total_size: u64,
            }
            write_json(
                out,
                &Status {
                    hash: s.hash,
                    revision: s.revision,
                    total_key: s.total_key,
                    total_size: size,
                },
            )
        }
        Format::Simple => writeln!(
            out,
            "{:x}, {}, {}, {}",
            s.hash,
            s.revision,
            s.total_key,
            table::human_bytes(size as i64)
        ),
        Format::Table => out.write_all(
            table::render(
                &["HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE"],
                &[vec![
                    format!("{:x}", s.hash),
                    s.revision.to_string(),
                    s.total_key.to_string(),
                    table::human_bytes(size as i64),
                ]],
            )
            .as_bytes(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::render;
    use super::*;

    #[test]
    fn maintenance_simple_forms_match_etcdctl() {
        let h = pb::HashKvResponse {
            hash: 1084519789,
            ..Default::default()
        };
        assert_eq!(
            render(|o| hashkv(o, Format::Simple, &[("127.0.0.1:2379".into(), h)])),
            "127.0.0.1:2379, 1084519789\n"
        );
        assert_eq!(
            render(|o| move_leader(
                o,
                Format::Simple,
                0x8e9e05c52164694d,
                0x91bc,
                &Default::default()
            )),
            "Leadership transferred from 8e9e05c52164694d to 91bc\n"
        );
        let s = SnapshotStatus {
            hash: 0xfe01cf57,
            revision: 10,
            total_key: 7,
            total_size: 2_100_000,
        };
        assert_eq!(
            render(|o| snapshot_status(o, Format::Simple, &s)),
            "fe01cf57, 10, 7, 2.1 MB\n"
        );
    }
}
