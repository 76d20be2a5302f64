//! A repository's size and chains, for a status page ([`RepositoryView`]): the daemon
//! reads a local or S3 repository through this, and `snapsync serve` answers a remote
//! daemon's `stats` and `chains` with it, so both show the same thing.
//!
//! **Cheap on purpose.** The size is two listings and one small read per volume: the
//! bytes of all packs and the catalogs, whose snapshot sizes add up to the *logical*
//! bytes — what restoring every snapshot would write, as `borg info` counts "original
//! size". Reading the block maps for a finer count would cost a read of every
//! manifest. A chain reads each manifest's fixed fields once: manifests never change,
//! so what an earlier read found is passed back ([`Known`]) and only new ones are read.

use std::collections::HashMap;

use snapsync_store::view::{
    Chain, Known, Link, ManifestFacts, RepositorySize, RepositoryView, SnapshotName,
};
use snapsync_store::Result;

use crate::format::{Catalog, ManifestId};
use crate::Repository;

impl RepositoryView for Repository {
    fn size(&self) -> Result<RepositorySize> {
        let stored_bytes = self.stored_bytes()?;
        let catalogs = self.catalogs()?;
        let snaps = catalogs.iter().flat_map(|c| &c.snapshots);
        Ok(RepositorySize {
            stored_bytes,
            logical_bytes: snaps.clone().map(|s| s.size).sum(),
            volumes: catalogs.iter().filter(|c| !c.snapshots.is_empty()).count() as u64,
            snapshots: snaps.count() as u64,
        })
    }

    fn chains(&self, volumes: &[String], known: &Known) -> Result<Vec<Chain>> {
        let mut out = Vec::new();
        for v in volumes {
            let Some(cat) = self.catalog(v)? else {
                continue;
            };
            let origin = match &cat.origin {
                Some(o) => self.catalog(&o.volume)?,
                None => None,
            };
            let mut names: HashMap<ManifestId, SnapshotName> = HashMap::new();
            for c in origin.iter().chain([&cat]) {
                for s in &c.snapshots {
                    let name = SnapshotName {
                        volume: c.volume.clone(),
                        snapshot: s.name.clone(),
                    };
                    names.insert(s.manifest, name);
                }
            }
            out.push(chain(self, &cat, &names, known)?);
        }
        Ok(out)
    }
}

/// One volume's chain, its manifests' bases named by `names` (its own snapshots and its
/// origin's).
fn chain(
    repo: &Repository,
    cat: &Catalog,
    names: &HashMap<ManifestId, SnapshotName>,
    known: &Known,
) -> Result<Chain> {
    let mut snapshots = Vec::with_capacity(cat.snapshots.len());
    for s in &cat.snapshots {
        let hex = s.manifest.to_hex();
        let facts = match known.get(&hex) {
            Some(k) => k.clone(),
            None => {
                let h = repo.manifest_header(&s.manifest)?;
                ManifestFacts {
                    full: h.delta_base.is_none(),
                    base: h.delta_base.and_then(|b| names.get(&b).cloned()),
                    depth: h.depth,
                }
            }
        };
        snapshots.push(Link {
            name: s.name.clone(),
            created: millis(s.created),
            size: s.size,
            full: facts.full,
            base: facts.base,
            depth: facts.depth,
            manifest: hex,
        });
    }
    snapshots.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    Ok(Chain {
        volume: cat.volume.clone(),
        origin: cat.origin.as_ref().map(|o| SnapshotName {
            volume: o.volume.clone(),
            snapshot: o.snapshot.clone(),
        }),
        snapshots,
    })
}

fn millis(t: snapsync_core::Timestamp) -> i64 {
    i64::try_from(t.as_nanos() / 1_000_000).unwrap_or(i64::MAX)
}
