//! The storage-system trait family.
//!
//! Every kind of storage system snapsync talks to (a directory of raw images, a qcow2
//! image, a repository on disk or S3, a remote server) implements the same few traits,
//! so the replication engine is written once:
//!
//! - [`Store`]: who the system is, and what volumes and snapshots it holds.
//! - [`SnapshotSource`]: the differences between two snapshots, and their data.
//! - [`SnapshotSink`]: the destination's hints, which blocks it lacks, and an atomic
//!   receive-then-commit of one snapshot.
//!
//! Long operations over them report through one [`Progress`] trait; a repository's
//! size and chains, for a status page, through [`view::RepositoryView`].
//!
//! [`memory::MemoryStore`] implements all three in memory; [`conformance`] is the one
//! suite every implementation runs, so that behaviour cannot drift between stores.

#[cfg(feature = "conformance")]
pub mod conformance;
mod error;
mod guarded;
pub mod memory;
pub mod output;
mod pool;
mod progress;
mod random;
#[cfg(feature = "tokio")]
pub mod runtime;
pub mod sample;
pub mod view;

pub use bytes::Bytes;
use snapsync_core::{BlockId, ExtentList, Hint, Origin, SnapshotInfo, VolumeInfo};

pub use error::{Result, StoreError};
pub use guarded::Guarded;
pub use pool::BufferPool;
pub use progress::{NoProgress, Phase, Progress, RecordedPhase, RecordedProgress};
pub use random::random_id;

/// A storage system: its identity and its listing.
pub trait Store: Send + Sync {
    /// A human-readable location, used in messages.
    fn location(&self) -> String;
    /// A stable identity of this storage system, used to key hints at destinations and
    /// to derive snapshot identities. It must not change when the system is reopened.
    fn system_id(&self) -> Result<String>;
    /// All volumes, each with its snapshots sorted oldest first.
    fn list(&self) -> Result<Vec<VolumeInfo>>;

    /// What [`Store::list`] left out, and why: files whose names do not fit the store's
    /// naming, damaged entries of an otherwise readable image. A store never drops
    /// something silently; it lists it here so that `list` can tell the operator.
    fn skipped(&self) -> Result<Vec<Skipped>> {
        Ok(Vec::new())
    }

    /// One volume's listing.
    fn volume(&self, volume: &str) -> Result<VolumeInfo> {
        self.list()?
            .into_iter()
            .find(|v| v.name == volume)
            .ok_or_else(|| StoreError::NotFound {
                what: format!("volume {volume:?} in {}", self.location()),
            })
    }

    /// One snapshot's identity, age and size; `NotFound` naming it when it is not there.
    fn snapshot_info(&self, volume: &str, snapshot: &str) -> Result<SnapshotInfo> {
        self.volume(volume)?
            .snapshot(snapshot)
            .cloned()
            .ok_or_else(|| {
                StoreError::not_found(format!(
                    "snapshot {} in {}",
                    snapsync_core::quote_snapshot(volume, snapshot),
                    self.location()
                ))
            })
    }
}

/// Something a store found but could not list as a volume or snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Skipped {
    /// What was skipped: a path, or an entry within an image (`IMAGE snapshot #N`).
    pub what: String,
    /// Why, in words.
    pub reason: String,
}

impl Skipped {
    /// Construct.
    pub fn new(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

/// The changes between two snapshots of a volume, in bytes of the target.
///
/// `data` and `zero` are disjoint. Bytes in neither are equal to the base (or, without a
/// base, zero). Sources report at the granularity they know; the engine aligns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Ranges whose content changed and must be read.
    pub data: ExtentList,
    /// Ranges that changed and now read as zeros: nothing to read or send.
    pub zero: ExtentList,
    /// How the source found these ranges; reported, never acted on.
    pub method: DiffMethod,
}

/// How a source found a [`Diff`], for reports (`"diff_method"` in `replicate --json`):
/// it tells an operator why an incremental read what it read. Only informative: the
/// engine treats every diff alike.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiffMethod {
    /// From the store's own metadata (a repository's block lists, qcow2 tables): the
    /// default, for stores whose diff never reads data.
    #[default]
    Metadata,
    /// From the file system's extent maps of two images sharing extents (FIEMAP).
    Extents,
    /// By hashing (or comparing) blocks of both images.
    Hash,
    /// No base, nothing known: everything is reported.
    Full,
    /// From a running VM's dirty bitmaps (QEMU checkpoints).
    Bitmap,
}

impl DiffMethod {
    /// The name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            DiffMethod::Metadata => "metadata",
            DiffMethod::Extents => "extents",
            DiffMethod::Hash => "hash",
            DiffMethod::Full => "full",
            DiffMethod::Bitmap => "bitmap",
        }
    }
}

impl Diff {
    /// All changed bytes.
    pub fn changed(&self) -> ExtentList {
        self.data.union(&self.zero)
    }
}

/// Reads the content of one snapshot.
pub trait SnapshotReader: Send {
    /// Fill `buf` from `offset`. Bytes past the snapshot's size read as zeros.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Fill `buf` from `offset` as [`SnapshotReader::read_at`] does, and tell for each
    /// block of `block_size` bytes in it what the source knows about compressing it. A
    /// remote source receives blocks compressed: handing the frames on spares the sink
    /// compressing every block again. The default reads and knows nothing.
    fn read_blocks_at(
        &mut self,
        offset: u64,
        buf: &mut [u8],
        block_size: u64,
    ) -> Result<Vec<Compressed>> {
        self.read_at(offset, buf)?;
        let blocks = (buf.len() as u64).div_ceil(block_size.max(1)) as usize;
        Ok(vec![Compressed::NotTried; blocks])
    }

    /// The engine reports the id it computed for the block at `offset`; sources that
    /// cache block hashes (the raw store) may keep it, so that they do not hash the same
    /// image twice. Ignoring it is always correct.
    fn observe_block(&mut self, _offset: u64, _len: usize, _id: &BlockId) {}

    /// Called after a complete, successful pass; a place to persist caches.
    fn finish(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// A storage system that snapshots can be replicated from.
pub trait SnapshotSource: Store {
    /// The differences between `target` (a snapshot of `volume`) and `base`, or,
    /// without a base, the extents of `target` that hold data or are known to be zero.
    /// The base is usually in the same volume; for a clone it is the snapshot the
    /// volume was cloned from, in another volume.
    fn diff(&self, volume: &str, target: &str, base: Option<SnapshotRef<'_>>) -> Result<Diff>;

    /// A cheap estimate of the size of `diff(volume, target, base)`, for sources that
    /// can get it from metadata. `None` means "not cheap here": the engine then picks the
    /// base by age alone.
    fn estimate_diff(&self, _volume: &str, _target: &str, _base: SnapshotRef<'_>) -> Option<u64> {
        None
    }

    /// Open a snapshot for reading.
    fn open_snapshot(&self, volume: &str, snapshot: &str) -> Result<Box<dyn SnapshotReader + '_>>;

    /// The local files reading `volume@snapshot` touches (an image and its backing
    /// chain), and the local directories the store keeps (a repository's root). A restore
    /// refuses to write over any of them (see [`output::OutputFile`]): writing a snapshot
    /// onto the file it is read from would destroy it. Stores with nothing local (S3, a
    /// remote server, memory) return nothing.
    fn local_files(&self, _volume: &str, _snapshot: &str) -> Result<Vec<std::path::PathBuf>> {
        Ok(Vec::new())
    }
}

/// A snapshot named by volume and name, borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotRef<'a> {
    /// Volume.
    pub volume: &'a str,
    /// Snapshot name.
    pub snapshot: &'a str,
}

impl<'a> SnapshotRef<'a> {
    /// Construct.
    pub fn new(volume: &'a str, snapshot: &'a str) -> Self {
        Self { volume, snapshot }
    }
}

/// A snapshot the destination already holds, used as the base of a delta.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseRef {
    /// Destination volume (differs from the target volume for clones).
    pub volume: String,
    /// Destination snapshot name.
    pub snapshot: String,
}

/// What the engine asks a sink to receive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiveRequest {
    /// Destination volume.
    pub volume: String,
    /// The snapshot, with its identity and age preserved from the source.
    pub snapshot: SnapshotInfo,
    /// The destination snapshot whose content the unsent blocks equal.
    pub base: Option<BaseRef>,
    /// The source's [`Store::system_id`], to key the hint.
    pub source_system: String,
    /// The source's volume name, to key the hint.
    pub source_volume: String,
    /// The source snapshot name, recorded in the hint.
    pub source_snapshot: String,
    /// Lineage when the volume is a clone.
    pub origin: Option<Origin>,
}

impl ReceiveRequest {
    /// Check what a sink must before it begins: the names, and a snapshot time that is a
    /// real time (a peer may send anything). `location` names the sink in the message.
    pub fn validate(&self, location: &str) -> Result<()> {
        snapsync_core::validate_name("volume", &self.volume)?;
        snapsync_core::validate_name("snapshot", &self.snapshot.name)?;
        let t = self.snapshot.created;
        if !t.is_valid() {
            return Err(StoreError::invalid_argument(format!(
                "snapshot {} for {location} has an impossible creation time ({} s, {} ns)",
                snapsync_core::quote_snapshot(&self.volume, &self.snapshot.name),
                t.secs,
                t.nanos
            )));
        }
        Ok(())
    }

    /// Check that block `index` (of `block_size` bytes) lies inside the snapshot.
    pub fn check_index(&self, index: u64, block_size: u64) -> Result<()> {
        let blocks = self.snapshot.size.div_ceil(block_size.max(1));
        if index >= blocks {
            return Err(StoreError::invalid_argument(format!(
                "block {index} is past the end of snapshot {} ({blocks} blocks)",
                snapsync_core::quote_snapshot(&self.volume, &self.snapshot.name)
            )));
        }
        Ok(())
    }
}

/// The content of one block sent to a sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockContent {
    /// All zeros.
    Zero,
    /// A block the sink already has (it said so in [`Receiver::missing`]).
    Existing(BlockId),
    /// New data; `id` is BLAKE3 of `data`.
    Data {
        /// BLAKE3 of the plaintext. Sinks trust it: the engine computed it from `data`,
        /// and the server checks it before handing blocks from the network to a sink.
        id: BlockId,
        /// Plaintext, exactly the sink's block size. Shared bytes, so that a block can
        /// be a slice of the engine's read buffer or of a received request without a
        /// copy, and a sink may keep it (in a pack being filled) without copying either.
        data: Bytes,
        /// What the sender already knows about compressing this block.
        compressed: Compressed,
    },
}

/// Whether a block's sender already applied [`snapsync_core::codec::compress`] to it.
///
/// Compression policy is one function, so a sink that stores compressed blocks can trust
/// the sender's verdict instead of probing every block a second time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compressed {
    /// The sender did not try: the sink decides (a block straight from the engine).
    NotTried,
    /// The sender tried and compression does not pay for this block.
    NotWorthIt,
    /// The block as one zstd frame that decompresses to `data`.
    Zstd(Bytes),
}

impl Compressed {
    /// The zstd frame to store or send for `data` (this block's plaintext), or `None` to
    /// keep the plaintext: the sender's verdict where it has one, else the codec's.
    pub fn frame_for(&self, data: &[u8]) -> Option<Bytes> {
        match self {
            Compressed::Zstd(frame) => Some(frame.clone()),
            Compressed::NotWorthIt => None,
            Compressed::NotTried => snapsync_core::codec::compress(data).map(Bytes::from),
        }
    }

    /// The sender's verdict from [`snapsync_core::codec::compress`]'s result.
    pub fn from_attempt(frame: Option<Vec<u8>>) -> Self {
        match frame {
            Some(f) => Compressed::Zstd(f.into()),
            None => Compressed::NotWorthIt,
        }
    }
}

/// One block of the snapshot being received, by index in the sink's block size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IncomingBlock {
    /// Block index.
    pub index: u64,
    /// Its content.
    pub content: BlockContent,
}

/// One snapshot being received. Nothing is visible until [`Receiver::commit`]; dropping
/// the receiver abandons the snapshot (blocks already stored may be reused by a rerun).
///
/// A receiver trusts nothing it commits, whoever drives it (the engine in process, or a
/// peer over the network): every block index lies inside the snapshot, every
/// [`BlockContent::Existing`] id is held by the sink or was stored by this receive, the
/// snapshot's timestamp is valid ([`snapsync_core::Timestamp::is_valid`]), and a receive
/// that has had one refused request can no longer commit ([`Guarded`] does the last for
/// any receiver). The conformance suite holds every sink to these rules.
pub trait Receiver: Send {
    /// For each id, whether the sink lacks that block (so its data must be sent).
    fn missing(&mut self, ids: &[BlockId]) -> Result<Vec<bool>>;
    /// Announce that [`Receiver::missing`] will be asked about exactly `ids`, after
    /// whatever is written in between. A receiver whose answer takes a round trip asks
    /// now and returns `true`; the caller then has the time of one batch to spend before
    /// it asks (a network's latency is hidden behind storing the previous batch instead of
    /// adding to it). Blocks written in between still count as present in the answer.
    ///
    /// The default answers on the spot and returns `false`: nothing is gained by waiting.
    fn missing_ahead(&mut self, ids: &[BlockId]) -> bool {
        let _ = ids;
        false
    }
    /// Store blocks; returns the bytes added to the sink (after compression) by this
    /// call, or by earlier calls a pipelining receiver has finished since.
    ///
    /// A receiver may pipeline: accept a batch and return before it is stored, so the
    /// caller can prepare the next one while this one travels (the remote store does).
    /// Such a receiver reports a failed batch on a later call at the latest on
    /// [`Receiver::flush`]. Blocks a pending batch carries count as present in
    /// [`Receiver::missing`] answers, and later batches may refer to them as
    /// [`BlockContent::Existing`].
    fn write(&mut self, blocks: Vec<IncomingBlock>) -> Result<u64>;
    /// Wait until every batch given to [`Receiver::write`] is stored; returns the bytes
    /// they added that earlier `write` calls did not report yet.
    fn flush(&mut self) -> Result<u64> {
        Ok(0)
    }
    /// Make the snapshot and its hint visible, atomically.
    fn commit(self: Box<Self>) -> Result<CommitInfo>;
}

/// What a commit did to the destination's chain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitInfo {
    /// The next younger snapshot of the volume, when the new one was inserted into the
    /// middle of the chain (an older snapshot replicated after a newer one).
    pub inserted_before: Option<String>,
    /// Metadata entries of that younger snapshot made redundant by the insertion and
    /// removed when it was re-based onto the new one.
    pub redundant_entries_removed: u64,
}

/// A storage system that snapshots can be replicated to.
pub trait SnapshotSink: Store {
    /// The size of the blocks the sink stores; the engine sends whole blocks of it.
    fn block_size(&self) -> u64;
    /// What this destination holds of `source_volume` on `source_system`.
    fn hints(&self, source_system: &str, source_volume: &str) -> Result<Vec<Hint>>;
    /// Start receiving one snapshot.
    fn begin_receive(&self, request: ReceiveRequest) -> Result<Box<dyn Receiver + '_>>;
}
