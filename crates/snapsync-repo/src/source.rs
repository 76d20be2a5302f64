//! The repository as a replication source (cascades, restore): listings come from
//! catalogs, differences from comparing block maps (metadata only), data from packs.

use snapsync_core::{BlockId, BlockMap, BlockRef, Extent, VolumeInfo};
use snapsync_store::{
    Diff, Result, SnapshotReader, SnapshotRef, SnapshotSource, Store, StoreError,
};

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
        let (_, map) = self.resolve(&manifest)?;
        Ok(Box::new(RepoReader {
            repo: self,
            packs: self.chain_packs(&manifest)?,
            map,
            size,
            cached: None,
        }))
    }
}

struct RepoReader<'a> {
    repo: &'a Repository,
    /// Packs the snapshot's manifests name: their indexes suffice to read it.
    packs: Vec<BlockId>,
    map: BlockMap,
    size: u64,
    /// The last block read, for readers that read in pieces smaller than a block.
    cached: Option<(u64, Vec<u8>)>,
}

impl SnapshotReader for RepoReader<'_> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        let bs = self.repo.block_size();
        let end = offset.saturating_add(buf.len() as u64).min(self.size);
        if offset >= end {
            return Ok(());
        }
        let first = offset / bs;
        let last = (end - 1) / bs;
        let wanted: Vec<(u64, BlockId)> = (first..=last)
            .filter_map(|i| self.map.get(i).id().map(|id| (i, id)))
            .filter(|(i, _)| self.cached.as_ref().is_none_or(|(c, _)| c != i))
            .collect();
        let ids: Vec<BlockId> = wanted.iter().map(|(_, id)| *id).collect();
        let data = self.repo.read_blocks_in(&ids, &self.packs)?;
        let mut copy = |i: u64, block: &[u8]| {
            let bstart = i * bs;
            let from = offset.max(bstart);
            let to = end.min(bstart + bs);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&block[(from - bstart) as usize..(to - bstart) as usize]);
        };
        if let Some((ci, block)) = &self.cached {
            if (first..=last).contains(ci) && self.map.get(*ci).id().is_some() {
                copy(*ci, block);
            }
        }
        let mut newest = None;
        for ((i, _), block) in wanted.iter().zip(data) {
            copy(*i, &block);
            newest = Some((*i, block));
        }
        if let Some(n) = newest {
            self.cached = Some(n);
        }
        Ok(())
    }
}
