//! Manifests read as streams: a snapshot's delta chain walked in index order, a piece
//! of each manifest at a time, instead of decoded whole.
//!
//! A decoded manifest holds about 40 bytes per entry, and the full map at the end of
//! every chain lists every data block of its snapshot: 5 MiB for 8 GiB of data, 640 MiB
//! for 1 TiB. Reading a snapshot from front to back (a restore, a copy out of the
//! repository) needs only the entries at the current position, so the read path
//! streams them and its memory does not grow with the snapshot.
//!
//! Each manifest is checked whole before any of it is used, exactly as a decoded one
//! is (its id is the BLAKE3 of its bytes, its envelope's checksum, its header), by
//! reading it through once; its entries are then read a second time, piece by piece,
//! hashed again on the way and checked at the end, so that an object that changed in
//! between is reported rather than trusted.

use snapsync_core::{BlockId, BlockMap, BlockRef, Delta, RootHasher};
use snapsync_store::{Result, StoreError};

use crate::format::{
    self, ManifestHead, ManifestId, ENVELOPE_HEADER, ENVELOPE_TRAILER, MAGIC_MANIFEST,
};
use crate::repo::{key_manifest, Repository};

/// Bytes of a manifest read at a time (an odd few in tests, to cross every boundary).
const PIECE: usize = if cfg!(test) { 4099 } else { 256 << 10 };

/// A manifest checked whole, with the fields before its entries.
#[derive(Debug)]
pub(crate) struct CheckedManifest {
    pub(crate) id: ManifestId,
    pub(crate) head: ManifestHead,
    /// Length of the whole object.
    len: u64,
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
                    head = format::parse_manifest_head(&head_bytes, payload, &location)?;
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
        Ok(CheckedManifest { id: *id, head, len })
    }

    /// The manifests of a delta chain from `id` down to its full map, checked.
    pub(crate) fn checked_chain(&self, id: &ManifestId) -> Result<Vec<CheckedManifest>> {
        let mut chain = vec![self.check_manifest(id)?];
        while let Some(base) = chain.last().expect("one").head.header.delta_base {
            if chain.len() > crate::CHECKPOINT_INTERVAL as usize * 4 + 1 {
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

    /// [`Delta::between`] the snapshot of manifest `base` and `target`, with the base
    /// read along its chain rather than resolved: no second map of the volume.
    pub(crate) fn delta_against(&self, base: &ManifestId, target: &BlockMap) -> Result<Delta> {
        let chain = self.checked_chain(base)?;
        let mut cursor = ChainCursor::new(self, &chain)?;
        let mut next = || -> Result<Option<(u64, BlockId)>> {
            Ok(cursor
                .next_data_entry()?
                .filter(|(j, _)| *j < target.block_count()))
        };
        let mut base_block = next()?;
        let mut entries = Vec::new();
        for (i, id) in target.iter_data() {
            // Blocks the base has as data inside the target's range but the target lacks.
            while let Some((j, _)) = base_block.filter(|(j, _)| *j < i) {
                entries.push((j, BlockRef::Zero));
                base_block = next()?;
            }
            match base_block {
                Some((j, b)) if j == i => {
                    if b != id {
                        entries.push((i, BlockRef::Data(id)));
                    }
                    base_block = next()?;
                }
                _ => entries.push((i, BlockRef::Data(id))),
            }
        }
        while let Some((j, _)) = base_block {
            entries.push((j, BlockRef::Zero));
            base_block = next()?;
        }
        Ok(Delta {
            block_count: target.block_count(),
            entries: entries.into_iter().collect(),
        })
    }

    fn read_piece(&self, key: &str, offset: u64, dst: &mut [u8]) -> Result<()> {
        self.backend
            .read_ranges_into(&mut [(key.to_string(), offset, dst)])
    }
}

/// The entries of one checked manifest, in index order, read a piece at a time.
pub(crate) struct EntryStream<'a> {
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

impl<'a> EntryStream<'a> {
    pub(crate) fn new(repo: &'a Repository, m: &CheckedManifest) -> Result<Self> {
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

    /// The next entry, checked as [`format::decode_manifest`] checks them.
    pub(crate) fn next_entry(&mut self) -> Result<Option<(u64, BlockRef)>> {
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
/// base is read along its chain when needed, so that a receive holds a map of the
/// blocks it was sent, not of the whole volume.
pub(crate) struct Overlay<'a> {
    pub(crate) repo: &'a Repository,
    /// The transfer base's manifest.
    pub(crate) base: Option<ManifestId>,
    pub(crate) block_count: u64,
    /// Blocks received, by index (all below `block_count`); zero ones only over a base.
    pub(crate) changes: std::collections::BTreeMap<u64, BlockRef>,
    /// Without a base, the blocks received are the snapshot's full map: once stored as
    /// such, they were moved into that manifest, which is named here.
    pub(crate) moved_to: Option<ManifestId>,
}

impl Overlay<'_> {
    /// Without a base: the full map as a delta, moved out of `changes` rather than
    /// copied (see [`Overlay::moved_to`]).
    pub(crate) fn take_full_map(&mut self) -> Delta {
        debug_assert!(self.base.is_none());
        Delta {
            block_count: self.block_count,
            entries: std::mem::take(&mut self.changes),
        }
    }

    /// Bring back blocks moved into a manifest (a commit retried after a race).
    pub(crate) fn restore(&mut self) -> Result<()> {
        if let Some(id) = self.moved_to.take() {
            self.changes = self.repo.manifest(&id)?.delta.entries.clone();
        }
        Ok(())
    }

    /// Call `f` with each data block of the snapshot, in index order.
    pub(crate) fn for_each_data(&self, mut f: impl FnMut(u64, BlockId)) -> Result<()> {
        let chain = match self.base {
            Some(b) => self.repo.checked_chain(&b)?,
            None => Vec::new(),
        };
        let mut cursor = ChainCursor::new(self.repo, &chain)?;
        let mut base = cursor
            .next_data_entry()?
            .filter(|(i, _)| *i < self.block_count);
        for (&i, r) in &self.changes {
            while let Some((j, id)) = base.filter(|(j, _)| *j < i) {
                f(j, id);
                base = cursor
                    .next_data_entry()?
                    .filter(|(j, _)| *j < self.block_count);
            }
            if base.is_some_and(|(j, _)| j == i) {
                base = cursor
                    .next_data_entry()?
                    .filter(|(j, _)| *j < self.block_count);
            }
            if let BlockRef::Data(id) = r {
                f(i, *id);
            }
        }
        while let Some((j, id)) = base {
            f(j, id);
            base = cursor
                .next_data_entry()?
                .filter(|(j, _)| *j < self.block_count);
        }
        Ok(())
    }

    /// The snapshot's [`BlockMap::root_hash`].
    pub(crate) fn root_hash(&self) -> Result<BlockId> {
        let mut h = RootHasher::new(self.block_count);
        self.for_each_data(|i, id| h.add(i, &id))?;
        Ok(h.finish())
    }

    /// The snapshot's whole map (for the rarer placements that need it).
    pub(crate) fn map(&self) -> Result<BlockMap> {
        let mut data = Vec::new();
        self.for_each_data(|i, id| data.push((i, id)))?;
        Ok(BlockMap::from_data(self.block_count, data))
    }

    /// The delta against the transfer base: the blocks received that differ from it.
    pub(crate) fn delta_against_base(&self) -> Result<Delta> {
        let chain = match self.base {
            Some(b) => self.repo.checked_chain(&b)?,
            None => Vec::new(),
        };
        let mut cursor = ChainCursor::new(self.repo, &chain)?;
        let mut entries = Vec::new();
        for (&i, r) in &self.changes {
            if cursor.block(i)? != *r {
                entries.push((i, *r));
            }
        }
        Ok(Delta {
            block_count: self.block_count,
            entries: entries.into_iter().collect(),
        })
    }
}

/// One manifest of a chain being walked: its stream, the index its entries end at
/// (a newer, shorter manifest cuts older ones off), and its next entry.
struct Walk<'a> {
    stream: EntryStream<'a>,
    limit: u64,
    next: Option<(u64, BlockRef)>,
}

impl Walk<'_> {
    fn advance(&mut self) -> Result<()> {
        self.next = match self.stream.next_entry()? {
            Some((i, b)) if i < self.limit => Some((i, b)),
            Some(_) => {
                // Past the limit: the rest is cut off, but still checked.
                while self.stream.next_entry()?.is_some() {}
                None
            }
            None => None,
        };
        Ok(())
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
            let mut w = Walk {
                stream: EntryStream::new(repo, m)?,
                limit,
                next: None,
            };
            w.advance()?;
            walks.push(w);
        }
        Ok(Self { walks, from: 0 })
    }

    /// The lowest index a lookup may ask for: lookups go forward only.
    pub(crate) fn position(&self) -> u64 {
        self.from
    }

    /// The block at `index`, which must not be below the last one looked up.
    pub(crate) fn block(&mut self, index: u64) -> Result<BlockRef> {
        assert!(index >= self.from, "chain cursors only move forward");
        self.from = index;
        for w in &mut self.walks {
            if index >= w.limit {
                return Ok(BlockRef::Zero);
            }
            while w.next.is_some_and(|(i, _)| i < index) {
                w.advance()?;
            }
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
                while w.next.is_some_and(|(i, _)| i < self.from) {
                    w.advance()?;
                }
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

    /// Read every remaining entry, so that a manifest damaged in its tail is reported.
    pub(crate) fn finish(mut self) -> Result<()> {
        for w in &mut self.walks {
            while w.next.is_some() {
                w.advance()?;
            }
        }
        Ok(())
    }
}
