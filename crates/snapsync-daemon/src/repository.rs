//! What the status page shows of a repository destination: how much it stores over
//! time, and each volume's chain of snapshots and delta bases.
//!
//! Both are read by a run, after it replicated to a repository (local, S3, or served by
//! `snapsync serve`: all through [`RepositoryView`], whose repository-side half is in
//! `snapsync-repo`), on the run's thread (the loop never waits on a store), and kept by
//! the loop: the samples in `state_dir/repositories.json`, bounded by [`thin`]; the
//! chains with the job's state.
//!
//! A sample's ratio of stored to logical bytes is what dedup (between snapshots, within
//! them, of zeros) and compression save together. A repository is sampled after a run
//! that changed it (replicated or pruned something: the listing is small next to what
//! that run wrote), and otherwise at most once a minute, which catches what others do
//! to it (`gc`, another writer). A chain reads each manifest's fixed fields once:
//! manifests never change, so what an earlier run read is passed back ([`Known`]) and
//! only new ones are read, also from a served repository.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
pub use snapsync_store::view::{known, Chain, Known, Link, RepositoryView, SnapshotName};
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
pub fn sample(repo: &dyn RepositoryView, at: Millis) -> Result<Sample, StoreError> {
    let size = repo.size()?;
    Ok(Sample {
        at,
        stored_bytes: size.stored_bytes,
        logical_bytes: size.logical_bytes,
        volumes: size.volumes,
        snapshots: size.snapshots,
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
