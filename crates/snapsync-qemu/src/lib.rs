//! Running VMs as a snapsync source: a QEMU or qemu-storage-daemon process, reached
//! through its QMP socket.
//!
//! [`qmp`] speaks the monitor protocol; [`checkpoint`] takes point-in-time checkpoints
//! with dirty bitmaps and fleecing, exports the frozen view with QEMU's own NBD server
//! and the bitmap of what changed since a base, and removes everything it added. The
//! data is read with `snapsync_nbd::Client`.

pub mod checkpoint;
pub mod qmp;
pub mod source;

pub use checkpoint::{nodes, Checkpoint, Frozen, Node, Session};
pub use qmp::{Qmp, QmpError};
pub use source::{Interrupter, QemuOptions, QemuSource, DEFAULT_KEEP_CHECKPOINTS};
