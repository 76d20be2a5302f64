//! Progress of long operations, decoupled from any terminal library.
//!
//! One trait for every long operation (replicate, restore in either format, verify), so
//! that a front end implements it once: the binary adapts it to a progress bar, and
//! tests, `--json` and library users that want nothing pass [`NoProgress`].

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
