//! The in-memory block index: which pack holds each block. Built from the `index/`
//! objects when first needed, and extended by the packs a receive writes.

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

/// All blocks of a repository.
#[derive(Debug, Default)]
pub(crate) struct BlockIndex {
    pub(crate) packs: Vec<BlockId>,
    pack_pos: HashMap<BlockId, u32>,
    pub(crate) blocks: HashMap<BlockId, BlockLocation>,
    /// Whether every index object of the repository was loaded (a listing); otherwise
    /// only the packs a snapshot's manifests named were.
    pub(crate) complete: bool,
}

impl BlockIndex {
    /// Add the entries of one pack.
    pub(crate) fn add_pack(&mut self, pack: BlockId, entries: &[IndexEntry]) {
        let pos = *self.pack_pos.entry(pack).or_insert_with(|| {
            self.packs.push(pack);
            (self.packs.len() - 1) as u32
        });
        for e in entries {
            self.blocks.entry(e.id).or_insert(BlockLocation {
                pack: pos,
                offset: e.offset,
                stored_len: e.stored_len,
                raw_len: e.raw_len,
                compression: e.compression,
            });
        }
    }

    /// Make room for `additional` more blocks at once.
    pub(crate) fn reserve(&mut self, additional: usize) {
        self.blocks.reserve(additional);
    }

    pub(crate) fn get(&self, id: &BlockId) -> Option<(BlockId, BlockLocation)> {
        self.blocks
            .get(id)
            .map(|l| (self.packs[l.pack as usize], *l))
    }

    /// Whether this pack's index was loaded.
    pub(crate) fn has_pack(&self, pack: &BlockId) -> bool {
        self.pack_pos.contains_key(pack)
    }

    pub(crate) fn contains(&self, id: &BlockId) -> bool {
        self.blocks.contains_key(id)
    }
}
