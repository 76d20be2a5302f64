//! The `raw:` store: a directory of raw disk images, `DIR/<volume>/<snapshot>.img`, or
//! with [`Layout::BySnapshot`] `DIR/<snapshot>/<volume>.img` (a directory of btrfs
//! read-only subvolume snapshots, say).
//!
//! Raw images carry no metadata to diff with, but the file system may: two images that
//! share extents on a copy-on-write file system (btrfs snapshots, `cp --reflink` on
//! btrfs or XFS) differ only where their extent maps do, so an incremental first asks
//! FIEMAP (see `extents` and `shared`) and reads only what the maps cannot vouch for.
//! Otherwise differences are found by hashing fixed 64 KiB blocks (BLAKE3) and
//! comparing. Hashing a large image is the expensive part, so
//! each image's block hashes are cached in `DIR/.snapsync/hashes/`, keyed by the file's
//! size, modification and change times, inode and device: any write to the image changes
//! its ctime, so a changed file is never trusted. The cache is also filled for free when
//! the engine reads a whole image and reports the hashes it computed
//! ([`SnapshotReader::observe_block`]), so a full replication followed by an incremental
//! reads each image once.
//!
//! A snapshot's age is when it was made: the birth time of its image (or, by snapshot,
//! of its snapshot directory) where the file system records one, else the modification
//! time (see [`AgeFrom`]). Its identity is derived from this store's system id (a random
//! id kept in `DIR/.snapsync/system-id`, so it survives moving the directory), the
//! volume, the name and the image's modification time: any write to an image gives it
//! a new identity, so a modified base is never diffed against as if it were the one
//! replicated (a birth time survives writes).

mod cache;
mod extents;
mod shared;
mod sys;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rayon::prelude::*;
use snapsync_core::{
    validate_name, BlockId, Extent, ExtentList, SnapshotId, SnapshotInfo, Timestamp, VolumeInfo,
};
use snapsync_store::{
    Diff, DiffMethod, Result, Skipped, SnapshotReader, SnapshotRef, SnapshotSource, Store,
    StoreError,
};

use cache::{CacheReader, CacheWriter};
pub use cache::{FileKey, HASH_BLOCK_SIZE};
pub use extents::{compare as compare_extent_maps, ExtentDiff, FileMap, MappedExtent};

/// A directory of raw images.
#[derive(Debug, Clone)]
pub struct RawStore {
    root: PathBuf,
    layout: Layout,
}

/// How images are laid out in the directory (`raw:DIR?layout=...`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// `DIR/<volume>/<snapshot>.img`: the default.
    #[default]
    ByVolume,
    /// `DIR/<snapshot>/<volume>.img`: one directory per snapshot, as file system
    /// snapshots of a directory of images come.
    BySnapshot,
}

/// Where a snapshot's age comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgeFrom {
    /// The birth time (statx `btime`) of the image, or of its snapshot directory (for a
    /// btrfs snapshot, the subvolume's creation time).
    Btime,
    /// The image's (or directory's) modification time: no birth time is recorded, or
    /// the modification time is older than it (a copy that kept its original's times,
    /// `cp -p`, `touch -d`: the content is older than the file).
    Mtime,
}

impl AgeFrom {
    /// The name used in `list --json` (`"age_from"`).
    pub fn as_str(self) -> &'static str {
        match self {
            AgeFrom::Btime => "btime",
            AgeFrom::Mtime => "mtime",
        }
    }
}

/// What a scan found, and what it left out and why.
type Listed<T> = (Vec<T>, Vec<Skipped>);

const META_DIR: &str = ".snapsync";
const IMAGE_EXT: &str = "img";

/// The age of an image file, and where it came from. A birth time is the better age
/// (a snapshot's content is as old as the snapshot), unless the modification time is
/// older: a file cannot be written before it exists, so then its times were carried
/// over from an original (`cp -p`, `touch -d`), and those are its content's age.
fn file_age(md: &std::fs::Metadata) -> std::io::Result<(SystemTime, AgeFrom)> {
    let mtime = md.modified()?;
    Ok(match md.created() {
        Ok(b) if b <= mtime => (b, AgeFrom::Btime),
        _ => (mtime, AgeFrom::Mtime),
    })
}

/// The age of a snapshot directory: a btrfs subvolume's creation time (its root
/// directory's own times are its source's, copied), else the directory's birth time,
/// else its modification time.
fn dir_age(dir: &Path) -> std::io::Result<(SystemTime, AgeFrom)> {
    let f = File::open(dir)?;
    if let Some(t) = sys::subvolume_birth(&f) {
        return Ok((t, AgeFrom::Btime));
    }
    let md = f.metadata()?;
    Ok(match md.created() {
        Ok(b) => (b, AgeFrom::Btime),
        Err(_) => (md.modified()?, AgeFrom::Mtime),
    })
}

impl RawStore {
    /// Open the directory `root`, laid out by volume; it must exist.
    pub fn open(root: &Path) -> Result<Self> {
        Self::open_with_layout(root, Layout::ByVolume)
    }

    /// Open the directory `root` with the given layout; it must exist.
    pub fn open_with_layout(root: &Path, layout: Layout) -> Result<Self> {
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
            layout,
        })
    }

    /// The layout it was opened with.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Where the image of `volume@snapshot` lies, whether or not it exists.
    fn layout_path(&self, volume: &str, snapshot: &str) -> PathBuf {
        match self.layout {
            Layout::ByVolume => self
                .root
                .join(volume)
                .join(format!("{snapshot}.{IMAGE_EXT}")),
            Layout::BySnapshot => self
                .root
                .join(snapshot)
                .join(format!("{volume}.{IMAGE_EXT}")),
        }
    }

    /// Where a snapshot's age comes from (see [`AgeFrom`]).
    pub fn age_from(&self, volume: &str, snapshot: &str) -> Result<AgeFrom> {
        let path = self.image_path(volume, snapshot)?;
        Ok(self.age(&path)?.1)
    }

    /// The age of the snapshot whose image is `path`.
    fn age(&self, path: &Path) -> Result<(Timestamp, AgeFrom)> {
        let of = match self.layout {
            Layout::ByVolume => path,
            Layout::BySnapshot => path.parent().unwrap_or(path),
        };
        let age = match self.layout {
            Layout::ByVolume => std::fs::metadata(of).and_then(|md| file_age(&md)),
            Layout::BySnapshot => dir_age(of),
        };
        let (t, from) = age.map_err(|e| StoreError::io(format!("age of {}", of.display()), e))?;
        Ok((Timestamp::from_system_time(t), from))
    }

    fn image_path(&self, volume: &str, snapshot: &str) -> Result<PathBuf> {
        validate_name("volume", volume)?;
        validate_name("snapshot", snapshot)?;
        let p = self.layout_path(volume, snapshot);
        if !p.is_file() {
            return Err(StoreError::not_found(format!(
                "snapshot {} ({})",
                snapsync_core::quote_snapshot(volume, snapshot),
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

    /// The snapshot name an image file name stands for: `None` when it is no image
    /// (not `*.img`, or hidden: a download in progress, an editor's copy), an error
    /// (why it cannot be listed) when it looks like one but names nothing valid.
    fn image_stem(path: &Path, what: &'static str) -> Option<std::result::Result<String, Skipped>> {
        let file_name = path.file_name()?.to_string_lossy().into_owned();
        let stem = file_name.strip_suffix(&format!(".{IMAGE_EXT}"))?;
        if stem.starts_with('.') {
            return None;
        }
        let skipped = |reason: String| Some(Err(Skipped::new(path.display().to_string(), reason)));
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(&format!(".{IMAGE_EXT}")))
        else {
            return skipped(format!(
                "the file name is not valid UTF-8, so it cannot be a {what} name"
            ));
        };
        if let Err(e) = validate_name(what, name) {
            return skipped(e.to_string());
        }
        Some(Ok(name.to_string()))
    }

    /// The snapshot `volume@name` whose image is `path`, or what is wrong with it.
    fn listed_snapshot(
        &self,
        system: &str,
        volume: &str,
        name: &str,
        path: &Path,
    ) -> Result<std::result::Result<SnapshotInfo, Skipped>> {
        let md = std::fs::metadata(path)
            .map_err(|e| StoreError::io(format!("stat {}", path.display()), e))?;
        if !md.is_file() {
            return Ok(Err(Skipped::new(
                path.display().to_string(),
                "not a regular file",
            )));
        }
        let mtime = Timestamp::from_system_time(
            md.modified()
                .map_err(|e| StoreError::io(format!("mtime of {}", path.display()), e))?,
        );
        let (created, _) = self.age(path)?;
        Ok(Ok(SnapshotInfo {
            name: name.to_string(),
            // From the modification time, not the age: a write gives a new identity.
            id: SnapshotId::derive(system, volume, name, mtime),
            created,
            size: md.len(),
        }))
    }

    /// The directories directly in the root that can be volumes (or, by snapshot,
    /// snapshots), by name; what was left out and why.
    fn top_dirs(&self, what: &'static str) -> Result<Listed<(String, PathBuf)>> {
        let listing_error = |e| StoreError::io(format!("list {}", self.root.display()), e);
        let (mut dirs, mut skipped) = (Vec::new(), Vec::new());
        for entry in std::fs::read_dir(&self.root).map_err(listing_error)? {
            let entry = entry.map_err(listing_error)?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !path.is_dir() {
                if name.ends_with(&format!(".{IMAGE_EXT}")) && !name.starts_with('.') {
                    skipped.push(Skipped::new(
                        path.display().to_string(),
                        match self.layout {
                            Layout::ByVolume => "an image directly in the store directory; a raw store holds images as VOLUME/SNAPSHOT.img",
                            Layout::BySnapshot => "an image directly in the store directory; a raw store laid out by snapshot holds images as SNAPSHOT/VOLUME.img",
                        },
                    ));
                }
                continue;
            }
            match entry.file_name().to_str().map(|n| validate_name(what, n)) {
                Some(Ok(())) => dirs.push((name, path)),
                Some(Err(e)) => {
                    skipped.push(Skipped::new(path.display().to_string(), e.to_string()))
                }
                None => skipped.push(Skipped::new(
                    path.display().to_string(),
                    format!("the directory name is not valid UTF-8, so it cannot be a {what} name"),
                )),
            }
        }
        Ok((dirs, skipped))
    }

    /// The entries of `dir`; none when it is missing and `missing_ok`.
    fn dir_entries(dir: &Path, missing_ok: bool) -> Result<Vec<PathBuf>> {
        let dir_error = |e| StoreError::io(format!("list {}", dir.display()), e);
        match std::fs::read_dir(dir) {
            Err(e) if missing_ok && e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            files => files
                .map_err(dir_error)?
                .map(|f| f.map(|f| f.path()))
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(dir_error),
        }
    }

    /// Every image as `(volume, snapshot, path)` (only `only`'s when given), and what
    /// was left out and why.
    fn images(&self, only: Option<&str>) -> Result<Listed<(String, String, PathBuf)>> {
        let mut images = Vec::new();
        match self.layout {
            Layout::ByVolume => {
                let (dirs, mut skipped) = match only {
                    Some(v) => (vec![(v.to_string(), self.root.join(v))], Vec::new()),
                    None => self.top_dirs("volume")?,
                };
                for (volume, dir) in dirs {
                    for path in Self::dir_entries(&dir, only.is_some())? {
                        match Self::image_stem(&path, "snapshot") {
                            Some(Ok(name)) => images.push((volume.clone(), name, path)),
                            Some(Err(s)) => skipped.push(s),
                            None => {}
                        }
                    }
                }
                Ok((images, skipped))
            }
            Layout::BySnapshot => {
                let (dirs, mut skipped) = self.top_dirs("snapshot")?;
                for (snapshot, dir) in dirs {
                    if let Some(v) = only {
                        let path = dir.join(format!("{v}.{IMAGE_EXT}"));
                        if path.exists() {
                            images.push((v.to_string(), snapshot, path));
                        }
                        continue;
                    }
                    for path in Self::dir_entries(&dir, false)? {
                        match Self::image_stem(&path, "volume") {
                            Some(Ok(volume)) => images.push((volume, snapshot.clone(), path)),
                            Some(Err(s)) => skipped.push(s),
                            None => {}
                        }
                    }
                }
                Ok((images, skipped))
            }
        }
    }

    /// Every volume (or only `only`), and what was left out of them and why.
    fn scan(&self, only: Option<&str>) -> Result<(Vec<VolumeInfo>, Vec<Skipped>)> {
        if let Some(v) = only {
            validate_name("volume", v)?;
        }
        let system = self.system_id()?;
        let (images, mut skipped) = self.images(only)?;
        let mut by_volume: std::collections::BTreeMap<String, Vec<SnapshotInfo>> =
            std::collections::BTreeMap::new();
        for (volume, name, path) in images {
            match self.listed_snapshot(&system, &volume, &name, &path)? {
                Ok(info) => by_volume.entry(volume).or_default().push(info),
                Err(s) => skipped.push(s),
            }
        }
        let volumes = by_volume
            .into_iter()
            .map(|(name, mut snapshots)| {
                snapshots.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
                VolumeInfo {
                    size: snapshots.last().map_or(0, |s| s.size),
                    name,
                    snapshots,
                    origin: None,
                }
            })
            .collect();
        skipped.sort_by(|a, b| a.what.cmp(&b.what));
        Ok((volumes, skipped))
    }

    /// Hand the block hashes of one image to `f`, in order and a chunk at a time: from
    /// its cache, or by hashing the image (and caching the hashes on the way).
    fn for_each_hash(
        &self,
        volume: &str,
        snapshot: &str,
        mut f: impl FnMut(&[BlockId]) -> Result<()>,
    ) -> Result<()> {
        let path = self.image_path(volume, snapshot)?;
        let key = FileKey::of(&path)?;
        let cache_path = self.cache_path(volume, snapshot);
        if let Some(mut cached) = CacheReader::open(&cache_path, &key) {
            let mut chunk = vec![BlockId([0; 32]); cache::READ_CHUNK];
            while cached.remaining() > 0 {
                let n = cached.remaining().min(chunk.len() as u64) as usize;
                cached.read(&mut chunk[..n], &cache_path)?;
                f(&chunk[..n])?;
            }
            return Ok(());
        }
        let mut writer = CacheWriter::create(&cache_path, &key);
        hash_image(&path, key.size, |hashes| {
            if let Some(w) = writer.as_mut() {
                w.push(hashes);
            }
            f(hashes)
        })?;
        if let Some(w) = writer {
            w.finish();
        }
        Ok(())
    }

    /// The hashes of a base image, to be read along with its target's.
    fn base_hashes(&self, volume: &str, snapshot: &str) -> Result<BaseHashes> {
        let path = self.image_path(volume, snapshot)?;
        let cache_path = self.cache_path(volume, snapshot);
        let open = || -> Result<Option<CacheReader>> {
            Ok(CacheReader::open(&cache_path, &FileKey::of(&path)?))
        };
        if let Some(r) = open()? {
            return Ok(BaseHashes::Cached(r, cache_path));
        }
        // Hashed (and cached) first, then read back from the cache; kept in memory only
        // when the cache cannot be written.
        let mut all = Vec::new();
        self.for_each_hash(volume, snapshot, |h| {
            all.extend_from_slice(h);
            Ok(())
        })?;
        Ok(match open()? {
            Some(r) => BaseHashes::Cached(r, cache_path),
            None => BaseHashes::InMemory(all.into_iter()),
        })
    }
}

/// A base image's hashes, read in step with its target's.
enum BaseHashes {
    Cached(CacheReader, PathBuf),
    InMemory(std::vec::IntoIter<BlockId>),
}

impl BaseHashes {
    /// The next `out.len()` hashes; past the base's end, the hash of a zero block (a
    /// grown volume reads as zero-extended).
    fn read(&mut self, out: &mut [BlockId]) -> Result<()> {
        let zero = cache::zero_hash();
        match self {
            BaseHashes::Cached(r, path) => {
                let n = r.remaining().min(out.len() as u64) as usize;
                r.read(&mut out[..n], path)?;
                out[n..].fill(zero);
            }
            BaseHashes::InMemory(it) => {
                for h in out.iter_mut() {
                    *h = it.next().unwrap_or(zero);
                }
            }
        }
        Ok(())
    }
}

/// Builds a [`Diff`] from hashes fed in block order.
struct Compare {
    size: u64,
    next: u64,
    base: Option<BaseHashes>,
    base_chunk: Vec<BlockId>,
    diff: Diff,
}

impl Compare {
    fn new(size: u64, base: Option<BaseHashes>) -> Self {
        Self {
            size,
            next: 0,
            base,
            base_chunk: Vec::new(),
            diff: Diff {
                method: DiffMethod::Hash,
                ..Diff::default()
            },
        }
    }

    /// The target's next hashes: changed blocks become extents (data, or zero when the
    /// block is zero now); without a base, every data block is.
    fn feed(&mut self, target: &[BlockId]) -> Result<()> {
        let zero = cache::zero_hash();
        if let Some(base) = self.base.as_mut() {
            self.base_chunk.resize(target.len(), zero);
            base.read(&mut self.base_chunk)?;
        }
        for (k, h) in target.iter().enumerate() {
            let i = self.next + k as u64;
            if self.base.is_some() && self.base_chunk[k] == *h {
                continue;
            }
            let off = i * HASH_BLOCK_SIZE;
            let e = Extent::new(off, HASH_BLOCK_SIZE.min(self.size - off));
            if *h == zero {
                if self.base.is_some() {
                    self.diff.zero.push(e);
                }
            } else {
                self.diff.data.push(e);
            }
        }
        self.next += target.len() as u64;
        Ok(())
    }
}

/// Hash an image in [`HASH_BLOCK_SIZE`] blocks: [`READERS`] threads read alternate
/// chunks, hashing runs on all cores, overlapped through small channels. The hashes go
/// to `f` a chunk at a time, in order.
fn hash_image(path: &Path, size: u64, mut f: impl FnMut(&[BlockId]) -> Result<()>) -> Result<()> {
    // Still long sequential reads, and 32 blocks a chunk to spread over the cores; the
    // few chunks in flight (about 2 per reader) stay small next to what follows the
    // hashing.
    const CHUNK: u64 = 2 << 20;
    // One read at a time left a fast disk idle between requests: measured cold on a
    // 1 GiB image, 2 MiB reads one after another took 0.68 s, two streams of them
    // 0.38 s (as fast as `b3sum`, which maps the file and faults it in on all cores).
    const READERS: u64 = 2;
    let file =
        File::open(path).map_err(|e| StoreError::io(format!("open {}", path.display()), e))?;
    let chunks = size.div_ceil(CHUNK);
    std::thread::scope(|s| -> Result<()> {
        // Buffers go back to the readers: no fresh allocation (and page faults) per chunk.
        let (give_back, recycled) = crossbeam_channel::bounded::<Vec<u8>>(4);
        let mut from_reader = Vec::new();
        for first in 0..READERS {
            let (tx, rx) = crossbeam_channel::bounded::<Result<Vec<u8>>>(1);
            from_reader.push(rx);
            let (file, recycled) = (&file, recycled.clone());
            s.spawn(move || {
                for k in (first..chunks).step_by(READERS as usize) {
                    let off = k * CHUNK;
                    let mut buf = recycled.try_recv().unwrap_or_default();
                    buf.resize((size - off).min(CHUNK) as usize, 0);
                    let r = file.read_exact_at(&mut buf, off).map_err(|e| {
                        StoreError::io(format!("read {} at {off}", path.display()), e)
                    });
                    let failed = r.is_err();
                    if tx.send(r.map(|_| buf)).is_err() || failed {
                        return;
                    }
                }
            });
        }
        let mut hashes = Vec::with_capacity((CHUNK / HASH_BLOCK_SIZE) as usize);
        for k in 0..chunks {
            // In order: chunk k comes from reader k mod READERS. A reader that stops
            // early sends its error first; one gone without a word is an error too,
            // never a shorter list of hashes.
            let chunk = from_reader[(k % READERS) as usize].recv().map_err(|_| {
                StoreError::io(
                    format!("read {} at {}", path.display(), k * CHUNK),
                    std::io::Error::other("the reading thread stopped"),
                )
            })??;
            hashes.clear();
            hashes.par_extend(
                chunk
                    .par_chunks(HASH_BLOCK_SIZE as usize)
                    .map(cache::hash_block),
            );
            let _ = give_back.try_send(chunk);
            f(&hashes)?;
        }
        Ok(())
    })
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
        let fresh = snapsync_store::random_id();
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
        Ok(self.scan(None)?.0)
    }

    fn skipped(&self) -> Result<Vec<Skipped>> {
        Ok(self.scan(None)?.1)
    }

    /// Only the one directory is read: the engine asks again for each snapshot it has
    /// read, to see that the image did not change meanwhile.
    fn volume(&self, volume: &str) -> Result<VolumeInfo> {
        self.scan(Some(volume))?
            .0
            .pop()
            .ok_or_else(|| StoreError::NotFound {
                what: format!("volume {volume:?} in {}", self.location()),
            })
    }
}

impl SnapshotSource for RawStore {
    fn local_files(&self, volume: &str, snapshot: &str) -> Result<Vec<PathBuf>> {
        Ok(vec![self.image_path(volume, snapshot)?])
    }

    /// With a base on the same copy-on-write file system, from the two images' extent
    /// maps; otherwise (or when the maps leave any doubt) by hashing.
    fn diff(&self, volume: &str, target: &str, base: Option<SnapshotRef<'_>>) -> Result<Diff> {
        let tpath = self.image_path(volume, target)?;
        let key = FileKey::of(&tpath)?;
        let Some(base) = base else {
            // Without a base, cached hashes tell zero blocks apart for free; without a
            // cache, report everything rather than read the image twice.
            if CacheReader::open(&self.cache_path(volume, target), &key).is_none() {
                return Ok(Diff {
                    data: ExtentList::from_extents([Extent::new(0, key.size)]),
                    zero: ExtentList::new(),
                    method: DiffMethod::Full,
                });
            }
            let mut cmp = Compare::new(key.size, None);
            self.for_each_hash(volume, target, |h| cmp.feed(h))?;
            return Ok(cmp.diff);
        };
        let bpath = self.image_path(base.volume, base.snapshot)?;
        if let Some(d) = shared::diff(&bpath, &tpath)? {
            return Ok(d);
        }
        // Both images' hashes are read in step, a chunk at a time.
        let base = self.base_hashes(base.volume, base.snapshot)?;
        let mut cmp = Compare::new(key.size, Some(base));
        self.for_each_hash(volume, target, |h| cmp.feed(h))?;
        Ok(cmp.diff)
    }

    fn open_snapshot(&self, volume: &str, snapshot: &str) -> Result<Box<dyn SnapshotReader + '_>> {
        let path = self.image_path(volume, snapshot)?;
        let key = FileKey::of(&path)?;
        let file =
            File::open(&path).map_err(|e| StoreError::io(format!("open {}", path.display()), e))?;
        Ok(Box::new(RawReader {
            file,
            path,
            cache_path: self.cache_path(volume, snapshot),
            observed: Observed::NotYet,
            next: 0,
            key,
        }))
    }
}

/// Where a reader stands with the image's hash cache.
enum Observed {
    /// Nothing observed yet. Opening stays cheap: a reader that is only read from (a
    /// server answering one read request of a remote engine) never checks the cache
    /// nor creates one.
    NotYet,
    /// Filling a new cache from the engine's hashes.
    Filling(Box<CacheWriter>),
    /// A valid cache exists, or this pass does not cover the image in order.
    Off,
}

struct RawReader {
    file: File,
    path: PathBuf,
    cache_path: PathBuf,
    /// The hash cache being filled from the hashes the engine computed, while it reads
    /// the image block after block.
    observed: Observed,
    /// The next block the cache needs.
    next: u64,
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
        let in_order = len as u64 == HASH_BLOCK_SIZE && offset == self.next * HASH_BLOCK_SIZE;
        if matches!(self.observed, Observed::NotYet) {
            let wanted = in_order && CacheReader::open(&self.cache_path, &self.key).is_none();
            self.observed = match wanted.then(|| CacheWriter::create(&self.cache_path, &self.key)) {
                Some(Some(w)) => Observed::Filling(Box::new(w)),
                _ => Observed::Off,
            };
        }
        if let Observed::Filling(w) = &mut self.observed {
            if in_order {
                w.push(std::slice::from_ref(id));
                self.next += 1;
            } else {
                // Not the whole image in order (another block size, or only some
                // extents): no cache from this pass.
                self.observed = Observed::Off;
            }
        }
    }

    fn finish(self: Box<Self>) -> Result<()> {
        // A raw image has no snapshot semantics of its own: if anything wrote to it
        // while it was read, what was read is no point in time of it. Its size, times,
        // inode and device must be as they were when it was opened.
        let now = FileKey::of(&self.path)?;
        if now != self.key {
            return Err(StoreError::Conflict {
                what: format!(
                    "{} changed while it was read ({}); nothing of it is committed: replicate again once nothing writes to it",
                    self.path.display(),
                    self.key.change_to(&now)
                ),
            });
        }
        if let Observed::Filling(w) = self.observed {
            w.finish();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store with one image `vm/s1` of `blocks` blocks, every third one zero.
    fn store(blocks: u64) -> (tempfile::TempDir, RawStore, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("vm")).unwrap();
        let mut img = vec![0u8; (blocks * HASH_BLOCK_SIZE) as usize];
        for (i, b) in img.chunks_mut(HASH_BLOCK_SIZE as usize).enumerate() {
            if i % 3 != 0 {
                b.fill(i as u8);
            }
        }
        std::fs::write(dir.path().join("vm/s1.img"), &img).unwrap();
        let store = RawStore::open(dir.path()).unwrap();
        (dir, store, img)
    }

    #[test]
    fn a_reader_refuses_to_finish_when_the_image_changed_while_it_was_read() {
        use std::io::Write;
        let (dir, store, img) = store(4);
        let mut reader = store.open_snapshot("vm", "s1").unwrap();
        let mut buf = vec![0u8; img.len()];
        reader.read_at(0, &mut buf).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("vm/s1.img"))
            .unwrap()
            .write_all(b"late")
            .unwrap();
        let err = reader.finish().unwrap_err().to_string();
        assert!(
            err.contains("changed while it was read") && err.contains("size"),
            "{err}"
        );
        // Unchanged, it finishes.
        let reader = store.open_snapshot("vm", "s1").unwrap();
        reader.finish().unwrap();
    }

    #[test]
    fn an_image_is_hashed_in_order_by_every_reader() {
        // Five whole 2 MiB chunks and a short one, so every reader reads several chunks
        // and the last block is partial.
        let len = 5 * (2 << 20) + 3 * HASH_BLOCK_SIZE as usize + 1234;
        let img = snapsync_store::sample::pseudo_random(7, len);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, &img).unwrap();
        let mut hashes = Vec::new();
        hash_image(&path, len as u64, |h| {
            hashes.extend_from_slice(h);
            Ok(())
        })
        .unwrap();
        let expected: Vec<BlockId> = img
            .chunks(HASH_BLOCK_SIZE as usize)
            .map(cache::hash_block)
            .collect();
        assert_eq!(hashes, expected);
        // An image shorter than it claims is an error, not a shorter list.
        let e = hash_image(&path, len as u64 + (8 << 20), |_| Ok(())).unwrap_err();
        assert!(e.to_string().contains("read"), "{e}");
    }

    fn read_observing(store: &RawStore, img: &[u8], order: &[u64]) {
        let mut r = store.open_snapshot("vm", "s1").unwrap();
        let mut buf = vec![0u8; HASH_BLOCK_SIZE as usize];
        for &i in order {
            r.read_at(i * HASH_BLOCK_SIZE, &mut buf).unwrap();
            assert_eq!(
                &buf[..],
                &img[(i * HASH_BLOCK_SIZE) as usize..][..buf.len()]
            );
            r.observe_block(i * HASH_BLOCK_SIZE, buf.len(), &BlockId::of(&buf));
        }
        r.finish().unwrap();
    }

    #[test]
    fn a_whole_pass_in_order_fills_the_cache() {
        let (_dir, store, img) = store(7);
        let cache = store.cache_path("vm", "s1");
        let key = FileKey::of(&store.image_path("vm", "s1").unwrap()).unwrap();
        // Without a cache, everything is reported; out of order or partial passes
        // leave none.
        let all = store.diff("vm", "s1", None).unwrap();
        assert_eq!(all.data.total_len(), 7 * HASH_BLOCK_SIZE);
        read_observing(&store, &img, &[0, 1, 2, 4, 3, 5, 6]);
        read_observing(&store, &img, &[0, 1, 2]);
        assert!(CacheReader::open(&cache, &key).is_none());
        read_observing(&store, &img, &[0, 1, 2, 3, 4, 5, 6]);
        assert!(CacheReader::open(&cache, &key).is_some());
        // Now zero blocks are told apart without reading the image.
        let d = store.diff("vm", "s1", None).unwrap();
        assert_eq!(d.data.total_len(), 4 * HASH_BLOCK_SIZE);
        assert!(!d.data.covers(3 * HASH_BLOCK_SIZE, 1));
    }

    #[test]
    fn reading_without_observing_neither_checks_nor_creates_a_cache() {
        let (_dir, store, img) = store(4);
        let cache = store.cache_path("vm", "s1");
        let mut r = store.open_snapshot("vm", "s1").unwrap();
        let mut buf = vec![0u8; HASH_BLOCK_SIZE as usize];
        r.read_at(HASH_BLOCK_SIZE, &mut buf).unwrap();
        assert_eq!(&buf[..], &img[HASH_BLOCK_SIZE as usize..][..buf.len()]);
        // Checked while the reader is open: a cache being written is a temporary file.
        let dir = cache.parent().unwrap();
        let made: Vec<_> = std::fs::read_dir(dir)
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert!(made.is_empty(), "files made in {}: {made:?}", dir.display());
        r.finish().unwrap();
        assert!(!cache.exists());
    }
}
