//! The NBD protocol for snapsync.
//!
//! [`serve`] is a read-only NBD server for any [`Export`]; [`SnapshotExport`] makes any
//! snapshot of any store one, so that QEMU can boot from a backup at once (a qcow2
//! overlay backed by the export) and pull the rest in with `block-stream` later:
//! instant restore. It speaks what QEMU and libnbd expect: fixed newstyle negotiation,
//! `OPT_GO`/`OPT_INFO`/`OPT_LIST`, `STARTTLS`, structured replies, `base:allocation`
//! block status (zero and never-written ranges reported as holes), many requests in
//! flight and many clients.
//!
//! The wire format is in [`proto`], shared by the server and the [`Client`], which reads
//! QEMU's own exports (with `base:allocation` and `qemu:dirty-bitmap:NAME` block status)
//! for the live-VM source.

pub mod client;
pub mod export;
pub mod proto;
pub mod server;

pub use client::{Client, NbdError, Status};
pub use export::{SnapshotExport, DEFAULT_CACHE_BYTES};
pub use server::{serve, Export, Listener, ServerOptions};
