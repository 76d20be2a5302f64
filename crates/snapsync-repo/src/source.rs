//! The repository as a replication source (cascades, restore): listings come from
//! catalogs, differences from the delta chains (metadata only, see [`crate::diff`]),
//! data from packs.

use snapsync_core::{BlockId, VolumeInfo};
use snapsync_store::{
    Diff, Result, SnapshotReader, SnapshotRef, SnapshotSource, Store, StoreError,
};

use crate::diff::DiffSide;
use crate::repo::Repository;
use crate::stream::{ChainCursor, CheckedManifest};

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
    /// Size and manifest id of `volume@snapshot`, from its catalog (no listing).
    fn snapshot_manifest(
        &self,
        volume: &str,
        snapshot: &str,
    ) -> Result<(u64, crate::format::ManifestId)> {
        let s = self.snapshot_side(volume, snapshot)?;
        Ok((s.size, s.manifest))
    }

    /// Manifest id, size and age of `volume@snapshot`, from its catalog (no listing).
    fn snapshot_side(&self, volume: &str, snapshot: &str) -> Result<DiffSide> {
        snapsync_core::validate_name("volume", volume)?;
        snapsync_core::validate_name("snapshot", snapshot)?;
        let cat = self.catalog(volume)?;
        let s = cat
            .as_ref()
            .and_then(|c| c.snapshots.iter().find(|s| s.name == snapshot))
            .ok_or_else(|| {
                StoreError::not_found(format!(
                    "snapshot {} in {}",
                    snapsync_core::quote_snapshot(volume, snapshot),
                    self.location()
                ))
            })?;
        Ok(DiffSide {
            manifest: s.manifest,
            size: s.size,
            created: s.created,
        })
    }
}

impl SnapshotSource for Repository {
    fn local_files(&self, _volume: &str, _snapshot: &str) -> Result<Vec<std::path::PathBuf>> {
        Ok(match self.location() {
            crate::Location::Local(root) => vec![root.clone()],
            _ => Vec::new(),
        })
    }

    fn diff(&self, volume: &str, target: &str, base: Option<SnapshotRef<'_>>) -> Result<Diff> {
        let Some(base) = base else {
            // A whole snapshot (a restore, a first copy out): its data blocks, straight
            // from the chain.
            let (size, manifest) = self.snapshot_manifest(volume, target)?;
            let chain = self.checked_chain(&manifest)?;
            let mut cursor = ChainCursor::new(self, &chain)?;
            let bs = self.block_size();
            let mut diff = Diff::default();
            while let Some(i) = cursor.next_data()? {
                diff.data.push(crate::diff::block_extent(i, bs, size));
            }
            return Ok(diff);
        };
        // From the manifests above where the two chains meet (see crate::diff).
        let t = self.snapshot_side(volume, target)?;
        let b = self.snapshot_side(base.volume, base.snapshot)?;
        self.diff_snapshots(t, b)
    }

    fn estimate_diff(&self, volume: &str, target: &str, base: SnapshotRef<'_>) -> Option<u64> {
        let d = self.diff(volume, target, Some(base)).ok()?;
        Some(d.data.total_len())
    }

    fn open_snapshot(&self, volume: &str, snapshot: &str) -> Result<Box<dyn SnapshotReader + '_>> {
        let (size, manifest) = self.snapshot_manifest(volume, snapshot)?;
        let chain = self.checked_chain(&manifest)?;
        let mut packs: Vec<BlockId> = chain
            .iter()
            .flat_map(|m| m.head.header.packs.iter().copied())
            .collect();
        packs.sort_unstable();
        packs.dedup();
        Ok(Box::new(RepoReader {
            repo: self,
            packs,
            chain,
            cursor: None,
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
    /// The snapshot's manifests, newest first, checked but not decoded: blocks are
    /// looked up by walking them in step with the reads (see [`ChainCursor`]), so
    /// that no copy of the snapshot's map is held, resolved or not.
    chain: Vec<CheckedManifest>,
    /// Where the walk is; started again for a read before it.
    cursor: Option<ChainCursor<'a>>,
    size: u64,
    /// The last block read in part, for readers that read in pieces smaller than a
    /// block.
    cached: Option<(u64, Vec<u8>)>,
    /// Stored bytes of compressed blocks, reused from one read to the next.
    scratch: Vec<u8>,
    /// Whether the indexes of `packs` were loaded.
    indexed: bool,
}

impl<'a> RepoReader<'a> {
    /// The ids of blocks `first..=last` (`None` for zero blocks).
    fn ids(&mut self, first: u64, last: u64) -> Result<Vec<Option<BlockId>>> {
        // A read before the last one (random access, as an NBD export sees) seeks back:
        // version-2 manifests load the one part that holds it; version-1 ones are
        // walked again from the start.
        let behind = self.cursor.as_ref().is_some_and(|c| c.position() > first);
        let sought = match (&mut self.cursor, behind) {
            (Some(c), true) => c.seek(first)?,
            _ => !behind,
        };
        if self.cursor.is_none() || !sought {
            self.cursor = Some(ChainCursor::new(self.repo, &self.chain)?);
        }
        let cursor = self.cursor.as_mut().expect("set");
        (first..=last).map(|i| Ok(cursor.block(i)?.id())).collect()
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
            // Sized for this snapshot's blocks at once, not grown step by step: its
            // packs hold the blocks its manifests list (room that is not needed costs
            // address space, not memory).
            let blocks = self.chain.iter().map(|m| m.head.count as usize).sum();
            self.repo.index_packs(&self.packs, blocks)?;
            self.indexed = true;
        }
        // Past the snapshot's size: zeros.
        buf[(end - offset) as usize..].fill(0);
        let first = offset / bs;
        let ids = self.ids(first, (end - 1) / bs)?;
        let id_of = |i: u64| ids[(i - first) as usize];
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
            match id_of(i) {
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
            match id_of(whole.start + slot as u64) {
                Some(id) => wanted.push((slot, id)),
                None => dst.fill(0),
            }
        }
        self.repo
            .read_blocks_into(out, &wanted, &self.packs, &mut self.scratch)
    }

    fn finish(self: Box<Self>) -> Result<()> {
        // The rest of the walk, so that a manifest that changed since it was checked
        // is reported.
        match self.cursor {
            Some(c) => c.finish(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Manifest, ManifestHeader};
    use crate::Location;
    use proptest::prelude::*;
    use snapsync_core::{BlockMap, BlockRef, Delta, SnapshotId, Timestamp};

    fn put(repo: &Repository, delta: Delta, base: Option<BlockId>) -> BlockId {
        repo.put_manifest(Manifest {
            header: ManifestHeader {
                volume: "v".into(),
                name: "s".into(),
                id: SnapshotId([0; 32]),
                created: Timestamp::new(1, 0),
                size: delta.block_count,
                block_size: 1,
                delta_base: base,
                depth: 0,
                root: None,
                packs: vec![],
            },
            delta,
        })
        .unwrap()
    }

    /// A map streamed, as [`crate::stream::delta_between`] takes it.
    struct MapStream(std::vec::IntoIter<(u64, BlockId)>);

    impl crate::stream::DataStream for MapStream {
        fn next_data(&mut self) -> Result<Option<(u64, BlockId)>> {
            Ok(self.0.next())
        }
    }

    fn stream(m: &BlockMap) -> MapStream {
        MapStream(m.iter_data().collect::<Vec<_>>().into_iter())
    }

    fn delta_of(base: &mut dyn crate::stream::DataStream, target: &BlockMap) -> Delta {
        let mut entries = std::collections::BTreeMap::new();
        crate::stream::delta_between(base, &mut stream(target), target.block_count(), |i, b| {
            entries.insert(i, b);
            Ok(())
        })
        .unwrap();
        Delta {
            block_count: target.block_count(),
            entries,
        }
    }

    fn map(blocks: &[Option<u8>]) -> BlockMap {
        let mut m = BlockMap::zeroed(blocks.len() as u64);
        for (i, b) in blocks.iter().enumerate() {
            if let Some(n) = b {
                m.set(i as u64, BlockRef::Data(BlockId::of(&[*n])));
            }
        }
        m
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Walking a chain from storage gives the map it resolves to, through growth,
        /// shrinks and blocks zeroed again, both block by block and data block by data
        /// block; manifests are long enough to span many pieces.
        #[test]
        fn chain_walk_matches_the_resolved_map(
            snaps in proptest::collection::vec(
                proptest::collection::vec(proptest::option::of(0u8..4), 0..400), 1..5),
            step in 1u64..50,
            other in proptest::collection::vec(proptest::option::of(0u8..4), 0..400),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let repo = Repository::init(Location::Local(dir.path().join("r")), 4096).unwrap();
            let mut prev = BlockMap::zeroed(0);
            let mut head = None;
            for s in &snaps {
                let m = map(s);
                head = Some(put(&repo, Delta::between(&prev, &m), head));
                prev = m;
            }
            let head = head.unwrap();
            prop_assert_eq!(&repo.resolve(&head).unwrap().1, &prev);
            let chain = repo.checked_chain(&head).unwrap();

            let mut c = ChainCursor::new(&repo, &chain).unwrap();
            let mut walked = Vec::new();
            while let Some(i) = c.next_data().unwrap() {
                walked.push(i);
            }
            c.finish().unwrap();
            let resolved: Vec<u64> = prev.iter_data().map(|(i, _)| i).collect();
            prop_assert_eq!(walked, resolved);

            // A delta against the chain, read as it is walked, is the delta against
            // its map.
            let target = map(&other);
            let mut c = ChainCursor::new(&repo, &chain).unwrap();
            prop_assert_eq!(delta_of(&mut c, &target), Delta::between(&prev, &target));

            // Seeking back (random access) finds every block again.
            let mut c = ChainCursor::new(&repo, &chain).unwrap();
            let mut i = prev.block_count() + 2;
            while i > 0 {
                i = i.saturating_sub(step);
                prop_assert!(c.seek(i).unwrap(), "version-2 chains seek");
                prop_assert_eq!(c.block(i).unwrap(), prev.get(i));
            }

            let mut c = ChainCursor::new(&repo, &chain).unwrap();
            let mut i = 0;
            while i < prev.block_count() + 3 {
                prop_assert_eq!(c.block(i).unwrap(), prev.get(i));
                prop_assert_eq!(c.block(i).unwrap(), prev.get(i), "asked again");
                i += step;
            }
            c.finish().unwrap();
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// A snapshot received as changes over a base has the map, root hash and delta
        /// of the map the changes make of the base's, shrunk or grown.
        #[test]
        fn an_overlay_is_the_map_it_stands_for(
            base in proptest::collection::vec(proptest::option::of(0u8..4), 0..300),
            changes in proptest::collection::btree_map(0u64..320, proptest::option::of(0u8..4), 0..60),
            count in 0u64..320,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let repo = Repository::init(Location::Local(dir.path().join("r")), 4096).unwrap();
            let base_map = map(&base);
            let head = put(&repo, Delta::full(&base_map), None);
            let mut want = base_map.clone();
            want.resize(count);
            let mut received = crate::spill::Changes::default();
            for (&i, b) in &changes {
                let r = b.map_or(BlockRef::Zero, |n| BlockRef::Data(BlockId::of(&[n])));
                want.set(i, r);
                if i < count {
                    received.insert(i, r, false).unwrap();
                }
            }
            let overlay = crate::stream::Overlay {
                repo: &repo,
                base: Some(head),
                block_count: count,
                changes: &received,
            };
            prop_assert_eq!(&overlay.map().unwrap(), &want);
            prop_assert_eq!(overlay.root_hash().unwrap(), want.root_hash());
            let delta = delta_of(&mut stream(&base_map), &want);
            let mut data = overlay.data().unwrap();
            let mut entries = std::collections::BTreeMap::new();
            crate::stream::delta_between(&mut stream(&base_map), &mut data, count, |i, b| {
                entries.insert(i, b);
                Ok(())
            }).unwrap();
            prop_assert_eq!(&entries, &delta.entries);
            prop_assert_eq!(base_map.apply(&delta), want.clone());
            prop_assert_eq!(delta, Delta::between(&base_map, &want));
        }
    }

    /// Random reads of a snapshot (as an NBD export makes them) load only the manifest
    /// part that holds each block: with every other part of the full map deleted, a
    /// block far in and then one before it still read back.
    #[test]
    fn a_random_read_loads_one_part_of_the_map() {
        use snapsync_store::{memory::MemoryStore, NoProgress};
        let dir = tempfile::tempdir().unwrap();
        let options = crate::RepoOptions::default().with_part_entries(8);
        let repo =
            Repository::init_with(Location::Local(dir.path().join("r")), 4096, &options).unwrap();
        let src = MemoryStore::new("src", 4096);
        let data = snapsync_store::sample::pseudo_random(5, 300 * 4096);
        src.add_snapshot("vm", "s1", Timestamp::new(1_700_000_000, 0), data.clone());
        snapsync_engine::replicate(
            &src,
            &repo,
            &snapsync_engine::ReplicateOptions::default(),
            &NoProgress,
            &mut |_| {},
        )
        .unwrap();
        let (_, manifest) = repo.snapshot_manifest("vm", "s1").unwrap();
        let parts = repo.check_manifest(&manifest).unwrap().head.parts;
        assert!(parts.len() > 30, "{} parts", parts.len());
        let part_of = |block: u64| {
            *parts
                .iter()
                .find(|p| p.first <= block && block <= p.last)
                .unwrap()
        };
        let keep_only = |kept: &[crate::format::PartRef]| {
            for p in &parts {
                let file = dir.path().join("r").join(crate::repo::key_part(&p.id));
                if kept.iter().any(|k| k.id == p.id) {
                    continue;
                }
                let _ = std::fs::rename(&file, file.with_extension("away"));
            }
        };
        let (far, near) = (250u64, 20u64);
        keep_only(&[part_of(far), part_of(near)]);
        let mut reader = repo.open_snapshot("vm", "s1").unwrap();
        for block in [far, near, far] {
            let mut buf = vec![0u8; 4096];
            reader.read_at(block * 4096, &mut buf).unwrap();
            let at = block as usize * 4096;
            assert!(buf == data[at..at + 4096], "block {block}");
        }
        // A block whose part is gone is an error naming it, not zeros.
        let mut buf = vec![0u8; 4096];
        let err = reader.read_at(150 * 4096, &mut buf).unwrap_err();
        assert!(err.to_string().contains("mparts/"), "{err}");
    }

    #[test]
    fn a_damaged_or_missing_manifest_is_refused_before_use() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(Location::Local(dir.path().join("r")), 4096).unwrap();
        let blocks: Vec<Option<u8>> = (0..3000).map(|i| Some((i % 200) as u8)).collect();
        let id = put(&repo, Delta::full(&map(&blocks)), None);
        let file = dir.path().join("r").join(crate::repo::key_manifest(&id));
        let good = std::fs::read(&file).unwrap();
        let checked = repo.check_manifest(&id).unwrap();
        assert_eq!(checked.head.count, 3000);
        assert!(checked.head.parts.len() > 1, "in parts");
        for at in [0, 30, good.len() / 2, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            std::fs::write(&file, &bad).unwrap();
            let err = repo.check_manifest(&id).unwrap_err();
            assert!(matches!(err, StoreError::Corrupt { .. }), "{at}: {err}");
        }
        std::fs::write(&file, &good[..good.len() - 10]).unwrap();
        assert!(repo.check_manifest(&id).is_err(), "truncated");
        std::fs::write(&file, &good).unwrap();
        // A damaged part is found when the walk loads it, and named.
        let chain = vec![repo.check_manifest(&id).unwrap()];
        let part = checked.head.parts[checked.head.parts.len() / 2];
        let part_file = dir.path().join("r").join(crate::repo::key_part(&part.id));
        let mut bad = std::fs::read(&part_file).unwrap();
        let n = bad.len();
        bad[n - 40] ^= 1;
        std::fs::write(&part_file, &bad).unwrap();
        let mut c = ChainCursor::new(&repo, &chain).unwrap();
        assert!(c.block(0).is_ok());
        let err = c.block(part.first).unwrap_err();
        assert!(err.to_string().contains("mparts/"), "{err}");
        std::fs::remove_file(&part_file).unwrap();
        let mut c = ChainCursor::new(&repo, &chain).unwrap();
        let err = c.block(part.last).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        std::fs::remove_file(&file).unwrap();
        let err = repo.check_manifest(&id).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
