//! The pure core of snapsync.
//!
//! Everything here is logic without I/O, in the spirit of raft-rs: the caller (the
//! engine, a store) feeds in what it read and gets back decisions and data structures.
//! That keeps the hard parts — extent algebra, delta chains, base selection — testable
//! with property tests against simple models, without disks or sockets.
//!
//! - [`ids`]: content ids ([`BlockId`]) and stable snapshot identities ([`SnapshotId`]).
//! - [`time`]: snapshot ages ([`Timestamp`]).
//! - [`extent`]: byte ranges and their algebra ([`ExtentList`]).
//! - [`blockmap`]: a snapshot's content as a map of blocks, and deltas between maps.
//! - [`chain`]: which manifest a new delta is stored against (chains of log length).
//! - [`blockplan`]: which blocks of a diff a destination is sent, read or known zero.
//! - [`codec`]: block compression, the one policy for packs and the wire.
//! - [`snapshot`]: what stores list (volumes, snapshots) and what destinations remember (hints).
//! - [`plan`]: which base a replication uses, from hints and listings.
//! - [`retention`]: which snapshots `prune` keeps (restic/sanoid rules).
//! - [`names`]: validation of volume and snapshot names (they become object keys and paths).

pub mod blockmap;
pub mod blockplan;
pub mod chain;
pub mod codec;
pub mod extent;
pub mod ids;
pub mod names;
pub mod plan;
pub mod retention;
pub mod snapshot;
pub mod time;

pub use blockmap::{BlockMap, BlockRef, Delta, RootHasher};
pub use blockplan::{plan_blocks, BlockPlan};
pub use extent::{Extent, ExtentList};
pub use ids::{BlockId, SnapshotId};
pub use names::{quote_snapshot, validate_name, NameError};
pub use plan::{
    choose_base, common_snapshots, missing_snapshots, BaseChoice, BaseReason, CommonSnapshot,
};
pub use retention::{apply_policy, KeepPolicy};
pub use snapshot::{Hint, Origin, SnapshotInfo, VolumeInfo};
pub use time::Timestamp;

/// Whether every byte is zero. Written to let the compiler vectorise: no early exit
/// inside a 64-byte chunk.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |acc, b| acc | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn is_zero() {
        assert!(super::is_zero(&[]));
        assert!(super::is_zero(&[0; 1000]));
        for i in [0, 63, 64, 999] {
            let mut v = vec![0u8; 1000];
            v[i] = 1;
            assert!(!super::is_zero(&v));
        }
    }
}
