//! The differences between two snapshots of a repository, read from their delta chains.
//!
//! A repository is a replication source for cascades (a local repository copied off-site
//! to S3) and for pulls from a server. The differences it reports should cost what
//! changed, not what the volume holds: a full map lists every data block of its
//! snapshot (about 40 bytes each decoded, 640 MiB for 1 TiB).
//!
//! Snapshots of a volume are deltas on older snapshots, down to a full map (see
//! [`snapsync_core::chain`]). Two snapshots whose chains meet in a shared
//! manifest (one is the other's ancestor, an older snapshot inserted before a younger
//! one, a clone and its origin) differ only where the manifests above the meeting point
//! list entries, or cut the volume shorter. So [`Repository::diff_snapshots`] walks both
//! chains down to where they meet and reads the manifests above that point:
//! - an index they decide on both sides (list it, or a shrink cut it off) is compared;
//! - an index decided on one side only, above any shrink there, changed if that side's
//!   newest listing equals its oldest: the oldest differs from the meeting point, since
//!   every delta lists only what differs from its own base;
//! - the rest (a block rewritten to something else since, maybe back to what it was; a
//!   range a shrink cut) are looked up in the meeting point's chain, in one pass in
//!   index order. The diff stays exact, which base selection needs: a snapshot that went
//!   back to an older one's content must find that one the nearest. (A delta written
//!   from received blocks may list a block the sender sent unchanged, which the commit
//!   does not look up below: such a block can show in a diff as changed, which costs
//!   its read and never correctness.)
//!
//! Usually (each block changed once between the two snapshots) nothing is looked up, and
//! the shared part of the chains, full maps included, is never read.
//!
//! Chains that do not meet (one side crossed a full map the other did not reach) are
//! compared whole, as two streams in index order: time in proportion to the volume, and
//! memory still only what differs.

use std::collections::BTreeMap;

use snapsync_core::{BlockRef, Extent};
use snapsync_store::{Diff, Result, StoreError};

use crate::format::ManifestId;
use crate::repo::{key_manifest, Repository};
use crate::stream::{ChainCursor, CheckedManifest, EntryStream};

/// One snapshot as the diff sees it: its manifest, size and age.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DiffSide {
    pub(crate) manifest: ManifestId,
    pub(crate) size: u64,
    pub(crate) created: snapsync_core::Timestamp,
}

/// The delta manifests read from one snapshot down its chain, newest first.
struct ChainPath {
    manifests: Vec<CheckedManifest>,
    /// The first manifest not read: where the other chain was met, or a full map (not
    /// read, to keep its cost out), or `None` at the chain's end.
    next: Option<ManifestId>,
    /// Whether `next` is a manifest of the other chain.
    met: bool,
}

impl ChainPath {
    fn holds(&self, id: &ManifestId) -> bool {
        self.next.as_ref() == Some(id) || self.manifests.iter().any(|m| m.id == *id)
    }
}

/// What one side's manifests above the meeting point say about a block.
#[derive(Clone, Copy, Debug)]
struct Decided {
    /// Its value on that side: from the newest manifest listing it (or cutting it off).
    newest: BlockRef,
    /// The value the oldest manifest listing it gave it.
    oldest: BlockRef,
}

impl Decided {
    /// Whether the side's value surely differs from the meeting point's. Each delta lists
    /// only what differs from its own base, so the oldest listing differs from the
    /// meeting point; if the newest equals it, so does the newest. A block rewritten to
    /// something else since may have gone back to what it was, and past a shrink's cut
    /// (`limit`) nothing is known.
    fn surely_changed(&self, index: u64, limit: u64) -> bool {
        index < limit && self.newest == self.oldest
    }
}

impl Repository {
    /// The differences between `target` and `base` (see the module docs), clipped to
    /// the target's size.
    pub(crate) fn diff_snapshots(&self, target: DiffSide, base: DiffSide) -> Result<Diff> {
        if target.manifest == base.manifest {
            return Ok(Diff::default());
        }
        // The younger snapshot's chain usually runs through the older one's manifest, so
        // it is walked first and the older one's need not be read at all.
        let target_first = target.created >= base.created;
        let (first, second) = if target_first {
            (target, base)
        } else {
            (base, target)
        };
        let mut p1 = self.path_down(&first.manifest, |id| *id == second.manifest)?;
        let p2 = self.path_down(&second.manifest, |id| p1.holds(id))?;
        if !p2.met {
            return self.diff_whole(target, base);
        }
        let meet = p2.next.expect("met somewhere");
        if let Some(k) = p1.manifests.iter().position(|m| m.id == meet) {
            // The first walk went past the meeting point (the second side branched off
            // it): what lies below is shared.
            p1.manifests.truncate(k);
        }
        let (t_path, b_path) = if target_first { (p1, p2) } else { (p2, p1) };
        let bs = self.block_size();
        let blocks = target.size.div_ceil(bs);
        // What each side's manifests above the meeting point decide, index by index.
        let mut said: BTreeMap<u64, [Option<Decided>; 2]> = BTreeMap::new();
        let limits = [
            self.collect_side(&t_path, 0, blocks, &mut said)?,
            self.collect_side(&b_path, 1, blocks, &mut said)?,
        ];
        // Indices decided on one side only, where that side may hold what the meeting
        // point holds: looked up there, in one pass.
        let unsure: Vec<u64> = said
            .iter()
            .filter(|(&i, sides)| match sides {
                [Some(d), None] => !d.surely_changed(i, limits[0]),
                [None, Some(d)] => !d.surely_changed(i, limits[1]),
                _ => false,
            })
            .map(|(&i, _)| i)
            .collect();
        let mut shared = BTreeMap::new();
        if !unsure.is_empty() {
            let chain = self.checked_chain(&meet)?;
            let mut cursor = ChainCursor::new(self, &chain)?;
            for i in unsure {
                shared.insert(i, cursor.block(i)?);
            }
        }
        let mut diff = Diff::default();
        for (i, [t, b]) in said {
            let t = t.map(|d| d.newest).or_else(|| shared.get(&i).copied());
            let b = b.map(|d| d.newest).or_else(|| shared.get(&i).copied());
            if t.is_some() && t == b {
                continue;
            }
            let e = block_extent(i, bs, target.size);
            match t {
                Some(BlockRef::Zero) => diff.zero.push(e),
                // Data, or (surely changed) the meeting point's block: read it, and a zero
                // one is found zero when read.
                _ => diff.data.push(e),
            }
        }
        Ok(diff)
    }

    /// Read one side's manifests above the meeting point into `said[..][side]`: each
    /// index's value from the newest manifest that lists it or cuts it off. Returns the
    /// side's lowest block count on the way (a shrink's cut).
    fn collect_side(
        &self,
        path: &ChainPath,
        side: usize,
        blocks: u64,
        said: &mut BTreeMap<u64, [Option<Decided>; 2]>,
    ) -> Result<u64> {
        let mut limit = u64::MAX;
        for m in &path.manifests {
            limit = limit.min(m.head.block_count);
            let mut entries = EntryStream::new(self, m)?;
            // Every entry is read, so the manifest is checked to its end.
            while let Some((i, r)) = entries.next_entry()? {
                // Past a newer manifest's end on this side (cut off), or the target's.
                if i < limit && i < blocks {
                    match &mut said.entry(i).or_default()[side] {
                        Some(d) => d.oldest = r,
                        slot => {
                            *slot = Some(Decided {
                                newest: r,
                                oldest: r,
                            })
                        }
                    }
                }
            }
        }
        // Past a shrink on this side, blocks no newer manifest lists read as zero,
        // whatever the meeting point holds.
        for i in limit..blocks {
            said.entry(i).or_default()[side].get_or_insert(Decided {
                newest: BlockRef::Zero,
                oldest: BlockRef::Zero,
            });
        }
        Ok(limit)
    }

    /// Walk down the chain from `start`, reading (checking) each manifest, until `stop`
    /// names the next one, the next one is a full map, or the chain ends.
    fn path_down(
        &self,
        start: &ManifestId,
        stop: impl Fn(&ManifestId) -> bool,
    ) -> Result<ChainPath> {
        let mut manifests: Vec<CheckedManifest> = Vec::new();
        let mut next = Some(*start);
        while let Some(id) = next {
            if stop(&id) {
                return Ok(ChainPath {
                    manifests,
                    next,
                    met: true,
                });
            }
            // A version-1 manifest at depth 1 rests on a full map, which the walk leaves
            // unread (depth is a hint: a wrong one costs time, never correctness).
            if manifests
                .last()
                .is_some_and(|m| m.is_v1() && m.head.header.depth <= 1)
            {
                break;
            }
            if manifests.len() > crate::MAX_CHAIN_LEN * 4 {
                return Err(StoreError::corrupt(
                    self.describe(&key_manifest(start)),
                    "delta chain is too long or cyclic",
                ));
            }
            let m = self.check_manifest(&id)?;
            if !m.is_v1() && m.head.header.delta_base.is_none() {
                // A full map (version 2: only its head was read, not its parts).
                break;
            }
            next = m.head.header.delta_base;
            manifests.push(m);
        }
        Ok(ChainPath {
            manifests,
            next,
            met: false,
        })
    }

    /// The exact differences of two snapshots whose chains do not meet: both read whole,
    /// in index order, in step.
    fn diff_whole(&self, target: DiffSide, base: DiffSide) -> Result<Diff> {
        let bs = self.block_size();
        let blocks = target.size.div_ceil(bs);
        let t_chain = self.checked_chain(&target.manifest)?;
        let b_chain = self.checked_chain(&base.manifest)?;
        let mut t = ChainCursor::new(self, &t_chain)?;
        let mut b = ChainCursor::new(self, &b_chain)?;
        let in_target = |x: Option<(u64, snapsync_core::BlockId)>| x.filter(|(i, _)| *i < blocks);
        let mut tn = in_target(t.next_data_entry()?);
        let mut bn = in_target(b.next_data_entry()?);
        let mut diff = Diff::default();
        loop {
            match (tn, bn) {
                (None, None) => break,
                (Some((i, x)), Some((j, y))) if i == j => {
                    if x != y {
                        diff.data.push(block_extent(i, bs, target.size));
                    }
                    tn = in_target(t.next_data_entry()?);
                    bn = in_target(b.next_data_entry()?);
                }
                (Some((i, _)), Some((j, _))) if i < j => {
                    diff.data.push(block_extent(i, bs, target.size));
                    tn = in_target(t.next_data_entry()?);
                }
                (Some((i, _)), None) => {
                    diff.data.push(block_extent(i, bs, target.size));
                    tn = in_target(t.next_data_entry()?);
                }
                (_, Some((j, _))) => {
                    // Data in the base, zero in the target.
                    diff.zero.push(block_extent(j, bs, target.size));
                    bn = in_target(b.next_data_entry()?);
                }
            }
        }
        Ok(diff)
    }
}

/// Block `i`'s bytes, clipped to `size`.
pub(crate) fn block_extent(i: u64, bs: u64, size: u64) -> Extent {
    let off = i * bs;
    Extent::new(off, bs.min(size - off))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Manifest, ManifestHeader};
    use crate::Location;
    use proptest::prelude::*;
    use snapsync_core::{BlockId, BlockMap, Delta, SnapshotId, Timestamp};

    const BS: u64 = 4096;

    /// One snapshot of a random manifest tree: its map, manifest and age.
    struct Node {
        map: BlockMap,
        side: DiffSide,
    }

    /// Store `map` as a delta on `base` (or a full map) with `created` age `k`.
    fn put(repo: &Repository, map: BlockMap, base: Option<&Node>, k: i64) -> Node {
        let (delta, delta_base, depth) = match base {
            Some(b) => (
                Delta::between(&b.map, &map),
                Some(b.side.manifest),
                1 + repo
                    .check_manifest(&b.side.manifest)
                    .unwrap()
                    .head
                    .header
                    .depth,
            ),
            None => (Delta::full(&map), None, 0),
        };
        let created = Timestamp::new(1_700_000_000 + k, 0);
        let manifest = repo
            .put_manifest(Manifest {
                header: ManifestHeader {
                    volume: "v".into(),
                    name: format!("s{k}"),
                    id: SnapshotId([0; 32]),
                    created,
                    size: map.block_count() * BS,
                    block_size: BS,
                    delta_base,
                    depth,
                    root: None,
                    packs: vec![],
                },
                delta,
            })
            .unwrap();
        Node {
            side: DiffSide {
                manifest,
                size: map.block_count() * BS,
                created,
            },
            map,
        }
    }

    /// A map of `count` blocks: `prev`'s with `writes` applied (`None` zeroes a block).
    fn next_map(prev: &BlockMap, count: u64, writes: &[(u64, Option<u8>)]) -> BlockMap {
        let mut m = prev.clone();
        m.resize(count);
        for &(i, v) in writes {
            m.set(
                i,
                v.map_or(BlockRef::Zero, |n| BlockRef::Data(BlockId::of(&[n]))),
            );
        }
        m
    }

    /// The exact differences, block by block.
    fn exact(target: &BlockMap, base: &BlockMap) -> Vec<(u64, BlockRef)> {
        (0..target.block_count())
            .filter(|&i| target.get(i) != base.get(i))
            .map(|i| (i, target.get(i)))
            .collect()
    }

    fn blocks_of(l: &snapsync_core::ExtentList) -> Vec<u64> {
        l.as_slice()
            .iter()
            .flat_map(|e| e.offset / BS..e.end().div_ceil(BS))
            .collect()
    }

    /// Check `d` against the maps: every changed block reported, a zero one as zero, a
    /// data one as data, nothing past the target; and, with `exact_too`, nothing else
    /// (a repository where the diff's lookups cannot be made gets no promise of that).
    fn check(d: &Diff, t: &Node, b: &Node, exact_too: bool) -> Result<(), TestCaseError> {
        let data = blocks_of(&d.data);
        let zero = blocks_of(&d.zero);
        for (i, r) in exact(&t.map, &b.map) {
            match r {
                BlockRef::Zero => prop_assert!(zero.contains(&i) || data.contains(&i), "{i}"),
                BlockRef::Data(_) => prop_assert!(data.contains(&i), "{i} not read"),
            }
        }
        for i in &zero {
            prop_assert_eq!(
                t.map.get(*i),
                BlockRef::Zero,
                "zero extent at {} holds data",
                i
            );
        }
        for e in d.data.as_slice().iter().chain(d.zero.as_slice()) {
            prop_assert!(e.end() <= t.side.size);
        }
        if exact_too {
            let mut got: Vec<u64> = data.into_iter().chain(zero).collect();
            got.sort_unstable();
            let want: Vec<u64> = exact(&t.map, &b.map).into_iter().map(|(i, _)| i).collect();
            prop_assert_eq!(got, want);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Over any tree of manifests (deltas on any earlier snapshot, full maps,
        /// shrinks and growth, blocks zeroed and rewritten back), the diff of any two
        /// snapshots is exactly what changed, and so is comparing them whole.
        #[test]
        fn a_diff_reports_every_change(
            steps in proptest::collection::vec(
                (proptest::option::of(0usize..8), 1u64..40,
                 proptest::collection::vec((0u64..40, proptest::option::of(0u8..3)), 0..12)),
                1..9),
            pairs in proptest::collection::vec((0usize..9, 0usize..9), 1..12),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let repo = Repository::init(Location::Local(dir.path().join("r")), BS).unwrap();
            let mut nodes: Vec<Node> = Vec::new();
            for (k, (base, count, writes)) in steps.iter().enumerate() {
                let base = base.and_then(|b| nodes.get(b % nodes.len().max(1)));
                let prev = base.map_or_else(|| BlockMap::zeroed(0), |b| b.map.clone());
                let map = next_map(&prev, *count, writes);
                // Ages out of order too: an older snapshot stored on a younger one.
                let age = (k as i64 * 7919) % 13;
                let node = put(&repo, map, base, age);
                nodes.push(node);
            }
            for (a, b) in pairs {
                let (t, b) = (&nodes[a % nodes.len()], &nodes[b % nodes.len()]);
                let d = repo.diff_snapshots(t.side, b.side).unwrap();
                check(&d, t, b, true)?;
                let whole = repo.diff_whole(t.side, b.side).unwrap();
                check(&whole, t, b, true)?;
            }
        }
    }

    /// The manifests a diff reads: the full map under a chain is not among them (its
    /// parts are removed here, and the diff still works; reading the whole snapshot
    /// does not).
    #[test]
    fn a_diff_along_a_chain_never_reads_its_full_map() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        let repo = Repository::init(Location::Local(root.clone()), BS).unwrap();
        let full: Vec<(u64, Option<u8>)> = (0..1000).map(|i| (i, Some((i % 3) as u8))).collect();
        let mut nodes = vec![put(
            &repo,
            next_map(&BlockMap::zeroed(0), 1000, &full),
            None,
            0,
        )];
        for k in 1..5u8 {
            let prev = nodes.last().unwrap();
            let map = next_map(&prev.map, 1000, &[(k as u64 * 10, Some(9)), (500, None)]);
            let node = put(&repo, map, Some(prev), k as i64);
            nodes.push(node);
        }
        for part in repo
            .check_manifest(&nodes[0].side.manifest)
            .unwrap()
            .head
            .parts
        {
            std::fs::remove_file(root.join(crate::repo::key_part(&part.id))).unwrap();
        }
        let repo = Repository::open(Location::Local(root)).unwrap();
        for (t, b) in [(4, 1), (1, 4), (4, 0), (2, 3)] {
            let (t, b) = (&nodes[t], &nodes[b]);
            let d = repo.diff_snapshots(t.side, b.side).unwrap();
            check(&d, t, b, true).unwrap();
        }
        assert!(repo.diff_whole(nodes[4].side, nodes[1].side).is_err());
    }
}
