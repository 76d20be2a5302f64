//! A store that keeps everything in memory.
//!
//! It is both the reference implementation of the trait family (the conformance suite
//! runs against it first) and the model in engine tests: simple enough to be obviously
//! right, so other stores are checked against it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use snapsync_core::{
    BlockId, Extent, Hint, Origin, SnapshotId, SnapshotInfo, Timestamp, VolumeInfo,
};

use crate::{
    BlockContent, CommitInfo, Compressed, Diff, Guarded, IncomingBlock, ReceiveRequest, Receiver,
    Result, SnapshotReader, SnapshotRef, SnapshotSink, SnapshotSource, Store, StoreError,
};

#[derive(Debug, Default)]
struct MemVolume {
    snapshots: Vec<(SnapshotInfo, Arc<Vec<u8>>)>,
    origin: Option<Origin>,
}

#[derive(Debug, Default)]
struct State {
    volumes: BTreeMap<String, MemVolume>,
    blocks: HashMap<BlockId, Arc<Vec<u8>>>,
    hints: BTreeMap<(String, String), Vec<Hint>>,
}

/// An in-memory store; clones share the same state.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    name: String,
    block_size: u64,
    state: Arc<Mutex<State>>,
}

impl MemoryStore {
    /// A new empty store named `name` (its system id) with the given block size.
    pub fn new(name: &str, block_size: u64) -> Self {
        Self {
            name: name.to_string(),
            block_size,
            state: Arc::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Add a snapshot taken here (identity derived from this store).
    pub fn add_snapshot(&self, volume: &str, name: &str, created: Timestamp, content: Vec<u8>) {
        let info = SnapshotInfo {
            name: name.to_string(),
            id: SnapshotId::derive(&self.name, volume, name, created),
            created,
            size: content.len() as u64,
        };
        self.insert(volume, info, Arc::new(content));
    }

    /// Make `volume` a clone of `origin` (its lineage), as a clone taken here would be.
    pub fn set_origin(&self, volume: &str, origin: Origin) {
        self.state()
            .volumes
            .entry(volume.to_string())
            .or_default()
            .origin = Some(origin);
    }

    /// Add every snapshot of a conformance fixture, taken here.
    #[cfg(feature = "conformance")]
    pub fn add_fixture(&self, fixture: &crate::conformance::Fixture) {
        for v in &fixture.volumes {
            for s in &v.snapshots {
                self.add_snapshot(&v.name, &s.name, s.created, s.content.clone());
            }
        }
    }

    /// Remove a snapshot, as a user deleting it at the source would.
    pub fn remove_snapshot(&self, volume: &str, name: &str) {
        if let Some(v) = self.state().volumes.get_mut(volume) {
            v.snapshots.retain(|(s, _)| s.name != name);
        }
    }

    /// The content of a snapshot.
    pub fn content(&self, volume: &str, name: &str) -> Option<Arc<Vec<u8>>> {
        let st = self.state();
        let v = st.volumes.get(volume)?;
        v.snapshots
            .iter()
            .find(|(s, _)| s.name == name)
            .map(|(_, c)| c.clone())
    }

    fn insert(&self, volume: &str, info: SnapshotInfo, content: Arc<Vec<u8>>) {
        let mut st = self.state();
        let v = st.volumes.entry(volume.to_string()).or_default();
        v.snapshots.retain(|(s, _)| s.name != info.name);
        v.snapshots.push((info, content));
        v.snapshots
            .sort_by(|a, b| (a.0.created, &a.0.name).cmp(&(b.0.created, &b.0.name)));
    }

    fn lookup(&self, volume: &str, snapshot: &str) -> Result<Arc<Vec<u8>>> {
        self.content(volume, snapshot).ok_or_else(|| {
            StoreError::not_found(format!(
                "snapshot {} in {}",
                snapsync_core::quote_snapshot(volume, snapshot),
                self.location()
            ))
        })
    }
}

impl Store for MemoryStore {
    fn location(&self) -> String {
        format!("mem:{}", self.name)
    }

    fn system_id(&self) -> Result<String> {
        Ok(format!("mem:{}", self.name))
    }

    fn list(&self) -> Result<Vec<VolumeInfo>> {
        let st = self.state();
        Ok(st
            .volumes
            .iter()
            .filter(|(_, v)| !v.snapshots.is_empty())
            .map(|(name, v)| VolumeInfo {
                name: name.clone(),
                size: v.snapshots.last().map_or(0, |s| s.0.size),
                snapshots: v.snapshots.iter().map(|(s, _)| s.clone()).collect(),
                origin: v.origin.clone(),
            })
            .collect())
    }
}

/// Compare two byte images block by block (the base zero-extended or cut to the
/// target's length) and report changed blocks as data or zero.
pub fn diff_contents(target: &[u8], base: Option<&[u8]>, block_size: u64) -> Diff {
    let bs = block_size as usize;
    let mut diff = Diff::default();
    for (i, chunk) in target.chunks(bs).enumerate() {
        let off = i * bs;
        let is_zero = chunk.iter().all(|b| *b == 0);
        let changed = match base {
            None => true,
            Some(b) => {
                let end = (off + chunk.len()).min(b.len());
                let old = if off < b.len() { &b[off..end] } else { &[][..] };
                old != &chunk[..old.len()] || chunk[old.len()..].iter().any(|x| *x != 0)
            }
        };
        if changed {
            let e = Extent::new(off as u64, chunk.len() as u64);
            if is_zero {
                diff.zero.push(e);
            } else {
                diff.data.push(e);
            }
        }
    }
    diff
}

impl SnapshotSource for MemoryStore {
    fn diff(&self, volume: &str, target: &str, base: Option<SnapshotRef<'_>>) -> Result<Diff> {
        let t = self.lookup(volume, target)?;
        let b = base
            .map(|b| self.lookup(b.volume, b.snapshot))
            .transpose()?;
        Ok(diff_contents(
            &t,
            b.as_ref().map(|b| b.as_slice()),
            self.block_size,
        ))
    }

    fn open_snapshot(&self, volume: &str, snapshot: &str) -> Result<Box<dyn SnapshotReader + '_>> {
        Ok(Box::new(MemReader(self.lookup(volume, snapshot)?)))
    }
}

struct MemReader(Arc<Vec<u8>>);

impl SnapshotReader for MemReader {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        read_padded(&self.0, offset, buf);
        Ok(())
    }
}

/// Copy `src[offset..]` into `buf`, zero-filling past the end of `src`.
pub fn read_padded(src: &[u8], offset: u64, buf: &mut [u8]) {
    buf.fill(0);
    if let Ok(off) = usize::try_from(offset) {
        if off < src.len() {
            let n = buf.len().min(src.len() - off);
            buf[..n].copy_from_slice(&src[off..off + n]);
        }
    }
}

impl SnapshotSink for MemoryStore {
    fn block_size(&self) -> u64 {
        self.block_size
    }

    fn hints(&self, source_system: &str, source_volume: &str) -> Result<Vec<Hint>> {
        Ok(self
            .state()
            .hints
            .get(&(source_system.to_string(), source_volume.to_string()))
            .cloned()
            .unwrap_or_default())
    }

    fn begin_receive(&self, request: ReceiveRequest) -> Result<Box<dyn Receiver + '_>> {
        request.validate(&self.location())?;
        if self
            .content(&request.volume, &request.snapshot.name)
            .is_some()
        {
            return Err(StoreError::AlreadyExists {
                what: format!(
                    "snapshot {} in {}",
                    snapsync_core::quote_snapshot(&request.volume, &request.snapshot.name),
                    self.location()
                ),
            });
        }
        let mut content = match &request.base {
            Some(b) => self.lookup(&b.volume, &b.snapshot)?.as_ref().clone(),
            None => Vec::new(),
        };
        let size = usize::try_from(request.snapshot.size).map_err(|_| StoreError::Unsupported {
            what: "huge volume in memory".into(),
        })?;
        content.resize(size, 0);
        Ok(Box::new(Guarded::new(MemReceiver {
            store: self,
            request,
            content,
            pending: HashMap::new(),
        })))
    }
}

struct MemReceiver<'a> {
    store: &'a MemoryStore,
    request: ReceiveRequest,
    content: Vec<u8>,
    pending: HashMap<BlockId, Arc<Vec<u8>>>,
}

impl MemReceiver<'_> {
    fn put(&mut self, index: u64, data: &[u8]) {
        let bs = self.store.block_size as usize;
        let off = index as usize * bs;
        if off >= self.content.len() {
            return;
        }
        let n = (self.content.len() - off).min(data.len());
        self.content[off..off + n].copy_from_slice(&data[..n]);
    }
}

impl Receiver for MemReceiver<'_> {
    fn missing(&mut self, ids: &[BlockId]) -> Result<Vec<bool>> {
        let st = self.store.state();
        Ok(ids
            .iter()
            .map(|id| !st.blocks.contains_key(id) && !self.pending.contains_key(id))
            .collect())
    }

    fn write(&mut self, blocks: Vec<IncomingBlock>) -> Result<u64> {
        let bs = self.store.block_size as usize;
        let mut added = 0;
        for b in blocks {
            self.request.check_index(b.index, bs as u64)?;
            match b.content {
                BlockContent::Zero => self.put(b.index, &vec![0; bs]),
                BlockContent::Existing(id) => {
                    let data = self
                        .pending
                        .get(&id)
                        .cloned()
                        .or_else(|| self.store.state().blocks.get(&id).cloned())
                        .ok_or_else(|| {
                            StoreError::invalid_argument(format!(
                                "block {} names block {id}, which {} does not hold",
                                b.index,
                                self.store.location()
                            ))
                        })?;
                    self.put(b.index, &data);
                }
                BlockContent::Data {
                    id,
                    data,
                    compressed,
                } => {
                    // The reference store checks what real sinks trust, so that tests
                    // catch an engine that sends a block under a wrong id or a frame
                    // that is not the block.
                    if BlockId::of(&data) != id {
                        return Err(StoreError::corrupt(
                            format!("block {} received", b.index),
                            "data does not match its id",
                        ));
                    }
                    if let Compressed::Zstd(frame) = &compressed {
                        let plain = snapsync_core::codec::decompress(frame, data.len());
                        if plain.as_deref().ok() != Some(&data[..]) {
                            return Err(StoreError::corrupt(
                                format!("block {} received", b.index),
                                "its zstd frame does not decompress to its data",
                            ));
                        }
                    }
                    self.put(b.index, &data);
                    if let std::collections::hash_map::Entry::Vacant(e) = self.pending.entry(id) {
                        added += data.len() as u64;
                        e.insert(Arc::new(data.to_vec()));
                    }
                }
            }
        }
        Ok(added)
    }

    fn commit(self: Box<Self>) -> Result<CommitInfo> {
        let r = self.request;
        let inserted_before = self
            .store
            .list()?
            .into_iter()
            .find(|v| v.name == r.volume)
            .and_then(|v| {
                v.snapshots
                    .into_iter()
                    .filter(|s| (s.created, &s.name) > (r.snapshot.created, &r.snapshot.name))
                    .min_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)))
            })
            .map(|s| s.name);
        {
            let mut st = self.store.state();
            st.blocks.extend(self.pending);
            let key = (r.source_system.clone(), r.source_volume.clone());
            let hints = st.hints.entry(key).or_default();
            hints.retain(|h| h.id != r.snapshot.id);
            hints.push(Hint {
                source_snapshot: r.source_snapshot.clone(),
                id: r.snapshot.id,
                created: r.snapshot.created,
                local_volume: r.volume.clone(),
                local_snapshot: r.snapshot.name.clone(),
            });
            if let Some(o) = &r.origin {
                st.volumes.entry(r.volume.clone()).or_default().origin = Some(o.clone());
            }
        }
        self.store
            .insert(&r.volume, r.snapshot, Arc::new(self.content));
        Ok(CommitInfo {
            inserted_before,
            redundant_entries_removed: 0,
        })
    }
}
