//! Writing a manifest from a stream of entries, a part at a time.
//!
//! Entries arrive in index order from a merge (a receive's blocks over its base, two
//! chains compared) and are encoded into the current part; a full part is stored as its
//! own object in the background while the next one fills. Only when all are stored is
//! the head written (header and part table), so a manifest is never visible before its
//! parts, and its id (the head's BLAKE3) covers every part's id. A manifest with at most
//! [`RepoOptions::part_entries`](crate::RepoOptions::part_entries) entries is one object with its entries inline. Memory is a part or
//! two, whatever the size of the map.

use std::collections::{BTreeSet, VecDeque};

use bytes::Bytes;
use snapsync_core::{BlockId, BlockRef, RootHasher};
use snapsync_store::Result;

use crate::backend::{PendingPuts, Put};
use crate::format::{self, ManifestHeader, ManifestId, PartRef};
use crate::repo::{key_manifest, key_part, Repository};

/// Parts stored in the background at once.
const PARTS_IN_FLIGHT: usize = 2;

/// See the module documentation.
pub(crate) struct ManifestWriter<'a> {
    repo: &'a Repository,
    block_count: u64,
    /// For a full map (no delta base): its root hash, computed on the way. Zero
    /// entries are dropped (a full map lists data blocks only).
    root: Option<RootHasher>,
    /// The current part's entries, encoded.
    entries: Vec<u8>,
    /// Their data ids (to name the packs that hold them) and index range.
    ids: Vec<BlockId>,
    first: u64,
    in_part: u64,
    last: Option<u64>,
    parts: Vec<PartRef>,
    count: u64,
    packs: BTreeSet<BlockId>,
    uploads: VecDeque<PendingPuts>,
}

impl<'a> ManifestWriter<'a> {
    /// A writer of a map of `block_count` blocks: a full map when `full`, else a delta.
    pub(crate) fn new(repo: &'a Repository, block_count: u64, full: bool) -> Self {
        Self {
            repo,
            block_count,
            root: full.then(|| RootHasher::new(block_count)),
            entries: Vec::new(),
            ids: Vec::new(),
            first: 0,
            in_part: 0,
            last: None,
            parts: Vec::new(),
            count: 0,
            packs: BTreeSet::new(),
            uploads: VecDeque::new(),
        }
    }

    /// Entries written so far.
    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    /// Add the entry for block `index`: above the last one, inside the map.
    pub(crate) fn push(&mut self, index: u64, block: BlockRef) -> Result<()> {
        assert!(
            self.last.is_none_or(|l| l < index) && index < self.block_count,
            "manifest entries in index order, inside the map"
        );
        if let Some(root) = &mut self.root {
            match block {
                BlockRef::Zero => return Ok(()),
                BlockRef::Data(id) => root.add(index, &id),
            }
        }
        if self.in_part == self.repo.options.part_entries as u64 {
            self.store_part()?;
        }
        if self.in_part == 0 {
            self.first = index;
        }
        format::encode_entry(&mut self.entries, index, &block);
        if let BlockRef::Data(id) = block {
            self.ids.push(id);
        }
        self.in_part += 1;
        self.count += 1;
        self.last = Some(index);
        Ok(())
    }

    /// Name the packs of the current part's blocks, then forget the blocks.
    fn note_packs(&mut self) -> Result<()> {
        let ids = std::mem::take(&mut self.ids);
        let packs = &mut self.packs;
        self.repo.with_index(|ix| {
            packs.extend(ids.iter().filter_map(|id| ix.get(id).map(|(p, _)| p)));
        })
    }

    fn store_part(&mut self) -> Result<()> {
        self.note_packs()?;
        let bytes = format::encode_part(self.in_part, &std::mem::take(&mut self.entries));
        let id = self.repo.object_id(&bytes);
        let bytes = self.repo.seal_object(&key_part(&id), bytes);
        self.parts.push(PartRef {
            first: self.first,
            last: self.last.expect("a part has entries"),
            count: self.in_part,
            id,
        });
        self.in_part = 0;
        let job = self
            .repo
            .backend
            .spawn_puts(vec![(key_part(&id), vec![Bytes::from(bytes)])]);
        self.uploads.push_back(job);
        while self.uploads.len() > PARTS_IN_FLIGHT {
            let job = self.uploads.pop_front().expect("non-empty");
            self.repo.backend.wait(job)?;
        }
        Ok(())
    }

    /// Store the rest and the head; `header`'s root and packs are filled in here.
    pub(crate) fn finish(mut self, mut header: ManifestHeader) -> Result<ManifestId> {
        let inline = self.parts.is_empty();
        if !inline && self.in_part > 0 {
            self.store_part()?;
        }
        self.note_packs()?;
        while let Some(job) = self.uploads.pop_front() {
            self.repo.backend.wait(job)?;
        }
        header.root = self.root.take().map(RootHasher::finish);
        header.packs = std::mem::take(&mut self.packs).into_iter().collect();
        let bytes = format::encode_manifest_head(
            &header,
            self.block_count,
            self.count,
            &self.parts,
            if inline { &self.entries } else { &[] },
        );
        let id = self.repo.object_id(&bytes);
        let bytes = self.repo.seal_object(&key_manifest(&id), bytes);
        match self
            .repo
            .backend
            .put(&key_manifest(&id), Bytes::from(bytes), Put::Create)
        {
            Ok(()) | Err(snapsync_store::StoreError::AlreadyExists { .. }) => Ok(id),
            Err(e) => Err(e),
        }
    }
}
