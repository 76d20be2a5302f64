//! Progress of long operations, decoupled from any terminal library.
//!
//! One trait for every long operation (replicate, restore in either format, verify), so
//! that a front end implements it once: the binary adapts it to a progress bar, and
//! tests, `--json` and library users that want nothing pass [`NoProgress`];
//! [`RecordedProgress`] lets tests check what an operation reported.

use std::fmt;

/// What a phase of work is, for a front end to label it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase<'a> {
    /// Reading, hashing and sending the changed blocks of one snapshot.
    Replicate {
        /// Source volume.
        volume: &'a str,
        /// Snapshot being sent.
        snapshot: &'a str,
    },
    /// Writing one snapshot out as an image.
    Restore {
        /// Volume.
        volume: &'a str,
        /// Snapshot being restored.
        snapshot: &'a str,
    },
    /// Re-reading a repository's stored data.
    Verify,
}

impl fmt::Display for Phase<'_> {
    /// A short label: `VOLUME@SNAPSHOT`, or the operation's name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Replicate { volume, snapshot } | Phase::Restore { volume, snapshot } => {
                write!(f, "{volume}@{snapshot}")
            }
            Phase::Verify => f.write_str("verify"),
        }
    }
}

/// Receives progress of a long operation, in bytes. An operation calls
/// [`Progress::start`] once per phase, [`Progress::advance`] as bytes are done, and
/// [`Progress::finish`] when the phase completes (not when it fails).
///
/// The methods take `&self` and the trait is `Sync` because work is done on several
/// threads (a replication reads on one and stores on another).
pub trait Progress: Send + Sync {
    /// A phase begins, with the bytes it will process.
    fn start(&self, phase: Phase<'_>, total_bytes: u64);
    /// Bytes done since the last call.
    fn advance(&self, bytes: u64);
    /// The phase completed.
    fn finish(&self);
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _phase: Phase<'_>, _total_bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}

/// One phase as [`RecordedProgress`] saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecordedPhase {
    /// The phase's label ([`Phase`]'s `Display`).
    pub label: String,
    /// The total announced by [`Progress::start`].
    pub total_bytes: u64,
    /// The sum of [`Progress::advance`] calls.
    pub done_bytes: u64,
    /// Whether [`Progress::finish`] was called.
    pub finished: bool,
}

/// Records what an operation reports, so that tests of operations (in any crate) check
/// the one contract: every phase started, advanced up to its total, and finished. It
/// panics on `advance` or `finish` outside a started phase.
#[derive(Debug, Default)]
pub struct RecordedProgress {
    phases: std::sync::Mutex<Vec<RecordedPhase>>,
}

impl RecordedProgress {
    /// The phases reported so far, in order.
    pub fn phases(&self) -> Vec<RecordedPhase> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<RecordedPhase>> {
        self.phases.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn current(&self, f: impl FnOnce(&mut RecordedPhase)) {
        let mut phases = self.lock();
        match phases.last_mut() {
            Some(p) if !p.finished => f(p),
            _ => panic!("progress reported outside a started phase"),
        }
    }
}

impl Progress for RecordedProgress {
    fn start(&self, phase: Phase<'_>, total_bytes: u64) {
        self.lock().push(RecordedPhase {
            label: phase.to_string(),
            total_bytes,
            done_bytes: 0,
            finished: false,
        });
    }
    fn advance(&self, bytes: u64) {
        self.current(|p| p.done_bytes += bytes);
    }
    fn finish(&self) {
        self.current(|p| p.finished = true);
    }
}
