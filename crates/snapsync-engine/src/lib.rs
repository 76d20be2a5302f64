//! The replication engine.
//!
//! It is the coordinator of the Pure Storage seed, written once against the store
//! traits: for each snapshot to send it
//!
//! 1. reads the destination's hints,
//! 2. finds the snapshots common to both sides (dropping stale hints),
//! 3. chooses the base nearest in age (or with the smallest estimated diff),
//! 4. asks the source for the differences between target and base,
//! 5. reads only those extents, hashes them, asks the destination which blocks it
//!    lacks, sends only those, and commits.
//!
//! The decisions (steps 2–3, and the block arithmetic of step 5) are pure functions in
//! `snapsync-core`; this crate only moves data. Reading and hashing run on one side of a
//! bounded channel and storing on the other, so disk, CPU and destination overlap.

mod progress;
mod replicate;
mod restore;

pub use progress::{NoProgress, Progress};
pub use replicate::{replicate, ReplicateOptions, SnapshotReport};
pub use restore::{restore, RestoreStats};

use snapsync_store::StoreError;

/// What replication or restore can fail with.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The source failed.
    #[error("source {location}: {source}")]
    Source {
        /// The source store.
        location: String,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// The destination failed.
    #[error("destination {location}: {source}")]
    Destination {
        /// The destination store.
        location: String,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// A volume or snapshot that was asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Writing the output of a restore failed.
    #[error("{context}: {source}")]
    Output {
        /// What and where.
        context: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Result with [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
