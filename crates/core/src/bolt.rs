//! The bbolt (BoltDB) file format: a streaming writer, a reader for untrusted files,
//! and the SHA-256 trailer of an etcd snapshot file.
//!
//! etcd's backend database is a bbolt file, and `etcdctl snapshot save` writes that
//! file followed by 32 bytes: the SHA-256 of everything before them. This module knows
//! the file format only; which buckets and records etcd keeps in it is described in
//! `docs/etcd-snapshot-format.md`.
//!
//! # Layout
//!
//! All integers are little-endian (bbolt writes native byte order; every platform etcd
//! ships for is little-endian). The file is an array of pages of one size (the meta's
//! page size; this writer uses 4096 by default). Page `n` starts at byte `n * page_size`.
//!
//! **Page header** (16 bytes, at the start of every page):
//! `id: u64` (the page's own number), `flags: u16` (`0x01` branch, `0x02` leaf,
//! `0x04` meta, `0x10` freelist), `count: u16` (number of elements), `overflow: u32`
//! (number of further pages the page spans: a page holding more than `page_size` bytes
//! occupies `overflow + 1` consecutive page numbers).
//!
//! **Meta** (pages 0 and 1; 64 bytes right after the header): `magic: u32`
//! (`0xED0CDAED`), `version: u32` (2), `page_size: u32`, `flags: u32` (0), the root
//! bucket header (`root: u64` page of the root bucket's tree, `sequence: u64`),
//! `freelist: u64` (page of the freelist, or `u64::MAX` when the freelist is not
//! stored), `pgid: u64` (the high-water mark: number of pages in use, the file holds at
//! least this many), `txid: u64`, `checksum: u64` (FNV-1a 64 of the 56 bytes before
//! it). Two copies exist so that a torn write of one leaves the other; the valid copy
//! with the higher txid is current.
//!
//! **Freelist page**: `count` page ids (`u64` each) after the header, sorted. When there
//! are 0xFFFF or more, `count` is 0xFFFF and the first `u64` holds the real count.
//!
//! **B+tree pages.** Each bucket is a B+tree. A leaf page holds `count` elements of 16
//! bytes: `flags: u32` (`0x01` when the value is a nested bucket), `pos: u32`,
//! `ksize: u32`, `vsize: u32`; the key starts `pos` bytes after the start of its own
//! element and the value follows the key. A branch page holds elements `pos: u32`,
//! `ksize: u32`, `pgid: u64`: the first key of the child page `pgid`, with `pos` again
//! relative to the element. Keys within a tree are unique and sorted bytewise. Elements
//! come first, then the key/value bytes in element order.
//!
//! **Buckets.** The meta's root bucket is a tree whose keys are the top-level bucket
//! names. A bucket is stored as a leaf element with flag `0x01` whose value is a 16-byte
//! bucket header (`root: u64`, `sequence: u64`). If `root` is 0 the bucket is *inline*:
//! a complete leaf page (header and elements, no padding, page id 0) follows the header
//! inside the value. bbolt stores a bucket inline when it holds no nested buckets and
//! that page would be at most a quarter of the page size.
//!
//! # What the writer produces
//!
//! Pages 0 and 1 are the metas (txid 2 on page 0, txid 1 on page 1, both pointing at the
//! same tree), page 2 is an empty freelist, then leaf and branch pages are written in
//! one pass as they fill, bottom-up: a bucket's leaves in key order, each branch page as
//! soon as it is full, the bucket's root page last. Every page number below the
//! high-water mark is reachable exactly once, so bbolt's consistency check passes.
//! Pages are filled to the page size (a single element larger than a page gets an
//! overflow page of its own); memory is one pending page per tree level per open bucket.
//!
//! # Reading untrusted files
//!
//! The reader bounds-checks every page id, element offset, count and length against the
//! file, caps tree depth ([`MAX_TREE_DEPTH`]) and bucket nesting ([`MAX_BUCKET_DEPTH`]),
//! stops a tree walk that loads more pages than the file has (cycles and shared
//! subtrees), checks that keys come out strictly increasing, and allocates at most one
//! page (with its overflow) at a time per tree level. Every problem is a [`BoltError`]
//! naming the page.

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom, Write};

use sha2::{Digest, Sha256};

/// Page size the writer uses unless told otherwise (etcd uses the OS page size: 4096 on
/// x86-64 Linux).
pub const DEFAULT_PAGE_SIZE: u32 = 4096;
/// The meta's magic number.
pub const MAGIC: u32 = 0xED0C_DAED;
/// The only file format version bbolt has.
pub const VERSION: u32 = 2;
/// bbolt's limit on key length (bucket names included).
pub const MAX_KEY_SIZE: usize = 32_768;
/// bbolt's limit on value length.
pub const MAX_VALUE_SIZE: usize = (1 << 31) - 2;
/// Deepest B+tree the reader walks (a real 4 KiB-page tree of any size stays under 10).
pub const MAX_TREE_DEPTH: usize = 64;
/// Deepest bucket nesting the reader and writer accept.
pub const MAX_BUCKET_DEPTH: usize = 64;
/// The meta's freelist field when the freelist is not stored in the file.
pub const NO_FREELIST: u64 = u64::MAX;
/// Length of the SHA-256 trailer of an etcd snapshot file.
pub const TRAILER_LEN: u64 = 32;

const PAGE_HEADER: usize = 16;
const ELEM: usize = 16;
const BUCKET_HEADER: usize = 16;
const META_LEN: usize = 64;
const META_SUMMED: usize = 56;
const FLAG_BRANCH: u16 = 0x01;
const FLAG_LEAF: u16 = 0x02;
const FLAG_META: u16 = 0x04;
const FLAG_FREELIST: u16 = 0x10;
const ELEM_BUCKET: u32 = 0x01;
const MIN_PAGE_SIZE: u32 = 512;
const MAX_PAGE_SIZE: u32 = 65_536;
/// The writer's transaction id on meta page 0 (page 1 gets one less, as bbolt's own
/// `Tx.WriteTo` does; each is on the page `txid % 2`).
const WRITER_TXID: u64 = 2;
/// First page number after the metas and the writer's freelist.
const WRITER_FIRST_DATA_PAGE: u64 = 3;
const FREELIST_PAGE: u64 = 2;

/// What went wrong reading or writing a bbolt file.
#[derive(Debug)]
pub enum BoltError {
    /// The underlying reader or writer failed.
    Io(io::Error),
    /// Neither meta page is usable; why each was refused.
    NoValidMeta { meta0: String, meta1: String },
    /// The file is malformed at `page` (for an inline bucket: the page holding it).
    Corrupt { page: u64, what: String },
    /// The writer was given something bbolt cannot store (keys out of order, too long,
    /// a value at the top level), or was used after an error.
    Invalid(String),
}

impl fmt::Display for BoltError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BoltError::Io(e) => write!(f, "bbolt file I/O: {e}"),
            BoltError::NoValidMeta { meta0, meta1 } => {
                write!(
                    f,
                    "not a usable bbolt file: meta page 0: {meta0}; meta page 1: {meta1}"
                )
            }
            BoltError::Corrupt { page, what } => {
                write!(f, "corrupt bbolt file at page {page}: {what}")
            }
            BoltError::Invalid(what) => write!(f, "bbolt writer: {what}"),
        }
    }
}

impl std::error::Error for BoltError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BoltError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for BoltError {
    fn from(e: io::Error) -> Self {
        BoltError::Io(e)
    }
}

fn corrupt(page: u64, what: impl Into<String>) -> BoltError {
    BoltError::Corrupt {
        page,
        what: what.into(),
    }
}

fn invalid(what: impl Into<String>) -> BoltError {
    BoltError::Invalid(what.into())
}

/// FNV-1a, 64-bit: the meta checksum.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        a.copy_from_slice(s);
    }
    u16::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn valid_page_size(ps: u32) -> bool {
    ps.is_power_of_two() && (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&ps)
}

/// The contents of a meta page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    pub page_size: u32,
    pub flags: u32,
    /// Page of the root bucket's tree.
    pub root: u64,
    /// The root bucket's sequence counter.
    pub root_sequence: u64,
    /// Page of the freelist, or [`NO_FREELIST`].
    pub freelist: u64,
    /// High-water mark: pages `0..high_water` are in use.
    pub high_water: u64,
    pub txid: u64,
}

impl Meta {
    /// The 64 bytes of the meta, checksum included.
    fn encode(&self) -> [u8; META_LEN] {
        let mut b = [0u8; META_LEN];
        put_u32(&mut b, 0, MAGIC);
        put_u32(&mut b, 4, VERSION);
        put_u32(&mut b, 8, self.page_size);
        put_u32(&mut b, 12, self.flags);
        put_u64(&mut b, 16, self.root);
        put_u64(&mut b, 24, self.root_sequence);
        put_u64(&mut b, 32, self.freelist);
        put_u64(&mut b, 40, self.high_water);
        put_u64(&mut b, 48, self.txid);
        let sum = fnv1a64(&b[..META_SUMMED]);
        put_u64(&mut b, META_SUMMED, sum);
        b
    }

    /// Decodes a meta page (header included); says why it is not valid.
    fn decode_page(page: &[u8]) -> Result<Meta, String> {
        let Some(m) = page.get(PAGE_HEADER..PAGE_HEADER + META_LEN) else {
            return Err("file too short for a meta page".into());
        };
        let flags = le_u16(page, 8);
        if flags != FLAG_META {
            return Err(format!("page flags {flags:#x}, not a meta page"));
        }
        let magic = le_u32(m, 0);
        if magic != MAGIC {
            return Err(format!("bad magic {magic:#010x}"));
        }
        let version = le_u32(m, 4);
        if version != VERSION {
            return Err(format!("unsupported version {version}"));
        }
        let stored = le_u64(m, META_SUMMED);
        let computed = fnv1a64(&m[..META_SUMMED]);
        if stored != computed {
            return Err(format!(
                "checksum {stored:#018x} does not match {computed:#018x}"
            ));
        }
        let meta = Meta {
            page_size: le_u32(m, 8),
            flags: le_u32(m, 12),
            root: le_u64(m, 16),
            root_sequence: le_u64(m, 24),
            freelist: le_u64(m, 32),
            high_water: le_u64(m, 40),
            txid: le_u64(m, 48),
        };
        if !valid_page_size(meta.page_size) {
            return Err(format!("unsupported page size {}", meta.page_size));
        }
        Ok(meta)
    }

    /// Checks the meta's page references against a file of `len` bytes.
    fn check_against(&self, len: u64) -> Result<(), String> {
        let ps = u64::from(self.page_size);
        let hw = self.high_water;
        match hw.checked_mul(ps) {
            Some(end) if end <= len => {}
            _ => {
                return Err(format!(
                "high-water mark {hw} pages of {ps} bytes is past the end of the {len}-byte file"
            ))
            }
        }
        if self.root < 2 || self.root >= hw {
            return Err(format!("root bucket page {} outside 2..{hw}", self.root));
        }
        if self.freelist != NO_FREELIST && (self.freelist < 2 || self.freelist >= hw) {
            return Err(format!("freelist page {} outside 2..{hw}", self.freelist));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Writer

/// One pending (not yet written) page of a tree under construction: element
/// descriptors, and the key/value bytes laid out exactly as they will be on the page.
#[derive(Default)]
struct Node {
    elems: Vec<NodeElem>,
    data: Vec<u8>,
}

#[derive(Clone, Copy)]
struct NodeElem {
    flags: u32,
    ksize: u32,
    vsize: u32,
    pgid: u64,
}

impl Node {
    fn size(&self) -> usize {
        PAGE_HEADER + ELEM * self.elems.len() + self.data.len()
    }

    fn is_empty(&self) -> bool {
        self.elems.is_empty()
    }

    fn first_key(&self) -> &[u8] {
        match self.elems.first() {
            Some(e) => &self.data[..e.ksize as usize],
            None => &[],
        }
    }

    fn last_key(&self) -> Option<&[u8]> {
        let e = self.elems.last()?;
        let end = self.data.len() - e.vsize as usize;
        Some(&self.data[end - e.ksize as usize..end])
    }

    fn push(&mut self, flags: u32, key: &[u8], value: &[u8], pgid: u64) {
        self.elems.push(NodeElem {
            flags,
            ksize: key.len() as u32,
            vsize: value.len() as u32,
            pgid,
        });
        self.data.extend_from_slice(key);
        self.data.extend_from_slice(value);
    }

    fn clear(&mut self) {
        self.elems.clear();
        self.data.clear();
    }

    /// Lays the node out as a page at the start of `out` (which must hold `size()`).
    fn encode_into(&self, out: &mut [u8], pgid: u64, leaf: bool, overflow: u32) {
        put_u64(out, 0, pgid);
        put_u16(out, 8, if leaf { FLAG_LEAF } else { FLAG_BRANCH });
        put_u16(out, 10, self.elems.len() as u16);
        put_u32(out, 12, overflow);
        let data_start = PAGE_HEADER + ELEM * self.elems.len();
        let mut data_off = data_start;
        for (i, e) in self.elems.iter().enumerate() {
            let eoff = PAGE_HEADER + ELEM * i;
            let pos = (data_off - eoff) as u32;
            if leaf {
                put_u32(out, eoff, e.flags);
                put_u32(out, eoff + 4, pos);
                put_u32(out, eoff + 8, e.ksize);
                put_u32(out, eoff + 12, e.vsize);
            } else {
                put_u32(out, eoff, pos);
                put_u32(out, eoff + 4, e.ksize);
                put_u64(out, eoff + 8, e.pgid);
            }
            data_off += e.ksize as usize + e.vsize as usize;
        }
        out[data_start..data_start + self.data.len()].copy_from_slice(&self.data);
    }
}

/// One level of a tree under construction: its pending page, and whether a page of
/// this level has been written already (then the level above exists).
#[derive(Default)]
struct Level {
    node: Node,
    flushed: bool,
}

/// A bucket being written: its name in the parent, and its tree's pending pages,
/// `levels[0]` being the leaf level.
struct OpenBucket {
    name: Vec<u8>,
    levels: Vec<Level>,
    has_sub_buckets: bool,
    sequence: u64,
}

impl OpenBucket {
    fn new(name: Vec<u8>) -> Self {
        OpenBucket {
            name,
            levels: vec![Level::default()],
            has_sub_buckets: false,
            sequence: 0,
        }
    }
}

/// Where a finished tree ended up.
enum Placed {
    Page(u64),
    Inline(Vec<u8>),
}

enum Mode {
    /// Metas are written last, by seeking back to `base`.
    Seek { base: u64 },
    /// Counting pass of [`write_streaming`]: nothing is written.
    Dry,
    /// Writing pass of [`write_streaming`]: metas were written first from the plan.
    Planned { root: u64, high_water: u64 },
}

/// Totals of a written file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteSummary {
    /// Pages in the file (its length is `pages * page_size`).
    pub pages: u64,
    pub page_size: u32,
    /// Page of the root bucket's tree.
    pub root: u64,
    /// Buckets written, nested ones included.
    pub buckets: u64,
    /// Key/value pairs written (bucket entries not counted).
    pub keys: u64,
}

/// Writes a bbolt file in one pass.
///
/// Open a bucket with [`Writer::create_bucket`], [`Writer::put`] its keys in strictly
/// increasing bytewise order, close it with [`Writer::end_bucket`]; buckets nest. Bucket
/// names and keys share one order within their parent. The top level holds buckets only.
///
/// With a `Write + Seek` output use [`Writer::new`] and [`Writer::finish`]: the metas are
/// written last, at the start of the output. For an output that cannot seek, use
/// [`write_streaming`].
pub struct Writer<W> {
    out: Option<W>,
    mode: Mode,
    ps: usize,
    next_pgid: u64,
    stack: Vec<OpenBucket>,
    buf: Vec<u8>,
    buckets: u64,
    keys: u64,
    failed: bool,
}

impl<W: Write + Seek> Writer<W> {
    /// A writer with 4096-byte pages, starting at the output's current position.
    pub fn new(out: W) -> Result<Self, BoltError> {
        Self::with_page_size(out, DEFAULT_PAGE_SIZE)
    }

    /// A writer with the given page size (a power of two from 512 to 65536).
    pub fn with_page_size(mut out: W, page_size: u32) -> Result<Self, BoltError> {
        if !valid_page_size(page_size) {
            return Err(invalid(format!("unsupported page size {page_size}")));
        }
        let base = out.stream_position()?;
        let mut w = Writer::blank(Some(out), Mode::Seek { base }, page_size);
        // Room for the metas, filled in by `finish`.
        let zeros = vec![0u8; 2 * w.ps];
        w.write_raw(&zeros)?;
        w.write_freelist()?;
        Ok(w)
    }

    /// Closes every open bucket, writes the metas, and returns the output positioned at
    /// the end of the file.
    pub fn finish(mut self) -> Result<(W, WriteSummary), BoltError> {
        let summary = self.close_all()?;
        let Mode::Seek { base } = self.mode else {
            return Err(invalid("finish called on a streaming writer"));
        };
        let metas = meta_pages(self.ps, summary.root, summary.pages);
        let mut out = self
            .out
            .take()
            .ok_or_else(|| invalid("writer has no output"))?;
        let end = out.stream_position()?;
        out.seek(SeekFrom::Start(base))?;
        out.write_all(&metas)?;
        out.seek(SeekFrom::Start(end))?;
        out.flush()?;
        Ok((out, summary))
    }
}

impl<W: Write> Writer<W> {
    fn blank(out: Option<W>, mode: Mode, page_size: u32) -> Self {
        Writer {
            out,
            mode,
            ps: page_size as usize,
            next_pgid: 0,
            stack: vec![OpenBucket::new(Vec::new())],
            buf: Vec::new(),
            buckets: 0,
            keys: 0,
            failed: false,
        }
    }

    /// Opens a bucket named `name` inside the current one (at the top level when no
    /// bucket is open).
    pub fn create_bucket(&mut self, name: &[u8]) -> Result<(), BoltError> {
        self.guard(|w| {
            check_key(name)?;
            if w.stack.len() > MAX_BUCKET_DEPTH {
                return Err(invalid(format!(
                    "buckets nested deeper than {MAX_BUCKET_DEPTH}"
                )));
            }
            w.check_order(name)?;
            if let Some(parent) = w.stack.last_mut() {
                parent.has_sub_buckets = true;
            }
            w.stack.push(OpenBucket::new(name.to_vec()));
            Ok(())
        })
    }

    /// Closes the bucket opened last.
    pub fn end_bucket(&mut self) -> Result<(), BoltError> {
        self.guard(|w| {
            if w.stack.len() < 2 {
                return Err(invalid("end_bucket without an open bucket"));
            }
            w.close_top()
        })
    }

    /// Stores `key` = `value` in the current bucket.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), BoltError> {
        self.guard(|w| {
            check_key(key)?;
            if value.len() > MAX_VALUE_SIZE {
                return Err(invalid(format!(
                    "value of {} bytes exceeds {MAX_VALUE_SIZE}",
                    value.len()
                )));
            }
            if w.stack.len() < 2 {
                return Err(invalid(
                    "put outside a bucket: the top level holds buckets only",
                ));
            }
            w.check_order(key)?;
            w.add_leaf(0, key, value)?;
            w.keys += 1;
            Ok(())
        })
    }

    /// Sets the current bucket's sequence counter (bbolt's `NextSequence` state).
    pub fn set_sequence(&mut self, sequence: u64) -> Result<(), BoltError> {
        self.guard(|w| {
            if w.stack.len() < 2 {
                return Err(invalid("set_sequence without an open bucket"));
            }
            if let Some(b) = w.stack.last_mut() {
                b.sequence = sequence;
            }
            Ok(())
        })
    }

    /// Number of buckets currently open.
    pub fn open_buckets(&self) -> usize {
        self.stack.len().saturating_sub(1)
    }

    /// Runs `f`; any error leaves the writer unusable (the output is incomplete).
    fn guard(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<(), BoltError>,
    ) -> Result<(), BoltError> {
        if self.failed {
            return Err(invalid("writer used after an error"));
        }
        let r = f(self);
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn check_order(&self, key: &[u8]) -> Result<(), BoltError> {
        let Some(b) = self.stack.last() else {
            return Err(invalid("writer already finished"));
        };
        if let Some(last) = b.levels[0].node.last_key() {
            if key <= last {
                return Err(invalid(format!(
                    "key {} does not sort after the previous key {} in its bucket",
                    show_key(key),
                    show_key(last)
                )));
            }
        }
        Ok(())
    }

    /// Appends an element to the current bucket's leaf level, writing the pending leaf
    /// first if the element would not fit on it.
    fn add_leaf(&mut self, flags: u32, key: &[u8], value: &[u8]) -> Result<(), BoltError> {
        let add = ELEM + key.len() + value.len();
        let depth = self.stack.len() - 1;
        let must_flush = {
            let node = &self.stack[depth].levels[0].node;
            !node.is_empty() && node.size() + add > self.ps
        };
        if must_flush {
            self.flush_level(depth, 0)?;
        }
        self.stack[depth].levels[0].node.push(flags, key, value, 0);
        Ok(())
    }

    /// Writes the pending page of `level` of the bucket at `depth` and records it in the
    /// level above, writing that one first when it is full (recursion bounded by the
    /// tree height).
    fn flush_level(&mut self, depth: usize, level: usize) -> Result<(), BoltError> {
        let pgid = self.write_node(depth, level)?;
        let b = &mut self.stack[depth];
        let first = b.levels[level].node.first_key().to_vec();
        b.levels[level].node.clear();
        b.levels[level].flushed = true;
        if b.levels.len() == level + 1 {
            b.levels.push(Level::default());
        }
        let up = &b.levels[level + 1].node;
        // Branch pages keep at least two children before they are cut.
        if up.elems.len() >= 2 && up.size() + ELEM + first.len() > self.ps {
            self.flush_level(depth, level + 1)?;
        }
        self.stack[depth].levels[level + 1]
            .node
            .push(0, &first, &[], pgid);
        Ok(())
    }

    /// Writes the pending page of `level` of the bucket at `depth`; returns its page id.
    fn write_node(&mut self, depth: usize, level: usize) -> Result<u64, BoltError> {
        let ps = self.ps;
        let pgid = self.next_pgid;
        let node = &self.stack[depth].levels[level].node;
        let size = node.size();
        let pages = size.div_ceil(ps).max(1);
        let overflow = u32::try_from(pages - 1).map_err(|_| invalid("page too large"))?;
        if node.elems.len() >= usize::from(u16::MAX) {
            return Err(invalid("too many elements for one page"));
        }
        if self.out.is_some() {
            self.buf.clear();
            self.buf.resize(pages * ps, 0);
            node.encode_into(&mut self.buf, pgid, level == 0, overflow);
            let buf = std::mem::take(&mut self.buf);
            let r = self.write_raw(&buf);
            self.buf = buf;
            r?;
        } else {
            self.next_pgid += pages as u64;
        }
        Ok(pgid)
    }

    /// Writes whole pages at the end of the output and advances the page counter.
    fn write_raw(&mut self, bytes: &[u8]) -> Result<(), BoltError> {
        if let Some(out) = self.out.as_mut() {
            out.write_all(bytes)?;
        }
        self.next_pgid += (bytes.len() / self.ps) as u64;
        Ok(())
    }

    fn write_freelist(&mut self) -> Result<(), BoltError> {
        let mut page = vec![0u8; self.ps];
        put_u64(&mut page, 0, FREELIST_PAGE);
        put_u16(&mut page, 8, FLAG_FREELIST);
        debug_assert_eq!(self.next_pgid, FREELIST_PAGE);
        self.write_raw(&page)
    }

    /// Finishes the tree of the bucket on top of the stack and adds it to its parent.
    fn close_top(&mut self) -> Result<(), BoltError> {
        let depth = self.stack.len() - 1;
        let placed = self.close_tree(depth, true)?;
        let Some(b) = self.stack.pop() else {
            return Err(invalid("no open bucket"));
        };
        let mut value = Vec::with_capacity(BUCKET_HEADER);
        match placed {
            Placed::Page(pgid) => {
                value.extend_from_slice(&pgid.to_le_bytes());
                value.extend_from_slice(&b.sequence.to_le_bytes());
            }
            Placed::Inline(page) => {
                value.extend_from_slice(&0u64.to_le_bytes());
                value.extend_from_slice(&b.sequence.to_le_bytes());
                value.extend_from_slice(&page);
            }
        }
        self.add_leaf(ELEM_BUCKET, &b.name, &value)?;
        self.buckets += 1;
        Ok(())
    }

    /// Writes the remaining pending pages of the bucket at `depth`, bottom-up, and says
    /// where its root ended up.
    fn close_tree(&mut self, depth: usize, allow_inline: bool) -> Result<Placed, BoltError> {
        {
            let b = &self.stack[depth];
            let leaf = &b.levels[0];
            if allow_inline
                && b.levels.len() == 1
                && !leaf.flushed
                && !b.has_sub_buckets
                && leaf.node.size() <= self.ps / 4
            {
                let mut page = vec![0u8; leaf.node.size()];
                leaf.node.encode_into(&mut page, 0, true, 0);
                return Ok(Placed::Inline(page));
            }
        }
        let mut level = 0;
        loop {
            let b = &self.stack[depth];
            let top = level + 1 == b.levels.len();
            if top && !b.levels[level].flushed {
                let pgid = self.write_node(depth, level)?;
                return Ok(Placed::Page(pgid));
            }
            if !b.levels[level].node.is_empty() {
                self.flush_level(depth, level)?;
            }
            level += 1;
        }
    }

    /// Closes all buckets and the root bucket; returns the totals.
    fn close_all(&mut self) -> Result<WriteSummary, BoltError> {
        if self.failed {
            return Err(invalid("writer used after an error"));
        }
        let r = (|| {
            while self.stack.len() > 1 {
                self.close_top()?;
            }
            let root = match self.close_tree(0, false)? {
                Placed::Page(p) => p,
                Placed::Inline(_) => return Err(invalid("root bucket placed inline")),
            };
            self.stack.clear();
            Ok(WriteSummary {
                pages: self.next_pgid,
                page_size: self.ps as u32,
                root,
                buckets: self.buckets,
                keys: self.keys,
            })
        })();
        if r.is_err() {
            self.failed = true;
        }
        r
    }
}

fn check_key(key: &[u8]) -> Result<(), BoltError> {
    if key.is_empty() {
        return Err(invalid("empty key or bucket name"));
    }
    if key.len() > MAX_KEY_SIZE {
        return Err(invalid(format!(
            "key of {} bytes exceeds {MAX_KEY_SIZE}",
            key.len()
        )));
    }
    Ok(())
}

/// A key for an error message: hex, cut after 64 bytes.
fn show_key(k: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::from("0x");
    for &b in k.iter().take(64) {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    if k.len() > 64 {
        s.push_str("...");
    }
    s
}

/// Both meta pages of a file whose tree is rooted at `root` and that has `pages` pages.
fn meta_pages(ps: usize, root: u64, pages: u64) -> Vec<u8> {
    let mut out = vec![0u8; 2 * ps];
    for (i, txid) in [(0usize, WRITER_TXID), (1, WRITER_TXID - 1)] {
        let meta = Meta {
            page_size: ps as u32,
            flags: 0,
            root,
            root_sequence: 0,
            freelist: FREELIST_PAGE,
            high_water: pages,
            txid,
        };
        let page = &mut out[i * ps..(i + 1) * ps];
        put_u64(page, 0, i as u64);
        put_u16(page, 8, FLAG_META);
        page[PAGE_HEADER..PAGE_HEADER + META_LEN].copy_from_slice(&meta.encode());
    }
    out
}

/// Writes a file of top-level buckets, each given as its name and its key/value pairs
/// in increasing key order (names in increasing order too), with 4096-byte pages.
pub fn write_buckets<W, B, N, KV, K, V>(out: W, buckets: B) -> Result<(W, WriteSummary), BoltError>
where
    W: Write + Seek,
    B: IntoIterator<Item = (N, KV)>,
    N: AsRef<[u8]>,
    KV: IntoIterator<Item = (K, V)>,
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    let mut w = Writer::new(out)?;
    for (name, kvs) in buckets {
        w.create_bucket(name.as_ref())?;
        for (k, v) in kvs {
            w.put(k.as_ref(), v.as_ref())?;
        }
        w.end_bucket()?;
    }
    w.finish()
}

/// Writes a bbolt file to an output that cannot seek, in two passes over the data.
///
/// `feed` is called twice with a [`Writer`] and must make the same calls both times:
/// the first pass only counts pages (nothing is written), so that the metas, which come
/// first in the file, are known; the second writes the file front to back. Fails if the
/// second pass laid out a different tree.
pub fn write_streaming<W, F>(
    out: W,
    page_size: u32,
    feed: F,
) -> Result<(W, WriteSummary), BoltError>
where
    W: Write,
    F: FnMut(&mut Writer<W>) -> Result<(), BoltError>,
{
    write_streaming_sized(out, page_size, |_, _| Ok(()), feed)
}

/// [`write_streaming`], telling `size` the file's length in bytes between the two
/// passes, before the first byte is written (a stream announces what remains).
pub fn write_streaming_sized<W, S, F>(
    mut out: W,
    page_size: u32,
    size: S,
    mut feed: F,
) -> Result<(W, WriteSummary), BoltError>
where
    W: Write,
    S: FnOnce(&mut W, u64) -> io::Result<()>,
    F: FnMut(&mut Writer<W>) -> Result<(), BoltError>,
{
    if !valid_page_size(page_size) {
        return Err(invalid(format!("unsupported page size {page_size}")));
    }
    let mut dry: Writer<W> = Writer::blank(None, Mode::Dry, page_size);
    dry.next_pgid = WRITER_FIRST_DATA_PAGE;
    feed(&mut dry)?;
    let plan = dry.close_all()?;
    size(&mut out, plan.pages * u64::from(page_size))?;

    let mut w = Writer::blank(
        Some(out),
        Mode::Planned {
            root: plan.root,
            high_water: plan.pages,
        },
        page_size,
    );
    let metas = meta_pages(w.ps, plan.root, plan.pages);
    w.write_raw(&metas)?;
    w.write_freelist()?;
    feed(&mut w)?;
    let got = w.close_all()?;
    if let Mode::Planned { root, high_water } = w.mode {
        if got.root != root || got.pages != high_water {
            return Err(invalid(format!(
                "second pass laid out a different tree (root {} of {} pages, planned {root} of {high_water})",
                got.root, got.pages
            )));
        }
    }
    let mut out = w
        .out
        .take()
        .ok_or_else(|| invalid("writer has no output"))?;
    out.flush()?;
    Ok((out, got))
}

// ---------------------------------------------------------------------------------------
// Reader

/// A bucket found in a file: where its tree is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketRef {
    /// Root page of the bucket's tree; 0 for an inline bucket.
    pub root: u64,
    pub sequence: u64,
    /// The inline bucket's leaf page.
    inline: Option<Vec<u8>>,
    /// For an inline bucket, the page holding it (for error messages).
    at_page: u64,
    /// Nesting depth: 0 for the root bucket.
    depth: usize,
}

impl BucketRef {
    /// Whether the bucket is stored inline in its parent.
    pub fn is_inline(&self) -> bool {
        self.inline.is_some()
    }
}

/// A value in a bucket: plain bytes, or a nested bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Data(Vec<u8>),
    Bucket(BucketRef),
}

/// One key/value of a bucket, as [`Entries`] yields them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: Vec<u8>,
    pub value: Value,
}

/// Totals of [`Reader::check`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Buckets, nested ones included (the root bucket not counted).
    pub buckets: u64,
    /// Key/value pairs that are not buckets.
    pub keys: u64,
    /// Pages reachable from the root bucket (overflow pages included).
    pub tree_pages: u64,
    /// Pages in the freelist.
    pub free_pages: u64,
    /// The high-water mark.
    pub pages: u64,
}

/// A set of page ids below the high-water mark, one bit each.
struct PageSet {
    bits: Vec<u64>,
}

impl PageSet {
    fn new(pages: u64) -> Self {
        PageSet {
            bits: vec![0; pages.div_ceil(64) as usize],
        }
    }

    /// Marks `id`; false if it was marked already.
    fn insert(&mut self, id: u64) -> bool {
        let (w, b) = ((id / 64) as usize, id % 64);
        match self.bits.get_mut(w) {
            Some(word) => {
                let had = *word & (1 << b) != 0;
                *word |= 1 << b;
                !had
            }
            None => false,
        }
    }

    fn contains(&self, id: u64) -> bool {
        let (w, b) = ((id / 64) as usize, id % 64);
        self.bits.get(w).is_some_and(|word| word & (1 << b) != 0)
    }
}

/// Reads a bbolt file, treating every byte as untrusted.
pub struct Reader<R> {
    src: R,
    len: u64,
    meta: Meta,
    /// When set (during [`Reader::check`]), every loaded page is recorded here and a
    /// page loaded twice is an error.
    track: Option<PageSet>,
}

/// A loaded tree page: its bytes, type and element count (validated to fit).
struct Page {
    id: u64,
    bytes: Vec<u8>,
    leaf: bool,
    count: usize,
}

impl<R: Read + Seek> Reader<R> {
    /// Opens a bbolt file spanning the whole of `src`.
    pub fn open(mut src: R) -> Result<Self, BoltError> {
        let len = src.seek(SeekFrom::End(0))?;
        Self::open_with_len(src, len)
    }

    /// Opens a bbolt file made of the first `len` bytes of `src` (for an etcd snapshot
    /// with a trailer, the length without the trailer). `len` is capped at the length of
    /// `src`.
    pub fn open_with_len(mut src: R, len: u64) -> Result<Self, BoltError> {
        let len = len.min(src.seek(SeekFrom::End(0))?);
        let mut r = Reader {
            src,
            len,
            meta: Meta {
                page_size: 0,
                flags: 0,
                root: 0,
                root_sequence: 0,
                freelist: 0,
                high_water: 0,
                txid: 0,
            },
            track: None,
        };
        let m0 = r.read_meta_at(0);
        let m1 = match &m0 {
            Ok(m) => r.read_meta_at(u64::from(m.page_size)),
            Err(_) => {
                // Page 0 is unusable: look for page 1 at each page size bbolt could use.
                let mut found = Err("not found at any page size".to_string());
                let mut ps = MIN_PAGE_SIZE;
                while ps <= MAX_PAGE_SIZE {
                    if let Ok(m) = r.read_meta_at(u64::from(ps)) {
                        if m.page_size == ps {
                            found = Ok(m);
                            break;
                        }
                    }
                    ps *= 2;
                }
                found
            }
        };
        let m0 = m0.and_then(|m| m.check_against(len).map(|()| m));
        let m1 = m1.and_then(|m| m.check_against(len).map(|()| m));
        r.meta = match (m0, m1) {
            (Ok(a), Ok(b)) => {
                if b.txid > a.txid {
                    b
                } else {
                    a
                }
            }
            (Ok(a), Err(_)) => a,
            (Err(_), Ok(b)) => b,
            (Err(meta0), Err(meta1)) => return Err(BoltError::NoValidMeta { meta0, meta1 }),
        };
        Ok(r)
    }

    /// The meta in use (the valid one with the higher txid).
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Gives the source back.
    pub fn into_inner(self) -> R {
        self.src
    }

    /// The root bucket, whose entries are the top-level buckets.
    pub fn root(&self) -> BucketRef {
        BucketRef {
            root: self.meta.root,
            sequence: self.meta.root_sequence,
            inline: None,
            at_page: self.meta.root,
            depth: 0,
        }
    }

    /// Iterates the entries of `bucket` in key order.
    pub fn entries(&mut self, bucket: &BucketRef) -> Entries<'_, R> {
        Entries {
            rd: self,
            bucket: bucket.clone(),
            stack: Vec::new(),
            started: false,
            done: false,
            last_key: None,
            pages_loaded: 0,
        }
    }

    /// The top-level bucket names, in order.
    pub fn bucket_names(&mut self) -> Result<Vec<Vec<u8>>, BoltError> {
        let root = self.root();
        let mut names = Vec::new();
        for e in self.entries(&root) {
            let e = e?;
            if matches!(e.value, Value::Bucket(_)) {
                names.push(e.key);
            }
        }
        Ok(names)
    }

    /// The bucket reached from the root by the names in `path`, if it exists.
    pub fn bucket(&mut self, path: &[&[u8]]) -> Result<Option<BucketRef>, BoltError> {
        let mut b = self.root();
        for name in path {
            match self.get(&b, name)? {
                Some(Value::Bucket(child)) => b = child,
                _ => return Ok(None),
            }
        }
        Ok(Some(b))
    }

    /// Looks `key` up in `bucket` by descending its tree.
    pub fn get(&mut self, bucket: &BucketRef, key: &[u8]) -> Result<Option<Value>, BoltError> {
        let mut page = match &bucket.inline {
            Some(bytes) => inline_page(bytes, bucket.at_page)?,
            None => self.load_page(bucket.root, bucket.at_page)?,
        };
        let mut depth = 0;
        loop {
            if page.leaf {
                for i in 0..page.count {
                    let (flags, k, v) = leaf_elem(&page, i)?;
                    if &page.bytes[k.clone()] == key {
                        return value_of(
                            &page,
                            bucket,
                            flags,
                            &page.bytes[v],
                            self.meta.page_size as usize,
                        )
                        .map(Some);
                    }
                }
                return Ok(None);
            }
            // The last child whose first key is <= key (the first child otherwise).
            let mut child = None;
            for i in 0..page.count {
                let (k, pgid) = branch_elem(&page, i)?;
                if i == 0 || &page.bytes[k] <= key {
                    child = Some(pgid);
                } else {
                    break;
                }
            }
            let Some(child) = child else {
                return Err(corrupt(page.id, "branch page without elements"));
            };
            depth += 1;
            if depth >= MAX_TREE_DEPTH {
                return Err(corrupt(
                    page.id,
                    format!("tree deeper than {MAX_TREE_DEPTH} levels"),
                ));
            }
            page = self.load_page(child, page.id)?;
        }
    }

    /// The page ids in the freelist; `None` when the file does not store one.
    pub fn free_pages(&mut self) -> Result<Option<Vec<u64>>, BoltError> {
        if self.meta.freelist == NO_FREELIST {
            return Ok(None);
        }
        let id = self.meta.freelist;
        let (bytes, _) = self.read_page(id, 0, true)?;
        let mut count = u64::from(le_u16(&bytes, 10));
        let mut start = PAGE_HEADER;
        if count == 0xFFFF {
            count = le_u64(&bytes, PAGE_HEADER);
            start += 8;
        }
        let room = ((bytes.len() - start) / 8) as u64;
        if count > room {
            return Err(corrupt(
                id,
                format!("freelist claims {count} ids, the page holds at most {room}"),
            ));
        }
        let mut ids = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let pgid = le_u64(&bytes, start + 8 * i);
            if pgid < 2 || pgid >= self.meta.high_water {
                return Err(corrupt(
                    id,
                    format!(
                        "freelist entry {i} is page {pgid}, outside 2..{}",
                        self.meta.high_water
                    ),
                ));
            }
            ids.push(pgid);
        }
        Ok(Some(ids))
    }

    /// Walks the whole file as bbolt's consistency check does: every page below the
    /// high-water mark must be a meta, the freelist, free, or reachable exactly once
    /// from the root bucket; every bucket must be readable with keys in order.
    pub fn check(&mut self) -> Result<CheckReport, BoltError> {
        let hw = self.meta.high_water;
        let mut report = CheckReport {
            pages: hw,
            ..CheckReport::default()
        };
        let mut set = PageSet::new(hw);
        set.insert(0);
        set.insert(1);
        let free = self.free_pages()?;
        if free.is_some() {
            let id = self.meta.freelist;
            let (_, overflow) = self.read_page(id, 0, true)?;
            for p in id..=id + u64::from(overflow) {
                if !set.insert(p) {
                    return Err(corrupt(p, "freelist page overlaps a meta page"));
                }
            }
        }
        for &p in free.iter().flatten() {
            if !set.insert(p) {
                return Err(corrupt(
                    p,
                    "page is in the freelist twice, or is the freelist or a meta",
                ));
            }
            report.free_pages += 1;
        }
        let before: u64 = set.bits.iter().map(|w| u64::from(w.count_ones())).sum();
        self.track = Some(set);
        let walked = self.walk_all(&mut report);
        let set = self.track.take();
        walked?;
        let Some(set) = set else {
            return Err(invalid("page tracking lost"));
        };
        let after: u64 = set.bits.iter().map(|w| u64::from(w.count_ones())).sum();
        report.tree_pages = after - before;
        if free.is_some() {
            for p in 0..hw {
                if !set.contains(p) {
                    return Err(corrupt(p, "page is neither reachable nor free"));
                }
            }
        }
        Ok(report)
    }

    fn walk_all(&mut self, report: &mut CheckReport) -> Result<(), BoltError> {
        let mut pending = vec![self.root()];
        while let Some(b) = pending.pop() {
            for e in self.entries(&b) {
                match e?.value {
                    Value::Bucket(child) => {
                        report.buckets += 1;
                        pending.push(child);
                    }
                    Value::Data(_) => report.keys += 1,
                }
            }
        }
        Ok(())
    }

    /// Reads the meta page at byte `off`.
    fn read_meta_at(&mut self, off: u64) -> Result<Meta, String> {
        let need = (PAGE_HEADER + META_LEN) as u64;
        if off.checked_add(need).is_none_or(|end| end > self.len) {
            return Err(format!(
                "file of {} bytes too short for a meta page at offset {off}",
                self.len
            ));
        }
        let mut b = [0u8; PAGE_HEADER + META_LEN];
        self.read_exact_at(off, &mut b).map_err(|e| e.to_string())?;
        Meta::decode_page(&b)
    }

    fn read_exact_at(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.src.seek(SeekFrom::Start(off))?;
        self.src.read_exact(buf)
    }

    /// Reads page `id` with its overflow pages, checking bounds, the header's page id,
    /// and its type (the freelist, or a branch or leaf page). Returns the bytes and the
    /// overflow count.
    fn read_page(
        &mut self,
        id: u64,
        from: u64,
        freelist: bool,
    ) -> Result<(Vec<u8>, u32), BoltError> {
        let hw = self.meta.high_water;
        if id < 2 || id >= hw {
            return Err(corrupt(
                from,
                format!("refers to page {id}, outside the data pages 2..{hw}"),
            ));
        }
        let ps = u64::from(self.meta.page_size);
        let off = id * ps; // id < hw and hw * ps <= len: no overflow
        let mut bytes = vec![0u8; ps as usize];
        self.read_exact_at(off, &mut bytes)
            .map_err(|e| io_at(id, e))?;
        let self_id = le_u64(&bytes, 0);
        if self_id != id {
            return Err(corrupt(
                id,
                format!("page header says it is page {self_id}"),
            ));
        }
        let flags = le_u16(&bytes, 8);
        let type_ok = if freelist {
            flags == FLAG_FREELIST
        } else {
            flags == FLAG_BRANCH || flags == FLAG_LEAF
        };
        if !type_ok {
            return Err(corrupt(
                id,
                format!("unexpected page flags {flags:#x} (referenced from page {from})"),
            ));
        }
        let overflow = le_u32(&bytes, 12);
        let end = id + 1 + u64::from(overflow);
        if end > hw {
            return Err(corrupt(
                id,
                format!("{overflow} overflow pages run past the high-water mark {hw}"),
            ));
        }
        if overflow > 0 {
            let total = (end - id) * ps;
            let Ok(total) = usize::try_from(total) else {
                return Err(corrupt(id, "page too large for this platform"));
            };
            bytes.resize(total, 0);
            let rest = &mut bytes[ps as usize..];
            self.src.seek(SeekFrom::Start(off + ps))?;
            self.src.read_exact(rest).map_err(|e| io_at(id, e))?;
        }
        if let Some(set) = self.track.as_mut() {
            for p in id..end {
                if !set.insert(p) {
                    return Err(corrupt(
                        p,
                        format!("page referenced more than once, or also free (reached from page {from})"),
                    ));
                }
            }
        }
        Ok((bytes, overflow))
    }

    /// Reads a branch or leaf page and checks that its elements fit in it.
    fn load_page(&mut self, id: u64, from: u64) -> Result<Page, BoltError> {
        let (bytes, _) = self.read_page(id, from, false)?;
        tree_page(id, bytes)
    }
}

fn io_at(page: u64, e: io::Error) -> BoltError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        corrupt(page, "file ends inside the page")
    } else {
        BoltError::Io(e)
    }
}

/// Checks a tree page's type and that its element array fits.
fn tree_page(id: u64, bytes: Vec<u8>) -> Result<Page, BoltError> {
    let flags = le_u16(&bytes, 8);
    let leaf = match flags {
        FLAG_LEAF => true,
        FLAG_BRANCH => false,
        f => {
            return Err(corrupt(
                id,
                format!("not a branch or leaf page (flags {f:#x})"),
            ))
        }
    };
    let count = usize::from(le_u16(&bytes, 10));
    if PAGE_HEADER + count * ELEM > bytes.len() {
        return Err(corrupt(
            id,
            format!("{count} elements do not fit in {} bytes", bytes.len()),
        ));
    }
    if !leaf && count == 0 {
        return Err(corrupt(id, "branch page without elements"));
    }
    Ok(Page {
        id,
        bytes,
        leaf,
        count,
    })
}

/// The leaf page stored inline in a bucket value (after the bucket header).
fn inline_page(bytes: &[u8], at_page: u64) -> Result<Page, BoltError> {
    if bytes.len() < PAGE_HEADER {
        return Err(corrupt(
            at_page,
            "inline bucket too short for a page header",
        ));
    }
    let page = tree_page(at_page, bytes.to_vec())?;
    if !page.leaf {
        return Err(corrupt(at_page, "inline bucket holds a branch page"));
    }
    Ok(page)
}

/// Element `i` of a leaf page: flags, key range, value range (all within the page).
fn leaf_elem(
    page: &Page,
    i: usize,
) -> Result<(u32, std::ops::Range<usize>, std::ops::Range<usize>), BoltError> {
    let eoff = PAGE_HEADER + ELEM * i;
    let b = &page.bytes;
    let flags = le_u32(b, eoff);
    let pos = u64::from(le_u32(b, eoff + 4));
    let ksize = u64::from(le_u32(b, eoff + 8));
    let vsize = u64::from(le_u32(b, eoff + 12));
    let kstart = eoff as u64 + pos;
    let kend = kstart + ksize;
    let vend = kend + vsize;
    if vend > b.len() as u64
        || (kstart < (PAGE_HEADER + ELEM * page.count) as u64 && ksize + vsize > 0)
    {
        return Err(corrupt(
            page.id,
            format!(
                "leaf element {i}: key/value at {kstart}..{vend} outside the data area of the {}-byte page",
                b.len()
            ),
        ));
    }
    if flags & !ELEM_BUCKET != 0 {
        return Err(corrupt(
            page.id,
            format!("leaf element {i}: unknown flags {flags:#x}"),
        ));
    }
    Ok((
        flags,
        kstart as usize..kend as usize,
        kend as usize..vend as usize,
    ))
}

/// Element `i` of a branch page: key range and child page.
fn branch_elem(page: &Page, i: usize) -> Result<(std::ops::Range<usize>, u64), BoltError> {
    let eoff = PAGE_HEADER + ELEM * i;
    let b = &page.bytes;
    let pos = u64::from(le_u32(b, eoff));
    let ksize = u64::from(le_u32(b, eoff + 4));
    let pgid = le_u64(b, eoff + 8);
    let kstart = eoff as u64 + pos;
    let kend = kstart + ksize;
    if kend > b.len() as u64 || (kstart < (PAGE_HEADER + ELEM * page.count) as u64 && ksize > 0) {
        return Err(corrupt(
            page.id,
            format!(
                "branch element {i}: key at {kstart}..{kend} outside the data area of the {}-byte page",
                b.len()
            ),
        ));
    }
    Ok((kstart as usize..kend as usize, pgid))
}

/// Turns a leaf element's value into a [`Value`].
fn value_of(
    page: &Page,
    parent: &BucketRef,
    flags: u32,
    v: &[u8],
    page_size: usize,
) -> Result<Value, BoltError> {
    if flags & ELEM_BUCKET == 0 {
        return Ok(Value::Data(v.to_vec()));
    }
    if v.len() < BUCKET_HEADER {
        return Err(corrupt(
            page.id,
            format!(
                "bucket value of {} bytes, shorter than a bucket header",
                v.len()
            ),
        ));
    }
    let depth = parent.depth + 1;
    if depth > MAX_BUCKET_DEPTH {
        return Err(corrupt(
            page.id,
            format!("buckets nested deeper than {MAX_BUCKET_DEPTH}"),
        ));
    }
    let root = le_u64(v, 0);
    let sequence = le_u64(v, 8);
    let inline = if root == 0 {
        let p = &v[BUCKET_HEADER..];
        // bbolt inlines a bucket only when its page is at most a quarter page, so an
        // inline page larger than a whole page is not from bbolt (and refusing it
        // bounds what nested inline buckets can make the reader copy).
        if p.len() > page_size {
            return Err(corrupt(
                page.id,
                format!("inline bucket of {} bytes, larger than a page", p.len()),
            ));
        }
        // Validated now, so that a bad inline bucket is reported where it is stored.
        inline_page(p, page.id)?;
        Some(p.to_vec())
    } else {
        None
    };
    Ok(Value::Bucket(BucketRef {
        root,
        sequence,
        inline,
        at_page: page.id,
        depth,
    }))
}

/// A page on the iteration path, with the key range its parent branch page gives it:
/// every key below it must be `>= lower` and `< upper` (bbolt checks the same).
struct Frame {
    page: Page,
    next: usize,
    lower: Option<Vec<u8>>,
    upper: Option<Vec<u8>>,
}

impl Frame {
    fn root(page: Page) -> Self {
        Frame {
            page,
            next: 0,
            lower: None,
            upper: None,
        }
    }

    /// Whether `key` (element `i` of this page) lies in the page's range.
    fn check_range(&self, i: usize, key: &[u8]) -> Result<(), BoltError> {
        let below = self.lower.as_deref().is_some_and(|l| key < l);
        let above = self.upper.as_deref().is_some_and(|u| key >= u);
        if below || above {
            return Err(corrupt(
                self.page.id,
                format!(
                    "element {i}: key {} outside the range its parent branch page gives",
                    show_key(key)
                ),
            ));
        }
        Ok(())
    }
}

/// Iterator over one bucket's entries, in key order; see [`Reader::entries`]. Stops
/// after the first error.
pub struct Entries<'a, R> {
    rd: &'a mut Reader<R>,
    bucket: BucketRef,
    stack: Vec<Frame>,
    started: bool,
    done: bool,
    last_key: Option<Vec<u8>>,
    pages_loaded: u64,
}

impl<R: Read + Seek> Entries<'_, R> {
    fn load(&mut self, id: u64, from: u64) -> Result<Page, BoltError> {
        let page = self.rd.load_page(id, from)?;
        let ps = u64::from(self.rd.meta.page_size);
        self.pages_loaded += (page.bytes.len() as u64).div_ceil(ps);
        if self.pages_loaded > self.rd.meta.high_water {
            return Err(corrupt(
                id,
                "the bucket's tree reaches more pages than the file has (a cycle or shared pages)",
            ));
        }
        Ok(page)
    }

    fn step(&mut self) -> Result<Option<Entry>, BoltError> {
        if !self.started {
            self.started = true;
            let page = match &self.bucket.inline {
                Some(bytes) => inline_page(bytes, self.bucket.at_page)?,
                None => self.load(self.bucket.root, self.bucket.at_page)?,
            };
            self.stack.push(Frame::root(page));
        }
        loop {
            let Some(top) = self.stack.last_mut() else {
                return Ok(None);
            };
            if top.next >= top.page.count {
                self.stack.pop();
                continue;
            }
            let i = top.next;
            top.next += 1;
            if top.page.leaf {
                let (flags, k, v) = leaf_elem(&top.page, i)?;
                let key = &top.page.bytes[k];
                top.check_range(i, key)?;
                if let Some(last) = &self.last_key {
                    if key <= last.as_slice() {
                        return Err(corrupt(
                            top.page.id,
                            format!(
                                "leaf element {i}: key {} does not sort after {}",
                                show_key(key),
                                show_key(last)
                            ),
                        ));
                    }
                }
                let value = value_of(
                    &top.page,
                    &self.bucket,
                    flags,
                    &top.page.bytes[v],
                    self.rd.meta.page_size as usize,
                )?;
                let key = key.to_vec();
                self.last_key = Some(key.clone());
                return Ok(Some(Entry { key, value }));
            }
            let (k, child) = branch_elem(&top.page, i)?;
            let lower = top.page.bytes[k].to_vec();
            top.check_range(i, &lower)?;
            let upper = if i + 1 < top.page.count {
                let (next, _) = branch_elem(&top.page, i + 1)?;
                let next = top.page.bytes[next].to_vec();
                if next <= lower {
                    return Err(corrupt(
                        top.page.id,
                        format!("branch element {}: keys out of order", i + 1),
                    ));
                }
                Some(next)
            } else {
                top.upper.clone()
            };
            let from = top.page.id;
            if self.stack.len() >= MAX_TREE_DEPTH {
                return Err(corrupt(
                    from,
                    format!("tree deeper than {MAX_TREE_DEPTH} levels"),
                ));
            }
            let page = self.load(child, from)?;
            self.stack.push(Frame {
                page,
                next: 0,
                lower: Some(lower),
                upper,
            });
        }
    }
}

impl<R: Read + Seek> Iterator for Entries<'_, R> {
    type Item = Result<Entry, BoltError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.step() {
            Ok(Some(e)) => Some(Ok(e)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// etcd snapshot trailer

/// Whether a file of `len` bytes carries a SHA-256 trailer, by etcd's rule: the database
/// is a whole number of 512-byte sectors, so a length 32 past such a multiple means a
/// trailer follows it.
pub fn has_trailer_len(len: u64) -> bool {
    len % 512 == TRAILER_LEN
}

/// The trailer of a snapshot file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trailer {
    /// Present and equal to the SHA-256 of the database bytes.
    Valid([u8; 32]),
    /// The length says there is none (a database copied from a data dir: etcd restores
    /// it only with `--skip-hash-check`).
    Absent,
    /// Present but wrong: damaged or truncated file.
    Mismatch {
        stored: [u8; 32],
        computed: [u8; 32],
    },
}

/// What [`check_trailer`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotCheck {
    /// Length of the database part (the whole file when there is no trailer).
    pub db_len: u64,
    pub trailer: Trailer,
}

/// Looks for the SHA-256 trailer at the end of `src` and verifies it (reads the whole
/// file once).
pub fn check_trailer<R: Read + Seek>(src: &mut R) -> Result<SnapshotCheck, BoltError> {
    let len = src.seek(SeekFrom::End(0))?;
    if !has_trailer_len(len) {
        return Ok(SnapshotCheck {
            db_len: len,
            trailer: Trailer::Absent,
        });
    }
    let db_len = len - TRAILER_LEN;
    src.seek(SeekFrom::Start(0))?;
    let mut hasher = Sha256::new();
    let copied = io::copy(&mut src.by_ref().take(db_len), &mut HashSink(&mut hasher))?;
    if copied != db_len {
        return Err(corrupt(0, "file shrank while its checksum was computed"));
    }
    let mut stored = [0u8; 32];
    src.read_exact(&mut stored)?;
    let computed: [u8; 32] = hasher.finalize().into();
    let trailer = if stored == computed {
        Trailer::Valid(stored)
    } else {
        Trailer::Mismatch { stored, computed }
    };
    Ok(SnapshotCheck { db_len, trailer })
}

/// Appends the SHA-256 of everything in `file` (from its start) to its end, making a
/// snapshot file of a database file. Returns the digest.
pub fn append_trailer<F: Read + Write + Seek>(file: &mut F) -> Result<[u8; 32], BoltError> {
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = Sha256::new();
    io::copy(file, &mut HashSink(&mut hasher))?;
    let digest: [u8; 32] = hasher.finalize().into();
    file.seek(SeekFrom::End(0))?;
    file.write_all(&digest)?;
    file.flush()?;
    Ok(digest)
}

struct HashSink<'a>(&'a mut Sha256);

impl Write for HashSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A `Write` that passes bytes through and hashes them, so that a database written
/// front to back (by [`write_streaming`]) can be followed by its trailer.
pub struct TrailerWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> TrailerWriter<W> {
    pub fn new(inner: W) -> Self {
        TrailerWriter {
            inner,
            hasher: Sha256::new(),
        }
    }

    /// The output, to write around the hash (what goes through it unhashed).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Writes the SHA-256 of everything written so far and returns the output.
    pub fn finish(mut self) -> io::Result<(W, [u8; 32])> {
        let digest: [u8; 32] = self.hasher.finalize().into();
        self.inner.write_all(&digest)?;
        self.inner.flush()?;
        Ok((self.inner, digest))
    }
}

impl<W: Write> Write for TrailerWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    type Buckets = Vec<(Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>)>;
    /// A named way of damaging a file.
    type Mutation = (&'static str, Box<dyn Fn(&mut Vec<u8>)>);

    #[test]
    fn write_buckets_from_iterators() {
        let data = sample();
        let (out, summary) = write_buckets(Cursor::new(Vec::new()), data.clone()).expect("write");
        assert_eq!(summary.buckets, 3);
        assert_eq!(summary.keys, 2001);
        assert_eq!(read(&out.into_inner()).expect("read"), data);
    }

    fn write(buckets: &Buckets, ps: u32) -> Vec<u8> {
        let mut w = Writer::with_page_size(Cursor::new(Vec::new()), ps).expect("writer");
        for (name, kvs) in buckets {
            w.create_bucket(name).expect("bucket");
            for (k, v) in kvs {
                w.put(k, v).expect("put");
            }
            w.end_bucket().expect("end");
        }
        let (out, summary) = w.finish().expect("finish");
        let bytes = out.into_inner();
        assert_eq!(bytes.len() as u64, summary.pages * u64::from(ps));
        bytes
    }

    fn read(bytes: &[u8]) -> Result<Buckets, BoltError> {
        let mut r = Reader::open(Cursor::new(bytes))?;
        let root = r.root();
        let tops: Vec<Entry> = r.entries(&root).collect::<Result<_, _>>()?;
        let mut out = Vec::new();
        for t in tops {
            let Value::Bucket(b) = t.value else {
                return Err(invalid("plain value at the top level"));
            };
            let mut kvs = Vec::new();
            for e in r.entries(&b) {
                let e = e?;
                if let Value::Data(v) = e.value {
                    kvs.push((e.key, v));
                }
            }
            out.push((t.key, kvs));
        }
        Ok(out)
    }

    /// Reads everything and runs the consistency check; the result only matters for
    /// the hostile-input tests, which must not panic.
    fn read_all(bytes: &[u8]) -> Result<CheckReport, BoltError> {
        read(bytes)?;
        Reader::open(Cursor::new(bytes))?.check()
    }

    fn rev_key(main: u64, sub: u64) -> Vec<u8> {
        let mut k = main.to_be_bytes().to_vec();
        k.push(b'_');
        k.extend_from_slice(&sub.to_be_bytes());
        k
    }

    fn sample() -> Buckets {
        vec![
            (b"alarm".to_vec(), vec![]),
            (
                b"key".to_vec(),
                (1..=2000u64)
                    .map(|i| (rev_key(i, 0), format!("value {i}").into_bytes()))
                    .collect(),
            ),
            (
                b"meta".to_vec(),
                vec![(b"consistent_index".to_vec(), 7u64.to_be_bytes().to_vec())],
            ),
        ]
    }

    #[test]
    fn roundtrip_with_check() {
        let data = sample();
        let bytes = write(&data, DEFAULT_PAGE_SIZE);
        assert_eq!(read(&bytes).expect("read"), data);
        let report = Reader::open(Cursor::new(&bytes))
            .expect("open")
            .check()
            .expect("check");
        assert_eq!(report.buckets, 3);
        assert_eq!(report.keys, 2001);
        assert_eq!(report.free_pages, 0);
        assert_eq!(report.tree_pages + 3, report.pages);

        let mut r = Reader::open(Cursor::new(&bytes)).expect("open");
        assert_eq!(r.meta().txid, WRITER_TXID);
        assert_eq!(
            r.bucket_names().expect("names"),
            vec![b"alarm".to_vec(), b"key".to_vec(), b"meta".to_vec()]
        );
        let key = r.bucket(&[b"key"]).expect("lookup").expect("key bucket");
        assert!(!key.is_inline());
        for i in [1u64, 2, 999, 1000, 2000] {
            let v = r.get(&key, &rev_key(i, 0)).expect("get");
            assert_eq!(v, Some(Value::Data(format!("value {i}").into_bytes())));
        }
        assert_eq!(r.get(&key, &rev_key(2001, 0)).expect("get"), None);
        assert_eq!(r.get(&key, b"").expect("get"), None);
        let meta = r.bucket(&[b"meta"]).expect("lookup").expect("meta bucket");
        assert!(meta.is_inline());
        assert_eq!(r.bucket(&[b"nope"]).expect("lookup"), None);
        assert_eq!(r.free_pages().expect("freelist"), Some(vec![]));
    }

    #[test]
    fn empty_file_and_empty_buckets() {
        let bytes = write(&vec![], DEFAULT_PAGE_SIZE);
        assert_eq!(bytes.len(), 4 * 4096);
        assert_eq!(read(&bytes).expect("read"), vec![]);
        Reader::open(Cursor::new(&bytes))
            .expect("open")
            .check()
            .expect("check");

        let data: Buckets = (0..50)
            .map(|i| (format!("b{i:03}").into_bytes(), vec![]))
            .collect();
        let bytes = write(&data, DEFAULT_PAGE_SIZE);
        assert_eq!(read(&bytes).expect("read"), data);
        Reader::open(Cursor::new(&bytes))
            .expect("open")
            .check()
            .expect("check");
    }

    #[test]
    fn nested_buckets_inline_and_paged() {
        let mut w = Writer::new(Cursor::new(Vec::new())).expect("writer");
        w.create_bucket(b"outer").expect("outer");
        w.put(b"a", b"1").expect("a");
        w.create_bucket(b"b-inline").expect("inner");
        w.put(b"x", b"y").expect("x");
        w.set_sequence(42).expect("seq");
        w.end_bucket().expect("end inner");
        w.create_bucket(b"c-paged").expect("paged");
        for i in 0..500u32 {
            w.put(&i.to_be_bytes(), &[7u8; 40]).expect("put");
        }
        w.create_bucket(b"zz-deeper").expect("deeper");
        w.put(b"k", b"v").expect("k");
        // Left open: finish closes it and its parents.
        assert_eq!(w.open_buckets(), 3);
        let (out, summary) = w.finish().expect("finish");
        assert_eq!(summary.buckets, 4);
        let bytes = out.into_inner();

        let mut r = Reader::open(Cursor::new(&bytes)).expect("open");
        let report = r.check().expect("check");
        assert_eq!(report.buckets, 4);
        let outer = r.bucket(&[b"outer"]).expect("outer").expect("exists");
        assert!(
            !outer.is_inline(),
            "a bucket with sub-buckets is never inline"
        );
        let inner = r
            .bucket(&[b"outer", b"b-inline"])
            .expect("inner")
            .expect("exists");
        assert!(inner.is_inline());
        assert_eq!(inner.sequence, 42);
        let paged = r
            .bucket(&[b"outer", b"c-paged"])
            .expect("paged")
            .expect("exists");
        assert!(!paged.is_inline());
        let entries: Vec<Entry> = r
            .entries(&paged)
            .collect::<Result<_, _>>()
            .expect("entries");
        assert_eq!(entries.len(), 501);
        assert!(matches!(entries[500].value, Value::Bucket(_)));
        let deeper = r
            .bucket(&[b"outer", b"c-paged", b"zz-deeper"])
            .expect("deeper")
            .expect("exists");
        assert_eq!(
            r.get(&deeper, b"k").expect("get"),
            Some(Value::Data(b"v".to_vec()))
        );
    }

    #[test]
    fn many_keys_span_branch_levels() {
        let n = 200_000u64;
        let mut w = Writer::new(Cursor::new(Vec::new())).expect("writer");
        w.create_bucket(b"key").expect("bucket");
        for i in 0..n {
            w.put(&rev_key(i + 1, i % 3), &i.to_le_bytes())
                .expect("put");
        }
        w.end_bucket().expect("end");
        let (out, summary) = w.finish().expect("finish");
        assert_eq!(summary.keys, n);
        let bytes = out.into_inner();

        let mut r = Reader::open(Cursor::new(&bytes)).expect("open");
        let key = r.bucket(&[b"key"]).expect("lookup").expect("exists");
        // Root branch -> branch -> leaf: at least three levels.
        let root = r.load_page(key.root, 0).expect("root page");
        assert!(!root.leaf);
        let (_, child) = branch_elem(&root, 0).expect("elem");
        assert!(!r.load_page(child, 0).expect("child").leaf);
        let mut count = 0u64;
        for (i, e) in r.entries(&key).enumerate() {
            let e = e.expect("entry");
            let i = i as u64;
            assert_eq!(e.key, rev_key(i + 1, i % 3));
            count += 1;
        }
        assert_eq!(count, n);
        assert_eq!(
            r.get(&key, &rev_key(123_457, 123_456 % 3)).expect("get"),
            Some(Value::Data(123_456u64.to_le_bytes().to_vec()))
        );
        let report = r.check().expect("check");
        assert_eq!(report.keys, n);
    }

    #[test]
    fn big_values_use_overflow_pages() {
        let big = |n: usize, b: u8| vec![b; n];
        let data: Buckets = vec![(
            b"blobs".to_vec(),
            vec![
                (b"a".to_vec(), big(10, 1)),
                (b"b".to_vec(), big(5 << 20, 2)),
                (b"c".to_vec(), big(3000, 3)),
                (b"d".to_vec(), big(4096, 4)),
                (b"e".to_vec(), big(100_000, 5)),
                (b"f".to_vec(), vec![]),
                (vec![b'k'; MAX_KEY_SIZE], big(1, 6)),
            ],
        )];
        let bytes = write(&data, DEFAULT_PAGE_SIZE);
        assert_eq!(read(&bytes).expect("read"), data);
        let report = Reader::open(Cursor::new(&bytes))
            .expect("open")
            .check()
            .expect("check");
        assert!(report.tree_pages > (5 << 20) / 4096);
        // Some page of the file spans several.
        let ps = 4096usize;
        let overflowed = (3..report.pages).any(|id| le_u32(&bytes, id as usize * ps + 12) > 0);
        assert!(overflowed);
    }

    #[test]
    fn streaming_writer_matches_seek_writer() {
        let data = sample();
        let seeked = write(&data, 1024);
        let feed = |w: &mut Writer<TrailerWriter<Vec<u8>>>| {
            for (name, kvs) in &data {
                w.create_bucket(name)?;
                for (k, v) in kvs {
                    w.put(k, v)?;
                }
                w.end_bucket()?;
            }
            Ok(())
        };
        let (out, summary) =
            write_streaming(TrailerWriter::new(Vec::new()), 1024, feed).expect("stream");
        let (streamed, digest) = out.finish().expect("trailer");
        assert_eq!(summary.pages * 1024, seeked.len() as u64);
        assert_eq!(&streamed[..seeked.len()], &seeked[..]);
        assert_eq!(&streamed[seeked.len()..], &digest[..]);

        // A feed that changes between the passes is refused.
        let mut calls = 0;
        let err = write_streaming(Vec::new(), 4096, |w: &mut Writer<Vec<u8>>| {
            calls += 1;
            w.create_bucket(b"b")?;
            for i in 0..(calls * 300u32) {
                w.put(&i.to_be_bytes(), b"value")?;
            }
            Ok(())
        })
        .expect_err("different passes");
        assert!(err.to_string().contains("second pass"), "{err}");
    }

    #[test]
    fn trailer_helpers() {
        let bytes = write(&sample(), DEFAULT_PAGE_SIZE);
        let mut f = Cursor::new(bytes.clone());
        assert_eq!(
            check_trailer(&mut f).expect("check"),
            SnapshotCheck {
                db_len: bytes.len() as u64,
                trailer: Trailer::Absent
            }
        );
        let digest = append_trailer(&mut f).expect("append");
        let mut with = f.into_inner();
        assert_eq!(with.len(), bytes.len() + 32);
        assert!(has_trailer_len(with.len() as u64));
        let mut c = Cursor::new(with.clone());
        let got = check_trailer(&mut c).expect("check");
        assert_eq!(
            got,
            SnapshotCheck {
                db_len: bytes.len() as u64,
                trailer: Trailer::Valid(digest)
            }
        );
        // The reader opens the database part.
        let mut r = Reader::open_with_len(c, got.db_len).expect("open");
        r.check().expect("consistent");

        with[100] ^= 1;
        let got = check_trailer(&mut Cursor::new(with)).expect("check");
        assert!(matches!(got.trailer, Trailer::Mismatch { stored, .. } if stored == digest));
    }

    #[test]
    fn writer_refuses_what_bbolt_cannot_store() {
        let new = || Writer::new(Cursor::new(Vec::new())).expect("writer");
        let mut w = new();
        assert!(w.put(b"k", b"v").is_err(), "values at the top level");
        let mut w = new();
        w.create_bucket(b"b").expect("bucket");
        w.put(b"k2", b"v").expect("put");
        assert!(w.put(b"k1", b"v").is_err(), "out of order");
        assert!(
            w.put(b"k3", b"v").is_err(),
            "writer is unusable after an error"
        );
        let mut w = new();
        w.create_bucket(b"b").expect("bucket");
        w.put(b"k", b"v").expect("put");
        assert!(w.put(b"k", b"v").is_err(), "duplicate");
        let mut w = new();
        w.create_bucket(b"b").expect("bucket");
        w.put(b"k", b"v").expect("put");
        assert!(w.create_bucket(b"k").is_err(), "bucket name equal to a key");
        let mut w = new();
        w.create_bucket(b"b").expect("bucket");
        assert!(w.put(b"", b"v").is_err(), "empty key");
        let mut w = new();
        assert!(
            w.create_bucket(&vec![1; MAX_KEY_SIZE + 1]).is_err(),
            "long name"
        );
        let mut w = new();
        assert!(w.end_bucket().is_err(), "nothing open");
        let mut w = new();
        for i in 0..=MAX_BUCKET_DEPTH {
            if w.create_bucket(&[i as u8 + 1]).is_err() {
                return;
            }
        }
        panic!("nesting is not capped");
    }

    // ---- hostile input ------------------------------------------------------------

    fn expect_corrupt(bytes: &[u8], what: &str) -> BoltError {
        match read_all(bytes) {
            Ok(r) => panic!("{what}: accepted ({r:?})"),
            Err(e) => {
                assert!(!e.to_string().is_empty());
                e
            }
        }
    }

    fn set_meta_field(bytes: &mut [u8], page: usize, ps: usize, at: usize, v: u64) {
        let m = page * ps + PAGE_HEADER;
        put_u64(bytes, m + at, v);
        let sum = fnv1a64(&bytes[m..m + META_SUMMED]);
        put_u64(bytes, m + META_SUMMED, sum);
    }

    /// A file whose "key" bucket has a branch root over leaf pages (512-byte pages),
    /// with the root's page id and the first leaf's.
    fn branched() -> (Vec<u8>, u64, u64) {
        let data: Buckets = vec![(
            b"key".to_vec(),
            (0..200u64)
                .map(|i| (rev_key(i, 0), vec![b'v'; 20]))
                .collect(),
        )];
        let bytes = write(&data, 512);
        let mut r = Reader::open(Cursor::new(&bytes)).expect("open");
        let key = r.bucket(&[b"key"]).expect("lookup").expect("exists");
        let mut page = r.load_page(key.root, 0).expect("root");
        assert!(!page.leaf);
        while !page.leaf {
            let (_, child) = branch_elem(&page, 0).expect("elem");
            page = r.load_page(child, page.id).expect("child");
        }
        (bytes, key.root, page.id)
    }

    #[test]
    fn truncated_files_are_errors() {
        let bytes = write(&sample(), DEFAULT_PAGE_SIZE);
        for len in [
            0,
            1,
            15,
            16,
            79,
            80,
            4095,
            4096,
            4096 + 80,
            8192,
            12288,
            bytes.len() - 4096,
            bytes.len() - 1,
        ] {
            let e = expect_corrupt(&bytes[..len], "truncated");
            let _ = e.to_string();
        }
    }

    #[test]
    fn meta_checksums_and_fallback() {
        let bytes = write(&sample(), DEFAULT_PAGE_SIZE);
        // Damage meta 0: meta 1 (same tree, lower txid) is used.
        let mut one_bad = bytes.clone();
        one_bad[PAGE_HEADER + 20] ^= 0xFF;
        let r = Reader::open(Cursor::new(&one_bad)).expect("falls back to meta 1");
        assert_eq!(r.meta().txid, WRITER_TXID - 1);
        read_all(&one_bad).expect("readable through meta 1");
        // Damage both.
        let mut both_bad = one_bad.clone();
        both_bad[4096 + PAGE_HEADER + 20] ^= 0xFF;
        match Reader::open(Cursor::new(&both_bad)) {
            Err(BoltError::NoValidMeta { meta0, meta1 }) => {
                assert!(meta0.contains("checksum"), "{meta0}");
                assert!(
                    meta1.contains("checksum") || meta1.contains("not found"),
                    "{meta1}"
                );
            }
            other => panic!("expected NoValidMeta, got {:?}", other.map(|r| *r.meta())),
        }
        // Wrong magic, wrong version (with valid checksums).
        for (at, v) in [(0usize, 0x1234_5678u64 | (2 << 32)), (4, u64::from(MAGIC))] {
            let mut b = bytes.clone();
            set_meta_field(&mut b, 0, 4096, at, v);
            set_meta_field(&mut b, 1, 4096, at, v);
            assert!(matches!(
                Reader::open(Cursor::new(&b)),
                Err(BoltError::NoValidMeta { .. })
            ));
        }
        // A valid checksum over absurd fields: page size, high-water mark, root.
        for (at, v) in [
            (8usize, 3u64 | (1 << 32)),
            (8, 1 << 30),
            (40, u64::MAX),
            (40, 1 << 40),
            (16, 0),
            (16, 1),
            (16, 10_000),
            (32, 5000),
        ] {
            let mut b = bytes.clone();
            set_meta_field(&mut b, 0, 4096, at, v);
            set_meta_field(&mut b, 1, 4096, at, v);
            expect_corrupt(&b, "absurd meta");
        }
    }

    #[test]
    fn page_references_out_of_range_and_cycles() {
        let (bytes, root, _) = branched();
        let ps = 512usize;
        let elem0 = root as usize * ps + PAGE_HEADER;
        for (target, what) in [
            (0u64, "meta page"),
            (1, "meta page"),
            (2, "freelist page"),
            (u64::MAX, "far out of range"),
            (1 << 40, "out of range"),
            (bytes.len() as u64 / 512, "just past the end"),
            (root, "cycle to itself"),
        ] {
            let mut b = bytes.clone();
            put_u64(&mut b, elem0 + 8, target);
            let e = expect_corrupt(&b, what);
            assert!(matches!(e, BoltError::Corrupt { .. }), "{what}: {e}");
        }
        // Every child of the root is the same leaf: shared pages.
        let mut b = bytes.clone();
        let count = usize::from(le_u16(&b, root as usize * ps + 10));
        let first = le_u64(&b, elem0 + 8);
        for i in 0..count {
            put_u64(&mut b, elem0 + ELEM * i + 8, first);
        }
        expect_corrupt(&b, "shared leaf");
        // A branch key above the first key of its child.
        let mut b = bytes.clone();
        let k1 = elem0 + ELEM + le_u32(&b, elem0 + ELEM) as usize;
        b[k1 + 7] = b[k1 + 7].wrapping_add(1);
        let e = expect_corrupt(&b, "branch key above its child's keys");
        assert!(e.to_string().contains("range"), "{e}");
        // A leaf page id whose header names another page.
        let mut b = bytes.clone();
        put_u64(&mut b, first as usize * ps, first + 1);
        expect_corrupt(&b, "page id mismatch");
        // A leaf turned into a branch pointing back at the root (a cycle through two pages).
        let mut b = bytes.clone();
        let leaf = first as usize * ps;
        put_u16(&mut b, leaf + 8, FLAG_BRANCH);
        put_u16(&mut b, leaf + 10, 1);
        put_u32(&mut b, leaf + PAGE_HEADER, 16);
        put_u32(&mut b, leaf + PAGE_HEADER + 4, 1);
        put_u64(&mut b, leaf + PAGE_HEADER + 8, root);
        expect_corrupt(&b, "two-page cycle");
    }

    #[test]
    fn absurd_counts_sizes_and_flags() {
        let (bytes, root, first_leaf) = branched();
        let ps = 512usize;
        let first_leaf = first_leaf as usize;
        let leaf = first_leaf * ps;
        let cases: Vec<Mutation> = vec![
            (
                "leaf count 0xFFFF",
                Box::new(move |b| put_u16(b, leaf + 10, 0xFFFF)),
            ),
            (
                "branch count 0xFFFF",
                Box::new(move |b| put_u16(b, root as usize * ps + 10, 0xFFFF)),
            ),
            (
                "branch count 0",
                Box::new(move |b| put_u16(b, root as usize * ps + 10, 0)),
            ),
            (
                "huge overflow",
                Box::new(move |b| put_u32(b, leaf + 12, u32::MAX)),
            ),
            (
                "overflow past end",
                Box::new(move |b| put_u32(b, leaf + 12, 1000)),
            ),
            (
                "key pos past end",
                Box::new(move |b| put_u32(b, leaf + PAGE_HEADER + 4, u32::MAX)),
            ),
            (
                "ksize huge",
                Box::new(move |b| put_u32(b, leaf + PAGE_HEADER + 8, u32::MAX)),
            ),
            (
                "vsize huge",
                Box::new(move |b| put_u32(b, leaf + PAGE_HEADER + 12, 1 << 31)),
            ),
            (
                "key pos into elements",
                Box::new(move |b| put_u32(b, leaf + PAGE_HEADER + 4, 0)),
            ),
            (
                "unknown elem flags",
                Box::new(move |b| put_u32(b, leaf + PAGE_HEADER, 0x80)),
            ),
            (
                "unknown page flags",
                Box::new(move |b| put_u16(b, leaf + 8, 0x40)),
            ),
            (
                "meta flags on a tree page",
                Box::new(move |b| put_u16(b, leaf + 8, FLAG_META)),
            ),
            (
                "branch key past end",
                Box::new(move |b| put_u32(b, root as usize * ps + PAGE_HEADER + 4, 1 << 20)),
            ),
            (
                "keys out of order",
                Box::new(move |b| {
                    // Element 1's key becomes the smallest possible revision.
                    let at = leaf + PAGE_HEADER + ELEM;
                    let key = at + le_u32(b, at + 4) as usize;
                    b[key..key + 8].fill(0);
                }),
            ),
            (
                "freelist huge count",
                Box::new(|b| {
                    put_u16(b, 2 * 512 + 10, 0xFFFF);
                    put_u64(b, 2 * 512 + PAGE_HEADER, u64::MAX);
                }),
            ),
            (
                "freelist entry out of range",
                Box::new(|b| {
                    put_u16(b, 2 * 512 + 10, 1);
                    put_u64(b, 2 * 512 + PAGE_HEADER, 1 << 50);
                }),
            ),
            (
                "freelist frees a used page",
                Box::new(move |b| {
                    put_u16(b, 2 * 512 + 10, 1);
                    put_u64(b, 2 * 512 + PAGE_HEADER, first_leaf as u64);
                }),
            ),
            (
                "freelist page type",
                Box::new(|b| put_u16(b, 2 * 512 + 8, FLAG_LEAF)),
            ),
        ];
        for (what, f) in cases {
            let mut b = bytes.clone();
            f(&mut b);
            expect_corrupt(&b, what);
        }
        // A page below the high-water mark that nothing reaches.
        let mut b = bytes.clone();
        b.extend_from_slice(&vec![0u8; ps]);
        let hw = (b.len() / ps) as u64;
        set_meta_field(&mut b, 0, ps, 40, hw);
        set_meta_field(&mut b, 1, ps, 40, hw);
        read(&b).expect("the tree itself is fine");
        let e = Reader::open(Cursor::new(&b))
            .expect("open")
            .check()
            .expect_err("orphan page");
        assert!(e.to_string().contains("neither reachable nor free"), "{e}");
    }

    #[test]
    fn hostile_inline_buckets() {
        let data: Buckets = vec![(b"meta".to_vec(), vec![(b"k".to_vec(), b"v".to_vec())])];
        let bytes = write(&data, DEFAULT_PAGE_SIZE);
        let mut r = Reader::open(Cursor::new(&bytes)).expect("open");
        let root = r.meta().root as usize * 4096;
        // The root leaf's only element is the inline bucket "meta": find its value.
        let pos = le_u32(&bytes, root + PAGE_HEADER + 4) as usize;
        let value = root + PAGE_HEADER + pos + 4;
        let vsize_at = root + PAGE_HEADER + 12;
        let inline_page = value + BUCKET_HEADER;
        assert!(r
            .bucket(&[b"meta"])
            .expect("lookup")
            .expect("exists")
            .is_inline());
        let cases: Vec<Mutation> = vec![
            (
                "value shorter than a bucket header",
                Box::new(move |b| put_u32(b, vsize_at, 8)),
            ),
            (
                "value shorter than a page header",
                Box::new(move |b| put_u32(b, vsize_at, 20)),
            ),
            (
                "inline count beyond value",
                Box::new(move |b| put_u16(b, inline_page + 10, 500)),
            ),
            (
                "inline branch page",
                Box::new(move |b| put_u16(b, inline_page + 8, FLAG_BRANCH)),
            ),
            (
                "inline key past value",
                Box::new(move |b| put_u32(b, inline_page + PAGE_HEADER + 8, 4000)),
            ),
            (
                "bucket root out of range",
                Box::new(move |b| put_u64(b, value, 99)),
            ),
        ];
        for (what, f) in cases {
            let mut b = bytes.clone();
            f(&mut b);
            expect_corrupt(&b, what);
        }
    }

    #[test]
    fn deep_inline_nesting_is_capped() {
        // Hand-build inline buckets nested 70 deep: each value is a bucket header and a
        // leaf page holding one element, the next bucket.
        let mut value = Vec::new();
        value.extend_from_slice(&[0u8; BUCKET_HEADER]);
        let mut page = vec![0u8; PAGE_HEADER];
        put_u16(&mut page, 8, FLAG_LEAF);
        value.extend_from_slice(&page);
        for _ in 0..70 {
            let mut p = vec![0u8; PAGE_HEADER + ELEM];
            put_u16(&mut p, 8, FLAG_LEAF);
            put_u16(&mut p, 10, 1);
            put_u32(&mut p, PAGE_HEADER, ELEM_BUCKET);
            put_u32(&mut p, PAGE_HEADER + 4, ELEM as u32);
            put_u32(&mut p, PAGE_HEADER + 8, 1);
            put_u32(&mut p, PAGE_HEADER + 12, value.len() as u32);
            p.push(b'n');
            p.extend_from_slice(&value);
            value = vec![0u8; BUCKET_HEADER];
            value.extend_from_slice(&p);
        }
        let len = value.len();
        let mut w = Writer::new(Cursor::new(Vec::new())).expect("writer");
        w.create_bucket(b"top").expect("bucket");
        w.put(b"n", &value).expect("put");
        let bytes = w.finish().expect("finish").0.into_inner();
        // Turn the plain value into a bucket by flipping its element flag.
        let mut r = Reader::open(Cursor::new(&bytes)).expect("open");
        let top = r.bucket(&[b"top"]).expect("lookup").expect("exists");
        let leaf = top.root as usize * 4096;
        assert_eq!(le_u32(&bytes, leaf + PAGE_HEADER + 12) as usize, len);
        let mut b = bytes.clone();
        put_u32(&mut b, leaf + PAGE_HEADER, ELEM_BUCKET);
        let e = expect_corrupt(&b, "deep nesting");
        assert!(e.to_string().contains("nested deeper"), "{e}");
    }

    #[test]
    fn oversized_inline_bucket_is_refused() {
        let mut value = vec![0u8; BUCKET_HEADER + 5000];
        put_u16(&mut value, BUCKET_HEADER + 8, FLAG_LEAF);
        let mut w = Writer::new(Cursor::new(Vec::new())).expect("writer");
        w.create_bucket(b"top").expect("bucket");
        w.put(b"n", &value).expect("put");
        let mut b = w.finish().expect("finish").0.into_inner();
        let top = Reader::open(Cursor::new(&b))
            .expect("open")
            .bucket(&[b"top"])
            .expect("lookup")
            .expect("exists");
        put_u32(&mut b, top.root as usize * 4096 + PAGE_HEADER, ELEM_BUCKET);
        let e = expect_corrupt(&b, "inline bucket larger than a page");
        assert!(e.to_string().contains("larger than a page"), "{e}");
    }

    #[test]
    fn freelist_count_in_first_element() {
        let mut b = write(&sample(), DEFAULT_PAGE_SIZE);
        put_u16(&mut b, 2 * 4096 + 10, 0xFFFF);
        put_u64(&mut b, 2 * 4096 + PAGE_HEADER, 0);
        let mut r = Reader::open(Cursor::new(&b)).expect("open");
        assert_eq!(r.free_pages().expect("freelist"), Some(vec![]));
        r.check().expect("consistent");
    }

    #[test]
    fn file_roundtrip() {
        let data = sample();
        let mut file = tempfile::tempfile().expect("tempfile");
        let mut w = Writer::new(io::BufWriter::new(&mut file)).expect("writer");
        for (name, kvs) in &data {
            w.create_bucket(name).expect("bucket");
            for (k, v) in kvs {
                w.put(k, v).expect("put");
            }
            w.end_bucket().expect("end");
        }
        let (out, summary) = w.finish().expect("finish");
        drop(out);
        append_trailer(&mut file).expect("trailer");
        let check = check_trailer(&mut file).expect("check");
        assert!(matches!(check.trailer, Trailer::Valid(_)));
        assert_eq!(check.db_len, summary.pages * 4096);
        let mut r = Reader::open_with_len(&mut file, check.db_len).expect("open");
        assert_eq!(r.check().expect("consistent").keys, 2001);
        let key = r.bucket(&[b"key"]).expect("lookup").expect("exists");
        assert_eq!(r.entries(&key).count(), 2000);
    }

    /// Deterministic mutations of a small valid file: every outcome is a value or an
    /// error, never a panic or a hang.
    #[test]
    fn random_mutations_never_panic() {
        let (bytes, _, _) = branched();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let mut b = bytes.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() % b.len() as u64) as usize;
                match next() % 3 {
                    0 => b[at] = next() as u8,
                    1 => b[at] ^= 1 << (next() % 8),
                    _ => {
                        let v = [0u8, 1, 2, 0xFF, 0x7F, 0x80][(next() % 6) as usize];
                        b[at] = v;
                    }
                }
            }
            if next() % 8 == 0 {
                b.truncate((next() % b.len() as u64) as usize);
            }
            let _ = read_all(&b);
        }
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeMap;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
            #[test]
            fn roundtrip(
                buckets in proptest::collection::btree_map(
                    proptest::collection::vec(any::<u8>(), 1..12),
                    proptest::collection::btree_map(
                        proptest::collection::vec(any::<u8>(), 1..40),
                        proptest::collection::vec(any::<u8>(), 0..700),
                        0..120,
                    ),
                    0..5,
                ),
                ps in prop_oneof![Just(512u32), Just(4096u32)],
            ) {
                let data: Buckets = buckets
                    .into_iter()
                    .map(|(n, kv): (Vec<u8>, BTreeMap<Vec<u8>, Vec<u8>>)| (n, kv.into_iter().collect()))
                    .collect();
                let bytes = write(&data, ps);
                prop_assert_eq!(read(&bytes).expect("read"), data);
                Reader::open(Cursor::new(&bytes)).expect("open").check().expect("check");
            }
        }
    }
}
