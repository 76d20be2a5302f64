//! Receiving a snapshot: compress new blocks into packs, then commit a manifest and a
//! new catalog generation.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;
use rayon::prelude::*;
use snapsync_core::{BlockId, BlockRef, Delta, Hint};
use snapsync_store::{
    BlockContent, CommitInfo, Compressed, Guarded, IncomingBlock, ReceiveRequest, Receiver, Result,
    SnapshotSink, StoreError,
};
use tracing::debug;

use crate::backend::PendingPuts;
use crate::format::{
    self, Catalog, CatalogSnapshot, Compression, IndexEntry, Manifest, ManifestHeader, ManifestId,
    SourceHints, MAGIC_PACK, PACK_HEADER,
};
use crate::lock::SessionLock;
use crate::repo::{key_index, key_pack, Repository, CHECKPOINT_INTERVAL};
use crate::stream::Overlay;

/// Packs are flushed at this size: large objects for object stores, small enough that a
/// killed replication loses little and a rerun reuses the rest.
const PACK_TARGET: usize = 32 << 20;
/// Packs stored in the background at once; bounds memory to about
/// `(MAX_UPLOADS + 1) * PACK_TARGET`.
const MAX_UPLOADS: usize = 2;

/// How many times a commit retries after losing a race with another writer.
const COMMIT_ATTEMPTS: u32 = 20;

impl SnapshotSink for Repository {
    fn block_size(&self) -> u64 {
        self.config.block_size
    }

    fn hints(&self, source_system: &str, source_volume: &str) -> Result<Vec<Hint>> {
        Ok(self
            .catalogs()?
            .into_iter()
            .flat_map(|c| c.hints)
            .filter(|h| h.source_system == source_system && h.source_volume == source_volume)
            .flat_map(|h| h.snapshots)
            .collect())
    }

    fn begin_receive(&self, request: ReceiveRequest) -> Result<Box<dyn Receiver + '_>> {
        request.validate(&self.location().to_string())?;
        let lock = self.session_lock("replicate")?;
        if let Some(c) = self.catalog(&request.volume)? {
            if c.snapshots.iter().any(|s| s.name == request.snapshot.name) {
                return Err(StoreError::AlreadyExists {
                    what: format!(
                        "snapshot {} in {}",
                        snapsync_core::quote_snapshot(&request.volume, &request.snapshot.name),
                        self.location()
                    ),
                });
            }
        }
        let base_manifest = match &request.base {
            None => None,
            Some(b) => {
                let cat = self.catalog(&b.volume)?;
                let snap = cat
                    .as_ref()
                    .and_then(|c| c.snapshots.iter().find(|s| s.name == b.snapshot))
                    .ok_or_else(|| {
                        StoreError::not_found(format!(
                            "base snapshot {} in {}",
                            snapsync_core::quote_snapshot(&b.volume, &b.snapshot),
                            self.location()
                        ))
                    })?;
                Some((snap.manifest, self.manifest_depth(&snap.manifest)?))
            }
        };
        let block_count = request.snapshot.size.div_ceil(self.config.block_size);
        Ok(Box::new(Guarded::new(RepoReceiver {
            _lock: lock,
            repo: self,
            request,
            base_manifest,
            block_count,
            changes: BTreeMap::new(),
            pack: PackBuilder::default(),
            session: HashMap::new(),
            uploads: VecDeque::new(),
        })))
    }
}

/// The pack being filled.
#[derive(Default)]
struct PackBuilder {
    /// The pack's bytes in order: its header, then each block as stored. Blocks stay the
    /// buffers they arrived in (slices of the engine's reads or of network requests) and
    /// are written one after another, never copied into one pack buffer.
    chunks: Vec<Bytes>,
    /// Total length of `chunks`.
    len: usize,
    entries: Vec<IndexEntry>,
}

impl PackBuilder {
    /// Append one block as stored (`bytes`, `compression` of `raw_len` plaintext bytes).
    fn add(&mut self, id: BlockId, compression: Compression, raw_len: u32, bytes: Bytes) {
        if self.chunks.is_empty() {
            let mut header = Vec::with_capacity(PACK_HEADER);
            header.extend_from_slice(MAGIC_PACK);
            header.extend_from_slice(&format::FORMAT_VERSION.to_le_bytes());
            header.resize(PACK_HEADER, 0);
            self.len = header.len();
            self.chunks.push(header.into());
        }
        self.entries.push(IndexEntry {
            id,
            offset: self.len as u64,
            stored_len: bytes.len() as u32,
            raw_len,
            compression,
        });
        self.len += bytes.len();
        self.chunks.push(bytes);
    }
}

struct RepoReceiver<'a> {
    /// Keeps gc from deleting blocks this receive dedups against.
    _lock: SessionLock<'a>,
    repo: &'a Repository,
    request: ReceiveRequest,
    base_manifest: Option<(ManifestId, u32)>,
    /// The new snapshot's block count.
    block_count: u64,
    /// The blocks received, by index: the snapshot is its transfer base with these
    /// changed. Only they are held, not a map of the whole volume (for an incremental,
    /// a few entries instead of one per block of the volume); the base is read along
    /// its chain when the snapshot is committed.
    changes: BTreeMap<u64, BlockRef>,
    pack: PackBuilder,
    /// Blocks of this receive not in the shared index yet: in the pack being filled or
    /// in one being stored.
    session: HashMap<BlockId, ()>,
    /// Packs being stored in the background, with their entries. Once stored, a pack
    /// is added to the shared index and its blocks leave `session`: what a receive
    /// holds per block it stored is bounded by the packs in flight, not by the volume.
    uploads: VecDeque<(PendingPuts, BlockId, Vec<IndexEntry>)>,
}

/// A block new to the repository: id, plaintext, and what its sender knows about
/// compressing it.
type Fresh<'a> = (BlockId, &'a Bytes, &'a Compressed);

impl RepoReceiver<'_> {
    /// Note block `index` of the new snapshot ([`RepoReceiver::check_batch`] has kept
    /// it inside the snapshot). Zero blocks are only noted over a base, where they may
    /// replace data.
    fn record(&mut self, index: u64, block: BlockRef) {
        if self.base_manifest.is_none() && block == BlockRef::Zero {
            self.changes.remove(&index);
        } else {
            self.changes.insert(index, block);
        }
    }

    /// Refuse a batch that would commit a damaged snapshot: an index past the end, or
    /// an [`BlockContent::Existing`] id that neither the repository nor this receive
    /// holds. Checked before anything of the batch is recorded.
    fn check_batch(&self, blocks: &[IncomingBlock]) -> Result<()> {
        let bs = self.repo.config.block_size;
        // A block repeated within one batch is sent once, as data, and then named.
        let carried: std::collections::HashSet<&BlockId> = blocks
            .iter()
            .filter_map(|b| match &b.content {
                BlockContent::Data { id, .. } => Some(id),
                _ => None,
            })
            .collect();
        let mut existing = Vec::new();
        for b in blocks {
            self.request.check_index(b.index, bs)?;
            if let BlockContent::Existing(id) = &b.content {
                if !self.session.contains_key(id) && !carried.contains(id) {
                    existing.push((b.index, *id));
                }
            }
        }
        if existing.is_empty() {
            return Ok(());
        }
        let unknown = self
            .repo
            .with_index(|ix| existing.iter().find(|(_, id)| !ix.contains(id)).copied())?;
        match unknown {
            None => Ok(()),
            Some((index, id)) => Err(StoreError::invalid_argument(format!(
                "block {index} names block {id}, which {} does not hold",
                self.repo.location()
            ))),
        }
    }

    fn flush(&mut self) -> Result<()> {
        if self.pack.entries.is_empty() {
            return Ok(());
        }
        let pack = std::mem::take(&mut self.pack);
        let index = format::encode_index(&pack.entries);
        let id = format::pack_id(&index);
        debug!(pack = %id, size = pack.len, blocks = pack.entries.len(), "storing pack");
        // The pack before its index, in one ordered background job: an index never
        // names a pack that is not there.
        let job = self.repo.backend.spawn_puts(vec![
            (key_pack(&id), pack.chunks),
            (key_index(&id), vec![Bytes::from(index)]),
        ]);
        self.uploads.push_back((job, id, pack.entries));
        while self.uploads.len() > MAX_UPLOADS {
            self.wait_oldest_upload()?;
        }
        Ok(())
    }

    /// Wait for the oldest pack being stored, then index it.
    fn wait_oldest_upload(&mut self) -> Result<()> {
        let (job, pack, entries) = self.uploads.pop_front().expect("non-empty");
        // Indexed only once stored. If storing failed, whether the pack got there is
        // unknown: the index is reloaded when next needed (the packs still in flight
        // are settled by `Drop`).
        self.repo
            .backend
            .wait(job)
            .inspect_err(|_| self.repo.invalidate_index())?;
        self.repo.with_index(|ix| ix.add_pack(pack, &entries))?;
        for e in &entries {
            self.session.remove(&e.id);
        }
        Ok(())
    }

    /// Flush the last pack and wait until every pack is stored (and indexed).
    fn finish_uploads(&mut self) -> Result<()> {
        self.flush()?;
        while !self.uploads.is_empty() {
            self.wait_oldest_upload()?;
        }
        Ok(())
    }
}

impl Drop for RepoReceiver<'_> {
    /// A receive abandoned before its commit (a dropped connection, a failed write)
    /// leaves the packs it stored, with their indexes; index them in this process too, so
    /// that a rerun in the same process (a server) does not send their blocks again.
    /// (Packs stored before are indexed already.)
    fn drop(&mut self) {
        let mut stored = true;
        while let Some((job, pack, entries)) = self.uploads.pop_front() {
            if self.repo.backend.wait(job).is_ok() {
                let _ = self.repo.with_index(|ix| ix.add_pack(pack, &entries));
            } else {
                stored = false;
            }
        }
        if !stored {
            self.repo.invalidate_index();
        }
    }
}

impl Receiver for RepoReceiver<'_> {
    fn missing(&mut self, ids: &[BlockId]) -> Result<Vec<bool>> {
        let session = &self.session;
        self.repo.with_index(|ix| {
            ids.iter()
                .map(|id| !session.contains_key(id) && !ix.contains(id))
                .collect()
        })
    }

    fn write(&mut self, blocks: Vec<IncomingBlock>) -> Result<u64> {
        self.check_batch(&blocks)?;
        let bs = self.repo.config.block_size as usize;
        let mut candidates: Vec<Fresh<'_>> = Vec::new();
        for b in &blocks {
            match &b.content {
                BlockContent::Zero => self.record(b.index, BlockRef::Zero),
                BlockContent::Existing(id) => self.record(b.index, BlockRef::Data(*id)),
                BlockContent::Data {
                    id,
                    data,
                    compressed,
                } => {
                    if data.len() != bs {
                        return Err(StoreError::Malformed {
                            location: format!("block {} sent to {}", b.index, self.repo.location()),
                            detail: format!("{} bytes, expected the block size {bs}", data.len()),
                        });
                    }
                    self.record(b.index, BlockRef::Data(*id));
                    if !self.session.contains_key(id) {
                        candidates.push((*id, data, compressed));
                    }
                }
            }
        }
        // Each block is stored once per receive: not again if a pack of this receive
        // already stored and indexed it.
        let indexed: Vec<bool> = if candidates.is_empty() {
            Vec::new()
        } else {
            self.repo
                .with_index(|ix| candidates.iter().map(|(id, ..)| ix.contains(id)).collect())?
        };
        let mut fresh: Vec<Fresh<'_>> = Vec::with_capacity(candidates.len());
        for (c, indexed) in candidates.into_iter().zip(indexed) {
            if !indexed && self.session.insert(c.0, ()).is_none() {
                fresh.push(c);
            }
        }
        // Ids are trusted (see `BlockContent::Data`): hashing every block again here
        // would cost as much as the engine's own hashing. What the sender already
        // compressed (or found not worth it) is not tried again, and when nothing is
        // left to try, no pool threads are woken for it.
        let encode = |(id, data, compressed): &Fresh<'_>| {
            let (compression, bytes) = match compressed.frame_for(data) {
                Some(frame) => (Compression::Zstd, frame),
                None => (Compression::None, (*data).clone()),
            };
            (*id, compression, bytes)
        };
        let encoded: Vec<(BlockId, Compression, Bytes)> = if fresh
            .iter()
            .any(|(_, _, c)| matches!(c, Compressed::NotTried))
        {
            fresh.par_iter().map(encode).collect()
        } else {
            fresh.iter().map(encode).collect()
        };
        let mut added = 0u64;
        for (id, compression, bytes) in encoded {
            added += bytes.len() as u64;
            self.pack.add(id, compression, bs as u32, bytes);
            if self.pack.len >= PACK_TARGET {
                self.flush()?;
            }
        }
        Ok(added)
    }

    fn commit(mut self: Box<Self>) -> Result<CommitInfo> {
        // The packs are stored and indexed, so the manifest can name them.
        self.finish_uploads()?;
        let repo = self.repo;
        let r = &self.request;
        let hint = Hint {
            source_snapshot: r.source_snapshot.clone(),
            id: r.snapshot.id,
            created: r.snapshot.created,
            local_volume: r.volume.clone(),
            local_snapshot: r.snapshot.name.clone(),
        };
        let mut overlay = Overlay {
            repo,
            base: self.base_manifest.map(|(id, _)| id),
            block_count: self.block_count,
            changes: std::mem::take(&mut self.changes),
            moved_to: None,
        };
        let mut attempt = 0;
        let info = loop {
            attempt += 1;
            let mut cat = repo.catalog(&r.volume)?.unwrap_or_else(|| Catalog {
                volume: r.volume.clone(),
                ..Default::default()
            });
            if let Some(existing) = cat.snapshots.iter().find(|s| s.name == r.snapshot.name) {
                if existing.id == r.snapshot.id && existing.size == r.snapshot.size {
                    // Another writer committed the same snapshot: nothing is lost.
                    break CommitInfo::default();
                }
                return Err(StoreError::AlreadyExists {
                    what: format!(
                        "snapshot {} (committed meanwhile by another writer, with another identity) in {}",
                        snapsync_core::quote_snapshot(&r.volume, &r.snapshot.name),
                        repo.location()
                    ),
                });
            }
            if cat.origin.is_none() {
                cat.origin = r.origin.clone();
            }
            let placed = place_in_chain(repo, &cat, &r.snapshot, &mut overlay, self.base_manifest)?;
            let info = CommitInfo {
                inserted_before: placed.younger.as_ref().map(|y| y.name.clone()),
                redundant_entries_removed: placed.redundant_entries_removed,
            };
            cat.snapshots.push(placed.entry);
            if let Some(y) = placed.younger {
                if let Some(slot) = cat.snapshots.iter_mut().find(|s| s.name == y.name) {
                    *slot = y;
                }
            }
            cat.snapshots
                .sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
            let held: Vec<String> = cat.snapshots.iter().map(|s| s.name.clone()).collect();
            let pos = cat.hints.iter().position(|h| {
                h.source_system == r.source_system && h.source_volume == r.source_volume
            });
            let hints = match pos {
                Some(p) => &mut cat.hints[p],
                None => {
                    cat.hints.push(SourceHints {
                        source_system: r.source_system.clone(),
                        source_volume: r.source_volume.clone(),
                        snapshots: vec![],
                    });
                    cat.hints.last_mut().expect("pushed")
                }
            };
            hints.snapshots.retain(|h| h.id != hint.id);
            hints.snapshots.push(hint.clone());
            for h in &mut cat.hints {
                h.snapshots
                    .retain(|x| x.local_volume != r.volume || held.contains(&x.local_snapshot));
            }
            cat.generation += 1;
            match repo.put_catalog(&cat) {
                Ok(()) => break info,
                Err(StoreError::Conflict { what }) if attempt < COMMIT_ATTEMPTS => {
                    debug!(%what, attempt, "commit raced; retrying");
                    std::thread::sleep(std::time::Duration::from_millis(5 * u64::from(attempt)));
                }
                Err(e) => return Err(e),
            }
        };
        Ok(info)
    }
}

/// Where a new snapshot goes in its volume's chain, and the re-based younger neighbour.
struct Placement {
    entry: CatalogSnapshot,
    /// The next younger snapshot, with its manifest re-based onto the new one when that
    /// removes entries (otherwise unchanged).
    younger: Option<CatalogSnapshot>,
    redundant_entries_removed: u64,
}

/// Store the new snapshot's manifest as a delta against its older neighbour in the
/// volume (by age), whatever base the data was transferred against; and, as the Tintri
/// seed describes, re-base the younger neighbour onto it when the snapshot is inserted
/// into the middle of the chain: entries the new snapshot makes redundant are dropped,
/// entries needed to undo its changes are added, and the re-base is only kept when the
/// younger neighbour ends up with no more entries than before.
///
/// Chains therefore always point from younger to older snapshots (or to a clone's
/// origin, or end in a full map), so they cannot form cycles.
fn place_in_chain(
    repo: &Repository,
    cat: &Catalog,
    snapshot: &snapsync_core::SnapshotInfo,
    target: &mut Overlay<'_>,
    transfer_base: Option<(ManifestId, u32)>,
) -> Result<Placement> {
    let key = |s: &CatalogSnapshot| (s.created, s.name.clone());
    let me = (snapshot.created, snapshot.name.clone());
    let older = cat
        .snapshots
        .iter()
        .filter(|s| key(s) < me)
        .max_by_key(|s| key(s));
    let younger = cat
        .snapshots
        .iter()
        .filter(|s| key(s) > me)
        .min_by_key(|s| key(s));
    // An older neighbour, or for the first snapshot of a clone its origin's manifest.
    let storage_base = match older {
        Some(o) => Some((o.manifest, repo.manifest_depth(&o.manifest)?)),
        None if cat.origin.is_some() && younger.is_none() => transfer_base,
        None => None,
    };
    target.restore()?;
    let root = target.root_hash()?;
    let (delta_base, depth, delta) = match storage_base {
        // Stored against the base it was sent against (the usual case): the delta is
        // what was received, less what did not change.
        Some((id, depth)) if depth + 1 < CHECKPOINT_INTERVAL && target.base == Some(id) => {
            (Some(id), depth + 1, target.delta_against_base()?)
        }
        Some((id, depth)) if depth + 1 < CHECKPOINT_INTERVAL => (
            Some(id),
            depth + 1,
            repo.delta_against(&id, &target.map()?)?,
        ),
        // A checkpoint (full map) every CHECKPOINT_INTERVAL deltas bounds chain reads.
        // Without a transfer base, what was received is the full map: taken as the
        // delta as it is, not copied (the commit is retried only if another writer
        // committed meanwhile, when it is rebuilt from the manifest just stored).
        _ if target.base.is_none() => (None, 0, target.take_full_map()),
        _ => (None, 0, Delta::full(&target.map()?)),
    };
    let manifest = Manifest {
        header: ManifestHeader {
            volume: cat.volume.clone(),
            name: snapshot.name.clone(),
            id: snapshot.id,
            created: snapshot.created,
            size: snapshot.size,
            block_size: repo.config.block_size,
            delta_base,
            depth,
            root,
            packs: Vec::new(),
        },
        delta,
    };
    let moved = target.base.is_none() && depth == 0;
    let manifest_id = repo.put_manifest(manifest)?;
    if moved {
        target.moved_to = Some(manifest_id);
    }
    let entry = CatalogSnapshot {
        name: snapshot.name.clone(),
        id: snapshot.id,
        created: snapshot.created,
        size: snapshot.size,
        manifest: manifest_id,
    };
    let mut placement = Placement {
        entry,
        younger: None,
        redundant_entries_removed: 0,
    };
    let Some(y) = younger else {
        return Ok(placement);
    };
    placement.younger = Some(y.clone());
    if depth + 1 >= CHECKPOINT_INTERVAL {
        return Ok(placement);
    }
    let (y_manifest, y_map) = repo.resolve(&y.manifest)?;
    target.restore()?;
    let rebased = Delta::between(&target.map()?, &y_map);
    let before = y_manifest.delta.len();
    if rebased.len() > before {
        return Ok(placement);
    }
    let mut header = y_manifest.header.clone();
    header.delta_base = Some(manifest_id);
    header.depth = depth + 1;
    placement.redundant_entries_removed = (before - rebased.len()) as u64;
    let new_id = repo.put_manifest(Manifest {
        header,
        delta: rebased,
    })?;
    placement.younger = Some(CatalogSnapshot {
        manifest: new_id,
        ..y.clone()
    });
    Ok(placement)
}
