//! `gc`: delete the manifests, blocks and packs no snapshot references, repacking packs
//! that are mostly garbage.
//!
//! Roots are the snapshots of each volume's newest catalog generation (older
//! generations are deleted first). Everything reachable from them — manifests along
//! every delta chain, and the blocks those manifests' entries name — is kept; a pack
//! whose live blocks are fewer than half of its bytes is rewritten with only them.
//! Writers are kept out by the gc lock ([`crate::lock`]), so nothing a running
//! replication is about to reference can be deleted.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use serde::Serialize;
use snapsync_core::BlockId;
use snapsync_store::{Result, StoreError};
use tracing::info;

use crate::backend::Put;
use crate::format::{self, IndexEntry, ManifestId, MAGIC_PACK, PACK_HEADER};
use crate::index::BlockIndex;
use crate::repo::{key_index, key_manifest, key_pack, Repository};
use crate::stream::EntryStream;
use crate::verify::{Bitmap, LOOKUP_BATCH};
use snapsync_store::random_id;

/// What gc did.
#[non_exhaustive]
#[derive(Debug, Clone, Serialize, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Packs deleted because nothing in them is referenced.
    pub packs_deleted: u64,
    /// Packs rewritten without their garbage.
    pub packs_repacked: u64,
    /// Manifests deleted.
    pub manifests_deleted: u64,
    /// Old catalog generations deleted.
    pub catalog_generations_deleted: u64,
    /// Bytes of objects deleted, minus bytes written by repacking.
    pub bytes_freed: u64,
    /// Blocks still referenced.
    pub live_blocks: u64,
}

/// Blocks of packs looked up at once in gc's pass over the packs (their index entries
/// are held meanwhile: a quarter of [`LOOKUP_BATCH`] keeps that pass's memory small).
const SWEEP_BATCH: usize = LOOKUP_BATCH / 4;

/// A pack's index, held until its blocks are looked up.
struct PackIndex {
    key: String,
    size: u64,
    pack: BlockId,
    entries: Vec<IndexEntry>,
}

/// A pack is repacked when less than this fraction (in stored bytes) is live.
const REPACK_BELOW: f64 = 0.5;

impl Repository {
    /// Collect garbage. Waits for running replications and prunes to finish first.
    pub fn gc(&self) -> Result<GcReport> {
        let _lock = self.gc_lock()?;
        let mut report = GcReport::default();

        // 1. Only the newest catalog generation of each volume is a root.
        let mut newest: HashMap<String, u64> = HashMap::new();
        let gens: Vec<(String, u64, u64)> = self
            .backend
            .list("volumes")?
            .into_iter()
            .filter_map(|(k, size)| {
                let (v, g) = crate::repo::parse_catalog_key(&k)?;
                Some((v, g, size))
            })
            .collect();
        for (v, g, _) in &gens {
            let e = newest.entry(v.clone()).or_insert(*g);
            *e = (*e).max(*g);
        }
        for (v, g, size) in &gens {
            if newest.get(v) != Some(g) {
                self.backend.delete(&crate::repo::key_catalog(v, *g))?;
                report.catalog_generations_deleted += 1;
                report.bytes_freed += size;
            }
        }

        // 2. Reachable manifests and live blocks, marked by rank in the index of every
        //    pack (one bit a block; the index itself is mostly on disk past a bound).
        let index = self.complete_index()?;
        let mut live = Bitmap::new(index.ranked_len());
        let mut reachable: HashSet<ManifestId> = HashSet::new();
        let mut live_parts: HashSet<BlockId> = HashSet::new();
        // Looked up a batch at a time, sorted, so that the index is read in order.
        let mut batch: Vec<(BlockId, ())> = Vec::with_capacity(LOOKUP_BATCH);
        let mark = |batch: &mut Vec<(BlockId, ())>, live: &mut Bitmap| -> Result<()> {
            index
                .rank_many(batch, |_, _, rank| {
                    if let Some(rank) = rank {
                        live.set(rank);
                    }
                })
                .map_err(|e| StoreError::io("a temporary file of the block index", e))?;
            batch.clear();
            Ok(())
        };
        for cat in self.catalogs()? {
            for s in &cat.snapshots {
                let mut cur = Some(s.manifest);
                while let Some(id) = cur {
                    if !reachable.insert(id) {
                        break;
                    }
                    let m = self.check_manifest(&id)?;
                    live_parts.extend(m.head.parts.iter().map(|p| p.id));
                    let mut entries = EntryStream::new(self, &m)?;
                    while let Some((_, block)) = entries.next_entry()? {
                        if let Some(id) = block.id() {
                            batch.push((id, ()));
                            if batch.len() == LOOKUP_BATCH {
                                mark(&mut batch, &mut live)?;
                            }
                        }
                    }
                    cur = m.head.header.delta_base;
                }
            }
        }
        mark(&mut batch, &mut live)?;
        report.live_blocks = live.count();

        // 3. Manifests nobody reaches.
        for (k, size) in self.backend.list("manifests")? {
            let Some(id) = k.rsplit('/').next().and_then(|h| h.parse::<BlockId>().ok()) else {
                continue;
            };
            if !reachable.contains(&id) && k == key_manifest(&id) {
                self.backend.delete(&k)?;
                report.manifests_deleted += 1;
                report.bytes_freed += size;
            }
        }

        for (k, size) in self.backend.list("mparts")? {
            let Some(id) = k.rsplit('/').next().and_then(|h| h.parse::<BlockId>().ok()) else {
                continue;
            };
            if !live_parts.contains(&id) && k == crate::repo::key_part(&id) {
                self.backend.delete(&k)?;
                report.manifests_deleted += 1;
                report.bytes_freed += size;
            }
        }

        // 4. Packs: delete the dead, repack the mostly dead, drop packs with no index.
        let pack_sizes: HashMap<String, u64> = self.backend.list("packs")?.into_iter().collect();
        let mut indexed: HashSet<String> = HashSet::new();
        let mut pending: Vec<PackIndex> = Vec::new();
        let mut pending_entries = 0;
        self.for_each_index(|ix| {
            let (pack, entries) = ix.parsed?;
            indexed.insert(key_pack(&pack));
            pending_entries += entries.len();
            pending.push(PackIndex {
                key: ix.key,
                size: ix.size,
                pack,
                entries,
            });
            if pending_entries >= SWEEP_BATCH {
                self.sweep_packs(&index, &live, &pack_sizes, &mut pending, &mut report)?;
                pending_entries = 0;
            }
            Ok(())
        })?;
        self.sweep_packs(&index, &live, &pack_sizes, &mut pending, &mut report)?;
        drop(index);
        for (k, size) in &pack_sizes {
            if !indexed.contains(k) && !k.contains('#') {
                // Left by a replication killed between storing a pack and its index.
                self.backend.delete(k)?;
                report.bytes_freed += size;
            }
        }
        self.invalidate_index();
        // Tell other processes that cached indexes may name deleted packs.
        self.backend.put(
            &format!("gc-epochs/{}", random_id()),
            Bytes::from_static(b"gc"),
            Put::Create,
        )?;
        info!(?report, "gc done");
        Ok(report)
    }

    /// Delete or repack each of `packs` (emptied) by how much of it is live. Their blocks
    /// are looked up together, sorted (see [`BlockIndex::locate_many`]): one random read
    /// of the index a block made gc's pass over the packs its slowest part.
    fn sweep_packs(
        &self,
        index: &BlockIndex,
        live: &Bitmap,
        pack_sizes: &HashMap<String, u64>,
        packs: &mut Vec<PackIndex>,
        report: &mut GcReport,
    ) -> Result<()> {
        let mut asked: Vec<(BlockId, (usize, usize))> = packs
            .iter()
            .enumerate()
            .flat_map(|(p, ix)| (0..ix.entries.len()).map(move |e| (p, e)))
            .map(|(p, e)| (packs[p].entries[e].id, (p, e)))
            .collect();
        let mut is_live: Vec<Vec<bool>> = packs
            .iter()
            .map(|ix| vec![false; ix.entries.len()])
            .collect();
        index
            .locate_many(&mut asked, |_, &(p, e), found| {
                // A block stored twice (two packs) is kept once: where the index has it.
                let ix = &packs[p];
                is_live[p][e] = found.is_some_and(|(rank, pack, l)| {
                    live.get(rank) && pack == ix.pack && l.offset == ix.entries[e].offset
                });
            })
            .map_err(|e| StoreError::io("a temporary file of the block index", e))?;
        drop(asked);
        for (ix, is_live) in packs.drain(..).zip(is_live) {
            let live_entries: Vec<IndexEntry> = ix
                .entries
                .iter()
                .zip(is_live)
                .filter_map(|(e, l)| l.then_some(*e))
                .collect();
            let live_bytes: u64 = live_entries.iter().map(|e| u64::from(e.stored_len)).sum();
            let total: u64 = ix.entries.iter().map(|e| u64::from(e.stored_len)).sum();
            let pkey = key_pack(&ix.pack);
            let psize = pack_sizes.get(&pkey).copied().unwrap_or(0);
            if live_entries.is_empty() {
                self.backend.delete(&ix.key)?;
                self.backend.delete(&pkey)?;
                report.packs_deleted += 1;
                report.bytes_freed += psize + ix.size;
            } else if (live_bytes as f64) < REPACK_BELOW * total as f64 {
                let written = self.repack(&ix.pack, &live_entries)?;
                self.backend.delete(&ix.key)?;
                self.backend.delete(&pkey)?;
                report.packs_repacked += 1;
                report.bytes_freed += (psize + ix.size).saturating_sub(written);
            }
        }
        Ok(())
    }

    /// A block index of every pack, of its own (not the one replications share), with
    /// every block ranked.
    fn complete_index(&self) -> Result<BlockIndex> {
        let mut index = BlockIndex::new(self.block_size());
        index.reserve(usize::MAX);
        self.for_each_index(|ix| {
            let (pack, entries) = ix.parsed?;
            index.add_pack(pack, &entries);
            Ok(())
        })?;
        index
            .rank_all()
            .map_err(|e| StoreError::io("a temporary file of the block index", e))?;
        Ok(index)
    }

    /// Rewrite the live blocks of one pack into a new pack; returns bytes written.
    fn repack(&self, pack: &BlockId, live: &[IndexEntry]) -> Result<u64> {
        let key = key_pack(pack);
        let ranges: Vec<std::ops::Range<u64>> = live
            .iter()
            .map(|e| e.offset..e.offset + u64::from(e.stored_len))
            .collect();
        let data = self.backend.get_ranges_many(vec![(key.clone(), ranges)])?;
        let mut buf = Vec::new();
        buf.extend_from_slice(MAGIC_PACK);
        buf.extend_from_slice(&self.format_version().to_le_bytes());
        buf.resize(PACK_HEADER, 0);
        let mut entries = Vec::with_capacity(live.len());
        for (e, stored) in live.iter().zip(&data[0]) {
            let ok = self
                .decode_stored(&e.id, stored, e.compression, e.raw_len)
                .is_some_and(|d| BlockId::of(&d) == e.id);
            if !ok {
                return Err(StoreError::corrupt(
                    self.describe(&key),
                    format!(
                        "block {} at offset {} is damaged; not repacking",
                        e.id, e.offset
                    ),
                ));
            }
            entries.push(IndexEntry {
                offset: buf.len() as u64,
                ..*e
            });
            buf.extend_from_slice(stored);
        }
        let index = format::encode_index(&entries);
        let id = self.pack_id(&index);
        let index = self.seal_object(&key_index(&id), index);
        let written = (buf.len() + index.len()) as u64;
        let job = self.backend.spawn_puts(vec![
            (key_pack(&id), vec![Bytes::from(buf)]),
            (key_index(&id), vec![Bytes::from(index)]),
        ]);
        self.backend.wait(job)?;
        Ok(written)
    }
}
