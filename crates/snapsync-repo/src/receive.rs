//! Receiving a snapshot: compress new blocks into packs, then commit a manifest and a
//! new catalog generation.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use rayon::prelude::*;
use snapsync_core::{BlockId, BlockRef, Hint};
use snapsync_store::{
    BlockContent, CommitInfo, Compressed, Guarded, IncomingBlock, ReceiveRequest, Receiver, Result,
    SnapshotSink, StoreError,
};
use tracing::debug;

use crate::backend::PendingPuts;
use crate::format::{
    self, Catalog, CatalogSnapshot, Compression, IndexEntry, ManifestHeader, ManifestId,
    SourceHints, MAGIC_PACK, PACK_HEADER,
};
use crate::lock::SessionLock;
use crate::repo::{key_index, key_pack, Repository, MAX_CHAIN_LEN};
use crate::spill::Changes;
use crate::staged::StagedFile;
use crate::stream::{delta_between, merge_deltas, ChainCursor, CheckedManifest, Overlay};
use crate::writer::ManifestWriter;

/// Packs are flushed at this size: large objects for object stores, small enough that a
/// killed replication loses little and a rerun reuses the rest.
const PACK_TARGET: usize = 32 << 20;
/// ... or at this many blocks: what a receive holds per block of a pack in flight (its
/// index entry, its buffer, its id in `session`) is ~150 bytes, so a 32 MiB pack of
/// small compressed blocks (800 Ki blocks of 512 B) would hold ~120 MiB of bookkeeping.
/// At the default 64 KiB blocks a pack is full by size long before.
const PACK_MAX_BLOCKS: usize = 16 << 10;
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
            changes: Changes::default(),
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
    /// In a local repository, the file the pack is written to instead, as it fills
    /// (see [`crate::staged`]).
    file: Option<StagedFile>,
    /// Total length of the pack so far.
    len: usize,
    entries: Vec<IndexEntry>,
}

impl PackBuilder {
    /// Append one block as stored (`bytes`, `compression` of `raw_len` plaintext bytes;
    /// sealed in `repo` if it is encrypted, whose packs are then version 3).
    fn add(
        &mut self,
        repo: &Repository,
        id: BlockId,
        (compression, raw_len): (Compression, u32),
        bytes: Bytes,
    ) -> Result<()> {
        if self.entries.is_empty() {
            let mut header = Vec::with_capacity(PACK_HEADER);
            header.extend_from_slice(MAGIC_PACK);
            header.extend_from_slice(&repo.format_version().to_le_bytes());
            header.resize(PACK_HEADER, 0);
            self.len = header.len();
            self.file = repo.backend.stage_pack()?;
            match &mut self.file {
                Some(file) => file.write(&header)?,
                None => self.chunks.push(header.into()),
            }
        }
        self.entries.push(IndexEntry {
            id,
            offset: self.len as u64,
            stored_len: bytes.len() as u32,
            raw_len,
            compression,
        });
        self.len += bytes.len();
        match &mut self.file {
            Some(file) => file.write(&bytes),
            None => {
                self.chunks.push(bytes);
                Ok(())
            }
        }
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
    /// a few entries instead of one per block of the volume), and past a bound on disk;
    /// the base is read along its chain when the snapshot is committed.
    changes: Changes,
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
    /// it inside the snapshot), and whether its content is `new` to the repository. Zero blocks are noted too: over a base they replace
    /// data, and without one a full map leaves them out.
    fn record(&mut self, index: u64, block: BlockRef, new: bool) -> Result<()> {
        self.changes.insert(index, block, new)
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
        let id = self.repo.pack_id(&index);
        let index = self.repo.seal_object(&key_index(&id), index);
        debug!(pack = %id, size = pack.len, blocks = pack.entries.len(), "storing pack");
        // The pack before its index, in one ordered background job: an index never
        // names a pack that is not there.
        let index = (key_index(&id), vec![Bytes::from(index)]);
        let job = match pack.file {
            Some(file) => {
                debug_assert_eq!(file.len(), pack.len as u64);
                self.repo
                    .backend
                    .spawn_staged_puts(file, &key_pack(&id), vec![index])
            }
            None => self
                .repo
                .backend
                .spawn_puts(vec![(key_pack(&id), pack.chunks), index]),
        };
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
        let mut sent: Vec<(u64, Fresh<'_>)> = Vec::new();
        for b in &blocks {
            match &b.content {
                BlockContent::Zero => self.record(b.index, BlockRef::Zero, false)?,
                BlockContent::Existing(id) => self.record(b.index, BlockRef::Data(*id), false)?,
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
                    sent.push((b.index, (*id, data, compressed)));
                }
            }
        }
        // Each block is stored once per receive: not again if this receive already
        // stored it (in `session` while its pack is being stored, indexed after).
        let indexed: Vec<bool> = if sent.is_empty() {
            Vec::new()
        } else {
            let session = &self.session;
            self.repo.with_index(|ix| {
                sent.iter()
                    .map(|(_, (id, ..))| !session.contains_key(id) && ix.contains(id))
                    .collect()
            })?
        };
        let mut fresh: Vec<Fresh<'_>> = Vec::with_capacity(sent.len());
        for ((index, c), indexed) in sent.into_iter().zip(indexed) {
            // New to the repository: not indexed before this receive (see `Changes`).
            let new = !indexed;
            self.record(index, BlockRef::Data(c.0), new)?;
            if new && self.session.insert(c.0, ()).is_none() {
                fresh.push(c);
            }
        }
        // Ids are trusted (see `BlockContent::Data`): hashing every block again here
        // would cost as much as the engine's own hashing. What the sender already
        // compressed (or found not worth it) is not tried again, and when nothing is
        // left to try, no pool threads are woken for it.
        // Sealed here too in an encrypted repository (on all cores).
        let repo = self.repo;
        let encode = |(id, data, compressed): &Fresh<'_>| {
            let (compression, bytes) = match compressed.frame_for(data) {
                Some(frame) => (Compression::Zstd, frame),
                None => (Compression::None, (*data).clone()),
            };
            // What is reported as sent: the (compressed) data, before sealing, the same
            // in plain and encrypted repositories.
            let len = bytes.len() as u64;
            (*id, compression, repo.seal_stored(id, bytes), len)
        };
        let encoded: Vec<(BlockId, Compression, Bytes, u64)> = if repo.is_encrypted()
            || fresh
                .iter()
                .any(|(_, _, c)| matches!(c, Compressed::NotTried))
        {
            fresh.par_iter().map(encode).collect()
        } else {
            fresh.iter().map(encode).collect()
        };
        let mut added = 0u64;
        for (id, compression, bytes, len) in encoded {
            added += len;
            self.pack.add(repo, id, (compression, bs as u32), bytes)?;
            if self.pack.len >= PACK_TARGET || self.pack.entries.len() >= PACK_MAX_BLOCKS {
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
        let changes = std::mem::take(&mut self.changes);
        let overlay = Overlay {
            repo,
            base: self.base_manifest.map(|(id, _)| id),
            block_count: self.block_count,
            changes: &changes,
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
            let placed = place_in_chain(repo, &cat, &r.snapshot, &overlay)?;
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
        // Its packs are indexed: cached, the next process need not read their indexes.
        repo.cache_index();
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

/// Store the new snapshot's manifest as a delta against a snapshot older than it in the
/// volume (by age), whatever base the data was transferred against; and, as the Tintri
/// seed describes, re-base the younger neighbour onto it when the snapshot is inserted
/// into the middle of the chain: entries the new snapshot makes redundant are dropped,
/// entries needed to undo its changes are added, and the re-base is only kept when the
/// younger neighbour ends up with no more entries than before.
///
/// Which older snapshot: numbering the chain from its full map, snapshot `n` goes on
/// number `n - lowbit(n)`, found on the older neighbour's chain (see
/// [`snapsync_core::chain`]). The first snapshot of a clone goes on its origin's
/// manifest. Chains therefore always point from younger to older snapshots (or to a
/// clone's origin, or end in a full map), so they cannot form cycles.
fn place_in_chain(
    repo: &Repository,
    cat: &Catalog,
    snapshot: &snapsync_core::SnapshotInfo,
    target: &Overlay<'_>,
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
    let neighbour = match older {
        Some(o) => Some(o.manifest),
        None if cat.origin.is_some() && younger.is_none() => target.base,
        None => None,
    };
    let header = ManifestHeader {
        volume: cat.volume.clone(),
        name: snapshot.name.clone(),
        id: snapshot.id,
        created: snapshot.created,
        size: snapshot.size,
        block_size: repo.config.block_size,
        delta_base: None,
        depth: 0,
        root: None,
        packs: Vec::new(),
    };
    let neighbour_chain = match neighbour {
        Some(n) => Some(repo.checked_chain(&n)?).filter(|c| c.len() < MAX_CHAIN_LEN),
        None => None,
    };
    let (manifest_id, depth) = match &neighbour_chain {
        Some(chain) => store_delta(repo, chain, target, header)?,
        None => (store_full(repo, target, header)?, 0),
    };
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
    if let Some(y) = younger {
        let rebased = rebase_younger(repo, y, manifest_id, depth)?;
        placement.redundant_entries_removed = rebased.as_ref().map_or(0, |r| r.1);
        placement.younger = Some(match rebased {
            Some((manifest, _)) => CatalogSnapshot {
                manifest,
                ..y.clone()
            },
            None => y.clone(),
        });
    }
    Ok(placement)
}

/// Store the snapshot as a full map, streamed from what was received over its transfer
/// base.
fn store_full(
    repo: &Repository,
    target: &Overlay<'_>,
    header: ManifestHeader,
) -> Result<ManifestId> {
    let mut w = ManifestWriter::new(repo, target.block_count, true);
    let mut data = target.data()?;
    while let Some((i, id)) = crate::stream::DataStream::next_data(&mut data)? {
        w.push(i, BlockRef::Data(id))?;
    }
    w.finish(header)
}

/// Store the snapshot as a delta on the manifest that the chain's numbering picks from
/// its older neighbour's chain `chain` (newest first). Returns the manifest and its
/// number.
fn store_delta(
    repo: &Repository,
    chain: &[CheckedManifest],
    target: &Overlay<'_>,
    mut header: ManifestHeader,
) -> Result<(ManifestId, u32)> {
    let number = chain[0].head.header.depth.saturating_add(1);
    let wanted = snapsync_core::chain::delta_base_number(u64::from(number));
    let k = chain
        .iter()
        .position(|m| u64::from(m.head.header.depth) <= wanted)
        .unwrap_or(chain.len() - 1);
    let base = &chain[k];
    header.delta_base = Some(base.id);
    header.depth = number;
    let mut w = ManifestWriter::new(repo, target.block_count, false);
    // Usually the data came over the older neighbour and the map kept its size: the
    // delta is then the neighbour's manifests above the base merged with what was
    // received. Below them, only what may hold the base's block is looked up, in index
    // order (a cursor skips the parts in between unread): a delta must list only what
    // differs from its base, as diffs (and so base selection) rely on it, and a sender
    // often sends blocks that did not change (its diff may be coarser than the
    // repository's blocks: 64 KiB hashed ranges over 4 KiB blocks). See
    // `Merged::surely_differs` for what needs no lookup.
    let same_size = chain[..=k]
        .iter()
        .all(|m| m.head.block_count == target.block_count);
    if target.base == Some(chain[0].id) && same_size {
        let mut base_map = ChainCursor::new(repo, &chain[k..])?;
        merge_deltas(
            repo,
            target.changes,
            &chain[..k],
            target.block_count,
            |i, m| {
                if !m.surely_differs() && base_map.block(i)? == m.newest {
                    return Ok(());
                }
                w.push(i, m.newest)
            },
        )?;
    } else {
        let mut base_map = ChainCursor::new(repo, &chain[k..])?;
        let mut data = target.data()?;
        delta_between(&mut base_map, &mut data, target.block_count, |i, b| {
            w.push(i, b)
        })?;
    }
    Ok((w.finish(header)?, number))
}

/// Re-base the younger neighbour `y` onto the inserted snapshot's manifest `inserted`
/// (number `depth`) when that leaves it no more entries than before: the new manifest
/// and how many entries it saved, or `None` to keep `y` as it is.
fn rebase_younger(
    repo: &Repository,
    y: &CatalogSnapshot,
    inserted: ManifestId,
    depth: u32,
) -> Result<Option<(ManifestId, u64)>> {
    let inserted_chain = repo.checked_chain(&inserted)?;
    if inserted_chain.len() >= MAX_CHAIN_LEN {
        return Ok(None);
    }
    let y_chain = repo.checked_chain(&y.manifest)?;
    let before = y_chain[0].head.count;
    let mut header = y_chain[0].head.header.clone();
    header.delta_base = Some(inserted);
    header.depth = depth.saturating_add(1);
    let block_count = y_chain[0].head.block_count;
    let mut w = ManifestWriter::new(repo, block_count, false);
    let mut base_map = ChainCursor::new(repo, &inserted_chain)?;
    let mut y_map = ChainCursor::new(repo, &y_chain)?;
    delta_between(&mut base_map, &mut y_map, block_count, |i, b| w.push(i, b))?;
    if w.count() > before {
        // Not kept (what was written is left for gc).
        return Ok(None);
    }
    let saved = before - w.count();
    Ok(Some((w.finish(header)?, saved)))
}
