//! Manifests read as streams: a snapshot's delta chain walked in index order, a piece
//! of each manifest at a time, instead of decoded whole.
//!
//! A decoded manifest holds about 40 bytes per entry, and the full map at the end of
//! every chain lists every data block of its snapshot: 5 MiB for 8 GiB of data, 640 MiB
//! for 1 TiB. Reading a snapshot from front to back (a restore, a copy out of the
//! repository) needs only the entries at the current position, so the read path
//! streams them and its memory does not grow with the snapshot.
//!
//! A version-2 manifest is a small object (its header and part table, or a few entries
//! inline), checked whole against its id, and parts of at most
//! [`format::PART_ENTRIES`] entries, each checked against the id its part table names
//! when it is loaded. A walk loads one part at a time, and a lookup far ahead skips the
//! parts between without reading them, so a random read of a 16 M-block snapshot loads
//! one part per manifest of its chain.
//!
//! A version-1 manifest holds all its entries in one object. It is checked whole before
//! any of it is used, exactly as a decoded one is (its id is the BLAKE3 of its bytes,
//! its envelope's checksum, its header), by reading it through once; its entries are
//! then read a second time, piece by piece, hashed again on the way and checked at the
//! end, so that an object that changed in between is reported rather than trusted.

use snapsync_core::{BlockId, BlockRef};
#[cfg(test)]
use snapsync_core::{BlockMap, RootHasher};
use snapsync_store::{Result, StoreError};

use crate::format::{
    self, ManifestHead, ManifestId, ENVELOPE_HEADER, ENVELOPE_TRAILER, MAGIC_MANIFEST,
};
use crate::repo::{key_manifest, key_part, Repository};
use crate::spill::{Changes, ChangesIter};

/// Bytes of a manifest read at a time (an odd few in tests, to cross every boundary).
const PIECE: usize = if cfg!(test) { 4099 } else { 256 << 10 };

/// A manifest checked whole, with the fields before its entries.
#[derive(Debug)]
pub(crate) struct CheckedManifest {
    pub(crate) id: ManifestId,
    pub(crate) head: ManifestHead,
    /// Length of the whole object.
    len: u64,
    /// Version 2: the entries held inline (none when the manifest is in parts).
    /// Version 1 (`None`): the entries are read from the object, a piece at a time.
    inline: Option<std::sync::Arc<Vec<(u64, BlockRef)>>>,
}

impl CheckedManifest {
    /// Whether it is a version-1 manifest (all entries in one object, read in
    /// pieces), rather than a version-2 one (inline or in parts).
    pub(crate) fn is_v1(&self) -> bool {
        self.inline.is_none()
    }
}

impl Repository {
    /// Check manifest `id` whole, reading it a piece at a time, and parse the fields
    /// before its entries.
    pub(crate) fn check_manifest(&self, id: &ManifestId) -> Result<CheckedManifest> {
        let key = key_manifest(id);
        let location = self.describe(&key);
        let corrupt = |d: &str| StoreError::corrupt(location.clone(), d.to_string());
        let mut start = [0u8; ENVELOPE_HEADER + ENVELOPE_TRAILER];
        self.read_piece(&key, 0, &mut start).map_err(|e| match e {
            StoreError::NotFound { .. } => corrupt("manifest is missing"),
            e => e,
        })?;
        let payload = format::envelope_payload_len(MAGIC_MANIFEST, &start, &location)?;
        if format::envelope_version(&start) >= 2 || self.is_encrypted() {
            return self.check_manifest_v2(id, &key);
        }
        let len = (ENVELOPE_HEADER as u64 + ENVELOPE_TRAILER as u64)
            .checked_add(payload)
            .ok_or_else(|| corrupt("implausible length"))?;
        let body_end = len - ENVELOPE_TRAILER as u64;
        let mut all = blake3::Hasher::new();
        let mut body = blake3::Hasher::new();
        // The payload's first bytes, until they hold the fields before the entries.
        let mut head_bytes: Vec<u8> = Vec::new();
        let mut head = None;
        let mut buf = vec![0u8; PIECE];
        let mut at = 0u64;
        let mut check = [0u8; ENVELOPE_TRAILER];
        while at < len {
            let n = (len - at).min(PIECE as u64) as usize;
            let piece = &mut buf[..n];
            self.read_piece(&key, at, piece)?;
            all.update(piece);
            let in_body = (body_end.saturating_sub(at) as usize).min(n);
            body.update(&piece[..in_body]);
            if in_body < n {
                // The trailer (which may straddle two pieces).
                let t = (at + in_body as u64 - body_end) as usize;
                check[t..t + n - in_body].copy_from_slice(&piece[in_body..]);
            }
            if head.is_none() && in_body > 0 {
                let from = (ENVELOPE_HEADER as u64).saturating_sub(at) as usize;
                if from < in_body {
                    head_bytes.extend_from_slice(&piece[from..in_body]);
                    head = format::parse_manifest_head(&head_bytes, payload, 1, &location)?;
                }
            }
            at += n as u64;
        }
        if BlockId(*all.finalize().as_bytes()) != *id {
            return Err(corrupt("content does not match its id (damaged)"));
        }
        if body.finalize().as_bytes() != &check {
            return Err(corrupt("checksum mismatch (damaged)"));
        }
        let head = head.ok_or_else(|| corrupt("truncated header"))?;
        Ok(CheckedManifest {
            id: *id,
            head,
            len,
            inline: None,
        })
    }

    /// [`Repository::check_manifest`] of a version-2 manifest: a small object, read
    /// whole.
    fn check_manifest_v2(&self, id: &ManifestId, key: &str) -> Result<CheckedManifest> {
        let location = self.describe(key);
        let bytes = self
            .backend
            .get(key)?
            .ok_or_else(|| StoreError::corrupt(location.clone(), "manifest is missing"))?;
        let bytes = self.open_object(MAGIC_MANIFEST, key, &bytes)?;
        if self.object_id(&bytes) != *id {
            return Err(StoreError::corrupt(
                location,
                "content does not match its id (damaged)",
            ));
        }
        let (head, inline) = format::parse_manifest(&bytes, &location)?;
        Ok(CheckedManifest {
            id: *id,
            head,
            len: bytes.len() as u64,
            inline: Some(std::sync::Arc::new(inline)),
        })
    }

    /// Load part `part` of a manifest whose map has `block_count` blocks.
    pub(crate) fn load_part(
        &self,
        part: &format::PartRef,
        block_count: u64,
    ) -> Result<Vec<(u64, BlockRef)>> {
        let key = key_part(&part.id);
        let location = self.describe(&key);
        let bytes = self
            .backend
            .get(&key)?
            .ok_or_else(|| StoreError::corrupt(location.clone(), "manifest part is missing"))?;
        let bytes = self.open_object(format::MAGIC_MANIFEST_PART, &key, &bytes)?;
        if self.object_id(&bytes) != part.id {
            return Err(StoreError::corrupt(
                location,
                "content does not match its id (damaged)",
            ));
        }
        format::decode_part_unchecked(&bytes, part, block_count, &location)
    }

    /// The manifests of a delta chain from `id` down to its full map, checked.
    pub(crate) fn checked_chain(&self, id: &ManifestId) -> Result<Vec<CheckedManifest>> {
        let mut chain = vec![self.check_manifest(id)?];
        while let Some(base) = chain.last().expect("one").head.header.delta_base {
            if chain.len() > crate::MAX_CHAIN_LEN * 4 {
                return Err(StoreError::corrupt(
                    self.describe(&key_manifest(id)),
                    "delta chain is too long or cyclic",
                ));
            }
            chain.push(self.check_manifest(&base)?);
        }
        Ok(chain)
    }

    /// The depth of manifest `id`: from the cache if it is there, else read from the
    /// manifest without decoding its entries.
    pub(crate) fn manifest_depth(&self, id: &ManifestId) -> Result<u32> {
        if let Some(m) = self.cached_manifest(id) {
            return Ok(m.header.depth);
        }
        Ok(self.check_manifest(id)?.head.header.depth)
    }

    fn read_piece(&self, key: &str, offset: u64, dst: &mut [u8]) -> Result<()> {
        self.backend
            .read_ranges_into(&mut [(key.to_string(), offset, dst)])
    }
}

/// The entries of one checked manifest, in index order.
pub(crate) enum EntryStream<'a> {
    /// Version 1: read from the one object, a piece at a time.
    V1(Box<V1Stream<'a>>),
    /// Version 2: inline, or a part at a time.
    V2(PartStream<'a>),
}

impl<'a> EntryStream<'a> {
    pub(crate) fn new(repo: &'a Repository, m: &CheckedManifest) -> Result<Self> {
        Ok(match &m.inline {
            None => EntryStream::V1(Box::new(V1Stream::new(repo, m)?)),
            Some(inline) => EntryStream::V2(PartStream {
                repo,
                parts: m.head.parts.clone(),
                block_count: m.head.block_count,
                page: inline.clone(),
                loaded: None,
                next_part: 0,
                pos: 0,
            }),
        })
    }

    /// The next entry, checked as [`format::decode_manifest`] checks them.
    pub(crate) fn next_entry(&mut self) -> Result<Option<(u64, BlockRef)>> {
        match self {
            EntryStream::V1(s) => s.next_entry(),
            EntryStream::V2(s) => s.next_entry(),
        }
    }

    /// Position the stream so that the next entry is the first at or after `index`,
    /// backwards as well as forwards. Version 2 loads at most the one part that holds
    /// it; version 1 cannot seek (`false`): the caller starts a new stream.
    pub(crate) fn seek(&mut self, index: u64) -> Result<bool> {
        match self {
            EntryStream::V1(_) => Ok(false),
            EntryStream::V2(s) => s.seek(index).map(|()| true),
        }
    }
}

/// The entries of a version-2 manifest: its inline entries, or its parts one at a time.
pub(crate) struct PartStream<'a> {
    repo: &'a Repository,
    parts: Vec<format::PartRef>,
    block_count: u64,
    /// The entries at hand: the inline ones, or the part `loaded`.
    page: std::sync::Arc<Vec<(u64, BlockRef)>>,
    loaded: Option<usize>,
    /// The part to load when `page` is used up.
    next_part: usize,
    pos: usize,
}

impl PartStream<'_> {
    fn load(&mut self, k: usize) -> Result<()> {
        if self.loaded != Some(k) {
            let part = self.repo.load_part(&self.parts[k], self.block_count)?;
            self.page = std::sync::Arc::new(part);
            self.loaded = Some(k);
        }
        self.next_part = k + 1;
        self.pos = 0;
        Ok(())
    }

    fn next_entry(&mut self) -> Result<Option<(u64, BlockRef)>> {
        while self.pos == self.page.len() {
            if self.next_part >= self.parts.len() {
                return Ok(None);
            }
            self.load(self.next_part)?;
        }
        self.pos += 1;
        Ok(Some(self.page[self.pos - 1]))
    }

    fn seek(&mut self, index: u64) -> Result<()> {
        if !self.parts.is_empty() {
            // The first part that ends at or after `index`.
            let k = self.parts.partition_point(|p| p.last < index);
            if k == self.parts.len() {
                self.page = Default::default();
                self.loaded = None;
                self.next_part = k;
                self.pos = 0;
                return Ok(());
            }
            self.load(k)?;
        }
        self.pos = self.page.partition_point(|(i, _)| *i < index);
        Ok(())
    }
}

/// The entries of one checked version-1 manifest, in index order, read a piece at a
/// time.
pub(crate) struct V1Stream<'a> {
    repo: &'a Repository,
    key: String,
    id: ManifestId,
    len: u64,
    block_count: u64,
    /// Unread bytes are `buf[pos..]`; the object is read up to `read`.
    buf: Vec<u8>,
    pos: usize,
    read: u64,
    hasher: blake3::Hasher,
    left: u64,
    last: Option<u64>,
    /// Whether the whole object was read and found unchanged.
    done: bool,
}

impl<'a> V1Stream<'a> {
    fn new(repo: &'a Repository, m: &CheckedManifest) -> Result<Self> {
        let mut s = Self {
            repo,
            key: key_manifest(&m.id),
            id: m.id,
            len: m.len,
            block_count: m.head.block_count,
            buf: Vec::with_capacity(PIECE),
            pos: 0,
            read: 0,
            hasher: blake3::Hasher::new(),
            left: m.head.count,
            last: None,
            done: false,
        };
        s.skip(ENVELOPE_HEADER + m.head.len)?;
        Ok(s)
    }

    fn corrupt(&self, detail: &str) -> StoreError {
        StoreError::corrupt(self.repo.describe(&self.key), detail.to_string())
    }

    /// Make at least `n` unread bytes available (fewer at the end of the object).
    fn fill(&mut self, n: usize) -> Result<()> {
        while self.buf.len() - self.pos < n && self.read < self.len {
            self.buf.drain(..self.pos);
            self.pos = 0;
            let have = self.buf.len();
            let k = (self.len - self.read).min(PIECE as u64) as usize;
            self.buf.resize(have + k, 0);
            self.repo
                .read_piece(&self.key, self.read, &mut self.buf[have..])?;
            self.hasher.update(&self.buf[have..]);
            self.read += k as u64;
        }
        Ok(())
    }

    fn skip(&mut self, mut n: usize) -> Result<()> {
        while n > 0 {
            self.fill(n.min(PIECE))?;
            let k = n.min(self.buf.len() - self.pos);
            if k == 0 {
                return Err(self.corrupt("truncated manifest"));
            }
            self.pos += k;
            n -= k;
        }
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        self.fill(n)?;
        if self.buf.len() - self.pos < n {
            return Err(self.corrupt("truncated entry"));
        }
        self.pos += n;
        Ok(&self.buf[self.pos - n..self.pos])
    }

    fn next_entry(&mut self) -> Result<Option<(u64, BlockRef)>> {
        if self.left == 0 {
            if !self.done {
                // What is left is the trailer: read it, so the whole object is hashed.
                let rest = (self.len - self.read) as usize + (self.buf.len() - self.pos);
                if rest != ENVELOPE_TRAILER {
                    return Err(self.corrupt("trailing bytes after entries"));
                }
                self.skip(rest)?;
                if BlockId(*self.hasher.finalize().as_bytes()) != self.id {
                    return Err(self.corrupt("changed while being read (damaged)"));
                }
                self.done = true;
            }
            return Ok(None);
        }
        let i = u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes"));
        if self.last.is_some_and(|l| l >= i) || i >= self.block_count {
            return Err(self.corrupt(&format!("entry {i} out of order or range")));
        }
        self.last = Some(i);
        let b = match self.take(1)?[0] {
            0 => BlockRef::Zero,
            1 => BlockRef::Data(BlockId(self.take(32)?.try_into().expect("32 bytes"))),
            k => return Err(self.corrupt(&format!("unknown entry kind {k}"))),
        };
        self.left -= 1;
        Ok(Some((i, b)))
    }
}

/// A snapshot being received, as the blocks received on top of its transfer base: the
/// base is read along its chain when needed, so that a receive holds the blocks it was
/// sent (spilled to disk past a bound, see [`Changes`]), not a map of the whole volume.
pub(crate) struct Overlay<'a> {
    pub(crate) repo: &'a Repository,
    /// The transfer base's manifest.
    pub(crate) base: Option<ManifestId>,
    pub(crate) block_count: u64,
    /// Blocks received, by index (all below `block_count`).
    pub(crate) changes: &'a Changes,
}

impl<'a> Overlay<'a> {
    /// The snapshot's data blocks, in index order.
    pub(crate) fn data(&self) -> Result<OverlayData<'a>> {
        let chain = match self.base {
            Some(b) => self.repo.checked_chain(&b)?,
            None => Vec::new(),
        };
        let mut cursor = ChainCursor::new(self.repo, &chain)?;
        let mut changes = self.changes.iter();
        Ok(OverlayData {
            next_base: cursor.next_data_entry()?,
            next_change: changes.next_entry()?,
            changes,
            cursor,
            block_count: self.block_count,
        })
    }

    /// The snapshot's [`BlockMap::root_hash`].
    #[cfg(test)]
    pub(crate) fn root_hash(&self) -> Result<BlockId> {
        let mut h = RootHasher::new(self.block_count);
        let mut data = self.data()?;
        while let Some((i, id)) = data.next_data()? {
            h.add(i, &id);
        }
        Ok(h.finish())
    }

    /// The snapshot's whole map (tests compare it with a model).
    #[cfg(test)]
    pub(crate) fn map(&self) -> Result<BlockMap> {
        let mut out = Vec::new();
        let mut data = self.data()?;
        while let Some(e) = data.next_data()? {
            out.push(e);
        }
        Ok(BlockMap::from_data(self.block_count, out))
    }
}

/// Data blocks in index order, one at a time: a snapshot's map streamed.
pub(crate) trait DataStream {
    /// The next data block (index and id), or `None` after the last.
    fn next_data(&mut self) -> Result<Option<(u64, BlockId)>>;
}

impl DataStream for ChainCursor<'_> {
    fn next_data(&mut self) -> Result<Option<(u64, BlockId)>> {
        self.next_data_entry()
    }
}

/// See [`Overlay::data`].
pub(crate) struct OverlayData<'a> {
    changes: ChangesIter<'a>,
    cursor: ChainCursor<'a>,
    block_count: u64,
    next_change: Option<(u64, crate::spill::Sent)>,
    next_base: Option<(u64, BlockId)>,
}

impl DataStream for OverlayData<'_> {
    fn next_data(&mut self) -> Result<Option<(u64, BlockId)>> {
        loop {
            let change = self.next_change.map(|(i, _)| i);
            let base = self.next_base.map(|(i, _)| i);
            let (index, id) = match (change, base) {
                (None, None) => return Ok(None),
                (Some(c), b) if b.is_none_or(|b| c <= b) => {
                    if b == Some(c) {
                        self.next_base = self.cursor.next_data_entry()?;
                    }
                    let (_, (block, _)) = self.next_change.expect("some");
                    self.next_change = self.changes.next_entry()?;
                    match block {
                        BlockRef::Data(id) => (c, id),
                        BlockRef::Zero => continue,
                    }
                }
                _ => {
                    let e = self.next_base.expect("some");
                    self.next_base = self.cursor.next_data_entry()?;
                    e
                }
            };
            if index >= self.block_count {
                return Ok(None);
            }
            return Ok(Some((index, id)));
        }
    }
}

/// The entries by which `target` differs from `base` (a snapshot of `block_count`
/// blocks against any other), in index order: [`Delta::between`] of two streamed maps.
pub(crate) fn delta_between(
    base: &mut dyn DataStream,
    target: &mut dyn DataStream,
    block_count: u64,
    mut f: impl FnMut(u64, BlockRef) -> Result<()>,
) -> Result<()> {
    let mut b = base.next_data()?.filter(|(i, _)| *i < block_count);
    let mut t = target.next_data()?;
    loop {
        match (b, t) {
            (None, None) => return Ok(()),
            (Some((i, _)), tt) if tt.is_none_or(|(j, _)| i < j) => {
                f(i, BlockRef::Zero)?;
                b = base.next_data()?.filter(|(i, _)| *i < block_count);
            }
            (Some((i, x)), Some((j, y))) if i == j => {
                if x != y {
                    f(j, BlockRef::Data(y))?;
                }
                b = base.next_data()?.filter(|(i, _)| *i < block_count);
                t = target.next_data()?;
            }
            (_, Some((j, y))) => {
                f(j, BlockRef::Data(y))?;
                t = target.next_data()?;
            }
            (_, None) => unreachable!("covered above"),
        }
    }
}

/// For one index of a merge of deltas (see [`merge_deltas`]): its entry, and what is
/// known of it against the base.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Merged {
    /// The entry of the first source that lists the index.
    pub(crate) newest: BlockRef,
    /// Whether it came from the blocks received and is new to the repository.
    pub(crate) new: bool,
    /// The entry of the oldest manifest above the base that lists the index: it differs
    /// from the base's block, as every delta lists only what differs from its base.
    pub(crate) oldest_above: Option<BlockRef>,
}

impl Merged {
    /// Whether the entry surely differs from the base's block, so that no lookup below
    /// is needed: a block new to the repository cannot be the base's (the base's blocks
    /// are stored), and an entry equal to the oldest listing above the base differs as
    /// that one does. A block changed once is one of the two; a block sent unchanged,
    /// or rewritten since the base (maybe back to what it was), is not.
    pub(crate) fn surely_differs(&self) -> bool {
        self.new || self.oldest_above == Some(self.newest)
    }
}

/// The entries of several deltas over one base, merged in index order: for each index
/// the entry of the first source that lists it (`changes`, then `above` newest first),
/// and none at or past `block_count`. Valid as one delta over the same base only when
/// no manifest in between shrank the map below the base's size (the caller checks).
pub(crate) fn merge_deltas(
    repo: &Repository,
    changes: &Changes,
    above: &[CheckedManifest],
    block_count: u64,
    mut f: impl FnMut(u64, Merged) -> Result<()>,
) -> Result<()> {
    let mut first = changes.iter();
    let mut next_change = first.next_entry()?;
    let mut streams = above
        .iter()
        .map(|m| EntryStream::new(repo, m))
        .collect::<Result<Vec<_>>>()?;
    let mut heads = Vec::with_capacity(streams.len());
    for s in &mut streams {
        heads.push(s.next_entry()?);
    }
    loop {
        let Some(index) = heads
            .iter()
            .flatten()
            .map(|(i, _)| *i)
            .chain(next_change.map(|(i, _)| i))
            .min()
        else {
            return Ok(());
        };
        if index >= block_count {
            return Ok(());
        }
        let mut merged = None;
        if let Some((i, (block, new))) = next_change {
            if i == index {
                merged = Some(Merged {
                    newest: block,
                    new,
                    oldest_above: None,
                });
                next_change = first.next_entry()?;
            }
        }
        for (k, head) in heads.iter_mut().enumerate() {
            if let Some((i, b)) = *head {
                if i == index {
                    let m = merged.get_or_insert(Merged {
                        newest: b,
                        new: false,
                        oldest_above: None,
                    });
                    m.oldest_above = Some(b);
                    *head = streams[k].next_entry()?;
                }
            }
        }
        f(index, merged.expect("the lowest head"))?;
    }
}

/// One manifest of a chain being walked: its stream, the index its entries end at
/// (a newer, shorter manifest cuts older ones off), and its next entry.
struct Walk<'a> {
    stream: EntryStream<'a>,
    limit: u64,
    next: Option<(u64, BlockRef)>,
    /// Whether `next` was read: a walk starts where its first lookup is, so that a
    /// random read far into a snapshot does not load each manifest's first part.
    started: bool,
}

impl Walk<'_> {
    fn advance(&mut self) -> Result<()> {
        self.next = match self.stream.next_entry()? {
            Some((i, b)) if i < self.limit => Some((i, b)),
            Some(_) => {
                // Past the limit: the rest is cut off, but a version-1 object is still
                // read to its end to be checked (a part is checked when loaded).
                if let EntryStream::V1(_) = self.stream {
                    while self.stream.next_entry()?.is_some() {}
                }
                None
            }
            None => None,
        };
        Ok(())
    }

    /// Move to the first entry at or after `index` (never back): by seeking when the
    /// stream can, which skips whole parts unread, else by reading on.
    fn skip_to(&mut self, index: u64) -> Result<()> {
        if !self.started {
            self.started = true;
            if self.stream.seek(index)? {
                return self.advance();
            }
            self.advance()?;
        }
        if self.next.is_none_or(|(i, _)| i >= index) {
            return Ok(());
        }
        if self.stream.seek(index)? {
            return self.advance();
        }
        while self.next.is_some_and(|(i, _)| i < index) {
            self.advance()?;
        }
        Ok(())
    }

    /// [`Walk::skip_to`] backwards (or forwards): `false` when the stream cannot seek.
    fn seek(&mut self, index: u64) -> Result<bool> {
        if self.stream.seek(index)? {
            self.started = true;
            self.advance()?;
            return Ok(true);
        }
        Ok(false)
    }
}

/// A snapshot's map read along its delta chain (newest manifest first), in index
/// order: each index is decided by the newest manifest that lists it, and is zero past
/// the end of any manifest on the way (a shrink drops what it cuts off, see
/// [`snapsync_core::BlockMap::apply_in_place`]): the same map as resolving the chain.
pub(crate) struct ChainCursor<'a> {
    walks: Vec<Walk<'a>>,
    /// The lowest index a lookup may still ask for.
    from: u64,
}

impl<'a> ChainCursor<'a> {
    pub(crate) fn new(repo: &'a Repository, chain: &[CheckedManifest]) -> Result<Self> {
        let mut limit = u64::MAX;
        let mut walks = Vec::with_capacity(chain.len());
        for m in chain {
            limit = limit.min(m.head.block_count);
            walks.push(Walk {
                stream: EntryStream::new(repo, m)?,
                limit,
                next: None,
                started: false,
            });
        }
        Ok(Self { walks, from: 0 })
    }

    /// The lowest index a lookup may ask for: lookups go forward only.
    pub(crate) fn position(&self) -> u64 {
        self.from
    }

    /// Move back (or forward) to `index`, so that lookups from there on are allowed:
    /// `false` (and unchanged) when a manifest of the chain cannot seek (version 1),
    /// and the caller starts a new cursor.
    pub(crate) fn seek(&mut self, index: u64) -> Result<bool> {
        if self
            .walks
            .iter()
            .any(|w| matches!(w.stream, EntryStream::V1(_)))
        {
            return Ok(false);
        }
        for w in &mut self.walks {
            if !w.seek(index)? {
                return Ok(false);
            }
        }
        self.from = index;
        Ok(true)
    }

    /// The block at `index`, which must not be below the last one looked up.
    pub(crate) fn block(&mut self, index: u64) -> Result<BlockRef> {
        assert!(index >= self.from, "chain cursors only move forward");
        self.from = index;
        for w in &mut self.walks {
            if index >= w.limit {
                return Ok(BlockRef::Zero);
            }
            w.skip_to(index)?;
            if let Some((i, b)) = w.next {
                if i == index {
                    return Ok(b);
                }
            }
        }
        Ok(BlockRef::Zero)
    }

    /// The next data block from the current position on (then just past it).
    pub(crate) fn next_data(&mut self) -> Result<Option<u64>> {
        Ok(self.next_data_entry()?.map(|(i, _)| i))
    }

    /// [`ChainCursor::next_data`], with the block's id.
    pub(crate) fn next_data_entry(&mut self) -> Result<Option<(u64, BlockId)>> {
        loop {
            // The lowest index still listed at or after the position.
            let mut lowest: Option<u64> = None;
            for w in &mut self.walks {
                w.skip_to(self.from)?;
                if let Some((i, _)) = w.next {
                    lowest = Some(lowest.map_or(i, |l| l.min(i)));
                }
            }
            let Some(i) = lowest else { return Ok(None) };
            let b = self.block(i)?;
            self.from = i + 1;
            if let BlockRef::Data(id) = b {
                return Ok(Some((i, id)));
            }
        }
    }

    /// Read every remaining entry of a version-1 manifest, so that one damaged in its
    /// tail is reported (a version-2 part is checked whole when it is loaded).
    pub(crate) fn finish(mut self) -> Result<()> {
        for w in &mut self.walks {
            while w.next.is_some() && matches!(w.stream, EntryStream::V1(_)) {
                w.advance()?;
            }
        }
        Ok(())
    }
}
