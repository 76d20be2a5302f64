//! What the status page shows of a repository destination: how much it stores over
//! time, and each volume's chain of snapshots and delta bases.
//!
//! Both are read by a run, after it replicated to a repository, on the run's thread
//! (the loop never waits on a store), and kept by the loop: the samples in
//! `state_dir/repositories.json`, bounded by [`thin`]; the chains with the job's state.
//!
//! **Cheap on purpose.** A sample is two listings and one small read per volume: the
//! bytes of all packs (what the repository takes on disk or in the bucket) and the
//! catalogs, whose snapshot sizes add up to the *logical* bytes — what restoring every
//! snapshot would write, as `borg info` counts "original size". Their ratio is what
//! dedup (between snapshots, within them, of zeros) and compression save together.
//! Reading the block maps for a finer count would cost a read of every manifest. A
//! repository is sampled after a run that changed it (replicated or pruned something:
//! the listing is small next to what that run wrote), and otherwise at most once a
//! minute, which catches what others do to it (`gc`, another writer). A chain reads each manifest's fixed fields once: manifests never change, so
//! what an earlier run read is passed back ([`Known`]) and only new ones are read.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use snapsync_repo::format::{Catalog, ManifestId};
use snapsync_repo::Repository;
use snapsync_store::StoreError;

use crate::record::rfc3339;
use crate::schedule::Millis;

/// Samples kept per repository: with [`thin`], they span from the first sample to the
/// last however long the daemon runs, denser towards the present.
pub const MAX_SAMPLES: usize = 200;
/// A repository a run did not change is sampled at most this often (or once per run of
/// a job that runs less often).
pub const SAMPLE_EVERY: Millis = 60_000;

/// A repository's size at one time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Sample {
    /// When.
    #[serde(with = "rfc3339")]
    pub at: Millis,
    /// Bytes of all its packs: what it takes.
    pub stored_bytes: u64,
    /// The sizes of all its snapshots added up: what they hold.
    pub logical_bytes: u64,
    /// Volumes.
    pub volumes: u64,
    /// Snapshots.
    pub snapshots: u64,
}

/// Sample `repo` at `at`.
pub fn sample(repo: &Repository, at: Millis) -> Result<Sample, StoreError> {
    let stored_bytes = repo.stored_bytes()?;
    let catalogs = repo.catalogs()?;
    let snaps = catalogs.iter().flat_map(|c| &c.snapshots);
    Ok(Sample {
        at,
        stored_bytes,
        logical_bytes: snaps.clone().map(|s| s.size).sum(),
        volumes: catalogs.iter().filter(|c| !c.snapshots.is_empty()).count() as u64,
        snapshots: snaps.count() as u64,
    })
}

/// Add `s` to `samples` (oldest first) and keep them within `max`: when there are more,
/// every second one of the older half goes, so the history keeps its first and last
/// sample and thins out towards the past rather than being cut off.
pub fn push_sample(samples: &mut Vec<Sample>, s: Sample, max: usize) {
    samples.retain(|x| x.at != s.at);
    let at = samples.partition_point(|x| x.at < s.at);
    samples.insert(at, s);
    thin(samples, max);
}

/// See [`push_sample`].
pub fn thin(samples: &mut Vec<Sample>, max: usize) {
    let max = max.max(3);
    while samples.len() > max {
        let half = samples.len() / 2;
        let mut i = 0;
        samples.retain(|_| {
            i += 1;
            // Keep the first, drop every second one after it up to the half.
            !(i > 1 && i <= half && i % 2 == 0)
        });
    }
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
#[non_exhaustive]
pub struct Link {
    /// Its name.
    pub name: String,
    /// Its age.
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
#[non_exhaustive]
pub struct Chain {
    /// The volume.
    pub volume: String,
    /// The snapshot it was cloned from, if it is a clone.
    pub origin: Option<SnapshotName>,
    /// Its snapshots.
    pub snapshots: Vec<Link>,
}

/// What earlier reads found of manifests, by id (hex): whether a full map, the base
/// snapshot, the depth.
pub type Known = HashMap<String, (bool, Option<SnapshotName>, u32)>;

/// What `chains` found of manifests, for the next read.
pub fn known(chains: &[Chain]) -> Known {
    chains
        .iter()
        .flat_map(|c| &c.snapshots)
        .filter(|l| l.full || l.base.is_some())
        .map(|l| (l.manifest.clone(), (l.full, l.base.clone(), l.depth)))
        .collect()
}

/// The chains of `volumes` in `repo` (those it holds), reading only manifests `known`
/// does not describe.
pub fn chains(
    repo: &Repository,
    volumes: &[String],
    known: &Known,
) -> Result<Vec<Chain>, StoreError> {
    let mut out = Vec::new();
    for v in volumes {
        let Some(cat) = repo.catalog(v)? else {
            continue;
        };
        let origin = match &cat.origin {
            Some(o) => repo.catalog(&o.volume)?,
            None => None,
        };
        let mut names: HashMap<ManifestId, SnapshotName> = HashMap::new();
        for c in origin.iter().chain([&cat]) {
            for s in &c.snapshots {
                names.insert(
                    s.manifest,
                    SnapshotName {
                        volume: c.volume.clone(),
                        snapshot: s.name.clone(),
                    },
                );
            }
        }
        out.push(chain(repo, &cat, &names, known)?);
    }
    Ok(out)
}

fn chain(
    repo: &Repository,
    cat: &Catalog,
    names: &HashMap<ManifestId, SnapshotName>,
    known: &Known,
) -> Result<Chain, StoreError> {
    let mut snapshots = Vec::with_capacity(cat.snapshots.len());
    for s in &cat.snapshots {
        let hex = s.manifest.to_hex();
        let (full, base, depth) = match known.get(&hex) {
            Some(k) => k.clone(),
            None => {
                let h = repo.manifest_header(&s.manifest)?;
                let base = h.delta_base.and_then(|b| names.get(&b).cloned());
                (h.delta_base.is_none(), base, h.depth)
            }
        };
        snapshots.push(Link {
            name: s.name.clone(),
            created: millis(s.created),
            size: s.size,
            full,
            base,
            depth,
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

fn millis(t: snapsync_core::Timestamp) -> Millis {
    Millis::try_from(t.as_nanos() / 1_000_000).unwrap_or(Millis::MAX)
}

/// Every repository's samples, as kept in `state_dir/repositories.json`.
pub type Samples = BTreeMap<String, Vec<Sample>>;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(at: Millis) -> Sample {
        Sample {
            at,
            stored_bytes: at as u64,
            logical_bytes: 2 * at as u64,
            volumes: 1,
            snapshots: 1,
        }
    }

    proptest! {
        /// Whatever arrives in whatever order: at most `max` samples, sorted, one per
        /// time, the newest and the oldest kept, and the newer half never thinned
        /// before the older one.
        #[test]
        fn samples_stay_bounded_sorted_and_span_the_history(
            times in proptest::collection::vec(0i64..100_000, 1..600),
            max in 3usize..50,
        ) {
            let mut v = Vec::new();
            for &t in &times {
                push_sample(&mut v, s(t), max);
                prop_assert!(v.len() <= max);
                prop_assert!(v.windows(2).all(|w| w[0].at < w[1].at));
            }
            let newest = *times.iter().max().unwrap();
            let oldest = *times.iter().min().unwrap();
            prop_assert!(v.iter().any(|x| x.at == oldest));
            prop_assert!(v.iter().any(|x| x.at == newest));
            let mut sorted = times.clone();
            sorted.sort();
            sorted.dedup();
            if sorted.len() <= max {
                prop_assert_eq!(v.len(), sorted.len());
            }
        }

        /// In time order (as a daemon samples), the first sample is never lost and the
        /// recent ones are all there.
        #[test]
        fn in_order_the_first_and_the_recent_stay(n in 1usize..2000, max in 3usize..60) {
            let mut v = Vec::new();
            for t in 0..n as i64 {
                push_sample(&mut v, s(t), max);
            }
            prop_assert_eq!(v[0].at, 0);
            prop_assert_eq!(v.last().unwrap().at, n as i64 - 1);
            let recent = (max / 4).min(n);
            for k in 0..recent {
                prop_assert!(v.iter().any(|x| x.at == (n - 1 - k) as i64), "lost recent {}", k);
            }
        }
    }
}
