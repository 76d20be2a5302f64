//! A bounds-checked qcow2 reader (internal snapshots, backing chains,
//! metadata-only diffs) and a small streaming qcow2 writer.
//!
//! # Why our own implementation
//!
//! snapsync replicates snapshots by sending only what changed. For qcow2
//! that change set is already recorded in the image's mapping tables, so a
//! diff can be computed from metadata alone, without reading guest data.
//! Doing that needs exact knowledge of the snapshot table, extended L2
//! entries and compression types, and must survive arbitrary (hostile or
//! corrupted) files: every offset and size is checked, every allocation is
//! bounded by the file size or a QEMU-equivalent limit, and every loop is
//! bounded. The fuzzer in `fuzz/` exercises exactly that promise.
//!
//! # The qcow2 format in brief
//!
//! * **Header** (cluster 0, big-endian): magic `QFI\xfb`, version (2 or 3),
//!   `cluster_bits` (clusters are 512 B ..= 2 MiB), the virtual size, the
//!   active L1 table, the refcount table and the snapshot table. Version 3
//!   adds feature bit fields: *incompatible* bits (dirty, corrupt, external
//!   data file, compression type, extended L2) must be understood to read
//!   the image, so unknown ones are refused by bit number; *compatible* and
//!   *autoclear* bits can be ignored by a reader.
//! * **Header extensions** follow the header: type, length, payload padded
//!   to 8 bytes. We use the backing-format name, the feature-name table
//!   (to name unknown bits in errors) and the external data file name.
//! * **Two-level mapping**: a guest offset is split into an L1 index, an
//!   L2 index and an offset in the cluster. L1 entries point to L2 tables
//!   (one cluster each); L2 entries point to data clusters. An entry of 0
//!   means "unallocated": read from the backing file, or zeros.
//! * **Standard L2 entries** (64 bit): host offset in bits 9..=55, bit 0 =
//!   "reads as zeros", bit 62 = compressed, bit 63 = COPIED (refcount is 1;
//!   a hint for writers that we ignore when comparing). Compressed entries
//!   pack a host byte offset and a 512-byte sector count instead; the
//!   payload is raw deflate or zstd depending on the header's
//!   `compression_type`.
//! * **Extended L2 entries** (128 bit, incompatible bit 4): the standard
//!   entry plus a bitmap splitting the cluster into 32 subclusters, each
//!   allocated (data at host + i * subcluster), zero, or unallocated.
//! * **Internal snapshots** (`qemu-img snapshot -c`) each own a copy of the
//!   L1 table; L2 tables and data clusters are shared (refcounted) until
//!   written. This sharing is why [`Qcow2Image::diff`] can skip every L1
//!   entry that still points at the same L2 table.
//! * **Backing chains** (external snapshots): an overlay's header names a
//!   backing file; unallocated ranges read through to it. See [`Chain`].
//!
//! Refcounts are not needed for reading and are ignored by the reader; the
//! [`Qcow2Writer`] produces them so that `qemu-img check` is clean.
//!
//! Images must not be modified while open (tables are cached).
//!
//! [`Qcow2Store`] presents images as a snapsync storage system (`qcow2:` URLs): see
//! its module documentation for how volumes, snapshots, clones and identities are
//! derived. [`restore_qcow2`] writes any source's snapshot as a new image.

mod chain;
mod error;
mod extent;
mod format;
pub mod fuzzing;
mod image;
mod source;
mod store;
mod writer;

pub use chain::{BackingRule, Chain, LayerFormat, LayerInfo, MAX_CHAIN_DEPTH};
pub use error::Qcow2Error;
pub use extent::{DiffExtent, ExtentKind};
pub use format::{CompressionType, DamagedSnapshot, InternalSnapshot};
pub use image::{Qcow2Image, View};
pub use source::ReadAt;
pub use store::{restore_qcow2, Qcow2Options, Qcow2RestoreStats, Qcow2Store};
pub use writer::{Qcow2Writer, DEFAULT_CLUSTER_SIZE};
