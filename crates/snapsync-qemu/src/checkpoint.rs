//! Checkpoints of a running VM's disks, QEMU's way (docs/interop/bitmaps.rst and the
//! incremental-backup iotests):
//!
//! - a checkpoint is a dirty bitmap on the disk's node, named
//!   `snapsync.<secs>.<nanos>.<name>` so that its age survives in QEMU itself; it records
//!   what the guest writes from the moment it is made until the next checkpoint, when it
//!   is disabled;
//! - taking one is a single QMP `transaction`: the new bitmap, the previous one disabled,
//!   and a fleecing job (`blockdev-backup sync=none` into a scratch qcow2 overlay whose
//!   backing is the disk), so the overlay shows the disk as it was at that instant while
//!   the guest goes on writing;
//! - the frozen view is exported read-only by QEMU's own NBD server with one merged,
//!   disabled bitmap: the union of the checkpoints from the base on, i.e. what changed
//!   since the base; snapsync reads it with [`snapsync_nbd::Client`];
//! - everything else it added (the export, the job, the overlay node and file, the merged
//!   bitmap, the NBD server if it started it) is removed afterwards, on error too, and a
//!   later session removes what a killed one left ([`Session::remove_leftovers`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tracing::{debug, warn};

use crate::qmp::{Qmp, QmpError};

/// Bitmaps whose names start with this are snapsync's checkpoints.
pub const BITMAP_PREFIX: &str = "snapsync.";
/// Node names, job ids, export names and bitmaps snapsync adds for a session start
/// with this; a session removes any it finds left over.
const TEMP_PREFIX: &str = "snapsync-tmp-";

/// One checkpoint of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Its name.
    pub name: String,
    /// When it was taken: seconds and nanoseconds since the epoch.
    pub created: (i64, u32),
    /// The bitmap holding it.
    pub bitmap: String,
    /// Whether its bitmap still records (the newest one does).
    pub recording: bool,
    /// QEMU marks a persistent bitmap inconsistent after a crash: never trusted.
    pub inconsistent: bool,
}

/// The bitmap name of checkpoint `name` taken at `created`.
pub fn bitmap_name(name: &str, created: (i64, u32)) -> String {
    format!("{BITMAP_PREFIX}{}.{:09}.{name}", created.0, created.1)
}

/// The checkpoint a bitmap name stands for, if it is one of snapsync's.
pub fn parse_bitmap_name(bitmap: &str) -> Option<(String, (i64, u32))> {
    let rest = bitmap.strip_prefix(BITMAP_PREFIX)?;
    let mut parts = rest.splitn(3, '.');
    let secs = parts.next()?.parse().ok()?;
    let nanos = parts.next()?.parse().ok()?;
    let name = parts.next()?.to_string();
    Some((name, (secs, nanos)))
}

/// A block node that holds a guest disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Its node-name.
    pub name: String,
    /// The format driver (`qcow2`, `raw`).
    pub driver: String,
    /// Guest-visible size.
    pub size: u64,
    /// snapsync's checkpoints on it, oldest first.
    pub checkpoints: Vec<Checkpoint>,
}

/// Format drivers whose nodes hold guest disks.
const DISK_DRIVERS: &[&str] = &["qcow2", "raw", "qed", "vmdk", "vdi", "vhdx", "vpc"];

/// The nodes of `qmp`'s process that hold guest disks: format nodes the user named
/// (QEMU's own names start with `#`), not snapsync's temporary ones.
pub fn nodes(qmp: &mut Qmp) -> Result<Vec<Node>, QmpError> {
    let all = qmp.execute("query-named-block-nodes", json!({"flat": true}))?;
    let mut out = Vec::new();
    for n in all.as_array().into_iter().flatten() {
        let name = n["node-name"].as_str().unwrap_or_default();
        let driver = n["drv"].as_str().unwrap_or_default();
        if name.is_empty()
            || name.starts_with('#')
            || name.starts_with(TEMP_PREFIX)
            || !DISK_DRIVERS.contains(&driver)
        {
            continue;
        }
        let mut checkpoints: Vec<Checkpoint> = n["dirty-bitmaps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| {
                let bitmap = b["name"].as_str()?;
                let (name, created) = parse_bitmap_name(bitmap)?;
                Some(Checkpoint {
                    name,
                    created,
                    bitmap: bitmap.to_string(),
                    recording: b["recording"].as_bool().unwrap_or(false),
                    inconsistent: b["inconsistent"].as_bool().unwrap_or(false),
                })
            })
            .collect();
        checkpoints.sort_by_key(|c| c.created);
        out.push(Node {
            name: name.to_string(),
            driver: driver.to_string(),
            size: n["image"]["virtual-size"].as_u64().unwrap_or(0),
            checkpoints,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// A checkpoint being read: its frozen view exported over NBD.
#[derive(Debug)]
pub struct Frozen {
    /// The node.
    pub node: String,
    /// The checkpoint taken.
    pub checkpoint: Checkpoint,
    /// The NBD export of the frozen view.
    pub export: String,
    /// The NBD server's unix socket.
    pub socket: PathBuf,
    /// The meta context of what changed since the base, when a base was given and its
    /// bitmaps are all there and consistent.
    pub changed_context: Option<String>,
    overlay: PathBuf,
    job: String,
    fleece: String,
    merged: Option<String>,
}

/// A session on one QEMU process: checkpoints taken in it are cleaned up when it ends.
#[derive(Debug)]
pub struct Session {
    qmp: Qmp,
    scratch: PathBuf,
    socket: PathBuf,
    started_server: bool,
    frozen: Vec<Frozen>,
}

impl Session {
    /// Start a session: remove what earlier sessions left, and make sure an NBD server
    /// runs (on `socket`, a fresh path in `scratch`, unless the process already runs one
    /// and `existing_server` names its socket).
    pub fn start(
        mut qmp: Qmp,
        scratch: &Path,
        existing_server: Option<&Path>,
    ) -> Result<Self, QmpError> {
        remove_leftovers(&mut qmp, scratch)?;
        let (socket, started_server) = match existing_server {
            Some(s) => (s.to_path_buf(), false),
            None => {
                let socket = scratch.join(format!("{TEMP_PREFIX}nbd.sock"));
                let _ = std::fs::remove_file(&socket);
                qmp.execute(
                    "nbd-server-start",
                    json!({"addr": {"type": "unix", "data": {"path": socket.display().to_string()}}}),
                )?;
                (socket, true)
            }
        };
        Ok(Self {
            qmp,
            scratch: scratch.to_path_buf(),
            socket,
            started_server,
            frozen: Vec::new(),
        })
    }

    /// The QMP session.
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// Take checkpoint `name` of `node` at `created` and export its frozen view, with
    /// the changes since checkpoint `base` when that is given (and trustworthy).
    pub fn take(
        &mut self,
        node: &Node,
        name: &str,
        created: (i64, u32),
        base: Option<&str>,
    ) -> Result<&Frozen, QmpError> {
        let tag = format!("{TEMP_PREFIX}{}", self.frozen.len());
        let fleece = format!("{tag}-fleece");
        let job = format!("{tag}-job");
        let export = format!("{tag}-export");
        let overlay = self.scratch.join(format!("{tag}-{}.qcow2", node.name));
        let bitmap = bitmap_name(name, created);
        // The scratch overlay: a qcow2 of the node's size whose backing is the node.
        create_overlay(&overlay, node.size)?;
        self.qmp.execute(
            "blockdev-add",
            json!({
                "driver": "qcow2",
                "node-name": fleece,
                "file": {"driver": "file", "filename": overlay.display().to_string()},
                "backing": node.name,
            }),
        )?;
        let mut actions = vec![json!({
            "type": "block-dirty-bitmap-add",
            "data": {"node": node.name, "name": bitmap, "granularity": 65536,
                     "persistent": node.driver == "qcow2"},
        })];
        for previous in node.checkpoints.iter().filter(|c| c.recording) {
            actions.push(json!({
                "type": "block-dirty-bitmap-disable",
                "data": {"node": node.name, "name": previous.bitmap},
            }));
        }
        actions.push(json!({
            "type": "blockdev-backup",
            "data": {"job-id": job, "device": node.name, "target": fleece, "sync": "none",
                     "auto-finalize": true, "auto-dismiss": true},
        }));
        self.qmp
            .execute("transaction", json!({"actions": actions}))?;
        // What changed since the base: its checkpoint and every later one, merged.
        let since: Vec<&Checkpoint> = match base {
            Some(b) => match node.checkpoints.iter().position(|c| c.name == b) {
                Some(i) => node.checkpoints[i..].iter().collect(),
                None => Vec::new(),
            },
            None => Vec::new(),
        };
        let usable = !since.is_empty() && since.iter().all(|c| !c.inconsistent);
        let merged = if usable {
            let merged = format!("{tag}-changed");
            self.qmp.execute(
                "block-dirty-bitmap-add",
                json!({"node": node.name, "name": merged, "granularity": 65536,
                       "disabled": true}),
            )?;
            let sources: Vec<&str> = since.iter().map(|c| c.bitmap.as_str()).collect();
            self.qmp.execute(
                "block-dirty-bitmap-merge",
                json!({"node": node.name, "target": merged, "bitmaps": sources}),
            )?;
            Some(merged)
        } else {
            None
        };
        // Every older checkpoint's bitmap too (all disabled now), so that a reader can
        // also ask for the changes since another base.
        let mut bitmaps: Vec<&str> = merged.iter().map(String::as_str).collect();
        bitmaps.extend(
            node.checkpoints
                .iter()
                .filter(|c| !c.inconsistent)
                .map(|c| c.bitmap.as_str()),
        );
        let args = json!({"type": "nbd", "id": export, "node-name": fleece,
                          "name": export, "writable": false, "bitmaps": bitmaps});
        self.qmp.execute("block-export-add", args)?;
        debug!(node = %node.name, checkpoint = name, export = %export, "checkpoint frozen and exported");
        self.frozen.push(Frozen {
            node: node.name.clone(),
            checkpoint: Checkpoint {
                name: name.to_string(),
                created,
                bitmap,
                recording: true,
                inconsistent: false,
            },
            export,
            socket: self.socket.clone(),
            changed_context: merged.as_ref().map(|m| format!("qemu:dirty-bitmap:{m}")),
            overlay,
            job,
            fleece,
            merged,
        });
        Ok(self.frozen.last().expect("just pushed"))
    }

    /// Remove checkpoints of `node` beyond the newest `keep` (after the exports that
    /// used their bitmaps are gone).
    fn prune_checkpoints(&mut self, node: &str, keep: usize) -> Result<(), QmpError> {
        let current = nodes(&mut self.qmp)?;
        let Some(n) = current.iter().find(|n| n.name == node) else {
            return Ok(());
        };
        // Inconsistent bitmaps can only be removed; then the oldest beyond `keep`.
        let usable: Vec<&Checkpoint> = n.checkpoints.iter().filter(|c| !c.inconsistent).collect();
        let excess = usable.len().saturating_sub(keep);
        let doomed = n
            .checkpoints
            .iter()
            .filter(|c| c.inconsistent)
            .chain(usable[..excess].iter().copied());
        for c in doomed {
            self.qmp.execute(
                "block-dirty-bitmap-remove",
                json!({"node": node, "name": c.bitmap}),
            )?;
        }
        Ok(())
    }

    /// End the session as a killed process would: close the QMP connection and leave
    /// everything in QEMU for the next session to remove. For tests of that recovery.
    #[doc(hidden)]
    pub fn abandon(mut self) {
        self.frozen.clear();
        self.started_server = false;
    }

    /// Remove everything the session added but the checkpoints' bitmaps, then keep
    /// only the newest `keep_checkpoints` checkpoints of each node it took one of.
    pub fn finish(mut self, keep_checkpoints: usize) -> Result<(), QmpError> {
        let mut taken: Vec<String> = self.frozen.iter().map(|f| f.node.clone()).collect();
        taken.dedup();
        self.cleanup()?;
        for node in taken {
            self.prune_checkpoints(&node, keep_checkpoints)?;
        }
        Ok(())
    }

    fn cleanup(&mut self) -> Result<(), QmpError> {
        let mut first_error = None;
        for f in std::mem::take(&mut self.frozen) {
            if let Err(e) = release(&mut self.qmp, &f) {
                warn!(error = %e, node = %f.node, "cleaning up a checkpoint failed");
                first_error.get_or_insert(e);
            }
        }
        if self.started_server {
            self.started_server = false;
            if let Err(e) = self.qmp.execute("nbd-server-stop", json!({})) {
                first_error.get_or_insert(e);
            }
            let _ = std::fs::remove_file(&self.socket);
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.cleanup();
    }
}

/// Undo one frozen checkpoint: export, job, overlay node and file, merged bitmap.
fn release(qmp: &mut Qmp, f: &Frozen) -> Result<(), QmpError> {
    // Hard: a reader that is still connected (one that died, say) does not keep it.
    qmp.execute("block-export-del", json!({"id": f.export, "mode": "hard"}))?;
    qmp.wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(30), |d| {
        d["id"] == f.export.as_str()
    })?;
    cancel_job(qmp, &f.job)?;
    qmp.execute("blockdev-del", json!({"node-name": f.fleece}))?;
    if let Some(m) = &f.merged {
        qmp.execute(
            "block-dirty-bitmap-remove",
            json!({"node": f.node, "name": m}),
        )?;
    }
    let _ = std::fs::remove_file(&f.overlay);
    Ok(())
}

fn cancel_job(qmp: &mut Qmp, job: &str) -> Result<(), QmpError> {
    let jobs = qmp.execute("query-block-jobs", json!({}))?;
    let running = jobs
        .as_array()
        .into_iter()
        .flatten()
        .any(|j| j["device"] == job);
    if running {
        qmp.execute("block-job-cancel", json!({"device": job, "force": true}))?;
        qmp.wait_event("BLOCK_JOB_CANCELLED", Duration::from_secs(30), |d| {
            d["device"] == job
        })?;
    }
    Ok(())
}

/// Remove what a killed session left: exports, jobs, nodes and merged bitmaps named
/// with the temporary prefix, and their scratch files.
fn remove_leftovers(qmp: &mut Qmp, scratch: &Path) -> Result<(), QmpError> {
    let exports = qmp.execute("query-block-exports", json!({}))?;
    for e in exports.as_array().into_iter().flatten() {
        if let Some(id) = e["id"].as_str().filter(|i| i.starts_with(TEMP_PREFIX)) {
            let id = id.to_string();
            qmp.execute("block-export-del", json!({"id": id, "mode": "hard"}))?;
            qmp.wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(30), |d| {
                d["id"] == id.as_str()
            })?;
        }
    }
    let jobs = qmp.execute("query-block-jobs", json!({}))?;
    for j in jobs.as_array().into_iter().flatten() {
        if let Some(id) = j["device"].as_str().filter(|i| i.starts_with(TEMP_PREFIX)) {
            cancel_job(qmp, id)?;
        }
    }
    let all = qmp.execute("query-named-block-nodes", json!({"flat": true}))?;
    for n in all.as_array().into_iter().flatten() {
        let name = n["node-name"].as_str().unwrap_or_default().to_string();
        if name.starts_with(TEMP_PREFIX) {
            qmp.execute("blockdev-del", json!({"node-name": name}))?;
            continue;
        }
        for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
            if let Some(bitmap) = b["name"].as_str().filter(|b| b.starts_with(TEMP_PREFIX)) {
                qmp.execute(
                    "block-dirty-bitmap-remove",
                    json!({"node": name, "name": bitmap}),
                )?;
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(scratch) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// A qcow2 file of `size` bytes with no backing in its header (the node is attached as
/// its backing when it is added), written directly: no qemu-img needed at run time.
fn create_overlay(path: &Path, size: u64) -> Result<(), QmpError> {
    let io = |source| QmpError::Io {
        socket: path.display().to_string(),
        source,
    };
    let f = empty_qcow2(path, size).map_err(io)?;
    f.sync_all().map_err(io)
}

/// The smallest valid qcow2 v3 image of `size` bytes: header, L1 table, refcount table
/// and block, 64 KiB clusters, nothing allocated.
fn empty_qcow2(path: &Path, size: u64) -> std::io::Result<std::fs::File> {
    use std::io::Write;
    const CLUSTER: u64 = 65536;
    let l2_coverage = (CLUSTER / 8) * CLUSTER;
    let l1_entries = size.div_ceil(l2_coverage).max(1);
    let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER);
    // Layout: header | refcount table | refcount block | L1 table...
    let refcount_table = CLUSTER;
    let refcount_block = 2 * CLUSTER;
    let l1_offset = 3 * CLUSTER;
    let total_clusters = 3 + l1_clusters;
    let mut header = vec![0u8; CLUSTER as usize];
    let mut put = |at: usize, bytes: &[u8]| header[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, b"QFI\xfb");
    put(4, &3u32.to_be_bytes()); // version
    put(20, &16u32.to_be_bytes()); // cluster bits
    put(24, &size.to_be_bytes());
    put(36, &(l1_entries as u32).to_be_bytes());
    put(40, &l1_offset.to_be_bytes());
    put(48, &refcount_table.to_be_bytes());
    put(56, &1u32.to_be_bytes()); // refcount table clusters
    put(96, &4u32.to_be_bytes()); // refcount order: 16 bits
    put(100, &104u32.to_be_bytes()); // header length
    let mut f = std::fs::File::create(path)?;
    f.write_all(&header)?;
    let mut table = vec![0u8; CLUSTER as usize];
    table[0..8].copy_from_slice(&refcount_block.to_be_bytes());
    f.write_all(&table)?;
    let mut block = vec![0u8; CLUSTER as usize];
    for c in 0..total_clusters as usize {
        block[2 * c..2 * c + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    f.write_all(&block)?;
    f.write_all(&vec![0u8; (l1_clusters * CLUSTER) as usize])?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_names_keep_the_name_and_the_age() {
        let b = bitmap_name("nightly.2", (1_700_000_000, 5));
        assert_eq!(b, "snapsync.1700000000.000000005.nightly.2");
        assert_eq!(
            parse_bitmap_name(&b),
            Some(("nightly.2".to_string(), (1_700_000_000, 5)))
        );
        assert_eq!(parse_bitmap_name("other.1.2.x"), None);
        assert_eq!(parse_bitmap_name("snapsync.x.2.y"), None);
    }

    #[test]
    fn the_scratch_overlay_is_a_clean_qcow2() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.qcow2");
        create_overlay(&p, 10 << 30).unwrap();
        let out = std::process::Command::new("qemu-img")
            .args(["check", p.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
