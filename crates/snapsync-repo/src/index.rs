//! The in-memory block index: which pack holds each block. Built from the `index/`
//! objects when first needed, and extended by the packs a receive writes.
//!
//! It is the one structure of the repository whose size follows the amount of data
//! (one entry per block), so it is kept compact: a vector of 44-byte entries sorted by
//! block id and searched by bisection, under 40% of what a hash map of the same entries
//! takes (key, value, control byte and spare capacity: some 115 bytes a block).
//! Packs are added in bulk (appended, then sorted once by [`BlockIndex::seal`]) when
//! loading indexes; one at a time (the packs a receive stored) they go to a small hash
//! map instead, so that adding them neither re-sorts nor reallocates the large vector.
//! That map is folded into the vector once it holds an eighth as many blocks.
//!
//! Memory is bounded: once the vector holds [`MEMORY_ENTRIES`] blocks it is written out,
//! sorted, as a **run** (a file of 44-byte records in checked pages of 64, see `run.rs`)
//! and emptied. A run keeps in memory only a fence per page (the first 8 bytes of its
//! first id: 0.125 bytes a block) and, within a budget shared by the index's runs, a
//! filter (a blocked Bloom filter, 8 bits a block: one cache line per lookup, about 2%
//! false positives; beyond the budget a lookup reads its 64 bytes from the file). So a
//! lookup of a block that is not there costs no page read, and one that is costs one
//! read of 2.8 KiB (from the page cache, usually). Runs are merged eight at a time when
//! eight of one size tier exist, so there are few of them. About 0.13 bytes of memory a
//! block plus at most 8 MiB of filters: the index of a 64 M-block repository takes
//! ~16 MiB, not 2.8 GiB.
//!
//! A run's pages are checked when they are read, not when the run is opened, so that a
//! process opening the cached index of a large repository reads and checks ~1.1 bytes a
//! block (fences and filters), not 44: its cost follows its lookups. A page that fails
//! its check answers "not indexed" and flags the index ([`BlockIndex::take_damage`]);
//! the repository then rebuilds the index from its own index objects and asks again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use snapsync_core::BlockId;

mod run;
#[cfg(test)]
use run::RunReader;
use run::{Page, Run, FILTER_MEMORY};

use crate::format::{Compression, IndexEntry};

/// Location of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockLocation {
    /// Position in [`BlockIndex::packs`].
    pub(crate) pack: u32,
    pub(crate) offset: u64,
    pub(crate) stored_len: u32,
    pub(crate) raw_len: u32,
    pub(crate) compression: Compression,
}

/// A [`BlockLocation`] in 12 bytes (4-byte aligned, so that an [`Entry`] is 44): the
/// pack, and one 64-bit word of offset (38 bits: packs are far below 256 GiB), stored
/// length (25 bits: at most the block size, at most 16 MiB, plus sealing) and compression (1 bit).
/// The plaintext length is the block size, or the entry is damaged: an entry that does
/// not fit (a damaged index) is kept with a stored length larger than any block, so that
/// reading it reports the damage as its true lengths would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    pack: u32,
    word: [u32; 2],
}

const OFFSET_BITS: u32 = 38;
const LEN_BITS: u32 = 25;
const ZSTD_BIT: u64 = 1 << 63;
/// The stored length of a damaged entry: longer than any block.
const DAMAGED_LEN: u64 = (1 << LEN_BITS) - 1;
const _: () = assert!(OFFSET_BITS + LEN_BITS + 1 == 64 && DAMAGED_LEN > 16 << 20);

/// The longest a block of `block_size` bytes can be stored: sealed in an encrypted
/// repository (a plain repository's reads refuse more than the block size themselves).
fn max_stored_len(block_size: u64) -> u64 {
    crate::crypt::sealed_block_len(block_size as usize, block_size as usize) as u64
}

impl Loc {
    fn new(pack: u32, e: &IndexEntry, block_size: u64) -> Self {
        let fits = e.offset < 1 << OFFSET_BITS
            && u64::from(e.raw_len) == block_size
            && u64::from(e.stored_len) <= max_stored_len(block_size);
        let len = if fits {
            u64::from(e.stored_len)
        } else {
            DAMAGED_LEN
        };
        let zstd = match e.compression {
            Compression::None => 0,
            Compression::Zstd => ZSTD_BIT,
        };
        let w = (e.offset & ((1 << OFFSET_BITS) - 1)) | len << OFFSET_BITS | zstd;
        Loc {
            pack,
            word: [w as u32, (w >> 32) as u32],
        }
    }

    fn word(&self) -> u64 {
        u64::from(self.word[1]) << 32 | u64::from(self.word[0])
    }

    fn offset(&self) -> u64 {
        self.word() & ((1 << OFFSET_BITS) - 1)
    }

    fn location(&self, block_size: u64) -> BlockLocation {
        let w = self.word();
        BlockLocation {
            pack: self.pack,
            offset: self.offset(),
            stored_len: ((w >> OFFSET_BITS) & DAMAGED_LEN) as u32,
            raw_len: block_size as u32,
            compression: if w & ZSTD_BIT != 0 {
                Compression::Zstd
            } else {
                Compression::None
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    id: BlockId,
    loc: Loc,
}

const _: () = assert!(std::mem::size_of::<Entry>() == 44);

/// Blocks the side map holds at least before it is folded into the vector.
const RECENT_MIN: usize = if cfg!(test) { 16 } else { 16 << 10 };
/// Blocks the sorted vector holds before it is written out as a run (~44 MiB).
pub(crate) const MEMORY_ENTRIES: usize = if cfg!(test) { 50 } else { 1 << 20 };
/// Runs of one size tier merged at once.
const RUN_FANOUT: usize = 8;

/// All blocks of a repository (or of the packs loaded so far).
#[derive(Debug)]
pub(crate) struct BlockIndex {
    /// The repository's block size: every block's plaintext length.
    block_size: u64,
    pub(crate) packs: Vec<BlockId>,
    pack_pos: HashMap<BlockId, u32>,
    /// Sorted by id, one entry per id; except while `unsorted` (between `reserve`, or
    /// the side map growing too large, and [`BlockIndex::seal`]), when entries are
    /// appended.
    sorted: Vec<Entry>,
    unsorted: bool,
    /// Blocks added a few at a time since `sorted` was last sorted; none is in it.
    recent: HashMap<BlockId, Loc>,
    /// Whether every index object of the repository was loaded (a listing); otherwise
    /// only the packs a snapshot's manifests named were.
    pub(crate) complete: bool,
    /// Blocks written out, oldest first; none is in `sorted`.
    runs: Vec<Run>,
    /// Where runs are written as named files that outlive the process (the local index
    /// cache, see [`BlockIndex::persist`]); anonymous temporary files otherwise.
    dir: Option<std::path::PathBuf>,
    /// For a cached index: the gc runs the repository had seen when this one was
    /// started, which [`BlockIndex::persist`] records.
    pub(crate) gc_epochs: Option<usize>,
    /// Whether a lookup met a run it could not read or that failed its check (and
    /// answered "not indexed" for it): the index must not be used further (see
    /// [`BlockIndex::take_damage`]).
    damaged: AtomicBool,
}

impl BlockIndex {
    /// An empty index of a repository with blocks of `block_size` bytes.
    pub(crate) fn new(block_size: u64) -> Self {
        Self {
            block_size,
            packs: Vec::new(),
            pack_pos: HashMap::new(),
            sorted: Vec::new(),
            unsorted: false,
            recent: HashMap::new(),
            complete: false,
            runs: Vec::new(),
            dir: None,
            gc_epochs: None,
            damaged: AtomicBool::new(false),
        }
    }

    /// An empty index whose runs are written in `dir` (see [`BlockIndex::persist`]).
    pub(crate) fn in_dir(block_size: u64, dir: std::path::PathBuf) -> Self {
        Self {
            dir: Some(dir),
            ..Self::new(block_size)
        }
    }

    /// Add the entries of one pack. A block already indexed keeps its location. Call
    /// [`BlockIndex::seal`] before the next lookup.
    pub(crate) fn add_pack(&mut self, pack: BlockId, entries: &[IndexEntry]) {
        let pos = *self.pack_pos.entry(pack).or_insert_with(|| {
            self.packs.push(pack);
            (self.packs.len() - 1) as u32
        });
        let bs = self.block_size;
        if self.unsorted {
            // In bulk (a load, announced by `reserve`): appended as they come and
            // sorted once by `seal`, or written out when memory is full.
            self.sorted.extend(entries.iter().map(|e| Entry {
                id: e.id,
                loc: Loc::new(pos, e, bs),
            }));
            if self.sorted.len() >= MEMORY_ENTRIES {
                self.sort_sorted();
                self.spill();
            }
            return;
        }
        // A pack at a time (the packs a receive stored): to the side map, folded into
        // the vector once it is an eighth of its size, so that the vector is re-sorted
        // a logarithmic number of times however many packs come.
        for e in entries {
            if self.find_sorted(&e.id).is_none() && self.find_in_runs(&e.id).is_none() {
                self.recent.entry(e.id).or_insert(Loc::new(pos, e, bs));
            }
        }
        if self.recent.len() > (self.sorted.len() / 8).max(RECENT_MIN) {
            self.unsorted = true;
        }
    }

    /// Sort what bulk additions appended. Of several entries of one block, the one in
    /// the pack indexed first is kept.
    pub(crate) fn seal(&mut self) {
        if !self.unsorted {
            return;
        }
        // The side map goes in too (it may hold blocks appended again since).
        let recent = std::mem::take(&mut self.recent);
        self.sorted.reserve(recent.len());
        self.sorted
            .extend(recent.into_iter().map(|(id, loc)| Entry { id, loc }));
        self.sort_sorted();
        self.unsorted = false;
        if self.sorted.len() >= MEMORY_ENTRIES {
            self.spill();
        }
    }

    fn sort_sorted(&mut self) {
        // In place (an unstable sort needs no scratch memory); the pack position and
        // offset make the order, and so the entry kept, deterministic.
        self.sorted.sort_unstable_by(|a, b| {
            (a.id, a.loc.pack, a.loc.offset()).cmp(&(b.id, b.loc.pack, b.loc.offset()))
        });
        self.sorted.dedup_by_key(|e| e.id);
    }

    /// Write the (sorted) vector out as a run and empty it, then merge runs if a tier
    /// is full. Should the temporary file fail (a full disk), the entries stay in
    /// memory: the index works, only larger.
    fn spill(&mut self) {
        let entries = std::mem::take(&mut self.sorted);
        match Run::write(self.dir.as_deref(), entries.iter().copied(), entries.len()) {
            Ok(run) => {
                self.runs.push(run);
                drop(entries);
                self.merge_runs();
                self.balance_filters_or_warn();
            }
            Err(e) => {
                tracing::warn!(error = %e, "block index kept in memory (temporary file)");
                self.sorted = entries;
            }
        }
    }

    /// Merge the runs of a size tier (each tier 8 times the one below) when it holds
    /// [`RUN_FANOUT`] of them, so a lookup probes few filters.
    fn merge_runs(&mut self) {
        loop {
            let tier = |r: &Run| {
                let mut t = 0;
                let mut n = r.count / MEMORY_ENTRIES.max(1);
                while n >= RUN_FANOUT {
                    n /= RUN_FANOUT;
                    t += 1;
                }
                t
            };
            let tiers: Vec<u32> = self.runs.iter().map(tier).collect();
            let Some(full) = tiers
                .iter()
                .find(|t| tiers.iter().filter(|u| u == t).count() >= RUN_FANOUT)
                .copied()
            else {
                return;
            };
            let (merge, keep): (Vec<Run>, Vec<Run>) = std::mem::take(&mut self.runs)
                .into_iter()
                .zip(tiers)
                .partition(|(_, t)| *t == full)
                .into_iter_pair();
            self.runs = keep;
            match Run::merge(self.dir.as_deref(), &merge) {
                Ok(run) => self.runs.push(run),
                Err(e) => {
                    tracing::warn!(error = %e, "block index runs left unmerged");
                    self.runs.extend(merge);
                    return;
                }
            }
        }
    }

    /// Start adding packs in bulk, about `additional` blocks (an estimate: more still
    /// fit), made room for at once (up to what memory holds); [`BlockIndex::seal`]
    /// ends it.
    pub(crate) fn reserve(&mut self, additional: usize) {
        self.sorted
            .reserve_exact(additional.min(MEMORY_ENTRIES) + self.recent.len());
        self.unsorted = true;
    }

    fn find_in_runs(&self, id: &BlockId) -> Option<Loc> {
        let mut page = Page::new();
        for r in self.runs.iter().rev() {
            page.forget();
            match r.find_in(id, &mut page) {
                Ok(Some((_, loc))) => return Some(loc),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "block index run unreadable");
                    self.damaged.store(true, Ordering::Relaxed);
                }
            }
        }
        None
    }

    /// Whether a lookup since the last call met a damaged or unreadable run (its
    /// answers may have said "not indexed" for a block that is): the caller drops this
    /// index and builds it again from the repository. A damaged run of the local cache
    /// has already taken the cache out of use (see `run.rs`).
    pub(crate) fn take_damage(&self) -> bool {
        self.damaged.swap(false, Ordering::Relaxed)
    }

    /// Hold the filters of the smallest runs in memory, up to [`FILTER_MEMORY`] bytes
    /// (each held filter spares a read per lookup whatever its size); the others are
    /// read from their files a block at a time. Called whenever the runs change.
    fn balance_filters(&mut self) -> std::io::Result<()> {
        let mut order: Vec<usize> = (0..self.runs.len()).collect();
        order.sort_by_key(|&k| self.runs[k].filter_bytes());
        let mut held = 0usize;
        for k in order {
            let bytes = self.runs[k].filter_bytes();
            let hold = held + bytes <= FILTER_MEMORY;
            held += if hold { bytes } else { 0 };
            self.runs[k].hold_filter(hold)?;
        }
        Ok(())
    }

    /// [`BlockIndex::balance_filters`] where a failure only costs lookups a read.
    fn balance_filters_or_warn(&mut self) {
        if let Err(e) = self.balance_filters() {
            tracing::warn!(error = %e, "block index filters left in their files");
        }
    }

    /// Write everything out as one run, so that every block has a **rank**: its
    /// position in id order, which [`BlockIndex::locate_many`] gives. gc and verify mark blocks
    /// by rank in a bitmap (one bit a block) instead of keeping sets of ids.
    pub(crate) fn rank_all(&mut self) -> std::io::Result<()> {
        self.unsorted = true;
        self.seal();
        if !self.sorted.is_empty() {
            let entries = std::mem::take(&mut self.sorted);
            self.runs.push(Run::write(
                self.dir.as_deref(),
                entries.iter().copied(),
                entries.len(),
            )?);
        }
        if self.runs.len() > 1 {
            let one = Run::merge(self.dir.as_deref(), &self.runs)?;
            self.runs = vec![one];
        }
        self.balance_filters_or_warn();
        Ok(())
    }

    /// Make this index (complete as of now) the local cache in its directory: every
    /// block written out to runs there, and `state.json` naming them with the packs they
    /// hold (in the order their positions refer to) and `gc_epochs`, the number of gc
    /// runs the repository had seen (a gc since may have deleted packs: then the cache
    /// is not used). Written to a new name and renamed, so a reader sees the old state
    /// or the new one; files no state names are removed by [`BlockIndex::restore`].
    pub(crate) fn persist(&mut self) -> std::io::Result<()> {
        let (Some(dir), Some(gc_epochs)) = (self.dir.clone(), self.gc_epochs) else {
            return Ok(());
        };
        std::fs::create_dir_all(&dir)?;
        self.unsorted = true;
        self.seal();
        if !self.sorted.is_empty() {
            let entries = std::mem::take(&mut self.sorted);
            self.runs.push(Run::write(
                Some(&dir),
                entries.iter().copied(),
                entries.len(),
            )?);
            self.merge_runs();
            self.balance_filters_or_warn();
        }
        let state = CacheState {
            version: CACHE_VERSION,
            block_size: self.block_size,
            gc_epochs,
            packs: self.packs.iter().map(BlockId::to_hex).collect(),
            runs: self
                .runs
                .iter()
                .filter_map(|r| r.path.as_ref())
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect(),
        };
        if state.runs.len() != self.runs.len() {
            return Ok(()); // some run is anonymous (its directory failed): no cache
        }
        for r in &mut self.runs {
            r.persisted = true;
        }
        let tmp = dir.join(format!("state.json.{}", snapsync_store::random_id()));
        std::fs::write(
            &tmp,
            serde_json::to_vec(&state).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, dir.join("state.json"))
    }

    /// The index cached in `dir` by [`BlockIndex::persist`], if there is one for this
    /// block size and `gc_epochs` and every run checks out; its runs stay in `dir`.
    /// Files there that the state does not name (left by other processes, or by a
    /// process that was killed) are removed.
    pub(crate) fn restore(
        block_size: u64,
        dir: &std::path::Path,
        gc_epochs: usize,
    ) -> std::io::Result<Option<BlockIndex>> {
        let state: CacheState = match std::fs::read(dir.join("state.json")) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(s) => s,
                Err(_) => return Ok(None),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name != "state.json" && !state.runs.contains(&name) {
                let _ = std::fs::remove_file(dir.join(&name));
            }
        }
        if state.version != CACHE_VERSION
            || state.block_size != block_size
            || state.gc_epochs != gc_epochs
        {
            return Ok(None);
        }
        let mut ix = BlockIndex::in_dir(block_size, dir.to_path_buf());
        ix.gc_epochs = Some(gc_epochs);
        for hex in &state.packs {
            let Ok(pack) = hex.parse::<BlockId>() else {
                return Ok(None);
            };
            ix.pack_pos.insert(pack, ix.packs.len() as u32);
            ix.packs.push(pack);
        }
        for name in &state.runs {
            match Run::open(&dir.join(name)) {
                Ok(Some(run)) if run.count == 0 || run.max_pack < ix.packs.len() as u64 => {
                    ix.runs.push(run);
                }
                Ok(_) => return Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        ix.balance_filters_or_warn();
        Ok(Some(ix))
    }

    /// Blocks ranked by [`BlockIndex::rank_all`].
    pub(crate) fn ranked_len(&self) -> usize {
        self.runs.first().map_or(0, |r| r.count)
    }

    /// Blocks' ranks (after [`BlockIndex::rank_all`]): `ids` are sorted first, so that the
    /// run is read in order and each of its pages once, instead of one read a block
    /// (gc and verify look up every block of every snapshot). `f` gets each id with
    /// its tag and rank (`None`: not indexed).
    pub(crate) fn rank_many<T>(
        &self,
        ids: &mut [(BlockId, T)],
        mut f: impl FnMut(&BlockId, &T, Option<usize>),
    ) -> std::io::Result<()> {
        self.locate_many(ids, |id, tag, found| {
            f(id, tag, found.map(|(rank, ..)| rank))
        })
    }

    /// [`BlockIndex::rank_many`] that also gives each block's pack and location.
    pub(crate) fn locate_many<T>(
        &self,
        ids: &mut [(BlockId, T)],
        mut f: impl FnMut(&BlockId, &T, Option<(usize, BlockId, BlockLocation)>),
    ) -> std::io::Result<()> {
        ids.sort_unstable_by_key(|a| a.0);
        let Some(run) = self.runs.first() else {
            ids.iter().for_each(|(id, t)| f(id, t, None));
            return Ok(());
        };
        // Sorted ids read the run's pages in order, each once.
        let mut page = Page::new();
        for (id, tag) in ids.iter() {
            let found = run.find_in(id, &mut page).inspect_err(|_| {
                self.damaged.store(true, Ordering::Relaxed);
            })?;
            f(
                id,
                tag,
                found.map(|(rank, loc)| {
                    (
                        rank,
                        self.packs[loc.pack as usize],
                        loc.location(self.block_size),
                    )
                }),
            );
        }
        Ok(())
    }

    /// A block's rank (after [`BlockIndex::rank_all`]), pack and location, looked up
    /// alone: the tests' reference for [`BlockIndex::locate_many`].
    #[cfg(test)]
    fn rank(&self, id: &BlockId) -> Option<(usize, BlockId, BlockLocation)> {
        debug_assert!(self.runs.len() <= 1 && self.sorted.is_empty() && self.recent.is_empty());
        let (rank, l) = self.runs.first()?.find(id).expect("readable")?;
        Some((
            rank,
            self.packs[l.pack as usize],
            l.location(self.block_size),
        ))
    }

    fn find_sorted(&self, id: &BlockId) -> Option<Loc> {
        if self.unsorted {
            debug_assert!(false, "block index looked up before it was sealed");
            return self.sorted.iter().find(|e| e.id == *id).map(|e| e.loc);
        }
        self.sorted
            .binary_search_by(|e| e.id.cmp(id))
            .ok()
            .map(|i| self.sorted[i].loc)
    }

    fn find(&self, id: &BlockId) -> Option<Loc> {
        self.find_sorted(id)
            .or_else(|| self.recent.get(id).copied())
            .or_else(|| self.find_in_runs(id))
    }

    pub(crate) fn get(&self, id: &BlockId) -> Option<(BlockId, BlockLocation)> {
        self.find(id)
            .map(|l| (self.packs[l.pack as usize], l.location(self.block_size)))
    }

    /// Whether this pack's index was loaded.
    pub(crate) fn has_pack(&self, pack: &BlockId) -> bool {
        self.pack_pos.contains_key(pack)
    }

    pub(crate) fn contains(&self, id: &BlockId) -> bool {
        self.find(id).is_some()
    }

    /// Number of blocks indexed.
    /// Number of distinct blocks indexed (a block loaded in bulk again may be in two
    /// runs; either place is right).
    #[cfg(test)]
    fn len(&self) -> usize {
        let mut ids: std::collections::HashSet<BlockId> =
            self.sorted.iter().map(|e| e.id).collect();
        ids.extend(self.recent.keys().copied());
        for r in &self.runs {
            let mut reader = RunReader::new(r);
            while let Some(e) = reader.next().unwrap() {
                ids.insert(e.id);
            }
        }
        ids.len()
    }
}

/// Version of the local cache's files (`state.json` and runs): not part of the
/// repository format (a cache of another version is rebuilt, never read).
const CACHE_VERSION: u32 = 2;

/// `state.json` of the local index cache.
#[derive(serde::Serialize, serde::Deserialize)]
struct CacheState {
    version: u32,
    block_size: u64,
    gc_epochs: usize,
    /// The packs indexed, in the order the runs' pack positions refer to.
    packs: Vec<String>,
    /// Run files, oldest first.
    runs: Vec<String>,
}

/// Split pairs by a predicate, dropping the tag.
trait PartitionPairs<T> {
    fn into_iter_pair(self) -> (Vec<T>, Vec<T>);
}

impl<T, U> PartitionPairs<T> for (Vec<(T, U)>, Vec<(T, U)>) {
    fn into_iter_pair(self) -> (Vec<T>, Vec<T>) {
        (
            self.0.into_iter().map(|(t, _)| t).collect(),
            self.1.into_iter().map(|(t, _)| t).collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{HashMap, HashSet};

    const BS: u64 = 4096;

    fn entry(id: u8, offset: u64, zstd: bool) -> IndexEntry {
        IndexEntry {
            id: BlockId::of(&[id]),
            offset,
            stored_len: 100 + u32::from(id),
            raw_len: BS as u32,
            compression: if zstd {
                Compression::Zstd
            } else {
                Compression::None
            },
        }
    }

    #[test]
    fn locations_round_trip_compactly() {
        let mut ix = BlockIndex::new(BS);
        let far = IndexEntry {
            offset: (7 << 32) + 5,
            stored_len: BS as u32,
            ..entry(1, 0, true)
        };
        let damaged = [
            IndexEntry {
                raw_len: BS as u32 / 2,
                ..entry(3, 10, false)
            },
            IndexEntry {
                stored_len: BS as u32 + 1,
                ..entry(4, 11, true)
            },
            IndexEntry {
                offset: 1 << 40,
                ..entry(5, 0, false)
            },
        ];
        ix.add_pack(BlockId::of(b"p"), &[far, entry(2, 9, false)]);
        ix.add_pack(BlockId::of(b"q"), &damaged);
        ix.seal();
        let (pack, l) = ix.get(&far.id).expect("indexed");
        assert_eq!(pack, BlockId::of(b"p"));
        assert_eq!(
            (l.offset, l.stored_len, l.raw_len, l.compression),
            ((7 << 32) + 5, BS as u32, BS as u32, Compression::Zstd)
        );
        let (_, l) = ix.get(&entry(2, 9, false).id).expect("indexed");
        assert_eq!(
            (l.offset, l.stored_len, l.compression),
            (9, 102, Compression::None)
        );
        for d in &damaged {
            // Still found, and read as damaged: stored longer than a block.
            let (pack, l) = ix.get(&d.id).expect("indexed");
            assert_eq!(pack, BlockId::of(b"q"));
            assert!(u64::from(l.stored_len) > BS, "{d:?}");
        }
        assert_eq!(ix.get(&damaged[0].id).unwrap().1.offset, 10);
        assert!(!ix.contains(&BlockId::of(b"absent")));
    }

    #[test]
    fn a_few_blocks_go_to_the_side_map_and_fold_in_later() {
        let mut ix = BlockIndex::new(BS);
        let many: Vec<IndexEntry> = (0..=200u8).map(|i| entry(i, u64::from(i), false)).collect();
        ix.reserve(many.len());
        ix.add_pack(BlockId::of(b"a"), &many);
        ix.seal();
        assert!(ix.recent.is_empty());
        let cap = ix.sorted.capacity();
        // Some new, one already indexed (it keeps its first location).
        ix.add_pack(BlockId::of(b"b"), &[entry(5, 999, true)]);
        ix.seal();
        assert!(ix.recent.is_empty(), "already indexed");
        assert_eq!(ix.get(&entry(5, 0, false).id).unwrap().1.offset, 5);
        let other = |i: u8| IndexEntry {
            id: BlockId::of(&[i, 1]),
            ..entry(i, 1000 + u64::from(i), false)
        };
        ix.add_pack(BlockId::of(b"b"), &[other(1), other(2)]);
        ix.seal();
        assert_eq!(ix.recent.len(), 2);
        assert_eq!(ix.sorted.capacity(), cap, "the large vector is left alone");
        assert_eq!(ix.get(&other(2).id).unwrap().0, BlockId::of(b"b"));
        // Once the side map would hold an eighth of the blocks, it is folded in.
        let more: Vec<IndexEntry> = (3..40u8).map(other).collect();
        ix.add_pack(BlockId::of(b"c"), &more);
        ix.seal();
        assert!(ix.recent.is_empty());
        assert_eq!(ix.len(), 201 + 39);
        for i in 1..40u8 {
            assert!(ix.contains(&other(i).id));
        }
        assert_eq!(ix.get(&other(1).id).unwrap().0, BlockId::of(b"b"));
    }

    #[test]
    fn packs_added_one_by_one_are_folded_in_geometrically() {
        let mut ix = BlockIndex::new(BS);
        let mut folds = 0;
        for p in 0..200u32 {
            let entries: Vec<IndexEntry> = (0..10u32)
                .map(|k| IndexEntry {
                    id: BlockId::of(&(p * 10 + k).to_le_bytes()),
                    ..entry(0, u64::from(k), false)
                })
                .collect();
            let before = ix.sorted.len();
            ix.add_pack(BlockId::of(&p.to_le_bytes()), &entries);
            ix.seal();
            folds += usize::from(ix.sorted.len() != before);
            assert!(ix.recent.len() <= (ix.sorted.len() / 8).max(RECENT_MIN));
        }
        assert_eq!(ix.len(), 2000);
        // Once per RECENT_MIN blocks at most, not once per pack; and what is folded in
        // is written out at MEMORY_ENTRIES, so a fold never re-sorts more than that.
        assert!(folds <= 2000 / RECENT_MIN + 1, "{folds} folds");
        assert!(ix.sorted.len() < MEMORY_ENTRIES);
        assert!(!ix.runs.is_empty());
    }

    #[test]
    fn blocks_written_out_are_found_and_runs_stay_few() {
        let mut ix = BlockIndex::new(BS);
        let id = |n: u32| BlockId::of(&n.to_le_bytes());
        let at = |n: u32| IndexEntry {
            id: id(n),
            ..entry(0, u64::from(n), n.is_multiple_of(2))
        };
        // Half in bulk (a load), half a pack at a time (a receive).
        ix.reserve(3000);
        for p in 0..30u32 {
            let e: Vec<IndexEntry> = (p * 100..p * 100 + 100).map(at).collect();
            ix.add_pack(BlockId::of(&p.to_be_bytes()), &e);
        }
        ix.seal();
        for p in 30..60u32 {
            let e: Vec<IndexEntry> = (p * 100..p * 100 + 100).map(at).collect();
            ix.add_pack(BlockId::of(&p.to_be_bytes()), &e);
            ix.seal();
        }
        assert!(ix.sorted.len() < MEMORY_ENTRIES);
        assert!(ix.runs.len() < 2 * RUN_FANOUT + 2, "{} runs", ix.runs.len());
        assert!(ix.runs.iter().any(|r| r.count > MEMORY_ENTRIES), "merged");
        assert!(
            ix.runs.iter().any(Run::holds_filter) && ix.runs.iter().any(|r| !r.holds_filter()),
            "filters in memory and in files, both looked through"
        );
        for n in 0..6000u32 {
            let (pack, l) = ix.get(&id(n)).unwrap_or_else(|| panic!("{n} lost"));
            assert_eq!(pack, BlockId::of(&(n / 100).to_be_bytes()));
            assert_eq!(l.offset, u64::from(n));
            assert_eq!(l.compression == Compression::Zstd, n.is_multiple_of(2));
        }
        for n in 6000..7000u32 {
            assert!(!ix.contains(&id(n)));
        }
        assert_eq!(ix.len(), 6000);
        let mut ranked = BlockIndex::new(BS);
        ranked.reserve(10);
        for p in 0..60u32 {
            let e: Vec<IndexEntry> = (p * 100..p * 100 + 100).map(at).collect();
            ranked.add_pack(BlockId::of(&p.to_be_bytes()), &e);
        }
        ranked.rank_all().unwrap();
        assert_eq!(ranked.ranked_len(), 6000);
        let mut ids: Vec<BlockId> = (0..6000).map(id).collect();
        ids.sort();
        for (k, i) in ids.iter().enumerate() {
            assert_eq!(
                ranked.rank(i).unwrap().0,
                k,
                "ranks are positions in id order"
            );
        }
        assert!(ranked.rank(&id(7000)).is_none());
        let mut asked: Vec<(BlockId, u32)> = (0..7000u32).rev().map(|n| (id(n), n)).collect();
        let mut seen = 0;
        ranked
            .rank_many(&mut asked, |i, n, rank| {
                seen += 1;
                assert_eq!(rank, ranked.rank(i).map(|r| r.0), "{n}");
                assert_eq!(rank.is_some(), *n < 6000);
            })
            .unwrap();
        assert_eq!(seen, 7000);
        ranked
            .locate_many(&mut asked, |i, _, found| {
                assert_eq!(found, ranked.rank(i), "pack and location as a lone lookup");
            })
            .unwrap();
        // The filters spare nearly every read of an absent block.
        let passed = (100_000..110_000u32)
            .filter(|n| ix.runs.iter().any(|r| r.filter_passes(&id(*n))))
            .count();
        assert!(
            passed < 10_000 * ix.runs.len() / 20,
            "{passed} false positives"
        );
    }

    #[test]
    fn a_persisted_index_is_restored_checked_and_dropped_after_a_gc() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("index");
        let id = |n: u32| BlockId::of(&n.to_le_bytes());
        let at = |n: u32| IndexEntry {
            id: id(n),
            ..entry(0, u64::from(n), false)
        };
        let mut empty = BlockIndex::in_dir(BS, dir.path().join("empty"));
        empty.gc_epochs = Some(0);
        empty.persist().unwrap();
        let back = BlockIndex::restore(BS, &dir.path().join("empty"), 0).unwrap();
        assert!(
            back.unwrap().get(&id(1)).is_none(),
            "an empty repository's cache"
        );
        let mut ix = BlockIndex::in_dir(BS, cache.clone());
        ix.reserve(10);
        for p in 0..7u32 {
            let e: Vec<IndexEntry> = (p * 30..p * 30 + 30).map(at).collect();
            ix.add_pack(BlockId::of(&p.to_be_bytes()), &e);
        }
        ix.seal();
        ix.gc_epochs = Some(3);
        ix.persist().unwrap();
        // Runs a later session adds are not named by the state: removed on restore.
        ix.add_pack(
            BlockId::of(b"later"),
            &(500..600).map(at).collect::<Vec<_>>(),
        );
        ix.rank_all().unwrap();
        drop(ix);
        assert!(
            BlockIndex::restore(BS, &cache, 4).unwrap().is_none(),
            "a gc ran since"
        );
        assert!(BlockIndex::restore(BS * 2, &cache, 3).unwrap().is_none());
        let back = BlockIndex::restore(BS, &cache, 3)
            .unwrap()
            .expect("restored");
        for n in 0..210u32 {
            let (pack, l) = back.get(&id(n)).unwrap_or_else(|| panic!("{n}"));
            assert_eq!(pack, BlockId::of(&(n / 30).to_be_bytes()));
            assert_eq!(l.offset, u64::from(n));
        }
        assert!(back.get(&id(550)).is_none());
        assert!(back.has_pack(&BlockId::of(&6u32.to_be_bytes())));
        let files = std::fs::read_dir(&cache).unwrap().count();
        assert_eq!(
            files,
            back.runs.len() + 1,
            "only the state and its runs are left"
        );
        // A damaged run is never trusted.
        let run = back.runs[0].path.clone().unwrap();
        drop(back);
        let mut bytes = std::fs::read(&run).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&run, &bytes).unwrap();
        assert!(BlockIndex::restore(BS, &cache, 3).unwrap().is_none());
    }

    /// A cached run whose records are damaged opens (only its small parts are checked
    /// then), but the page that fails its check is never trusted: a lookup there says
    /// "not indexed" and flags the damage, a sorted lookup fails, and the cache is out
    /// of use from then on.
    #[test]
    fn a_damaged_page_is_never_trusted_and_takes_the_cache_out_of_use() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("index");
        let id = |n: u32| BlockId::of(&n.to_le_bytes());
        let mut ix = BlockIndex::in_dir(BS, cache.clone());
        ix.reserve(10);
        let entries: Vec<IndexEntry> = (0..40u32)
            .map(|n| IndexEntry {
                id: id(n),
                ..entry(0, u64::from(n), false)
            })
            .collect();
        ix.add_pack(BlockId::of(b"pack"), &entries);
        ix.seal();
        ix.gc_epochs = Some(0);
        ix.persist().unwrap();
        assert_eq!(ix.runs.len(), 1);
        let path = ix.runs[0].path.clone().unwrap();
        drop(ix);
        // The first record's location word, inside page 0 (after magic and salt).
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[24 + 40] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let back = BlockIndex::restore(BS, &cache, 0).unwrap().expect("opens");
        assert!(!back.take_damage());
        let mut ids: Vec<BlockId> = (0..40).map(id).collect();
        ids.sort();
        assert!(
            back.get(&ids[0]).is_none(),
            "a damaged page answers nothing"
        );
        assert!(back.take_damage(), "and says so");
        assert!(
            !cache.join("state.json").exists(),
            "the cache is out of use"
        );
        let mut asked = vec![(ids[1], ())];
        let err = back.locate_many(&mut asked, |_, _, _| {}).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("page 0 fails its check"), "{err}");
        assert!(BlockIndex::restore(BS, &cache, 0).unwrap().is_none());
    }

    proptest! {
        /// Against a plain map: every block added is found, at one of the places it was
        /// added with (the first when its packs came in one batch), and no other is.
        #[test]
        fn behaves_like_a_map(
            ops in proptest::collection::vec(
                (0u8..6, proptest::collection::vec((0u8..60, any::<bool>()), 0..40), 0usize..3),
                1..30,
            )
        ) {
            let mut ix = BlockIndex::new(BS);
            let mut model: HashMap<BlockId, Vec<(BlockId, u64)>> = HashMap::new();
            for (n, (pack, blocks, reserve)) in ops.iter().enumerate() {
                let pack = BlockId::of(&[*pack, 0xaa]);
                let entries: Vec<IndexEntry> = blocks
                    .iter()
                    .enumerate()
                    .map(|(k, (id, z))| entry(*id, (n * 1000 + k) as u64, *z))
                    .collect();
                if *reserve == 0 {
                    ix.reserve(entries.len());
                }
                ix.add_pack(pack, &entries);
                ix.seal();
                for e in &entries {
                    model.entry(e.id).or_default().push((pack, e.offset));
                }
                for i in 0..60u8 {
                    let id = BlockId::of(&[i]);
                    match (ix.get(&id), model.get(&id)) {
                        (None, None) => {}
                        (Some((p, l)), Some(places)) => {
                            prop_assert!(places.contains(&(p, l.offset)));
                            prop_assert_eq!(l.stored_len, 100 + u32::from(i));
                        }
                        (got, want) => prop_assert!(false, "{:?} vs {:?}", got, want),
                    }
                }
                prop_assert_eq!(ix.len(), model.len());
                let distinct: HashSet<BlockId> = ix.sorted.iter().map(|e| e.id).collect();
                prop_assert_eq!(distinct.len(), ix.sorted.len());
            }
        }
    }
}
