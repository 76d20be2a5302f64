//! Receiving a snapshot: compress new blocks into packs, then commit a manifest and a
//! new catalog generation.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use rayon::prelude::*;
use snapsync_core::{codec, validate_name, BlockId, BlockMap, BlockRef, Delta, Hint};
use snapsync_store::{
    BlockContent, CommitInfo, Compressed, IncomingBlock, ReceiveRequest, Receiver, Result,
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
        validate_name("volume", &request.volume)?;
        validate_name("snapshot", &request.snapshot.name)?;
        let lock = self.session_lock("replicate")?;
        if let Some(c) = self.catalog(&request.volume)? {
            if c.snapshots.iter().any(|s| s.name == request.snapshot.name) {
                return Err(StoreError::AlreadyExists {
                    what: format!(
                        "snapshot {}@{} in {}",
                        request.volume,
                        request.snapshot.name,
                        self.location()
                    ),
                });
            }
        }
        let (base_manifest, mut map) = match &request.base {
            None => (None, BlockMap::zeroed(0)),
            Some(b) => {
                let cat = self.catalog(&b.volume)?;
                let snap = cat
                    .as_ref()
                    .and_then(|c| c.snapshots.iter().find(|s| s.name == b.snapshot))
                    .ok_or_else(|| {
                        StoreError::not_found(format!(
                            "base snapshot {}@{} in {}",
                            b.volume,
                            b.snapshot,
                            self.location()
                        ))
                    })?;
                let (m, map) = self.resolve(&snap.manifest)?;
                (Some((snap.manifest, m.header.depth)), map)
            }
        };
        map.resize(request.snapshot.size.div_ceil(self.config.block_size));
        Ok(Box::new(RepoReceiver {
            _lock: lock,
            repo: self,
            request,
            base_manifest,
            map,
            pack: PackBuilder::default(),
            session: HashMap::new(),
            written: Vec::new(),
            uploads: VecDeque::new(),
        }))
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
    map: BlockMap,
    pack: PackBuilder,
    /// Blocks stored by this receive (pending or flushed).
    session: HashMap<BlockId, ()>,
    /// Packs flushed by this receive, added to the shared index on commit.
    written: Vec<(BlockId, Vec<IndexEntry>)>,
    /// Packs being stored in the background.
    uploads: VecDeque<PendingPuts>,
}

/// A block new to the repository: id, plaintext, and what its sender knows about
/// compressing it.
type Fresh<'a> = (BlockId, &'a Bytes, &'a Compressed);

impl RepoReceiver<'_> {
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
        self.uploads.push_back(job);
        self.written.push((id, pack.entries));
        while self.uploads.len() > MAX_UPLOADS {
            let job = self.uploads.pop_front().expect("non-empty");
            self.repo.backend.wait(job)?;
        }
        Ok(())
    }

    /// Flush the last pack and wait until every pack is stored.
    fn finish_uploads(&mut self) -> Result<()> {
        self.flush()?;
        while let Some(job) = self.uploads.pop_front() {
            self.repo.backend.wait(job)?;
        }
        Ok(())
    }
}

impl Drop for RepoReceiver<'_> {
    /// A receive abandoned before its commit (a dropped connection, a failed write)
    /// leaves the packs it stored, with their indexes; index them in this process too, so
    /// that a rerun in the same process (a server) does not send their blocks again.
    fn drop(&mut self) {
        if self.written.is_empty() {
            return;
        }
        let mut stored = true;
        while let Some(job) = self.uploads.pop_front() {
            stored &= self.repo.backend.wait(job).is_ok();
        }
        if stored {
            let written = std::mem::take(&mut self.written);
            let _ = self.repo.with_index(|ix| {
                for (pack, entries) in &written {
                    ix.add_pack(*pack, entries);
                }
            });
        } else {
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
        let bs = self.repo.config.block_size as usize;
        let mut fresh: Vec<Fresh<'_>> = Vec::new();
        for b in &blocks {
            match &b.content {
                BlockContent::Zero => self.map.set(b.index, BlockRef::Zero),
                BlockContent::Existing(id) => self.map.set(b.index, BlockRef::Data(*id)),
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
                    self.map.set(b.index, BlockRef::Data(*id));
                    if !self.session.contains_key(id) {
                        self.session.insert(*id, ());
                        fresh.push((*id, data, compressed));
                    }
                }
            }
        }
        let encoded: Vec<(BlockId, Compression, Bytes)> = fresh
            .par_iter()
            // Ids are trusted (see `BlockContent::Data`): hashing every block again
            // here would cost as much as the engine's own hashing. What the sender
            // already compressed (or found not worth it) is not tried again.
            .map(|(id, data, compressed)| {
                let (compression, bytes) = match compressed {
                    Compressed::Zstd(frame) => (Compression::Zstd, frame.clone()),
                    Compressed::NotWorthIt => (Compression::None, (*data).clone()),
                    Compressed::NotTried => match codec::compress(data) {
                        Some(frame) => (Compression::Zstd, Bytes::from(frame)),
                        None => (Compression::None, (*data).clone()),
                    },
                };
                (*id, compression, bytes)
            })
            .collect();
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
        self.finish_uploads()?;
        let repo = self.repo;
        // The packs are stored: index them so the manifest can name them.
        let written = std::mem::take(&mut self.written);
        repo.with_index(|ix| {
            for (pack, entries) in &written {
                ix.add_pack(*pack, entries);
            }
        })?;
        let r = &self.request;
        let hint = Hint {
            source_snapshot: r.source_snapshot.clone(),
            id: r.snapshot.id,
            created: r.snapshot.created,
            local_volume: r.volume.clone(),
            local_snapshot: r.snapshot.name.clone(),
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
                        "snapshot {}@{} (committed meanwhile by another writer, with another identity) in {}",
                        r.volume, r.snapshot.name, repo.location()
                    ),
                });
            }
            if cat.origin.is_none() {
                cat.origin = r.origin.clone();
            }
            let placed = place_in_chain(repo, &cat, &r.snapshot, &self.map, self.base_manifest)?;
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
    map: &BlockMap,
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
        Some(o) => Some((o.manifest, repo.manifest(&o.manifest)?.header.depth)),
        None if cat.origin.is_some() && younger.is_none() => transfer_base,
        None => None,
    };
    let (delta_base, depth, delta) = match storage_base {
        Some((id, depth)) if depth + 1 < CHECKPOINT_INTERVAL => {
            let (_, base_map) = repo.resolve(&id)?;
            (Some(id), depth + 1, Delta::between(&base_map, map))
        }
        // A checkpoint (full map) every CHECKPOINT_INTERVAL deltas bounds chain reads.
        _ => (None, 0, Delta::full(map)),
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
            root: map.root_hash(),
            packs: Vec::new(),
        },
        delta,
    };
    let manifest_id = repo.put_manifest(&manifest)?;
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
    let rebased = Delta::between(map, &y_map);
    let before = y_manifest.delta.len();
    if rebased.len() > before {
        return Ok(placement);
    }
    let mut header = y_manifest.header.clone();
    header.delta_base = Some(manifest_id);
    header.depth = depth + 1;
    let new_id = repo.put_manifest(&Manifest {
        header,
        delta: rebased.clone(),
    })?;
    placement.younger = Some(CatalogSnapshot {
        manifest: new_id,
        ..y.clone()
    });
    placement.redundant_entries_removed = (before - rebased.len()) as u64;
    Ok(placement)
}
