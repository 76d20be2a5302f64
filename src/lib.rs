//! snapsync as a library: open stores from URLs and replicate or restore snapshots
//! between them, sending only what changed.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let options = snapsync::OpenOptions::default();
//! let source = snapsync::open_source("raw:/var/lib/images", &options)?;
//! let dest = snapsync::open_sink("file:///backup/repo", &options)?;
//! let reports = snapsync::replicate(
//!     source.as_ref(),
//!     dest.as_ref(),
//!     &snapsync::ReplicateOptions::default(),
//!     &snapsync::NoProgress,
//!     &mut |r| println!("{}@{}: sent {} bytes", r.volume, r.snapshot, r.sent_bytes),
//! )?;
//! # Ok(()) }
//! ```
//!
//! The library is the root package's `lib` target, beside the `snapsync` binary that is
//! its thin user, rather than a separate `crates/snapsync`: one package then carries
//! the name `snapsync` for both (a workspace cannot hold two packages of that name), and
//! `cargo add snapsync` gives an embedding program exactly the code the binary runs.
//! What only the binary needs (clap, progress bars, log setup, the demo) is behind the
//! default `cli` feature; `default-features = false` leaves the library alone.
//!
//! Nothing here reads the environment: limits, tokens and certificates are
//! [`OpenOptions`], which the binary fills from its flags and `SNAPSYNC_*` variables.
//! The building blocks stay usable on their own: [`snapsync_core`] (pure logic),
//! [`snapsync_store`] (the store traits), [`snapsync_engine`], and one crate per kind
//! of store.

mod open;
mod url;

pub use open::{open, open_sink, open_source, AnyStore, OpenError, OpenOptions, StoreKind};
pub use url::{parse_target, StoreUrl, UrlError};

pub use snapsync_core::KeepPolicy;
pub use snapsync_engine::{
    replicate, restore, EngineError, ReplicateOptions, RestoreStats, SnapshotReport,
};
pub use snapsync_qcow2::{restore_qcow2, Qcow2Options};
pub use snapsync_remote::ClientOptions;
pub use snapsync_repo::{
    Location, PruneOptions, PruneReport, RepoOptions, Repository, DEFAULT_BLOCK_SIZE,
};
pub use snapsync_store::{
    NoProgress, Phase, Progress, SnapshotSink, SnapshotSource, Store, StoreError,
};

pub use snapsync_core;
pub use snapsync_engine;
/// The object-store crate, for [`OpenOptions::with_object_store`].
pub use snapsync_repo::object_store;
pub use snapsync_store;
