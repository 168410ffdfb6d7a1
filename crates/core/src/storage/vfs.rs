//! The file operations the storage layer performs, behind one interface: the real
//! filesystem in a running member, a simulated disk (`crate::sim::disk`) in the
//! deterministic simulator, where a write is durable only once synced and a crash
//! loses what was not.
//!
//! Only the write-ahead log, the database file and the snapshot directory go through
//! it; everything they need is here and nothing more.

use std::io;
use std::path::Path;
use std::sync::Arc;

/// A file open for writing.
pub trait VFile: Send + Sync {
    /// Writes all of `buf` at `offset`, growing the file if needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Cuts or extends (with zeros) the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes the file's contents durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// Makes the file's contents and metadata durable (fsync).
    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }
    /// The file's current length.
    fn size(&self) -> io::Result<u64>;
}

/// A filesystem.
pub trait Vfs: Send + Sync + 'static {
    fn exists(&self, path: &Path) -> bool;
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Names of the entries of a directory.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Opens a file to read it front to back (a snapshot file may be larger than
    /// memory should hold at once).
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn io::Read + Send>>;
    fn file_len(&self, path: &Path) -> io::Result<u64>;
    /// Creates (or truncates) a file.
    fn create(&self, path: &Path) -> io::Result<Box<dyn VFile>>;
    /// Opens an existing file for writing.
    fn open_write(&self, path: &Path) -> io::Result<Box<dyn VFile>>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes the entries of a directory (creations, renames, removals) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Opens the database file at `path`, creating it if it does not exist, with a
    /// page cache of at most `cache_bytes`.
    fn open_redb(
        &self,
        path: &Path,
        cache_bytes: usize,
    ) -> Result<redb::Database, redb::DatabaseError>;
    /// Drops what a cache holds of `path`, so the next open reads what the disk holds
    /// (after a failed write).
    fn drop_cache(&self, _path: &Path) {}
}

/// The real filesystem.
#[derive(Debug, Default)]
pub struct RealFs;

/// The real filesystem, shared.
pub fn real() -> Arc<dyn Vfs> {
    Arc::new(RealFs)
}

struct RealFile(std::fs::File);

impl VFile for RealFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, buf, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn sync_all(&self) -> io::Result<()> {
        self.0.sync_all()
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

impl Vfs for RealFs {
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(path)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect()
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn io::Read + Send>> {
        Ok(Box::new(std::fs::File::open(path)?))
    }
    fn file_len(&self, path: &Path) -> io::Result<u64> {
        Ok(std::fs::metadata(path)?.len())
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn VFile>> {
        Ok(Box::new(RealFile(std::fs::File::create(path)?)))
    }
    fn open_write(&self, path: &Path) -> io::Result<Box<dyn VFile>> {
        let f = std::fs::OpenOptions::new().write(true).open(path)?;
        Ok(Box::new(RealFile(f)))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }
    fn open_redb(
        &self,
        path: &Path,
        cache_bytes: usize,
    ) -> Result<redb::Database, redb::DatabaseError> {
        let mut builder = redb::Builder::new();
        builder.set_cache_size(cache_bytes);
        if path.exists() {
            builder.open(path)
        } else {
            builder.create(path)
        }
    }
    fn drop_cache(&self, path: &Path) {
        use std::os::fd::AsRawFd;
        if let Ok(f) = std::fs::File::open(path) {
            // SAFETY: a valid open descriptor; posix_fadvise only advises the kernel.
            unsafe {
                libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
    }
}

/// Writes a [`VFile`] front to back, as `std::io::Write`.
pub struct SeqWriter {
    file: Box<dyn VFile>,
    at: u64,
}

impl SeqWriter {
    pub fn new(file: Box<dyn VFile>) -> SeqWriter {
        SeqWriter { file, at: 0 }
    }
}

impl io::Write for SeqWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write_all_at(buf, self.at)?;
        self.at += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
