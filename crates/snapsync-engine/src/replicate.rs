//! `replicate`: send every snapshot the destination lacks, or one chosen snapshot.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use bytes::BytesMut;
use rayon::prelude::*;
use serde::Serialize;
use snapsync_core::{
    choose_base, common_snapshots, is_zero, missing_snapshots, plan_blocks, BaseReason, BlockId,
    BlockPlan, CommonSnapshot, ExtentList, SnapshotInfo, VolumeInfo,
};
use snapsync_store::{
    BaseRef, BlockContent, BufferPool, Bytes, CommitInfo, Compressed, DiffMethod, IncomingBlock,
    Phase, Progress, ReceiveRequest, Receiver, SnapshotReader, SnapshotRef, SnapshotSink,
    SnapshotSource, StoreError,
};
use tracing::{debug, info};

use crate::{EngineError, Result};

/// What to replicate: `ReplicateOptions::default()` (everything the destination lacks)
/// narrowed with the `with_*` methods.
#[non_exhaustive]
#[derive(Clone, Debug, Default)]
pub struct ReplicateOptions {
    /// Volumes to replicate; empty means all.
    pub volumes: Vec<String>,
    /// Only this snapshot (of each selected volume), instead of every missing one.
    pub snapshot: Option<String>,
}

impl ReplicateOptions {
    /// Only these volumes (all when empty).
    pub fn with_volumes(mut self, volumes: Vec<String>) -> Self {
        self.volumes = volumes;
        self
    }

    /// Only this snapshot of each selected volume (every missing one when `None`).
    pub fn with_snapshot(mut self, snapshot: Option<String>) -> Self {
        self.snapshot = snapshot;
        self
    }
}

/// What happened to one snapshot; printed as one JSON line by `replicate --json`.
#[non_exhaustive]
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct SnapshotReport {
    /// Volume.
    pub volume: String,
    /// Snapshot.
    pub snapshot: String,
    /// Name of the base snapshot, or `None` for a full replication.
    pub base: Option<String>,
    /// Why that base.
    pub base_reason: BaseReason,
    /// The next younger snapshot at the destination when this one was inserted into the
    /// middle of its chain, or `None`.
    pub inserted_before: Option<String>,
    /// Metadata entries of that snapshot removed by re-basing it onto this one.
    pub redundant_entries_removed: u64,
    /// Bytes in the diff reported by the source.
    pub changed_bytes: u64,
    /// Bytes read from the source.
    pub read_bytes: u64,
    /// How the source found the diff (`"extents"`, `"hash"`, `"metadata"`, `"full"`).
    pub diff_method: DiffMethod,
    /// Block data stored at the destination, after dedup and compression.
    pub sent_bytes: u64,
    /// Bytes of blocks not sent because the destination already had them.
    pub dedup_bytes: u64,
    /// Wall time.
    pub duration_ms: u64,
}

/// Blocks read and hashed together: large sequential reads, and enough blocks for the
/// hashing to spread over all cores.
const BATCH_BYTES: u64 = 8 << 20;
/// Small extents are gathered into one batch up to this many bytes: enough that an
/// incremental's hundreds of scattered extents cross between the threads a few dozen
/// times rather than once each (on busy cores every hand-over costs a wake-up), small
/// enough that the last batch, which is hashed and stored after everything is read,
/// keeps the pipeline's drain short.
const GATHER_BYTES: u64 = 1 << 20;
/// Batches in flight between the reading and the storing side.
const PIPELINE_DEPTH: usize = 2;
/// Read buffers kept for reuse while a sink still holds slices of them (a repository's
/// pack being filled and stored, a remote write in flight): about what sinks hold.
const MAX_SPARE_BUFFERS: usize = 12;

/// Replicate from `source` to `sink`, calling `on_report` after each snapshot commits.
pub fn replicate(
    source: &dyn SnapshotSource,
    sink: &dyn SnapshotSink,
    options: &ReplicateOptions,
    progress: &dyn Progress,
    on_report: &mut dyn FnMut(&SnapshotReport),
) -> Result<Vec<SnapshotReport>> {
    let src_err = |e: StoreError| EngineError::Source {
        location: source.location(),
        source: e,
    };
    let source_system = source.system_id().map_err(src_err)?;
    let listing = source.list().map_err(src_err)?;
    let volumes: Vec<&VolumeInfo> = if options.volumes.is_empty() {
        listing.iter().collect()
    } else {
        options
            .volumes
            .iter()
            .map(|name| {
                listing.iter().find(|v| &v.name == name).ok_or_else(|| {
                    EngineError::NotFound(format!(
                        "volume {name:?} not found in {}",
                        source.location()
                    ))
                })
            })
            .collect::<Result<_>>()?
    };
    if let Some(s) = &options.snapshot {
        if volumes.iter().all(|v| v.snapshot(s).is_none()) {
            return Err(EngineError::NotFound(format!(
                "snapshot {s:?} not found in any selected volume of {}",
                source.location()
            )));
        }
    }

    let mut ctx = Ctx {
        source,
        sink,
        source_system,
        listing: &listing,
        progress,
        on_report,
        reports: Vec::new(),
    };
    for volume in volumes {
        ctx.replicate_volume(volume, options.snapshot.as_deref(), 0)?;
    }
    Ok(ctx.reports)
}

/// Clones of clones are followed this deep at most (a cycle in lineage is a bug in a
/// store, not a reason to recurse forever).
const MAX_LINEAGE_DEPTH: usize = 64;

struct Ctx<'a> {
    source: &'a dyn SnapshotSource,
    sink: &'a dyn SnapshotSink,
    source_system: String,
    listing: &'a [VolumeInfo],
    progress: &'a dyn Progress,
    on_report: &'a mut dyn FnMut(&SnapshotReport),
    reports: Vec<SnapshotReport>,
}

impl Ctx<'_> {
    fn src_err(&self, e: StoreError) -> EngineError {
        EngineError::Source {
            location: self.source.location(),
            source: e,
        }
    }

    fn dst_err(&self, e: StoreError) -> EngineError {
        EngineError::Destination {
            location: self.sink.location(),
            source: e,
        }
    }

    /// The snapshot a clone was cloned from, if the source still has it.
    fn origin_of(&self, volume: &VolumeInfo) -> Option<(&str, SnapshotInfo)> {
        let o = volume.origin.as_ref()?;
        let v = self.listing.iter().find(|v| v.name == o.volume)?;
        Some((v.name.as_str(), v.snapshot_by_id(&o.id)?.clone()))
    }

    /// Planning's first half: read the destination's hints and find the snapshots both
    /// sides hold (dropping stale hints).
    fn common(&self, volume: &VolumeInfo) -> Result<Vec<CommonSnapshot>> {
        let hints = self
            .sink
            .hints(&self.source_system, &volume.name)
            .map_err(|e| self.dst_err(e))?;
        let dest_listing = self.sink.list().map_err(|e| self.dst_err(e))?;
        let origin = self.origin_of(volume);
        Ok(common_snapshots(
            volume,
            origin.as_ref().map(|(v, s)| (*v, s)),
            &hints,
            &dest_listing,
        ))
    }

    /// Replicate one volume: `only` one snapshot, or every snapshot it lacks.
    fn replicate_volume(
        &mut self,
        volume: &VolumeInfo,
        only: Option<&str>,
        depth: usize,
    ) -> Result<()> {
        let mut common = self.common(volume)?;
        // A clone whose parent snapshot the destination lacks: send the parent first,
        // so that the clone is a delta against it rather than a full copy.
        if depth < MAX_LINEAGE_DEPTH {
            if let Some((origin_volume, origin)) = self.origin_of(volume) {
                let held_in_volume = common.iter().any(|c| c.source_volume == volume.name);
                let origin_held = common.iter().any(|c| c.source.id == origin.id);
                if !held_in_volume && !origin_held {
                    let parent = self
                        .listing
                        .iter()
                        .find(|v| v.name == origin_volume)
                        .expect("origin_of found it");
                    info!(volume = %volume.name, parent = %origin_volume, snapshot = %origin.name, "replicating the clone's parent snapshot first");
                    self.replicate_volume(parent, Some(&origin.name), depth + 1)?;
                    common = self.common(volume)?;
                }
            }
        }
        // The common snapshots are asked again before each snapshot but the first (the
        // one just committed is then among them), not after the last: that would be two
        // more reads of the destination's catalogs before the process can exit.
        for (k, target) in targets(volume, only, &common).into_iter().enumerate() {
            if k > 0 {
                common = self.common(volume)?;
            }
            let plan = self.plan(volume, target, &common)?;
            let report = self.replicate_one(volume, plan)?;
            (self.on_report)(&report);
            self.reports.push(report);
        }
        Ok(())
    }

    /// Plan one snapshot: choose the base among the snapshots both sides hold, ask the
    /// source for the differences against it, and map them onto the sink's blocks.
    fn plan(
        &self,
        volume: &VolumeInfo,
        target: SnapshotInfo,
        common: &[CommonSnapshot],
    ) -> Result<SnapshotPlan> {
        let estimates: HashMap<_, _> = common
            .iter()
            .filter_map(|c| {
                self.source
                    .estimate_diff(&volume.name, &target.name, source_ref(c))
                    .map(|e| (c.source.id, e))
            })
            .collect();
        let choice = choose_base(
            &target,
            common,
            (!estimates.is_empty()).then_some(&estimates),
        );
        let base = choice.base;
        let diff = self
            .source
            .diff(&volume.name, &target.name, base.as_ref().map(source_ref))
            .map_err(|e| self.src_err(e))?;
        let blocks = plan_blocks(
            &diff.data,
            &diff.zero,
            self.sink.block_size(),
            target.size,
            base.as_ref().map(|b| b.source.size),
        );
        let changed_bytes = diff.changed().total_len();
        debug!(
            volume = %volume.name,
            snapshot = %target.name,
            base = ?base.as_ref().map(|b| &b.source.name),
            changed_bytes,
            read = blocks.read.total_len(),
            "replicating"
        );
        Ok(SnapshotPlan {
            changed_bytes,
            diff_method: diff.method,
            target,
            base,
            reason: choice.reason,
            blocks,
        })
    }

    /// Send a planned snapshot's blocks the sink lacks, then commit it.
    fn replicate_one(&self, volume: &VolumeInfo, plan: SnapshotPlan) -> Result<SnapshotReport> {
        let started = Instant::now();
        let mut receiver = self
            .sink
            .begin_receive(self.receive_request(volume, &plan))
            .map_err(|e| self.dst_err(e))?;
        let mut tally = self.send(volume, &plan, receiver.as_mut())?;
        self.check_unchanged(volume, &plan.target)?;
        let committed = self.commit(receiver, &mut tally)?;
        Ok(SnapshotReport {
            volume: volume.name.clone(),
            snapshot: plan.target.name,
            base: plan.base.map(|b| b.source.name),
            base_reason: plan.reason,
            inserted_before: committed.inserted_before,
            redundant_entries_removed: committed.redundant_entries_removed,
            changed_bytes: plan.changed_bytes,
            read_bytes: tally.read_bytes,
            diff_method: plan.diff_method,
            sent_bytes: tally.sent_bytes,
            dedup_bytes: tally.dedup_bytes,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Refuse to commit a snapshot the source no longer lists as it did when planned: a
    /// raw image written to between the listing and the end of the read would
    /// otherwise commit a mix of two states under the first one's name and identity
    /// (and the next run would find that name taken).
    fn check_unchanged(&self, volume: &VolumeInfo, planned: &SnapshotInfo) -> Result<()> {
        let now = self
            .source
            .volume(&volume.name)
            .map_err(|e| self.src_err(e))?;
        match now.snapshot(&planned.name) {
            Some(now) if now == planned => Ok(()),
            now => Err(self.src_err(StoreError::Conflict {
                what: format!(
                    "snapshot {} changed while it was read ({}); nothing of it is committed: replicate again once nothing writes to it",
                    snapsync_core::quote_snapshot(&volume.name, &planned.name),
                    match now {
                        None => "it is gone".to_string(),
                        Some(now) if now.size != planned.size => {
                            format!("size {} -> {} bytes", planned.size, now.size)
                        }
                        Some(_) => "its age or identity differs".to_string(),
                    }
                ),
            })),
        }
    }

    /// What the sink is told of the snapshot it is about to receive: which it is, the
    /// base its delta is against (in the sink's names), and where it came from (its hint).
    fn receive_request(&self, volume: &VolumeInfo, plan: &SnapshotPlan) -> ReceiveRequest {
        ReceiveRequest {
            volume: volume.name.clone(),
            snapshot: plan.target.clone(),
            base: plan.base.as_ref().map(|b| BaseRef {
                volume: b.dest_volume.clone(),
                snapshot: b.dest_snapshot.clone(),
            }),
            source_system: self.source_system.clone(),
            source_volume: volume.name.clone(),
            source_snapshot: plan.target.name.clone(),
            origin: volume.origin.clone(),
        }
    }

    /// Send: tell the receiver which blocks are zero, then read and hash the planned
    /// extents on one thread ([`read_batches`]) while this one asks which blocks the
    /// receiver lacks and writes those ([`Ctx::store_batches`]).
    fn send(
        &self,
        volume: &VolumeInfo,
        plan: &SnapshotPlan,
        receiver: &mut dyn Receiver,
    ) -> Result<Tally> {
        let blocks = &plan.blocks;
        if !blocks.zero_blocks.is_empty() {
            let zeros = blocks.zero_blocks.iter().map(|&index| IncomingBlock {
                index,
                content: BlockContent::Zero,
            });
            receiver
                .write(zeros.collect())
                .map_err(|e| self.dst_err(e))?;
        }
        self.progress.start(
            Phase::Replicate {
                volume: &volume.name,
                snapshot: &plan.target.name,
            },
            blocks.read.total_len(),
        );
        let reader = self
            .source
            .open_snapshot(&volume.name, &plan.target.name)
            .map_err(|e| self.src_err(e))?;
        let bs = self.sink.block_size();
        let mut tally = Tally::default();
        // Buffers return to the reader: no fresh allocation (and page faults) per batch,
        // unless the sink still holds slices of one.
        let pool = &BufferPool::new(MAX_SPARE_BUFFERS);
        std::thread::scope(|scope| -> Result<()> {
            let (tx, rx) = crossbeam_channel::bounded(PIPELINE_DEPTH);
            let reading = scope.spawn(move || read_batches(reader, &blocks.read, bs, pool, tx));
            self.store_batches(rx, receiver, &mut tally, pool)?;
            match reading.join() {
                Ok(Some(reader)) => reader.finish().map_err(|e| self.src_err(e)),
                Ok(None) => Ok(()),
                Err(p) => std::panic::resume_unwind(p),
            }
        })?;
        // The read buffers are not held through the commit, which allocates in
        // proportion to the volume (measured: held, they added ~10 MiB to an 8 GiB
        // replication's peak).
        pool.clear();
        Ok(tally)
    }

    /// The storing side of the pipeline: store each batch read, and report it done.
    ///
    /// One batch is held back while the next one's `missing` question is asked, so a
    /// receiver that answers over the network answers while the held batch is stored
    /// instead of the caller waiting a round trip per batch.
    fn store_batches(
        &self,
        batches: crossbeam_channel::Receiver<std::result::Result<Batch, StoreError>>,
        receiver: &mut dyn Receiver,
        tally: &mut Tally,
        pool: &BufferPool,
    ) -> Result<()> {
        let mut held: Option<(Batch, Vec<BlockId>)> = None;
        for batch in batches {
            let batch = batch.map_err(|e| self.src_err(e))?;
            tally.read_bytes += batch.data.len() as u64;
            let unique = unique_ids(&batch);
            let asked = receiver.missing_ahead(&unique);
            if let Some((batch, unique)) = held.take() {
                self.store(receiver, batch, &unique, tally, pool)?;
            }
            if asked {
                held = Some((batch, unique));
            } else {
                self.store(receiver, batch, &unique, tally, pool)?;
            }
        }
        if let Some((batch, unique)) = held {
            self.store(receiver, batch, &unique, tally, pool)?;
        }
        Ok(())
    }

    /// Store one batch (see [`store_batch`]) and report its bytes as done.
    fn store(
        &self,
        receiver: &mut dyn Receiver,
        batch: Batch,
        unique: &[BlockId],
        tally: &mut Tally,
        pool: &BufferPool,
    ) -> Result<()> {
        let len = batch.data.len() as u64;
        store_batch(receiver, batch, unique, self.sink.block_size(), tally, pool)
            .map_err(|e| self.dst_err(e))?;
        self.progress.advance(len);
        Ok(())
    }

    /// Commit: flush what the receiver still buffers (its bytes count as sent) and
    /// commit the snapshot atomically at the destination.
    fn commit(
        &self,
        mut receiver: Box<dyn Receiver + '_>,
        tally: &mut Tally,
    ) -> Result<CommitInfo> {
        tally.sent_bytes += receiver.flush().map_err(|e| self.dst_err(e))?;
        let committed = receiver.commit().map_err(|e| self.dst_err(e))?;
        self.progress.finish();
        Ok(committed)
    }
}

/// The snapshots of `volume` to send: `only` that one unless the destination holds it,
/// or every one it lacks, oldest first.
fn targets(
    volume: &VolumeInfo,
    only: Option<&str>,
    common: &[CommonSnapshot],
) -> Vec<SnapshotInfo> {
    match only {
        Some(name) => match volume.snapshot(name) {
            Some(s) if !common.iter().any(|c| c.source.id == s.id) => vec![s.clone()],
            Some(_) => {
                info!(volume = %volume.name, snapshot = %name, "already at destination");
                vec![]
            }
            None => vec![],
        },
        None => missing_snapshots(volume, common)
            .into_iter()
            .cloned()
            .collect(),
    }
}

/// Where the source holds a common snapshot: the volume itself, or a clone's origin.
fn source_ref(c: &CommonSnapshot) -> SnapshotRef<'_> {
    SnapshotRef::new(&c.source_volume, &c.source.name)
}

/// What planning decided for one snapshot.
struct SnapshotPlan {
    target: SnapshotInfo,
    base: Option<CommonSnapshot>,
    reason: BaseReason,
    /// Bytes in the source's diff.
    changed_bytes: u64,
    /// How the source found it.
    diff_method: DiffMethod,
    blocks: BlockPlan,
}

/// Counts kept while batches are read and stored.
#[derive(Default)]
struct Tally {
    read_bytes: u64,
    sent_bytes: u64,
    dedup_bytes: u64,
}

struct Batch {
    /// Where its blocks are in the volume, in order: `(first block, blocks)` runs. A
    /// batch gathers many small extents (an incremental's scattered writes), so that
    /// they cross between the threads, are hashed and are stored together rather than
    /// each on its own: on busy cores every hand-over costs a wake-up.
    runs: Vec<(u64, u64)>,
    /// Shared, so that blocks sent on are slices of it rather than copies.
    data: Bytes,
    ids: Vec<Option<BlockId>>,
    /// What the source knew about compressing each block (frames a remote source sent
    /// go on to the sink).
    compressed: Vec<Compressed>,
}

impl Batch {
    /// The index in the volume of each block, in order.
    fn indexes(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs.iter().flat_map(|&(first, n)| first..first + n)
    }
}

/// The reading side of the pipeline: read `extents` in batches of up to
/// [`BATCH_BYTES`] (see [`batches`]), hash each block (on all cores), tell the reader
/// the ids, and send the batches on. Returns the reader to be finished after a complete
/// pass, or `None` when reading failed (the error was sent) or the storing side
/// stopped.
///
/// A batch is hashed while the next one is read: the disk is never left idle while
/// blocks are hashed, which for an incremental's scattered reads (no readahead running
/// on meanwhile) was a pause per batch.
fn read_batches<'r>(
    mut reader: Box<dyn SnapshotReader + 'r>,
    extents: &ExtentList,
    bs: u64,
    pool: &BufferPool,
    tx: crossbeam_channel::Sender<std::result::Result<Batch, StoreError>>,
) -> Option<Box<dyn SnapshotReader + 'r>> {
    let mut all = batches(
        extents,
        bs,
        (BATCH_BYTES / bs).max(1),
        (GATHER_BYTES / bs).max(1),
    );
    let mut read = all
        .next()
        .map(|runs| read_batch(reader.as_mut(), runs, bs, pool));
    while let Some(current) = read.take() {
        let (runs, data, compressed) = match current {
            Ok(b) => b,
            Err(err) => {
                let _ = tx.send(Err(err));
                return None;
            }
        };
        let next = all.next();
        let (ids, next) = rayon::join(
            || -> Vec<Option<BlockId>> {
                data.par_chunks(bs as usize)
                    .map(|b| (!is_zero(b)).then(|| BlockId::of(b)))
                    .collect()
            },
            || next.map(|runs| read_batch(reader.as_mut(), runs, bs, pool)),
        );
        read = next;
        let batch = Batch {
            runs,
            data: data.freeze(),
            ids,
            compressed,
        };
        for (index, id) in batch.indexes().zip(&batch.ids) {
            let id = id.unwrap_or_else(|| zero_block_id(bs));
            reader.observe_block(index * bs, bs as usize, &id);
        }
        if tx.send(Ok(batch)).is_err() {
            return None;
        }
    }
    Some(reader)
}

/// A batch read: its runs, its blocks' bytes, and what the source knew about
/// compressing each.
type ReadBatch = (Vec<(u64, u64)>, BytesMut, Vec<Compressed>);

/// Read the blocks of `runs` into one buffer from `pool`.
fn read_batch(
    reader: &mut (dyn SnapshotReader + '_),
    runs: Vec<(u64, u64)>,
    bs: u64,
    pool: &BufferPool,
) -> std::result::Result<ReadBatch, StoreError> {
    let blocks: u64 = runs.iter().map(|r| r.1).sum();
    let mut data = pool.take((blocks * bs) as usize);
    let mut compressed = Vec::with_capacity(blocks as usize);
    let mut at = 0usize;
    for &(index, n) in &runs {
        let len = (n * bs) as usize;
        compressed.extend(reader.read_blocks_at(index * bs, &mut data[at..at + len], bs)?);
        at += len;
    }
    Ok((runs, data, compressed))
}

/// The batches `extents` (whole blocks of `bs` bytes, sorted) are read in, in order:
/// runs of `(first block, blocks)`, at most `batch_blocks` blocks in all per batch. A
/// large extent is cut into full batches; small ones share one until it holds
/// `gather_blocks`. Made as they are read, so that they take no memory beyond the
/// extent list.
fn batches(
    extents: &ExtentList,
    bs: u64,
    batch_blocks: u64,
    gather_blocks: u64,
) -> impl Iterator<Item = Vec<(u64, u64)>> + '_ {
    let mut blocks = extents
        .as_slice()
        .iter()
        .map(move |e| (e.offset / bs, e.end() / bs))
        .filter(|(first, end)| first < end);
    let mut left: Option<(u64, u64)> = None;
    std::iter::from_fn(move || {
        let mut runs = Vec::new();
        let mut taken = 0;
        while taken < batch_blocks && (runs.is_empty() || taken < gather_blocks) {
            let Some((first, end)) = left.take().or_else(|| blocks.next()) else {
                break;
            };
            let n = (batch_blocks - taken).min(end - first);
            runs.push((first, n));
            taken += n;
            if first + n < end {
                left = Some((first + n, end));
            }
        }
        (!runs.is_empty()).then_some(runs)
    })
}

/// A block of `batch` as sent to the sink.
///
/// Sinks may keep what they get (a repository holds it in the pack it is filling until
/// the pack is stored), and a slice keeps its whole batch buffer alive. So blocks are
/// slices only when most of the batch is being sent, as in a full replication; the few
/// blocks sent from a mostly-deduplicated batch are copied, and memory held stays
/// bounded by about twice the data in flight.
fn block_bytes(batch: &Bytes, range: std::ops::Range<usize>, sending_most: bool) -> Bytes {
    if sending_most {
        batch.slice(range)
    } else {
        Bytes::copy_from_slice(&batch[range])
    }
}

/// The distinct ids of a batch's data blocks, in order.
fn unique_ids(batch: &Batch) -> Vec<BlockId> {
    let mut seen = HashSet::new();
    batch
        .ids
        .iter()
        .flatten()
        .filter(|id| seen.insert(**id))
        .copied()
        .collect()
}

/// Send one batch: ask which of its blocks the receiver lacks, write those, and refer
/// to the rest. The batch's buffer then goes back to the reader for reuse.
fn store_batch(
    receiver: &mut dyn Receiver,
    batch: Batch,
    unique: &[BlockId],
    bs: u64,
    tally: &mut Tally,
    pool: &BufferPool,
) -> std::result::Result<(), StoreError> {
    let missing: HashSet<BlockId> = receiver
        .missing(unique)?
        .into_iter()
        .zip(unique)
        .filter_map(|(m, id)| m.then_some(*id))
        .collect();
    let sending_most = 2 * missing.len() as u64 * bs >= batch.data.len() as u64;
    let mut sent_now = HashSet::new();
    let blocks: Vec<IncomingBlock> = batch
        .ids
        .iter()
        .zip(batch.indexes())
        .enumerate()
        .map(|(k, (id, index))| {
            let content = match id {
                None => BlockContent::Zero,
                Some(id) if missing.contains(id) && sent_now.insert(*id) => {
                    let start = k * bs as usize;
                    BlockContent::Data {
                        id: *id,
                        data: block_bytes(&batch.data, start..start + bs as usize, sending_most),
                        compressed: match batch.compressed.get(k) {
                            // Like the data: a frame is a slice of the answer it came
                            // in, kept whole only when most of the batch is sent.
                            Some(Compressed::Zstd(f)) if !sending_most => {
                                Compressed::Zstd(Bytes::copy_from_slice(f))
                            }
                            Some(c) => c.clone(),
                            None => Compressed::NotTried,
                        },
                    }
                }
                Some(id) => {
                    if !missing.contains(id) {
                        tally.dedup_bytes += bs;
                    }
                    BlockContent::Existing(*id)
                }
            };
            IncomingBlock { index, content }
        })
        .collect();
    tally.sent_bytes += receiver.write(blocks)?;
    pool.give_back(batch.data);
    Ok(())
}

/// BLAKE3 of an all-zero block, told to sources that cache hashes.
fn zero_block_id(block_size: u64) -> BlockId {
    use std::sync::OnceLock;
    static CACHE: OnceLock<std::sync::Mutex<HashMap<u64, BlockId>>> = OnceLock::new();
    let mut m = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    *m.entry(block_size)
        .or_insert_with(|| BlockId::of(&vec![0u8; block_size as usize]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use snapsync_core::Extent;

    proptest! {
        /// Batches read every block of the extents once, in order, in runs inside one
        /// extent each; each but the last is full or has gathered enough.
        #[test]
        fn batches_cover_the_extents_in_order(
            pieces in prop::collection::vec((0u64..6, 1u64..40), 0..40),
            batch_blocks in 1u64..20,
            gather_blocks in 1u64..25,
        ) {
            let bs = 512;
            let mut extents = Vec::new();
            let mut at = 0;
            for (gap, len) in pieces {
                at += gap;
                extents.push(Extent::new(at * bs, len * bs));
                at += len;
            }
            let list = ExtentList::from_extents(extents);
            let want: Vec<u64> = list.blocks(bs).collect();
            let got: Vec<Vec<(u64, u64)>> =
                batches(&list, bs, batch_blocks, gather_blocks).collect();
            let flat: Vec<u64> = got.iter().flatten().flat_map(|&(f, n)| f..f + n).collect();
            prop_assert_eq!(&flat, &want);
            for (k, b) in got.iter().enumerate() {
                let n: u64 = b.iter().map(|r| r.1).sum();
                prop_assert!(n <= batch_blocks && n > 0);
                if k + 1 < got.len() {
                    prop_assert!(n == batch_blocks || n >= gather_blocks, "{:?}", b);
                }
                // A run is only added to a batch that has not gathered enough yet.
                let before_last: u64 = b[..b.len() - 1].iter().map(|r| r.1).sum();
                prop_assert!(b.len() == 1 || before_last < gather_blocks);
                for &(f, n) in b {
                    prop_assert!(list.covers(f * bs, n * bs));
                }
            }
        }
    }
}
