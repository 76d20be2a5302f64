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
//! sorted, as a **run** (an anonymous temporary file of 44-byte records) and emptied. A
//! run keeps in memory only a filter (a blocked Bloom filter, 8 bits a block: one cache
//! line per lookup, about 2% false positives) and a fence (the first 8 bytes of every
//! 64th id), so a lookup of a block that is not there costs no read, and one that is
//! costs one read of 2.8 KiB (from the page cache, usually). Runs are merged eight at a
//! time when eight of one size tier exist, so there are few of them. About 1.2 bytes of
//! memory a block: the index of a 64 M-block repository takes ~80 MiB, not 2.8 GiB.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;

use snapsync_core::BlockId;

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
/// Records between two fence entries: one read per lookup.
const FENCE: usize = 64;
/// One record: id, pack position, location word.
const RECORD: usize = 44;

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
        self.runs
            .iter()
            .rev()
            .find_map(|r| r.find(id).map(|(_, loc)| loc))
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
        let mut page_no = usize::MAX;
        let mut page: Vec<u8> = vec![0; FENCE * RECORD];
        let mut page_len = 0;
        for (id, tag) in ids.iter() {
            if !run.filter.may_contain(id) {
                f(id, tag, None);
                continue;
            }
            let key = prefix(id);
            let mut p = run.fences.partition_point(|x| *x < key).saturating_sub(1);
            let mut found = None;
            while p < run.fences.len() && run.fences[p] <= key {
                if p != page_no {
                    let first = p * FENCE;
                    page_len = (run.count - first).min(FENCE);
                    run.file.read_exact_at(
                        &mut page[..page_len * RECORD],
                        8 + (first * RECORD) as u64,
                    )?;
                    page_no = p;
                }
                let records = &page[..page_len * RECORD];
                let k = records
                    .chunks_exact(RECORD)
                    .position(|r| r[..32] >= id.0[..]);
                match k {
                    Some(k) if records[k * RECORD..k * RECORD + 32] == id.0[..] => {
                        let loc = decode_record(&records[k * RECORD..(k + 1) * RECORD]).loc;
                        found = Some((
                            p * FENCE + k,
                            self.packs[loc.pack as usize],
                            loc.location(self.block_size),
                        ));
                        break;
                    }
                    Some(_) => break,
                    None => p += 1,
                }
            }
            f(id, tag, found);
        }
        Ok(())
    }

    /// A block's rank (after [`BlockIndex::rank_all`]), pack and location, looked up
    /// alone: the tests' reference for [`BlockIndex::locate_many`].
    #[cfg(test)]
    fn rank(&self, id: &BlockId) -> Option<(usize, BlockId, BlockLocation)> {
        debug_assert!(self.runs.len() <= 1 && self.sorted.is_empty() && self.recent.is_empty());
        let (rank, l) = self.runs.first()?.find(id)?;
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
const CACHE_VERSION: u32 = 1;
/// Magic at the start of a cached run file.
const RUN_MAGIC: &[u8; 8] = b"SNSYIXR1";

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

/// Blocks written out: sorted records in a temporary file, with a filter and a fence in
/// memory (see the module documentation).
#[derive(Debug)]
struct Run {
    file: File,
    /// Its name when it is a file of the local cache (removed when merged away, unless
    /// `persisted`: a `state.json` names it, and other processes may be reading it).
    path: Option<std::path::PathBuf>,
    persisted: bool,
    /// The highest pack position it names (a cached run must fit its state's packs).
    max_pack: u64,
    count: usize,
    /// The first 8 bytes of the id of records 0, FENCE, 2 * FENCE, …
    fences: Vec<u64>,
    filter: Filter,
}

fn prefix(id: &BlockId) -> u64 {
    u64::from_be_bytes(id.0[..8].try_into().expect("8 bytes"))
}

fn encode_record(e: &Entry, out: &mut [u8]) {
    out[..32].copy_from_slice(&e.id.0);
    out[32..36].copy_from_slice(&e.loc.pack.to_le_bytes());
    out[36..40].copy_from_slice(&e.loc.word[0].to_le_bytes());
    out[40..44].copy_from_slice(&e.loc.word[1].to_le_bytes());
}

fn decode_record(r: &[u8]) -> Entry {
    let u32_at = |k: usize| u32::from_le_bytes(r[k..k + 4].try_into().expect("4 bytes"));
    Entry {
        id: BlockId(r[..32].try_into().expect("32 bytes")),
        loc: Loc {
            pack: u32_at(32),
            word: [u32_at(36), u32_at(40)],
        },
    }
}

impl Run {
    /// Write `count` entries, sorted by id, distinct: to a new file in `dir`, or to an
    /// anonymous temporary file. Layout: magic, the records (from byte 8), the fences,
    /// the filter, then `count`, fence count, filter blocks, highest pack position (u64
    /// each) and the BLAKE3 of everything before, which [`Run::open`] checks.
    fn write(
        dir: Option<&std::path::Path>,
        entries: impl Iterator<Item = Entry>,
        count: usize,
    ) -> std::io::Result<Run> {
        let (file, path) = match dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                let p = d.join(format!("run-{}", snapsync_store::random_id()));
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&p)?;
                (f, Some(p))
            }
            None => (tempfile::tempfile()?, None),
        };
        let mut out = HashingWriter {
            inner: std::io::BufWriter::with_capacity(1 << 20, &file),
            hash: blake3::Hasher::new(),
        };
        out.write_all(RUN_MAGIC)?;
        let mut fences = Vec::with_capacity(count / FENCE + 1);
        let mut filter = Filter::new(count);
        let mut record = [0u8; RECORD];
        let mut n = 0usize;
        let mut max_pack = 0u64;
        for e in entries {
            if n.is_multiple_of(FENCE) {
                fences.push(prefix(&e.id));
            }
            filter.insert(&e.id);
            max_pack = max_pack.max(u64::from(e.loc.pack));
            encode_record(&e, &mut record);
            out.write_all(&record)?;
            n += 1;
        }
        for f in &fences {
            out.write_all(&f.to_le_bytes())?;
        }
        for b in &filter.blocks {
            for w in b {
                out.write_all(&w.to_le_bytes())?;
            }
        }
        for v in [
            n as u64,
            fences.len() as u64,
            filter.blocks.len() as u64,
            max_pack,
        ] {
            out.write_all(&v.to_le_bytes())?;
        }
        let check = out.hash.finalize();
        out.inner.write_all(check.as_bytes())?;
        out.inner.flush()?;
        drop(out);
        Ok(Run {
            file,
            path,
            persisted: false,
            max_pack,
            count: n,
            fences,
            filter,
        })
    }

    /// A run file of the local cache, checked whole; `None` when it is damaged.
    fn open(path: &std::path::Path) -> std::io::Result<Option<Run>> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        let Some(footer) = RunFooter::read(&file, len)? else {
            return Ok(None);
        };
        // Checked whole: a cached location that were wrong would make a good block read
        // as damaged.
        if !footer.checks_out(&file)? {
            return Ok(None);
        }
        let records_end = 8 + footer.count * RECORD as u64;
        let mut rest = vec![0u8; (len - RunFooter::LEN - records_end) as usize];
        file.read_exact_at(&mut rest, records_end)?;
        let (f, b) = rest.split_at(footer.fences as usize * 8);
        let word = |c: &[u8]| u64::from_le_bytes(c.try_into().expect("8 bytes"));
        let fences = f.chunks_exact(8).map(word).collect();
        let blocks = b
            .chunks_exact(64)
            .map(|c| {
                let mut block = [0u64; 8];
                for (k, w) in c.chunks_exact(8).enumerate() {
                    block[k] = word(w);
                }
                block
            })
            .collect();
        Ok(Some(Run {
            file,
            path: Some(path.to_path_buf()),
            persisted: true,
            max_pack: footer.max_pack,
            count: footer.count as usize,
            fences,
            filter: Filter { blocks },
        }))
    }

    /// Merge runs into one (a block in several keeps the oldest run's location); the
    /// merged runs' cache files are removed.
    fn merge(dir: Option<&std::path::Path>, runs: &[Run]) -> std::io::Result<Run> {
        let count = runs.iter().map(|r| r.count).sum();
        let mut readers: Vec<RunReader<'_>> = runs.iter().map(RunReader::new).collect();
        let mut heads: Vec<Option<Entry>> = Vec::with_capacity(runs.len());
        for r in &mut readers {
            heads.push(r.next()?);
        }
        let mut error = None;
        let mut last: Option<BlockId> = None;
        let merged = std::iter::from_fn(|| loop {
            let k = (0..heads.len())
                .filter(|&k| heads[k].is_some())
                .min_by_key(|&k| (heads[k].expect("some").id, k))?;
            let e = heads[k].take().expect("some");
            match readers[k].next() {
                Ok(next) => heads[k] = next,
                Err(err) => {
                    error = Some(err);
                    return None;
                }
            }
            if last != Some(e.id) {
                last = Some(e.id);
                return Some(e);
            }
        });
        let run = Run::write(dir, merged, count)?;
        if let Some(e) = error {
            return Err(e);
        }
        for r in runs.iter().filter(|r| !r.persisted) {
            if let Some(p) = &r.path {
                let _ = std::fs::remove_file(p);
            }
        }
        Ok(run)
    }

    /// The record number and location of `id`, if this run holds it.
    fn find(&self, id: &BlockId) -> Option<(usize, Loc)> {
        if !self.filter.may_contain(id) {
            return None;
        }
        let key = prefix(id);
        // The first page that may hold it: the last whose fence is below the key (a
        // page starting with the key's prefix may follow one that ends with it).
        let mut page = self.fences.partition_point(|f| *f < key).saturating_sub(1);
        let mut buf = vec![0u8; FENCE * RECORD];
        while page < self.fences.len() && self.fences[page] <= key {
            let first = page * FENCE;
            let n = (self.count - first).min(FENCE);
            let bytes = &mut buf[..n * RECORD];
            if let Err(e) = self.file.read_exact_at(bytes, 8 + (first * RECORD) as u64) {
                tracing::warn!(error = %e, "block index run unreadable");
                return None;
            }
            for (k, r) in bytes.chunks_exact(RECORD).enumerate() {
                let e = decode_record(r);
                match e.id.cmp(id) {
                    std::cmp::Ordering::Less => continue,
                    std::cmp::Ordering::Equal => return Some((first + k, e.loc)),
                    std::cmp::Ordering::Greater => return None,
                }
            }
            page += 1;
        }
        None
    }
}

/// The end of a cached run file (see [`Run::write`]).
struct RunFooter {
    count: u64,
    fences: u64,
    filter_blocks: u64,
    max_pack: u64,
    check: [u8; 32],
    /// Bytes before the checksum.
    hashed: u64,
}

impl RunFooter {
    const LEN: u64 = 4 * 8 + 32;

    /// The footer of a file of `len` bytes, if its counts add up to that length.
    fn read(file: &File, len: u64) -> std::io::Result<Option<RunFooter>> {
        if len < 8 + Self::LEN {
            return Ok(None);
        }
        let mut tail = [0u8; Self::LEN as usize];
        file.read_exact_at(&mut tail, len - Self::LEN)?;
        let word = |k: usize| u64::from_le_bytes(tail[k * 8..k * 8 + 8].try_into().expect("8"));
        let footer = RunFooter {
            count: word(0),
            fences: word(1),
            filter_blocks: word(2),
            max_pack: word(3),
            check: tail[32..].try_into().expect("32 bytes"),
            hashed: len - 32,
        };
        let expect = footer
            .count
            .checked_mul(RECORD as u64)
            .and_then(|b| b.checked_add(8))
            .and_then(|b| b.checked_add(footer.fences.checked_mul(8)?))
            .and_then(|b| b.checked_add(footer.filter_blocks.checked_mul(64)?))
            .and_then(|b| b.checked_add(Self::LEN));
        let fences_ok = footer.fences == (footer.count as usize).div_ceil(FENCE) as u64;
        Ok((expect == Some(len) && fences_ok).then_some(footer))
    }

    /// Whether the file's magic and checksum are right.
    fn checks_out(&self, file: &File) -> std::io::Result<bool> {
        let mut hash = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < self.hashed {
            let n = (self.hashed - at).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], at)?;
            if at == 0 && buf[..8] != RUN_MAGIC[..] {
                return Ok(false);
            }
            hash.update(&buf[..n]);
            at += n as u64;
        }
        Ok(hash.finalize().as_bytes() == &self.check)
    }
}

/// A writer that hashes what it writes.
struct HashingWriter<W: Write> {
    inner: W,
    hash: blake3::Hasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A run read in order, a buffer at a time.
struct RunReader<'a> {
    run: &'a Run,
    at: usize,
    buf: Vec<u8>,
    pos: usize,
}

impl<'a> RunReader<'a> {
    fn new(run: &'a Run) -> Self {
        RunReader {
            run,
            at: 0,
            buf: Vec::new(),
            pos: 0,
        }
    }

    fn next(&mut self) -> std::io::Result<Option<Entry>> {
        if self.pos == self.buf.len() {
            let n = (self.run.count - self.at).min(1024);
            if n == 0 {
                return Ok(None);
            }
            self.buf.resize(n * RECORD, 0);
            self.run
                .file
                .read_exact_at(&mut self.buf, 8 + (self.at * RECORD) as u64)?;
            self.at += n;
            self.pos = 0;
        }
        let e = decode_record(&self.buf[self.pos..self.pos + RECORD]);
        self.pos += RECORD;
        Ok(Some(e))
    }
}

/// A blocked Bloom filter over block ids (already uniform hashes): 8 bits a block, one
/// 512-bit block (a cache line) per id, 6 bits set in it.
#[derive(Debug)]
struct Filter {
    blocks: Vec<[u64; 8]>,
}

impl Filter {
    fn new(count: usize) -> Self {
        Filter {
            blocks: vec![[0; 8]; (count * 8).div_ceil(512).max(1)],
        }
    }

    fn bits(&self, id: &BlockId) -> (usize, [u32; 6]) {
        let w = |k: usize| u64::from_le_bytes(id.0[k..k + 8].try_into().expect("8 bytes"));
        let block = (w(8) % self.blocks.len() as u64) as usize;
        let h = w(16);
        let mut bits = [0u32; 6];
        for (k, b) in bits.iter_mut().enumerate() {
            *b = ((h >> (9 * k)) & 511) as u32;
        }
        (block, bits)
    }

    fn insert(&mut self, id: &BlockId) {
        let (block, bits) = self.bits(id);
        for b in bits {
            self.blocks[block][(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    fn may_contain(&self, id: &BlockId) -> bool {
        let (block, bits) = self.bits(id);
        bits.iter()
            .all(|b| self.blocks[block][(*b / 64) as usize] & (1 << (b % 64)) != 0)
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
            .filter(|n| ix.runs.iter().any(|r| r.filter.may_contain(&id(*n))))
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
