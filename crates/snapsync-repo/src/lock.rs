//! Locks that keep `gc` from deleting what a running writer is about to reference.
//!
//! A replication may decide that block X is already stored (dedup) and commit a manifest
//! that references it; `prune` writes manifests before committing them. If `gc` decided
//! at the same moment that X or that manifest is garbage, the new snapshot would point
//! at nothing. So writers hold a *session* lock (`locks/session-<id>`) while they work,
//! and `gc` holds the *gc* lock (`locks/gc`) while it deletes:
//!
//! - a writer creates its session lock first, then checks for the gc lock; if there is
//!   one it withdraws its session lock, waits, and tries again;
//! - `gc` creates the gc lock first (create-only: one gc at a time), then waits until no
//!   session lock remains.
//!
//! With strongly consistent storage (a local file system, S3) one of the two always
//! sees the other, so they never run their critical parts at once, and neither fails:
//! the later one waits. A lock left by a killed process on this host is recognised by
//! its dead pid; one from another host counts as stale after [`STALE_AFTER_SECS`].

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use snapsync_store::{Result, StoreError};
use tracing::{debug, info};

use crate::backend::Put;
use crate::repo::Repository;
use snapsync_store::random_id;

/// A lock from another host that is this old is ignored.
pub const STALE_AFTER_SECS: u64 = 6 * 3600;

const GC_LOCK: &str = "locks/gc";

#[derive(Debug, Serialize, Deserialize)]
struct LockInfo {
    kind: String,
    host: String,
    pid: u32,
    started: u64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn lock_bytes(kind: &str) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&LockInfo {
            kind: kind.into(),
            host: hostname(),
            pid: std::process::id(),
            started: now_secs(),
        })
        .expect("serialisable"),
    )
}

/// Whether a lock object is held by a live process.
fn is_live(bytes: &[u8]) -> bool {
    let Ok(info) = serde_json::from_slice::<LockInfo>(bytes) else {
        return true; // unknown content: be safe
    };
    if info.host == hostname() {
        return std::path::Path::new(&format!("/proc/{}", info.pid)).exists();
    }
    now_secs().saturating_sub(info.started) < STALE_AFTER_SECS
}

/// A writer's session lock; released on drop.
#[derive(Debug)]
pub struct SessionLock<'a> {
    repo: &'a Repository,
    key: String,
}

impl Drop for SessionLock<'_> {
    fn drop(&mut self) {
        let _ = self.repo.backend.delete(&self.key);
    }
}

/// The gc lock; released on drop.
#[derive(Debug)]
pub struct GcLock<'a> {
    repo: &'a Repository,
}

impl Drop for GcLock<'_> {
    fn drop(&mut self) {
        let _ = self.repo.backend.delete(GC_LOCK);
    }
}

impl Repository {
    /// Take a session lock, waiting while a gc runs.
    pub fn session_lock(&self, kind: &str) -> Result<SessionLock<'_>> {
        let started = Instant::now();
        loop {
            let key = format!("locks/session-{}", random_id());
            // Seen by a gc that starts later; a lock left by a crash is stale anyway.
            self.backend
                .put_visible(&key, lock_bytes(kind), Put::Create)?;
            let lock = SessionLock { repo: self, key };
            match self.backend.get(GC_LOCK)? {
                Some(b) if is_live(&b) => {
                    drop(lock);
                    if started.elapsed() > self.options.lock_wait {
                        return Err(StoreError::Conflict {
                            what: format!(
                                "a gc holds {} and did not finish within {:?}",
                                self.describe(GC_LOCK),
                                self.options.lock_wait
                            ),
                        });
                    }
                    debug!("waiting for gc to finish");
                    std::thread::sleep(Duration::from_millis(200));
                }
                _ => {
                    // A gc that ran since the block index was cached may have deleted
                    // packs it names: count gc runs and reload the index if one ran.
                    let epochs = self.backend.list("gc-epochs")?.len();
                    let mut seen = self.gc_epochs.lock().unwrap_or_else(|p| p.into_inner());
                    if seen.is_some_and(|s| s != epochs) {
                        self.invalidate_index();
                    }
                    *seen = Some(epochs);
                    drop(seen);
                    self.check_still_the_same()?;
                    return Ok(lock);
                }
            }
        }
    }

    /// Take the gc lock and wait until no writer holds a session lock.
    pub fn gc_lock(&self) -> Result<GcLock<'_>> {
        match self.backend.put(GC_LOCK, lock_bytes("gc"), Put::Create) {
            Ok(()) => {}
            Err(StoreError::AlreadyExists { .. }) => {
                let held = self.backend.get(GC_LOCK)?;
                if held.as_deref().is_some_and(is_live) {
                    return Err(StoreError::Conflict {
                        what: format!("another gc is running ({} exists)", self.describe(GC_LOCK)),
                    });
                }
                info!("removing a stale gc lock");
                self.backend.delete(GC_LOCK)?;
                self.backend.put(GC_LOCK, lock_bytes("gc"), Put::Create)?;
            }
            Err(e) => return Err(e),
        }
        let lock = GcLock { repo: self };
        let started = Instant::now();
        loop {
            let sessions = self.backend.list("locks")?;
            let keys: Vec<String> = sessions
                .into_iter()
                .map(|(k, _)| k)
                .filter(|k| k.starts_with("locks/session-"))
                .collect();
            let mut live = 0;
            for (k, b) in keys.iter().zip(self.backend.get_many(&keys)?) {
                match b {
                    Some(b) if is_live(&b) => live += 1,
                    Some(_) => {
                        info!(lock = %k, "removing a stale session lock");
                        self.backend.delete(k)?;
                    }
                    None => {}
                }
            }
            if live == 0 {
                return Ok(lock);
            }
            if started.elapsed() > self.options.lock_wait {
                return Err(StoreError::Conflict {
                    what: format!(
                        "{live} writers still hold session locks after {:?}",
                        self.options.lock_wait
                    ),
                });
            }
            debug!(live, "gc waiting for writers to finish");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
