//! A run's source and destinations, wrapped so that the engine, which knows nothing of
//! timeouts or bandwidth, is held to both: every read and write first checks the run's
//! [`Cancel`], every write's bytes go through the [`Limits`], and a cancelled snapshot is
//! never committed. The engine is used as it is; nothing in it changes for the daemon.

use std::sync::atomic::{AtomicU64, Ordering};

use snapsync_core::{BlockId, Hint, SnapshotInfo, VolumeInfo};
use snapsync_store::{
    CommitInfo, Compressed, Diff, IncomingBlock, Phase, Progress, ReceiveRequest, Receiver, Result,
    Skipped, SnapshotReader, SnapshotRef, SnapshotSink, SnapshotSource, Store,
};

use crate::limit::{Cancel, Limits};

/// Bytes a run has moved so far, for status while it runs.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes of snapshots read and processed.
    pub done: AtomicU64,
    /// Bytes stored or sent to destinations.
    pub sent: AtomicU64,
}

/// A source whose reads stop when the run is cancelled.
pub struct GuardedSource<'a> {
    pub(crate) inner: &'a dyn SnapshotSource,
    pub(crate) cancel: &'a Cancel,
}

impl Store for GuardedSource<'_> {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn system_id(&self) -> Result<String> {
        self.inner.system_id()
    }
    fn list(&self) -> Result<Vec<VolumeInfo>> {
        self.cancel.check()?;
        self.inner.list()
    }
    fn skipped(&self) -> Result<Vec<Skipped>> {
        self.inner.skipped()
    }
    fn volume(&self, volume: &str) -> Result<VolumeInfo> {
        self.inner.volume(volume)
    }
    fn snapshot_info(&self, volume: &str, snapshot: &str) -> Result<SnapshotInfo> {
        self.inner.snapshot_info(volume, snapshot)
    }
}

impl SnapshotSource for GuardedSource<'_> {
    fn diff(&self, volume: &str, target: &str, base: Option<SnapshotRef<'_>>) -> Result<Diff> {
        self.cancel.check()?;
        self.inner.diff(volume, target, base)
    }
    fn estimate_diff(&self, volume: &str, target: &str, base: SnapshotRef<'_>) -> Option<u64> {
        self.inner.estimate_diff(volume, target, base)
    }
    fn open_snapshot(&self, volume: &str, snapshot: &str) -> Result<Box<dyn SnapshotReader + '_>> {
        self.cancel.check()?;
        Ok(Box::new(GuardedReader {
            inner: self.inner.open_snapshot(volume, snapshot)?,
            cancel: self.cancel,
        }))
    }
    fn local_files(&self, volume: &str, snapshot: &str) -> Result<Vec<std::path::PathBuf>> {
        self.inner.local_files(volume, snapshot)
    }
}

struct GuardedReader<'a> {
    inner: Box<dyn SnapshotReader + 'a>,
    cancel: &'a Cancel,
}

impl SnapshotReader for GuardedReader<'_> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.cancel.check()?;
        self.inner.read_at(offset, buf)
    }
    fn read_blocks_at(
        &mut self,
        offset: u64,
        buf: &mut [u8],
        block_size: u64,
    ) -> Result<Vec<Compressed>> {
        self.cancel.check()?;
        self.inner.read_blocks_at(offset, buf, block_size)
    }
    fn observe_block(&mut self, offset: u64, len: usize, id: &BlockId) {
        self.inner.observe_block(offset, len, id);
    }
    fn finish(self: Box<Self>) -> Result<()> {
        self.cancel.check()?;
        self.inner.finish()
    }
}

/// A destination whose writes are limited and stop when the run is cancelled.
pub struct GuardedSink<'a> {
    pub(crate) inner: &'a dyn SnapshotSink,
    pub(crate) cancel: &'a Cancel,
    pub(crate) limits: &'a Limits,
    pub(crate) counters: &'a Counters,
}

impl Store for GuardedSink<'_> {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn system_id(&self) -> Result<String> {
        self.inner.system_id()
    }
    fn list(&self) -> Result<Vec<VolumeInfo>> {
        self.cancel.check()?;
        self.inner.list()
    }
    fn skipped(&self) -> Result<Vec<Skipped>> {
        self.inner.skipped()
    }
    fn volume(&self, volume: &str) -> Result<VolumeInfo> {
        self.inner.volume(volume)
    }
    fn snapshot_info(&self, volume: &str, snapshot: &str) -> Result<SnapshotInfo> {
        self.inner.snapshot_info(volume, snapshot)
    }
}

impl SnapshotSink for GuardedSink<'_> {
    fn block_size(&self) -> u64 {
        self.inner.block_size()
    }
    fn hints(&self, source_system: &str, source_volume: &str) -> Result<Vec<Hint>> {
        self.inner.hints(source_system, source_volume)
    }
    fn begin_receive(&self, request: ReceiveRequest) -> Result<Box<dyn Receiver + '_>> {
        self.cancel.check()?;
        Ok(Box::new(GuardedReceiver {
            inner: self.inner.begin_receive(request)?,
            sink: self,
        }))
    }
}

struct GuardedReceiver<'a> {
    inner: Box<dyn Receiver + 'a>,
    sink: &'a GuardedSink<'a>,
}

impl GuardedReceiver<'_> {
    /// Count and pay for bytes the destination just took.
    fn sent(&self, bytes: u64) -> Result<u64> {
        self.sink.counters.sent.fetch_add(bytes, Ordering::Relaxed);
        self.sink.limits.charge(bytes, self.sink.cancel)?;
        Ok(bytes)
    }
}

impl Receiver for GuardedReceiver<'_> {
    fn missing(&mut self, ids: &[BlockId]) -> Result<Vec<bool>> {
        self.sink.cancel.check()?;
        self.inner.missing(ids)
    }
    fn missing_ahead(&mut self, ids: &[BlockId]) -> bool {
        self.inner.missing_ahead(ids)
    }
    fn write(&mut self, blocks: Vec<IncomingBlock>) -> Result<u64> {
        self.sink.cancel.check()?;
        let bytes = self.inner.write(blocks)?;
        self.sent(bytes)
    }
    fn flush(&mut self) -> Result<u64> {
        self.sink.cancel.check()?;
        let bytes = self.inner.flush()?;
        self.sent(bytes)
    }
    /// Not once cancelled: the snapshot is abandoned instead (dropping the inner
    /// receiver), so a cancelled run commits nothing it had not committed already.
    fn commit(self: Box<Self>) -> Result<CommitInfo> {
        self.sink.cancel.check()?;
        self.inner.commit()
    }
}

/// Counts the bytes a run has processed, for status while it runs.
#[derive(Debug)]
pub struct CountingProgress<'a>(pub &'a Counters);

impl Progress for CountingProgress<'_> {
    fn start(&self, _phase: Phase<'_>, _total_bytes: u64) {}
    fn advance(&self, bytes: u64) {
        self.0.done.fetch_add(bytes, Ordering::Relaxed);
    }
    fn finish(&self) {}
}
