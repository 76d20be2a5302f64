//! What a status page shows of a repository: how much it stores, and each volume's
//! chain of snapshots and delta bases.
//!
//! A trait, so that whoever shows it (the daemon's status page) need not know where the
//! repository is: a local or S3 one answers it itself (`snapsync-repo`), a served one
//! through `snapsync serve` (`snapsync-remote`, operations `stats` and `chains`), and the
//! logic that reads a chain stays in one place, next to the repository's format. The
//! types here are also the JSON of those operations and of the daemon's `/api/chains`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use snapsync_core::time::{rfc3339, Millis};

use crate::StoreError;

/// A repository's size, as one listing finds it (no manifest is read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositorySize {
    /// Bytes of all its packs: what it takes on disk or in the bucket.
    pub stored_bytes: u64,
    /// The sizes of all its snapshots added up: what restoring every one would write.
    pub logical_bytes: u64,
    /// Volumes that hold a snapshot.
    pub volumes: u64,
    /// Snapshots.
    pub snapshots: u64,
}

/// A snapshot named across volumes (a clone's delta base is its origin's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotName {
    /// Volume.
    pub volume: String,
    /// Snapshot.
    pub snapshot: String,
}

/// One snapshot of a volume's chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// Its name.
    pub name: String,
    /// Its age, to the millisecond (what a page shows).
    #[serde(with = "rfc3339")]
    pub created: Millis,
    /// Its size.
    pub size: u64,
    /// Whether its manifest is a full map (no delta base).
    pub full: bool,
    /// The snapshot its delta is against (`None` for a full map, or a manifest that no
    /// snapshot of the volume or its origin names).
    pub base: Option<SnapshotName>,
    /// Its manifest's number since the full map (0 for one).
    pub depth: u32,
    /// Its manifest, hex: what [`Known`] is keyed by.
    pub manifest: String,
}

/// A volume's snapshots in age order, oldest first, with their delta bases.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chain {
    /// The volume.
    pub volume: String,
    /// The snapshot it was cloned from, if it is a clone.
    pub origin: Option<SnapshotName>,
    /// Its snapshots.
    pub snapshots: Vec<Link>,
}

/// What a manifest's header says of its place in the chain. Manifests never change, so
/// what was read once is passed back ([`Known`]) instead of being read again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFacts {
    /// Whether it is a full map.
    pub full: bool,
    /// The snapshot its delta is against.
    pub base: Option<SnapshotName>,
    /// Its number since the full map.
    pub depth: u32,
}

/// What earlier reads found of manifests, by id (hex).
pub type Known = HashMap<String, ManifestFacts>;

/// What `chains` found of manifests, for the next read. Links whose base no snapshot
/// names are left out, so that a later read names it once it is known.
pub fn known(chains: &[Chain]) -> Known {
    chains
        .iter()
        .flat_map(|c| &c.snapshots)
        .filter(|l| l.full || l.base.is_some())
        .map(|l| {
            let facts = ManifestFacts {
                full: l.full,
                base: l.base.clone(),
                depth: l.depth,
            };
            (l.manifest.clone(), facts)
        })
        .collect()
}

/// A repository's size and chains, wherever it is.
pub trait RepositoryView: Send + Sync {
    /// Its size now.
    fn size(&self) -> Result<RepositorySize, StoreError>;

    /// The chains of `volumes` (those it holds; the others are left out), reading only
    /// the manifests `known` does not describe.
    fn chains(&self, volumes: &[String], known: &Known) -> Result<Vec<Chain>, StoreError>;
}
