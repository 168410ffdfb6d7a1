//! Crash and disk faults on real database files: a torn last commit (the file cut at
//! every byte offset of the region that commit wrote) and flipped bytes. The member
//! opens its data dir exactly as meshd does (`storage::open_database`, then the state
//! machine); it must either refuse with a clear error or serve a state that really was
//! committed — never corrupt data.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use mesh_core::kv::{KvError, KvStore};
use mesh_core::proto::etcdserverpb::{PutRequest, RangeRequest};
use mesh_core::storage::{open_database, StorageError, DB_FILE};

type State = BTreeMap<Vec<u8>, Vec<u8>>;

/// Copies are many and large: keep them in memory when the machine has /dev/shm.
fn scratch() -> tempfile::TempDir {
    if Path::new("/dev/shm").is_dir() {
        if let Ok(d) = tempfile::tempdir_in("/dev/shm") {
            return d;
        }
    }
    tempfile::tempdir().expect("tempdir")
}

fn put(kv: &KvStore, key: &str, value: Vec<u8>) {
    let mut b = kv.begin().expect("begin");
    b.put(&PutRequest {
        key: key.into(),
        value,
        ..Default::default()
    })
    .expect("put");
    // Durable, like the commit that follows a Ready's fsync.
    b.commit(true).expect("commit");
}

fn read_all(kv: &KvStore) -> Result<State, KvError> {
    let r = kv.range(&RangeRequest {
        key: vec![0],
        range_end: vec![0],
        ..Default::default()
    })?;
    Ok(r.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect())
}

fn marker(i: usize) -> Vec<u8> {
    format!("VALUE-{i:04}-").repeat(8).into_bytes()
}

/// A data dir with 40 committed keys (state A), then one more commit (state B) that
/// overwrites a key and adds a large one. Returns the file bytes after each state.
fn prepare(dir: &Path) -> (Vec<u8>, State, Vec<u8>, State) {
    let data = dir.join("data");
    let db = open_database(&data).expect("create");
    let kv = KvStore::open(db).expect("open kv");
    for i in 0..40 {
        put(&kv, &format!("key/{i:02}"), marker(i));
    }
    let state_a = read_all(&kv).unwrap();
    let bytes_a = std::fs::read(data.join(DB_FILE)).unwrap();
    put(&kv, "key/00", marker(1000));
    put(&kv, "key/zz-last", marker(2000).repeat(20));
    let state_b = read_all(&kv).unwrap();
    drop(kv);
    let bytes_b = std::fs::read(data.join(DB_FILE)).unwrap();
    // The second put is the "last commit"; A's bytes are from before both, which is
    // also a complete commit (a rollback target), so keep the intermediate out.
    (bytes_a, state_a, bytes_b, state_b)
}

/// What a member makes of a database file.
#[derive(Debug)]
enum Outcome {
    Refused(String),
    Served(State),
    ReadError(String),
}

fn open_copy(dir: &Path, bytes: &[u8]) -> Outcome {
    let data = dir.join("copy");
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join(DB_FILE), bytes).unwrap();
    let db = match open_database(&data) {
        Ok(db) => db,
        Err(e) => return refused(e, &data),
    };
    let kv = match KvStore::open(Arc::clone(&db)) {
        Ok(kv) => kv,
        Err(e) => return Outcome::Refused(e.to_string()),
    };
    match read_all(&kv) {
        Ok(s) => Outcome::Served(s),
        Err(e) => Outcome::ReadError(e.to_string()),
    }
}

fn refused(e: StorageError, data: &Path) -> Outcome {
    let msg = e.to_string();
    // The refusal must say what is wrong and where.
    assert!(
        matches!(e, StorageError::Corrupt { .. }),
        "refused with an unclear error: {msg}"
    );
    assert!(
        msg.contains(&data.display().to_string()),
        "refusal does not name the data dir: {msg}"
    );
    Outcome::Refused(msg)
}

/// Byte ranges where two versions of the file differ (B's extra tail included).
fn changed_ranges(a: &[u8], b: &[u8]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, byte) in b.iter().enumerate() {
        if a.get(i) != Some(byte) {
            match out.last_mut() {
                // Merge ranges closer than a page: one write.
                Some(r) if i - r.1 <= 4096 => r.1 = i + 1,
                _ => out.push((i, i + 1)),
            }
        }
    }
    out
}

#[test]
fn torn_last_commit_recovers_or_refuses_and_never_serves_corrupt_data() {
    let dir = scratch();
    let (bytes_a, state_a, bytes_b, state_b) = prepare(dir.path());
    let ranges = changed_ranges(&bytes_a, &bytes_b);
    assert!(!ranges.is_empty(), "the last commits changed nothing?");
    // Every offset of the tail region the last commits wrote (where an append that
    // was cut short ends), plus every 61st offset of the earlier regions (the header
    // and pages rewritten in place; every offset there would take minutes of copies
    // for little more coverage), plus the file's end.
    let (tail_start, tail_end) = *ranges.last().expect("not empty");
    let mut offsets: Vec<usize> = (tail_start..=tail_end).collect();
    offsets.extend(ranges.iter().flat_map(|&(s, e)| (s..e).step_by(61)));
    offsets.push(bytes_b.len());
    offsets.sort();
    offsets.dedup();
    let total_written: usize = ranges.iter().map(|(s, e)| e - s).sum();
    eprintln!(
        "file {} bytes; last commits wrote {} bytes in {} regions {:?}; truncating at {} offsets",
        bytes_b.len(),
        total_written,
        ranges.len(),
        ranges,
        offsets.len()
    );
    let (mut refused, mut as_b, mut as_a) = (0, 0, 0);
    for &off in &offsets {
        match open_copy(dir.path(), &bytes_b[..off]) {
            Outcome::Refused(_) => refused += 1,
            Outcome::Served(s) if s == state_b => as_b += 1,
            Outcome::Served(s) if s == state_a => as_a += 1,
            Outcome::Served(s) => panic!(
                "file cut at {off} served a state never committed: {} keys",
                s.len()
            ),
            Outcome::ReadError(e) => panic!("file cut at {off} opened but reads fail: {e}"),
        }
    }
    eprintln!(
        "truncations: {refused} refused, {as_b} served the last commit, {as_a} an earlier one"
    );
    assert_eq!(refused + as_a + as_b, offsets.len());
    // The uncut file is served in full.
    assert!(matches!(open_copy(dir.path(), &bytes_b), Outcome::Served(s) if s == state_b));
}

#[test]
fn flipped_bytes_are_refused_or_reported_never_served() {
    let dir = scratch();
    let (_, _, bytes, state) = prepare(dir.path());
    // Every byte of every stored copy of one value, and a dense sample of the file.
    let needle = marker(7);
    let mut offsets: Vec<usize> = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle.as_slice())
        .flat_map(|(i, _)| i..i + needle.len())
        .collect();
    let in_value = offsets.len();
    assert!(in_value > 0, "the value is not in the file as plain bytes?");
    offsets.extend((0..bytes.len()).step_by(397));
    let (mut refused, mut unchanged, mut reported) = (0, 0, 0);
    let mut value_refusals = 0;
    for (n, &off) in offsets.iter().enumerate() {
        let mut copy = bytes.clone();
        copy[off] ^= 0xFF;
        match open_copy(dir.path(), &copy) {
            Outcome::Refused(msg) => {
                assert!(msg.contains("corrupt"), "{msg}");
                refused += 1;
                if n < in_value {
                    value_refusals += 1;
                }
            }
            // A byte in a free page or an old page copy: nothing live changed.
            Outcome::Served(s) if s == state => unchanged += 1,
            Outcome::Served(s) => {
                let diff: Vec<_> = s
                    .iter()
                    .filter(|(k, v)| state.get(*k) != Some(*v))
                    .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
                    .collect();
                panic!("byte {off} flipped and served as data: keys {diff:?} differ");
            }
            Outcome::ReadError(e) => {
                assert!(e.contains("corrupt"), "{e}");
                reported += 1;
            }
        }
    }
    eprintln!(
        "{} flips: {refused} refused at open, {reported} reported on read, {unchanged} in unused bytes",
        offsets.len()
    );
    assert!(
        value_refusals > 0,
        "no flip inside a live value was detected ({in_value} tried)"
    );
}
