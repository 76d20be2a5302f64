//! Any snapshot of any store as an NBD [`Export`]: reads through a bounded cache of
//! decoded chunks with read-ahead for sequential readers, and `base:allocation` from the
//! snapshot's own allocation map (its diff against nothing), so that `qemu-img convert`
//! and `qemu-img map` skip what is zero without reading it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use snapsync_store::{SnapshotReader, SnapshotSource, StoreError};

use crate::proto::{StatusExtent, STATE_HOLE, STATE_ZERO};
use crate::server::Export;

/// The unit of caching and of reads from the store.
pub const CHUNK: u64 = 256 << 10;
/// Chunks read at once when a reader is sequential.
const READ_AHEAD_CHUNKS: u64 = 8;
/// Descriptors in one block-status reply at most (the client asks again for the rest).
const MAX_STATUS_EXTENTS: usize = 4096;
/// The default cache size.
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;

/// One run of the allocation map: `[offset, offset + len)` in state `flags`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    offset: u64,
    len: u64,
    flags: u32,
}

/// A snapshot of a store, exported.
pub struct SnapshotExport<'s> {
    source: &'s dyn SnapshotSource,
    volume: String,
    snapshot: String,
    size: u64,
    /// Readers not in use; a read takes one (or opens one) and puts it back.
    readers: Mutex<Vec<Box<dyn SnapshotReader + 's>>>,
    cache: Mutex<Cache>,
    /// The allocation map, in offset order, covering the whole snapshot.
    runs: Vec<Run>,
    /// The chunk the last cache miss loaded, to see sequential readers.
    last_miss: AtomicU64,
}

impl std::fmt::Debug for SnapshotExport<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SnapshotExport({}@{})", self.volume, self.snapshot)
    }
}

#[derive(Default)]
struct Cache {
    chunks: HashMap<u64, (Arc<[u8]>, u64)>,
    tick: u64,
    bytes: u64,
    capacity: u64,
}

impl Cache {
    fn get(&mut self, chunk: u64) -> Option<Arc<[u8]>> {
        self.tick += 1;
        let tick = self.tick;
        self.chunks.get_mut(&chunk).map(|(data, used)| {
            *used = tick;
            data.clone()
        })
    }

    fn put(&mut self, chunk: u64, data: Arc<[u8]>) {
        self.tick += 1;
        self.bytes += data.len() as u64;
        if let Some((old, _)) = self.chunks.insert(chunk, (data, self.tick)) {
            self.bytes -= old.len() as u64;
        }
        while self.bytes > self.capacity && !self.chunks.is_empty() {
            // Least recently used; a scan is cheap at a few thousand chunks.
            let oldest = *self
                .chunks
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k)
                .expect("not empty");
            if let Some((old, _)) = self.chunks.remove(&oldest) {
                self.bytes -= old.len() as u64;
            }
        }
    }
}

impl<'s> SnapshotExport<'s> {
    /// Export `volume@snapshot` of `source`, caching at most `cache_bytes` of data.
    pub fn open(
        source: &'s dyn SnapshotSource,
        volume: &str,
        snapshot: &str,
        cache_bytes: u64,
    ) -> Result<Self, StoreError> {
        let info = source.snapshot_info(volume, snapshot)?;
        let allocation = source.diff(volume, snapshot, None)?;
        let runs = allocation_runs(
            info.size,
            allocation.data.as_slice().iter().map(|e| (e.offset, e.len)),
            allocation.zero.as_slice().iter().map(|e| (e.offset, e.len)),
        );
        let first = source.open_snapshot(volume, snapshot)?;
        Ok(Self {
            source,
            volume: volume.to_string(),
            snapshot: snapshot.to_string(),
            size: info.size,
            readers: Mutex::new(vec![first]),
            cache: Mutex::new(Cache {
                capacity: cache_bytes.max(CHUNK),
                ..Cache::default()
            }),
            runs,
            last_miss: AtomicU64::new(u64::MAX),
        })
    }

    /// Whether `[offset, offset + len)` is all zero by the allocation map.
    fn known_zero(&self, offset: u64, len: u64) -> bool {
        let end = offset + len;
        let mut i = self.run_index(offset);
        while let Some(run) = self.runs.get(i) {
            if run.offset >= end {
                return true;
            }
            if run.flags & STATE_ZERO == 0 {
                return false;
            }
            i += 1;
        }
        true
    }

    /// The index of the run holding `offset`.
    fn run_index(&self, offset: u64) -> usize {
        self.runs
            .partition_point(|r| r.offset + r.len <= offset)
            .min(self.runs.len())
    }

    /// Chunks `first..first + count` read from the store into the cache; returns the
    /// first.
    fn load(&self, first: u64, count: u64) -> Result<Arc<[u8]>, String> {
        let start = first * CHUNK;
        let end = ((first + count) * CHUNK).min(self.size);
        let mut buf = vec![0u8; (end - start) as usize];
        let reader = lock(&self.readers).pop();
        let mut reader = match reader {
            Some(r) => r,
            None => self
                .source
                .open_snapshot(&self.volume, &self.snapshot)
                .map_err(|e| e.to_string())?,
        };
        let read = reader.read_at(start, &mut buf);
        lock(&self.readers).push(reader);
        read.map_err(|e| e.to_string())?;
        let chunks: Vec<Arc<[u8]>> = buf.chunks(CHUNK as usize).map(Arc::from).collect();
        let mut cache = lock(&self.cache);
        for (k, data) in chunks.iter().enumerate() {
            cache.put(first + k as u64, data.clone());
        }
        Ok(chunks[0].clone())
    }

    /// One chunk, from the cache or the store (with read-ahead when sequential).
    fn chunk(&self, index: u64) -> Result<Arc<[u8]>, String> {
        if let Some(data) = lock(&self.cache).get(index) {
            return Ok(data);
        }
        let chunks = self.size.div_ceil(CHUNK);
        let sequential =
            self.last_miss.swap(index, Ordering::Relaxed) == index.wrapping_sub(1) || index == 0;
        // Read ahead no more than half the cache, so that what is read is still
        // there when the reader gets to it.
        let ahead = (lock(&self.cache).capacity / CHUNK / 2).clamp(1, READ_AHEAD_CHUNKS);
        let count = if sequential {
            ahead.min(chunks - index)
        } else {
            1
        };
        let data = self.load(index, count)?;
        if count > 1 {
            self.last_miss.store(index + count - 1, Ordering::Relaxed);
        }
        Ok(data)
    }
}

impl Export for SnapshotExport<'_> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos / CHUNK;
            let within = (pos % CHUNK) as usize;
            let n = (CHUNK as usize - within).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            if self.known_zero(pos, n as u64) {
                out.fill(0);
            } else {
                let data = self.chunk(index)?;
                out.copy_from_slice(&data[within..within + n]);
            }
            done += n;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u32) -> Result<Vec<StatusExtent>, String> {
        let end = offset + u64::from(len);
        let mut out: Vec<StatusExtent> = Vec::new();
        let mut i = self.run_index(offset);
        while let Some(run) = self.runs.get(i) {
            let from = run.offset.max(offset);
            let to = (run.offset + run.len).min(end);
            if from >= to || out.len() >= MAX_STATUS_EXTENTS {
                break;
            }
            out.push(StatusExtent {
                len: (to - from) as u32,
                flags: run.flags,
            });
            i += 1;
        }
        if out.is_empty() {
            return Err(format!("no allocation information at offset {offset}"));
        }
        Ok(out)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The allocation map of a snapshot of `size` bytes from its data and zero extents
/// (disjoint, sorted): data is state 0, zero extents and what neither covers (never
/// written) are holes that read as zero. Adjacent runs of one state are merged.
fn allocation_runs(
    size: u64,
    data: impl Iterator<Item = (u64, u64)>,
    zero: impl Iterator<Item = (u64, u64)>,
) -> Vec<Run> {
    let mut marks: Vec<(u64, u64, u32)> = data
        .map(|(o, l)| (o, l, 0))
        .chain(zero.map(|(o, l)| (o, l, STATE_HOLE | STATE_ZERO)))
        .collect();
    marks.sort_by_key(|m| m.0);
    let mut runs: Vec<Run> = Vec::new();
    let mut push = |offset: u64, len: u64, flags: u32| {
        if len == 0 {
            return;
        }
        match runs.last_mut() {
            Some(last) if last.flags == flags && last.offset + last.len == offset => {
                last.len += len
            }
            _ => runs.push(Run { offset, len, flags }),
        }
    };
    let mut pos = 0;
    for (offset, len, flags) in marks {
        let offset = offset.max(pos).min(size);
        let end = (offset + len).min(size);
        push(pos, offset - pos, STATE_HOLE | STATE_ZERO);
        push(offset, end.saturating_sub(offset), flags);
        pos = pos.max(end);
    }
    push(pos, size - pos, STATE_HOLE | STATE_ZERO);
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u32 = STATE_HOLE | STATE_ZERO;

    #[test]
    fn the_allocation_map_covers_the_snapshot_and_merges_runs() {
        let runs = allocation_runs(
            100,
            [(10, 10), (20, 5), (60, 50)].into_iter(),
            [(30, 10)].into_iter(),
        );
        assert_eq!(
            runs,
            [
                Run {
                    offset: 0,
                    len: 10,
                    flags: H
                },
                Run {
                    offset: 10,
                    len: 15,
                    flags: 0
                },
                Run {
                    offset: 25,
                    len: 35,
                    flags: H
                },
                Run {
                    offset: 60,
                    len: 40,
                    flags: 0
                },
            ]
        );
        assert_eq!(
            allocation_runs(8, std::iter::empty(), std::iter::empty()),
            [Run {
                offset: 0,
                len: 8,
                flags: H
            }]
        );
    }

    #[test]
    fn the_cache_keeps_at_most_its_capacity_evicting_the_least_recent() {
        let mut c = Cache {
            capacity: 3 * CHUNK,
            ..Cache::default()
        };
        let chunk = |b: u8| Arc::<[u8]>::from(vec![b; CHUNK as usize]);
        for k in 0..3 {
            c.put(k, chunk(k as u8));
        }
        assert!(c.get(0).is_some());
        c.put(3, chunk(3));
        assert!(c.bytes <= c.capacity);
        assert!(c.get(1).is_none(), "the least recently used went");
        assert!(c.get(0).is_some() && c.get(2).is_some() && c.get(3).is_some());
    }
}
