//! A running QEMU (or qemu-storage-daemon) as a snapshot source: its disk nodes are the
//! volumes, snapsync's checkpoints on them the snapshots.
//!
//! A checkpoint's data exists only while it is being taken (QEMU keeps the point in time
//! in a fleecing overlay for as long as snapsync reads it), so a replication first
//! [`QemuSource::take_checkpoints`], then reads that checkpoint, and [`QemuSource::finish`]
//! removes what it added. Older checkpoints stay as bitmaps: they are what a destination
//! that holds one is diffed against, and are listed (but cannot be read).
//!
//! Diffs come from the bitmaps: the changes since checkpoint X are the union of the
//! bitmaps of X and every later checkpoint, read as `qemu:dirty-bitmap:` block status
//! of the export. A checkpoint whose bitmap is missing (a VM restarted with transient
//! bitmaps) is no longer listed, so a destination holding it has no common base with
//! the source and gets a full read; one marked inconsistent (after a crash) is never
//! trusted: its diffs report everything.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use snapsync_core::{Extent, ExtentList, SnapshotId, SnapshotInfo, Timestamp, VolumeInfo};
use snapsync_nbd::proto::{BASE_ALLOCATION, STATE_HOLE, STATE_ZERO};
use snapsync_nbd::Client;
use snapsync_store::{
    Diff, DiffMethod, Result, SnapshotReader, SnapshotRef, SnapshotSource, Store, StoreError,
};

use crate::checkpoint::{nodes, Node, Session};
use crate::qmp::{Qmp, QmpError};

/// Checkpoints kept per node after a replication, by default.
pub const DEFAULT_KEEP_CHECKPOINTS: usize = 8;

/// How a [`QemuSource`] works.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct QemuOptions {
    /// The unix socket of an NBD server the process already runs (QEMU runs one at
    /// most); without it, snapsync starts one for the session and stops it after.
    pub nbd_socket: Option<PathBuf>,
    /// Where the fleecing overlays live while a checkpoint is read.
    pub scratch: PathBuf,
    /// Checkpoints kept per node.
    pub keep_checkpoints: usize,
}

impl Default for QemuOptions {
    fn default() -> Self {
        Self {
            nbd_socket: None,
            scratch: std::env::temp_dir(),
            keep_checkpoints: DEFAULT_KEEP_CHECKPOINTS,
        }
    }
}

impl QemuOptions {
    /// Set [`QemuOptions::nbd_socket`].
    pub fn with_nbd_socket(mut self, socket: Option<PathBuf>) -> Self {
        self.nbd_socket = socket;
        self
    }
}

/// A checkpoint taken in this session, readable through its export.
#[derive(Debug, Clone)]
struct Taken {
    info: SnapshotInfo,
    export: String,
    socket: PathBuf,
}

/// Interrupts a running replication from another thread (a signal handler's): every
/// NBD connection of the source is shut down, so its reads fail at once and the run
/// ends through its error path, which removes what it added to the VM.
#[derive(Clone, Debug, Default)]
pub struct Interrupter(std::sync::Arc<Mutex<InterruptState>>);

#[derive(Debug, Default)]
struct InterruptState {
    interrupted: bool,
    sockets: Vec<std::os::unix::net::UnixStream>,
}

impl Interrupter {
    /// Interrupt: shut every connection down, and refuse new ones.
    pub fn interrupt(&self) {
        let mut st = self.0.lock().unwrap_or_else(|p| p.into_inner());
        st.interrupted = true;
        for s in st.sockets.drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn check(&self) -> Result<()> {
        if self.0.lock().unwrap_or_else(|p| p.into_inner()).interrupted {
            return Err(StoreError::Conflict {
                what: "the replication was interrupted".into(),
            });
        }
        Ok(())
    }

    fn keep(&self, socket: std::os::unix::net::UnixStream) {
        let mut st = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if st.interrupted {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        } else {
            st.sockets.push(socket);
        }
    }

    fn connect(&self, socket: &Path, export: &str, contexts: &[&str]) -> Result<Client> {
        self.check()?;
        Client::connect_unix_with(socket, export, contexts, |s| self.keep(s)).map_err(nbd_err)
    }
}

/// A running QEMU's disks.
#[derive(Debug)]
pub struct QemuSource {
    socket: PathBuf,
    system: String,
    options: QemuOptions,
    session: Mutex<Option<Session>>,
    /// This QEMU process's scratch directory (overlays of the session); removed when a
    /// session finishes and leaves it empty.
    scratch: PathBuf,
    nodes: Vec<Node>,
    taken: HashMap<String, Taken>,
    interrupter: Interrupter,
}

fn qmp_err(e: QmpError) -> StoreError {
    StoreError::Backend {
        context: "QEMU".into(),
        source: Box::new(e),
    }
}

fn nbd_err(e: snapsync_nbd::NbdError) -> StoreError {
    StoreError::Backend {
        context: "reading a checkpoint over NBD".into(),
        source: Box::new(e),
    }
}

impl QemuSource {
    /// Connect to the QMP socket at `socket` and list its disks.
    pub fn open(socket: &Path, options: QemuOptions) -> Result<Self> {
        let mut qmp = Qmp::connect(socket).map_err(qmp_err)?;
        let nodes = nodes(&mut qmp).map_err(qmp_err)?;
        let canonical = std::fs::canonicalize(socket).unwrap_or_else(|_| socket.to_path_buf());
        // One scratch directory per QEMU process: what a session finds there is its
        // own leftovers, never another VM's overlays.
        let scratch = options.scratch.join(format!(
            "snapsync-qemu{}",
            canonical.display().to_string().replace('/', "_")
        ));
        std::fs::create_dir_all(&scratch)
            .map_err(|e| StoreError::io(format!("create {}", scratch.display()), e))?;
        let session =
            Session::start(qmp, &scratch, options.nbd_socket.as_deref()).map_err(qmp_err)?;
        Ok(Self {
            socket: socket.to_path_buf(),
            system: format!("qemu:{}", canonical.display()),
            options,
            session: Mutex::new(Some(session)),
            scratch,
            nodes,
            taken: HashMap::new(),
            interrupter: Interrupter::default(),
        })
    }

    fn info(&self, node: &str, name: &str, created: (i64, u32)) -> SnapshotInfo {
        let created = Timestamp::new(created.0, created.1);
        SnapshotInfo {
            name: name.to_string(),
            id: SnapshotId::derive(&self.system, node, name, created),
            created,
            size: self.node(node).map_or(0, |n| n.size),
        }
    }

    fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Take checkpoint `name` (aged `created`) of each of `volumes` (every disk when
    /// empty), exporting each frozen view with the bitmaps of every older checkpoint.
    pub fn take_checkpoints(
        &mut self,
        volumes: &[String],
        name: &str,
        created: Timestamp,
    ) -> Result<()> {
        snapsync_core::validate_name("snapshot", name)?;
        let selected: Vec<Node> = self
            .nodes
            .iter()
            .filter(|n| volumes.is_empty() || volumes.contains(&n.name))
            .cloned()
            .collect();
        if let Some(missing) = volumes.iter().find(|v| self.node(v).is_none()) {
            return Err(StoreError::not_found(format!(
                "disk node {missing:?} in {}",
                self.location()
            )));
        }
        let mut guard = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let session = guard.as_mut().expect("a session until finish");
        for node in selected {
            if node.checkpoints.iter().any(|c| c.name == name) {
                return Err(StoreError::AlreadyExists {
                    what: format!("checkpoint {name:?} of {:?}", node.name),
                });
            }
            let at = (created.secs, created.nanos);
            let frozen = session.take(&node, name, at, None).map_err(qmp_err)?;
            let (export, socket) = (frozen.export.clone(), frozen.socket.clone());
            let info = self.info(&node.name, name, at);
            self.taken.insert(
                node.name.clone(),
                Taken {
                    info,
                    export,
                    socket,
                },
            );
        }
        Ok(())
    }

    /// A handle that interrupts this source's reads from another thread.
    pub fn interrupter(&self) -> Interrupter {
        self.interrupter.clone()
    }

    /// Keep only the newest `keep` checkpoints per disk when finishing (at least 1: the
    /// one just taken is the next run's base).
    pub fn set_keep_checkpoints(&mut self, keep: usize) {
        self.options.keep_checkpoints = keep.max(1);
    }

    /// Remove what the session added, and old checkpoints beyond the number to keep.
    pub fn finish(&mut self) -> Result<()> {
        let session = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(s) = session {
            s.finish(self.options.keep_checkpoints).map_err(qmp_err)?;
            // Only when empty: leftovers of a killed session stay for the next one.
            let _ = std::fs::remove_dir(&self.scratch);
        }
        self.taken.clear();
        Ok(())
    }

    fn taken(&self, volume: &str, snapshot: &str) -> Result<&Taken> {
        match self.taken.get(volume) {
            Some(t) if t.info.name == snapshot => Ok(t),
            _ => Err(StoreError::Unsupported {
                what: format!(
                    "reading checkpoint {} of {}: a checkpoint's data is readable only while it is taken (replicate takes one)",
                    snapsync_core::quote_snapshot(volume, snapshot),
                    self.location()
                ),
            }),
        }
    }

    /// The checkpoints of `volume` from `base` on (their bitmaps' contexts), or `None`
    /// when one of them cannot be trusted.
    fn changed_contexts(&self, volume: &str, base: &str) -> Option<Vec<String>> {
        let node = self.node(volume)?;
        let from = node.checkpoints.iter().position(|c| c.name == base)?;
        let since = &node.checkpoints[from..];
        if since.iter().any(|c| c.inconsistent) {
            return None;
        }
        Some(
            since
                .iter()
                .map(|c| format!("qemu:dirty-bitmap:{}", c.bitmap))
                .collect(),
        )
    }
}

impl Drop for QemuSource {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

impl Store for QemuSource {
    fn location(&self) -> String {
        format!("qemu://{}", self.socket.display())
    }

    fn system_id(&self) -> Result<String> {
        Ok(self.system.clone())
    }

    fn list(&self) -> Result<Vec<VolumeInfo>> {
        Ok(self
            .nodes
            .iter()
            .map(|n| {
                // An inconsistent checkpoint (QEMU was killed while its bitmap was
                // recording) is not a point anyone can diff against: not listed, so a
                // destination holding it gets a full read (sending only what it lacks).
                let mut snapshots: Vec<SnapshotInfo> = n
                    .checkpoints
                    .iter()
                    .filter(|c| !c.inconsistent)
                    .map(|c| self.info(&n.name, &c.name, c.created))
                    .collect();
                if let Some(t) = self.taken.get(&n.name) {
                    snapshots.push(t.info.clone());
                }
                snapshots.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
                VolumeInfo {
                    name: n.name.clone(),
                    size: n.size,
                    snapshots,
                    origin: None,
                }
            })
            .collect())
    }
}

impl SnapshotSource for QemuSource {
    fn diff(&self, volume: &str, target: &str, base: Option<SnapshotRef<'_>>) -> Result<Diff> {
        let taken = self.taken(volume, target)?;
        let size = taken.info.size;
        let contexts = match base {
            Some(b) if b.volume == volume => self.changed_contexts(volume, b.snapshot),
            _ => None,
        };
        let mut wanted: Vec<&str> = vec![BASE_ALLOCATION];
        if let Some(c) = &contexts {
            wanted.extend(c.iter().map(String::as_str));
        }
        let mut client = self
            .interrupter
            .connect(&taken.socket, &taken.export, &wanted)?;
        let mut data = ExtentList::new();
        let mut zero = ExtentList::new();
        match &contexts {
            Some(contexts) => {
                // Changed since the base: the union of the bitmaps; what of it reads as
                // zero now is zero.
                for c in contexts {
                    for s in client.block_status(c, 0, size).map_err(nbd_err)? {
                        if s.flags & 1 != 0 {
                            data.push(Extent::new(s.offset, s.len));
                        }
                    }
                }
                let changed = data;
                let mut zeros = ExtentList::new();
                for s in client
                    .block_status(BASE_ALLOCATION, 0, size)
                    .map_err(nbd_err)?
                {
                    if s.flags & STATE_ZERO != 0 {
                        zeros.push(Extent::new(s.offset, s.len));
                    }
                }
                zero = changed.subtract(&changed.subtract(&zeros));
                data = changed.subtract(&zero);
            }
            None => {
                for s in client
                    .block_status(BASE_ALLOCATION, 0, size)
                    .map_err(nbd_err)?
                {
                    let e = Extent::new(s.offset, s.len);
                    if s.flags & STATE_ZERO != 0 {
                        zero.push(e);
                    } else if s.flags & STATE_HOLE == 0 || base.is_some() {
                        data.push(e);
                    }
                }
            }
        }
        let _ = client.disconnect();
        // From the bitmaps when a trusted base was given; else from the export's
        // allocation, everything with data counting as changed.
        let method = match (&contexts, base) {
            (Some(_), _) => DiffMethod::Bitmap,
            (None, Some(_)) => DiffMethod::Full,
            (None, None) => DiffMethod::Metadata,
        };
        Ok(Diff { data, zero, method })
    }

    fn open_snapshot(&self, volume: &str, snapshot: &str) -> Result<Box<dyn SnapshotReader + '_>> {
        let taken = self.taken(volume, snapshot)?;
        let client = self
            .interrupter
            .connect(&taken.socket, &taken.export, &[])?;
        Ok(Box::new(NbdReader {
            client,
            size: taken.info.size,
            interrupter: self.interrupter.clone(),
        }))
    }
}

/// Reads a checkpoint's export.
struct NbdReader {
    client: Client,
    size: u64,
    /// Why a read failed, when it failed because the run was interrupted.
    interrupter: Interrupter,
}

/// The largest read sent as one request (QEMU's limit is 32 MiB). An engine batch is cut
/// into requests of this size, up to 16 in flight, which QEMU's NBD server answers in
/// parallel: measured on a 512 MiB full replication (dev build), 1 MiB pieces took
/// 1.15-1.46 s where whole 8 MiB requests took 1.54-1.57 s.
const MAX_READ: usize = 1 << 20;

impl SnapshotReader for NbdReader {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let avail = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (inside, past) = buf.split_at_mut(avail);
        past.fill(0);
        let mut pieces: Vec<(u64, &mut [u8])> = inside
            .chunks_mut(MAX_READ)
            .enumerate()
            .map(|(i, b)| (offset + (i * MAX_READ) as u64, b))
            .collect();
        match self.client.read_many(&mut pieces) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.interrupter.check()?;
                Err(nbd_err(e))
            }
        }
    }
}
