//! A simulated disk for one member: files and directories in memory, each with what
//! the page cache holds (`live`) and what the platter holds (`durable`).
//!
//! - A file's data becomes durable only at `sync_data`/`sync_all` of that file.
//! - A directory's entries (creations, renames, removals) become durable only at
//!   `sync_dir` of that directory; a file synced but never linked durably is lost.
//! - A crash (power cut) makes every file and directory what it durably was, except
//!   that the last write not yet synced may survive in part: any prefix of it, cut at
//!   any byte (a torn write).
//! - A sync may be made to fail with EIO; the unsynced data is then gone from the cache
//!   too (Linux marks the failed pages clean), so what a reopen reads is the disk.
//! - A capacity may be set: a write that would take the files past it fails with
//!   ENOSPC.
//! - A power cut may be planned a number of operations ahead, so that it falls
//!   between a write and its fsync, or a rename and its directory's fsync; from then on
//!   every operation fails until the crash is applied.
//!
//! Paths are resolved component by component through directory inodes, so renaming a
//! directory moves what is in it, as on a real filesystem.

use std::collections::BTreeMap;
use std::io;
use std::path::{Component, Path};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::storage::vfs::{VFile, Vfs};

/// Bugs that can be planted in how the storage layer uses the disk, to prove the
/// simulator's checks catch them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskPlants {
    /// `sync_data` of the Raft log's segments does nothing: an append is acknowledged
    /// before it is durable.
    pub skip_log_fsync: bool,
    /// `sync_dir` does nothing: created and renamed files are not durably linked.
    pub skip_dir_fsync: bool,
}

#[derive(Debug)]
enum Node {
    File {
        live: Vec<u8>,
        durable: Vec<u8>,
        /// The byte ranges written since the last sync, disjoint, by start (a sync
        /// copies only them).
        dirty: BTreeMap<usize, usize>,
    },
    Dir {
        live: BTreeMap<String, usize>,
        durable: BTreeMap<String, usize>,
    },
}

#[derive(Debug, Default)]
struct State {
    nodes: Vec<Node>,
    /// The most recent write not yet synced: file, offset, bytes (for a torn write).
    last_unsynced: Option<(usize, u64, Vec<u8>)>,
    /// Syncs still to fail with EIO.
    fail_syncs: u32,
    capacity: Option<u64>,
    plants: DiskPlants,
    /// Counters for the trace: writes, syncs.
    writes: u64,
    syncs: u64,
    /// Operations left before the power goes (None: no cut planned).
    cut_in: Option<u64>,
    /// The power went: every operation fails until the crash is applied.
    cut: bool,
}

/// One member's disk, shared by the handles open on it.
#[derive(Debug, Clone)]
pub struct SimDisk {
    st: Arc<Mutex<State>>,
}

impl Default for SimDisk {
    fn default() -> Self {
        SimDisk::new()
    }
}

fn enoent(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file", path.display()),
    )
}

fn names(path: &Path) -> Vec<String> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect()
}

impl State {
    fn dir_live(&mut self, ino: usize) -> Option<&mut BTreeMap<String, usize>> {
        match self.nodes.get_mut(ino) {
            Some(Node::Dir { live, .. }) => Some(live),
            _ => None,
        }
    }

    fn lookup(&self, path: &Path) -> Option<usize> {
        let mut ino = 0;
        for n in names(path) {
            match &self.nodes[ino] {
                Node::Dir { live, .. } => ino = *live.get(&n)?,
                Node::File { .. } => return None,
            }
        }
        Some(ino)
    }

    /// The directory holding `path` and the last component's name.
    fn parent(&self, path: &Path) -> io::Result<(usize, String)> {
        let mut ns = names(path);
        let last = ns.pop().ok_or_else(|| enoent(path))?;
        let mut ino = 0;
        for n in ns {
            match &self.nodes[ino] {
                Node::Dir { live, .. } => ino = *live.get(&n).ok_or_else(|| enoent(path))?,
                Node::File { .. } => return Err(enoent(path)),
            }
        }
        match self.nodes[ino] {
            Node::Dir { .. } => Ok((ino, last)),
            Node::File { .. } => Err(enoent(path)),
        }
    }

    /// Bytes held by the files reachable from the root (a removed file frees its
    /// space).
    fn used(&self) -> u64 {
        let mut total = 0;
        let mut stack = vec![0usize];
        while let Some(ino) = stack.pop() {
            match &self.nodes[ino] {
                Node::Dir { live, .. } => stack.extend(live.values().copied()),
                Node::File { live, .. } => total += live.len() as u64,
            }
        }
        total
    }

    fn file(&mut self, ino: usize) -> io::Result<(&mut Vec<u8>, &mut Vec<u8>)> {
        match self.nodes.get_mut(ino) {
            Some(Node::File { live, durable, .. }) => Ok((live, durable)),
            _ => Err(io::Error::other("not a file")),
        }
    }

    /// Bytes `from..to` of file `ino` differ from the disk until the next sync.
    fn mark_dirty(&mut self, ino: usize, from: usize, to: usize) {
        if let Some(Node::File { dirty, .. }) = self.nodes.get_mut(ino) {
            // Merge with every range it touches.
            let (mut from, mut to) = (from, to);
            while let Some((&a, &b)) = dirty.range(..=to).next_back() {
                if b < from {
                    break;
                }
                dirty.remove(&a);
                from = from.min(a);
                to = to.max(b);
            }
            dirty.insert(from, to);
        }
    }

    /// File `ino`'s cache is what its disk holds: its dirty range copied one way or
    /// the other (`to_disk`: a sync; otherwise a dropped cache).
    fn settle(&mut self, ino: usize, to_disk: bool) {
        if let Some(Node::File {
            live,
            durable,
            dirty,
        }) = self.nodes.get_mut(ino)
        {
            if dirty.is_empty() {
                return;
            }
            let (src, dst) = if to_disk {
                (&*live, durable)
            } else {
                (&*durable, live)
            };
            dst.resize(src.len(), 0);
            for (from, to) in std::mem::take(dirty) {
                let to = to.min(src.len());
                if from < to {
                    dst[from..to].copy_from_slice(&src[from..to]);
                }
            }
        }
    }

    /// Sets file `ino`'s cached length (a truncation or an extension).
    fn resize(&mut self, ino: usize, len: usize) -> io::Result<()> {
        let (live, _) = self.file(ino)?;
        let old = live.len();
        live.resize(len, 0);
        // The length itself is what differs from the disk: a range covering both
        // ends copies it at the next sync.
        self.mark_dirty(ino, old.min(len), old.max(len));
        Ok(())
    }

    /// Counts one operation against a planned power cut; once the power is gone,
    /// nothing reaches the disk (the process is about to die with it).
    fn op(&mut self) -> io::Result<()> {
        if let Some(n) = self.cut_in {
            if n == 0 {
                self.cut = true;
                self.cut_in = None;
            } else {
                self.cut_in = Some(n - 1);
            }
        }
        if self.cut {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }

    fn write(&mut self, ino: usize, buf: &[u8], offset: u64) -> io::Result<()> {
        self.op()?;
        let end = offset as usize + buf.len();
        let cur = self.file(ino)?.0.len();
        if let Some(cap) = self.capacity {
            if end > cur && self.used() + (end - cur) as u64 > cap {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "no space left on device",
                ));
            }
        }
        let (live, _) = self.file(ino)?;
        if live.len() < end {
            live.resize(end, 0);
        }
        live[offset as usize..end].copy_from_slice(buf);
        self.mark_dirty(ino, offset as usize, end);
        self.last_unsynced = Some((ino, offset, buf.to_vec()));
        self.writes += 1;
        Ok(())
    }

    fn sync(&mut self, ino: usize, is_log: bool) -> io::Result<()> {
        self.op()?;
        self.syncs += 1;
        if self.fail_syncs > 0 {
            self.fail_syncs -= 1;
            // The failed pages are dropped from the cache: the file is what the disk
            // holds.
            self.file(ino)?;
            self.settle(ino, false);
            if matches!(self.last_unsynced, Some((i, _, _)) if i == ino) {
                self.last_unsynced = None;
            }
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if is_log && self.plants.skip_log_fsync {
            return Ok(());
        }
        self.file(ino)?;
        self.settle(ino, true);
        if matches!(self.last_unsynced, Some((i, _, _)) if i == ino) {
            self.last_unsynced = None;
        }
        Ok(())
    }
}

impl SimDisk {
    pub fn new() -> SimDisk {
        let st = State {
            nodes: vec![Node::Dir {
                live: BTreeMap::new(),
                durable: BTreeMap::new(),
            }],
            ..Default::default()
        };
        SimDisk {
            st: Arc::new(Mutex::new(st)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_plants(&self, plants: DiskPlants) {
        self.lock().plants = plants;
    }

    pub fn plants(&self) -> DiskPlants {
        self.lock().plants
    }

    /// The next `n` syncs fail with EIO.
    pub fn fail_next_syncs(&self, n: u32) {
        self.lock().fail_syncs = n;
    }

    /// Limits the bytes all files may hold together (None: unlimited).
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.lock().capacity = bytes;
    }

    /// Bytes the files hold now.
    pub fn used(&self) -> u64 {
        self.lock().used()
    }

    /// (writes, syncs) so far.
    pub fn counters(&self) -> (u64, u64) {
        let st = self.lock();
        (st.writes, st.syncs)
    }

    /// The power goes after `ops` more writes, syncs or directory changes: between a
    /// write and its fsync, a rename and its directory's fsync, anywhere.
    pub fn cut_after(&self, ops: u64) {
        self.lock().cut_in = Some(ops);
    }

    /// Whether a planned power cut happened (the caller then applies [`Self::crash`]).
    pub fn was_cut(&self) -> bool {
        self.lock().cut
    }

    /// A power cut: everything becomes what it durably was. `tear` chooses how much of
    /// the last unsynced write survives: given its length, a byte count up to it.
    pub fn crash(&self, tear: impl FnOnce(usize) -> usize) {
        let mut st = self.lock();
        st.cut = false;
        st.cut_in = None;
        let torn = st.last_unsynced.take();
        for ino in 0..st.nodes.len() {
            if let Node::Dir { live, durable } = &mut st.nodes[ino] {
                *live = durable.clone();
            } else {
                st.settle(ino, false);
            }
        }
        if let Some((ino, offset, bytes)) = torn {
            let keep = tear(bytes.len()).min(bytes.len());
            if keep > 0 {
                if let Ok((live, durable)) = st.file(ino) {
                    let end = offset as usize + keep;
                    if live.len() < end {
                        live.resize(end, 0);
                    }
                    live[offset as usize..end].copy_from_slice(&bytes[..keep]);
                    durable.clone_from(live);
                }
            }
        }
    }

    /// Flips one bit of the durable and cached contents of the file at `path` (a
    /// sector gone bad at rest). Returns false if there is no such file or it is
    /// empty.
    pub fn flip_bit(&self, path: &Path, at: u64) -> bool {
        let mut st = self.lock();
        let Some(ino) = st.lookup(path) else {
            return false;
        };
        match st.nodes.get_mut(ino) {
            Some(Node::File { live, durable, .. }) if !durable.is_empty() => {
                let i = (at / 8) as usize % durable.len();
                durable[i] ^= 1 << (at % 8);
                if i < live.len() {
                    live[i] ^= 1 << (at % 8);
                }
                true
            }
            _ => false,
        }
    }

    /// Every file's path and durable length, sorted (for the trace hash and reports).
    pub fn files(&self) -> Vec<(String, usize)> {
        let st = self.lock();
        let mut out = Vec::new();
        let mut stack = vec![(0usize, String::new())];
        while let Some((ino, prefix)) = stack.pop() {
            match &st.nodes[ino] {
                Node::Dir { live, .. } => {
                    for (n, &c) in live {
                        stack.push((c, format!("{prefix}/{n}")));
                    }
                }
                Node::File { durable, .. } => out.push((prefix, durable.len())),
            }
        }
        out.sort();
        out
    }
}

/// A handle on one simulated file.
struct SimFile {
    disk: SimDisk,
    ino: usize,
    /// A Raft log segment (the `skip_log_fsync` plant applies to it).
    is_log: bool,
}

impl VFile for SimFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.disk.lock().write(self.ino, buf, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.disk.lock().resize(self.ino, len as usize)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.disk.lock().sync(self.ino, self.is_log)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.disk.lock().file(self.ino)?.0.len() as u64)
    }
}

fn is_log(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "wal")
}

impl Vfs for SimDisk {
    fn exists(&self, path: &Path) -> bool {
        self.lock().lookup(path).is_some()
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut st = self.lock();
        let mut ino = 0;
        for n in names(path) {
            let next = match &st.nodes[ino] {
                Node::Dir { live, .. } => live.get(&n).copied(),
                Node::File { .. } => return Err(io::Error::other("a file is in the way")),
            };
            ino = match next {
                Some(i) => i,
                None => {
                    st.nodes.push(Node::Dir {
                        live: BTreeMap::new(),
                        durable: BTreeMap::new(),
                    });
                    let new = st.nodes.len() - 1;
                    st.dir_live(ino).expect("a directory").insert(n, new);
                    new
                }
            };
        }
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut st = self.lock();
        let (dir, name) = st.parent(path)?;
        st.dir_live(dir)
            .and_then(|d| d.remove(&name))
            .map(|_| ())
            .ok_or_else(|| enoent(path))
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let st = self.lock();
        match st.lookup(dir).map(|i| &st.nodes[i]) {
            Some(Node::Dir { live, .. }) => Ok(live.keys().cloned().collect()),
            _ => Err(enoent(dir)),
        }
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let st = self.lock();
        match st.lookup(path).map(|i| &st.nodes[i]) {
            Some(Node::File { live, .. }) => Ok(live.clone()),
            _ => Err(enoent(path)),
        }
    }

    fn open_read(&self, path: &Path) -> io::Result<Box<dyn io::Read + Send>> {
        Ok(Box::new(io::Cursor::new(self.read(path)?)))
    }

    fn file_len(&self, path: &Path) -> io::Result<u64> {
        let st = self.lock();
        match st.lookup(path).map(|i| &st.nodes[i]) {
            Some(Node::File { live, .. }) => Ok(live.len() as u64),
            _ => Err(enoent(path)),
        }
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn VFile>> {
        let ino = {
            let mut st = self.lock();
            let (dir, name) = st.parent(path)?;
            let existing = st.dir_live(dir).and_then(|d| d.get(&name).copied());
            match existing {
                Some(i) => {
                    st.resize(i, 0)?;
                    i
                }
                None => {
                    st.nodes.push(Node::File {
                        live: Vec::new(),
                        durable: Vec::new(),
                        dirty: BTreeMap::new(),
                    });
                    let i = st.nodes.len() - 1;
                    st.dir_live(dir).expect("a directory").insert(name, i);
                    i
                }
            }
        };
        Ok(Box::new(SimFile {
            disk: self.clone(),
            ino,
            is_log: is_log(path),
        }))
    }

    fn open_write(&self, path: &Path) -> io::Result<Box<dyn VFile>> {
        let ino = self.lock().lookup(path).ok_or_else(|| enoent(path))?;
        Ok(Box::new(SimFile {
            disk: self.clone(),
            ino,
            is_log: is_log(path),
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.lock();
        st.op()?;
        let (fdir, fname) = st.parent(from)?;
        let (tdir, tname) = st.parent(to)?;
        let ino = st
            .dir_live(fdir)
            .and_then(|d| d.remove(&fname))
            .ok_or_else(|| enoent(from))?;
        st.dir_live(tdir).expect("a directory").insert(tname, ino);
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut st = self.lock();
        st.op()?;
        let (dir, name) = st.parent(path)?;
        st.dir_live(dir)
            .and_then(|d| d.remove(&name))
            .map(|_| ())
            .ok_or_else(|| enoent(path))
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.lock();
        st.op()?;
        st.syncs += 1;
        if st.plants.skip_dir_fsync {
            return Ok(());
        }
        let ino = st.lookup(dir).ok_or_else(|| enoent(dir))?;
        match st.nodes.get_mut(ino) {
            Some(Node::Dir { live, durable }) => {
                *durable = live.clone();
                Ok(())
            }
            _ => Err(enoent(dir)),
        }
    }

    fn open_redb(
        &self,
        path: &Path,
        cache_bytes: usize,
    ) -> Result<redb::Database, redb::DatabaseError> {
        if !self.exists(path) {
            self.create(path).map_err(redb::StorageError::from)?;
        }
        let ino = self
            .lock()
            .lookup(path)
            .ok_or_else(|| redb::DatabaseError::Storage(redb::StorageError::from(enoent(path))))?;
        let backend = RedbFile {
            disk: self.clone(),
            ino,
        };
        redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create_with_backend(backend)
    }
}

/// The database file as redb's storage backend.
#[derive(Debug)]
struct RedbFile {
    disk: SimDisk,
    ino: usize,
}

impl redb::StorageBackend for RedbFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.disk.lock().file(self.ino)?.0.len() as u64)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let mut st = self.disk.lock();
        let (live, _) = st.file(self.ino)?;
        let end = offset as usize + out.len();
        if end > live.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end",
            ));
        }
        out.copy_from_slice(&live[offset as usize..end]);
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.disk.lock();
        let cur = st.file(self.ino)?.0.len() as u64;
        if let Some(cap) = st.capacity {
            if len > cur && st.used() + (len - cur) > cap {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "no space left on device",
                ));
            }
        }
        st.resize(self.ino, len as usize)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.disk.lock().sync(self.ino, false)
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.disk.lock().write(self.ino, data, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_synced_data_and_synced_links_survive_a_crash() {
        let d = SimDisk::new();
        d.create_dir_all(Path::new("/m/wal")).unwrap();
        d.sync_dir(Path::new("/")).unwrap();
        d.sync_dir(Path::new("/m")).unwrap();
        let f = d.create(Path::new("/m/wal/a.wal")).unwrap();
        f.write_all_at(b"hello", 0).unwrap();
        f.sync_data().unwrap();
        // Synced data, but the link is not durable yet.
        d.crash(|_| 0);
        assert!(!d.exists(Path::new("/m/wal/a.wal")));
        let f = d.create(Path::new("/m/wal/a.wal")).unwrap();
        f.write_all_at(b"hello", 0).unwrap();
        f.sync_data().unwrap();
        d.sync_dir(Path::new("/m/wal")).unwrap();
        f.write_all_at(b" world", 5).unwrap();
        d.crash(|n| n / 2);
        assert_eq!(d.read(Path::new("/m/wal/a.wal")).unwrap(), b"hello wo");
    }

    #[test]
    fn a_failed_sync_leaves_the_disk_as_it_was_and_the_cache_with_it() {
        let d = SimDisk::new();
        let f = d.create(Path::new("/x")).unwrap();
        f.write_all_at(b"ab", 0).unwrap();
        f.sync_data().unwrap();
        f.write_all_at(b"cd", 2).unwrap();
        d.fail_next_syncs(1);
        assert_eq!(f.sync_data().unwrap_err().raw_os_error(), Some(libc::EIO));
        assert_eq!(d.read(Path::new("/x")).unwrap(), b"ab");
        d.set_capacity(Some(3));
        assert!(f.write_all_at(b"cd", 2).is_err());
    }

    #[test]
    fn a_planned_power_cut_falls_between_a_write_and_its_fsync() {
        let d = SimDisk::new();
        let f = d.create(Path::new("/x")).unwrap();
        d.sync_dir(Path::new("/")).unwrap();
        f.write_all_at(b"ab", 0).unwrap();
        f.sync_data().unwrap();
        d.cut_after(1);
        f.write_all_at(b"cd", 2).unwrap();
        assert_eq!(f.sync_data().unwrap_err().raw_os_error(), Some(libc::EIO));
        assert!(d.was_cut());
        assert!(f.write_all_at(b"ef", 4).is_err(), "nothing after the cut");
        d.crash(|_| 0);
        assert!(!d.was_cut());
        assert_eq!(d.read(Path::new("/x")).unwrap(), b"ab");
    }

    #[test]
    fn a_renamed_directory_moves_its_files() {
        let d = SimDisk::new();
        d.create_dir_all(Path::new("/m/wal.tmp")).unwrap();
        d.create(Path::new("/m/wal.tmp/1.wal")).unwrap();
        d.rename(Path::new("/m/wal.tmp"), Path::new("/m/wal"))
            .unwrap();
        assert_eq!(
            d.list(Path::new("/m/wal")).unwrap(),
            vec!["1.wal".to_string()]
        );
        assert!(!d.exists(Path::new("/m/wal.tmp")));
    }
}
