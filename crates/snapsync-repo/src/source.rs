//! The repository as a replication source (cascades, restore): listings come from
//! catalogs, differences from comparing block maps (metadata only), data from packs.

use std::sync::Arc;

use snapsync_core::{BlockId, BlockMap, BlockRef, Extent, VolumeInfo};
use snapsync_store::{
    Diff, Result, SnapshotReader, SnapshotRef, SnapshotSource, Store, StoreError,
};

use crate::format::Manifest;
use crate::repo::Repository;

impl Store for Repository {
    fn location(&self) -> String {
        self.location().to_string()
    }

    fn system_id(&self) -> Result<String> {
        Ok(format!("repo:{}", self.repository_id()))
    }

    fn list(&self) -> Result<Vec<VolumeInfo>> {
        self.volume_infos()
    }

    fn volume(&self, volume: &str) -> Result<VolumeInfo> {
        // One catalog, found without listing the repository.
        match self.catalog(volume)? {
            Some(c) if !c.snapshots.is_empty() => Ok(crate::repo::volume_info(c)),
            _ => Err(StoreError::not_found(format!(
                "volume {volume:?} in {}",
                self.location()
            ))),
        }
    }
}

impl Repository {
    /// The block map of `volume@snapshot`.
    pub fn snapshot_map(&self, volume: &str, snapshot: &str) -> Result<(u64, BlockMap)> {
        let (size, manifest) = self.snapshot_manifest(volume, snapshot)?;
        let (_, map) = self.resolve(&manifest)?;
        Ok((size, map))
    }

    /// Size and manifest id of `volume@snapshot`, from its catalog (no listing).
    fn snapshot_manifest(
        &self,
        volume: &str,
        snapshot: &str,
    ) -> Result<(u64, crate::format::ManifestId)> {
        snapsync_core::validate_name("volume", volume)?;
        snapsync_core::validate_name("snapshot", snapshot)?;
        let cat = self.catalog(volume)?;
        let s = cat
            .as_ref()
            .and_then(|c| c.snapshots.iter().find(|s| s.name == snapshot))
            .ok_or_else(|| {
                StoreError::not_found(format!(
                    "snapshot {volume}@{snapshot} in {}",
                    self.location()
                ))
            })?;
        Ok((s.size, s.manifest))
    }
}

/// Changed blocks between two maps, as byte extents clipped to `size`.
fn diff_maps(target: &BlockMap, base: Option<&BlockMap>, bs: u64, size: u64) -> Diff {
    let mut diff = Diff::default();
    let extent = |i: u64| {
        let off = i * bs;
        Extent::new(off, bs.min(size - off))
    };
    match base {
        None => {
            for (i, _) in target.iter_data() {
                diff.data.push(extent(i));
            }
        }
        Some(base) => {
            let delta = snapsync_core::Delta::between(base, target);
            for (i, r) in &delta.entries {
                match r {
                    BlockRef::Zero => diff.zero.push(extent(*i)),
                    BlockRef::Data(_) => diff.data.push(extent(*i)),
                }
            }
            // Blocks past the base's end that stay zero are unchanged (zero-extended).
        }
    }
    diff
}

impl SnapshotSource for Repository {
    fn diff(&self, volume: &str, target: &str, base: Option<SnapshotRef<'_>>) -> Result<Diff> {
        let (size, t) = self.snapshot_map(volume, target)?;
        let b = base
            .map(|b| self.snapshot_map(b.volume, b.snapshot))
            .transpose()?;
        Ok(diff_maps(
            &t,
            b.as_ref().map(|x| &x.1),
            self.block_size(),
            size,
        ))
    }

    fn estimate_diff(&self, volume: &str, target: &str, base: SnapshotRef<'_>) -> Option<u64> {
        let d = self.diff(volume, target, Some(base)).ok()?;
        Some(d.data.total_len())
    }

    fn open_snapshot(&self, volume: &str, snapshot: &str) -> Result<Box<dyn SnapshotReader + '_>> {
        let (size, manifest) = self.snapshot_manifest(volume, snapshot)?;
        let chain = self.chain(&manifest)?;
        let mut packs: Vec<BlockId> = chain
            .iter()
            .flat_map(|m| m.header.packs.iter().copied())
            .collect();
        packs.sort_unstable();
        packs.dedup();
        Ok(Box::new(RepoReader {
            repo: self,
            packs,
            chain,
            size,
            cached: None,
            scratch: Vec::new(),
            indexed: false,
        }))
    }
}

struct RepoReader<'a> {
    repo: &'a Repository,
    /// Packs the snapshot's manifests name: their indexes suffice to read it.
    packs: Vec<BlockId>,
    /// The snapshot's manifests, newest first: blocks are looked up along the chain
    /// rather than in a resolved copy of its map (they are cached by the repository
    /// anyway, and a map costs about 60 bytes a block).
    chain: Vec<Arc<Manifest>>,
    size: u64,
    /// The last block read in part, for readers that read in pieces smaller than a
    /// block.
    cached: Option<(u64, Vec<u8>)>,
    /// Stored bytes of compressed blocks, reused from one read to the next.
    scratch: Vec<u8>,
    /// Whether the indexes of `packs` were loaded.
    indexed: bool,
}

impl RepoReader<'_> {
    /// The block at `index`: from the newest manifest that lists it, unless a manifest
    /// on the way is shorter (a shrink zeroes what it cuts off, see
    /// [`BlockMap::apply_in_place`]).
    fn block(&self, index: u64) -> BlockRef {
        for m in &self.chain {
            if index >= m.delta.block_count {
                return BlockRef::Zero;
            }
            if let Some(b) = m.delta.entries.get(&index) {
                return *b;
            }
        }
        BlockRef::Zero
    }

    /// The block at `index` whole (data blocks only), from the cache or the packs.
    fn partial_block(&mut self, index: u64, id: BlockId) -> Result<&[u8]> {
        if self.cached.as_ref().is_none_or(|(c, _)| *c != index) {
            let bs = self.repo.block_size() as usize;
            let mut block = self
                .cached
                .take()
                .map(|(_, b)| b)
                .unwrap_or_else(|| vec![0; bs]);
            self.repo
                .read_blocks_into(&mut block, &[(0, id)], &self.packs, &mut self.scratch)?;
            self.cached = Some((index, block));
        }
        Ok(&self.cached.as_ref().expect("cached").1)
    }
}

impl SnapshotReader for RepoReader<'_> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let bs = self.repo.block_size();
        let end = offset.saturating_add(buf.len() as u64).min(self.size);
        if offset >= end {
            buf.fill(0);
            return Ok(());
        }
        if !self.indexed {
            // Sized for this snapshot's blocks at once, not grown step by step.
            // The full map at the end of the chain lists about as many blocks.
            let blocks = self.chain.iter().map(|m| m.delta.len()).max().unwrap_or(0);
            self.repo.index_packs(&self.packs, blocks)?;
            self.indexed = true;
        }
        // Past the snapshot's size: zeros.
        buf[(end - offset) as usize..].fill(0);
        // Blocks wholly inside `offset..end` are read straight into `buf`; the one or
        // two cut by its ends go through a block-sized buffer.
        let whole = offset.div_ceil(bs)..end / bs;
        let mut edges = Vec::with_capacity(2);
        if whole.is_empty() {
            edges.extend((offset / bs..=(end - 1) / bs).take(2));
        } else {
            if !offset.is_multiple_of(bs) {
                edges.push(offset / bs);
            }
            if !end.is_multiple_of(bs) {
                edges.push(end / bs);
            }
        }
        for i in edges {
            let bstart = i * bs;
            let from = offset.max(bstart);
            let to = end.min(bstart + bs);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match self.block(i).id() {
                None => dst.fill(0),
                Some(id) => dst.copy_from_slice(
                    &self.partial_block(i, id)?[(from - bstart) as usize..(to - bstart) as usize],
                ),
            }
        }
        if whole.is_empty() {
            return Ok(());
        }
        let at = (whole.start * bs - offset) as usize;
        let out = &mut buf[at..at + ((whole.end - whole.start) * bs) as usize];
        let mut wanted: Vec<(usize, BlockId)> = Vec::new();
        for (slot, dst) in out.chunks_mut(bs as usize).enumerate() {
            match self.block(whole.start + slot as u64).id() {
                Some(id) => wanted.push((slot, id)),
                None => dst.fill(0),
            }
        }
        self.repo
            .read_blocks_into(out, &wanted, &self.packs, &mut self.scratch)
    }
}
