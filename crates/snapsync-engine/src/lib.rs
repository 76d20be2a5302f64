//! The replication engine.
//!
//! It is the coordinator of the Pure Storage seed, written once against the store
//! traits. For each snapshot to send it
//!
//! 1. **plans** (`Ctx::common` and `Ctx::plan` in `replicate.rs`): reads the
//!    destination's hints, finds the snapshots common to both sides (dropping stale
//!    hints), chooses the base nearest in age (or with the smallest estimated diff),
//!    asks the source for the differences between target and base, and maps them onto
//!    the destination's blocks;
//! 2. **sends** (`Ctx::send`): reads only those blocks, hashes them, asks the
//!    destination which it lacks and writes those. Reading and hashing run on one side
//!    of a bounded channel (`read_batches`) and storing on the other (`store_batch`), so
//!    disk, CPU and destination overlap;
//! 3. **commits** (`Ctx::commit`): the destination makes the snapshot visible
//!    atomically.
//!
//! The decisions are pure functions in `snapsync-core`: finding common snapshots and
//! choosing the base in [`snapsync_core::plan`], the block arithmetic in
//! [`snapsync_core::blockplan`]; this crate only moves data. Progress is reported
//! through [`snapsync_store::Progress`].

mod replicate;
mod restore;

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
