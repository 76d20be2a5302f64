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
        Ok(Self {
            size: md.len(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
            inode: md.ino(),
            device: md.dev(),
        })
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

/// Load a cache if it matches `key`.
pub(crate) fn load(path: &Path, key: &FileKey) -> Option<Vec<BlockId>> {
    let bytes = std::fs::read(path).ok()?;
    let header = 8 + FileKey::ENCODED_LEN + 4 + 8;
    if bytes.len() < header + 32 || &bytes[..8] != MAGIC {
        return None;
    }
    let (body, check) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != check {
        return None;
    }
    if body[8..8 + FileKey::ENCODED_LEN] != key.encode()[..] {
        return None;
    }
    let p = 8 + FileKey::ENCODED_LEN;
    let bs = u32::from_le_bytes(body[p..p + 4].try_into().ok()?);
    let count = u64::from_le_bytes(body[p + 4..p + 12].try_into().ok()?);
    if u64::from(bs) != HASH_BLOCK_SIZE
        || count != key.size.div_ceil(HASH_BLOCK_SIZE)
        || (body.len() - header) as u64 != count.checked_mul(32)?
    {
        return None;
    }
    Some(
        body[header..]
            .chunks_exact(32)
            .map(|c| BlockId(c.try_into().expect("32-byte chunk")))
            .collect(),
    )
}

/// Store a cache; failures (read-only directory, full disk) only cost a later rehash.
pub(crate) fn store(path: &Path, key: &FileKey, hashes: &[BlockId]) {
    let mut v = Vec::with_capacity(8 + FileKey::ENCODED_LEN + 12 + hashes.len() * 32 + 32);
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&key.encode());
    v.extend_from_slice(&(HASH_BLOCK_SIZE as u32).to_le_bytes());
    v.extend_from_slice(&(hashes.len() as u64).to_le_bytes());
    for h in hashes {
        v.extend_from_slice(h.as_bytes());
    }
    let check = blake3::hash(&v);
    v.extend_from_slice(check.as_bytes());
    let Some(dir) = path.parent() else { return };
    let tmp = dir.join(format!(".{}.tmp", random_hex()));
    let res = std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&tmp, &v))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        tracing::debug!(path = %path.display(), error = %e, "hash cache not written");
    }
}

/// A random-enough hex string for temp names and system ids, without an RNG crate:
/// BLAKE3 of the time, the process id and a counter.
pub(crate) fn random_hex() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = blake3::Hasher::new();
    h.update(&format!("{:?}", std::time::SystemTime::now()).into_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    h.update(&format!("{:?}", std::thread::current().id()).into_bytes());
    h.finalize().to_hex()[..32].to_string()
}
