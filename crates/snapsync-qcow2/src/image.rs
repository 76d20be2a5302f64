//! [`Qcow2Image`]: one opened qcow2 file, its views (active state and
//! internal snapshots), allocation maps, metadata-only diffs and reads.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::Qcow2Error;
use crate::extent::{DiffExtent, ExtentKind, ExtentList};
use crate::format::{
    self, CompressionType, DamagedSnapshot, Header, InternalSnapshot, Meta, INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
};
use crate::source::ReadAt;

/// Bits 9..=55 of L1 and standard L2 entries hold a host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 entry flag: the cluster is compressed.
const L2_COMPRESSED: u64 = 1 << 62;
/// L2 entry flag (standard entries only): the cluster reads as zeros.
const L2_ZERO: u64 = 1;
/// Bound on the memory spent caching L2 tables.
const L2_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// Which state of the image to look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum View {
    /// The current (writable) state, mapped by the header's L1 table.
    Active,
    /// `snapshots()[i]`, mapped by that snapshot's own L1 table.
    Snapshot(usize),
}

/// State of one allocation unit: a whole cluster, or a subcluster when the
/// image uses extended L2 entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    /// Not allocated in this image: reads from the backing file (or zeros).
    Unalloc,
    /// Reads as zeros.
    Zero,
    /// Stored uncompressed at this host offset (start of the unit).
    Data(u64),
    /// Part of a compressed cluster; the raw L2 descriptor identifies it.
    Compressed(u64),
}

/// Decoded L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cluster {
    Whole(Unit),
    Sub { host: u64, alloc: u32, zero: u32 },
}

/// L1 tables keyed by (offset, entry count).
type L1Cache = HashMap<(u64, u32), Arc<[u64]>>;

#[derive(Debug, Default)]
struct L2Cache {
    tables: HashMap<u64, Arc<[u64]>>,
    bytes: usize,
}

/// One opened qcow2 image file.
///
/// The image is treated as immutable while open: L1 and L2 tables are
/// cached. All methods take `&self` and the type is `Send + Sync`.
#[derive(Debug)]
pub struct Qcow2Image {
    meta: Meta,
    header: Header,
    snapshots: Vec<InternalSnapshot>,
    /// Snapshot table entries left out of `snapshots` (see [`DamagedSnapshot`]).
    damaged_snapshots: Vec<DamagedSnapshot>,
    cluster_size: u64,
    /// Guest bytes per allocation unit (cluster or subcluster).
    unit_size: u64,
    units_per_cluster: u32,
    l2_entries: u64,
    l2_coverage: u64,
    l1_cache: Mutex<L1Cache>,
    l2_cache: Mutex<L2Cache>,
    last_decompressed: Mutex<Option<(u64, Arc<[u8]>)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Qcow2Image {
    /// Open and validate an image file. Reads only the header, its
    /// extensions and the snapshot table.
    pub fn open(path: &Path) -> Result<Self, Qcow2Error> {
        let file = File::open(path)
            .map_err(|e| Qcow2Error::io(format!("opening {}", path.display()), e))?;
        Self::from_file(file, path)
    }

    /// Read an image from a file already open, named `path` in errors.
    pub(crate) fn from_file(file: File, path: &Path) -> Result<Self, Qcow2Error> {
        // Name the file in structural errors: in a backing chain the
        // offset alone does not say which image is broken.
        Self::from_source(Box::new(file), path.display().to_string()).map_err(|e| match e {
            Qcow2Error::Malformed { what, offset } => Qcow2Error::Malformed {
                what: format!("{}: {what}", path.display()),
                offset,
            },
            Qcow2Error::TooLarge { what } => Qcow2Error::TooLarge {
                what: format!("{}: {what}", path.display()),
            },
            other => other,
        })
    }

    /// Open an image from any [`ReadAt`] source (e.g. bytes in memory).
    /// `label` is used in error messages.
    pub fn from_source(source: Box<dyn ReadAt>, label: String) -> Result<Self, Qcow2Error> {
        let meta = Meta::new(source, label)?;
        let header = format::parse_header(&meta)?;
        format::check_virtual_size(&header, header.size, "image")?;
        let need = format::l1_entries_for(&header, header.size);
        if u64::from(header.l1_size) < need {
            return Err(Qcow2Error::malformed(
                format!(
                    "L1 table has {} entries but the virtual size {} needs {need}",
                    header.l1_size, header.size
                ),
                36,
            ));
        }
        format::validate_l1(
            &meta,
            &header,
            format::L1Location {
                offset: header.l1_table_offset,
                entries: header.l1_size,
                // The header's l1_table_offset field.
                field_at: 40,
            },
            "active L1 table",
        )?;
        let table = format::parse_snapshots(&meta, &header)?;
        let cluster_size = 1u64 << header.cluster_bits;
        let (units_per_cluster, entry_size) = if header.extended_l2() {
            (32u32, 16u64)
        } else {
            (1, 8)
        };
        Ok(Qcow2Image {
            unit_size: cluster_size / u64::from(units_per_cluster),
            units_per_cluster,
            l2_entries: cluster_size / entry_size,
            l2_coverage: format::l2_coverage(&header),
            cluster_size,
            meta,
            header,
            snapshots: table.snapshots,
            damaged_snapshots: table.damaged,
            l1_cache: Mutex::new(HashMap::new()),
            l2_cache: Mutex::new(L2Cache::default()),
            last_decompressed: Mutex::new(None),
        })
    }

    /// Virtual (guest-visible) size of the active state in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.header.size
    }

    /// Cluster size in bytes (512 B ..= 2 MiB).
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// Granularity of allocation: the subcluster size with extended L2
    /// entries, the cluster size otherwise.
    pub fn allocation_unit(&self) -> u64 {
        self.unit_size
    }

    /// qcow2 version (2 or 3).
    pub fn version(&self) -> u32 {
        self.header.version
    }

    /// Backing file name exactly as stored in the header.
    pub fn backing_file(&self) -> Option<&str> {
        self.header.backing_file.as_deref()
    }

    /// Backing file format from the header extension (e.g. "qcow2", "raw").
    pub fn backing_format(&self) -> Option<&str> {
        self.header.backing_format.as_deref()
    }

    /// Internal snapshots in table order, damaged entries left out (so that
    /// `View::Snapshot(i)` is `snapshots()[i]`).
    pub fn snapshots(&self) -> &[InternalSnapshot] {
        &self.snapshots
    }

    /// Snapshot table entries that cannot be used, with the reason; the others are in
    /// [`Self::snapshots`].
    pub fn damaged_snapshots(&self) -> &[DamagedSnapshot] {
        &self.damaged_snapshots
    }

    /// Whether the image uses extended L2 entries (32 subclusters per cluster).
    pub fn extended_l2(&self) -> bool {
        self.header.extended_l2()
    }

    /// Compression algorithm for compressed clusters.
    pub fn compression_type(&self) -> CompressionType {
        self.header.compression
    }

    /// The dirty bit is set (lazy refcounts, not cleanly closed). L1/L2
    /// tables are still authoritative, so reading is fine.
    pub fn is_dirty(&self) -> bool {
        self.header.incompatible & INCOMPAT_DIRTY != 0
    }

    /// QEMU marked the image corrupt. We still read it (bounds-checked);
    /// callers may want to warn.
    pub fn is_marked_corrupt(&self) -> bool {
        self.header.incompatible & INCOMPAT_CORRUPT != 0
    }

    /// Raw feature bit fields: (incompatible, compatible, autoclear).
    pub fn feature_bits(&self) -> (u64, u64, u64) {
        (
            self.header.incompatible,
            self.header.compatible,
            self.header.autoclear,
        )
    }

    /// Refcount width as log2 of bits (4 = 16-bit refcounts).
    pub fn refcount_order(&self) -> u32 {
        self.header.refcount_order
    }

    /// Total bytes of metadata (header, snapshot table, L1 and L2 tables)
    /// read from the file so far. Cached tables are not counted twice.
    pub fn metadata_bytes_read(&self) -> u64 {
        self.meta.meta_bytes.load(Ordering::Relaxed)
    }

    /// Total bytes of guest data (including compressed payloads) read so far.
    pub fn data_bytes_read(&self) -> u64 {
        self.meta.data_bytes.load(Ordering::Relaxed)
    }

    /// Virtual size of a view.
    pub fn view_size(&self, view: View) -> Result<u64, Qcow2Error> {
        match view {
            View::Active => Ok(self.header.size),
            View::Snapshot(i) => self.snapshot(i).map(|s| s.disk_size),
        }
    }

    fn snapshot(&self, i: usize) -> Result<&InternalSnapshot, Qcow2Error> {
        self.snapshots.get(i).ok_or_else(|| {
            Qcow2Error::invalid(format!(
                "snapshot index {i} out of range ({} snapshots)",
                self.snapshots.len()
            ))
        })
    }

    /// Read (once, then cache) the L1 table of a view in a single read.
    fn l1(&self, view: View) -> Result<Arc<[u64]>, Qcow2Error> {
        let key = match view {
            View::Active => (self.header.l1_table_offset, self.header.l1_size),
            View::Snapshot(i) => {
                let s = self.snapshot(i)?;
                (s.l1_table_offset, s.l1_size)
            }
        };
        if let Some(t) = lock(&self.l1_cache).get(&key) {
            return Ok(Arc::clone(t));
        }
        let raw = self.meta.read(key.0, u64::from(key.1) * 8, "L1 table")?;
        let table: Arc<[u64]> = raw.chunks_exact(8).map(|c| format::be64(c, 0)).collect();
        lock(&self.l1_cache).insert(key, Arc::clone(&table));
        Ok(table)
    }

    /// Host offset of the L2 table for L1 index `idx`, 0 if unallocated.
    fn l2_offset(&self, l1: &[u64], idx: u64, l1_offset: u64) -> Result<u64, Qcow2Error> {
        let Some(&entry) = usize::try_from(idx).ok().and_then(|i| l1.get(i)) else {
            return Ok(0);
        };
        let off = entry & OFFSET_MASK;
        if !off.is_multiple_of(self.cluster_size) {
            return Err(Qcow2Error::malformed(
                format!("L1 entry {idx} points to unaligned L2 table offset 0x{off:x}"),
                l1_offset + idx * 8,
            ));
        }
        Ok(off)
    }

    /// Read (or fetch from cache) an L2 table.
    fn l2(&self, offset: u64) -> Result<Arc<[u64]>, Qcow2Error> {
        if let Some(t) = lock(&self.l2_cache).tables.get(&offset) {
            return Ok(Arc::clone(t));
        }
        let raw = self.meta.read(offset, self.cluster_size, "L2 table")?;
        let table: Arc<[u64]> = raw.chunks_exact(8).map(|c| format::be64(c, 0)).collect();
        let mut cache = lock(&self.l2_cache);
        if cache.bytes + raw.len() > L2_CACHE_BYTES {
            cache.tables.clear();
            cache.bytes = 0;
        }
        cache.bytes += raw.len();
        cache.tables.insert(offset, Arc::clone(&table));
        Ok(table)
    }

    /// Like [`Self::l2`], but refuses an L2 table referenced twice from the
    /// same L1 table: QEMU never does that, and allowing it would let a
    /// small hostile file make us walk billions of entries.
    fn l2_once(&self, offset: u64, seen: &mut HashSet<u64>) -> Result<Arc<[u64]>, Qcow2Error> {
        if !seen.insert(offset) {
            return Err(Qcow2Error::malformed(
                "L2 table referenced by more than one L1 entry of the same table",
                offset,
            ));
        }
        self.l2(offset)
    }

    /// Decode entry `idx` of an L2 table (at host offset `l2_off`).
    fn decode(&self, table: &[u64], idx: u64, l2_off: u64) -> Result<Cluster, Qcow2Error> {
        let ext = self.units_per_cluster > 1;
        let i = usize::try_from(idx).unwrap_or(usize::MAX);
        let (entry, bitmap) = if ext {
            let e = i.checked_mul(2);
            (
                e.and_then(|e| table.get(e)).copied().unwrap_or(0),
                e.and_then(|e| table.get(e + 1)).copied().unwrap_or(0),
            )
        } else {
            (table.get(i).copied().unwrap_or(0), 0)
        };
        let where_ = l2_off + idx * if ext { 16 } else { 8 };
        if entry & L2_COMPRESSED != 0 {
            // Keep everything except the COPIED flag: it identifies the
            // compressed payload (offset and sector count) exactly.
            return Ok(Cluster::Whole(Unit::Compressed(entry & !(1 << 63))));
        }
        let host = entry & OFFSET_MASK;
        if !host.is_multiple_of(self.cluster_size) {
            return Err(Qcow2Error::malformed(
                format!("L2 entry {idx} has unaligned data cluster offset 0x{host:x}"),
                where_,
            ));
        }
        if ext {
            let alloc = bitmap as u32;
            let zero = (bitmap >> 32) as u32;
            if alloc & zero != 0 {
                return Err(Qcow2Error::malformed(
                    format!("L2 entry {idx}: subcluster both allocated and zero (bitmap 0x{bitmap:016x})"),
                    where_,
                ));
            }
            if host == 0 && alloc != 0 {
                return Err(Qcow2Error::malformed(
                    format!("L2 entry {idx}: allocated subclusters without a host cluster"),
                    where_,
                ));
            }
            return Ok(if alloc == 0 && zero == 0 {
                Cluster::Whole(Unit::Unalloc)
            } else if zero == u32::MAX {
                Cluster::Whole(Unit::Zero)
            } else if alloc == u32::MAX {
                Cluster::Whole(Unit::Data(host))
            } else {
                Cluster::Sub { host, alloc, zero }
            });
        }
        Ok(Cluster::Whole(if entry & L2_ZERO != 0 {
            Unit::Zero
        } else if host == 0 {
            Unit::Unalloc
        } else {
            Unit::Data(host)
        }))
    }

    fn unit_of(&self, c: Cluster, u: u32) -> Unit {
        match c {
            Cluster::Whole(Unit::Data(h)) => Unit::Data(h + u64::from(u) * self.unit_size),
            Cluster::Whole(x) => x,
            Cluster::Sub { host, alloc, zero } => {
                if alloc >> u & 1 != 0 {
                    Unit::Data(host + u64::from(u) * self.unit_size)
                } else if zero >> u & 1 != 0 {
                    Unit::Zero
                } else {
                    Unit::Unalloc
                }
            }
        }
    }

    fn l1_offset_of(&self, view: View) -> u64 {
        match view {
            View::Active => self.header.l1_table_offset,
            View::Snapshot(i) => self.snapshots.get(i).map_or(0, |s| s.l1_table_offset),
        }
    }

    /// Allocation map of one view of this layer alone: Data (allocated,
    /// including compressed) and Zero (zero flag) extents; unallocated
    /// ranges are omitted. Metadata only.
    pub fn allocated(&self, view: View) -> Result<Vec<DiffExtent>, Qcow2Error> {
        let size = self.view_size(view)?;
        let l1 = self.l1(view)?;
        let l1_off = self.l1_offset_of(view);
        let mut seen = HashSet::new();
        let mut out = ExtentList::default();
        // Indices past the end of the L1 table are unallocated: no need to visit them.
        let n = size.div_ceil(self.l2_coverage).min(l1.len() as u64);
        for i in 0..n {
            let l2_off = self.l2_offset(&l1, i, l1_off)?;
            if l2_off == 0 {
                continue;
            }
            let table = self.l2_once(l2_off, &mut seen)?;
            let base = i * self.l2_coverage;
            for j in 0..self.l2_entries {
                let cstart = base + j * self.cluster_size;
                if cstart >= size {
                    break;
                }
                let c = self.decode(&table, j, l2_off)?;
                for u in 0..self.units_per_cluster {
                    let ustart = cstart + u64::from(u) * self.unit_size;
                    if ustart >= size {
                        break;
                    }
                    let len = self.unit_size.min(size - ustart);
                    match self.unit_of(c, u) {
                        Unit::Unalloc => {}
                        Unit::Zero => out.push(ustart, len, ExtentKind::Zero),
                        Unit::Data(_) | Unit::Compressed(_) => {
                            out.push(ustart, len, ExtentKind::Data)
                        }
                    }
                }
            }
        }
        Ok(out.finish())
    }

    /// Metadata-only diff between two views of this image.
    ///
    /// `base: None` returns the allocation map of `target` (see
    /// [`Self::allocated`]). Otherwise the result covers every unit whose
    /// mapping differs: L1 entries pointing at the same L2 table are skipped
    /// wholesale (that is what makes snapshot diffs cheap: QEMU shares L2
    /// tables between snapshots until they are written), then L2 entries are
    /// compared by host offset and type (the COPIED flag, which merely
    /// reflects refcount == 1, is ignored), per subcluster for extended L2.
    ///
    /// Extents are sorted, coalesced and clipped to the target's virtual
    /// size. `Zero` means the target reads zeros there; a range that became
    /// unallocated is `Zero` when the image has no backing file and `Data`
    /// (to be read through a [`crate::Chain`]) when it has one. Never reads
    /// guest data.
    pub fn diff(&self, target: View, base: Option<View>) -> Result<Vec<DiffExtent>, Qcow2Error> {
        let Some(base) = base else {
            return self.allocated(target);
        };
        let tsize = self.view_size(target)?;
        let bsize = self.view_size(base)?;
        let tl1 = self.l1(target)?;
        let bl1 = self.l1(base)?;
        let tl1_off = self.l1_offset_of(target);
        let bl1_off = self.l1_offset_of(base);
        let has_backing = self.header.backing_file.is_some();
        let norm = |u: Unit| {
            if !has_backing && u == Unit::Unalloc {
                Unit::Zero
            } else {
                u
            }
        };
        let kind = |u: Unit| match u {
            Unit::Data(_) | Unit::Compressed(_) => ExtentKind::Data,
            Unit::Zero => ExtentKind::Zero,
            Unit::Unalloc if has_backing => ExtentKind::Data,
            Unit::Unalloc => ExtentKind::Zero,
        };
        let mut seen_t = HashSet::new();
        let mut seen_b = HashSet::new();
        let mut out = ExtentList::default();
        let n = tsize
            .div_ceil(self.l2_coverage)
            .min(tl1.len().max(bl1.len()) as u64);
        let unalloc = Cluster::Whole(Unit::Unalloc);
        for i in 0..n {
            let start = i * self.l2_coverage;
            let end = start.saturating_add(self.l2_coverage).min(tsize);
            let t_off = self.l2_offset(&tl1, i, tl1_off)?;
            let b_off = if start < bsize {
                self.l2_offset(&bl1, i, bl1_off)?
            } else {
                0
            };
            if t_off == b_off && (t_off == 0 || end <= bsize) {
                continue;
            }
            let tt = if t_off != 0 {
                Some(self.l2_once(t_off, &mut seen_t)?)
            } else {
                None
            };
            let bt = if b_off != 0 {
                Some(self.l2_once(b_off, &mut seen_b)?)
            } else {
                None
            };
            for j in 0..self.l2_entries {
                let cstart = start + j * self.cluster_size;
                if cstart >= tsize {
                    break;
                }
                let tc = match &tt {
                    Some(t) => self.decode(t, j, t_off)?,
                    None => unalloc,
                };
                let bc = match &bt {
                    Some(t) if cstart < bsize => self.decode(t, j, b_off)?,
                    _ => unalloc,
                };
                if tc == bc && cstart.saturating_add(self.cluster_size) <= bsize {
                    continue;
                }
                for u in 0..self.units_per_cluster {
                    let ustart = cstart + u64::from(u) * self.unit_size;
                    if ustart >= tsize {
                        break;
                    }
                    let tu = self.unit_of(tc, u);
                    let bu = if ustart < bsize {
                        self.unit_of(bc, u)
                    } else {
                        Unit::Unalloc
                    };
                    if norm(tu) != norm(bu) {
                        out.push(ustart, self.unit_size.min(tsize - ustart), kind(tu));
                    }
                }
            }
        }
        Ok(out.finish())
    }

    /// Walk `[offset, offset+len)` of a view, calling `f(guest_offset,
    /// length, unit, offset_within_unit)` for each piece, in order.
    /// For compressed units the offset is within the cluster.
    pub(crate) fn map_range(
        &self,
        view: View,
        offset: u64,
        len: u64,
        f: &mut dyn FnMut(u64, u64, Unit, u64) -> Result<(), Qcow2Error>,
    ) -> Result<(), Qcow2Error> {
        let size = self.view_size(view)?;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= size)
            .ok_or_else(|| {
                Qcow2Error::invalid(format!(
                    "read of {len} bytes at {offset} is beyond the virtual size {size}"
                ))
            })?;
        let l1 = self.l1(view)?;
        let l1_off = self.l1_offset_of(view);
        let mut pos = offset;
        while pos < end {
            let cidx = pos / self.cluster_size;
            let cstart = cidx * self.cluster_size;
            let l1_idx = cidx / self.l2_entries;
            let l2_off = self.l2_offset(&l1, l1_idx, l1_off)?;
            let c = if l2_off == 0 {
                Cluster::Whole(Unit::Unalloc)
            } else {
                let t = self.l2(l2_off)?;
                self.decode(&t, cidx % self.l2_entries, l2_off)?
            };
            let cend = cstart.saturating_add(self.cluster_size).min(end);
            if let Cluster::Whole(unit) = c {
                f(pos, cend - pos, unit, pos - cstart)?;
                pos = cend;
                continue;
            }
            while pos < cend {
                let u = ((pos - cstart) / self.unit_size) as u32;
                let ustart = cstart + u64::from(u) * self.unit_size;
                let uend = (ustart + self.unit_size).min(cend);
                f(pos, uend - pos, self.unit_of(c, u), pos - ustart)?;
                pos = uend;
            }
        }
        Ok(())
    }

    /// Read guest data of a view. Unallocated ranges read as zeros (this
    /// image alone; use [`crate::Chain`] to see through backing files).
    pub fn read_at(&self, view: View, offset: u64, buf: &mut [u8]) -> Result<(), Qcow2Error> {
        let len = buf.len() as u64;
        self.map_range(view, offset, len, &mut |g, n, unit, within| {
            let s = (g - offset) as usize;
            let dst = &mut buf[s..s + n as usize];
            self.read_unit(unit, within, dst)
        })
    }

    /// Fill `dst` from `unit` starting `within` bytes into it. Unallocated
    /// units read as zeros.
    pub(crate) fn read_unit(
        &self,
        unit: Unit,
        within: u64,
        dst: &mut [u8],
    ) -> Result<(), Qcow2Error> {
        match unit {
            Unit::Unalloc | Unit::Zero => {
                dst.fill(0);
                Ok(())
            }
            Unit::Data(h) => self.meta.read_data(h + within, dst),
            Unit::Compressed(desc) => {
                let data = self.decompress(desc)?;
                let s = within as usize;
                let src = data
                    .get(s..s + dst.len())
                    .ok_or_else(|| Qcow2Error::invalid("read beyond compressed cluster"))?;
                dst.copy_from_slice(src);
                Ok(())
            }
        }
    }

    /// Decompress one compressed cluster (the most recent one is cached,
    /// since sequential reads usually hit the same cluster several times).
    fn decompress(&self, desc: u64) -> Result<Arc<[u8]>, Qcow2Error> {
        if let Some((d, data)) = &*lock(&self.last_decompressed) {
            if *d == desc {
                return Ok(Arc::clone(data));
            }
        }
        let shift = 62 - (self.header.cluster_bits - 8);
        let host = desc & ((1u64 << shift) - 1);
        let sectors = ((desc >> shift) & ((1u64 << (self.header.cluster_bits - 8)) - 1)) + 1;
        let csize = sectors * 512 - (host & 511);
        if host >= self.meta.file_size {
            return Err(Qcow2Error::malformed(
                format!("compressed cluster at 0x{host:x} is beyond the end of the file"),
                host,
            ));
        }
        // QEMU tolerates a payload whose last sector is cut off by EOF.
        let csize = csize.min(self.meta.file_size - host);
        let mut input = vec![0u8; csize as usize];
        self.meta.read_data(host, &mut input)?;
        let mut out = vec![0u8; self.cluster_size as usize];
        let bad = |why: String| {
            Qcow2Error::malformed(
                format!("compressed cluster does not decompress: {why}"),
                host,
            )
        };
        match self.header.compression {
            CompressionType::Zlib => {
                let mut d = flate2::Decompress::new(false);
                d.decompress(&input, &mut out, flate2::FlushDecompress::Finish)
                    .map_err(|e| bad(e.to_string()))?;
                if d.total_out() != self.cluster_size {
                    return Err(bad(format!(
                        "produced {} bytes, expected {}",
                        d.total_out(),
                        self.cluster_size
                    )));
                }
            }
            CompressionType::Zstd => {
                let mut d = zstd::stream::read::Decoder::with_buffer(&input[..])
                    .map_err(|e| bad(e.to_string()))?;
                // Bound the decoder's window allocation: clusters are at
                // most 2 MiB, so a legitimate frame never needs more.
                d.window_log_max(22).map_err(|e| bad(e.to_string()))?;
                d.read_exact(&mut out).map_err(|e| bad(e.to_string()))?;
            }
        }
        let data: Arc<[u8]> = out.into();
        *lock(&self.last_decompressed) = Some((desc, Arc::clone(&data)));
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_and_chain_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Qcow2Image>();
        assert_send_sync::<crate::Chain>();
    }

    #[test]
    fn empty_input_is_an_error() {
        let err = Qcow2Image::from_source(Box::new(Vec::new()), "empty".into()).unwrap_err();
        assert!(matches!(err, Qcow2Error::Malformed { .. }), "{err}");
        assert!(err.to_string().contains("too small"), "{err}");
    }
}
