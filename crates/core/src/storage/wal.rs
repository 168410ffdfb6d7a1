//! The Raft write-ahead log: entries and hard states appended to segment files in
//! `<data-dir>/wal/`, one `write` and one `fdatasync` per Ready.
//!
//! Why not redb: a redb durable commit also writes every keyspace page dirtied since
//! the last one and copies B-tree pages on write, an order of magnitude slower per
//! Ready than an append plus `fdatasync` of the same bytes (BENCHMARKS.md).
//!
//! # Format
//! A segment is `{seq:016x}.wal`: the magic [`MAGIC`], then records. A record is a
//! 12-byte header — payload length (u32 LE), CRC-32 of those four bytes, CRC-32 of the
//! payload — and the payload: a body and a type byte. Type bytes have several bits set,
//! so a complete record never ends in a zero byte (see Damage).
//!
//! - `ENTRY`: a Raft entry (protobuf). An index at or below the last one replaces that
//!   entry and everything after it (a new leader overwrote an uncommitted tail).
//! - `HARD_STATE`: term, vote, commit (protobuf); the last one read wins.
//! - `BASE`: index and term (u64 LE each) of the entry just before the log that
//!   follows. Every segment starts with one and a hard state, so the segments before
//!   it can be deleted once compaction has passed it.
//! - `RESET`: like `BASE`, and the log is empty after it (an installed snapshot).
//!
//! A segment is written under a temporary name and renamed once its head is durable,
//! so a segment either exists whole or not at all.
//!
//! # Zeros ahead of the end
//! The open segment is kept [`ZERO_CHUNK`] bytes longer than what it holds, and those
//! bytes are zeros that were written (not `fallocate`d). A record then lands in blocks
//! the file already has, and its `fdatasync` writes the data alone; a write that grows
//! the file makes every `fdatasync` also write the inode. Measured on this machine's
//! ext4 (`bench/fsync-ahead.py`): 115–125 µs per 8 KiB append + `fdatasync` with the
//! zeros, 190–220 µs growing (and 50 against 80 µs of CPU). `fallocate` does not help: the first write to an
//! allocated-but-unwritten block changes the extent tree, and so the inode again.
//! Replay reads the zeros as the end of the log (see Damage); a segment is cut back to
//! its records before the next one starts, so only the last one has zeros.
//!
//! # Damage
//! Only the end of the last segment can be cut short by a crash (a write that did not
//! finish): an incomplete record there, or one whose end is zeros up to the end of the
//! file (blocks allocated but never written), is truncated and the log ends with the
//! last complete record. A segment's head (its base and hard state) is durable before
//! the segment exists, so a head cut short is damage. Anything else — a checksum or length
//! that does not match, an entry out of sequence, a segment missing in the middle — is
//! reported as corruption and the member refuses to start.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost011::Message as _;
use raft::prelude::{Entry, EntryType, HardState};
use tracing::{debug, warn};

use super::vfs::{VFile, Vfs};
use super::StorageError;

/// Name of the log directory inside the data dir.
pub const WAL_DIR: &str = "wal";
/// First bytes of every segment.
pub const MAGIC: &[u8; 8] = b"meshwal1";
/// A segment this large is closed and a new one started.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Largest record accepted when reading (a Raft entry is bounded far below this by
/// the request size limit).
const MAX_RECORD: usize = 256 * 1024 * 1024;
const HEADER: usize = 12;
/// How far ahead of its records the open segment is zero-filled, and in what steps.
pub const ZERO_CHUNK: u64 = 1024 * 1024;
static ZEROS: [u8; ZERO_CHUNK as usize] = [0; ZERO_CHUNK as usize];

const ENTRY: u8 = 0xE1;
const HARD_STATE: u8 = 0xB2;
const BASE: u8 = 0xA3;
const RESET: u8 = 0x94;

/// What the segments on disk hold, replayed in order.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Replayed {
    /// Index and term of the entry just before `entries[0]`.
    pub base_index: u64,
    pub base_term: u64,
    /// Contiguous entries `base_index + 1 ..`.
    pub entries: VecDeque<Entry>,
    pub hard_state: HardState,
}

impl Replayed {
    fn last(&self) -> (u64, u64) {
        match self.entries.back() {
            Some(e) => (e.index, e.term),
            None => (self.base_index, self.base_term),
        }
    }
}

/// The open log: appends go to the last segment.
pub struct Wal {
    vfs: Arc<dyn Vfs>,
    dir: PathBuf,
    file: Box<dyn VFile>,
    /// Sequence number of the open segment.
    seq: u64,
    /// Bytes written to the open segment, and how many of them are known durable.
    len: u64,
    synced: u64,
    /// The open segment's length on disk: zeros from `len` up to here.
    zeroed: u64,
    /// Records not yet written.
    buf: Vec<u8>,
    /// Every segment on disk, oldest first.
    segments: VecDeque<Segment>,
    /// Last index and term and hard state as of the records written or buffered, for
    /// the head of the next segment.
    last: (u64, u64),
    hard_state: HardState,
}

/// A segment file: its sequence number, the index its `BASE` names, and the lowest
/// entry index written in it (`u64::MAX` if none).
#[derive(Debug, Clone, Copy)]
struct Segment {
    seq: u64,
    base: u64,
    min_entry: u64,
}

fn segment_name(seq: u64) -> String {
    format!("{seq:016x}.wal")
}

impl Wal {
    /// Opens the log of `data_dir`, replaying every segment; creates an empty log
    /// (after index 0) if there is none. Returns whether the log was just created.
    pub fn open(
        vfs: &Arc<dyn Vfs>,
        data_dir: &Path,
    ) -> Result<(Wal, Replayed, bool), StorageError> {
        let dir = data_dir.join(WAL_DIR);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StorageError::Io { path, source }
        };
        let created = !vfs.exists(&dir);
        if created {
            // Build the first segment aside and rename the directory into place, so a
            // crash never leaves a log directory without a complete first segment.
            let tmp = data_dir.join(format!("{WAL_DIR}.tmp"));
            if vfs.exists(&tmp) {
                vfs.remove_dir_all(&tmp).map_err(io(&tmp))?;
            }
            vfs.create_dir_all(&tmp).map_err(io(&tmp))?;
            write_segment(&**vfs, &tmp, 1, (0, 0), &HardState::default())?;
            // The segment's name must be durable inside the directory before the
            // directory takes its final name: otherwise a power cut can leave `wal/`
            // durable but empty, and the member could not start.
            sync_dir(&**vfs, &tmp)?;
            vfs.rename(&tmp, &dir).map_err(io(&dir))?;
            sync_dir(&**vfs, data_dir)?;
        }
        let mut seqs = Vec::new();
        for name in vfs.list(&dir).map_err(io(&dir))? {
            if let Some(stem) = name.strip_suffix(".wal") {
                match u64::from_str_radix(stem, 16) {
                    Ok(seq) if stem.len() == 16 => seqs.push(seq),
                    _ => {
                        return Err(corrupt(
                            data_dir,
                            format!("unexpected file {WAL_DIR}/{name}"),
                        ))
                    }
                }
            } else if name.ends_with(".tmp") {
                // A segment whose head never became durable: it never held anything.
                let _ = vfs.remove_file(&dir.join(&name));
            }
        }
        seqs.sort_unstable();
        if seqs.is_empty() {
            return Err(corrupt(
                data_dir,
                format!("{WAL_DIR}/ holds no log segment"),
            ));
        }
        for w in seqs.windows(2) {
            if w[1] != w[0] + 1 {
                return Err(corrupt(
                    data_dir,
                    format!("log segment {} is missing", segment_name(w[0] + 1)),
                ));
            }
        }
        let mut state: Option<Replayed> = None;
        let mut segments = VecDeque::new();
        let (mut open_len, mut zeroed) = (0, 0);
        for (i, &seq) in seqs.iter().enumerate() {
            let path = dir.join(segment_name(seq));
            let is_last = i + 1 == seqs.len();
            let bytes = vfs.read(&path).map_err(io(&path))?;
            let (base, min_entry, good_len) =
                replay_segment(data_dir, seq, &bytes, is_last, &mut state)?;
            zeroed = bytes.len() as u64;
            if is_last && bytes[good_len..].iter().all(|&b| b == 0) {
                // The zeros kept ahead of the records (or a record of which nothing
                // reached the disk): the log ends here, and the zeros stay.
            } else if good_len < bytes.len() {
                zeroed = good_len as u64;
                warn!(
                    segment = %path.display(),
                    dropped = bytes.len() - good_len,
                    "raft log: an incomplete record at the end (a write cut short) was dropped"
                );
                let f = vfs.open_write(&path).map_err(io(&path))?;
                f.set_len(good_len as u64).map_err(io(&path))?;
                f.sync_all().map_err(io(&path))?;
            }
            segments.push_back(Segment {
                seq,
                base,
                min_entry,
            });
            open_len = good_len as u64;
        }
        let replayed =
            state.ok_or_else(|| corrupt(data_dir, "no log segment holds a base record".into()))?;
        let seq = *seqs.last().expect("not empty");
        let path = dir.join(segment_name(seq));
        let file = vfs.open_write(&path).map_err(io(&path))?;
        let wal = Wal {
            vfs: vfs.clone(),
            dir,
            file,
            seq,
            len: open_len,
            synced: open_len,
            zeroed,
            buf: Vec::new(),
            segments,
            last: replayed.last(),
            hard_state: replayed.hard_state.clone(),
        };
        Ok((wal, replayed, created))
    }

    /// Buffers entries (the first may replace the tail from its index on).
    pub fn append(&mut self, ents: &[Entry]) {
        if let (Some(first), Some(seg)) = (ents.first(), self.segments.back_mut()) {
            seg.min_entry = seg.min_entry.min(first.index);
        }
        for e in ents {
            push_record(&mut self.buf, ENTRY, |b| {
                e.encode(b).expect("vec has capacity")
            });
            self.last = (e.index, e.term);
        }
    }

    /// Buffers a hard state.
    pub fn set_hard_state(&mut self, hs: &HardState) {
        push_record(&mut self.buf, HARD_STATE, |b| {
            hs.encode(b).expect("vec has capacity")
        });
        self.hard_state = hs.clone();
    }

    /// Buffers a reset: the log is empty after `index` (an installed snapshot).
    pub fn reset(&mut self, index: u64, term: u64) {
        push_record(&mut self.buf, RESET, |b| push_point(b, (index, term)));
        self.last = (index, term);
    }

    /// Makes `log` the whole durable log: a reset to its base, its entries and its hard
    /// state, synced.
    pub fn rewrite(&mut self, log: &Replayed) -> Result<(), StorageError> {
        self.reset(log.base_index, log.base_term);
        let (front, back) = log.entries.as_slices();
        self.append(front);
        self.append(back);
        self.set_hard_state(&log.hard_state);
        self.sync()
    }

    /// Writes what is buffered and waits until it is durable (fdatasync). Starts a new
    /// segment when this one has grown past [`SEGMENT_BYTES`].
    pub fn sync(&mut self) -> Result<(), StorageError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file
            .write_all_at(&self.buf, self.len)
            .map_err(|e| self.segment_error(e))?;
        self.len += self.buf.len() as u64;
        self.zeroed = self.zeroed.max(self.len);
        self.buf.clear();
        self.zero_ahead();
        self.file.sync_data().map_err(|e| self.segment_error(e))?;
        self.synced = self.len;
        if self.len >= SEGMENT_BYTES {
            self.rotate()?;
        }
        Ok(())
    }

    /// An I/O error on the open segment, naming its file (the path is built only
    /// here, not on every sync).
    fn segment_error(&self, source: std::io::Error) -> StorageError {
        StorageError::Io {
            path: self.dir.join(segment_name(self.seq)),
            source,
        }
    }

    /// Keeps at least half a [`ZERO_CHUNK`] of zeros after the records, topping up a
    /// whole chunk at a time (made durable by the `fdatasync` that follows). Best
    /// effort: on a full disk the records that fit are written all the same.
    fn zero_ahead(&mut self) {
        if self.zeroed - self.len >= ZERO_CHUNK / 2 {
            return;
        }
        match self.file.write_all_at(&ZEROS, self.zeroed) {
            Ok(()) => self.zeroed += ZERO_CHUNK,
            Err(e) => {
                // Part of the chunk may have been written: zeros either way.
                self.zeroed = self.file.size().unwrap_or(self.zeroed);
                debug!("raft log: no zeros ahead of the records: {e}");
            }
        }
    }

    fn rotate(&mut self) -> Result<(), StorageError> {
        // Only the last segment may end in zeros: cut this one back to its records.
        if self.zeroed > self.len {
            self.cut_open_segment(self.len)?;
        }
        let seq = self.seq + 1;
        let (path, head_len) =
            write_segment(&*self.vfs, &self.dir, seq, self.last, &self.hard_state)?;
        sync_dir(&*self.vfs, &self.dir)?;
        self.file = self
            .vfs
            .open_write(&path)
            .map_err(|source| StorageError::Io { path, source })?;
        self.seq = seq;
        self.len = head_len;
        self.synced = self.len;
        self.zeroed = self.len;
        self.segments.push_back(Segment {
            seq,
            base: self.last.0,
            min_entry: u64::MAX,
        });
        Ok(())
    }

    /// Deletes the segments that hold nothing after `compacted`: every segment whose
    /// successor starts at or below it, provided no later segment rewrites an entry at
    /// or below that start (a new leader's overwrite of a tail that spanned a segment
    /// boundary), so that replay can begin at the successor.
    pub fn release(&mut self, compacted: u64) -> Result<(), StorageError> {
        // Replay may start at segment `k` if compaction passed its base and nothing
        // from `k` on rewrites an entry at or below that base; keep from the last such.
        let mut cut = 0;
        for k in 1..self.segments.len() {
            let base = self.segments[k].base;
            if base > compacted {
                break;
            }
            let min_after = self.segments.iter().skip(k).map(|s| s.min_entry).min();
            if min_after.is_none_or(|m| m > base) {
                cut = k;
            }
        }
        let mut removed = false;
        for _ in 0..cut {
            let seq = self.segments.pop_front().expect("cut < len").seq;
            let path = self.dir.join(segment_name(seq));
            self.vfs
                .remove_file(&path)
                .map_err(|source| StorageError::Io { path, source })?;
            removed = true;
        }
        if removed {
            sync_dir(&*self.vfs, &self.dir)?;
        }
        Ok(())
    }

    /// Forgets what was written but not made durable (after a failed write): cuts the
    /// open segment back to its last durable length. Reopen with [`Wal::open`] after.
    pub fn discard_unsynced(&mut self) -> Result<(), StorageError> {
        self.buf.clear();
        self.cut_open_segment(self.synced)
    }

    /// Cuts the open segment to `len` bytes (records and zeros after them alike),
    /// durably.
    fn cut_open_segment(&mut self, len: u64) -> Result<(), StorageError> {
        self.file.set_len(len).map_err(|e| self.segment_error(e))?;
        self.file.sync_all().map_err(|e| self.segment_error(e))?;
        self.len = len;
        self.zeroed = len;
        Ok(())
    }

    /// Number of segment files and the bytes of log they hold (the open segment's
    /// zeros ahead of its records are not counted).
    pub fn disk_usage(&self) -> (usize, u64) {
        let bytes = self
            .segments
            .iter()
            .map(|s| {
                if s.seq == self.seq {
                    self.len
                } else {
                    self.vfs
                        .file_len(&self.dir.join(segment_name(s.seq)))
                        .unwrap_or(0)
                }
            })
            .sum();
        (self.segments.len(), bytes)
    }
}

fn corrupt(data_dir: &Path, detail: String) -> StorageError {
    StorageError::Corrupt {
        path: data_dir.to_path_buf(),
        detail: format!("raft log: {detail}"),
    }
}

/// Appends one record to `out`: the header, then the body `body` writes, then `kind`.
fn push_record(out: &mut Vec<u8>, kind: u8, body: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    body(out);
    out.push(kind);
    let len_bytes = ((out.len() - at - HEADER) as u32).to_le_bytes();
    let crc = crc32fast::hash(&out[at + HEADER..]);
    out[at..at + 4].copy_from_slice(&len_bytes);
    out[at + 4..at + 8].copy_from_slice(&crc32fast::hash(&len_bytes).to_le_bytes());
    out[at + 8..at + 12].copy_from_slice(&crc.to_le_bytes());
}

/// The body of a `BASE` or `RESET` record (read back by [`decode_point`]).
fn push_point(out: &mut Vec<u8>, (index, term): (u64, u64)) {
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&term.to_le_bytes());
}

fn segment_head(last: (u64, u64), hs: &HardState) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    push_record(&mut out, BASE, |b| push_point(b, last));
    push_record(&mut out, HARD_STATE, |b| {
        hs.encode(b).expect("vec has capacity")
    });
    out
}

/// Writes segment `seq` starting after `last` with hard state `hs`, durable, under a
/// temporary name renamed into place. Returns its path and length.
fn write_segment(
    vfs: &dyn Vfs,
    dir: &Path,
    seq: u64,
    last: (u64, u64),
    hs: &HardState,
) -> Result<(PathBuf, u64), StorageError> {
    let path = dir.join(segment_name(seq));
    let tmp = dir.join(format!("{}.tmp", segment_name(seq)));
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| StorageError::Io { path: p, source }
    };
    let head = segment_head(last, hs);
    let f = vfs.create(&tmp).map_err(io(&tmp))?;
    f.write_all_at(&head, 0).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    vfs.rename(&tmp, &path).map_err(io(&path))?;
    Ok((path, head.len() as u64))
}

fn sync_dir(vfs: &dyn Vfs, dir: &Path) -> Result<(), StorageError> {
    vfs.sync_dir(dir).map_err(|source| StorageError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Replays one segment into `state`. Returns the index its `BASE` names, the lowest
/// entry index in it, and how many of its bytes are good (less than all only for a
/// torn end of the last segment).
fn replay_segment(
    data_dir: &Path,
    seq: u64,
    bytes: &[u8],
    is_last: bool,
    state: &mut Option<Replayed>,
) -> Result<(u64, u64, usize), StorageError> {
    let name = segment_name(seq);
    let bad = |at: usize, what: &str| corrupt(data_dir, format!("{name}: {what} at byte {at}"));
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(corrupt(
            data_dir,
            format!("{name} is not a meshd log segment"),
        ));
    }
    // Where the zeros that run to the end of the file start: a record that fails its
    // checks and reaches into them was never completely written.
    let zeros_from = bytes.len() - bytes.iter().rev().take_while(|&&b| b == 0).count();
    let torn = |end: usize| is_last && zeros_from < end;
    let mut at = MAGIC.len();
    let mut base = None;
    let mut min_entry = u64::MAX;
    // Records read; the first two are the head (base and hard state).
    let mut records = 0;
    while at < bytes.len() {
        let rest = &bytes[at..];
        // The log ends here (a torn tail); the segment's head must be whole, since a
        // segment is renamed into place only once its head is durable.
        let good = match base {
            Some(b) if records >= 2 => Ok((b, min_entry, at)),
            _ => Err(bad(at, "the segment's head is incomplete")),
        };
        if rest.len() < HEADER {
            if is_last {
                return good;
            }
            return Err(bad(at, "incomplete record header"));
        }
        let len_bytes: [u8; 4] = rest[0..4].try_into().expect("4 bytes");
        let len_crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(len_bytes) as usize;
        if crc32fast::hash(&len_bytes) != len_crc || len == 0 || len > MAX_RECORD {
            if torn(at + HEADER) {
                return good;
            }
            return Err(bad(at, "record header checksum mismatch"));
        }
        if rest.len() < HEADER + len {
            if is_last {
                return good;
            }
            return Err(bad(at, "incomplete record"));
        }
        let payload = &rest[HEADER..HEADER + len];
        if crc32fast::hash(payload) != crc {
            if torn(at + HEADER + len) {
                return good;
            }
            return Err(bad(at, "record checksum mismatch"));
        }
        let (body, kind) = (&payload[..len - 1], payload[len - 1]);
        if records == 1 && kind != HARD_STATE {
            return Err(bad(at, "the segment's head has no hard state"));
        }
        records += 1;
        match kind {
            BASE | RESET => {
                let (index, term) = decode_point(body).ok_or_else(|| bad(at, "bad log point"))?;
                if base.is_none() {
                    if kind != BASE {
                        return Err(bad(at, "segment does not start with its base"));
                    }
                    base = Some(index);
                }
                match state {
                    // A reset empties the log; the first segment read starts it.
                    Some(s) if kind == RESET => {
                        s.base_index = index;
                        s.base_term = term;
                        s.entries.clear();
                    }
                    None => {
                        *state = Some(Replayed {
                            base_index: index,
                            base_term: term,
                            ..Default::default()
                        })
                    }
                    Some(s) => {
                        if s.last() != (index, term) {
                            return Err(bad(
                                at,
                                &format!(
                                    "segment starts after {index}/{term} but the log before it ends at {}/{}",
                                    s.last().0,
                                    s.last().1
                                ),
                            ));
                        }
                    }
                }
            }
            _ if base.is_none() => return Err(bad(at, "segment does not start with its base")),
            HARD_STATE => {
                let hs =
                    HardState::decode(body).map_err(|e| bad(at, &format!("hard state: {e}")))?;
                state.as_mut().expect("base seen").hard_state = hs;
            }
            ENTRY => {
                let e = Entry::decode(body).map_err(|e| bad(at, &format!("entry: {e}")))?;
                if EntryType::from_i32(e.entry_type).is_none() {
                    return Err(bad(
                        at,
                        &format!("entry {} has unknown type {}", e.index, e.entry_type),
                    ));
                }
                let s = state.as_mut().expect("base seen");
                if e.index <= s.base_index || e.index > s.last().0 + 1 {
                    return Err(bad(
                        at,
                        &format!(
                            "entry {} does not follow the log ({}..={})",
                            e.index,
                            s.base_index + 1,
                            s.last().0
                        ),
                    ));
                }
                min_entry = min_entry.min(e.index);
                let keep = (e.index - s.base_index - 1) as usize;
                s.entries.truncate(keep);
                s.entries.push_back(e);
            }
            other => return Err(bad(at, &format!("unknown record type {other}"))),
        }
        at += HEADER + len;
    }
    match base {
        Some(b) if records >= 2 => Ok((b, min_entry, at)),
        Some(_) => Err(bad(at, "the segment's head is incomplete")),
        None => Err(corrupt(data_dir, format!("{name} holds no base record"))),
    }
}

/// Replays `bytes` as the last segment of a log (untrusted input: fuzzing); returns
/// whether it was accepted.
pub fn replay_untrusted(bytes: &[u8]) -> bool {
    let mut state = None;
    replay_segment(Path::new("<input>"), 1, bytes, true, &mut state).is_ok()
}

fn decode_point(body: &[u8]) -> Option<(u64, u64)> {
    if body.len() != 16 {
        return None;
    }
    let index = u64::from_le_bytes(body[..8].try_into().ok()?);
    let term = u64::from_le_bytes(body[8..].try_into().ok()?);
    Some((index, term))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8; 40],
            ..Default::default()
        }
    }

    fn hs(term: u64, commit: u64) -> HardState {
        HardState {
            term,
            vote: 7,
            commit,
        }
    }

    fn indexes(r: &Replayed) -> Vec<(u64, u64)> {
        r.entries.iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn replays_appends_overwrites_and_resets() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, r, created) = Wal::open(&crate::storage::vfs::real(), dir.path()).unwrap();
        assert!(created);
        assert_eq!(r, Replayed::default());
        wal.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]);
        wal.set_hard_state(&hs(1, 2));
        wal.sync().unwrap();
        // A new leader replaces entry 3 onwards.
        wal.append(&[entry(3, 2), entry(4, 2)]);
        wal.set_hard_state(&hs(2, 3));
        wal.sync().unwrap();
        drop(wal);
        let (mut wal, r, created) = Wal::open(&crate::storage::vfs::real(), dir.path()).unwrap();
        assert!(!created);
        assert_eq!(indexes(&r), vec![(1, 1), (2, 1), (3, 2), (4, 2)]);
        assert_eq!(r.hard_state, hs(2, 3));
        wal.reset(10, 3);
        wal.append(&[entry(11, 3)]);
        wal.sync().unwrap();
        drop(wal);
        let (_, r, _) = Wal::open(&crate::storage::vfs::real(), dir.path()).unwrap();
        assert_eq!((r.base_index, r.base_term), (10, 3));
        assert_eq!(indexes(&r), vec![(11, 3)]);
    }

    #[test]
    fn segments_rotate_and_compaction_deletes_whole_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _, _) = Wal::open(&crate::storage::vfs::real(), dir.path()).unwrap();
        for i in 1..=5 {
            wal.append(&[entry(i, 1)]);
            wal.set_hard_state(&hs(1, i));
            wal.sync().unwrap();
            wal.rotate().unwrap();
        }
        assert_eq!(wal.segments.len(), 6);
        wal.release(3).unwrap();
        // Segments starting after 3, 4, 5 remain (the one after 3 holds entry 4).
        assert_eq!(
            wal.segments.iter().map(|s| s.base).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        wal.append(&[entry(6, 1)]);
        wal.sync().unwrap();
        drop(wal);
        let (_, r, _) = Wal::open(&crate::storage::vfs::real(), dir.path()).unwrap();
        assert_eq!((r.base_index, r.base_term), (3, 1));
        assert_eq!(indexes(&r), vec![(4, 1), (5, 1), (6, 1)]);
        assert_eq!(r.hard_state, hs(1, 5));
    }

    /// A new leader's overwrite that reaches back before a segment boundary keeps the
    /// segment before it until a later boundary: replay must not start after the
    /// entries the overwrite replaced.
    #[test]
    fn an_overwrite_across_a_boundary_keeps_the_segment_it_reaches_into() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _, _) = Wal::open(&crate::storage::vfs::real(), dir.path()).unwrap();
        wal.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]);
        wal.sync().unwrap();
        wal.rotate().unwrap(); // segment 2 starts after 3
        wal.append(&[entry(3, 2), entry(4, 2)]); // overwrites 3
        wal.sync().unwrap();
        wal.release(4).unwrap();
        assert_eq!(wal.segments.len(), 2, "segment 1 must stay");
        wal.rotate().unwrap(); // segment 3 starts after 4
        wal.append(&[entry(5, 2)]);
        wal.sync().unwrap();
        wal.release(4).unwrap();
        assert_eq!(
            wal.segments.iter().map(|s| s.seq).collect::<Vec<_>>(),
            vec![3]
        );
        drop(wal);
        let (_, r, _) = Wal::open(&crate::storage::vfs::real(), dir.path()).unwrap();
        assert_eq!((r.base_index, r.base_term), (4, 2));
        assert_eq!(indexes(&r), vec![(5, 2)]);
    }

    /// Cutting the last segment at every byte of its last record recovers the log up
    /// to the record before; zeros where the record should be do too.
    #[test]
    fn a_torn_last_record_is_dropped_at_every_offset() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _, _) = Wal::open(&crate::storage::vfs::real(), dir.path()).unwrap();
        wal.append(&[entry(1, 1), entry(2, 1)]);
        wal.set_hard_state(&hs(1, 2));
        wal.sync().unwrap();
        let before = wal.len as usize;
        wal.append(&[entry(3, 1)]);
        wal.sync().unwrap();
        let end = wal.len as usize;
        drop(wal);
        let seg = dir.path().join(WAL_DIR).join(segment_name(1));
        let on_disk = std::fs::read(&seg).unwrap();
        assert!(
            on_disk.len() >= end + ZERO_CHUNK as usize / 2
                && on_disk[end..].iter().all(|&b| b == 0),
            "zeros follow the records"
        );
        let whole = on_disk[..end].to_vec();
        for cut in before..whole.len() {
            for zeros in [false, true] {
                let mut bytes = whole[..cut].to_vec();
                if zeros {
                    bytes.resize(whole.len() + 100, 0);
                }
                std::fs::write(&seg, &bytes).unwrap();
                let (mut wal, r, _) = Wal::open(&crate::storage::vfs::real(), dir.path()).unwrap();
                assert_eq!(
                    indexes(&r),
                    vec![(1, 1), (2, 1)],
                    "cut at {cut} zeros {zeros}"
                );
                assert_eq!(r.hard_state, hs(1, 2));
                assert_eq!(wal.len as usize, before);
                // A cut record is removed from the file; zeros alone are kept.
                let len = std::fs::metadata(&seg).unwrap().len() as usize;
                if cut > before {
                    assert_eq!(len, before, "cut at {cut} zeros {zeros}");
                }
                // The log goes on after the last whole record.
                wal.append(&[entry(3, 2)]);
                wal.sync().unwrap();
                drop(wal);
                let (_, r, _) = Wal::open(&crate::storage::vfs::real(), dir.path()).unwrap();
                assert_eq!(indexes(&r), vec![(1, 1), (2, 1), (3, 2)]);
            }
        }
        std::fs::write(&seg, &whole).unwrap();
        let (_, r, _) = Wal::open(&crate::storage::vfs::real(), dir.path()).unwrap();
        assert_eq!(r.entries.len(), 3);
    }

    /// A segment cut inside its head (which is durable before the segment exists, so
    /// only damage does this) is refused, at every offset.
    #[test]
    fn a_segment_cut_inside_its_head_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        drop(Wal::open(&crate::storage::vfs::real(), dir.path()).unwrap());
        let seg = dir.path().join(WAL_DIR).join(segment_name(1));
        let whole = std::fs::read(&seg).unwrap();
        for cut in 0..whole.len() {
            std::fs::write(&seg, &whole[..cut]).unwrap();
            assert!(
                matches!(
                    Wal::open(&crate::storage::vfs::real(), dir.path()),
                    Err(StorageError::Corrupt { .. })
                ),
                "cut at {cut}"
            );
        }
    }

    /// A flipped byte anywhere in a segment is refused, never served or dropped.
    #[test]
    fn a_flipped_byte_anywhere_is_reported_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _, _) = Wal::open(&crate::storage::vfs::real(), dir.path()).unwrap();
        for i in 1..=3 {
            wal.append(&[entry(i, 1)]);
            wal.set_hard_state(&hs(1, i));
            wal.sync().unwrap();
        }
        let len = wal.len as usize;
        drop(wal);
        let seg = dir.path().join(WAL_DIR).join(segment_name(1));
        let whole = std::fs::read(&seg).unwrap();
        // The records, and the last of the zeros after them: garbage where only zeros
        // were written is damage too. (A byte just after the records reads as the
        // start of a record cut short, which `a_torn_last_record…` covers.)
        let zeros = whole.len() - 1;
        for at in (0..len).chain([zeros]) {
            let mut bytes = whole.clone();
            bytes[at] ^= 0x10;
            std::fs::write(&seg, &bytes).unwrap();
            match Wal::open(&crate::storage::vfs::real(), dir.path()) {
                Err(StorageError::Corrupt { detail, .. }) => {
                    assert!(detail.starts_with("raft log: "), "{detail}")
                }
                Err(e) => panic!("flip at {at}: {e}"),
                Ok(_) => panic!("flip at {at} was not detected"),
            }
        }
    }

    #[test]
    fn discarding_unsynced_bytes_restores_the_durable_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _, _) = Wal::open(&crate::storage::vfs::real(), dir.path()).unwrap();
        wal.append(&[entry(1, 1)]);
        wal.sync().unwrap();
        // A write that reached the file but whose fdatasync is not known to succeed.
        wal.append(&[entry(2, 1)]);
        let pending = std::mem::take(&mut wal.buf);
        wal.file.write_all_at(&pending, wal.len).unwrap();
        wal.discard_unsynced().unwrap();
        drop(wal);
        let (_, r, _) = Wal::open(&crate::storage::vfs::real(), dir.path()).unwrap();
        assert_eq!(indexes(&r), vec![(1, 1)]);
    }
}
