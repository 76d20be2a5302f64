//! `prune`: remove snapshots by a retention policy and keep every chain valid.
//!
//! Removing a snapshot from a catalog would leave the manifests of younger snapshots
//! pointing at a delta base that `gc` may delete. So prune merges each removed delta into
//! its children: every kept snapshot whose manifest is based on a manifest that is no
//! longer some kept snapshot's current manifest is re-based onto its nearest kept
//! ancestor (or onto the kept snapshot with the same identity, after a re-base by
//! insertion), or written as a full map. Afterwards every chain runs only through kept
//! snapshots' manifests, and `gc` can delete everything else.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use snapsync_core::{apply_policy, BlockRef, KeepPolicy, SnapshotId, SnapshotInfo};
use snapsync_store::{Result, StoreError};
use tracing::debug;

use crate::format::{Catalog, CatalogSnapshot, ManifestId};
use crate::repo::{Repository, MAX_CHAIN_LEN};
use crate::stream::{delta_between, ChainCursor};
use crate::writer::ManifestWriter;

/// What prune did (or would do, with `dry_run`) to one volume.
#[non_exhaustive]
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VolumePrune {
    /// Volume.
    pub volume: String,
    /// Snapshots kept, oldest first, with the rules that keep each.
    pub kept: Vec<KeptSnapshot>,
    /// Snapshots removed, oldest first.
    pub removed: Vec<String>,
    /// Manifests rewritten to merge removed deltas into their children.
    pub manifests_rewritten: u64,
}

/// A kept snapshot and why.
#[non_exhaustive]
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KeptSnapshot {
    /// Name.
    pub name: String,
    /// Rules: "last", "hourly", "daily", "weekly", "monthly", or "replication-base".
    pub reasons: Vec<String>,
}

/// What prune did.
#[non_exhaustive]
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct PruneReport {
    /// True when nothing was changed.
    pub dry_run: bool,
    /// Per volume.
    pub volumes: Vec<VolumePrune>,
}

const COMMIT_ATTEMPTS: u32 = 20;

/// What [`Repository::prune`] removes and how.
///
/// With the `clap` feature it is also the command line's prune flags (`--volume`,
/// `--keep-*`, `--force`, `--dry-run`).
#[non_exhaustive]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct PruneOptions {
    /// Only these volumes (repeatable); every volume when empty.
    #[cfg_attr(feature = "clap", arg(long = "volume"))]
    pub volumes: Vec<String>,
    /// The retention rules; at least one must be set.
    #[cfg_attr(feature = "clap", command(flatten))]
    pub policy: KeepPolicy,
    /// Also remove the newest snapshot a source replicates against (its next
    /// replication will be full).
    #[cfg_attr(feature = "clap", arg(long))]
    pub force: bool,
    /// Show what would be removed, change nothing.
    #[cfg_attr(feature = "clap", arg(long))]
    pub dry_run: bool,
}

impl PruneOptions {
    /// Options that apply `policy` to every volume.
    pub fn new(policy: KeepPolicy) -> Self {
        Self {
            policy,
            ..Self::default()
        }
    }

    /// Only these volumes.
    pub fn with_volumes(mut self, volumes: Vec<String>) -> Self {
        self.volumes = volumes;
        self
    }

    /// Set [`PruneOptions::force`].
    pub fn with_force(mut self, force: bool) -> Self {
        self.force = force;
        self
    }

    /// Set [`PruneOptions::dry_run`].
    pub fn with_dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }
}

impl Repository {
    /// Apply `options.policy` to `options.volumes` (all when empty). The newest snapshot
    /// that hints name as the common base with a source is kept unless `options.force`:
    /// removing it would make that source's next replication a full one.
    pub fn prune(&self, options: &PruneOptions) -> Result<PruneReport> {
        let PruneOptions {
            volumes,
            policy,
            force: _,
            dry_run,
        } = options;
        let dry_run = *dry_run;
        if policy.is_empty() {
            return Err(StoreError::invalid_argument(
                "a prune without any keep rule would remove every snapshot; give at least one",
            ));
        }
        let _lock = if dry_run {
            None
        } else {
            Some(self.session_lock("prune")?)
        };
        let mut catalogs = self.catalogs()?;
        for v in volumes {
            if !catalogs.iter().any(|c| &c.volume == v) {
                return Err(StoreError::not_found(format!(
                    "volume {v:?} in {}",
                    self.location()
                )));
            }
        }
        // Parents before clones, so a clone is re-based onto its origin's new manifests.
        catalogs.sort_by_key(|c| c.origin.is_some());
        let mut report = PruneReport {
            dry_run,
            volumes: vec![],
        };
        for cat in catalogs {
            if !volumes.is_empty() && !volumes.contains(&cat.volume) {
                continue;
            }
            let mut attempt = 0;
            loop {
                attempt += 1;
                let fresh = self.catalog(&cat.volume)?.unwrap_or_else(|| cat.clone());
                let (next, vp) = self.prune_catalog(&fresh, options)?;
                if dry_run || vp.removed.is_empty() {
                    report.volumes.push(vp);
                    break;
                }
                match self.put_catalog(&next) {
                    Ok(()) => {
                        report.volumes.push(vp);
                        break;
                    }
                    Err(StoreError::Conflict { .. }) if attempt < COMMIT_ATTEMPTS => {
                        debug!(volume = %cat.volume, "prune raced with a commit; retrying");
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(report)
    }

    fn prune_catalog(
        &self,
        cat: &Catalog,
        options: &PruneOptions,
    ) -> Result<(Catalog, VolumePrune)> {
        let PruneOptions {
            policy,
            force,
            dry_run,
            ..
        } = options;
        let infos: Vec<SnapshotInfo> = cat
            .snapshots
            .iter()
            .map(|s| SnapshotInfo {
                name: s.name.clone(),
                id: s.id,
                created: s.created,
                size: s.size,
            })
            .collect();
        let mut keep: BTreeMap<String, Vec<String>> = apply_policy(&infos, policy)
            .into_iter()
            .map(|(k, v)| (k, v.into_iter().map(String::from).collect()))
            .collect();
        if !*force {
            // The replication cursor: per source, the newest snapshot held.
            for h in &cat.hints {
                let newest = h
                    .snapshots
                    .iter()
                    .filter(|x| x.local_volume == cat.volume)
                    .filter_map(|x| cat.snapshots.iter().find(|s| s.name == x.local_snapshot))
                    .max_by_key(|s| (s.created, s.name.clone()));
                if let Some(s) = newest {
                    keep.entry(s.name.clone())
                        .or_default()
                        .push("replication-base".into());
                }
            }
        }
        let removed: Vec<String> = cat
            .snapshots
            .iter()
            .filter(|s| !keep.contains_key(&s.name))
            .map(|s| s.name.clone())
            .collect();
        let kept_entries: Vec<CatalogSnapshot> = cat
            .snapshots
            .iter()
            .filter(|s| keep.contains_key(&s.name))
            .cloned()
            .collect();
        let mut vp = VolumePrune {
            volume: cat.volume.clone(),
            kept: kept_entries
                .iter()
                .map(|s| KeptSnapshot {
                    name: s.name.clone(),
                    reasons: keep[&s.name].clone(),
                })
                .collect(),
            removed: removed.clone(),
            manifests_rewritten: 0,
        };
        let mut next = cat.clone();
        if removed.is_empty() || *dry_run {
            return Ok((next, vp));
        }
        // Live manifests after prune: this volume's kept snapshots, and every other
        // volume's current snapshots (clone origins).
        let mut live: HashMap<ManifestId, ()> = HashMap::new();
        let mut by_identity: HashMap<SnapshotId, ManifestId> = HashMap::new();
        for other in self.catalogs()? {
            if other.volume == cat.volume {
                continue;
            }
            for s in &other.snapshots {
                live.insert(s.manifest, ());
                by_identity.insert(s.id, s.manifest);
            }
        }
        for s in &kept_entries {
            live.insert(s.manifest, ());
            by_identity.insert(s.id, s.manifest);
        }
        let mut rewritten: Vec<CatalogSnapshot> = Vec::new();
        for s in &kept_entries {
            let m = self.check_manifest(&s.manifest)?;
            let Some(base) = m.head.header.delta_base else {
                rewritten.push(s.clone());
                continue;
            };
            if live.contains_key(&base) {
                rewritten.push(s.clone());
                continue;
            }
            // Walk up to the nearest live ancestor (or its live twin by identity).
            let mut new_base = None;
            let mut cur = Some(base);
            while let Some(id) = cur {
                if live.contains_key(&id) {
                    new_base = Some(id);
                    break;
                }
                let am = self.check_manifest(&id)?;
                if let Some(twin) = by_identity.get(&am.head.header.id) {
                    new_base = Some(*twin);
                    break;
                }
                cur = am.head.header.delta_base;
            }
            let new_id = self.rebase_manifest(&s.manifest, new_base)?;
            live.remove(&s.manifest);
            live.insert(new_id, ());
            by_identity.insert(s.id, new_id);
            vp.manifests_rewritten += 1;
            rewritten.push(CatalogSnapshot {
                manifest: new_id,
                ..s.clone()
            });
        }
        next.snapshots = rewritten;
        for h in &mut next.hints {
            h.snapshots
                .retain(|x| x.local_volume != cat.volume || !removed.contains(&x.local_snapshot));
        }
        next.generation += 1;
        Ok((next, vp))
    }

    /// Store the snapshot of manifest `target` again as a delta against `base`, or as a
    /// full map when there is none or its chain is too long. Both maps are streamed
    /// along their chains (the removed deltas are merged into the new one as they are
    /// read), so memory does not grow with the volume.
    pub(crate) fn rebase_manifest(
        &self,
        target: &ManifestId,
        base: Option<ManifestId>,
    ) -> Result<ManifestId> {
        let chain = self.checked_chain(target)?;
        let mut header = chain[0].head.header.clone();
        let block_count = chain[0].head.block_count;
        let base_chain = match base {
            Some(b) => Some(self.checked_chain(&b)?).filter(|c| c.len() < MAX_CHAIN_LEN),
            None => None,
        };
        let mut map = ChainCursor::new(self, &chain)?;
        match base_chain {
            Some(base_chain) => {
                header.delta_base = Some(base_chain[0].id);
                header.depth = base_chain[0].head.header.depth.saturating_add(1);
                let mut w = ManifestWriter::new(self, block_count, false);
                let mut base_map = ChainCursor::new(self, &base_chain)?;
                delta_between(&mut base_map, &mut map, block_count, |i, b| w.push(i, b))?;
                w.finish(header)
            }
            None => {
                header.delta_base = None;
                header.depth = 0;
                let mut w = ManifestWriter::new(self, block_count, true);
                while let Some((i, id)) = map.next_data_entry()? {
                    w.push(i, BlockRef::Data(id))?;
                }
                w.finish(header)
            }
        }
    }
}
