//! [`Qcow2Store`]: qcow2 images as a snapsync storage system (`qcow2:///ABS/PATH`), a
//! replication source.
//!
//! # What is a volume, what is a snapshot
//!
//! The URL names one image or a directory of images.
//!
//! - **One image**: one volume, named after the file stem (`vm.qcow2` is `vm`).
//! - **A directory**: every qcow2 file in it that no other file in it uses as a backing
//!   file (a *top* image) is a volume, named after its stem. Files that are backing
//!   files of another image are not volumes of their own but snapshots (below).
//!   Files that are neither qcow2 nor anyone's backing file are ignored, as are hidden
//!   files. Two tops with the same (sanitised) stem are refused.
//!
//! A volume's snapshots are:
//!
//! - **Internal snapshots** of the top image (`qemu-img snapshot -c`, `savevm`). The
//!   age is the snapshot's date (seconds and nanoseconds); the size its `disk_size`.
//!   Internal snapshots of backing layers are not listed: a guest never sees them.
//! - **Backing layers** below the top (libvirt external snapshots, `base <- s1 <- top`):
//!   layer `k` is the point in time when it was the active image, its content the chain
//!   up to it (a raw bottom layer included), its name the file stem and its size the
//!   layer's virtual size. Its age is the file's mtime, forced strictly increasing up
//!   the chain (`max(mtime, age of the layer below + 1 ns)`): a backing file is no
//!   longer written once an overlay is on top, so its mtime is when that snapshot was
//!   taken, and forcing order keeps a touched lower file from sorting above its
//!   overlays.
//!
//! The top image's live state is not a snapshot and is never replicated: it may be in
//! use by a running guest. Snapshot names are sanitised to snapsync's name rules
//! (other characters become `_`), and a name already taken in the volume gets `+2`,
//! `+3`, ... appended (layers bottom-up first, then internal snapshots in table order).
//!
//! # Clones
//!
//! Two tops whose chains share a backing file are clones of the shared layer. The
//! shared layer is listed once, as a snapshot of the volume whose name sorts first
//! among the tops above it (the *owner*: deterministic and independent of mtimes or
//! the order files were created in); every other such volume lists only its own layers
//! above the branch point and names the topmost shared layer as its
//! [`VolumeInfo::origin`]. The engine then replicates the owner's snapshot first and
//! each clone as a delta against it. Adding a clone whose name sorts first moves the
//! ownership; identities do not depend on the owner (below), so the destination still
//! recognises the shared snapshot by identity.
//!
//! # Identities
//!
//! Every identity is derived from what the image files record about themselves, never
//! from where they are, so a moved or copied image (or directory) replicates
//! incrementally against what a destination already holds:
//!
//! - internal snapshot: image file name, the identity of its backing layer (the chain
//!   below is part of the content), and the snapshot's id, name, date and vm clock;
//! - backing layer: file name, file length, age, and the identity of the layer below.
//!
//! For the same reason [`Store::system_id`] is the constant `qcow2`: a path would change
//! when the images move, and a random id would need a file written next to an image.
//! Hints at a destination are always checked against these identities, so two qcow2
//! sources sharing the hint key cannot mistake one another's snapshots.
//!
//! # Differences, from metadata only
//!
//! - Two internal snapshots of the same image: [`Qcow2Image::diff`] (L1 entries that
//!   point at the same L2 table are skipped whole; L2 entries compared by host offset).
//! - Otherwise the two snapshots share a bottom part of their chains (a layer of the
//!   same volume, or a clone's parent): the difference is within the union of what the
//!   layers above the shared part allocate, on either side, each range tagged by the
//!   target's topmost layer covering it (data, or zero for zero clusters).
//!
//! Neither reads guest data; zero clusters and ranges that become unallocated (without
//! a backing file) are reported in [`Diff::zero`].
//!
//! Images must not be rewritten while a command runs, except the top image's live
//! state: QEMU copies a cluster before writing it while a snapshot still uses it, so a
//! running guest does not disturb its snapshots. Deleting a snapshot during a run does.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use snapsync_core::{
    validate_name, Extent, ExtentList, Origin, SnapshotId, SnapshotInfo, Timestamp, VolumeInfo,
};
use snapsync_store::{
    Diff, DiffMethod, Phase, Progress, Result, Skipped, SnapshotReader, SnapshotRef,
    SnapshotSource, Store, StoreError,
};

use crate::chain::{BackingRule, Chain, LayerFormat};
use crate::error::Qcow2Error;
use crate::extent::{DiffExtent, ExtentKind};
use crate::format::MAGIC;
use crate::image::View;
use crate::source::ReadAt;
use crate::writer::Qcow2Writer;

/// The system id of every qcow2 store, also the system part of every identity (see the
/// module documentation for why it is not a path).
const SYSTEM: &str = "qcow2";

/// A qcow2 image, or a directory of them, as a snapshot source.
#[derive(Debug)]
pub struct Qcow2Store {
    root: PathBuf,
    volumes: Vec<Vol>,
    listing: Vec<VolumeInfo>,
    /// Damaged snapshot table entries of the top images, left out of `listing`.
    skipped: Vec<Skipped>,
}

/// One volume: the chain below its top image, and where each snapshot is in it.
#[derive(Debug)]
struct Vol {
    name: String,
    chain: Chain,
    /// Canonical path of each layer, bottom first: equal paths are shared layers.
    canon: Vec<PathBuf>,
    points: HashMap<String, Point>,
}

/// A point in time of a chain: layers `0..=layer`, the top one seen in `view`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Point {
    layer: usize,
    view: View,
}

impl Point {
    fn view_at(&self, j: usize) -> View {
        if j == self.layer {
            self.view
        } else {
            View::Active
        }
    }
}

/// Age and identity of a backing layer, which depend only on the file and the chain
/// below it, so they are the same in every clone that shares it.
#[derive(Debug, Clone, Copy)]
struct LayerMeta {
    created: Timestamp,
    id: SnapshotId,
}

/// Map a reader error to the store's error, naming the image.
fn store_err(path: &Path, e: Qcow2Error) -> StoreError {
    let location = path.display().to_string();
    match e {
        Qcow2Error::Io { context, source } => StoreError::Io { context, source },
        Qcow2Error::Unsupported { feature } => StoreError::Unsupported {
            what: format!("{location} uses {feature}, which snapsync cannot read"),
        },
        Qcow2Error::BackingRefused {
            image,
            backing,
            reason,
        } => StoreError::Malformed {
            location: image,
            detail: format!("backing file {backing:?} is refused: {reason}"),
        },
        Qcow2Error::Malformed { what, offset } => StoreError::Malformed {
            // The reader already prefixes the path of the broken file (which may be a
            // backing file of `path`); keep whichever is more precise.
            detail: format!(
                "malformed qcow2 image: {} (at byte offset {offset})",
                what.strip_prefix(&format!("{location}: ")).unwrap_or(&what)
            ),
            location,
        },
        other => StoreError::Malformed {
            location,
            detail: other.to_string(),
        },
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::io(format!("{what} {}", path.display()), e)
}

/// `name` made acceptable to [`validate_name`]: other characters become `_`.
fn sanitize(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(190)
        .collect();
    if s.starts_with('.') || s.starts_with('-') {
        s.replace_range(..1, "_");
    }
    if s.is_empty() {
        s.push_str("unnamed");
    }
    s
}

/// `name`, or `name+2`, `name+3`, ... whichever is not yet taken; then taken.
fn unique(name: String, taken: &mut HashSet<String>) -> String {
    let mut candidate = name.clone();
    let mut n = 2;
    while taken.contains(&candidate) {
        candidate = format!("{name}+{n}");
        n += 1;
    }
    taken.insert(candidate.clone());
    candidate
}

fn stem(path: &Path) -> String {
    sanitize(
        &path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    )
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn is_qcow2(path: &Path) -> Result<bool> {
    let f = File::open(path).map_err(|e| io_err("open", path, e))?;
    let mut m = [0u8; 4];
    Ok(ReadAt::read_exact_at(&f, &mut m, 0).is_ok() && m == MAGIC)
}

/// The one-nanosecond-later timestamp.
fn next_nano(t: Timestamp) -> Timestamp {
    Timestamp::new(t.secs, t.nanos + 1)
}

/// How a [`Qcow2Store`] treats its images.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Qcow2Options {
    /// Let backing files lie anywhere (and be block devices) instead of inside the
    /// store's directory: for trusted images only (see [`BackingRule`]).
    pub backing_anywhere: bool,
}

impl Qcow2Options {
    /// Set [`Qcow2Options::backing_anywhere`].
    pub fn with_backing_anywhere(mut self, anywhere: bool) -> Self {
        self.backing_anywhere = anywhere;
        self
    }
}

impl Qcow2Store {
    /// [`Qcow2Store::open_with`] the default options: backing files confined to the
    /// store's directory.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, &Qcow2Options::default())
    }

    /// Open one image or a directory of images (see the module documentation), reading
    /// every header and snapshot table. Malformed or unsupported images are errors
    /// naming the image. Backing files must lie inside the directory (a single image's
    /// own directory) unless `options` allow any.
    pub fn open_with(path: &Path, options: &Qcow2Options) -> Result<Self> {
        let md = std::fs::metadata(path).map_err(|e| io_err("qcow2 store", path, e))?;
        let root = std::fs::canonicalize(path).map_err(|e| io_err("resolve", path, e))?;
        let directory = if md.is_dir() {
            root.clone()
        } else {
            root.parent().unwrap_or(Path::new("/")).to_path_buf()
        };
        let rule = if options.backing_anywhere {
            BackingRule::Any
        } else {
            BackingRule::Confined(directory)
        };
        let tops = if md.is_dir() {
            Self::find_tops(&root)?
        } else {
            if !md.is_file() {
                return Err(StoreError::Malformed {
                    location: root.display().to_string(),
                    detail: "not a regular file; a qcow2 store is an image or a directory of them"
                        .into(),
                });
            }
            if !is_qcow2(&root)? {
                return Err(StoreError::Malformed {
                    location: root.display().to_string(),
                    detail: "not a qcow2 image (bad magic)".into(),
                });
            }
            vec![root.clone()]
        };
        let mut by_name: BTreeMap<String, (PathBuf, Chain)> = BTreeMap::new();
        for top in tops {
            let chain = Chain::open(&top, &rule).map_err(|e| store_err(&top, e))?;
            let name = stem(&top);
            validate_name("volume", &name)?;
            if let Some((other, _)) = by_name.get(&name) {
                return Err(StoreError::Malformed {
                    location: root.display().to_string(),
                    detail: format!(
                        "{} and {} would both be volume {name:?}; rename one",
                        other.display(),
                        top.display()
                    ),
                });
            }
            by_name.insert(name, (top, chain));
        }
        let mut store = Qcow2Store {
            root,
            volumes: Vec::new(),
            listing: Vec::new(),
            skipped: Vec::new(),
        };
        store.build(by_name)?;
        Ok(store)
    }

    /// The qcow2 files of `dir` that are not a backing file of another one.
    fn find_tops(dir: &Path) -> Result<Vec<PathBuf>> {
        let mut images = Vec::new();
        let entries = std::fs::read_dir(dir).map_err(|e| io_err("list", dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_err("list", dir, e))?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') || !path.is_file() {
                continue;
            }
            if is_qcow2(&path)? {
                images.push(path);
            }
        }
        images.sort();
        let mut backing = HashSet::new();
        for img in &images {
            let opened = crate::Qcow2Image::open(img).map_err(|e| store_err(img, e))?;
            if let Some(b) = opened.backing_file() {
                let p = Path::new(b);
                let p = if p.is_absolute() {
                    p.to_path_buf()
                } else {
                    dir.join(p)
                };
                // A missing backing file is reported when the chain is opened.
                if let Ok(c) = std::fs::canonicalize(&p) {
                    backing.insert(c);
                }
            }
        }
        Ok(images
            .into_iter()
            .filter(|p| {
                std::fs::canonicalize(p)
                    .map(|c| !backing.contains(&c))
                    .unwrap_or(true)
            })
            .collect())
    }

    /// Assign snapshots, owners, ages and identities (see the module documentation).
    fn build(&mut self, by_name: BTreeMap<String, (PathBuf, Chain)>) -> Result<()> {
        let mut layer_meta: HashMap<PathBuf, LayerMeta> = HashMap::new();
        // Canonical layer path -> (owner volume, snapshot name there).
        let mut owner: HashMap<PathBuf, (String, String)> = HashMap::new();
        for (name, (top, chain)) in by_name {
            let mut canon = Vec::with_capacity(chain.layers().len());
            for l in chain.layers() {
                canon.push(
                    std::fs::canonicalize(&l.path).map_err(|e| io_err("resolve", &l.path, e))?,
                );
            }
            let n = canon.len();
            // Ages and identities of the backing layers, bottom-up.
            let mut below: Option<LayerMeta> = None;
            for (k, path) in canon.iter().enumerate().take(n - 1) {
                let meta = match layer_meta.get(path) {
                    Some(m) => *m,
                    None => {
                        let md = std::fs::metadata(path).map_err(|e| io_err("stat", path, e))?;
                        let mtime = Timestamp::from_system_time(
                            md.modified().map_err(|e| io_err("mtime of", path, e))?,
                        );
                        let created = match below {
                            Some(b) if mtime <= b.created => next_nano(b.created),
                            _ => mtime,
                        };
                        let key = format!(
                            "layer:{}:{}:{}",
                            file_name(&chain.layers()[k].path),
                            md.len(),
                            below.map_or_else(|| "-".to_string(), |b| b.id.to_hex())
                        );
                        let m = LayerMeta {
                            created,
                            id: SnapshotId::derive(SYSTEM, &key, &stem(path), created),
                        };
                        layer_meta.insert(path.clone(), m);
                        m
                    }
                };
                below = Some(meta);
            }
            let mut taken = HashSet::new();
            let mut snapshots = Vec::new();
            let mut points = HashMap::new();
            let mut origin = None;
            for (k, path) in canon.iter().enumerate().take(n - 1) {
                let meta = layer_meta[path];
                if let Some((ov, os)) = owner.get(path) {
                    // Owned by a volume sorting first: the topmost such is the origin.
                    origin = Some(Origin {
                        volume: ov.clone(),
                        snapshot: os.clone(),
                        id: meta.id,
                    });
                    continue;
                }
                let sname = unique(stem(path), &mut taken);
                owner.insert(path.clone(), (name.clone(), sname.clone()));
                points.insert(
                    sname.clone(),
                    Point {
                        layer: k,
                        view: View::Active,
                    },
                );
                snapshots.push(SnapshotInfo {
                    name: sname,
                    id: meta.id,
                    created: meta.created,
                    size: chain.layers()[k].virtual_size,
                });
            }
            if let Some(img) = chain.image(n - 1) {
                let key = format!(
                    "internal:{}:{}",
                    file_name(&top),
                    below.map_or_else(|| "-".to_string(), |b| b.id.to_hex())
                );
                for damaged in img.damaged_snapshots() {
                    self.skipped.push(Skipped::new(
                        format!(
                            "{} internal snapshot #{} (id {:?}, name {:?})",
                            top.display(),
                            damaged.index,
                            damaged.id,
                            damaged.name
                        ),
                        damaged.reason.clone(),
                    ));
                }
                for (i, sn) in img.snapshots().iter().enumerate() {
                    let created = Timestamp::new(i64::from(sn.date_sec), sn.date_nsec);
                    let sname = unique(sanitize(&sn.name), &mut taken);
                    let id = SnapshotId::derive(
                        SYSTEM,
                        &key,
                        &format!("{}\0{}\0{}", sn.id, sn.name, sn.vm_clock_nsec),
                        created,
                    );
                    points.insert(
                        sname.clone(),
                        Point {
                            layer: n - 1,
                            view: View::Snapshot(i),
                        },
                    );
                    snapshots.push(SnapshotInfo {
                        name: sname,
                        id,
                        created,
                        size: sn.disk_size,
                    });
                }
            }
            snapshots.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
            self.listing.push(VolumeInfo {
                name: name.clone(),
                size: chain.layers()[n - 1].virtual_size,
                snapshots,
                origin,
            });
            self.volumes.push(Vol {
                name,
                chain,
                canon,
                points,
            });
        }
        Ok(())
    }

    /// Metadata bytes read from every image so far (header, snapshot, L1 and L2 tables).
    pub fn metadata_bytes_read(&self) -> u64 {
        self.volumes
            .iter()
            .map(|v| v.chain.metadata_bytes_read())
            .sum()
    }

    /// Guest data bytes read from qcow2 layers so far (raw layers are not counted).
    pub fn data_bytes_read(&self) -> u64 {
        self.volumes
            .iter()
            .map(|v| {
                (0..v.canon.len())
                    .filter_map(|k| v.chain.image(k))
                    .map(crate::Qcow2Image::data_bytes_read)
                    .sum::<u64>()
            })
            .sum()
    }

    fn resolve(&self, volume: &str, snapshot: &str) -> Result<(&Vol, Point)> {
        validate_name("volume", volume)?;
        validate_name("snapshot", snapshot)?;
        let v = self
            .volumes
            .iter()
            .find(|v| v.name == volume)
            .ok_or_else(|| {
                StoreError::not_found(format!("volume {volume:?} in {}", self.location()))
            })?;
        let p = v.points.get(snapshot).ok_or_else(|| {
            StoreError::not_found(format!(
                "snapshot {} in {}",
                snapsync_core::quote_snapshot(volume, snapshot),
                self.location()
            ))
        })?;
        Ok((v, *p))
    }

    fn size(&self, v: &Vol, p: Point) -> Result<u64> {
        self.layer_size(v, p.layer, p.view)
    }

    fn layer_size(&self, v: &Vol, k: usize, view: View) -> Result<u64> {
        match (v.chain.image(k), view) {
            (Some(img), view) => img.view_size(view).map_err(|e| store_err(&v.canon[k], e)),
            (None, _) => Ok(v.chain.layers()[k].virtual_size),
        }
    }

    /// What layer `k` (in `view`) allocates itself: (data, zero).
    fn layer_alloc(&self, v: &Vol, k: usize, view: View) -> Result<(ExtentList, ExtentList)> {
        let ext = match v.chain.image(k) {
            Some(img) => img.allocated(view).map_err(|e| store_err(&v.canon[k], e))?,
            None => {
                debug_assert_eq!(v.chain.layers()[k].format, LayerFormat::Raw);
                vec![DiffExtent {
                    offset: 0,
                    len: v.chain.layers()[k].virtual_size,
                    kind: ExtentKind::Data,
                }]
            }
        };
        Ok(split(&ext))
    }

    /// The content of `p` from layer `from` up: (data, zero) tagged by the topmost layer
    /// covering each range, and the limit below which the layers under `from` show
    /// through (0 when `from` is 0).
    fn above(&self, v: &Vol, p: Point, from: usize) -> Result<(ExtentList, ExtentList, u64)> {
        let mut data = ExtentList::new();
        let mut zero = ExtentList::new();
        let mut covered = ExtentList::new();
        let mut visible = self.size(v, p)?;
        for j in (from..=p.layer).rev() {
            let view = p.view_at(j);
            visible = visible.min(self.layer_size(v, j, view)?);
            let (d, z) = self.layer_alloc(v, j, view)?;
            let (d, z) = (d.clip(visible), z.clip(visible));
            data = data.union(&d.subtract(&covered));
            zero = zero.union(&z.subtract(&covered));
            covered = covered.union(&d).union(&z);
        }
        let through = if from == 0 {
            0
        } else {
            visible.min(self.layer_size(v, from - 1, View::Active)?)
        };
        Ok((data, zero, through))
    }

    fn diff_points(&self, tv: &Vol, t: Point, base: Option<(&Vol, Point)>) -> Result<Diff> {
        let tsize = self.size(tv, t)?;
        let Some((bv, b)) = base else {
            let (data, zero, _) = self.above(tv, t, 0)?;
            return Ok(Diff {
                data,
                zero,
                method: DiffMethod::Metadata,
            });
        };
        let bsize = self.size(bv, b)?;
        // Bottom layers both points read alike: the same file, in its active state.
        let mut c = 0;
        while c <= t.layer
            && c <= b.layer
            && tv.canon[c] == bv.canon[c]
            && t.view_at(c) == View::Active
            && b.view_at(c) == View::Active
        {
            c += 1;
        }
        if c == t.layer && c == b.layer && tv.canon[c] == bv.canon[c] {
            // Two views (internal snapshots) of one image over the same backing chain.
            if let Some(img) = tv.chain.image(c) {
                let ext = img
                    .diff(t.view, Some(b.view))
                    .map_err(|e| store_err(&tv.canon[c], e))?;
                let (mut data, zero) = split(&ext);
                if c > 0 && tsize > bsize {
                    // Beyond the base's end the base reads zeros, while the target's
                    // unallocated clusters there read the backing file.
                    let below = self.layer_size(tv, c - 1, View::Active)?;
                    let grown = ExtentList::from_extents([Extent::new(
                        bsize,
                        below.min(tsize).saturating_sub(bsize),
                    )]);
                    data = data.union(&grown.subtract(&zero));
                }
                return Ok(Diff {
                    data,
                    zero,
                    method: DiffMethod::Metadata,
                });
            }
        }
        let (tdata, tzero, tthrough) = self.above(tv, t, c)?;
        let (bdata, bzero, bthrough) = self.above(bv, b, c)?;
        let tcov = tdata.union(&tzero);
        let lo = tthrough.min(bthrough);
        let hi = tthrough.max(bthrough);
        let candidates = tcov
            .union(&bdata)
            .union(&bzero)
            .union(&ExtentList::from_extents([Extent::new(lo, hi - lo)]))
            .clip(tsize);
        // Where no layer of the target above the shared part decides, the target reads
        // the shared layers (below `tthrough`) or zeros.
        let rest = candidates.subtract(&tcov);
        let shows_through = rest.clip(tthrough);
        Ok(Diff {
            data: tdata.union(&shows_through),
            zero: tzero.union(&rest.subtract(&shows_through)),
            method: DiffMethod::Metadata,
        })
    }
}

/// Split reader extents into (data, zero) extent lists.
fn split(ext: &[DiffExtent]) -> (ExtentList, ExtentList) {
    let mut data = ExtentList::new();
    let mut zero = ExtentList::new();
    for e in ext {
        let x = Extent::new(e.offset, e.len);
        match e.kind {
            ExtentKind::Data => data.push(x),
            ExtentKind::Zero => zero.push(x),
        }
    }
    (data, zero)
}

impl Store for Qcow2Store {
    fn location(&self) -> String {
        format!("qcow2://{}", self.root.display())
    }

    fn system_id(&self) -> Result<String> {
        Ok(SYSTEM.to_string())
    }

    fn list(&self) -> Result<Vec<VolumeInfo>> {
        Ok(self.listing.clone())
    }

    fn skipped(&self) -> Result<Vec<Skipped>> {
        Ok(self.skipped.clone())
    }
}

impl SnapshotSource for Qcow2Store {
    fn local_files(&self, volume: &str, snapshot: &str) -> Result<Vec<PathBuf>> {
        // The whole chain: a restore must not overwrite a layer any view reads.
        Ok(self.resolve(volume, snapshot)?.0.canon.clone())
    }

    fn diff(&self, volume: &str, target: &str, base: Option<SnapshotRef<'_>>) -> Result<Diff> {
        let (tv, t) = self.resolve(volume, target)?;
        let base = match base {
            Some(b) => Some(self.resolve(b.volume, b.snapshot)?),
            None => None,
        };
        self.diff_points(tv, t, base)
    }

    /// The exact size of the metadata diff: it reads only tables, which stay cached
    /// for the diff and the reads that follow.
    fn estimate_diff(&self, volume: &str, target: &str, base: SnapshotRef<'_>) -> Option<u64> {
        self.diff(volume, target, Some(base))
            .ok()
            .map(|d| d.changed().total_len())
    }

    fn open_snapshot(&self, volume: &str, snapshot: &str) -> Result<Box<dyn SnapshotReader + '_>> {
        let (v, p) = self.resolve(volume, snapshot)?;
        Ok(Box::new(Reader {
            size: self.size(v, p)?,
            vol: v,
            point: p,
        }))
    }
}

/// Reads one snapshot through its chain.
struct Reader<'a> {
    vol: &'a Vol,
    point: Point,
    size: u64,
}

impl SnapshotReader for Reader<'_> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let avail = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        if !head.is_empty() {
            self.vol
                .chain
                .read_view_at(self.point.layer, self.point.view, offset, head)
                .map_err(|e| store_err(&self.vol.canon[self.point.layer], e))?;
        }
        tail.fill(0);
        Ok(())
    }
}

/// What [`restore_qcow2`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Qcow2RestoreStats {
    /// Virtual size of the image (the snapshot's size rounded up to 512 bytes).
    pub size: u64,
    /// Guest bytes read from the source and handed to the writer.
    pub read_bytes: u64,
}

/// Write `volume@snapshot` of any source to a new qcow2 image at `output`: only the
/// extents the source reports as data are read (its metadata says where the rest is
/// zero), and all-zero clusters stay unallocated. `progress` is told the bytes to read
/// ([`Phase::Restore`]), then each amount read. On error the partial image is removed.
pub fn restore_qcow2(
    source: &dyn SnapshotSource,
    volume: &str,
    snapshot: &str,
    output: &Path,
    cluster_size: u64,
    progress: &dyn Progress,
) -> Result<Qcow2RestoreStats> {
    let info = source.snapshot_info(volume, snapshot)?;
    let diff = source.diff(volume, snapshot, None)?;
    let mut reader = source.open_snapshot(volume, snapshot)?;
    let out_err = |e: Qcow2Error| match e {
        Qcow2Error::Io { context, source } => StoreError::Io { context, source },
        other => StoreError::Backend {
            context: format!("writing {}", output.display()),
            source: Box::new(other),
        },
    };
    let output_file =
        snapsync_store::output::OutputFile::create(output, &source.local_files(volume, snapshot)?)
            .map_err(|e| StoreError::Io {
                context: format!("cannot restore to {}", output.display()),
                source: e,
            })?;
    let mut writer =
        Qcow2Writer::new(output_file.path(), info.size, cluster_size).map_err(out_err)?;
    let plan = diff.data.align(cluster_size, info.size);
    let to_read = plan.clip(info.size).total_len();
    progress.start(Phase::Restore { volume, snapshot }, to_read);
    let result: Result<Qcow2RestoreStats> = (|| {
        const CHUNK: u64 = 8 << 20;
        let chunk = CHUNK.max(cluster_size);
        let mut buf = Vec::new();
        let mut read_bytes = 0;
        for e in plan.as_slice() {
            let end = e.end().min(info.size);
            let mut off = e.offset;
            while off < end {
                let n = chunk.min(end - off);
                buf.resize(n as usize, 0);
                reader.read_at(off, &mut buf)?;
                writer.write_at(off, &buf).map_err(out_err)?;
                read_bytes += n;
                progress.advance(n);
                off += n;
            }
        }
        writer.finish().map_err(out_err)?;
        reader.finish()?;
        progress.finish();
        Ok(Qcow2RestoreStats {
            size: info.size.next_multiple_of(512),
            read_bytes,
        })
    })();
    // Dropped on an error, the output's temporary file goes with it: what stood at
    // `output` before stays as it was.
    let stats = result?;
    output_file.commit().map_err(|e| StoreError::Io {
        context: format!("cannot complete {}", output.display()),
        source: e,
    })?;
    Ok(stats)
}
