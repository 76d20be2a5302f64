//! The per-image block-hash cache.
//!
//! File format (little endian), one file per image:
//!
//! ```text
//! magic   8  "SNSRHC01"
//! key     FileKey::ENCODED_LEN bytes (size, mtime, ctime, inode, device)
//! bsize   4  hash block size
//! count   8  number of hashes
//! hashes  32 * count
//! check   32 BLAKE3 of everything before
//! ```
//!
//! A cache whose key, block size or checksum does not match is ignored (and rewritten
//! on the next hash), so a stale or damaged cache can only cost time, never correctness.
//!
//! Caches are written and read as streams, in block order: an image's hashes are never
//! all in memory at once (32 bytes a block: 16 MiB for a 32 GiB image, 512 MiB for a
//! 1 TiB one).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::OnceLock;

use snapsync_core::BlockId;
use snapsync_store::{Result, StoreError};

/// Size of the blocks the raw store hashes; the repository's default block size, so
/// hashes observed during replication into a default repository fill this cache.
pub const HASH_BLOCK_SIZE: u64 = 64 << 10;

const MAGIC: &[u8; 8] = b"SNSRHC01";

/// What identifies one version of a file: any write changes ctime (and usually mtime
/// and size); replacing the file changes the inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileKey {
    /// Length in bytes.
    pub size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    inode: u64,
    device: u64,
}

impl FileKey {
    const ENCODED_LEN: usize = 8 * 7;

    /// Read the key of `path`.
    pub fn of(path: &Path) -> Result<Self> {
        let md = std::fs::metadata(path)
            .map_err(|e| StoreError::io(format!("stat {}", path.display()), e))?;
        Ok(Self::from_metadata(&md))
    }

    /// The key of an open file (`path` names it in errors): the version of the file
    /// actually open, whatever its path names by now.
    pub(crate) fn of_file(file: &std::fs::File, path: &Path) -> Result<Self> {
        let md = file
            .metadata()
            .map_err(|e| StoreError::io(format!("stat {}", path.display()), e))?;
        Ok(Self::from_metadata(&md))
    }

    fn from_metadata(md: &std::fs::Metadata) -> Self {
        Self {
            size: md.len(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
            inode: md.ino(),
            device: md.dev(),
        }
    }

    /// The device the file is on: extents of files on different devices are never
    /// comparable.
    pub(crate) fn device(&self) -> u64 {
        self.device
    }

    /// What differs from `self` to `now`, in words.
    pub fn change_to(&self, now: &FileKey) -> String {
        let mut changes = Vec::new();
        if self.size != now.size {
            changes.push(format!("size {} -> {} bytes", self.size, now.size));
        }
        if self.mtime != now.mtime {
            changes.push("modification time".to_string());
        }
        if self.ctime != now.ctime {
            changes.push("change time".to_string());
        }
        if (self.inode, self.device) != (now.inode, now.device) {
            changes.push("replaced by another file".to_string());
        }
        changes.join(", ")
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::ENCODED_LEN);
        for x in [
            self.size as i64,
            self.mtime.0,
            self.mtime.1,
            self.ctime.0,
            self.ctime.1,
            self.inode as i64,
            self.device as i64,
        ] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }
}

/// BLAKE3 of one block, zero-padded to [`HASH_BLOCK_SIZE`] (the last block of an image).
pub(crate) fn hash_block(block: &[u8]) -> BlockId {
    if block.len() as u64 == HASH_BLOCK_SIZE {
        return BlockId::of(block);
    }
    let mut h = blake3::Hasher::new();
    h.update(block);
    let pad = vec![0u8; HASH_BLOCK_SIZE as usize - block.len()];
    h.update(&pad);
    BlockId(*h.finalize().as_bytes())
}

/// The hash of an all-zero block.
pub(crate) fn zero_hash() -> BlockId {
    static Z: OnceLock<BlockId> = OnceLock::new();
    *Z.get_or_init(|| BlockId::of(&vec![0u8; HASH_BLOCK_SIZE as usize]))
}

const HEADER_LEN: usize = 8 + FileKey::ENCODED_LEN + 4 + 8;

/// Hashes read from a cache at a time: 128 KiB.
pub(crate) const READ_CHUNK: usize = 4096;

/// A cache that matches its image, read front to back: only a chunk of it is in memory
/// at a time, whatever the image's size.
pub(crate) struct CacheReader {
    file: std::io::BufReader<std::fs::File>,
    left: u64,
}

impl CacheReader {
    /// Open the cache at `path` if it matches `key` and is intact (checked by reading it
    /// through once before any hash is handed out).
    pub(crate) fn open(path: &Path, key: &FileKey) -> Option<Self> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = std::fs::File::open(path).ok()?;
        let len = file.metadata().ok()?.len();
        let count = key.size.div_ceil(HASH_BLOCK_SIZE);
        if len != (HEADER_LEN as u64 + 32).checked_add(count.checked_mul(32)?)? {
            return None;
        }
        let mut header = [0u8; HEADER_LEN];
        file.read_exact(&mut header).ok()?;
        let p = 8 + FileKey::ENCODED_LEN;
        if &header[..8] != MAGIC
            || header[8..p] != key.encode()[..]
            || u32::from_le_bytes(header[p..p + 4].try_into().ok()?) != HASH_BLOCK_SIZE as u32
            || u64::from_le_bytes(header[p + 4..p + 12].try_into().ok()?) != count
        {
            return None;
        }
        // The checksum covers everything before it.
        let mut h = blake3::Hasher::new();
        h.update(&header);
        let mut buf = vec![0u8; READ_CHUNK * 32];
        let mut body = count * 32;
        while body > 0 {
            let n = body.min(buf.len() as u64) as usize;
            file.read_exact(&mut buf[..n]).ok()?;
            h.update(&buf[..n]);
            body -= n as u64;
        }
        let mut check = [0u8; 32];
        file.read_exact(&mut check).ok()?;
        if h.finalize().as_bytes() != &check {
            return None;
        }
        file.seek(SeekFrom::Start(HEADER_LEN as u64)).ok()?;
        Some(Self {
            file: std::io::BufReader::with_capacity(READ_CHUNK * 32, file),
            left: count,
        })
    }

    /// Hashes not read yet.
    pub(crate) fn remaining(&self) -> u64 {
        self.left
    }

    /// The next `out.len()` hashes (at most [`CacheReader::remaining`]).
    pub(crate) fn read(&mut self, out: &mut [BlockId], path: &Path) -> Result<()> {
        use std::io::Read;
        assert!(
            out.len() as u64 <= self.left,
            "reads past the end of a hash cache"
        );
        for h in out.iter_mut() {
            self.file
                .read_exact(&mut h.0)
                .map_err(|e| StoreError::io(format!("read {}", path.display()), e))?;
        }
        self.left -= out.len() as u64;
        Ok(())
    }
}

/// A cache being written, hashes in order, as they are computed: put in place by
/// [`CacheWriter::finish`] once it holds one hash per block. Failures (read-only
/// directory, full disk) only cost a later rehash, so they end the cache silently.
pub(crate) struct CacheWriter {
    file: Option<std::io::BufWriter<std::fs::File>>,
    tmp: std::path::PathBuf,
    path: std::path::PathBuf,
    hasher: blake3::Hasher,
    expected: u64,
    written: u64,
}

impl CacheWriter {
    /// Start the cache of the image `key` describes.
    pub(crate) fn create(path: &Path, key: &FileKey) -> Option<Self> {
        use std::io::Write;
        let dir = path.parent()?;
        let tmp = dir.join(format!(".{}.tmp", snapsync_store::random_id()));
        let expected = key.size.div_ceil(HASH_BLOCK_SIZE);
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&key.encode());
        header.extend_from_slice(&(HASH_BLOCK_SIZE as u32).to_le_bytes());
        header.extend_from_slice(&expected.to_le_bytes());
        let opened = std::fs::create_dir_all(dir).and_then(|_| {
            let mut f =
                std::io::BufWriter::with_capacity(READ_CHUNK * 32, std::fs::File::create(&tmp)?);
            f.write_all(&header)?;
            Ok(f)
        });
        let mut hasher = blake3::Hasher::new();
        hasher.update(&header);
        let mut w = Self {
            file: None,
            tmp,
            path: path.to_path_buf(),
            hasher,
            expected,
            written: 0,
        };
        match opened {
            Ok(f) => w.file = Some(f),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "hash cache not written");
                return None;
            }
        }
        Some(w)
    }

    /// Append the next hashes.
    pub(crate) fn push(&mut self, hashes: &[BlockId]) {
        use std::io::Write;
        let Some(f) = self.file.as_mut() else { return };
        self.written += hashes.len() as u64;
        let mut ok = self.written <= self.expected;
        for h in hashes {
            if !ok {
                break;
            }
            self.hasher.update(h.as_bytes());
            ok = f.write_all(h.as_bytes()).is_ok();
        }
        if !ok {
            self.file = None;
        }
    }

    /// Put the cache in place if it is complete.
    pub(crate) fn finish(mut self) {
        use std::io::Write;
        let Some(mut f) = self.file.take() else {
            return;
        };
        if self.written != self.expected {
            return;
        }
        let check = self.hasher.finalize();
        let res = f
            .write_all(check.as_bytes())
            .and_then(|_| f.flush())
            .and_then(|_| std::fs::rename(&self.tmp, &self.path));
        if let Err(e) = res {
            tracing::debug!(path = %self.path.display(), error = %e, "hash cache not written");
        }
    }
}

impl Drop for CacheWriter {
    fn drop(&mut self) {
        // Renamed away when finished; otherwise an unfinished or failed one.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(dir: &Path, blocks: u64) -> FileKey {
        let img = dir.join("img");
        std::fs::write(&img, vec![7u8; (blocks * HASH_BLOCK_SIZE - 5) as usize]).unwrap();
        FileKey::of(&img).unwrap()
    }

    fn ids(n: u64) -> Vec<BlockId> {
        (0..n).map(|i| BlockId::of(&i.to_le_bytes())).collect()
    }

    #[test]
    fn streams_round_trip_and_refuse_damage() {
        let dir = tempfile::tempdir().unwrap();
        let n = READ_CHUNK as u64 * 2 + 3;
        let key = key_of(dir.path(), n);
        let path = dir.path().join("c/img.b3");
        let mut w = CacheWriter::create(&path, &key).unwrap();
        for chunk in ids(n).chunks(1000) {
            w.push(chunk);
        }
        w.finish();
        let mut r = CacheReader::open(&path, &key).unwrap();
        let mut got = vec![BlockId([0; 32]); n as usize];
        r.read(&mut got[..10], &path).unwrap();
        r.read(&mut got[10..], &path).unwrap();
        assert_eq!(r.remaining(), 0);
        assert_eq!(got, ids(n));
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(dir.path().join("c")).unwrap().count(), 1);

        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_LEN + 40] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(CacheReader::open(&path, &key).is_none(), "damaged");
        bytes[HEADER_LEN + 40] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(CacheReader::open(&path, &key).is_some());
        let mut other = key.clone();
        other.ctime.1 += 1;
        assert!(
            CacheReader::open(&path, &other).is_none(),
            "stale: the image changed"
        );
    }

    #[test]
    fn incomplete_caches_are_never_put_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let key = key_of(dir.path(), 10);
        let path = dir.path().join("c/img.b3");
        let mut w = CacheWriter::create(&path, &key).unwrap();
        w.push(&ids(9));
        w.finish();
        let mut w = CacheWriter::create(&path, &key).unwrap();
        w.push(&ids(11));
        w.finish();
        let w = CacheWriter::create(&path, &key).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path().join("c")).unwrap().count(), 0);
    }
}
