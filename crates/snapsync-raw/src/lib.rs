//! The `raw:` store: a directory of raw disk images, `DIR/<volume>/<snapshot>.img`.
//!
//! Raw images carry no metadata to diff with, so differences are found by hashing fixed
//! 64 KiB blocks (BLAKE3) and comparing. Hashing a large image is the expensive part, so
//! each image's block hashes are cached in `DIR/.snapsync/hashes/`, keyed by the file's
//! size, modification and change times, inode and device: any write to the image changes
//! its ctime, so a changed file is never trusted. The cache is also filled for free when
//! the engine reads a whole image and reports the hashes it computed
//! ([`SnapshotReader::observe_block`]), so a full replication followed by an incremental
//! reads each image once.
//!
//! A snapshot's age is its image file's modification time. Its identity is derived from
//! this store's system id (a random id kept in `DIR/.snapsync/system-id`, so it survives
//! moving the directory), the volume, the name and that age.

mod cache;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use snapsync_core::{
    validate_name, BlockId, Extent, ExtentList, SnapshotId, SnapshotInfo, Timestamp, VolumeInfo,
};
use snapsync_store::{
    Diff, Result, SnapshotReader, SnapshotRef, SnapshotSource, Store, StoreError,
};

pub use cache::{FileKey, HASH_BLOCK_SIZE};

/// A directory of raw images.
#[derive(Debug, Clone)]
pub struct RawStore {
    root: PathBuf,
}

const META_DIR: &str = ".snapsync";
const IMAGE_EXT: &str = "img";

impl RawStore {
    /// Open the directory `root`; it must exist.
    pub fn open(root: &Path) -> Result<Self> {
        let md = std::fs::metadata(root)
            .map_err(|e| StoreError::io(format!("raw store {}", root.display()), e))?;
        if !md.is_dir() {
            return Err(StoreError::Malformed {
                location: root.display().to_string(),
                detail: "not a directory".into(),
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    fn image_path(&self, volume: &str, snapshot: &str) -> Result<PathBuf> {
        validate_name("volume", volume)?;
        validate_name("snapshot", snapshot)?;
        let p = self
            .root
            .join(volume)
            .join(format!("{snapshot}.{IMAGE_EXT}"));
        if !p.is_file() {
            return Err(StoreError::not_found(format!(
                "snapshot {volume}@{snapshot} ({})",
                p.display()
            )));
        }
        Ok(p)
    }

    fn cache_path(&self, volume: &str, snapshot: &str) -> PathBuf {
        self.root
            .join(META_DIR)
            .join("hashes")
            .join(volume)
            .join(format!("{snapshot}.b3"))
    }

    fn snapshot_info(
        &self,
        system: &str,
        volume: &str,
        path: &Path,
    ) -> Result<Option<SnapshotInfo>> {
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".img"))
        else {
            return Ok(None);
        };
        if validate_name("snapshot", name).is_err() {
            return Ok(None);
        }
        let md = std::fs::metadata(path)
            .map_err(|e| StoreError::io(format!("stat {}", path.display()), e))?;
        if !md.is_file() {
            return Ok(None);
        }
        let created = Timestamp::from_system_time(
            md.modified()
                .map_err(|e| StoreError::io(format!("mtime of {}", path.display()), e))?,
        );
        Ok(Some(SnapshotInfo {
            name: name.to_string(),
            id: SnapshotId::derive(system, volume, name, created),
            created,
            size: md.len(),
        }))
    }

    /// Block hashes of one image, from the cache or by hashing it (then cached).
    fn hashes(&self, volume: &str, snapshot: &str) -> Result<Vec<BlockId>> {
        let path = self.image_path(volume, snapshot)?;
        let key = FileKey::of(&path)?;
        let cache_path = self.cache_path(volume, snapshot);
        if let Some(h) = cache::load(&cache_path, &key) {
            return Ok(h);
        }
        let hashes = hash_image(&path, key.size)?;
        cache::store(&cache_path, &key, &hashes);
        Ok(hashes)
    }
}

/// Hash an image in [`HASH_BLOCK_SIZE`] blocks: one sequential read on one thread,
/// hashing on all cores, overlapped through a small channel.
fn hash_image(path: &Path, size: u64) -> Result<Vec<BlockId>> {
    const CHUNK: usize = 8 << 20;
    let file =
        File::open(path).map_err(|e| StoreError::io(format!("open {}", path.display()), e))?;
    let mut out = Vec::with_capacity(size.div_ceil(HASH_BLOCK_SIZE) as usize);
    std::thread::scope(|s| -> Result<()> {
        let (tx, rx) = crossbeam_channel::bounded::<Result<Vec<u8>>>(2);
        // Buffers go back to the reader: no fresh allocation (and page faults) per chunk.
        let (give_back, recycled) = crossbeam_channel::bounded::<Vec<u8>>(4);
        s.spawn(move || {
            let mut off = 0u64;
            while off < size {
                let n = (size - off).min(CHUNK as u64) as usize;
                let mut buf = recycled.try_recv().unwrap_or_default();
                buf.resize(n, 0);
                let r = file
                    .read_exact_at(&mut buf, off)
                    .map_err(|e| StoreError::io(format!("read {} at {off}", path.display()), e));
                let failed = r.is_err();
                if tx.send(r.map(|_| buf)).is_err() || failed {
                    return;
                }
                off += n as u64;
            }
        });
        for chunk in rx {
            let chunk = chunk?;
            out.par_extend(
                chunk
                    .par_chunks(HASH_BLOCK_SIZE as usize)
                    .map(cache::hash_block),
            );
            let _ = give_back.try_send(chunk);
        }
        Ok(())
    })?;
    Ok(out)
}

impl Store for RawStore {
    fn location(&self) -> String {
        format!("raw:{}", self.root.display())
    }

    fn system_id(&self) -> Result<String> {
        let meta = self.root.join(META_DIR);
        let p = meta.join("system-id");
        if let Ok(s) = std::fs::read_to_string(&p) {
            let s = s.trim();
            if !s.is_empty() {
                return Ok(format!("raw:{s}"));
            }
        }
        // A fresh id, written atomically; if the directory is read-only, fall back to
        // the path, which is stable as long as the directory does not move.
        let fresh = cache::random_hex();
        let tmp = meta.join(format!("system-id.{fresh}.tmp"));
        let written = std::fs::create_dir_all(&meta)
            .and_then(|_| std::fs::write(&tmp, &fresh))
            .and_then(|_| std::fs::hard_link(&tmp, &p));
        let _ = std::fs::remove_file(&tmp);
        match written {
            Ok(()) => Ok(format!("raw:{fresh}")),
            Err(_) => match std::fs::read_to_string(&p) {
                Ok(s) if !s.trim().is_empty() => Ok(format!("raw:{}", s.trim())),
                _ => Ok(format!(
                    "raw-path:{}",
                    self.root
                        .canonicalize()
                        .unwrap_or(self.root.clone())
                        .display()
                )),
            },
        }
    }

    fn list(&self) -> Result<Vec<VolumeInfo>> {
        let system = self.system_id()?;
        let mut volumes = Vec::new();
        let entries = std::fs::read_dir(&self.root)
            .map_err(|e| StoreError::io(format!("list {}", self.root.display()), e))?;
        for entry in entries {
            let entry =
                entry.map_err(|e| StoreError::io(format!("list {}", self.root.display()), e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if validate_name("volume", &name).is_err() || !entry.path().is_dir() {
                continue;
            }
            let mut snapshots = Vec::new();
            let files = std::fs::read_dir(entry.path())
                .map_err(|e| StoreError::io(format!("list {}", entry.path().display()), e))?;
            for f in files {
                let f =
                    f.map_err(|e| StoreError::io(format!("list {}", entry.path().display()), e))?;
                if let Some(info) = self.snapshot_info(&system, &name, &f.path())? {
                    snapshots.push(info);
                }
            }
            if snapshots.is_empty() {
                continue;
            }
            snapshots.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
            volumes.push(VolumeInfo {
                size: snapshots.last().map_or(0, |s| s.size),
                name,
                snapshots,
                origin: None,
            });
        }
        volumes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(volumes)
    }
}

impl SnapshotSource for RawStore {
    fn diff(&self, volume: &str, target: &str, base: Option<SnapshotRef<'_>>) -> Result<Diff> {
        let tpath = self.image_path(volume, target)?;
        let size = FileKey::of(&tpath)?.size;
        let Some(base) = base else {
            // Without a base, cached hashes tell zero blocks apart for free; without a
            // cache, report everything rather than read the image twice.
            let key = FileKey::of(&tpath)?;
            return Ok(match cache::load(&self.cache_path(volume, target), &key) {
                Some(h) => compare(&h, None, size),
                None => Diff {
                    data: ExtentList::from_extents([Extent::new(0, size)]),
                    zero: ExtentList::new(),
                },
            });
        };
        self.image_path(base.volume, base.snapshot)?;
        let (t, b) = rayon::join(
            || self.hashes(volume, target),
            || self.hashes(base.volume, base.snapshot),
        );
        Ok(compare(&t?, Some(&b?), size))
    }

    fn open_snapshot(&self, volume: &str, snapshot: &str) -> Result<Box<dyn SnapshotReader + '_>> {
        let path = self.image_path(volume, snapshot)?;
        let key = FileKey::of(&path)?;
        let file =
            File::open(&path).map_err(|e| StoreError::io(format!("open {}", path.display()), e))?;
        let blocks = key.size.div_ceil(HASH_BLOCK_SIZE) as usize;
        let cached = cache::load(&self.cache_path(volume, snapshot), &key).is_some();
        Ok(Box::new(RawReader {
            file,
            path,
            observed: (!cached).then(|| vec![None; blocks]),
            cache_path: self.cache_path(volume, snapshot),
            key,
        }))
    }
}

/// Changed blocks between two hash lists, as extents of a target of `size` bytes.
fn compare(target: &[BlockId], base: Option<&[BlockId]>, size: u64) -> Diff {
    let zero = cache::zero_hash();
    let mut diff = Diff::default();
    for (i, h) in target.iter().enumerate() {
        let old = base.and_then(|b| b.get(i)).unwrap_or(&zero);
        if base.is_some() && old == h {
            continue;
        }
        let off = i as u64 * HASH_BLOCK_SIZE;
        let e = Extent::new(off, HASH_BLOCK_SIZE.min(size - off));
        if *h == zero {
            if base.is_some() {
                diff.zero.push(e);
            }
        } else {
            diff.data.push(e);
        }
    }
    diff
}

struct RawReader {
    file: File,
    path: PathBuf,
    observed: Option<Vec<Option<BlockId>>>,
    cache_path: PathBuf,
    key: FileKey,
}

impl SnapshotReader for RawReader {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.key.size;
        let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        if avail > 0 {
            self.file
                .read_exact_at(&mut buf[..avail], offset)
                .map_err(|e| {
                    StoreError::io(format!("read {} at {offset}", self.path.display()), e)
                })?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    fn observe_block(&mut self, offset: u64, len: usize, id: &BlockId) {
        if let Some(obs) = self.observed.as_mut() {
            if len as u64 == HASH_BLOCK_SIZE && offset.is_multiple_of(HASH_BLOCK_SIZE) {
                if let Some(slot) = obs.get_mut((offset / HASH_BLOCK_SIZE) as usize) {
                    *slot = Some(*id);
                }
            }
        }
    }

    fn finish(self: Box<Self>) -> Result<()> {
        if let Some(obs) = self.observed {
            if obs.iter().all(Option::is_some) {
                // Only trust what we saw if the file did not change while we read it.
                if FileKey::of(&self.path).ok().as_ref() == Some(&self.key) {
                    let hashes: Vec<BlockId> = obs.into_iter().flatten().collect();
                    cache::store(&self.cache_path, &self.key, &hashes);
                }
            }
        }
        Ok(())
    }
}
