//! The partial file of a pull, `<cache>/<hash>/layers-<start>-<end>.gguf.partial`.
//!
//! Its name is stable (not per process) so that a pull that was cut, by a link that
//! went down or a worker that stopped, leaves its bytes for the next pull of the
//! same shard to resume from.
//!
//! One writer at a time: in this worker the pull registry ([`super::progress::Pulls`])
//! admits one pull per shard; across processes that share a cache folder (every
//! worker of a machine uses the same default one) the writer holds an exclusive
//! `flock` on the file. The OS drops that lock when the process dies, so a crashed
//! pull never leaves a stale lock behind, which a lock file made with an exclusive
//! create would. A pull that finds the file locked waits, then takes the finished
//! shard from the cache or resumes from whatever the other pull left.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use strata_platform::files::still_named;

/// `dest` with `.partial` added to its name.
pub fn partial_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// The partial file of a pull, locked for this pull until dropped.
#[derive(Debug)]
pub struct Partial {
    file: File,
    path: PathBuf,
}

impl Partial {
    /// Opens (or creates) the partial file at `path` and locks it; `None` while
    /// another process's pull holds it. Blocking (file system calls): run off the
    /// async threads.
    pub fn try_open(path: &Path) -> io::Result<Option<Partial>> {
        let file = File::options().read(true).write(true).create(true).truncate(false).open(path)?;
        if !try_lock(&file)? {
            return Ok(None);
        }
        // The pull that held the lock may have renamed the file into the cache or
        // deleted it before letting go: this handle then names a file that is no
        // longer the partial, and a new one may be at the path.
        if !still_named(path, &file)? {
            return Ok(None);
        }
        Ok(Some(Partial { file, path: path.to_path_buf() }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes held.
    pub fn held_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// A handle for the writer thread. It shares the lock, which lasts until this
    /// `Partial` is dropped.
    pub fn writer(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// Moves the finished file into the cache. Renamed while still locked, so a
    /// pull waiting for the lock finds the shard in the cache when it gets it.
    pub fn finish(self, dest: &Path) -> io::Result<()> {
        std::fs::rename(&self.path, dest)
    }

    /// Deletes the file: its bytes are no use to any later pull.
    pub fn remove(self) -> io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Bytes hashed or written per read or write.
const BUFFER_BYTES: usize = 1 << 20;

/// Appends what arrives on `chunks` to `file` after its first `start` bytes, which
/// it reads again to hash, so the hash returned (with the file's length) covers the
/// whole file, not just what this pull received. Runs on a blocking thread.
pub fn append(
    mut file: File,
    start: u64,
    mut chunks: tokio::sync::mpsc::Receiver<Vec<u8>>,
) -> io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    file.seek(SeekFrom::Start(0))?;
    let mut kept = (&mut file).take(start);
    let mut buf = vec![0u8; BUFFER_BYTES];
    let mut hashed = 0u64;
    loop {
        let n = kept.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        hashed += n as u64;
    }
    if hashed != start {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the partial file holds {hashed} bytes, not the {start} asked to resume from"),
        ));
    }
    // Anything past `start` (a pull that starts over) goes.
    file.set_len(start)?;
    file.seek(SeekFrom::Start(start))?;
    let mut out = io::BufWriter::with_capacity(BUFFER_BYTES, &mut file);
    let mut written = start;
    while let Some(chunk) = chunks.blocking_recv() {
        hasher.update(&chunk);
        out.write_all(&chunk)?;
        written += chunk.len() as u64;
    }
    out.flush()?;
    drop(out);
    // What was written stays for a later pull to resume from, even after a crash.
    file.sync_all()?;
    Ok((written, strata_proto::content_hash::hex(&hasher.finalize())))
}

/// Takes the file's lock across processes if no one holds it (`flock` on Unix,
/// `LockFileEx` on Windows); false when another holds it.
fn try_lock(file: &File) -> io::Result<bool> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partial_file_is_named_after_the_shard() {
        assert_eq!(partial_path(Path::new("/c/abc/layers-0-4.gguf")), PathBuf::from("/c/abc/layers-0-4.gguf.partial"));
    }

    #[test]
    fn one_pull_at_a_time_holds_a_partial_file() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("layers-0-4.gguf.partial");
        let first = Partial::try_open(&path)?.expect("nobody holds it");
        // A second open of the file, as another process would: flock locks the open
        // file, not the process, so this stands for one.
        #[cfg(unix)]
        assert!(Partial::try_open(&path)?.is_none(), "the file is locked");
        drop(first);
        let second = Partial::try_open(&path)?.expect("the lock went with the first pull");
        // Renamed into the cache while locked: a pull that opened the old file and
        // gets its lock later sees that it no longer is the partial.
        let stale = File::options().read(true).write(true).open(&path)?;
        second.finish(&dir.path().join("layers-0-4.gguf"))?;
        assert!(try_lock(&stale)?);
        assert!(!still_named(&path, &stale)?);
        Ok(())
    }

    #[test]
    fn appending_hashes_the_kept_bytes_and_the_new_ones() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("p");
        let whole: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &whole[..1_000_000])?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.blocking_send(whole[1_000_000..2_500_000].to_vec()).unwrap();
        tx.blocking_send(whole[2_500_000..].to_vec()).unwrap();
        drop(tx);
        let file = File::options().read(true).write(true).open(&path)?;
        let (len, sha) = append(file, 1_000_000, rx)?;
        assert_eq!((len, sha), (whole.len() as u64, strata_proto::content_hash::hex(&Sha256::digest(&whole))));
        assert_eq!(std::fs::read(&path)?, whole);
        // Starting over drops what was there.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.blocking_send(vec![7u8; 10]).unwrap();
        drop(tx);
        let (len, _) = append(File::options().read(true).write(true).open(&path)?, 0, rx)?;
        assert_eq!((len, std::fs::read(&path)?), (10, vec![7u8; 10]));
        Ok(())
    }
}
