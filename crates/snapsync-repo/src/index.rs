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

use std::collections::HashMap;

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
/// length (25 bits: at most the block size, at most 16 MiB) and compression (1 bit).
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

impl Loc {
    fn new(pack: u32, e: &IndexEntry, block_size: u64) -> Self {
        let fits = e.offset < 1 << OFFSET_BITS
            && u64::from(e.raw_len) == block_size
            && u64::from(e.stored_len) <= block_size;
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
            // sorted once by `seal`.
            self.sorted.extend(entries.iter().map(|e| Entry {
                id: e.id,
                loc: Loc::new(pos, e, bs),
            }));
            return;
        }
        // A pack at a time (the packs a receive stored): to the side map, folded into
        // the vector once it is an eighth of its size, so that the vector is re-sorted
        // a logarithmic number of times however many packs come.
        for e in entries {
            if self.find_sorted(&e.id).is_none() {
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
        // In place (an unstable sort needs no scratch memory); the pack position and
        // offset make the order, and so the entry kept, deterministic.
        self.sorted.sort_unstable_by(|a, b| {
            (a.id, a.loc.pack, a.loc.offset()).cmp(&(b.id, b.loc.pack, b.loc.offset()))
        });
        self.sorted.dedup_by_key(|e| e.id);
        self.unsorted = false;
    }

    /// Start adding packs in bulk, about `additional` blocks (an estimate: more still
    /// fit), made room for at once; [`BlockIndex::seal`] ends it.
    pub(crate) fn reserve(&mut self, additional: usize) {
        self.sorted.reserve_exact(additional + self.recent.len());
        self.unsorted = true;
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
    #[cfg(test)]
    fn len(&self) -> usize {
        self.sorted.len() + self.recent.len()
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
        // About log(2000 / 16) / log(9 / 8) times, not once per pack.
        assert!(folds < 45, "{folds} folds");
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
