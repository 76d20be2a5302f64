//! Retention without losing a base.
//!
//! Two rules (zrepl#631 is what breaking them costs: a fan-out that prunes a snapshot
//! before every target has it, or after, a target's base, sends everything again):
//!
//! - At a destination, prune never removes the destination's own replication base: the
//!   repository keeps the newest snapshot its hints name per source unless forced, and
//!   the daemon never forces. A destination that is itself the source of another job (a
//!   cascade, `/backup/repo` then `s3://offsite`) also keeps what that job's destinations
//!   hold as their base: a volume whose prune would remove one is left alone this run
//!   ([`prune`] checks with a dry run first) and pruned once they have caught up.
//! - At a source whose snapshots snapsync takes and removes (a running VM's
//!   checkpoints), every checkpoint from the oldest base some destination still needs
//!   on is kept ([`checkpoints_to_keep`]): a checkpoint's bitmap is what the next
//!   incremental to that destination is computed from. A destination that is down keeps
//!   its last known base (from the state directory) until it catches up.

use std::collections::{BTreeMap, BTreeSet};

use snapsync_core::VolumeInfo;
use snapsync_repo::{PruneOptions, Repository};
use snapsync_store::{Store, StoreError};

use crate::config::Retention;
use crate::record::Bases;

/// Snapshots (per volume) that must stay at a store because some destination holds
/// them as its base.
pub type Protected = BTreeMap<String, BTreeSet<String>>;

/// Collect the bases of `destinations` into what their source must keep.
pub fn protected<'a>(destinations: impl IntoIterator<Item = &'a Bases>) -> Protected {
    let mut p = Protected::new();
    for bases in destinations {
        for (volume, base) in bases {
            p.entry(volume.clone())
                .or_default()
                .insert(base.snapshot.clone());
        }
    }
    p
}

/// How many of each volume's newest snapshots a checkpoint-taking source keeps: at
/// least `default`, and enough that every protected snapshot still listed is among
/// them. (Such a source keeps the newest N per volume; keeping a base means keeping
/// everything younger too, whose bitmaps its diff is the union of.)
pub fn checkpoints_to_keep(listing: &[VolumeInfo], keep: &Protected, default: usize) -> usize {
    listing
        .iter()
        .filter_map(|v| {
            let needed = keep.get(&v.name)?;
            // Snapshots are listed oldest first.
            let oldest = v.snapshots.iter().position(|s| needed.contains(&s.name))?;
            Some(v.snapshots.len() - oldest)
        })
        .fold(default, usize::max)
}

/// What [`prune`] did at one destination.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Removed, `VOLUME@SNAPSHOT`.
    pub removed: Vec<String>,
    /// Volumes left alone, with the snapshot and why.
    pub held: Vec<String>,
    /// Bytes freed by gc, when it ran.
    pub gc_freed: Option<u64>,
}

/// Apply `retention` to `volumes` of `repo` (those it holds), keeping `keep` (what
/// jobs replicating from this repository need).
pub fn prune(
    repo: &Repository,
    retention: &Retention,
    volumes: &[String],
    keep: &Protected,
) -> Result<Pruned, StoreError> {
    let held_by_repo: BTreeSet<String> = repo.list()?.into_iter().map(|v| v.name).collect();
    let mut targets: Vec<String> = volumes
        .iter()
        .filter(|v| held_by_repo.contains(*v))
        .cloned()
        .collect();
    let mut out = Pruned::default();
    if targets.is_empty() {
        return Ok(out);
    }
    let options = PruneOptions::new(retention.policy);
    if targets.iter().any(|v| keep.contains_key(v)) {
        let plan = repo.prune(
            &options
                .clone()
                .with_volumes(targets.clone())
                .with_dry_run(true),
        )?;
        let unsafe_volumes = held_volumes(
            plan.volumes
                .iter()
                .map(|v| (v.volume.as_str(), v.removed.as_slice())),
            keep,
        );
        for (volume, snapshot) in &unsafe_volumes {
            out.held.push(format!(
                "{volume}: not pruned, {} is the base of a job replicating from here",
                snapsync_core::quote_snapshot(volume, snapshot)
            ));
        }
        targets.retain(|v| !unsafe_volumes.iter().any(|(u, _)| u == v));
        if targets.is_empty() {
            return Ok(out);
        }
    }
    let report = repo.prune(&options.with_volumes(targets))?;
    for v in &report.volumes {
        for s in &v.removed {
            out.removed.push(format!("{}@{s}", v.volume));
        }
    }
    if retention.gc && !out.removed.is_empty() {
        out.gc_freed = Some(repo.gc()?.bytes_freed);
    }
    Ok(out)
}

/// The volumes whose planned removals include a protected snapshot, each with the
/// first such snapshot.
pub fn held_volumes<'a>(
    plan: impl IntoIterator<Item = (&'a str, &'a [String])>,
    keep: &Protected,
) -> Vec<(String, String)> {
    plan.into_iter()
        .filter_map(|(volume, removed)| {
            let protected = keep.get(volume)?;
            let hit = removed.iter().find(|s| protected.contains(*s))?;
            Some((volume.to_string(), hit.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests;
