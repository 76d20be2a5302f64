//! What every store says about its volumes and snapshots, and what a destination
//! remembers about its sources (hints).

use serde::{Deserialize, Serialize};

use crate::ids::SnapshotId;
use crate::time::Timestamp;

/// One snapshot of a volume, as a store lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Name within its volume.
    pub name: String,
    /// Stable identity, preserved across replication.
    pub id: SnapshotId,
    /// Age: when the snapshot was taken at its origin.
    pub created: Timestamp,
    /// Size of the volume at this snapshot, in bytes.
    pub size: u64,
}

/// Where a cloned volume came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// Volume of the parent snapshot.
    pub volume: String,
    /// Name of the parent snapshot.
    pub snapshot: String,
    /// Identity of the parent snapshot.
    pub id: SnapshotId,
}

/// One volume and its snapshots, oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Volume name.
    pub name: String,
    /// Current size in bytes (the newest snapshot's, or the live volume's).
    pub size: u64,
    /// Snapshots sorted by age, oldest first.
    pub snapshots: Vec<SnapshotInfo>,
    /// Lineage when the volume is a clone.
    pub origin: Option<Origin>,
}

impl VolumeInfo {
    /// Find a snapshot by name.
    pub fn snapshot(&self, name: &str) -> Option<&SnapshotInfo> {
        self.snapshots.iter().find(|s| s.name == name)
    }
    /// Find a snapshot by identity.
    pub fn snapshot_by_id(&self, id: &SnapshotId) -> Option<&SnapshotInfo> {
        self.snapshots.iter().find(|s| &s.id == id)
    }
}

/// A destination's record that it holds a source snapshot (the Pure Storage seed's
/// "hint information"): which source snapshot, under which identity and age, and which
/// local snapshot holds its content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hint {
    /// Snapshot name at the source.
    pub source_snapshot: String,
    /// Identity (the same at both ends).
    pub id: SnapshotId,
    /// Age.
    pub created: Timestamp,
    /// Local volume holding it.
    pub local_volume: String,
    /// Local snapshot holding it.
    pub local_snapshot: String,
}
