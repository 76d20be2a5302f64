//! On-disk structures: header, header extensions and the snapshot table.
//!
//! All multi-byte fields in qcow2 are big-endian. Every structure is read
//! through [`Meta::read`], which refuses reads that would go past the end of
//! the file *before* allocating a buffer, so a hostile size field can never
//! make us allocate more than the file itself holds.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Qcow2Error;
use crate::source::ReadAt;

pub(crate) const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Size of the version 2 header; also the minimum for version 3 up to `incompatible_features`.
const V2_HEADER_LEN: u64 = 72;
/// Minimum version 3 header length (up to and including `header_length`).
const V3_MIN_HEADER_LEN: u64 = 104;

pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(crate) const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Same limit as QEMU (`QCOW_MAX_L1_SIZE`, 32 MiB): a bigger L1 table is
/// certainly hostile, and we hold whole L1 tables in memory.
pub(crate) const MAX_L1_ENTRIES: u64 = 32 * 1024 * 1024 / 8;
/// QEMU's `QCOW_MAX_SNAPSHOTS`.
const MAX_SNAPSHOTS: u32 = 65536;
/// QEMU's `QCOW_MAX_SNAPSHOTS_SIZE`: the whole table may not exceed 64 MiB.
const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 * 1024 * 1024;
/// QEMU's `QCOW_MAX_SNAPSHOT_EXTRA_DATA`.
const MAX_SNAPSHOT_EXTRA: u32 = 1024;
/// The spec limits backing file names to 1023 bytes.
const MAX_BACKING_NAME: u32 = 1023;

/// Compression algorithm used for compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (no zlib header or checksum), QEMU's default.
    Zlib,
    /// Zstandard frames.
    Zstd,
}

/// Metadata reader: bounds-checks every read against the file size and
/// counts the bytes, so callers can prove an operation touched metadata only.
#[derive(Debug)]
pub(crate) struct Meta {
    pub(crate) src: Box<dyn ReadAt>,
    pub(crate) file_size: u64,
    pub(crate) label: String,
    pub(crate) meta_bytes: AtomicU64,
    pub(crate) data_bytes: AtomicU64,
}

impl Meta {
    pub(crate) fn new(src: Box<dyn ReadAt>, label: String) -> Result<Self, Qcow2Error> {
        let file_size = src
            .size()
            .map_err(|e| Qcow2Error::io(format!("getting size of {label}"), e))?;
        Ok(Meta {
            src,
            file_size,
            label,
            meta_bytes: AtomicU64::new(0),
            data_bytes: AtomicU64::new(0),
        })
    }

    /// Read `len` bytes of metadata at `offset`; `what` names the structure for errors.
    pub(crate) fn read(&self, offset: u64, len: u64, what: &str) -> Result<Vec<u8>, Qcow2Error> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Qcow2Error::malformed(format!("{what}: offset overflows"), offset))?;
        if end > self.file_size {
            return Err(Qcow2Error::malformed(
                format!(
                    "{what} ({len} bytes) extends past the end of the file ({} bytes)",
                    self.file_size
                ),
                offset,
            ));
        }
        let n = usize::try_from(len).map_err(|_| Qcow2Error::too_large(what.to_string()))?;
        let mut buf = vec![0u8; n];
        self.src.read_exact_at(&mut buf, offset).map_err(|e| {
            Qcow2Error::io(
                format!("reading {what} at offset {offset} of {}", self.label),
                e,
            )
        })?;
        self.meta_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(buf)
    }

    /// Read guest data at `offset`; bytes beyond the end of the file read as
    /// zeros (QEMU behaves the same way: the last cluster may be short).
    pub(crate) fn read_data(&self, offset: u64, buf: &mut [u8]) -> Result<(), Qcow2Error> {
        let avail = self.file_size.saturating_sub(offset);
        let n = usize::try_from(avail).unwrap_or(usize::MAX).min(buf.len());
        let (head, tail) = buf.split_at_mut(n);
        if !head.is_empty() {
            self.src.read_exact_at(head, offset).map_err(|e| {
                Qcow2Error::io(
                    format!("reading data at offset {offset} of {}", self.label),
                    e,
                )
            })?;
            self.data_bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        tail.fill(0);
        Ok(())
    }
}

pub(crate) fn be16(b: &[u8], o: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[o..o + 2]);
    u16::from_be_bytes(a)
}

pub(crate) fn be32(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_be_bytes(a)
}

pub(crate) fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

/// Parsed image header plus the interesting header extensions.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub(crate) version: u32,
    pub(crate) cluster_bits: u32,
    pub(crate) size: u64,
    pub(crate) l1_size: u32,
    pub(crate) l1_table_offset: u64,
    pub(crate) nb_snapshots: u32,
    pub(crate) snapshots_offset: u64,
    pub(crate) incompatible: u64,
    pub(crate) compatible: u64,
    pub(crate) autoclear: u64,
    pub(crate) refcount_order: u32,
    pub(crate) compression: CompressionType,
    pub(crate) backing_file: Option<String>,
    pub(crate) backing_format: Option<String>,
}

impl Header {
    pub(crate) fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }
}

fn feature_name(names: &[(u8, u8, String)], bit: u8) -> String {
    names
        .iter()
        .find(|(t, b, _)| *t == 0 && *b == bit)
        .map(|(_, _, n)| format!(" ({n})"))
        .unwrap_or_default()
}

fn nul_trimmed(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Parse and validate the header. Refuses features we cannot read faithfully.
pub(crate) fn parse_header(meta: &Meta) -> Result<Header, Qcow2Error> {
    if meta.file_size < V2_HEADER_LEN {
        return Err(Qcow2Error::malformed(
            format!(
                "file is only {} bytes, too small for a qcow2 header",
                meta.file_size
            ),
            0,
        ));
    }
    let h = meta.read(0, V2_HEADER_LEN, "header")?;
    if h[0..4] != MAGIC {
        return Err(Qcow2Error::malformed("bad magic: not a qcow2 image", 0));
    }
    let version = be32(&h, 4);
    if version != 2 && version != 3 {
        return Err(Qcow2Error::unsupported(format!("qcow2 version {version}")));
    }
    let backing_file_offset = be64(&h, 8);
    let backing_file_size = be32(&h, 16);
    let cluster_bits = be32(&h, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(Qcow2Error::unsupported(format!(
            "cluster_bits {cluster_bits} (only 9..=21, i.e. 512 B to 2 MiB clusters, are valid)"
        )));
    }
    let cluster_size = 1u64 << cluster_bits;
    let size = be64(&h, 24);
    let crypt_method = be32(&h, 32);
    let l1_size = be32(&h, 36);
    let l1_table_offset = be64(&h, 40);
    let nb_snapshots = be32(&h, 60);
    let snapshots_offset = be64(&h, 64);

    let (incompatible, compatible, autoclear, refcount_order, header_length, compression_byte) =
        if version == 3 {
            let ext = meta.read(
                V2_HEADER_LEN,
                V3_MIN_HEADER_LEN - V2_HEADER_LEN,
                "v3 header",
            )?;
            let header_length = u64::from(be32(&ext, 28));
            if header_length < V3_MIN_HEADER_LEN {
                return Err(Qcow2Error::malformed(
                    format!("header_length {header_length} is smaller than 104"),
                    100,
                ));
            }
            if header_length > cluster_size {
                return Err(Qcow2Error::malformed(
                    format!(
                        "header_length {header_length} exceeds the cluster size {cluster_size}"
                    ),
                    100,
                ));
            }
            let compression_byte = if header_length > V3_MIN_HEADER_LEN {
                meta.read(V3_MIN_HEADER_LEN, 1, "compression type")?[0]
            } else {
                0
            };
            let refcount_order = be32(&ext, 24);
            if refcount_order > 6 {
                return Err(Qcow2Error::malformed(
                    format!("refcount_order {refcount_order} is larger than 6"),
                    96,
                ));
            }
            (
                be64(&ext, 0),
                be64(&ext, 8),
                be64(&ext, 16),
                refcount_order,
                header_length,
                compression_byte,
            )
        } else {
            (0, 0, 0, 4, V2_HEADER_LEN, 0)
        };

    if crypt_method != 0 {
        let kind = match crypt_method {
            1 => "AES",
            2 => "LUKS",
            _ => "unknown method",
        };
        return Err(Qcow2Error::unsupported(format!(
            "encryption (crypt_method {crypt_method}, {kind})"
        )));
    }

    // Header extensions live between the header and the backing file name
    // (or the end of the first cluster). Each is type/length/data padded to 8.
    let ext_end = if backing_file_offset != 0 {
        backing_file_offset.min(cluster_size)
    } else {
        cluster_size
    }
    .min(meta.file_size);
    let mut backing_format = None;
    let mut feature_names = Vec::new();
    let mut data_file_name = None;
    if ext_end > header_length {
        let blob = meta.read(header_length, ext_end - header_length, "header extensions")?;
        let mut pos = 0usize;
        while pos + 8 <= blob.len() {
            let typ = be32(&blob, pos);
            let len = be32(&blob, pos + 4) as usize;
            if typ == EXT_END {
                break;
            }
            let abs = header_length + pos as u64;
            let data_start = pos + 8;
            let data_end = data_start
                .checked_add(len)
                .filter(|&e| e <= blob.len())
                .ok_or_else(|| {
                    Qcow2Error::malformed(
                        format!("header extension 0x{typ:08x} of length {len} overflows the header area"),
                        abs,
                    )
                })?;
            let data = &blob[data_start..data_end];
            match typ {
                EXT_BACKING_FORMAT => backing_format = Some(nul_trimmed(data)),
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        feature_names.push((e[0], e[1], nul_trimmed(&e[2..])));
                    }
                }
                EXT_DATA_FILE => data_file_name = Some(nul_trimmed(data)),
                _ => {}
            }
            // Round the payload up to a multiple of 8; saturate so a huge
            // length cannot wrap (the bounds check above already passed).
            pos = data_start.saturating_add(len.div_ceil(8).saturating_mul(8));
        }
    }

    if incompatible & INCOMPAT_DATA_FILE != 0 {
        let name = data_file_name
            .map(|n| format!(" '{n}'"))
            .unwrap_or_default();
        return Err(Qcow2Error::unsupported(format!(
            "external data file{name} (incompatible feature bit 2)"
        )));
    }
    let unknown = incompatible & !INCOMPAT_KNOWN;
    if unknown != 0 {
        let bit = unknown.trailing_zeros() as u8;
        return Err(Qcow2Error::unsupported(format!(
            "unknown incompatible feature bit {bit}{}",
            feature_name(&feature_names, bit)
        )));
    }
    let compression = match compression_byte {
        0 => CompressionType::Zlib,
        1 => CompressionType::Zstd,
        n => return Err(Qcow2Error::unsupported(format!("compression type {n}"))),
    };
    if compression != CompressionType::Zlib && incompatible & INCOMPAT_COMPRESSION == 0 {
        return Err(Qcow2Error::malformed(
            "compression_type is not zlib but the compression-type incompatible bit is clear",
            104,
        ));
    }
    if incompatible & INCOMPAT_EXTL2 != 0 && cluster_bits < 14 {
        return Err(Qcow2Error::unsupported(format!(
            "extended L2 entries with {cluster_size}-byte clusters (subclusters below 512 bytes)"
        )));
    }

    let backing_file =
        if backing_file_offset != 0 && backing_file_size != 0 {
            if backing_file_size > MAX_BACKING_NAME {
                return Err(Qcow2Error::malformed(
                    format!("backing file name length {backing_file_size} exceeds 1023"),
                    16,
                ));
            }
            let raw = meta.read(
                backing_file_offset,
                u64::from(backing_file_size),
                "backing file name",
            )?;
            Some(String::from_utf8(raw).map_err(|_| {
                Qcow2Error::unsupported("backing file name that is not valid UTF-8")
            })?)
        } else {
            None
        };

    Ok(Header {
        version,
        cluster_bits,
        size,
        l1_size,
        l1_table_offset,
        nb_snapshots,
        snapshots_offset,
        incompatible,
        compatible,
        autoclear,
        refcount_order,
        compression,
        backing_file,
        backing_format,
    })
}

/// One internal snapshot (`qemu-img snapshot -c`), as stored in the snapshot table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalSnapshot {
    /// Unique ID string (QEMU uses decimal numbers).
    pub id: String,
    /// User-visible name.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock when the snapshot was taken.
    pub vm_clock_nsec: u64,
    /// Size of saved VM state (0 for disk-only snapshots).
    pub vm_state_size: u64,
    /// Virtual disk size at snapshot time (falls back to the image size when
    /// the snapshot has no extra data, as in version 2 images).
    pub disk_size: u64,
    /// Instruction count for record/replay, if stored.
    pub icount: Option<u64>,
    /// Offset of the snapshot's L1 table in the image file.
    pub l1_table_offset: u64,
    /// Number of entries in the snapshot's L1 table.
    pub l1_size: u32,
}

/// A snapshot table entry that is laid out correctly but cannot be used: its L1 table
/// lies outside the file, its disk size is absurd. QEMU lists such an image and fails
/// only when the snapshot is used, so the reader skips the entry and keeps the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedSnapshot {
    /// Position in the snapshot table, from 0.
    pub index: u32,
    /// Unique ID string, as stored.
    pub id: String,
    /// User-visible name, as stored.
    pub name: String,
    /// What is wrong with it.
    pub reason: String,
}

/// The snapshot table: the usable entries, and the damaged ones left out.
#[derive(Debug, Default)]
pub(crate) struct SnapshotTable {
    pub(crate) snapshots: Vec<InternalSnapshot>,
    pub(crate) damaged: Vec<DamagedSnapshot>,
}

/// Read the snapshot table, enforcing QEMU's own limits on count and size. A table that
/// cannot be walked (an entry that does not fit in the file, too much extra data) is an
/// error for the whole image, as in QEMU; an entry whose own fields are unusable is
/// skipped and reported in [`SnapshotTable::damaged`].
pub(crate) fn parse_snapshots(meta: &Meta, header: &Header) -> Result<SnapshotTable, Qcow2Error> {
    let n = header.nb_snapshots;
    if n == 0 {
        return Ok(SnapshotTable::default());
    }
    if n > MAX_SNAPSHOTS {
        return Err(Qcow2Error::too_large(format!(
            "{n} snapshots (limit {MAX_SNAPSHOTS})"
        )));
    }
    let cluster_size = 1u64 << header.cluster_bits;
    let off = header.snapshots_offset;
    if off == 0 {
        return Err(Qcow2Error::malformed(
            format!("the header counts {n} snapshots but gives no snapshot table (offset 0)"),
            // Where the header keeps the snapshot table's offset.
            64,
        ));
    }
    if !off.is_multiple_of(cluster_size) {
        return Err(Qcow2Error::malformed(
            "snapshot table offset is not cluster-aligned",
            off,
        ));
    }
    let mut pos = off;
    let mut out = SnapshotTable::default();
    for i in 0..n {
        if pos - off > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(Qcow2Error::too_large(format!(
                "snapshot table larger than {MAX_SNAPSHOT_TABLE_BYTES} bytes"
            )));
        }
        let what = format!("snapshot table entry {i}");
        let fixed = meta.read(pos, 40, &what)?;
        let l1_table_offset = be64(&fixed, 0);
        let l1_size = be32(&fixed, 8);
        let id_size = u64::from(be16(&fixed, 12));
        let name_size = u64::from(be16(&fixed, 14));
        let date_sec = be32(&fixed, 16);
        let date_nsec = be32(&fixed, 20);
        let vm_clock_nsec = be64(&fixed, 24);
        let vm_state_size32 = be32(&fixed, 32);
        let extra_size = be32(&fixed, 36);
        if extra_size > MAX_SNAPSHOT_EXTRA {
            return Err(Qcow2Error::malformed(
                format!("{what}: extra data size {extra_size} exceeds {MAX_SNAPSHOT_EXTRA}"),
                pos,
            ));
        }
        let var_len = u64::from(extra_size) + id_size + name_size;
        let var = meta.read(pos + 40, var_len, &what)?;
        let extra = &var[..extra_size as usize];
        let vm_state_size = if extra.len() >= 8 {
            be64(extra, 0)
        } else {
            u64::from(vm_state_size32)
        };
        let disk_size = if extra.len() >= 16 {
            be64(extra, 8)
        } else {
            header.size
        };
        let icount = if extra.len() >= 24 {
            Some(be64(extra, 16)).filter(|&v| v != u64::MAX)
        } else {
            None
        };
        let id_start = extra_size as usize;
        let name_start = id_start + id_size as usize;
        let id = String::from_utf8_lossy(&var[id_start..name_start]).into_owned();
        let name = String::from_utf8_lossy(&var[name_start..]).into_owned();

        let l1 = L1Location {
            offset: l1_table_offset,
            entries: l1_size,
            field_at: pos,
        };
        let usable = validate_l1(meta, header, l1, &what)
            .and_then(|()| check_virtual_size(header, disk_size, &what));
        if let Err(e) = usable {
            out.damaged.push(DamagedSnapshot {
                index: i,
                id,
                name,
                reason: e.to_string(),
            });
        } else {
            out.snapshots.push(InternalSnapshot {
                id,
                name,
                date_sec,
                date_nsec,
                vm_clock_nsec,
                vm_state_size,
                disk_size,
                icount,
                l1_table_offset,
                l1_size,
            });
        }
        let entry_len = (40 + var_len).div_ceil(8) * 8;
        pos = pos
            .checked_add(entry_len)
            .ok_or_else(|| Qcow2Error::malformed("snapshot table offset overflows", pos))?;
    }
    Ok(out)
}

/// Bytes of guest disk covered by one L2 table.
pub(crate) fn l2_coverage(header: &Header) -> u64 {
    let cluster_size = 1u64 << header.cluster_bits;
    let entry = if header.extended_l2() { 16 } else { 8 };
    (cluster_size / entry) * cluster_size
}

/// Number of L1 entries needed to map `size` bytes.
pub(crate) fn l1_entries_for(header: &Header, size: u64) -> u64 {
    size.div_ceil(l2_coverage(header))
}

/// Refuse virtual sizes that would need an absurd L1 table: they cannot be
/// valid, and loops over L1 indices must stay bounded.
pub(crate) fn check_virtual_size(header: &Header, size: u64, what: &str) -> Result<(), Qcow2Error> {
    let need = l1_entries_for(header, size);
    if need > MAX_L1_ENTRIES {
        return Err(Qcow2Error::too_large(format!(
            "{what}: virtual size {size} needs {need} L1 entries (limit {MAX_L1_ENTRIES})"
        )));
    }
    Ok(())
}

/// Where an L1 table is, as a header or snapshot table entry says.
#[derive(Debug, Clone, Copy)]
pub(crate) struct L1Location {
    /// The table's offset in the file.
    pub(crate) offset: u64,
    /// Its number of entries.
    pub(crate) entries: u32,
    /// Where in the file the offset field itself is: the place to look when the
    /// offset is 0, which is no place at all.
    pub(crate) field_at: u64,
}

/// Check an L1 table location without reading it.
pub(crate) fn validate_l1(
    meta: &Meta,
    header: &Header,
    l1: L1Location,
    what: &str,
) -> Result<(), Qcow2Error> {
    let L1Location {
        offset,
        entries,
        field_at,
    } = l1;
    if u64::from(entries) > MAX_L1_ENTRIES {
        return Err(Qcow2Error::too_large(format!(
            "{what}: L1 table of {entries} entries (limit {MAX_L1_ENTRIES})"
        )));
    }
    if entries == 0 {
        return Ok(());
    }
    let cluster_size = 1u64 << header.cluster_bits;
    if offset == 0 {
        // Offset 0 is the header itself: point at the field that says 0.
        return Err(Qcow2Error::malformed(
            format!("{what}: L1 table of {entries} entries has offset 0 (the header)"),
            field_at,
        ));
    }
    if !offset.is_multiple_of(cluster_size) {
        return Err(Qcow2Error::malformed(
            format!("{what}: L1 table offset is not cluster-aligned"),
            offset,
        ));
    }
    let end = offset
        .checked_add(u64::from(entries) * 8)
        .filter(|&e| e <= meta.file_size);
    if end.is_none() {
        return Err(Qcow2Error::malformed(
            format!(
                "{what}: L1 table of {entries} entries extends past the end of the file ({} bytes)",
                meta.file_size
            ),
            offset,
        ));
    }
    Ok(())
}
