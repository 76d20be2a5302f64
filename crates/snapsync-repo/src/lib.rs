//! The snapsync repository.
//!
//! A repository is a set of objects in an object store (a local directory or an S3
//! bucket), laid out for immutability: every object is written once and never changed.
//!
//! ```text
//! config                          repository id and block size
//! packs/<hh>/<pack id>            block data, zstd-compressed where that pays
//! index/<pack id>                 where each block of that pack is
//! manifests/<hh>/<manifest id>    one snapshot: its delta against a base manifest
//! mparts/<hh>/<part id>           a part of a large manifest's entries
//! volumes/<volume>/<generation>   the volume's catalog: snapshots, lineage, hints
//! ```
//!
//! - Blocks are content-addressed by BLAKE3 of the plaintext, so identical blocks are
//!   stored once across all volumes, and packed so that a 1 TiB volume is a few
//!   thousand objects, not millions.
//! - A snapshot is a manifest holding only the entries that differ from its delta base,
//!   with the base's id, the snapshot's identity, age and size. Snapshot number `n` of a
//!   chain is based on number `n - lowbit(n)` ([`snapsync_core::chain`]), so reading any
//!   snapshot walks a logarithmic number of manifests and the metadata written grows
//!   with what changed, never with the volume; the full map is written once, at the
//!   chain's start. Large manifests are split into parts, so memory stays bounded and a
//!   lookup loads one part.
//! - The volume catalog is the only commit point. A new generation is written with a
//!   create-only put after the packs, indexes and manifest it references are stored, so
//!   a replication killed at any point leaves no partial snapshot visible, and two
//!   writers committing at once cannot lose each other's snapshots: the loser rereads
//!   and retries.
//!
//! - An encrypted repository ([`Repository::init_encrypted`], format version 3) seals
//!   every object and every block on the client and names objects and volume
//!   directories with keyed hashes; a random master key is wrapped per passphrase or
//!   key file ([`Credentials`], [`Repository::add_key`]). Everything cryptographic is
//!   in one module; the rest of the crate sees plain version-2 structures.
//!
//! The format is specified in `docs/FORMAT.md` and in [`mod@format`].

mod backend;
mod crypt;
mod diff;
pub mod format;
mod gc;
mod index;
mod lock;
mod options;
mod prune;
mod receive;
mod repo;
mod sealed;
mod source;
mod spill;
mod staged;
mod stream;
mod verify;
mod view;
mod writer;

pub use backend::{CustomStore, Location, DEFAULT_RETRY_TIMEOUT_SECS};
pub use crypt::{Credentials, KdfParams, WrappingKeyMemo};
pub use gc::GcReport;
pub use lock::{GcLock, SessionLock};
/// The object-store crate the repository is written against, for [`Location::custom`].
pub use object_store;
pub use options::{RepoOptions, DEFAULT_LOCK_WAIT};
pub use prune::{KeptSnapshot, PruneOptions, PruneReport, VolumePrune};
pub use repo::{Repository, DEFAULT_BLOCK_SIZE, MAX_CHAIN_LEN};
pub use sealed::KeyInfo;
pub use verify::{Damage, VerifyReport};
