//! etcd's backend database layout (docs/etcd-snapshot-format.md), over the bbolt file
//! format of [`crate::bolt`]: meshd's replicated state written as the database etcd
//! would hold for it, and read back from one that etcd 3.4 or 3.5 wrote.
//!
//! - `key`: one entry per history record, keyed by its revision (8-byte big-endian
//!   main, `_`, 8-byte big-endian sub, `t` appended for a deletion), valued by the
//!   `mvccpb.KeyValue`.
//! - `lease`: lease ID (8 bytes big-endian) to `leasepb.Lease{ID, TTL}`.
//! - `auth`: `authEnabled` (one byte) and `authRevision` (u64 big-endian); `authUsers`
//!   and `authRoles`: name to `authpb.User` / `authpb.Role` (etcd keeps the built-in
//!   `root` role out of `authRoles`).
//! - `members`: member ID in hex to etcd's member JSON; `members_removed` empty.
//! - `alarm`: an `etcdserverpb.AlarmMember` as the key, an empty value.
//! - `meta`: `consistent_index` and `term` (etcd's restore rewrites both), and the
//!   compaction as `scheduledCompactRev`/`finishedCompactRev`.
//! - `cluster`: `clusterVersion`.
//!
//! Passwords: meshd stores Argon2id hashes and etcd bcrypt hashes. A user carried from
//! etcd keeps its bcrypt hash, which meshd verifies; a user carried to etcd keeps its
//! Argon2id hash, which etcd cannot verify (set its password again there).

use std::io::{Cursor, Read, Seek};

use prost::Message;

use crate::bolt::{self, BoltError, Reader, Value};
use crate::proto::authpb::{Role, User};
use crate::proto::etcdserverpb::AlarmMember;
use crate::proto::meshpb::{AuthSnapshot, HistoryRecord, LeaseRecord, MemberRecord, StoreSnapshot};
use crate::proto::mvccpb::KeyValue;

/// etcd's lease record (`leasepb.Lease`).
#[derive(Clone, PartialEq, prost::Message)]
struct Lease {
    #[prost(int64, tag = "1")]
    id: i64,
    #[prost(int64, tag = "2")]
    ttl: i64,
    #[prost(int64, tag = "3")]
    remaining_ttl: i64,
}

/// etcd's member record in the `members` bucket.
#[derive(serde::Serialize, serde::Deserialize)]
struct MemberJson {
    id: u64,
    #[serde(rename = "peerURLs", default)]
    peer_urls: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    name: String,
    #[serde(rename = "clientURLs", default, skip_serializing_if = "Vec::is_empty")]
    client_urls: Vec<String>,
    #[serde(
        rename = "isLearner",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    is_learner: bool,
}

/// A bucket's entries, key-ordered.
type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// The cluster version written to `cluster/clusterVersion`.
const CLUSTER_VERSION: &str = "3.5.0";

/// A revision key: 17 bytes, 18 with the tombstone mark.
fn revision_key(main: i64, sub: i64, tombstone: bool) -> Vec<u8> {
    let mut k = Vec::with_capacity(18);
    k.extend_from_slice(&main.to_be_bytes());
    k.push(b'_');
    k.extend_from_slice(&sub.to_be_bytes());
    if tombstone {
        k.push(b't');
    }
    k
}

/// One history record as etcd's `key` bucket holds it: the revision key, and the
/// `KeyValue` (a tombstone's carries the user key only). etcd's HashKV hashes exactly
/// these bytes.
pub(crate) fn key_bucket_entry(
    main: i64,
    sub: i64,
    tombstone: bool,
    kv: &KeyValue,
) -> (Vec<u8>, Vec<u8>) {
    let value = if tombstone {
        deletion_value(&kv.key)
    } else {
        kv.encode_to_vec()
    };
    (revision_key(main, sub, tombstone), value)
}

/// The value etcd stores for a deletion of `key`: a `KeyValue` carrying the key alone.
fn deletion_value(key: &[u8]) -> Vec<u8> {
    KeyValue {
        key: key.to_vec(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Why an etcd database could not be read as meshd state.
#[derive(Debug, thiserror::Error)]
pub enum EtcdDbError {
    #[error("{0}")]
    Bolt(#[from] BoltError),
    #[error("bucket {bucket}: {what}")]
    Layout { bucket: &'static str, what: String },
}

fn layout(bucket: &'static str, what: impl Into<String>) -> EtcdDbError {
    EtcdDbError::Layout {
        bucket,
        what: what.into(),
    }
}

/// Buckets named and filled, in name order.
type Buckets = Vec<(&'static [u8], Entries)>;

/// The buckets of `snap`'s database other than `key`: those whose names sort before
/// it, and those after it. They hold members, leases, alarms and auth: small next to
/// the history.
fn buckets_around_key(snap: &StoreSnapshot) -> (Buckets, Buckets) {
    let mut buckets: Buckets = Vec::new();

    let mut alarm: Entries = snap
        .alarms
        .iter()
        .map(|a| (a.encode_to_vec(), Vec::new()))
        .collect();
    alarm.sort();
    alarm.dedup();
    buckets.push((b"alarm", alarm));

    let auth = snap.auth.clone().unwrap_or_default();
    buckets.push((
        b"auth",
        vec![
            (b"authEnabled".to_vec(), vec![u8::from(auth.enabled)]),
            (
                b"authRevision".to_vec(),
                auth.revision.to_be_bytes().to_vec(),
            ),
        ],
    ));
    let mut roles: Vec<_> = auth
        .roles
        .iter()
        .filter(|r| r.name != b"root")
        .map(|r| (r.name.clone(), r.encode_to_vec()))
        .collect();
    roles.sort();
    buckets.push((b"authRoles", roles));
    let mut users: Vec<_> = auth
        .users
        .iter()
        .map(|u| (u.name.clone(), u.encode_to_vec()))
        .collect();
    users.sort();
    buckets.push((b"authUsers", users));

    buckets.push((
        b"cluster",
        vec![(
            b"clusterVersion".to_vec(),
            CLUSTER_VERSION.as_bytes().to_vec(),
        )],
    ));

    let before = std::mem::take(&mut buckets);

    let mut leases: Vec<_> = snap
        .leases
        .iter()
        .map(|l| {
            let rec = Lease {
                id: l.id,
                ttl: l.ttl,
                remaining_ttl: 0,
            };
            (l.id.to_be_bytes().to_vec(), rec.encode_to_vec())
        })
        .collect();
    leases.sort();
    buckets.push((b"lease", leases));

    let mut members: Vec<_> = snap
        .members
        .iter()
        .map(|m| {
            let json = MemberJson {
                id: m.id,
                peer_urls: m
                    .peer_urls
                    .iter()
                    .map(|u| crate::membership::peer_url(u, "http"))
                    .collect(),
                name: m.name.clone(),
                client_urls: m.client_urls.clone(),
                is_learner: m.is_learner,
            };
            (
                format!("{:x}", m.id).into_bytes(),
                serde_json::to_vec(&json).unwrap_or_default(),
            )
        })
        .collect();
    members.sort();
    buckets.push((b"members", members));
    buckets.push((b"members_removed", Vec::new()));

    let mut meta = vec![
        // etcd's restore sets both; a plausible value keeps `snapshot status` readers
        // that look at them content.
        (
            b"consistent_index".to_vec(),
            (snap.revision.max(0) as u64).to_be_bytes().to_vec(),
        ),
        (b"term".to_vec(), 1u64.to_be_bytes().to_vec()),
    ];
    if snap.compact_revision > 0 {
        let rev = revision_key(snap.compact_revision, 0, false);
        meta.push((b"finishedCompactRev".to_vec(), rev.clone()));
        meta.push((b"scheduledCompactRev".to_vec(), rev));
    }
    meta.sort();
    buckets.push((b"meta", meta));
    (before, buckets)
}

/// Writes `snap` as an etcd backend database (no trailer).
pub fn write(snap: &StoreSnapshot) -> Result<Vec<u8>, BoltError> {
    let (before, after) = buckets_around_key(snap);
    let mut keys: Entries = snap
        .history
        .iter()
        .map(|h| {
            key_bucket_entry(
                h.main,
                h.sub,
                h.tombstone,
                &h.kv.clone().unwrap_or_default(),
            )
        })
        .collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    let mut buckets = before;
    buckets.push((KEY_BUCKET, keys));
    buckets.extend(after);
    let (out, _) = bolt::write_buckets(Cursor::new(Vec::new()), buckets)?;
    Ok(out.into_inner())
}

/// The bucket of history records.
const KEY_BUCKET: &[u8] = b"key";

/// One history record for [`write_streaming`]: its revision, whether it is a
/// deletion, and its `mvccpb.KeyValue` encoding.
pub struct RecordRef<'a> {
    pub main: i64,
    pub sub: i64,
    pub tombstone: bool,
    pub kv: &'a [u8],
}

/// Writes the database of `snap` front to back to `out`, which need not seek, taking
/// the history from `records` rather than from `snap` (whose history is ignored).
/// `records` is called twice (the first pass lays the file out) and must hand over
/// the same records both times, in revision order, passing on the first error of the
/// function it is given (an error of its own it may keep for the caller). `size` is
/// told the file's length before its first byte is written. Memory stays small
/// whatever the history's size.
pub fn write_streaming<W, R, S>(
    out: W,
    snap: &StoreSnapshot,
    mut records: R,
    size: S,
) -> Result<W, BoltError>
where
    W: std::io::Write,
    R: FnMut(&mut dyn FnMut(RecordRef<'_>) -> Result<(), BoltError>) -> Result<(), BoltError>,
    S: FnOnce(&mut W, u64) -> std::io::Result<()>,
{
    let (before, after) = buckets_around_key(snap);
    let fill = |w: &mut bolt::Writer<W>, buckets: &Buckets| -> Result<(), BoltError> {
        for (name, kvs) in buckets {
            w.create_bucket(name)?;
            for (k, v) in kvs {
                w.put(k, v)?;
            }
            w.end_bucket()?;
        }
        Ok(())
    };
    let feed = |w: &mut bolt::Writer<W>| {
        fill(w, &before)?;
        w.create_bucket(KEY_BUCKET)?;
        records(&mut |r: RecordRef<'_>| {
            let key = revision_key(r.main, r.sub, r.tombstone);
            if !r.tombstone {
                return w.put(&key, r.kv);
            }
            let kv = KeyValue::decode(r.kv)
                .map_err(|e| BoltError::Invalid(format!("deletion record: {e}")))?;
            w.put(&key, &deletion_value(&kv.key))
        })?;
        w.end_bucket()?;
        fill(w, &after)
    };
    let (out, _) = bolt::write_streaming_sized(out, bolt::DEFAULT_PAGE_SIZE, size, feed)?;
    Ok(out)
}

/// Reads an etcd backend database (no trailer) as meshd state.
pub fn read<R: Read + Seek>(src: R) -> Result<StoreSnapshot, EtcdDbError> {
    let mut rd = Reader::open(src)?;
    // bbolt's own consistency check first: every page reachable once, trees ordered.
    rd.check()?;
    let mut snap = StoreSnapshot::default();

    for (k, v) in bucket(&mut rd, "key")? {
        let (main, sub, tombstone) = match k.len() {
            17 | 18 if k[8] == b'_' && (k.len() == 17 || k[17] == b't') => (
                i64::from_be_bytes(k[..8].try_into().expect("8 bytes")),
                i64::from_be_bytes(k[9..17].try_into().expect("8 bytes")),
                k.len() == 18,
            ),
            _ => return Err(layout("key", format!("{} is not a revision", hex(&k)))),
        };
        if main <= 0 || sub < 0 {
            return Err(layout("key", format!("revision {main}_{sub} out of range")));
        }
        let mut kv = KeyValue::decode(v.as_slice())
            .map_err(|e| layout("key", format!("revision {main}: {e}")))?;
        if kv.key.is_empty() {
            return Err(layout("key", format!("revision {main} has no key")));
        }
        if tombstone {
            kv = KeyValue {
                key: kv.key,
                mod_revision: main,
                ..Default::default()
            };
        } else if kv.mod_revision != main {
            return Err(layout(
                "key",
                format!("revision {main} holds mod_revision {}", kv.mod_revision),
            ));
        }
        if snap
            .history
            .last()
            .is_some_and(|h| (h.main, h.sub) == (main, sub))
        {
            return Err(layout(
                "key",
                format!("revision {main}_{sub} appears twice"),
            ));
        }
        snap.revision = snap.revision.max(main);
        snap.history.push(HistoryRecord {
            main,
            sub,
            tombstone,
            kv: Some(kv),
        });
    }

    // etcd records a compaction as scheduled, deletes the old records in batches,
    // then records it as finished: a file taken in between holds a partly compacted
    // history, which is finished here as etcd finishes it when it loads the file.
    let mut scheduled = 0;
    let mut finished = 0;
    for (k, v) in bucket(&mut rd, "meta")? {
        let which = match k.as_slice() {
            b"finishedCompactRev" => &mut finished,
            b"scheduledCompactRev" => &mut scheduled,
            _ => continue,
        };
        let rev = v
            .get(..8)
            .ok_or_else(|| layout("meta", "a compaction revision is short"))?;
        *which = i64::from_be_bytes(rev.try_into().expect("8 bytes"));
    }
    snap.compact_revision = finished.max(scheduled).max(0);
    if snap.compact_revision > 0 {
        compact(&mut snap.history, snap.compact_revision);
    }
    if snap.compact_revision > snap.revision {
        // A compaction at the last revision whose records were all removed.
        snap.revision = snap.compact_revision;
    }

    for (k, v) in bucket(&mut rd, "lease")? {
        let l = Lease::decode(v.as_slice()).map_err(|e| layout("lease", e.to_string()))?;
        if k.as_slice() != l.id.to_be_bytes() || l.id == 0 {
            return Err(layout(
                "lease",
                format!("key {} holds lease {}", hex(&k), l.id),
            ));
        }
        if !(1..=crate::kv::MAX_LEASE_TTL).contains(&l.ttl) {
            return Err(layout("lease", format!("lease {} has TTL {}", l.id, l.ttl)));
        }
        snap.leases.push(LeaseRecord {
            id: l.id,
            ttl: l.ttl,
        });
    }

    let mut auth = AuthSnapshot::default();
    for (k, v) in bucket(&mut rd, "auth")? {
        match k.as_slice() {
            b"authEnabled" => auth.enabled = v.first() == Some(&1),
            b"authRevision" => {
                let rev = v
                    .get(..8)
                    .ok_or_else(|| layout("auth", "authRevision is short"))?;
                auth.revision = u64::from_be_bytes(rev.try_into().expect("8 bytes"));
            }
            _ => {}
        }
    }
    for (_, v) in bucket(&mut rd, "authUsers")? {
        auth.users
            .push(User::decode(v.as_slice()).map_err(|e| layout("authUsers", e.to_string()))?);
    }
    for (_, v) in bucket(&mut rd, "authRoles")? {
        auth.roles
            .push(Role::decode(v.as_slice()).map_err(|e| layout("authRoles", e.to_string()))?);
    }
    snap.auth = Some(auth);

    for (_, v) in bucket(&mut rd, "members")? {
        let m: MemberJson =
            serde_json::from_slice(&v).map_err(|e| layout("members", e.to_string()))?;
        snap.members.push(MemberRecord {
            id: m.id,
            name: m.name,
            peer_urls: m.peer_urls,
            client_urls: m.client_urls,
            is_learner: m.is_learner,
        });
    }
    for (k, _) in bucket(&mut rd, "alarm")? {
        snap.alarms
            .push(AlarmMember::decode(k.as_slice()).map_err(|e| layout("alarm", e.to_string()))?);
    }
    Ok(snap)
}

/// Drops what a compaction at `rev` removes: of each key's records at or below `rev`,
/// all but the newest, and that one too when it is a deletion. `history` is in
/// revision order.
fn compact(history: &mut Vec<HistoryRecord>, rev: i64) {
    use std::collections::HashMap;
    let key = |h: &HistoryRecord| h.kv.as_ref().map(|kv| kv.key.clone()).unwrap_or_default();
    let mut newest: HashMap<Vec<u8>, usize> = HashMap::new();
    for (i, h) in history.iter().enumerate() {
        if h.main <= rev {
            newest.insert(key(h), i);
        }
    }
    let mut i = 0;
    history.retain(|h| {
        let keep = h.main > rev || (newest.get(&key(h)) == Some(&i) && !h.tombstone);
        i += 1;
        keep
    });
}

/// The key/values of a top-level bucket; empty when the bucket is absent (etcd creates
/// missing buckets at start).
fn bucket<R: Read + Seek>(rd: &mut Reader<R>, name: &'static str) -> Result<Entries, EtcdDbError> {
    let Some(b) = rd.bucket(&[name.as_bytes()])? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for entry in rd.entries(&b) {
        let entry = entry?;
        match entry.value {
            Value::Data(v) => out.push((entry.key, v)),
            Value::Bucket(_) => {
                return Err(layout(name, format!("nested bucket {}", hex(&entry.key))))
            }
        }
    }
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::authpb::Permission;

    fn kv(key: &str, value: &str, create: i64, rev: i64, version: i64, lease: i64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.into(),
            create_revision: create,
            mod_revision: rev,
            version,
            lease,
        }
    }

    fn sample() -> StoreSnapshot {
        let put = |main, sub, kv| HistoryRecord {
            main,
            sub,
            tombstone: false,
            kv: Some(kv),
        };
        StoreSnapshot {
            revision: 5,
            compact_revision: 2,
            history: vec![
                put(2, 0, kv("a", "1", 2, 2, 1, 0)),
                put(3, 0, kv("a", "2", 2, 3, 2, 0)),
                put(3, 1, kv("b", "x", 3, 3, 1, 7)),
                HistoryRecord {
                    main: 5,
                    sub: 0,
                    tombstone: true,
                    kv: Some(KeyValue {
                        key: b"a".to_vec(),
                        mod_revision: 5,
                        ..Default::default()
                    }),
                },
            ],
            members: vec![MemberRecord {
                id: 0xabc,
                name: "m0".into(),
                peer_urls: vec!["127.0.0.1:6783".into()],
                client_urls: vec!["http://127.0.0.1:2379".into()],
                is_learner: false,
            }],
            alarms: vec![AlarmMember {
                member_id: 0xabc,
                alarm: 1,
            }],
            leases: vec![LeaseRecord { id: 7, ttl: 60 }],
            auth: Some(AuthSnapshot {
                enabled: true,
                revision: 4,
                users: vec![User {
                    name: b"root".to_vec(),
                    password: b"$argon2id$...".to_vec(),
                    roles: vec!["root".into()],
                    options: None,
                }],
                roles: vec![Role {
                    name: b"reader".to_vec(),
                    key_permission: vec![Permission {
                        perm_type: 0,
                        key: b"a".to_vec(),
                        range_end: b"b".to_vec(),
                    }],
                }],
            }),
        }
    }

    #[test]
    fn meshd_state_round_trips_through_etcds_layout() {
        let snap = sample();
        let bytes = write(&snap).unwrap();
        let back = read(Cursor::new(bytes)).unwrap();
        assert_eq!(back.revision, 5);
        assert_eq!(back.compact_revision, 2);
        assert_eq!(back.history, snap.history);
        assert_eq!(back.leases, snap.leases);
        assert_eq!(back.auth, snap.auth);
        assert_eq!(back.alarms, snap.alarms);
        assert_eq!(back.members[0].peer_urls, ["http://127.0.0.1:6783"]);
        assert_eq!(back.members[0].client_urls, snap.members[0].client_urls);
    }

    #[test]
    fn a_compaction_scheduled_but_not_finished_is_finished_on_reading() {
        // A compaction at 3 is recorded while a@2, which it removes, is still in the
        // file (as in a file taken while etcd was deleting the old records).
        let mut snap = sample();
        snap.compact_revision = 3;
        let back = read(Cursor::new(write(&snap).unwrap())).unwrap();
        assert_eq!(back.compact_revision, 3);
        let revs: Vec<(i64, i64)> = back.history.iter().map(|h| (h.main, h.sub)).collect();
        // a@2 is superseded by a@3 (kept, newest at or below 3); b@3 kept; a's
        // deletion at 5 is above the compaction.
        assert_eq!(revs, [(3, 0), (3, 1), (5, 0)]);
    }

    #[test]
    fn absurd_lease_ttls_and_repeated_revisions_are_refused() {
        let mut snap = sample();
        snap.leases[0].ttl = i64::MAX;
        let e = read(Cursor::new(write(&snap).unwrap())).unwrap_err();
        assert!(e.to_string().contains("TTL"), "{e}");
        let mut snap = sample();
        snap.history.push(snap.history[3].clone());
        snap.history[4].tombstone = false;
        let e = read(Cursor::new(write(&snap).unwrap())).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }

    #[test]
    fn a_broken_layout_is_refused_with_the_bucket_named() {
        let mut snap = sample();
        snap.history[1].kv.as_mut().unwrap().mod_revision = 9;
        let e = read(Cursor::new(write(&snap).unwrap())).unwrap_err();
        assert!(e.to_string().starts_with("bucket key:"), "{e}");
        let e = read(Cursor::new(b"not a database".to_vec())).unwrap_err();
        assert!(matches!(e, EtcdDbError::Bolt(_)), "{e}");
    }
}
