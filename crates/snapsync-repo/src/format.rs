//! The on-disk (on-object) format, version 2 (reads version 1). `docs/FORMAT.md` is the
//! prose version of this file; the two must agree.
//!
//! Every metadata object is wrapped in an [`envelope`](encode_envelope):
//!
//! ```text
//! magic    8 bytes  one of the MAGIC_* constants, fixed forever
//! version  u32 LE   format version of this object (1 or 2)
//! length   u64 LE   payload length
//! payload  length bytes
//! check    32 bytes BLAKE3 of all the bytes before
//! ```
//!
//! so a truncated, damaged or foreign file is recognised as such before any of it is
//! parsed. Pack files hold block data only and are checked block by block against the
//! block ids (BLAKE3 of the plaintext), so they need no checksum of their own.

use serde::{Deserialize, Serialize};
use snapsync_core::{BlockId, BlockRef, Delta, Hint, Origin, SnapshotId, Timestamp};
use snapsync_store::{Result, StoreError};

/// The repository format version this code writes. Version 2 changed only the manifest
/// (a part table, large maps split into part objects); every other object is laid out as
/// in version 1 and carries the version it was written with.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this code reads (and extends).
pub const OLDEST_READABLE_VERSION: u32 = 1;
/// The format version of an encrypted repository's objects: laid out as version 2
/// inside, each object's payload (and each block of a pack) sealed (see
/// [`crate::crypt`]). Plain repositories are never written as version 3.
pub const ENCRYPTED_FORMAT_VERSION: u32 = 3;
/// The newest format version this code reads.
pub const NEWEST_READABLE_VERSION: u32 = ENCRYPTED_FORMAT_VERSION;

/// Magic of the repository configuration object.
pub const MAGIC_CONFIG: &[u8; 8] = b"SNSYCONF";
/// Magic of a pack index.
pub const MAGIC_INDEX: &[u8; 8] = b"SNSYINDX";
/// Magic of a snapshot manifest.
pub const MAGIC_MANIFEST: &[u8; 8] = b"SNSYMANI";
/// Magic of a volume catalog generation.
pub const MAGIC_CATALOG: &[u8; 8] = b"SNSYCATL";
/// Magic at the start of a pack file.
pub const MAGIC_PACK: &[u8; 8] = b"SNSYPACK";
/// Magic of one part of a large manifest's entries (version 2).
pub const MAGIC_MANIFEST_PART: &[u8; 8] = b"SNSYMPRT";
/// Magic of a key object of an encrypted repository (version 3).
pub const MAGIC_KEY: &[u8; 8] = b"SNSYKEYS";

/// Entries per manifest part: a manifest with more is split into parts of this many
/// (the last one shorter), each its own object, so that a map of 16 M blocks is written
/// and read a part (~650 KiB) at a time and a lookup loads one part, not the map.
/// Readers take any part sizes the part table states.
pub const PART_ENTRIES: usize = if cfg!(test) { 7 } else { 16 << 10 };

/// Envelope header: magic, version, length.
pub const ENVELOPE_HEADER: usize = 8 + 4 + 8;
/// Envelope trailer: the checksum.
pub const ENVELOPE_TRAILER: usize = 32;
/// Pack header: magic, version, reserved.
pub const PACK_HEADER: usize = 16;

const _: () = assert!(ENVELOPE_HEADER == 20 && PACK_HEADER == 16);

/// Wrap a payload.
pub fn encode_envelope(magic: &[u8; 8], payload: &[u8]) -> Vec<u8> {
    encode_envelope_version(magic, FORMAT_VERSION, payload)
}

/// Wrap a payload, stating format `version`.
pub fn encode_envelope_version(magic: &[u8; 8], version: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(ENVELOPE_HEADER + payload.len() + ENVELOPE_TRAILER);
    v.extend_from_slice(magic);
    v.extend_from_slice(&version.to_le_bytes());
    v.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    v.extend_from_slice(payload);
    let check = blake3::hash(&v);
    v.extend_from_slice(check.as_bytes());
    v
}

/// Unwrap and check a payload; `location` names the object in errors.
pub fn decode_envelope<'a>(magic: &[u8; 8], bytes: &'a [u8], location: &str) -> Result<&'a [u8]> {
    let len = envelope_payload_len(magic, bytes, location)?;
    decode_envelope_body(bytes, len, location)
}

/// Check the start of an object (at least its envelope header and trailer's worth of
/// bytes, or all of it if shorter): magic and version. Returns the payload length its
/// header states.
pub(crate) fn envelope_payload_len(magic: &[u8; 8], bytes: &[u8], location: &str) -> Result<u64> {
    let corrupt = |d: String| StoreError::corrupt(location, d);
    let known = [
        MAGIC_CONFIG,
        MAGIC_INDEX,
        MAGIC_MANIFEST,
        MAGIC_CATALOG,
        MAGIC_PACK,
        MAGIC_MANIFEST_PART,
        MAGIC_KEY,
    ];
    let head = &bytes[..bytes.len().min(8)];
    if head != &magic[..head.len()] || (head.len() == 8 && head != magic) {
        return Err(if known.iter().any(|m| head == &m[..]) {
            corrupt(format!(
                "wrong object type {:?} (expected {:?})",
                String::from_utf8_lossy(head),
                String::from_utf8_lossy(magic)
            ))
        } else {
            corrupt("not a snapsync object (foreign file: bad magic)".into())
        });
    }
    if bytes.len() < ENVELOPE_HEADER + ENVELOPE_TRAILER {
        return Err(corrupt(format!(
            "too short to be a snapsync object ({} bytes; truncated?)",
            bytes.len()
        )));
    }
    let version = envelope_version(bytes);
    if !(OLDEST_READABLE_VERSION..=NEWEST_READABLE_VERSION).contains(&version) {
        return Err(StoreError::Unsupported {
            what: format!(
                "{location} has format version {version}; this snapsync reads versions \
                 {OLDEST_READABLE_VERSION} to {NEWEST_READABLE_VERSION}"
            ),
        });
    }
    Ok(u64::from_le_bytes(
        bytes[12..20].try_into().expect("8 bytes"),
    ))
}

/// The format version an envelope states (check it with [`envelope_payload_len`]).
pub(crate) fn envelope_version(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"))
}

/// The rest of [`decode_envelope`], once the header checked out.
fn decode_envelope_body<'a>(bytes: &'a [u8], len: u64, location: &str) -> Result<&'a [u8]> {
    let corrupt = |d: String| StoreError::corrupt(location, d);
    let expect = (ENVELOPE_HEADER as u64)
        .checked_add(len)
        .and_then(|x| x.checked_add(ENVELOPE_TRAILER as u64));
    if expect != Some(bytes.len() as u64) {
        return Err(corrupt(format!(
            "length field says {len} payload bytes but the object has {} bytes (truncated?)",
            bytes.len()
        )));
    }
    let (body, check) = bytes.split_at(bytes.len() - ENVELOPE_TRAILER);
    if blake3::hash(body).as_bytes() != check {
        return Err(corrupt("checksum mismatch (damaged)".into()));
    }
    Ok(&body[ENVELOPE_HEADER..])
}

/// Repository configuration, stored at `config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Random id of this repository; also its system id as a replication source.
    pub repository_id: String,
    /// Block size in bytes, fixed at init.
    pub block_size: u64,
    /// When it was created.
    pub created: Timestamp,
    /// True when `init` checked that the store refuses a second create-only put of the
    /// same key (the promise every commit relies on). Absent in older configs, in which
    /// case `open` checks instead.
    #[serde(default)]
    pub create_only_checked: bool,
    /// Present in an encrypted repository (format version 3): which scheme, and a MAC
    /// of the fields above under the repository's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

/// The `encryption` field of an encrypted repository's `config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    /// The scheme ([`crate::crypt::SCHEME`]).
    pub scheme: String,
    /// BLAKE3 keyed MAC (hex) of the repository id, block size and creation time.
    pub mac: String,
}

/// How a block is stored in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Compression {
    /// Stored as is (incompressible data).
    None = 0,
    /// A zstd frame.
    Zstd = 1,
}

/// Where a block lives: one entry of a pack index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// BLAKE3 of the plaintext.
    pub id: BlockId,
    /// Byte offset in the pack.
    pub offset: u64,
    /// Stored (possibly compressed) length.
    pub stored_len: u32,
    /// Plaintext length (the block size).
    pub raw_len: u32,
    /// How it is stored.
    pub compression: Compression,
}

/// Size of one encoded [`IndexEntry`].
pub const INDEX_ENTRY_LEN: usize = 32 + 8 + 4 + 4 + 1;

/// Encode a pack index payload: `count u64`, then entries.
/// Domain-separation context for pack ids. Frozen: readers never derive a pack id, but
/// writers must keep naming the same content the same way.
const PACK_ID_CONTEXT: &str = "snapsync 2026-11-29 pack id v1";

/// A pack's id: BLAKE3 (derive-key) of its encoded index, which lists the plaintext ids,
/// offsets and lengths of its blocks. Content-derived, so a retried upload writes the
/// same object, and cheap: the block ids already hash the plaintext, so hashing the
/// pack's (compressed) bytes again would cost a second pass over all data.
pub fn pack_id(encoded_index: &[u8]) -> BlockId {
    let mut h = blake3::Hasher::new_derive_key(PACK_ID_CONTEXT);
    h.update(encoded_index);
    BlockId(*h.finalize().as_bytes())
}

pub fn encode_index(entries: &[IndexEntry]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + entries.len() * INDEX_ENTRY_LEN);
    v.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for e in entries {
        v.extend_from_slice(e.id.as_bytes());
        v.extend_from_slice(&e.offset.to_le_bytes());
        v.extend_from_slice(&e.stored_len.to_le_bytes());
        v.extend_from_slice(&e.raw_len.to_le_bytes());
        v.push(e.compression as u8);
    }
    encode_envelope(MAGIC_INDEX, &v)
}

/// Decode a pack index.
pub fn decode_index(bytes: &[u8], location: &str) -> Result<Vec<IndexEntry>> {
    let p = decode_envelope(MAGIC_INDEX, bytes, location)?;
    let corrupt = |d: &str| StoreError::corrupt(location, d.to_string());
    if p.len() < 8 {
        return Err(corrupt("index payload too short"));
    }
    let count = u64::from_le_bytes(p[..8].try_into().expect("8 bytes"));
    let body = &p[8..];
    if count.checked_mul(INDEX_ENTRY_LEN as u64) != Some(body.len() as u64) {
        return Err(corrupt("index entry count does not match its length"));
    }
    body.chunks_exact(INDEX_ENTRY_LEN)
        .map(|c| {
            let compression = match c[48] {
                0 => Compression::None,
                1 => Compression::Zstd,
                x => return Err(corrupt(&format!("unknown compression {x}"))),
            };
            Ok(IndexEntry {
                id: BlockId(c[..32].try_into().expect("32 bytes")),
                offset: u64::from_le_bytes(c[32..40].try_into().expect("8 bytes")),
                stored_len: u32::from_le_bytes(c[40..44].try_into().expect("4 bytes")),
                raw_len: u32::from_le_bytes(c[44..48].try_into().expect("4 bytes")),
                compression,
            })
        })
        .collect()
}

/// Content-addressed id of a manifest: BLAKE3 of its encoded bytes (in version 2, of
/// the object that holds its part table; each part is checked by its own id there).
pub type ManifestId = BlockId;

/// The fixed fields of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestHeader {
    /// Volume it was committed to.
    pub volume: String,
    /// Snapshot name.
    pub name: String,
    /// Identity (preserved from the source).
    pub id: SnapshotId,
    /// Age.
    pub created: Timestamp,
    /// Size in bytes.
    pub size: u64,
    /// Block size of the map.
    pub block_size: u64,
    /// The manifest this delta is relative to; `None` for a full map.
    pub delta_base: Option<ManifestId>,
    /// The manifest's number along its volume's line of snapshots since the full map
    /// (0 for a full map). In version 1 every delta was based on the previous number, so
    /// this was also the number of deltas to the full map; version 2 bases number `n` on
    /// number `n - lowbit(n)` (see `crate::chain`), and keeps the name.
    pub depth: u32,
    /// Root hash of the snapshot's whole block map ([`snapsync_core::BlockMap::root_hash`]).
    /// Version 1 wrote it for every manifest; version 2 only for full maps, where it
    /// costs nothing extra (computing it for a delta would read the whole map below it,
    /// which is what version 2 avoids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<BlockId>,
    /// Packs holding the blocks of this delta's entries when it was written: a reader
    /// loads only these packs' indexes. A hint: after gc repacks, readers fall back to
    /// the full index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packs: Vec<BlockId>,
}

/// A snapshot manifest: header plus the delta entries against `delta_base`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Fixed fields.
    pub header: ManifestHeader,
    /// Entries that differ from the base.
    pub delta: Delta,
}

/// One part of a version-2 manifest's entries, as its part table names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartRef {
    /// Block index of its first entry.
    pub first: u64,
    /// Block index of its last entry.
    pub last: u64,
    /// Number of entries.
    pub count: u64,
    /// BLAKE3 of the part object.
    pub id: BlockId,
}

/// Size of one encoded [`PartRef`].
pub const PART_REF_LEN: usize = 8 + 8 + 8 + 32;

/// Append one entry: `index u64, kind u8 (0 zero, 1 data), id [32] (data only)`.
pub(crate) fn encode_entry(v: &mut Vec<u8>, index: u64, block: &BlockRef) {
    v.extend_from_slice(&index.to_le_bytes());
    match block {
        BlockRef::Zero => v.push(0),
        BlockRef::Data(id) => {
            v.push(1);
            v.extend_from_slice(id.as_bytes());
        }
    }
}

/// Encode a manifest's head object: `header_len u32`, header JSON, `block_count u64`,
/// `count u64` (all entries), `parts u32`, then either the part table (`parts` entries
/// of [`PartRef`]) or, with no parts, the `count` entries inline.
pub fn encode_manifest_head(
    header: &ManifestHeader,
    block_count: u64,
    count: u64,
    parts: &[PartRef],
    inline_entries: &[u8],
) -> Vec<u8> {
    debug_assert!(parts.is_empty() || inline_entries.is_empty());
    let header = serde_json::to_vec(header).expect("manifest header serialises");
    let mut v = Vec::with_capacity(
        4 + header.len() + 20 + parts.len() * PART_REF_LEN + inline_entries.len(),
    );
    v.extend_from_slice(&(header.len() as u32).to_le_bytes());
    v.extend_from_slice(&header);
    v.extend_from_slice(&block_count.to_le_bytes());
    v.extend_from_slice(&count.to_le_bytes());
    v.extend_from_slice(&(parts.len() as u32).to_le_bytes());
    for p in parts {
        v.extend_from_slice(&p.first.to_le_bytes());
        v.extend_from_slice(&p.last.to_le_bytes());
        v.extend_from_slice(&p.count.to_le_bytes());
        v.extend_from_slice(p.id.as_bytes());
    }
    v.extend_from_slice(inline_entries);
    encode_envelope(MAGIC_MANIFEST, &v)
}

/// Encode a manifest small enough to hold its entries inline (at most
/// [`PART_ENTRIES`]; larger ones are written by the repository's manifest writer).
pub fn encode_manifest(m: &Manifest) -> Vec<u8> {
    let mut entries = Vec::with_capacity(m.delta.entries.len() * 41);
    for (i, r) in &m.delta.entries {
        encode_entry(&mut entries, *i, r);
    }
    encode_manifest_head(
        &m.header,
        m.delta.block_count,
        m.delta.entries.len() as u64,
        &[],
        &entries,
    )
}

/// Encode a part object: `count u64`, then the entries.
pub fn encode_part(count: u64, entries: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + entries.len());
    v.extend_from_slice(&count.to_le_bytes());
    v.extend_from_slice(entries);
    encode_envelope(MAGIC_MANIFEST_PART, &v)
}

/// Decode and check a part object against what the part table says of it (`block_count`
/// is its manifest's).
pub fn decode_part(
    bytes: &[u8],
    part: &PartRef,
    block_count: u64,
    location: &str,
) -> Result<Vec<(u64, BlockRef)>> {
    if BlockId::of(bytes) != part.id {
        return Err(StoreError::corrupt(
            location,
            "content does not match its id (damaged)",
        ));
    }
    decode_part_unchecked(bytes, part, block_count, location)
}

/// [`decode_part`] without the id check (done by the caller, who knows how ids are
/// derived: keyed in an encrypted repository).
pub(crate) fn decode_part_unchecked(
    bytes: &[u8],
    part: &PartRef,
    block_count: u64,
    location: &str,
) -> Result<Vec<(u64, BlockRef)>> {
    let corrupt = |d: String| StoreError::corrupt(location, d);
    let p = decode_envelope(MAGIC_MANIFEST_PART, bytes, location)?;
    let mut r = Cursor { p, pos: 0 };
    let count = r.u64().ok_or_else(|| corrupt("truncated part".into()))?;
    if count != part.count || count == 0 || count > p.len() as u64 / 9 {
        return Err(corrupt(format!(
            "part holds {count} entries, its manifest says {}",
            part.count
        )));
    }
    let entries = parse_entries(&mut r, count, block_count, location)?;
    if r.pos != p.len() {
        return Err(corrupt("trailing bytes after entries".into()));
    }
    if entries.first().map(|e| e.0) != Some(part.first)
        || entries.last().map(|e| e.0) != Some(part.last)
    {
        return Err(corrupt("entries do not span what its manifest says".into()));
    }
    Ok(entries)
}

/// Decode a manifest whose entries are inline (version 1, or a small version-2 one),
/// checking its structure (entries sorted and in range).
///
/// Given the bytes by value, it frees them once parsed, before building the map: the
/// encoded entries, the parsed ones and the map are each about as large, and the first
/// need not live alongside the last.
pub fn decode_manifest(bytes: impl AsRef<[u8]>, location: &str) -> Result<Manifest> {
    let (head, entries) = parse_manifest(bytes.as_ref(), location)?;
    drop(bytes);
    if !head.parts.is_empty() {
        return Err(StoreError::corrupt(
            location,
            "manifest is in parts (read it through the repository)",
        ));
    }
    let delta = Delta {
        block_count: head.block_count,
        entries: entries.into_iter().collect(),
    };
    Ok(Manifest {
        header: head.header,
        delta,
    })
}

/// A manifest's fields before its entries.
#[derive(Debug)]
pub(crate) struct ManifestHead {
    pub(crate) header: ManifestHeader,
    pub(crate) block_count: u64,
    /// Number of entries (in all parts).
    pub(crate) count: u64,
    /// The part table (version 2; empty when the entries are inline).
    pub(crate) parts: Vec<PartRef>,
    /// Payload bytes these fields take: inline entries start there.
    pub(crate) len: usize,
}

/// Parse and check the fields before a manifest's entries from the start `p` of its
/// payload (of `payload_len` bytes in all, written with format `version`); `None` when
/// `p` ends before they do.
pub(crate) fn parse_manifest_head(
    p: &[u8],
    payload_len: u64,
    version: u32,
    location: &str,
) -> Result<Option<ManifestHead>> {
    let corrupt = |d: String| StoreError::corrupt(location, d);
    let truncated = |what: &str| -> Result<Option<ManifestHead>> {
        if (p.len() as u64) < payload_len {
            Ok(None)
        } else {
            Err(corrupt(format!("truncated {what}")))
        }
    };
    let mut r = Cursor { p, pos: 0 };
    let Some(hlen) = r.u32() else {
        return truncated("header length");
    };
    let Some(hbytes) = r.take(hlen as usize) else {
        return truncated("header");
    };
    let header: ManifestHeader =
        serde_json::from_slice(hbytes).map_err(|e| corrupt(format!("bad manifest header: {e}")))?;
    let Some(block_count) = r.u64() else {
        return truncated("block count");
    };
    let Some(count) = r.u64() else {
        return truncated("entry count");
    };
    if count > block_count {
        return Err(corrupt(format!("implausible entry count {count}")));
    }
    if header.size.div_ceil(header.block_size.max(1)) != block_count || header.block_size == 0 {
        return Err(corrupt(
            "block count does not match size and block size".into(),
        ));
    }
    if version < 2 && header.root.is_none() {
        return Err(corrupt("version-1 manifest without a root hash".into()));
    }
    let mut parts = Vec::new();
    if version >= 2 {
        let Some(n) = r.u32() else {
            return truncated("part count");
        };
        if n as u64 > count || (n as u64) * PART_REF_LEN as u64 > payload_len {
            return Err(corrupt(format!("implausible part count {n}")));
        }
        for _ in 0..n {
            let (Some(first), Some(last), Some(c), Some(id)) =
                (r.u64(), r.u64(), r.u64(), r.take(32))
            else {
                return truncated("part table");
            };
            parts.push(PartRef {
                first,
                last,
                count: c,
                id: BlockId(id.try_into().expect("32 bytes")),
            });
        }
        check_part_table(&parts, count, block_count).map_err(corrupt)?;
    }
    let inline = if parts.is_empty() { count } else { 0 };
    if inline > payload_len.saturating_sub(r.pos as u64) / 9 {
        return Err(corrupt(format!("implausible entry count {count}")));
    }
    Ok(Some(ManifestHead {
        header,
        block_count,
        count,
        parts,
        len: r.pos,
    }))
}

/// The part table's promises: parts in index order, not overlapping, inside the map,
/// each plausible, and as many entries in all as the manifest says.
fn check_part_table(
    parts: &[PartRef],
    count: u64,
    block_count: u64,
) -> std::result::Result<(), String> {
    if parts.is_empty() {
        return Ok(());
    }
    let mut total = 0u64;
    let mut after = 0u64;
    for (k, p) in parts.iter().enumerate() {
        let span = p.last.checked_sub(p.first).map(|s| s + 1);
        if p.first < after
            || p.last >= block_count
            || span.is_none_or(|s| p.count > s)
            || p.count == 0
        {
            return Err(format!(
                "part {k} of the part table is out of order or range"
            ));
        }
        after = p.last + 1;
        total = total.saturating_add(p.count);
    }
    if total != count {
        return Err(format!(
            "parts hold {total} entries, the manifest says {count}"
        ));
    }
    Ok(())
}

/// `count` entries from `r`, checked: in index order, below `block_count`, known kinds.
fn parse_entries(
    r: &mut Cursor<'_>,
    count: u64,
    block_count: u64,
    location: &str,
) -> Result<Vec<(u64, BlockRef)>> {
    let corrupt = |d: String| StoreError::corrupt(location, d);
    let mut entries = Vec::with_capacity(count as usize);
    let mut last: Option<u64> = None;
    for _ in 0..count {
        let i = r.u64().ok_or_else(|| corrupt("truncated entry".into()))?;
        if last.is_some_and(|l| l >= i) || i >= block_count {
            return Err(corrupt(format!("entry {i} out of order or range")));
        }
        last = Some(i);
        let kind = r.take(1).ok_or_else(|| corrupt("truncated entry".into()))?[0];
        let b = match kind {
            0 => BlockRef::Zero,
            1 => BlockRef::Data(BlockId(
                r.take(32)
                    .ok_or_else(|| corrupt("truncated entry".into()))?
                    .try_into()
                    .expect("32 bytes"),
            )),
            k => return Err(corrupt(format!("unknown entry kind {k}"))),
        };
        entries.push((i, b));
    }
    Ok(entries)
}

/// A manifest's head and its inline entries (none when it is in parts).
pub(crate) fn parse_manifest(
    bytes: &[u8],
    location: &str,
) -> Result<(ManifestHead, Vec<(u64, BlockRef)>)> {
    let p = decode_envelope(MAGIC_MANIFEST, bytes, location)?;
    let corrupt = |d: String| StoreError::corrupt(location, d);
    let head = parse_manifest_head(p, p.len() as u64, envelope_version(bytes), location)?
        .ok_or_else(|| corrupt("truncated manifest".into()))?;
    let mut r = Cursor { p, pos: head.len };
    let inline = if head.parts.is_empty() { head.count } else { 0 };
    // Collected, then built in one pass by the caller: a tree built by inserting sorted
    // keys one by one leaves its nodes about half full, 1.5 times the memory.
    let entries = parse_entries(&mut r, inline, head.block_count, location)?;
    if r.pos != p.len() {
        return Err(corrupt("trailing bytes after entries".into()));
    }
    Ok((head, entries))
}

struct Cursor<'a> {
    p: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.p.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// One snapshot in a catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogSnapshot {
    /// Name.
    pub name: String,
    /// Identity.
    pub id: SnapshotId,
    /// Age.
    pub created: Timestamp,
    /// Size.
    pub size: u64,
    /// Its manifest.
    pub manifest: ManifestId,
}

/// Hints from one source volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceHints {
    /// The source's system id.
    pub source_system: String,
    /// The source's volume.
    pub source_volume: String,
    /// What this repository holds of it.
    pub snapshots: Vec<Hint>,
}

/// One generation of a volume's catalog: the commit point of the volume. Stored at
/// `volumes/<volume>/<generation as 16 hex digits>`, created with a create-only put, so
/// of two writers committing the same generation exactly one wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Catalog {
    /// Volume name.
    pub volume: String,
    /// Generation number, starting at 1.
    pub generation: u64,
    /// Lineage if the volume is a clone.
    pub origin: Option<Origin>,
    /// Snapshots, oldest first.
    pub snapshots: Vec<CatalogSnapshot>,
    /// Hints about the sources of this volume's snapshots.
    pub hints: Vec<SourceHints>,
}

/// Encode anything JSON-shaped in an envelope.
pub fn encode_json<T: Serialize>(magic: &[u8; 8], value: &T) -> Vec<u8> {
    encode_envelope(magic, &serde_json::to_vec(value).expect("serialisable"))
}

/// Decode an enveloped JSON object.
pub fn decode_json<T: for<'de> Deserialize<'de>>(
    magic: &[u8; 8],
    bytes: &[u8],
    location: &str,
) -> Result<T> {
    let p = decode_envelope(magic, bytes, location)?;
    serde_json::from_slice(p)
        .map_err(|e| StoreError::corrupt(location, format!("bad content: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_detects_damage() {
        let e = encode_envelope(MAGIC_CONFIG, b"hello");
        assert_eq!(decode_envelope(MAGIC_CONFIG, &e, "x").unwrap(), b"hello");
        for i in 0..e.len() {
            let mut bad = e.clone();
            bad[i] ^= 1;
            assert!(
                decode_envelope(MAGIC_CONFIG, &bad, "x").is_err(),
                "flip at {i}"
            );
        }
        for n in 0..e.len() {
            assert!(decode_envelope(MAGIC_CONFIG, &e[..n], "x").is_err());
        }
        assert!(decode_envelope(MAGIC_INDEX, &e, "x").is_err());
    }

    #[test]
    fn manifest_roundtrip() {
        let mut delta = Delta {
            block_count: 10,
            entries: Default::default(),
        };
        delta.entries.insert(1, BlockRef::Zero);
        delta.entries.insert(7, BlockRef::Data(BlockId::of(b"x")));
        let m = Manifest {
            header: ManifestHeader {
                volume: "v".into(),
                name: "s".into(),
                id: SnapshotId::derive("a", "b", "c", Timestamp::new(1, 2)),
                created: Timestamp::new(1, 2),
                size: 10 * 4096 - 5,
                block_size: 4096,
                delta_base: Some(BlockId::of(b"base")),
                depth: 3,
                root: Some(BlockId::of(b"root")),
                packs: vec![BlockId::of(b"pack")],
            },
            delta,
        };
        let bytes = encode_manifest(&m);
        assert_eq!(decode_manifest(&bytes, "m").unwrap(), m);
    }

    #[test]
    fn index_roundtrip() {
        let e = vec![IndexEntry {
            id: BlockId::of(b"a"),
            offset: 16,
            stored_len: 10,
            raw_len: 4096,
            compression: Compression::Zstd,
        }];
        assert_eq!(decode_index(&encode_index(&e), "i").unwrap(), e);
    }
}
