//! A pack written to its file as its blocks arrive, in a local repository.
//!
//! A pack is named by its index, which is complete only when the pack is, so its bytes
//! cannot go to their key while it fills. Held in memory, the whole pack was written at
//! its end, after the last read of the source; written to a staging file as it fills
//! instead, the copy into the page cache happens while the source is still being read,
//! and the commit only waits for its fsync.
//!
//! The kernel is not told to start writing the pack back early
//! (`sync_file_range`): measured on btrfs-on-loop over the same disk, those writes
//! slowed the source's reads by about what they saved at the fsync.
//!
//! Blocks reach the file through a 1 MiB buffer: at 4 KiB blocks a write per block was
//! 5000 system calls for a 20 MiB incremental, CPU taken from the source's readers.
//!
//! Durability is as before: the file is fsynced before it is renamed to its key, the
//! directory after; the pack's index is written only then. A staging file left by a
//! killed process is under `packs/` and in no index, so `gc` deletes it like a pack
//! whose index was never written.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use snapsync_store::{Result, StoreError};

/// Name prefix of staging files under `packs/`.
const STAGING_PREFIX: &str = "staging-";

/// Bytes gathered before they are written to the staging file.
const WRITE_BUFFER: usize = 1 << 20;

/// See the module documentation. Removed when dropped unpublished.
#[derive(Debug)]
pub(crate) struct StagedFile {
    file: BufWriter<File>,
    path: PathBuf,
    /// Bytes written.
    len: u64,
    published: bool,
}

impl StagedFile {
    /// A new staging file in directory `dir` (created if missing).
    pub(crate) fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::io(format!("create {}", dir.display()), e))?;
        let path = dir.join(format!("{STAGING_PREFIX}{}", snapsync_store::random_id()));
        let file = File::create_new(&path)
            .map_err(|e| StoreError::io(format!("create {}", path.display()), e))?;
        Ok(Self {
            file: BufWriter::with_capacity(WRITE_BUFFER, file),
            path,
            len: 0,
            published: false,
        })
    }

    /// Bytes written so far.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Append `bytes`.
    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .map_err(|e| StoreError::io(format!("write {}", self.path.display()), e))?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Make the file durable, rename it to `dest` and make the rename durable (fsync of
    /// `dest`'s directory): once this returns, `dest` survives a crash whole.
    pub(crate) fn publish(mut self, dest: &Path) -> Result<()> {
        let io = |what: &str, p: &Path, e| StoreError::io(format!("{what} {}", p.display()), e);
        self.file.flush().map_err(|e| io("write", &self.path, e))?;
        // Its data and what is needed to read it back (size, allocation): fdatasync.
        self.file
            .get_ref()
            .sync_data()
            .map_err(|e| io("fsync", &self.path, e))?;
        let dir = dest.parent().expect("an object key has a directory");
        std::fs::create_dir_all(dir).map_err(|e| io("create", dir, e))?;
        std::fs::rename(&self.path, dest).map_err(|e| io("rename to", dest, e))?;
        self.published = true;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("fsync", dir, e))
    }
}

impl Drop for StagedFile {
    /// A pack abandoned before it was published (a failed receive) leaves no file.
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
